"""study.py: ND-PPL and the NER↔ND-PPL correlations by scope computed from given perplexities, the markdown
that states them, and the figures."""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import pytest
from scipy import stats

from kvcore_eval import metrics
from kvcore_eval.analysis import study
from kvcore_eval.config import SweepConfig, TruncationConfig

TASKS = ["kvcore_alpaca", "kvcore_codealpaca", "kvcore_medalpaca", "kvcore_functioncall"]
BASELINE = {"kvcore_alpaca": 10.0, "kvcore_codealpaca": 4.0, "kvcore_medalpaca": 8.0, "kvcore_functioncall": 2.5}
PERPLEXITY = {
    "1.0": dict(BASELINE),
    "0.5": {"kvcore_alpaca": 11.0, "kvcore_codealpaca": 5.0, "kvcore_medalpaca": 8.4, "kvcore_functioncall": 3.5},
    "0.25": {"kvcore_alpaca": 14.0, "kvcore_codealpaca": 9.0, "kvcore_medalpaca": 9.0, "kvcore_functioncall": 7.0},
}
NER = {
    "kvcore_alpaca": {"key": 0.40, "value": 0.70},
    "kvcore_codealpaca": {"key": 0.55, "value": 0.65},
    "kvcore_medalpaca": {"key": 0.30, "value": 0.80},
    "kvcore_functioncall": {"key": 0.62, "value": 0.60},
}


def design(basis_scope: str = "per-task") -> dict:
    truncation = TruncationConfig(calibration="runs/shared") if basis_scope == "shared" else TruncationConfig()
    config = SweepConfig(
        model="/models/tiny-llama", out="runs/s", tasks=",".join(TASKS), basis_scope=basis_scope, truncation=truncation
    )
    return {**asdict(config), "model_name": "tiny-llama"}


@pytest.fixture(scope="module")
def summary():
    return study.summarize(TASKS, BASELINE, PERPLEXITY, NER, design())


def test_nd_ppl_is_the_relative_change_of_perplexity(summary):
    assert summary["ranks"] == ["1.0", "0.5", "0.25"] and summary["tasks"] == TASKS
    for task in TASKS:
        assert summary["nd_ppl"][task]["1.0"] == 0.0
        for rank in ("0.5", "0.25"):
            expected = (PERPLEXITY[rank][task] - BASELINE[task]) / BASELINE[task]
            assert summary["nd_ppl"][task][rank] == pytest.approx(expected, rel=1e-12)
    assert summary["nd_ppl"]["kvcore_codealpaca"]["0.25"] == pytest.approx(1.25)
    assert summary["baseline_perplexity"] == BASELINE and summary["ner"] == NER


def test_correlation_across_tasks_equals_scipy_on_one_point_per_task(summary):
    across = summary["correlation"]["across_tasks"]
    assert set(across) == set(PERPLEXITY)
    for rank in ("0.5", "0.25"):
        nd = [summary["nd_ppl"][t][rank] for t in TASKS]
        for kind in study.KINDS:
            ner = [NER[t][kind] for t in TASKS]
            c = across[rank][kind]
            assert c["n"] == len(TASKS)
            assert c["pearson"] == pytest.approx(stats.pearsonr(ner, nd).statistic)
            exact = stats.PermutationMethod(n_resamples=np.inf)  # 4 tasks: every ordering counted
            assert c["pearson_p"] == pytest.approx(stats.pearsonr(ner, nd, method=exact).pvalue)
            assert c["spearman"] == pytest.approx(stats.spearmanr(ner, nd).statistic)
    # at rank 0.5 the ND-PPLs (0.1, 0.25, 0.05, 0.4) rank like the key NERs, against the value NERs
    assert across["0.5"]["key"]["spearman"] == pytest.approx(1.0)
    assert across["0.5"]["value"]["spearman"] == pytest.approx(-1.0)
    assert all(math.isnan(across["1.0"][kind]["pearson"]) for kind in study.KINDS), "constant ND-PPL: undefined"


def test_markdown_states_every_task_rank_and_correlation(summary):
    text = study.to_markdown(summary)
    assert text.startswith("# Rank sweep: /models/tiny-llama")
    assert "| task | NER K | NER V | PPL full | ND-PPL r=1.0 | ND-PPL r=0.5 | ND-PPL r=0.25 |" in text
    for task in TASKS:
        cells = " | ".join(f"{summary['nd_ppl'][task][r]:.4f}" for r in summary["ranks"])
        ner = NER[task]
        assert f"| {task} | {ner['key']:.3f} | {ner['value']:.3f} | {BASELINE[task]:.3f} | {cells} |" in text
    c = summary["correlation"]["across_tasks"]["0.25"]["key"]
    assert f"| 0.25 | r={c['pearson']:+.2f} (p={c['pearson_p']:.2g}), ρ={c['spearman']:+.2f}" in text
    assert "| 1.0 | n/a (n=4) | n/a (n=4) |" in text
    assert study.design_sentence(summary["design"]) in text


def test_design_sentence_names_the_basis_scope_and_held_out_data():
    per_task, shared = study.design_sentence(design("per-task")), study.design_sentence(design("shared"))
    assert "its own calibration (`--basis-scope per-task`)" in per_task and per_task.endswith("are disjoint.")
    assert "the bases of `runs/shared` (`--basis-scope shared`)" in shared
    assert "whatever it was calibrated on" in shared and "whatever" not in per_task
    assert "byte_perplexity" in per_task and "pre_rope keys" in per_task
    assert "kept dimensions stored in the model's dtype" in per_task


def test_design_sentence_names_a_data_free_basis_and_the_bits():
    """A sweep with basis=random and latent_bits=8 is not truncated with "its own calibration"."""
    sweep = design("per-task")
    sweep["truncation"] = {**sweep["truncation"], "basis": "random", "latent_bits": 8}
    sentence = study.design_sentence(sweep)
    assert "seeded random orthonormal bases (`basis=random`)" in sentence and "own calibration" not in sentence
    assert "kept dimensions stored in 8 bits" in sentence


LAYER_ND = {"kvcore_alpaca": {"key": [0.5, 0.1, 0.02, 0.3], "value": [0.2, 0.4, 0.1, 0.05]}}
LAYER_NER = {"kvcore_alpaca": {"key": [0.2, 0.5, 0.7, 0.3], "value": [0.6, 0.3, 0.8, 0.9]}}
RESIDUAL = {"kvcore_alpaca": {"key": [0.3, 0.05, 0.01, 0.2], "value": [0.1, 0.2, 0.02, 0.04]}}


def test_per_layer_correlations_by_scope():
    layers = study.summarize_layers(LAYER_ND, LAYER_NER, RESIDUAL, 0.25)
    scopes = layers["correlation"]["kvcore_alpaca"]
    assert set(scopes) == {"key", "value", "key_and_value"}
    for kind in study.KINDS:
        assert scopes[kind]["ner"] == metrics.correlation(
            LAYER_NER["kvcore_alpaca"][kind], LAYER_ND["kvcore_alpaca"][kind]
        )
        assert scopes[kind]["residual_energy"]["n"] == 4
    pooled = scopes["key_and_value"]
    nd = LAYER_ND["kvcore_alpaca"]["key"] + LAYER_ND["kvcore_alpaca"]["value"]
    assert pooled["ner"]["n"] == 8
    assert pooled["ner"]["pearson"] == pytest.approx(
        stats.pearsonr(LAYER_NER["kvcore_alpaca"]["key"] + LAYER_NER["kvcore_alpaca"]["value"], nd).statistic
    )
    residual = RESIDUAL["kvcore_alpaca"]["key"] + RESIDUAL["kvcore_alpaca"]["value"]
    assert pooled["residual_energy"]["spearman"] == pytest.approx(stats.spearmanr(residual, nd).statistic)
    assert scopes["key"]["residual_energy"]["spearman"] == pytest.approx(1.0), "ranked like the ND-PPL of keys"
    assert layers["rank"] == 0.25 and layers["nd_ppl"] is LAYER_ND


def test_per_layer_markdown_has_a_row_per_layer_and_each_scope():
    layers = study.summarize_layers(LAYER_ND, LAYER_NER, RESIDUAL, 0.25)
    text = study.per_layer_markdown(layers)
    assert "one layer truncated to rank 0.25 of D" in text and "## kvcore_alpaca" in text
    assert "| 0 | 0.5000 | 0.2000 | 0.2000 | 0.6000 | 0.3000 | 0.1000 |" in text
    assert sum(line.startswith("| ") and line[2].isdigit() for line in text.splitlines()) == 4
    for scope in ("across layers, keys", "across layers, values", "across layers, K and V pooled"):
        assert f"| {scope} | r=" in text


def test_figures_are_written(summary, tmp_path):
    study.plot_nd_ppl(summary, tmp_path / "nd.png")
    study.plot_ner_vs_nd_ppl(summary, tmp_path / "scatter.png")
    study.plot_per_layer(study.summarize_layers(LAYER_ND, LAYER_NER, RESIDUAL, 0.25), tmp_path / "layers.png")
    for name in ("nd.png", "scatter.png", "layers.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert np.isfinite(summary["nd_ppl"]["kvcore_alpaca"]["0.25"])

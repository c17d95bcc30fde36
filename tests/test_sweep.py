import json

import numpy as np
import pytest

from conftest import EXAMPLE_DATA, EXAMPLE_MODEL
from kvcore_eval.compare import compare
from kvcore_eval.config import SweepConfig
from kvcore_eval.sweep import run_sweep, summarize, task_source


@pytest.mark.parametrize("ranks,message", [("", "empty"), ("1.0,1.5", r"\(0, 1\]"), ("0,0.5", r"\(0, 1\]"), ("half", "fractions")])
def test_bad_rank_lists_are_refused(ranks, message):
    with pytest.raises(ValueError, match=message):
        SweepConfig(model="m", calibration="c", out="o", ranks=ranks)


def test_task_sources():
    assert task_source("kvcore_alpaca") == "kvcore:alpaca"
    assert task_source("kvcore_visr_de") == "kvcore:visr:de"


def test_summary_math():
    baseline = {"a": 10.0, "b": 20.0, "c": 5.0}
    truncated = {1.0: baseline, 0.5: {"a": 11.0, "b": 26.0, "c": 5.75}}
    ner = {"a": {"key": 0.2, "value": 0.5}, "b": {"key": 0.6, "value": 0.7}, "c": {"key": 0.3, "value": 0.1}}
    summary = summarize(baseline, truncated, ner)
    assert summary["nd_ppl"]["b"] == {"1": 0.0, "0.5": pytest.approx(0.3)}
    assert summary["correlation"]["0.5"]["key"]["spearman"] == pytest.approx(1.0)  # ND-PPL 0.1, 0.3, 0.15 rank like key NER 0.2, 0.6, 0.3
    assert np.isnan(summary["correlation"]["1"]["key"]["pearson"])


@pytest.fixture(scope="module")
def embedded_artifact(tmp_path_factory):
    from kvcore_eval.calibrate import calibrate
    from kvcore_eval.config import CalibrationConfig

    out = tmp_path_factory.mktemp("sweep") / "artifact"
    return calibrate(CalibrationConfig(model=str(EXAMPLE_MODEL), dataset="kvcore:alpaca", data_dir=str(EXAMPLE_DATA), out=str(out),
                                       max_tokens=4000, seq_len=128, device="cpu"))


def test_sweep_on_embedded_default_writes_tables_plots_and_resumes(embedded_artifact, tmp_path):
    config = SweepConfig(model=str(EXAMPLE_MODEL), calibration=str(embedded_artifact), out=str(tmp_path / "sweep"),
                         tasks="kvcore_alpaca,kvcore_codealpaca,kvcore_visr_de", ranks="1.0,0.5,0.125", data_dir=str(EXAMPLE_DATA),
                         limit=4, ner_tokens=1000, seq_len=128)
    summary = run_sweep(config)
    out = tmp_path / "sweep"
    for name in ("sweep.json", "sweep.md", "nd_ppl.png", "ner_vs_nd_ppl.png", "config.json", "points/baseline.json", "points/rank_0.5.json"):
        assert (out / name).exists(), name
    for task in summary["tasks"]:
        deltas = summary["nd_ppl"][task]
        assert abs(deltas["1"]) < 1e-6, "full rank reproduces the baseline"
        assert deltas["0.125"] > deltas["0.5"] > deltas["1"] - 1e-6, f"{task}: ND-PPL grows as rank falls"
        assert 0 < summary["ner"][task]["key"] < summary["ner"][task]["value"] <= 1
    markdown = (out / "sweep.md").read_text()
    assert "ND-PPL r=0.125" in markdown and "K Spearman" in markdown

    point = out / "points" / "rank_0.5.json"  # a finished point is reused, not recomputed
    saved = json.loads(point.read_text())
    saved["metrics"]["kvcore_alpaca"]["byte_perplexity"] = 2 * summary["baseline_perplexity"]["kvcore_alpaca"]
    point.write_text(json.dumps(saved))
    assert run_sweep(config)["nd_ppl"]["kvcore_alpaca"]["0.5"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="other settings"):
        run_sweep(SweepConfig(**{**vars(config), "limit": 3}))


def _results(path, tasks):
    path.write_text(json.dumps({"results": {task: {"alias": task, "byte_perplexity,none": value, "byte_perplexity_stderr,none": "N/A"}
                                            for task, value in tasks.items()}}))
    return path


def test_compare(tmp_path):
    a = _results(tmp_path / "a.json", {"kvcore_alpaca": 2.0, "kvcore_medalpaca": 4.0})
    b = _results(tmp_path / "b.json", {"kvcore_alpaca": 3.0, "kvcore_medalpaca": 4.0})
    rows = compare(a, b)
    assert [(r["task"], r["delta"], r["relative"]) for r in rows] == [("kvcore_alpaca", 1.0, 0.5), ("kvcore_medalpaca", 0.0, 0.0)]
    other = _results(tmp_path / "c.json", {"kvcore_alpaca": 3.0})
    with pytest.raises(ValueError, match="different tasks"):
        compare(a, other)

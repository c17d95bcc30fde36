import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import EXAMPLE_DATA, EXAMPLE_MODEL, calibrate_in_memory, lock_held_by_a_thread

from kvcore_eval.config import FrontierConfig
from kvcore_eval.experiments.frontier import largest_within, pareto, run_frontier
from kvcore_eval.outputs import content_digest

TASK = "kvcore_codealpaca"
BUDGETS = (0.5, 0.25)
METHODS = "uniform,ner,sensitivity"


def frontier_config(out, **overrides) -> FrontierConfig:
    settings = dict(
        model=str(EXAMPLE_MODEL),
        out=str(out),
        tasks=TASK,
        budgets=",".join(map(str, BUDGETS)),
        methods=METHODS,
        data_dir=str(EXAMPLE_DATA),
        num_samples=3,
        calibration_tokens=600,
        seq_len=64,
        sensitivity_tokens=128,
    )
    return FrontierConfig(**{**settings, **overrides})


@pytest.fixture
def count_evaluations(monkeypatch):
    import lm_eval

    calls, real = [], lm_eval.simple_evaluate
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda *a, **k: calls.append(k) or real(*a, **k))
    return calls


@pytest.fixture(scope="module")
def frontier_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("frontier") / "run"
    return out, run_frontier(frontier_config(out))


def test_config_refuses_bad_budgets_methods_and_missing_sensitivity(tmp_path):
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        frontier_config(tmp_path, budgets="0.5,1.0")
    with pytest.raises(ValueError, match="unknown; choose from"):
        frontier_config(tmp_path, methods="uniform,svd")
    with pytest.raises(ValueError, match="no such file"):
        frontier_config(tmp_path, sensitivity=str(tmp_path / "missing.json"))


@pytest.mark.slow
def test_a_row_per_method_and_budget_within_budget_at_measured_bytes(frontier_run):
    out, rows = frontier_run
    assert json.loads((out / "frontier.json").read_text()) == json.loads(json.dumps(rows))
    for name in ("frontier.md", "frontier.png", "config.json"):
        assert (out / name).exists(), name
    full = next(r for r in rows if r["method"] == "full")
    assert full["value"] == 0 and full["fraction_of_full"] == 1
    # the embedded default: 4 layers, D = 32, float32 -> a full cache holds 2 * 4 * 32 * 4 bytes a token
    assert full["bytes_per_token"] == 2 * 4 * 32 * 4
    for method in METHODS.split(","):
        placed = {float(r["budget"]): r for r in rows if r["method"] == method}
        assert sorted(placed) == sorted(BUDGETS), method
        for budget, row in placed.items():
            assert row["within_budget"] and row["bytes_per_token"] <= budget * full["bytes_per_token"], (method, budget)
            assert row["bytes_per_token"] > 0.8 * budget * full["bytes_per_token"], "placed close to its budget"
            for key in ("task", "basis", "allocation", "bits", "metric", "value"):
                assert row[key] is not None, key
        assert placed[0.25]["value"] > placed[0.5]["value"] > 0, f"{method}: fewer bytes cost more ND-PPL"
    uniform = next(r for r in rows if r["method"] == "uniform" and r["budget"] == "0.5")
    rank = uniform["rank_plan"]["key_rank_per_layer"][0]
    rope_positions = 4  # one int32 position of one rotary group per token: its tables are recomputed
    assert uniform["bytes_per_token"] == 2 * 4 * rank * 4 + rope_positions, "bytes counted from what the cache holds"
    assert uniform["bytes_per_token"] + 2 * 4 * 4 > 0.5 * full["bytes_per_token"], "the largest rank that fits"
    sensitivity = json.loads((out / "sensitivity" / f"{TASK}.json").read_text())
    assert sensitivity["settings"]["tokens"] == 128 and "held-out" in sensitivity["settings"]["measure"]
    assert len(sensitivity["nd_ppl"][TASK]["key"]) == 4 and max(sensitivity["nd_ppl"][TASK]["value"]) > 0


def test_per_document_byte_perplexities_aggregate_to_lm_evals(frontier_run):
    """Each document's own byte perplexity, weighted by the bytes lm-eval scored in it, gives back lm-eval's byte
    perplexity of the task."""
    out, rows = frontier_run
    row = next(r for r in rows if r["method"] == "uniform" and r["budget"] == "0.5")
    point = json.loads((out / "points" / TASK / f"{row['point']}.json").read_text())
    sizes = point["per_document_weight"]
    assert sorted(sizes) == ["0", "1", "2"] and all(size > 0 for size in sizes.values())
    logs = [np.log(point["per_document"][doc]) * size for doc, size in sizes.items()]
    assert np.exp(sum(logs) / sum(sizes.values())) == pytest.approx(point["value"], rel=1e-9)
    assert len(set(point["per_document"].values())) == 3


def test_pareto_front_on_the_rows(frontier_run):
    _, rows = frontier_run
    flags = [r["pareto"] for r in rows]
    assert flags == pareto(rows)
    for row in rows:
        better = [
            o
            for o in rows
            if o is not row
            and o["bytes_per_token"] <= row["bytes_per_token"]
            and o["value"] <= row["value"]
            and (o["bytes_per_token"] < row["bytes_per_token"] or o["value"] < row["value"])
        ]
        assert row["pareto"] == (not better), row["method"]
    assert next(r for r in rows if r["method"] == "full")["pareto"], "the full cache has the best quality"
    cheapest = min(rows, key=lambda r: (r["bytes_per_token"], r["value"]))
    assert cheapest["pareto"]


@pytest.fixture
def count_loads(monkeypatch):
    from kvcore_eval.model import models

    loads, real = [], models.load_causal_lm
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: loads.append(a) or real(*a, **k))
    return loads


def test_a_refused_rerun_writes_nothing(frontier_run, count_loads):
    """`--num-samples 2` into a folder made with 3: refused before the model loads, config.json still the settings of
    the frontier.md beside it."""
    out, _ = frontier_run
    before = {name: (out / name).read_bytes() for name in ("config.json", "frontier.json", "frontier.md")}
    with pytest.raises(ValueError, match=r"frontier with other settings \(num_samples: 3 then, 2 now\); nothing was"):
        run_frontier(frontier_config(out, num_samples=2))
    assert count_loads == []
    assert {name: (out / name).read_bytes() for name in before} == before


def test_edited_and_damaged_points_and_frontier_json_are_named_and_computed_again(
    frontier_run, tmp_path, count_evaluations, caplog
):
    """A point whose value was edited by hand (ND-PPL -0.94 otherwise), a half-written point and a half-written
    frontier.json: each named in a warning, the points computed again (derived data), the frontier as it was."""
    import shutil

    out, rows = frontier_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    edited = copy / "points" / TASK / f"{rows[1]['point']}.json"
    point = json.loads(edited.read_text())
    point["value"] = 0.06 * point["value"]
    edited.write_text(json.dumps(point))
    damaged = copy / "points" / TASK / f"{rows[2]['point']}.json"
    damaged.write_text(damaged.read_text()[:100])
    (copy / "frontier.json").write_text("[{")
    with caplog.at_level("WARNING"):
        again = run_frontier(frontier_config(copy))
    assert [r["value"] for r in again] == [r["value"] for r in rows]
    assert len(count_evaluations) == 2, "only the edited and the damaged point are scored again"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"{edited} does not match the digest of its content" in w for w in warnings), warnings
    assert any(f"{damaged} is not valid JSON" in w and "computed again" in w for w in warnings), warnings
    assert any(f"{copy / 'frontier.json'} is not valid JSON" in w for w in warnings), warnings
    original = json.loads((out / edited.relative_to(copy)).read_text())
    assert json.loads(edited.read_text())["digest"] == original["digest"], "computed again as it was"


def test_a_frontier_into_a_folder_another_run_writes_is_refused_naming_it(tmp_path, count_loads):
    import os

    out = tmp_path / "busy"
    with lock_held_by_a_thread(out):
        with pytest.raises(FileExistsError, match=f"being written by another kvcore-eval run \\(pid {os.getpid()} "):
            run_frontier(frontier_config(out))
    assert count_loads == [] and not out.exists()


@pytest.mark.slow
def test_two_concurrent_frontiers_into_one_folder_one_runs_the_other_is_refused(tmp_path):
    """Two frontiers with other --methods into one --out: the second is refused with the first's pid; the first's
    frontier.json holds its own methods, and its frontier.md calls none of them "of an earlier run"."""
    from conftest import stopped_while_holding_the_lock

    out = tmp_path / "shared"
    first = [
        "frontier",
        *("--model", str(EXAMPLE_MODEL), "--data-dir", str(EXAMPLE_DATA), "--tasks", TASK, "--methods", "uniform"),
        *("--budgets", "0.5", "--num-samples", "3", "--calibration-tokens", "600", "--seq-len", "64"),
        *("--out", str(out)),
    ]
    with stopped_while_holding_the_lock(first, tmp_path / "shared.kvcore-lock") as running:
        with pytest.raises(FileExistsError, match=f"being written by another kvcore-eval run \\(pid {running.pid} "):
            run_frontier(frontier_config(out, methods="ner", budgets="0.5"))
    assert running.returncode == 0, running.stderr_text[-3000:]
    rows = json.loads((out / "frontier.json").read_text())
    assert [r["method"] for r in rows] == ["full", "uniform"]
    assert "Left out" not in (out / "frontier.md").read_text()
    assert json.loads((out / "config.json").read_text())["methods"] == "uniform"


def test_pareto_and_placement_by_hand():
    rows = [
        {"task": "t", "bytes_per_token": b, "value": v, "higher_is_better": False}
        for b, v in ((100, 0.0), (50, 0.2), (50, 0.1), (25, 0.5), (40, 0.6), (25, 0.5))
    ]
    assert pareto(rows) == [True, False, True, True, False, True]
    accuracy = [{**r, "higher_is_better": True} for r in rows]
    assert pareto(accuracy) == [False, False, False, True, True, True]  # (40, 0.6) beats every larger row
    bytes_of = {k: 10 * k for k in range(1, 33)}.__getitem__
    assert largest_within(bytes_of, 1, 32, 205) == 20
    assert largest_within(bytes_of, 1, 32, 5) == 1, "nothing fits: the smallest, flagged by within_budget"


@pytest.mark.slow
def test_rerun_reuses_finished_points_and_refuses_changed_settings(frontier_run, count_evaluations):
    out, rows = frontier_run
    again = run_frontier(frontier_config(out))
    assert count_evaluations == [], "every point was reused"
    assert [r["value"] for r in again] == [r["value"] for r in rows]
    explicit = run_frontier(frontier_config(out, dtype="float32"))  # --dtype auto is float32 on the CPU: same work
    assert count_evaluations == [] and [r["value"] for r in explicit] == [r["value"] for r in rows]
    point = out / "points" / TASK / "baseline.json"
    original = point.read_text()
    saved = json.loads(original)
    saved["settings"]["run"]["batch_size"] = 7  # a point made with another setting is never reused silently
    saved["digest"] = content_digest({k: v for k, v in saved.items() if k != "digest"})  # as another run wrote it
    point.write_text(json.dumps(saved))
    try:
        with pytest.raises(ValueError, match="other settings.*batch_size"):
            run_frontier(frontier_config(out))
    finally:
        point.write_text(original)
    with pytest.raises(ValueError, match="frontier with other settings.*calibration_tokens: 600 then, 900 now"):
        run_frontier(frontier_config(out, calibration_tokens=900))


def test_a_seeded_basis_point_made_by_another_build_is_refused(tmp_path, monkeypatch):
    """No artifact records a rotation's basis: its point carries a digest of the basis built, so a point made before
    a change to how it is drawn (the sign fix of the randomized Hadamard) is refused rather than reused."""
    from kvcore_eval.compression import bases
    from kvcore_eval.experiments.session import seeded_basis_sha256

    config = frontier_config(tmp_path / "run", methods="rotation4", budgets="0.5")
    run_frontier(config)
    drawn = bases.rotation_bases
    monkeypatch.setattr(bases, "rotation_bases", lambda geometry, seed: drawn(geometry, seed + 1))  # another draw
    seeded_basis_sha256.cache_clear()
    try:
        with pytest.raises(ValueError, match="rotation4.*other settings \\(seeded_basis_sha256: '[0-9a-f]{64}' then"):
            run_frontier(config)
    finally:
        seeded_basis_sha256.cache_clear()


@pytest.mark.slow
def test_a_rerun_with_fewer_budgets_and_methods_says_which_finished_points_it_left_out(
    frontier_run, count_evaluations, caplog
):
    out, rows = frontier_run
    reports = {name: (out / name).read_bytes() for name in ("frontier.json", "frontier.md", "frontier.png")}
    try:
        with caplog.at_level("WARNING"):
            fewer = run_frontier(frontier_config(out, budgets="0.5", methods="uniform,ner"))
        assert count_evaluations == [], "every point was reused"
        assert {(r["method"], r["budget"]) for r in fewer} == {("full", None), ("uniform", "0.5"), ("ner", "0.5")}
        dropped = [f"{TASK} {m} at budget {b:g}" for m in ("uniform", "ner", "sensitivity") for b in BUDGETS]
        dropped = [d for d in dropped if not d.endswith(("uniform at budget 0.5", "ner at budget 0.5"))]
        markdown = (out / "frontier.md").read_text()
        assert "**Left out**: 4 finished points" in markdown and "leaves out 4 finished points" in caplog.text
        for line in dropped:
            assert line in markdown and line in caplog.text
        (out / "frontier.json").unlink()  # as after an interrupted run: the saved points still tell
        caplog.clear()
        with caplog.at_level("WARNING"):
            run_frontier(frontier_config(out, budgets="0.5", methods="uniform,ner"))
        unreported = {r["point"] for r in rows} - {r["point"] for r in fewer}
        assert unreported and all(f"{TASK} point {name} " in caplog.text for name in unreported)
    finally:
        for name, content in reports.items():
            (out / name).write_bytes(content)


def test_too_few_held_out_documents_are_refused_before_the_model_loads(tmp_path):
    with pytest.raises(ValueError, match="kvcore_codealpaca has 12 documents.*lower --num-samples"):
        run_frontier(frontier_config(tmp_path / "short", num_samples=12))
    assert not (tmp_path / "short").exists()


@pytest.mark.slow
def test_per_document_ner_is_each_documents_own_gram(frontier_run):
    """The recorded NER of a scored document equals the NER of that document's Gram computed directly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvcore_eval.harness.lm_tasks import lm_eval_task_documents
    from kvcore_eval.metrics import normalized_effective_rank, singular_values

    out, rows = frontier_run
    saved = json.loads((out / "documents" / f"{TASK}.json").read_text())["documents"]
    assert [d["doc_id"] for d in saved] == [0, 1, 2]
    model = AutoModelForCausalLM.from_pretrained(EXAMPLE_MODEL, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(EXAMPLE_MODEL)
    texts = [p + r for p, r in lm_eval_task_documents(TASK, 0, str(EXAMPLE_DATA))][:3]
    for text, document in zip(texts, saved, strict=True):
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        direct = calibrate_in_memory(model, ids)
        for kind, space in (("key", "key_pre_rope"), ("value", "value")):
            expected = [
                normalized_effective_rank(singular_values(direct.eigenvalues[space][layer].numpy()))
                for layer in range(4)
            ]
            np.testing.assert_allclose(document[kind], expected, rtol=1e-6)
        assert document["tokens"] == ids.shape[1]
    row = next(r for r in rows if r["method"] == "uniform" and r["budget"] == "0.25")
    assert row["across_documents"]["key"]["n"] == 3
    assert "across documents" in (out / "frontier.md").read_text()


def test_each_points_nd_ppl_carries_its_paired_bootstrap_interval(frontier_run):
    """The interval is the sweep's: a paired bootstrap over the scored documents against the full cache on the same
    documents; the point's ND-PPL is what those documents' log-likelihoods give; frontier.md prints it and marks a
    point whose interval holds 0 as within noise."""
    from kvcore_eval.metrics import paired_bootstrap_nd_ppl

    out, rows = frontier_run
    baseline = json.loads((out / "points" / TASK / "baseline.json").read_text())["per_document_loglikelihood"]
    markdown = (out / "frontier.md").read_text()
    for row in rows:
        if row["method"] == "full":
            assert row["nd_ppl_interval"] is None
            continue
        truncated = json.loads((out / "points" / TASK / f"{row['point']}.json").read_text())[
            "per_document_loglikelihood"
        ]
        assert row["nd_ppl_interval"] == paired_bootstrap_nd_ppl(truncated, baseline)
        assert row["nd_ppl_interval"]["n"] == 3
        full_ll, cut_ll = (sum(ll for ll, _ in d.values()) for d in (baseline, truncated))
        count = sum(c for _, c in baseline.values())
        assert np.expm1((full_ll - cut_ll) / count) == pytest.approx(row["value"], rel=1e-9)
        interval = row["nd_ppl_interval"]
        assert interval["within_noise"] == (interval["low"] <= 0 <= interval["high"])
        assert f"{row['value']:.4f} [{interval['low']:.4f}, {interval['high']:.4f}]" in markdown
    noisy = sum(bool(r["nd_ppl_interval"] and r["nd_ppl_interval"]["within_noise"]) for r in rows)
    assert markdown.count("(within noise)") == noisy


CHOICE_TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{instruction}}}}"
doc_to_choice: "{{{{[output, 'I do not know.']}}}}"
doc_to_target: 0
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.slow
def test_an_accuracy_point_carries_its_bootstrap_standard_error(tmp_path):
    """A task scored by accuracy (not a perplexity): each point's accuracy comes with the bootstrap standard error of
    its mean over the scored documents, in frontier.json and frontier.md."""
    from kvcore_eval.metrics import bootstrap_stderr_of_mean

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_choice.yaml").write_text(CHOICE_TASK.format(data=EXAMPLE_DATA / "alpaca.jsonl"))
    out = tmp_path / "run"
    config = frontier_config(
        out, tasks="tiny_choice", include_path=str(tasks), methods="uniform", budgets="0.25", num_samples=8
    )
    rows = run_frontier(config)
    assert [r["method"] for r in rows] == ["full", "uniform"]
    markdown = (out / "frontier.md").read_text()
    for row in rows:
        assert row["metric"] == "acc" and row["higher_is_better"] and "nd_ppl_interval" not in row
        point = json.loads((out / "points" / "tiny_choice" / f"{row['point']}.json").read_text())
        values = list(point["per_document"].values())
        assert len(values) == 8 and set(values) <= {0.0, 1.0} and np.mean(values) == pytest.approx(row["value"])
        assert row["stderr"] == bootstrap_stderr_of_mean(values)
        assert f"{row['value']:.4f} ± {row['stderr']:.4f}" in markdown


def test_a_point_whose_interval_holds_zero_is_marked_within_noise(tmp_path, caplog):
    from kvcore_eval.experiments.frontier import to_markdown, warn_noise

    def row(method, value, interval):
        return {
            "task": TASK,
            "method": method,
            "point": f"{method}/3",
            "basis": "data",
            "allocation": "uniform",
            "bits": 32,
            "budget": None if method == "full" else "0.5",
            "bytes_per_token": 1024 if method == "full" else 500,
            "bits_per_number": 32 if method == "full" else 32 * 500 / 1024,
            "baseline_raw": 1.5,
            "fraction_of_full": 1 if method == "full" else 500 / 1024,
            "metric": "nd_ppl(byte_perplexity)",
            "value": value,
            "higher_is_better": False,
            "pareto": True,
            "nd_ppl_interval": interval,
        }

    rows = [
        row("full", 0.0, None),
        row("uniform", 0.002, {"low": -0.001, "high": 0.005, "stderr": 0.001, "n": 3, "within_noise": True}),
        row("energy", 0.2, {"low": 0.1, "high": 0.3, "stderr": 0.05, "n": 3, "within_noise": False}),
    ]
    rows[2]["within_budget"], rows[2]["fraction_of_full"] = False, 0.516
    markdown = to_markdown(rows, frontier_config(tmp_path), model_dtype="float32")
    assert "Model dtype: float32 (`--dtype auto`), on cpu." in markdown
    assert "| 51.6 *(over)* |" in markdown and markdown.count("*(over)*") == 2, "the legend, the one row over"
    assert "| 0.0020 [-0.0010, 0.0050] (within noise) |" in markdown
    assert "| 0.2000 [0.1000, 0.3000] |" in markdown and markdown.count("within noise") == 2  # the legend, one row
    with caplog.at_level("WARNING"):
        warn_noise(rows)
    assert "1 of 2 frontier points" in caplog.text and "uniform/3" in caplog.text


def test_every_option_is_checked_before_anything_is_written_or_loaded(tmp_path):
    """Each method's own kvcore_hf options, the metric of each task (from its metric_list) and the --sensitivity
    table (key space, layers, format) are refused before the output folder, a calibration or the model exists."""
    from kvcore_eval.config import TruncationConfig

    with pytest.raises(ValueError, match="--methods weights cannot run.*post_rope"):
        frontier_config(tmp_path, methods="uniform,weights", truncation=TruncationConfig(key_space="post_rope"))
    with pytest.raises(ValueError, match="--methods sequence cannot run.*attention=latent"):
        frontier_config(tmp_path, methods="sequence", truncation=TruncationConfig(attention="latent"))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="--metric byte_perplexty: a bare metric is the perplexity of ND-PPL"):
        frontier_config(out, metric="byte_perplexty")
    with pytest.raises(ValueError, match="--metric: kvcore_codealpaca declares no 'acc' .*byte_perplexity"):
        run_frontier(frontier_config(out, metric="kvcore_codealpaca=acc"))
    assert not out.exists()
    table = tmp_path / "per_layer.json"
    layers = {"key": [0.1] * 4, "value": [0.2] * 4}
    for content, match in (
        ({"key_space": "post_rope", "nd_ppl": {TASK: layers}}, "measured on post_rope keys"),
        ({"key_space": "pre_rope", "nd_ppl": {TASK: {"key": [0.1] * 3, "value": [0.2] * 3}}}, "has 3 layers.*4"),
        ({"key_space": "pre_rope", "nd_ppl": {TASK: {"keys": [0.1] * 4}}}, "not the per_layer.json"),
        ([1, 2], "not the per_layer.json"),
    ):
        table.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=match):
            run_frontier(frontier_config(out, sensitivity=str(table)))
        assert not out.exists(), "nothing written: no folder, no calibration"


@pytest.mark.slow
def test_a_generation_task_at_a_context_length_is_a_frontier_of_its_own_metric(tmp_path):
    """kvcore_ruler at one length: calibrated in windows of that length on held-out documents of that length,
    scored by RULER's metric named by the length (higher is better, with its bootstrap standard error), each method
    within the budget in the bytes its own generation measured; --gen-kwargs is part of each point's identity."""
    out = tmp_path / "gen"
    config = frontier_config(
        out,
        tasks="kvcore_ruler_niah_single_2",
        metadata='{"max_seq_lengths": [768], "num_samples": 3}',
        gen_kwargs="max_gen_toks=4",
        methods="uniform,random",
        budgets="0.5",
        num_samples=1,
        calibration_tokens=768,
    )
    rows = run_frontier(config)
    name = "kvcore_ruler_niah_single_2@768"
    assert [(r["task"], r["method"]) for r in rows] == [(name, "full"), (name, "uniform"), (name, "random")]
    full = rows[0]
    for row in rows:
        assert row["metric"] == "768" and row["higher_is_better"] and 0 <= row["value"] <= 1 and "stderr" in row
        assert row["bytes_measured_on"] == "scored documents"
    for row in rows[1:]:
        assert row["within_budget"] and row["bytes_per_token"] <= 0.5 * full["bytes_per_token"]
    calibration = json.loads((out / "calibrations" / name / "config.json").read_text())
    assert calibration["seq_len"] == 768 and calibration["metadata"] == '{"max_seq_lengths": [768], "num_samples": 3}'
    settings = json.loads((out / "points" / name / f"{rows[1]['point']}.json").read_text())["settings"]
    assert (settings["task"], settings["length"], settings["gen_kwargs"]) == (
        "kvcore_ruler_niah_single_2",
        768,
        "max_gen_toks=4",
    )
    assert "| score (768-token context) | vs bound | front |" in (out / "frontier.md").read_text()
    with pytest.raises(ValueError, match="gen_kwargs: 'max_gen_toks=4' then, 'max_gen_toks=5' now"):
        run_frontier(dataclasses.replace(config, gen_kwargs="max_gen_toks=5"))

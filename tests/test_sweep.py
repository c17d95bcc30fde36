import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLE_DATA, EXAMPLE_MODEL, lock_held_by_a_thread

from kvcore_eval.analysis.compare import compare
from kvcore_eval.analysis.study import summarize
from kvcore_eval.calibration.artifact import read_metadata
from kvcore_eval.config import SweepConfig, TruncationConfig
from kvcore_eval.experiments.sweep import run_sweep

TASKS = "kvcore_alpaca,kvcore_codealpaca"


@pytest.mark.parametrize(
    "ranks,message", [("", "empty"), ("1.0,1.5", r"\(0, 1\]"), ("0,0.5", r"\(0, 1\]"), ("half", "fractions")]
)
def test_bad_rank_lists_are_refused(ranks, message):
    with pytest.raises(ValueError, match=message):
        SweepConfig(model="m", out="o", ranks=ranks)


def test_basis_designs_are_named_and_checked():
    with pytest.raises(ValueError, match="--basis-scope shared truncates every task with one artifact"):
        SweepConfig(model="m", out="o", basis_scope="shared")
    with pytest.raises(ValueError, match="pass --basis-scope shared with it"):
        SweepConfig(model="m", out="o", truncation=TruncationConfig(calibration="c"))
    with pytest.raises(ValueError, match="per-task or shared"):
        SweepConfig(model="m", out="o", basis_scope="mine")
    with pytest.raises(ValueError, match="the sweep sets key_rank itself"):
        SweepConfig(model="m", out="o", truncation=TruncationConfig(key_rank=0.5))


def test_summary_math():
    baseline = {"a": 10.0, "b": 20.0, "c": 5.0}
    perplexity = {"1": baseline, "0.5": {"a": 11.0, "b": 26.0, "c": 5.75}}
    ner = {"a": {"key": 0.2, "value": 0.5}, "b": {"key": 0.6, "value": 0.7}, "c": {"key": 0.3, "value": 0.1}}
    summary = summarize(["a", "b", "c"], baseline, perplexity, ner, {"basis": "per-task"})
    assert summary["nd_ppl"]["b"] == {"1": 0.0, "0.5": pytest.approx(0.3)}
    across = summary["correlation"]["across_tasks"]
    assert (
        across["0.5"]["key"]["spearman"] == pytest.approx(1.0) and across["0.5"]["key"]["n"] == 3
    )  # 0.1, 0.3, 0.15 rank like 0.2, 0.6, 0.3
    assert np.isnan(across["1"]["key"]["pearson"]), "ND-PPL is constant at full rank: no correlation to report"


@pytest.fixture(scope="module")
def shared_artifact(tmp_path_factory):
    from kvcore_eval.calibration.calibrate import calibrate
    from kvcore_eval.config import CalibrationConfig

    out = tmp_path_factory.mktemp("sweep") / "artifact"
    return calibrate(
        CalibrationConfig(
            model=str(EXAMPLE_MODEL),
            dataset="kvcore:alpaca",
            data_dir=str(EXAMPLE_DATA),
            out=str(out),
            max_tokens=4000,
            seq_len=128,
            device="cpu",
        )
    )


@pytest.fixture
def count_loads(monkeypatch):
    from kvcore_eval.model import models

    loads, real = [], models.load_causal_lm
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: loads.append(a) or real(*a, **k))
    return loads


def sweep_config(out, **overrides) -> SweepConfig:
    settings = dict(
        model=str(EXAMPLE_MODEL),
        out=str(out),
        tasks=TASKS,
        ranks="1.0,0.5,0.125",
        data_dir=str(EXAMPLE_DATA),
        num_samples=4,
        calibration_tokens=600,
        seq_len=64,
    )
    return SweepConfig(**{**settings, **overrides})


@pytest.mark.slow
def test_per_task_sweep_loads_once_truncates_each_task_with_its_own_held_out_calibration(tmp_path, count_loads):
    out = tmp_path / "per-task"
    summary = run_sweep(sweep_config(out))
    assert len(count_loads) == 1, "one model load for every calibration and every point"
    for name in ("sweep.json", "sweep.md", "nd_ppl.png", "ner_vs_nd_ppl.png", "config.json"):
        assert (out / name).exists(), name
    assert (
        summary["design"]["model_dtype"] == "float32"
        and summary["design"]["dtype"] == "float32"
        and "Model dtype: float32, on cpu." in (out / "sweep.md").read_text()
    ), "--dtype auto resolves to float32 on the CPU before the run (its identity), and the table says so"
    for task in ("kvcore_alpaca", "kvcore_codealpaca"):
        own = out / "calibrations" / task
        point = json.loads((out / "points" / task / "rank_0.5.json").read_text())
        assert point["settings"]["basis_sha256"] == read_metadata(own)["basis_sha256"], (
            "each task is truncated with its own calibration"
        )
        assert summary["design"]["basis_per_task"][task] == str(own)
        calibrated = json.loads((own / "kvcore.json").read_text())["dataset"]
        assert (calibrated["spec"], calibrated["skip_docs"]) == (f"lm_eval:{task}", 4), (
            "calibration skips the 4 scored documents"
        )
        deltas = summary["nd_ppl"][task]
        assert abs(deltas["1"]) < 1e-6, "full rank reproduces the baseline"
        assert deltas["0.125"] > deltas["0.5"] > deltas["1"] - 1e-6, f"{task}: ND-PPL grows as rank falls"
        assert 0 < summary["ner"][task]["key"] < 1 and 0 < summary["ner"][task]["value"] <= 1
    across = summary["correlation"]["across_documents"]["0.125"]
    assert across["kvcore_alpaca"]["key"]["n"] == 4 and across["all tasks"]["value"]["n"] == 8
    document = summary["documents"]["kvcore_codealpaca"][0]
    assert 0 < document["ner_key"] < 1 and document["nd_ppl"]["1"] == pytest.approx(0, abs=1e-9)
    markdown = (out / "sweep.md").read_text()
    assert "across documents" in markdown
    assert (
        "--basis-scope per-task" in markdown
        and "disjoint" in markdown
        and "across tasks" in markdown
        and "n=2" in markdown
    )


def test_held_out_calibration_never_reads_a_scored_document(tmp_path):
    """The scored documents (lm-eval's first num_samples) and the calibration texts share no document."""
    from kvcore_eval.calibration.data import iter_texts
    from kvcore_eval.harness.lm_tasks import ALL_RECORDS, leaf_tasks, task_manager

    manager = task_manager(str(EXAMPLE_DATA), None, ALL_RECORDS)
    (task,) = leaf_tasks(manager.load_task_or_group(["kvcore_codealpaca"]))
    scored = {task.doc_to_text(doc) + task.doc_to_target(doc) for doc in list(task.eval_docs)[:4]}
    calibration = set(iter_texts("lm_eval:kvcore_codealpaca", data_dir=str(EXAMPLE_DATA), skip_docs=4))
    assert scored and calibration and not scored & calibration
    assert len(scored) + len(calibration) == len(list(task.eval_docs))


@pytest.mark.slow
def test_shared_basis_reproduces_a_plain_kvcore_hf_run(shared_artifact, tmp_path, count_loads):
    """--basis shared gives the ND-PPL of separate `kvcore-eval eval` runs with that artifact, with one load."""
    from kvcore_eval.config import EvalConfig
    from kvcore_eval.experiments.evaluate import run_lm_eval
    from kvcore_eval.harness.lm_tasks import ALL_RECORDS

    summary = run_sweep(
        sweep_config(
            tmp_path / "shared",
            basis_scope="shared",
            truncation=TruncationConfig(calibration=str(shared_artifact)),
            tasks="kvcore_codealpaca",
        )
    )
    assert len(count_loads) == 1
    point = json.loads((tmp_path / "shared" / "points" / "kvcore_codealpaca" / "rank_0.5.json").read_text())
    assert point["settings"]["basis_sha256"] == read_metadata(shared_artifact)["basis_sha256"]
    separate = {}
    for name, ranks in (("baseline", {}), ("0.5", {"key_rank": "0.5", "value_rank": "0.5"})):
        eval_config = EvalConfig(
            model=str(EXAMPLE_MODEL),
            tasks="kvcore_codealpaca",
            data_dir=str(EXAMPLE_DATA),
            limit=4,
            truncation=TruncationConfig(calibration=str(shared_artifact) if ranks else None, **ranks),
        )
        separate[name] = run_lm_eval(eval_config, metadata=ALL_RECORDS)["results"]["kvcore_codealpaca"][
            "byte_perplexity,none"
        ]
    assert summary["baseline_perplexity"]["kvcore_codealpaca"] == pytest.approx(separate["baseline"], rel=1e-6)
    assert summary["nd_ppl"]["kvcore_codealpaca"]["0.5"] == pytest.approx(
        separate["0.5"] / separate["baseline"] - 1, rel=1e-6
    )


@pytest.mark.slow
def test_rerun_reuses_points_and_calibrations_and_refuses_other_settings(tmp_path, caplog):
    import logging

    out = tmp_path / "resume"
    with caplog.at_level(logging.INFO):
        first = run_sweep(sweep_config(out, tasks="kvcore_codealpaca", ranks="0.5"))
    messages = [record.getMessage() for record in caplog.records]
    progress = [m for m in messages if m.startswith("point ")]
    assert progress[0].startswith("point 1 of 2 done: kvcore_codealpaca, baseline") and "min left" in progress[0]
    assert progress[1].startswith("point 2 of 2 done: kvcore_codealpaca, rank_0.5"), progress
    assert sum("Custom kwargs can be passed" in m for m in messages) <= 1, "lm-eval's advice once, not per point"
    point = out / "points" / "kvcore_codealpaca" / "rank_0.5.json"
    saved = json.loads(point.read_text())
    saved["value"] = 2 * first["baseline_perplexity"]["kvcore_codealpaca"]  # edited by hand: its digest tells
    point.write_text(json.dumps(saved))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = run_sweep(sweep_config(out, tasks="kvcore_codealpaca", ranks="0.5"))
    assert again["nd_ppl"] == first["nd_ppl"], "the edited point was computed again, not read"
    assert any(f"{point} does not match the digest" in r.getMessage() for r in caplog.records)
    config_json = (out / "config.json").read_bytes()
    with pytest.raises(ValueError, match="other settings.*calibration_tokens: 600 then, 900 now.*nothing was changed"):
        run_sweep(sweep_config(out, tasks="kvcore_codealpaca", ranks="0.5", calibration_tokens=900))
    assert (out / "config.json").read_bytes() == config_json, "a refused rerun writes nothing"
    with pytest.raises(ValueError, match="other settings"):
        run_sweep(sweep_config(out, tasks="kvcore_codealpaca", ranks="0.5", num_samples=3))
    # every number-changing setting is in a point's identity: another metric is never read under the old label
    with pytest.raises(ValueError, match="metric: 'byte_perplexity' then, 'word_perplexity' now"):
        run_sweep(sweep_config(out, tasks="kvcore_codealpaca", ranks="0.5", metric="word_perplexity"))


@pytest.mark.parametrize(
    "options,message",
    [
        ({"metric": "bleu"}, "--metric bleu: a bare metric is the perplexity of ND-PPL"),
        ({"metric": "kvcore_codealpaca=bleu"}, "kvcore_codealpaca declares no 'bleu'"),
        ({"tasks": "kvcore_codealpaca", "gen_kwargs": "max_gen_toks=4"}, "none of --tasks generates"),
        ({"metric": "kvcore_alpaca_gen=bleu"}, "kvcore_alpaca_gen declares no 'bleu'"),
        ({"metric": "kvcore_medalpaca=word_perplexity"}, "kvcore_medalpaca=...: not among the tasks swept"),
        ({"truncate": "keys,values"}, "ND-PPL study of kvcore_codealpaca takes one kind"),
        ({"tasks": "kvcore_alpaca_gen", "position_buckets": "default"}, "needs a rolling-perplexity task"),
        ({"num_samples": 1000}, r"kvcore_\w+ has \d+ documents"),
        ({"tasks": "kvcore_ruler_niah_single_2"}, "give the lengths with --metadata"),
        ({"tasks": "kvcore_nothing"}, "not a task or group lm-eval knows"),
        (
            {"basis_scope": "shared", "truncation": TruncationConfig(calibration="no-such"), "allow_overlap": True},
            "no calibration artifact at no-such",
        ),
    ],
)
@pytest.mark.slow
def test_every_option_is_checked_against_the_tasks_before_the_model_loads(tmp_path, count_loads, options, message):
    """A metric the task does not declare (read from its metric_list), several kinds for the ND-PPL study, too few
    documents to hold out: refused before any model loads, calibration runs or output is written."""
    out = tmp_path / "sweep"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run_sweep(sweep_config(out, **{"tasks": "kvcore_codealpaca,kvcore_alpaca_gen", **options}))
    assert count_loads == [] and not out.exists(), "nothing loaded, no calibration or point written"


def test_foreign_folders_are_refused_before_anything_runs(tmp_path, count_loads):
    calibration_run = tmp_path / "calibration"
    calibration_run.mkdir()
    (calibration_run / "config.json").write_text(json.dumps({"kind": "calibrate"}))
    with pytest.raises(FileExistsError, match="holds a `kvcore-eval calibrate` run"):
        run_sweep(sweep_config(calibration_run))
    assert count_loads == []


@pytest.mark.slow
def test_a_rerun_with_fewer_ranks_names_the_finished_points_it_leaves_out(tmp_path, caplog):
    import logging

    out = tmp_path / "fewer"
    run_sweep(sweep_config(out, tasks="kvcore_codealpaca", ranks="0.5,0.25", num_samples=2))
    assert "Left out" not in (out / "sweep.md").read_text()
    with caplog.at_level(logging.WARNING):
        summary = run_sweep(sweep_config(out, tasks="kvcore_codealpaca", ranks="0.5", num_samples=2))
    assert summary["ranks"] == ["0.5"] and summary["left_out"] == ["points/kvcore_codealpaca/rank_0.25.json"]
    markdown = (out / "sweep.md").read_text()
    assert "**Left out:** 1 finished point(s)" in markdown and "points/kvcore_codealpaca/rank_0.25.json" in markdown
    assert any("points/kvcore_codealpaca/rank_0.25.json" in r.getMessage() for r in caplog.records)
    assert json.loads((out / "sweep.json").read_text())["left_out"] == ["points/kvcore_codealpaca/rank_0.25.json"]


def _rolling_task(tmp_path: Path, name: str, texts: list[str], metrics=("byte_perplexity",)) -> Path:
    """A user's own rolling-perplexity task YAML named `name` over `texts`, in a folder for --include-path."""
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    (folder / "notes.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    (folder / "task.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files: {folder / 'notes.jsonl'}\n"
        "test_split: train\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n" + "".join(f"  - metric: {metric}\n" for metric in metrics)
    )
    return folder


@pytest.mark.slow
def test_a_custom_task_runs_end_to_end_with_include_path(tmp_path):
    """A user's own task YAML (not a kvcore source): scored, calibrated on its own held-out documents, NER included."""
    texts = [f"Note {i}: the river rose {i} centimetres overnight and the ferry waited until noon." for i in range(24)]
    folder = _rolling_task(tmp_path, "my_notes", texts, metrics=("byte_perplexity", "word_perplexity"))
    summary = run_sweep(
        sweep_config(tmp_path / "custom", tasks="my_notes", include_path=str(folder), ranks="0.25,0.0625")
    )
    nd_ppl = summary["nd_ppl"]["my_notes"]
    assert summary["tasks"] == ["my_notes"] and nd_ppl["0.25"] != 0 and nd_ppl["0.0625"] > 0.05
    assert 0 < summary["ner"]["my_notes"]["key"] < 1
    assert (
        json.loads((tmp_path / "custom" / "calibrations" / "my_notes" / "kvcore.json").read_text())["dataset"][
            "skip_docs"
        ]
        == 4
    )


@pytest.mark.slow
def test_a_task_name_that_is_a_path_is_refused_before_anything_is_written(tmp_path, count_loads):
    """A task named `../escape` (a user's YAML) would put its calibration and points outside --out."""
    folder = _rolling_task(tmp_path, "../escape", ["The river rose overnight."])
    out = tmp_path / "runs" / "sweep"
    with pytest.raises(ValueError, match="task name '../escape' cannot be used as a file name"):
        run_sweep(sweep_config(out, tasks="../escape", include_path=str(folder)))
    assert count_loads == [] and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_per_layer_sensitivity_one_load_a_row_per_layer_and_correlations(tmp_path, count_loads):
    out = tmp_path / "layers"
    summary = run_sweep(sweep_config(out, tasks="kvcore_codealpaca", ranks="0.5", per_layer=True, per_layer_rank=0.25))
    assert len(count_loads) == 1
    layers = summary["per_layer"]
    for kind in ("key", "value"):
        assert len(layers["nd_ppl"]["kvcore_codealpaca"][kind]) == 4  # the embedded default has 4 layers
        assert max(layers["nd_ppl"]["kvcore_codealpaca"][kind]) > 0
    scopes = layers["correlation"]["kvcore_codealpaca"]
    assert scopes["key"]["ner"]["n"] == 4 and scopes["key_and_value"]["residual_energy"]["n"] == 8
    markdown = (out / "per_layer.md").read_text()
    assert markdown.count("\n| 3 |") == 1 and "across layers, K and V pooled" in markdown
    assert (out / "per_layer.png").read_bytes()[:4] == b"\x89PNG"


def _results(path, tasks):
    path.write_text(
        json.dumps(
            {
                "results": {
                    task: {"alias": task, "byte_perplexity,none": value, "byte_perplexity_stderr,none": "N/A"}
                    for task, value in tasks.items()
                }
            }
        )
    )
    return path


def test_compare(tmp_path):
    a = _results(tmp_path / "a.json", {"kvcore_alpaca": 2.0, "kvcore_medalpaca": 4.0})
    b = _results(tmp_path / "b.json", {"kvcore_alpaca": 3.0, "kvcore_medalpaca": 4.0})
    rows = compare(a, b)
    assert [(r["task"], r["delta"], r["relative"]) for r in rows] == [
        ("kvcore_alpaca", 1.0, 0.5),
        ("kvcore_medalpaca", 0.0, 0.0),
    ]
    other = _results(tmp_path / "c.json", {"kvcore_alpaca": 3.0})
    with pytest.raises(ValueError, match="different tasks"):
        compare(a, other)


@pytest.mark.slow
def test_shared_basis_per_layer_residual_energy_is_each_tasks_own(shared_artifact, tmp_path):
    """Under --basis-scope shared, a layer's residual energy is the task's own energy outside the shared basis,
    (tr G_t − tr P_rᵀ G_t P_r) / tr G_t, not the shared artifact's spectrum repeated for every task."""
    from kvcore_eval.calibration.artifact import load_calibration
    from kvcore_eval.metrics import residual_energy, residual_energy_under

    out = tmp_path / "shared-layers"
    config = sweep_config(
        out,
        tasks="kvcore_codealpaca,kvcore_medalpaca",
        ranks="0.5",
        basis_scope="shared",
        truncation=TruncationConfig(calibration=str(shared_artifact)),
        per_layer=True,
        per_layer_rank=0.25,
    )
    summary = run_sweep(config)
    residual = summary["per_layer"]["residual_energy"]
    # every ND-PPL carries its paired bootstrap interval over the 4 scored documents, per task and per layer
    for task in ("kvcore_codealpaca", "kvcore_medalpaca"):
        interval = summary["nd_ppl_interval"]["0.5"][task]
        assert interval["n"] == 4 and interval["low"] <= interval["high"]
        layers = summary["per_layer"]["nd_ppl_interval"][task]
        assert [i["n"] for i in layers["key"] + layers["value"]] == [4] * 8
    assert "paired bootstrap interval over the 4 scored documents" in (out / "per_layer.md").read_text()
    assert " [" in (out / "sweep.md").read_text()
    shared = load_calibration(shared_artifact)
    rank = round(0.25 * shared.geometry.width)
    for task in ("kvcore_codealpaca", "kvcore_medalpaca"):
        own = load_calibration(out / "calibrations" / task)
        expected = [
            residual_energy_under(
                own.eigenvalues["value"][layer].numpy(),
                own.eigenvectors["value"][layer].numpy(),
                shared.eigenvectors["value"][layer][:, :rank].numpy(),
            )
            for layer in range(4)
        ]
        assert residual[task]["value"] == pytest.approx(expected, rel=1e-9)
        assert residual[task]["value"] != pytest.approx(
            [residual_energy(shared.eigenvalues["value"][layer].numpy(), rank) for layer in range(4)], rel=1e-3
        )
    assert residual["kvcore_codealpaca"]["value"] != pytest.approx(residual["kvcore_medalpaca"]["value"], rel=1e-3)


@pytest.mark.slow
def test_generation_tasks_score_their_own_metric_per_context_length_rank_and_kind(tmp_path, count_loads):
    """kvcore_ruler at two lengths: each length its own points and held-out calibration at that length, scored by
    the metric RULER names by the length; keys and values truncated apart; a table and a heatmap."""
    out = tmp_path / "gen"
    config = sweep_config(
        out,
        tasks="kvcore_ruler_niah_single_2",
        metadata='{"max_seq_lengths": [768, 1024], "num_samples": 3}',
        truncate="keys,values",
        ranks="1.0,0.25",
        num_samples=1,
        gen_kwargs="max_gen_toks=4",
        calibration_tokens=1024,
    )
    result = run_sweep(config)["accuracy"]
    assert len(count_loads) == 1
    names = ["kvcore_ruler_niah_single_2@768", "kvcore_ruler_niah_single_2@1024"]
    assert [u["name"] for u in result["units"]] == names and [u["metric"] for u in result["units"]] == ["768", "1024"]
    assert result["kinds"] == ["keys", "values"] and result["ranks"] == ["0.25"], "full rank is the baseline"
    for name in names:
        assert 0 <= result["baseline"][name] <= 1 and 0 <= result["scores"]["keys"]["0.25"][name] <= 1
    calibrated = json.loads((out / "calibrations" / names[0] / "kvcore.json").read_text())["dataset"]
    assert calibrated["spec"] == "lm_eval:kvcore_ruler_niah_single_2" and calibrated["skip_docs"] == 1
    assert json.loads((out / "calibrations" / names[0] / "config.json").read_text())["seq_len"] == 768, (
        "calibrated in windows of the length it is scored at"
    )
    assert json.loads((out / "calibrations" / names[0] / "config.json").read_text())["metadata"] == (
        '{"max_seq_lengths": [768], "num_samples": 3}'
    ), "calibrated on held-out documents of the same length"
    point = json.loads((out / "points" / names[1] / "keys_rank_0.25.json").read_text())
    settings = point["settings"]
    assert (settings["length"], settings["metric"], settings["gen_kwargs"]) == (1024, "1024", "max_gen_toks=4")
    assert settings["truncation"]["truncate"] == "keys" and settings["truncation"]["value_rank"] is None
    assert set(point["per_document"]) == {"0"}, "the first document only"
    markdown = (out / "sweep.md").read_text()
    assert "### kvcore_ruler_niah_single_2 (metric: named by the context length)" in markdown
    assert "| truncated | rank | 768 | 1024 |" in markdown and "| none (baseline) | full |" in markdown
    assert "| values | 0.25 |" in markdown
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    # another generation setting is another point: never read under the old label
    with pytest.raises(ValueError, match="gen_kwargs: 'max_gen_toks=4' then, 'max_gen_toks=5' now"):
        run_sweep(dataclasses.replace(config, gen_kwargs="max_gen_toks=5"))
    # fewer lengths: the finished points of the other are named, not lost silently
    fewer = run_sweep(dataclasses.replace(config, metadata='{"max_seq_lengths": [768], "num_samples": 3}'))
    assert [u["name"] for u in fewer["accuracy"]["units"]] == names[:1]
    assert "points/kvcore_ruler_niah_single_2@1024/baseline.json" in fewer["left_out"]


@pytest.mark.slow
def test_position_buckets_of_a_rolling_task_sum_back_and_vanish_at_full_rank(tmp_path):
    """kvcore_longtext (documents longer than the example model's 1024 positions): ND-PPL by position bucket, each
    point's buckets checked against lm-eval's own rolling log-likelihood before they are written."""
    out = tmp_path / "positions"
    summary = run_sweep(
        sweep_config(
            out,
            tasks="kvcore_longtext",
            ranks="1.0,0.25",
            num_samples=2,
            metadata='{"doc_words": 300}',
            position_buckets="64,256",
        )
    )
    table = summary["positions"]["tasks"]["kvcore_longtext"]
    assert table["edges"] == [0, 64, 256, 1024] and table["documents"] == 2
    assert all(value == pytest.approx(0, abs=1e-9) for value in table["nd_ppl"]["1"].values())
    assert sum(table["tokens"].values()) > 2 * 1024, "two documents of more than one window each"
    truncated = table["nd_ppl"]["0.25"]
    assert any(value > 0 for value in truncated.values()) and all(value != 0 for value in truncated.values()), truncated
    saved = json.loads((out / "positions" / "kvcore_longtext" / "rank_0.25.json").read_text())
    point = json.loads((out / "points" / "kvcore_longtext" / "rank_0.25.json").read_text())
    assert sum(b["loglikelihood"] for b in saved["positions"]["buckets"].values()) == pytest.approx(
        sum(ll for ll, _ in point["per_document_loglikelihood"].values()), rel=1e-5
    )
    markdown = (out / "sweep.md").read_text()
    assert "## ND-PPL by position" in markdown and "| ND-PPL, rank 0.25 |" in markdown
    assert (out / "position_nd_ppl.png").read_bytes()[:4] == b"\x89PNG"


def test_one_document_gives_no_interval_rather_than_one_of_zero_width():
    from kvcore_eval.experiments.session import nd_ppl_interval

    one = {"per_document_loglikelihood": {"0": [-120.0, 100]}}
    cut = {"per_document_loglikelihood": {"0": [-130.0, 100]}}
    assert nd_ppl_interval(cut, one) is None
    two = {"per_document_loglikelihood": {"0": [-120.0, 100], "1": [-90.0, 80]}}
    cut_two = {"per_document_loglikelihood": {"0": [-130.0, 100], "1": [-95.0, 80]}}
    interval = nd_ppl_interval(cut_two, two)
    assert interval["n"] == 2 and interval["low"] > 0 and not interval["within_noise"]


def test_bits_per_byte_gets_no_perplexity_interval():
    """bits_per_byte logs (loglikelihood, bytes) pairs like byte_perplexity, but its relative change is not the
    perplexity ratio the bootstrap computes: an interval there would not even hold its own value."""
    from kvcore_eval.experiments.session import document_loglikelihoods

    samples = [{"doc_id": 0, "bits_per_byte": (-10.0, 8), "byte_perplexity": (-10.0, 8)}]
    assert document_loglikelihoods(samples, "bits_per_byte") is None
    assert document_loglikelihoods(samples, "byte_perplexity") == {"0": [-10.0, 8.0]}


def test_a_sweep_into_a_folder_another_run_writes_is_refused_naming_it(tmp_path, count_loads):
    """One writer per folder: while another run holds <out>.kvcore-lock, a sweep is refused before the model loads,
    its holder named, and the folder is left as it is."""
    import os
    import socket

    out = tmp_path / "busy"
    with lock_held_by_a_thread(out):
        with pytest.raises(FileExistsError, match=f"being written by another kvcore-eval run \\(pid {os.getpid()} "):
            run_sweep(sweep_config(out, tasks="kvcore_codealpaca"))
        assert socket.gethostname() in json.loads((tmp_path / "busy.kvcore-lock").read_text())["host"]
    assert count_loads == [] and not out.exists()


@pytest.mark.slow
def test_two_concurrent_sweeps_into_one_folder_one_runs_the_other_is_refused(tmp_path):
    """`sweep --ranks 1.0,0.5` running, `sweep --ranks 1.0,0.25` into the same --out: the second is refused with
    the first's pid, and the first finishes with its own ranks in sweep.json and config.json."""
    from conftest import stopped_while_holding_the_lock

    out = tmp_path / "shared"
    first = [
        "sweep",
        *("--model", str(EXAMPLE_MODEL), "--data-dir", str(EXAMPLE_DATA), "--tasks", "kvcore_codealpaca"),
        *("--ranks", "1.0,0.5", "--num-samples", "2", "--calibration-tokens", "600", "--seq-len", "64"),
        *("--out", str(out)),
    ]
    with stopped_while_holding_the_lock(first, tmp_path / "shared.kvcore-lock") as running:
        with pytest.raises(FileExistsError, match=f"being written by another kvcore-eval run \\(pid {running.pid} "):
            run_sweep(sweep_config(out, tasks="kvcore_codealpaca", ranks="1.0,0.25", num_samples=2))
    assert running.returncode == 0, running.stderr_text[-3000:]
    assert json.loads((out / "sweep.json").read_text())["ranks"] == ["1", "0.5"]
    assert json.loads((out / "config.json").read_text())["ranks"] == "1.0,0.5"
    assert not (out / "points" / "kvcore_codealpaca" / "rank_0.25.json").exists()


@pytest.mark.slow
def test_a_task_name_too_long_for_a_file_name_is_refused_before_the_folder_is_claimed(tmp_path, count_loads):
    """A 300-character task name gave `File name too long` after the model loaded, the folder already claimed."""
    name = "n" * 300
    folder = _rolling_task(tmp_path, name, ["The river rose overnight."])
    out = tmp_path / "runs" / "sweep"
    with pytest.raises(ValueError, match="task name 'n+'... is 300 bytes long: .*rename it \\(at most 240 bytes\\)"):
        run_sweep(sweep_config(out, tasks=name, include_path=str(folder)))
    assert count_loads == [] and not (tmp_path / "runs").exists()


def test_a_read_only_out_is_named_with_the_fix_before_the_model_loads(tmp_path, count_loads, read_only):
    out = tmp_path / "ro"
    out.mkdir()
    read_only(out)
    with pytest.raises(PermissionError, match=f"^{out} cannot be written .*: the sweep writes its results there; make"):
        run_sweep(sweep_config(out, tasks="kvcore_codealpaca"))
    assert count_loads == [] and list(out.iterdir()) == [] and not (tmp_path / "ro.kvcore-lock").exists()


def test_a_record_longer_than_the_context_is_refused_before_the_model_loads(tmp_path, count_loads):
    """A scored document whose response is longer than the model's 1024 positions: lm-eval would assert it after the
    model loaded and the calibration ran; refused before, naming the task and the document."""
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(EXAMPLE_DATA / "codealpaca.jsonl", data / "codealpaca.jsonl")
    records = [json.loads(line) for line in (data / "codealpaca.jsonl").read_text().splitlines()]
    for record in records:
        record["output"] = "x = 1\n" * 300  # 1800 bytes: 1800 tokens of the byte-level tokenizer
    (data / "codealpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "sweep"
    with pytest.raises(ValueError, match="kvcore_codealpaca document 0 .*continuation is 1800 tokens, more than"):
        run_sweep(sweep_config(out, tasks="kvcore_codealpaca", data_dir=str(data)))
    assert count_loads == [] and not out.exists()

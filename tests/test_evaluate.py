import json
import os
import subprocess
import sys

import pytest
from conftest import EXAMPLE_DATA, EXAMPLE_MODEL, REPO

from kvcore_eval.config import EvalConfig, TruncationConfig


def test_ranks_without_calibration_are_refused():
    with pytest.raises(ValueError, match="without --calibration"):
        EvalConfig(model="m", tasks="kvcore_alpaca", truncation=TruncationConfig(key_rank="0.5"))


def test_model_args_view():
    args = EvalConfig(model="m", tasks="t", truncation=TruncationConfig(calibration="c", key_rank="8:4")).model_args()
    assert args == {
        "pretrained": "m",
        "dtype": "float32",
        "calibration": "c",
        "key_rank": "8:4",
        "budget_method": "energy",
        "weighting": "relative",
        "key_space": "pre_rope",
        "granularity": "layer",
        "truncate": "both",
        "allow_mismatch": False,
        "attention": "reconstruct",
        "overlap": "refuse",
        "basis": "data",
        "basis_seed": 0,
        "protocol": "forward",
        "residual_length": 128,
    }
    assert EvalConfig(model="m", tasks="t").model_args() == {"pretrained": "m", "dtype": "float32"}


@pytest.mark.slow
def test_cli_eval_runs_kvcore_hf_and_writes_results(tmp_path):
    calibrate = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvcore_eval",
            "calibrate",
            "--model",
            str(EXAMPLE_MODEL),
            "--dataset",
            "lm_eval:kvcore_medalpaca",
            "--skip-docs",
            "4",
            "--data-dir",
            str(EXAMPLE_DATA),
            "--max-tokens",
            "2000",
            "--seq-len",
            "128",
            "--out",
            str(tmp_path / "art"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert calibrate.returncode == 0, calibrate.stderr[-2000:]
    output = tmp_path / "results.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvcore_eval",
            "eval",
            "--model",
            str(EXAMPLE_MODEL),
            "--tasks",
            "kvcore_medalpaca",
            "--calibration",
            str(tmp_path / "art"),
            "--key-rank",
            "0.25",
            "--value-rank",
            "16:16:8:8",
            "--data-dir",
            str(EXAMPLE_DATA),
            "--limit",
            "4",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "kvcore_medalpaca" in result.stdout and "byte_perplexity" in result.stdout
    plan = json.loads(output.read_text())["config"]["kvcore"]["rank_plan"]
    assert plan["key_rank_per_layer"] == [8, 8, 8, 8] and plan["value_rank_per_layer"] == [16, 16, 8, 8]


def test_compare_refuses_files_of_another_kind(tmp_path):
    from kvcore_eval.analysis.compare import compare

    samples = tmp_path / "samples_kvcore_alpaca.jsonl"
    samples.write_text('{"doc_id": 0}\n{"doc_id": 1}\n')
    with pytest.raises(ValueError, match="samples_kvcore_alpaca.jsonl is not valid JSON.*results_\\*.json"):
        compare(samples, samples)
    config = tmp_path / "config.json"
    config.write_text('{"kind": "calibrate"}')
    with pytest.raises(ValueError, match="no 'results' key"):
        compare(config, config)


def test_kvcore_hf_without_calibration_names_the_argument():
    from kvcore_eval.harness.wrapper import KVCoreHFLM

    with pytest.raises(ValueError, match="kvcore_hf needs calibration=<artifact folder>"):
        KVCoreHFLM(pretrained=str(EXAMPLE_MODEL), key_rank=0.5)


def test_eval_and_sweep_default_to_the_device_lm_eval_picks(monkeypatch):
    """On a machine with a GPU lm-eval runs on it; so do eval and sweep unless told otherwise."""
    import torch

    from kvcore_eval.config import SweepConfig
    from kvcore_eval.model.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(EvalConfig(model="m", tasks="t").device) == "cuda"
    assert resolve_device(SweepConfig(model="m", out="o").device) == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(EvalConfig(model="m", tasks="t").device) == "cpu"
    assert resolve_device("cuda:1") == "cuda:1"


@pytest.fixture
def count_evaluations(monkeypatch):
    import lm_eval

    calls, real = [], lm_eval.simple_evaluate
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda *a, **k: calls.append(k) or real(*a, **k))
    return calls


@pytest.mark.slow
def test_an_output_that_cannot_be_written_fails_before_the_evaluation(tmp_path, count_evaluations):
    from kvcore_eval.experiments.evaluate import run_lm_eval

    def run(output):
        run_lm_eval(
            EvalConfig(
                model=str(EXAMPLE_MODEL), tasks="kvcore_alpaca", data_dir=str(EXAMPLE_DATA), limit=2, output=str(output)
            )
        )

    (tmp_path / "a-file").write_text("mine")
    (tmp_path / "notes.json").write_text('{"my": "notes"}')
    with pytest.raises(ValueError, match="is a folder: name a file inside it"):
        run(tmp_path)
    with pytest.raises(ValueError, match="cannot be written: .*a-file is a file, not a folder"):
        run(tmp_path / "a-file" / "results.json")
    with pytest.raises(FileExistsError, match="exists and was not written by kvcore-eval"):
        run(tmp_path / "notes.json")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(ValueError, match="cannot be written \\(Permission denied\\)"):
            run(locked / "results.json")
    assert count_evaluations == [] and (tmp_path / "notes.json").read_text() == '{"my": "notes"}'
    run(tmp_path / "new" / "results.json")
    run(tmp_path / "new" / "results.json")  # an earlier results file is replaced
    assert len(count_evaluations) == 2
    assert "kvcore_alpaca" in json.loads((tmp_path / "new" / "results.json").read_text())["results"]


def test_a_full_disk_at_the_output_loses_no_result(tmp_path, monkeypatch, capsys, caplog):
    """`eval --output` on a full disk: lm-eval's table is printed before the write, and the results are kept in the
    system's temporary folder, named in the one error line."""
    import errno
    import tempfile

    from kvcore_eval import outputs
    from kvcore_eval.cli import main

    output = tmp_path / "runs" / "results.json"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()

    def full_disk(path, *args, **kwargs):  # the write of results.json's temporary hits a full disk
        if str(path).endswith(".results.json.kvcore-tmp"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(outputs, "open", full_disk, raising=False)
    command = ["eval", "--model", str(EXAMPLE_MODEL), "--tasks", "kvcore_alpaca", "--data-dir", str(EXAMPLE_DATA)]
    with pytest.raises(SystemExit) as exit_info, caplog.at_level("ERROR"):
        main([*command, "--limit", "2", "--output", str(output), "--device", "cpu"])
    assert exit_info.value.code == 2
    table = capsys.readouterr().out
    assert "kvcore_alpaca" in table and "byte_perplexity" in table, "the table is printed before the write"
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    (kept,) = (tmp_path / "tmp").glob("kvcore-eval-results-*.json")
    assert error == (
        f"could not write --output {output} (no space left on the device); the results are kept in {kept}: "
        f"once there is room, `cp {kept} {output}`"
    )
    results = json.loads(kept.read_text())["results"]["kvcore_alpaca"]
    assert f"{results['byte_perplexity,none']:.4f}" in table
    assert not output.exists() and [p.name for p in output.parent.iterdir()] == []


def test_a_record_longer_than_the_context_is_refused_before_the_model_loads(tmp_path, count_evaluations):
    """A record whose response is longer than the model's 1024 positions: one line naming the task, the document
    and the fix, before the model loads (lm-eval asserts `len(continuation_enc) <= self.max_length` after it)."""
    from kvcore_eval.experiments.evaluate import run_lm_eval

    records = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}."} for i in range(5)]
    records[2]["output"] = "Grain by grain. " * 400  # 6400 bytes: more tokens than 1024 with any tokenizer here
    (tmp_path / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = EvalConfig(model=str(EXAMPLE_MODEL), tasks="kvcore_alpaca", data_dir=str(tmp_path), device="cpu")
    with pytest.raises(
        ValueError, match=r"kvcore_alpaca document \d \('Grain by grain.*'...\): its scored continuation"
    ):
        run_lm_eval(config)
    with pytest.raises(ValueError, match="is 640\\d tokens, more than the 1024-token context of .*tiny-llama.*--limit"):
        run_lm_eval(config)
    assert count_evaluations == []

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import EXAMPLE_DATA, REPO
from kvcore_eval.artifact import BASIS_FILE, load_calibration
from kvcore_eval.calibrate import CHECKPOINT_DIR, calibrate
from kvcore_eval.config import CalibrationConfig


def config(model_dir, out, **overrides) -> CalibrationConfig:
    settings = dict(model=str(model_dir), dataset=str(EXAMPLE_DATA / "alpaca.jsonl"), out=str(out), prompt_format="alpaca",
                    max_tokens=3000, seq_len=64, batch_size=3, device="cpu", checkpoint_every=400)
    return CalibrationConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def finished_run(llama_dir, tmp_path_factory):
    return calibrate(config(llama_dir, tmp_path_factory.mktemp("runs") / "full"))


def test_artifact_names_model_dataset_and_tokens(finished_run, llama_dir):
    calibration = load_calibration(finished_run)
    meta = calibration.metadata
    assert meta["model"]["model_id"] == str(llama_dir)
    assert meta["model"]["geometry"] == {"num_layers": 2, "kv_heads": 2, "head_dim": 16}
    assert len(meta["model"]["weights_fingerprint"]) == 16 and meta["model"]["has_rope"] is True
    assert meta["dataset"]["spec"].endswith("alpaca.jsonl")
    assert meta["tokens"] == 3000 and calibration.token_count.tolist() == [3000, 3000]
    assert {"torch", "transformers", "kvcore_eval"} <= set(meta["versions"])
    assert not (finished_run / CHECKPOINT_DIR).exists()
    vectors = calibration.eigenvectors["value"][0].double()
    assert torch.allclose(vectors.T @ vectors, torch.eye(32, dtype=torch.float64), atol=1e-5)
    values = calibration.eigenvalues["key_pre_rope"]
    assert (values[:, :-1] >= values[:, 1:]).all(), "eigenvalues sorted descending"
    assert json.loads((finished_run / "config.json").read_text())["seq_len"] == 64


def test_resume_after_interruption_is_bit_identical(finished_run, llama_dir, tmp_path):
    out = tmp_path / "interrupted"

    def kill(batches_done):
        raise KeyboardInterrupt(f"simulated kill after {batches_done} batches")

    with pytest.raises(KeyboardInterrupt):
        calibrate(config(llama_dir, out), on_checkpoint=kill)
    assert (out / CHECKPOINT_DIR / "rank0.safetensors").exists() and not (out / BASIS_FILE).exists()
    with pytest.raises(FileExistsError, match="--resume"):
        calibrate(config(llama_dir, out))
    calibrate(config(llama_dir, out, resume=True))
    resumed, uninterrupted = load_file(str(out / BASIS_FILE)), load_file(str(finished_run / BASIS_FILE))
    assert resumed.keys() == uninterrupted.keys()
    for key, tensor in uninterrupted.items():
        assert torch.equal(resumed[key], tensor), key


def test_resume_refuses_a_checkpoint_from_another_dataset(llama_dir, tmp_path):
    out = tmp_path / "other"

    def kill(batches_done):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        calibrate(config(llama_dir, out), on_checkpoint=kill)
    with pytest.raises(ValueError, match="another run: its dataset"):
        calibrate(config(llama_dir, out, dataset=str(EXAMPLE_DATA / "codealpaca.jsonl"), resume=True))


def test_finished_out_dir_is_refused_unless_overwrite(finished_run, llama_dir):
    with pytest.raises(FileExistsError, match="--overwrite"):
        calibrate(config(llama_dir, finished_run))


def test_bad_input_gets_errors_that_name_the_fix(llama_dir, tmp_path):
    with pytest.raises(KeyError, match="no field 'text'"):
        calibrate(config(llama_dir, tmp_path / "a", prompt_format=None))
    with pytest.raises(ValueError, match="fewer than one sequence"):
        calibrate(config(llama_dir, tmp_path / "b", dataset=str(EXAMPLE_DATA / "medalpaca.jsonl"), seq_len=4000, max_tokens=5000))
    with pytest.raises(ValueError, match="less than one sequence"):
        config(llama_dir, tmp_path / "c", seq_len=512, max_tokens=100)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        calibrate(config(llama_dir, tmp_path / "d", dataset=str(tmp_path / "missing.jsonl")))
    with pytest.raises(ValueError, match="--dtype"):
        config(llama_dir, tmp_path / "e", dtype="int8")


def test_not_a_causal_lm_is_refused(tmp_path):
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="not a causal LM"):
        calibrate(config(tmp_path / "vit", tmp_path / "out"))


def test_architecture_without_attention_heads_names_what_is_missing(tmp_path):
    from transformers import MambaConfig

    MambaConfig(vocab_size=259, hidden_size=32, num_hidden_layers=1).save_pretrained(tmp_path / "mamba")
    with pytest.raises(ValueError, match="no num_attention_heads/num_hidden_layers"):
        calibrate(config(tmp_path / "mamba", tmp_path / "out"))


def _run_cli(args, **env):
    return subprocess.run([*args], cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, **env})


def test_two_processes_sum_to_the_single_process_grams(finished_run, llama_dir, tmp_path):
    """torchrun starts 2 CPU processes (gloo); accelerate's PartialState picks them up, as under `accelerate launch`."""
    out = tmp_path / "two"
    cli = ["-m", "kvcore_eval", "calibrate", "--model", str(llama_dir), "--dataset", str(EXAMPLE_DATA / "alpaca.jsonl"),
           "--prompt-format", "alpaca", "--max-tokens", "3000", "--seq-len", "64", "--batch-size", "3", "--device", "cpu", "--out", str(out)]
    result = _run_cli([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *cli], OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr[-3000:]
    two, one = load_calibration(out), load_calibration(finished_run)
    assert two.metadata["processes"] == 2 and two.metadata["tokens"] == one.metadata["tokens"]
    for space, values in one.eigenvalues.items():
        assert torch.allclose(two.eigenvalues[space], values, rtol=1e-10, atol=1e-12 * values.max().item()), space


def test_cli_calibrate_and_report(llama_dir, tmp_path):
    out = tmp_path / "cli"
    result = _run_cli([sys.executable, "-m", "kvcore_eval", "calibrate", "--model", str(llama_dir), "--dataset", "kvcore:codealpaca",
                       "--max-tokens", "1000", "--seq-len", "64", "--device", "cpu", "--out", str(out)], KVCORE_DATA_DIR=str(EXAMPLE_DATA))
    assert result.returncode == 0, result.stderr[-3000:]
    result = _run_cli([sys.executable, "-m", "kvcore_eval", "report", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert len(report["layers"]) == 2 and 0 < report["mean_ner"]["value"] <= 1
    assert "| 1 |" in (out / "report.md").read_text()
    assert (out / "ner.png").read_bytes()[:4] == b"\x89PNG"
    missing = _run_cli([sys.executable, "-m", "kvcore_eval", "report", str(tmp_path / "nowhere")])
    assert missing.returncode == 2 and "kvcore-eval calibrate" in missing.stderr


def test_bfloat16_calibration_matches_float32_and_keeps_the_fingerprint(finished_run, llama_dir, tmp_path):
    """bf16 forward, float64 Grams: spectra close to the float32 run's, and the same weights fingerprint (the
    fingerprint does not depend on the load dtype), with the dtype recorded separately."""
    bf16 = load_calibration(calibrate(config(llama_dir, tmp_path / "bf16", dtype="bfloat16")))
    fp32 = load_calibration(finished_run)
    assert bf16.metadata["model"]["weights_fingerprint"] == fp32.metadata["model"]["weights_fingerprint"]
    assert (bf16.metadata["model_dtype"], fp32.metadata["model_dtype"]) == ("bfloat16", "float32")
    for space, values in fp32.eigenvalues.items():
        relative = (bf16.eigenvalues[space] - values).norm() / values.norm()
        assert 0 < relative < 2e-2, space

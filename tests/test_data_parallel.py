"""Data-parallel lm-eval: `accelerate launch --num_processes 2 -m lm_eval --model kvcore_hf ...` on two CPU processes
(gloo) gives what one process gives: the scores, the rank plan, the measured cache bytes and the calibration overlap;
every kvcore_hf option reaches each process, and each builds its cache plan once.

lm-eval's own `hf` splits requests over processes only where it sees more than one GPU (on the CPU every process
scores every request); kvcore_hf splits them wherever accelerate started several processes (`_split_over_processes`).
accelerate's --multi_gpu launcher is torchrun, which on a machine without CUDA runs CPU processes.
benchmarks/gpu_check.sh runs the same test on every GPU present (KVCORE_DP_DEVICE=cuda, KVCORE_DP_PROCESSES=N)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import EXAMPLE_DATA, free_port
from test_wrapper import artifact_dir  # noqa: F401  (module fixture: the llama artifact)

OPTIONS = "key_rank=0.25,value_rank=0.5,key_space=post_rope,attention=latent,latent_bits=8"
DEVICE = os.environ.get("KVCORE_DP_DEVICE", "cpu")
PROCESSES = int(os.environ.get("KVCORE_DP_PROCESSES", "2"))
SEVERAL = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(PROCESSES)]


def several() -> list[str]:
    """accelerate's launcher for PROCESSES processes, on a free rendezvous port."""
    return [*SEVERAL, "--main_process_port", str(free_port())]


def lm_eval_run(launcher: list[str], llama_dir, artifact, out, documents: int) -> tuple[dict, str]:
    device = DEVICE if launcher != [sys.executable] or DEVICE == "cpu" else f"{DEVICE}:0"
    command = [*launcher, "-m", "lm_eval", "--model", "kvcore_hf", "--tasks", "kvcore_alpaca", "--device", device]
    command += ["--model_args", f"pretrained={llama_dir},calibration={artifact},{OPTIONS}"]
    command += ["--limit", str(documents), "--batch_size", "1", "--output_path", str(out)]
    env = {**os.environ, "KVCORE_DATA_DIR": str(EXAMPLE_DATA), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=out.parent, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(next(out.rglob("results_*.json")).read_text()), result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("extra", [0, 1], ids=["even", "padded"])
def test_two_processes_give_what_one_gives(extra, llama_dir, artifact_dir, tmp_path):  # noqa: F811
    """An even split (three documents a process), and one more document: lm-eval pads the short ranks with copies of
    their last request, scored but not counted."""
    documents = 3 * PROCESSES + extra
    one, _ = lm_eval_run([sys.executable], llama_dir, artifact_dir, tmp_path / "one", documents)
    two, log = lm_eval_run(several(), llama_dir, artifact_dir, tmp_path / "two", documents)
    for name, value in one["results"]["kvcore_alpaca"].items():
        if isinstance(value, float):
            tolerance = 1e-9 if DEVICE == "cpu" else 1e-6  # one process and several run the same kernels
            assert two["results"]["kvcore_alpaca"][name] == pytest.approx(value, rel=tolerance, abs=1e-12), name
    assert two["n-samples"] == one["n-samples"]
    for field in ("rank_plan", "truncation", "cache_bytes_per_token", "calibration_overlap"):
        assert two["config"]["kvcore"][field] == one["config"]["kvcore"][field], field
    measured_one = one["config"]["kvcore"]["measured_cache_bytes_per_token"]
    measured_two = two["config"]["kvcore"]["measured_cache_bytes_per_token"]
    assert measured_two == measured_one, "every process's caches, pooled: positions, caches and bytes of one process"
    for rank in range(PROCESSES):  # each process split the requests and holds every option
        lines = [line for line in log.splitlines() if f"kvcore_hf: process {rank} of {PROCESSES}" in line]
        assert len(lines) == 1 and "latent_bits=8" in lines[0] and "attention='latent'" in lines[0], lines
    assert log.count("kvcore_hf: basis=data") == PROCESSES, "one plan (one artifact load) per process"
    assert "not of type `str`" not in log, "lm-eval's warning against launching a model object: kvcore_hf loads it"

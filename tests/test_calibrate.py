import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import EXAMPLE_DATA, REPO, free_port
from safetensors.torch import load_file

from kvcore_eval.analysis.report import write_report
from kvcore_eval.calibration.artifact import BASIS_FILE, load_calibration
from kvcore_eval.calibration.calibrate import CHECKPOINT_DIR, calibrate
from kvcore_eval.config import CalibrationConfig


def config(model_dir, out, **overrides) -> CalibrationConfig:
    settings = dict(
        model=str(model_dir),
        dataset=str(EXAMPLE_DATA / "alpaca.jsonl"),
        out=str(out),
        prompt_format="alpaca",
        max_tokens=3000,
        seq_len=64,
        batch_size=3,
        device="cpu",
        checkpoint_every=400,
    )
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
    with pytest.raises(ValueError, match=r"another run \(config\.dataset: .* then, .*codealpaca\.jsonl' now\)"):
        calibrate(config(llama_dir, out, dataset=str(EXAMPLE_DATA / "codealpaca.jsonl"), resume=True))
    with pytest.raises(ValueError, match=r"another run \(config\.dtype: 'auto' then, 'bfloat16' now"):
        calibrate(config(llama_dir, out, dtype="bfloat16", resume=True))


def test_finished_out_dir_is_refused_unless_overwrite(finished_run, llama_dir):
    with pytest.raises(FileExistsError, match="--overwrite"):
        calibrate(config(llama_dir, finished_run))


def test_bad_input_gets_errors_that_name_the_fix(llama_dir, tmp_path):
    with pytest.raises(KeyError, match="no field 'text'"):
        calibrate(config(llama_dir, tmp_path / "a", prompt_format=None))
    with pytest.raises(ValueError, match="fewer than one sequence"):
        calibrate(
            config(
                llama_dir, tmp_path / "b", dataset=str(EXAMPLE_DATA / "medalpaca.jsonl"), seq_len=4000, max_tokens=5000
            )
        )
    with pytest.raises(ValueError, match="less than one sequence"):
        config(llama_dir, tmp_path / "c", seq_len=512, max_tokens=100)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        calibrate(config(llama_dir, tmp_path / "d", dataset=str(tmp_path / "missing.jsonl")))
    with pytest.raises(ValueError, match="dtype=.int8.: use auto, float32, bfloat16 or float16"):
        config(llama_dir, tmp_path / "e", dtype="int8")


@pytest.mark.parametrize("name", ["no-such-model/", "models/no-such-model/", "a/b/c"])
def test_a_model_path_that_does_not_exist_is_named_as_a_path(name, tmp_path, monkeypatch):
    from kvcore_eval.model.models import load_config

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"model folder {name} does not exist"):
        load_config(name, None)


def test_not_a_causal_lm_is_refused(tmp_path):
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(
        tmp_path / "vit"
    )
    with pytest.raises(ValueError, match="not a causal LM"):
        calibrate(config(tmp_path / "vit", tmp_path / "out"))


def test_architecture_without_attention_heads_names_what_is_missing(tmp_path):
    from transformers import MambaConfig

    MambaConfig(vocab_size=259, hidden_size=32, num_hidden_layers=1).save_pretrained(tmp_path / "mamba")
    with pytest.raises(ValueError, match="no num_attention_heads/num_hidden_layers"):
        calibrate(config(tmp_path / "mamba", tmp_path / "out"))


def _run_cli(args, **env):
    return subprocess.run([*args], cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, **env})


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"],
    "accelerate --multi_gpu": [*ACCELERATE, "--multi_gpu", "--num_processes", "2"],
    # accelerate's simple launcher: one process, which starts the two under torchrun itself
    "accelerate": [*ACCELERATE, "--num_processes", "2"],
    "accelerate --cpu": [*ACCELERATE, "--cpu", "--num_processes", "2"],
}


def launcher(name: str) -> list[str]:
    """The launcher's command, on a free rendezvous port."""
    return [*LAUNCHERS[name], "--master_port" if name == "torchrun" else "--main_process_port", str(free_port())]


def _calibrate_args(model_dir, out, *extra, dataset=None, max_tokens=3000, batch_size=3):
    """`calibrate` and its flags on the shipped Alpaca sample (or `dataset`), as the command line takes them."""
    args = ["calibrate", "--model", str(model_dir), "--dataset", str(dataset or EXAMPLE_DATA / "alpaca.jsonl")]
    args += ["--prompt-format", "alpaca", "--max-tokens", str(max_tokens), "--seq-len", "64"]
    args += ["--batch-size", str(batch_size)] if batch_size is not None else []
    return [*args, "--out", str(out), *extra]


def _calibrate_cli(model_dir, out, *extra, **options):
    """The same for `python -m kvcore_eval`."""
    return ["-m", "kvcore_eval", *_calibrate_args(model_dir, out, *extra, **options)]


def _long_data(tmp_path):
    long = tmp_path / "long.jsonl"  # enough text that a run is still going while the test acts on it
    long.write_text((EXAMPLE_DATA / "alpaca.jsonl").read_text() * 2000)
    return long


@pytest.mark.slow
@pytest.mark.parametrize("name", LAUNCHERS)
def test_two_processes_sum_to_the_single_process_grams(finished_run, llama_dir, tmp_path, name):
    """Two real CPU processes (gloo; accelerate's --multi_gpu launcher is torchrun, and on a machine without CUDA
    PartialState runs them on CPU): each accumulates every other sequence, the Grams are all-reduced, and the
    spectra equal the one-process run's to float64 rounding."""
    out = tmp_path / "two"
    result = _run_cli([*launcher(name), *_calibrate_cli(llama_dir, out, "--device", "cpu")], OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr[-3000:]
    two, one = load_calibration(out), load_calibration(finished_run)
    assert two.metadata["processes"] == 2 and two.metadata["tokens"] == one.metadata["tokens"]
    assert torch.equal(two.token_count, one.token_count)
    for space, values in one.eigenvalues.items():
        assert torch.allclose(two.eigenvalues[space], values, rtol=1e-10, atol=1e-12 * values.max().item()), space


def test_accelerates_simple_launcher_is_recognized_and_its_process_count_read(tmp_path):
    """accelerate without --multi_gpu starts one process (ACCELERATE_USE_CPU and MASTER_ADDR set, no WORLD_SIZE): the
    N it was asked for is read from its command line, else its config file; unreadable, it is refused, not run as
    one process. Under torchrun (WORLD_SIZE) or without a launcher, nothing is relaunched."""
    from kvcore_eval.calibration.calibrate import simple_launch_processes

    simple = {"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1"}
    command = ["python", "/venv/bin/accelerate", "launch", "--num_processes", "3", "/venv/bin/kvcore-eval", "calibrate"]
    assert simple_launch_processes(simple, command) == 3
    module = ["python", "-m", "accelerate.commands.launch", "--cpu", "--num_processes=2", "-m", "kvcore_eval"]
    assert simple_launch_processes(simple, module) == 2
    config = tmp_path / "accelerate.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_processes: 4\n")
    assert simple_launch_processes(simple, ["accelerate", "launch", "--config_file", str(config), "x.py"]) == 4
    assert simple_launch_processes({**simple, "WORLD_SIZE": "2"}, command) is None
    assert simple_launch_processes({"MASTER_ADDR": "127.0.0.1"}, command) is None  # not accelerate's launcher
    assert simple_launch_processes({"ACCELERATE_USE_CPU": "True"}, command) is None  # one process was asked for
    with pytest.raises(ValueError, match="cannot be read: launch with `torchrun --nproc_per_node N"):
        simple_launch_processes(simple, None)


@pytest.mark.slow
def test_cli_calibrate_and_report(llama_dir, tmp_path):
    out = tmp_path / "cli"
    result = _run_cli(
        [
            sys.executable,
            "-m",
            "kvcore_eval",
            "calibrate",
            "--model",
            str(llama_dir),
            "--dataset",
            "kvcore:codealpaca",
            "--max-tokens",
            "1000",
            "--seq-len",
            "64",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        KVCORE_DATA_DIR=str(EXAMPLE_DATA),
    )
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


def _snapshot(folder):
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_overwrite_never_touches_a_folder_of_the_users(llama_dir, tmp_path):
    user = tmp_path / "project"
    (user / "src").mkdir(parents=True)
    (user / "notes.txt").write_text("my notes")
    (user / "src" / "main.py").write_text("print('hi')")
    before = _snapshot(user)
    with pytest.raises(FileExistsError, match="did not write \\(notes.txt, src\\)"):
        calibrate(config(llama_dir, user, overwrite=True))
    assert _snapshot(user) == before


def test_a_failed_overwrite_leaves_the_previous_artifact_byte_identical(finished_run, llama_dir, tmp_path):
    import shutil

    out = tmp_path / "previous"
    shutil.copytree(finished_run, out)
    write_report(out)
    before = _snapshot(out)
    with pytest.raises(FileNotFoundError, match="does not exist"):  # a missing dataset: refused before any output
        calibrate(config(llama_dir, out, overwrite=True, dataset=str(tmp_path / "missing.jsonl")))
    assert _snapshot(out) == before

    def kill(batches_done):
        raise KeyboardInterrupt("killed mid-run")

    with pytest.raises(KeyboardInterrupt):  # killed mid-run: the new run lives beside the old one
        calibrate(config(llama_dir, out, overwrite=True, seq_len=32), on_checkpoint=kill)
    assert _snapshot(out) == before
    calibrate(config(llama_dir, out, overwrite=True, seq_len=32))  # a finished overwrite swaps in the new run
    assert load_calibration(out).metadata["seq_len"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous"], "no staging or old folder is left behind"


@pytest.mark.parametrize("step", ["write", "rename"])
def test_a_kill_at_any_step_of_a_checkpoint_write_resumes_bit_identical(
    step, finished_run, llama_dir, tmp_path, monkeypatch
):
    """The second checkpoint write is killed while the file is half written, or just before its rename."""
    import safetensors.torch

    from kvcore_eval import outputs

    out, calls = tmp_path / "killed", {"n": 0}
    real_save, real_replace = safetensors.torch.save_file, outputs.os.replace

    def save(tensors, path, metadata=None):
        calls["n"] += 1
        if step == "write" and calls["n"] == 2:
            with open(path, "wb") as f:
                f.write(b"\x00" * 100)  # a torn file
            raise KeyboardInterrupt
        real_save(tensors, path, metadata=metadata)

    def replace(source, target):
        if step == "rename" and calls["n"] == 2 and "checkpoint" in str(target):
            raise KeyboardInterrupt
        real_replace(source, target)

    monkeypatch.setattr(safetensors.torch, "save_file", save)
    monkeypatch.setattr(outputs.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        calibrate(config(llama_dir, out))
    monkeypatch.undo()
    calibrate(config(llama_dir, out, resume=True))
    resumed, uninterrupted = load_file(str(out / BASIS_FILE)), load_file(str(finished_run / BASIS_FILE))
    for key, tensor in uninterrupted.items():
        assert torch.equal(resumed[key], tensor), key


def test_running_out_of_data_is_warned_and_recorded(llama_dir, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="kvcore_eval"):
        calibration = load_calibration(calibrate(config(llama_dir, tmp_path / "short", max_tokens=20_000)))
    assert calibration.metadata["tokens_requested"] == 20_000 and calibration.metadata["tokens"] < 5_000
    assert any("ran out of data" in record.getMessage() for record in caplog.records)


def test_a_run_of_another_kind_is_refused(llama_dir, tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "config.json").write_text(json.dumps({"kind": "sweep"}))
    with pytest.raises(FileExistsError, match="holds a `kvcore-eval sweep` run"):
        calibrate(config(llama_dir, sweep, overwrite=True))


def test_damaged_or_non_finite_bases_are_refused(finished_run, tmp_path):
    import shutil

    from kvcore_eval.calibration.artifact import save_calibration

    damaged = tmp_path / "damaged"
    shutil.copytree(finished_run, damaged)
    data = bytearray((damaged / BASIS_FILE).read_bytes())
    data[-200:-100] = b"\xff" * 100  # the header stays intact, values change
    (damaged / BASIS_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the checksum"):
        load_calibration(damaged)
    calibration = load_calibration(finished_run)
    calibration.eigenvectors["value"][0, 0, 0] = float("nan")
    save_calibration(calibration, tmp_path / "nan")
    with pytest.raises(ValueError, match="NaN or inf in value.eigenvectors"):
        load_calibration(tmp_path / "nan")


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "has no records"),
        (b'{"instruction": "caf\xe9", "output": "x"}\n', "is not UTF-8 text \\(byte 0xe9"),
        (b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output"\n', "bad.jsonl, line 2: not valid JSON"),
    ],
)
def test_bad_data_files_name_the_file_and_the_fix(content, message, llama_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        calibrate(config(llama_dir, tmp_path / "out", dataset=str(bad)))
    if "line 2" in message:  # found while streaming: the run had started, and wrote no artifact
        assert not (tmp_path / "out" / "kvcore.json").exists()
    else:  # the first record is read before any output is touched
        assert not (tmp_path / "out").exists()


def test_too_short_sequences_are_refused(llama_dir, tmp_path):
    with pytest.raises(ValueError, match="below the minimum of 32 tokens"):
        config(llama_dir, tmp_path / "x", seq_len=1)


@pytest.mark.slow
def test_cli_errors_are_one_line_that_names_the_fix(finished_run, tmp_path):
    import shutil

    missing_model = _run_cli(
        [
            sys.executable,
            "-m",
            "kvcore_eval",
            "calibrate",
            "--model",
            str(tmp_path / "no-model"),
            "--dataset",
            str(EXAMPLE_DATA / "alpaca.jsonl"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert (
        missing_model.returncode == 2
        and "model folder" in missing_model.stderr
        and "Traceback" not in missing_model.stderr
    )
    truncated = tmp_path / "truncated"
    shutil.copytree(finished_run, truncated)
    (truncated / BASIS_FILE).write_bytes((truncated / BASIS_FILE).read_bytes()[:50])
    (truncated / "kvcore.json").write_text(
        json.dumps(
            {
                **json.loads((finished_run / "kvcore.json").read_text()),
                "basis_sha256": __import__("kvcore_eval.model.models", fromlist=["x"]).file_sha256(
                    str(truncated / BASIS_FILE)
                ),
            }
        )
    )
    report = _run_cli([sys.executable, "-m", "kvcore_eval", "report", str(truncated)])
    assert report.returncode == 2 and "cannot be read" in report.stderr and "Traceback" not in report.stderr
    half = tmp_path / "half"
    shutil.copytree(finished_run, half)
    (half / "kvcore.json").write_text((finished_run / "kvcore.json").read_text()[:40])
    report = _run_cli([sys.executable, "-m", "kvcore_eval", "report", str(half)])
    assert report.returncode == 2 and f"{half / 'kvcore.json'} is not valid JSON" in report.stderr


@pytest.mark.slow
def test_ctrl_c_during_calibrate_says_how_to_resume(llama_dir, tmp_path):
    import signal
    import time

    command = [
        sys.executable,
        *_calibrate_cli(
            llama_dir,
            tmp_path / "c",
            "--device",
            "cpu",
            dataset=_long_data(tmp_path),
            max_tokens=5_000_000,
            batch_size=None,
        ),
    ]
    # a shell without job control starts background jobs with SIGINT ignored, and children inherit that: restore it
    reset = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True, preexec_fn=reset)
    deadline = time.time() + 120
    while not (tmp_path / "c" / "config.json").exists() and time.time() < deadline:  # inputs checked, run started
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    # Python handles SIGINT between bytecodes: a loaded machine can keep it in a long native call (tokenizing) a while
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 130 and "--resume" in stderr and "Traceback" not in stderr


@pytest.mark.slow
def test_torchrun_with_device_auto_shards_on_cpu(finished_run, llama_dir, tmp_path):
    out = tmp_path / "auto"
    result = _run_cli([*launcher("torchrun"), *_calibrate_cli(llama_dir, out)], OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_calibration(out).metadata["processes"] == 2


def test_disk_full_is_one_line_and_keeps_the_previous_artifact(finished_run, llama_dir, tmp_path, monkeypatch, caplog):
    import shutil

    import safetensors.torch
    from safetensors import SafetensorError

    from kvcore_eval.cli import main

    out = tmp_path / "full-disk"
    shutil.copytree(finished_run, out)
    before = _snapshot(out)
    real_save = safetensors.torch.save_file

    def save(tensors, path, metadata=None):
        if "basis" in str(path):  # what safetensors raises on a full disk (checked on a 64 kB tmpfs)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save)
    with pytest.raises(SystemExit) as exit_info:
        main(_calibrate_args(llama_dir, out, "--device", "cpu", "--overwrite", max_tokens=1000, batch_size=None))
    assert exit_info.value.code == 2
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert "no space left on the device" in errors[0] and "nothing was lost" in errors[0]
    assert f"into {out.with_name(out.name + '.kvcore-staging')}" in errors[0], "names the folder it was writing"
    assert _snapshot(out) == before


def test_documents_are_tokenized_as_lm_eval_with_the_tokenizers_bos(llama_dir, tmp_path):
    """A tokenizer that adds BOS: each calibrated document starts with it, as in lm-eval's HFLM, and it is recorded."""
    import shutil

    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from kvcore_eval.calibration.data import pack_sequences

    folder = tmp_path / "bos-model"
    shutil.copytree(llama_dir, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["post_processor"]["single"] = [
        {"SpecialToken": {"id": "<s>", "type_id": 0}},
        *spec["post_processor"]["single"],
    ]
    spec["post_processor"]["special_tokens"] = {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    lm = HFLM(pretrained=str(folder), device="cpu")
    texts = ["Give three tips.", "Name a colour: blue."]
    (sequence,) = pack_sequences(texts, tokenizer, 64, 1000)
    assert sequence == lm.tok_encode(texts[0]) + [2] + lm.tok_encode(texts[1]) + [2]
    assert sequence[0] == 1, "the evaluation's first token, BOS, is calibrated too"
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": t * 8}) + "\n" for t in texts))
    run = calibrate(
        config(folder, tmp_path / "run", dataset=str(folder / "docs.jsonl"), prompt_format=None, max_tokens=200)
    )
    assert load_calibration(run).metadata["tokenization"]["adds_bos"] is True


def _interrupt_before_the_artifact(monkeypatch, run) -> None:
    """Run until every batch is done, then die before the artifact is written (the last checkpoint stays)."""
    from kvcore_eval.calibration import artifact

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact, "save_calibration", die)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.undo()


def test_resume_with_a_larger_max_tokens_is_bit_identical(finished_run, llama_dir, tmp_path, monkeypatch):
    """A first run of 1,000 tokens ends in a short sequence; resumed to 3,000 it equals an uninterrupted 3,000."""
    out = tmp_path / "grow"
    _interrupt_before_the_artifact(monkeypatch, lambda: calibrate(config(llama_dir, out, max_tokens=1000)))
    calibrate(config(llama_dir, out, max_tokens=3000, resume=True))
    resumed, uninterrupted = load_file(str(out / BASIS_FILE)), load_file(str(finished_run / BASIS_FILE))
    assert int(resumed["token_count"][0]) == 3000
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in resumed), "bit-identical to one run"


def test_basis_has_the_mode_of_every_other_output(finished_run):
    modes = {path.name: path.stat().st_mode & 0o777 for path in finished_run.iterdir() if path.is_file()}
    assert modes[BASIS_FILE] == modes["kvcore.json"] == modes["config.json"], modes


_KILLED_IN_THE_FINAL_WRITE = """
import os, signal, sys
import safetensors.torch
from kvcore_eval import cli

real = safetensors.torch.save_file

def save(tensors, path, metadata=None):
    if "basis" in str(path):
        with open(path, "wb") as f:
            f.write(b"half a basis")
        os.kill(os.getpid(), signal.SIGKILL)
    real(tensors, path, metadata=metadata)

safetensors.torch.save_file = save
cli.main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("again", ["--resume", "--overwrite"])
def test_temporaries_of_a_kill_during_the_final_write_are_cleared(again, finished_run, llama_dir, tmp_path):
    """kill -9 while basis.safetensors is being written, then the same command with --resume or --overwrite:
    the temporaries left behind are recognized as the tool's own, and the run ends as an uninterrupted one."""
    out = tmp_path / "killed"
    cli = _calibrate_args(llama_dir, out, "--device", "cpu", "--checkpoint-every", "400")
    killed = _run_cli([sys.executable, "-c", _KILLED_IN_THE_FINAL_WRITE, *cli])
    assert killed.returncode == -9
    (out / ".tmpAb12Cd").write_bytes(b"x")  # what earlier versions (and safetensors itself) left beside the target
    (out / ".kvcore.json.tmp").write_text("{")
    assert {".basis.safetensors.kvcore-tmp", ".tmpAb12Cd", ".kvcore.json.tmp"} <= {p.name for p in out.iterdir()}
    rerun = _run_cli([sys.executable, "-m", "kvcore_eval", *cli, again])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [BASIS_FILE, "config.json", "kvcore.json"]
    assert not list(tmp_path.glob("*.kvcore-*")), "no staging folder or lock is left behind"
    resumed, uninterrupted = load_file(str(out / BASIS_FILE)), load_file(str(finished_run / BASIS_FILE))
    for key, tensor in uninterrupted.items():
        assert torch.equal(resumed[key], tensor), key


def test_packing_reaches_max_tokens_whenever_the_data_holds_them(llama_dir):
    from transformers import AutoTokenizer

    from kvcore_eval.calibration.data import iter_texts, pack_sequences

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)  # one token a byte
    short = [f"Note {i:03d}." for i in range(100)]  # 9 tokens + EOS each: 1,000 tokens of data
    # after 7 notes one sequence of 64 is out and 6 tokens wait: the run must read on to reach 100, not stop at 70
    assert sum(len(s) for s in pack_sequences(iter(short), tokenizer, 64, 100)) == 100
    texts = list(iter_texts(str(EXAMPLE_DATA / "alpaca.jsonl"), prompt_format="alpaca"))
    for max_tokens in range(960, 1024, 3):  # every remainder after 15 sequences of 64
        assert sum(len(s) for s in pack_sequences(iter(texts), tokenizer, 64, max_tokens)) == max_tokens, max_tokens


def test_resume_refuses_another_dtype_and_changed_data(llama_dir, tmp_path, monkeypatch):
    data = tmp_path / "docs.jsonl"
    data.write_text((EXAMPLE_DATA / "alpaca.jsonl").read_text())
    out = tmp_path / "run"
    _interrupt_before_the_artifact(
        monkeypatch, lambda: calibrate(config(llama_dir, out, dataset=str(data), max_tokens=3000))
    )
    with pytest.raises(ValueError, match=r"another run \(config.dtype: 'auto' then, 'bfloat16' now"):
        calibrate(config(llama_dir, out, dataset=str(data), max_tokens=3000, dtype="bfloat16", resume=True))
    records = [json.loads(line) for line in data.read_text().splitlines()]
    records[0]["output"] += " One more sentence."
    data.write_text("".join(json.dumps(r) + "\n" for r in records))  # same file name, other content
    with pytest.raises(ValueError, match="data of .*docs.jsonl changed since the checkpoint"):
        calibrate(config(llama_dir, out, dataset=str(data), max_tokens=3000, resume=True))


def test_overwrite_through_a_symbolic_link_writes_the_folder_it_points_to(finished_run, llama_dir, tmp_path):
    import shutil

    real, link = tmp_path / "real", tmp_path / "latest"
    shutil.copytree(finished_run, real)
    link.symlink_to(real, target_is_directory=True)
    calibrate(config(llama_dir, link, overwrite=True, seq_len=32))
    assert link.is_symlink() and link.resolve() == real, "the user's link is kept"
    assert load_calibration(real).metadata["seq_len"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "real"]
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="symbolic link to .*nowhere, which does not exist"):
        calibrate(config(llama_dir, dangling))


def _long_calibration(llama_dir, tmp_path, out):
    options = {"dataset": _long_data(tmp_path), "max_tokens": 5_000_000, "batch_size": None}
    command = [sys.executable, *_calibrate_cli(llama_dir, out, "--device", "cpu", **options)]
    return subprocess.Popen(command, cwd=REPO, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_one_writer_per_folder_a_second_calibration_is_refused_and_named(llama_dir, tmp_path, caplog):
    """A second calibration into a folder being written is refused, naming the first; once the first is killed
    (kill -9: its lock file stays), its lock is recognized as stale and taken over."""
    import logging
    import signal
    import socket
    import time

    out = tmp_path / "busy"
    first = _long_calibration(llama_dir, tmp_path, out)
    deadline = time.time() + 300
    while not (out / "config.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    try:
        lock = json.loads((tmp_path / "busy.kvcore-lock").read_text())
        assert lock["pid"] == first.pid and lock["host"] == socket.gethostname() and lock["started"]
        refused = f"being written by another kvcore-eval run \\(pid {first.pid} on {socket.gethostname()}, started "
        for second in (config(llama_dir, out, resume=True), config(llama_dir, out, overwrite=True)):
            with pytest.raises(FileExistsError, match=refused):
                calibrate(second)
        assert (out / "config.json").exists(), "the refused --overwrite deleted nothing"
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=300)
    assert (tmp_path / "busy.kvcore-lock").exists(), "kill -9 leaves the lock file"
    with caplog.at_level(logging.WARNING, logger="kvcore_eval"):
        calibrate(config(llama_dir, out, overwrite=True, max_tokens=500))
    assert any(f"took over the lock of pid {first.pid}" in record.getMessage() for record in caplog.records)
    assert not (tmp_path / "busy.kvcore-lock").exists() and load_calibration(out).metadata["tokens"] == 500


def test_a_lock_left_by_a_dead_run_is_recognized_and_taken_over(llama_dir, tmp_path, caplog):
    import logging

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / "stale.kvcore-lock").write_text(
        json.dumps({"pid": pid, "host": "here", "started": "2026-11-30T06:00:00+00:00", "command": "kvcore-eval"})
    )
    with caplog.at_level(logging.WARNING, logger="kvcore_eval"):
        calibrate(config(llama_dir, tmp_path / "stale", max_tokens=500))
    assert any(f"took over the lock of pid {pid} on here" in record.getMessage() for record in caplog.records)
    assert not (tmp_path / "stale.kvcore-lock").exists()


@pytest.mark.parametrize("where", ["parent", "out"])
def test_a_read_only_out_is_one_line_naming_the_folder_and_the_fix(llama_dir, tmp_path, read_only, caplog, where):
    """A read-only parent (where the lock goes) or a read-only --out itself: the folder and the fix, not
    `[Errno 30] ... cal.kvcore-lock` nor a temporary's name; nothing is written or left behind."""
    import logging

    from kvcore_eval.cli import main

    parent = tmp_path / "runs"
    (parent / "cal").mkdir(parents=True)
    folder = read_only(parent if where == "parent" else parent / "cal")
    with pytest.raises(SystemExit) as exit_info, caplog.at_level(logging.ERROR):
        main(_calibrate_args(llama_dir, parent / "cal", "--device", "cpu", max_tokens=500))
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert exit_info.value.code == 2 and error.startswith(f"{folder} cannot be written (")
    assert "make it writable, or choose an output folder elsewhere (--out)" in error
    assert "kvcore-lock" not in error and "kvcore-tmp" not in error
    assert sorted(p.name for p in parent.rglob("*")) == ["cal"]

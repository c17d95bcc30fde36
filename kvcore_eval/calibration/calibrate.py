"""`kvcore-eval calibrate`: stream a dataset through a causal LM, accumulate per-layer K/V Grams, write the artifact.

Runs on CPU, one GPU, or several processes under `torchrun` or `accelerate launch` (each process takes every
world_size-th sequence; the Grams are summed across processes, gloo on CPU, and rank 0 writes one artifact).
`accelerate launch --num_processes N` without --multi_gpu on a machine with fewer than two GPUs (or with --cpu) starts
one process (accelerate runs several CPU processes only through mpirun): the command line then runs the N processes
under torchrun itself (`simple_launch_processes`, `relaunch_with_torchrun`) rather than calibrate as one.
Checkpoints every `checkpoint_every` tokens; `--resume` continues and ends bit-identical to an uninterrupted run.

Outputs are safe (`outputs.py`): inputs are validated before any output is touched; `--out` is refused if it
holds files kvcore-eval did not write; a finished run is replaced (`--overwrite`) by building the new one in
`<out>.kvcore-staging` and swapping it in at the end, so a failed run leaves the previous artifact intact;
each checkpoint is one file (Grams, counters and run identity) written and renamed as a unit.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from kvcore_eval import __version__, outputs
from kvcore_eval.calibration import artifact, data, overlap
from kvcore_eval.calibration.gram import GramAccumulator, GramRecorder
from kvcore_eval.config import CalibrationConfig, identity, identity_differences, parse_metadata, split_paths
from kvcore_eval.harness.lm_tasks import tokenizer_metadata
from kvcore_eval.model import models
from kvcore_eval.model.rope import RopeTap
from kvcore_eval.model.selfcheck import check_key_recovery

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
KIND = "calibrate"
OWN_NAMES = (
    artifact.BASIS_FILE,
    artifact.METADATA_FILE,
    outputs.CONFIG_FILE,
    CHECKPOINT_DIR,
    "report.md",
    "report.json",
    "ner.png",
)


def _dataset_spec(config: CalibrationConfig) -> dict[str, Any]:
    return {
        "spec": config.dataset,
        "split": config.split,
        "text_field": config.text_field,
        "prompt_format": config.prompt_format,
        "data_dir": config.data_dir,
        "skip_docs": config.skip_docs,
        "include_path": config.include_path,
        **({"metadata": parse_metadata(config.metadata)} if config.metadata else {}),
    }


# A resumed run may ask for more tokens than the interrupted one: packing is prefix-stable.
RESUMABLE = ("max_tokens",)


def _run_identity(config: CalibrationConfig, model_identity: dict[str, Any], world_size: int) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed: the whole configuration's identity (but max_tokens, which
    may grow: packing is prefix-stable, and only full batches are checkpointed), the model's, the tokenization and
    the number of processes. The data's content is checked separately, by the digest of the documents read."""
    return {
        "config": identity(config, exclude=RESUMABLE),
        "model": model_identity,
        "tokenization": data.TOKENIZATION,
        "world_size": world_size,
    }


def _work_dir(config: CalibrationConfig, out: Path) -> Path:
    """Where this run writes: `out`, or `<out>.kvcore-staging` when `out` holds a finished run that this one
    replaces at the end (--overwrite, or --resume of an interrupted overwrite)."""
    staging = out.with_name(f"{out.name}.kvcore-staging")
    if not (out / artifact.METADATA_FILE).exists():
        return out
    if config.overwrite or (config.resume and (staging / CHECKPOINT_DIR).is_dir()):
        return staging
    raise FileExistsError(
        f"{out} already holds a finished calibration: pass --overwrite to replace it, or choose another --out"
    )


def _prepare_work_dir(config: CalibrationConfig, out: Path, work: Path) -> None:
    """Check `out` (and the staging folder) hold nothing but our runs; clear what this run replaces."""
    outputs.check_run_folder(out, KIND, OWN_NAMES)
    if work != out and not config.resume:
        outputs.remove_own(work, KIND, OWN_NAMES)
    outputs.check_run_folder(work, KIND, OWN_NAMES)
    for folder in {out, work, work / CHECKPOINT_DIR}:  # what a killed run of ours left half-written
        outputs.clear_own_temporaries(folder)
    if (work / CHECKPOINT_DIR).exists() and not config.resume:
        if not config.overwrite:
            raise FileExistsError(
                f"{out} holds an interrupted calibration: pass --resume to continue it, or --overwrite to start again"
            )
        shutil.rmtree(work / CHECKPOINT_DIR)
    work.mkdir(parents=True, exist_ok=True)
    outputs.check_writable(work, "the calibration writes its artifact there")


def _batches(sequences: Iterator[list[int]], batch_size: int, rank: int, world_size: int) -> Iterator[list[list[int]]]:
    """This process's share (every world_size-th sequence), grouped into batches."""
    batch: list[list[int]] = []
    for index, sequence in enumerate(sequences):
        if index % world_size != rank:
            continue
        batch.append(sequence)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _to_tensors(batch: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention mask, (batch, seq); short sequences right-padded (pads never enter a Gram)."""
    seq = max(len(s) for s in batch)
    input_ids = torch.full((len(batch), seq), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), seq), dtype=torch.long)
    for row, sequence in enumerate(batch):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    return input_ids.to(device), mask.to(device)


def _checkpoint_path(work: Path, rank: int) -> Path:
    return work / CHECKPOINT_DIR / f"rank{rank}.safetensors"


def _save_checkpoint(
    work: Path,
    rank: int,
    accumulator: GramAccumulator,
    batches_done: int,
    run_identity: dict[str, Any],
    documents: overlap.DocumentLog,
) -> None:
    """One file: the Grams, and in its metadata the batches done, the run identity and the digest of the documents
    read so far, renamed into place as a unit."""
    path = _checkpoint_path(work, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "batches_done": str(batches_done),
        "run": json.dumps(run_identity, sort_keys=True),
        "documents_read": str(len(documents.rows)),
        "documents_digest": documents.fingerprint(),
    }
    outputs.atomic_save_safetensors(accumulator.state_dict(), path, metadata)


def _check_same_data(work: Path, saved: dict[str, str], documents: overlap.DocumentLog, dataset: str) -> None:
    """The documents read again up to the checkpoint must be the ones the checkpoint's Grams hold."""
    if (str(len(documents.rows)), documents.fingerprint()) != (saved["documents_read"], saved["documents_digest"]):
        raise ValueError(
            f"the data of {dataset} changed since the checkpoint in {work} was written (its first "
            f"{saved['documents_read']} documents differ): pass --overwrite to calibrate on the data as it is now"
        )


def _load_checkpoint(
    work: Path, rank: int, accumulator: GramAccumulator, run_identity: dict[str, Any]
) -> tuple[int, dict[str, str]]:
    """Restore this process's Grams; returns the number of batches already accumulated (0 if none) and the
    checkpoint's metadata."""
    from safetensors import safe_open

    path = _checkpoint_path(work, rank)
    if not path.exists():
        logger.info("no checkpoint for rank %d in %s: starting from the beginning", rank, work)
        return 0, {}
    with safe_open(str(path), framework="pt") as f:
        saved = f.metadata()
        state = {key: f.get_tensor(key) for key in f.keys()}
    if differences := identity_differences(json.loads(saved["run"]), run_identity):
        raise ValueError(
            f"checkpoint in {work} is from another run ({'; '.join(differences)}): "
            "resume with the same settings, or pass --overwrite to start again"
        )
    accumulator.load_state_dict(state)
    if "documents_digest" not in saved:
        raise ValueError(
            f"checkpoint in {work} was written by an older kvcore-eval that did not record the data it read: "
            "pass --overwrite to start again"
        )
    logger.info("resuming rank %d after %s batches", rank, saved["batches_done"])
    return int(saved["batches_done"]), saved


def _accumulate(
    model,
    recorder: GramRecorder,
    batch: list[list[int]],
    pad_id: int,
    device: torch.device,
    first: bool,
    config: CalibrationConfig,
) -> int:
    """One forward pass whose keys and values enter the Grams; returns the tokens counted."""
    accumulator = recorder.context.accumulator
    input_ids, attention_mask = _to_tensors(batch, pad_id, device)
    recorder.set_token_mask(attention_mask)
    with torch.no_grad():
        model.base_model(input_ids=input_ids, attention_mask=attention_mask, cache=recorder, use_cache=True)
    if first and (silent := (accumulator.token_count == 0).nonzero().flatten().tolist()):
        raise ValueError(
            f"layers {silent} of {config.model} never passed keys and values through transformers' "
            "Cache.update: kvcore-eval supports attention layers that do (Llama, Mistral, Qwen2/3, Gemma, Phi-3, GPT-2)"
        )
    if bad := accumulator.nonfinite_layers():
        raise FloatingPointError(
            f"NaN/inf in the keys or values of layer(s) {bad}: the model overflows in "
            f"{models.dtype_name(model.dtype)}; try --dtype float32"
        )
    return int(attention_mask.sum())


def calibrate(
    config: CalibrationConfig, on_checkpoint: Callable[[int], None] | None = None, model=None, tokenizer=None
) -> Path:
    """Run the calibration; returns the artifact directory. `on_checkpoint(batches_done)` runs after each checkpoint.
    `model` and `tokenizer`, when given, are `config.model` already loaded (the sweep loads it once).
    One writer per `--out`: a second calibration into it is refused while this one runs (`outputs.run_lock`)."""
    from accelerate import PartialState

    if (processes := simple_launch_processes(os.environ, parent_argv())) is not None:
        raise ValueError(
            f"accelerate launch --num_processes {processes} started one process: run `kvcore-eval calibrate` (or "
            "`-m kvcore_eval calibrate`) under it, which starts the processes itself, or launch with torchrun"
        )
    # Under torchrun/accelerate on a machine without CUDA (or `accelerate launch --cpu`), "auto" means CPU processes
    # that shard and all-reduce.
    cpu = not torch.cuda.is_available() or _flag(os.environ, "ACCELERATE_USE_CPU")
    state = PartialState(cpu=config.device == "cpu" or (config.device == "auto" and cpu))
    out = outputs.resolve_run_folder(Path(config.out))
    with outputs.run_lock(out) if state.is_main_process else contextlib.nullcontext():
        if state.is_main_process and out.is_dir():  # before the model loads
            outputs.check_writable(out, "the calibration writes its artifact there")
        return _calibrate(config, on_checkpoint, model, tokenizer, state, out)


# What a launcher that really started several processes sets (torchrun / accelerate's torchrun, or MPI).
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
# What precedes accelerate's launch options: `accelerate launch`, `python -m accelerate.commands.launch`, or its script.
_LAUNCHER_WORDS = ("launch", "accelerate.commands.launch", "accelerate-launch")


def _flag(environment, name: str) -> bool:
    return environment.get(name, "").lower() in ("1", "true", "yes")


def simple_launch_processes(environment, launcher_argv: list[str] | None) -> int | None:
    """N where this process is the only one `accelerate launch --num_processes N` (N > 1) started, else None.

    accelerate's simple launcher (used without --multi_gpu on a machine with fewer than two GPUs, and for --cpu
    without mpirun) starts one process whatever N: it sets ACCELERATE_USE_CPU always, and MASTER_ADDR when N > 1, but
    no WORLD_SIZE. N is not passed on: it is read from the launcher's command line (`launcher_argv`, its parent
    process's), or its config file. Raises where N > 1 was asked for and cannot be read."""
    if "ACCELERATE_USE_CPU" not in environment or "MASTER_ADDR" not in environment:
        return None
    if any(name in environment for name in _WORLD_SIZE_VARIABLES):
        return None
    processes = _asked_processes(launcher_argv) if launcher_argv is not None else None
    if processes is None:
        raise ValueError(
            "accelerate launch with --num_processes > 1 started one process here (without --multi_gpu, accelerate "
            "runs several processes only through mpirun), and how many were asked for cannot be read: launch with "
            "`torchrun --nproc_per_node N -m kvcore_eval calibrate ...` or `accelerate launch --multi_gpu "
            "--num_processes N -m kvcore_eval calibrate ...` (on a machine without CUDA both run N CPU processes that "
            "all-reduce their Grams over gloo), or drop --num_processes for one process"
        )
    return processes if processes > 1 else None


def _asked_processes(launcher_argv: list[str]) -> int | None:
    """--num_processes of an `accelerate launch` command line (else its config file's), or None."""
    from accelerate.commands.launch import launch_command_parser

    starts = [i for i, arg in enumerate(launcher_argv) if Path(arg).name in _LAUNCHER_WORDS]
    if not starts:
        return None
    try:
        args, _ = launch_command_parser().parse_known_args(launcher_argv[starts[0] + 1 :])
    except SystemExit:
        return None
    if args.num_processes is not None:
        return int(args.num_processes)
    from accelerate.commands.config import default_config_file, load_config_from_file

    config_file = args.config_file or default_config_file
    if not Path(config_file).is_file():
        return None
    return int(getattr(load_config_from_file(config_file), "num_processes", 1) or 1)


def parent_argv() -> list[str] | None:
    """The command line of this process's parent (Linux), or None."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def relaunch_with_torchrun(processes: int, argv: list[str], environment) -> int:
    """Run `python -m kvcore_eval <argv>` in `processes` processes under torchrun (the way `torchrun
    --nproc_per_node N` and `accelerate launch --multi_gpu` run it: each takes every N-th sequence, the Grams are
    all-reduced); returns its exit status."""
    import subprocess
    import sys

    logger.info(
        "accelerate launch --num_processes %d started one process: running %d under torchrun", processes, processes
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    command += ["--master_addr", environment["MASTER_ADDR"], "--master_port", environment.get("MASTER_PORT", "29500")]
    return subprocess.run([*command, "-m", "kvcore_eval", *argv], check=False).returncode


def _calibrate(config: CalibrationConfig, on_checkpoint, model, tokenizer, state, out: Path) -> Path:
    device = state.device if config.device == "auto" else torch.device(config.device)
    # Every input is checked before any output is touched: model, tokenizer, the dataset's first record.
    model_id, gguf_file = models.gguf_location(config.model, config.gguf_file)
    if model is None:
        model = models.load_causal_lm(model_id, config.revision, str(device), config.dtype, gguf_file)
        tokenizer = models.load_tokenizer(model_id, config.revision, gguf_file)
    task_metadata = None
    if config.dataset.startswith("lm_eval:"):  # what `lm_eval --model_args pretrained=...` hands the task
        task_metadata = {**tokenizer_metadata(model_id, gguf_file, tokenizer), **parse_metadata(config.metadata)}
    documents = data.iter_documents(
        config.dataset,
        config.split,
        config.prompt_format,
        config.text_field,
        config.data_dir,
        config.skip_docs,
        split_paths(config.include_path),
        task_metadata,
    )
    first = next(documents, None)
    if first is None:
        raise ValueError(f"dataset {config.dataset} has no records: check the file or split, or pass another --dataset")
    tap = RopeTap(model)
    try:
        return _run(
            config,
            on_checkpoint,
            state,
            device,
            out,
            model,
            tokenizer,
            tap,
            itertools.chain([first], documents),
            (model_id, gguf_file),
        )
    finally:
        tap.remove()


def _run(
    config: CalibrationConfig,
    on_checkpoint,
    state,
    device: torch.device,
    out: Path,
    model,
    tokenizer,
    tap: RopeTap,
    documents: Iterator[tuple[str, str]],
    location: tuple[str, str | None],
) -> Path:
    """The run proper, once every input has been checked: Grams, checkpoints, artifact."""
    from tqdm.auto import tqdm

    model_id, gguf_file = location
    geometry = models.kv_geometry(model.config)
    check_key_recovery(model, tap)  # the pre-RoPE keys below are the model's own, or this raises
    model_identity = models.model_identity(model, model_id, config.revision, gguf_file)
    run = {
        **_run_identity(config, model_identity, state.num_processes),
        "weights": models.weights_digest(models.weights_sample(model)),  # bit for bit, in this run's dtype
    }

    work = _work_dir(config, out)
    state.wait_for_everyone()
    if state.is_main_process:
        _prepare_work_dir(config, out, work)
        outputs.write_config(work, KIND, asdict(config))
    state.wait_for_everyone()

    accumulator = GramAccumulator(geometry, device)
    recorder = GramRecorder(accumulator, tap)
    batches_done, saved = _load_checkpoint(work, state.process_index, accumulator, run) if config.resume else (0, {})
    log = overlap.DocumentLog()
    sequences = data.pack_sequences(log.texts(documents), tokenizer, config.seq_len, config.max_tokens)
    batches = _batches(sequences, config.batch_size, state.process_index, state.num_processes)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens_since_checkpoint = 0
    with tqdm(
        total=config.max_tokens // state.num_processes,
        initial=int(accumulator.token_count[0]),
        unit="tok",
        desc="calibrate",
        disable=not state.is_local_main_process,
    ) as progress:
        index = -1
        for index, batch in enumerate(batches):
            if index < batches_done:
                if index == batches_done - 1:
                    _check_same_data(work, saved, log, config.dataset)
                continue
            tokens = _accumulate(model, recorder, batch, pad_id, device, first=index == batches_done, config=config)
            progress.update(tokens)
            tokens_since_checkpoint += tokens
            # Only a full batch is the same in a longer run (a larger --max-tokens on --resume): the last, short
            # one is never checkpointed.
            full = len(batch) == config.batch_size and all(len(s) == config.seq_len for s in batch)
            if tokens_since_checkpoint >= config.checkpoint_every and full:
                _save_checkpoint(work, state.process_index, accumulator, index + 1, run, log)
                tokens_since_checkpoint = 0
                if on_checkpoint is not None:
                    on_checkpoint(index + 1)
    if index < batches_done - 1:
        raise ValueError(
            f"the data of {config.dataset} changed since the checkpoint in {work} was written (it now holds fewer "
            "documents than the checkpoint read): pass --overwrite to calibrate on the data as it is now"
        )
    if state.num_processes > 1:
        accumulator.all_reduce()
    total_tokens = int(accumulator.token_count[0])
    if total_tokens < config.seq_len:
        raise ValueError(
            f"{config.dataset} gave {total_tokens} tokens, fewer than one sequence (--seq-len {config.seq_len}): "
            "add data or lower --seq-len"
        )
    if total_tokens < config.max_tokens:
        logger.warning(
            "%s ran out of data: %d tokens calibrated of the %d asked for (--max-tokens); recorded in kvcore.json",
            config.dataset,
            total_tokens,
            config.max_tokens,
        )
    if state.is_main_process:
        dtype = models.dtype_name(model.dtype)
        metadata = _metadata(config, model_identity, total_tokens, state.num_processes, tap.has_rope, dtype)
        metadata["tokenization"] = {"method": data.TOKENIZATION, "adds_bos": data.adds_bos(tokenizer)}
        metadata["documents"] = {
            "count": len(log.rows),
            "digest": log.fingerprint(),
            "normalization": overlap.NORMALIZATION,
        }
        logger.info(
            "eigendecomposing the Grams of %d layers (3 spaces, D=%d, and each head's block)",
            geometry.num_layers,
            geometry.width,
        )
        calibration = artifact.decompose(accumulator.grams, accumulator.token_count, geometry, metadata)
        calibration.weights_sample = models.weights_sample(model)
        calibration.document_digests = log.tensor()
        artifact.save_calibration(calibration, work)
        shutil.rmtree(work / CHECKPOINT_DIR, ignore_errors=True)
        if work != out:
            outputs.swap_in(work, out, KIND, OWN_NAMES)
        logger.info("wrote %s (%d tokens, %d layers, D=%d)", out, total_tokens, geometry.num_layers, geometry.width)
    state.wait_for_everyone()
    return out


def _metadata(
    config: CalibrationConfig, model_identity: dict[str, Any], tokens: int, world_size: int, has_rope: bool, dtype: str
) -> dict[str, Any]:
    import accelerate
    import transformers

    return {
        "model": {**model_identity, "has_rope": has_rope},
        "dataset": _dataset_spec(config),
        "tokens": tokens,
        "tokens_requested": config.max_tokens,
        "seq_len": config.seq_len,
        "batch_size": config.batch_size,
        "processes": world_size,
        "model_dtype": dtype,  # what --dtype resolved to (auto: by device)
        "gram_dtype": "float64",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
            "kvcore_eval": __version__,
        },
    }

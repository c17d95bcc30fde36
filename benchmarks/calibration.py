"""Calibration cost, measured side by side in one run on one model and one token stream.

Prints: plain forward tokens/s, calibration tokens/s (Gram recording on) and their ratio (goal >= 0.95, 0.9
for the small synthetic config); memory of the Grams vs the naive approach that stacks every token's K and V
and runs an SVD; and the max relative eigenvalue error of the incremental Grams against that SVD.

The two candidates are timed interleaved, one batch each per round (plain, calibrating; then calibrating,
plain; ...), cycling through the batches; the ratio is the median of the per-round ratios, with its min-max.

    python benchmarks/calibration.py                      # CPU, a small Llama config
    python benchmarks/calibration.py --preset smollm2     # CPU, SmolLM2-135M (real where installed)
    python benchmarks/calibration.py --preset 1b --device cuda --dtype bfloat16   # ~1B Llama-3.2-like config
Random weights (except SmolLM2 where installed): speed and memory do not depend on what the weights learned.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import add_model_arguments, add_timing_arguments, build_model, describe, interleave, paired_ratio, timed
from transformers import DynamicCache

from kvcore_eval.calibration.artifact import decompose
from kvcore_eval.calibration.gram import GramAccumulator, GramRecorder
from kvcore_eval.model.rope import RopeTap


def build_parser() -> argparse.ArgumentParser:
    """The command line (the docs test parses the commands the docs show with it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    add_timing_arguments(parser, rounds=0)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    rounds = args.rounds or 3 * args.batches  # default: three passes over the batches
    model, geometry, device = build_model(args, max_positions=4096)
    batches = [
        torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), device=device)
        for _ in range(args.batches)
    ]

    tap = RopeTap(model)
    accumulator = GramAccumulator(geometry, device)
    recorder = GramRecorder(accumulator, tap)
    calls = {"plain": 0, "calibrating": 0}

    def rate(name: str, forward) -> float:
        """Tokens/s of one forward over the candidate's next batch (each candidate cycles through the batches)."""
        batch = batches[calls[name] % len(batches)]
        calls[name] += 1
        with torch.no_grad():
            return batch.numel() / timed(lambda: forward(batch), device)

    speeds = interleave(
        {
            "plain": lambda: rate("plain", lambda b: model.base_model(input_ids=b, use_cache=False)),
            "calibrating": lambda: rate(
                "calibrating", lambda b: model.base_model(input_ids=b, cache=recorder, use_cache=True)
            ),
        },
        rounds,
    )
    ratio = paired_ratio(speeds["calibrating"], speeds["plain"])
    goal = 0.9 if args.preset == "small" else 0.95
    # The timing recorded some batches more than once; for the accuracy check, record every batch exactly once.
    exact = GramAccumulator(geometry, device)
    exact_recorder = GramRecorder(exact, tap)
    stacked = {"key_post_rope": [], "value": []}  # naive: every token's K and V kept
    with torch.no_grad():
        for batch in batches:
            model.base_model(input_ids=batch, cache=exact_recorder, use_cache=True)
            cache = DynamicCache()
            model.base_model(input_ids=batch, cache=cache, use_cache=True)
            stacked["key_post_rope"].append([layer.keys for layer in cache.layers])
            stacked["value"].append([layer.values for layer in cache.layers])
    tokens = sum(b.numel() for b in batches)
    gram_bytes = sum(g.numel() * g.element_size() for g in exact.grams.values())
    naive_bytes = 2 * tokens * geometry.num_layers * geometry.width * 8  # K and V of every token, float64 for the SVD
    calibration = decompose(exact.grams, exact.token_count, geometry, {})
    worst = 0.0
    for space in ("key_post_rope", "value"):
        for layer in range(geometry.num_layers):
            rows = torch.cat(
                [step[layer].transpose(1, 2).reshape(-1, geometry.width) for step in stacked[space]]
            ).double()
            direct = torch.linalg.svdvals(rows) ** 2
            worst = max(
                worst, ((calibration.eigenvalues[space][layer].to(direct) - direct).abs().max() / direct[0]).item()
            )

    shape = f"{args.batches} batches of {args.batch_size}x{args.seq_len}"
    print(f"{describe(model, geometry, args)}; {tokens} tokens in {shape}")
    print(f"timing: {rounds} interleaved rounds of one batch per candidate; median (min-max) over rounds")
    print("| measure | value |")
    print("|---|---:|")
    print(f"| plain forward tokens/s, median | {statistics.median(speeds['plain']):,.0f} |")
    print(
        f"| calibration tokens/s (3 Grams/layer, float64), median | {statistics.median(speeds['calibrating']):,.0f} |"
    )
    print(f"| ratio calibration / plain (goal >= {goal}) | {ratio} |")
    print(f"| Gram memory (independent of tokens) | {gram_bytes / 2**20:,.1f} MiB |")
    print(f"| naive stack-then-SVD memory for these {tokens} tokens | {naive_bytes / 2**20:,.1f} MiB |")
    print(f"| naive / Gram memory | {naive_bytes / gram_bytes:,.1f}x |")
    print(f"| max relative eigenvalue error vs direct SVD | {worst:.2e} |")


if __name__ == "__main__":
    main()

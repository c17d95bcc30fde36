"""Calibration cost, measured side by side in one run on one model and one token stream.

Prints: plain forward tokens/s, calibration tokens/s (Gram recording on) and their ratio (goal >= 0.9);
peak memory of the Grams vs the naive approach that stacks every token's K and V and runs an SVD; and the
max relative eigenvalue error of the incremental Grams against that SVD.

    python benchmarks/calibration.py                      # CPU, a small Llama config
    python benchmarks/calibration.py --preset 1b --device cuda --dtype bfloat16   # ~1B Llama-3.2-like config
Random weights: speed and memory do not depend on what the weights learned.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import add_model_arguments, build_model, describe
from transformers import DynamicCache

from kvcore_eval.artifact import decompose
from kvcore_eval.gram import GramAccumulator, GramRecorder
from kvcore_eval.rope import RopeTap


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def throughput(run, batches, device) -> float:
    run(batches[0])  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for batch in batches:
        run(batch)
    synchronize(device)
    return sum(b.numel() for b in batches) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    model, geometry, device = build_model(args, max_positions=4096)
    batches = [
        torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), device=device)
        for _ in range(args.batches)
    ]

    tap = RopeTap(model)
    accumulator = GramAccumulator(geometry, device)
    recorder = GramRecorder(accumulator, tap)
    with torch.no_grad():
        plain = throughput(lambda b: model.base_model(input_ids=b, use_cache=False), batches, device)
        calibrating = throughput(
            lambda b: model.base_model(input_ids=b, cache=recorder, use_cache=True), batches, device
        )
    # The warm-up recorded batches[0] twice; for the accuracy check, record every batch exactly once.
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

    print(
        f"{describe(model, geometry, args)}; {tokens} tokens in {args.batches} batches of {args.batch_size}x{args.seq_len}"
    )
    print("| measure | value |")
    print("|---|---:|")
    print(f"| plain forward tokens/s | {plain:,.0f} |")
    print(f"| calibration tokens/s (3 Grams/layer, float64) | {calibrating:,.0f} |")
    print(f"| ratio calibration / plain (goal >= 0.9) | {calibrating / plain:.3f} |")
    print(f"| Gram memory (independent of tokens) | {gram_bytes / 2**20:,.1f} MiB |")
    print(f"| naive stack-then-SVD memory for these {tokens} tokens | {naive_bytes / 2**20:,.1f} MiB |")
    print(f"| naive / Gram memory | {naive_bytes / gram_bytes:,.1f}x |")
    print(f"| max relative eigenvalue error vs direct SVD | {worst:.2e} |")


if __name__ == "__main__":
    main()

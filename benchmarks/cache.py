"""Decode speed and cache memory: kvcore's LowRankCache (what `kvcore_hf` runs), with attention over its
reconstruction or over its latents (`attention=latent`), vs a full DynamicCache (what `hf` runs), side by side
in one run, per context length, batch size and rank.

For each setting: prefill, then greedy-decode `--new-tokens` tokens one at a time; report decode tokens/s and
the bytes the cache holds afterwards. The bases come from a calibration on random tokens (speed and memory do
not depend on their quality).

    python benchmarks/cache.py --preset smollm2                  # CPU, SmolLM2-135M (real where installed)
    python benchmarks/cache.py --preset 1b --device cuda --dtype bfloat16 --contexts 4096,16384,32768 --batch-sizes 1,8
"""

from __future__ import annotations

import argparse
import time

import torch
from common import add_model_arguments, build_model, describe
from transformers import DynamicCache

from kvcore_eval import latent
from kvcore_eval.artifact import decompose
from kvcore_eval.cache import LowRankCache, layer_bases
from kvcore_eval.gram import GramAccumulator, GramRecorder
from kvcore_eval.rank_plan import RankPlan
from kvcore_eval.rope import RopeTap


def decode(model, cache, context: torch.Tensor, new_tokens: int) -> tuple[float, int]:
    """Decode tokens/s after prefilling `context`, and the cache's bytes at the end (latent attention where the
    cache is latent: the model is switched to it for this run only)."""
    is_latent = isinstance(cache, LowRankCache) and cache.layers[0].latent
    original = model.config._attn_implementation
    model.set_attn_implementation(latent.NAME if is_latent else original)
    try:
        with latent.active(cache) if is_latent else torch.no_grad():
            return _decode(model, cache, context, new_tokens)
    finally:
        model.set_attn_implementation(original)


def _decode(model, cache, context: torch.Tensor, new_tokens: int) -> tuple[float, int]:
    with torch.no_grad():
        logits = model(input_ids=context, cache=cache, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        if context.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        if context.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    if isinstance(cache, LowRankCache):
        nbytes = sum(cache.stored_bytes().values())
    else:
        nbytes = sum(
            layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
            for layer in cache.layers
        )
    return context.shape[0] * new_tokens / elapsed, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--contexts", default="1024,4096,8192")
    parser.add_argument("--ranks", default="0.5,0.25")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    model, geometry, device = build_model(args, max_positions=32768)
    latent.register()
    vocab_size = model.config.vocab_size
    accumulator = GramAccumulator(geometry, device)
    tap = RopeTap(model)
    with torch.no_grad():
        model.base_model(
            input_ids=torch.randint(0, vocab_size, (2, 512), device=device),
            cache=GramRecorder(accumulator, tap),
            use_cache=True,
        )
    calibration = decompose(
        accumulator.grams, accumulator.token_count, geometry, {"model": {"geometry": geometry.to_dict()}}
    )

    print(f"{describe(model, geometry, args)}; {args.new_tokens} greedy tokens decoded after the context")
    print("| context | batch | cache | attention | key/value rank | decode tok/s | vs hf | cache MiB | vs hf |")
    print("|---:|---:|---|---|---:|---:|---:|---:|---:|")
    for context_len in [int(c) for c in args.contexts.split(",")]:
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            context = torch.randint(0, vocab_size, (batch, context_len), device=device)
            base_speed, base_bytes = decode(model, DynamicCache(), context, args.new_tokens)
            print(
                f"| {context_len} | {batch} | hf (DynamicCache) | {model.config._attn_implementation} | {geometry.width} | {base_speed:,.1f} | 1.00 | "
                f"{base_bytes / 2**20:,.1f} | 1.00 |",
                flush=True,
            )
            for fraction in [float(r) for r in args.ranks.split(",")]:
                rank = max(1, round(fraction * geometry.width))
                for key_space in ("post_rope", "pre_rope"):
                    plan = RankPlan(
                        [rank] * geometry.num_layers, [rank] * geometry.num_layers, geometry.width, "layer", key_space
                    )
                    bases = layer_bases(calibration, plan, device)
                    for is_latent in (False, True):
                        cache = LowRankCache(
                            bases, geometry.kv_heads, tap if key_space == "pre_rope" else None, latent=is_latent
                        )
                        speed, nbytes = decode(model, cache, context, args.new_tokens)
                        print(
                            f"| {context_len} | {batch} | kvcore_hf {key_space} | {'latent' if is_latent else 'reconstruct'} | {rank} | "
                            f"{speed:,.1f} | {speed / base_speed:.2f} | {nbytes / 2**20:,.1f} | {nbytes / base_bytes:.2f} |",
                            flush=True,
                        )


if __name__ == "__main__":
    main()

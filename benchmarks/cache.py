"""Decode speed and cache memory: kvcore's LowRankCache (what `kvcore_hf` runs), with attention over its
reconstruction or over its latents (`attention=latent`), vs a full DynamicCache (what `hf` runs), side by side
in one run, per context length, batch size and rank.

For each (context, batch): every candidate prefills its own cache once; then the candidates decode in
interleaved bursts of `--new-tokens` greedy tokens (round 1: hf, kvcore..., round 2: the reverse order, ...), so
that load on a shared machine hits them alike. Speeds are the median over rounds; each ratio to `hf` is the
median of the per-round ratios with its min-max. Bytes: what the cache holds (counted from its tensors) and, on
CUDA, what the device really allocated for it (`torch.cuda.memory_allocated` after the prefill, less before) and
the peak of the prefill and first burst (`torch.cuda.max_memory_allocated`, less before). Only the last
position's logits are computed in the prefill (`logits_to_keep=1`), as `generate` does.

Latent candidates prefill through the reconstruction path (the cache stores the same latents either way) and
decode over the latents. Quantized rows (`--bits`): the plain intN cache (basis=identity, its codes decoded on
every read) and low rank + intN (post-RoPE latents coded, read by latent attention).

The bases come from a calibration on random tokens (speed and memory do not depend on their quality).

    python benchmarks/cache.py --preset smollm2                  # CPU, SmolLM2-135M (real where installed)
    python benchmarks/cache.py --preset 1b --device cuda --dtype bfloat16 --contexts 4096,16384,32768 --batch-sizes 1,8
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from common import (
    add_model_arguments,
    add_timing_arguments,
    build_model,
    describe,
    interleave,
    paired_ratio,
    synchronize,
    timed,
)
from transformers import DynamicCache

from kvcore_eval.calibration.artifact import decompose
from kvcore_eval.calibration.gram import GramAccumulator, GramRecorder
from kvcore_eval.compression import latent
from kvcore_eval.compression.cache import LayerBases, LowRankCache, layer_bases
from kvcore_eval.compression.quantize import Codec
from kvcore_eval.compression.rank_plan import RankPlan
from kvcore_eval.model.rope import RopeTap


@dataclass
class Candidate:
    """One cache under test, prefilled once; `token` is its next input (batch, 1)."""

    name: str
    attention: str
    rank: int
    cache: object
    is_latent: bool = False
    token: torch.Tensor | None = None
    device_bytes: int = 0  # allocated on the device by the prefill and kept (CUDA only)
    peak_bytes: int = 0  # peak allocation of the prefill above what was allocated before it (CUDA only)

    @property
    def label(self) -> str:
        return f"{self.name} | {self.attention} | {self.rank}"


def cache_bytes(cache) -> int:
    if isinstance(cache, LowRankCache):
        return sum(cache.stored_bytes().values())
    return sum(
        layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        for layer in cache.layers
    )


def prefill(model, candidate: Candidate, context: torch.Tensor, implementation: str, device: torch.device) -> None:
    """Fill the candidate's cache with `context` through the model's own attention (a latent cache's update returns
    the reconstruction meanwhile: it stores the same latents either way); keep the next token."""
    cuda = device.type == "cuda"
    if cuda:
        synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    layers = candidate.cache.layers if candidate.is_latent else []
    for layer in layers:
        layer.latent = False
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        logits = model(input_ids=context, cache=candidate.cache, use_cache=True, logits_to_keep=1).logits
    candidate.token = logits[:, -1:].argmax(-1)  # (batch, 1)
    del logits
    for layer in layers:  # from now on update returns the latents, which latent attention reads
        layer.latent = True
    if cuda:
        synchronize(device)
        candidate.device_bytes = torch.cuda.memory_allocated(device) - start
        candidate.peak_bytes = torch.cuda.max_memory_allocated(device) - start


def burst(model, candidate: Candidate, new_tokens: int, implementation: str, device: torch.device) -> float:
    """Decode `new_tokens` greedy tokens one at a time; tokens/s over the batch."""
    model.set_attn_implementation(latent.NAME if candidate.is_latent else implementation)

    def steps() -> None:
        with torch.no_grad(), latent.active(candidate.cache) if candidate.is_latent else torch.no_grad():
            token = candidate.token
            for _ in range(new_tokens):
                token = model(input_ids=token, cache=candidate.cache, use_cache=True).logits[:, -1:].argmax(-1)
            candidate.token = token

    return candidate.token.shape[0] * new_tokens / timed(steps, device)


def candidates_for(
    calibration, geometry, tap, ranks: list[float], key_spaces: list[str], device, bits: list[int], dtype
) -> list[Candidate]:
    """hf; per rank and key space, kvcore_hf over the reconstruction and over the latents; per `bits`, the plain
    quantized cache (basis=identity, latent_bits=N: codes decoded on every read) and, per rank, low rank + intN
    (post-RoPE latent: the codes of the latents)."""
    found = [Candidate("hf (DynamicCache)", "model's own", geometry.width, DynamicCache())]
    uniform = lambda rank, key_space: RankPlan(  # noqa: E731
        [rank] * geometry.num_layers, [rank] * geometry.num_layers, geometry.width, "layer", key_space
    )
    for fraction in ranks:
        rank = max(1, round(fraction * geometry.width))
        for key_space in key_spaces:
            bases = layer_bases(calibration, uniform(rank, key_space), device)
            for is_latent in (False, True):
                cache = LowRankCache(bases, geometry.kv_heads, tap if key_space == "pre_rope" else None)
                found.append(
                    Candidate(
                        f"kvcore_hf {key_space}", "latent" if is_latent else "reconstruct", rank, cache, is_latent
                    )
                )
    for n in bits:
        codec = Codec(n, dtype, "absmax")
        full = [LayerBases(None, None)] * geometry.num_layers  # basis=identity: the states as they are, coded
        found.append(
            Candidate(
                f"kvcore_hf int{n}", "reconstruct", geometry.width, LowRankCache(full, geometry.kv_heads, codec=codec)
            )
        )
        for fraction in ranks:
            rank = max(1, round(fraction * geometry.width))
            bases = layer_bases(calibration, uniform(rank, "post_rope"), device)
            cache = LowRankCache(bases, geometry.kv_heads, latent=True, codec=codec)
            found.append(Candidate(f"kvcore_hf low rank + int{n} post_rope", "latent", rank, cache, True))
    return found


def measure(model, make_candidates: Callable[[], list[Candidate]], context, args, device) -> list[tuple]:
    implementation = model.config._attn_implementation
    candidates = make_candidates()
    for candidate in candidates:
        prefill(model, candidate, context, implementation, device)
    bursts = {c.label: (lambda c=c: burst(model, c, args.new_tokens, implementation, device)) for c in candidates}
    speeds = interleave(bursts, args.rounds, warmup=False)  # the prefill was the warm-up
    model.set_attn_implementation(implementation)
    base_speed = speeds[candidates[0].label]
    return [
        (c, statistics.median(speeds[c.label]), paired_ratio(speeds[c.label], base_speed), cache_bytes(c.cache))
        for c in candidates
    ]


def build_parser() -> argparse.ArgumentParser:
    """The command line (the docs test parses the commands the docs show with it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--contexts", default="1024,4096,8192")
    parser.add_argument("--ranks", default="0.5,0.25", help="fractions of D")
    parser.add_argument("--key-spaces", default="post_rope,pre_rope")
    parser.add_argument(
        "--bits", default="8,4", help="quantized rows: intN (basis=identity) and low rank + intN; empty for none"
    )
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=8, help="greedy tokens per candidate per round")
    add_timing_arguments(parser, rounds=5)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    model, geometry, device = build_model(args, max_positions=max(contexts) + args.new_tokens * (args.rounds + 1))
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
    ranks = [float(r) for r in args.ranks.split(",")]
    key_spaces = [k for k in args.key_spaces.split(",") if k]
    bits = [int(b) for b in args.bits.split(",") if b]
    cuda = device.type == "cuda"

    print(
        f"{describe(model, geometry, args)}; {args.rounds} interleaved rounds of {args.new_tokens} greedy tokens "
        "per candidate after the context; decode tok/s: median over rounds; vs hf: median (min-max) of per-round "
        "ratios"
    )
    device_columns = " device MiB | prefill peak MiB |" if cuda else ""
    header = "| context | batch | cache | attention | key/value rank | decode tok/s | vs hf | cache MiB | vs hf |"
    print(header + device_columns)
    print("|---:|---:|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if cuda else ""))
    for context_len in contexts:
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            context = torch.randint(0, vocab_size, (batch, context_len), device=device)
            make = lambda: candidates_for(  # noqa: E731
                calibration, geometry, tap, ranks, key_spaces, device, bits, model.dtype
            )
            rows = measure(model, make, context, args, device)
            base_bytes = rows[0][3]
            for c, speed, ratio, nbytes in rows:
                line = (
                    f"| {context_len} | {batch} | {c.label} | {speed:,.1f} | {ratio} | "
                    f"{nbytes / 2**20:,.1f} | {nbytes / base_bytes:.2f} |"
                )
                if cuda:
                    line += f" {c.device_bytes / 2**20:,.1f} | {c.peak_bytes / 2**20:,.1f} |"
                print(line, flush=True)
            del rows
            if cuda:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

"""Run-time proof that the pre-RoPE key kvcore-eval derives is the key the model computes.

Families differ in where RoPE is applied, which dimensions it pairs and where its tables come from; a wrong
guess gives plausible, silently wrong spectra. So before a calibration or an evaluation trusts its pre-RoPE
keys, `check_key_recovery` runs one short, left-padded batch through the model, captures every layer's true
pre-RoPE key with a forward hook on the module that produces it (`k_norm` where the model has one, else
`k_proj`, else the key slice of a fused qkv projection), and compares it with what kvcore-eval recovers
from the cached post-RoPE key and the rotary tables `RopeTap` captured. Agreement to float round-off, or a
`ValueError` that names the family and what failed. There is no fallback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from kvcore_eval.model.models import kv_geometry
from kvcore_eval.model.rope import RopeTap, pre_rope_keys

logger = logging.getLogger(__name__)

# Relative Frobenius error allowed between the true and the derived pre-RoPE key, by the model's dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 3e-2, torch.float16: 1e-2}
PROBE_ROWS = 2  # the second left-padded, as batched generation feeds it
PROBE_LENGTH = 13  # tokens per probe row; chosen to differ from usual head counts so layouts are unambiguous


@dataclass(frozen=True)
class KeySource:
    """Where one layer's true pre-RoPE key comes out: a module and how to cut the key from its output."""

    name: str
    module: nn.Module
    extract: Callable[[torch.Tensor, int, int], torch.Tensor]  # (output, batch, seq) -> (batch, seq, D)


def _key_source(attention: nn.Module, config, kv_heads: int, width: int) -> KeySource | None:
    text = config.get_text_config(decoder=True)

    def tokens_first(out: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
        if out.ndim == 4 and out.shape[1] == kv_heads and out.shape[2] == seq:  # (batch, heads, seq, head_dim)
            out = out.transpose(1, 2)
        return out.reshape(batch, seq, -1)

    if isinstance(getattr(attention, "k_norm", None), nn.Module):
        return KeySource("k_norm", attention.k_norm, tokens_first)
    if isinstance(getattr(attention, "k_proj", None), nn.Module):
        return KeySource("k_proj", attention.k_proj, tokens_first)
    if isinstance(getattr(attention, "qkv_proj", None), nn.Module):  # Phi-3: [q | k | v]
        q_size = text.num_attention_heads * (width // kv_heads)
        return KeySource("qkv_proj", attention.qkv_proj, lambda out, b, s: out[..., q_size : q_size + width])
    if isinstance(getattr(attention, "query_key_value", None), nn.Module):  # GPT-NeoX: per head [q | k | v]
        head_dim = width // kv_heads
        return KeySource(
            "query_key_value",
            attention.query_key_value,
            lambda out, b, s: out.view(b, s, kv_heads, 3 * head_dim)[..., head_dim : 2 * head_dim].reshape(b, s, width),
        )
    if isinstance(getattr(attention, "c_attn", None), nn.Module):  # GPT-2: [q | k | v]
        return KeySource("c_attn", attention.c_attn, lambda out, b, s: out[..., width : 2 * width])
    return None


class _ProbeLayer(DynamicLayer):
    """Stores nothing; records the derived pre-RoPE key of each update."""

    def __init__(self, derived: dict[int, torch.Tensor], layer_idx: int, tap: RopeTap):
        super().__init__()
        self.derived, self.layer_idx, self.tap = derived, layer_idx, tap

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.derived[self.layer_idx] = pre_rope_keys(key_states, self.layer_idx, self.tap)
        return key_states, value_states


def probe_batch(vocab_size: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows, the second left-padded by 4, as batched generation feeds them: input_ids, attention_mask,
    position_ids (batch, PROBE_LENGTH). Token ids are seeded and avoid the first ids (often special tokens)."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(min(3, vocab_size - 1), vocab_size, (PROBE_ROWS, PROBE_LENGTH), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), attention_mask.to(device), position_ids.to(device)


def run_probe(model: nn.Module, layers: list[DynamicLayer], hooks: list[tuple[nn.Module, Callable]]) -> None:
    """One forward of the probe batch through the model's base with a cache of `layers` (which record what they
    are handed), with each (module, forward hook) of `hooks` registered for it alone: removed whatever happens."""
    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_hook(hook))
        input_ids, attention_mask, position_ids = probe_batch(
            model.config.get_text_config(decoder=True).vocab_size, model.device
        )
        with torch.no_grad():
            model.base_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=Cache(layers=layers),
                use_cache=True,
            )
    finally:
        for handle in handles:
            handle.remove()


def check_key_recovery(model: nn.Module, tap: RopeTap) -> dict[int, float]:
    """Compare, per layer, the true pre-RoPE key with the derived one; returns the relative errors.
    Raises ValueError naming the family and the failure when any layer disagrees."""
    config = model.config
    family = getattr(config, "model_type", type(model).__name__)
    geometry = kv_geometry(config)
    sources = {
        layer: _key_source(attention, config, geometry.kv_heads, geometry.width)
        for layer, attention in tap.layers.items()
    }
    if missing := [layer for layer, source in sources.items() if source is None]:
        raise ValueError(
            f"{family}: kvcore-eval cannot find the module that computes the pre-RoPE key of layers {missing} "
            "(none of k_norm, k_proj, qkv_proj, query_key_value, c_attn), so it cannot verify its keys: "
            "this family is not supported"
        )
    batch, seq = PROBE_ROWS, PROBE_LENGTH
    truth: dict[int, torch.Tensor] = {}
    derived: dict[int, torch.Tensor] = {}
    hooks = [(source.module, _keep(truth, layer, source, batch, seq)) for layer, source in sources.items()]
    run_probe(model, [_ProbeLayer(derived, layer, tap) for layer in range(geometry.num_layers)], hooks)
    tolerance = TOLERANCE.get(model.dtype, 3e-2)
    errors = {}
    for layer, _source in sources.items():
        if layer not in derived:
            raise ValueError(
                f"{family}: layer {layer} never passed its keys through transformers' Cache.update: not supported"
            )
        got = derived[layer].transpose(1, 2).reshape(batch, seq, -1)  # (batch, seq, D)
        expected = truth[layer].float()
        errors[layer] = float((got - expected).norm() / expected.norm().clamp_min(1e-30))
    worst = max(errors, key=errors.get)
    if errors[worst] > tolerance:
        what = (
            f"RoPE undone with the {'interleaved' if tap.convention.interleaved else 'rotate-half'} convention"
            if tap.has_rope
            else "the cached key taken as the pre-RoPE key (no attention module takes position_embeddings)"
        )
        raise ValueError(
            f"{family}: the pre-RoPE key kvcore-eval derives ({what}) differs from the model's own "
            f"{sources[worst].name} output by {errors[worst]:.2%} at layer {worst} (tolerance {tolerance:.0e}): this "
            f"family's RoPE is not supported, and its pre-RoPE numbers would be wrong. Use key_space=post_rope for "
            "evaluation, or report the family"
        )
    logger.info(
        "self-check: pre-RoPE keys of %s recovered in %d layers (max relative error %.1e)",
        family,
        len(errors),
        errors[worst],
    )
    return errors


def _keep(truth: dict[int, torch.Tensor], layer: int, source: KeySource, batch: int, seq: int):
    def hook(module, args, output) -> None:
        truth[layer] = source.extract(output, batch, seq).detach()

    return hook

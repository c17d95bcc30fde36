"""Latent attention: attend over the cache's rank-r latents without rebuilding D-wide keys and values.

With P (D × r) a layer's basis and P_h (head_dim × r) the rows of KV head h, the cache stores Z = X·P (r numbers a
token, shared by every head). Then, for a query head h reading KV head g(h):
  values:           softmax(s)·(Z_v·P_gᵀ) = (softmax(s)·Z_v)·P_gᵀ      attend over Z_v, map back once per query
  post-RoPE keys:   q·(Z_k·P_gᵀ)ᵀ        = (q·P_g)·Z_kᵀ              project the query once, score against Z_k
(head granularity: the same with each head's own basis and latents). Pre-RoPE keys cannot be absorbed (RoPE
depends on each key's position): they are reconstructed and rotated as in `LowRankLayer.read_keys`, while their
values still stay latent. Decoding then reads r numbers a token instead of D. Both run as one fused
`scaled_dot_product_attention` over the latents (grouped heads: `enable_gqa`), so no (q_len, kv_len) score matrix
is materialized in Python, at prefill as at decode.

Nothing quadratic in the prompt's length is built where attention is purely causal: `register()` gives `kvcore_latent`
transformers' SDPA masks, which are None for a prefill without padding (SDPA then gets `is_causal=True`) and boolean
(batch, 1, q_len, kv_len) only where padding must be masked, as the model's own `sdpa` path. Query, key and value
latents of a prefill are zero-padded to one width (a multiple of 8) before the call: SDPA's fused kernels need equal
head dims, and with unequal ones it falls back to its math kernel, which materializes (batch, heads, q_len, kv_len)
scores (4.9 GiB for 8 heads at 8k tokens on the CPU). Zero columns add nothing to q·k, and the value's are sliced off
the output. A decode step (q_len 1) has linear scores and is not padded.

Transformers hands attention functions no cache, so the wrapper names the active `LowRankCache` in a context
variable around each forward (`active`). `register()` adds `kvcore_latent` to transformers' AttentionInterface;
it is called by the wrapper, never at import. Softcapping, attention sinks and dropout
are refused, and the wrapper checks at load that latent and reconstruction logits agree on the model itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import nn

from kvcore_eval.compression.cache import LowRankCache, LowRankLayer
from kvcore_eval.model.selfcheck import TOLERANCE, probe_batch

NAME = "kvcore_latent"
_ACTIVE: ContextVar[LowRankCache | None] = ContextVar("kvcore_active_cache", default=None)


@contextlib.contextmanager
def active(cache: LowRankCache) -> Iterator[None]:
    """Make `cache` the one latent attention reads during the forwards (or the generate) in this block."""
    token = _ACTIVE.set(cache)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def register() -> None:
    """Add `kvcore_latent` to transformers' attention and mask interfaces (idempotent), with SDPA's masks: None
    where the causal flag suffices, else boolean."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, latent_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def _per_query_head(basis: torch.Tensor, kv_heads: int, query_heads: int) -> torch.Tensor:
    """(D, r) layer basis or (kv_heads, head_dim, r) head bases -> (query_heads, head_dim, r), one per query head."""
    if basis.ndim == 2:
        basis = basis.reshape(kv_heads, -1, basis.shape[-1])
    return basis.repeat_interleave(query_heads // kv_heads, dim=0)


def _keys(query: torch.Tensor, layer: LowRankLayer, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query, keys) whose products are q·Kᵀ: post-RoPE latent keys pair q·P_g (batch, query_heads, q_len, r) with
    Z_k (batch, 1 or kv_heads, kv_len, r); keys stored in full or pre-RoPE (their rotation depends on the position)
    pair the query itself with the rebuilt keys (batch, kv_heads, kv_len, head_dim)."""
    basis = layer.fixed_basis("key")
    if basis is None or layer.rope is not None:
        return query, layer.read_keys(query.dtype)
    projected = torch.einsum("bhqd,hdr->bhqr", query, _per_query_head(basis, kv_heads, query.shape[1]).to(query.dtype))
    return projected, _heads_first(layer.stored("key", query.dtype).to(query.dtype))


def _heads_first(latents: torch.Tensor) -> torch.Tensor:
    """Layer-basis latents (batch, kv_len, r), shared by every head, as one KV head (batch, 1, kv_len, r); head-basis
    latents (batch, kv_heads, kv_len, r) as they are."""
    return latents.unsqueeze(1) if latents.ndim == 3 else latents


def latent_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """An AttentionInterface function. query: (batch, heads, q_len, head_dim); `key`/`value` (what the cache's
    update returned) are not read: the active cache's latents are. Returns (batch, q_len, heads, head_dim).

    One fused `scaled_dot_product_attention` over the latents (no (q_len, kv_len) score matrix is built in Python):
    softmax(scaling·(q·P_g)·Z_kᵀ + mask)·Z_v, then ·P_gᵀ per query head; the scale stays head_dim's."""
    cache = _ACTIVE.get()
    if cache is None:
        raise RuntimeError(
            "kvcore_latent attention ran outside `latent.active(cache)`: only kvcore_hf's forwards can use it"
        )
    unsupported = [name for name in ("softcap", "s_aux", "sinks") if kwargs.get(name) is not None] + (
        ["dropout"] if dropout else []
    )
    if unsupported:
        raise ValueError(
            f"kvcore_latent attention does not implement {', '.join(unsupported)} (used by this model): "
            "use attention=reconstruct"
        )
    layer, kv_heads, heads = cache.layers[module.layer_idx], cache.kv_heads, query.shape[1]
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    query, keys = _keys(query, layer, kv_heads)
    value_basis = layer.fixed_basis("value")
    values = layer.stored("value", query.dtype).to(query.dtype)
    values = _heads_first(values) if value_basis is not None else values  # latents, or (batch, kv_heads, kv_len, hd)
    if keys.shape[1] != values.shape[1]:  # one latent head on one side, kv_heads on the other: a view, no copy
        shared = max(keys.shape[1], values.shape[1])
        keys, values = (t.expand(-1, shared, -1, -1) for t in (keys, values))
    context = fused_attention(query, keys, values, attention_mask, scaling, getattr(module, "is_causal", True))
    if value_basis is not None:
        context = torch.einsum("bhqr,hdr->bhqd", context, _per_query_head(value_basis, kv_heads, heads).to(query.dtype))
    return context.transpose(1, 2).contiguous(), None


def _one_width(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Zero-pad the last dim of each to the widest's, rounded up to a multiple of 8 (what SDPA's fused kernels take)."""
    width = -(-max(t.shape[-1] for t in tensors) // 8) * 8
    return tuple(t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in tensors)


def fused_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    causal: bool = True,
) -> torch.Tensor:
    """softmax(scaling·q·kᵀ + mask)·v through SDPA's fused kernels: (batch, heads, q_len, values' width).

    query (batch, heads, q_len, w_q), keys (batch, kv_heads, kv_len, w_q), values (batch, kv_heads, kv_len, w_v);
    `attention_mask` is transformers' SDPA mask: None where the attention is purely causal (a prefill: SDPA's
    `is_causal`, upper-left aligned, exact where q_len == kv_len; decode: no mask), else boolean, True where a query
    reads a key."""
    q_len, kv_len, value_width = query.shape[-2], keys.shape[-2], values.shape[-1]
    is_causal = causal and attention_mask is None and q_len > 1
    if is_causal and kv_len > q_len:  # what transformers' sdpa does: only a cache's unfilled tail lies past q_len
        keys, values = keys[..., :q_len, :], values[..., :q_len, :]
    mask = None if attention_mask is None else attention_mask[..., :kv_len]
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(query.dtype)
    if q_len > 1:  # a decode step's scores are (batch, heads, 1, kv_len): any kernel, no padded copy of the cache
        query, keys, values = _one_width(query, keys, values)
    context = torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, scale=scaling, is_causal=is_causal, enable_gqa=True
    )
    return context[..., :value_width]


def check_against_reconstruction(model: nn.Module, new_cache, reconstruct_implementation: str) -> float:
    """Logits of the probe batch with latent attention vs with the reconstruction path (`new_cache(latent)` makes
    each cache); returns the relative error, or raises where they disagree beyond float round-off."""
    input_ids, attention_mask, position_ids = probe_batch(
        model.config.get_text_config(decoder=True).vocab_size, model.device
    )
    logits = {}
    for is_latent in (False, True):
        model.set_attn_implementation(NAME if is_latent else reconstruct_implementation)
        cache = new_cache(is_latent)
        with torch.no_grad(), active(cache):
            logits[is_latent] = (
                model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    cache=cache,
                    use_cache=True,
                )
                .logits[attention_mask.bool()]
                .float()
            )
    error = float((logits[True] - logits[False]).norm() / logits[False].norm())
    tolerance = TOLERANCE.get(model.dtype, 3e-2)
    if error > tolerance:
        model.set_attn_implementation(reconstruct_implementation)
        raise ValueError(
            f"{model.config.model_type}: latent attention differs from the reconstruction path by {error:.2%} "
            f"(tolerance {tolerance:.0e}): this family's attention is not supported latent; use attention=reconstruct"
        )
    return error

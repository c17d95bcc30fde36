"""Latent attention: attend over the cache's rank-r latents without rebuilding D-wide keys and values.

With P (D × r) a layer's basis and P_h (head_dim × r) the rows of KV head h, the cache stores Z = X·P (r numbers a
token, shared by every head). Then, for a query head h reading KV head g(h):
  values:           softmax(s)·(Z_v·P_gᵀ) = (softmax(s)·Z_v)·P_gᵀ      attend over Z_v, map back once per query
  post-RoPE keys:   q·(Z_k·P_gᵀ)ᵀ        = (q·P_g)·Z_kᵀ              project the query once, score against Z_k
(head granularity: the same with each head's own basis and latents). Pre-RoPE keys cannot be absorbed (RoPE
depends on each key's position): they are reconstructed and rotated as in `LowRankLayer.read_keys`, while their
values still stay latent. Decoding then reads r numbers a token instead of D.

Transformers hands attention functions no cache, so the wrapper names the active `LowRankCache` in a context
variable around each forward (`active`). `register()` adds `kvcore_latent` to transformers' AttentionInterface
(with eager-style masks); it is called by the wrapper, never at import. Softcapping, attention sinks and dropout
are refused, and the wrapper checks at load that latent and reconstruction logits agree on the model itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import nn

from kvcore_eval.cache import LowRankCache, LowRankLayer

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
    """Add `kvcore_latent` to transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, latent_attention)
    AttentionMaskInterface.register(NAME, eager_mask)


def _per_query_head(basis: torch.Tensor, kv_heads: int, query_heads: int) -> torch.Tensor:
    """(D, r) layer basis or (kv_heads, head_dim, r) head bases -> (query_heads, head_dim, r), one per query head."""
    if basis.ndim == 2:
        basis = basis.reshape(kv_heads, -1, basis.shape[-1])
    return basis.repeat_interleave(query_heads // kv_heads, dim=0)


def _scores(query: torch.Tensor, layer: LowRankLayer, kv_heads: int) -> torch.Tensor:
    """q·Kᵀ for every query head: (batch, query_heads, q_len, kv_len). query: (batch, query_heads, q_len, head_dim)."""
    heads = query.shape[1]
    basis = layer.bases.key
    if basis is None or layer.rope is not None:  # stored in full, or pre-RoPE (its rotation depends on the position)
        keys = layer.read_keys(query.dtype).repeat_interleave(
            heads // kv_heads, dim=1
        )  # (batch, heads, kv_len, head_dim)
        return query @ keys.transpose(-1, -2)
    projected = torch.einsum("bhqd,hdr->bhqr", query, _per_query_head(basis, kv_heads, heads).to(query.dtype))
    latents = layer.stored("key", query.dtype).to(query.dtype)
    if basis.ndim == 2:  # (batch, kv_len, r), shared by every head
        return torch.einsum("bhqr,bsr->bhqs", projected, latents)
    return projected @ latents.repeat_interleave(heads // kv_heads, dim=1).transpose(-1, -2)


def _context(probs: torch.Tensor, layer: LowRankLayer, kv_heads: int) -> torch.Tensor:
    """softmax(s)·V for every query head: (batch, query_heads, q_len, head_dim).
    probs: (batch, heads, q_len, kv_len)."""
    heads = probs.shape[1]
    basis = layer.bases.value
    if basis is None:
        return probs @ layer.stored("value", probs.dtype).to(probs.dtype).repeat_interleave(heads // kv_heads, dim=1)
    latents = layer.stored("value", probs.dtype).to(probs.dtype)
    if basis.ndim == 2:
        mixed = torch.einsum("bhqs,bsr->bhqr", probs, latents)
    else:
        mixed = probs @ latents.repeat_interleave(heads // kv_heads, dim=1)
    return torch.einsum("bhqr,hdr->bhqd", mixed, _per_query_head(basis, kv_heads, heads).to(probs.dtype))


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
    update returned) are not read: the active cache's latents are. Returns (batch, q_len, heads, head_dim)."""
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
    layer = cache.layers[module.layer_idx]
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = _scores(query, layer, cache.kv_heads).float() * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : scores.shape[-1]].float()
    probs = torch.softmax(scores, dim=-1).to(query.dtype)
    return _context(probs, layer, cache.kv_heads).transpose(1, 2).contiguous(), None


def check_against_reconstruction(model: nn.Module, new_cache, reconstruct_implementation: str) -> float:
    """Logits of the probe batch with latent attention vs with the reconstruction path (`new_cache(latent)` makes
    each cache); returns the relative error, or raises where they disagree beyond float round-off."""
    from kvcore_eval.selfcheck import TOLERANCE, probe_batch

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

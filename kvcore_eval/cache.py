"""A KV cache that stores rank-r projections of keys and values: the one module that knows cache internals.

`LowRankLayer` is a `DynamicLayer` whose `update` projects the new keys and values onto the calibrated
right singular vectors P_r and stores the latents K·P_r (r numbers per token instead of D), then returns
the reconstruction K·P_r·P_rᵀ of everything cached to attention. Every attention call goes through
`update`, so a one-shot scoring forward and each generation step attend to the same rank-r keys and values.

Memory really shrinks (the stored tensors are the latents). With `latent=True` (`kvcore_eval.latent`) the
update stores the same and returns without reconstructing, and attention reads the latents directly; otherwise
attention gets the reconstruction, a matmul per layer per step.

pre_rope keys (the paper's K = X·W_k): the cache undoes RoPE on the new keys with the tables the layer
itself applied (`rope.RopeTap`), projects and stores the latent; on return it reconstructs and re-applies
RoPE with the tables kept for every cached token. Keeping the applied tables, rather than recomputing them
from positions, makes a full-rank cache hold exactly what the model's own cache holds, also under dynamic
or longrope scaling, where frequencies change with the length. One history of tables per rotary group
(layers that receive the same tables) serves all its layers. This equals folding P_r·P_rᵀ into W_k (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from kvcore_eval.artifact import Calibration
from kvcore_eval.rank_plan import RankPlan
from kvcore_eval.rope import RopeTap, RotaryTables, rotate, unrotate
from kvcore_eval.spaces import KEY_SPACES


@dataclass(frozen=True)
class LayerBases:
    """Orthonormal bases of one layer: (D, r) for granularity=layer, (kv_heads, head_dim, r) for head; None: stored in full."""

    key: torch.Tensor | None
    value: torch.Tensor | None


def project(states: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """(batch, kv_heads, seq, head_dim) -> latent (batch, seq, r) [layer basis] or (batch, kv_heads, seq, r) [head bases]."""
    states = states.to(basis.dtype)
    if basis.ndim == 2:
        batch, kv_heads, seq, head_dim = states.shape
        return states.transpose(1, 2).reshape(batch, seq, kv_heads * head_dim) @ basis
    return torch.einsum("bhsd,hdr->bhsr", states, basis)


def reconstruct(latent: torch.Tensor, basis: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Inverse of `project` up to the dropped directions: latent -> (batch, kv_heads, seq, head_dim)."""
    latent = latent.to(basis.dtype)
    if basis.ndim == 2:
        batch, seq, _ = latent.shape
        return (latent @ basis.T).reshape(batch, seq, kv_heads, -1).transpose(1, 2)
    return torch.einsum("bhsr,hdr->bhsd", latent, basis)


class RopeHistory:
    """The rotary tables applied to every cached token, per rotary group: cos, sin (batch, seq, rotary_dim)."""

    def __init__(self, tap: RopeTap):
        self.tap = tap
        self.groups: dict[int, RotaryTables] = {}

    def extend(self, layer_idx: int, length: int) -> tuple[int, RotaryTables]:
        """The group of `layer_idx` and its new tokens' tables; the group's history grows to `length` tokens
        (the first layer of the group in a forward appends, the others find it done)."""
        tables, group = self.tap.tables(layer_idx), self.tap.group_of(layer_idx)
        kept = self.groups.get(group)
        kept_length = 0 if kept is None else kept.cos.shape[-2]
        if kept_length < length:
            if kept is not None:  # rows share one table while their positions agree (batch 1); widen when they part
                batch = max(kept.cos.shape[0], tables.cos.shape[0])
                kept, tables = _widen(kept, batch), _widen(tables, batch)
            cos = tables.cos if kept is None else torch.cat([kept.cos, tables.cos], dim=-2)
            sin = tables.sin if kept is None else torch.cat([kept.sin, tables.sin], dim=-2)
            self.groups[group] = RotaryTables(cos, sin, tables.interleaved)
        return group, tables

    def edit(self, change: Callable[[torch.Tensor], torch.Tensor], batch_edit: bool = True) -> None:
        """Apply a batch or length edit of the cache to every kept table (a shared batch-1 table needs no batch edit)."""
        self.groups = {
            group: t
            if batch_edit and t.cos.shape[0] == 1
            else RotaryTables(change(t.cos), change(t.sin), t.interleaved)
            for group, t in self.groups.items()
        }

    def stored_bytes(self) -> int:
        return sum(
            t.cos.numel() * t.cos.element_size() + t.sin.numel() * t.sin.element_size() for t in self.groups.values()
        )


def _widen(tables: RotaryTables, batch: int) -> RotaryTables:
    if tables.cos.shape[0] == batch:
        return tables
    return RotaryTables(tables.cos.expand(batch, -1, -1), tables.sin.expand(batch, -1, -1), tables.interleaved)


class LowRankLayer(DynamicLayer):
    """Stores latents K·P_r and V·P_r; returns their reconstructions (post-RoPE keys, as attention expects)."""

    def __init__(
        self, bases: LayerBases, kv_heads: int, layer_idx: int, rope: RopeHistory | None = None, latent: bool = False
    ):
        super().__init__()
        self.latent = latent  # attention reads the latents itself: update returns them as stored
        self.bases = bases
        self.kv_heads = kv_heads
        self.layer_idx = layer_idx
        # Only truncated pre-RoPE keys need RoPE undone and redone.
        self.rope = rope if bases.key is not None else None
        self.rope_group: int | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: (batch, kv_heads, new_seq, head_dim), keys after RoPE
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new_keys = key_states
        if self.rope is not None:
            self.rope_group, tables = self.rope.extend(self.layer_idx, self.get_seq_length() + key_states.shape[-2])
            new_keys = unrotate(key_states.float(), tables)
        if self.bases.key is not None:
            new_keys = project(new_keys, self.bases.key).to(key_states.dtype)
        new_values = (
            value_states if self.bases.value is None else project(value_states, self.bases.value).to(value_states.dtype)
        )
        self.keys = torch.cat([self.keys, new_keys], dim=-2)
        self.values = torch.cat([self.values, new_values], dim=-2)
        if self.latent:
            return self.keys, self.values
        return self.read_keys(key_states.dtype), self.read_values(value_states.dtype)

    def read_keys(self, dtype: torch.dtype) -> torch.Tensor:
        """All cached keys as attention sees them: (batch, kv_heads, seq, head_dim), after RoPE."""
        if self.bases.key is None:
            return self.keys
        keys = reconstruct(self.keys, self.bases.key, self.kv_heads)
        if self.rope is not None:
            keys = rotate(keys, self.rope.groups[self.rope_group])
        return keys.to(dtype)

    def read_values(self, dtype: torch.dtype) -> torch.Tensor:
        if self.bases.value is None:
            return self.values
        return reconstruct(self.values, self.bases.value, self.kv_heads).to(dtype)

    def stored_bytes(self) -> dict[str, int]:
        if not self.is_initialized:
            return {"keys": 0, "values": 0}
        return {
            "keys": self.keys.numel() * self.keys.element_size(),
            "values": self.values.numel() * self.values.element_size(),
        }


class LowRankCache(Cache):
    """One `LowRankLayer` per decoder layer. Pass as `cache=` to a forward or to `generate`.

    `tap` (pre_rope truncation of a RoPE model) supplies the tables each layer applied; the cache keeps them.
    `latent`: attention reads the latents (`kvcore_eval.latent`), nothing is reconstructed on update."""

    def __init__(self, bases: list[LayerBases], kv_heads: int, tap: RopeTap | None = None, latent: bool = False):
        self.rope = RopeHistory(tap) if tap is not None and tap.has_rope else None
        self.kv_heads = kv_heads
        super().__init__(
            layers=[
                LowRankLayer(layer_bases, kv_heads, idx, self.rope, latent) for idx, layer_bases in enumerate(bases)
            ]
        )

    def stored_bytes(self) -> dict[str, int]:
        """Bytes held: keys and values summed over layers, and the rotary tables of pre-RoPE truncation."""
        totals = {"keys": 0, "values": 0, "rope_tables": 0 if self.rope is None else self.rope.stored_bytes()}
        for layer in self.layers:
            for name, size in layer.stored_bytes().items():
                totals[name] += size
        return totals

    # Batch and length edits keep the rotary tables in step with the latents.
    def reset(self) -> None:
        super().reset()
        if self.rope is not None:
            self.rope.groups.clear()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.rope is not None and tokens_to_remove < 0:
            self.rope.edit(lambda t: t[:, :tokens_to_remove], batch_edit=False)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.rope is not None:
            self.rope.edit(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.rope is not None:
            self.rope.edit(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.rope is not None:
            self.rope.edit(lambda t: t.index_select(0, beam_idx.to(t.device)))


def layer_bases(calibration: Calibration, plan: RankPlan, device: torch.device | str = "cpu") -> list[LayerBases]:
    """The plan's top-r right singular vectors per layer, float32 on `device`; full rank means stored in full."""
    key_space = KEY_SPACES[plan.key_space]

    def basis(space: str, layer: int, rank: int) -> torch.Tensor | None:
        if rank >= plan.width:
            return None
        return calibration.basis(space, layer, rank, plan.granularity).to(device, torch.float32).contiguous()

    num_layers = calibration.geometry.num_layers
    key_ranks = plan.key_rank_per_layer or [plan.width] * num_layers
    value_ranks = plan.value_rank_per_layer or [plan.width] * num_layers
    return [
        LayerBases(basis(key_space, layer, key_ranks[layer]), basis("value", layer, value_ranks[layer]))
        for layer in range(num_layers)
    ]


def cache_bytes_per_token(
    plan: RankPlan, kv_heads: int, num_layers: int, element_size: int, rope_table_bytes: int = 0
) -> dict[str, float]:
    """Bytes one token costs in the low-rank cache and in a full cache of every layer, and their ratio.

    Mirrors `LowRankCache`: a rank below the width stores r numbers per basis, else the full width; truncated
    pre-RoPE keys also keep the rotary tables applied to each token (`rope_table_bytes` per token, once per
    rotary group, not per layer)."""
    per_basis = 1 if plan.granularity == "layer" else kv_heads  # head granularity stores r per head
    full_width = plan.width * per_basis
    key_ranks = plan.key_rank_per_layer or [plan.width] * num_layers
    keys = sum(r * per_basis for r in key_ranks)
    values = sum(r * per_basis for r in (plan.value_rank_per_layer or [plan.width] * num_layers))
    truncates_pre_rope = plan.key_space == "pre_rope" and any(r < plan.width for r in key_ranks)
    low_rank = (keys + values) * element_size + (rope_table_bytes if truncates_pre_rope else 0)
    full = 2 * num_layers * full_width * element_size
    return {"low_rank": float(low_rank), "full": float(full), "ratio": low_rank / full}


def sliding_window_layers(config) -> dict[int, int]:
    """layer -> window W, for the layers whose own DynamicCache keeps only the last W tokens."""
    own = DynamicCache(config=config)
    return {
        idx: int(layer.sliding_window) for idx, layer in enumerate(own.layers) if getattr(layer, "is_sliding", False)
    }


def compare_with_model_cache(
    per_token: dict[str, float],
    windows: dict[int, int],
    num_layers: int,
    contexts: tuple[int, ...] = (1024, 4096, 32768),
) -> dict | None:
    """Where the model's own cache slides, `per_token["ratio"]` (against a full cache) understates what the
    low-rank cache holds: it keeps every token of every layer. Ratios against the model's own cache, by context."""
    if not windows:
        return None
    per_layer_token = per_token["full"] / num_layers

    def own_bytes(context: int) -> float:
        return sum(min(context, windows.get(layer, context)) for layer in range(num_layers)) * per_layer_token

    return {
        "sliding_window_layers": {str(layer): window for layer, window in windows.items()},
        "ratio_to_model_cache_at_context": {str(c): per_token["low_rank"] * c / own_bytes(c) for c in contexts},
        "note": "the model's own cache keeps only the last W tokens of its sliding-window layers; the low-rank cache "
        "keeps every token, so against the model's own cache its ratio grows with the context",
    }

"""A KV cache that stores rank-r projections of keys and values: the one module that knows cache internals.

`LowRankLayer` is a `DynamicLayer` whose `update` projects the new keys and values onto the calibrated
right singular vectors P_r and stores the latents K·P_r (r numbers per token instead of D), then returns
the reconstruction K·P_r·P_rᵀ of everything cached to attention. Every attention call goes through
`update`, so a one-shot scoring forward and each generation step attend to the same rank-r keys and values.

Memory really shrinks (the stored tensors are the latents); compute does not: the reconstruction is a
matmul per layer per step, with no fused low-rank attention kernel.

pre_rope keys (the paper's K = X·W_k): the cache undoes RoPE on the new keys (cos/sin from the model's
rotary module at the tokens' positions), projects, stores the latent and the positions, and on return
reconstructs and re-applies RoPE. This equals folding P_r·P_rᵀ into W_k (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from kvcore_eval import rope
from kvcore_eval.artifact import Calibration
from kvcore_eval.gram import KEY_SPACES
from kvcore_eval.rank_plan import RankPlan


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


class LowRankLayer(DynamicLayer):
    """Stores latents K·P_r and V·P_r; returns their reconstructions (post-RoPE keys, as attention expects)."""

    def __init__(self, bases: LayerBases, kv_heads: int, rotary_embedding: nn.Module | None = None):
        super().__init__()
        self.bases = bases
        self.kv_heads = kv_heads
        # Only truncated pre-RoPE keys need RoPE undone and redone, hence the positions of the cached tokens.
        self.rotary_embedding = rotary_embedding if bases.key is not None else None
        self.positions: torch.Tensor | None = None  # (batch, seq) int32

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: (batch, kv_heads, new_seq, head_dim), keys after RoPE
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new_keys = key_states
        if self.rotary_embedding is not None:
            batch, _, seq, _ = key_states.shape
            positions = rope.positions_from_kwargs(kwargs.get("kwargs") or {}, self.get_seq_length(), batch, seq, key_states.device)
            cos, sin = rope.cos_sin(self.rotary_embedding, key_states, positions)
            new_keys = rope.unrotate(key_states.float(), cos, sin)
            positions = positions.to(torch.int32)
            self.positions = positions if self.positions is None else torch.cat([self.positions, positions], dim=-1)
        if self.bases.key is not None:
            new_keys = project(new_keys, self.bases.key).to(key_states.dtype)
        new_values = value_states if self.bases.value is None else project(value_states, self.bases.value).to(value_states.dtype)
        self.keys = torch.cat([self.keys, new_keys], dim=-2)
        self.values = torch.cat([self.values, new_values], dim=-2)
        return self.read_keys(key_states.dtype), self.read_values(value_states.dtype)

    def read_keys(self, dtype: torch.dtype) -> torch.Tensor:
        """All cached keys as attention sees them: (batch, kv_heads, seq, head_dim), after RoPE."""
        if self.bases.key is None:
            return self.keys
        keys = reconstruct(self.keys, self.bases.key, self.kv_heads)
        if self.rotary_embedding is not None:
            cos, sin = rope.cos_sin(self.rotary_embedding, keys, self.positions)
            keys = rope.rotate(keys, cos, sin)
        return keys.to(dtype)

    def read_values(self, dtype: torch.dtype) -> torch.Tensor:
        if self.bases.value is None:
            return self.values
        return reconstruct(self.values, self.bases.value, self.kv_heads).to(dtype)

    def stored_bytes(self) -> dict[str, int]:
        if not self.is_initialized:
            return {"keys": 0, "values": 0, "positions": 0}
        size = lambda t: 0 if t is None else t.numel() * t.element_size()  # noqa: E731
        return {"keys": size(self.keys), "values": size(self.values), "positions": size(self.positions)}

    # Batch and length edits keep the positions in step with the latents.
    def reset(self) -> None:
        super().reset()
        self.positions = None

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.positions is not None and tokens_to_remove < 0:
            self.positions = self.positions[:, :tokens_to_remove]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.positions is not None:
            self.positions = self.positions[indices, ...]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))


class LowRankCache(Cache):
    """One `LowRankLayer` per decoder layer. Pass as `cache=` to a forward or to `generate`."""

    def __init__(self, bases: list[LayerBases], kv_heads: int, rotary_embedding: nn.Module | None = None):
        super().__init__(layers=[LowRankLayer(layer_bases, kv_heads, rotary_embedding) for layer_bases in bases])

    def stored_bytes(self) -> dict[str, int]:
        """Bytes held, summed over layers: keys, values and (pre-RoPE truncation) positions."""
        totals = {"keys": 0, "values": 0, "positions": 0}
        for layer in self.layers:
            for name, size in layer.stored_bytes().items():
                totals[name] += size
        return totals


def layer_bases(calibration: Calibration, plan: RankPlan, device: torch.device | str = "cpu") -> list[LayerBases]:
    """The plan's top-r right singular vectors per layer, float32 on `device`; full rank means stored in full."""
    key_space = KEY_SPACES[plan.key_space]

    def basis(space: str, layer: int, rank: int) -> torch.Tensor | None:
        if rank >= plan.width:
            return None
        if plan.granularity == "layer":
            return calibration.eigenvectors[space][layer][:, :rank].to(device, torch.float32).contiguous()
        return calibration.head_eigenvectors[space][layer][:, :, :rank].to(device, torch.float32).contiguous()

    num_layers = calibration.geometry.num_layers
    key_ranks = plan.key_rank_per_layer or [plan.width] * num_layers
    value_ranks = plan.value_rank_per_layer or [plan.width] * num_layers
    return [LayerBases(basis(key_space, layer, key_ranks[layer]), basis("value", layer, value_ranks[layer])) for layer in range(num_layers)]


def cache_bytes_per_token(plan: RankPlan, kv_heads: int, num_layers: int, element_size: int, has_rope: bool) -> dict[str, float]:
    """Bytes one token costs in the low-rank cache and in a full DynamicCache, and their ratio.

    Mirrors `LowRankLayer`: a rank below the width stores r numbers per basis, else the full width; truncated
    pre-RoPE keys of a RoPE model also store an int32 position per token and layer."""
    per_basis = 1 if plan.granularity == "layer" else kv_heads  # head granularity stores r per head
    full_width = plan.width * per_basis
    key_ranks = plan.key_rank_per_layer or [plan.width] * num_layers
    keys = sum(r * per_basis for r in key_ranks)
    values = sum(r * per_basis for r in (plan.value_rank_per_layer or [plan.width] * num_layers))
    truncated_key_layers = sum(r < plan.width for r in key_ranks)
    positions = 4 * truncated_key_layers if plan.key_space == "pre_rope" and has_rope else 0
    low_rank = (keys + values) * element_size + positions
    full = 2 * num_layers * full_width * element_size
    return {"low_rank": float(low_rank), "full": float(full), "ratio": low_rank / full}

"""A KV cache that stores rank-r projections of keys and values: the one module that knows cache internals.

`LowRankLayer` is a `DynamicLayer` whose `update` projects the new keys and values onto the calibrated
right singular vectors P_r and stores the latents K·P_r (r numbers per token instead of D), then returns
the reconstruction K·P_r·P_rᵀ of everything cached to attention. Every attention call goes through
`update`, so a one-shot scoring forward and each generation step attend to the same rank-r keys and values.

Memory really shrinks (the stored tensors are the latents). With `latent=True` (`kvcore_eval.compression.latent`) the
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

from kvcore_eval.calibration.artifact import Calibration
from kvcore_eval.compression.bases import sequence_basis
from kvcore_eval.compression.quantize import Codec
from kvcore_eval.compression.rank_plan import RankPlan
from kvcore_eval.model.rope import RopeTap, RotaryTables, rotate, unrotate
from kvcore_eval.spaces import KEY_SPACES


@dataclass(frozen=True)
class LayerBases:
    """Orthonormal bases of one layer: (D, r) for granularity=layer, (kv_heads, head_dim, r) for head; None: stored in
    full, unless a `*_sequence_rank` asks each sequence's own rank-r basis, computed at its prefill (basis=sequence)."""

    key: torch.Tensor | None
    value: torch.Tensor | None
    key_sequence_rank: int | None = None
    value_sequence_rank: int | None = None

    def truncates(self, kind: str) -> bool:
        return getattr(self, kind) is not None or getattr(self, f"{kind}_sequence_rank") is not None


def project(states: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """(batch, kv_heads, seq, head_dim) -> latent (batch, seq, r) [layer basis] or (batch, kv_heads, seq, r) [head
    bases]."""
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
        """Apply a batch or length edit of the cache to every kept table (a shared batch-1 table needs no batch
        edit)."""
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


def _rows(states: torch.Tensor) -> torch.Tensor:
    """(batch, kv_heads, seq, head_dim) -> (batch, seq, D): all KV heads of a token concatenated."""
    return states.transpose(1, 2).flatten(2)


def _append(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """Concatenate along the sequence (dim -2); an empty start takes the new tensor's dtype (int codes stay int)."""
    return new if old is None or old.numel() == 0 else torch.cat([old, new], dim=-2)


@dataclass
class _Shared:
    """What every layer of one cache reads: the prefill's token mask (batch, seq), nonzero on real tokens."""

    token_mask: torch.Tensor | None = None


class LowRankLayer(DynamicLayer):
    """Stores latents K·P_r and V·P_r (encoded by `codec`); returns their reconstructions (post-RoPE keys).

    Per kind it holds: `keys`/`values` (latents (batch, seq, r) for a layer basis, (batch, kv_heads, seq, r) for head
    bases, or the states in full (batch, kv_heads, seq, head_dim)), as codes when quantized, `scales[kind]` (the
    same leading dims, one float16 per group of channels) and, for basis=sequence, `basis[kind]` per row
    (batch, D, r) in the model's dtype, computed at prefill."""

    def __init__(
        self,
        bases: LayerBases,
        kv_heads: int,
        layer_idx: int,
        rope: RopeHistory | None = None,
        latent: bool = False,
        codec: Codec | None = None,
        shared: _Shared | None = None,
    ):
        super().__init__()
        self.latent = latent  # attention reads the latents itself: update returns them as stored
        self.bases = bases
        self.kv_heads = kv_heads
        self.layer_idx = layer_idx
        self.codec = codec
        self.shared = shared or _Shared()
        self.basis: dict[str, torch.Tensor | None] = {"key": bases.key, "value": bases.value}
        self.scales: dict[str, torch.Tensor | None] = {"key": None, "value": None}
        self.widths: dict[str, int] = {}
        # Only truncated pre-RoPE keys need RoPE undone and redone.
        self.rope = rope if bases.truncates("key") else None
        self.rope_group: int | None = None

    def _sequence_rank(self, kind: str) -> int | None:
        return getattr(self.bases, f"{kind}_sequence_rank")

    def _prefill_mask(self, batch: int, seq: int) -> torch.Tensor | None:
        mask = self.shared.token_mask
        if mask is not None and tuple(mask.shape) != (batch, seq):
            raise RuntimeError(
                f"basis=sequence: the prefill has {batch} x {seq} tokens but the token mask {tuple(mask.shape)}: "
                "the padding of this batch is unknown, so its bases would be wrong"
            )
        return mask

    def _encode(self, kind: str, states: torch.Tensor, dtype: torch.dtype) -> None:
        """Project (if truncated), encode and append the new states (batch, kv_heads, seq, head_dim) of one kind."""
        rank = self._sequence_rank(kind)
        if rank is not None and self.basis[kind] is None:  # this sequence's prefill: its own basis, then frozen
            mask = self._prefill_mask(states.shape[0], states.shape[2])
            self.basis[kind] = sequence_basis(_rows(states), mask, rank).to(dtype)
        basis = self.basis[kind]
        if basis is None:
            stored = states.to(dtype)
        elif rank is not None:  # per row: (batch, seq, D) @ (batch, D, r)
            stored = (_rows(states).float() @ basis.float()).to(dtype)
        else:
            stored = project(states, basis).to(dtype)
        self.widths[kind] = stored.shape[-1]
        codes, scales = (stored, None) if self.codec is None else self.codec.encode(stored)
        name = "keys" if kind == "key" else "values"
        setattr(self, name, _append(getattr(self, name), codes))
        if scales is not None:
            self.scales[kind] = _append(self.scales[kind], scales)

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
        self._encode("key", new_keys, key_states.dtype)
        self._encode("value", value_states, value_states.dtype)
        if self.latent:
            return self.keys, self.values
        return self.read_keys(key_states.dtype), self.read_values(value_states.dtype)

    def stored(self, kind: str, dtype: torch.dtype) -> torch.Tensor:
        """What is held for `kind`, decoded: latents or the states in full (see the class docstring)."""
        held = self.keys if kind == "key" else self.values
        if self.codec is None:
            return held
        return self.codec.decode(held, self.scales[kind], self.widths[kind], dtype)

    def _reconstruct(self, kind: str, dtype: torch.dtype) -> torch.Tensor:
        basis = self.basis[kind]
        if basis is None:
            return self.stored(kind, dtype).to(dtype)
        if self._sequence_rank(kind) is not None:  # (batch, seq, r) @ (batch, r, D)
            rows = self.stored(kind, torch.float32).float() @ basis.float().transpose(1, 2)
            return rows.unflatten(-1, (self.kv_heads, -1)).transpose(1, 2)
        return reconstruct(self.stored(kind, basis.dtype), basis, self.kv_heads)

    def read_keys(self, dtype: torch.dtype) -> torch.Tensor:
        """All cached keys as attention sees them: (batch, kv_heads, seq, head_dim), after RoPE."""
        keys = self._reconstruct("key", dtype)
        if self.rope is not None:
            keys = rotate(keys, self.rope.groups[self.rope_group])
        return keys.to(dtype)

    def read_values(self, dtype: torch.dtype) -> torch.Tensor:
        return self._reconstruct("value", dtype).to(dtype)

    def stored_bytes(self) -> dict[str, int]:
        """Bytes held, as stored: codes or latents, scales, and per-sequence bases."""
        size = lambda t: 0 if t is None else t.numel() * t.element_size()  # noqa: E731
        if not self.is_initialized:
            return {"keys": 0, "values": 0, "scales": 0, "sequence_bases": 0}
        sequence = [self.basis[kind] for kind in ("key", "value") if self._sequence_rank(kind) is not None]
        return {
            "keys": size(self.keys),
            "values": size(self.values),
            "scales": size(self.scales["key"]) + size(self.scales["value"]),
            "sequence_bases": sum(size(basis) for basis in sequence),
        }

    # Batch and length edits keep scales and per-sequence bases in step with what they describe.
    def _edit(self, change: Callable[[torch.Tensor], torch.Tensor], bases_too: bool = True) -> None:
        for kind in ("key", "value"):
            if self.scales[kind] is not None:
                self.scales[kind] = change(self.scales[kind])
            if bases_too and self._sequence_rank(kind) is not None and self.basis[kind] is not None:
                self.basis[kind] = change(self.basis[kind])

    def reset(self) -> None:
        super().reset()
        self.scales = {"key": None, "value": None}
        self.basis = {"key": self.bases.key, "value": self.bases.value}

    def crop(self, tokens_to_remove: int) -> None:
        if self.is_initialized and tokens_to_remove < 0:
            self._edit(lambda t: t[..., :tokens_to_remove, :], bases_too=False)
        super().crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self._edit(lambda t: t.repeat_interleave(repeats, dim=0))
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self._edit(lambda t: t[indices, ...])
        super().batch_select_indices(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            self._edit(lambda t: t.index_select(0, beam_idx.to(t.device)))
        super().reorder_cache(beam_idx)


class LowRankCache(Cache):
    """One `LowRankLayer` per decoder layer. Pass as `cache=` to a forward or to `generate`.

    `tap` (pre_rope truncation of a RoPE model) supplies the tables each layer applied; the cache keeps them.
    `latent`: attention reads the latents (`kvcore_eval.compression.latent`), nothing is reconstructed on update.
    `codec`: how latents are stored (`kvcore_eval.compression.quantize`); None keeps the model's dtype.
    `set_token_mask` names the real tokens of the next prefill (basis=sequence excludes padding from its bases)."""

    def __init__(
        self,
        bases: list[LayerBases],
        kv_heads: int,
        tap: RopeTap | None = None,
        latent: bool = False,
        codec: Codec | None = None,
    ):
        self.rope = RopeHistory(tap) if tap is not None and tap.has_rope else None
        self.kv_heads = kv_heads
        self.shared = _Shared()
        codec = None if codec is None or codec.bits is None else codec
        super().__init__(
            layers=[
                LowRankLayer(layer_bases, kv_heads, idx, self.rope, latent, codec, self.shared)
                for idx, layer_bases in enumerate(bases)
            ]
        )

    def set_token_mask(self, token_mask: torch.Tensor | None) -> None:
        """token_mask: (batch, seq) of the coming prefill, nonzero where a real token stands; None: all tokens."""
        self.shared.token_mask = token_mask

    def stored_bytes(self) -> dict[str, int]:
        """Bytes held, summed over layers: keys and values (latents or codes), their scales, per-sequence bases, and
        the rotary tables of pre-RoPE truncation."""
        totals = {
            "keys": 0,
            "values": 0,
            "scales": 0,
            "sequence_bases": 0,
            "rope_tables": 0 if self.rope is None else self.rope.stored_bytes(),
        }
        for layer in self.layers:
            for name, size in layer.stored_bytes().items():
                totals[name] += size
        return totals

    def stored_positions(self) -> int:
        """Token positions held: batch rows × cached length (padding included, as a full cache would hold it)."""
        layer = self.layers[0]
        return 0 if layer.get_seq_length() == 0 else layer.keys.shape[0] * layer.get_seq_length()

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


def layer_bases(
    calibration: Calibration,
    plan: RankPlan,
    device: torch.device | str | list[torch.device] = "cpu",
    sequence: bool = False,
) -> list[LayerBases]:
    """The plan's top-r right singular vectors per layer, float32 on `device` (one for all layers, or one per layer:
    `models.layer_devices` of a model split by a device_map); full rank means stored in full.
    `sequence`: no fixed bases; each sequence computes its own rank-r basis at prefill (basis=sequence)."""
    key_space = KEY_SPACES[plan.key_space]
    num_layers = calibration.geometry.num_layers
    devices = device if isinstance(device, list) else [device] * num_layers
    if len(devices) != num_layers:
        raise ValueError(f"{len(devices)} layer devices for {num_layers} layers: the model and the bases disagree")

    def basis(space: str, layer: int, rank: int) -> torch.Tensor | None:
        if rank >= plan.width or sequence:
            return None
        return calibration.basis(space, layer, rank, plan.granularity).to(devices[layer], torch.float32).contiguous()

    def sequence_rank(rank: int) -> int | None:
        return rank if sequence and rank < plan.width else None

    key_ranks = plan.key_rank_per_layer or [plan.width] * num_layers
    value_ranks = plan.value_rank_per_layer or [plan.width] * num_layers
    return [
        LayerBases(
            basis(key_space, layer, key_ranks[layer]),
            basis("value", layer, value_ranks[layer]),
            sequence_rank(key_ranks[layer]),
            sequence_rank(value_ranks[layer]),
        )
        for layer in range(num_layers)
    ]


def cache_bytes_per_token(
    plan: RankPlan,
    kv_heads: int,
    num_layers: int,
    element_size: int,
    rope_table_bytes: int = 0,
    codec: Codec | None = None,
) -> dict[str, float]:
    """Bytes one token costs in the low-rank cache and in a full cache of every layer, and their ratio.

    Mirrors `LowRankCache`: per layer and kind, a rank below the width stores r numbers per basis (one vector, or one
    per head for granularity=head), else the states in full (one vector of head_dim per head); `codec` encodes each
    vector (codes plus group scales). Truncated pre-RoPE keys also keep the rotary tables applied to each token
    (`rope_table_bytes` per token, once per rotary group, not per layer). Per-sequence bases (basis=sequence) are not
    per token and are not in this figure: the measured bytes include them."""
    head_dim = plan.width if plan.granularity == "head" else plan.width // kv_heads
    per_basis = 1 if plan.granularity == "layer" else kv_heads  # head granularity stores r per head

    def vector_bytes(width: int) -> int:
        return width * element_size if codec is None or codec.bits is None else codec.bytes_per_vector(width)

    def kind_bytes(ranks: list[int] | None) -> int:
        ranks = ranks or [plan.width] * num_layers
        return sum(per_basis * vector_bytes(r) if r < plan.width else kv_heads * vector_bytes(head_dim) for r in ranks)

    key_ranks = plan.key_rank_per_layer or [plan.width] * num_layers
    truncates_pre_rope = plan.key_space == "pre_rope" and any(r < plan.width for r in key_ranks)
    parts = {
        "keys": float(kind_bytes(plan.key_rank_per_layer)),
        "values": float(kind_bytes(plan.value_rank_per_layer)),
        "rope_tables": float(rope_table_bytes if truncates_pre_rope else 0),
    }
    low_rank = sum(parts.values())
    full = 2 * num_layers * kv_heads * head_dim * element_size
    return {"low_rank": low_rank, "full": float(full), "ratio": low_rank / full, **parts}


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

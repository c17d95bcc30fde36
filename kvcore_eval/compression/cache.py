"""A KV cache that stores what a codec keeps of keys and values: the one module that knows cache internals.

`LowRankLayer` is a `DynamicLayer` whose `update` projects the new keys and values on a basis (the calibrated right
singular vectors P_r, the projection weights' SVD, a random or per-sequence basis, a rotation kept whole, or none),
encodes what it keeps (the model's dtype, 16-bit floats, integer codes with group scales, or a spectral code's
segments: `quantize`), stores that, and returns the reconstruction of everything cached to attention. Every attention
call goes through `update`, so a one-shot scoring forward and each generation step attend to the same keys and values.

Memory really shrinks (the stored tensors are the latents and codes). With `latent=True` (`compression.latent`) the
update stores the same and returns without reconstructing, and attention reads the latents directly; otherwise
attention gets the reconstruction, a matmul per layer per step.

pre_rope keys (the paper's K = X·W_k): the cache undoes RoPE on the new keys with the tables the layer itself applied
(`rope.RopeTap`), projects and stores the latent; on return it reconstructs and re-applies RoPE to every cached token.
What it keeps for that is each token's position (int32), from which the model's own rotary module recomputes the tables,
as an inference engine would; where the tables cannot be recomputed exactly from positions (dynamic or longrope
frequencies, or a check that fails), the applied tables themselves, so that a full-rank cache holds exactly what the
model's own cache holds. One history per rotary group (layers that receive the same tables) serves all its layers.
This equals folding P_r·P_rᵀ into W_k (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from kvcore_eval.calibration.artifact import Calibration
from kvcore_eval.compression.bases import FixedBasis, SequenceBasis
from kvcore_eval.compression.quantize import Codec, Segment, SegmentCodec
from kvcore_eval.compression.rank_plan import RankPlan
from kvcore_eval.model.rope import RopeTap, RotaryTables, rotate, unrotate
from kvcore_eval.spaces import KEY_SPACES

KINDS = ("key", "value")


@dataclass(frozen=True)
class LayerBases:
    """How one layer's keys and values enter the cache: a basis each (`bases.FixedBasis`, a per-sequence
    `bases.SequenceBasis`, or None: stored in full) and, where a kind has its own code (a spectral allocation: bits
    per latent channel), that code; else the cache's codec."""

    key: FixedBasis | SequenceBasis | None
    value: FixedBasis | SequenceBasis | None
    key_code: Codec | SegmentCodec | None = None
    value_code: Codec | SegmentCodec | None = None

    def __post_init__(self) -> None:  # a bare tensor is a fixed basis
        for kind in KINDS:
            if isinstance(getattr(self, kind), torch.Tensor):
                object.__setattr__(self, kind, FixedBasis(getattr(self, kind)))

    def truncates(self, kind: str) -> bool:
        return getattr(self, kind) is not None


class RopeHistory:
    """What rotates every cached pre-RoPE key at read time, per rotary group (layers that receive the same tables):
    the positions of its tokens (batch or 1, seq) int32, from which the model's own rotary module recomputes the
    tables, or, where that is not exact (`RopeTap.recomputable`), the tables themselves, cos and sin
    (batch or 1, seq, rotary_dim)."""

    def __init__(self, tap: RopeTap):
        self.tap = tap
        self.groups: dict[int, RotaryTables] = {}  # groups whose tables are kept
        self.positions: dict[int, torch.Tensor] = {}  # groups whose tables are recomputed

    def extend(self, layer_idx: int, length: int) -> tuple[int, RotaryTables]:
        """The group of `layer_idx` and its new tokens' tables; the group's history grows to `length` tokens
        (the first layer of the group in a forward appends, the others find it done)."""
        tables, group = self.tap.tables(layer_idx), self.tap.group_of(layer_idx)
        if self.tap.recomputable(layer_idx):
            kept = self.positions.get(group)
            if kept is None or kept.shape[-1] < length:
                new = self.tap.positions(layer_idx).to(torch.int32)
                self.positions[group] = new if kept is None else torch.cat(_widen(kept, new), dim=-1)
            return group, tables
        kept = self.groups.get(group)
        if kept is None or kept.cos.shape[-2] < length:
            cos = tables.cos if kept is None else torch.cat(_widen(kept.cos, tables.cos), dim=-2)
            sin = tables.sin if kept is None else torch.cat(_widen(kept.sin, tables.sin), dim=-2)
            self.groups[group] = RotaryTables(cos, sin, tables.interleaved)
        return group, tables

    def tables(self, group: int) -> RotaryTables:
        """The tables of every cached token of `group`."""
        if group in self.positions:
            return self.tap.tables_at(group, self.positions[group])
        return self.groups[group]

    def edit(self, change: Callable[[torch.Tensor], torch.Tensor], batch_edit: bool = True) -> None:
        """Apply a batch or length edit of the cache to every kept table and position (a row shared by the batch,
        batch 1, needs no batch edit). Positions are (batch, seq): a length edit `change` on (..., seq, dim) is
        applied to them with a trailing dim."""
        self.groups = {
            group: t
            if batch_edit and t.cos.shape[0] == 1
            else RotaryTables(change(t.cos), change(t.sin), t.interleaved)
            for group, t in self.groups.items()
        }
        self.positions = {
            group: p if batch_edit and p.shape[0] == 1 else change(p.unsqueeze(-1)).squeeze(-1)
            for group, p in self.positions.items()
        }

    def clear(self) -> None:
        self.groups.clear()
        self.positions.clear()

    def stored_bytes(self) -> dict[str, int]:
        size = lambda t: t.numel() * t.element_size()  # noqa: E731
        return {
            "rope_tables": sum(size(t.cos) + size(t.sin) for t in self.groups.values()),
            "rope_positions": sum(size(p) for p in self.positions.values()),
        }


def _widen(kept: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows share one table or position row while they agree (batch 1); widened to the batch when they part."""
    batch = max(kept.shape[0], new.shape[0])
    return kept.expand(batch, *kept.shape[1:]), new.expand(batch, *new.shape[1:])


def _append(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """Concatenate along the sequence (dim -2); an empty start takes the new tensor's dtype (int codes stay int)."""
    return new if old is None or old.numel() == 0 else torch.cat([old, new], dim=-2)


@dataclass
class _Shared:
    """What every layer of one cache reads: the prefill's token mask (batch, seq), nonzero on real tokens, and whether
    to measure the squared error of what is stored."""

    token_mask: torch.Tensor | None = None
    measure_error: bool = False
    exact_current: bool = False  # attention reads this forward's own tokens exactly (protocol=after_prefill)


class LowRankLayer(DynamicLayer):
    """Stores each kind projected on its basis (latents (batch, seq, r) for a layer basis, (batch, kv_heads, seq, r)
    for head bases, or the states in full (batch, kv_heads, seq, head_dim)), encoded by its code (codes, or bytes of
    per-segment codes, with `scales[kind]`: the same leading dims, float16 scales); returns their reconstructions
    (post-RoPE keys). Per-sequence bases are part of the layer's state (`basis[kind]`), stored and counted."""

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
        self.shared = shared or _Shared()
        self.codes = {kind: getattr(bases, f"{kind}_code") or codec for kind in KINDS}
        self.basis = {kind: None if getattr(bases, kind) is None else getattr(bases, kind).fresh() for kind in KINDS}
        self.scales: dict[str, torch.Tensor | None] = {"key": None, "value": None}
        self.widths: dict[str, int] = {}
        self.error = {kind: [0.0, 0.0] for kind in KINDS}  # squared error, squared norm of what entered
        # Only truncated pre-RoPE keys need RoPE undone and redone.
        self.rope = rope if bases.truncates("key") else None
        self.rope_group: int | None = None

    def _encode(self, kind: str, states: torch.Tensor, dtype: torch.dtype) -> None:
        """Project (if a basis), encode and append the new states (batch, kv_heads, seq, head_dim) of one kind."""
        basis, codec = self.basis[kind], self.codes[kind]
        if basis is None:
            stored = states.to(dtype)
        else:
            basis.prepare(states, self.shared.token_mask, dtype)
            stored = basis.project(states).to(dtype)
        self.widths[kind] = stored.shape[-1]
        codes, scales = (stored, None) if codec is None else codec.encode(stored)
        if self.shared.measure_error:
            self._measure(kind, states, codes, scales, dtype)
        name = "keys" if kind == "key" else "values"
        setattr(self, name, _append(getattr(self, name), codes))
        if scales is not None:
            self.scales[kind] = _append(self.scales[kind], scales)

    def _measure(self, kind: str, states, codes, scales, dtype) -> None:
        """Add the squared error of the new tokens as they will be read back, and their squared norm."""
        decoded = (
            codes if self.codes[kind] is None else self.codes[kind].decode(codes, scales, self.widths[kind], dtype)
        )
        back = decoded if self.basis[kind] is None else self.basis[kind].reconstruct(decoded, self.kv_heads)
        self.error[kind][0] += float((back.float() - states.float()).square().sum())
        self.error[kind][1] += float(states.float().square().sum())

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
        keys, values = self.read_keys(key_states.dtype), self.read_values(value_states.dtype)
        if self.shared.exact_current:  # this forward's own tokens as they are; earlier ones as the cache holds them
            new = key_states.shape[-2]
            keys = torch.cat([keys[..., :-new, :], key_states], dim=-2)
            values = torch.cat([values[..., :-new, :], value_states], dim=-2)
        return keys, values

    def stored(self, kind: str, dtype: torch.dtype) -> torch.Tensor:
        """What is held for `kind`, decoded: latents or the states in full (see the class docstring)."""
        held = self.keys if kind == "key" else self.values
        if self.codes[kind] is None:
            return held
        return self.codes[kind].decode(held, self.scales[kind], self.widths[kind], dtype)

    def fixed_basis(self, kind: str) -> torch.Tensor | None:
        """The vectors of a basis shared by every sequence (what latent attention folds into the query), else None."""
        basis = self.basis[kind]
        return basis.vectors if isinstance(basis, FixedBasis) else None

    def _reconstruct(self, kind: str, dtype: torch.dtype) -> torch.Tensor:
        basis = self.basis[kind]
        if basis is None:
            return self.stored(kind, dtype).to(dtype)
        return basis.reconstruct(self.stored(kind, torch.float32), self.kv_heads)  # bases are float32

    def read_keys(self, dtype: torch.dtype) -> torch.Tensor:
        """All cached keys as attention sees them: (batch, kv_heads, seq, head_dim), after RoPE."""
        keys = self._reconstruct("key", dtype)
        if self.rope is not None:
            keys = rotate(keys, self.rope.tables(self.rope_group))
        return keys.to(dtype)

    def read_values(self, dtype: torch.dtype) -> torch.Tensor:
        return self._reconstruct("value", dtype).to(dtype)

    def stored_bytes(self) -> dict[str, int]:
        """Bytes held, as stored: codes or latents, scales, and per-sequence bases."""
        size = lambda t: 0 if t is None else t.numel() * t.element_size()  # noqa: E731
        if not self.is_initialized:
            return {"keys": 0, "values": 0, "scales": 0, "sequence_bases": 0}
        return {
            "keys": size(self.keys),
            "values": size(self.values),
            "scales": size(self.scales["key"]) + size(self.scales["value"]),
            "sequence_bases": sum(size(t) for kind in KINDS if self.basis[kind] for t in self.basis[kind].stored()),
        }

    # Batch and length edits keep scales and per-sequence bases in step with what they describe.
    def _edit(self, change: Callable[[torch.Tensor], torch.Tensor], bases_too: bool = True) -> None:
        for kind in KINDS:
            if self.scales[kind] is not None:
                self.scales[kind] = change(self.scales[kind])
            if bases_too and self.basis[kind] is not None:
                self.basis[kind].edit(change)

    def reset(self) -> None:
        super().reset()
        self.scales = {"key": None, "value": None}
        self.basis = {kind: None if b is None else b.fresh() for kind, b in self.basis.items()}

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

    `tap` (pre_rope truncation of a RoPE model) supplies the tables each layer applied; the cache keeps their positions
    (or the tables, where they cannot be recomputed exactly). `latent`: attention reads the latents
    (`kvcore_eval.compression.latent`), nothing is reconstructed on update. `codec`: how what is stored is encoded
    where a layer's kind has no code of its own (`kvcore_eval.compression.quantize`); None keeps the model's dtype.
    `set_token_mask` names the real tokens of the next prefill (a per-sequence basis excludes padding).
    `measure_error`: keep each layer's squared error of what it stores (`squared_errors`). `exact_current`: attention
    reads each forward's own tokens exactly and only earlier tokens from what the cache stores (protocol=after_prefill:
    the prompt's prefill is exact, as in deployed caches)."""

    def __init__(
        self,
        bases: list[LayerBases],
        kv_heads: int,
        tap: RopeTap | None = None,
        latent: bool = False,
        codec: Codec | None = None,
        measure_error: bool = False,
        exact_current: bool = False,
    ):
        self.rope = RopeHistory(tap) if tap is not None and tap.has_rope else None
        self.kv_heads = kv_heads
        self.shared = _Shared(measure_error=measure_error, exact_current=exact_current)
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
        what rotates pre-RoPE keys (positions, or rotary tables)."""
        totals = {"keys": 0, "values": 0, "scales": 0, "sequence_bases": 0, "rope_tables": 0, "rope_positions": 0}
        if self.rope is not None:
            totals.update(self.rope.stored_bytes())
        for layer in self.layers:
            for name, size in layer.stored_bytes().items():
                totals[name] += size
        return totals

    def squared_errors(self) -> dict[str, list[list[float]]]:
        """Per kind, per layer: [squared error, squared norm] of every state that entered (measure_error=True)."""
        return {kind: [list(layer.error[kind]) for layer in self.layers] for kind in KINDS}

    # Batch and length edits keep the rotary history in step with the latents.
    def reset(self) -> None:
        super().reset()
        if self.rope is not None:
            self.rope.clear()

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


def segments(runs: list[list[int]]) -> tuple[Segment, ...]:
    """A plan's [[bits, channels], ...] as contiguous segments of latent channels."""
    found, start = [], 0
    for bits, count in runs:
        found.append(Segment(start, start + count, bits))
        start += count
    return tuple(found)


def layer_bases(
    calibration: Calibration,
    plan: RankPlan,
    device: torch.device | str | list[torch.device] = "cpu",
    sequence: bool = False,
    whole: bool = False,
    model_dtype: torch.dtype = torch.float32,
    scheme: str = "midrise",
) -> list[LayerBases]:
    """Per layer, each kind's basis, float32 on `device` (one for all layers, or one per layer: `models.layer_devices`
    of a model split by a device_map): the plan's top-r right singular vectors, or nothing where a kind keeps its full
    width (stored in full) unless `whole` (a rotation, applied at full width) or the plan gives its channels bits (a
    spectral code: the eigen-channels whitened by their calibrated standard deviation, coded segment by segment).
    `sequence`: no fixed bases; each sequence computes its own rank-r basis at prefill."""
    key_space = KEY_SPACES[plan.key_space]
    num_layers = calibration.geometry.num_layers
    devices = device if isinstance(device, list) else [device] * num_layers
    if len(devices) != num_layers:
        raise ValueError(f"{len(devices)} layer devices for {num_layers} layers: the model and the bases disagree")

    def kind_bases(kind: str, space: str, layer: int, rank: int) -> tuple:
        runs = plan.bits(kind, layer)
        if sequence and rank < plan.width:
            return SequenceBasis(rank), None
        if rank >= plan.width and not whole and runs is None:
            return None, None
        vectors = calibration.basis(space, layer, rank, plan.granularity).to(devices[layer], torch.float32)
        if runs is None:
            return FixedBasis(vectors.contiguous()), None
        tokens = max(float(calibration.token_count[layer]), 1.0) if calibration.token_count.numel() else 1.0
        variances = calibration.eigenvalues[space][layer][:rank].double() / tokens  # each channel's mean square
        # a channel the calibration barely saw is not blown up past the others' range on data unlike it
        deviation = variances.clamp_min(float(variances.max()) * 1e-8).sqrt().float().to(devices[layer])
        return FixedBasis(vectors.contiguous()), SegmentCodec(segments(runs), model_dtype, scheme, deviation)

    key_ranks = plan.key_rank_per_layer or [plan.width] * num_layers
    value_ranks = plan.value_rank_per_layer or [plan.width] * num_layers
    built = []
    for layer in range(num_layers):
        key, key_code = (
            kind_bases("key", key_space, layer, key_ranks[layer]) if plan.key_rank_per_layer else (None, None)
        )
        value, value_code = (
            kind_bases("value", "value", layer, value_ranks[layer]) if plan.value_rank_per_layer else (None, None)
        )
        built.append(LayerBases(key, value, key_code, value_code))
    return built


def cache_bytes_per_token(
    plan: RankPlan,
    kv_heads: int,
    num_layers: int,
    element_size: int,
    rope_bytes: dict[str, float] | None = None,
    codec: Codec | None = None,
    whole: bool = False,
) -> dict[str, float]:
    """Bytes one token costs in the compressed cache and in a full cache of every layer, and their ratio.

    Mirrors `LowRankCache`: per layer and kind, a kept rank below the width (or a basis kept `whole`, or a spectral
    code) stores r numbers per basis (one vector, or one per head for granularity=head), else the states in full (one
    vector of head_dim per head); a spectral code's segments, or else `codec`, encode each vector (codes plus group
    scales). Truncated pre-RoPE keys also keep what rotates them at read time, `rope_bytes` per token (positions, or
    rotary tables, once per rotary group, not per layer). Per-sequence bases (basis=sequence) are not per token and
    are not in this figure: the measured bytes include them."""
    head_dim = plan.width if plan.granularity == "head" else plan.width // kv_heads
    per_basis = 1 if plan.granularity == "layer" else kv_heads  # head granularity stores r per head

    def vector_bytes(width: int, runs) -> int:
        if runs is not None:
            return SegmentCodec(segments(runs), torch.float32).bytes_per_vector()
        return width * element_size if codec is None or codec.bits is None else codec.bytes_per_vector(width)

    def kind_bytes(kind: str, ranks: list[int] | None) -> int:
        if ranks is None:  # stored in full
            return num_layers * kv_heads * vector_bytes(head_dim, None)
        total = 0
        for layer, rank in enumerate(ranks):
            runs = plan.bits(kind, layer)
            projected = rank < plan.width or runs is not None or whole
            total += per_basis * vector_bytes(rank, runs) if projected else kv_heads * vector_bytes(head_dim, None)
        return total

    key_ranks = plan.key_rank_per_layer or []
    # pre-RoPE keys projected on a basis (a rotation is applied to the cached keys as they are)
    rotated = (
        plan.key_space == "pre_rope"
        and not whole
        and (any(r < plan.width for r in key_ranks) or plan.key_bits_per_layer is not None)
    )
    parts = {
        "keys": float(kind_bytes("key", plan.key_rank_per_layer)),
        "values": float(kind_bytes("value", plan.value_rank_per_layer)),
        "rope_tables": float((rope_bytes or {}).get("rope_tables", 0.0)) if rotated else 0.0,
        "rope_positions": float((rope_bytes or {}).get("rope_positions", 0.0)) if rotated else 0.0,
    }
    low_rank = sum(parts.values())
    full = 2 * num_layers * kv_heads * head_dim * element_size
    return {"low_rank": low_rank, "full": float(full), "ratio": low_rank / full, "element_size": element_size, **parts}


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

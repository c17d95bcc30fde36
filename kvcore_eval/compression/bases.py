"""Where a low-rank cache's bases come from (`basis=`): calibrated on data, from the weights, random, or per sequence.

Every source but `sequence` is returned as a `Calibration` (eigenvalues as the spectrum, eigenvectors held in memory),
so rank plans and `cache.layer_bases` treat them alike:

- `data`: the calibration artifact (`kvcore-eval calibrate`), today's bases.
- `weights` (data-free, as Palu and LoRC): every key is K = W_k·x + b_k = [W_k | b_k]·[x; 1], so all keys lie in the
  column space of [W_k | b_k] (D × (hidden + 1)). Its top-r left singular vectors are the best rank-r basis for keys
  when nothing is known of the data, i.e. when the augmented input [x; 1] is taken as isotropic; a bias is a column
  like any other, and dropping it would miss the constant offset every key carries. Values likewise from [W_v | b_v].
  The singular values σ play the spectrum (eigenvalues σ², as a calibration's), so energy and ner budgets apply.
  Per head (granularity=head) from that head's rows. Fused projections (Phi-3 qkv_proj, GPT-NeoX query_key_value,
  GPT-2 c_attn) are sliced, and the slice is *checked* on the model: one probe batch, [W | b]·[x; 1] against the
  pre-RoPE key and the value the cache receives, every layer. Post-RoPE keys have no weight basis (the rotation
  depends on the position), and keys normalized after the projection (k_norm: Qwen3, Gemma3) are not linear in x:
  both refused, as is any layer where the check fails.
- `random`: a seeded random orthonormal basis per layer and kind (QR of a Gaussian, signs fixed so it is Haar
  distributed), reproducible from `basis_seed`; a flat spectrum, so only uniform ranks.
- `sequence` (ShadowKV, xKV): each sequence's own basis, computed by the cache at prefill from that sequence's keys
  (pre-RoPE for key_space=pre_rope) and values, padding excluded, frozen for the decode steps that follow
  (`sequence_basis`, called by `cache.LowRankLayer`). Its D × r numbers per layer and row are stored in the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from kvcore_eval.calibration.artifact import Calibration, sign_fixed
from kvcore_eval.model.models import KVGeometry, kv_geometry
from kvcore_eval.model.rope import RopeTap, attention_modules, pre_rope_keys
from kvcore_eval.model.selfcheck import TOLERANCE, run_probe
from kvcore_eval.spaces import SPACES


def _calibration(geometry: KVGeometry, source: str, spaces, eigenvalues, eigenvectors, head_values, head_vectors):
    metadata = {"model": {"geometry": geometry.to_dict()}, "basis": source}
    return Calibration(
        metadata,
        {s: eigenvalues[s] for s in spaces},
        {s: eigenvectors[s] for s in spaces},
        {s: head_values[s] for s in spaces},
        {s: head_vectors[s] for s in spaces},
    )


def flat_spectrum(geometry: KVGeometry, source: str) -> Calibration:
    """A flat spectrum and no bases: what rank plans see of a `sequence` (or not yet built) source."""
    layers, heads, head_dim = geometry.num_layers, geometry.kv_heads, geometry.head_dim
    ones = torch.ones(layers, geometry.width, dtype=torch.float64)
    head_ones = torch.ones(layers, heads, head_dim, dtype=torch.float64)
    metadata = {"model": {"geometry": geometry.to_dict()}, "basis": source}
    return Calibration(metadata, dict.fromkeys(SPACES, ones), {}, dict.fromkeys(SPACES, head_ones), {})


def random_bases(geometry: KVGeometry, seed: int) -> Calibration:
    """Seeded random orthonormal bases for every space, layer (D × D) and head (head_dim × head_dim)."""
    generator = torch.Generator().manual_seed(int(seed))
    layers, heads, head_dim, width = geometry.num_layers, geometry.kv_heads, geometry.head_dim, geometry.width

    def orthonormal(*shape: int) -> torch.Tensor:
        q, r = torch.linalg.qr(torch.randn(*shape, generator=generator, dtype=torch.float64))
        return (q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)).float()

    vectors = {space: orthonormal(layers, width, width) for space in SPACES}
    head_vectors = {space: orthonormal(layers, heads, head_dim, head_dim) for space in SPACES}
    flat = flat_spectrum(geometry, "random")
    return _calibration(geometry, "random", SPACES, flat.eigenvalues, vectors, flat.head_eigenvalues, head_vectors)


def hadamard(size: int) -> torch.Tensor:
    """Sylvester's orthonormal Hadamard matrix of a power-of-two `size` (float64): H_2n = [[H, H], [H, -H]] / √2."""
    if size < 1 or size & (size - 1):
        raise ValueError(
            f"basis=rotation needs a power-of-two head_dim for its Hadamard transform, and head_dim is {size}: use "
            "basis=random (a dense seeded rotation) instead"
        )
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix / size**0.5


def rotation_bases(geometry: KVGeometry, seed: int) -> Calibration:
    """Seeded randomized Hadamard rotations (TurboQuant's and QuaRot's first stage): per layer, space and KV head, S·H
    with S a diagonal of random signs (a vector's coordinates flipped, then mixed: latent = x·S·H); a layer's basis is
    block-diagonal over its KV heads (D × D), so each head is rotated within itself. A rotation spreads a vector's
    energy evenly over its coordinates (outlier channels too), so one scale a group fits every coordinate; its
    spectrum is flat: it is kept whole and coded in uniform bits."""
    generator = torch.Generator().manual_seed(int(seed))
    layers, heads, head_dim = geometry.num_layers, geometry.kv_heads, geometry.head_dim
    transform = hadamard(head_dim)

    def randomized(*shape: int) -> torch.Tensor:  # (..., head_dim, head_dim): diag(signs)·H, signs per leading index
        signs = torch.randint(0, 2, (*shape, head_dim), generator=generator, dtype=torch.float64) * 2 - 1
        # on the rows: signs on the latent's side (H·S) would be undone by any symmetric code, every seed one rotation
        return (signs.unsqueeze(-1) * transform).float()

    head_vectors = {space: randomized(layers, heads) for space in SPACES}
    vectors = {space: torch.stack([torch.block_diag(*blocks) for blocks in head_vectors[space]]) for space in SPACES}
    flat = flat_spectrum(geometry, "rotation")
    return _calibration(geometry, "rotation", SPACES, flat.eigenvalues, vectors, flat.head_eigenvalues, head_vectors)


@dataclass(frozen=True)
class Projection:
    """One layer's key or value projection: K = x·Wᵀ + b, with W (D, hidden) and b (D,) or None."""

    module: nn.Module  # the module whose input is x
    weight: torch.Tensor
    bias: torch.Tensor | None

    def augmented(self) -> torch.Tensor:
        """[W | b]: (D, hidden + 1), float64 (a zero column where there is no bias)."""
        bias = self.bias if self.bias is not None else torch.zeros(self.weight.shape[0], dtype=self.weight.dtype)
        return torch.cat([self.weight.double(), bias.double().unsqueeze(1).to(self.weight.device)], dim=1)


def projection(attention: nn.Module, config, geometry: KVGeometry, kind: str) -> Projection:
    """The key (kind="key") or value projection of one attention module, sliced out of a fused one."""
    width, head_dim = geometry.width, geometry.head_dim
    family = getattr(config, "model_type", type(attention).__name__)
    own = getattr(attention, "k_proj" if kind == "key" else "v_proj", None)
    if isinstance(own, nn.Linear):
        return Projection(own, own.weight.detach(), None if own.bias is None else own.bias.detach())
    index = {"key": 1, "value": 2}[kind]
    if isinstance(getattr(attention, "qkv_proj", None), nn.Linear):  # Phi-3: rows [q | k | v]
        fused = attention.qkv_proj
        start = config.num_attention_heads * head_dim + (index - 1) * width
        rows = slice(start, start + width)
        return Projection(fused, fused.weight.detach()[rows], None if fused.bias is None else fused.bias.detach()[rows])
    if isinstance(getattr(attention, "query_key_value", None), nn.Linear):  # GPT-NeoX: per head [q | k | v]
        fused = attention.query_key_value
        per_head = fused.weight.detach().view(geometry.kv_heads, 3, head_dim, -1)[:, index].reshape(width, -1)
        bias = None if fused.bias is None else fused.bias.detach().view(geometry.kv_heads, 3, head_dim)[:, index]
        return Projection(fused, per_head, None if bias is None else bias.reshape(width))
    if hasattr(attention, "c_attn"):  # GPT-2 Conv1D: weight (hidden, 3·D), columns [q | k | v]
        fused = attention.c_attn
        columns = slice(index * width, (index + 1) * width)
        return Projection(fused, fused.weight.detach()[:, columns].T, fused.bias.detach()[columns])
    raise ValueError(
        f"basis=weights: {family} has no k_proj/v_proj, qkv_proj, query_key_value or c_attn projection kvcore-eval "
        "knows how to read: use basis=data"
    )


def _svd_basis(augmented: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors (width, width) and σ² (width,) padded with zeros, of a (width, n) matrix."""
    u, s, _ = torch.linalg.svd(augmented, full_matrices=True)
    values = torch.zeros(width, dtype=torch.float64)
    values[: s.shape[0]] = s.double() ** 2
    return sign_fixed(u).float(), values


def weight_bases(model: nn.Module, tap: RopeTap, truncates_keys: bool) -> Calibration:
    """Bases from the SVD of each layer's [W | b] for pre-RoPE keys and values, after checking on the model
    that [W | b]·[x; 1] is the key and value the cache receives. Raises ValueError where it is not."""
    config = model.config
    geometry = kv_geometry(config)
    family = getattr(config, "model_type", type(model).__name__)
    layers = attention_modules(model)
    if truncates_keys and (
        normed := [i for i, a in layers.items() if isinstance(getattr(a, "k_norm", None), nn.Module)]
    ):
        raise ValueError(
            f"basis=weights: {family} normalizes its keys after the projection (k_norm, layers {normed[:4]}...), so a "
            "key is not a linear function of the hidden state and W_k has no basis for it: use basis=data, or "
            "truncate=values"
        )
    projections = {
        (layer, kind): projection(attention, config, geometry, kind)
        for layer, attention in layers.items()
        for kind in ("key", "value")
    }
    check_projections(model, tap, projections, kinds=("key", "value") if truncates_keys else ("value",))
    heads, head_dim, width = geometry.kv_heads, geometry.head_dim, geometry.width
    values, vectors, head_values, head_vectors = {}, {}, {}, {}
    for kind, space in (("key", "key_pre_rope"), ("value", "value")):
        per_layer = [_svd_basis(projections[(layer, kind)].augmented().cpu(), width) for layer in layers]
        vectors[space] = torch.stack([v for v, _ in per_layer])
        values[space] = torch.stack([s for _, s in per_layer])
        per_head = [
            [
                _svd_basis(projections[(layer, kind)].augmented().cpu()[h * head_dim : (h + 1) * head_dim], head_dim)
                for h in range(heads)
            ]
            for layer in layers
        ]
        head_vectors[space] = torch.stack([torch.stack([v for v, _ in row]) for row in per_head])
        head_values[space] = torch.stack([torch.stack([s for _, s in row]) for row in per_head])
    return _calibration(geometry, "weights", ("key_pre_rope", "value"), values, vectors, head_values, head_vectors)


class _Recorder(DynamicLayer):
    """Stores nothing; keeps the pre-RoPE key and the value of each update: (batch, seq, D)."""

    def __init__(self, seen: dict, layer_idx: int, tap: RopeTap):
        super().__init__()
        self.seen, self.layer_idx, self.tap = seen, layer_idx, tap

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        def rows(states: torch.Tensor) -> torch.Tensor:
            return states.float().transpose(1, 2).flatten(2)

        self.seen[(self.layer_idx, "key")] = rows(pre_rope_keys(key_states, self.layer_idx, self.tap))
        self.seen[(self.layer_idx, "value")] = rows(value_states)
        return key_states, value_states


def check_projections(model: nn.Module, tap: RopeTap, projections: dict, kinds: tuple[str, ...]) -> dict:
    """[W | b]·[x; 1] against the cache's pre-RoPE key / value on the probe batch; relative errors by (layer, kind)."""
    config = model.config
    family = getattr(config, "model_type", type(model).__name__)
    inputs: dict[nn.Module, torch.Tensor] = {}
    modules = {p.module for p in projections.values()}

    def keep(module, args, output) -> None:
        inputs[module] = args[0].detach().float()

    hooks = [(module, keep) for module in modules]
    seen: dict = {}
    num_layers = kv_geometry(config).num_layers
    # The projection hook keeps the last call's input: each module is called once per forward, so it is that layer's.
    run_probe(model, [_Recorder(seen, layer, tap) for layer in range(num_layers)], hooks)
    tolerance = TOLERANCE.get(model.dtype, 3e-2)
    errors = {}
    for (layer, kind), proj in projections.items():
        if kind not in kinds:
            continue
        x = inputs[proj.module]  # (batch, seq, hidden)
        predicted = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1).double() @ proj.augmented().T.to(x.device)
        truth = seen[(layer, kind)].double()
        errors[(layer, kind)] = float((predicted - truth).norm() / truth.norm().clamp_min(1e-30))
        if errors[(layer, kind)] > tolerance:
            raise ValueError(
                f"basis=weights: {family} layer {layer}: the {kind} the cache receives differs from [W | b]·[x; 1] of "
                f"its projection by {errors[(layer, kind)]:.2%} (tolerance {tolerance:.0e}), so this family's {kind}s "
                "are not the linear projection kvcore-eval assumes: use basis=data"
            )
    return errors


def sequence_basis(rows: torch.Tensor, mask: torch.Tensor | None, rank: int) -> torch.Tensor:
    """Each row's own top-`rank` right singular vectors of its prefill: rows (batch, seq, D), mask (batch, seq)
    nonzero on real tokens (None: all) -> (batch, D, rank), float32. From the float64 Gram of the unmasked tokens, so a
    row with fewer tokens than D still gets a complete orthonormal basis (directions it never used come last)."""
    rows = rows.double()
    if mask is not None:
        rows = rows * mask.to(rows.device, torch.float64).unsqueeze(-1)
    gram = rows.transpose(1, 2) @ rows  # (batch, D, D)
    _, vectors = torch.linalg.eigh(gram)
    return sign_fixed(vectors.flip(-1)[..., :rank]).float()


def _rows(states: torch.Tensor) -> torch.Tensor:
    """(batch, kv_heads, seq, head_dim) -> (batch, seq, D): all KV heads of a token concatenated."""
    return states.transpose(1, 2).flatten(2)


class FixedBasis:
    """One basis for every sequence, calibrated, from the weights, random or a rotation: (D, r) for a layer, or
    (kv_heads, head_dim, r) per head. Its vectors are constants of the model, not stored per token."""

    def __init__(self, vectors: torch.Tensor):
        self.vectors = vectors

    def fresh(self) -> FixedBasis:
        return self

    def prepare(self, states: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> None:
        """Nothing to learn from a prefill."""

    def project(self, states: torch.Tensor) -> torch.Tensor:
        """(batch, kv_heads, seq, head_dim) -> latent (batch, seq, r) [layer] or (batch, kv_heads, seq, r) [heads]."""
        states = states.to(self.vectors.dtype)
        if self.vectors.ndim == 2:
            return _rows(states) @ self.vectors
        return torch.einsum("bhsd,hdr->bhsr", states, self.vectors)

    def reconstruct(self, latent: torch.Tensor, kv_heads: int) -> torch.Tensor:
        """Inverse of `project` up to the dropped directions: latent -> (batch, kv_heads, seq, head_dim)."""
        latent = latent.to(self.vectors.dtype)
        if self.vectors.ndim == 2:
            batch, seq, _ = latent.shape
            return (latent @ self.vectors.T).reshape(batch, seq, kv_heads, -1).transpose(1, 2)
        return torch.einsum("bhsr,hdr->bhsd", latent, self.vectors)

    def stored(self) -> list[torch.Tensor]:
        return []

    def edit(self, change) -> None:
        """Nothing per row to keep in step with a batch edit."""


class SequenceBasis:
    """Each sequence's own rank-r basis (ShadowKV's and xKV's oracle), computed from its prefill with padding left out
    and frozen for the decode steps that follow; its vectors (batch, D, r), in the model's dtype, are stored in the
    cache and counted. `fresh()` gives the state of one cache."""

    def __init__(self, rank: int):
        self.rank = rank
        self.vectors: torch.Tensor | None = None
        self.dtype: torch.dtype | None = None

    def fresh(self) -> SequenceBasis:
        return SequenceBasis(self.rank)

    def prepare(self, states: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> None:
        """states: (batch, kv_heads, seq, head_dim) of the prefill (pre-RoPE keys in float32), mask (batch, seq);
        the basis is kept in the model's `dtype`."""
        if self.vectors is not None:
            return  # frozen after the prefill
        batch, seq = states.shape[0], states.shape[2]
        if mask is not None and tuple(mask.shape) != (batch, seq):
            raise RuntimeError(
                f"a per-sequence basis: the prefill has {batch} x {seq} tokens but the token mask {tuple(mask.shape)}: "
                "the padding of this batch is unknown, so its bases would be wrong"
            )
        self.dtype = dtype
        self.vectors = sequence_basis(_rows(states), mask, self.rank).to(dtype)

    def project(self, states: torch.Tensor) -> torch.Tensor:  # per row: (batch, seq, D) @ (batch, D, r)
        return (_rows(states).float() @ self.vectors.float()).to(self.dtype)

    def reconstruct(self, latent: torch.Tensor, kv_heads: int) -> torch.Tensor:  # (batch, seq, r) @ (batch, r, D)
        rows = latent.float() @ self.vectors.float().transpose(1, 2)
        return rows.unflatten(-1, (kv_heads, -1)).transpose(1, 2)

    def stored(self) -> list[torch.Tensor]:
        return [] if self.vectors is None else [self.vectors]

    def edit(self, change) -> None:
        if self.vectors is not None:
            self.vectors = change(self.vectors)

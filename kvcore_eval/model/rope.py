"""Rotary position embedding exactly as each attention layer applies it, captured at run time.

transformers caches keys *after* RoPE; the paper's K = X·W_k is the key *before* it. Rather than rebuild
cos/sin from positions (positions are not always handed to the cache, rotary modules differ per family and
per layer type, and dynamic/longrope frequencies change with the sequence length), `RopeTap` puts a forward
pre-hook on every attention module and records the `position_embeddings` the model passes to that very
layer in that very forward. Undoing RoPE with those tables inverts what the layer did, whatever the family.

Conventions (the layout of cos/sin and which dimensions pair up) differ by family; they are declared in
`CONVENTIONS` and *verified* against the model's own pre-RoPE key by `kvcore_eval.model.selfcheck`, never trusted.

A cache that undoes and redoes RoPE needs the tables of every cached token at read time. Inference engines recompute
them from the positions, and so does kvcore-eval where it can prove it is exact: a forward hook on each rotary module
(`...RotaryEmbedding`) records the positions it was called with, so the tables of any positions come from the model's
own module (`tables_at`). That is exact where the tables depend on the position alone: refused for rope types whose
frequencies change with the length (dynamic, longrope), and checked, per rotary group, by recomputing the current
forward's tables and comparing them with those the layer received (`recomputable`). Elsewhere the cache keeps the
tables themselves.
RoPE maps each pair (x1, x2) to (x1·cos − x2·sin, x2·cos + x1·sin), a rotation scaled by the rope's
`attention_scaling` (cos² + sin² = s²); its inverse is the opposite rotation divided by s². Partial rotary
(tables narrower than head_dim) rotates only the first `rotary_dim` dimensions.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Convention:
    """How a family's attention reads `position_embeddings`."""

    interleaved: bool = False  # pairs (2i, 2i+1) instead of (i, i + rotary_dim/2)
    sin_first: bool = False  # the tuple is (sin, cos)
    half_width: bool = False  # tables hold one value per pair (repeated to the rotary width)


# Families whose convention is not Llama's rotate-half. Anything else is assumed rotate-half and checked.
CONVENTIONS: dict[str, Convention] = {
    "cohere": Convention(interleaved=True),
    "cohere2": Convention(interleaved=True),
    "gptj": Convention(interleaved=True, sin_first=True, half_width=True),
}


@dataclass(frozen=True)
class RotaryTables:
    """cos, sin of one layer's new tokens: (batch or 1, seq, rotary_dim), as the layer applied them."""

    cos: torch.Tensor
    sin: torch.Tensor
    interleaved: bool


def attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """layer index -> attention module (the `...Attention` modules that own an int `layer_idx`)."""
    found: dict[int, nn.Module] = {}
    for module in model.modules():
        layer_idx = getattr(module, "layer_idx", None)
        if isinstance(layer_idx, int) and type(module).__name__.endswith("Attention"):
            found.setdefault(layer_idx, module)
    return dict(sorted(found.items()))


def _parameters(module: nn.Module) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(module.forward).parameters)


class RopeTap:
    """Records, per layer, the rotary tables the model hands each attention module. Remove with `remove()`.

    `has_rope` is False when no attention module takes `position_embeddings` (GPT-2 style): the cached key
    is then the pre-RoPE key, which `selfcheck` verifies too."""

    def __init__(self, model: nn.Module):
        model_type = getattr(model.config, "model_type", "")
        self.convention = CONVENTIONS.get(model_type, Convention())
        self.layers = attention_modules(model)
        self._tables: dict[int, RotaryTables] = {}
        self._raw: dict[int, torch.Tensor] = {}  # layer -> the first tensor of the tables it received, as given
        self._handles = []
        for layer_idx, module in self.layers.items():
            parameters = list(_parameters(module))
            if "position_embeddings" not in parameters:
                continue
            position = parameters.index("position_embeddings")
            hook = self._recorder(layer_idx, position)
            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        self.has_rope = bool(self._handles)
        self._calls: dict[int, RotaryCall] = {}  # the latest rotary calls, by their first output's id (held: no reuse)
        self._verdicts: dict[int, bool] = {}  # rotary group -> whether its tables are recomputed from positions
        for module in model.modules():
            if self.has_rope and type(module).__name__.endswith("RotaryEmbedding"):
                self._handles.append(module.register_forward_hook(self._rotary_recorder, with_kwargs=True))

    def _rotary_recorder(self, module, args, kwargs, output) -> None:
        positions = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        if positions is None or not isinstance(output, tuple):
            return
        others = {name: value for name, value in kwargs.items() if name != "position_ids"}
        self._calls[id(output[0])] = RotaryCall(module, output[0], positions, tuple(args[2:]), others)
        while len(self._calls) > RECENT_CALLS:  # a module may be called several times a forward (Gemma3: per type)
            del self._calls[next(iter(self._calls))]

    def _recorder(self, layer_idx: int, position: int):
        def record(module, args, kwargs) -> None:
            tables = kwargs.get("position_embeddings", args[position] if len(args) > position else None)
            if tables is not None:
                self._tables[layer_idx] = self._normalize(tables)
                self._raw[layer_idx] = tables[0]

        return record

    def _normalize(self, tables: tuple[torch.Tensor, torch.Tensor]) -> RotaryTables:
        first, second = tables
        cos, sin = (second, first) if self.convention.sin_first else (first, second)
        if self.convention.half_width:
            cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
        return RotaryTables(cos, sin, self.convention.interleaved)

    def tables(self, layer_idx: int) -> RotaryTables:
        """The tables layer `layer_idx` used in the current forward."""
        if layer_idx not in self._tables:
            raise RuntimeError(
                f"layer {layer_idx} reached the cache without rotary tables: its attention module was not "
                "called with position_embeddings, so kvcore-eval cannot undo its RoPE"
            )
        return self._tables[layer_idx]

    def group_of(self, layer_idx: int) -> int:
        """The first layer that received the same tables object in this forward: layers of one group share
        one history of tables (Gemma3's sliding and global layers form two groups, Llama's layers one)."""
        cos = self.tables(layer_idx).cos
        for other in range(layer_idx):
            if other in self._tables and self._tables[other].cos is cos:
                return other
        return layer_idx

    def call_of(self, layer_idx: int) -> RotaryCall | None:
        """The rotary module call that produced layer `layer_idx`'s tables in this forward (None: none known)."""
        raw = self._raw.get(layer_idx)
        call = None if raw is None else self._calls.get(id(raw))
        return call if call is not None and call.output is raw else None

    def positions(self, layer_idx: int) -> torch.Tensor:
        """The positions of this forward's new tokens at layer `layer_idx`: (batch or 1, seq)."""
        return self.call_of(layer_idx).position_ids

    def tables_at(self, layer_idx: int, positions: torch.Tensor) -> RotaryTables:
        """The tables the model's own rotary module gives `positions` (batch or 1, seq), as layer `layer_idx` reads
        them. Calls the module's forward directly: no hook records it."""
        call = self.call_of(layer_idx)
        probe = torch.empty(0, dtype=call.output.dtype, device=call.output.device)
        return self._normalize(
            call.module.forward(probe, positions.to(call.position_ids.dtype), *call.args, **call.kwargs)
        )

    def recomputable(self, layer_idx: int) -> bool:
        """Whether the tables of layer `layer_idx`'s rotary group are recomputed from positions rather than kept: the
        module depends on the position alone (no dynamic or longrope frequencies) and, checked on this forward, gives
        the very tables the layer received. Decided once per group."""
        group = self.group_of(layer_idx)
        if group not in self._verdicts:
            call = self.call_of(group)
            rope_type = getattr(call.module, "rope_type", "default") if call is not None else None
            if isinstance(rope_type, dict):  # one per layer type (Gemma3): the one this call used
                rope_type = rope_type.get(call.args[0] if call.args else call.kwargs.get("layer_type"), "dynamic")
            static = call is not None and "dynamic" not in str(rope_type) and rope_type != "longrope"
            self._verdicts[group] = static and _same(self.tables_at(group, call.position_ids), self.tables(group))
        return self._verdicts[group]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


RECENT_CALLS = 8  # rotary calls remembered: those of the current forward (one per rotary module and layer type)


@dataclass(frozen=True)
class RotaryCall:
    """One call of a rotary module: its first output tensor (what names the tables it made), the positions and the
    other arguments it was called with."""

    module: nn.Module
    output: torch.Tensor
    position_ids: torch.Tensor
    args: tuple
    kwargs: dict


def _same(a: RotaryTables, b: RotaryTables) -> bool:
    """Recomputed tables equal to those the layer received, to float round-off."""
    return a.cos.shape[-1] == b.cos.shape[-1] and all(
        torch.allclose(x.float(), y.float().expand_as(x), rtol=1e-6, atol=1e-7)
        for x, y in ((a.cos, b.cos), (a.sin, b.sin))
    )


def _rotate_pairs(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The 90° turn of each pair: (x1, x2) -> (−x2, x1)."""
    if interleaved:
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply(keys: torch.Tensor, tables: RotaryTables, inverse: bool) -> torch.Tensor:
    cos, sin = (
        tables.cos.unsqueeze(1).to(keys.dtype),
        tables.sin.unsqueeze(1).to(keys.dtype),
    )  # (batch, 1, seq, rotary_dim)
    rotary_dim = cos.shape[-1]
    k_rot, k_pass = keys[..., :rotary_dim], keys[..., rotary_dim:]
    turned = _rotate_pairs(k_rot, tables.interleaved)
    if inverse:
        k_rot = (k_rot * cos - turned * sin) / (cos * cos + sin * sin)
    else:
        k_rot = k_rot * cos + turned * sin
    return torch.cat((k_rot, k_pass), dim=-1)


def rotate(keys: torch.Tensor, tables: RotaryTables) -> torch.Tensor:
    """Apply RoPE. keys: (batch, kv_heads, seq, head_dim)."""
    return _apply(keys, tables, inverse=False)


def unrotate(keys: torch.Tensor, tables: RotaryTables) -> torch.Tensor:
    """Invert `rotate`: the key before RoPE. keys: (batch, kv_heads, seq, head_dim)."""
    return _apply(keys, tables, inverse=True)


def pre_rope_keys(key_states: torch.Tensor, layer_idx: int, tap: RopeTap) -> torch.Tensor:
    """The key before RoPE (float32) from the cached key: (batch, kv_heads, seq, head_dim)."""
    if not tap.has_rope:
        return key_states.float()
    return unrotate(key_states.float(), tap.tables(layer_idx))

"""The quantized caches users already run, as peers on the frontier: transformers' own `QuantizedCache` (KIVI-style
asymmetric integer codes per channel group, from the optimum-quanto or HQQ backend, with the last `residual_length`
tokens kept in full precision), built as transformers builds it and measured from what it holds.

A `QuantizedCache` returns the unquantized states of each call to attention and quantizes only what it stores, so the
prompt's prefill attends exactly and only later tokens read its codes: it runs under `protocol=after_prefill`. Its bytes
are counted from the tensors it holds: every tensor inside the quantized keys and values (codes, scales, zero-points,
as the backend stores them: `__tensor_flatten__` for quanto's tensor subclasses, the metadata for HQQ) and the
full-precision residual window. Light at import (configurations check the backends before anything loads).
"""

from __future__ import annotations

import importlib.util
from typing import Any

BACKENDS = {"quanto": ("optimum.quanto", (2, 4)), "hqq": ("hqq", (1, 2, 3, 4, 8))}
PEERS_EXTRA = 'pip install ".[peers]"'  # optimum-quanto and hqq, the versions tested


def check_backend(backend: str, bits: int | None) -> None:
    """The backend is installed and takes `bits`: one line naming the fix where it is not (before anything loads)."""
    module, widths = BACKENDS[backend]
    if bits not in widths:
        raise ValueError(
            f"peer={backend} quantizes to {', '.join(map(str, widths))} bits, not latent_bits={bits}: pick one of them"
        )
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        raise ValueError(f"peer={backend} needs the {module} package, which is not installed: {PEERS_EXTRA}")


GROUP_SIZE = 64  # QuantizedCache's q_group_size, left at transformers' default: what users run


def check_geometry(backend: str, geometry) -> None:
    """HQQ groups the numbers of a layer's whole state, batch × KV heads × tokens × head_dim, in groups of 64 and
    fails inside its own code where they do not divide: a model whose KV width makes that depend on the length is
    refused."""
    if backend == "hqq" and geometry.width % GROUP_SIZE:
        raise ValueError(
            f"peer=hqq quantizes in groups of {GROUP_SIZE} numbers and this model's KV width is {geometry.width} "
            f"(kv_heads x head_dim): inputs whose length times {geometry.width} is not a multiple of {GROUP_SIZE} fail "
            "inside HQQ: use peer=quanto"
        )


def peer_cache(backend: str, config: Any, bits: int, residual_length: int):
    """transformers' QuantizedCache of `backend` for a model of `config`, as a user would make it."""
    from transformers.cache_utils import QuantizedCache

    return QuantizedCache(backend=backend, config=config, nbits=bits, residual_length=residual_length)


def _tensor_bytes(held: Any) -> int:
    """Bytes of every tensor a quantized state holds, as stored: a plain tensor's own, a tensor subclass's inner
    tensors (`__tensor_flatten__`), the tensors of a tuple or dict (HQQ's codes and metadata)."""
    import torch  # this module is read by config, which stays light

    if isinstance(held, torch.Tensor):
        if hasattr(held, "__tensor_flatten__") and type(held) is not torch.Tensor:
            names, _ = held.__tensor_flatten__()
            return sum(_tensor_bytes(getattr(held, name)) for name in names)
        return held.numel() * held.element_size()
    if isinstance(held, dict):
        return sum(_tensor_bytes(value) for value in held.values())
    if isinstance(held, (tuple, list)):
        return sum(_tensor_bytes(value) for value in held)
    return 0


def stored_bytes(cache) -> dict[str, int]:
    """What a QuantizedCache holds, summed over layers: the quantized keys and values (codes, scales and zero-points
    together) and the full-precision residual window."""
    totals = {"quantized": 0, "residual": 0}
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):
            continue
        totals["quantized"] += _tensor_bytes(layer._quantized_keys) + _tensor_bytes(layer._quantized_values)
        totals["residual"] += _tensor_bytes(layer.keys) + _tensor_bytes(layer.values)
    return totals

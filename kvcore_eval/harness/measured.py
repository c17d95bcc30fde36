"""What `kvcore_hf` measures of its caches over an evaluation, and how processes of a data-parallel run pool it.

Under `accelerate launch` each process scores its share of the requests (lm-eval splits them by rank), and only rank 0
writes the results: the bytes every cache held, the squared errors of what entered them and the documents a calibration
saw are therefore pooled over every process at the end of each request method (all of them call it in step), so that
the results of N processes say what one process's would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# a peer (transformers' QuantizedCache) holds "quantized" states and a "residual" window of full-precision ones
PARTS = ("keys", "values", "scales", "sequence_bases", "rope_tables", "rope_positions", "quantized", "residual")


@dataclass
class CacheMeasures:
    """Sums over caches: bytes held at their end by part, token positions held, caches, and per kind and layer
    [squared error, squared norm] of what entered (when measured)."""

    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PARTS, 0))
    positions: int = 0
    caches: int = 0
    errors: dict[str, list[list[float]]] = field(default_factory=lambda: {"key": [], "value": []})

    def add(self, other: CacheMeasures) -> None:
        for part, size in other.bytes.items():
            self.bytes[part] = self.bytes.get(part, 0) + size
        self.positions += other.positions
        self.caches += other.caches
        for kind, per_layer in other.errors.items():
            if not per_layer:
                continue
            if not self.errors[kind]:
                self.errors[kind] = [[0.0, 0.0] for _ in per_layer]
            for total, (error, norm) in zip(self.errors[kind], per_layer, strict=True):
                total[0] += error
                total[1] += norm

    def per_token(self, full_bytes: float) -> dict[str, Any] | None:
        """Bytes per token held, against a full cache of `full_bytes` a token; None before any position."""
        if self.positions == 0:
            return None
        total = sum(self.bytes.values())
        return {
            "bytes_per_token": total / self.positions,
            "ratio": total / self.positions / full_bytes,
            "parts_per_token": {part: size / self.positions for part, size in self.bytes.items()},
            "positions": self.positions,
            "caches": self.caches,
        }

    def relative_errors(self) -> dict[str, list[float | None]] | None:
        if not self.errors["key"]:
            return None
        return {
            kind: [error / norm if norm > 0 else None for error, norm in per_layer]
            for kind, per_layer in self.errors.items()
        }


def all_processes(value: Any, world_size: int) -> list[Any]:
    """`value` of every process of the run (in rank order), by an all-gather; [value] for one process. Every process
    must call it at the same point."""
    if world_size <= 1:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered

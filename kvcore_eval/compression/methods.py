"""The frontier's methods: each a basis and an allocation of ranks (and bits) over layers, and how it is placed at
a budget. Light (no torch), so that configurations and the command line can name and check them.

A method's one free knob is what the frontier sets by bisection to meet a budget in measured bytes: the rank of every
layer (uniform allocations), the total dimensions a budget allocation spreads over layers and kinds, or nothing (a
method at full rank is one point at its measured bytes).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Method:
    """basis: where the bases come from; allocation: how ranks spread over layers (full: no truncation); bits: stored
    latent bits (None: the model's dtype)."""

    basis: str
    allocation: str
    bits: int | None = None


METHODS = {
    "uniform": Method("data", "uniform"),
    "energy": Method("data", "energy"),
    "ner": Method("data", "ner"),
    "sensitivity": Method("data", "sensitivity"),
    "weights": Method("weights", "uniform"),
    "random": Method("random", "uniform"),
    "sequence": Method("sequence", "uniform"),
    "int8": Method("data", "full", 8),
    "int4": Method("data", "full", 4),
    "lowrank_int8": Method("data", "uniform", 8),
}
BUDGET_ALLOCATIONS = ("energy", "ner", "sensitivity")
# The TruncationConfig fields a method sets at each of its points (beyond the ranks every point sets).
METHOD_FIELDS = ("calibration", "basis", "latent_bits")


def truncation_for(shared: Any, method: Method, knob: int | None, basis: Path, geometry, sensitivity) -> Any:
    """The TruncationConfig of `method` at `knob` (uniform: the rank of every layer; budget allocations: total
    dimensions over layers and kinds; None: full rank), on the options every point shares (`shared`)."""
    extra: dict[str, Any] = {}
    if method.basis != "data":
        extra["basis"] = method.basis
    if method.bits is not None:
        extra["latent_bits"] = method.bits
    if method.allocation == "full" or knob is None:
        ranks = {"key_rank": "full", "value_rank": "full"}
    elif method.allocation == "uniform":
        spec = ":".join([str(knob)] * geometry.num_layers)  # a list: a bare 1 would be refused as ambiguous
        ranks = {"key_rank": spec, "value_rank": spec}
    else:
        ranks = {"rank_budget": knob / (2 * geometry.num_layers * geometry.width), "budget_method": method.allocation}
        if method.allocation == "sensitivity":
            ranks["sensitivity"] = str(sensitivity)
    return replace(shared, calibration=str(basis), truncate="both", overlap="refuse", **ranks, **extra)


def knob_range(method: Method, geometry) -> tuple[int, int]:
    """The knob's bounds: a rank in [1, D], or total dimensions in [2·layers, 2·layers·D]."""
    if method.allocation == "uniform":
        return 1, geometry.width
    return 2 * geometry.num_layers, 2 * geometry.num_layers * geometry.width

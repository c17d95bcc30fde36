"""Rank plans: how many dimensions each layer's cached keys and values keep.

A rank is given as an int (dimensions kept), a float in (0, 1) (a fraction of the width), `full` (no
truncation), a per-layer list (`[8, 16]` in Python, `8:16` in lm-eval model_args, where commas separate
arguments), or a `rank_budget`: a fraction of the truncated cache's memory that the calibration distributes
over layers. A bare `1` or `1.0` is refused: one dimension and full rank are too easy to confuse.
Width is D = kv_heads·head_dim for granularity=layer, head_dim (the rank of every head) for granularity=head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvcore_eval.gram import KEY_SPACES

RankSpec = int | float | str | list[int] | None


@dataclass
class TruncationConfig:
    """The kvcore_hf model_args beyond lm-eval's `hf` ones, validated before any weights load."""

    calibration: str = field(metadata={"help": "artifact directory written by `kvcore-eval calibrate`"})
    key_rank: RankSpec = field(default=None, metadata={"help": "int, fraction of the width, or per-layer list a:b:c"})
    value_rank: RankSpec = field(default=None, metadata={"help": "int, fraction of the width, or per-layer list a:b:c"})
    rank_budget: float | None = field(
        default=None,
        metadata={"help": "fraction of the truncated cache memory kept, spread over layers by the calibration"},
    )
    budget_method: str = field(
        default="energy",
        metadata={
            "help": "energy: keep the largest normalized eigenvalues across layers; ner: ranks proportional to NER; sensitivity: proportional to each layer's measured ND-PPL (needs sensitivity=)"
        },
    )
    key_space: str = field(
        default="pre_rope", metadata={"help": "pre_rope (the paper's K = X·W_k) or post_rope (the cached keys)"}
    )
    granularity: str = field(
        default="layer", metadata={"help": "layer: one basis over all KV heads; head: one basis per head"}
    )
    truncate: str = field(default="both", metadata={"help": "keys, values or both"})
    allow_mismatch: bool = field(
        default=False, metadata={"help": "use an artifact calibrated on another model or revision (loud warning)"}
    )
    sensitivity: str | None = field(
        default=None,
        metadata={"help": "per_layer.json of `kvcore-eval sweep --per-layer`, read by budget_method=sensitivity"},
    )
    attention: str = field(
        default="reconstruct",
        metadata={
            "help": "reconstruct: attention gets K·P·Pᵀ; latent: attends over the stored latents (reads r numbers a token, not D)"
        },
    )

    def __post_init__(self) -> None:
        if self.key_space not in KEY_SPACES:
            raise ValueError(f"key_space={self.key_space!r}: use pre_rope or post_rope")
        if self.granularity not in ("layer", "head"):
            raise ValueError(f"granularity={self.granularity!r}: use layer or head")
        if self.truncate not in ("keys", "values", "both"):
            raise ValueError(f"truncate={self.truncate!r}: use keys, values or both")
        if self.attention not in ("reconstruct", "latent"):
            raise ValueError(f"attention={self.attention!r}: use reconstruct or latent")
        if self.budget_method not in ("energy", "ner", "sensitivity"):
            raise ValueError(f"budget_method={self.budget_method!r}: use energy, ner or sensitivity")
        if (self.budget_method == "sensitivity") != (self.sensitivity is not None):
            raise ValueError(
                "budget_method=sensitivity and sensitivity=<per_layer.json of `kvcore-eval sweep --per-layer`> go together"
            )
        given = [name for name in ("key_rank", "value_rank") if getattr(self, name) is not None]
        for name, kind, truncated in (
            ("key_rank", "keys", self.truncates_keys),
            ("value_rank", "values", self.truncates_values),
        ):
            if getattr(self, name) is not None and not truncated:
                raise ValueError(
                    f"{name}={getattr(self, name)} with truncate={self.truncate} truncates nothing: "
                    f"pass truncate=both (or truncate={kind}), or drop {name}"
                )
        if self.rank_budget is not None:
            if given:
                raise ValueError(
                    f"rank_budget and {given[0]} both given: a budget sets every rank, pass one or the other"
                )
            if not 0 < float(self.rank_budget) <= 1:
                raise ValueError(f"rank_budget={self.rank_budget} must be a fraction in (0, 1]")
            if self.granularity != "layer":
                raise ValueError(
                    "rank_budget is planned over layer spectra: use granularity=layer, or give key_rank/value_rank"
                )
        elif not given:
            raise ValueError("no truncation asked for: pass key_rank=, value_rank= (e.g. 0.25) or rank_budget=")

    @property
    def truncates_keys(self) -> bool:
        return self.truncate in ("keys", "both")

    @property
    def truncates_values(self) -> bool:
        return self.truncate in ("values", "both")


@dataclass(frozen=True)
class RankPlan:
    """Ranks per layer (None: that kind is stored in full), against `width` dimensions per basis."""

    key_rank_per_layer: list[int] | None
    value_rank_per_layer: list[int] | None
    width: int  # D for granularity=layer, head_dim for granularity=head
    granularity: str
    key_space: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "key_rank_per_layer": self.key_rank_per_layer,
            "value_rank_per_layer": self.value_rank_per_layer,
            "width": self.width,
            "granularity": self.granularity,
            "key_space": self.key_space,
        }


def _parse_string(spec: str, name: str) -> RankSpec:
    text = spec.strip()
    if text.lower() == "full":
        return "full"
    parts = [p for p in text.replace(",", ":").replace(" ", ":").strip("[]:").split(":") if p]
    try:
        if len(parts) > 1:
            return [int(p) for p in parts]
        return float(text) if "." in text else int(text)
    except ValueError:
        raise ValueError(
            f"{name}={spec!r} is not a rank: give an int (dimensions), a fraction such as 0.25, full, "
            "or one int per layer joined by ':' (8:16:16)"
        ) from None


def parse_rank(spec: RankSpec, width: int, num_layers: int, name: str) -> list[int]:
    """Per-layer ranks from an int, a fraction, `full`, a per-layer list, or their string forms."""
    if isinstance(spec, str):
        spec = _parse_string(spec, name)
    if isinstance(spec, bool):
        raise ValueError(f"{name}={spec} is not a rank")
    if spec == "full":
        return [width] * num_layers
    if isinstance(spec, (int, float)) and spec == 1:
        raise ValueError(
            f"{name}={spec} is ambiguous: write {name}=full for no truncation, or a list such as "
            f"{':'.join(['1'] * min(num_layers, 3))}... for one dimension per layer"
        )
    if isinstance(spec, (int, float)) and spec <= 0:
        raise ValueError(f"{name}={spec}: a rank must be positive (an int of dimensions, or a fraction such as 0.25)")
    if isinstance(spec, float):
        if not 0 < spec < 1:
            raise ValueError(
                f"{name}={spec}: a fractional rank must be in (0, 1); give an int for a number of dimensions, or full"
            )
        ranks = [max(1, round(spec * width))] * num_layers
    elif isinstance(spec, int):
        ranks = [spec] * num_layers
    else:
        ranks = [int(r) for r in spec]
        if len(ranks) != num_layers:
            raise ValueError(
                f"{name} lists {len(ranks)} ranks but the model has {num_layers} layers: give one per layer"
            )
    for layer, rank in enumerate(ranks):
        if not 0 < rank <= width:
            raise ValueError(
                f"{name}={rank} at layer {layer} is outside 1..{width} (the width for this granularity): "
                f"use at most {width}, or a fraction such as 0.25"
            )
    return ranks


def budget_ranks(
    eigenvalues: list[np.ndarray],
    budget: float,
    method: str,
    ner: list[float] | None = None,
    sensitivity: list[float] | None = None,
) -> list[int]:
    """Split a budget of round(budget·Σ widths) dimensions over the given spectra (one per layer and kind).

    energy: keep the largest trace-normalized eigenvalues across all spectra, which minimizes the sum of the
    layers' relative reconstruction errors Σ_l Σ_{i>r_l} λ_li / tr_l. ner: ranks proportional to NER.
    sensitivity: ranks proportional to each layer's measured ND-PPL when truncated alone (the layers that cost
    most when truncated keep most)."""
    widths = [len(values) for values in eigenvalues]
    total = max(len(widths), round(budget * sum(widths)))
    if method in ("ner", "sensitivity"):
        share = np.asarray(ner if method == "ner" else sensitivity, dtype=np.float64)
        weights = (np.clip(share, 0, None) + 1e-9) * np.asarray(widths)
        return _round_to_total(weights / weights.sum() * total, np.asarray(widths), total)
    normalized = [np.clip(values, 0, None) / max(values.sum(), 1e-300) for values in eigenvalues]
    owners = np.concatenate([np.full(len(values), index) for index, values in enumerate(normalized)])
    order = np.argsort(-np.concatenate(normalized), kind="stable")
    ranks = np.ones(len(widths), dtype=int)  # every spectrum keeps its first direction
    remaining = total - len(widths)
    firsts = {int(np.flatnonzero(owners == index)[0]) for index in range(len(widths))}
    for position in order:
        if remaining <= 0:
            break
        if int(position) in firsts:
            continue
        ranks[owners[position]] += 1
        remaining -= 1
    return ranks.tolist()


def _round_to_total(ideal: np.ndarray, widths: np.ndarray, total: int) -> list[int]:
    """Integer ranks in [1, width] summing to `total`, each as close to its ideal share as the bounds allow."""
    ranks = np.clip(np.floor(ideal), 1, widths).astype(int)
    while ranks.sum() < total:
        room = np.where(ranks < widths, ideal - ranks, -np.inf)
        ranks[int(np.argmax(room))] += 1
    while ranks.sum() > total:
        excess = np.where(ranks > 1, ranks - ideal, -np.inf)
        ranks[int(np.argmax(excess))] -= 1
    return ranks.tolist()


def measured_sensitivity(config: TruncationConfig, spaces: list[str], num_layers: int) -> list[float]:
    """Per (kind, layer), in the order of `spaces`: ND-PPL with only that layer truncated, averaged over the tasks
    of a `sweep --per-layer` run."""
    from pathlib import Path

    from kvcore_eval.outputs import read_json

    table = read_json(Path(config.sensitivity), "per-layer sensitivity table")
    if not isinstance(table, dict) or "nd_ppl" not in table:
        raise ValueError(
            f"sensitivity={config.sensitivity} is not the per_layer.json of `kvcore-eval sweep --per-layer`"
        )
    if table.get("key_space") != config.key_space:
        raise ValueError(
            f"sensitivity={config.sensitivity} was measured on {table.get('key_space')} keys, this plan truncates "
            f"{config.key_space} keys: measure with the same --key-space"
        )
    values = []
    for space in spaces:
        kind = "value" if space == "value" else "key"
        per_task = [task[kind] for task in table["nd_ppl"].values()]
        if any(len(layers) != num_layers for layers in per_task):
            raise ValueError(
                f"sensitivity={config.sensitivity} has {len(per_task[0])} layers, this model {num_layers}: measure this model"
            )
        values += np.mean(per_task, axis=0).tolist()
    return values


def make_plan(config: TruncationConfig, calibration) -> RankPlan:
    """The per-layer ranks a `TruncationConfig` asks for, against a loaded `Calibration`."""
    from kvcore_eval import metrics

    geometry = calibration.geometry
    width = geometry.width if config.granularity == "layer" else geometry.head_dim
    key_space = KEY_SPACES[config.key_space]
    layers = range(geometry.num_layers)
    if config.rank_budget is None:
        key = (
            parse_rank(config.key_rank, width, geometry.num_layers, "key_rank")
            if config.truncates_keys and config.key_rank is not None
            else None
        )
        value = (
            parse_rank(config.value_rank, width, geometry.num_layers, "value_rank")
            if config.truncates_values and config.value_rank is not None
            else None
        )
        return RankPlan(key, value, width, config.granularity, config.key_space)
    spaces = ([key_space] if config.truncates_keys else []) + (["value"] if config.truncates_values else [])
    spectra = [calibration.eigenvalues[space][layer].numpy() for space in spaces for layer in layers]
    ner = [metrics.normalized_effective_rank(metrics.singular_values(values)) for values in spectra]
    sensitivity = (
        measured_sensitivity(config, spaces, geometry.num_layers) if config.budget_method == "sensitivity" else None
    )
    ranks = budget_ranks(spectra, float(config.rank_budget), config.budget_method, ner, sensitivity)
    per_space = {
        space: ranks[i * geometry.num_layers : (i + 1) * geometry.num_layers] for i, space in enumerate(spaces)
    }
    return RankPlan(per_space.get(key_space), per_space.get("value"), width, config.granularity, config.key_space)

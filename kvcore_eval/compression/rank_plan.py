"""Rank plans: how many dimensions each layer's cached keys and values keep, and, for a spectral code, the bits of
each kept dimension.

A rank is given as an int (dimensions kept), a float in (0, 1) (a fraction of the width), `full` (no
truncation), a per-layer list (`[8, 16]` in Python, `8:16` in lm-eval model_args, where commas separate
arguments), or a `rank_budget`: a fraction of the truncated cache's memory, in bytes with every overhead (rotary
tables, quantization scales), that the spectrum distributes over layers; `bits` is the same budget read in bits per
cached number. `budget_method=waterfill` spends it as bits per latent channel (`waterfill.allocate_bits`), the plan
then holding each layer's runs of [bits, channels]. A bare `1` or `1.0` is refused: one dimension and full rank are too
easy to confuse.
Width is D = kv_heads·head_dim for granularity=layer, head_dim (the rank of every head) for granularity=head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvcore_eval import metrics
from kvcore_eval.compression import waterfill
from kvcore_eval.compression.methods import BASES
from kvcore_eval.config import RankSpec, TruncationConfig
from kvcore_eval.outputs import read_json
from kvcore_eval.spaces import KEY_SPACES

Runs = list[list[int]]  # [[bits, channels], ...] in eigen-order: a spectral allocation's segments


@dataclass(frozen=True)
class RankPlan:
    """Ranks per layer (None: that kind is stored in full), against `width` dimensions per basis; for a spectral code,
    each layer's runs of [bits, channels] (None: every kept dimension at the cache's one code)."""

    key_rank_per_layer: list[int] | None
    value_rank_per_layer: list[int] | None
    width: int  # D for granularity=layer, head_dim for granularity=head
    granularity: str
    key_space: str
    key_bits_per_layer: list[Runs] | None = None
    value_bits_per_layer: list[Runs] | None = None

    def bits(self, kind: str, layer: int) -> Runs | None:
        per_layer = self.key_bits_per_layer if kind == "key" else self.value_bits_per_layer
        return None if per_layer is None else per_layer[layer]

    def to_dict(self) -> dict[str, Any]:
        plan = {
            "key_rank_per_layer": self.key_rank_per_layer,
            "value_rank_per_layer": self.value_rank_per_layer,
            "width": self.width,
            "granularity": self.granularity,
            "key_space": self.key_space,
        }
        if self.key_bits_per_layer is not None or self.value_bits_per_layer is not None:
            plan.update(key_bits_per_layer=self.key_bits_per_layer, value_bits_per_layer=self.value_bits_per_layer)
        return plan


def runs_of(bits_per_channel: list[int]) -> Runs:
    """[[bits, channels], ...] of a non-increasing allocation, its dropped tail (0 bits) left out."""
    runs: Runs = []
    for bits in bits_per_channel:
        if bits == 0:
            break
        if runs and runs[-1][0] == bits:
            runs[-1][1] += 1
        else:
            runs.append([bits, 1])
    return runs


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
    """Split a budget of round(budget·Σ widths) dimensions over the given spectra (one per layer and kind): the
    budget in dimensions alone, without overheads (`make_plan` with `bytes_per_token` meets one in bytes)."""
    widths = [len(values) for values in eigenvalues]
    total = max(len(widths), round(budget * sum(widths)))
    return allocate(eigenvalues, total, method, ner, sensitivity)


def allocate(
    eigenvalues: list[np.ndarray],
    total: int,
    method: str,
    ner: list[float] | None = None,
    sensitivity: list[float] | None = None,
) -> list[int]:
    """Split `total` dimensions over the given spectra (one per layer and kind), each rank in [1, width].

    energy: keep the largest trace-normalized eigenvalues across all spectra, which minimizes the sum of the
    layers' relative reconstruction errors Σ_l Σ_{i>r_l} λ_li / tr_l. ner: ranks proportional to NER.
    sensitivity: ranks proportional to each layer's measured ND-PPL when truncated alone (the layers that cost
    most when truncated keep most). uniform: one rank for all, total // spectra."""
    widths = [len(values) for values in eigenvalues]
    if method == "uniform":
        return [min(width, max(1, total // len(widths))) for width in widths]
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


def fit_budget(
    allocate_total: Callable[[int], list[int]], cost: Callable[[list[int]], float], target: float, low: int, high: int
) -> list[int]:
    """The allocation of the largest total in [low, high] dimensions whose cost (bytes per token, overheads
    included) stays within `target`; bisection, cost taken as growing with the total."""
    if cost(allocate_total(high)) <= target:
        return allocate_total(high)
    if cost(allocate_total(low)) > target:
        raise ValueError("over budget")
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if cost(allocate_total(middle)) <= target else (low, middle)
    return allocate_total(low)


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

    if not Path(config.sensitivity).is_file():
        raise ValueError(
            f"sensitivity={config.sensitivity} does not exist: pass the per_layer.json that "
            "`kvcore-eval sweep --per-layer` writes"
        )
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
                f"sensitivity={config.sensitivity} has {len(per_task[0])} layers, this model {num_layers}: "
                "measure this model"
            )
        values += np.mean(per_task, axis=0).tolist()
    return values


def make_plan(
    config: TruncationConfig, calibration, bytes_per_token: Callable[[RankPlan], dict] | None = None
) -> RankPlan:
    """The per-layer ranks (and bits) a `TruncationConfig` asks for, against a loaded `Calibration` (or any basis source
    of `kvcore_eval.compression.bases`). A budget (`rank_budget`, `bits`) is met in bytes when `bytes_per_token`
    (`cache.cache_bytes_per_token` of a plan) is given: the truncated kinds' bytes per token, with what rotates pre-RoPE
    keys and the quantization scales, stay within the budget, as close as whole dimensions (or bits) allow; without
    it, in dimensions alone."""
    geometry = calibration.geometry
    width = geometry.width if config.granularity == "layer" else geometry.head_dim
    key_space = KEY_SPACES[config.key_space]
    layers = range(geometry.num_layers)
    if not config.budgeted:
        whole = [width] * geometry.num_layers if BASES[config.basis].whole else None  # a rotation keeps every dimension

        def ranks(spec, truncated: bool, name: str) -> list[int] | None:
            if not truncated:
                return None
            return whole if spec is None else parse_rank(spec, width, geometry.num_layers, name)

        key = ranks(config.key_rank, config.truncates_keys, "key_rank")
        value = ranks(config.value_rank, config.truncates_values, "value_rank")
        return RankPlan(key, value, width, config.granularity, config.key_space)
    spaces = ([key_space] if config.truncates_keys else []) + (["value"] if config.truncates_values else [])
    spectra = [calibration.eigenvalues[space][layer].numpy() for space in spaces for layer in layers]
    if config.budget_method == "waterfill":
        return _waterfill_plan(config, spectra, spaces, width, geometry.num_layers, bytes_per_token)
    ner = [metrics.normalized_effective_rank(metrics.singular_values(values)) for values in spectra]
    sensitivity = (
        measured_sensitivity(config, spaces, geometry.num_layers) if config.budget_method == "sensitivity" else None
    )

    def plan_of(ranks: list[int] | None) -> RankPlan:  # None: the full cache
        ranks = ranks or [width] * len(spectra)
        per_space = {space: ranks[i * len(layers) : (i + 1) * len(layers)] for i, space in enumerate(spaces)}
        return RankPlan(per_space.get(key_space), per_space.get("value"), width, config.granularity, config.key_space)

    if bytes_per_token is None:
        fraction = config.rank_budget if config.rank_budget is not None else None
        if fraction is None:
            raise ValueError("bits= is a budget in bytes: it needs the model's bytes per token (kvcore_hf plans it)")
        return plan_of(budget_ranks(spectra, float(fraction), config.budget_method, ner, sensitivity))
    budgeted, target = _budget_in_bytes(config, spaces, width, plan_of, bytes_per_token, len(spectra))
    try:
        ranks = fit_budget(
            lambda total: allocate(spectra, total, config.budget_method, ner, sensitivity),
            budgeted,
            target,
            len(spectra),
            width * len(spectra),
        )
    except ValueError:
        least = budgeted([1] * len(spectra)) / target
        raise ValueError(
            f"{_budget_name(config)} cannot be met: one dimension per layer and kind, with the rotary tables and "
            f"scales, already costs {least * _budget_value(config):.1%} of the full cache: raise {_budget_name(config)}"
            if config.bits is None
            else f"{_budget_name(config)} cannot be met: one dimension per layer and kind, with the rotary positions "
            f"and scales, already costs {least * config.bits:.2f} bits per number: raise bits"
        ) from None
    return plan_of(ranks)


def _budget_name(config: TruncationConfig) -> str:
    return f"rank_budget={config.rank_budget}" if config.bits is None else f"bits={config.bits}"


def _budget_value(config: TruncationConfig) -> float:
    return float(config.rank_budget) if config.bits is None else float(config.bits)


def _budget_in_bytes(config, spaces, width, plan_of, bytes_per_token, spectra: int):
    """(cost of a candidate in bytes per token of the truncated kinds, overheads included; the budget in bytes)."""
    kinds = (["keys"] if config.truncates_keys else []) + (["values"] if config.truncates_values else [])

    def budgeted(candidate) -> float:
        parts = bytes_per_token(plan_of(candidate))
        return sum(parts[kind] for kind in kinds) + parts.get("rope_tables", 0.0) + parts.get("rope_positions", 0.0)

    full = bytes_per_token(plan_of(None))["full"] / 2 * len(spaces)  # the truncated kinds' share of a full cache
    if config.bits is not None:  # bits per cached number: the full cache's numbers, at that many bits each
        numbers = full / bytes_per_token(plan_of(None))["element_size"]
        return budgeted, float(config.bits) / 8 * numbers
    return budgeted, float(config.rank_budget) * full


def _waterfill_plan(config, spectra, spaces, width: int, num_layers: int, bytes_per_token) -> RankPlan:
    """Bits per latent channel by reverse water-filling (`waterfill.allocate_bits`), the allocator's total bisected
    until the plan's exact bytes (codes, scales, rotary positions) meet the budget. Every spectrum keeps at least its
    first channel (at the lowest width), so that every layer stores something to rebuild from."""
    key_space = KEY_SPACES[config.key_space]
    scheme = config.scheme

    def allocation(total: int) -> list[list[int]]:
        bits = waterfill.allocate_bits(spectra, total, scheme, config.weighting)
        return [b if b[0] > 0 else [1] + b[1:] for b in bits]

    def plan_of(candidate) -> RankPlan:
        if candidate is None:  # the full cache
            return RankPlan(None, None, width, config.granularity, config.key_space)
        runs = [runs_of(bits) for bits in candidate]
        per_space = {space: runs[i * num_layers : (i + 1) * num_layers] for i, space in enumerate(spaces)}
        ranks = {space: [sum(c for _, c in r) for r in per_space[space]] for space in per_space}
        return RankPlan(
            ranks.get(key_space),
            ranks.get("value"),
            width,
            config.granularity,
            config.key_space,
            per_space.get(key_space),
            per_space.get("value"),
        )

    if bytes_per_token is None:
        raise ValueError("budget_method=waterfill plans in bytes: it needs the model's bytes per token")
    budgeted, target = _budget_in_bytes(config, spaces, width, plan_of, bytes_per_token, len(spectra))
    top = int(waterfill.allocation_cost([[waterfill.LEVELS[-1]] * width] * len(spectra), scheme)) + 1
    try:
        chosen = fit_budget(allocation, lambda bits: budgeted(bits), target, 0, top)
    except ValueError:
        raise ValueError(
            f"{_budget_name(config)} cannot be met: one channel per layer and kind at 1 bit, with its scale and the "
            "rotary positions, already costs more: raise it"
        ) from None
    return plan_of(chosen)

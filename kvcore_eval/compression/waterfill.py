"""Bits per latent channel by reverse water-filling on the calibrated spectrum, and the limit every code is held to.

A layer's keys (or values) in their eigenbasis are channels of variance λ_i. For a Gaussian source, the least mean
squared error at R bits a vector is the rate–distortion bound

    D(θ) = Σ_i min(θ, λ_i)   at   R(θ) = Σ_i max(0, ½·log₂(λ_i / θ))        (reverse water-filling)

and a code that knows the spectrum beats one that does not by the ratio of the λ's arithmetic to geometric mean (the
coding gain). Low rank (bits ∈ {16, 0}) and uniform intN (N bits everywhere, no basis) are two corners of it.

`allocate_bits` spends a budget the way the bound does, in integers and with the quantizer's own error: a channel at b
bits costs b bits plus its share of its group's scale, and leaves λ_i·ε(b) of squared error, ε measured on the code the
cache stores (`quantize.relative_error`; ε(0) = 1: the channel dropped). For a multiplier θ each channel takes the level
minimizing w_i·ε(b) + θ·cost(b); θ is bisected until the total cost meets the budget. Each such allocation is the least
distortion of any allocation that costs no more (Lagrangian optimality, tested against a brute force), and since the
chosen level grows with w_i, bits never increase along a spectrum sorted in decreasing order: a latent is a few
contiguous segments.

Weighting (`weighting`): `relative` (default) minimizes Σ_layers,kinds D_l / tr_l, the sum of each layer's relative
error, as the `energy` rank allocation does: layers are comparable whatever their scale (layer 0's keys can carry 100×
the energy of a middle layer's, and an absolute weighting would spend most bits there). `absolute` minimizes Σ D_l,
the plain squared error summed over layers; both are measured in the frontier (docs/frontier.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from kvcore_eval.compression.quantize import GROUP_SIZE, relative_error

LEVELS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 16)  # bits a latent channel may get (16: a 16-bit float, no scale)
SCALE_BITS = 16  # one float16 scale a group of GROUP_SIZE channels
WEIGHTINGS = ("relative", "absolute")


def channel_costs(levels: Sequence[int], scheme: str) -> np.ndarray:
    """Bits one channel costs at each level: its code plus its share of its group's scale(s)."""
    scales = 2 if scheme == "minmax" else 1
    return np.array([0.0 if b == 0 else b + (0 if b == 16 else scales * SCALE_BITS / GROUP_SIZE) for b in levels])


def channel_errors(levels: Sequence[int], scheme: str) -> np.ndarray:
    """Relative squared error of one unit-variance channel at each level (the code the cache stores)."""
    return np.array([relative_error(b, scheme) for b in levels])


def weights(spectra: Sequence[np.ndarray], weighting: str) -> list[np.ndarray]:
    """Each channel's weight in the objective: λ_i / tr (relative) or λ_i (absolute), negatives clipped."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}: use {' or '.join(WEIGHTINGS)}")
    clipped = [np.clip(np.asarray(values, dtype=np.float64), 0, None) for values in spectra]
    if weighting == "absolute":
        return clipped
    return [values / max(values.sum(), 1e-300) for values in clipped]


def _levels_at(theta: float, w: np.ndarray, errors: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """The level index minimizing w·ε + θ·cost for every channel (ties: the cheaper level)."""
    objective = w[:, None] * errors[None, :] + theta * costs[None, :]  # (channels, levels)
    return objective.argmin(axis=1)


def allocate_bits(
    spectra: Sequence[np.ndarray],
    budget: float,
    scheme: str = "midrise",
    weighting: str = "relative",
    levels: Sequence[int] = LEVELS,
) -> list[list[int]]:
    """Bits per channel for each spectrum (eigenvalues in decreasing order), whose total cost (`channel_costs`) is at
    most `budget` bits, by bisection on the water level θ. Every allocation returned minimizes the total weighted
    distortion among allocations that cost no more than it does."""
    levels = tuple(levels)
    costs, errors = channel_costs(levels, scheme), channel_errors(levels, scheme)
    w = np.concatenate(weights(spectra, weighting))
    sizes = [len(values) for values in spectra]

    def cost_at(theta: float) -> float:
        return float(costs[_levels_at(theta, w, errors, costs)].sum())

    positive = w[w > 0]
    scale = float(positive.max()) if positive.size else 1.0
    low, high = scale * 1e-18, scale * 1e3  # θ high: every channel dropped (cost 0); θ low: every channel at the top
    if cost_at(low) <= budget:
        high = low
    else:
        for _ in range(200):  # geometric bisection: the answer spans many orders of magnitude
            middle = math.sqrt(low * high)
            low, high = (low, middle) if cost_at(middle) <= budget else (middle, high)
            if high / low < 1 + 1e-12:
                break
    chosen = np.asarray(levels)[_levels_at(high, w, errors, costs)]
    allocations, start = [], 0
    for size in sizes:
        allocations.append([int(b) for b in chosen[start : start + size]])
        start += size
    return allocations


def allocation_cost(allocation: Sequence[Sequence[int]], scheme: str = "midrise") -> float:
    """The allocator's cost model of an allocation, in bits (codes and amortized scales)."""
    costs = dict(zip(LEVELS, channel_costs(LEVELS, scheme), strict=True))
    return float(sum(costs[b] for bits in allocation for b in bits))


def allocation_error(
    spectra: Sequence[np.ndarray], allocation: Sequence[Sequence[int]], scheme: str = "midrise", weighting="relative"
) -> float:
    """Σ w_i·ε(b_i): the weighted squared error an allocation is expected to leave (`allocate_bits`' objective)."""
    errors = dict(zip(LEVELS, channel_errors(LEVELS, scheme), strict=True))
    return float(
        sum(
            (w * np.array([errors[b] for b in bits])).sum()
            for w, bits in zip(weights(spectra, weighting), allocation, strict=True)
        )
    )


def water_level(eigenvalues: np.ndarray, rate: float) -> float:
    """θ of reverse water-filling at `rate` bits a vector: Σ max(0, ½·log₂(λ_i/θ)) = rate (bisection)."""
    values = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0, None)
    positive = values[values > 0]
    if rate <= 0 or positive.size == 0:
        return float(positive.max()) if positive.size else 0.0
    low, high = float(positive.min()) * 2.0 ** (-2 * rate / positive.size) * 1e-3, float(positive.max())
    for _ in range(300):
        middle = math.sqrt(low * high)
        spent = float(np.maximum(0.0, 0.5 * np.log2(positive / middle)).sum())
        low, high = (middle, high) if spent > rate else (low, middle)
        if high / low < 1 + 1e-13:
            break
    return math.sqrt(low * high)


def rd_bound(eigenvalues: np.ndarray, rate: float) -> float:
    """The Gaussian rate–distortion bound of a spectrum at `rate` bits a vector, relative to its energy:
    Σ min(θ, λ_i) / Σ λ_i. 0 bits: 1 (nothing kept)."""
    values = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0, None)
    total = values.sum()
    if total <= 0:
        return 0.0
    theta = water_level(values, rate)
    return float(np.minimum(theta, values).sum() / total)


def joint_rd_bound(spectra: Sequence[np.ndarray], rate: float, weighting: str = "relative") -> float:
    """The least mean of the layers' (and kinds') relative errors any code reaches at `rate` bits in all, for
    Gaussian sources of these spectra: reverse water-filling over every weighted channel at once, the mean over
    spectra of Σ_i min(θ, w_i) (relative weighting: each spectrum normalized to unit energy)."""
    w = np.concatenate(weights(spectra, weighting))
    theta = water_level(w, rate)
    totals = [max(values.sum(), 1e-300) for values in weights(spectra, weighting)]
    per_spectrum, start = [], 0
    for values, total in zip(weights(spectra, weighting), totals, strict=True):
        per_spectrum.append(float(np.minimum(theta, w[start : start + len(values)]).sum() / total))
        start += len(values)
    return float(np.mean(per_spectrum))


def coding_gain_db(eigenvalues: np.ndarray) -> float:
    """10·log₁₀ of the arithmetic over the geometric mean of the positive eigenvalues: the squared error a code that
    knows the spectrum saves over one that does not, at high rate."""
    values = np.asarray(eigenvalues, dtype=np.float64)
    values = values[values > 0]
    if values.size == 0:
        return 0.0
    return float(10 * (np.log10(values.mean()) - np.log10(values).mean()))

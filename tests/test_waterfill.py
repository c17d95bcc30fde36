"""Reverse water-filling: the integer allocation is the optimum a brute force finds, bits never increase along a
spectrum, and the rate–distortion bound has its closed form where there is one."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from kvcore_eval.compression import waterfill
from kvcore_eval.compression.quantize import relative_error

SMALL_LEVELS = (0, 1, 2, 3, 4)


def brute_force(spectra, cost_limit: float, scheme: str = "midrise") -> float:
    """The least weighted distortion of any allocation over SMALL_LEVELS that costs at most `cost_limit`."""
    widths = [len(s) for s in spectra]
    best = math.inf
    for combo in itertools.product(SMALL_LEVELS, repeat=sum(widths)):
        split, start = [], 0
        for width in widths:
            split.append(list(combo[start : start + width]))
            start += width
        if waterfill.allocation_cost(split, scheme) <= cost_limit + 1e-9:
            best = min(best, waterfill.allocation_error(spectra, split, scheme))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_the_integer_allocation_is_the_brute_force_optimum_on_small_spectra(seed):
    rng = np.random.default_rng(seed)
    spectra = [np.sort(rng.exponential(size=3) * scale)[::-1] for scale in (1.0, 20.0)]
    for budget in (2.0, 5.5, 9.0, 14.0):
        allocation = waterfill.allocate_bits(spectra, budget, levels=SMALL_LEVELS)
        cost = waterfill.allocation_cost(allocation)
        assert cost <= budget
        assert waterfill.allocation_error(spectra, allocation) == pytest.approx(brute_force(spectra, cost), rel=1e-12)


def test_bits_never_increase_along_a_spectrum_and_grow_with_the_budget():
    spectra = [np.geomspace(100.0, 1e-4, 64), np.geomspace(3.0, 1e-2, 64)]
    previous = None
    for budget in (16, 64, 128, 256, 512):
        allocation = waterfill.allocate_bits(spectra, budget)
        for bits in allocation:
            assert bits == sorted(bits, reverse=True)
        assert waterfill.allocation_cost(allocation) <= budget
        if previous is not None:
            assert all(
                b >= a for new, old in zip(allocation, previous, strict=True) for b, a in zip(new, old, strict=True)
            )
        previous = allocation


def test_relative_weighting_treats_layers_alike_absolute_follows_the_energy():
    loud, quiet = np.geomspace(1e4, 1e2, 16), np.geomspace(1.0, 1e-2, 16)  # the same shape, 10^4 apart
    relative = waterfill.allocate_bits([loud, quiet], 64, weighting="relative")
    absolute = waterfill.allocate_bits([loud, quiet], 64, weighting="absolute")
    assert relative[0] == relative[1], "same shape, same bits, whatever the scale"
    assert sum(absolute[0]) > sum(absolute[1])


def test_the_bound_of_a_flat_spectrum_is_its_closed_form():
    """n channels of variance λ at R bits a vector: D/Σλ = 2^(−2R/n) (R ≤ n·½·log₂(λ/0) always holds here)."""
    for n, rate in ((8, 4.0), (64, 64.0), (192, 384.0)):
        assert waterfill.rd_bound(np.full(n, 3.7), rate) == pytest.approx(2 ** (-2 * rate / n), rel=1e-9)
    assert waterfill.rd_bound(np.full(5, 2.0), 0.0) == pytest.approx(1.0)


def test_the_bound_water_fills_a_two_level_spectrum():
    """λ = (4, 1): below 1 bit all of it goes to the first channel (θ = 4·2^(−2R), D = θ + 1); above, both share."""
    values = np.array([4.0, 1.0])
    assert waterfill.rd_bound(values, 0.5) == pytest.approx((4 * 2**-1 + 1) / 5, rel=1e-9)
    theta = 2 ** (-(2 * 3.0 - 2) / 2)  # R = 3: ½log₂(4/θ) + ½log₂(1/θ) = 3
    assert waterfill.rd_bound(values, 3.0) == pytest.approx(2 * theta / 5, rel=1e-9)
    assert waterfill.joint_rd_bound([values], 3.0) == pytest.approx(waterfill.rd_bound(values, 3.0), rel=1e-9)


def test_the_joint_bound_is_below_any_split_of_the_bits():
    spectra = [np.geomspace(10.0, 1e-3, 32), np.geomspace(1.0, 1e-1, 32)]
    joint = waterfill.joint_rd_bound(spectra, 64.0)
    for share in (0.2, 0.5, 0.8):
        split = np.mean(
            [waterfill.rd_bound(s, r) for s, r in zip(spectra, (64 * share, 64 * (1 - share)), strict=True)]
        )
        assert joint <= split + 1e-12


def test_coding_gain_is_zero_for_a_flat_spectrum_and_the_mean_ratio_otherwise():
    assert waterfill.coding_gain_db(np.full(10, 2.0)) == pytest.approx(0.0, abs=1e-12)
    values = np.array([8.0, 2.0])  # arithmetic mean 5, geometric mean 4
    assert waterfill.coding_gain_db(values) == pytest.approx(10 * math.log10(5 / 4))


def test_the_distortion_model_is_the_stored_codes_error():
    errors = [relative_error(b, "midrise") for b in (0, 1, 2, 3, 4, 8, 16)]
    assert errors[0] == 1.0 and all(a > b for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 1e-6, "16 bits: float16 round-off"
    assert relative_error(2, "midrise") < relative_error(2, "minmax") < relative_error(2, "absmax")

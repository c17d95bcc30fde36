"""Spectral and quality metrics: NER, effective rank, energy ranks, ND-PPL, correlations (scipy.stats).

Plain numpy on 1-D spectra so that a reader can check each line against the method notes.
"""

from __future__ import annotations

import math

import numpy as np


def singular_values(eigenvalues: np.ndarray) -> np.ndarray:
    """σ_i = sqrt(λ_i) of a Gram's eigenvalues (round-off negatives clipped to 0), sorted descending."""
    return np.sqrt(np.clip(np.sort(np.asarray(eigenvalues, dtype=np.float64))[::-1], 0.0, None))


def effective_rank(singular: np.ndarray) -> float:
    """Roy & Vetterli (2007): exp of the Shannon entropy of p_i = σ_i / Σσ_j (0·log 0 = 0)."""
    singular = np.asarray(singular, dtype=np.float64)
    total = singular.sum()
    if total <= 0:
        return 0.0
    p = singular[singular > 0] / total
    return float(math.exp(-(p * np.log(p)).sum()))


def normalized_effective_rank(singular: np.ndarray) -> float:
    """NER = effective rank / D, in (0, 1]: near 1 the layer uses its whole width."""
    return effective_rank(singular) / len(singular)


def energy_rank(eigenvalues: np.ndarray, fraction: float) -> int:
    """Smallest r whose top-r eigenvalues hold `fraction` of Σλ (the squared Frobenius norm of K)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"energy fraction must be in (0, 1], got {fraction}")
    energy = np.clip(np.sort(np.asarray(eigenvalues, dtype=np.float64))[::-1], 0.0, None)
    cumulative = np.cumsum(energy)
    if cumulative[-1] <= 0:
        return 0
    return int(np.searchsorted(cumulative, fraction * cumulative[-1] * (1 - 1e-12)) + 1)


def residual_energy(eigenvalues: np.ndarray, rank: int) -> float:
    """‖K − K·V_r·V_rᵀ‖_F² = Σ_{i>r} λ_i (Eckart–Young–Mirsky), as a fraction of ‖K‖_F²."""
    energy = np.clip(np.sort(np.asarray(eigenvalues, dtype=np.float64))[::-1], 0.0, None)
    return float(energy[rank:].sum() / energy.sum()) if energy.sum() > 0 else 0.0


def nd_ppl(ppl_truncated: float, ppl_full: float) -> float:
    """Normalized delta perplexity: (PPL_truncated − PPL_full) / PPL_full."""
    if ppl_full <= 0:
        raise ValueError(f"full-rank perplexity must be positive, got {ppl_full}")
    return (ppl_truncated - ppl_full) / ppl_full


def correlation(x, y) -> dict[str, float]:
    """Pearson r and Spearman ρ with their two-sided p-values (scipy.stats), and n. NaN where they are undefined
    (fewer than 3 points, or a constant input), never a made-up number."""
    import warnings

    from scipy import stats

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"correlation needs equal lengths, got {len(x)} and {len(y)}")
    undefined = {
        "pearson": float("nan"),
        "pearson_p": float("nan"),
        "spearman": float("nan"),
        "spearman_p": float("nan"),
        "n": len(x),
    }
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return undefined
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on near-constant input; the NaN it returns says it
        pearson, spearman = stats.pearsonr(x, y), stats.spearmanr(x, y)
    return {
        "pearson": float(pearson.statistic),
        "pearson_p": float(pearson.pvalue),
        "spearman": float(spearman.statistic),
        "spearman_p": float(spearman.pvalue),
        "n": len(x),
    }

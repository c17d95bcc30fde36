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


def residual_energy_under(eigenvalues: np.ndarray, eigenvectors: np.ndarray, basis: np.ndarray) -> float:
    """‖K − K·P·Pᵀ‖_F² / ‖K‖_F² = (tr G − tr PᵀGP) / tr G for another basis P (D, r), with G = KᵀK = V·diag(λ)·Vᵀ
    given by its eigenvalues (D,) and eigenvectors (D, D): tr PᵀGP = Σ_i λ_i ‖Pᵀv_i‖². With P = V's top r columns
    it equals `residual_energy`."""
    energy = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
    total = energy.sum()
    if total <= 0:
        return 0.0
    captured = ((np.asarray(basis, dtype=np.float64).T @ np.asarray(eigenvectors, dtype=np.float64)) ** 2).sum(axis=0)
    return float(max(0.0, total - (energy * captured).sum()) / total)


# metric -> per-document value from lm-eval's logged (loglikelihood, count) pair
PERPLEXITY_METRICS = {
    "byte_perplexity": lambda ll, count: math.exp(-ll / count),
    "word_perplexity": lambda ll, count: math.exp(-ll / count),
    "bits_per_byte": lambda ll, count: -ll / count / math.log(2),
}
# Those that are exp(-Σ loglikelihood / Σ count) over documents: what a paired bootstrap of ND-PPL resamples
# (bits_per_byte logs the same pairs, but its relative change is not that perplexity ratio).
WEIGHTED_PERPLEXITIES = ("byte_perplexity", "word_perplexity")


def nd_ppl(ppl_truncated: float, ppl_full: float) -> float:
    """Normalized delta perplexity: (PPL_truncated − PPL_full) / PPL_full."""
    if ppl_full <= 0:
        raise ValueError(f"full-rank perplexity must be positive, got {ppl_full}")
    return (ppl_truncated - ppl_full) / ppl_full


BOOTSTRAP_ITERATIONS = 2000
CONFIDENCE = 0.95


def paired_bootstrap_nd_ppl(
    truncated: dict[str, tuple[float, float]],
    full: dict[str, tuple[float, float]],
    iterations: int = BOOTSTRAP_ITERATIONS,
    seed: int = 0,
) -> dict[str, float]:
    """A 95 % percentile interval for the ND-PPL of a weighted perplexity, exp(−Σll/Σcount), by a paired bootstrap
    over documents: each resample draws documents with replacement and takes the same documents' log-likelihoods
    under the truncation and under the full cache. `truncated`, `full`: doc_id -> (loglikelihood, count).
    `within_noise` is True when the interval holds 0."""
    if truncated.keys() != full.keys() or not full:
        raise ValueError("a paired bootstrap needs the same, non-empty documents at both points: rerun both")
    docs = sorted(full)
    ll_truncated = np.array([truncated[d][0] for d in docs], dtype=np.float64)
    ll_full = np.array([full[d][0] for d in docs], dtype=np.float64)
    counts = np.array([full[d][1] for d in docs], dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(docs), size=(iterations, len(docs)))  # (iterations, n)
    deltas = np.expm1((ll_full[picks].sum(1) - ll_truncated[picks].sum(1)) / counts[picks].sum(1))
    low, high = np.quantile(deltas, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return {
        "low": float(low),
        "high": float(high),
        "stderr": float(deltas.std(ddof=1)) if iterations > 1 else float("nan"),
        "n": len(docs),
        "within_noise": bool(low <= 0 <= high),
    }


def bootstrap_stderr_of_mean(values, iterations: int = BOOTSTRAP_ITERATIONS, seed: int = 0) -> float:
    """The standard error of a mean by a seeded bootstrap over the values (NaN below 2 values)."""
    values = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if len(values) < 2:
        return float("nan")
    picks = np.random.default_rng(seed).integers(0, len(values), size=(iterations, len(values)))
    return float(values[picks].mean(1).std(ddof=1))


MIN_POINTS_FOR_P = 4  # with 3 points a rank correlation of ±1 has p = 1/3 at best: no p-value worth printing
EXACT_P_UP_TO = 8  # up to 8 points every ordering is enumerated (8! = 40320): an exact permutation p-value


def correlation(x, y) -> dict[str, float]:
    """Pearson r and Spearman ρ with their two-sided p-values, and n. Up to EXACT_P_UP_TO points the p-values are
    exact permutation p-values (every ordering of y; scipy's PermutationMethod), where the t and normal
    approximations are far off (4 documents at ρ = −1: p = 1/12, not 0); beyond, scipy.stats' own. NaN where
    they are undefined (fewer than 3 points, or a constant input), and p-values NaN below MIN_POINTS_FOR_P points:
    never a made-up number."""
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
        p_values = permutation_p_values(x, y) if len(x) <= EXACT_P_UP_TO else (pearson.pvalue, spearman.pvalue)
    with_p = len(x) >= MIN_POINTS_FOR_P
    return {
        "pearson": float(pearson.statistic),
        "pearson_p": float(p_values[0]) if with_p else float("nan"),
        "spearman": float(spearman.statistic),
        "spearman_p": float(p_values[1]) if with_p else float("nan"),
        "n": len(x),
    }


def permutation_p_values(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Exact two-sided permutation p-values of Pearson's r and Spearman's ρ (r of the ranks), over all n! orderings."""
    from scipy import stats

    exact = stats.PermutationMethod(n_resamples=np.inf)
    return (
        float(stats.pearsonr(x, y, method=exact).pvalue),
        float(stats.pearsonr(stats.rankdata(x), stats.rankdata(y), method=exact).pvalue),
    )

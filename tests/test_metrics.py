import numpy as np
import pytest
from scipy import stats

from kvcore_eval import metrics


def test_ner_of_flat_spectrum_is_one():
    assert metrics.normalized_effective_rank(np.ones(64)) == pytest.approx(1.0)


def test_ner_of_one_hot_spectrum_is_one_over_d():
    singular = np.zeros(64)
    singular[0] = 5.0
    assert metrics.normalized_effective_rank(singular) == pytest.approx(1 / 64)


def test_ner_of_random_low_rank_matrix_is_bounded_by_its_rank():
    rng = np.random.default_rng(0)
    for rank in (1, 4, 16):
        matrix = rng.normal(size=(500, rank)) @ rng.normal(size=(rank, 64))
        eigenvalues = np.linalg.eigvalsh(matrix.T @ matrix)
        erank = metrics.effective_rank(metrics.singular_values(eigenvalues))
        assert 0.5 * rank <= erank <= rank * (1 + 1e-3)  # round-off eigenvalues add a sliver of entropy
    full = rng.normal(size=(5000, 64))
    assert metrics.normalized_effective_rank(metrics.singular_values(np.linalg.eigvalsh(full.T @ full))) > 0.95


def test_effective_rank_matches_entropy_definition():
    singular = np.array([4.0, 2.0, 1.0, 1.0])
    p = singular / singular.sum()
    assert metrics.effective_rank(singular) == pytest.approx(np.exp(stats.entropy(p)))


def test_energy_rank_and_residual_energy():
    eigenvalues = np.array([1.0, 6.0, 3.0])  # any order: sorted inside
    assert metrics.energy_rank(eigenvalues, 0.6) == 1
    assert metrics.energy_rank(eigenvalues, 0.61) == 2
    assert metrics.energy_rank(eigenvalues, 1.0) == 3
    assert metrics.residual_energy(eigenvalues, 1) == pytest.approx(0.4)
    assert metrics.residual_energy(eigenvalues, 3) == 0.0
    with pytest.raises(ValueError, match="energy fraction"):
        metrics.energy_rank(eigenvalues, 0.0)


def test_nd_ppl():
    assert metrics.nd_ppl(12.0, 10.0) == pytest.approx(0.2)
    assert metrics.nd_ppl(10.0, 10.0) == 0.0
    with pytest.raises(ValueError, match="positive"):
        metrics.nd_ppl(1.0, 0.0)


def test_correlation_reports_r_rho_p_and_n():
    rng = np.random.default_rng(3)
    x = rng.normal(size=40)
    y = 0.6 * x + rng.normal(size=40)
    got = metrics.correlation(x, y)
    assert got["pearson"] == pytest.approx(stats.pearsonr(x, y)[0]) and got["pearson_p"] == pytest.approx(
        stats.pearsonr(x, y)[1]
    )
    assert got["spearman"] == pytest.approx(stats.spearmanr(x, y)[0]) and got["n"] == 40
    assert 0 < got["pearson_p"] < 0.01
    for x_bad, y_bad in (([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]), ([1.0, 2.0], [2.0, 1.0])):
        undefined = metrics.correlation(x_bad, y_bad)
        assert np.isnan(undefined["pearson"]) and np.isnan(undefined["spearman_p"]) and undefined["n"] == len(x_bad)


def test_residual_energy_under_another_basis_is_the_projection_error():
    from kvcore_eval.metrics import residual_energy, residual_energy_under

    rng = np.random.default_rng(0)
    keys = rng.normal(size=(200, 12)) @ np.diag(np.linspace(3, 0.1, 12))  # (tokens, D)
    eigenvalues, eigenvectors = np.linalg.eigh(keys.T @ keys)
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
    basis, _ = np.linalg.qr(rng.normal(size=(12, 4)))  # (D, r) orthonormal, not the keys' own
    direct = np.linalg.norm(keys - keys @ basis @ basis.T) ** 2 / np.linalg.norm(keys) ** 2
    assert residual_energy_under(eigenvalues, eigenvectors, basis) == pytest.approx(direct, rel=1e-10)
    own = residual_energy_under(eigenvalues, eigenvectors, eigenvectors[:, :4])
    assert own == pytest.approx(residual_energy(eigenvalues, 4), rel=1e-10)


def test_no_p_value_from_fewer_than_four_points():
    from kvcore_eval.analysis.study import format_correlation

    three = metrics.correlation([0.1, 0.2, 0.3], [3.0, 2.0, 1.0])
    assert three["spearman"] == pytest.approx(-1.0) and np.isnan(three["spearman_p"]) and np.isnan(three["pearson_p"])
    assert "p=" not in format_correlation(three) and "too few points for a p-value" in format_correlation(three)
    four = metrics.correlation([0.1, 0.2, 0.3, 0.5], [3.0, 2.0, 1.5, 1.0])
    assert four["spearman"] == pytest.approx(-1.0) and four["spearman_p"] == pytest.approx(1 / 12)


def test_small_samples_get_exact_permutation_p_values_never_zero():
    """4 documents at ρ = −1: two of the 24 orderings are as extreme, p = 1/12 (the normal approximation says 0).
    Up to 8 points every ordering is counted; Pearson's p is checked against a brute-force enumeration."""
    import itertools

    from kvcore_eval.analysis.study import format_correlation

    four = metrics.correlation([0.31, 0.52, 0.77, 0.90], [0.4, 0.2, 0.1, 0.05])
    assert four["spearman"] == pytest.approx(-1.0) and four["spearman_p"] == pytest.approx(1 / 12, rel=1e-12)
    assert stats.spearmanr([0.31, 0.52, 0.77, 0.90], [0.4, 0.2, 0.1, 0.05]).pvalue < 1e-6, "what was printed as p=0"
    assert "(p=0.083), n=4" in format_correlation(four) and "p=0)" not in format_correlation(four)
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=7), rng.normal(size=7)
    r = stats.pearsonr(x, y).statistic
    others = np.array([stats.pearsonr(x, y[list(order)]).statistic for order in itertools.permutations(range(7))])
    brute = min(1.0, 2 * min(np.mean(others <= r + 1e-12), np.mean(others >= r - 1e-12)))
    assert metrics.correlation(x, y)["pearson_p"] == pytest.approx(brute, rel=1e-9)
    big = metrics.correlation(np.arange(60.0), np.arange(60.0) ** 2)
    assert big["spearman_p"] == 0.0 and "p<0.0001" in format_correlation(big) and "p=0" not in format_correlation(big)


def test_paired_bootstrap_interval_of_nd_ppl():
    rng = np.random.default_rng(1)
    counts = rng.integers(50, 200, size=30).astype(float)
    full = {str(i): (-1.2 * c + rng.normal(scale=5), c) for i, c in enumerate(counts)}
    # every document 5 % worse per byte in log space: every resample gives the same ND-PPL, exp(0.05) - 1
    shifted = {d: (ll - 0.05 * c, c) for d, (ll, c) in full.items()}
    exact = metrics.paired_bootstrap_nd_ppl(shifted, full)
    assert exact["low"] == pytest.approx(np.expm1(0.05)) == pytest.approx(exact["high"])
    assert not exact["within_noise"] and exact["n"] == 30
    # documents that get better or worse at random around no change: an interval around 0, within noise
    noisy = {d: (ll + rng.normal(scale=3), c) for d, (ll, c) in full.items()}
    interval = metrics.paired_bootstrap_nd_ppl(noisy, full)
    point = np.expm1((sum(v[0] for v in full.values()) - sum(v[0] for v in noisy.values())) / counts.sum())
    assert interval["low"] <= point <= interval["high"] and interval["within_noise"]
    assert metrics.paired_bootstrap_nd_ppl(noisy, full) == interval, "seeded: the same interval every run"
    with pytest.raises(ValueError, match="same, non-empty documents"):
        metrics.paired_bootstrap_nd_ppl({"0": (1.0, 1.0)}, full)


def test_bootstrap_stderr_of_a_mean_is_close_to_the_textbook_one():
    values = np.random.default_rng(2).normal(size=400)
    assert metrics.bootstrap_stderr_of_mean(values) == pytest.approx(values.std(ddof=1) / 20, rel=0.1)
    assert np.isnan(metrics.bootstrap_stderr_of_mean([1.0]))

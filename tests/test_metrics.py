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

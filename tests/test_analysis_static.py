"""Static analysis math against direct float64 numpy computations (design §4 S1, S2, S3, S5, S6)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from moe_ray.analysis import static as S


@pytest.fixture
def small_blocks(monkeypatch):
    """Force tiny streaming blocks so every reduction really runs over several chunks."""
    monkeypatch.setattr(S, "CHUNK_ELEMENTS", 37)


def _mats(n=5, shape=(12, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def _fix_signs_np(cols: np.ndarray) -> np.ndarray:
    idx = np.abs(cols).argmax(axis=0)
    signs = np.sign(cols[idx, np.arange(cols.shape[1])])
    signs[signs == 0] = 1
    return cols * signs


def test_matrix_similarity_matches_numpy(small_blocks):
    mats = _mats()
    flat = np.stack([m.numpy().astype(np.float64).ravel() for m in mats])
    expected = flat @ flat.T / np.outer(np.linalg.norm(flat, axis=1), np.linalg.norm(flat, axis=1))
    np.testing.assert_allclose(S.matrix_similarity(mats).numpy(), expected, atol=1e-6)


def test_matrix_pca_matches_standardised_svd(small_blocks):
    mats = _mats(n=6)
    mats[2][0, 0] = mats[3][0, 0] = mats[4][0, 0] = 0.0  # a few equal values, not a constant feature
    for m in mats:
        m[1, 1] = 0.5  # a zero-variance feature: standardises to 0 (scikit-learn's convention)
    x = np.stack([m.numpy().astype(np.float64).ravel() for m in mats])
    centered = x - x.mean(0)
    std = centered.std(0)
    z = centered / np.where(std > 0, std, 1)
    u, s, _ = np.linalg.svd(z, full_matrices=False)
    expected = _fix_signs_np((u * s)[:, :3])
    scores, ratio = S.matrix_pca(mats, 3)  # standardised in float32: agreement to float32 precision
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ratio.numpy(), (s ** 2 / (s ** 2).sum())[:3], atol=1e-6)


def test_matrix_pca_with_fewer_points_than_components_pads_nan():
    scores, ratio = S.matrix_pca(_mats(n=2), 3)
    assert scores.shape == (2, 3) and torch.isnan(scores[:, 2]).all() and torch.isnan(ratio[2])


def test_dbscan_marks_the_planted_outlier():
    pts = np.array([[0.0, 0.0], [1.0, 0.5], [0.5, 1.0], [1.0, 1.0], [0.2, 0.8], [200.0, 150.0]])
    assert S.dbscan_outliers(pts, eps=50, min_samples=3).tolist() == [False] * 5 + [True]


def test_neuron_average_rows_for_up_and_gate_columns_for_down():
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    np.testing.assert_allclose(S.neuron_average(w, "up").numpy(), w.numpy().mean(0))
    np.testing.assert_allclose(S.neuron_average(w, "down").numpy(), w.numpy().mean(1))
    assert S.neuron_vectors(w, "down").shape == (4, 3)


def _neuron_reference(points: list[np.ndarray], c: int):
    x = np.concatenate(points).astype(np.float64)
    centered = x - x.mean(0)
    std = centered.std(0)
    z = centered / np.where(std > 0, std, 1)
    evals, evecs = np.linalg.eigh(z.T @ z / len(z))
    order = np.argsort(evals)[::-1][:c]
    loadings = _fix_signs_np(evecs[:, order])
    return z @ loadings, evals[order] / (std > 0).sum()


def test_neuron_pca_covariance_matches_numpy(small_blocks):
    g = torch.Generator().manual_seed(3)
    points = [torch.randn(20, 6, generator=g) * torch.linspace(0.5, 3, 6) for _ in range(3)]
    points.append(torch.randn(31, 6, generator=g))  # an expert of another width (like SE)
    scores, ratio = S.neuron_pca(points, 3, "covariance")
    expected, expected_ratio = _neuron_reference([p.numpy() for p in points], 3)
    np.testing.assert_allclose(torch.cat(scores).numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(ratio.numpy(), expected_ratio, atol=1e-8)
    assert [s.shape[0] for s in scores] == [20, 20, 20, 31]


def test_neuron_pca_randomized_recovers_planted_components(small_blocks):
    g = torch.Generator().manual_seed(4)
    basis = torch.linalg.qr(torch.randn(40, 3, generator=g))[0]
    points = [(torch.randn(200, 3, generator=g) * torch.tensor([9.0, 5.0, 3.0])) @ basis.T
              + 0.05 * torch.randn(200, 40, generator=g) + 2.0 for _ in range(4)]  # features off zero
    for p in points:
        p[:, 7] = 1.5  # a zero-variance feature: standardises to 0
    exact, exact_ratio = S.neuron_pca(points, 3, "covariance")
    approx, approx_ratio = S.neuron_pca(points, 3, "randomized", seed=1)
    np.testing.assert_allclose(torch.cat(approx).numpy(), torch.cat(exact).numpy(), atol=1e-3)
    np.testing.assert_allclose(approx_ratio.numpy(), exact_ratio.numpy(), rtol=1e-4)


def test_gate_embedding_and_pearson_match_scipy():
    g = torch.Generator().manual_seed(5)
    router = torch.randn(6, 10, generator=g)
    x = S.gate_embedding_similarity(router)
    r = router.numpy().astype(np.float64)
    expected = r @ r.T / np.outer(np.linalg.norm(r, axis=1), np.linalg.norm(r, axis=1))
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-12)
    y = S.cosine_matrix(torch.randn(6, 10, generator=g))
    iu = np.triu_indices(6, 1)
    assert S.upper_triangle_pearson(x, y) == pytest.approx(stats.pearsonr(expected[iu], y.numpy()[iu])[0], abs=1e-12)


def test_pearson_of_planted_linear_relation_is_one_and_undefined_cases_are_nan():
    x = S.cosine_matrix(torch.randn(5, 8))
    assert S.upper_triangle_pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert S.upper_triangle_pearson(x, -x) == pytest.approx(-1.0)
    assert np.isnan(S.upper_triangle_pearson(x, torch.ones(5, 5)))
    assert np.isnan(S.upper_triangle_pearson(x[:2, :2], x[:2, :2]))

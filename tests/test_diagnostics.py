import numpy as np
import pytest
import scipy.stats
import torch
from references import ref_linear_cka, ref_pairwise_cosines

from featkd import ShapeError, cosine_preservation, linear_cka, orthogonality_error


def test_orthogonality_error_matches_numpy(rng):
    w = rng.standard_normal((7, 3))
    expected = np.abs(w.T @ w - np.eye(3)).max()
    assert float(orthogonality_error(torch.from_numpy(w))) == pytest.approx(expected, rel=1e-12)
    # a wide matrix is measured on its rows
    assert float(orthogonality_error(torch.from_numpy(w.T))) == pytest.approx(expected, rel=1e-12)


def test_orthogonality_error_is_zero_for_orthonormal_columns(rng):
    q, _ = np.linalg.qr(rng.standard_normal((20, 5)))
    assert float(orthogonality_error(torch.from_numpy(q))) < 1e-14
    assert float(orthogonality_error(torch.eye(4))) == 0.0


def test_cosine_preservation_against_scipy(rng):
    a = rng.standard_normal((40, 12))
    b = a[:, :6] + 0.3 * rng.standard_normal((40, 6))
    ca, cb = ref_pairwise_cosines(a), ref_pairwise_cosines(b)
    result = cosine_preservation(torch.from_numpy(a), torch.from_numpy(b).float())
    assert result.pearson == pytest.approx(scipy.stats.pearsonr(ca, cb)[0], rel=1e-5)
    assert result.spearman == pytest.approx(scipy.stats.spearmanr(ca, cb)[0], rel=1e-5)
    assert result.mae == pytest.approx(np.abs(ca - cb).mean(), rel=1e-5)


def test_spearman_handles_ties_like_scipy():
    # repeated vectors make tied similarities
    base = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    other = torch.tensor([[1.0, 0.1], [0.2, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    expected = scipy.stats.spearmanr(
        ref_pairwise_cosines(base.numpy()), ref_pairwise_cosines(other.numpy())
    )[0]
    assert cosine_preservation(base, other).spearman == pytest.approx(expected, rel=1e-10)


def test_cosine_preservation_perfect_under_rotation_and_scale(rng):
    a = torch.from_numpy(rng.standard_normal((30, 8)))
    q, _ = torch.linalg.qr(torch.from_numpy(rng.standard_normal((8, 8))))
    result = cosine_preservation(a, 5.0 * a @ q)
    assert result.pearson == pytest.approx(1.0, abs=1e-12)
    assert result.spearman == pytest.approx(1.0, abs=1e-12)
    assert result.mae < 1e-12


def test_cosine_preservation_input_errors():
    with pytest.raises(ShapeError, match="at least 3 samples"):
        cosine_preservation(torch.randn(2, 4), torch.randn(2, 3))
    with pytest.raises(ShapeError, match="batch size 5"):
        cosine_preservation(torch.randn(5, 4), torch.randn(6, 3))


def test_linear_cka_against_numpy(rng):
    x = rng.standard_normal((50, 10))
    y = np.tanh(x @ rng.standard_normal((10, 7))) + 0.1 * rng.standard_normal((50, 7))
    expected = ref_linear_cka(x, y)
    assert float(linear_cka(torch.from_numpy(x), torch.from_numpy(y))) == pytest.approx(
        expected, rel=1e-12
    )


def test_linear_cka_invariances(rng):
    x = torch.from_numpy(rng.standard_normal((40, 6)))
    q, _ = torch.linalg.qr(torch.from_numpy(rng.standard_normal((6, 6))))
    assert float(linear_cka(x, 2.0 * x @ q + 3.0)) == pytest.approx(1.0, abs=1e-12)


def test_linear_cka_is_differentiable():
    x = torch.randn(20, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(20, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: linear_cka(a, y), (x,))

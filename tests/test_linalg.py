"""The numerics behind OrthogonalProjector and Whitening, against independent references:
torch.linalg.matrix_exp / scipy.linalg.expm of the full generator, a dense Cayley solve, and
eigendecompositions for the whitening matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from references import ref_stiefel_generator

from featkd.diagnostics import orthogonality_error
from featkd.vkd import _expm, _normalization, _stiefel

# (k, n): companion path (n > 1.5 k), dense path (n <= 1.5 k), square, one column
SHAPES = [(3, 10), (8, 40), (20, 25), (16, 16), (1, 7), (30, 200)]
# generator scale: entries ~ scale / sqrt(n), so ||A||_2 ~ scale (small, medium, large)
SCALES = [0.0, 0.05, 1.0, 8.0, 40.0]


def _random_generator(k, n, scale, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g, dtype=dtype) * scale / math.sqrt(n)


def test_generator_matrix_layout():
    gen = _random_generator(3, 7, 1.0)
    skew, tall = _stiefel.stiefel_blocks(gen)
    full = _stiefel.stiefel_generator_matrix(skew, tall)
    torch.testing.assert_close(full, ref_stiefel_generator(gen), rtol=0, atol=0)
    torch.testing.assert_close(full, -full.T, rtol=0, atol=0)


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("scale", SCALES)
def test_stiefel_expm_equals_first_columns_of_matrix_exp(k, n, scale):
    gen = _random_generator(k, n, scale)
    skew, tall = _stiefel.stiefel_blocks(gen)
    expected = torch.linalg.matrix_exp(ref_stiefel_generator(gen))[:, :k]
    got = _stiefel.stiefel_expm(skew, tall)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("k,n", [(4, 30), (6, 8)])
def test_stiefel_expm_against_scipy(k, n):
    gen = _random_generator(k, n, 5.0, seed=3)
    skew, tall = _stiefel.stiefel_blocks(gen)
    expected = scipy.linalg.expm(ref_stiefel_generator(gen).numpy())[:, :k]
    np.testing.assert_allclose(_stiefel.stiefel_expm(skew, tall).numpy(), expected, atol=1e-12)


def test_stiefel_expm_closed_form_single_rotation():
    # one column rotating in the (e_0, e_1) plane by angle t: P = [cos t, sin t, 0, ...]
    t = 1.3
    gen = torch.zeros(5, 1, dtype=torch.float64)
    gen[1, 0] = t
    skew, tall = _stiefel.stiefel_blocks(gen)
    expected = torch.tensor(
        [[math.cos(t)], [math.sin(t)], [0.0], [0.0], [0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(_stiefel.stiefel_expm(skew, tall), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("scale", [0.05, 8.0])
def test_synchronisation_free_path_matches(k, n, scale):
    gen = _random_generator(k, n, scale)
    skew, tall = _stiefel.stiefel_blocks(gen)
    adaptive = _stiefel.stiefel_expm(skew, tall)
    fixed = _stiefel.stiefel_expm(skew, tall, max_squarings=10)
    torch.testing.assert_close(fixed, adaptive, rtol=0, atol=1e-12)


def test_synchronisation_free_path_reads_nothing_on_the_host(monkeypatch):
    gen = _random_generator(6, 40, 3.0)
    skew, tall = _stiefel.stiefel_blocks(gen)

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out = _stiefel.stiefel_expm(skew, tall, max_squarings=8)
    monkeypatch.undo()
    assert out.shape == (40, 6)


def test_adaptive_path_reads_the_host_once(monkeypatch):
    gen = _random_generator(6, 40, 3.0)
    skew, tall = _stiefel.stiefel_blocks(gen)
    calls = []
    original = torch.Tensor.tolist

    def counting(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    _stiefel.stiefel_expm(skew, tall)
    monkeypatch.undo()
    assert len(calls) == 1


@pytest.mark.parametrize("scale", [0.0, 1.0, 30.0, 200.0])
def test_expm_general_matrix_against_scipy(scale):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((12, 12)) * scale / math.sqrt(12)
    got = _expm.expm_columns(torch.from_numpy(a), slice(0, 12))[0]
    expected = scipy.linalg.expm(a)
    err = np.abs(got.numpy() - expected).max() / max(1.0, np.abs(expected).max())
    assert err < 1e-12


def test_expm_columns():
    a = torch.randn(9, 9, dtype=torch.float64)
    torch.testing.assert_close(
        _expm.expm_columns(a, slice(0, 4))[0],
        _expm.expm_columns(a, slice(0, 9))[0][:, :4],
        rtol=0,
        atol=1e-13,
    )


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("scale", [0.0, 1.0, 40.0])
def test_stiefel_cayley_equals_dense_solve(k, n, scale):
    gen = _random_generator(k, n, scale)
    skew, tall = _stiefel.stiefel_blocks(gen)
    a = ref_stiefel_generator(gen)
    eye = torch.eye(n, dtype=torch.float64)
    expected = torch.linalg.solve(eye - a / 2, eye + a / 2)[:, :k]
    torch.testing.assert_close(_stiefel.stiefel_cayley(skew, tall), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k,n", [(3, 9), (4, 5)])
@pytest.mark.parametrize("scale", [0.0, 0.3, 6.0])  # 0.0: the identity init, where B = 0
def test_gradcheck_stiefel_expm(k, n, scale):
    gen = _random_generator(k, n, scale).requires_grad_()

    def weight(g):
        return _stiefel.stiefel_expm(*_stiefel.stiefel_blocks(g))

    assert torch.autograd.gradcheck(weight, (gen,))


def test_gradcheck_synchronisation_free_path():
    gen = _random_generator(3, 9, 6.0).requires_grad_()

    def weight(g):
        return _stiefel.stiefel_expm(*_stiefel.stiefel_blocks(g), max_squarings=6)

    assert torch.autograd.gradcheck(weight, (gen,))


@pytest.mark.parametrize("k,n", [(3, 9), (4, 4)])
@pytest.mark.parametrize("scale", [0.0, 2.0])  # 0.0: the identity init
def test_gradcheck_stiefel_cayley(k, n, scale):
    gen = _random_generator(k, n, scale).requires_grad_()

    def weight(g):
        return _stiefel.stiefel_cayley(*_stiefel.stiefel_blocks(g))

    assert torch.autograd.gradcheck(weight, (gen,))


def test_gradient_matches_matrix_exp_backward():
    gen = _random_generator(5, 30, 4.0, seed=7)
    cotangent = torch.randn(30, 5, dtype=torch.float64)
    ours = gen.clone().requires_grad_()
    (_stiefel.stiefel_expm(*_stiefel.stiefel_blocks(ours)) * cotangent).sum().backward()
    ref = gen.clone().requires_grad_()
    skew, tall = _stiefel.stiefel_blocks(ref)
    full = _stiefel.stiefel_generator_matrix(skew, tall)
    (torch.linalg.matrix_exp(full)[:, :5] * cotangent).sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("k,n", [(16, 16), (24, 40), (64, 512), (192, 3024)])
@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_orthonormality_at_random_parameters(k, n, scale, dtype):
    gen = _random_generator(k, n, scale, dtype=dtype, seed=k + n)
    skew, tall = _stiefel.stiefel_blocks(gen)
    bound = 1e-5 if dtype == torch.float32 else 1e-12
    assert orthogonality_error(_stiefel.stiefel_expm(skew, tall)) <= bound
    assert orthogonality_error(_stiefel.stiefel_cayley(skew, tall)) <= bound


def test_polar_step_rescues_rank_deficient_float32():
    # n - k < k makes B^T B singular; at large norms the float32 core loses orthonormality
    gen = _random_generator(100, 170, 300.0, dtype=torch.float32, seed=5)
    skew, tall = _stiefel.stiefel_blocks(gen)
    raw = _stiefel.stiefel_expm(skew, tall, polar=False)
    fixed = _stiefel.stiefel_expm(skew, tall, polar=True)
    assert orthogonality_error(fixed) <= 1e-5
    assert orthogonality_error(fixed) < orthogonality_error(raw)


def test_non_finite_generator_is_reported():
    gen = _random_generator(3, 10, 1.0)
    gen[5, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        _stiefel.stiefel_expm(*_stiefel.stiefel_blocks(gen))


def _covariance(d, rank=None, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rank or 3 * d, d)) @ rng.standard_normal((d, d))
    return torch.from_numpy(np.cov(x, rowvar=False))


@pytest.mark.parametrize("shift", [0.0, 1e-3])
def test_cholesky_whitener(shift):
    cov = _covariance(6)
    w = _normalization.cholesky_whitener(cov, shift)
    shrunk = cov + shift * torch.eye(6, dtype=cov.dtype)
    torch.testing.assert_close(w.T @ shrunk @ w, torch.eye(6, dtype=cov.dtype), atol=1e-10, rtol=0)
    # W = L^{-T} is upper triangular
    torch.testing.assert_close(w, w.triu(), rtol=0, atol=0)


@pytest.mark.parametrize("shift", [0.0, 1e-3])
def test_zca_whitener_is_inverse_square_root(shift):
    cov = _covariance(6)
    shrunk = cov.numpy() + shift * np.eye(6)
    expected = np.linalg.inv(scipy.linalg.sqrtm(shrunk).real)
    w = _normalization.zca_whitener(cov, shift)
    np.testing.assert_allclose(w.numpy(), expected, atol=1e-9)


def test_whiteners_with_singular_covariance_and_shrinkage():
    cov = _covariance(8, rank=4)  # 4 samples in 8 dimensions: rank 3 after centring
    for whitener in (_normalization.cholesky_whitener, _normalization.zca_whitener):
        w = whitener(cov, 1e-2)
        assert torch.isfinite(w).all()
        shrunk = cov + 1e-2 * torch.eye(8, dtype=cov.dtype)
        torch.testing.assert_close(
            w.T @ shrunk @ w, torch.eye(8, dtype=cov.dtype), atol=1e-8, rtol=0
        )


def test_gradcheck_zca_whitener():
    x = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)

    def whiten(x):
        centred = x - x.mean(0)
        cov = centred.T @ centred / 9
        return _normalization.zca_whitener(cov, 1e-2 * cov.diagonal().mean())

    assert torch.autograd.gradcheck(whiten, (x,))


def test_zca_whitener_gradient_with_coincident_eigenvalues():
    """``cov = c I`` (every eigenvalue equal): the gradient of ``(cov + shift I)^{-1/2}`` is the
    derivative of the scalar function, ``-1/2 (c + shift)^{-3/2}``, not eigh's NaN."""
    c, shift = 0.5, 1e-3
    cov = (c * torch.eye(4, dtype=torch.float64)).requires_grad_()
    _normalization.zca_whitener(cov, shift).trace().backward()
    expected = -0.5 * (c + shift) ** -1.5 * torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(cov.grad, expected, rtol=1e-12, atol=1e-12)


def test_device_selected_squarings_second_derivatives_are_exact():
    """Their backward is hand-written; under create_graph it reruns the steps with autograd,
    so a Hessian-vector product equals the adaptive path's (plain autograd)."""
    gen = _random_generator(3, 9, 6.0)
    weights = torch.randn(9, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    direction = torch.randn_like(gen)

    def hvp(max_squarings):
        g = gen.clone().requires_grad_()
        out = _stiefel.stiefel_expm(*_stiefel.stiefel_blocks(g), max_squarings=max_squarings)
        (grad,) = torch.autograd.grad((out * weights).sum(), g, create_graph=True)
        return torch.autograd.grad((grad * direction).sum(), g)[0]

    expected = hvp(None)
    assert expected.norm() > 0.1
    torch.testing.assert_close(hvp(6), expected, rtol=0, atol=1e-10)


def test_device_selected_squarings_under_vmap():
    gens = torch.stack([_random_generator(3, 9, s, seed=i) for i, s in enumerate((0.5, 6.0))])

    def weight(g):
        return _stiefel.stiefel_expm(*_stiefel.stiefel_blocks(g), max_squarings=6)

    batched = torch.func.vmap(weight)(gens)
    for g, w in zip(gens, batched, strict=True):
        torch.testing.assert_close(w, _stiefel.stiefel_expm(*_stiefel.stiefel_blocks(g)))


@pytest.mark.parametrize("scale", [1e-7, 1e-14])
def test_tiny_float32_generators_give_the_identity_columns(scale):
    """The norm estimates scale by the largest entry first: a plain float32 norm of entries
    near 1e-20 underflows to 0 and used to turn the power iterations into NaN."""
    gen = _random_generator(8, 40, 1.0).float() * scale
    for max_squarings in (None, 16):
        out = _stiefel.stiefel_expm(*_stiefel.stiefel_blocks(gen), max_squarings=max_squarings)
        eye = torch.eye(40, 8)
        torch.testing.assert_close(out, eye, rtol=0, atol=1e-5)

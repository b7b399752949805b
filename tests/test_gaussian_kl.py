"""GaussianKLLoss against a direct float64 transcription of the KL formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featkd import ChoiceError, FeatkdInputError, GaussianKLLoss, ShapeError
from featkd.functional import gaussian_kl_loss


def _kl_reference(p: np.ndarray, q: np.ndarray, eps: float, diagonal: bool = False) -> float:
    """KL(N_p || N_q) with D x D inverses and slogdet, float64, shrunk covariances."""
    width = p.shape[1]
    mean_p, mean_q = p.mean(0), q.mean(0)
    cov_p = np.atleast_2d(np.cov(p.T, bias=True)) + eps * np.eye(width)
    cov_q = np.atleast_2d(np.cov(q.T, bias=True)) + eps * np.eye(width)
    if diagonal:
        cov_p, cov_q = np.diag(np.diag(cov_p)), np.diag(np.diag(cov_q))
    inverse_q = np.linalg.inv(cov_q)
    delta = mean_q - mean_p
    return 0.5 * float(
        np.trace(inverse_q @ cov_p)
        + delta @ inverse_q @ delta
        - width
        + np.linalg.slogdet(cov_q)[1]
        - np.linalg.slogdet(cov_p)[1]
    )


SIZES = [(6, 10), (8, 8), (16, 5)]  # B < D, B = D, B > D


@pytest.mark.parametrize("direction", ["student_teacher", "teacher_student"])
@pytest.mark.parametrize("covariance", ["full", "diag"])
@pytest.mark.parametrize(("batch", "width"), SIZES)
def test_matches_transcription(rng, device, dtype, direction, covariance, batch, width):
    s = rng.standard_normal((batch, width)) @ rng.standard_normal((width, width))
    t = 0.8 * rng.standard_normal((batch, width)) + 0.4
    eps = 0.05
    # the reference sees the inputs the loss sees (rounded to dtype)
    s, t = (torch.tensor(x, dtype=dtype).double().numpy() for x in (s, t))
    p, q = (s, t) if direction == "student_teacher" else (t, s)
    expected = _kl_reference(p, q, eps, diagonal=covariance == "diag")
    got = gaussian_kl_loss(
        torch.tensor(s, dtype=dtype, device=device),
        torch.tensor(t, dtype=dtype, device=device),
        covariance=covariance,
        direction=direction,
        eps=eps,
    )
    assert got.dtype == dtype
    # the full form computes in float64 whatever the input (float32: only the final rounding);
    # the diagonal one in the input's dtype
    rel = 1e-9 if dtype == torch.float64 else (1e-6 if covariance == "full" else 1e-4)
    assert float(got) == pytest.approx(expected, rel=rel)


def test_closed_forms():
    # 1-D samples with exact moments: mean 0, variance 1 and mean 2, variance 4
    base = np.array([-1.0, 1.0] * 50)[:, None]  # mean 0, variance 1
    p, q = base, 2 * base + 2  # N(0, 1) and N(2, 4)
    eps = 1e-12
    expected = (
        np.log(2.0) + (1 + 4) / (2 * 4) - 0.5
    )  # log(s_q/s_p) + (s_p^2 + dm^2)/(2 s_q^2) - 1/2
    for covariance in ("full", "diag"):
        got = gaussian_kl_loss(torch.tensor(p), torch.tensor(q), covariance=covariance, eps=eps)
        assert float(got) == pytest.approx(expected, rel=1e-9)
    # N(0, S) vs N(m, S): KL = m^T (S + eps I)^-1 m / 2
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 6))
    m = rng.standard_normal(6)
    cov = np.cov(x.T, bias=True) + 0.01 * np.eye(6)
    got = gaussian_kl_loss(torch.tensor(x), torch.tensor(x + m), eps=0.01)
    assert float(got) == pytest.approx(0.5 * m @ np.linalg.solve(cov, m), rel=1e-10)
    # identical batches give zero, also with B < D
    for batch, width in SIZES:
        y = torch.tensor(rng.standard_normal((batch, width)))
        for covariance in ("full", "diag"):
            assert abs(float(gaussian_kl_loss(y, y, covariance=covariance))) < 1e-8


@pytest.mark.parametrize(("batch", "width"), [(4, 6), (5, 5), (9, 3)])
def test_gradcheck(rng, batch, width):
    s = torch.tensor(rng.standard_normal((batch, width)), requires_grad=True)
    t = torch.tensor(rng.standard_normal((batch, width)) + 0.3)
    for covariance in ("full", "diag"):
        for direction in ("student_teacher", "teacher_student"):

            def fn(x, c=covariance, d=direction):
                return gaussian_kl_loss(x, t, covariance=c, direction=d, eps=0.1)

            assert torch.autograd.gradcheck(fn, (s,))


@pytest.mark.parametrize("direction", ["student_teacher", "teacher_student"])
@pytest.mark.parametrize("covariance", ["full", "diag"])
@pytest.mark.parametrize(("batch", "width"), SIZES)
def test_no_nan_on_degenerate_inputs(direction, covariance, batch, width):
    x = torch.randn(batch, width)
    constant = torch.ones(batch, width)
    cases = [(x, x), (constant, x), (x, constant), (constant, 2 * constant), (x * 1e4, x * 1e4 + 3)]
    for s, t in cases:
        student = s.clone().requires_grad_()
        loss = gaussian_kl_loss(student, t, covariance=covariance, direction=direction)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_conditional_matches_per_class(rng):
    s, t = rng.standard_normal((2, 14, 5))
    labels = np.array([3] * 6 + [1] * 7 + [8])  # class 8 is seen once
    eps = 0.2
    for covariance in ("full", "diag"):
        expected = []
        for c in (1, 3, 8):
            rows = labels == c
            # one sample: both covariances are eps I, so KL = ||s - t||^2 / (2 eps)
            expected.append(_kl_reference(s[rows], t[rows], eps, diagonal=covariance == "diag"))
        loss_fn = GaussianKLLoss(covariance, eps=eps, conditional=True)
        got = loss_fn(torch.tensor(s), torch.tensor(t), labels=torch.tensor(labels))
        assert float(got) == pytest.approx(np.mean(expected), rel=1e-10)
        single = labels == 8
        assert expected[-1] == pytest.approx(np.sum((s[single] - t[single]) ** 2) / (2 * eps))


def test_module_parts_and_gradient_routing():
    s = torch.randn(12, 6, requires_grad=True)
    t = torch.randn(12, 6, requires_grad=True)
    loss_fn = GaussianKLLoss(direction="teacher_student", eps=0.01)
    loss = loss_fn(s, t)
    torch.testing.assert_close(loss, gaussian_kl_loss(s, t, direction="teacher_student", eps=0.01))
    parts = loss_fn.last_parts
    # the parts stay in the working dtype (float64 for the full covariance)
    torch.testing.assert_close((parts["mean"] + parts["covariance"]).float(), loss.detach())
    loss.backward()
    assert s.grad is not None and t.grad is None


def test_errors():
    s = torch.randn(8, 4)
    with pytest.raises(ChoiceError, match="direction: expected one of 'student_teacher'"):
        GaussianKLLoss(direction="forward")
    with pytest.raises(ChoiceError, match="eps: expected a finite number > 0, got 0"):
        gaussian_kl_loss(s, s, eps=0)
    with pytest.raises(ChoiceError, match="covariance: expected one of 'full', 'diag'"):
        gaussian_kl_loss(s, s, covariance="low_rank")
    with pytest.raises(ShapeError, match="at least 2"):
        gaussian_kl_loss(s[:1], s[:1])
    with pytest.raises(FeatkdInputError, match="labels: expected class indices"):
        GaussianKLLoss(conditional=True)(s, s)

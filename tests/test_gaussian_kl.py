"""GaussianKLLoss against a direct float64 transcription of the KL formula."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from references import ref_gaussian_kl, ref_gaussian_kl_mpmath
from scale_data import SCALES, batch_at_scale, labels_with_a_lone_class

from featkd import ChoiceError, FeatkdInputError, GaussianKLLoss, ShapeError
from featkd.functional import gaussian_kl_loss

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
    expected = ref_gaussian_kl(p, q, eps, diagonal=covariance == "diag")
    got = gaussian_kl_loss(
        torch.tensor(s, dtype=dtype, device=device),
        torch.tensor(t, dtype=dtype, device=device),
        covariance=covariance,
        direction=direction,
        ridge=eps,
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
        got = gaussian_kl_loss(torch.tensor(p), torch.tensor(q), covariance=covariance, ridge=eps)
        assert float(got) == pytest.approx(expected, rel=1e-9)
    # N(0, S) vs N(m, S): KL = m^T (S + eps I)^-1 m / 2
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 6))
    m = rng.standard_normal(6)
    cov = np.cov(x.T, bias=True) + 0.01 * np.eye(6)
    got = gaussian_kl_loss(torch.tensor(x), torch.tensor(x + m), ridge=0.01)
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
                return gaussian_kl_loss(x, t, covariance=c, direction=d, ridge=0.1)

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
            expected.append(ref_gaussian_kl(s[rows], t[rows], eps, diagonal=covariance == "diag"))
        loss_fn = GaussianKLLoss(covariance, ridge=eps, conditional=True)
        got = loss_fn(torch.tensor(s), torch.tensor(t), labels=torch.tensor(labels))
        assert float(got) == pytest.approx(np.mean(expected), rel=1e-10)
        single = labels == 8
        assert expected[-1] == pytest.approx(np.sum((s[single] - t[single]) ** 2) / (2 * eps))


def test_module_parts_and_gradient_routing():
    s = torch.randn(12, 6, requires_grad=True)
    t = torch.randn(12, 6, requires_grad=True)
    loss_fn = GaussianKLLoss(direction="teacher_student", ridge=0.01)
    loss = loss_fn(s, t)
    torch.testing.assert_close(
        loss, gaussian_kl_loss(s, t, direction="teacher_student", ridge=0.01)
    )
    parts = loss_fn.last_parts
    # the parts stay in the working dtype (float64 for the full covariance)
    torch.testing.assert_close((parts["mean"] + parts["covariance"]).float(), loss.detach())
    loss.backward()
    assert s.grad is not None and t.grad is None


def test_errors():
    s = torch.randn(8, 4)
    with pytest.raises(ChoiceError, match="direction: expected one of 'student_teacher'"):
        GaussianKLLoss(direction="forward")
    with pytest.raises(ChoiceError, match="ridge: expected a finite number > 0, got 0"):
        gaussian_kl_loss(s, s, ridge=0)
    with pytest.raises(ChoiceError, match="covariance: expected one of 'full', 'diag'"):
        gaussian_kl_loss(s, s, covariance="low_rank")
    with pytest.raises(ShapeError, match="at least 2"):
        gaussian_kl_loss(s[:1], s[:1])
    with pytest.raises(FeatkdInputError, match="labels: expected class indices"):
        GaussianKLLoss(conditional=True)(s, s)


@pytest.mark.parametrize("value", ["no", 1, None])
def test_conditional_must_be_a_bool(value):
    # accepted before and read as bool(value) ("no" meant True); refused when the module is
    # built, and by the function before any maths
    s, labels = torch.randn(8, 4), torch.arange(8) % 2
    expected = rf"conditional: expected True or False, got {re.escape(repr(value))}"
    with pytest.raises(ChoiceError, match=expected):
        GaussianKLLoss(conditional=value)
    with pytest.raises(ChoiceError, match=expected):
        gaussian_kl_loss(s, s, labels=labels, conditional=value)


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), True, "0.1"])
def test_ridge_must_be_a_finite_positive_number(value):
    s = torch.randn(8, 4)
    expected = rf"ridge: expected a finite number > 0, got {re.escape(repr(value))}"
    with pytest.raises(ChoiceError, match=expected):
        GaussianKLLoss(ridge=value)
    with pytest.raises(ChoiceError, match=expected):
        gaussian_kl_loss(s, s, ridge=value)


def test_valid_options_are_kept():
    loss_fn = GaussianKLLoss("diag", direction="teacher_student", ridge=2, conditional=True)
    assert (loss_fn.covariance, loss_fn.direction, loss_fn.conditional) == (
        "diag",
        "teacher_student",
        True,
    )
    assert loss_fn.ridge == 2.0 and isinstance(loss_fn.ridge, float)


@pytest.mark.parametrize("conditional", [False, True], ids=["batch", "conditional"])
@pytest.mark.parametrize("covariance", ["full", "diag"])
@pytest.mark.parametrize("scale", SCALES)
def test_identical_batches_give_zero_at_every_scale(rng, dtype, scale, covariance, conditional):
    # KL has no units and is of order D: zero to rounding is |KL| <= 1e-12 D, with eps = 1e-3
    # far above (scale 1e-6) and far below (scale 1e6: S + eps I has condition ~1e15) the
    # features. The Woodbury form |v|^2 - |R^-T F v|^2 of B < D left up to ~1 at scale 1e6
    for batch, width in SIZES:
        z = torch.tensor(batch_at_scale(rng, batch, width, scale), dtype=dtype)
        for direction in ("student_teacher", "teacher_student"):
            got = gaussian_kl_loss(
                z,
                z.clone(),
                labels=labels_with_a_lone_class(batch),
                covariance=covariance,
                direction=direction,
                conditional=conditional,
            )
            assert abs(float(got)) <= 1e-12 * width, (batch, width, direction)


@pytest.mark.parametrize("conditional", [False, True], ids=["batch", "conditional"])
@pytest.mark.parametrize("direction", ["student_teacher", "teacher_student"])
@pytest.mark.parametrize("covariance", ["full", "diag"])
@pytest.mark.parametrize(("batch", "width"), [(6, 10), (16, 5)])
def test_scaled_batches_at_large_scale_match_references(
    rng, dtype, batch, width, covariance, direction, conditional
):
    # scale 1e6 and eps = 1e-3: in each compared set (the batch or a class) a teacher 1.5 times
    # wider than the student, its mean offset in the span of the rows, so that the KL is of
    # order D rather than scale^2 / eps, which would hide errors of order 1
    scale, eps = 1e6, 1e-3
    labels = labels_with_a_lone_class(batch)
    groups = [labels.numpy() == c for c in (0, 1, 2)] if conditional else [np.full(batch, True)]
    s = batch_at_scale(rng, batch, width, scale)
    t = s.copy()
    for g in groups:
        centred = s[g] - s[g].mean(0)
        t[g] += 0.5 * centred + 0.1 * rng.standard_normal(g.sum()) @ centred / g.sum()
    s, t = (torch.tensor(x, dtype=dtype).double().numpy() for x in (s, t))
    p, q = (s, t) if direction == "student_teacher" else (t, s)
    if covariance == "full":
        expected = np.mean([ref_gaussian_kl_mpmath(p[g], q[g], eps) for g in groups])
    else:  # diagonal covariances are well conditioned: float64 suffices
        expected = np.mean([ref_gaussian_kl(p[g], q[g], eps, diagonal=True) for g in groups])
    got = gaussian_kl_loss(
        torch.tensor(s, dtype=dtype),
        torch.tensor(t, dtype=dtype),
        labels=labels,
        covariance=covariance,
        direction=direction,
        ridge=eps,
        conditional=conditional,
    )
    # the full form computes in float64 whatever the input dtype (float32 inputs: a float32
    # result, rounded to 6e-8); the diagonal one in the input's dtype
    rel = {"full": 1e-6, "diag": 1e-4}[covariance] if dtype == torch.float32 else 1e-9
    assert float(got) == pytest.approx(expected, rel=rel), expected


@pytest.mark.parametrize("covariance", ["full", "diag"])
@pytest.mark.parametrize(("batch", "width"), [(6, 10), (16, 5)])
def test_scale_invariance_with_the_ridge_in_the_callers_units(rng, dtype, batch, width, covariance):
    # KL(c s, c t; eps c^2) = KL(s, t; eps): both Gaussians are mapped by x -> c x. With c a
    # power of two the inputs scale exactly, so the values must agree to rounding even where
    # squares of the features leave float32 (c = 2^-75: 1e-45, c = 2^62: 2e37 each)
    s = rng.standard_normal((batch, width))
    t = 0.7 * rng.standard_normal((batch, width)) + 0.3
    student, teacher = torch.tensor(s, dtype=dtype), torch.tensor(t, dtype=dtype)
    unit = float(gaussian_kl_loss(student, teacher, covariance=covariance, ridge=0.05))
    assert unit == pytest.approx(
        ref_gaussian_kl(s, t, 0.05, diagonal=covariance == "diag"), rel=1e-4
    )
    for c in (2.0**-75, 2.0**62):
        got = gaussian_kl_loss(c * student, c * teacher, covariance=covariance, ridge=0.05 * c**2)
        assert float(got) == pytest.approx(unit, rel=1e-12), c


def test_eps_is_the_former_name_of_ridge_for_one_release():
    s, t = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
    with pytest.warns(FutureWarning, match="eps= is renamed to ridge="):
        old = gaussian_kl_loss(s, t, eps=0.3)
    assert float(old) == float(gaussian_kl_loss(s, t, ridge=0.3))
    with pytest.warns(FutureWarning, match="GaussianKLLoss: eps= is renamed to ridge="):
        assert GaussianKLLoss(eps=0.3).ridge == 0.3
    with pytest.raises(ChoiceError, match="eps: renamed to ridge; pass only ridge"):
        gaussian_kl_loss(s, t, eps=0.3, ridge=0.3)
    assert GaussianKLLoss().ridge == 1e-3
    with pytest.raises(ChoiceError, match="eps: expected a finite number > 0, got 0"):
        GaussianKLLoss(eps=0)
    with pytest.raises(ChoiceError, match="eps: expected a finite number > 0"):
        gaussian_kl_loss(s, t, eps=-1.0)

"""MMDLoss against an explicit double loop over sample pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tolerance
from references import (
    ref_heuristic_sigma,
    ref_kernel,
    ref_median_sigma_apart,
    ref_mmd_loops,
    ref_poly_mmd,
    ref_rbf_mmd_and_gradient,
)

from featkd import ChoiceError, FeatkdInputError, GlobalBatch, MMDLoss, ShapeError
from featkd.functional import mmd_loss


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
@pytest.mark.parametrize("kernel", ["rbf", "linear", "poly"])
def test_matches_double_loop(rng, device, dtype, kernel, estimator):
    s = rng.standard_normal((9, 4))
    t = 1.2 * rng.standard_normal((9, 4)) + 0.5
    s, t = (torch.tensor(x, dtype=dtype).double().numpy() for x in (s, t))
    k = ref_kernel(kernel, sigmas=(1.7,), degree=3, coef0=1.0)
    expected = ref_mmd_loops(s, t, k, estimator)
    got = mmd_loss(
        torch.tensor(s, dtype=dtype, device=device),
        torch.tensor(t, dtype=dtype, device=device),
        kernel=kernel,
        bandwidth=1.7,
        degree=3,
        coef0=1.0,
        estimator=estimator,
    )
    assert got.dtype == dtype
    torch.testing.assert_close(
        got.cpu().double(), torch.tensor(expected, dtype=torch.float64), **tolerance(dtype)
    )


@pytest.mark.parametrize("rule", ["median", "mean"])
def test_bandwidth_heuristics_and_multipliers(rng, rule):
    s, t = rng.standard_normal((8, 3)), rng.standard_normal((8, 3)) + 1
    sigma = ref_heuristic_sigma(s, t, rule)
    multipliers = (0.5, 1.0, 3.0)
    k = ref_kernel("rbf", sigmas=[sigma * m for m in multipliers])
    loss_fn = MMDLoss(bandwidth=rule, multipliers=multipliers)
    got = loss_fn(torch.tensor(s), torch.tensor(t))
    assert float(got) == pytest.approx(ref_mmd_loops(s, t, k), rel=1e-10)
    expected_mean = np.mean([sigma * m for m in multipliers])
    assert float(loss_fn.last_parts["bandwidth"]) == pytest.approx(expected_mean, rel=1e-10)


def test_list_of_bandwidths(rng):
    s, t = rng.standard_normal((7, 3)), rng.standard_normal((7, 3))
    k = ref_kernel("rbf", sigmas=(0.5, 2.0, 8.0))
    got = mmd_loss(torch.tensor(s), torch.tensor(t), bandwidth=[0.5, 2.0, 8.0])
    assert float(got) == pytest.approx(ref_mmd_loops(s, t, k), rel=1e-10)


def test_closed_forms(rng):
    s, t = rng.standard_normal((10, 5)), rng.standard_normal((10, 5)) + 2
    # linear kernel, biased: the squared distance between the means
    got = mmd_loss(torch.tensor(s), torch.tensor(t), kernel="linear")
    assert float(got) == pytest.approx(np.sum((s.mean(0) - t.mean(0)) ** 2), rel=1e-12)
    # identical batches: the biased estimate is 0 for every kernel
    for kernel in ("rbf", "linear", "poly"):
        x = torch.tensor(s)
        assert abs(float(mmd_loss(x, x, kernel=kernel))) < 1e-10


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_gradcheck(rng, estimator):
    s = torch.tensor(rng.standard_normal((6, 3)), requires_grad=True)
    t = torch.tensor(rng.standard_normal((6, 3)))
    for kernel, options in [
        ("rbf", {"bandwidth": [0.7, 3.0]}),
        ("rbf", {"bandwidth": 1.5}),
        ("linear", {}),
        ("poly", {"degree": 2, "coef0": 0.5}),
    ]:

        def fn(x, kernel=kernel, options=options):
            return mmd_loss(x, t, kernel=kernel, estimator=estimator, **options)

        assert torch.autograd.gradcheck(fn, (s,))


def test_heuristic_bandwidth_is_held_fixed_in_the_gradient(rng):
    # the median bandwidth is detached: the gradient is that of MMD with the kernel fixed
    s = torch.tensor(rng.standard_normal((7, 3)), requires_grad=True)
    t = torch.tensor(rng.standard_normal((7, 3)))
    loss_fn = MMDLoss(bandwidth="median", multipliers=(1.0,))
    loss_fn(s, t).backward()
    sigma = float(loss_fn.last_parts["bandwidth"])
    fixed = s.detach().clone().requires_grad_()
    mmd_loss(fixed, t, bandwidth=sigma).backward()
    torch.testing.assert_close(s.grad, fixed.grad)


def test_conditional_matches_per_class(rng):
    s, t = rng.standard_normal((11, 3)), rng.standard_normal((11, 3))
    labels = np.array([2] * 5 + [0] * 5 + [7])  # class 7 is seen once
    sigma = ref_heuristic_sigma(s, t, "median")  # one bandwidth from the whole batch
    for kernel in ("rbf", "linear", "poly"):
        k = ref_kernel(kernel, sigmas=(sigma,))
        for estimator in ("biased", "unbiased"):
            # a class seen once has no distinct pairs: its biased value (the loop's n == 1 rule)
            expected = np.mean(
                [ref_mmd_loops(s[labels == c], t[labels == c], k, estimator) for c in (0, 2, 7)]
            )
            got = mmd_loss(
                torch.tensor(s),
                torch.tensor(t),
                labels=torch.tensor(labels),
                kernel=kernel,
                estimator=estimator,
                conditional=True,
            )
            assert float(got) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
@pytest.mark.parametrize("kernel", ["rbf", "linear", "poly"])
def test_no_nan_on_degenerate_inputs(kernel, estimator):
    x = torch.randn(6, 10)
    constant = torch.ones(6, 10)
    cases = [(x, x), (constant, constant), (constant, x), (x * 1e4, x * 1e4 + 3)]
    for s, t in cases:
        student = s.clone().requires_grad_()
        loss = mmd_loss(student, t, kernel=kernel, estimator=estimator)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_module_and_gradient_routing():
    s = torch.randn(8, 4, requires_grad=True)
    t = torch.randn(8, 4, requires_grad=True)
    loss_fn = MMDLoss("poly", estimator="unbiased")
    loss = loss_fn(s, t)
    torch.testing.assert_close(loss, mmd_loss(s, t, kernel="poly", estimator="unbiased"))
    loss.backward()
    assert s.grad is not None and t.grad is None


def test_errors():
    s = torch.randn(8, 4)
    with pytest.raises(ChoiceError, match="kernel: expected one of 'rbf', 'linear', 'poly'"):
        MMDLoss("laplace")
    with pytest.raises(ChoiceError, match="bandwidth: expected one of 'median', 'mean'"):
        MMDLoss(bandwidth="silverman")
    with pytest.raises(ChoiceError, match="bandwidth: expected a finite number > 0, got -1"):
        mmd_loss(s, s, bandwidth=-1.0)
    with pytest.raises(ChoiceError, match="bandwidth: expected 'median'"):
        mmd_loss(s, s, bandwidth=[])
    with pytest.raises(ChoiceError, match="estimator"):
        mmd_loss(s, s, estimator="linear_time")
    with pytest.raises(ChoiceError, match="degree: expected an integer >= 1"):
        MMDLoss("poly", degree=0)
    with pytest.raises(ShapeError, match=r"at least 2 \(the unbiased"):
        mmd_loss(s[:1], s[:1], estimator="unbiased")
    with pytest.raises(FeatkdInputError, match="labels"):
        mmd_loss(s, s, conditional=True)


def _duplicated_rows():
    # issue 11: most pooled points coincide, so the plain median squared distance is 0
    s, t = np.zeros((4, 2)), np.zeros((4, 2))
    s[0], t[0, 1] = 1000.0, 3000.0
    return s, t


def _duplicated_random_rows():
    # the same with rows that are not 0 after the shift: the Gram expansion rounds their
    # zero distances to small non-zero values in float32
    rng = np.random.default_rng(3)
    a, b, c = 1e3 * rng.standard_normal((3, 5))
    return np.array([a, a, a, b]), np.array([a, c, a, a])


@pytest.mark.parametrize("make", [_duplicated_rows, _duplicated_random_rows])
@pytest.mark.parametrize("form", ["biased", "unbiased", "conditional", "global_batch"])
def test_median_bandwidth_leaves_out_coincident_pairs(dtype, form, make):
    s, t = make()
    s, t = (torch.tensor(x, dtype=dtype).double().numpy() for x in (s, t))
    labels = np.array([0, 1, 0, 1])
    estimator = "unbiased" if form == "unbiased" else "biased"
    conditional = form in ("conditional", "global_batch")
    sigma = ref_median_sigma_apart(s, t, torch.finfo(dtype).eps)
    assert sigma > 1.0  # far from the 1e-19 of the plain median
    if conditional:  # the mean over classes, one bandwidth from the whole batch
        value, grad = 0.0, np.zeros_like(s)
        for c in (0, 1):
            v, g = ref_rbf_mmd_and_gradient(s[labels == c], t[labels == c], sigma, estimator)
            value, grad[labels == c] = value + v / 2, g / 2
    else:
        value, grad = ref_rbf_mmd_and_gradient(s, t, sigma, estimator)
    loss_fn = MMDLoss(estimator=estimator, conditional=conditional)
    model = GlobalBatch(loss_fn) if form == "global_batch" else loss_fn
    student = torch.tensor(s, dtype=dtype, requires_grad=True)
    extra = {"labels": torch.tensor(labels)} if conditional else {}
    loss = model(student, torch.tensor(t, dtype=dtype), **extra)
    loss.backward()
    assert torch.isfinite(student.grad).all()
    assert float(loss_fn.last_parts["bandwidth"]) == pytest.approx(sigma, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(value, rel=1e-4, abs=1e-6)
    np.testing.assert_allclose(
        student.grad.double().numpy(), grad, rtol=1e-4, atol=1e-4 * np.abs(grad).max()
    )


def test_median_bandwidth_of_one_point():
    # every pooled point the same: sigma = 1, the loss 0 and its gradient 0
    x = torch.full((5, 3), 0.1, dtype=torch.float64, requires_grad=True)
    loss_fn = MMDLoss()
    loss = loss_fn(x, x.detach().clone())
    loss.backward()
    assert float(loss_fn.last_parts["bandwidth"]) == 1.0
    assert float(loss.detach()) == 0.0 and torch.all(x.grad.abs() < 1e-12)


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
@pytest.mark.parametrize(("degree", "coef0"), [(2, 0.0), (3, 1.0)])
def test_poly_far_from_the_origin_matches_float64(estimator, degree, coef0):
    # a common offset of 1e4: float32 kernel sums of ~1e17 cancelled to 0 or to -7e10
    rng = np.random.default_rng(11)
    for _ in range(5):
        s = (rng.standard_normal((8, 6)) + 1e4).astype(np.float32)
        t = (rng.standard_normal((8, 6)) * 1.5 + 1e4).astype(np.float32)
        expected = ref_poly_mmd(s, t, degree, coef0, estimator)
        got = mmd_loss(
            torch.tensor(s),
            torch.tensor(t),
            kernel="poly",
            degree=degree,
            coef0=coef0,
            estimator=estimator,
        )
        assert got.dtype == torch.float32
        assert float(got) == pytest.approx(expected, rel=1e-4)


def test_poly_biased_is_never_negative():
    rng = np.random.default_rng(5)
    for offset in (1e2, 1e4, 1e6, 1e7):
        for degree in (1, 2, 3):
            s = (rng.standard_normal((6, 4)) * rng.uniform(0.1, 3) + offset).astype(np.float32)
            t = (rng.standard_normal((6, 4)) + offset).astype(np.float32)
            got = mmd_loss(torch.tensor(s), torch.tensor(t), kernel="poly", degree=degree)
            assert float(got) >= 0


def test_poly_high_degree():
    torch.manual_seed(1)
    unit = torch.nn.functional.normalize(torch.randn(2, 8, 5), dim=-1)
    # ||x||^2 = 10: each kernel value 10^40 overflows float32, the biased MMD^2 does not (the
    # unbiased estimate of that pair is -2.5e39: no float32 holds it)
    big = unit[0] * math.sqrt(10)
    near = torch.nn.functional.normalize(big + 1e-3 * torch.randn(8, 5), dim=-1) * math.sqrt(10)
    cases = [(unit[0], unit[1], "biased"), (unit[0], unit[1], "unbiased"), (big, near, "biased")]
    for s, t, estimator in cases:
        expected = ref_poly_mmd(s.double().numpy(), t.double().numpy(), 40, 0.0, estimator)
        assert abs(expected) < 1e37
        student = s.clone().requires_grad_()
        got = mmd_loss(student, t, kernel="poly", degree=40, estimator=estimator)
        got.backward()
        assert float(got.detach()) == pytest.approx(expected, rel=1e-4)
        assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("conditional", "no"),
        ("conditional", 1),
        ("conditional", None),
        ("degree", True),
        ("degree", 2.0),
        ("degree", 0),
        ("coef0", -1.0),
        ("coef0", float("nan")),
        ("coef0", float("inf")),
        ("coef0", True),
        ("coef0", "1"),
        ("bandwidth", True),
        ("bandwidth", float("inf")),
        ("bandwidth", [1.0, -2.0]),
        ("bandwidth", (1.0, float("nan"))),
        ("multipliers", ()),
        ("multipliers", "12"),
        ("multipliers", (0.0,)),
        ("multipliers", (True,)),
        ("multipliers", 2.0),
        ("estimator", "u"),
        ("kernel", None),
    ],
)
def test_every_option_is_checked_at_construction(option, value):
    kwargs = {"kernel": "poly"} if option != "kernel" else {}
    with pytest.raises(ChoiceError, match=f"^{option}: expected"):
        MMDLoss(**{**kwargs, option: value})
    s = torch.randn(6, 3)
    with pytest.raises(ChoiceError, match=f"^{option}: expected"):
        mmd_loss(s, s, **{**kwargs, option: value})

"""MMDLoss against an explicit double loop over sample pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tolerance

from featkd import ChoiceError, FeatkdInputError, MMDLoss, ShapeError
from featkd.functional import mmd_loss


def _kernel_function(kernel, sigmas=(), degree=2, coef0=0.0):
    if kernel == "linear":
        return lambda x, y: float(np.dot(x, y))
    if kernel == "poly":
        return lambda x, y: float((np.dot(x, y) + coef0) ** degree)
    return lambda x, y: float(
        np.mean([math.exp(-np.sum((x - y) ** 2) / (2 * s**2)) for s in sigmas])
    )


def _mmd_loop(s, t, k, estimator="biased"):
    """MMD^2 with explicit loops: V-statistic or Gretton et al.'s U-statistic (Lemma 6)."""
    n, m = len(s), len(t)
    if estimator == "biased" or n == 1:
        ss = sum(k(s[i], s[j]) for i in range(n) for j in range(n)) / n**2
        tt = sum(k(t[i], t[j]) for i in range(m) for j in range(m)) / m**2
    else:
        ss = sum(k(s[i], s[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        tt = sum(k(t[i], t[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    st = sum(k(s[i], t[j]) for i in range(n) for j in range(m)) / (n * m)
    return ss + tt - 2 * st


def _heuristic_sigma(s, t, rule):
    """sigma from the median / mean squared distance over distinct pairs of pooled points."""
    pooled = np.concatenate([s, t])
    squared = [
        np.sum((pooled[i] - pooled[j]) ** 2)
        for i in range(len(pooled))
        for j in range(i + 1, len(pooled))
    ]
    # torch.median returns the lower of the two middle values
    value = np.sort(squared)[(len(squared) - 1) // 2] if rule == "median" else np.mean(squared)
    return math.sqrt(value)


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
@pytest.mark.parametrize("kernel", ["rbf", "linear", "poly"])
def test_matches_double_loop(rng, device, dtype, kernel, estimator):
    s = rng.standard_normal((9, 4))
    t = 1.2 * rng.standard_normal((9, 4)) + 0.5
    s, t = (torch.tensor(x, dtype=dtype).double().numpy() for x in (s, t))
    k = _kernel_function(kernel, sigmas=(1.7,), degree=3, coef0=1.0)
    expected = _mmd_loop(s, t, k, estimator)
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
    sigma = _heuristic_sigma(s, t, rule)
    multipliers = (0.5, 1.0, 3.0)
    k = _kernel_function("rbf", sigmas=[sigma * m for m in multipliers])
    loss_fn = MMDLoss(bandwidth=rule, multipliers=multipliers)
    got = loss_fn(torch.tensor(s), torch.tensor(t))
    assert float(got) == pytest.approx(_mmd_loop(s, t, k), rel=1e-10)
    expected_mean = np.mean([sigma * m for m in multipliers])
    assert float(loss_fn.last_parts["bandwidth"]) == pytest.approx(expected_mean, rel=1e-10)


def test_list_of_bandwidths(rng):
    s, t = rng.standard_normal((7, 3)), rng.standard_normal((7, 3))
    k = _kernel_function("rbf", sigmas=(0.5, 2.0, 8.0))
    got = mmd_loss(torch.tensor(s), torch.tensor(t), bandwidth=[0.5, 2.0, 8.0])
    assert float(got) == pytest.approx(_mmd_loop(s, t, k), rel=1e-10)


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
    sigma = _heuristic_sigma(s, t, "median")  # one bandwidth from the whole batch
    for kernel in ("rbf", "linear", "poly"):
        k = _kernel_function(kernel, sigmas=(sigma,))
        for estimator in ("biased", "unbiased"):
            # a class seen once has no distinct pairs: its biased value (the loop's n == 1 rule)
            expected = np.mean(
                [_mmd_loop(s[labels == c], t[labels == c], k, estimator) for c in (0, 2, 7)]
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

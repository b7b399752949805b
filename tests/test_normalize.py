import numpy as np
import pytest
import torch
from references import ref_cholesky_whitening

from featkd import ChoiceError, DTypeError, FeatkdInputError, ShapeError, Whitening
from featkd.vkd.normalize import batch_standardize, layer_norm, whiten


def test_layer_norm_matches_numpy(rng):
    x = rng.standard_normal((5, 7)) * 3 + 1
    expected = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(layer_norm(torch.from_numpy(x)).numpy(), expected, rtol=1e-12)


def test_batch_standardize_matches_numpy(rng):
    x = rng.standard_normal((9, 4)) * [1, 10, 0.1, 3] + 2
    expected = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
    np.testing.assert_allclose(batch_standardize(torch.from_numpy(x)).numpy(), expected, rtol=1e-12)


def test_batch_standardize_needs_two_samples():
    with pytest.raises(ShapeError, match="at least 2"):
        batch_standardize(torch.randn(1, 3))


@pytest.mark.parametrize("method", ["cholesky", "zca"])
def test_whitened_covariance_is_identity(rng, method):
    mix = rng.standard_normal((6, 6)) + 3 * np.eye(6)
    x = rng.standard_normal((600, 6)) @ mix + 4.0
    y = whiten(torch.from_numpy(x), method).numpy()
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-10)
    np.testing.assert_allclose(y.T @ y / len(y), np.eye(6), atol=1e-4)


def test_cholesky_whitening_matches_numpy(rng):
    x = rng.standard_normal((50, 5)) @ rng.standard_normal((5, 5))
    np.testing.assert_allclose(
        whiten(torch.from_numpy(x), "cholesky", 1e-3).numpy(),
        ref_cholesky_whitening(x, 1e-3),
        rtol=1e-9,
        atol=1e-9,
    )


def test_zca_is_symmetric_whitening(rng):
    x = rng.standard_normal((80, 4)) @ rng.standard_normal((4, 4))
    xc = x - x.mean(0)
    cov = xc.T @ xc / len(x)
    shrink = 1e-5 * np.trace(cov) / 4
    w, v = np.linalg.eigh(cov)
    expected = xc @ (v / np.sqrt(w + shrink)) @ v.T
    np.testing.assert_allclose(whiten(torch.from_numpy(x), "zca").numpy(), expected, rtol=1e-8)


@pytest.mark.parametrize("method", ["cholesky", "zca"])
def test_whitening_with_fewer_samples_than_dims(method):
    x = torch.randn(8, 32)
    y = whiten(x, method)
    assert torch.isfinite(y).all()
    x.requires_grad_(True)
    whiten(x, method).square().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_whitening_gradcheck():
    x = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: whiten(a, "cholesky", 1e-3), (x,))
    assert torch.autograd.gradcheck(lambda a: whiten(a, "zca", 1e-3), (x,))


def test_whitening_module_running_stats():
    torch.manual_seed(0)
    white = Whitening(3, momentum=1.0)
    mix = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.5, 3.0]])
    batch = torch.randn(400, 3) @ mix + 1
    train_out = white(batch)
    white.eval()
    # momentum 1: the running statistics are exactly the last batch's
    torch.testing.assert_close(white(batch), train_out)
    single = white(batch[:1])
    torch.testing.assert_close(single, train_out[:1])
    assert int(white.num_batches_tracked) == 1


def test_whitening_module_errors():
    with pytest.raises(ChoiceError, match="method: expected one of 'cholesky', 'zca'"):
        Whitening(4, method="pca")
    with pytest.raises(ShapeError, match="D=4"):
        Whitening(4)(torch.randn(8, 5))
    with pytest.raises(ShapeError, match="at least 2"):
        Whitening(4)(torch.randn(1, 4))
    assert "method='cholesky'" in repr(Whitening(4))


# ------------------------------------------------------------------ arguments checked (issue 11)
def test_whitening_momentum_must_be_in_0_1():
    # momentum 5 extrapolated the running covariance out of the positive-definite cone: the
    # module was built, trained, and failed in Cholesky in eval mode
    for momentum in (5.0, 0.0, -0.1, float("nan"), True):
        with pytest.raises(ChoiceError, match=r"momentum: expected a finite number > 0 and <= 1"):
            Whitening(4, momentum=momentum)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"track_running_stats": "yes"}, "track_running_stats: expected True or False"),
        ({"track_running_stats": None}, "track_running_stats: expected True or False"),
        ({"dtype": torch.int64}, "dtype: expected None or one of torch.float16"),
        ({"dtype": "float32"}, "dtype: expected None or one of torch.float16"),
    ],
)
def test_whitening_options_checked_at_construction(options, message):
    with pytest.raises(ChoiceError, match=message):
        Whitening(4, **options)


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan"), None])
def test_standardisations_refuse_eps_that_cannot_guard_a_division(eps):
    x = torch.randn(6, 4)
    x[:, 0] = 2.0  # a constant channel: eps=0 divided 0 by 0
    with pytest.raises(ChoiceError, match="eps: expected a finite number > 0"):
        batch_standardize(x, eps)
    with pytest.raises(ChoiceError, match="eps: expected a finite number > 0"):
        layer_norm(x, eps)


def test_layer_norm_checks_its_input():
    with pytest.raises(FeatkdInputError, match="x: expected a torch.Tensor, got list"):
        layer_norm([[1.0, 2.0]])
    with pytest.raises(DTypeError, match="x: expected a floating-point tensor"):
        layer_norm(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"x: expected \(\.\.\., D\), got a scalar"):
        layer_norm(torch.tensor(1.0))


def test_tiny_eps_on_constant_features_gives_zero_with_finite_gradients():
    # 1e-300 is > 0 but rounds to 0 in float32: NaN before the floor
    x = torch.full((4, 3), 2.0, requires_grad=True)
    for out in (layer_norm(x, 1e-300), batch_standardize(x, 1e-300)):
        assert torch.equal(out.detach(), torch.zeros(4, 3))
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert bool(torch.isfinite(grad).all())


# ------------------------------------------------------------------ one meaning per name (issue 12)
def test_whitening_shrinkage_and_its_old_name_eps(rng):
    """``eps`` meant the relative shrinkage in whitening and an added epsilon in the
    standardisations; the whitening's is ``shrinkage`` now, ``eps=`` warns for one release."""
    x = torch.from_numpy(rng.standard_normal((12, 5)))
    expected = ref_cholesky_whitening(x.numpy(), 1e-2)
    np.testing.assert_allclose(whiten(x, shrinkage=1e-2).numpy(), expected, rtol=1e-9)
    np.testing.assert_allclose(whiten(x, "cholesky", 1e-2).numpy(), expected, rtol=1e-9)
    with pytest.warns(FutureWarning, match="whiten: eps= is renamed to shrinkage="):
        np.testing.assert_allclose(whiten(x, eps=1e-2).numpy(), expected, rtol=1e-9)
    with pytest.raises(ChoiceError, match="eps: renamed to shrinkage; pass only shrinkage"):
        whiten(x, eps=1e-2, shrinkage=1e-2)
    with pytest.raises(ChoiceError, match="shrinkage: expected a finite number > 0, got 0"):
        whiten(x, shrinkage=0)
    with pytest.warns(FutureWarning, match="Whitening: eps= is renamed to shrinkage="):
        old = Whitening(5, eps=1e-2)
    assert old.shrinkage == Whitening(5, shrinkage=1e-2).shrinkage == 1e-2
    assert Whitening(5).shrinkage == 1e-5
    assert "shrinkage=0.01" in repr(old)
    np.testing.assert_allclose(old.double()(x).detach().numpy(), expected, rtol=1e-9)
    eps_error = pytest.raises(ChoiceError, match="eps: expected a finite number > 0, got -1")
    with eps_error, pytest.warns(FutureWarning):
        Whitening(5, eps=-1.0)
    with pytest.raises(ChoiceError, match="shrinkage: expected a finite number > 0, got nan"):
        Whitening(5, shrinkage=float("nan"))


def test_whitening_unchecked_path_equals_forward():
    """What a loss that validated its input calls: the same whitening and running statistics."""
    x = torch.randn(16, 4)
    checked, unchecked = Whitening(4), Whitening(4)
    torch.testing.assert_close(checked(x), unchecked.whiten_unchecked(x), rtol=0, atol=0)
    torch.testing.assert_close(checked.running_cov, unchecked.running_cov, rtol=0, atol=0)
    checked.eval(), unchecked.eval()
    assert not checked.uses_batch_statistics
    torch.testing.assert_close(checked(x[:1]), unchecked.whiten_unchecked(x[:1]), rtol=0, atol=0)

import pytest
import torch
from references import ref_kd

from featkd import DTypeError, KDLoss, ShapeError
from featkd.functional import kd_loss


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_matches_numpy(rng, dtype, temperature):
    s, t = rng.standard_normal((6, 5)) * 3, rng.standard_normal((6, 5)) * 3
    value = kd_loss(torch.from_numpy(s).to(dtype), torch.from_numpy(t).to(dtype), temperature)
    assert value.dtype == dtype
    rel = 1e-10 if dtype == torch.float64 else 1e-5
    assert float(value) == pytest.approx(ref_kd(s, t, temperature), rel=rel)


def test_module_equals_function_and_teacher_gets_no_gradient():
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    loss_fn = KDLoss(temperature=2.0)
    loss = loss_fn(s, t)
    torch.testing.assert_close(loss, kd_loss(s, t, 2.0))
    loss.backward()
    assert s.grad is not None and t.grad is None
    assert list(loss_fn.last_parts) == ["total", "kd"]


def test_gradcheck():
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: kd_loss(x, t, 3.0), (s,))


def test_zero_for_equal_logits_and_bfloat16():
    t = torch.randn(4, 6)
    assert float(kd_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    value = kd_loss(t.bfloat16(), t.bfloat16())
    assert value.dtype == torch.float32 and torch.isfinite(value)


def test_errors():
    with pytest.raises(ShapeError, match=r"teacher: expected last dimension K=3, got 4"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ShapeError, match=r"student: expected \(B, K\)"):
        kd_loss(torch.randn(2, 3, 1), torch.randn(2, 3))
    with pytest.raises(DTypeError):
        kd_loss(torch.zeros(2, 3, dtype=torch.long), torch.randn(2, 3))
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(temperature=0)

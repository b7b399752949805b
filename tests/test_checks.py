import pytest
import torch

import featkd
from featkd import _checks as checks
from featkd import _options as options
from featkd import _precision as precision


def test_error_hierarchy():
    for cls in (
        featkd.ShapeError,
        featkd.DTypeError,
        featkd.NonFiniteError,
        featkd.ChoiceError,
        featkd.DeviceError,
    ):
        assert issubclass(cls, featkd.FeatkdInputError)
        assert issubclass(cls, ValueError)


def test_rank_message_format():
    with pytest.raises(
        featkd.ShapeError,
        match=r"^student: expected \(B, D\) or \(B, N, D\), got \(8, 3, 32, 32\)$",
    ):
        checks.check_rank(torch.zeros(8, 3, 32, 32), "student", {2: "(B, D)", 3: "(B, N, D)"})


def test_not_a_tensor():
    with pytest.raises(featkd.FeatkdInputError, match="student: expected a torch.Tensor, got list"):
        checks.check_rank([1, 2], "student", {2: "(B, D)"})


def test_integer_dtype():
    with pytest.raises(
        featkd.DTypeError, match="teacher: expected a floating-point.*got torch.int64"
    ):
        checks.check_floating(torch.zeros(2, 3, dtype=torch.long), "teacher")


def test_finite_check_and_switch():
    x = torch.tensor([[1.0, float("nan")], [float("inf"), 0.0]])
    with pytest.raises(
        featkd.NonFiniteError, match="teacher: expected finite values, got 2 NaN/Inf"
    ):
        checks.check_finite(x, "teacher")
    previous = featkd.set_finite_check(False)
    try:
        checks.check_finite(x, "teacher")
        assert not checks.finite_check_enabled()
    finally:
        featkd.set_finite_check(previous)
    assert checks.finite_check_enabled()


def test_batch_width_and_min_batch():
    a, b = torch.zeros(4, 3), torch.zeros(5, 3)
    with pytest.raises(featkd.ShapeError, match=r"teacher: expected batch size 4 .* got 5"):
        checks.check_same_batch(a, b, "student", "teacher")
    with pytest.raises(featkd.ShapeError, match=r"teacher: expected last dimension D_t=8, got 3"):
        checks.check_width(b, "teacher", 8, "D_t")
    with pytest.raises(featkd.ShapeError, match="at least 2 \\(a covariance"):
        checks.check_min_batch(torch.zeros(1, 3), "student", 2, "a covariance needs two samples")


def test_choice_and_positive():
    with pytest.raises(
        featkd.ChoiceError, match="distance: expected one of 'mse', 'smooth_l1', got 'l3'"
    ):
        options.check_choice("l3", "distance", ("mse", "smooth_l1"))
    for bad in (0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(featkd.ChoiceError, match="temperature: expected a finite number > 0"):
            options.check_positive(bad, "temperature")
    options.check_positive(0, "eps", allow_zero=True)


def test_labels():
    assert checks.check_labels(torch.tensor([0, 2, 1]), 3) is not None
    with pytest.raises(featkd.ShapeError, match=r"labels: expected shape \(3,\)"):
        checks.check_labels(torch.tensor([0, 1]), 3)
    with pytest.raises(featkd.DTypeError, match="integer"):
        checks.check_labels(torch.tensor([0.0, 1.0, 1.0]), 3)
    with pytest.raises(featkd.ChoiceError, match=">= 0"):
        checks.check_labels(torch.tensor([0, -1, 1]), 3)


def test_devices_and_compute_dtype():
    checks.check_same_device({"a": torch.zeros(1), "b": torch.zeros(1), "c": None})
    assert precision.work_dtype(torch.zeros(1, dtype=torch.float16)) == torch.float32
    assert (
        precision.work_dtype(torch.zeros(1), torch.zeros(1, dtype=torch.float64)) == torch.float64
    )
    assert checks.describe_shape((3,)) == "(3,)"
    assert checks.describe_shape(torch.Size([2, 4])) == "(2, 4)"


def test_dtype_and_device_options_are_checked_alike_everywhere():
    """One dtype list and one device check for every constructor: float8 used to build a
    Whitening that failed at its first call, and a device string torch cannot parse reached
    torch's RuntimeError in VkDLoss, Whitening and OrthogonalProjector."""
    builders = {
        "Whitening": lambda **kw: featkd.Whitening(4, **kw),
        "VkDLoss": lambda **kw: featkd.VkDLoss(student_dim=4, teacher_dim=8, **kw),
        "OrthogonalProjector": lambda **kw: featkd.OrthogonalProjector(4, 8, **kw),
        "LinearHead": lambda **kw: featkd.LinearHead(4, 8, **kw),
    }
    for name, build in builders.items():
        with pytest.raises(featkd.ChoiceError, match="^dtype: expected None or one of") as bad:
            build(dtype=torch.float8_e4m3fn)
        assert "float8" in str(bad.value), name
        with pytest.raises(featkd.ChoiceError, match="^device: expected None, a torch.device"):
            build(device="gpu")

"""LinearHead and TeacherCompressionHead: LayerNorm -> Linear, one implementation, two names."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tolerance
from references import ref_head

from featkd import ChoiceError, DTypeError, LinearHead, ShapeError, TeacherCompressionHead


def randomise_affine(head: LinearHead) -> None:
    """Move the LayerNorm affine away from its (1, 0) init so the reference checks it."""
    with torch.no_grad():
        head.norm.weight.uniform_(0.5, 1.5)
        head.norm.bias.normal_()


@pytest.mark.parametrize("shape", [(5, 12), (3, 7, 12), (12,)])
def test_linear_head_matches_reference(shape, device, dtype):
    head = LinearHead(12, 6, device=device, dtype=dtype)
    randomise_affine(head)
    x = torch.randn(*shape, device=device, dtype=dtype)
    out = head(x)
    assert out.shape == (*shape[:-1], 6)
    assert out.dtype == dtype and out.device.type == device.type
    expected = ref_head(x.double().cpu().numpy(), head)
    np.testing.assert_allclose(out.detach().double().cpu().numpy(), expected, **tolerance(dtype))


def test_teacher_head_is_the_same_module_teacher_first(device):
    head = TeacherCompressionHead(student_dim=192, teacher_dim=384, device=device)
    assert isinstance(head, LinearHead)
    assert (head.teacher_dim, head.student_dim) == (384, 192)
    assert head.weight.shape == (192, 384)  # compresses: out = student width
    assert head.linear.bias is not None and head.linear.bias.shape == (192,)
    assert isinstance(head.norm, torch.nn.LayerNorm) and head.norm.normalized_shape == (384,)
    assert "student_dim=192, teacher_dim=384" in repr(head)
    randomise_affine(head)
    x = torch.randn(2, 5, 384, device=device)
    np.testing.assert_allclose(
        head(x).detach().double().cpu().numpy(),
        ref_head(x.double().cpu().numpy(), head),
        **tolerance(torch.float32),
    )


def test_default_initialisation_is_torch_default():
    head = LinearHead(64, 8)
    assert torch.equal(head.norm.weight, torch.ones(64))
    assert torch.equal(head.norm.bias, torch.zeros(64))
    bound = 1 / 64**0.5  # nn.Linear: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias
    assert head.linear.weight.abs().max() <= bound
    assert head.linear.bias.abs().max() <= bound


def test_parameter_dtype_argument():
    head = TeacherCompressionHead(student_dim=4, teacher_dim=8, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in head.parameters())
    assert len(list(head.parameters())) == 4


def test_gradcheck():
    head = LinearHead(6, 3, dtype=torch.float64)
    randomise_affine(head)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(head, (x,))


def test_wrong_width_names_the_argument():
    with pytest.raises(ShapeError, match=r"teacher: expected last dimension D=16, got 8"):
        TeacherCompressionHead(student_dim=4, teacher_dim=16)(torch.randn(2, 8))
    with pytest.raises(ShapeError, match=r"x: expected last dimension D=16, got 8"):
        LinearHead(16, 4)(torch.randn(2, 3, 8))


def test_bad_inputs_and_arguments():
    with pytest.raises(DTypeError, match=r"x: expected a floating-point tensor"):
        LinearHead(4, 2)(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"teacher: expected \(\.\.\., 4\)"):
        TeacherCompressionHead(student_dim=2, teacher_dim=4)(torch.tensor(1.0))
    with pytest.raises(ShapeError, match=r"no zero-sized dimension, got \(0, 4\)"):
        LinearHead(4, 2)(torch.zeros(0, 4))
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(ChoiceError, match=r"in_features: expected an integer >= 1"):
            LinearHead(bad, 2)
        with pytest.raises(ChoiceError, match=r"student_dim: expected an integer >= 1"):
            TeacherCompressionHead(student_dim=bad, teacher_dim=4)


def test_constructor_refuses_what_used_to_fail_later():
    """Issue 11.7: a dtype or device that torch rejected with its own error (or a complex
    dtype that failed at the first call, naming x), and a truthy string for finite_check that
    silently counted as True, are refused with a named featkd error."""

    def linear(**options):
        return LinearHead(4, 2, **options)

    def compression(**options):
        return TeacherCompressionHead(student_dim=2, teacher_dim=4, **options)

    for build in (linear, compression):
        for bad in (torch.int64, torch.bool, torch.complex64, torch.float8_e4m3fn, "float32"):
            with pytest.raises(ChoiceError, match=r"dtype: expected None or one of torch.float16"):
                build(dtype=bad)
        for bad in ("gpu", "cuda:x", True, 1.5):
            with pytest.raises(ChoiceError, match=r"device: expected None, a torch.device"):
                build(device=bad)
    for ok in (None, torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert LinearHead(4, 2, dtype=ok, device="cpu").weight.dtype == (ok or torch.float32)
    head = LinearHead(4, 2)
    for bad in ("no", 0, None):
        with pytest.raises(ChoiceError, match=r"finite_check: expected True or False"):
            head(torch.randn(3, 4), finite_check=bad)
    assert head(torch.randn(3, 4), finite_check=False).shape == (3, 2)

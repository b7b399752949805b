"""neighbourhood_kl and flat_cosine_loss, the two distances of CosPress, against float64 numpy
references: closed forms, chunking, gradients, numerics at temperature 0.01 with 257 tokens, dead
and extreme vectors, and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tolerance
from references import (
    numpy64,
    ref_neighbourhood_kl,
    ref_one_minus_cos,
)

from featkd import ChoiceError, ShapeError
from featkd.cospress import DEFAULT_TEMPERATURES, flat_cosine_loss, neighbourhood_kl


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The small matrices here run faster on one thread than on a contended pair of cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------
# neighbourhood_kl


@pytest.mark.parametrize("style", ["full", "half"])
@pytest.mark.parametrize("temperatures", [DEFAULT_TEMPERATURES, (0.3,), (0.05, 1.0)])
def test_neighbourhood_kl_matches_reference(style, temperatures, device, dtype):
    reference = torch.randn(3, 9, 7, dtype=dtype, device=device)
    candidate = torch.randn(3, 9, 4, dtype=dtype, device=device)
    out = neighbourhood_kl(
        reference, candidate, temperatures=temperatures, style=style, reduction="none"
    )
    assert out.shape == (3,) and out.dtype == dtype
    expected = [
        ref_neighbourhood_kl(numpy64(reference[s]), numpy64(candidate[s]), temperatures, style)
        for s in range(3)
    ]
    tol = tolerance(dtype) if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-11}
    np.testing.assert_allclose(numpy64(out), expected, **tol)
    mean = neighbourhood_kl(reference, candidate, temperatures=temperatures, style=style)
    np.testing.assert_allclose(float(mean), np.mean(expected), **tol)
    single = neighbourhood_kl(reference[1], candidate[1], temperatures=temperatures, style=style)
    assert single.shape == ()
    np.testing.assert_allclose(float(single), expected[1], **tol)


@pytest.mark.parametrize("style", ["full", "half"])
def test_closed_forms_are_zero(style):
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    positive_scale = torch.rand(2, 12, 1, dtype=torch.float64) + 0.1
    for same_angles in (x, x @ rotation, x * positive_scale):
        value = neighbourhood_kl(x, same_angles, style=style)
        assert abs(float(value)) < 1e-10
    # two vectors: each row's only neighbour is the other one, whatever the angles
    two = neighbourhood_kl(torch.randn(2, 5), torch.randn(2, 3), style=style)
    assert abs(float(two)) < 1e-5
    # a different similarity structure costs something
    assert float(neighbourhood_kl(x, torch.randn(2, 12, 16, dtype=torch.float64))) > 0.1


@pytest.mark.parametrize("style", ["full", "half"])
@pytest.mark.parametrize("chunk_elements", [1, 90, 800, 10**9])
def test_chunking_does_not_change_values_or_gradients(style, chunk_elements):
    # 4 sets of 9 vectors, 10 temperatures: chunks of single matrices, several temperatures of
    # one set, several whole sets, and everything at once
    reference = torch.randn(4, 9, 6, dtype=torch.float64)
    candidate = torch.randn(4, 9, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(4, dtype=torch.float64)
    whole = neighbourhood_kl(reference, candidate, style=style, reduction="none")
    (grad_whole,) = torch.autograd.grad((whole * weights).sum(), candidate)
    chunked = neighbourhood_kl(
        reference, candidate, style=style, reduction="none", chunk_elements=chunk_elements
    )
    (grad_chunked,) = torch.autograd.grad((chunked * weights).sum(), candidate)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_chunked, grad_whole, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("style", ["full", "half"])
@pytest.mark.parametrize("chunk_elements", [50, 10**6])
def test_neighbourhood_kl_gradcheck(style, chunk_elements):
    reference = torch.randn(2, 6, 5, dtype=torch.float64)
    candidate = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)

    def fn(c):
        return neighbourhood_kl(
            reference,
            c,
            temperatures=(0.05, 0.2, 1.0),
            style=style,
            reduction="none",
            chunk_elements=chunk_elements,
        )

    assert torch.autograd.gradcheck(fn, (candidate,))


def test_reference_side_gets_no_gradient():
    reference = torch.randn(3, 8, 5, requires_grad=True)
    candidate = torch.randn(3, 8, 4, requires_grad=True)
    neighbourhood_kl(reference, candidate).backward()
    assert reference.grad is None
    assert candidate.grad is not None and bool(candidate.grad.abs().sum() > 0)


@pytest.mark.parametrize("style", ["full", "half"])
def test_finite_at_lowest_temperature_with_257_tokens(style, device):
    """tau = 0.01, 257 tokens, float32: no NaN/Inf in the value or the gradient, and the value
    agrees with the float64 computation."""
    gen = torch.Generator().manual_seed(3)
    teacher = torch.randn(2, 257, 384, generator=gen).to(device)
    compressed = (teacher @ torch.randn(384, 192, generator=gen).to(device)).requires_grad_()
    value = neighbourhood_kl(teacher, compressed, temperatures=(0.01,), style=style)
    value.backward()
    assert bool(torch.isfinite(value)) and bool(torch.isfinite(compressed.grad).all())
    value64 = neighbourhood_kl(
        teacher.double(), compressed.detach().double(), temperatures=(0.01,), style=style
    )
    np.testing.assert_allclose(float(value.detach()), float(value64), rtol=1e-4)
    # the all-equal case: every cosine 1, the mask alone shapes the distribution
    ones = torch.ones(1, 257, 8, device=device, requires_grad=True)
    same = neighbourhood_kl(ones.detach() + 0, ones, temperatures=(0.01,), style=style)
    same.backward()
    assert float(same.detach()) == 0.0 and bool(torch.isfinite(ones.grad).all())


def test_half_precision_inputs_are_computed_in_float32():
    reference = torch.randn(2, 10, 8)
    candidate = torch.randn(2, 10, 4)
    full = neighbourhood_kl(reference.bfloat16().float(), candidate.bfloat16().float())
    low = neighbourhood_kl(reference.bfloat16(), candidate.bfloat16())
    assert low.dtype == torch.float32
    # the same values in float32: equal up to float32 rounding (a bfloat16 computation is not)
    np.testing.assert_allclose(float(low), float(full), rtol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = neighbourhood_kl(reference, candidate)
    assert under_autocast.dtype == torch.float32
    assert float(under_autocast) == float(neighbourhood_kl(reference, candidate))


# ----------------------------------------------------------------------------------------------
# flat_cosine_loss


def test_flat_cosine_loss_is_one_cosine_per_sample(dtype):
    student = torch.randn(4, 6, 5, dtype=dtype)
    target = torch.randn(4, 6, 5, dtype=dtype)
    expected = np.mean(
        [ref_one_minus_cos(numpy64(s), numpy64(t)) for s, t in zip(student, target, strict=True)]
    )
    value = float(flat_cosine_loss(student, target))
    np.testing.assert_allclose(value, expected, **tolerance(dtype))
    # not the mean of per-token cosines: rescaling one token changes the flattened cosine only
    scaled = target.clone()
    scaled[:, 0] *= 10
    per_token = 1 - torch.nn.functional.cosine_similarity(student, target, dim=-1).mean()
    per_token_scaled = 1 - torch.nn.functional.cosine_similarity(student, scaled, dim=-1).mean()
    torch.testing.assert_close(per_token, per_token_scaled)
    assert abs(float(flat_cosine_loss(student, scaled) - flat_cosine_loss(student, target))) > 1e-3


def test_flat_cosine_loss_target_gets_no_gradient():
    student = torch.randn(3, 4, requires_grad=True)
    target = torch.randn(3, 4, requires_grad=True)
    flat_cosine_loss(student, target).backward()
    assert target.grad is None and student.grad is not None


# ----------------------------------------------------------------------------------------------
# dead and extreme vectors


def test_short_and_dead_student_gradients_against_reference():
    """flat_cosine_loss in float64 against numpy. Values are exact (a zero sample has cosine
    0). The gradient of 1 - cos_b is -(t_b - cos_b s_b) / (B ||s_b||) with unit s_b, t_b; a
    sample shorter than f = median non-zero norm / 4 gets ||s_b|| replaced by f, and a dead
    one -t_b / (B f). (An odd count of non-zero samples: torch's median of an even count is
    the lower middle value.)"""
    student = torch.randn(6, 4, 3, dtype=torch.float64)
    target = torch.randn(6, 4, 3, dtype=torch.float64)
    student[1] = 0  # dead
    student[2] *= 0.02  # short
    student.requires_grad_()
    value = flat_cosine_loss(student, target)
    value.backward()

    s, t = numpy64(student).reshape(6, -1), numpy64(target).reshape(6, -1)
    norms = np.linalg.norm(s, axis=1)
    floor = 0.25 * np.median(norms[norms > 0])
    assert norms[2] < floor < norms[[0, 3, 4, 5]].min()
    unit_t = t / np.linalg.norm(t, axis=1, keepdims=True)
    expected_value, expected_grad = 0.0, np.zeros_like(s)
    for b in range(6):
        if norms[b] == 0:
            expected_value += 1.0 / 6
            expected_grad[b] = -unit_t[b] / (6 * floor)
            continue
        unit_s = s[b] / norms[b]
        cos = unit_s @ unit_t[b]
        expected_value += (1 - cos) / 6
        expected_grad[b] = -(unit_t[b] - cos * unit_s) / (6 * max(norms[b], floor))
    np.testing.assert_allclose(float(value.detach()), expected_value, rtol=1e-12)
    np.testing.assert_allclose(numpy64(student.grad).reshape(6, -1), expected_grad, rtol=1e-10)


def test_flat_cosine_loss_twice_differentiable():
    """The custom normalisation keeps the double backward torch's cosine_similarity had."""
    student = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randn(4, 3, 5, dtype=torch.float64)
    assert torch.autograd.gradgradcheck(lambda s: flat_cosine_loss(s, target), (student,))


def test_dead_candidate_vector_in_neighbourhood_kl():
    """A zero candidate vector (cosine 0 with all others, as in the reference) had a gradient of
    about 1e12: torch's normalize divides by max(||x||, 1e-12). Now of the others' order."""
    reference = torch.randn(2, 9, 7)
    candidate = torch.randn(2, 9, 4)
    candidate[0, 2] = 0
    candidate.requires_grad_()
    value = neighbourhood_kl(reference, candidate, reduction="none")
    expected = [
        ref_neighbourhood_kl(numpy64(reference[i]), numpy64(candidate[i]), DEFAULT_TEMPERATURES)
        for i in range(2)
    ]
    np.testing.assert_allclose(numpy64(value), expected, **tolerance(torch.float32))
    value.sum().backward()
    grad = candidate.grad
    assert bool(torch.isfinite(grad).all())
    largest_other = float(torch.cat([grad[0, :2], grad[0, 3:]]).abs().max())
    assert 0 < float(grad[0, 2].abs().max()) <= 10 * largest_other


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_extreme_magnitudes_in_float32(scale):
    """Norms are taken after dividing by the largest entry: in float32 the squares of 1e-30
    underflow and those of 1e30 overflow, and the loss read 1.0 as if every vector were zero."""
    student = torch.randn(4, 6, 5, dtype=torch.float64)
    target = torch.randn(4, 6, 5, dtype=torch.float64)
    small = (scale * student).float().requires_grad_()
    value = flat_cosine_loss(small, target.float())
    expected = np.mean(
        [ref_one_minus_cos(numpy64(a), numpy64(b)) for a, b in zip(student, target, strict=True)]
    )
    np.testing.assert_allclose(float(value.detach()), expected, rtol=1e-5)
    value.backward()
    assert bool(torch.isfinite(small.grad).all()) and bool(small.grad.abs().sum() > 0)
    kl = neighbourhood_kl((scale * student).float(), target.float(), reduction="none")
    expected_kl = [
        ref_neighbourhood_kl(numpy64(a), numpy64(b), DEFAULT_TEMPERATURES)
        for a, b in zip(student, target, strict=True)
    ]
    np.testing.assert_allclose(numpy64(kl), expected_kl, **tolerance(torch.float32))


def test_function_errors():
    x = torch.randn(3, 5, 4)
    with pytest.raises(ShapeError, match=r"candidate: expected .* to match reference \(3, 5, 4\)"):
        neighbourhood_kl(x, torch.randn(3, 6, 4))
    with pytest.raises(ShapeError, match=r"reference: expected at least 2 vectors per set"):
        neighbourhood_kl(x[:, :1], x[:, :1])
    with pytest.raises(ShapeError, match=r"reference: expected \(M, D\) or \(S, M, D\)"):
        neighbourhood_kl(x[None], x[None])
    with pytest.raises(ChoiceError, match=r"reduction: expected one of 'mean', 'sum', 'none'"):
        neighbourhood_kl(x, x, reduction="max")
    with pytest.raises(ChoiceError, match=r"style: expected one of"):
        neighbourhood_kl(x, x, style="joint")
    with pytest.raises(ShapeError, match=r"target: expected the shape of student \(3, 5, 4\)"):
        flat_cosine_loss(x, x[:, :4])

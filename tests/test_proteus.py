"""ProteusLoss: student heads mapping up to the teacher + MSE, against a float64 numpy
transcription; gradient routing; errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tolerance
from references import numpy64, ref_head, ref_mse, ref_proteus_tokens

import featkd
from featkd import ChoiceError, LinearHead, ProteusLoss, ShapeError
from featkd.functional import proteus_loss


def make_loss(dtype=torch.float64, device="cpu", **kwargs) -> ProteusLoss:
    loss_fn = ProteusLoss(student_dim=5, teacher_dim=9, dtype=dtype, device=device, **kwargs)
    with torch.no_grad():
        for head in (loss_fn.cls_head, loss_fn.token_head):
            head.norm.weight.uniform_(0.5, 1.5)
            head.norm.bias.normal_()
    return loss_fn


@pytest.mark.parametrize("num_prefix_tokens", [1, 0])
def test_terms_match_reference(num_prefix_tokens, device, dtype):
    weights = {"tokens": 0.5, "cls": 2.0}
    loss_fn = make_loss(dtype, device, weights=weights, num_prefix_tokens=num_prefix_tokens)
    student = torch.randn(4, 6, 5, dtype=dtype, device=device)
    teacher = torch.randn(4, 6, 9, dtype=dtype, device=device)
    loss = loss_fn(student, teacher)
    assert loss.shape == () and loss.dtype == dtype
    s, t = numpy64(student), numpy64(teacher)
    cls = (lambda x: x[:, 0]) if num_prefix_tokens else (lambda x: x.mean(1))
    if num_prefix_tokens:  # the official routing: the CLS slot through the CLS head
        tokens = ref_proteus_tokens(s, t, loss_fn.cls_head, loss_fn.token_head)
    else:  # no CLS slot: every token through the token head
        tokens = ref_mse(ref_head(s, loss_fn.token_head), t)
    cls_term = ref_mse(ref_head(cls(s), loss_fn.cls_head), cls(t))
    tol = tolerance(dtype)
    assert list(loss_fn.last_parts) == ["total", "cls", "tokens"]
    np.testing.assert_allclose(float(loss_fn.last_parts["tokens"]), tokens, **tol)
    np.testing.assert_allclose(float(loss_fn.last_parts["cls"]), cls_term, **tol)
    np.testing.assert_allclose(float(loss.detach()), 0.5 * tokens + 2.0 * cls_term, **tol)


def test_pooled_inputs_have_the_cls_term_only():
    loss_fn = make_loss()
    student = torch.randn(7, 5, dtype=torch.float64)
    teacher = torch.randn(7, 9, dtype=torch.float64)
    loss = loss_fn(student, teacher)
    assert list(loss_fn.last_parts) == ["total", "cls"]
    expected = ref_mse(ref_head(numpy64(student), loss_fn.cls_head), numpy64(teacher))
    np.testing.assert_allclose(float(loss.detach()), expected, rtol=1e-10)


def test_zero_when_the_heads_reproduce_the_teacher():
    loss_fn = make_loss()
    student = torch.randn(3, 4, 5, dtype=torch.float64)
    with torch.no_grad():
        loss_fn.cls_head.load_state_dict(loss_fn.token_head.state_dict())
        teacher = loss_fn.token_head(student)
    assert float(loss_fn(student, teacher).detach()) < 1e-24


def test_gradient_routing():
    loss_fn = make_loss()
    student = torch.randn(4, 6, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 6, 9, dtype=torch.float64, requires_grad=True)
    loss_fn(student, teacher).backward()
    assert teacher.grad is None
    assert bool(student.grad.abs().sum() > 0)
    for head in (loss_fn.cls_head, loss_fn.token_head):
        assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in head.parameters())
    # the token head learns from the token term only
    loss_fn.zero_grad(set_to_none=True)
    loss_fn.weights = {"tokens": 0.0, "cls": 1.0}
    loss_fn(student, teacher).backward()
    assert all(p.grad is None or not bool(p.grad.any()) for p in loss_fn.token_head.parameters())


@pytest.mark.parametrize(("route", "cls_head_learns"), [("cls_head", True), ("token_head", False)])
def test_cls_head_learns_from_the_token_term_in_the_official_routing(route, cls_head_learns):
    loss_fn = make_loss(weights={"tokens": 1.0, "cls": 0.0}, cls_in_token_term=route)
    student = torch.randn(4, 6, 5, dtype=torch.float64, requires_grad=True)
    loss_fn(student, torch.randn(4, 6, 9, dtype=torch.float64)).backward()
    grads = [p.grad for p in loss_fn.cls_head.parameters()]
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads) == cls_head_learns


def test_token_head_routing_is_featkd_0_1():
    # cls_in_token_term="token_head": the token head maps every token, the CLS token included
    loss_fn = make_loss(cls_in_token_term="token_head")
    student = torch.randn(4, 6, 5, dtype=torch.float64)
    teacher = torch.randn(4, 6, 9, dtype=torch.float64)
    loss_fn(student, teacher)
    expected = ref_mse(ref_head(numpy64(student), loss_fn.token_head), numpy64(teacher))
    np.testing.assert_allclose(float(loss_fn.last_parts["tokens"]), expected, rtol=1e-10)
    assert "cls_in_token_term='token_head'" in repr(loss_fn)


def test_official_routing_with_several_prefix_tokens():
    # token 0 is the CLS slot; a distillation token (token 1) goes through the token head
    loss_fn = make_loss(num_prefix_tokens=2)
    student = torch.randn(3, 7, 5, dtype=torch.float64)
    teacher = torch.randn(3, 7, 9, dtype=torch.float64)
    loss_fn(student, teacher)
    s, t = numpy64(student), numpy64(teacher)
    expected = ref_proteus_tokens(s, t, loss_fn.cls_head, loss_fn.token_head)
    np.testing.assert_allclose(float(loss_fn.last_parts["tokens"]), expected, rtol=1e-10)


def test_cls_in_token_term_is_checked():
    with pytest.raises(ChoiceError, match=r"cls_in_token_term: expected one of 'cls_head'"):
        ProteusLoss(student_dim=5, teacher_dim=9, cls_in_token_term="cls")
    head = LinearHead(5, 9)
    with pytest.raises(ChoiceError, match=r"cls_in_token_term"):
        proteus_loss(torch.randn(2, 3, 5), torch.randn(2, 3, 9), head, head, cls_in_token_term=None)


def test_gradcheck():
    loss_fn = make_loss()
    teacher = torch.randn(3, 4, 9, dtype=torch.float64)
    student = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: loss_fn(s, teacher), (student,))


def test_low_precision_and_autocast():
    loss_fn = ProteusLoss(student_dim=5, teacher_dim=9)
    student, teacher = torch.randn(4, 6, 5), torch.randn(4, 6, 9)
    reference = loss_fn(student, teacher).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss_fn(student, teacher).detach()
    torch.testing.assert_close(under_autocast, reference)
    low = loss_fn(student.bfloat16(), teacher.bfloat16()).detach()
    assert low.dtype == torch.float32
    np.testing.assert_allclose(float(low), float(reference), rtol=3e-2)


def test_owns_two_heads():
    loss_fn = ProteusLoss(student_dim=192, teacher_dim=384)
    assert featkd.ProteusLoss is ProteusLoss
    assert isinstance(loss_fn.cls_head, LinearHead) and isinstance(loss_fn.token_head, LinearHead)
    assert loss_fn.cls_head is not loss_fn.token_head
    assert loss_fn.cls_head.weight.shape == (384, 192)  # maps the student up
    assert (loss_fn.student_dim, loss_fn.teacher_dim) == (192, 384)
    assert len(list(loss_fn.parameters())) == 8


def test_errors():
    loss_fn = ProteusLoss(student_dim=5, teacher_dim=9)
    s, t = torch.randn(4, 6, 5), torch.randn(4, 6, 9)
    with pytest.raises(ShapeError, match=r"teacher: expected last dimension D_t=9, got 5"):
        loss_fn(s, torch.randn(4, 6, 5))
    with pytest.raises(ShapeError, match=r"student: expected last dimension D_s=5, got 9"):
        loss_fn(t, t)
    with pytest.raises(ShapeError, match=r"teacher: expected \(B, D_t\) to match student \(4, 5\)"):
        loss_fn(s[:, 0], t)
    with pytest.raises(ShapeError, match=r"teacher: expected batch size 4"):
        loss_fn(s, t[:2])
    with pytest.raises(ChoiceError, match=r"weights: expected a dict of weights by term name"):
        ProteusLoss(student_dim=5, teacher_dim=9, weights=(1.0,))
    with pytest.raises(ChoiceError, match=r"num_prefix_tokens: expected an integer >= 0"):
        ProteusLoss(student_dim=5, teacher_dim=9, num_prefix_tokens=1.5)


def test_constructor_names_the_arguments_the_user_wrote():
    """Issue 11.7: a bad width was reported as the head's in_features / out_features; a bad
    dtype or device raised torch's own error."""
    for bad in (0, 2.5, True):
        with pytest.raises(ChoiceError, match=r"^student_dim: expected an integer >= 1"):
            ProteusLoss(student_dim=bad, teacher_dim=9)
        with pytest.raises(ChoiceError, match=r"^teacher_dim: expected an integer >= 1"):
            ProteusLoss(student_dim=5, teacher_dim=bad)
    with pytest.raises(ChoiceError, match=r"^dtype: expected None or one of torch.float16"):
        ProteusLoss(student_dim=5, teacher_dim=9, dtype=torch.int64)
    with pytest.raises(ChoiceError, match=r"^device: expected None, a torch.device"):
        ProteusLoss(student_dim=5, teacher_dim=9, device="gpu")
    for bad in (float("nan"), True, -1.0):
        with pytest.raises(ChoiceError, match=r"^weights\['cls'\]: expected a finite number >= 0"):
            ProteusLoss(student_dim=5, teacher_dim=9, weights={"cls": bad})
    with pytest.raises(ChoiceError, match=r"^weights: expected a dict of weights by term name"):
        ProteusLoss(student_dim=5, teacher_dim=9, weights="11")


def test_a_cls_token_alone():
    # N = 1: the tokens term is the CLS slot through the CLS head (featkd 0.1: the token head)
    loss_fn = make_loss()
    student = torch.randn(3, 1, 5, dtype=torch.float64)
    teacher = torch.randn(3, 1, 9, dtype=torch.float64)
    loss_fn(student, teacher)
    torch.testing.assert_close(loss_fn.last_parts["tokens"], loss_fn.last_parts["cls"])
    loss_fn.cls_in_token_term = "token_head"
    loss_fn(student, teacher)
    expected = ref_mse(ref_head(numpy64(student), loss_fn.token_head), numpy64(teacher))
    np.testing.assert_allclose(float(loss_fn.last_parts["tokens"]), expected, rtol=1e-10)

"""CosPress, Proteus and their heads on the loss contract (issue 12): the function form equals
the module, reductions, the batch-level global term, keyword-only widths and their one-release
positional form, last_parts, labels."""

from __future__ import annotations

import warnings

import pytest
import torch

from featkd import (
    ChoiceError,
    CosPressLoss,
    GlobalBatch,
    LinearHead,
    ProteusLoss,
    TeacherCompressionHead,
)
from featkd.cospress import cospress_loss
from featkd.cospress.proteus import proteus_loss

TOKENS = ((6, 5, 4), (6, 5, 7))
POOLED = ((6, 4), (6, 7))


def features(shapes, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    s_shape, t_shape = shapes
    student = torch.randn(s_shape, generator=generator, dtype=dtype, requires_grad=True)
    return student, torch.randn(t_shape, generator=generator, dtype=dtype)


def grads(loss, student, module):
    params = list(module.parameters())
    return torch.autograd.grad(loss, [student, *params], allow_unused=True)


def cospress(**options):
    return CosPressLoss(student_dim=4, teacher_dim=7, dtype=torch.float64, **options)


def proteus(**options):
    return ProteusLoss(student_dim=4, teacher_dim=7, dtype=torch.float64, **options)


# ----------------------------------------------------------------------------------------------
# function == module


@pytest.mark.parametrize("shapes", [TOKENS, POOLED], ids=["tokens", "pooled"])
@pytest.mark.parametrize("style", ["full", "half"])
def test_cospress_function_equals_module(shapes, style):
    options = {
        "style": style,
        "temperatures": (0.05, 0.2),
        "weights": {"local": 0.7, "global": 1.3, "tokens": 2.0, "cls": 0.5},
        "num_prefix_tokens": 1,
    }
    loss_fn = cospress(**options)
    student, teacher = features(shapes)
    module_value = loss_fn(student, teacher)
    module_grads = grads(module_value, student, loss_fn)
    value = cospress_loss(student, teacher, loss_fn.head, **options)
    assert torch.equal(value, module_value)
    for a, b in zip(grads(value, student, loss_fn), module_grads, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("shapes", [TOKENS, POOLED], ids=["tokens", "pooled"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("route", ["cls_head", "token_head"])
def test_proteus_function_equals_module(shapes, reduction, route):
    options = {
        "weights": {"tokens": 0.5, "cls": 2.0},
        "reduction": reduction,
        "cls_in_token_term": route,
    }
    loss_fn = proteus(**options)
    student, teacher = features(shapes)
    module_value = loss_fn(student, teacher)
    module_grads = grads(module_value.sum(), student, loss_fn)
    value = proteus_loss(student, teacher, loss_fn.cls_head, loss_fn.token_head, **options)
    assert torch.equal(value, module_value)
    for a, b in zip(grads(value.sum(), student, loss_fn), module_grads, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


def test_function_returns_float32_for_half_precision_features():
    head = TeacherCompressionHead(student_dim=4, teacher_dim=7)
    student, teacher = features(TOKENS, dtype=torch.bfloat16)
    assert cospress_loss(student, teacher, head).dtype == torch.float32
    cls_head, token_head = LinearHead(4, 7), LinearHead(4, 7)
    assert proteus_loss(student, teacher, cls_head, token_head).dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# reduction


@pytest.mark.parametrize("shapes", [TOKENS, POOLED], ids=["tokens", "pooled"])
def test_cospress_reduction_without_the_global_term(shapes):
    student, teacher = features(shapes)
    weights = {"global": 0.0, "cls": 0.5}
    mean = cospress(weights=weights)
    per_sample = cospress(weights=weights, reduction="none")
    summed = cospress(weights=weights, reduction="sum")
    for loss_fn in (per_sample, summed):
        loss_fn.load_state_dict(mean.state_dict())
    value = mean(student, teacher)
    none = per_sample(student, teacher)
    assert none.shape == (6,) and none.dtype == torch.float64
    torch.testing.assert_close(none.mean(), value, rtol=1e-12, atol=0)
    torch.testing.assert_close(summed(student, teacher), none.sum(), rtol=1e-12, atol=0)
    # the per-sample terms are per sample; the (zero-weighted) global term is still logged
    assert per_sample.last_parts["cls"].shape == (6,)
    assert per_sample.last_parts["global"].shape == ()
    # the function agrees
    function = cospress_loss(student, teacher, mean.head, weights=weights, reduction="none")
    assert torch.equal(function, none)


def test_cospress_mean_is_unchanged_by_the_reduction_machinery():
    """One sample's value of reduction='none' is its own: the others do not leak in."""
    student, teacher = features(TOKENS)
    loss_fn = cospress(weights={"global": 0.0}, reduction="none")
    whole = loss_fn(student, teacher)
    part = loss_fn(student[:3], teacher[:3])
    torch.testing.assert_close(part, whole[:3], rtol=1e-12, atol=0)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_cospress_global_term_refuses_per_sample_reductions(reduction):
    match = r"reduction: expected 'mean', got .*global term of CosPress compares the samples"
    with pytest.raises(ChoiceError, match=match):
        cospress(reduction=reduction)
    with pytest.raises(ChoiceError, match=match):
        cospress(reduction=reduction, weights={"global": 0.5})
    student, teacher = features(POOLED)
    head = TeacherCompressionHead(student_dim=4, teacher_dim=7, dtype=torch.float64)
    with pytest.raises(ChoiceError, match=match):
        cospress_loss(student, teacher, head, reduction=reduction)
    # weights is a plain attribute: a global weight set after construction is caught at the call
    loss_fn = cospress(reduction=reduction, weights={"global": 0.0})
    loss_fn.weights = {**loss_fn.weights, "global": 1.0}
    with pytest.raises(ChoiceError, match=match):
        loss_fn(student, teacher)
    with pytest.raises(ChoiceError, match=r"reduction: expected one of 'mean', 'sum', 'none'"):
        cospress(reduction="max", weights={"global": 0.0})


@pytest.mark.parametrize("shapes", [TOKENS, POOLED], ids=["tokens", "pooled"])
def test_proteus_reduction(shapes):
    student, teacher = features(shapes)
    mean = proteus()
    value = mean(student, teacher)
    per_sample = proteus(reduction="none")
    per_sample.load_state_dict(mean.state_dict())
    none = per_sample(student, teacher)
    assert none.shape == (6,)
    torch.testing.assert_close(none.mean(), value, rtol=1e-12, atol=0)
    summed = proteus(reduction="sum")
    summed.load_state_dict(mean.state_dict())
    torch.testing.assert_close(summed(student, teacher), none.sum(), rtol=1e-12, atol=0)
    assert list(per_sample.last_parts) == list(mean.last_parts)
    assert per_sample.last_parts["cls"].shape == (6,)
    with pytest.raises(ChoiceError, match=r"reduction: expected one of 'mean', 'sum', 'none'"):
        proteus(reduction="batchmean")


def test_global_batch_keeps_the_per_sample_values():
    student, teacher = features(TOKENS)
    loss_fn = proteus(reduction="none")
    assert torch.equal(GlobalBatch(loss_fn)(student, teacher), loss_fn(student, teacher))


# ----------------------------------------------------------------------------------------------
# last_parts and labels


def test_last_parts_are_total_then_the_terms_in_order():
    student, teacher = features(TOKENS)
    loss_fn = cospress()
    total = loss_fn(student, teacher)
    assert list(loss_fn.last_parts) == ["total", "global", "cls", "local", "tokens"]
    assert torch.equal(loss_fn.last_parts["total"], total.detach())
    loss_fn(student[:, 0], teacher[:, 0])
    assert list(loss_fn.last_parts) == ["total", "global", "cls"]
    loss_fn = proteus()
    total = loss_fn(student, teacher)
    assert list(loss_fn.last_parts) == ["total", "cls", "tokens"]
    assert torch.equal(loss_fn.last_parts["total"], total.detach())
    assert not any(v.requires_grad for v in loss_fn.last_parts.values())


def test_labels_are_accepted_and_ignored():
    student, teacher = features(TOKENS)
    labels = torch.arange(6) % 3
    for loss_fn in (cospress(), proteus()):
        assert torch.equal(loss_fn(student, teacher, labels=labels), loss_fn(student, teacher))
    head = TeacherCompressionHead(student_dim=4, teacher_dim=7, dtype=torch.float64)
    assert torch.equal(
        cospress_loss(student, teacher, head, labels=labels), cospress_loss(student, teacher, head)
    )


# ----------------------------------------------------------------------------------------------
# keyword-only widths


def no_warning(build):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return build()


def test_keyword_widths_do_not_warn():
    loss_fn = no_warning(lambda: CosPressLoss(student_dim=192, teacher_dim=384))
    assert (loss_fn.student_dim, loss_fn.teacher_dim) == (192, 384)
    assert loss_fn.head.weight.shape == (192, 384)
    loss_fn = no_warning(lambda: ProteusLoss(student_dim=192, teacher_dim=384))
    assert loss_fn.cls_head.weight.shape == (384, 192)
    head = no_warning(lambda: TeacherCompressionHead(student_dim=192, teacher_dim=384))
    assert head.weight.shape == (192, 384)
    assert "student_dim=192, teacher_dim=384" in repr(
        CosPressLoss(student_dim=192, teacher_dim=384)
    )


@pytest.mark.parametrize(
    ("build", "old_order"),
    [
        (CosPressLoss, "teacher_dim, student_dim"),
        (TeacherCompressionHead, "teacher_dim, student_dim"),
        (ProteusLoss, "student_dim, teacher_dim"),
    ],
    ids=["CosPressLoss", "TeacherCompressionHead", "ProteusLoss"],
)
def test_positional_widths_read_the_old_order_and_warn(build, old_order):
    name = build.__name__
    teacher_first = old_order.startswith("teacher")
    student_dim, teacher_dim = (384, 192) if teacher_first else (192, 384)
    spelled = rf"{name}\(student_dim={student_dim}, teacher_dim={teacher_dim}\)"
    with pytest.warns(FutureWarning, match=rf"positional widths .*{spelled} .*{old_order}") as w:
        module = build(192, 384)
    assert w[0].filename == __file__  # the user's line
    assert (module.student_dim, module.teacher_dim) == (student_dim, teacher_dim)
    keyword = build(student_dim=student_dim, teacher_dim=teacher_dim)
    assert module.state_dict().keys() == keyword.state_dict().keys()
    for key, value in keyword.state_dict().items():
        assert module.state_dict()[key].shape == value.shape


@pytest.mark.parametrize("build", [CosPressLoss, ProteusLoss, TeacherCompressionHead])
def test_width_errors_name_the_argument(build):
    with pytest.raises(ChoiceError, match=r"^teacher_dim: required \(keyword-only"):
        build(student_dim=4)
    with pytest.raises(ChoiceError, match=r"^student_dim: required \(keyword-only"):
        build(teacher_dim=4)
    with pytest.raises(ChoiceError, match=r"student_dim: given both by position and by keyword"):
        build(4, 8, student_dim=4)
    with pytest.raises(ChoiceError, match=r"expected at most 2 positional widths"):
        build(4, 8, 2)


# ----------------------------------------------------------------------------------------------
# the function's own arguments


def test_function_argument_errors():
    student, teacher = features(TOKENS)
    with pytest.raises(ChoiceError, match=r"^head: expected a featkd.TeacherCompressionHead"):
        cospress_loss(student, teacher, torch.nn.Linear(7, 4))
    cls_head = LinearHead(4, 7, dtype=torch.float64)
    with pytest.raises(ChoiceError, match=r"^token_head: required for token inputs"):
        proteus_loss(student, teacher, cls_head)
    with pytest.raises(ChoiceError, match=r"^token_head: expected a LinearHead\(4, 7\) like"):
        proteus_loss(student, teacher, cls_head, LinearHead(4, 5, dtype=torch.float64))
    with pytest.raises(ChoiceError, match=r"^cls_head: expected a featkd.LinearHead"):
        proteus_loss(student, teacher, "head")
    assert proteus_loss(student[:, 0], teacher[:, 0], cls_head).shape == ()
    with pytest.warns(FutureWarning, match=r"positional weights=\(tokens, cls\)"):
        proteus_loss(student[:, 0], teacher[:, 0], cls_head, weights=(1.0, 0.5))

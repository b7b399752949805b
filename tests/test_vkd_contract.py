"""VkD on the loss contract (issue 12): the function is the module (train and eval mode, with
whitening), reductions, one validation per call, keyword widths and the renamed ``shrinkage``."""

import pytest
import torch

import featkd
from featkd import ChoiceError, ShapeError, VkDLoss
from featkd.functional import vkd_loss


def _pair(batch=6, generator_seed=0):
    g = torch.Generator().manual_seed(generator_seed)
    return torch.randn(batch, 1 + 4, 4, generator=g), torch.randn(batch, 6, 2, 2, generator=g)


def _module(normalize, **options):
    loss_fn = VkDLoss(student_dim=4, teacher_dim=6, normalize=normalize, **options)
    with torch.no_grad():  # away from the identity
        loss_fn.projector.generator.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
    return loss_fn


def _function(loss_fn, student, teacher, **options):
    return vkd_loss(
        student,
        teacher,
        loss_fn.projector.weight,
        normalize=loss_fn.normalize,
        distance=loss_fn.distance,
        whitening=loss_fn.whitening,
        **options,
    )


@pytest.mark.parametrize("normalize", ["layer_norm", "batch_standardize", "whitening", "none"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_function_equals_module_in_train_and_eval_mode(normalize, reduction):
    """The function given the module's projection (and its whitening) is the module, in
    training mode (batch statistics, folded into the running ones) and in eval mode (the
    running statistics): the module's running statistics were not reachable from the
    function before, so in eval mode the two whitened differently."""
    student, teacher = _pair()
    module, twin = _module(normalize, reduction=reduction), _module(normalize)
    for step in range(3):  # training: the running statistics move the same way in both
        s, t = _pair(generator_seed=step)
        torch.testing.assert_close(
            module(s, t), _function(twin, s, t, reduction=reduction), rtol=0, atol=0
        )
    if normalize == "whitening":
        torch.testing.assert_close(module.whitening.running_cov, twin.whitening.running_cov)
        assert int(twin.whitening.num_batches_tracked) == 3
    module.eval(), twin.eval()
    for batch in (6, 1) if normalize in ("whitening", "layer_norm", "none") else (6,):
        s, t = student[:batch], teacher[:batch]
        torch.testing.assert_close(
            module(s, t), _function(twin, s, t, reduction=reduction), rtol=0, atol=0
        )
    if normalize == "whitening":  # eval mode whitens with the running statistics
        batch_whitened = vkd_loss(student, teacher, twin.projector.weight, normalize=normalize)
        assert not torch.equal(module(student, teacher), batch_whitened)


@pytest.mark.parametrize("normalize", ["layer_norm", "batch_standardize", "whitening", "none"])
@pytest.mark.parametrize("distance", ["smooth_l1", "mse"])
def test_reductions(normalize, distance):
    student, teacher = _pair(batch=7)
    values = {}
    for reduction in ("mean", "sum", "none"):
        loss_fn = _module(normalize, distance=distance, reduction=reduction)
        values[reduction] = loss_fn(student, teacher)
        assert torch.equal(loss_fn.last_parts["total"], values[reduction].detach())
        proj = loss_fn.projector.weight
        function = vkd_loss(
            student, teacher, proj, normalize=normalize, distance=distance, reduction=reduction
        )
        torch.testing.assert_close(function, values[reduction], rtol=0, atol=0)
    assert values["none"].shape == (7,)
    assert values["mean"].shape == values["sum"].shape == ()
    torch.testing.assert_close(values["none"].mean(), values["mean"])
    torch.testing.assert_close(values["none"].sum(), values["sum"])


def test_mean_reduction_is_the_elementwise_mean_bit_for_bit():
    # featkd 0.1 took one mean over every element; "mean" keeps those numbers exactly
    student, teacher = torch.randn(5, 8), torch.randn(5, 12)
    q = torch.linalg.qr(torch.randn(12, 8))[0]
    target = torch.nn.functional.layer_norm(teacher, (12,), eps=1e-5)
    expected = torch.nn.functional.smooth_l1_loss(student @ q.T, target)
    assert torch.equal(vkd_loss(student, teacher, q), expected)


def test_reduction_is_checked():
    with pytest.raises(ChoiceError, match="reduction: expected one of 'mean', 'sum', 'none'"):
        VkDLoss(student_dim=4, teacher_dim=6, reduction="batchmean")
    with pytest.raises(ChoiceError, match="reduction: expected one of"):
        vkd_loss(torch.randn(4, 4), torch.randn(4, 6), torch.eye(6, 4), reduction="max")


def test_labels_are_accepted_and_ignored():
    student, teacher = _pair()
    loss_fn = _module("layer_norm")
    labels = torch.arange(6)
    assert torch.equal(loss_fn(student, teacher, labels=labels), loss_fn(student, teacher))
    proj = loss_fn.projector.weight
    assert torch.equal(
        vkd_loss(student, teacher, proj, labels=labels), vkd_loss(student, teacher, proj)
    )


@pytest.mark.parametrize("normalize", ["layer_norm", "whitening"])
def test_inputs_are_checked_once(monkeypatch, normalize):
    """One finiteness check per input (one host read each): the module no longer checks,
    pools and then calls the checking function, and the owned whitening does not check again."""
    loss_fn = _module(normalize)
    student, teacher = _pair()
    calls = []
    original = torch.isfinite

    def counting(x):
        calls.append(tuple(x.shape))
        return original(x)

    monkeypatch.setattr(torch, "isfinite", counting)
    loss_fn(student, teacher)
    assert calls == [tuple(student.shape), tuple(teacher.shape)]
    calls.clear()
    _function(loss_fn, student, teacher)
    assert calls == [tuple(student.shape), tuple(teacher.shape)]


def test_keyword_widths_and_positional_future_warning():
    student, teacher = _pair()
    keyword = VkDLoss(student_dim=4, teacher_dim=6)
    with pytest.warns(FutureWarning, match=r"VkDLoss\(student_dim=4, teacher_dim=6\)"):
        positional = VkDLoss(4, 6)
    with pytest.warns(FutureWarning):
        mixed = VkDLoss(4, teacher_dim=6)
    for other in (positional, mixed):
        assert (other.student_dim, other.teacher_dim) == (4, 6)
        assert torch.equal(other(student, teacher), keyword(student, teacher))
    with pytest.raises(ChoiceError, match="teacher_dim: required"):
        VkDLoss(student_dim=4)
    with pytest.raises(ChoiceError, match="student_dim: given both by position and by keyword"):
        VkDLoss(4, student_dim=4, teacher_dim=6)


@pytest.mark.parametrize("positional", [False, True])
def test_zero_width_error_names_student_dim(positional):
    # it said "in_features: ...", the projector's name for it
    with pytest.raises(ChoiceError, match=r"^student_dim: expected an integer >= 1, got 0"):
        if positional:
            with pytest.warns(FutureWarning):
                VkDLoss(0, 24)
        else:
            VkDLoss(student_dim=0, teacher_dim=24)


def test_shrinkage_is_the_whitening_option_and_eps_its_old_name():
    student, teacher = _pair(batch=16)
    new = VkDLoss(student_dim=4, teacher_dim=6, normalize="whitening", shrinkage=1e-2)
    assert new.whitening.shrinkage == 1e-2
    with pytest.warns(FutureWarning, match="eps= is renamed to shrinkage="):
        old = VkDLoss(student_dim=4, teacher_dim=6, normalize="whitening", eps=1e-2)
    assert old.whitening.shrinkage == 1e-2
    assert torch.equal(old(student, teacher), new(student, teacher))
    with pytest.raises(ChoiceError, match="eps: renamed to shrinkage; pass only shrinkage"):
        VkDLoss(student_dim=4, teacher_dim=6, normalize="whitening", eps=1e-2, shrinkage=1e-2)
    with pytest.raises(ChoiceError, match="shrinkage: only used by normalize='whitening'"):
        VkDLoss(student_dim=4, teacher_dim=6, shrinkage=1e-2)
    with pytest.raises(ChoiceError, match="shrinkage: expected a finite number > 0, got 0"):
        VkDLoss(student_dim=4, teacher_dim=6, normalize="whitening", shrinkage=0)
    # eps keeps its one meaning elsewhere: the layer norm / standardisation epsilon
    assert VkDLoss(student_dim=4, teacher_dim=6, eps=1e-3).eps == 1e-3
    proj = new.projector.weight
    with pytest.warns(FutureWarning, match="vkd_loss: eps= is renamed to shrinkage="):
        by_eps = vkd_loss(student, teacher, proj, normalize="whitening", eps=1e-2)
    by_shrinkage = vkd_loss(student, teacher, proj, normalize="whitening", shrinkage=1e-2)
    assert torch.equal(by_eps, by_shrinkage)


def test_function_whitening_argument_is_checked():
    student, teacher = _pair()
    proj = torch.eye(6, 4)
    with pytest.raises(ChoiceError, match="whitening: only used by normalize='whitening'"):
        vkd_loss(student, teacher, proj, whitening=featkd.Whitening(6))
    with pytest.raises(ChoiceError, match="whitening: expected None or a featkd.Whitening"):
        vkd_loss(student, teacher, proj, normalize="whitening", whitening=torch.eye(6))
    with pytest.raises(ChoiceError, match="shrinkage: the whitening module has its own"):
        vkd_loss(
            student,
            teacher,
            proj,
            normalize="whitening",
            shrinkage=1e-3,
            whitening=featkd.Whitening(6),
        )
    with pytest.raises(ShapeError, match=r"whitening: expected dim D_t=6 .*got Whitening\(5\)"):
        vkd_loss(student, teacher, proj, normalize="whitening", whitening=featkd.Whitening(5))
    with pytest.raises(ShapeError, match=r"teacher: expected a batch of at least 2"):
        vkd_loss(
            student[:1], teacher[:1], proj, normalize="whitening", whitening=featkd.Whitening(6)
        )

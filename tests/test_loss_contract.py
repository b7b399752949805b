"""The loss contract shared by every featkd loss (issue 12): the guards against the two silent
failures, ``reduction``, the shape of ``last_parts``."""

from __future__ import annotations

import warnings

import pytest
import torch
from host_sync import record_host_syncs
from torch import nn

import featkd
from featkd import ChoiceError, FrozenParametersWarning, KDLoss, StudentGradientWarning
from featkd._loss import DistillationLoss, Terms


class ScaledDistance(DistillationLoss):
    """A one-parameter loss for the guards: ``(scale * (s - t))^2`` per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def _check(self, student, teacher, labels) -> None:
        pass

    def _terms(self, student, teacher, labels) -> Terms:
        return Terms({"distance": (self.scale * (student - teacher)).square().sum(dim=1)})


def _logits(requires_grad: bool = True):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 5, generator=g, requires_grad=requires_grad)
    return s, torch.randn(6, 5, generator=g)


# --------------------------------------------------------------------------------------------
# StudentGradientWarning
# --------------------------------------------------------------------------------------------
def test_swapped_arguments_warn_once_and_say_how_to_fix():
    s, t = _logits()
    loss_fn = KDLoss()
    with pytest.warns(StudentGradientWarning, match=r"were they swapped\? The call is KDLoss"):
        loss_fn(t, s)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_fn(t, s)  # once per instance


def test_neither_argument_with_gradient_warns():
    s, t = _logits(requires_grad=False)
    with pytest.warns(StudentGradientWarning, match="neither the student nor the teacher"):
        KDLoss()(s, t)


def test_warning_points_at_the_callers_line():
    s, t = _logits()
    with pytest.warns(StudentGradientWarning) as caught:
        KDLoss()(t, s)
    assert caught[0].filename == __file__


@pytest.mark.parametrize("case", ["correct", "no_grad", "silenced"])
def test_no_student_warning_when_nothing_is_wrong_or_it_is_silenced(case):
    s, t = _logits()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if case == "correct":
            KDLoss()(s, t)
        elif case == "no_grad":
            with torch.no_grad():
                KDLoss()(t.clone(), t)  # evaluation: no gradient wanted
        else:
            warnings.filterwarnings("ignore", category=featkd.StudentGradientWarning)
            KDLoss()(t, s)


# --------------------------------------------------------------------------------------------
# FrozenParametersWarning
# --------------------------------------------------------------------------------------------
def _train(loss_fn: nn.Module, steps: int, optimised: bool) -> None:
    student = nn.Linear(4, 3)
    params = [*student.parameters(), *(loss_fn.parameters() if optimised else [])]
    optimiser = torch.optim.SGD(params, lr=0.01)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, t = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)
        optimiser.zero_grad()
        loss_fn(student(x), t).backward()
        optimiser.step()


def test_parameters_missing_from_the_optimiser_warn_once_with_the_fix():
    loss_fn = ScaledDistance()
    steps = loss_fn.frozen_parameter_calls + 1
    with pytest.warns(FrozenParametersWarning, match=r"loss_fn\.parameters\(\)") as caught:
        _train(loss_fn, steps + 20, optimised=False)
    assert len(caught) == 1


def test_no_frozen_warning_before_the_threshold_when_optimised_or_in_eval():
    steps = ScaledDistance.frozen_parameter_calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(ScaledDistance(), steps - 1, optimised=False)  # gradient accumulation
        _train(ScaledDistance(), 3 * steps, optimised=True)
        _train(ScaledDistance().eval(), 3 * steps, optimised=False)
        _train(ScaledDistance().requires_grad_(False), 3 * steps, optimised=False)


def test_the_guards_need_no_host_synchronisation():
    """They read ``requires_grad``, ``.grad is not None`` and version counters: host state."""
    loss_fn = ScaledDistance()
    loss_fn.scale.grad = torch.zeros(())
    s, t = _logits()
    with record_host_syncs() as syncs:
        for _ in range(3):
            loss_fn._guard(t, s)
    assert syncs == []


# --------------------------------------------------------------------------------------------
# reduction and last_parts
# --------------------------------------------------------------------------------------------
def test_reduction_none_sum_mean_are_one_value_per_sample_and_its_sum_and_mean():
    s, t = _logits()
    per_sample = ScaledDistance()
    per_sample.reduction = "none"
    values = per_sample(s, t)
    assert values.shape == (6,)
    torch.testing.assert_close(values, (s - t).square().sum(dim=1))
    summed, mean = ScaledDistance(), ScaledDistance()
    summed.reduction = "sum"
    torch.testing.assert_close(summed(s, t), values.sum())
    torch.testing.assert_close(mean(s, t), values.mean())


def test_last_parts_start_with_the_total_and_are_detached():
    s, t = _logits()
    loss_fn = ScaledDistance()
    loss = loss_fn(s, t)
    assert list(loss_fn.last_parts) == ["total", "distance"]
    assert torch.equal(loss_fn.last_parts["total"], loss.detach())
    assert not any(v.requires_grad for v in loss_fn.last_parts.values())


def test_unknown_reduction_names_the_argument():
    with pytest.raises(ChoiceError, match=r"^reduction: expected one of .*got 'avg'"):
        KDLoss(reduction="avg")


def test_half_precision_student_gets_a_float32_loss():
    s, t = _logits()
    loss = KDLoss()(s.to(torch.bfloat16), t.to(torch.bfloat16))
    assert loss.dtype == torch.float32

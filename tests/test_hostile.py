"""Hostile input thrown at every public loss and head.

Each case must give either a correct finite result or a ``FeatkdInputError`` (a ``ValueError``)
whose message names the argument and what was expected: never a silent NaN, never a crash from
deep inside torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import featkd
from featkd import FeatkdInputError


@dataclass
class Case:
    """A public loss and how to feed it: ``make`` builds it, ``shapes(B)`` gives the student
    and teacher shapes for a batch of B, ``min_batch`` the smallest batch it must accept."""

    name: str
    make: Callable[[], nn.Module]
    shapes: Callable[[int], tuple[tuple[int, ...], tuple[int, ...]]]
    labels: bool = False
    min_batch: int = 1

    def inputs(self, batch: int, scale: float = 1.0, generator=None):
        s_shape, t_shape = self.shapes(batch)
        s = scale * torch.randn(s_shape, generator=generator)
        t = scale * torch.randn(t_shape, generator=generator)
        labels = torch.arange(batch) % 3 if self.labels else None
        return s, t, labels

    def call(self, loss_fn, s, t, labels=None):
        if self.labels:
            return loss_fn(s, t, labels=labels)
        return loss_fn(s, t)


CASES: list[Case] = [
    Case("KDLoss", lambda: featkd.KDLoss(4.0), lambda b: ((b, 10), (b, 10))),
]
IDS = [c.name for c in CASES]


def assert_named_error(excinfo, *names: str) -> None:
    message = str(excinfo.value)
    assert any(message.startswith(f"{n}:") or f"{n}:" in message for n in names), message
    assert "expected" in message, message


def finite_loss_and_grad(case: Case, s: torch.Tensor, t: torch.Tensor, labels=None):
    loss_fn = case.make()
    s = s.detach().requires_grad_(True)
    loss = case.call(loss_fn, s, t, labels)
    assert loss.ndim == 0
    assert torch.isfinite(loss), f"{case.name}: non-finite loss {loss}"
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all(), f"{case.name}: non-finite grad"
    return loss


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_wrong_rank(case):
    s, t, labels = case.inputs(4)
    with pytest.raises(FeatkdInputError) as excinfo:
        case.call(case.make(), s.reshape(-1), t, labels)
    assert_named_error(excinfo, "student", "student_logits")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_mismatched_batch(case):
    s, t, labels = case.inputs(6)
    with pytest.raises(FeatkdInputError) as excinfo:
        case.call(case.make(), s, t[:5], labels)
    assert "batch" in str(excinfo.value)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_mismatched_width(case):
    s, t, labels = case.inputs(4)
    with pytest.raises(FeatkdInputError) as excinfo:
        case.call(case.make(), s, torch.cat([t, t[..., :1]], dim=-1), labels)
    assert "expected" in str(excinfo.value)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_non_finite_is_reported(case, bad, where):
    s, t, labels = case.inputs(4)
    (s if where == "student" else t).view(-1)[1] = bad
    with pytest.raises(featkd.NonFiniteError) as excinfo:
        case.call(case.make(), s, t, labels)
    assert where in str(excinfo.value)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_empty_batch(case):
    s, t, labels = case.inputs(4)
    with pytest.raises(FeatkdInputError, match="zero-sized"):
        case.call(case.make(), s[:0], t[:0], None if labels is None else labels[:0])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_batch_of_one(case):
    s, t, labels = case.inputs(1)
    if case.min_batch > 1:
        with pytest.raises(FeatkdInputError, match="at least"):
            case.call(case.make(), s, t, labels)
    else:
        finite_loss_and_grad(case, s, t, labels)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_integer_tensors(case):
    s, t, labels = case.inputs(4)
    with pytest.raises(featkd.DTypeError):
        case.call(case.make(), s.round().long(), t, labels)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_float16_on_cpu(case):
    s, t, labels = case.inputs(8)
    loss_fn = case.make()
    reference = case.call(loss_fn, s, t, labels)
    half = case.call(loss_fn.half(), s.half(), t.half(), labels)
    assert half.dtype == torch.float16 and torch.isfinite(half)
    torch.testing.assert_close(half.float(), reference, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_non_contiguous_and_expanded(case):
    s, t, labels = case.inputs(8)
    torch.manual_seed(0)
    reference = case.call(case.make(), s.clone(), t.clone(), labels)
    s_strided = s.transpose(0, -1).contiguous().transpose(0, -1)
    assert not s_strided.is_contiguous()
    torch.manual_seed(0)
    torch.testing.assert_close(case.call(case.make(), s_strided, t, labels), reference)
    expanded = t[:1].expand_as(t)
    torch.manual_seed(0)
    finite_loss_and_grad(case, s, expanded, labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_different_devices(case):
    s, t, labels = case.inputs(4)
    with pytest.raises(featkd.FeatkdInputError):
        case.call(case.make().cuda(), s.cuda(), t, labels)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(2, 9), exponent=st.sampled_from([-6, 0, 6]), seed=st.integers(0, 2**16))
def test_magnitudes_give_finite_results(case, batch, exponent, seed):
    generator = torch.Generator().manual_seed(seed)
    s, t, labels = case.inputs(max(batch, case.min_batch), 10.0**exponent, generator)
    finite_loss_and_grad(case, s, t, labels)

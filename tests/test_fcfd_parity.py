"""FCFD's warm-up cannot be skipped silently (issue 14): a WarmupSkippedWarning after
``warmup_check_calls`` training calls without set_epoch() or an assignment of warmup."""

from __future__ import annotations

import warnings

import pytest
import torch
from loss_cases import stage_outputs, tiny_fcfd

import featkd.fcfd
from featkd import ChoiceError
from featkd.fcfd import WarmupSkippedWarning


def train_calls(fcfd, student, teacher, count):
    """``count`` calls of the loss; the WarmupSkippedWarnings they raised."""
    images = torch.randn(4, 3, 4, 4)
    with torch.no_grad():
        t_feats = stage_outputs(teacher, images)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(count):
            fcfd(stage_outputs(student, images), t_feats).backward()
    return [w for w in caught if issubclass(w.category, WarmupSkippedWarning)]


def test_warns_once_after_the_configured_calls():
    fcfd, student, teacher = tiny_fcfd(warmup_check_calls=3)
    assert train_calls(fcfd, student, teacher, 2) == []
    (warning,) = train_calls(fcfd, student, teacher, 5)
    text = str(warning.message)
    assert "3 training calls without set_epoch()" in text
    assert "fcfd.set_epoch(epoch)" in text and "warmup_check_calls=None" in text
    assert warning.filename == __file__  # points at the user's line
    assert issubclass(WarmupSkippedWarning, UserWarning)


def test_default_is_50_calls():
    fcfd, student, teacher = tiny_fcfd()
    assert fcfd.warmup_check_calls == 50
    assert "warmup_check_calls=50" in repr(fcfd)
    assert train_calls(fcfd, student, teacher, 49) == []
    assert len(train_calls(fcfd, student, teacher, 2)) == 1


def test_not_when_set_epoch_is_used():
    fcfd, student, teacher = tiny_fcfd(warmup_check_calls=2)
    fcfd.set_epoch(0)
    assert train_calls(fcfd, student, teacher, 4) == []


def test_not_when_the_warmup_is_assigned():
    fcfd, student, teacher = tiny_fcfd(warmup_check_calls=2)
    fcfd.warmup = 1.0  # an explicit choice, even of the starting value
    assert train_calls(fcfd, student, teacher, 4) == []


def test_not_in_eval_mode_or_without_grad():
    fcfd, student, teacher = tiny_fcfd(warmup_check_calls=2)
    fcfd.eval()
    assert train_calls(fcfd, student, teacher, 3) == []
    fcfd.train()
    images = torch.randn(4, 3, 4, 4)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for _ in range(3):
            fcfd(stage_outputs(student, images), stage_outputs(teacher, images))
    assert not [w for w in caught if issubclass(w.category, WarmupSkippedWarning)]


def test_not_without_a_warmup_or_when_disabled():
    fcfd, student, teacher = tiny_fcfd(warmup_check_calls=2, warmup_epochs=0)
    assert train_calls(fcfd, student, teacher, 3) == []
    fcfd, student, teacher = tiny_fcfd(warmup_check_calls=None)
    assert train_calls(fcfd, student, teacher, 60) == []


def test_silenceable():
    fcfd, student, teacher = tiny_fcfd(warmup_check_calls=1)
    images = torch.randn(4, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=featkd.fcfd.WarmupSkippedWarning)
        fcfd(stage_outputs(student, images), stage_outputs(teacher, images))


def test_the_warning_does_not_change_the_value():
    quiet, student, teacher = tiny_fcfd(warmup_check_calls=None)
    loud, _, _ = tiny_fcfd(warmup_check_calls=1)
    images = torch.randn(4, 3, 4, 4)
    s_feats, t_feats = stage_outputs(student, images), stage_outputs(teacher, images)
    with pytest.warns(WarmupSkippedWarning):
        value = loud(s_feats, t_feats)
    assert torch.equal(value, quiet(s_feats, t_feats))


@pytest.mark.parametrize("bad", [0, -1, 2.5, "50", True])
def test_warmup_check_calls_is_checked(bad):
    with pytest.raises(ChoiceError, match=r"warmup_check_calls: expected an int"):
        tiny_fcfd(warmup_check_calls=bad)


def test_start_epoch_applies_the_official_warmup_from_the_first_step():
    fcfd, student, teacher = tiny_fcfd(start_epoch=0, warmup_check_calls=1)
    assert fcfd.warmup == pytest.approx(1 / 20)  # min(1, (0 + 1) / 20), official epoch 0
    assert train_calls(fcfd, student, teacher, 2) == []  # the warm-up was chosen
    assert tiny_fcfd(start_epoch=3, warmup_epochs=5)[0].warmup == pytest.approx(4 / 5)
    assert tiny_fcfd()[0].warmup == 1.0  # featkd's default: full weight until set_epoch
    with pytest.raises(ChoiceError, match=r"start_epoch: expected an int"):
        tiny_fcfd(start_epoch=-1)

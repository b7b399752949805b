import gc
import weakref

import pytest
import torch
from torch import nn

import featkd.hooks as hooks
from featkd import ChoiceError, FeatkdInputError, FeatureTap, UnknownModuleError


def make_net():
    return nn.Sequential(
        nn.Linear(4, 8),
        nn.ReLU(),
        nn.Sequential(nn.Linear(8, 8), nn.Tanh()),
        nn.Linear(8, 3),
    )


def hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_captures_named_outputs_with_gradients():
    net = make_net()
    x = torch.randn(5, 4)
    with FeatureTap(net, ["1", "2.1"]) as feats:
        out = net(x)
        relu = feats["1"]
        tanh = feats["2.1"]
        assert set(feats) == {"1", "2.1"}
        torch.testing.assert_close(relu, torch.relu(net[0](x)))
        torch.testing.assert_close(tanh, net[2](relu))
        assert tanh.requires_grad
        tanh.sum().backward()
    assert net[0].weight.grad is not None
    assert out.shape == (5, 3)


def test_teacher_under_no_grad():
    net = make_net()
    with torch.no_grad(), FeatureTap(net, ["2"]) as feats:
        net(torch.randn(2, 4))
        assert not feats["2"].requires_grad


def test_detach_option():
    net = make_net()
    with FeatureTap(net, "0", detach=True) as feats:
        net(torch.randn(2, 4))
        assert not feats["0"].requires_grad


def test_no_hook_left_and_nothing_outlives_clear():
    net = make_net()
    before = hook_count(net)
    tap = FeatureTap(net, ["0", "2.0"])
    with tap as feats:
        assert hook_count(net) == before + 2
        net(torch.randn(3, 4))
        ref = weakref.ref(feats["2.0"])
    assert hook_count(net) == before and not tap.active
    tap.clear()
    assert len(tap) == 0
    gc.collect()
    assert ref() is None, "a captured tensor outlived clear()"


def test_entering_again_releases_the_previous_block():
    net = make_net()
    tap = FeatureTap(net, ["2.0"])
    with tap:
        net(torch.randn(3, 4))
    ref = weakref.ref(tap["2.0"])
    with tap:
        gc.collect()
        assert ref() is None, "the previous block's output outlived the next entry"
        assert len(tap) == 0


def test_hooks_removed_when_the_body_raises():
    net = make_net()
    tap = FeatureTap(net, ["0"])
    with pytest.raises(RuntimeError, match="boom"), tap:
        net(torch.randn(3, 4))
        raise RuntimeError("boom")
    assert hook_count(net) == 0
    assert not tap.active


def test_reusable_after_exit():
    net = make_net()
    tap = FeatureTap(net, ["0"])
    for _ in range(2):
        with tap as feats:
            net(torch.randn(2, 4))
            assert feats["0"].shape == (2, 8)
    assert hook_count(net) == 0


def test_unknown_name_lists_close_matches():
    net = nn.Sequential()
    net.add_module("layer1", nn.Linear(2, 2))
    net.add_module("layer2", nn.Linear(2, 2))
    with pytest.raises(UnknownModuleError, match="'layer3' is not a submodule.*layer1"):
        FeatureTap(net, ["layer3"])
    assert issubclass(UnknownModuleError, ValueError)


def test_missing_output_message():
    net = make_net()
    with FeatureTap(net, ["0"]) as feats, pytest.raises(KeyError, match="has not run yet"):
        feats["0"]


def test_bad_arguments():
    with pytest.raises(FeatkdInputError, match="expected an nn.Module"):
        FeatureTap("net", ["0"])
    with pytest.raises(FeatkdInputError, match="at least one"):
        FeatureTap(make_net(), [])


# ------------------------------------------------------------------ issue 11
def test_outputs_stay_readable_after_the_block():
    # read after the block, the tap used to answer "has not run yet", though the module had run
    net = make_net()
    x = torch.randn(5, 4)
    with FeatureTap(net, ["1", "2.1"]) as feats:
        net(x)
        inside = feats["2.1"]
    assert not feats.active
    assert feats["2.1"] is inside
    assert set(feats) == {"1", "2.1"}
    torch.testing.assert_close(feats["1"], torch.relu(net[0](x)))
    feats["2.1"].sum().backward()  # a loss computed after the block still trains the network
    assert net[0].weight.grad is not None


def test_module_that_did_not_run_is_a_clear_featkd_error():
    net = make_net()
    net.add_module("unused", nn.Linear(4, 4))
    with FeatureTap(net, ["0", "unused"]) as feats:
        net[:4](torch.randn(2, 4))
        with pytest.raises(hooks.NotCapturedError, match="'unused' has not run yet in this block"):
            feats["unused"]
    with pytest.raises(hooks.NotCapturedError, match="'unused' has not run while the tap was open"):
        feats["unused"]
    error = hooks.NotCapturedError("x")
    assert isinstance(error, FeatkdInputError) and isinstance(error, KeyError)
    assert str(error) == "x"  # not quoted as KeyError messages are


def test_reading_before_entering_says_so():
    tap = FeatureTap(make_net(), ["0"])
    with pytest.raises(hooks.NotCapturedError, match="'0' has no output: the tap has not been"):
        tap["0"]


def test_reading_an_untapped_name_is_a_featkd_error():
    with FeatureTap(make_net(), ["0"]) as feats:
        pass
    with pytest.raises(hooks.NotCapturedError, match="'3' is not tapped; tapped names: 0"):
        feats["3"]


@pytest.mark.parametrize(("names", "got"), [(None, "NoneType"), (3, "int")])
def test_names_must_be_a_name_or_an_iterable_of_names(names, got):
    with pytest.raises(FeatkdInputError, match=f"names: expected a submodule name .* got {got}"):
        FeatureTap(make_net(), names)


def test_names_must_be_strings():
    with pytest.raises(
        FeatkdInputError, match=r"names: expected submodule names as strings, got 0"
    ):
        FeatureTap(make_net(), [0])


@pytest.mark.parametrize("detach", ["no", 1, None])
def test_detach_must_be_a_bool(detach):
    with pytest.raises(ChoiceError, match="detach: expected True or False"):
        FeatureTap(make_net(), ["0"], detach=detach)


def test_detach_reaches_tensors_nested_in_tuples():
    lstm = nn.LSTM(3, 4, batch_first=True)
    with FeatureTap(lstm, [""], detach=True) as feats:
        out, (h, c) = lstm(torch.randn(2, 5, 3))
    captured, (captured_h, captured_c) = feats[""]
    assert out.requires_grad  # the model's own output is untouched
    for tensor in (captured, captured_h, captured_c):
        assert not tensor.requires_grad and tensor.grad_fn is None
    for mine, theirs in ((captured, out), (captured_h, h), (captured_c, c)):
        torch.testing.assert_close(mine, theirs.detach())


class _Structured(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)

    def forward(self, x):
        y = self.linear(x)
        pair = torch.return_types.max((y, y.argmax(1)))  # a named tuple torch itself returns
        return {"list": [y, 2 * y], "named": pair, "other": "kept"}


def test_detach_reaches_tensors_nested_in_lists_dicts_and_named_tuples():
    net = _Structured()
    with FeatureTap(net, [""], detach=True) as feats:
        net(torch.randn(3, 2))
    captured = feats[""]
    assert not any(t.requires_grad for t in captured["list"])
    assert type(captured["named"]) is torch.return_types.max
    assert not captured["named"].values.requires_grad
    assert captured["other"] == "kept"

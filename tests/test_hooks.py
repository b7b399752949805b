import gc
import weakref

import pytest
import torch
from torch import nn

from featkd import FeatkdInputError, FeatureTap, UnknownModuleError


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


def test_no_hook_left_and_nothing_outlives_the_context():
    net = make_net()
    before = hook_count(net)
    tap = FeatureTap(net, ["0", "2.0"])
    with tap as feats:
        assert hook_count(net) == before + 2
        net(torch.randn(3, 4))
        ref = weakref.ref(feats["2.0"])
    assert hook_count(net) == before
    assert len(tap) == 0 and not tap.active
    gc.collect()
    assert ref() is None, "a captured tensor outlived the context"


def test_hooks_removed_when_the_body_raises():
    net = make_net()
    tap = FeatureTap(net, ["0"])
    with pytest.raises(RuntimeError, match="boom"), tap:
        net(torch.randn(3, 4))
        raise RuntimeError("boom")
    assert hook_count(net) == 0
    assert len(tap) == 0


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

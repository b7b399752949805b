"""Bridges: layouts, spatial ratios, token <-> map conversions, errors, gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from featkd import ChoiceError, FeatkdInputError, ShapeError
from featkd.fcfd.bridges import (
    FeatureSpec,
    MapToTokens,
    PoolFeatures,
    Resize,
    TokensToMap,
    build_bridge,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """These networks are tiny: one thread is faster, and immune to oversubscription when
    other jobs share the cores (two threads made a training step ~100x slower there)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _map(c, h, w=None):
    return FeatureSpec("map", c, (h, w if w is not None else h))


def _tokens(d, h, w=None, prefix=1):
    return FeatureSpec("tokens", d, (h, w if w is not None else h), prefix)


def _layer_types(bridge):
    return [type(m) for m in bridge]


# ------------------------------------------------------------------ FeatureSpec
def test_spec_from_tensor_by_rank():
    assert FeatureSpec.of(torch.zeros(2, 8, 5, 6)) == FeatureSpec("map", 8, (5, 6))
    assert FeatureSpec.of(torch.zeros(2, 1 + 9, 4), num_prefix_tokens=1) == _tokens(4, 3)
    assert FeatureSpec.of(torch.zeros(2, 16, 4), num_prefix_tokens=0) == _tokens(4, 4, prefix=0)
    assert FeatureSpec.of(torch.zeros(2, 7)) == FeatureSpec("vector", 7)


def test_spec_shape_roundtrip():
    for x, prefix in [
        (torch.zeros(2, 8, 5, 6), 0),
        (torch.zeros(2, 2 + 12, 4), 2),
        (torch.zeros(2, 7), 0),
    ]:
        spec = FeatureSpec.of(x, num_prefix_tokens=prefix, grid=(3, 4) if x.ndim == 3 else None)
        assert spec.shape == tuple(x.shape[1:])


def test_spec_non_square_tokens_need_a_grid():
    with pytest.raises(ShapeError, match=r"12 patch tokens.*square grid.*\(2, 13, 4\)"):
        FeatureSpec.of(torch.zeros(2, 13, 4), num_prefix_tokens=1)
    spec = FeatureSpec.of(torch.zeros(2, 13, 4), num_prefix_tokens=1, grid=(2, 6))
    assert spec.grid == (2, 6)
    with pytest.raises(ShapeError, match=r"grid \(3, 3\) holds 9 patches, got 12"):
        FeatureSpec.of(torch.zeros(2, 13, 4), num_prefix_tokens=1, grid=(3, 3))


def test_spec_named_layout_must_match_rank():
    with pytest.raises(ShapeError, match=r"x: expected \(B, C, H, W\), got \(2, 5, 4\)"):
        FeatureSpec.of(torch.zeros(2, 5, 4), "map")
    with pytest.raises(ChoiceError, match="layout: expected one of"):
        FeatureSpec.of(torch.zeros(2, 5), "grid")
    with pytest.raises(ShapeError, match="expected patch tokens after 3 prefix tokens"):
        FeatureSpec.of(torch.zeros(2, 3, 4), num_prefix_tokens=3)


# ------------------------------------------------------------------ map -> map
@pytest.mark.parametrize(
    ("source", "target", "conv_type", "stride"),
    [
        ((8, 8), (8, 8), nn.Conv2d, (1, 1)),
        ((8, 8), (4, 4), nn.Conv2d, (2, 2)),
        ((9, 9), (3, 3), nn.Conv2d, (3, 3)),
        ((16, 16), (4, 4), nn.Conv2d, (4, 4)),
        ((6, 4), (3, 4), nn.Conv2d, (2, 1)),
        ((4, 4), (8, 8), nn.ConvTranspose2d, (2, 2)),
        ((3, 3), (9, 9), nn.ConvTranspose2d, (3, 3)),
        ((2, 2), (8, 8), nn.ConvTranspose2d, (4, 4)),
        ((2, 5), (4, 5), nn.ConvTranspose2d, (2, 1)),
    ],
)
def test_map_bridge_integer_ratios(device, source, target, conv_type, stride):
    bridge = build_bridge(_map(5, *source), _map(7, *target)).to(device)
    assert _layer_types(bridge) == [conv_type, nn.BatchNorm2d]
    assert bridge[0].stride == stride
    x = torch.randn(3, 5, *source, device=device, requires_grad=True)
    out = bridge(x)
    assert out.shape == (3, 7, *target)
    # every input pixel is read and every output pixel is written: no holes from the stride
    jac_rows = torch.autograd.grad(out.pow(2).sum(), x, retain_graph=True)[0]
    assert bool((jac_rows.abs().sum(dim=(0, 1)) > 0).all())
    for i in range(target[0]):
        for j in range(target[1]):
            (g,) = torch.autograd.grad(out[:, :, i, j].sum(), x, retain_graph=True)
            assert g.abs().sum() > 0


def test_map_bridge_is_conv_then_batchnorm():
    """The equal-size bridge, written out: conv3x3 (padding 1, no bias), batch statistics."""
    torch.manual_seed(1)
    bridge = build_bridge(_map(3, 5), _map(4, 5)).double()
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    w = bridge[0].weight
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    conv = torch.zeros(6, 4, 5, 5, dtype=torch.float64)
    for i in range(5):
        for j in range(5):
            patch = padded[:, :, i : i + 3, j : j + 3]
            conv[:, :, i, j] = torch.einsum("bcuv,ocuv->bo", patch, w)
    mean = conv.mean(dim=(0, 2, 3), keepdim=True)
    var = conv.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    expected = (conv - mean) / torch.sqrt(var + 1e-5)
    torch.testing.assert_close(bridge(x), expected, rtol=1e-10, atol=1e-10)


def test_non_integer_ratio_needs_interpolation():
    with pytest.raises(ShapeError, match=r"7x7 grid to 4x4.*resample='interpolate'"):
        build_bridge(_map(5, 7), _map(6, 4))
    with pytest.raises(ShapeError, match=r"6x2 grid to 3x4"):  # one axis down, the other up
        build_bridge(_map(5, 6, 2), _map(6, 3, 4))
    for mode in ("interpolate", "auto"):
        bridge = build_bridge(_map(5, 7), _map(6, 4), resample=mode)
        assert _layer_types(bridge) == [Resize, nn.Conv2d, nn.BatchNorm2d]
        assert bridge(torch.randn(2, 5, 7, 7)).shape == (2, 6, 4, 4)
    # 'auto' keeps the strided conv where it applies, 'interpolate' always resizes
    assert _layer_types(build_bridge(_map(5, 8), _map(6, 4), resample="auto"))[0] is nn.Conv2d
    assert _layer_types(build_bridge(_map(5, 8), _map(6, 4), resample="interpolate"))[0] is Resize


def test_resize_matches_bilinear_and_keeps_dtype():
    x = torch.randn(2, 3, 4, 4)
    up = Resize((8, 8))(x)
    expected = nn.functional.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up, expected)
    assert Resize((2, 2))(x.to(torch.bfloat16)).dtype == torch.bfloat16
    # a constant map stays constant after antialiased shrinking
    torch.testing.assert_close(Resize((3, 3))(torch.ones(1, 1, 7, 7)), torch.ones(1, 1, 3, 3))


def test_post_relu_appends_leaky_relu():
    bridge = build_bridge(_map(4, 4), _map(4, 4), post_relu=True)
    assert isinstance(bridge[-1], nn.LeakyReLU)
    assert bridge[-1].negative_slope == 0.1
    out = bridge(torch.randn(8, 4, 4, 4))
    # BatchNorm output has both signs; LeakyReLU(0.1) shrinks the negative side tenfold
    before = bridge[:-1](torch.randn(8, 4, 4, 4))
    assert bool((before < 0).any())
    assert bool((out < 0).any()) and out.min() > 0.1 * before.min() - 1.0
    assert not any(isinstance(m, nn.LeakyReLU) for m in build_bridge(_map(4, 4), _map(4, 4)))


# ------------------------------------------------------------------ tokens and maps
def test_tokens_to_map_layout():
    """Patch token p = i * w + j lands at grid position (i, j); prefix tokens are dropped."""
    tokens = torch.randn(2, 2 + 6, 5)
    grid = TokensToMap(2, (2, 3))(tokens)
    assert grid.shape == (2, 5, 2, 3)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(grid[:, :, i, j], tokens[:, 2 + i * 3 + j, :])


def test_map_to_tokens_layout_and_prefix():
    x = torch.randn(2, 5, 2, 3)
    module = MapToTokens(5, 2)
    tokens = module(x)
    assert tokens.shape == (2, 2 + 6, 5)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(tokens[:, 2 + i * 3 + j], x[:, :, i, j])
    mean = x.mean(dim=(2, 3))
    torch.testing.assert_close(tokens[:, 0], mean)  # offset starts at zero
    with torch.no_grad():
        module.prefix_offset[1] = 3.0
    torch.testing.assert_close(module(x)[:, 1], mean + 3.0)
    assert MapToTokens(5, 0)(x).shape == (2, 6, 5)


def test_tokens_to_map_bridge(device):
    # a ViT stage (4x4 patches + CLS, width 24) onto a CNN map 8 x 16 x 16: transposed conv x4
    bridge = build_bridge(_tokens(24, 4), _map(8, 16), post_relu=True).to(device)
    types = _layer_types(bridge)
    assert types == [nn.LayerNorm, TokensToMap, nn.ConvTranspose2d, nn.BatchNorm2d, nn.LeakyReLU]
    tokens = torch.randn(3, 17, 24, device=device, requires_grad=True)
    out = bridge(tokens)
    assert out.shape == (3, 8, 16, 16)
    # the CLS token is not used by a map
    (grad,) = torch.autograd.grad(out.sum(), tokens)
    assert float(grad[:, 0].abs().sum()) == 0.0
    assert float(grad[:, 1:].abs().sum()) > 0.0


def test_map_to_tokens_bridge(device):
    bridge = build_bridge(_map(8, 16), _tokens(24, 4)).to(device)
    assert _layer_types(bridge) == [nn.Conv2d, nn.BatchNorm2d, MapToTokens]
    out = bridge(torch.randn(3, 8, 16, 16, device=device))
    assert out.shape == (3, 17, 24)
    torch.testing.assert_close(out[:, 0], out[:, 1:].mean(dim=1))


def test_tokens_to_tokens_bridge():
    same = build_bridge(_tokens(6, 3), _tokens(10, 3))
    assert _layer_types(same) == [nn.LayerNorm, nn.Linear]
    x = torch.randn(2, 10, 6)
    expected = same[1](nn.functional.layer_norm(x, (6,), same[0].weight, same[0].bias))
    torch.testing.assert_close(same(x), expected)

    resized = build_bridge(_tokens(6, 4), _tokens(10, 2))
    assert resized(torch.randn(2, 17, 6)).shape == (2, 5, 10)
    dropped = build_bridge(_tokens(6, 3, prefix=1), _tokens(10, 3, prefix=0))
    assert dropped(torch.randn(2, 10, 6)).shape == (2, 9, 10)
    added = build_bridge(_tokens(6, 3, prefix=0), _tokens(10, 3, prefix=2))
    assert added(torch.randn(2, 9, 6)).shape == (2, 11, 10)
    with pytest.raises(ShapeError, match="cannot adapt 1 prefix tokens to 2"):
        build_bridge(_tokens(6, 3, prefix=1), _tokens(10, 3, prefix=2))


def test_bridges_onto_vectors():
    vec = FeatureSpec("vector", 12)
    from_map = build_bridge(_map(5, 4), vec)
    x = torch.randn(3, 5, 4, 4)
    expected = from_map[2](from_map[1](x.mean(dim=(2, 3))))
    torch.testing.assert_close(from_map(x), expected)

    tokens = torch.randn(3, 17, 5)
    cls = build_bridge(_tokens(5, 4), vec)
    torch.testing.assert_close(cls(tokens), cls[2](cls[1](tokens[:, 0])))
    mean = build_bridge(_tokens(5, 4), vec, token_pool="mean")
    torch.testing.assert_close(mean(tokens), mean[2](mean[1](tokens.mean(dim=1))))
    assert build_bridge(FeatureSpec("vector", 5), vec)(torch.randn(3, 5)).shape == (3, 12)
    with pytest.raises(ShapeError, match="token_pool='cls' needs a prefix token"):
        build_bridge(_tokens(5, 4, prefix=0), vec, token_pool="cls")


def test_vector_cannot_become_spatial():
    with pytest.raises(ShapeError, match=r"pooled \(B, D\) features onto a map layout"):
        build_bridge(FeatureSpec("vector", 5), _map(4, 4))
    with pytest.raises(ShapeError, match="onto a tokens layout"):
        build_bridge(FeatureSpec("vector", 5), _tokens(4, 2))


def test_bad_options():
    with pytest.raises(ChoiceError, match="resample: expected one of 'conv', 'interpolate'"):
        build_bridge(_map(4, 4), _map(4, 4), resample="nearest")
    with pytest.raises(ChoiceError, match="token_pool"):
        build_bridge(_tokens(4, 2), FeatureSpec("vector", 3), token_pool="max")
    with pytest.raises(FeatkdInputError, match="source: expected a FeatureSpec, got tuple"):
        build_bridge((4, 4, 4), _map(4, 4))


# ------------------------------------------------------------------ checked at construction (issue 11)
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layout": "grid", "channels": 8, "grid": (4, 4)}, "layout: expected one of 'map'"),
        ({"layout": "map", "channels": 0, "grid": (4, 4)}, "channels: expected an integer >= 1"),
        ({"layout": "map", "channels": 8.0, "grid": (4, 4)}, "channels: expected an integer"),
        ({"layout": "map", "channels": True, "grid": (4, 4)}, "channels: expected an integer"),
        ({"layout": "map", "channels": 8}, r"grid: expected a positive int or a pair \(H, W\)"),
        ({"layout": "map", "channels": 8, "grid": (4.5, 4)}, "grid: expected a positive int"),
        ({"layout": "tokens", "channels": 8, "grid": (4, 0), "num_prefix_tokens": 1}, "grid:"),
        ({"layout": "vector", "channels": 8, "grid": (4, 4)}, "grid: expected None for a 'vector'"),
        (
            {"layout": "tokens", "channels": 8, "grid": (4, 4), "num_prefix_tokens": -1},
            "num_prefix_tokens: expected an integer >= 0, got -1",
        ),
        (
            {"layout": "map", "channels": 8, "grid": (4, 4), "num_prefix_tokens": 1},
            "num_prefix_tokens: expected 0 for a 'map' layout",
        ),
    ],
)
def test_feature_spec_checks_every_field(kwargs, message):
    with pytest.raises(ChoiceError, match=message):
        FeatureSpec(**kwargs)


def test_feature_spec_grid_is_normalised_to_a_tuple():
    assert FeatureSpec("map", 8, [4, 5]) == FeatureSpec("map", 8, (4, 5))
    assert FeatureSpec("tokens", 8, 3, 1).grid == (3, 3)


@pytest.mark.parametrize(("grid", "got"), [((2.5, 6.4), r"\(2.5, 6.4\)"), (4.0, "4.0")])
def test_feature_spec_of_refuses_a_non_integer_grid(grid, got):
    # (2.5, 6.4) used to be truncated to (2, 6) and reported as the wrong patch count
    with pytest.raises(ChoiceError, match=f"grid: expected a positive int or a pair.*got {got}"):
        FeatureSpec.of(torch.zeros(2, 17, 4), num_prefix_tokens=1, grid=grid)


def test_feature_spec_of_num_prefix_tokens_is_not_a_bool():
    with pytest.raises(ChoiceError, match="num_prefix_tokens: expected an integer >= 0"):
        FeatureSpec.of(torch.zeros(2, 17, 4), num_prefix_tokens=True)


@pytest.mark.parametrize("post_relu", ["no", None, 1])
def test_build_bridge_post_relu_is_a_bool(post_relu):
    with pytest.raises(ChoiceError, match="post_relu: expected True or False"):
        build_bridge(_map(4, 4), _map(4, 4), post_relu=post_relu)


def test_bridge_layers_check_their_arguments():
    with pytest.raises(ChoiceError, match="mode: expected one of 'mean'.*got 'max'"):
        PoolFeatures("max")
    with pytest.raises(ChoiceError, match="num_prefix_tokens: expected an integer >= 0"):
        PoolFeatures("cls", -1)
    with pytest.raises(ChoiceError, match=r"size: expected a positive int or a pair"):
        Resize(0)
    with pytest.raises(ChoiceError, match="num_prefix_tokens: expected an integer >= 0"):
        TokensToMap(-1, (2, 2))
    with pytest.raises(ChoiceError, match="grid: expected a positive int or a pair"):
        TokensToMap(1, (2, 2.0))
    with pytest.raises(ChoiceError, match="num_prefix_tokens: expected an integer >= 0"):
        MapToTokens(8, -1)
    with pytest.raises(ChoiceError, match="channels: expected an integer >= 1"):
        MapToTokens(0, 1)


@pytest.mark.parametrize(
    ("source", "target"),
    [(_map(2, 4), _map(3, 2)), (_map(1, 2), _map(2, 4)), (_tokens(3, 2), _map(2, 4))],
)
def test_gradcheck(source, target):
    torch.manual_seed(0)
    bridge = build_bridge(source, target, post_relu=True).double()
    x = torch.randn(3, *source.shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bridge, (x,))

import re

import pytest
import torch

from featkd import (
    ChoiceError,
    DTypeError,
    FeatkdInputError,
    ShapeError,
    align_tokens,
    pool,
    to_tokens,
)
from featkd.pooling import pooled_width


def tokens_123():
    # two images, 3 tokens (1 CLS + 2 patches), width 2, values chosen to be averaged by hand
    return torch.tensor(
        [
            [[10.0, 20.0], [1.0, 2.0], [3.0, 4.0]],
            [[-1.0, -2.0], [5.0, 6.0], [7.0, 9.0]],
        ]
    )


def test_cls_takes_the_first_token():
    assert torch.equal(pool(tokens_123(), "cls"), torch.tensor([[10.0, 20.0], [-1.0, -2.0]]))


def test_patch_mean_excludes_prefix_tokens():
    expected = torch.tensor([[2.0, 3.0], [6.0, 7.5]])
    assert torch.equal(pool(tokens_123(), "patch_mean", num_prefix_tokens=1), expected)


def test_patch_mean_with_two_prefix_tokens():
    expected = torch.tensor([[3.0, 4.0], [7.0, 9.0]])
    assert torch.equal(pool(tokens_123(), "patch_mean", num_prefix_tokens=2), expected)


def test_mean_uses_every_token():
    expected = torch.tensor([[14.0 / 3, 26.0 / 3], [11.0 / 3, 13.0 / 3]])
    torch.testing.assert_close(pool(tokens_123(), "mean"), expected)


def test_gap_averages_the_grid():
    x = torch.zeros(1, 2, 2, 2)
    x[0, 0] = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    x[0, 1] = torch.tensor([[-4.0, 0.0], [0.0, 0.0]])
    assert torch.equal(pool(x, "gap"), torch.tensor([[3.0, -1.0]]))


def test_flatten_keeps_row_major_order():
    x = torch.arange(2 * 2 * 3).reshape(2, 2, 3).float()
    assert torch.equal(pool(x, "flatten")[1], torch.arange(6, 12).float())
    m = torch.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2).float()
    assert pool(m, "flatten").shape == (2, 12)


@pytest.mark.parametrize("mode", ["mean", "cls", "patch_mean", "gap", "flatten", "none"])
def test_pooled_input_passes_through(mode):
    x = torch.randn(4, 7)
    assert pool(x, mode) is x


def test_gap_on_tokens_is_refused_with_a_hint():
    with pytest.raises(ShapeError, match=r"'gap' expects .*\(B, C, H, W\).*got \(2, 3, 2\)"):
        pool(tokens_123(), "gap")


def test_token_modes_refuse_maps():
    with pytest.raises(ShapeError, match="for conv maps use 'gap'"):
        pool(torch.zeros(2, 3, 4, 4), "patch_mean")


def test_none_refuses_unpooled():
    with pytest.raises(ShapeError, match=r"expects \(B, D\), got \(2, 3, 2\)"):
        pool(tokens_123(), "none")


def test_unknown_mode_lists_choices():
    with pytest.raises(ChoiceError, match="expected one of 'mean', 'cls'.*got 'max'"):
        pool(tokens_123(), "max")


def test_wrong_rank_and_empty():
    with pytest.raises(ShapeError, match=r"x: expected .* got \(5,\)"):
        pool(torch.zeros(5), "flatten")
    with pytest.raises(ShapeError, match="zero-sized"):
        pool(torch.zeros(0, 3, 4), "mean")


def test_patch_mean_without_patches():
    with pytest.raises(ShapeError, match="more than 1 tokens"):
        pool(torch.zeros(2, 1, 4), "patch_mean")


def test_cls_needs_a_prefix_token():
    with pytest.raises(ChoiceError, match="at least 1 prefix token"):
        pool(tokens_123(), "cls", num_prefix_tokens=0)


def test_to_tokens_is_row_major():
    x = torch.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2).float()
    t = to_tokens(x)
    assert t.shape == (2, 4, 3)
    # token (row 1, col 0) is flat index 2; its channels are x[b, :, 1, 0]
    assert torch.equal(t[1, 2], x[1, :, 1, 0])
    with pytest.raises(ShapeError):
        to_tokens(torch.zeros(2, 3, 4))


def test_align_tokens_identity_and_prefix():
    x = torch.randn(2, 1 + 9, 5)
    assert align_tokens(x, 3) is x
    y = align_tokens(x, (6, 6))
    assert y.shape == (2, 37, 5)
    assert torch.equal(y[:, 0], x[:, 0])


def test_align_tokens_constant_grid_stays_constant():
    x = torch.full((1, 1 + 16, 3), 2.5)
    torch.testing.assert_close(align_tokens(x, 7), torch.full((1, 50, 3), 2.5))


def test_align_tokens_nearest_upsampling_by_hand():
    # a 2x2 grid of scalars upsampled to 4x4 with nearest: each value fills a 2x2 block
    grid = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x = grid.reshape(1, 4, 1)
    y = align_tokens(x, 4, num_prefix_tokens=0, mode="nearest").reshape(4, 4)
    expected = torch.tensor(
        [[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0], [3.0, 3.0, 4.0, 4.0], [3.0, 3.0, 4.0, 4.0]]
    )
    assert torch.equal(y, expected)


def test_align_tokens_area_downsampling_by_hand():
    x = torch.arange(16.0).reshape(1, 16, 1)
    y = align_tokens(x, 2, num_prefix_tokens=0, mode="area").reshape(2, 2)
    expected = torch.tensor(
        [
            [(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4],
            [(8 + 9 + 12 + 13) / 4, (10 + 11 + 14 + 15) / 4],
        ]
    )
    assert torch.equal(y, expected)


def test_align_tokens_rectangular_grid_needs_input_size():
    x = torch.randn(2, 1 + 6, 4)
    with pytest.raises(ShapeError, match="pass input_size"):
        align_tokens(x, 4)
    assert align_tokens(x, (4, 6), input_size=(2, 3)).shape == (2, 25, 4)
    with pytest.raises(ShapeError, match="holds 4 patches, got 6"):
        align_tokens(x, 4, input_size=(2, 2))


def test_align_tokens_half_precision():
    x = torch.randn(2, 1 + 4, 3).to(torch.bfloat16)
    y = align_tokens(x, 3)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 10, 3)


def test_pool_is_differentiable():
    x = torch.randn(3, 5, 4, requires_grad=True)
    pool(x, "patch_mean").sum().backward()
    expected = torch.zeros(3, 5, 4)
    expected[:, 1:] = 0.25
    torch.testing.assert_close(x.grad, expected)


_LAYOUTS = {
    "mean": [(2, 6), (2, 5, 6)],
    "cls": [(2, 6), (2, 5, 6)],
    "patch_mean": [(2, 6), (2, 5, 6)],
    "gap": [(2, 6), (2, 6, 3, 4)],
    "flatten": [(2, 6), (2, 5, 6), (2, 6, 3, 4)],
    "none": [(2, 6)],
}


@pytest.mark.parametrize(
    ("mode", "shape"), [(mode, shape) for mode, shapes in _LAYOUTS.items() for shape in shapes]
)
def test_pooled_width_is_the_width_pool_returns(mode, shape):
    x = torch.randn(shape)
    assert pooled_width(x, mode) == pool(x, mode).shape[1]


@pytest.mark.parametrize(
    ("x", "mode", "kwargs"),
    [
        (torch.zeros(2, 5, 6), "gap", {}),
        (torch.zeros(2, 6, 3, 4), "mean", {}),
        (torch.zeros(2, 5, 6), "none", {}),
        (torch.zeros(2, 5, 6), "cls", {"num_prefix_tokens": 0}),
        (torch.zeros(2, 1, 6), "patch_mean", {}),
        (torch.zeros(2, 3, 6), "mean", {"num_prefix_tokens": 4}),
        (torch.zeros(2, 5, 6, dtype=torch.long), "mean", {}),
        (torch.zeros(2, 5, 6), "median", {}),
    ],
)
def test_pooled_width_refuses_what_pool_refuses(x, mode, kwargs):
    with pytest.raises(FeatkdInputError) as from_pool:
        pool(x, mode, name="feats", **kwargs)
    with pytest.raises(type(from_pool.value), match=re.escape(str(from_pool.value))):
        pooled_width(x, mode, name="feats", **kwargs)


# ------------------------------------------------------------------ bad arguments (issue 11)
@pytest.mark.parametrize("mode", ["mean", "cls", "patch_mean", "gap", "flatten", "none"])
def test_pool_refuses_a_non_tensor(mode):
    with pytest.raises(FeatkdInputError, match="x: expected a torch.Tensor, got list"):
        pool([[1.0, 2.0], [3.0, 4.0]], mode)


@pytest.mark.parametrize(
    ("mode", "shape"),
    [("mean", (2, 3, 4)), ("patch_mean", (2, 3, 4)), ("cls", (2, 3, 4)), ("gap", (2, 3, 2, 2))],
)
def test_pool_refuses_integer_features(mode, shape):
    with pytest.raises(DTypeError, match="feats: expected a floating-point tensor.*int64"):
        pool(torch.ones(shape, dtype=torch.long), mode, name="feats")


def test_pool_num_prefix_tokens_is_not_a_bool():
    with pytest.raises(ChoiceError, match=r"num_prefix_tokens: expected an integer >= 0"):
        pool(tokens_123(), "patch_mean", num_prefix_tokens=True)


@pytest.mark.parametrize("mode", ["mean", "cls"])
def test_pool_refuses_more_prefix_tokens_than_tokens(mode):
    with pytest.raises(ShapeError, match=r"x: num_prefix_tokens=4 expects at least 4 tokens"):
        pool(tokens_123(), mode, num_prefix_tokens=4)


def test_to_tokens_refuses_integers():
    with pytest.raises(DTypeError, match="x: expected a floating-point tensor"):
        to_tokens(torch.ones(2, 3, 4, 4, dtype=torch.int32))


def test_align_tokens_refuses_integer_tokens():
    # interpolated as floats and truncated back to integers before the fix
    x = torch.arange(1 + 4).reshape(1, 5, 1)
    with pytest.raises(DTypeError, match="tokens: expected a floating-point tensor.*int64"):
        align_tokens(x, 3)


@pytest.mark.parametrize("bad", [-1, 2.5, True, None])
def test_align_tokens_num_prefix_tokens_must_be_an_int_at_least_zero(bad):
    # -1 took the last patch for a prefix token and resampled the rest: a wrong layout, silently
    x = torch.randn(2, 1 + 9, 4)
    with pytest.raises(ChoiceError, match=r"num_prefix_tokens: expected an integer >= 0"):
        align_tokens(x, 4, num_prefix_tokens=bad)


@pytest.mark.parametrize("bad", [2.5, True, None])
def test_align_tokens_target_size_must_be_positive_ints(bad):
    with pytest.raises(ChoiceError, match=r"size: expected a positive int or a pair \(H, W\)"):
        align_tokens(torch.randn(2, 1 + 9, 4), bad)


@pytest.mark.parametrize("bad", [3.0, (True, 9)])
def test_align_tokens_input_size_must_be_positive_ints(bad):
    with pytest.raises(ChoiceError, match=r"input_size: expected a positive int or a pair"):
        align_tokens(torch.randn(2, 1 + 9, 4), 4, input_size=bad)

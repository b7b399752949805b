"""Pooling and token-layout utilities.

Axis legend (einops):
    b  batch                      n  tokens (prefix tokens first, then patches)
    d  width (channels)           h, w  spatial grid

Layouts are named by the mode the caller asks for, never guessed: ``gap`` is for conv maps
``(B, C, H, W)``, ``mean``/``cls``/``patch_mean`` for token sequences ``(B, N, D)``. A ``(B, D)``
input is already pooled and is returned unchanged by every mode, so a loss can accept both
pooled embeddings and unpooled features with one call.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, reduce

from featkd._checks import ChoiceError, ShapeError, check_floating, check_rank, describe_shape
from featkd._options import check_choice, check_int

__all__ = ["POOL_MODES", "align_tokens", "pool", "to_tokens"]

POOL_MODES = ("mean", "cls", "patch_mean", "gap", "flatten", "none")

_ANY_LAYOUT = {2: "(B, D)", 3: "(B, N, D)", 4: "(B, C, H, W)"}
_MODE_LAYOUTS = {
    "mean": {2: "(B, D)", 3: "(B, N, D)"},
    "cls": {2: "(B, D)", 3: "(B, N, D)"},
    "patch_mean": {2: "(B, D)", 3: "(B, N, D)"},
    "gap": {2: "(B, D)", 4: "(B, C, H, W)"},
    "flatten": _ANY_LAYOUT,
    "none": {2: "(B, D)"},
}


def _check_prefix_fits(x: torch.Tensor, num_prefix_tokens: int, name: str) -> None:
    # more prefix tokens than tokens is a layout that cannot be this tensor's
    if num_prefix_tokens > x.shape[1]:
        raise ShapeError(
            f"{name}: num_prefix_tokens={num_prefix_tokens} expects at least "
            f"{num_prefix_tokens} tokens, got {describe_shape(x.shape)}"
        )


def pool(
    x: torch.Tensor, mode: str, *, num_prefix_tokens: int = 1, name: str = "x"
) -> torch.Tensor:
    """Reduce features to one vector per sample.

    Args:
        x: ``(B, D)`` pooled features, ``(B, N, D)`` tokens with ``num_prefix_tokens`` prefix
            tokens (CLS, register, distillation) first, or ``(B, C, H, W)`` conv maps.
        mode: ``"mean"`` (all tokens), ``"cls"`` (token 0), ``"patch_mean"`` (tokens after the
            prefix), ``"gap"`` (global average pool of a map), ``"flatten"`` (concatenate
            everything after the batch axis), ``"none"`` (input must already be ``(B, D)``).
        num_prefix_tokens: how many leading tokens are not patches (``cls`` needs >= 1).
        name: the argument name used in error messages.

    Returns:
        ``(B, D)`` (``(B, N*D)`` or ``(B, C*H*W)`` for ``flatten``).

    Raises:
        ChoiceError: an unknown ``mode``, or ``num_prefix_tokens`` not an int ``>= 0``.
        DTypeError: ``x`` is not floating point.
        ShapeError: ``x`` has a rank the mode cannot pool, or fewer tokens than
            ``num_prefix_tokens``.

    Shape:
        - x: ``(B, D)``, ``(B, N, D)`` or ``(B, C, H, W)`` as the mode allows.
        - output: ``(B, D)``.

    Example:
        >>> tokens = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
        >>> pool(tokens, "patch_mean", num_prefix_tokens=1)
        tensor([[ 3.,  4.],
                [ 9., 10.]])
        >>> pool(torch.ones(4, 8, 5, 5), "gap").shape
        torch.Size([4, 8])
    """
    _check_pool(x, mode, num_prefix_tokens, name)
    if x.ndim == 2:
        return x
    if mode == "flatten":
        return rearrange(x, "b ... -> b (...)")
    if mode == "gap":
        return reduce(x, "b c h w -> b c", "mean")
    if mode == "mean":
        return reduce(x, "b n d -> b d", "mean")
    if mode == "cls":
        return x[:, 0]
    return reduce(x[:, num_prefix_tokens:], "b n d -> b d", "mean")  # patch_mean


def pooled_width(x: torch.Tensor, mode: str, *, num_prefix_tokens: int = 1, name: str = "x") -> int:
    """The width of ``pool(x, mode, ...)`` after the same checks, computed from the shape
    alone: a validation that needs the pooled width pools nothing.

    Example:
        >>> pooled_width(torch.zeros(2, 5, 8), "patch_mean")
        8
        >>> pooled_width(torch.zeros(2, 3, 4, 4), "flatten")
        48
    """
    _check_pool(x, mode, num_prefix_tokens, name)
    if mode == "flatten":
        return math.prod(x.shape[1:])
    return x.shape[-1] if x.ndim == 3 else x.shape[1]


def _check_pool(x: Any, mode: str, num_prefix_tokens: int, name: str) -> None:
    """Every check of :func:`pool`; reads the shape and dtype only."""
    check_choice(mode, "mode", POOL_MODES)
    check_int(num_prefix_tokens, "num_prefix_tokens", 0)
    check_floating(x, name)  # also rejects a non-tensor before its .ndim is read
    layouts = _MODE_LAYOUTS[mode]
    if x.ndim not in layouts and x.ndim in _ANY_LAYOUT:
        hint = {3: "for tokens use 'mean', 'cls' or 'patch_mean'", 4: "for conv maps use 'gap'"}
        extra = f"; {hint[x.ndim]}" if x.ndim in hint else ""
        raise ShapeError(
            f"{name}: pooling mode {mode!r} expects "
            f"{' or '.join(layouts[k] for k in sorted(layouts))}, "
            f"got {describe_shape(x.shape)}{extra}"
        )
    check_rank(x, name, layouts)
    if x.ndim == 2:
        return
    if mode in ("mean", "cls", "patch_mean"):
        _check_prefix_fits(x, num_prefix_tokens, name)
    if mode == "cls" and num_prefix_tokens < 1:
        raise ChoiceError("num_prefix_tokens: mode 'cls' needs at least 1 prefix token, got 0")
    if mode == "patch_mean" and x.shape[1] <= num_prefix_tokens:
        raise ShapeError(
            f"{name}: mode 'patch_mean' with num_prefix_tokens={num_prefix_tokens} expects "
            f"more than {num_prefix_tokens} tokens, got {describe_shape(x.shape)}"
        )


def to_tokens(x: torch.Tensor, *, name: str = "x") -> torch.Tensor:
    """Turn a conv map into a token sequence, row-major over the grid.

    Shape:
        - x: ``(B, C, H, W)``
        - output: ``(B, H*W, C)``

    Example:
        >>> to_tokens(torch.zeros(2, 16, 4, 5)).shape
        torch.Size([2, 20, 16])
    """
    check_rank(x, name, {4: "(B, C, H, W)"})
    check_floating(x, name)
    return rearrange(x, "b c h w -> b (h w) c")


def _grid_of(num_patches: int, name: str) -> tuple[int, int]:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ShapeError(
            f"{name}: {num_patches} patch tokens do not form a square grid; pass input_size=(H, W)"
        )
    return side, side


def _pair(size: Any, name: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else size
    ok = isinstance(pair, (tuple, list)) and len(pair) == 2
    # bools are ints to Python, but True is no grid size
    ok = ok and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in pair)
    if not ok:
        raise ChoiceError(f"{name}: expected a positive int or a pair (H, W) of them, got {size!r}")
    return (pair[0], pair[1])


def align_tokens(
    tokens: torch.Tensor,
    size: int | tuple[int, int],
    *,
    num_prefix_tokens: int = 1,
    input_size: tuple[int, int] | None = None,
    mode: str = "bilinear",
    name: str = "tokens",
) -> torch.Tensor:
    """Resample the patch grid of a token sequence to another grid size.

    For students and teachers with different patch counts (a ViT/16 against a ViT/14, say):
    the patch tokens are laid out on their ``(h, w)`` grid, interpolated to ``size`` and
    flattened back; prefix tokens are kept unchanged in front.

    Args:
        tokens: ``(B, P + h*w, D)`` with ``P = num_prefix_tokens``.
        size: target grid ``(H, W)`` (or one int for a square grid).
        num_prefix_tokens: leading non-patch tokens, passed through.
        input_size: the input grid ``(h, w)``; inferred when the patch count is a square.
        mode: ``"bilinear"``, ``"bicubic"``, ``"nearest"`` or ``"area"``.

    Raises:
        ChoiceError: a bad ``mode``, ``size`` or ``input_size`` (positive ints), or
            ``num_prefix_tokens`` not an int ``>= 0``.
        DTypeError: ``tokens`` is not floating point.
        ShapeError: no patch tokens after the prefix, or a patch count that does not fit the grid.

    Shape:
        - tokens: ``(B, P + h*w, D)``
        - output: ``(B, P + H*W, D)``

    Example:
        >>> student = torch.randn(2, 1 + 14 * 14, 192)
        >>> align_tokens(student, 16).shape
        torch.Size([2, 257, 192])
    """
    check_rank(tokens, name, {3: "(B, N, D)"})
    check_floating(tokens, name)  # interpolating integers would truncate the result
    check_choice(mode, "mode", ("bilinear", "bicubic", "nearest", "area"))
    check_int(num_prefix_tokens, "num_prefix_tokens", 0)
    target = _pair(size, "size")
    if num_prefix_tokens >= tokens.shape[1]:
        raise ShapeError(
            f"{name}: expected patch tokens after {num_prefix_tokens} prefix tokens, "
            f"got {describe_shape(tokens.shape)}"
        )
    prefix, patches = tokens[:, :num_prefix_tokens], tokens[:, num_prefix_tokens:]
    n = patches.shape[1]
    h, w = _pair(input_size, "input_size") if input_size is not None else _grid_of(n, name)
    if h * w != n:
        raise ShapeError(f"{name}: input_size {(h, w)} holds {h * w} patches, got {n}")
    if (h, w) == target:
        return tokens
    grid = rearrange(patches, "b (h w) d -> b d h w", h=h, w=w)
    # interpolation is not implemented for half on every backend; do it in float32 at least
    work_dtype = torch.promote_types(grid.dtype, torch.float32)
    align = False if mode in ("bilinear", "bicubic") else None
    resized = F.interpolate(grid.to(work_dtype), size=target, mode=mode, align_corners=align)
    resized = rearrange(resized, "b d h w -> b (h w) d").to(tokens.dtype)
    return torch.cat([prefix, resized], dim=1)

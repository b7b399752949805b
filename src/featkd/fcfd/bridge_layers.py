"""The layers bridges are built from: token <-> map conversions, resizing, pooling, prefix-token
and grid adaptation, and the strided / transposed convolutions between integer grid ratios.

:func:`featkd.fcfd.bridges.build_bridge` assembles them; each is a plain ``nn.Module`` that can also be
used on its own. Axis legend: ``b`` batch, ``n`` tokens, ``d``/``c`` width, ``h, w`` grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from featkd._checks import ShapeError
from featkd._options import check_choice, check_int
from featkd._precision import full_precision
from featkd.pooling import POOL_MODES, align_tokens, pool
from featkd.pooling import _pair as _grid_pair

__all__ = ["MapToTokens", "PoolFeatures", "Resize", "TokensToMap", "map_layers"]


class TokensToMap(nn.Module):
    """Drop the prefix tokens and lay the patch tokens out on their grid.

    Shape:
        - input: ``(B, P + h*w, D)``
        - output: ``(B, D, h, w)``

    Example:
        >>> TokensToMap(1, (2, 3))(torch.zeros(4, 7, 5)).shape
        torch.Size([4, 5, 2, 3])
    """

    def __init__(self, num_prefix_tokens: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.num_prefix_tokens = check_int(num_prefix_tokens, "num_prefix_tokens", 0)
        self.grid = _grid_pair(grid, "grid")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, self.num_prefix_tokens :]
        return rearrange(patches, "b (h w) d -> b d h w", h=self.grid[0], w=self.grid[1])

    def extra_repr(self) -> str:
        return f"num_prefix_tokens={self.num_prefix_tokens}, grid={self.grid}"


class MapToTokens(nn.Module):
    """Flatten a map to patch tokens (row-major) and prepend ``P`` prefix tokens.

    A conv map has no CLS token; each prefix token is the mean of the patch tokens plus a
    learned offset (zero at initialisation), so the receiving transformer gets a summary token
    it can tell apart from the patches.

    Shape:
        - input: ``(B, D, h, w)``
        - output: ``(B, P + h*w, D)``

    Example:
        >>> MapToTokens(8, 1)(torch.zeros(2, 8, 3, 3)).shape
        torch.Size([2, 10, 8])
    """

    def __init__(self, channels: int, num_prefix_tokens: int) -> None:
        super().__init__()
        check_int(channels, "channels", 1)
        self.num_prefix_tokens = check_int(num_prefix_tokens, "num_prefix_tokens", 0)
        self.prefix_offset = nn.Parameter(torch.zeros(num_prefix_tokens, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = rearrange(x, "b d h w -> b (h w) d")
        if self.num_prefix_tokens == 0:
            return patches
        summary = patches.mean(dim=1, keepdim=True)
        prefix = summary + self.prefix_offset.to(summary.dtype)
        return torch.cat([prefix, patches], dim=1)

    def extra_repr(self) -> str:
        return f"num_prefix_tokens={self.num_prefix_tokens}"


class Resize(nn.Module):
    """Bilinear resize of a map to a fixed grid (antialiased when shrinking), in float32 at least.

    Shape:
        - input: ``(B, C, H, W)``
        - output: ``(B, C, *size)``

    Example:
        >>> Resize((4, 4))(torch.zeros(1, 2, 7, 7)).shape
        torch.Size([1, 2, 4, 4])
    """

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = _grid_pair(size, "size")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shrink = x.shape[-2] > self.size[0] or x.shape[-1] > self.size[1]
        # half-precision interpolation is missing on some backends; the resize is cheap in fp32
        with full_precision(x) as work:
            out = F.interpolate(
                x.to(work), size=self.size, mode="bilinear", align_corners=False, antialias=shrink
            )
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class PoolFeatures(nn.Module):
    """:func:`featkd.pool` as a layer (used by bridges onto pooled vectors).

    Example:
        >>> PoolFeatures("gap")(torch.ones(2, 3, 4, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(self, mode: str, num_prefix_tokens: int = 0) -> None:
        super().__init__()
        check_choice(mode, "mode", POOL_MODES)
        self.mode = mode
        self.num_prefix_tokens = check_int(num_prefix_tokens, "num_prefix_tokens", 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool(x, self.mode, num_prefix_tokens=self.num_prefix_tokens)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, num_prefix_tokens={self.num_prefix_tokens}"


class _AdaptPrefix(nn.Module):
    """Token sequences with different prefix counts: drop the source prefix (target has none)
    or create the target's prefix tokens from the mean of the patches (source has none)."""

    def __init__(self, source_prefix: int, target_prefix: int) -> None:
        super().__init__()
        self.source_prefix = source_prefix
        self.target_prefix = target_prefix

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, self.source_prefix :]
        if self.target_prefix == 0:
            return patches
        summary = patches.mean(dim=1, keepdim=True).expand(-1, self.target_prefix, -1)
        return torch.cat([summary, patches], dim=1)

    def extra_repr(self) -> str:
        return f"{self.source_prefix} -> {self.target_prefix} prefix tokens"


class _AlignGrid(nn.Module):
    """Bilinear resampling of the patch grid of a token sequence (prefix tokens kept)."""

    def __init__(self, num_prefix_tokens: int, source: tuple[int, int], target: tuple[int, int]):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.source = tuple(source)
        self.target = tuple(target)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return align_tokens(
            tokens, self.target, num_prefix_tokens=self.num_prefix_tokens, input_size=self.source
        )

    def extra_repr(self) -> str:
        return f"{self.source} -> {self.target}"


def _integer_factors(big: tuple[int, int], small: tuple[int, int]) -> tuple[int, int] | None:
    """Per-axis integer factors ``big = f * small``, or ``None`` if some axis is not a multiple."""
    if all(b % s == 0 for b, s in zip(big, small, strict=True)):
        return (big[0] // small[0], big[1] // small[1])
    return None


def _down_conv(in_ch: int, out_ch: int, factors: tuple[int, int]) -> nn.Conv2d:
    # padding 1, kernel 3 (f <= 2) or f + 2: output floor((f*H + 2 - k) / f) + 1 = H, and the
    # windows overlap or touch (k - 1 >= f), so every input pixel is read
    kernel = tuple(3 if f <= 2 else f + 2 for f in factors)
    return nn.Conv2d(in_ch, out_ch, kernel, stride=factors, padding=1, bias=False)


def _up_conv(in_ch: int, out_ch: int, factors: tuple[int, int]) -> nn.ConvTranspose2d:
    # output = (H - 1) * f - 2p + k; k - 2p = f gives f * H (k = 2f for even f, f + 2 for odd)
    kernel = tuple(2 * f if f % 2 == 0 else f + 2 for f in factors)
    padding = tuple((k - f) // 2 for k, f in zip(kernel, factors, strict=True))
    return nn.ConvTranspose2d(in_ch, out_ch, kernel, stride=factors, padding=padding, bias=False)


def map_layers(
    in_ch: int,
    out_ch: int,
    source: tuple[int, int],
    target: tuple[int, int],
    resample: str,
    where: str,
) -> list[nn.Module]:
    """conv (strided / transposed / after a resize) + BatchNorm2d onto ``out_ch x target``."""
    if source == target:
        conv: nn.Module = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        return [conv, nn.BatchNorm2d(out_ch)]
    down = _integer_factors(source, target)
    up = _integer_factors(target, source)
    if resample in ("conv", "auto") and down is not None:
        return [_down_conv(in_ch, out_ch, down), nn.BatchNorm2d(out_ch)]
    if resample in ("conv", "auto") and up is not None:
        return [_up_conv(in_ch, out_ch, up), nn.BatchNorm2d(out_ch)]
    if resample == "conv":
        raise ShapeError(
            f"{where}: cannot resample a {source[0]}x{source[1]} grid to "
            f"{target[0]}x{target[1]} with a strided or transposed conv (resample='conv' needs "
            "every axis of one grid to be an integer multiple of the other's); pass "
            "resample='interpolate' or 'auto' for a bilinear resize"
        )
    return [
        Resize(target),
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
    ]

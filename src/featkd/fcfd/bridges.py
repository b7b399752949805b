"""Bridges: small learned maps that carry one network's stage output into another's feature space.

FCFD feeds each network's features to the other network's later stages, so a bridge must
produce exactly the layout, width and spatial size the receiving stage expects. Bridges are
built from shapes seen once (a probing forward) and described by :class:`FeatureSpec`.

Layouts are named, not guessed (a ``(B, C, L)`` 1-d map and a ``(B, N, D)`` token sequence
have the same rank):

* ``"map"``: a conv feature map ``(B, C, H, W)``;
* ``"tokens"``: a token sequence ``(B, P + h*w, D)``, ``P`` prefix tokens (CLS, register,
  distillation) first, then the patches of an ``h x w`` grid in row-major order;
* ``"vector"``: pooled features ``(B, D)``.

What a bridge is made of (``source -> target``):

========================  =========================================================================
map -> map                resample + conv3x3 + BatchNorm2d (+ LeakyReLU(0.1))
tokens -> map             LayerNorm, patch grid as a map (prefix tokens dropped), then as map -> map
map -> tokens             as map -> map onto the token grid, flattened to tokens, prefix tokens
                          = mean of the patch tokens + a learned offset per prefix token
tokens -> tokens          grid resampled (bilinear) if the patch grids differ, prefix tokens
                          adapted, LayerNorm + Linear per token (+ LeakyReLU(0.1))
map / tokens -> vector    pooled (GAP; CLS or token mean), LayerNorm + Linear (+ LeakyReLU(0.1))
vector -> vector          LayerNorm + Linear (+ LeakyReLU(0.1))
vector -> map / tokens    not supported (a pooled vector has no spatial layout): error
========================  =========================================================================

Spatial resampling between grids (``resample``):

* ``"conv"`` (default, as in FCFD's official runs): equal sizes use a stride-1 conv3x3; when every
  axis of the source is an integer multiple ``f`` of the target (``f`` may differ per axis) a
  strided conv (stride ``f``, padding 1, kernel 3 for ``f <= 2`` and ``f + 2`` beyond, so every
  input pixel is read) downsamples;
  when every axis of the target is an integer multiple of the source a transposed conv
  (stride ``f``, kernel ``2f`` for even ``f``, ``f + 2`` for odd ``f``) upsamples. Anything else
  (``7 -> 4``, or one axis up and the other down) raises :class:`~featkd.ShapeError`.
* ``"interpolate"``: bilinear resize to the target grid (antialiased when shrinking), then a
  stride-1 conv3x3. Any pair of sizes works.
* ``"auto"``: ``"conv"`` when it applies, ``"interpolate"`` otherwise.

Axis legend: ``b`` batch, ``n`` tokens, ``d``/``c`` width, ``h, w`` grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from featkd._checks import ChoiceError, FeatkdInputError, ShapeError, check_rank, describe_shape
from featkd._options import check_bool, check_choice, check_int
from featkd.fcfd.bridge_layers import (
    MapToTokens,
    PoolFeatures,
    Resize,
    TokensToMap,
    _AdaptPrefix,
    _AlignGrid,
    map_layers,
)
from featkd.pooling import _pair as _grid_pair

__all__ = [
    "LAYOUTS",
    "RESAMPLE_MODES",
    "Bridge",
    "FeatureSpec",
    "MapToTokens",
    "PoolFeatures",
    "Resize",
    "TokensToMap",
    "build_bridge",
]

LAYOUTS = ("map", "tokens", "vector")
RESAMPLE_MODES = ("conv", "interpolate", "auto")
_RANK_OF = {"map": 4, "tokens": 3, "vector": 2}
_LAYOUT_OF_RANK = {4: "map", 3: "tokens", 2: "vector"}


@dataclass(frozen=True)
class FeatureSpec:
    """The layout of one stage output, without the batch axis.

    Attributes:
        layout: ``"map"``, ``"tokens"`` or ``"vector"``.
        channels: ``C`` of a map, ``D`` of tokens or a vector.
        grid: ``(H, W)`` of a map, the patch grid ``(h, w)`` of tokens (one int for a square
            grid), ``None`` for a vector.
        num_prefix_tokens: leading non-patch tokens (tokens only; 0 otherwise).

    Every field is checked at construction (:class:`~featkd.ChoiceError` naming the field), so
    a wrong spec fails where it is written, not when a bridge built from it first runs.

    Example:
        >>> FeatureSpec.of(torch.zeros(2, 1 + 16, 32), num_prefix_tokens=1)
        FeatureSpec(layout='tokens', channels=32, grid=(4, 4), num_prefix_tokens=1)
        >>> FeatureSpec.of(torch.zeros(2, 8, 6, 6)).shape
        (8, 6, 6)
    """

    layout: str
    channels: int
    grid: tuple[int, int] | None = None
    num_prefix_tokens: int = 0

    def __post_init__(self) -> None:
        check_choice(self.layout, "layout", LAYOUTS)
        check_int(self.channels, "channels", 1)
        check_int(self.num_prefix_tokens, "num_prefix_tokens", 0)
        if self.layout == "vector":
            if self.grid is not None:
                raise ChoiceError(
                    f"grid: expected None for a 'vector' layout (pooled features have no grid), "
                    f"got {self.grid!r}"
                )
        else:
            # frozen: normalise a list or one int to the (H, W) tuple the bridges compare
            object.__setattr__(self, "grid", _grid_pair(self.grid, "grid"))
        if self.layout != "tokens" and self.num_prefix_tokens != 0:
            raise ChoiceError(
                f"num_prefix_tokens: expected 0 for a {self.layout!r} layout (only token "
                f"sequences have prefix tokens), got {self.num_prefix_tokens!r}"
            )

    @classmethod
    def of(
        cls,
        x: torch.Tensor,
        layout: str | None = None,
        *,
        num_prefix_tokens: int = 0,
        grid: tuple[int, int] | None = None,
        name: str = "x",
    ) -> FeatureSpec:
        """Describe ``x``. ``layout=None`` reads it from the rank (4 map, 3 tokens, 2 vector).

        For tokens, ``num_prefix_tokens`` leading tokens are not patches and the patch grid is
        ``grid`` or, when not given, the square grid the patch count forms.
        """
        if layout is not None:
            check_choice(layout, "layout", LAYOUTS)
            check_rank(x, name, {_RANK_OF[layout]: _describe_layout(layout)})
        else:
            check_rank(x, name, {r: _describe_layout(lay) for r, lay in _LAYOUT_OF_RANK.items()})
            layout = _LAYOUT_OF_RANK[x.ndim]
        if layout == "map":
            return cls("map", int(x.shape[1]), (int(x.shape[2]), int(x.shape[3])))
        if layout == "vector":
            return cls("vector", int(x.shape[1]))
        check_int(num_prefix_tokens, "num_prefix_tokens", 0)
        patches = int(x.shape[1]) - num_prefix_tokens
        if patches < 1:
            raise ShapeError(
                f"{name}: expected patch tokens after {num_prefix_tokens} prefix tokens, "
                f"got {describe_shape(x.shape)}"
            )
        if grid is None:
            side = math.isqrt(patches)
            if side * side != patches:
                raise ShapeError(
                    f"{name}: {patches} patch tokens (after {num_prefix_tokens} prefix tokens) "
                    f"do not form a square grid, got {describe_shape(x.shape)}; give the grid "
                    "explicitly (a FeatureSpec) or check num_prefix_tokens"
                )
            grid = (side, side)
        grid = _grid_pair(grid, "grid")
        if grid[0] * grid[1] != patches:
            raise ShapeError(
                f"{name}: grid {grid} holds {grid[0] * grid[1]} patches, got {patches} "
                f"(shape {describe_shape(x.shape)}, {num_prefix_tokens} prefix tokens)"
            )
        return cls("tokens", int(x.shape[2]), grid, num_prefix_tokens)

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensor shape without the batch axis."""
        if self.layout == "map":
            return (self.channels, *self.grid)
        if self.layout == "tokens":
            return (self.num_prefix_tokens + self.grid[0] * self.grid[1], self.channels)
        return (self.channels,)

    def describe(self) -> str:
        """``(B, 64, 8, 8)``-style text for messages."""
        return "(B, " + ", ".join(str(d) for d in self.shape) + ")"


def _describe_layout(layout: str) -> str:
    return {"map": "(B, C, H, W)", "tokens": "(B, N, D)", "vector": "(B, D)"}[layout]


class Bridge(nn.Sequential):
    """A sequence of layers mapping features laid out as ``source`` to ``target``.

    Built by :func:`build_bridge`; a plain ``nn.Sequential`` that also remembers the two
    :class:`FeatureSpec` it connects.
    """

    def __init__(self, source: FeatureSpec, target: FeatureSpec, *layers: nn.Module) -> None:
        super().__init__(*layers)
        self.source = source
        self.target = target

    def __getitem__(self, idx: int | slice) -> nn.Module:
        if isinstance(idx, slice):  # a slice is a plain Sequential: it no longer joins the specs
            return nn.Sequential(*list(self)[idx])
        return super().__getitem__(idx)

    def extra_repr(self) -> str:
        return f"{self.source.describe()} -> {self.target.describe()}"


def _token_pool_mode(spec: FeatureSpec, token_pool: str) -> str:
    if token_pool != "auto":
        return token_pool
    return "cls" if spec.num_prefix_tokens > 0 else "mean"


def build_bridge(
    source: FeatureSpec,
    target: FeatureSpec,
    *,
    post_relu: bool = False,
    resample: str = "conv",
    token_pool: str = "auto",
    name: str = "bridge",
) -> Bridge:
    """Build the bridge carrying features laid out as ``source`` onto ``target``.

    See the module docstring for the layers used for each pair of layouts and for the
    supported spatial ratios. Convolutions are initialised He-normal (fan-out, ReLU gain),
    BatchNorm at weight 1, bias 0.

    Args:
        source: layout of the features going in.
        target: layout the receiving network expects.
        post_relu: end with LeakyReLU(0.1), for targets that are non-negative (post-ReLU);
            the small negative slope keeps the bridge's gradient alive.
        resample: ``"conv"``, ``"interpolate"`` or ``"auto"`` (spatial resampling of maps).
        token_pool: pooling of tokens onto a vector: ``"auto"`` (CLS when there is a prefix
            token, else the token mean), ``"cls"``, ``"mean"`` or ``"patch_mean"``.
        name: how error messages refer to this bridge.

    Raises:
        ShapeError: the layouts cannot be bridged (a vector onto a map or tokens, a grid ratio
            ``resample='conv'`` does not support, prefix counts that cannot be adapted).

    Shape:
        - input: ``(B, *source.shape)``
        - output: ``(B, *target.shape)``

    Example:
        >>> bridge = build_bridge(FeatureSpec("map", 16, (8, 8)), FeatureSpec("map", 32, (4, 4)))
        >>> bridge(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 32, 4, 4])
        >>> vit_to_cnn = build_bridge(FeatureSpec("tokens", 24, (4, 4), 1),
        ...                           FeatureSpec("map", 8, (16, 16)), post_relu=True)
        >>> vit_to_cnn(torch.randn(2, 17, 24)).shape
        torch.Size([2, 8, 16, 16])
    """
    for spec, arg in ((source, "source"), (target, "target")):
        if not isinstance(spec, FeatureSpec):
            raise FeatkdInputError(f"{arg}: expected a FeatureSpec, got {type(spec).__name__}")
    check_choice(resample, "resample", RESAMPLE_MODES)
    check_choice(token_pool, "token_pool", ("auto", "cls", "mean", "patch_mean"))
    check_bool(post_relu, "post_relu")
    pair = f"{source.describe()} {source.layout} -> {target.describe()} {target.layout}"
    layers: list[nn.Module] = []
    if source.layout == "vector" and target.layout != "vector":
        raise ShapeError(
            f"{name}: cannot bridge pooled (B, D) features onto a {target.layout} layout "
            f"{target.describe()} (a vector has no spatial layout to restore); got {pair}"
        )
    if target.layout == "map":
        if source.layout == "tokens":
            layers += [
                nn.LayerNorm(source.channels),
                TokensToMap(source.num_prefix_tokens, source.grid),
            ]
        layers += map_layers(
            source.channels, target.channels, source.grid, target.grid, resample, name
        )
    elif target.layout == "tokens" and source.layout == "map":
        layers += map_layers(
            source.channels, target.channels, source.grid, target.grid, resample, name
        )
        layers.append(MapToTokens(target.channels, target.num_prefix_tokens))
    elif target.layout == "tokens":  # tokens -> tokens
        ps, pt = source.num_prefix_tokens, target.num_prefix_tokens
        if ps != pt and ps != 0 and pt != 0:
            raise ShapeError(
                f"{name}: cannot adapt {ps} prefix tokens to {pt} (supported: equal counts, a "
                f"source without prefix tokens, or a target without them); got {pair}"
            )
        if source.grid != target.grid:
            layers.append(_AlignGrid(ps, source.grid, target.grid))
        if ps != pt:
            layers.append(_AdaptPrefix(ps, pt))
        layers += [nn.LayerNorm(source.channels), nn.Linear(source.channels, target.channels)]
    else:  # onto a vector
        if source.layout == "map":
            layers.append(PoolFeatures("gap"))
        elif source.layout == "tokens":
            mode = _token_pool_mode(source, token_pool)
            if mode == "cls" and source.num_prefix_tokens == 0:
                raise ShapeError(
                    f"{name}: token_pool='cls' needs a prefix token, the source has none; {pair}"
                )
            layers.append(PoolFeatures(mode, source.num_prefix_tokens))
        layers += [nn.LayerNorm(source.channels), nn.Linear(source.channels, target.channels)]
    if post_relu:
        layers.append(nn.LeakyReLU(0.1))
    bridge = Bridge(source, target, *layers)
    for module in bridge.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return bridge

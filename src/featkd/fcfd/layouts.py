"""What FCFD reads from its probing forward: the :class:`~featkd.fcfd.bridges.FeatureSpec` of every
stage output, and how the last features are pooled for the pooled terms."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from featkd._checks import ChoiceError, FeatkdInputError, ShapeError, describe_shape
from featkd._options import check_choice
from featkd.fcfd.bridges import LAYOUTS, FeatureSpec
from featkd.pooling import POOL_MODES, pool

__all__ = ["last_feature_pool", "stage_specs"]


def stage_specs(
    probe: list[torch.Tensor],
    layouts: Sequence[str | FeatureSpec] | None,
    prefix: int,
    who: str,
    arg: str,
) -> list[FeatureSpec]:
    """The specs of the ``K - 1`` probed stage outputs before the logits: given (a layout name
    or a :class:`FeatureSpec` per stage, checked against the probe) or read from the rank."""
    count = len(probe) - 1
    if layouts is None:
        layouts = [None] * count
    elif not isinstance(layouts, Sequence) or isinstance(layouts, str) or len(layouts) != count:
        raise ShapeError(
            f"{arg}: expected {count} layouts (one per stage before the logits), got {layouts!r}"
        )
    specs = []
    for k, (x, layout) in enumerate(zip(probe[:-1], layouts, strict=True), start=1):
        name = f"{who} stage {k} output"
        if isinstance(layout, FeatureSpec):
            if tuple(x.shape[1:]) != layout.shape:
                raise ShapeError(
                    f"{arg}[{k - 1}]: the FeatureSpec describes {layout.describe()}, "
                    f"but the {name} is {describe_shape(x.shape)}"
                )
            specs.append(layout)
            continue
        if layout is not None:
            check_choice(layout, f"{arg}[{k - 1}]", LAYOUTS)
        specs.append(FeatureSpec.of(x, layout, num_prefix_tokens=prefix, name=name))
    return specs


def last_feature_pool(
    mode: str | Callable[[torch.Tensor], torch.Tensor] | None,
    spec: FeatureSpec,
    probe: torch.Tensor,
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The pooling of the last features (``None``: no pooled terms). ``"auto"``: GAP of a map,
    CLS of tokens with a prefix token, else the token mean, ``None`` for vectors. A mode is
    tried on the probed last teacher features, so one that does not fit fails here."""
    if mode is None:
        return None
    if callable(mode):
        return mode
    check_choice(mode, "pool", ("auto", *POOL_MODES))
    chosen = mode
    if mode == "auto":
        if spec.layout == "vector":
            return None  # the last features are pooled already: the stage term covers them
        tokens = "cls" if spec.num_prefix_tokens > 0 else "mean"
        chosen = "gap" if spec.layout == "map" else tokens
    # a partial, not a closure: the loss module stays picklable
    pool_fn = functools.partial(
        pool, mode=chosen, num_prefix_tokens=spec.num_prefix_tokens, name="last features"
    )
    try:  # a mode that does not fit the layout would otherwise fail at the first call
        pool_fn(probe)
    except FeatkdInputError as error:
        raise ChoiceError(
            f"pool: mode {mode!r} cannot pool the teacher's last features "
            f"{spec.describe()} ({spec.layout}): {error}"
        ) from None
    return pool_fn

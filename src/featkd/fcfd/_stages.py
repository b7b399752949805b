"""Running network stages inside FCFD: the teacher frozen and in eval mode, the student on
scratch copies of its buffers, bridges in their own dtype, and the probing forward."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from featkd._checks import FeatkdInputError, ShapeError, describe_shape

__all__ = ["eval_mode", "run_frozen", "run_probe", "run_with_scratch_buffers", "through"]


@contextlib.contextmanager
def eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Put every submodule in eval mode for the block, restoring each one's own flag after."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for m, _ in saved:
            m.training = False
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def run_frozen(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A teacher stage in eval mode with its parameters detached: the gradient flows through
    the stage into ``x`` but never into the stage's parameters, whatever their requires_grad."""
    params = dict(stage.named_parameters())
    with eval_mode([stage]):
        if not any(p.requires_grad for p in params.values()):
            return stage(x)
        detached = {name: p.detach() for name, p in params.items()}
        return functional_call(stage, detached, (x,))


def run_with_scratch_buffers(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A student stage in its current mode (batch statistics while training) with its buffers
    replaced by copies, so running statistics updated by this forward are discarded. The
    parameters are the live ones: the student receives gradient."""
    if not any(m.training for m in stage.modules()):
        return stage(x)
    scratch = {name: b.clone() for name, b in stage.named_buffers()}
    if not scratch:
        return stage(x)
    return functional_call(stage, scratch, (x,))


def through(bridge: nn.Module, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """A bridge in its own parameters' dtype, handing back the dtype of the network it feeds
    (half-precision networks with float32 bridges work without autocast)."""
    param = next(bridge.parameters(), None)
    if param is not None:
        x = x.to(param.dtype)
    return bridge(x).to(out_dtype)


def run_probe(stages: Sequence[nn.Module], x: Any, who: str) -> list[torch.Tensor]:
    """Every stage output of ``stages`` run in order from the stem output ``x`` (the probing
    forward); a stage that fails is named in the error."""
    if not isinstance(x, torch.Tensor):
        raise FeatkdInputError(
            f"example_input: expected the {who} stem output as a tensor, got {type(x).__name__}"
        )
    outputs = []
    for i, stage in enumerate(stages):
        try:
            x = stage(x)
        except Exception as error:  # report which stage broke, in the user's terms
            raise ShapeError(
                f"example_input: {who} stage {i + 1} failed on an input of shape "
                f"{describe_shape(x.shape)}: {error}"
            ) from error
        if not isinstance(x, torch.Tensor):
            raise FeatkdInputError(
                f"{who}_stages[{i}]: expected the stage to return a tensor, got {type(x).__name__}"
            )
        outputs.append(x)
    return outputs

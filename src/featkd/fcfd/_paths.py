"""FCFD's mixed paths: the network passes that produce what the loss terms compare.

Runs outside the precision fence, in the networks' own dtype and under the caller's autocast
(as the stages run in training); the terms themselves are computed in full precision later.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from featkd.fcfd._stages import run_frozen, run_with_scratch_buffers, through

__all__ = ["Routes", "run_paths"]

PoolFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Routes:
    """What one call's terms compare, by term name, in the order the terms are listed.

    Attributes:
        squared: ``(name, x, target)`` of every squared-error term: ``"appearance/..."`` (the
            bridged student features against the teacher's) and ``"function/<path>/..."`` (the
            teacher's later stages run on bridged student features against the teacher's own).
        logits: ``(name, logits)`` of every sampled path, ``"kl/<path>"``, against the teacher's
            logits.
    """

    squared: list[tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    logits: list[tuple[str, torch.Tensor]] = field(default_factory=list)


def run_paths(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    student_stages: Sequence[nn.Module],
    teacher_stages: Sequence[nn.Module],
    s2t: Sequence[nn.Module],
    t2s: Sequence[nn.Module | None],
    paths: Sequence[tuple[str, int]],
    pool_fn: PoolFn | None,
) -> Routes:
    """Bridge every student stage output onto the teacher (appearance), run the sampled mixed
    paths ``(direction, k)`` (function, path logits). ``teacher`` is detached already;
    ``s2t[k - 1]`` / ``t2s[k - 1]`` is the bridge after stage ``k``."""
    count = len(student)
    routes = Routes()
    bridged = {}
    for k in range(1, count):
        bridged[k] = through(s2t[k - 1], student[k - 1], teacher[k - 1].dtype)
        routes.squared.append((f"appearance/stage{k}", bridged[k], teacher[k - 1]))
    pooled_target = None
    if pool_fn is not None:
        pooled_target = pool_fn(teacher[count - 2])
        routes.squared.append(("appearance/pooled", pool_fn(bridged[count - 1]), pooled_target))
    for direction, k in paths:
        path = f"{direction}@{k}"
        if direction == "s2t":
            x = bridged[k]
            for j in range(k + 1, count + 1):
                x = run_frozen(teacher_stages[j - 1], x)
                if j < count:
                    routes.squared.append((f"function/{path}/stage{j}", x, teacher[j - 1]))
                if j == count - 1 and pool_fn is not None:
                    routes.squared.append((f"function/{path}/pooled", pool_fn(x), pooled_target))
        else:
            x = through(t2s[k - 1], teacher[k - 1], student[k - 1].dtype)
            for j in range(k + 1, count + 1):
                x = run_with_scratch_buffers(student_stages[j - 1], x)
        routes.logits.append((f"kl/{path}", x))
    return routes

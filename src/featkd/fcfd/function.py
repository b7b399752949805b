"""FCFD as a function (:func:`fcfd_loss`, bridges and paths given) and as a module
(:class:`FCFDLoss`, bridges built from a probing forward, paths sampled per call)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from featkd._loss import Terms, check_reduction, evaluate
from featkd._options import check_number, check_positive
from featkd.fcfd._inputs import check_stage_outputs
from featkd.fcfd._options import (
    check_bridges,
    check_paths,
    check_pool_callable,
    check_stage_pair,
    fcfd_weights,
)
from featkd.fcfd._paths import Routes, run_paths
from featkd.kd import _kd_terms

__all__ = ["fcfd_loss"]

PoolFn = Callable[[torch.Tensor], torch.Tensor]


def _fcfd_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    routes: Routes,
    temperature: float,
    reduction: str,
) -> Terms:
    """Unchecked core: the KL and squared-error terms of what :func:`run_paths` collected.

    The logits arrive in the working dtype (the student's sets the result dtype); every
    compared tensor is cast to it. With ``reduction="mean"`` each term is the batch mean, as a
    batch-level scalar (``F.mse_loss`` over all elements, as FCFD's own code); otherwise one value
    per image ``(B,)``, summed or returned by :func:`evaluate`. The sub-terms are diagnostics,
    reduced as the terms are.
    """
    work = teacher_logits.dtype
    per_image = reduction != "mean"
    parts: dict[str, torch.Tensor] = {}
    appearance: list[torch.Tensor] = []
    function: list[torch.Tensor] = []
    kls: list[torch.Tensor] = []
    for name, x, target in routes.squared:
        if per_image:
            value = F.mse_loss(x.to(work), target.to(work), reduction="none").flatten(1).mean(1)
        else:
            value = F.mse_loss(x.to(work), target.to(work))
        parts[name] = value
        (appearance if name.startswith("appearance/") else function).append(value)
    for name, logits in routes.logits:
        kl = _kd_terms(logits.to(work), teacher_logits, temperature).values["kd"]
        parts[name] = kl if per_image else kl.mean()
        kls.append(parts[name])
    zero = student_logits.new_zeros((), dtype=work)
    appearance_sum = torch.stack(appearance).sum(0) if appearance else zero
    function_sum = torch.stack(function).sum(0) if function else zero
    kl_sum = torch.stack(kls).sum(0)
    diagnostics = {"appearance": appearance_sum, "function": function_sum, **parts}
    if reduction == "sum":
        diagnostics = {name: value.sum() for name, value in diagnostics.items()}
    terms = {"kl": kl_sum, "mse": appearance_sum + function_sum}
    return Terms(terms, {name: value.detach() for name, value in diagnostics.items()})


def _fcfd_unchecked(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    student_stages: Sequence[nn.Module],
    teacher_stages: Sequence[nn.Module],
    s2t: Sequence[nn.Module],
    t2s: Sequence[nn.Module | None],
    paths: Sequence[tuple[str, int]],
    pool_fn: PoolFn | None,
    temperature: float,
    weights: dict[str, float],
    warmup: float,
    reduction: str,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Unchecked: run the paths (in the networks' dtype, under the caller's autocast), then the
    terms through :func:`featkd._loss.evaluate`. The loss and its ``last_parts``."""
    teacher = [t.detach() for t in teacher]
    routes = run_paths(student, teacher, student_stages, teacher_stages, s2t, t2s, paths, pool_fn)
    scaled = {"kl": weights["kl"], "mse": weights["mse"] * warmup}
    return evaluate(
        _fcfd_terms,
        student[-1],
        teacher[-1],
        routes,
        temperature,
        reduction,
        weights=scaled,
        reduction=reduction,
    )


def fcfd_loss(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    *,
    student_stages: Sequence[nn.Module],
    teacher_stages: Sequence[nn.Module],
    s2t: Sequence[nn.Module],
    t2s: Sequence[nn.Module | None] | None = None,
    paths: Sequence[str] | None = None,
    temperature: float = 4.0,
    weights: dict[str, float] | None = None,
    warmup: float = 1.0,
    pool: PoolFn | None = None,
    reduction: str = "mean",
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Function-consistent feature distillation (Liu et al., ICLR 2023) with given bridges.

    ``weights["kl"] * kl + weights["mse"] * warmup * mse``, where, for stage outputs ``S_k``,
    ``T_k`` (``k = 1..K``, ``K`` the logits):

    * ``kl``: for every path in ``paths``, ``T^2 KL(softmax(T_K / T) || softmax(logits / T))``
      of the path's logits (``s2t@k``: ``s2t[k-1](S_k)`` through the teacher's stages
      ``k+1..K``; ``t2s@k``: ``t2s[k-1](T_k)`` through the student's), summed over the paths;
    * ``mse``: appearance, ``MSE(s2t[k-1](S_k), T_k)`` at every stage ``k < K`` (plus the
      pooled last features with ``pool``), and function, for each ``s2t`` path, the teacher's
      later stages run on the bridged student feature against the teacher's own ``T_j``.

    Each term is a mean over images (``F.mse_loss`` per term, KL per image). The networks'
    stages and the bridges run in their own dtype, under the caller's autocast; the teacher's
    in eval mode with detached parameters (the gradient flows through them), the student's on
    scratch copies of their buffers. The terms are computed in float32 (float64 for float64
    logits) with autocast off and returned so. :class:`FCFDLoss` builds the bridges and samples
    the paths; this function is what it computes.

    Args:
        student: the ``K`` student stage outputs of this batch, the last the logits.
        teacher: the ``K`` teacher stage outputs (detached inside), the last the logits.
        student_stages: the ``K`` student stage modules (stage ``k`` maps ``S_{k-1}`` to ``S_k``).
        teacher_stages: the ``K`` teacher stage modules.
        s2t: ``K - 1`` bridges, ``s2t[k-1]`` carrying ``S_k`` onto ``T_k``'s layout.
        t2s: ``None`` (no ``t2s`` paths) or ``K - 1`` bridges or ``None`` entries, ``t2s[k-1]``
            carrying ``T_k`` onto ``S_k``'s layout.
        paths: the mixed paths, ``"s2t@k"`` / ``"t2s@k"``; ``None``: crossings ``1..K-2``
            (``1`` when ``K = 2``) in each direction that has the bridge.
        temperature: ``T`` of the KL terms.
        weights: ``{"kl": 1.0, "mse": 5.0}`` by default; terms not named keep their default.
        warmup: the factor on the ``mse`` term (FCFD's linear warm-up).
        pool: ``None`` or a callable ``(x) -> (B, D)`` for the pooled terms of the last features
            (e.g. ``functools.partial(featkd.pool, mode="gap")``).
        reduction: ``"mean"`` or ``"sum"`` over the batch, or ``"none"`` (one value per image).
        labels: accepted for the common call and unused.

    Shape:
        - student: ``K`` tensors ``(B, ...)``, the last ``(B, num_classes)``
        - teacher: ``K`` tensors ``(B, ...)``, the last ``(B, num_classes)``
        - output: scalar, or ``(B,)`` with ``reduction="none"``

    Example:
        >>> from featkd.fcfd.bridges import FeatureSpec, build_bridge
        >>> head = lambda c: nn.Sequential(nn.Flatten(), nn.Linear(c * 16, 3))
        >>> s_stages = [nn.Conv2d(3, 4, 3, padding=1), head(4)]
        >>> t_stages = [nn.Conv2d(3, 6, 3, padding=1), head(6)]
        >>> s_map, t_map = FeatureSpec("map", 4, (4, 4)), FeatureSpec("map", 6, (4, 4))
        >>> s2t, t2s = [build_bridge(s_map, t_map)], [build_bridge(t_map, s_map)]
        >>> x = torch.randn(2, 3, 4, 4)
        >>> s1, t1 = s_stages[0](x), t_stages[0](x)
        >>> student, teacher = [s1, s_stages[1](s1)], [t1, t_stages[1](t1)]
        >>> nets = dict(student_stages=s_stages, teacher_stages=t_stages, s2t=s2t, t2s=t2s)
        >>> fcfd_loss(student, teacher, **nets).shape
        torch.Size([])
        >>> fcfd_loss(student, teacher, **nets, paths=["s2t@1"], reduction="none").shape
        torch.Size([2])
    """
    student_stages, teacher_stages = check_stage_pair(student_stages, teacher_stages)
    count = len(student_stages)
    s2t = check_bridges(s2t, "s2t", count, optional=False)
    t2s = check_bridges(t2s, "t2s", count, optional=True)
    checked_paths = check_paths(paths, count, t2s)
    temperature = check_positive(temperature, "temperature")
    weights = fcfd_weights(weights, "fcfd_loss")
    warmup = check_number(warmup, "warmup", minimum=0.0)
    pool = check_pool_callable(pool)
    reduction = check_reduction(reduction)
    bridge_param = next((p for b in s2t for p in b.parameters()), None)
    check_stage_outputs(student, teacher, count, bridge_param)
    loss, _ = _fcfd_unchecked(
        student,
        teacher,
        student_stages,
        teacher_stages,
        s2t,
        t2s,
        checked_paths,
        pool,
        temperature,
        weights,
        warmup,
        reduction,
    )
    return loss

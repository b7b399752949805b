"""KD2M: one front door to every distribution-matching loss, named by a metric string."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from featkd._checks import ChoiceError
from featkd._loss import DistillationLoss
from featkd._options import check_choice
from featkd.kd2m._base import MatchingLoss
from featkd.kd2m.gaussian_kl import GaussianKLLoss
from featkd.kd2m.gaussian_wasserstein import GaussianWassersteinLoss
from featkd.kd2m.mmd import MMDLoss
from featkd.kd2m.wasserstein import WassersteinLoss

__all__ = ["METRICS", "KD2MLoss", "kd2m_loss"]

# metric -> (loss class, the options the metric name fixes)
_REGISTRY: dict[str, tuple[type[MatchingLoss], dict[str, Any]]] = {
    "w2_emd": (WassersteinLoss, {"solver": "emd"}),
    "w2_sinkhorn": (WassersteinLoss, {"solver": "sinkhorn"}),
    "w2_sliced": (WassersteinLoss, {"solver": "sliced"}),
    "w2_gaussian": (GaussianWassersteinLoss, {"covariance": "full"}),
    "w2_gaussian_diag": (GaussianWassersteinLoss, {"covariance": "diag"}),
    "kl_gaussian": (GaussianKLLoss, {"covariance": "full"}),
    "kl_gaussian_diag": (GaussianKLLoss, {"covariance": "diag"}),
    "mmd_rbf": (MMDLoss, {"kernel": "rbf"}),
    "mmd_linear": (MMDLoss, {"kernel": "linear"}),
    "mmd_poly": (MMDLoss, {"kernel": "poly"}),
}
METRICS = tuple(_REGISTRY)


def _accepted_options(cls: type[MatchingLoss], fixed: dict[str, Any]) -> list[str]:
    names = inspect.signature(cls.__init__).parameters
    return [n for n in names if n not in ("self", *fixed)]


def _build(metric: str, options: dict[str, Any]) -> MatchingLoss:
    check_choice(metric, "metric", METRICS)
    cls, fixed = _REGISTRY[metric]
    accepted = _accepted_options(cls, fixed)
    for name in options:
        if name not in accepted:
            raise ChoiceError(
                f"{name}: not an option of metric {metric!r} ({cls.__name__}); expected one of "
                + ", ".join(accepted)
            )
    return cls(**fixed, **options)


def kd2m_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    metric: str = "w2_gaussian",
    labels: torch.Tensor | None = None,
    student_logits: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    reduction: str = "mean",
    **options: Any,
) -> torch.Tensor:
    """The KD2M distance ``metric`` between the student and teacher batches (function form).

    Builds the loss of :class:`KD2MLoss` and applies it once; see there for the metrics.
    ``projector=`` is not accepted here (use the module, which owns it). ``student_logits``
    and ``teacher_logits`` are for the joint Wasserstein cost (``label_weight > 0``); every
    KD2M distance is batch-level, so ``reduction`` is ``"mean"`` only.

    Shape:
        - student: ``(B, D)``
        - teacher: ``(B, D)``
        - labels: ``(B,)`` integer, optional
        - output: scalar

    Example:
        >>> s, t = torch.randn(16, 8), torch.randn(16, 8)
        >>> kd2m_loss(s, t, metric="mmd_linear").shape
        torch.Size([])
    """
    if "projector" in options:
        raise ChoiceError(
            "projector: the function form has no owned parameters; use KD2MLoss(metric, "
            "projector=...) and add its parameters to the optimiser"
        )
    loss_fn = _build(metric, {**options, "reduction": reduction})
    logits = _logits(metric, student_logits, teacher_logits)
    return loss_fn(student, teacher, labels=labels, **logits)


def _logits(metric: str, student_logits: Any, teacher_logits: Any) -> dict[str, Any]:
    """The logits keywords actually given; only the Wasserstein metrics take them (and check
    them against ``label_weight``): any other metric reports them rather than ignore them."""
    given = {"student_logits": student_logits, "teacher_logits": teacher_logits}
    given = {name: value for name, value in given.items() if value is not None}
    if given and _REGISTRY[metric][0] is not WassersteinLoss:
        raise ChoiceError(
            f"{next(iter(given))}: only the joint Wasserstein cost uses logits (metric 'w2_emd' "
            f"or 'w2_sinkhorn' with label_weight > 0), got them with metric {metric!r}"
        )
    return given


class KD2MLoss(DistillationLoss):
    """Distribution matching of student and teacher features (KD2M, Montesuma 2025).

    ``loss = task_loss + lambda * KD2MLoss(metric)(student_features, teacher_features)``; the
    official runs use pooled penultimate features and ``lambda = 1e-4`` with squared Euclidean
    costs on 512-d features. Metrics:

    ============================  ==================================================================
    ``"w2_emd"``                  exact ``W_2^2`` (optimal assignment), :class:`WassersteinLoss`
    ``"w2_sinkhorn"``             entropic OT in torch (log domain)
    ``"w2_sliced"``               sliced Wasserstein (random 1-D projections)
    ``"w2_gaussian"``             squared Bures-Wasserstein, :class:`GaussianWassersteinLoss`
    ``"w2_gaussian_diag"``        its diagonal-covariance form (the official code's)
    ``"kl_gaussian"``             Gaussian KL with shrunk full covariances, :class:`GaussianKLLoss`
    ``"kl_gaussian_diag"``        Gaussian KL with diagonal covariances
    ``"mmd_rbf"``                 MMD with a Gaussian kernel, :class:`MMDLoss`
    ``"mmd_linear"``              MMD with a linear kernel (squared distance of the means)
    ``"mmd_poly"``                MMD with the polynomial kernel of NST
    ============================  ==================================================================

    Label-aware variants: ``conditional=True`` (every metric) averages the distance over the
    classes in ``labels`` (``class_reduction="sum"``: sums it, as the official code);
    ``label_weight=beta`` (``w2_emd``, ``w2_sinkhorn``) uses the joint feature-label cost (see
    :class:`JointWassersteinLoss`). The official code's computations are options too:
    ``KD2MLoss("w2_emd")`` is its default metric; see docs/kd2m.md, "Differences from the
    official code". Other options go to the underlying
    loss (an unknown one raises an error listing the accepted ones).

    Note:
        With a ``projector`` (for example ``torch.nn.Linear(D_s, D_t)`` when the widths
        differ) the module owns parameters: add ``loss_fn.parameters()`` to the optimiser.

    Args:
        metric: one of the names above.
        projector: optional module applied to the student first (owned and trained).
        **options: options of the underlying loss (``conditional``, ``label_weight``, ``reg``,
            ``ridge``, ``bandwidth``, ...).

    Shape:
        - student: ``(B, D_s)`` (``(B, D)`` without a projector)
        - teacher: ``(B, D)``
        - labels: ``(B,)`` integer, optional
        - output: scalar

    Example:
        >>> loss_fn = KD2MLoss("w2_gaussian", conditional=True)
        >>> s, t = torch.randn(32, 16, requires_grad=True), torch.randn(32, 16)
        >>> loss_fn(s, t, labels=torch.randint(0, 4, (32,))).backward()
        >>> loss_fn.loss
        GaussianWassersteinLoss(covariance='full', conditional=True)
    """

    def __init__(
        self,
        metric: str = "w2_gaussian",
        *,
        projector: torch.nn.Module | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.metric = metric
        self.loss = _build(metric, {**options, "projector": projector})

    @property
    def last_parts(self) -> dict[str, torch.Tensor]:
        """The detached parts of the last call (those of the underlying loss)."""
        return self.loss.last_parts

    @last_parts.setter
    def last_parts(self, value: dict[str, torch.Tensor]) -> None:
        pass  # the base class's initial {}: the underlying loss holds the parts

    @property
    def projector(self) -> torch.nn.Module | None:
        """The owned projector of the student, if any."""
        return self.loss.projector

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        student_logits: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The chosen distance between the (projected) student and the teacher batches.

        Args:
            student: student features.
            teacher: teacher features (detached inside).
            labels: class indices (conditional or joint variants; ignored otherwise).
            student_logits: the student's logits ``(B, K)``, for the joint Wasserstein cost.
            teacher_logits: the teacher's logits ``(B, K)``, for the joint Wasserstein cost.
        """
        logits = _logits(self.metric, student_logits, teacher_logits)
        return self.loss(student, teacher, labels=labels, **logits)

    def extra_repr(self) -> str:
        return f"metric={self.metric!r}"

"""The VkD loss as a module owning its orthogonal projector (and whitening)."""

from __future__ import annotations

import torch

from featkd._checks import ChoiceError
from featkd._loss import DistillationLoss, Terms, check_reduction
from featkd._options import check_positive, keyword_widths, renamed
from featkd.vkd.function import (
    _EPS,
    _check_inputs,
    _check_options,
    _vkd_terms,
    _whitening_eps,
)
from featkd.vkd.normalize import Whitening
from featkd.vkd.projector import OrthogonalProjector

__all__ = ["VkDLoss"]


class VkDLoss(DistillationLoss):
    """VkD: orthogonal projection of the student into the teacher's width + normalised teacher;
    see :func:`vkd_loss`.

    ``distance(P pool(student), normalize(sg(pool(teacher))))`` where ``P`` (``D_t x D_s``,
    orthonormal columns) is an owned :class:`OrthogonalProjector` (``map="matrix_exp"`` by
    default: the first ``D_s`` columns of ``expm(A)``, ``A`` skew-symmetric, starting at the
    identity columns). Defaults follow the official code: smooth-L1 distance (the paper writes
    MSE: ``distance="mse"``), layer-normalised teacher for classification. ``"whitening"``
    uses an owned :class:`Whitening` (Cholesky, batch statistics in training, running
    statistics in eval), ``"batch_standardize"`` standardises both sides over the batch.

    Note:
        Owns parameters: add ``loss_fn.parameters()`` to the optimiser, or the projection
        silently stays at its initial value.

    Args:
        student_dim: ``D_s`` (keyword-only; positional widths still work for one release, with
            a ``FutureWarning``).
        teacher_dim: ``D_t`` (``>= D_s``).
        normalize: ``"layer_norm"``, ``"batch_standardize"``, ``"whitening"`` or ``"none"``.
        distance: ``"smooth_l1"`` or ``"mse"``.
        map: ``"matrix_exp"``, ``"cayley"`` or ``"householder"`` (see :class:`OrthogonalProjector`).
        init: where the projector starts: ``"identity"`` (default, the first ``D_s`` identity
            columns: the projection starts as zero-padding), ``"random_frame"`` (a uniformly
            random orthonormal frame, as the official code: torch's trivialisation with a
            random base) or ``"random"`` (a random generator: a frame about one radian from
            the identity columns); see :class:`OrthogonalProjector`.
        seed: the randomness of the random inits: ``None`` (torch's global generator), an
            integer seed or a ``torch.Generator``.
        student_pool: pooling mode for student tokens or maps (``"patch_mean"``: CLS excluded).
        teacher_pool: pooling mode for teacher maps or tokens (``"gap"`` for CNN maps; use
            ``"mean"``, ``"cls"`` or ``"patch_mean"`` for a token teacher).
        num_prefix_tokens: leading non-patch tokens of token inputs.
        eps: layer norm / standardisation epsilon, > 0.
        shrinkage: ``normalize="whitening"`` only: the whitening's shrinkage relative to the
            average variance, > 0; default 1e-5. (featkd 0.1 took it as ``eps``; that still
            works for one release, with a ``FutureWarning``.)
        reduction: ``"mean"`` or ``"sum"`` over the batch, or ``"none"`` (one value per
            sample). With ``"batch_standardize"``, or ``"whitening"`` in training mode, the
            per-sample values depend on the whole batch through its statistics (see
            :func:`vkd_loss`).
        device: where the projector (and the whitening's statistics) live.
        dtype: dtype of the projector's parameter.

    Every option is checked when the loss is built (:class:`~featkd.ChoiceError` naming it):
    an ``eps`` that is not a finite number > 0, a pool mode :func:`featkd.pool` does not know
    (or ``"cls"`` with ``num_prefix_tokens=0``), widths that are not positive ints.

    Shape:
        - student: ``(B, D_s)``, ``(B, N, D_s)`` or ``(B, D_s, H, W)``
        - teacher: ``(B, D_t)``, ``(B, N, D_t)`` or ``(B, D_t, H, W)``
        - labels: ignored
        - output: scalar, or ``(B,)`` with ``reduction="none"``

    ``last_parts``: ``"total"`` and ``"vkd"`` (equal: one term).

    Example:
        >>> loss_fn = VkDLoss(student_dim=32, teacher_dim=64)
        >>> student = torch.randn(8, 17, 32, requires_grad=True)   # CLS + 16 patches
        >>> teacher = torch.randn(8, 64, 7, 7)                     # CNN map
        >>> loss = loss_fn(student, teacher)
        >>> loss.backward()
        >>> loss_fn.projector.generator.grad is not None
        True
        >>> list(loss_fn.last_parts)
        ['total', 'vkd']
    """

    def __init__(
        self,
        *args: int,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
        normalize: str = "layer_norm",
        distance: str = "smooth_l1",
        map: str = "matrix_exp",
        init: str = "identity",
        seed: int | torch.Generator | None = None,
        student_pool: str = "patch_mean",
        teacher_pool: str = "gap",
        num_prefix_tokens: int = 1,
        eps: float = _EPS,
        shrinkage: float | None = None,
        reduction: str = "mean",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        student_dim, teacher_dim = keyword_widths(
            "VkDLoss", args, ("student_dim", "teacher_dim"), student_dim, teacher_dim
        )
        eps = _check_options(
            normalize, distance, student_pool, teacher_pool, num_prefix_tokens, eps, shrinkage
        )
        old_eps = _whitening_eps(normalize, eps)
        shrinkage = renamed("VkDLoss", "eps", "shrinkage", old_eps, shrinkage, _EPS)
        shrinkage = check_positive(shrinkage, "shrinkage" if old_eps is None else "eps")
        self.reduction = check_reduction(reduction)
        if teacher_dim < student_dim:
            raise ChoiceError(
                f"teacher_dim: expected >= student_dim={student_dim} (VkD projects the student "
                f"up into the teacher's width), got {teacher_dim}"
            )
        self.projector = OrthogonalProjector(
            student_dim, teacher_dim, map=map, init=init, seed=seed, device=device, dtype=dtype
        )
        self.whitening = (
            Whitening(teacher_dim, shrinkage=shrinkage, device=device)
            if normalize == "whitening"
            else None
        )
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.normalize, self.distance = normalize, distance
        self.student_pool, self.teacher_pool = student_pool, teacher_pool
        self.num_prefix_tokens, self.eps = num_prefix_tokens, eps

    def _check(self, student, teacher, labels) -> None:
        _check_inputs(
            student,
            teacher,
            student_pool=self.student_pool,
            teacher_pool=self.teacher_pool,
            num_prefix_tokens=self.num_prefix_tokens,
            normalize=self.normalize,
            whitening=self.whitening,
            projection=("projector", self.projector.generator),
            student_dim=self.student_dim,
            teacher_dim=self.teacher_dim,
        )

    def _terms(self, student, teacher, labels) -> Terms:
        return _vkd_terms(
            student,
            teacher,
            self.projector.weight,
            normalize=self.normalize,
            distance=self.distance,
            student_pool=self.student_pool,
            teacher_pool=self.teacher_pool,
            num_prefix_tokens=self.num_prefix_tokens,
            eps=self.eps,
            shrinkage=_EPS,  # unused: the owned whitening has its own
            whitening=self.whitening,
            per_sample=self.reduction != "mean",
        )

    def extra_repr(self) -> str:
        return (
            f"student_dim={self.student_dim}, teacher_dim={self.teacher_dim}, "
            f"normalize={self.normalize!r}, distance={self.distance!r}, "
            f"init={self.projector.init!r}, "
            f"student_pool={self.student_pool!r}, teacher_pool={self.teacher_pool!r}, "
            f"reduction={self.reduction!r}"
        )

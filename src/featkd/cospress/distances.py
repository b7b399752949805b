"""The two distances CosPress is made of, as functions: :func:`neighbourhood_kl` (the head's
loss) and :func:`flat_cosine_loss` (the student's)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from featkd._checks import ShapeError, check_same_device, describe_shape, validate_features
from featkd._loss import Terms, check_reduction, evaluate
from featkd._options import check_choice, check_int
from featkd.cospress._cosine import flat_cosine_distance
from featkd.cospress._neighbourhood import (
    DEFAULT_CHUNK_ELEMENTS,
    DEFAULT_TEMPERATURES,
    KL_STYLES,
    check_temperatures,
    neighbourhood_kl_per_set,
)

__all__ = ["flat_cosine_loss", "neighbourhood_kl"]

_SETS = {2: "(M, D)", 3: "(S, M, D)"}
_FEATURES = {2: "(B, D)", 3: "(B, N, D)"}


def _kl_terms(
    candidate: torch.Tensor,
    reference: torch.Tensor,
    temperatures: tuple[float, ...],
    style: str,
    chunk_elements: int,
) -> Terms:
    """Unchecked core of :func:`neighbourhood_kl`: one KL per set, a scalar for one set
    ``(M, D)``."""
    if reference.ndim == 2:
        kl = neighbourhood_kl_per_set(
            reference[None], candidate[None], temperatures, style, chunk_elements
        )[0]
    else:
        kl = neighbourhood_kl_per_set(reference, candidate, temperatures, style, chunk_elements)
    return Terms({"kl": kl})


def _cosine_terms(student: torch.Tensor, target: torch.Tensor) -> Terms:
    """Unchecked core of :func:`flat_cosine_loss`: one ``1 - cos`` per sample."""
    return Terms({"cosine": flat_cosine_distance(student, target)})


def neighbourhood_kl(
    reference: torch.Tensor,
    candidate: torch.Tensor,
    *,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    style: str = "full",
    reduction: str = "mean",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """KL between the cosine-similarity neighbourhoods of ``reference`` and ``candidate``.

    The CosPress head loss for one or several sets of vectors. Within each set, with
    ``D = n(X) n(X)^T`` and the diagonal lowered by ``1e8``: ``p_{j|i} = softmax_j(D_ij / tau)``
    for the reference, ``q_{j|i}`` for the candidate, ``P_ij = (p_{j|i} + p_{i|j}) / 2M``
    (log space), and ``KL(P || Q)`` averaged over the temperatures. ``style="half"`` uses the
    mean over rows ``i`` of ``KL(p_{.|i} || q_{.|i})`` instead. The widths of the two sides may
    differ: only their similarity structures are compared.

    The reference is the target and receives no gradient. Computed in float32 (float64 for
    float64 inputs) with autocast off, chunked over the (set, temperature) items so no working
    tensor exceeds ``chunk_elements`` elements; returned in float32 (float64 for float64 input).

    A zero vector has cosine 0 with every vector. The candidate's gradient is exact, except for
    a vector shorter than a quarter of the median non-zero norm of its set: the cosine's
    gradient grows as ``1 / ||x||``, so such a vector gets its gradient's direction at the size
    it has at that length. A dead (all-zero) vector's gradient is thus finite and about the size
    of the others'.

    Args:
        reference: the target vectors (the teacher).
        candidate: the vectors whose neighbourhoods should match (the compressed teacher).
        temperatures: softmax temperatures to average over (CosPress: 0.01, 0.02, ..., 0.10),
            each in ``[1e-6, 1e6]``.
        style: ``"full"`` (symmetrised joint distribution, the default of the official code)
            or ``"half"`` (row-wise conditional KL).
        reduction: ``"mean"`` or ``"sum"`` over the sets, or ``"none"`` for one value per set.
        chunk_elements: memory bound on each ``(k, M, M)`` working tensor.

    Shape:
        - reference: ``(M, D_r)`` or ``(S, M, D_r)``, ``M >= 2``
        - candidate: ``(M, D_c)`` or ``(S, M, D_c)``
        - output: scalar, or ``(S,)`` with ``reduction="none"`` (a scalar for 2-D inputs: one
          set)

    Example:
        >>> teacher = torch.randn(4, 17, 64)                   # 4 images, 17 tokens each
        >>> compressed = teacher @ torch.randn(64, 16)
        >>> neighbourhood_kl(teacher, compressed, reduction="none").shape
        torch.Size([4])
        >>> float(neighbourhood_kl(teacher, teacher))
        0.0
    """
    validate_features(reference, "reference", _SETS)
    validate_features(candidate, "candidate", _SETS)
    if candidate.shape[:-1] != reference.shape[:-1]:
        layout = _SETS[reference.ndim].replace("D)", "D_c)")
        expected = describe_shape(reference.shape[:-1]).rstrip(")").rstrip(",")
        raise ShapeError(
            f"candidate: expected {layout} = {expected}, D_c) to match reference "
            f"{describe_shape(reference.shape)}, got {describe_shape(candidate.shape)}"
        )
    check_same_device({"reference": reference, "candidate": candidate})
    if reference.shape[-2] < 2:
        raise ShapeError(
            f"reference: expected at least 2 vectors per set (M >= 2) to form neighbourhoods, "
            f"got {describe_shape(reference.shape)}"
        )
    check_choice(style, "style", KL_STYLES)
    reduction = check_reduction(reduction)
    temps = check_temperatures(temperatures)
    chunk_elements = check_int(chunk_elements, "chunk_elements", 1)
    loss, _ = evaluate(
        _kl_terms, candidate, reference, temps, style, chunk_elements, reduction=reduction
    )
    return loss


def flat_cosine_loss(
    student: torch.Tensor, target: torch.Tensor, *, reduction: str = "mean"
) -> torch.Tensor:
    """``mean_b (1 - cos(vec(student_b), vec(target_b)))``: one cosine per sample.

    ``vec`` flattens everything after the batch axis, so for tokens ``(B, N, D)`` this is one
    cosine between two ``N*D`` vectors per image (not a mean of per-token cosines): the
    student must reproduce the relative norms of its tokens as well as their directions. The
    CosPress student loss, with ``target = h(teacher)``. The target receives no gradient.
    Computed in float32 (float64 for float64 inputs) with autocast off; returned in float32
    (float64 for float64 inputs).

    A zero vector has cosine 0. The student's gradient is exact, except for a sample shorter
    than a quarter of the median non-zero norm of the batch's samples (of the targets', when
    every student sample is zero): it gets its gradient's direction at the size it has at that
    length, so a dead (all-zero) sample's gradient is finite and about the size of the others'.

    Args:
        student: the features that learn.
        target: what they should point like (detached inside).
        reduction: ``"mean"`` or ``"sum"`` over the batch, or ``"none"`` (one value per sample).

    Shape:
        - student: ``(B, D)`` or ``(B, N, D)``
        - target: the same shape as ``student``
        - output: scalar, or ``(B,)`` with ``reduction="none"``

    Example:
        >>> s = torch.randn(8, 5, 16)
        >>> flat_cosine_loss(s, torch.randn(8, 5, 16)).shape
        torch.Size([])
        >>> flat_cosine_loss(s, torch.randn(8, 5, 16), reduction="none").shape
        torch.Size([8])
        >>> same, opposite = flat_cosine_loss(s, 3 * s), flat_cosine_loss(s, -s)
        >>> abs(float(same)) < 1e-6, abs(float(opposite) - 2) < 1e-6
        (True, True)
    """
    validate_features(student, "student", _FEATURES)
    validate_features(target, "target", _FEATURES)
    if target.shape != student.shape:
        raise ShapeError(
            f"target: expected the shape of student {describe_shape(student.shape)}, "
            f"got {describe_shape(target.shape)}"
        )
    check_same_device({"student": student, "target": target})
    reduction = check_reduction(reduction)
    loss, _ = evaluate(_cosine_terms, student, target, reduction=reduction)
    return loss

"""Diagnostics: is a projection orthogonal, is a similarity structure preserved, how alike are
two representations. All computed in float64, outside autograd unless stated."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from featkd._checks import (
    ShapeError,
    check_floating,
    check_rank,
    check_same_batch,
    check_same_device,
)

__all__ = ["CosinePreservation", "cosine_preservation", "linear_cka", "orthogonality_error"]


def orthogonality_error(weight: torch.Tensor) -> torch.Tensor:
    """Largest entry of ``|W^T W - I|`` for a tall ``W`` (``|W W^T - I|`` for a wide one).

    A matrix with orthonormal columns (rows, if wide) gives 0; computed in float64.

    Shape:
        - weight: ``(m, n)``
        - output: scalar

    Example:
        >>> q, _ = torch.linalg.qr(torch.randn(10, 4, dtype=torch.float64))
        >>> bool(orthogonality_error(q) < 1e-12)
        True
    """
    check_rank(weight, "weight", {2: "(m, n)"})
    check_floating(weight, "weight")
    w = weight.detach().to(torch.float64)
    if w.shape[0] < w.shape[1]:
        w = w.T
    gram = w.T @ w
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return (gram - eye).abs().max()


class CosinePreservation(NamedTuple):
    """How well one set of pairwise cosine similarities reproduces another."""

    pearson: float
    spearman: float
    mae: float


def _pairwise_cosines(x: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(x.to(torch.float64), dim=1)
    sims = unit @ unit.T
    i, j = torch.triu_indices(x.shape[0], x.shape[0], offset=1, device=x.device)
    return sims[i, j]


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 with ties given the mean of their positions (as scipy's rankdata)."""
    sorted_x, order = torch.sort(x)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    mean_rank = starts.to(torch.float64) + (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = mean_rank[inverse]
    return ranks


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    xc, yc = x - x.mean(), y - y.mean()
    denom = xc.norm() * yc.norm()
    if float(denom) == 0.0:
        return float("nan")
    return float((xc @ yc) / denom)


def cosine_preservation(reference: torch.Tensor, candidate: torch.Tensor) -> CosinePreservation:
    """Compare the pairwise cosine similarities of ``candidate`` with those of ``reference``.

    Over all pairs ``i < j`` of samples: Pearson and Spearman correlation between
    ``cos(reference_i, reference_j)`` and ``cos(candidate_i, candidate_j)``, and their mean
    absolute difference. Widths may differ (teacher vs student); the samples must correspond.
    Correlations are NaN when one side's similarities are all equal.

    Shape:
        - reference: ``(B, D_a)``
        - candidate: ``(B, D_b)``, ``B >= 3``

    Example:
        >>> t = torch.randn(50, 32)
        >>> r = cosine_preservation(t, t @ torch.linalg.qr(torch.randn(32, 32))[0])
        >>> round(r.pearson, 6), round(r.spearman, 6), r.mae < 1e-6
        (1.0, 1.0, True)
    """
    for name, x in (("reference", reference), ("candidate", candidate)):
        check_rank(x, name, {2: "(B, D)"})
        check_floating(x, name)
    check_same_batch(reference, candidate, "reference", "candidate")
    check_same_device({"reference": reference, "candidate": candidate})
    if reference.shape[0] < 3:
        raise ShapeError(
            f"candidate: expected at least 3 samples for a correlation over pairs, "
            f"got {reference.shape[0]}"
        )
    with torch.no_grad():
        a = _pairwise_cosines(reference)
        b = _pairwise_cosines(candidate)
        return CosinePreservation(
            pearson=_pearson(a, b),
            spearman=_pearson(_average_ranks(a), _average_ranks(b)),
            mae=float((a - b).abs().mean()),
        )


def linear_cka(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Linear centred kernel alignment (Kornblith et al., 2019) between two representations.

    ``||B_c^T A_c||_F^2 / (||A_c^T A_c||_F ||B_c^T B_c||_F)`` with column-centred ``A_c, B_c``;
    1 for representations equal up to rotation and isotropic scale, 0 for unrelated ones.
    Differentiable; computed in float64 and returned in the dtype of ``a``.

    Shape:
        - a: ``(B, D_a)``
        - b: ``(B, D_b)``
        - output: scalar

    Example:
        >>> x = torch.randn(64, 16)
        >>> float(linear_cka(x, 3 * x))
        1.0
    """
    for name, x in (("a", a), ("b", b)):
        check_rank(x, name, {2: "(B, D)"})
        check_floating(x, name)
    check_same_batch(a, b, "a", "b")
    check_same_device({"a": a, "b": b})
    x = a.to(torch.float64)
    y = b.to(torch.float64)
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    norm = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return (cross / norm).to(a.dtype)

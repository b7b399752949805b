"""Independent float64 references for the CosPress tests: probability space, explicit loops over
temperatures and rows, written from METHODS.md section 2."""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import logsumexp

from featkd import TeacherCompressionHead


def ref_cosines(x: np.ndarray) -> np.ndarray:
    """A zero vector has cosine 0 with everything."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    return unit @ unit.T


def ref_conditionals(x: np.ndarray, tau: float) -> np.ndarray:
    """Row i: p_{j|i} = softmax_j over the cosines of x_i, its own entry lowered by 1e8."""
    sims = ref_cosines(x)
    m = len(x)
    cond = np.zeros((m, m))
    for i in range(m):
        logits = sims[i].copy()
        logits[i] -= 1e8
        logits = logits / tau
        cond[i] = np.exp(logits - logsumexp(logits))
    return cond


def ref_kl(p: np.ndarray, q: np.ndarray) -> float:
    """sum p log(p / q) over the support of p (0 log 0 = 0)."""
    support = p > 0
    return float(np.sum(p[support] * np.log(p[support] / q[support])))


def ref_neighbourhood_kl(reference, candidate, temperatures, style="full") -> float:
    m = len(reference)
    values = []
    for tau in temperatures:
        p = ref_conditionals(reference, tau)
        q = ref_conditionals(candidate, tau)
        if style == "full":
            joint_p = np.zeros((m, m))
            joint_q = np.zeros((m, m))
            for i in range(m):
                for j in range(m):
                    joint_p[i, j] = (p[i, j] + p[j, i]) / (2 * m)
                    joint_q[i, j] = (q[i, j] + q[j, i]) / (2 * m)
            values.append(ref_kl(joint_p, joint_q))
        else:
            values.append(np.mean([ref_kl(p[i], q[i]) for i in range(m)]))
    return float(np.mean(values))


def ref_one_minus_cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    return 1.0 - float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def ref_head(x: np.ndarray, head: TeacherCompressionHead) -> np.ndarray:
    gamma, beta = (p.detach().double().cpu().numpy() for p in (head.norm.weight, head.norm.bias))
    w, b = (p.detach().double().cpu().numpy() for p in (head.linear.weight, head.linear.bias))
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return ((x - mean) / np.sqrt(var + 1e-5) * gamma + beta) @ w.T + b


def ref_cospress(student, teacher, head, temperatures, style, weights, num_prefix_tokens=1):
    """The four terms and the weighted total, written from METHODS.md."""
    compressed = ref_head(teacher, head)
    parts = {}
    if teacher.ndim == 3:
        cls = (lambda x: x[:, 0]) if num_prefix_tokens >= 1 else (lambda x: x.mean(1))
        parts["local"] = np.mean(
            [
                ref_neighbourhood_kl(teacher[b], compressed[b], temperatures, style)
                for b in range(len(teacher))
            ]
        )
        parts["tokens"] = np.mean(
            [ref_one_minus_cos(student[b], compressed[b]) for b in range(len(student))]
        )
    else:
        cls = lambda x: x  # noqa: E731
    t_cls, c_cls, s_cls = cls(teacher), cls(compressed), cls(student)
    parts["global"] = ref_neighbourhood_kl(t_cls, c_cls, temperatures, style)
    parts["cls"] = np.mean([ref_one_minus_cos(s_cls[b], c_cls[b]) for b in range(len(s_cls))])
    total = sum(weights.get(n, 1.0) * value for n, value in parts.items())
    return parts, total


def numpy64(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().cpu().numpy()

"""Independent references for the loss tests, in one place.

Each function computes an expected value the tests compare featkd against, in float64 numpy /
scipy (POT for optimal transport, mpmath where float64 itself is not enough; a few small
structural references loop over torch entries), and its docstring names its source: the paper and
equation, the section of ``../shared/METHODS.md`` it transcribes, or the scipy / POT function it
calls. None of them imports featkd: a reference that ran the library's code would check the
library against itself. (FCFD's reference, ``reference_parts`` in ``test_fcfd.py``, runs the
networks' own modules and stays there.)

Sections: conversions; KD; heads; VkD (METHODS.md section 1) with its normalisations and its
Stiefel / Householder maps; CosPress and Proteus (section 2); KD2M (section 4): Gaussian KL,
Gaussian (Bures) Wasserstein, MMD, OT; diagnostics.
"""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import scipy.linalg
import torch
from scipy.special import logsumexp

# ---------------------------------------------------------------- conversions


def numpy64(x: torch.Tensor) -> np.ndarray:
    """A tensor as a float64 numpy array on the CPU (detached)."""
    return x.detach().double().cpu().numpy()


def ref_softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax, shifted by the row maximum (the textbook stable form)."""
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def ref_uniform(n: int) -> np.ndarray:
    """The uniform weights ``1/n`` of a mini-batch (METHODS.md section 4, KD2M)."""
    return np.full(n, 1.0 / n)


# ---------------------------------------------------------------- KD


def ref_kd(s, t, temperature):
    """Hinton et al., "Distilling the Knowledge in a Neural Network" (2015), section 2:
    ``T^2 KL(softmax(t / T) || softmax(s / T))``, batch mean, written with explicit loops."""

    def softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    p, q = softmax(t / temperature), softmax(s / temperature)
    total = 0.0
    for b in range(len(s)):
        total += sum(p[b, k] * (np.log(p[b, k]) - np.log(q[b, k])) for k in range(s.shape[1]))
    return total / len(s) * temperature**2


# ---------------------------------------------------------------- heads (METHODS.md section 2)


def ref_head(x: np.ndarray, head) -> np.ndarray:
    """METHODS.md section 2, the teacher head ``LayerNorm(d_t) -> Linear(d_t, d_s, bias=True)``
    (torch.nn.LayerNorm's definition: biased variance, eps 1e-5, affine), in float64 numpy.

    ``head`` is any module with ``norm.weight``, ``norm.bias``, ``linear.weight`` and
    ``linear.bias``: only its parameters are read (LinearHead, TeacherCompressionHead, Proteus's
    student heads)."""
    gamma = numpy64(head.norm.weight)
    beta = numpy64(head.norm.bias)
    weight = numpy64(head.linear.weight)
    bias = numpy64(head.linear.bias)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    normed = (x - mean) / np.sqrt(var + 1e-5) * gamma + beta
    return normed @ weight.T + bias


# ---------------------------------------------------------------- VkD (METHODS.md section 1)


def ref_smooth_l1(a, b):
    """torch.nn.SmoothL1Loss's definition with beta 1, mean reduction (METHODS.md section 1)."""
    d = np.abs(a - b)
    return np.where(d < 1.0, 0.5 * d**2, d - 0.5).mean()


def ref_layer_norm(t, eps=1e-5):
    """METHODS.md section 1: ``layer_norm(T)`` across channels, no affine, eps 1e-5."""
    return (t - t.mean(1, keepdims=True)) / np.sqrt(t.var(1, keepdims=True) + eps)


def ref_vkd(student_tokens, teacher_map, projection, distance="smooth_l1"):
    """The formula of METHODS.md section 1, written out with explicit loops."""
    b, _, d_s = student_tokens.shape
    s = np.zeros((b, d_s))
    for i in range(b):
        s[i] = student_tokens[i, 1:].mean(0)  # patch tokens only
    t = teacher_map.mean(axis=(2, 3))  # global average pool
    projected = s @ projection.T
    target = ref_layer_norm(t)
    if distance == "mse":
        return ((projected - target) ** 2).mean()
    return ref_smooth_l1(projected, target)


def ref_cholesky_whitening(x, shrinkage):
    """METHODS.md section 1, Cholesky whitening ``(T - mu) L^{-T}`` with ``cov + eps I = L L^T``,
    the shrinkage ``eps = shrinkage * tr(cov) / d``; numpy's cholesky and solve."""
    mu = x.mean(0)
    xc = x - mu
    cov = xc.T @ xc / len(x)
    shrink = shrinkage * np.trace(cov) / len(cov)
    lower = np.linalg.cholesky(cov + shrink * np.eye(len(cov)))
    # (x - mu) L^{-T}: solve L z^T = xc^T
    return np.linalg.solve(lower, xc.T).T


def ref_stiefel_generator(generator: torch.Tensor) -> torch.Tensor:
    """The skew-symmetric ``A = [[S, -B^T], [B, 0]]`` of METHODS.md section 1 (only the first
    ``k`` columns of ``expm(A)`` are needed, so ``A`` is zero outside them), from an ``(n, k)``
    generator whose strictly lower part holds ``S`` and ``B``: written entry by entry."""
    n, k = generator.shape
    a = torch.zeros(n, n, dtype=generator.dtype)
    for i in range(k):
        for j in range(i):
            a[i, j] = generator[i, j]
            a[j, i] = -generator[i, j]
    for i in range(k, n):
        for j in range(k):
            a[i, j] = generator[i, j]
            a[j, i] = -generator[i, j]
    return a


def ref_householder_columns(generator: torch.Tensor) -> torch.Tensor:
    """The Householder map of METHODS.md section 1 (its note on non-square weights), transcribed
    as the product of reflections one at a time: -H_1 ... H_k E_k with
    H_i = I - 2 v v^T / |v|^2, v = e_i + column i below the diagonal."""
    n, k = generator.shape
    q = torch.eye(n, dtype=generator.dtype)
    for i in range(k):
        v = torch.zeros(n, dtype=generator.dtype)
        v[i] = 1.0
        v[i + 1 :] = generator[i + 1 :, i]
        q = q @ (torch.eye(n, dtype=generator.dtype) - 2.0 * torch.outer(v, v) / (v @ v))
    return -q[:, :k]


# ---------------------------------------------------------------- CosPress (METHODS.md section 2)
# probability space, explicit loops over temperatures and rows


def ref_cosines(x: np.ndarray) -> np.ndarray:
    """METHODS.md section 2, ``D = n(X) n(X)^T``; a zero vector has cosine 0 with everything."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    return unit @ unit.T


def ref_conditionals(x: np.ndarray, tau: float) -> np.ndarray:
    """METHODS.md section 2. Row i: p_{j|i} = softmax_j over the cosines of x_i, its own entry
    lowered by 1e8 (scipy.special.logsumexp for the normaliser)."""
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
    """KL(p || q) = sum p log(p / q) over the support of p (0 log 0 = 0): the definition."""
    support = p > 0
    return float(np.sum(p[support] * np.log(p[support] / q[support])))


def ref_neighbourhood_kl(reference, candidate, temperatures, style="full") -> float:
    """METHODS.md section 2, the head loss of one set of vectors: ``KL(P || Q)`` of the
    symmetrised joints ``P_ij = (p_{j|i} + p_{i|j}) / 2N`` (``style='full'``) or the mean over
    rows of the KL of the conditionals (``'half'``), averaged over the temperatures."""
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
    """METHODS.md section 2, the student loss of one image: ``1 - cos(vec(a), vec(b))`` with all
    tokens flattened into one vector."""
    a, b = a.ravel(), b.ravel()
    return 1.0 - float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def ref_cospress(student, teacher, head, temperatures, style, weights, num_prefix_tokens=1):
    """The four terms and the weighted total, written from METHODS.md section 2."""
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


def ref_mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error, one element at a time (Proteus's terms, METHODS.md section 2)."""
    total, count = 0.0, 0
    for x, y in zip(a.ravel(), b.ravel(), strict=True):
        total += (x - y) ** 2
        count += 1
    return total / count


# ---------------------------------------------------------------- KD2M: Gaussian KL (section 4)


def ref_gaussian_kl(p: np.ndarray, q: np.ndarray, eps: float, diagonal: bool = False) -> float:
    """KL(N_p || N_q) of the fitted Gaussians, transcription of METHODS.md section 4's formula
    ``0.5 [tr(S_q^-1 S_p) + dm^T S_q^-1 dm - d + log det S_q - log det S_p]``: D x D inverses and
    numpy slogdet, float64, covariances shrunk by ``eps I``."""
    width = p.shape[1]
    mean_p, mean_q = p.mean(0), q.mean(0)
    cov_p = np.atleast_2d(np.cov(p.T, bias=True)) + eps * np.eye(width)
    cov_q = np.atleast_2d(np.cov(q.T, bias=True)) + eps * np.eye(width)
    if diagonal:
        cov_p, cov_q = np.diag(np.diag(cov_p)), np.diag(np.diag(cov_q))
    inverse_q = np.linalg.inv(cov_q)
    delta = mean_q - mean_p
    return 0.5 * float(
        np.trace(inverse_q @ cov_p)
        + delta @ inverse_q @ delta
        - width
        + np.linalg.slogdet(cov_q)[1]
        - np.linalg.slogdet(cov_p)[1]
    )


def ref_gaussian_kl_mpmath(p: np.ndarray, q: np.ndarray, eps: float) -> float:
    """KL(N_p || N_q) of the shrunk fitted Gaussians with D x D matrices (the formula of
    METHODS.md section 4), in mpmath at 50 digits: a float64 transcription loses everything when
    S + eps I has condition ~1e15. Skips the test when mpmath is missing."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    batch, width = p.shape

    def moments(x):
        mean = mpmath.matrix(width, 1)
        for j in range(width):
            mean[j] = mpmath.fsum(mpmath.mpf(v) for v in x[:, j]) / batch
        centred = mpmath.matrix(x.tolist()) - mpmath.ones(batch, 1) * mean.T
        return mean, centred.T * centred / batch + mpmath.mpf(eps) * mpmath.eye(width)

    mean_p, cov_p = moments(p)
    mean_q, cov_q = moments(q)
    inverse_q = mpmath.inverse(cov_q)
    delta = mean_q - mean_p
    trace = mpmath.fsum((inverse_q * cov_p)[i, i] for i in range(width))
    mahalanobis = (delta.T * inverse_q * delta)[0, 0]
    logdets = mpmath.log(mpmath.det(cov_q)) - mpmath.log(mpmath.det(cov_p))
    return float((trace + mahalanobis - width + logdets) / 2)


# ---------------------------------------------------------------- KD2M: Gaussian W2 (section 4)


def ref_bures_wasserstein(s: np.ndarray, t: np.ndarray) -> float:
    """Squared Gaussian W2 of the fitted Gaussians, the textbook formula of METHODS.md section 4
    ``||mu_s - mu_t||^2 + tr S_s + tr S_t - 2 tr (S_s^1/2 S_t S_s^1/2)^1/2`` with D x D matrix
    square roots from scipy.linalg.sqrtm, float64."""
    mean_s, mean_t = s.mean(0), t.mean(0)
    cov_s = np.atleast_2d(np.cov(s.T, bias=True))
    cov_t = np.atleast_2d(np.cov(t.T, bias=True))
    root_s = scipy.linalg.sqrtm(cov_s)
    cross = scipy.linalg.sqrtm(root_s @ cov_t @ root_s)
    bures = np.trace(cov_s) + np.trace(cov_t) - 2 * np.trace(cross).real
    return float(np.sum((mean_s - mean_t) ** 2) + bures)


def ref_bures_wasserstein_mpmath(s: np.ndarray, t: np.ndarray) -> float:
    """Squared Bures-Wasserstein distance of the fitted Gaussians (METHODS.md section 4), moments
    and symmetric eigen-decomposition square roots (mpmath.eigsy) at 40 significant digits, so
    rounding-level eigenvalues stay ~1e-20. Skips the test when mpmath is missing."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40

    def psd_sqrt(a):
        values, vectors = mpmath.eigsy(a)
        return vectors * mpmath.diag([mpmath.sqrt(max(v, 0)) for v in values]) * vectors.T

    def moments(x):
        mean = mpmath.matrix(x.shape[1], 1)
        for j in range(x.shape[1]):
            mean[j] = mpmath.fsum(mpmath.mpf(v) for v in x[:, j]) / x.shape[0]
        centred = mpmath.matrix(x.tolist()) - mpmath.ones(x.shape[0], 1) * mean.T
        return mean, centred.T * centred / x.shape[0]

    mean_s, cov_s = moments(s)
    mean_t, cov_t = moments(t)
    root_s = psd_sqrt(cov_s)
    cross = psd_sqrt(root_s * cov_t * root_s)
    width = s.shape[1]
    bures = mpmath.fsum(cov_s[i, i] + cov_t[i, i] - 2 * cross[i, i] for i in range(width))
    return float(mpmath.fsum((mean_s[i] - mean_t[i]) ** 2 for i in range(width)) + bures)


def ref_diag_gaussian_wasserstein(s: np.ndarray, t: np.ndarray) -> float:
    """METHODS.md section 4, the diagonal form ``||mu_s - mu_t||^2 + ||sigma_s - sigma_t||^2``
    (biased standard deviations), numpy."""
    return float(np.sum((s.mean(0) - t.mean(0)) ** 2) + np.sum((s.std(0) - t.std(0)) ** 2))


# ---------------------------------------------------------------- KD2M: MMD (section 4)


def ref_kernel(kernel, sigmas=(), degree=2, coef0=0.0):
    """One kernel evaluation ``k(x, y)`` of METHODS.md section 4: linear ``x.y``, polynomial
    ``(x.y + c)^d`` (Huang & Wang, NST), or the mean over ``sigmas`` of the Gaussian
    ``exp(-||x - y||^2 / 2 sigma^2)``."""
    if kernel == "linear":
        return lambda x, y: float(np.dot(x, y))
    if kernel == "poly":
        return lambda x, y: float((np.dot(x, y) + coef0) ** degree)
    return lambda x, y: float(
        np.mean([math.exp(-np.sum((x - y) ** 2) / (2 * s**2)) for s in sigmas])
    )


def ref_mmd_loops(s, t, k, estimator="biased"):
    """MMD^2 with explicit loops: the V-statistic or the U-statistic of Gretton et al., "A Kernel
    Two-Sample Test" (JMLR 2012), Lemma 6; the cross term is the same in both."""
    n, m = len(s), len(t)
    if estimator == "biased" or n == 1:
        ss = sum(k(s[i], s[j]) for i in range(n) for j in range(n)) / n**2
        tt = sum(k(t[i], t[j]) for i in range(m) for j in range(m)) / m**2
    else:
        ss = sum(k(s[i], s[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        tt = sum(k(t[i], t[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    st = sum(k(s[i], t[j]) for i in range(n) for j in range(m)) / (n * m)
    return ss + tt - 2 * st


def ref_heuristic_sigma(s, t, rule):
    """sigma from the median / mean squared distance over distinct pairs of pooled points
    (METHODS.md section 4, "bandwidth from the mean or median pairwise distance")."""
    pooled = np.concatenate([s, t])
    squared = [
        np.sum((pooled[i] - pooled[j]) ** 2)
        for i in range(len(pooled))
        for j in range(i + 1, len(pooled))
    ]
    # torch.median returns the lower of the two middle values
    value = np.sort(squared)[(len(squared) - 1) // 2] if rule == "median" else np.mean(squared)
    return math.sqrt(value)


def ref_pooled_squared(s, t):
    """Squared distances between distinct points (i < j) of the pooled rows, exactly."""
    pooled = np.concatenate([s, t])
    return np.array(
        [
            np.sum((pooled[i] - pooled[j]) ** 2)
            for i in range(len(pooled))
            for j in range(i + 1, len(pooled))
        ]
    )


def ref_median_sigma_apart(s, t, eps):
    """The median rule as docs/kd2m.md documents it (issue 11): the (lower) median of the pooled
    squared distances above ``sqrt(eps)`` times their mean; sigma = 1 if every distance is 0."""
    squared = ref_pooled_squared(s, t)
    apart = np.sort(squared[squared > math.sqrt(eps) * squared.mean()])
    return math.sqrt(apart[(len(apart) - 1) // 2]) if len(apart) else 1.0


def ref_rbf_mmd_and_gradient(s, t, sigma, estimator):
    """Gaussian-kernel MMD^2 (Gretton et al. 2012, Lemma 6) and its gradient in ``s`` with sigma
    held fixed, written out: d k(x, y) / dx = -k(x, y) (x - y) / sigma^2; ``s_a`` enters the
    ``ss`` block twice."""
    n = len(s)
    k_ss = np.exp(-((s[:, None] - s[None]) ** 2).sum(-1) / (2 * sigma**2))
    k_st = np.exp(-((s[:, None] - t[None]) ** 2).sum(-1) / (2 * sigma**2))
    k_tt = np.exp(-((t[:, None] - t[None]) ** 2).sum(-1) / (2 * sigma**2))
    grad_ss = -(k_ss[:, :, None] * (s[:, None] - s[None])).sum(1) / sigma**2
    grad_st = -(k_st[:, :, None] * (s[:, None] - t[None])).sum(1) / sigma**2
    if estimator == "biased" or n == 1:
        within = 1.0 / n**2
        value = (k_ss.sum() + k_tt.sum()) * within
    else:
        within = 1.0 / (n * (n - 1))
        value = (k_ss.sum() - np.trace(k_ss) + k_tt.sum() - np.trace(k_tt)) * within
    value -= 2 * k_st.sum() / n**2
    return value, 2 * within * grad_ss - 2 * grad_st / n**2


def ref_poly_mmd(s, t, degree, coef0, estimator):
    """Polynomial-kernel MMD^2 in float64 numpy, the kernel (x.y + c)^d on the raw features
    (Huang & Wang, "Like What You Like" / NST, 2017; Gretton et al. 2012, Lemma 6)."""
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    n = len(s)
    k_ss, k_tt, k_st = ((a @ b.T + coef0) ** degree for a, b in ((s, s), (t, t), (s, t)))
    if estimator == "biased":
        return k_ss.mean() + k_tt.mean() - 2 * k_st.mean()
    within = k_ss.sum() - np.trace(k_ss) + k_tt.sum() - np.trace(k_tt)
    return within / (n * (n - 1)) - 2 * k_st.mean()


# ---------------------------------------------------------------- KD2M: optimal transport (section 4)


def ref_entropic_ot(s, t, reg, p=2.0):
    """POT's log-domain plan in float64: (transport = ot.sinkhorn2, objective with eps KL), i.e.
    ``<P, C>`` and ``<P, C> + reg KL(P || a b^T)`` for the plan of ot.sinkhorn
    (method 'sinkhorn_log'), cost ``||s_i - t_j||^p`` from ot.dist."""
    cost = ot.dist(s, t, metric="sqeuclidean") ** (p / 2)
    a = ref_uniform(len(s))
    kw = {"method": "sinkhorn_log", "stopThr": 1e-13, "numItermax": 20_000}
    transport = ot.sinkhorn2(a, a, cost, reg, **kw)
    plan = ot.sinkhorn(a, a, cost, reg, **kw)
    kl = np.sum(plan * np.log(plan / np.outer(a, a)))
    return float(transport), float(transport + reg * kl)


def ref_per_class_emd(s, t, labels, p=2.0):
    """METHODS.md section 4, class-conditional W: the mean over the classes present of the exact
    OT cost (ot.emd2, uniform weights, cost ``||s_i - t_j||^p`` from ot.dist)."""
    values = []
    for c in np.unique(labels):
        rows = labels == c
        n = int(rows.sum())
        values.append(ot.emd2(ref_uniform(n), ref_uniform(n), ot.dist(s[rows], t[rows]) ** (p / 2)))
    return float(np.mean(values))


def ref_class_sum(distance, s, t, labels):
    """METHODS.md section 5, official KD2M class-conditional reduction: the SUM over the classes
    present in ``labels`` of ``distance(s_c, t_c)`` between that class's student and teacher
    rows (featkd's default is the mean)."""
    return float(sum(distance(s[labels == c], t[labels == c]) for c in np.unique(labels)))


def ref_emd_value(s, t):
    """Exact W2^2 (METHODS.md section 4): ot.emd2 with uniform weights and the squared
    Euclidean cost of ot.dist."""
    n = len(s)
    return float(ot.emd2(ref_uniform(n), ref_uniform(n), ot.dist(s, t)))


def ref_official_joint_emd(s, t, z_s, z_t, beta, label_cost):
    """METHODS.md section 5, official KD2M joint feature-label W2 (student against teacher, not
    its student-vs-student bug): exact OT (ot.emd2, uniform weights) of the cost
    ``F_ij / max(F) + beta * L_ij`` with ``F_ij = ||s_i - t_j||^2``; ``L_ij`` is
    ``||z_s,i - z_t,j||^2`` between raw logits (``label_cost="logits"``) or, ``"cce"``,
    ``KL(p_s,i || p_t,j) = sum_k p_s,ik (log p_s,ik - log p_t,jk)`` of the softmaxes.
    Written with loops over the pairs."""
    n = len(s)
    features = np.array([[np.sum((s[i] - t[j]) ** 2) for j in range(n)] for i in range(n)])
    features = features / features.max()
    p_s, p_t = ref_softmax(z_s), ref_softmax(z_t)
    labels = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if label_cost == "logits":
                labels[i, j] = np.sum((z_s[i] - z_t[j]) ** 2)
            else:
                labels[i, j] = np.sum(p_s[i] * (np.log(p_s[i]) - np.log(p_t[j])))
    return float(ot.emd2(ref_uniform(n), ref_uniform(n), features + beta * labels))


def ref_official_rbf_sigma(x, y):
    """METHODS.md section 5, official KD2M RBF bandwidth: ``sigma`` = the mean of the pairwise
    distances (not squared) over the three blocks ``xx``, ``yy``, ``xy`` (each n x n), their zero
    diagonals included: loops over the 3 n^2 pairs."""
    distances = [
        math.sqrt(np.sum((a[i] - b[j]) ** 2))
        for a, b in ((x, x), (y, y), (x, y))
        for i in range(len(a))
        for j in range(len(b))
    ]
    return float(np.mean(distances))


def ref_official_rbf_mmd(x, y):
    """METHODS.md section 5, official KD2M RBF MMD: the biased estimator (all pairs, i = j
    included) with ``k(a, b) = exp(-gamma ||a - b||^2)``, ``gamma = 1 / (2 sigma^2)``, ``sigma``
    from :func:`ref_official_rbf_sigma`."""
    gamma = 1.0 / (2 * ref_official_rbf_sigma(x, y) ** 2)

    def block(a, b):
        return np.mean([[math.exp(-gamma * np.sum((u - v) ** 2)) for v in b] for u in a])

    return float(block(x, x) + block(y, y) - 2 * block(x, y))


def ref_official_diag_gaussian_kl(p, q, floor):
    """METHODS.md section 5, official KD2M diagonal Gaussian KL(N_p || N_q) with the floor
    ``sigma + floor`` on the per-feature standard deviations (``sigma`` divided by n, numpy's
    ``std(ddof=0)``: section 5 names the floor, not the divisor): the closed form
    ``sum_k log(sd_q / sd_p) + (sd_p^2 + (mu_p - mu_q)^2) / (2 sd_q^2) - 1/2``."""
    sd_p, sd_q = p.std(0) + floor, q.std(0) + floor
    delta = p.mean(0) - q.mean(0)
    return float(np.sum(np.log(sd_q / sd_p) + (sd_p**2 + delta**2) / (2 * sd_q**2) - 0.5))


# ---------------------------------------------------------------- diagnostics


def ref_pairwise_cosines(x):
    """Cosine similarities of the distinct pairs i < j of rows (the upper triangle of
    ``n(X) n(X)^T``, numpy.triu_indices order)."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit @ unit.T
    i, j = np.triu_indices(len(x), k=1)
    return sims[i, j]


def ref_linear_cka(x, y):
    """Linear CKA, Kornblith et al., "Similarity of Neural Network Representations Revisited"
    (ICML 2019), the linear-kernel form ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` on
    column-centred X, Y."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


# ---------------------------------------------------------------- parity (METHODS.md section 5)


def ref_proteus_tokens(student, teacher, cls_head, token_head):
    """METHODS.md section 5, official Proteus (CosPress repo baseline): the token term
    ``MSE(cat(cls_head(s_cls), fea_head(s_patch)), cat(t_cls, t_patch))``, the CLS slot (token 0)
    through the CLS head and the other tokens through the token head, the mean squared error
    over all elements of the batch. The heads are ``LayerNorm -> Linear`` (METHODS.md section 2,
    read through ref_head)."""
    mapped = np.concatenate(
        [ref_head(student[:, :1], cls_head), ref_head(student[:, 1:], token_head)], axis=1
    )
    target = np.concatenate([teacher[:, :1], teacher[:, 1:]], axis=1)
    return float(((mapped - target) ** 2).mean())


# ---------------------------------------------------------------- multi-teacher (issue 15)


def ref_phi_standardize(x, hadamard):
    """PHI-S, Ranzinger et al., "PHI-S: Distribution Balancing for Label-Free Multi-Teacher
    Distillation" (2024): ``y = H U^T (x - mu) / a`` with ``S = U diag(l) U^T`` the covariance
    (divided by n), ``H`` an orthogonal Hadamard matrix and ``a = sqrt(sum(l) / D)``. Rows of
    ``x`` are samples; float64 numpy (numpy.linalg.eigh). Returns ``(y, U)``: the eigenvectors
    are defined up to sign, so callers compare what does not depend on it."""
    mean = x.mean(axis=0)
    cov = np.cov(x.T, bias=True)
    values, vectors = np.linalg.eigh(cov)
    scale = math.sqrt(values.clip(min=0).sum() / x.shape[1])
    return (x - mean) @ vectors @ hadamard.T / scale, vectors


def ref_smooth_l1_per_vector(a, b, beta=1.0):
    """Smooth-L1 (Huber with ``delta = beta`` divided by ``beta``), Girshick, "Fast R-CNN"
    (ICCV 2015), eq. 3: ``0.5 d^2 / beta`` where ``|d| < beta``, else ``|d| - 0.5 beta``,
    elementwise, averaged over the last axis."""
    d = np.abs(a - b)
    return np.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta).mean(axis=-1)


def ref_cosine_distance(a, b):
    """``1 - a.b / (|a| |b|)`` along the last axis (the cosine term of AM-RADIO-style
    multi-teacher distillation)."""
    return 1 - (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))

"""CosPress: every term against a float64 numpy transcription of METHODS.md section 2, the
gradient routing, closed forms, numerics at temperature 0.01 with 257 tokens, and the claim that
a trained head preserves held-out cosine similarities better than a random head and PCA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tolerance
from scipy.special import logsumexp

import featkd
from featkd import (
    ChoiceError,
    CosPressLoss,
    DTypeError,
    NonFiniteError,
    ShapeError,
    TeacherCompressionHead,
    cosine_preservation,
)
from featkd.cospress import DEFAULT_TEMPERATURES
from featkd.functional import flat_cosine_loss, neighbourhood_kl

# ----------------------------------------------------------------------------------------------
# Independent float64 reference: probability space, explicit loops over temperatures and rows.


def ref_cosines(x: np.ndarray) -> np.ndarray:
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
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
    names = ("local", "global", "tokens", "cls")
    total = sum(w * parts[n] for n, w in zip(names, weights, strict=True) if n in parts)
    return parts, total


def numpy64(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().cpu().numpy()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The small matrices here run faster on one thread than on a contended pair of cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------
# neighbourhood_kl


@pytest.mark.parametrize("style", ["full", "half"])
@pytest.mark.parametrize("temperatures", [DEFAULT_TEMPERATURES, (0.3,), (0.05, 1.0)])
def test_neighbourhood_kl_matches_reference(style, temperatures, device, dtype):
    reference = torch.randn(3, 9, 7, dtype=dtype, device=device)
    candidate = torch.randn(3, 9, 4, dtype=dtype, device=device)
    out = neighbourhood_kl(
        reference, candidate, temperatures=temperatures, style=style, reduction="none"
    )
    assert out.shape == (3,) and out.dtype == dtype
    expected = [
        ref_neighbourhood_kl(numpy64(reference[s]), numpy64(candidate[s]), temperatures, style)
        for s in range(3)
    ]
    tol = tolerance(dtype) if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-11}
    np.testing.assert_allclose(numpy64(out), expected, **tol)
    mean = neighbourhood_kl(reference, candidate, temperatures=temperatures, style=style)
    np.testing.assert_allclose(float(mean), np.mean(expected), **tol)
    single = neighbourhood_kl(reference[1], candidate[1], temperatures=temperatures, style=style)
    assert single.shape == ()
    np.testing.assert_allclose(float(single), expected[1], **tol)


@pytest.mark.parametrize("style", ["full", "half"])
def test_closed_forms_are_zero(style):
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    positive_scale = torch.rand(2, 12, 1, dtype=torch.float64) + 0.1
    for same_angles in (x, x @ rotation, x * positive_scale):
        value = neighbourhood_kl(x, same_angles, style=style)
        assert abs(float(value)) < 1e-10
    # two vectors: each row's only neighbour is the other one, whatever the angles
    two = neighbourhood_kl(torch.randn(2, 5), torch.randn(2, 3), style=style)
    assert abs(float(two)) < 1e-5
    # a different similarity structure costs something
    assert float(neighbourhood_kl(x, torch.randn(2, 12, 16, dtype=torch.float64))) > 0.1


@pytest.mark.parametrize("style", ["full", "half"])
@pytest.mark.parametrize("chunk_elements", [1, 90, 800, 10**9])
def test_chunking_does_not_change_values_or_gradients(style, chunk_elements):
    # 4 sets of 9 vectors, 10 temperatures: chunks of single matrices, several temperatures of
    # one set, several whole sets, and everything at once
    reference = torch.randn(4, 9, 6, dtype=torch.float64)
    candidate = torch.randn(4, 9, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(4, dtype=torch.float64)
    whole = neighbourhood_kl(reference, candidate, style=style, reduction="none")
    (grad_whole,) = torch.autograd.grad((whole * weights).sum(), candidate)
    chunked = neighbourhood_kl(
        reference, candidate, style=style, reduction="none", chunk_elements=chunk_elements
    )
    (grad_chunked,) = torch.autograd.grad((chunked * weights).sum(), candidate)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_chunked, grad_whole, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("style", ["full", "half"])
@pytest.mark.parametrize("chunk_elements", [50, 10**6])
def test_neighbourhood_kl_gradcheck(style, chunk_elements):
    reference = torch.randn(2, 6, 5, dtype=torch.float64)
    candidate = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)

    def fn(c):
        return neighbourhood_kl(
            reference,
            c,
            temperatures=(0.05, 0.2, 1.0),
            style=style,
            reduction="none",
            chunk_elements=chunk_elements,
        )

    assert torch.autograd.gradcheck(fn, (candidate,))


def test_reference_side_gets_no_gradient():
    reference = torch.randn(3, 8, 5, requires_grad=True)
    candidate = torch.randn(3, 8, 4, requires_grad=True)
    neighbourhood_kl(reference, candidate).backward()
    assert reference.grad is None
    assert candidate.grad is not None and bool(candidate.grad.abs().sum() > 0)


@pytest.mark.parametrize("style", ["full", "half"])
def test_finite_at_lowest_temperature_with_257_tokens(style, device):
    """tau = 0.01, 257 tokens, float32: no NaN/Inf in the value or the gradient, and the value
    agrees with the float64 computation."""
    gen = torch.Generator().manual_seed(3)
    teacher = torch.randn(2, 257, 384, generator=gen).to(device)
    compressed = (teacher @ torch.randn(384, 192, generator=gen).to(device)).requires_grad_()
    value = neighbourhood_kl(teacher, compressed, temperatures=(0.01,), style=style)
    value.backward()
    assert bool(torch.isfinite(value)) and bool(torch.isfinite(compressed.grad).all())
    value64 = neighbourhood_kl(
        teacher.double(), compressed.detach().double(), temperatures=(0.01,), style=style
    )
    np.testing.assert_allclose(float(value.detach()), float(value64), rtol=1e-4)
    # the all-equal case: every cosine 1, the mask alone shapes the distribution
    ones = torch.ones(1, 257, 8, device=device, requires_grad=True)
    same = neighbourhood_kl(ones.detach() + 0, ones, temperatures=(0.01,), style=style)
    same.backward()
    assert float(same.detach()) == 0.0 and bool(torch.isfinite(ones.grad).all())


def test_half_precision_inputs_are_computed_in_float32():
    reference = torch.randn(2, 10, 8)
    candidate = torch.randn(2, 10, 4)
    full = neighbourhood_kl(reference.bfloat16().float(), candidate.bfloat16().float())
    low = neighbourhood_kl(reference.bfloat16(), candidate.bfloat16())
    assert low.dtype == torch.float32
    np.testing.assert_allclose(float(low), float(full), rtol=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = neighbourhood_kl(reference, candidate)
    assert under_autocast.dtype == torch.float32
    assert float(under_autocast) == float(neighbourhood_kl(reference, candidate))


# ----------------------------------------------------------------------------------------------
# flat_cosine_loss


def test_flat_cosine_loss_is_one_cosine_per_sample(dtype):
    student = torch.randn(4, 6, 5, dtype=dtype)
    target = torch.randn(4, 6, 5, dtype=dtype)
    expected = np.mean(
        [ref_one_minus_cos(numpy64(s), numpy64(t)) for s, t in zip(student, target, strict=True)]
    )
    value = float(flat_cosine_loss(student, target))
    np.testing.assert_allclose(value, expected, **tolerance(dtype))
    # not the mean of per-token cosines: rescaling one token changes the flattened cosine only
    scaled = target.clone()
    scaled[:, 0] *= 10
    per_token = 1 - torch.nn.functional.cosine_similarity(student, target, dim=-1).mean()
    per_token_scaled = 1 - torch.nn.functional.cosine_similarity(student, scaled, dim=-1).mean()
    torch.testing.assert_close(per_token, per_token_scaled)
    assert abs(float(flat_cosine_loss(student, scaled) - flat_cosine_loss(student, target))) > 1e-3


def test_flat_cosine_loss_target_gets_no_gradient():
    student = torch.randn(3, 4, requires_grad=True)
    target = torch.randn(3, 4, requires_grad=True)
    flat_cosine_loss(student, target).backward()
    assert target.grad is None and student.grad is not None


# ----------------------------------------------------------------------------------------------
# CosPressLoss


def make_loss(teacher_dim=12, student_dim=5, dtype=torch.float64, device="cpu", **kwargs):
    loss_fn = CosPressLoss(teacher_dim, student_dim, dtype=dtype, device=device, **kwargs)
    with torch.no_grad():  # move the LayerNorm affine off its init so the reference checks it
        loss_fn.head.norm.weight.uniform_(0.5, 1.5)
        loss_fn.head.norm.bias.normal_()
    return loss_fn


@pytest.mark.parametrize("style", ["full", "half"])
@pytest.mark.parametrize("num_prefix_tokens", [1, 0])
def test_module_terms_match_reference(style, num_prefix_tokens, device, dtype):
    weights = (0.7, 1.3, 2.0, 0.5)
    temperatures = (0.02, 0.1, 0.4)
    loss_fn = make_loss(
        dtype=dtype,
        device=device,
        style=style,
        weights=weights,
        temperatures=temperatures,
        num_prefix_tokens=num_prefix_tokens,
    )
    student = torch.randn(5, 7, 5, dtype=dtype, device=device)
    teacher = torch.randn(5, 7, 12, dtype=dtype, device=device)
    loss = loss_fn(student, teacher)
    assert loss.shape == () and loss.dtype == dtype
    parts, total = ref_cospress(
        numpy64(student),
        numpy64(teacher),
        loss_fn.head,
        temperatures,
        style,
        weights,
        num_prefix_tokens,
    )
    tol = tolerance(dtype) if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-11}
    assert set(loss_fn.last_parts) == {"local", "global", "tokens", "cls"}
    for name, value in parts.items():
        assert not loss_fn.last_parts[name].requires_grad
        np.testing.assert_allclose(float(loss_fn.last_parts[name]), value, **tol, err_msg=name)
    np.testing.assert_allclose(float(loss.detach()), total, **tol)


def test_pooled_inputs_have_global_and_cls_terms_only(dtype):
    loss_fn = make_loss(dtype=dtype)
    student = torch.randn(6, 5, dtype=dtype)
    teacher = torch.randn(6, 12, dtype=dtype)
    loss = loss_fn(student, teacher)
    parts, total = ref_cospress(
        numpy64(student), numpy64(teacher), loss_fn.head, DEFAULT_TEMPERATURES, "full", (1,) * 4
    )
    assert set(loss_fn.last_parts) == {"global", "cls"} == set(parts)
    tol = tolerance(dtype) if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-11}
    for name, value in parts.items():
        np.testing.assert_allclose(float(loss_fn.last_parts[name]), value, **tol, err_msg=name)
    np.testing.assert_allclose(float(loss.detach()), total, **tol)


def _grads(loss_fn, student, teacher):
    loss_fn.zero_grad(set_to_none=True)
    student.grad = None
    loss_fn(student, teacher).backward()
    head = [p.grad for p in loss_fn.head.parameters()]
    return head, student.grad


@pytest.mark.parametrize("pooled", [False, True])
def test_gradient_routing(pooled):
    """Head: gradient from the KL terms only. Student: from the cosine terms only. Teacher: none."""
    shape_s, shape_t = ((6, 5), (6, 12)) if pooled else ((6, 4, 5), (6, 4, 12))
    student = torch.randn(*shape_s, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(*shape_t, dtype=torch.float64, requires_grad=True)
    loss_fn = make_loss()

    head_all, student_all = _grads(loss_fn, student, teacher)
    loss_fn.weights = (1.0, 1.0, 0.0, 0.0)
    head_kl, student_kl = _grads(loss_fn, student, teacher)
    loss_fn.weights = (0.0, 0.0, 1.0, 1.0)
    head_cos, student_cos = _grads(loss_fn, student, teacher)

    def zero(g):
        return g is None or int(torch.count_nonzero(g)) == 0

    assert teacher.grad is None
    assert zero(student_kl)  # the KL terms never see the student
    assert all(zero(g) for g in head_cos)  # the cosine terms see sg(h(teacher))
    assert all(g is not None and bool(g.abs().sum() > 0) for g in head_kl)
    for full, kl_only in zip(head_all, head_kl, strict=True):
        torch.testing.assert_close(full, kl_only, rtol=0, atol=0)
    torch.testing.assert_close(student_all, student_cos, rtol=0, atol=0)


def test_module_gradcheck_student_and_head():
    loss_fn = make_loss(teacher_dim=6, student_dim=3, temperatures=(0.1, 0.5))
    student = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 3, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: loss_fn(s, teacher), (student,))
    # The head through the KL terms. (With the cosine terms switched on, a finite difference in
    # the head moves their stop-gradient target, which the analytical gradient rightly ignores.)
    loss_fn.weights = (1.0, 1.0, 0.0, 0.0)
    names = [name for name, _ in loss_fn.named_parameters()]
    values = tuple(p.detach().clone().requires_grad_() for p in loss_fn.parameters())

    def through_head(*head_values):
        params = dict(zip(names, head_values, strict=True))
        return torch.func.functional_call(loss_fn, params, (student.detach(), teacher))

    assert torch.autograd.gradcheck(through_head, values)


def test_compress_is_the_head_and_detaches_teacher(dtype):
    loss_fn = make_loss(dtype=torch.float32)
    teacher = torch.randn(3, 4, 12, dtype=dtype, requires_grad=True)
    out = loss_fn.compress(teacher)
    assert out.shape == (3, 4, 5) and out.dtype == dtype
    np.testing.assert_allclose(
        numpy64(out), ref_head(numpy64(teacher), loss_fn.head), **tolerance(torch.float32)
    )
    out.sum().backward()
    assert teacher.grad is None
    assert loss_fn.compress(torch.randn(12)).shape == (5,)


def test_low_precision_and_autocast():
    loss_fn = CosPressLoss(12, 5)
    student = torch.randn(4, 6, 5)
    teacher = torch.randn(4, 6, 12)
    reference = loss_fn(student, teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss_fn(student, teacher)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, reference)
    low = loss_fn(student.bfloat16(), teacher.bfloat16())
    assert low.dtype == torch.float32 and bool(torch.isfinite(low))
    np.testing.assert_allclose(float(low.detach()), float(reference.detach()), rtol=2e-2)


def test_exported_names():
    assert featkd.CosPressLoss is CosPressLoss
    assert featkd.TeacherCompressionHead is TeacherCompressionHead
    assert isinstance(CosPressLoss(8, 4).head, TeacherCompressionHead)
    assert DEFAULT_TEMPERATURES == (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1)
    loss_fn = CosPressLoss(8, 4)
    assert {n for n, _ in loss_fn.named_parameters()} == {
        "head.norm.weight",
        "head.norm.bias",
        "head.linear.weight",
        "head.linear.bias",
    }


def test_trained_head_preserves_held_out_cosines_better_than_random_and_pca():
    """The paper's claim on a real feature set (scikit-learn digits, 64 pixels -> 8 dims): the
    head trained on the KL terms alone preserves the cosine similarities of held-out samples
    better than its random initialisation and than PCA to the same width."""
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA

    pixels = torch.tensor(load_digits().data, dtype=torch.float32)
    order = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(0))
    train, held_out = pixels[order[:1200]], pixels[order[1200:]]
    torch.manual_seed(0)
    loss_fn = CosPressLoss(64, 8, weights=(1.0, 1.0, 0.0, 0.0))
    untrained = cosine_preservation(held_out, loss_fn.compress(held_out))
    optimiser = torch.optim.AdamW(loss_fn.parameters(), lr=1e-2, weight_decay=0.0)
    batches = torch.Generator().manual_seed(1)
    for _ in range(40):
        batch = train[torch.randint(0, len(train), (256,), generator=batches)]
        optimiser.zero_grad()
        loss_fn(torch.zeros(256, 8), batch).backward()  # no student: the head alone
        optimiser.step()
    trained = cosine_preservation(held_out, loss_fn.compress(held_out))
    pca = PCA(8).fit(train.numpy())
    projected = cosine_preservation(held_out, torch.tensor(pca.transform(held_out.numpy())))
    assert trained.pearson > projected.pearson + 0.05
    assert trained.spearman > projected.spearman + 0.05
    assert trained.pearson > untrained.pearson + 0.2
    assert trained.mae < min(projected.mae, untrained.mae)


# ----------------------------------------------------------------------------------------------
# errors


def test_input_errors_name_the_argument():
    loss_fn = CosPressLoss(12, 5)
    s, t = torch.randn(4, 6, 5), torch.randn(4, 6, 12)
    with_nan = s.clone()
    with_nan[0, 0, 0] = float("nan")
    cases = [
        (
            ShapeError,
            r"student: expected \(B, D\) or \(B, N, D\), got \(4, 6, 5, 1\)",
            s[..., None],
            t,
        ),
        (ShapeError, r"student: expected last dimension D_s=5, got 7", torch.randn(4, 6, 7), t),
        (ShapeError, r"teacher: expected last dimension D_t=12, got 5", s, torch.randn(4, 6, 5)),
        (ShapeError, r"teacher: expected \(B, 6, D_t\) to match student", s, t[:, 0]),
        (ShapeError, r"teacher: expected batch size 4", s, t[:3]),
        (ShapeError, r"teacher: expected 6 tokens .*align_tokens", s, t[:, :5]),
        (ShapeError, r"student: expected a batch of at least 2 .*global", s[:1], t[:1]),
        (ShapeError, r"student: expected at least 2 tokens", s[:, :1], t[:, :1]),
        (DTypeError, r"teacher: expected a floating-point tensor", s, t.long()),
        (NonFiniteError, r"student: expected finite values, got 1 NaN/Inf", with_nan, t),
    ]
    for error, message, student, teacher in cases:
        with pytest.raises(error, match=message):
            loss_fn(student, teacher)


def test_option_errors():
    with pytest.raises(ChoiceError, match=r"style: expected one of 'full', 'half', got 'sym'"):
        CosPressLoss(8, 4, style="sym")
    for bad in ((), (0.1, -0.1), (float("nan"),), "0.1", (True,)):
        with pytest.raises(ChoiceError, match=r"temperatures: expected a non-empty sequence"):
            CosPressLoss(8, 4, temperatures=bad)
    for bad in ((1, 1, 1), (1, 1, 1, -1), (1, 1, 1, float("inf"))):
        with pytest.raises(ChoiceError, match=r"weights: expected 4 finite numbers >= 0 .*local"):
            CosPressLoss(8, 4, weights=bad)
    with pytest.raises(ChoiceError, match=r"num_prefix_tokens: expected an integer >= 0, got -1"):
        CosPressLoss(8, 4, num_prefix_tokens=-1)
    with pytest.raises(ChoiceError, match=r"chunk_elements: expected an integer >= 1, got 0"):
        CosPressLoss(8, 4, chunk_elements=0)
    with pytest.raises(ChoiceError, match=r"teacher_dim: expected a positive integer"):
        CosPressLoss(0, 4)


def test_function_errors():
    x = torch.randn(3, 5, 4)
    with pytest.raises(ShapeError, match=r"candidate: expected .* to match reference \(3, 5, 4\)"):
        neighbourhood_kl(x, torch.randn(3, 6, 4))
    with pytest.raises(ShapeError, match=r"reference: expected at least 2 vectors per set"):
        neighbourhood_kl(x[:, :1], x[:, :1])
    with pytest.raises(ShapeError, match=r"reference: expected \(M, D\) or \(S, M, D\)"):
        neighbourhood_kl(x[None], x[None])
    with pytest.raises(ChoiceError, match=r"reduction: expected one of 'mean', 'none'"):
        neighbourhood_kl(x, x, reduction="sum")
    with pytest.raises(ChoiceError, match=r"style: expected one of"):
        neighbourhood_kl(x, x, style="joint")
    with pytest.raises(ShapeError, match=r"target: expected the shape of student \(3, 5, 4\)"):
        flat_cosine_loss(x, x[:, :4])

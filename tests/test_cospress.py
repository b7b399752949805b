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
    loss_fn = CosPressLoss(
        student_dim=student_dim, teacher_dim=teacher_dim, dtype=dtype, device=device, **kwargs
    )
    with torch.no_grad():  # move the LayerNorm affine off its init so the reference checks it
        loss_fn.head.norm.weight.uniform_(0.5, 1.5)
        loss_fn.head.norm.bias.normal_()
    return loss_fn


@pytest.mark.parametrize("style", ["full", "half"])
@pytest.mark.parametrize("num_prefix_tokens", [1, 0])
def test_module_terms_match_reference(style, num_prefix_tokens, device, dtype):
    weights = {"local": 0.7, "global": 1.3, "tokens": 2.0, "cls": 0.5}
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
    assert list(loss_fn.last_parts) == ["total", "global", "cls", "local", "tokens"]
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
        numpy64(student), numpy64(teacher), loss_fn.head, DEFAULT_TEMPERATURES, "full", {}
    )
    assert list(loss_fn.last_parts) == ["total", "global", "cls"]
    assert set(parts) == {"global", "cls"}
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
    loss_fn.weights = {"local": 1.0, "global": 1.0, "tokens": 0.0, "cls": 0.0}
    head_kl, student_kl = _grads(loss_fn, student, teacher)
    loss_fn.weights = {"local": 0.0, "global": 0.0, "tokens": 1.0, "cls": 1.0}
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
    loss_fn.weights = {"local": 1.0, "global": 1.0, "tokens": 0.0, "cls": 0.0}
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
    loss_fn = CosPressLoss(student_dim=5, teacher_dim=12)
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
    assert isinstance(CosPressLoss(student_dim=4, teacher_dim=8).head, TeacherCompressionHead)
    assert DEFAULT_TEMPERATURES == (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1)
    loss_fn = CosPressLoss(student_dim=4, teacher_dim=8)
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
    loss_fn = CosPressLoss(student_dim=8, teacher_dim=64, weights={"tokens": 0.0, "cls": 0.0})
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
# dead and extreme vectors


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ["image", "cls", "pooled"])
def test_dead_student_vector_gets_a_gradient_of_normal_size(case, input_dtype):
    """Issue 11.3: an all-zero image (tokens), a dead CLS token, or a zero row of pooled input
    got a gradient of about 1e7 in float32 (inf in float16) against about 0.01 for the other
    samples: torch's cosine divides by max(||x||, 1e-8). Now finite, within 10x of the largest
    other sample's, and still a descent direction towards the target."""
    generator = torch.Generator().manual_seed(0)
    pooled = case == "pooled"
    tokens = () if pooled else (17,)
    student = torch.randn(8, *tokens, 32, generator=generator)
    teacher = torch.randn(8, *tokens, 64, generator=generator)
    dead = (3, 0) if case == "cls" else (3,)
    student[dead] = 0
    loss_fn = CosPressLoss(student_dim=32, teacher_dim=64)
    student = student.to(input_dtype).requires_grad_()
    loss_fn(student, teacher.to(input_dtype)).backward()
    grad = student.grad.float()
    assert bool(torch.isfinite(grad).all())
    others = torch.cat([grad[:3], grad[4:]])
    others = others[:, 0] if case == "cls" else others  # the other CLS tokens
    largest_other = float(others.abs().max())
    assert float(grad[dead].abs().max()) <= 10 * largest_other
    with torch.no_grad():
        target = loss_fn.compress(teacher)[dead]
    assert float((-grad[dead] * target).sum()) > 0


def test_short_and_dead_student_gradients_against_reference():
    """flat_cosine_loss in float64 against numpy. Values are exact (a zero sample has cosine
    0). The gradient of 1 - cos_b is -(t_b - cos_b s_b) / (B ||s_b||) with unit s_b, t_b; a
    sample shorter than f = median non-zero norm / 4 gets ||s_b|| replaced by f, and a dead
    one -t_b / (B f). (An odd count of non-zero samples: torch's median of an even count is
    the lower middle value.)"""
    student = torch.randn(6, 4, 3, dtype=torch.float64)
    target = torch.randn(6, 4, 3, dtype=torch.float64)
    student[1] = 0  # dead
    student[2] *= 0.02  # short
    student.requires_grad_()
    value = flat_cosine_loss(student, target)
    value.backward()

    s, t = numpy64(student).reshape(6, -1), numpy64(target).reshape(6, -1)
    norms = np.linalg.norm(s, axis=1)
    floor = 0.25 * np.median(norms[norms > 0])
    assert norms[2] < floor < norms[[0, 3, 4, 5]].min()
    unit_t = t / np.linalg.norm(t, axis=1, keepdims=True)
    expected_value, expected_grad = 0.0, np.zeros_like(s)
    for b in range(6):
        if norms[b] == 0:
            expected_value += 1.0 / 6
            expected_grad[b] = -unit_t[b] / (6 * floor)
            continue
        unit_s = s[b] / norms[b]
        cos = unit_s @ unit_t[b]
        expected_value += (1 - cos) / 6
        expected_grad[b] = -(unit_t[b] - cos * unit_s) / (6 * max(norms[b], floor))
    np.testing.assert_allclose(float(value.detach()), expected_value, rtol=1e-12)
    np.testing.assert_allclose(numpy64(student.grad).reshape(6, -1), expected_grad, rtol=1e-10)


def test_flat_cosine_loss_twice_differentiable():
    """The custom normalisation keeps the double backward torch's cosine_similarity had."""
    student = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randn(4, 3, 5, dtype=torch.float64)
    assert torch.autograd.gradgradcheck(lambda s: flat_cosine_loss(s, target), (student,))


def test_dead_candidate_vector_in_neighbourhood_kl():
    """A zero candidate vector (cosine 0 with all others, as in the reference) had a gradient of
    about 1e12: torch's normalize divides by max(||x||, 1e-12). Now of the others' order."""
    reference = torch.randn(2, 9, 7)
    candidate = torch.randn(2, 9, 4)
    candidate[0, 2] = 0
    candidate.requires_grad_()
    value = neighbourhood_kl(reference, candidate, reduction="none")
    expected = [
        ref_neighbourhood_kl(numpy64(reference[i]), numpy64(candidate[i]), DEFAULT_TEMPERATURES)
        for i in range(2)
    ]
    np.testing.assert_allclose(numpy64(value), expected, **tolerance(torch.float32))
    value.sum().backward()
    grad = candidate.grad
    assert bool(torch.isfinite(grad).all())
    largest_other = float(torch.cat([grad[0, :2], grad[0, 3:]]).abs().max())
    assert 0 < float(grad[0, 2].abs().max()) <= 10 * largest_other


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_extreme_magnitudes_in_float32(scale):
    """Norms are taken after dividing by the largest entry: in float32 the squares of 1e-30
    underflow and those of 1e30 overflow, and the loss read 1.0 as if every vector were zero."""
    student = torch.randn(4, 6, 5, dtype=torch.float64)
    target = torch.randn(4, 6, 5, dtype=torch.float64)
    small = (scale * student).float().requires_grad_()
    value = flat_cosine_loss(small, target.float())
    expected = np.mean(
        [ref_one_minus_cos(numpy64(a), numpy64(b)) for a, b in zip(student, target, strict=True)]
    )
    np.testing.assert_allclose(float(value.detach()), expected, rtol=1e-5)
    value.backward()
    assert bool(torch.isfinite(small.grad).all()) and bool(small.grad.abs().sum() > 0)
    kl = neighbourhood_kl((scale * student).float(), target.float(), reduction="none")
    expected_kl = [
        ref_neighbourhood_kl(numpy64(a), numpy64(b), DEFAULT_TEMPERATURES)
        for a, b in zip(student, target, strict=True)
    ]
    np.testing.assert_allclose(numpy64(kl), expected_kl, **tolerance(torch.float32))


# ----------------------------------------------------------------------------------------------
# errors


def test_input_errors_name_the_argument():
    loss_fn = CosPressLoss(student_dim=5, teacher_dim=12)
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
        CosPressLoss(student_dim=4, teacher_dim=8, style="sym")
    for bad in ((), "0.1", None, 0.1j):
        with pytest.raises(ChoiceError, match=r"temperatures: expected a non-empty sequence"):
            CosPressLoss(student_dim=4, teacher_dim=8, temperatures=bad)
    for bad in ((0.1, -0.1), (0.1, float("nan")), (0.1, True), (0.1, "0.2")):
        with pytest.raises(
            ChoiceError, match=r"temperatures\[1\]: expected a finite number >= 1e-06"
        ):
            CosPressLoss(student_dim=4, teacher_dim=8, temperatures=bad)
    with pytest.raises(ChoiceError, match=r"weights: expected a dict of weights by term name"):
        CosPressLoss(student_dim=4, teacher_dim=8, weights=(1, 1, 1))
    with pytest.raises(ChoiceError, match=r"weights: unknown term 'locl'; expected some of"):
        CosPressLoss(student_dim=4, teacher_dim=8, weights={"locl": 1.0})
    for bad in (-1, float("inf"), True):
        with pytest.raises(ChoiceError, match=r"weights\['cls'\]: expected a finite number >= 0"):
            CosPressLoss(student_dim=4, teacher_dim=8, weights={"cls": bad})
    with pytest.warns(FutureWarning, match=r"positional weights=\(local, global, tokens, cls\)"):
        CosPressLoss(student_dim=4, teacher_dim=8, weights=(1, 1, 1, 0.5))
    with pytest.raises(ChoiceError, match=r"num_prefix_tokens: expected an integer >= 0, got -1"):
        CosPressLoss(student_dim=4, teacher_dim=8, num_prefix_tokens=-1)
    with pytest.raises(ChoiceError, match=r"chunk_elements: expected an integer >= 1, got 0"):
        CosPressLoss(student_dim=4, teacher_dim=8, chunk_elements=0)
    with pytest.raises(ChoiceError, match=r"teacher_dim: expected an integer >= 1, got 0"):
        CosPressLoss(student_dim=4, teacher_dim=0)
    with pytest.raises(ChoiceError, match=r"student_dim: expected an integer >= 1, got 4.0"):
        CosPressLoss(student_dim=4.0, teacher_dim=8)


def test_constructor_refuses_what_used_to_fail_later():
    """Issue 11.7: arguments that were accepted and then gave NaN, a torch error or a silently
    different loss are refused at construction, naming the argument."""
    # tau = 1e-32: the diagonal mask 1e8 / tau overflowed float32 and the loss was NaN
    with pytest.raises(ChoiceError, match=r"temperatures\[0\]: expected .* got 1e-32"):
        CosPressLoss(student_dim=4, teacher_dim=8, temperatures=(1e-32,))
    with pytest.raises(ChoiceError, match=r"temperatures\[0\]: expected .* got 1e-32"):
        neighbourhood_kl(torch.randn(5, 3), torch.randn(5, 2), temperatures=(1e-32,))
    # tau = 1e8: the mask no longer removed the self-similarity (the KL of anything was 0)
    with pytest.raises(ChoiceError, match=r"temperatures\[1\]: expected .* <= 1000000.0"):
        CosPressLoss(student_dim=4, teacher_dim=8, temperatures=(0.1, 1e8))
    # integer and complex heads failed in torch (RuntimeError) or at the first call, naming x
    for bad in (torch.int64, torch.complex64, torch.float8_e4m3fn, "float32"):
        with pytest.raises(ChoiceError, match=r"dtype: expected None or one of torch.float16"):
            CosPressLoss(student_dim=4, teacher_dim=8, dtype=bad)
    # a mistyped device was torch's RuntimeError
    for bad in ("gpu", "cuda:x", True, 1.5):
        with pytest.raises(ChoiceError, match=r"device: expected None, a torch.device"):
            CosPressLoss(student_dim=4, teacher_dim=8, device=bad)


def test_function_errors():
    x = torch.randn(3, 5, 4)
    with pytest.raises(ShapeError, match=r"candidate: expected .* to match reference \(3, 5, 4\)"):
        neighbourhood_kl(x, torch.randn(3, 6, 4))
    with pytest.raises(ShapeError, match=r"reference: expected at least 2 vectors per set"):
        neighbourhood_kl(x[:, :1], x[:, :1])
    with pytest.raises(ShapeError, match=r"reference: expected \(M, D\) or \(S, M, D\)"):
        neighbourhood_kl(x[None], x[None])
    with pytest.raises(ChoiceError, match=r"reduction: expected one of 'mean', 'sum', 'none'"):
        neighbourhood_kl(x, x, reduction="max")
    with pytest.raises(ChoiceError, match=r"style: expected one of"):
        neighbourhood_kl(x, x, style="joint")
    with pytest.raises(ShapeError, match=r"target: expected the shape of student \(3, 5, 4\)"):
        flat_cosine_loss(x, x[:, :4])

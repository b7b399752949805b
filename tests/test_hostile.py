"""Hostile input thrown at every public loss and head (the registry is ``loss_cases.CASES``).

Each case must give either a correct finite result or a ``FeatkdInputError`` (a ``ValueError``)
whose message starts with the argument's name and says what was expected: never a silent NaN,
never a crash from deep inside torch. FCFD takes lists of stage outputs and has its own section
at the end.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loss_cases import (
    CASES,
    LABELLED,
    PAIRS,
    Case,
    X,
    _head,
    _pair,
    _tokens,
    stage_outputs,
    tiny_fcfd,
)
from torch import nn

import featkd
from featkd import DeviceError, DTypeError, FeatkdInputError, NonFiniteError, ShapeError
from featkd._sync import simulate_accelerator
from featkd.kd2m._base import MatchingLoss

# FEATKD_HYPOTHESIS_SCALE=10 multiplies the drawn examples (a local stress run; CI keeps 1)
SCALE = int(os.environ.get("FEATKD_HYPOTHESIS_SCALE", "1"))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is faster, and immune to oversubscription on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def ids(cases):
    return [c.name for c in cases]


def assert_named_error(excinfo, *names: str) -> None:
    """The message starts with one of ``names`` and says what was expected (or "expects")."""
    message = str(excinfo.value)
    assert any(message.startswith(f"{n}:") for n in names), message
    assert "expect" in message, message


def finite_loss_and_grad(case: Case, s, t=None, labels=None, module=None) -> torch.Tensor:
    """The loss (a scalar of a head's output) is finite, and so are the gradients of the student
    and of every owned parameter; the teacher gets none."""
    module = case.make() if module is None else module
    s = s.detach().requires_grad_(True)
    if t is not None:
        t = t.detach().requires_grad_(True)
    out = case.scalar(module, s, t, labels)
    assert out.ndim == 0
    assert torch.isfinite(out), f"{case.name}: non-finite loss {out}"
    out.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all(), f"{case.name}: non-finite grad"
    assert t is None or t.grad is None, f"{case.name}: the teacher received gradient"
    for name, p in module.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), f"{case.name}: {name}.grad"
    return out.detach()


# ------------------------------------------------------------------ shapes
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_student_of_wrong_rank(case):
    s, t, labels = case.inputs(4)
    too_low = s.reshape(-1)[0] if case.is_head else s.reshape(-1)
    with pytest.raises(ShapeError) as excinfo:
        case.call(case.make(), too_low, t, labels)
    assert_named_error(excinfo, case.names[0])
    if not case.is_head:
        with pytest.raises(ShapeError) as excinfo:
            case.call(case.make(), s.reshape(*s.shape, 1, 1, 1), t, labels)
        assert_named_error(excinfo, case.names[0])


@pytest.mark.parametrize("case", PAIRS, ids=ids(PAIRS))
def test_teacher_of_wrong_rank(case):
    s, t, labels = case.inputs(4)
    for bad in (t.reshape(-1), t.reshape(*t.shape, 1, 1, 1)):
        with pytest.raises(ShapeError) as excinfo:
            case.call(case.make(), s, bad, labels)
        assert_named_error(excinfo, case.names[1])


@pytest.mark.parametrize("case", PAIRS, ids=ids(PAIRS))
def test_mismatched_batch(case):
    s, t, labels = case.inputs(6)
    with pytest.raises(ShapeError) as excinfo:
        case.call(case.make(), s, t[:5], labels)
    assert_named_error(excinfo, case.names[1])
    assert "batch" in str(excinfo.value)
    if case.labels:
        with pytest.raises(ShapeError) as excinfo:
            case.call(case.make(), s, t, labels[:5])
        assert_named_error(excinfo, "labels")
        assert "(6,)" in str(excinfo.value)


def widen(x: torch.Tensor, dim: int) -> torch.Tensor:
    """One more channel along ``dim``."""
    return torch.cat([x, x.narrow(dim, 0, 1)], dim=dim)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_mismatched_width(case):
    s, t, labels = case.inputs(4)
    with pytest.raises(ShapeError) as excinfo:
        case.call(case.make(), widen(s, case.channels[0]), t, labels)
    assert_named_error(excinfo, *case.names)  # the teacher, when the student sets the width
    if not case.is_head:
        with pytest.raises(ShapeError) as excinfo:
            case.call(case.make(), s, widen(t, case.channels[1]), labels)
        assert_named_error(excinfo, case.names[1])


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_empty_tensors(case):
    s, t, labels = case.inputs(4)
    no_labels = None if labels is None else labels[:0]
    if case.empty_ok:  # a head mapping no rows to no rows
        out = case.call(case.make(), s[:0])
        assert out.shape[0] == 0 and out.shape[1:] == case.call(case.make(), s).shape[1:]
    else:
        with pytest.raises(ShapeError, match="zero-sized") as excinfo:
            case.call(case.make(), s[:0], None if t is None else t[:0], no_labels)
        assert_named_error(excinfo, case.names[0])
    with pytest.raises(ShapeError) as excinfo:  # no channels
        case.call(case.make(), s.narrow(case.channels[0], 0, 0), t, labels)
    assert_named_error(excinfo, case.names[0])


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_batch_of_one(case):
    s, t, labels = case.inputs(1)
    if case.min_batch > 1:
        with pytest.raises(ShapeError, match="at least") as excinfo:
            case.call(case.make(), s, t, labels)
        assert_named_error(excinfo, *case.names)
    else:
        finite_loss_and_grad(case, s, t, labels)


# ------------------------------------------------------------------ values and dtypes
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 1], ids=["student", "teacher"])
def test_non_finite_is_reported(case, bad, where):
    if where == 1 and case.is_head:
        pytest.skip("a head has one input")
    s, t, labels = case.inputs(4)
    (s if where == 0 else t).view(-1)[-1] = bad  # the last token / pixel: every pooling uses it
    with pytest.raises(NonFiniteError) as excinfo:
        case.call(case.make(), s, t, labels)
    assert_named_error(excinfo, case.names[where])


@pytest.mark.parametrize("case", PAIRS, ids=ids(PAIRS))
def test_non_finite_is_counted_on_the_accelerator_path(case):
    """On an accelerator (simulated) the default policy counts NaN/Inf entries on the device
    instead of raising: one NaN in the student and an inf and a -inf in the teacher are 3.
    A KD2M loss with a projector counts the projected student (documented): the NaN fills the
    projected row, one entry per output feature."""
    s, t, labels = case.inputs(4)
    s.view(-1)[-1] = float("nan")
    t.view(-1)[0], t.view(-1)[-1] = float("inf"), float("-inf")
    module = case.make()
    with simulate_accelerator():
        case.call(module, s, t, labels)
    projectors = [m.projector for m in module.modules() if isinstance(m, MatchingLoss)]
    projector = next((p for p in projectors if p is not None), None)
    student_count = 1 if projector is None else projector.out_features
    assert module.last_parts["nonfinite_inputs"].dtype == torch.float32
    assert module.last_parts["nonfinite_inputs"].item() == 2 + student_count


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
@pytest.mark.parametrize("value", [0.0, 3.0])
def test_constant_features(case, value):
    """Dead (all-zero) or constant features on either side: zero variance, zero norms."""
    s, t, labels = case.inputs(8)
    constant_s = torch.full_like(s, value)
    finite_loss_and_grad(case, constant_s, t, labels)
    if t is not None:
        finite_loss_and_grad(case, s, torch.full_like(t, value), labels)
        finite_loss_and_grad(case, constant_s, torch.full_like(t, value), labels)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.bool])
def test_integer_tensors(case, dtype):
    s, t, labels = case.inputs(4)
    with pytest.raises(DTypeError) as excinfo:
        case.call(case.make(), s.round().to(dtype), t, labels)
    assert_named_error(excinfo, case.names[0])
    if not case.is_head:
        with pytest.raises(DTypeError) as excinfo:
            case.call(case.make(), s, t.round().to(dtype), labels)
        assert_named_error(excinfo, case.names[1])


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_float16_on_cpu(case):
    """A float16 module on float16 inputs: the sensitive maths runs in float32, so the result
    is the float32 one up to the rounding of the inputs, the head weights and the output."""
    s, t, labels = case.inputs(8)
    reference = case.call(case.make(), s, t, labels)
    half = case.call(case.make().half(), s.half(), None if t is None else t.half(), labels)
    # features come back in the caller's dtype; a loss value in float32 (no float16 overflow)
    assert half.dtype == (torch.float16 if case.is_head else torch.float32)
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), reference, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_inputs_in_another_dtype_than_the_module(case, dtype):
    """Features in another dtype than the module's parameters, outside autocast: a loss runs
    its heads in their own dtype and answers in the student's dtype; a LayerNorm -> Linear head
    (a plain layer, like ``nn.Linear``) refuses with a DTypeError instead of torch's matmul
    error; the orthogonal projector and whitening compute in float32 or wider anyway."""
    s, t, labels = case.inputs(8)
    module = case.make()
    s_cast, t_cast = s.to(dtype), None if t is None else t.to(dtype)
    if case.plain_layer:
        with pytest.raises(DTypeError) as excinfo:
            case.call(module, s_cast)
        assert_named_error(excinfo, case.names[0])
        return
    if dtype == torch.float64:  # float64 maths with float32 heads (random draws are per dtype)
        reference = case.call(case.make().double(), s_cast, t_cast, labels).float()
    else:  # float32 maths on rounded inputs
        reference = case.call(case.make(), s, t, labels)
    value = case.call(module, s_cast, t_cast, labels)
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert value.dtype == (dtype if case.is_head else loss_dtype) and torch.isfinite(value).all()
    close = {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float64: 1e-4}[dtype]
    torch.testing.assert_close(value.float(), reference, rtol=close, atol=close)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_non_contiguous_and_expanded(case):
    s, t, labels = case.inputs(8)
    reference = case.call(case.make(), s.clone(), t, labels)
    s_strided = s.transpose(0, -1).contiguous().transpose(0, -1)
    assert not s_strided.is_contiguous()
    torch.testing.assert_close(case.call(case.make(), s_strided, t, labels), reference)
    if t is not None:
        t_strided = t.transpose(0, -1).contiguous().transpose(0, -1)
        torch.testing.assert_close(case.call(case.make(), s, t_strided, labels), reference)
        # a teacher with one repeated sample (stride 0 on the batch): zero spread, finite loss
        finite_loss_and_grad(case, s, t[:1].expand_as(t), labels)
    # and a student collapsed to one repeated sample
    finite_loss_and_grad(case, s[:1].expand_as(s), t, labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_different_devices(case):
    s, t, labels = case.inputs(4)
    if not case.is_head:
        with pytest.raises(DeviceError) as excinfo:
            case.call(case.make().cuda(), s.cuda(), t, labels)
        assert_named_error(excinfo, *case.names, "labels")
    if case.labels:
        with pytest.raises(DeviceError) as excinfo:
            case.call(case.make().cuda(), s.cuda(), t.cuda(), labels)
        assert_named_error(excinfo, "labels")
    if any(True for _ in case.make().parameters()):  # owned parameters on another device
        with pytest.raises(DeviceError):
            case.call(case.make(), s.cuda(), None if t is None else t.cuda(), labels)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
@settings(max_examples=6 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(2, 9),
    student_exponent=st.sampled_from([-6, 0, 6]),
    teacher_exponent=st.sampled_from([-6, 0, 6]),
    seed=st.integers(0, 2**16),
)
def test_magnitudes_give_finite_results(case, batch, student_exponent, teacher_exponent, seed):
    generator = torch.Generator().manual_seed(seed)
    s, t, labels = case.inputs(
        max(batch, case.min_batch), 10.0**student_exponent, generator, 10.0**teacher_exponent
    )
    finite_loss_and_grad(case, s, t, labels)


# ------------------------------------------------------------------ labels
def _unconditional(case: Case) -> nn.Module:
    """The same loss without labels: what the conditional or joint loss reduces to when every
    sample has one class."""
    loss = case.make()
    inner = loss.loss_fn if isinstance(loss, featkd.GlobalBatch) else loss
    inner = inner.loss if isinstance(inner, featkd.KD2MLoss) else inner
    if isinstance(inner, featkd.JointWassersteinLoss):
        return featkd.WassersteinLoss(inner.solver)
    inner.conditional = False
    return inner


@pytest.mark.parametrize("case", LABELLED, ids=ids(LABELLED))
def test_labels_of_one_class(case):
    s, t, _ = case.inputs(8)
    one_class = torch.zeros(8, dtype=torch.long)
    value = finite_loss_and_grad(case, s, t, one_class)
    torch.testing.assert_close(value, _unconditional(case)(s, t))


@pytest.mark.parametrize("case", LABELLED, ids=ids(LABELLED))
@pytest.mark.parametrize(
    "labels", [[0, 0, 0, 0, 0, 7], [0, 2, 4, 6, 8, 10]], ids=["one_singleton", "all_singletons"]
)
def test_classes_seen_once(case, labels):
    s, t, _ = case.inputs(6)
    labels = torch.tensor(labels)
    s = s.requires_grad_(True)
    loss = case.call(case.make(), s, t, labels)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    # the sample alone in its class still pulls towards its teacher
    assert s.grad[-1].abs().sum() > 0


@pytest.mark.parametrize("case", LABELLED, ids=ids(LABELLED))
def test_bad_labels(case):
    s, t, labels = case.inputs(6)
    with pytest.raises(FeatkdInputError) as excinfo:
        case.call(case.make(), s, t, None)
    assert_named_error(excinfo, "labels")
    with pytest.raises(DTypeError) as excinfo:
        case.call(case.make(), s, t, labels.float())
    assert_named_error(excinfo, "labels")
    with pytest.raises(ShapeError) as excinfo:
        case.call(case.make(), s, t, labels[:, None])
    assert_named_error(excinfo, "labels")
    with pytest.raises(featkd.ChoiceError) as excinfo:
        case.call(case.make(), s, t, labels - 1)
    assert_named_error(excinfo, "labels")


# ------------------------------------------------------------------ FCFD
@pytest.fixture
def fcfd_setup():
    fcfd, student, teacher = tiny_fcfd()
    images = torch.randn(4, 3, 4, 4)
    with torch.no_grad():
        t_feats = stage_outputs(teacher, images)
    return fcfd, student, stage_outputs(student, images), t_feats


def test_fcfd_hostile_shapes(fcfd_setup):
    fcfd, _, s, t = fcfd_setup
    bad = {
        "student[0]": ([s[0].flatten(1), s[1]], t),  # wrong rank
        "student[1]": ([s[0], s[1][:, :2]], t),  # wrong width of the logits
        "teacher[0]": (s, [t[0][:, :, :2], t[1]]),  # wrong spatial size
        "teacher": (s, [t[0][:3], t[1][:3]]),  # batch mismatch
        "student": ([s[0]], t),  # a stage missing
    }
    for name, (student, teacher) in bad.items():
        with pytest.raises(ShapeError) as excinfo:
            fcfd(student, teacher)
        assert_named_error(excinfo, name)
    with pytest.raises(FeatkdInputError) as excinfo:
        fcfd(s[0], t)
    assert_named_error(excinfo, "student")
    with pytest.raises(ShapeError, match="zero-sized|batched") as excinfo:
        fcfd([x[:0] for x in s], [x[:0] for x in t])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fcfd_non_finite(fcfd_setup, bad):
    fcfd, _, s, t = fcfd_setup
    s = [x.detach().clone() for x in s]
    s[1][0, 1] = bad
    with pytest.raises(NonFiniteError) as excinfo:
        fcfd(s, t)
    assert_named_error(excinfo, "student[1]")
    t = [x.clone() for x in t]
    t[0].view(-1)[3] = bad
    with pytest.raises(NonFiniteError) as excinfo:
        fcfd([x.detach() for x in fcfd_setup[2]], t)
    assert_named_error(excinfo, "teacher[0]")


def test_fcfd_integer_tensors(fcfd_setup):
    fcfd, _, s, t = fcfd_setup
    with pytest.raises(DTypeError) as excinfo:
        fcfd([s[0].round().long(), s[1]], t)
    assert_named_error(excinfo, "student[0]")


def test_fcfd_batch_of_one_and_magnitudes():
    fcfd, student, teacher = tiny_fcfd()
    for batch, scale in ((1, 1.0), (3, 1e-6), (3, 1e6)):
        images = scale * torch.randn(batch, 3, 4, 4)
        with torch.no_grad():
            t_feats = stage_outputs(teacher, images)
        loss = fcfd(stage_outputs(student, images), t_feats)
        assert torch.isfinite(loss), (batch, scale)
        fcfd.zero_grad()
        student.zero_grad()
        loss.backward()
        grads = [p.grad for p in (*student.parameters(), *fcfd.parameters())]
        assert all(g is None or torch.isfinite(g).all() for g in grads), (batch, scale)


def test_fcfd_float16_stage_outputs_on_cpu():
    """Half-precision networks with the bridges left in float32: each bridge runs in its own
    dtype and hands back the dtype of the network it feeds."""
    fcfd, student, teacher = tiny_fcfd()
    images = torch.randn(4, 3, 4, 4)
    with torch.no_grad():
        t_feats = stage_outputs(teacher, images)
    reference = fcfd(stage_outputs(student, images), t_feats)
    student.half(), teacher.half()
    with torch.no_grad():
        t_half = stage_outputs(teacher, images.half())
    half = fcfd(stage_outputs(student, images.half()), t_half)
    assert half.dtype == torch.float32 and torch.isfinite(half)
    torch.testing.assert_close(half.float(), reference.detach(), rtol=2e-2, atol=2e-2)
    half.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters())


def test_fcfd_non_contiguous(fcfd_setup):
    fcfd, _, s, t = fcfd_setup
    torch.manual_seed(0)
    reference = fcfd(s, t)
    strided = [x.transpose(0, -1).contiguous().transpose(0, -1) for x in s]
    torch.testing.assert_close(fcfd(strided, t), reference)
    expanded = [x[:1].expand_as(x) for x in t]
    assert torch.isfinite(fcfd(s, expanded))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fcfd_different_devices(fcfd_setup):
    fcfd, _, s, t = fcfd_setup
    with pytest.raises(DeviceError):
        fcfd([x.cuda() for x in s], [x.cuda() for x in t])  # the bridges stayed on the CPU


# ------------------------------------------------------------------ drawn shapes
def _drawn_cases(d_s: int, d_t: int, tokens: int) -> list[Case]:
    """One loss or head of every family, built for widths and token counts drawn by hypothesis.
    ``d_t >= d_s`` (the teacher is the wider one, as every projector here assumes)."""
    up = lambda: nn.Linear(d_s, d_t)  # noqa: E731 - KD2M compares equal widths
    pair, token_pair = _pair(d_s, d_t), _tokens(tokens, d_s, d_t)
    return [
        Case(
            "VkD-tokens",
            lambda: featkd.VkDLoss(student_dim=d_s, teacher_dim=d_t, teacher_pool="patch_mean"),
            token_pair,
        ),
        Case(
            "VkD-whitening",
            lambda: featkd.VkDLoss(student_dim=d_s, teacher_dim=d_t, normalize="whitening"),
            pair,
        ),
        Case(
            "CosPress-tokens",
            lambda: featkd.CosPressLoss(student_dim=d_s, teacher_dim=d_t),
            token_pair,
        ),
        Case(
            "CosPress-pooled", lambda: featkd.CosPressLoss(student_dim=d_s, teacher_dim=d_t), pair
        ),
        Case(
            "Proteus-tokens",
            lambda: featkd.ProteusLoss(student_dim=d_s, teacher_dim=d_t),
            token_pair,
        ),
        Case("W2-sinkhorn", lambda: featkd.WassersteinLoss("sinkhorn", projector=up()), pair),
        Case("W2-sliced", lambda: featkd.WassersteinLoss("sliced", projector=up(), seed=0), pair),
        Case("GaussianW2", lambda: featkd.GaussianWassersteinLoss(projector=up()), pair),
        Case("GaussianKL", lambda: featkd.GaussianKLLoss(projector=up()), pair),
        Case("MMD-rbf", lambda: featkd.MMDLoss("rbf", projector=up()), pair),
        Case(
            "KD2M-conditional",
            lambda: featkd.KD2MLoss("w2_gaussian", conditional=True, projector=up()),
            pair,
            labels=True,
        ),
        Case("OrthogonalProjector", lambda: featkd.OrthogonalProjector(d_s, d_t), _head(d_s)),
        Case(
            "TeacherCompressionHead",
            lambda: featkd.TeacherCompressionHead(student_dim=d_s, teacher_dim=d_t),
            _head(d_t),
        ),
        Case("Whitening", lambda: featkd.Whitening(d_s), _head(d_s), names=X),
    ]


DRAWN_NAMES = [c.name for c in _drawn_cases(2, 3, 2)]


@pytest.mark.parametrize("name", DRAWN_NAMES)
@settings(
    max_examples=60 * SCALE,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    batch=st.integers(1, 9),
    d_s=st.integers(1, 24),
    extra_width=st.integers(0, 24),
    tokens=st.integers(1, 6),
    exponent=st.sampled_from([-6, 0, 6]),
    seed=st.integers(0, 2**16),
)
def test_drawn_shapes_give_finite_results_or_named_errors(
    name, batch, d_s, extra_width, tokens, exponent, seed
):
    """Widths, token counts, batch sizes and magnitudes drawn at random: every call either gives
    a finite loss with finite gradients, or refuses with a named ``FeatkdInputError``."""
    case = next(c for c in _drawn_cases(d_s, d_s + extra_width, tokens) if c.name == name)
    s, t, labels = case.inputs(batch, 10.0**exponent, torch.Generator().manual_seed(seed))
    if batch >= 4 and tokens >= 2:  # nothing to refuse here: a finite result is required
        finite_loss_and_grad(case, s, t, labels)
        return
    try:
        finite_loss_and_grad(case, s, t, labels)
    except FeatkdInputError as error:
        message = str(error)
        assert any(message.startswith(f"{n}:") for n in (*case.names, "labels")), message
        assert "expect" in message, message


def test_float16_loss_value_does_not_overflow():
    """Issue 11.4: a loss above float16's 65504 used to come back as ``inf`` (the gradient
    stayed finite, so GradScaler never noticed). Loss values are now float32 for half inputs."""
    generator = torch.Generator().manual_seed(0)
    s = torch.randn(16, 8, generator=generator) + 100.0
    t = torch.randn(16, 8, generator=generator)
    full = featkd.WassersteinLoss()(s, t)
    half = featkd.WassersteinLoss()(s.half(), t.half())
    assert float(full) > 65504  # would overflow float16
    assert half.dtype == torch.float32 and torch.isfinite(half)
    torch.testing.assert_close(half, full, rtol=1e-3, atol=0)

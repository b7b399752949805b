import numpy as np
import pytest
import torch

import featkd
from featkd import ChoiceError, DTypeError, NonFiniteError, ShapeError, VkDLoss
from featkd.functional import vkd_loss


def numpy_smooth_l1(a, b):
    d = np.abs(a - b)
    return np.where(d < 1.0, 0.5 * d**2, d - 0.5).mean()


def numpy_layer_norm(t, eps=1e-5):
    return (t - t.mean(1, keepdims=True)) / np.sqrt(t.var(1, keepdims=True) + eps)


def numpy_vkd(student_tokens, teacher_map, projection, distance="smooth_l1"):
    """The formula of METHODS.md section 1, written out with explicit loops."""
    b, _, d_s = student_tokens.shape
    s = np.zeros((b, d_s))
    for i in range(b):
        s[i] = student_tokens[i, 1:].mean(0)  # patch tokens only
    t = teacher_map.mean(axis=(2, 3))  # global average pool
    projected = s @ projection.T
    target = numpy_layer_norm(t)
    if distance == "mse":
        return ((projected - target) ** 2).mean()
    return numpy_smooth_l1(projected, target)


@pytest.mark.parametrize("distance", ["smooth_l1", "mse"])
def test_value_matches_transcription(rng, distance):
    student = rng.standard_normal((6, 1 + 9, 8))
    teacher = rng.standard_normal((6, 16, 3, 3)) * 2
    q, _ = np.linalg.qr(rng.standard_normal((16, 8)))
    value = vkd_loss(
        torch.from_numpy(student), torch.from_numpy(teacher), torch.from_numpy(q), distance=distance
    )
    assert value.item() == pytest.approx(numpy_vkd(student, teacher, q, distance), rel=1e-12)


def test_module_uses_its_projector_and_matches_function(rng):
    loss_fn = VkDLoss(student_dim=8, teacher_dim=16, distance="mse").double()
    with torch.no_grad():
        loss_fn.projector.generator.normal_(0, 0.3)
    student = torch.from_numpy(rng.standard_normal((5, 10, 8)))
    teacher = torch.from_numpy(rng.standard_normal((5, 16, 2, 2)))
    weight = loss_fn.projector.weight.detach().numpy()
    assert float(loss_fn(student, teacher).detach()) == pytest.approx(
        numpy_vkd(student.numpy(), teacher.numpy(), weight, "mse"), rel=1e-10
    )
    assert list(loss_fn.last_parts) == ["total", "vkd"]


def test_identity_projection_at_init():
    loss_fn = VkDLoss(student_dim=4, teacher_dim=6, normalize="none", distance="mse")
    s = torch.randn(3, 4)
    t = torch.cat([s, torch.zeros(3, 2)], dim=1)
    assert loss_fn(s, t).item() == pytest.approx(0.0, abs=1e-12)


def test_batch_standardize_applies_to_both_sides(rng):
    s = rng.standard_normal((7, 3))
    t = rng.standard_normal((7, 5)) * 4 + 2
    q, _ = np.linalg.qr(rng.standard_normal((5, 3)))

    def std(x):
        return (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)

    expected = ((std(s @ q.T) - std(t)) ** 2).mean()
    value = vkd_loss(
        torch.from_numpy(s),
        torch.from_numpy(t),
        torch.from_numpy(q),
        normalize="batch_standardize",
        distance="mse",
    )
    assert value.item() == pytest.approx(expected, rel=1e-10)


def test_whitening_target_and_eval_mode(rng):
    loss_fn = VkDLoss(student_dim=4, teacher_dim=6, normalize="whitening", distance="mse").double()
    s = torch.from_numpy(rng.standard_normal((64, 4)))
    t = torch.from_numpy(rng.standard_normal((64, 6)) @ rng.standard_normal((6, 6)))
    loss = loss_fn(s, t)
    xc = t.numpy() - t.numpy().mean(0)
    cov = xc.T @ xc / 64
    lower = np.linalg.cholesky(cov + 1e-5 * np.trace(cov) / 6 * np.eye(6))
    target = np.linalg.solve(lower, xc.T).T
    expected = ((s.numpy() @ np.eye(6, 4).T - target) ** 2).mean()
    assert loss.item() == pytest.approx(expected, rel=1e-8)
    loss_fn.eval()
    assert torch.isfinite(loss_fn(s[:1], t[:1]))


def test_gradient_routing():
    loss_fn = VkDLoss(student_dim=8, teacher_dim=16)
    s = torch.randn(4, 5, 8, requires_grad=True)
    t = torch.randn(4, 16, 3, 3, requires_grad=True)
    loss_fn(s, t).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert t.grad is None
    assert loss_fn.projector.generator.grad is not None


def test_gradcheck():
    loss_fn = VkDLoss(student_dim=3, teacher_dim=5, distance="mse").double()
    with torch.no_grad():
        loss_fn.projector.generator.normal_(0, 0.2)
    s = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, t), (s,))
    assert torch.autograd.gradcheck(
        lambda g: vkd_loss(s.detach(), t, torch.linalg.qr(g)[0], distance="smooth_l1"),
        (torch.randn(5, 3, dtype=torch.float64, requires_grad=True),),
    )


def test_training_reduces_the_loss():
    torch.manual_seed(0)
    teacher = torch.randn(64, 12)
    student = torch.nn.Linear(12, 6)
    loss_fn = VkDLoss(student_dim=6, teacher_dim=12)
    opt = torch.optim.Adam([*student.parameters(), *loss_fn.parameters()], lr=1e-2)
    first = None
    for _ in range(150):
        loss = loss_fn(student(teacher), teacher)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_bfloat16_and_autocast():
    loss_fn = VkDLoss(student_dim=8, teacher_dim=16)
    s, t = torch.randn(4, 8), torch.randn(4, 16)
    reference = loss_fn(s, t)
    value = loss_fn(s.bfloat16(), t.bfloat16())
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.float(), reference, rtol=3e-2, atol=3e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(loss_fn(s, t))


def test_errors():
    loss_fn = VkDLoss(student_dim=8, teacher_dim=16)
    with pytest.raises(ShapeError, match=r"student: expected last dimension D_s=8, got 7"):
        loss_fn(torch.randn(4, 7), torch.randn(4, 16))
    with pytest.raises(ShapeError, match=r"teacher: expected last dimension D_t=16"):
        loss_fn(torch.randn(4, 8), torch.randn(4, 15))
    with pytest.raises(ShapeError, match="teacher: expected batch size 4"):
        loss_fn(torch.randn(4, 8), torch.randn(3, 16))
    with pytest.raises(ShapeError, match="'gap' expects"):
        loss_fn(torch.randn(4, 5, 8), torch.randn(4, 5, 16))  # token teacher needs a token mode
    with pytest.raises(ShapeError, match=r"student: expected \(B, D_s\)"):
        loss_fn(torch.randn(4), torch.randn(4, 16))
    with pytest.raises(NonFiniteError, match="teacher"):
        loss_fn(torch.randn(4, 8), torch.full((4, 16), float("nan")))
    with pytest.raises(DTypeError):
        loss_fn(torch.ones(4, 8, dtype=torch.long), torch.randn(4, 16))
    with pytest.raises(ChoiceError, match="normalize: expected one of"):
        VkDLoss(student_dim=8, teacher_dim=16, normalize="group_norm")
    with pytest.raises(ChoiceError, match="distance: expected one of 'smooth_l1', 'mse'"):
        VkDLoss(student_dim=8, teacher_dim=16, distance="l1")
    with pytest.raises(ChoiceError, match="teacher_dim: expected >= student_dim=16"):
        VkDLoss(student_dim=16, teacher_dim=8)
    with pytest.raises(ShapeError, match="at least 2"):
        VkDLoss(student_dim=8, teacher_dim=16, normalize="batch_standardize")(
            torch.randn(1, 8), torch.randn(1, 16)
        )
    token_teacher = VkDLoss(student_dim=8, teacher_dim=16, teacher_pool="cls")
    assert torch.isfinite(token_teacher(torch.randn(4, 5, 8), torch.randn(4, 5, 16)))


# ------------------------------------------------------------------ options checked at construction (issue 11)
@pytest.mark.parametrize(
    ("options", "message"),
    [
        # eps=-1 and eps=nan returned NaN losses; eps=None raised a TypeError from inside torch
        ({"eps": -1.0}, r"eps: expected a finite number > 0, got -1.0"),
        ({"eps": float("nan")}, r"eps: expected a finite number > 0, got nan"),
        ({"eps": float("inf")}, r"eps: expected a finite number > 0, got inf"),
        ({"eps": None}, r"eps: expected a finite number > 0, got None"),
        ({"eps": 0, "normalize": "batch_standardize"}, r"eps: expected a finite number > 0"),
        ({"eps": True}, r"eps: expected a finite number > 0, got True"),
        # accepted, then refused by pool at the first call under the name "mode"
        ({"student_pool": "cls_token"}, r"student_pool: expected one of 'mean', 'cls'"),
        ({"teacher_pool": "avg"}, r"teacher_pool: expected one of 'mean', 'cls'"),
        ({"student_pool": "cls", "num_prefix_tokens": 0}, r"student_pool: 'cls' takes the first"),
        ({"num_prefix_tokens": -1}, r"num_prefix_tokens: expected an integer >= 0, got -1"),
        ({"num_prefix_tokens": 1.0}, r"num_prefix_tokens: expected an integer >= 0, got 1.0"),
    ],
)
def test_vkd_options_checked_at_construction(options, message):
    with pytest.raises(ChoiceError, match=message):
        VkDLoss(student_dim=8, teacher_dim=16, **options)


@pytest.mark.parametrize(
    ("dims", "message"),
    [
        ((0, 16), r"student_dim: expected an integer >= 1, got 0"),
        ((8, 16.0), r"teacher_dim: expected an integer >= 1, got 16.0"),
        ((True, 16), r"student_dim: expected an integer >= 1, got True"),
    ],
)
def test_vkd_widths_are_named_as_the_user_wrote_them(dims, message):
    # reported as in_features / out_features of the projector, or a TypeError, before
    with pytest.raises(ChoiceError, match=message):
        VkDLoss(student_dim=dims[0], teacher_dim=dims[1])
    with (
        pytest.warns(FutureWarning, match="positional widths"),
        pytest.raises(ChoiceError, match=message),
    ):
        VkDLoss(*dims)


def test_vkd_dtype_must_be_a_floating_torch_dtype():
    with pytest.raises(ChoiceError, match="dtype: expected None or one of torch.float16"):
        VkDLoss(student_dim=8, teacher_dim=16, dtype="float32")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"eps": -1.0}, "eps: expected a finite number > 0"),
        ({"eps": float("nan")}, "eps: expected a finite number > 0"),
        ({"eps": 0.0, "normalize": "batch_standardize"}, "eps: expected a finite number > 0"),
        ({"student_pool": "cls_token"}, "student_pool: expected one of"),
    ],
)
def test_vkd_loss_function_checks_its_options(options, message):
    student, teacher = torch.randn(4, 1 + 4, 8), torch.randn(4, 16, 2, 2)
    with pytest.raises(ChoiceError, match=message):
        vkd_loss(student, teacher, torch.eye(16, 8), **options)


def test_vkd_tiny_eps_on_a_constant_channel_stays_finite():
    # 1e-300 rounds to 0 in float32: (0 + 0)^(-1/2) made the loss and its gradient NaN
    for normalize in ("layer_norm", "batch_standardize"):
        loss_fn = VkDLoss(student_dim=4, teacher_dim=8, normalize=normalize, eps=1e-300)
        student = torch.randn(6, 4, requires_grad=True)
        loss = loss_fn(student, torch.full((6, 8), 3.0))
        loss.backward()
        assert torch.isfinite(loss) and bool(torch.isfinite(student.grad).all())


def test_whitening_teacher_on_another_device_is_a_device_error():
    """Found on an H200: with normalize="whitening" the teacher reached the running-statistics
    update before any device check, and torch failed there naming neither argument. A ``meta``
    tensor stands in for the second device on CPU."""
    previous = featkd.set_finite_check(False)  # a meta tensor has no values to check
    try:
        loss_fn = VkDLoss(student_dim=4, teacher_dim=6, normalize="whitening")
        with pytest.raises(featkd.DeviceError, match="^teacher: "):
            loss_fn(torch.randn(5, 4), torch.randn(5, 6, device="meta"))
        whitening = featkd.Whitening(6)
        with pytest.raises(featkd.DeviceError, match="^x: .*running statistics"):
            whitening(torch.randn(5, 6, device="meta"))
    finally:
        featkd.set_finite_check(previous)


def test_whitening_statistics_on_another_device_name_the_teacher():
    """Inputs together but the loss (its whitening statistics) left elsewhere: the error names
    the argument the user passed, not the inner module's ``x``."""
    previous = featkd.set_finite_check(False)
    try:
        loss_fn = VkDLoss(student_dim=4, teacher_dim=6, normalize="whitening")
        loss_fn.whitening.to("meta")
        with pytest.raises(featkd.DeviceError, match="^teacher: .*move the loss"):
            loss_fn(torch.randn(5, 4), torch.randn(5, 6))
    finally:
        featkd.set_finite_check(previous)


# ------------------------------------------------------------------ the loss contract (issue 12)
def _pair(batch=6, generator_seed=0):
    g = torch.Generator().manual_seed(generator_seed)
    return torch.randn(batch, 1 + 4, 4, generator=g), torch.randn(batch, 6, 2, 2, generator=g)


def _module(normalize, **options):
    loss_fn = VkDLoss(student_dim=4, teacher_dim=6, normalize=normalize, **options)
    with torch.no_grad():  # away from the identity
        loss_fn.projector.generator.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
    return loss_fn


def _function(loss_fn, student, teacher, **options):
    return vkd_loss(
        student,
        teacher,
        loss_fn.projector.weight,
        normalize=loss_fn.normalize,
        distance=loss_fn.distance,
        whitening=loss_fn.whitening,
        **options,
    )


@pytest.mark.parametrize("normalize", ["layer_norm", "batch_standardize", "whitening", "none"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_function_equals_module_in_train_and_eval_mode(normalize, reduction):
    """The function given the module's projection (and its whitening) is the module, in
    training mode (batch statistics, folded into the running ones) and in eval mode (the
    running statistics): the module's running statistics were not reachable from the
    function before, so in eval mode the two whitened differently."""
    student, teacher = _pair()
    module, twin = _module(normalize, reduction=reduction), _module(normalize)
    for step in range(3):  # training: the running statistics move the same way in both
        s, t = _pair(generator_seed=step)
        torch.testing.assert_close(
            module(s, t), _function(twin, s, t, reduction=reduction), rtol=0, atol=0
        )
    if normalize == "whitening":
        torch.testing.assert_close(module.whitening.running_cov, twin.whitening.running_cov)
        assert int(twin.whitening.num_batches_tracked) == 3
    module.eval(), twin.eval()
    for batch in (6, 1) if normalize in ("whitening", "layer_norm", "none") else (6,):
        s, t = student[:batch], teacher[:batch]
        torch.testing.assert_close(
            module(s, t), _function(twin, s, t, reduction=reduction), rtol=0, atol=0
        )
    if normalize == "whitening":  # eval mode whitens with the running statistics
        batch_whitened = vkd_loss(student, teacher, twin.projector.weight, normalize=normalize)
        assert not torch.equal(module(student, teacher), batch_whitened)


@pytest.mark.parametrize("normalize", ["layer_norm", "batch_standardize", "whitening", "none"])
@pytest.mark.parametrize("distance", ["smooth_l1", "mse"])
def test_reductions(normalize, distance):
    student, teacher = _pair(batch=7)
    values = {}
    for reduction in ("mean", "sum", "none"):
        loss_fn = _module(normalize, distance=distance, reduction=reduction)
        values[reduction] = loss_fn(student, teacher)
        assert torch.equal(loss_fn.last_parts["total"], values[reduction].detach())
        proj = loss_fn.projector.weight
        function = vkd_loss(
            student, teacher, proj, normalize=normalize, distance=distance, reduction=reduction
        )
        torch.testing.assert_close(function, values[reduction], rtol=0, atol=0)
    assert values["none"].shape == (7,)
    assert values["mean"].shape == values["sum"].shape == ()
    torch.testing.assert_close(values["none"].mean(), values["mean"])
    torch.testing.assert_close(values["none"].sum(), values["sum"])


def test_mean_reduction_is_the_elementwise_mean_bit_for_bit():
    # featkd 0.1 took one mean over every element; "mean" keeps those numbers exactly
    student, teacher = torch.randn(5, 8), torch.randn(5, 12)
    q = torch.linalg.qr(torch.randn(12, 8))[0]
    target = torch.nn.functional.layer_norm(teacher, (12,), eps=1e-5)
    expected = torch.nn.functional.smooth_l1_loss(student @ q.T, target)
    assert torch.equal(vkd_loss(student, teacher, q), expected)


def test_reduction_is_checked():
    with pytest.raises(ChoiceError, match="reduction: expected one of 'mean', 'sum', 'none'"):
        VkDLoss(student_dim=4, teacher_dim=6, reduction="batchmean")
    with pytest.raises(ChoiceError, match="reduction: expected one of"):
        vkd_loss(torch.randn(4, 4), torch.randn(4, 6), torch.eye(6, 4), reduction="max")


def test_labels_are_accepted_and_ignored():
    student, teacher = _pair()
    loss_fn = _module("layer_norm")
    labels = torch.arange(6)
    assert torch.equal(loss_fn(student, teacher, labels=labels), loss_fn(student, teacher))
    proj = loss_fn.projector.weight
    assert torch.equal(
        vkd_loss(student, teacher, proj, labels=labels), vkd_loss(student, teacher, proj)
    )


@pytest.mark.parametrize("normalize", ["layer_norm", "whitening"])
def test_inputs_are_checked_once(monkeypatch, normalize):
    """One finiteness check per input (one host read each): the module no longer checks,
    pools and then calls the checking function, and the owned whitening does not check again."""
    loss_fn = _module(normalize)
    student, teacher = _pair()
    calls = []
    original = torch.isfinite

    def counting(x):
        calls.append(tuple(x.shape))
        return original(x)

    monkeypatch.setattr(torch, "isfinite", counting)
    loss_fn(student, teacher)
    assert calls == [tuple(student.shape), tuple(teacher.shape)]
    calls.clear()
    _function(loss_fn, student, teacher)
    assert calls == [tuple(student.shape), tuple(teacher.shape)]


def test_keyword_widths_and_positional_future_warning():
    student, teacher = _pair()
    keyword = VkDLoss(student_dim=4, teacher_dim=6)
    with pytest.warns(FutureWarning, match=r"VkDLoss\(student_dim=4, teacher_dim=6\)"):
        positional = VkDLoss(4, 6)
    with pytest.warns(FutureWarning):
        mixed = VkDLoss(4, teacher_dim=6)
    for other in (positional, mixed):
        assert (other.student_dim, other.teacher_dim) == (4, 6)
        assert torch.equal(other(student, teacher), keyword(student, teacher))
    with pytest.raises(ChoiceError, match="teacher_dim: required"):
        VkDLoss(student_dim=4)
    with pytest.raises(ChoiceError, match="student_dim: given both by position and by keyword"):
        VkDLoss(4, student_dim=4, teacher_dim=6)


@pytest.mark.parametrize("positional", [False, True])
def test_zero_width_error_names_student_dim(positional):
    # it said "in_features: ...", the projector's name for it
    with pytest.raises(ChoiceError, match=r"^student_dim: expected an integer >= 1, got 0"):
        if positional:
            with pytest.warns(FutureWarning):
                VkDLoss(0, 24)
        else:
            VkDLoss(student_dim=0, teacher_dim=24)


def test_shrinkage_is_the_whitening_option_and_eps_its_old_name():
    student, teacher = _pair(batch=16)
    new = VkDLoss(student_dim=4, teacher_dim=6, normalize="whitening", shrinkage=1e-2)
    assert new.whitening.shrinkage == 1e-2
    with pytest.warns(FutureWarning, match="eps= is renamed to shrinkage="):
        old = VkDLoss(student_dim=4, teacher_dim=6, normalize="whitening", eps=1e-2)
    assert old.whitening.shrinkage == 1e-2
    assert torch.equal(old(student, teacher), new(student, teacher))
    with pytest.raises(ChoiceError, match="eps: renamed to shrinkage; pass only shrinkage"):
        VkDLoss(student_dim=4, teacher_dim=6, normalize="whitening", eps=1e-2, shrinkage=1e-2)
    with pytest.raises(ChoiceError, match="shrinkage: only used by normalize='whitening'"):
        VkDLoss(student_dim=4, teacher_dim=6, shrinkage=1e-2)
    with pytest.raises(ChoiceError, match="shrinkage: expected a finite number > 0, got 0"):
        VkDLoss(student_dim=4, teacher_dim=6, normalize="whitening", shrinkage=0)
    # eps keeps its one meaning elsewhere: the layer norm / standardisation epsilon
    assert VkDLoss(student_dim=4, teacher_dim=6, eps=1e-3).eps == 1e-3
    proj = new.projector.weight
    with pytest.warns(FutureWarning, match="vkd_loss: eps= is renamed to shrinkage="):
        by_eps = vkd_loss(student, teacher, proj, normalize="whitening", eps=1e-2)
    by_shrinkage = vkd_loss(student, teacher, proj, normalize="whitening", shrinkage=1e-2)
    assert torch.equal(by_eps, by_shrinkage)


def test_function_whitening_argument_is_checked():
    student, teacher = _pair()
    proj = torch.eye(6, 4)
    with pytest.raises(ChoiceError, match="whitening: only used by normalize='whitening'"):
        vkd_loss(student, teacher, proj, whitening=featkd.Whitening(6))
    with pytest.raises(ChoiceError, match="whitening: expected None or a featkd.Whitening"):
        vkd_loss(student, teacher, proj, normalize="whitening", whitening=torch.eye(6))
    with pytest.raises(ChoiceError, match="shrinkage: the whitening module has its own"):
        vkd_loss(
            student,
            teacher,
            proj,
            normalize="whitening",
            shrinkage=1e-3,
            whitening=featkd.Whitening(6),
        )
    with pytest.raises(ShapeError, match=r"whitening: expected dim D_t=6 .*got Whitening\(5\)"):
        vkd_loss(student, teacher, proj, normalize="whitening", whitening=featkd.Whitening(5))
    with pytest.raises(ShapeError, match=r"teacher: expected a batch of at least 2"):
        vkd_loss(
            student[:1], teacher[:1], proj, normalize="whitening", whitening=featkd.Whitening(6)
        )

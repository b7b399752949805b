import numpy as np
import pytest
import torch
from references import ref_vkd

import featkd
from featkd import ChoiceError, DTypeError, NonFiniteError, ShapeError, VkDLoss
from featkd.functional import vkd_loss


@pytest.mark.parametrize("distance", ["smooth_l1", "mse"])
def test_value_matches_transcription(rng, distance):
    student = rng.standard_normal((6, 1 + 9, 8))
    teacher = rng.standard_normal((6, 16, 3, 3)) * 2
    q, _ = np.linalg.qr(rng.standard_normal((16, 8)))
    value = vkd_loss(
        torch.from_numpy(student), torch.from_numpy(teacher), torch.from_numpy(q), distance=distance
    )
    assert value.item() == pytest.approx(ref_vkd(student, teacher, q, distance), rel=1e-12)


def test_module_uses_its_projector_and_matches_function(rng):
    loss_fn = VkDLoss(student_dim=8, teacher_dim=16, distance="mse").double()
    with torch.no_grad():
        loss_fn.projector.generator.normal_(0, 0.3)
    student = torch.from_numpy(rng.standard_normal((5, 10, 8)))
    teacher = torch.from_numpy(rng.standard_normal((5, 16, 2, 2)))
    weight = loss_fn.projector.weight.detach().numpy()
    assert float(loss_fn(student, teacher).detach()) == pytest.approx(
        ref_vkd(student.numpy(), teacher.numpy(), weight, "mse"), rel=1e-10
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

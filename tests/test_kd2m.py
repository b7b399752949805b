"""KD2MLoss front door, and properties every KD2M metric must have."""

from __future__ import annotations

import pytest
import torch

import featkd
from featkd import (
    ChoiceError,
    GaussianKLLoss,
    GaussianWassersteinLoss,
    KD2MLoss,
    MMDLoss,
    WassersteinLoss,
)
from featkd.functional import (
    gaussian_kl_loss,
    gaussian_wasserstein_loss,
    kd2m_loss,
    mmd_loss,
    wasserstein_loss,
)
from featkd.kd2m import METRICS

EXPECTED = {
    "w2_emd": (WassersteinLoss, wasserstein_loss, {"solver": "emd"}),
    "w2_sinkhorn": (WassersteinLoss, wasserstein_loss, {"solver": "sinkhorn"}),
    "w2_sliced": (WassersteinLoss, wasserstein_loss, {"solver": "sliced"}),
    "w2_gaussian": (GaussianWassersteinLoss, gaussian_wasserstein_loss, {"covariance": "full"}),
    "w2_gaussian_diag": (
        GaussianWassersteinLoss,
        gaussian_wasserstein_loss,
        {"covariance": "diag"},
    ),
    "kl_gaussian": (GaussianKLLoss, gaussian_kl_loss, {"covariance": "full"}),
    "kl_gaussian_diag": (GaussianKLLoss, gaussian_kl_loss, {"covariance": "diag"}),
    "mmd_rbf": (MMDLoss, mmd_loss, {"kernel": "rbf"}),
    "mmd_linear": (MMDLoss, mmd_loss, {"kernel": "linear"}),
    "mmd_poly": (MMDLoss, mmd_loss, {"kernel": "poly"}),
}


def test_every_metric_is_listed():
    assert set(METRICS) == set(EXPECTED)


@pytest.mark.parametrize("metric", sorted(EXPECTED))
def test_metric_builds_its_loss_and_matches_the_function(metric):
    cls, function, fixed = EXPECTED[metric]
    loss_fn = KD2MLoss(metric)
    assert type(loss_fn.loss) is cls
    s, t = torch.randn(12, 6, dtype=torch.float64), torch.randn(12, 6, dtype=torch.float64)
    seeded = {"seed": torch.Generator().manual_seed(0)} if metric == "w2_sliced" else {}
    if metric == "w2_sliced":
        loss_fn.loss.generator = torch.Generator().manual_seed(0)
    expected = function(s, t, **fixed, **seeded)
    torch.testing.assert_close(loss_fn(s, t), expected)
    if metric != "w2_sliced":
        torch.testing.assert_close(kd2m_loss(s, t, metric=metric), expected)
    assert loss_fn.last_parts is loss_fn.loss.last_parts


def test_options_reach_the_loss():
    loss_fn = KD2MLoss("w2_sinkhorn", reg=0.2, conditional=True)
    assert loss_fn.loss.reg == 0.2 and loss_fn.loss.conditional
    joint = KD2MLoss("w2_emd", label_weight=2.0)
    s, t = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 4, dtype=torch.float64)
    labels = torch.randint(0, 3, (10,))
    expected = wasserstein_loss(s, t, labels=labels, label_weight=2.0)
    torch.testing.assert_close(joint(s, t, labels=labels), expected)
    kl = KD2MLoss("kl_gaussian_diag", ridge=0.5, direction="teacher_student")
    torch.testing.assert_close(
        kl(s, t), gaussian_kl_loss(s, t, covariance="diag", ridge=0.5, direction="teacher_student")
    )


def test_errors_list_the_choices():
    with pytest.raises(ChoiceError) as error:
        KD2MLoss("wasserstein")
    message = str(error.value)
    assert message.startswith("metric: expected one of")
    assert all(repr(m) in message for m in EXPECTED)
    with pytest.raises(
        ChoiceError,
        match=r"reg: not an option of metric .w2_gaussian.*expected one of conditional, class_reduction, num_classes, projector",
    ):
        KD2MLoss("w2_gaussian", reg=0.1)
    with pytest.raises(ChoiceError, match="covariance: not an option of metric 'w2_gaussian'"):
        KD2MLoss("w2_gaussian", covariance="diag")  # the metric name fixes it
    with pytest.raises(ChoiceError, match="projector: the function form"):
        kd2m_loss(torch.randn(4, 2), torch.randn(4, 2), projector=torch.nn.Linear(2, 2))
    with pytest.raises(featkd.FeatkdInputError, match=r"projector: expected a torch\.nn\.Module"):
        KD2MLoss("mmd_rbf", projector=lambda x: x)


@pytest.mark.parametrize(
    ("metric", "options", "message"),
    [
        ("w2_sliced", {"seed": 2.5}, "seed: expected None, an integer seed >= 0"),
        ("w2_sinkhorn", {"conditional": "no"}, "conditional: expected True or False, got 'no'"),
        ("w2_sinkhorn", {"debias": 1}, "debias: expected True or False, got 1"),
        ("w2_emd", {"max_iter": True}, "max_iter: expected an integer >= 1, got True"),
        ("w2_sliced", {"n_projections": True}, "n_projections: expected an integer >= 1"),
    ],
)
def test_wasserstein_options_are_validated_at_construction(metric, options, message):
    with pytest.raises(ChoiceError, match=message):
        KD2MLoss(metric, **options)
    with pytest.raises(ChoiceError, match=message):
        kd2m_loss(torch.randn(8, 4), torch.randn(8, 4), metric=metric, **options)


def test_sliced_directions_resume_from_state_dict():
    s, t = torch.randn(12, 6, dtype=torch.float64), torch.randn(12, 6, dtype=torch.float64)
    run = KD2MLoss("w2_sliced", seed=4)
    for _ in range(3):
        run(s, t)
    checkpoint = run.state_dict()
    expected = torch.stack([run(s, t) for _ in range(2)])
    resumed = KD2MLoss("w2_sliced", seed=4)
    resumed.load_state_dict(checkpoint)
    assert torch.equal(torch.stack([resumed(s, t) for _ in range(2)]), expected)


@pytest.mark.parametrize("metric", sorted(EXPECTED))
def test_projector_is_owned_and_trained(metric):
    projector = torch.nn.Linear(6, 9)
    loss_fn = KD2MLoss(metric, projector=projector)
    assert loss_fn.projector is projector
    assert {id(p) for p in loss_fn.parameters()} == {id(p) for p in projector.parameters()}
    labels = torch.arange(12) % 3
    loss_fn(torch.randn(12, 6), torch.randn(12, 9), labels=labels).backward()
    assert projector.weight.grad is not None and projector.weight.grad.abs().sum() > 0


def _hard_cases(batch: int = 6, width: int = 10):
    x = torch.randn(batch, width)
    constant = torch.ones(batch, width)
    return {
        "identical": (x, x),
        "fewer_samples_than_dims": (torch.randn(4, 32), torch.randn(4, 32)),
        "constant_student": (constant, x),
        "constant_both": (constant, constant * 3),
        "magnitude_1e4": (x * 1e4, x.flip(0) * 1e4 + 5),
    }


@pytest.mark.parametrize("case", sorted(_hard_cases()))
@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("metric", sorted(EXPECTED))
def test_no_nan_or_inf(metric, conditional, case):
    s, t = _hard_cases()[case]
    # with labels, class 2 is seen exactly once
    labels = torch.tensor([0, 0, 1, 1, 0, 2][: s.shape[0]] + [1] * max(0, s.shape[0] - 6))
    labels = labels[: s.shape[0]]
    student = s.clone().requires_grad_()
    loss_fn = KD2MLoss(metric, conditional=conditional)
    loss = loss_fn(student, t, labels=labels if conditional else None)
    loss.backward()
    assert torch.isfinite(loss), (metric, case, float(loss))
    assert torch.isfinite(student.grad).all(), (metric, case)
    assert all(torch.isfinite(v).all() for v in loss_fn.last_parts.values())


@pytest.mark.parametrize("metric", sorted(EXPECTED))
def test_teacher_gets_no_gradient(metric):
    s = torch.randn(10, 5, requires_grad=True)
    t = torch.randn(10, 5, requires_grad=True)
    KD2MLoss(metric)(s, t).backward()
    assert t.grad is None and s.grad is not None


@pytest.fixture
def one_thread():
    """Tiny ops in a loop: one thread keeps OpenMP hand-offs from dominating each step."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize(
    "metric", ["w2_emd", "w2_sinkhorn", "w2_gaussian", "mmd_rbf", "kl_gaussian"]
)
def test_training_a_projector_matches_the_distributions(metric, one_thread):
    # a linear student trained on the loss alone moves towards the teacher's distribution
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(48, 4, generator=generator)
    teacher = inputs @ torch.randn(4, 6, generator=generator) + 2.0
    student = torch.nn.Linear(4, 6)
    # the Sinkhorn divergence (debiased) vanishes when the distributions match
    sinkhorn = {"reg": 0.1, "debias": True, "tol": None, "max_iter": 50}
    options = sinkhorn if metric == "w2_sinkhorn" else {}
    loss_fn = KD2MLoss(metric, **options)
    optimiser = torch.optim.Adam(student.parameters(), lr=0.1)
    first = float(loss_fn(student(inputs), teacher).detach())
    for _ in range(30):
        loss = loss_fn(student(inputs), teacher)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert float(loss_fn(student(inputs), teacher).detach()) < 0.2 * first


CONDITIONAL_OPTIONS = {
    "w2_emd": {},
    "w2_sinkhorn": {"reg": 0.5, "tol": 1e-14, "max_iter": 100_000},
    "w2_gaussian": {},
    "w2_gaussian_diag": {},
    "kl_gaussian": {"ridge": 0.1},
    "kl_gaussian_diag": {"ridge": 0.1},
    "mmd_rbf": {"bandwidth": [0.8, 2.0], "estimator": "unbiased"},
    "mmd_linear": {"estimator": "unbiased"},
    "mmd_poly": {},
}


@pytest.mark.parametrize("metric", sorted(CONDITIONAL_OPTIONS))
def test_conditional_gradcheck(metric):
    # classes of 3, 2 and 1 rows in D = 3 (zero-padded groups, a singleton class)
    generator = torch.Generator().manual_seed(1)
    s = torch.randn(6, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    labels = torch.tensor([2, 0, 2, 0, 2, 5])

    def fn(x):
        return kd2m_loss(
            x, t, metric=metric, labels=labels, conditional=True, **CONDITIONAL_OPTIONS[metric]
        )

    assert torch.autograd.gradcheck(fn, (s,), atol=1e-6)


def test_conditional_sliced_gradcheck():
    s = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 3, dtype=torch.float64)
    labels = torch.tensor([1, 1, 1, 0, 0, 3])

    def fn(x):  # the same directions at every evaluation
        return wasserstein_loss(
            x,
            t,
            labels=labels,
            solver="sliced",
            conditional=True,
            seed=torch.Generator().manual_seed(0),
        )

    assert torch.autograd.gradcheck(fn, (s,))


@pytest.mark.parametrize("metric", sorted(EXPECTED))
def test_bfloat16_inputs_compute_in_float32(metric):
    s, t = torch.randn(16, 8), torch.randn(16, 8)
    options = {"seed": 0} if metric == "w2_sliced" else {}
    low = KD2MLoss(metric, **options)(s.bfloat16(), t.bfloat16())
    high = KD2MLoss(metric, **options)(s.bfloat16().float(), t.bfloat16().float())
    assert low.dtype == torch.float32
    # the same float32 computation on the same values: a bfloat16 intermediate (rounding ~4e-3)
    # would fail this, rel=1e-2 let it through
    assert float(low) == pytest.approx(float(high), rel=1e-6)


# ------------------------------------------------------------------ the loss contract
LABELLED_METRICS = [m for m in METRICS if m != "w2_sliced"]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("conditional", [False, True])
def test_module_and_function_give_the_same_value_and_parts(metric, conditional):
    loss_cls, function, fixed = EXPECTED[metric]
    options = {**fixed, "conditional": conditional}
    if metric == "w2_sliced":
        options["seed"] = 0
    generator = torch.Generator().manual_seed(5)
    s = torch.randn(24, 5, generator=generator, dtype=torch.float64)
    t = torch.randn(24, 5, generator=generator, dtype=torch.float64)
    labels = torch.arange(24) % 3
    module = loss_cls(**options)
    value = module(s, t, labels=labels)
    assert float(value) == float(function(s, t, labels=labels, **options))
    parts = module.last_parts
    name = {
        WassersteinLoss: "wasserstein",
        GaussianWassersteinLoss: "gaussian_wasserstein",
        GaussianKLLoss: "gaussian_kl",
        MMDLoss: "mmd2",
    }[loss_cls]
    assert list(parts)[:2] == ["total", name]
    assert float(parts["total"]) == float(parts[name]) == float(value)
    assert ("classes" in parts) == conditional


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_batch_level_losses_refuse_a_per_sample_reduction_and_say_why(metric, reduction):
    loss_cls, function, fixed = EXPECTED[metric]
    why = "compares the two batches as distributions, so it has no per-sample values"
    with pytest.raises(
        ChoiceError, match=f"reduction: expected 'mean', got '{reduction}': .*{why}"
    ):
        loss_cls(**fixed, reduction=reduction)
    s = torch.randn(8, 3)
    with pytest.raises(ChoiceError, match=why):
        function(s, s.clone(), reduction=reduction, **fixed)
    with pytest.raises(ChoiceError, match=why):
        kd2m_loss(s, s.clone(), metric=metric, reduction=reduction)
    with pytest.raises(ChoiceError, match="reduction: expected one of"):
        loss_cls(**fixed, reduction="average")


def test_kd2m_takes_the_common_call_and_passes_the_logits_on():
    generator = torch.Generator().manual_seed(2)
    s = torch.randn(12, 4, generator=generator, dtype=torch.float64)
    t = torch.randn(12, 4, generator=generator, dtype=torch.float64)
    s_logits = torch.randn(12, 3, generator=generator, dtype=torch.float64)
    t_logits = torch.randn(12, 3, generator=generator, dtype=torch.float64)
    labels = torch.arange(12) % 3
    joint = KD2MLoss("w2_emd", label_weight=2.0)
    value = joint(s, t, labels=labels, student_logits=s_logits, teacher_logits=t_logits)
    expected = featkd.functional.joint_wasserstein_loss(
        s, t, labels=labels, label_weight=2.0, student_logits=s_logits, teacher_logits=t_logits
    )
    assert float(value) == float(expected)
    assert list(joint.last_parts)[:2] == ["total", "wasserstein"]
    # the logits change the cost: the softmaxes are not the one-hot labels
    assert float(value) != float(joint(s, t, labels=labels))
    function = kd2m_loss(
        s,
        t,
        metric="w2_emd",
        labels=labels,
        label_weight=2.0,
        student_logits=s_logits,
        teacher_logits=t_logits,
    )
    assert float(function) == float(expected)


def test_logits_are_never_silently_ignored():
    s, t, logits = torch.randn(8, 4), torch.randn(8, 4), torch.randn(8, 3)
    with pytest.raises(ChoiceError, match="student_logits: only the joint Wasserstein cost"):
        KD2MLoss("mmd_rbf")(s, t, student_logits=logits)
    with pytest.raises(ChoiceError, match="teacher_logits: only the joint Wasserstein cost"):
        kd2m_loss(s, t, metric="kl_gaussian", teacher_logits=logits)
    with pytest.raises(featkd.FeatkdInputError, match="student_logits: .* label_weight is 0"):
        WassersteinLoss()(s, t, student_logits=logits)
    with pytest.raises(featkd.FeatkdInputError, match="teacher_logits: .* label_weight is 0"):
        wasserstein_loss(s, t, teacher_logits=logits)


def test_wasserstein_generator_is_the_former_name_of_seed():
    s, t = torch.randn(16, 4), torch.randn(16, 4)
    with pytest.warns(FutureWarning, match="generator= is renamed to seed="):
        old = wasserstein_loss(s, t, solver="sliced", generator=7)
    assert float(old) == float(wasserstein_loss(s, t, solver="sliced", seed=7))
    with pytest.raises(ChoiceError, match="generator: renamed to seed; pass only seed"):
        wasserstein_loss(s, t, solver="sliced", generator=7, seed=7)


def test_the_student_gradient_guard_sees_the_raw_student_not_the_projection():
    """A projector's output always requires a gradient; a detached student must still warn."""
    loss_fn = KD2MLoss("mmd_linear", projector=torch.nn.Linear(4, 6))
    with pytest.warns(featkd.StudentGradientWarning, match="KD2MLoss|MMDLoss"):
        loss_fn(torch.randn(8, 4), torch.randn(8, 6))

"""KD2M parity options: each reproduces a computation of the official KD2M code (METHODS.md
section 5) and is checked against a float64 transcription in ``references.py``; the defaults
stay featkd's. (The differences table of docs/kd2m.md: tests/test_parity_docs.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from references import (
    numpy64,
    ref_bures_wasserstein,
    ref_class_sum,
    ref_emd_value,
    ref_gaussian_kl,
    ref_official_diag_gaussian_kl,
    ref_official_joint_emd,
    ref_official_rbf_mmd,
    ref_official_rbf_sigma,
)

from featkd import (
    GaussianKLLoss,
    GaussianWassersteinLoss,
    JointWassersteinLoss,
    KD2MLoss,
    MMDLoss,
    WassersteinLoss,
)
from featkd._checks import ChoiceError, FeatkdInputError
from featkd.functional import (
    gaussian_kl_loss,
    gaussian_wasserstein_loss,
    joint_wasserstein_loss,
    kd2m_loss,
    mmd_loss,
    wasserstein_loss,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "kd2m.md"


def _inputs(batch=12, width=3, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, width, generator=g, dtype=dtype)
    t = torch.randn(batch, width, generator=g, dtype=dtype) * 1.5 + 0.3
    # every class at least twice (a covariance per class), classes interleaved
    labels = torch.arange(batch) % classes
    return s, t, labels


# ------------------------------------------------------------------ class_reduction="sum"

_SUM_CASES = {
    "w2_emd": ref_emd_value,
    "w2_gaussian": ref_bures_wasserstein,
    "kl_gaussian": lambda p, q: ref_gaussian_kl(p, q, 1e-3),
    "kl_gaussian_diag": lambda p, q: ref_gaussian_kl(p, q, 1e-3, diagonal=True),
}


@pytest.mark.parametrize("metric", sorted(_SUM_CASES))
def test_class_sum_matches_the_official_reduction(metric):
    s, t, labels = _inputs()
    expected = ref_class_sum(_SUM_CASES[metric], numpy64(s), numpy64(t), labels.numpy())
    loss_fn = KD2MLoss(metric, conditional=True, class_reduction="sum")
    assert float(loss_fn(s, t, labels=labels)) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    function = kd2m_loss(
        s, t, metric=metric, labels=labels, conditional=True, class_reduction="sum"
    )
    assert float(function) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(
    "metric", ["w2_emd", "w2_sinkhorn", "w2_sliced", "w2_gaussian_diag", "mmd_rbf", "mmd_poly"]
)
def test_class_sum_is_the_mean_times_the_classes(metric):
    s, t, labels = _inputs(classes=4)
    options = {"seed": 3} if metric == "w2_sliced" else {}
    mean = KD2MLoss(metric, conditional=True, **options)
    total = KD2MLoss(metric, conditional=True, class_reduction="sum", **options)
    value = total(s, t, labels=labels)
    assert float(value) == pytest.approx(4 * float(mean(s, t, labels=labels)), rel=1e-9)
    # the parts add up to the total under the sum as under the mean
    parts = {k: v for k, v in total.last_parts.items() if k in ("mean", "covariance")}
    if parts:
        assert float(sum(parts.values())) == pytest.approx(float(value), rel=1e-9)


def test_class_sum_gradient_is_the_mean_gradient_times_the_classes():
    s, t, labels = _inputs(classes=3)
    grads = []
    for reduction in ("mean", "sum"):
        x = s.clone().requires_grad_(True)
        GaussianWassersteinLoss(conditional=True, class_reduction=reduction)(
            x, t, labels=labels
        ).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], 3 * grads[0])


@pytest.mark.parametrize(
    "build",
    [
        lambda **o: WassersteinLoss(**o),
        lambda **o: GaussianWassersteinLoss(**o),
        lambda **o: GaussianKLLoss(**o),
        lambda **o: MMDLoss(**o),
        lambda **o: KD2MLoss("w2_gaussian", **o),
    ],
)
def test_class_sum_without_classes_is_an_error(build):
    with pytest.raises(ChoiceError, match=r"^class_reduction: .*conditional=False"):
        build(class_reduction="sum")
    with pytest.raises(ChoiceError, match=r"^class_reduction: expected one of"):
        build(class_reduction="max", conditional=True)


@pytest.mark.parametrize(
    "function", [wasserstein_loss, gaussian_wasserstein_loss, gaussian_kl_loss, mmd_loss]
)
def test_class_sum_function_forms_check_it_too(function):
    s, t, labels = _inputs()
    with pytest.raises(ChoiceError, match=r"^class_reduction: "):
        function(s, t, labels=labels, class_reduction="sum")


# ------------------------------------------------------------------ joint feature-label cost


@pytest.mark.parametrize(
    ("label_cost", "reference"), [("logits_sqeuclidean", "logits"), ("kl_student_teacher", "cce")]
)
@pytest.mark.parametrize("beta", [0.5, 3.0])
def test_official_joint_cost_matches_the_reference(label_cost, reference, beta):
    s, t, _ = _inputs(batch=10, width=4)
    g = torch.Generator().manual_seed(5)
    z_s = torch.randn(10, 5, generator=g, dtype=torch.float64) * 2
    z_t = torch.randn(10, 5, generator=g, dtype=torch.float64) * 2
    expected = ref_official_joint_emd(
        numpy64(s), numpy64(t), numpy64(z_s), numpy64(z_t), beta, reference
    )
    options = {"label_cost": label_cost, "feature_cost_scale": "max"}
    logits = {"student_logits": z_s, "teacher_logits": z_t}
    values = [
        JointWassersteinLoss(beta, **options)(s, t, **logits),
        WassersteinLoss("emd", label_weight=beta, **options)(s, t, **logits),
        KD2MLoss("w2_emd", label_weight=beta, **options)(s, t, **logits),
        joint_wasserstein_loss(s, t, label_weight=beta, **options, **logits),
        kd2m_loss(s, t, metric="w2_emd", label_weight=beta, **options, **logits),
    ]
    for value in values:
        assert float(value) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_official_joint_cost_in_float32():
    s, t, _ = _inputs(batch=10, width=4, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    z_s, z_t = torch.randn(10, 5, generator=g), torch.randn(10, 5, generator=g)
    loss_fn = JointWassersteinLoss(2.0, label_cost="kl_student_teacher", feature_cost_scale="max")
    value = loss_fn(s, t, student_logits=z_s, teacher_logits=z_t)
    expected = ref_official_joint_emd(
        numpy64(s), numpy64(t), numpy64(z_s), numpy64(z_t), 2.0, "cce"
    )
    assert float(value) == pytest.approx(expected, rel=1e-5)


def test_official_joint_cost_gradients():
    """Envelope theorem with the plan fixed: the feature part's gradient is
    ``2 sum_j gamma_ij (s_i - t_j) / max F`` (the maximum detached) and the raw-logits part's
    ``2 beta sum_j gamma_ij (z_s,i - z_t,j)``; the teacher's logits get none."""
    import ot

    s, t, _ = _inputs(batch=8, width=3)
    g = torch.Generator().manual_seed(7)
    z_s = torch.randn(8, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    z_t = torch.randn(8, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    s = s.requires_grad_(True)
    beta = 1.5
    loss = JointWassersteinLoss(beta, label_cost="logits_sqeuclidean", feature_cost_scale="max")
    loss(s, t, student_logits=z_s, teacher_logits=z_t).backward()
    sn, tn, zs, zt = numpy64(s), numpy64(t), numpy64(z_s), numpy64(z_t)
    features = ot.dist(sn, tn)
    cost = features / features.max() + beta * ot.dist(zs, zt)
    plan = ot.emd(np.full(8, 1 / 8), np.full(8, 1 / 8), cost)
    grad_s = 2 * (plan.sum(1)[:, None] * sn - plan @ tn) / features.max()
    grad_z = 2 * beta * (plan.sum(1)[:, None] * zs - plan @ zt)
    np.testing.assert_allclose(numpy64(s.grad), grad_s, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(numpy64(z_s.grad), grad_z, rtol=1e-8, atol=1e-12)
    assert z_t.grad is None


def test_joint_cost_options_are_checked():
    with pytest.raises(ChoiceError, match=r"^feature_cost_scale: .*label_weight > 0"):
        WassersteinLoss("emd", feature_cost_scale="max")
    with pytest.raises(ChoiceError, match=r"^feature_cost_scale: expected one of"):
        JointWassersteinLoss(1.0, feature_cost_scale="mean")
    with pytest.raises(ChoiceError, match=r"^label_cost: expected one of"):
        JointWassersteinLoss(1.0, label_cost="kl")
    s, t, labels = _inputs(batch=6)
    z = torch.randn(6, 3, dtype=torch.float64)
    for kind in ("logits_sqeuclidean", "kl_student_teacher"):
        loss_fn = JointWassersteinLoss(1.0, label_cost=kind)
        with pytest.raises(FeatkdInputError, match=r"^teacher_logits: .*got None"):
            loss_fn(s, t, labels=labels, student_logits=z)
        with pytest.raises(FeatkdInputError, match=r"^student_logits: .*got None"):
            loss_fn(s, t, labels=labels, teacher_logits=z)


def test_scaled_feature_cost_survives_identical_single_points():
    """The maximum of an all-zero feature cost is taken as 1 (the plain division is 0/0)."""
    x = torch.ones(1, 3, dtype=torch.float64)
    z = torch.zeros(1, 2, dtype=torch.float64)
    value = JointWassersteinLoss(1.0, label_cost="logits_sqeuclidean", feature_cost_scale="max")(
        x, x, student_logits=z, teacher_logits=z
    )
    assert float(value) == 0.0


# ------------------------------------------------------------------ MMD bandwidth


def test_mean_distance_bandwidth_matches_the_reference():
    s, t, _ = _inputs(batch=9, width=4)
    loss_fn = MMDLoss("rbf", bandwidth="mean_distance")
    value = loss_fn(s, t)
    assert float(value) == pytest.approx(
        ref_official_rbf_mmd(numpy64(s), numpy64(t)), rel=1e-9, abs=1e-12
    )
    assert float(loss_fn.last_parts["bandwidth"]) == pytest.approx(
        ref_official_rbf_sigma(numpy64(s), numpy64(t)), rel=1e-9
    )
    function = mmd_loss(s, t, bandwidth="mean_distance")
    assert float(function) == pytest.approx(float(value), rel=1e-12)


def test_mean_distance_bandwidth_in_float32():
    s, t, _ = _inputs(batch=16, width=8, dtype=torch.float32)
    value = MMDLoss("rbf", bandwidth="mean_distance")(s * 10 + 100, t * 10 + 100)
    expected = ref_official_rbf_mmd(numpy64(s * 10 + 100), numpy64(t * 10 + 100))
    assert float(value) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("class_reduction", ["mean", "sum"])
def test_mean_distance_bandwidth_per_class(class_reduction):
    """Conditional: the official code applies the whole distance to each class, so each class
    has its own bandwidth; unequal class sizes exercise the padding."""
    s, t, _ = _inputs(batch=11, width=3)
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    loss_fn = MMDLoss(
        "rbf", bandwidth="mean_distance", conditional=True, class_reduction=class_reduction
    )
    value = float(loss_fn(s, t, labels=labels))
    expected = ref_class_sum(ref_official_rbf_mmd, numpy64(s), numpy64(t), labels.numpy())
    if class_reduction == "mean":
        expected /= 3
    assert value == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_mean_distance_bandwidth_takes_multipliers_and_identical_points():
    s, t, _ = _inputs(batch=6)
    single = mmd_loss(s, t, bandwidth="mean_distance")
    multi = mmd_loss(s, t, bandwidth="mean_distance", multipliers=(1.0, 1.0))
    torch.testing.assert_close(single, multi)
    x = torch.ones(4, 3, requires_grad=True)
    value = mmd_loss(x, torch.ones(4, 3), bandwidth="mean_distance")
    value.backward()
    assert float(value.detach()) == 0.0
    assert torch.isfinite(x.grad).all()


# ------------------------------------------------------------------ Gaussian KL floor


@pytest.mark.parametrize("direction", ["student_teacher", "teacher_student"])
def test_std_floor_matches_the_reference(direction):
    s, t, _ = _inputs(batch=10, width=4)
    loss_fn = GaussianKLLoss("diag", std_floor=1e-9, direction=direction)
    first, second = (s, t) if direction == "student_teacher" else (t, s)
    expected = ref_official_diag_gaussian_kl(numpy64(first), numpy64(second), 1e-9)
    assert float(loss_fn(s, t)) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    function = gaussian_kl_loss(s, t, covariance="diag", std_floor=1e-9, direction=direction)
    assert float(function) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert loss_fn.ridge == 0.0


def test_std_floor_scale_and_float32():
    """The floor stays in the features' units under the internal rescaling, and a floor
    comparable with the spread changes the value as the reference says."""
    s, t, _ = _inputs(batch=10, width=4, dtype=torch.float32)
    for scale, floor in ((1e-3, 1e-4), (1e3, 1e-9), (1.0, 0.5)):
        value = gaussian_kl_loss(s * scale, t * scale, covariance="diag", std_floor=floor)
        expected = ref_official_diag_gaussian_kl(numpy64(s * scale), numpy64(t * scale), floor)
        assert float(value) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("class_reduction", ["mean", "sum"])
def test_std_floor_per_class(class_reduction):
    s, t, labels = _inputs(batch=12, width=3, classes=3)
    value = KD2MLoss(
        "kl_gaussian_diag", std_floor=1e-9, conditional=True, class_reduction=class_reduction
    )(s, t, labels=labels)

    def official(p, q):
        return ref_official_diag_gaussian_kl(p, q, 1e-9)

    expected = ref_class_sum(official, numpy64(s), numpy64(t), labels.numpy())
    if class_reduction == "mean":
        expected /= 3
    assert float(value) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_std_floor_gradient_is_finite_at_a_constant_feature():
    s, t, _ = _inputs(batch=8, width=3)
    s = s.clone()
    s[:, 1] = 2.0
    s.requires_grad_(True)
    gaussian_kl_loss(s, t, covariance="diag", std_floor=1e-9).backward()
    assert torch.isfinite(s.grad).all()


def test_std_floor_options_are_checked():
    with pytest.raises(ChoiceError, match=r"^std_floor: .*covariance='diag'"):
        GaussianKLLoss("full", std_floor=1e-9)
    with pytest.raises(ChoiceError, match=r"^ridge: expected 0 or None with std_floor"):
        GaussianKLLoss("diag", std_floor=1e-9, ridge=1e-3)
    with pytest.raises(ChoiceError, match=r"^std_floor: expected a finite number > 0"):
        GaussianKLLoss("diag", std_floor=0.0)
    with pytest.raises(ChoiceError, match=r"^ridge: expected a finite number > 0"):
        GaussianKLLoss("diag", ridge=0.0)  # ridge 0 only with a std_floor
    assert GaussianKLLoss("diag", std_floor=1e-9, ridge=0.0).ridge == 0.0
    assert "std_floor=1e-09" in repr(GaussianKLLoss("diag", std_floor=1e-9))


# ------------------------------------------------------------------ defaults


def test_defaults_stay_featkds():
    assert KD2MLoss().loss.covariance == "full"
    assert isinstance(KD2MLoss().loss, GaussianWassersteinLoss)
    assert WassersteinLoss().feature_cost_scale == "none"
    assert WassersteinLoss(conditional=True).class_reduction == "mean"
    assert MMDLoss().bandwidth == "median"
    assert GaussianKLLoss("diag").std_floor is None
    assert GaussianKLLoss("diag").ridge == 1e-3

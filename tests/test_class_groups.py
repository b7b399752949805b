"""Class-conditional KD2M losses with ``num_classes``: static shapes, same values.

The static grouping (``G = min(num_classes, B)`` groups of ``B`` rows, spare groups for absent
classes) must give exactly what the grouping by the classes present gives, and both must equal
an independent reference: the unconditional loss on each class's rows, averaged (or summed)
over the classes in a Python loop.
"""

from __future__ import annotations

import pytest
import torch
from host_sync import record_host_syncs

import featkd
from featkd._sync import simulate_accelerator
from featkd.functional import gaussian_kl_loss

CONDITIONAL = {
    "w2-emd": lambda **o: featkd.WassersteinLoss("emd", **o),
    # a fixed number of iterations, so that the loop over classes runs the same ones
    "w2-sinkhorn": lambda **o: featkd.WassersteinLoss("sinkhorn", tol=None, max_iter=300, **o),
    "w2-sinkhorn-debiased": lambda **o: featkd.WassersteinLoss(
        "sinkhorn", debias=True, tol=None, max_iter=300, **o
    ),
    "w2-sliced": lambda **o: featkd.WassersteinLoss("sliced", seed=0, **o),
    "gaussian-w2-full": lambda **o: featkd.GaussianWassersteinLoss("full", **o),
    "gaussian-w2-diag": lambda **o: featkd.GaussianWassersteinLoss("diag", **o),
    "gaussian-kl-full": lambda **o: featkd.GaussianKLLoss("full", **o),
    "gaussian-kl-diag": lambda **o: featkd.GaussianKLLoss("diag", **o),
    "mmd-rbf": lambda **o: featkd.MMDLoss("rbf", **o),
    "mmd-rbf-mean-distance": lambda **o: featkd.MMDLoss("rbf", bandwidth="mean_distance", **o),
    "mmd-rbf-unbiased": lambda **o: featkd.MMDLoss("rbf", estimator="unbiased", **o),
    "mmd-linear": lambda **o: featkd.MMDLoss("linear", **o),
    "mmd-poly": lambda **o: featkd.MMDLoss("poly", **o),
    "kd2m": lambda **o: featkd.KD2MLoss("kl_gaussian_diag", **o),
}
# the sliced directions are drawn once per call, so the per-class loop would redraw them;
# the rbf rules pool distances over the whole batch, which no per-class call can see
NO_LOOP_REFERENCE = {"w2-sliced", "mmd-rbf", "mmd-rbf-unbiased"}


def _batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    s = torch.randn(20, 5, dtype=torch.float64, generator=generator)
    t = torch.randn(20, 5, dtype=torch.float64, generator=generator) + 0.3
    # classes 1, 4, 6 and 9 out of 10, in no order, sizes 2 to 8
    labels = torch.tensor([4, 1, 9, 4, 6, 1, 4, 9, 6, 4, 1, 4, 9, 6, 4, 1, 4, 9, 4, 6])
    return s, t, labels


def _value_and_grad(module, s, t, labels):
    student = s.clone().requires_grad_(True)
    value = module(student, t, labels=labels)
    value.backward()
    return value.detach(), student.grad, {k: v.detach() for k, v in module.last_parts.items()}


@pytest.mark.parametrize("class_reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", list(CONDITIONAL))
def test_static_groups_equal_the_classes_present(name, class_reduction):
    s, t, labels = _batch()
    options = {"conditional": True, "class_reduction": class_reduction}
    found = _value_and_grad(CONDITIONAL[name](**options), s, t, labels)
    static = _value_and_grad(CONDITIONAL[name](num_classes=10, **options), s, t, labels)
    torch.testing.assert_close(static[0], found[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(static[1], found[1], rtol=1e-9, atol=1e-12)
    assert static[2].keys() == found[2].keys()
    for key in found[2]:
        torch.testing.assert_close(
            static[2][key].double().cpu(), found[2][key].double().cpu(), rtol=1e-9, atol=1e-12
        )
    assert float(static[2]["classes"]) == 4.0


@pytest.mark.parametrize("class_reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", sorted(set(CONDITIONAL) - NO_LOOP_REFERENCE))
def test_static_groups_equal_a_loop_over_classes(name, class_reduction):
    s, t, labels = _batch(1)
    options = {"conditional": True, "class_reduction": class_reduction, "num_classes": 10}
    value, grad, _ = _value_and_grad(CONDITIONAL[name](**options), s, t, labels)
    student = s.clone().requires_grad_(True)
    per_class = [CONDITIONAL[name]()(student[labels == c], t[labels == c]) for c in labels.unique()]
    reference = torch.stack(per_class)
    reference = reference.sum() if class_reduction == "sum" else reference.mean()
    reference.backward()
    torch.testing.assert_close(value, reference.detach(), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(grad, student.grad, rtol=1e-7, atol=1e-12)


def test_more_classes_than_the_batch_holds():
    # num_classes above B: G = B groups, every class in the batch distinct
    s, t, _ = _batch()
    labels = torch.arange(20) * 7
    found = _value_and_grad(featkd.MMDLoss("linear", conditional=True), s, t, labels)
    static = _value_and_grad(
        featkd.MMDLoss("linear", conditional=True, num_classes=1000), s, t, labels
    )
    torch.testing.assert_close(static[0], found[0])
    torch.testing.assert_close(static[1], found[1])


def test_labels_past_num_classes_are_refused_on_cpu():
    s, t, labels = _batch()
    loss = featkd.GaussianWassersteinLoss("diag", conditional=True, num_classes=9)
    with pytest.raises(featkd.ChoiceError, match=r"labels: expected class indices < 9"):
        loss(s, t, labels=labels)


def test_labels_past_num_classes_are_counted_on_an_accelerator():
    # no host read: the rows whose labels are out of range are left out, and counted on the
    # device instead of raising
    s, t, labels = _batch()
    loss_fn = featkd.GaussianWassersteinLoss("diag", conditional=True, num_classes=3)
    with simulate_accelerator(), record_host_syncs() as syncs:
        value = loss_fn(s, t, labels=labels)
    assert syncs == []
    kept = labels < 3  # class 1 only
    reference = featkd.GaussianWassersteinLoss("diag", conditional=True)(
        s[kept], t[kept], labels=labels[kept]
    )
    torch.testing.assert_close(value, reference)
    outside = sum(1 for label in labels.tolist() if not 0 <= label < 3)  # every 4, 6 and 9
    assert outside == 16
    count = loss_fn.last_parts["labels_out_of_range"]
    assert count.dtype == torch.float32 and count.item() == outside


@pytest.mark.parametrize("name", list(CONDITIONAL))
def test_every_conditional_loss_counts_labels_out_of_range(name):
    s, t, labels = _batch()
    labels = labels.clone()
    labels[[0, 5]] = torch.tensor([12, -1])  # out of range both ways; 9 is the largest valid
    expected = sum(1 for label in labels.tolist() if not 0 <= label < 10)
    with simulate_accelerator():
        loss_fn = CONDITIONAL[name](conditional=True, num_classes=10)
        loss_fn(s, t, labels=labels)
        assert loss_fn.last_parts["labels_out_of_range"].item() == expected == 2
        loss_fn(s, t, labels=labels.clamp(0, 9))
        assert loss_fn.last_parts["labels_out_of_range"].item() == 0
    loss_fn(s, t, labels=labels.clamp(0, 9))  # CPU, eager: read and checked exactly instead
    assert "labels_out_of_range" not in loss_fn.last_parts


def test_labels_out_of_range_never_take_a_valid_class_slot():
    # a label out of range is neither a class of its own nor one that pushes a valid class out
    s, t, labels = _batch()
    labels = labels.clone()
    labels[3] = -1
    loss_fn = featkd.GaussianWassersteinLoss("diag", conditional=True, num_classes=10)
    with simulate_accelerator():
        value = loss_fn(s, t, labels=labels)
    kept = labels >= 0
    reference = featkd.GaussianWassersteinLoss("diag", conditional=True)(
        s[kept], t[kept], labels=labels[kept]
    )  # CPU: grouped by the classes present
    torch.testing.assert_close(value, reference)
    assert loss_fn.last_parts["labels_out_of_range"].item() == 1
    assert loss_fn.last_parts["classes"].item() == 4.0  # 1, 4, 6 and 9; the -1 is not a class
    # three slots and three valid classes: the -1 sorts first and once took the first slot,
    # pushing class 2 into the discarded one
    three = featkd.GaussianWassersteinLoss("diag", conditional=True, num_classes=3)
    rows = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    few = torch.tensor([-1, 0, 0, 1, 1, 2, 2])
    with simulate_accelerator():
        value = three(s[rows], t[rows], labels=few)
    assert three.last_parts["classes"].item() == 3.0
    reference = featkd.GaussianWassersteinLoss("diag", conditional=True)(
        s[rows[1:]], t[rows[1:]], labels=few[1:]
    )
    torch.testing.assert_close(value, reference)


@pytest.mark.parametrize(
    ("dtype", "classes"), [(torch.int8, 200), (torch.uint8, 300), (torch.int16, 40_000)]
)
def test_small_label_dtypes_with_many_classes(dtype, classes):
    # more classes than the labels' dtype can hold: the bound must not wrap around
    s, t, labels = _batch()
    loss_fn = featkd.MMDLoss("linear", conditional=True, num_classes=classes)
    expected = loss_fn(s, t, labels=labels)  # int64, CPU
    small = labels.to(dtype)
    torch.testing.assert_close(loss_fn(s, t, labels=small), expected)  # CPU: not refused
    with simulate_accelerator():
        torch.testing.assert_close(loss_fn(s, t, labels=small), expected)
    assert loss_fn.last_parts["labels_out_of_range"].item() == 0


def test_label_counts_follow_the_policy():
    s, t, labels = _batch()
    loss_fn = featkd.MMDLoss("linear", conditional=True, num_classes=3)
    previous = featkd.set_finite_check("off")
    try:
        with simulate_accelerator():
            loss_fn(s, t, labels=labels)
    finally:
        featkd.set_finite_check(previous)
    assert "labels_out_of_range" not in loss_fn.last_parts
    with simulate_accelerator():  # without num_classes any label is a class: nothing to count
        featkd.MMDLoss("linear", conditional=True)(s, t, labels=labels - 5)
        unconditional = featkd.MMDLoss("linear")
        unconditional(s, t, labels=labels)
    assert "labels_out_of_range" not in unconditional.last_parts


def test_joint_cost_counts_labels_past_the_logits_width_on_an_accelerator():
    # one side one-hot from the labels, the other softmax of 5-wide logits: labels must be < 5
    s, t, labels = _batch()
    teacher_logits = torch.randn(20, 5, dtype=torch.float64, generator=torch.Generator())
    loss_fn = featkd.JointWassersteinLoss(label_weight=1.0)
    with pytest.raises(featkd.ChoiceError, match="< 5"):
        loss_fn(s, t, labels=labels, teacher_logits=teacher_logits)
    with simulate_accelerator(), record_host_syncs() as syncs:
        value = loss_fn(s, t, labels=labels, teacher_logits=teacher_logits)
    assert syncs == [] and torch.isfinite(value)
    expected = sum(1 for label in labels.tolist() if not 0 <= label < 5)
    assert loss_fn.last_parts["labels_out_of_range"].item() == expected == 8  # the 6s and the 9s
    # a label out of range is a zero row of the one-hot side: the student's label term of
    # ||y_i - p_j||^2 is then ||p_j||^2, whatever the label's value
    moved = torch.where(labels >= 5, labels + 100, labels)
    with simulate_accelerator():
        torch.testing.assert_close(
            loss_fn(s, t, labels=moved, teacher_logits=teacher_logits), value
        )


def test_raising_policy_checks_labels_on_an_accelerator():
    s, t, labels = _batch()
    loss = featkd.GaussianWassersteinLoss("diag", conditional=True, num_classes=3)
    previous = featkd.set_finite_check("raise")
    try:
        with simulate_accelerator(), pytest.raises(featkd.ChoiceError, match="labels"):
            loss(s, t, labels=labels)
    finally:
        featkd.set_finite_check(previous)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "4"])
def test_bad_num_classes(bad):
    with pytest.raises(featkd.ChoiceError, match="num_classes"):
        featkd.MMDLoss(conditional=True, num_classes=bad)
    with pytest.raises(featkd.ChoiceError, match="num_classes"):
        gaussian_kl_loss(torch.randn(4, 2), torch.randn(4, 2), conditional=True, num_classes=bad)


@pytest.mark.parametrize("name", ["w2-emd", "gaussian-w2-full", "gaussian-kl-full", "mmd-rbf"])
def test_num_classes_needs_conditional(name):
    with pytest.raises(featkd.ChoiceError, match=r"num_classes: 10 .*conditional=True"):
        CONDITIONAL[name](num_classes=10)


def test_repr_names_num_classes():
    for name in ["w2-emd", "gaussian-w2-full", "gaussian-kl-full", "mmd-rbf"]:
        assert "num_classes=10" in repr(CONDITIONAL[name](conditional=True, num_classes=10))

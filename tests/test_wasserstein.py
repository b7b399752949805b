"""WassersteinLoss / wasserstein_loss / JointWassersteinLoss against POT on float64 numpy."""

from __future__ import annotations

import io
import warnings

import numpy as np
import ot
import pytest
import torch
from conftest import tolerance
from references import ref_entropic_ot, ref_per_class_emd, ref_softmax, ref_uniform

import featkd
from featkd import (
    ChoiceError,
    FeatkdInputError,
    JointWassersteinLoss,
    ShapeError,
    WassersteinLoss,
)
from featkd.functional import joint_wasserstein_loss, wasserstein_loss
from featkd.kd2m.wasserstein import SinkhornConvergenceWarning


@pytest.fixture(autouse=True)
def _sinkhorn_converges():
    """Every Sinkhorn call here converges unless its test expects the warning
    (``pytest.warns`` records it instead)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", SinkhornConvergenceWarning)
        yield


def _batches(rng, n=12, d=5, shift=0.5):
    s = rng.standard_normal((n, d))
    t = 1.3 * rng.standard_normal((n, d)) + shift
    return s, t


# ---------------------------------------------------------------- exact OT (POT network simplex)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_emd_matches_pot(rng, device, dtype, p):
    s, t = _batches(rng)
    expected = ot.emd2(ref_uniform(12), ref_uniform(12), ot.dist(s, t) ** (p / 2))
    got = wasserstein_loss(
        torch.tensor(s, dtype=dtype, device=device),
        torch.tensor(t, dtype=dtype, device=device),
        p=p,
    )
    assert got.dtype == dtype
    torch.testing.assert_close(
        got.cpu().double(), torch.tensor(expected, dtype=torch.float64), **tolerance(dtype)
    )


def test_emd_closed_forms(rng):
    s = torch.tensor(rng.standard_normal((10, 4)))
    shift = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    # a translation is transported straight: W_2^2 = ||shift||^2
    torch.testing.assert_close(wasserstein_loss(s, s + shift), shift.square().sum())
    assert float(wasserstein_loss(s, s)) == pytest.approx(0.0, abs=1e-12)
    # permuting the teacher rows changes nothing
    assert float(wasserstein_loss(s, s[torch.randperm(10)])) == pytest.approx(0.0, abs=1e-12)
    # N(0, 1) vs N(10, 1) on the line: W = 10
    line = torch.randn(200, 1, dtype=torch.float64)
    assert float(wasserstein_loss(line, line + 10)) == pytest.approx(100.0, rel=1e-12)


def test_emd_gradient_is_through_the_cost(rng):
    s = torch.tensor(rng.standard_normal((8, 3)), requires_grad=True)
    t = torch.tensor(rng.standard_normal((8, 3)))
    wasserstein_loss(s, t).backward()
    plan = ot.emd(ref_uniform(8), ref_uniform(8), ot.dist(s.detach().numpy(), t.numpy()))
    # d/ds_i sum_ij gamma_ij ||s_i - t_j||^2 = 2 sum_j gamma_ij (s_i - t_j)
    expected = 2 * (plan.sum(1)[:, None] * s.detach().numpy() - plan @ t.numpy())
    np.testing.assert_allclose(s.grad.numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["random", "clustered", "integer"])
def test_emd_plan_is_an_optimal_assignment_even_with_ties(rng, kind):
    """Between uniform measures on n points each, featkd's exact plan is an optimal assignment
    (a permutation over n), not the network simplex's plan: the same value as POT's, also where
    many plans are optimal (clustered points, integer coordinates)."""
    if kind == "clustered":  # 4 distinct points, repeated: ties everywhere
        s = np.repeat(rng.standard_normal((4, 6)), 10, axis=0)
        t = np.repeat(rng.standard_normal((4, 6)), 10, axis=0)[rng.permutation(40)]
    elif kind == "integer":
        s, t = rng.integers(0, 3, (40, 5)).astype(float), rng.integers(0, 3, (40, 5)).astype(float)
    else:
        s, t = _batches(rng, n=40)
    expected = ot.emd2(ref_uniform(40), ref_uniform(40), ot.dist(s, t))
    student = torch.tensor(s, requires_grad=True)
    loss_fn = WassersteinLoss("emd")
    loss = loss_fn(student, torch.tensor(t))
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # the gradient is that of sum_ij P_ij ||s_i - t_j||^2 with P a permutation / n: each
    # student row moves towards exactly one teacher row
    loss.backward()
    moves = s - student.grad.numpy() * 40 / 2
    matched = [np.flatnonzero((np.abs(t - row) < 1e-9).all(axis=1)) for row in moves]
    assert all(len(rows) >= 1 for rows in matched)
    # an iteration cap asks for POT's network simplex instead: the same value
    capped = WassersteinLoss("emd", max_iter=10**6)(torch.tensor(s), torch.tensor(t))
    assert float(capped) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # a cap that stops it before its plan is a coupling: the assignment, and a warning
    with pytest.warns(UserWarning, match="stopped at max_iter=3"):
        stopped = WassersteinLoss("emd", max_iter=3)(torch.tensor(s), torch.tensor(t))
    assert float(stopped) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_emd_gradcheck(rng):
    s = torch.tensor(rng.standard_normal((6, 3)), requires_grad=True)
    t = torch.tensor(rng.standard_normal((6, 3)))
    assert torch.autograd.gradcheck(lambda x: wasserstein_loss(x, t), (s,))
    assert torch.autograd.gradcheck(lambda x: wasserstein_loss(x, t, p=1.5), (s,))


# ---------------------------------------------------------------- entropic OT (log domain, torch)


def test_sinkhorn_matches_pot(rng, device, dtype):
    s, t = _batches(rng)
    reg = 2.0
    transport, objective = ref_entropic_ot(s, t, reg)
    loss_fn = WassersteinLoss("sinkhorn", reg=reg, relative_reg=False, tol=1e-7, max_iter=5000)
    got = loss_fn(
        torch.tensor(s, dtype=dtype, device=device), torch.tensor(t, dtype=dtype, device=device)
    )
    tol = {"rtol": 1e-7, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    assert float(got) == pytest.approx(objective, **{"rel": tol["rtol"], "abs": tol["atol"]})
    transport_got = float(loss_fn.last_parts["transport"])
    assert transport_got == pytest.approx(transport, **{"rel": tol["rtol"], "abs": tol["atol"]})


def test_sinkhorn_relative_reg_scales_by_the_mean_cost(rng):
    s, t = _batches(rng)
    cost = ot.dist(s, t)
    _, objective = ref_entropic_ot(s, t, 0.1 * cost.mean())
    got = wasserstein_loss(
        torch.tensor(s), torch.tensor(t), solver="sinkhorn", reg=0.1, tol=1e-12, max_iter=10_000
    )
    assert float(got) == pytest.approx(objective, rel=1e-8)


def test_sinkhorn_small_reg_approaches_emd(rng):
    s, t = _batches(rng, n=10)
    exact = ot.emd2(ref_uniform(10), ref_uniform(10), ot.dist(s, t))
    # converges slowly at small reg: 1e-4 takes about 13,000 iterations here
    got = wasserstein_loss(
        torch.tensor(s), torch.tensor(t), solver="sinkhorn", reg=1e-3, tol=1e-4, max_iter=20_000
    )
    assert float(got) == pytest.approx(exact, rel=1e-2)


def test_sinkhorn_fixed_iterations_and_tolerance():
    s, t = torch.randn(16, 4), torch.randn(16, 4)
    fixed = WassersteinLoss("sinkhorn", tol=None, max_iter=7)
    fixed(s, t)
    assert float(fixed.last_parts["iterations"]) == 7
    loose = WassersteinLoss("sinkhorn", tol=1e-1, check_every=5, max_iter=500)
    loose(s, t)
    iterations = float(loose.last_parts["iterations"])
    assert 1 <= iterations < 500
    assert float(loose.last_parts["marginal_error"]) <= 1e-1


def _standardised(x):
    return (x - x.mean(0)) / x.std(0)


@pytest.mark.parametrize(
    ("width", "noise", "seed"),
    [(64, 1.0, 0), (64, 1.0, 1), (16, 0.5, 0), (8, None, 0)],
    ids=["D64-correlated-0", "D64-correlated-1", "D16-correlated", "D8-independent"],
)
def test_sinkhorn_defaults_converge_at_batch_32(width, noise, seed):
    # standardised features, the student correlated with its teacher as in distillation
    # (eps = 0.05 mean(C), tol = 1e-4 needed 1,800-2,400 iterations on the first two)
    generator = torch.Generator().manual_seed(seed)
    teacher = _standardised(torch.randn(32, width, generator=generator))
    if noise is None:
        student = _standardised(torch.randn(32, width, generator=generator))
    else:
        student = _standardised(teacher + noise * torch.randn(32, width, generator=generator))
    loss_fn = WassersteinLoss("sinkhorn")
    got = float(loss_fn(student, teacher))  # unconverged would raise (autouse fixture)
    parts = loss_fn.last_parts
    assert float(parts["marginal_error"]) <= loss_fn.tol
    assert float(parts["iterations"]) < 1000
    s, t = student.double().numpy(), teacher.double().numpy()
    cost = ot.dist(s, t)
    eps = loss_fn.reg * cost.mean()
    _, objective = ref_entropic_ot(s, t, eps)
    # an L1 marginal error tol moves the value by at most about tol * (max C - min C)
    bound = 2 * loss_fn.tol * (cost.max() - cost.min()) + 1e-5 * objective
    assert abs(got - objective) <= bound
    # the entropic value lies between W_2^2 and W_2^2 + eps log B (the identity plan's KL)
    exact = ot.emd2(ref_uniform(32), ref_uniform(32), cost)
    assert exact - bound <= got <= exact + eps * np.log(32) + bound


def test_sinkhorn_unconverged_warns_once_per_instance():
    s, t = torch.randn(16, 4), torch.randn(16, 4)
    loss_fn = WassersteinLoss("sinkhorn", max_iter=2)
    with pytest.warns(SinkhornConvergenceWarning) as record:
        loss_fn(s, t)
        loss_fn(s, t)
    unconverged = [w for w in record if issubclass(w.category, SinkhornConvergenceWarning)]
    assert len(unconverged) == 1
    message = str(unconverged[0].message)
    assert "max_iter=2" in message and "tol=0.001" in message
    assert unconverged[0].filename == __file__  # points at the caller's line
    assert float(loss_fn.last_parts["marginal_error"]) > loss_fn.tol
    assert float(loss_fn.last_parts["iterations"]) == 2
    # a new instance warns again; the function form warns on every unconverged call
    with pytest.warns(SinkhornConvergenceWarning):
        WassersteinLoss("sinkhorn", max_iter=2)(s, t)
    with warnings.catch_warnings(record=True) as calls:
        warnings.simplefilter("always")
        for _ in range(2):
            wasserstein_loss(s, t, solver="sinkhorn", max_iter=2)
    assert [w.category for w in calls] == [SinkhornConvergenceWarning] * 2
    assert calls[0].filename == __file__
    # a fixed budget never tests the tolerance, so never warns (the fixture would raise)
    WassersteinLoss("sinkhorn", tol=None, max_iter=2)(s, t)


def test_sinkhorn_gradcheck(rng):
    s = torch.tensor(rng.standard_normal((6, 3)), requires_grad=True)
    t = torch.tensor(rng.standard_normal((6, 3)))
    for relative in (False, True):

        def fn(x, relative=relative):
            return wasserstein_loss(
                x, t, solver="sinkhorn", reg=0.5, relative_reg=relative, tol=1e-14, max_iter=100_000
            )

        assert torch.autograd.gradcheck(fn, (s,), atol=1e-6)


def test_sinkhorn_debias(rng):
    s, t = _batches(rng, n=10)
    reg = 5.0  # self-transport converges slowly at small reg
    cross = ref_entropic_ot(s, t, reg)[1]
    self_s = ref_entropic_ot(s, s, reg)[1]
    self_t = ref_entropic_ot(t, t, reg)[1]
    got = wasserstein_loss(
        torch.tensor(s),
        torch.tensor(t),
        solver="sinkhorn",
        reg=reg,
        relative_reg=False,
        debias=True,
        tol=1e-12,
        max_iter=10_000,
    )
    assert float(got) == pytest.approx(cross - 0.5 * self_s - 0.5 * self_t, rel=1e-8)
    same = wasserstein_loss(torch.tensor(s), torch.tensor(s), solver="sinkhorn", debias=True)
    assert abs(float(same)) < 1e-10
    x = torch.tensor(s, requires_grad=True)

    def gradient_check(x):
        return wasserstein_loss(
            x, torch.tensor(t), solver="sinkhorn", reg=1.0, debias=True, tol=1e-14, max_iter=50_000
        )

    assert torch.autograd.gradcheck(gradient_check, (x,), atol=1e-6)


# ---------------------------------------------------------------- sliced


def test_sliced_matches_pot_wasserstein_1d(rng):
    s, t = _batches(rng, n=20, d=6)
    directions = torch.randn(6, 50, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    directions = (directions / directions.norm(dim=0)).numpy()
    expected = np.mean(ot.wasserstein_1d(s @ directions, t @ directions, p=2))
    got = wasserstein_loss(
        torch.tensor(s),
        torch.tensor(t),
        solver="sliced",
        n_projections=50,
        seed=torch.Generator().manual_seed(3),
    )
    assert float(got) == pytest.approx(expected, rel=1e-10)


def test_sliced_in_one_dimension_is_exact(rng):
    s, t = _batches(rng, n=15, d=1)
    for p in (1.0, 2.0):
        exact = ot.emd2(ref_uniform(15), ref_uniform(15), ot.dist(s, t) ** (p / 2))
        got = wasserstein_loss(
            torch.tensor(s), torch.tensor(t), solver="sliced", p=p, n_projections=3
        )
        assert float(got) == pytest.approx(exact, rel=1e-10)


def test_sliced_seed_reproducible_and_gradcheck(rng):
    s, t = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 4, dtype=torch.float64)
    first, second = WassersteinLoss("sliced", seed=5), WassersteinLoss("sliced", seed=5)
    assert torch.equal(first(s, t), second(s, t))
    assert not torch.equal(first(s, t), WassersteinLoss("sliced", seed=6)(s, t))
    x = s.clone().requires_grad_()

    def fn(x):
        return wasserstein_loss(x, t, solver="sliced", seed=torch.Generator().manual_seed(0))

    assert torch.autograd.gradcheck(fn, (x,))


def test_sliced_integer_generator_matches_pot(rng):
    s, t = _batches(rng, n=20, d=6)
    directions = torch.randn(6, 50, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    directions = (directions / directions.norm(dim=0)).numpy()
    expected = np.mean(ot.wasserstein_1d(s @ directions, t @ directions, p=2))
    got = wasserstein_loss(
        torch.tensor(s), torch.tensor(t), solver="sliced", n_projections=50, seed=3
    )
    assert float(got) == pytest.approx(expected, rel=1e-10)
    # a torch.Generator is accepted as the module's seed and used as given
    own = WassersteinLoss("sliced", n_projections=50, seed=torch.Generator().manual_seed(3))
    assert float(own(torch.tensor(s), torch.tensor(t))) == pytest.approx(expected, rel=1e-10)


def _save_and_load(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)  # weights_only: the generator state is a plain uint8 tensor


def test_sliced_generator_state_resumes_from_state_dict():
    s, t = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 4, dtype=torch.float64)
    run = WassersteinLoss("sliced", seed=7, projector=torch.nn.Linear(4, 4).double())
    for _ in range(3):
        run(s, t)
    checkpoint = _save_and_load(run.state_dict())
    expected = [run(s, t).detach() for _ in range(2)]
    resumed = WassersteinLoss("sliced", seed=7, projector=torch.nn.Linear(4, 4).double())
    resumed.load_state_dict(checkpoint)
    got = [resumed(s, t).detach() for _ in range(2)]
    assert torch.equal(torch.stack(got), torch.stack(expected))
    # a fresh run would have restarted the sequence
    fresh = WassersteinLoss("sliced", seed=7)
    fresh.projector = resumed.projector
    assert not torch.equal(fresh(s, t).detach(), expected[0])


def test_unseeded_sliced_state_dict_round_trips():
    s, t = torch.randn(10, 4), torch.randn(10, 4)
    unseeded = WassersteinLoss("sliced")
    unseeded(s, t)
    state = _save_and_load(unseeded.state_dict())
    global_state = torch.get_rng_state()
    other = WassersteinLoss("sliced")
    other.load_state_dict(state)  # strict: the same keys
    assert torch.equal(torch.get_rng_state(), global_state)  # torch's generator is the user's
    torch.manual_seed(1)
    first = unseeded(s, t)
    torch.manual_seed(1)
    assert torch.equal(other(s, t), first)
    # a seeded module keeps its own generator; an unseeded one takes a seeded state's
    # parameters and says that the sequence is not resumed
    seeded = WassersteinLoss("sliced", seed=0, projector=torch.nn.Linear(4, 4))
    before = seeded.generator.get_state()
    seeded.load_state_dict({**state, **seeded.state_dict(), "_extra_state": state["_extra_state"]})
    assert torch.equal(seeded.generator.get_state(), before)
    unseeded = WassersteinLoss("sliced", projector=torch.nn.Linear(4, 4))
    global_state = torch.get_rng_state()
    with pytest.warns(UserWarning, match="generator's position, which is not restored") as got:
        unseeded.load_state_dict(seeded.state_dict())
    assert got[0].filename == __file__  # the user's line, not torch's load_state_dict
    torch.testing.assert_close(unseeded.projector.weight, seeded.projector.weight)
    assert torch.equal(torch.get_rng_state(), global_state)


# ---------------------------------------------------------------- class-conditional


def test_conditional_emd_matches_per_class_pot(rng):
    s, t = _batches(rng, n=17)
    labels = np.array([0] * 6 + [3] * 5 + [5] * 5 + [7])  # class 7 is seen once
    got = wasserstein_loss(
        torch.tensor(s), torch.tensor(t), labels=torch.tensor(labels), conditional=True
    )
    assert float(got) == pytest.approx(ref_per_class_emd(s, t, labels), rel=1e-12)


def test_conditional_sinkhorn_batched_over_classes(rng):
    s, t = _batches(rng, n=13)
    labels = np.array([1] * 7 + [2] * 5 + [9])
    expected = []
    for c in (1, 2, 9):
        rows = labels == c
        if rows.sum() == 1:  # one point each: plan is that pair, KL is zero
            expected.append(float(np.sum((s[rows] - t[rows]) ** 2)))
        else:
            expected.append(ref_entropic_ot(s[rows], t[rows], 0.8)[1])
    got = wasserstein_loss(
        torch.tensor(s),
        torch.tensor(t),
        labels=torch.tensor(labels),
        conditional=True,
        solver="sinkhorn",
        reg=0.8,
        relative_reg=False,
        tol=1e-12,
        max_iter=20_000,
    )
    assert float(got) == pytest.approx(np.mean(expected), rel=1e-8)


def test_conditional_sinkhorn_converges_like_its_slowest_class(rng):
    # classes of unequal sizes are zero-padded; the padding once turned every scaling of a
    # padded class into NaN, so only its exact log-domain steps (one block in ten) progressed
    s, t = rng.standard_normal((32, 16)), rng.standard_normal((32, 16))
    labels = np.repeat([0, 1, 2, 3], [5, 7, 10, 10])
    loss_fn = WassersteinLoss("sinkhorn", conditional=True)
    got = float(loss_fn(torch.tensor(s), torch.tensor(t), labels=torch.tensor(labels)))
    alone, expected, bounds = [], [], []
    for c in range(4):
        rows = labels == c
        single = WassersteinLoss("sinkhorn")
        single(torch.tensor(s[rows]), torch.tensor(t[rows]))
        alone.append(float(single.last_parts["iterations"]))
        cost = ot.dist(s[rows], t[rows])
        expected.append(ref_entropic_ot(s[rows], t[rows], loss_fn.reg * cost.mean())[1])
        bounds.append(2 * loss_fn.tol * (cost.max() - cost.min()))
    assert float(loss_fn.last_parts["iterations"]) <= max(alone)
    assert abs(got - np.mean(expected)) <= np.mean(bounds)


def test_conditional_sliced_matches_per_class(rng):
    s, t = _batches(rng, n=11, d=1)
    labels = np.array([0] * 5 + [1] * 5 + [2])
    got = wasserstein_loss(
        torch.tensor(s),
        torch.tensor(t),
        labels=torch.tensor(labels),
        conditional=True,
        solver="sliced",
        n_projections=2,
    )
    assert float(got) == pytest.approx(ref_per_class_emd(s, t, labels), rel=1e-10)


# ---------------------------------------------------------------- joint feature-label cost


def test_joint_with_labels_matches_pot(rng):
    s, t = _batches(rng, n=14)
    labels = rng.integers(0, 3, 14)
    beta = 4.0
    label_cost = 2.0 * (labels[:, None] != labels[None, :])
    expected = ot.emd2(ref_uniform(14), ref_uniform(14), ot.dist(s, t) + beta * label_cost)
    got = joint_wasserstein_loss(
        torch.tensor(s), torch.tensor(t), labels=torch.tensor(labels), label_weight=beta
    )
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_joint_large_weight_is_class_weighted_conditional(rng):
    # with a prohibitive label cost the plan stays inside classes: sum_c (n_c / B) W_c
    s, t = _batches(rng, n=12)
    labels = np.array([0] * 6 + [1] * 4 + [2] * 2)
    expected = 0.0
    for c in (0, 1, 2):
        rows = labels == c
        n = int(rows.sum())
        expected += n / 12 * ot.emd2(ref_uniform(n), ref_uniform(n), ot.dist(s[rows], t[rows]))
    got = joint_wasserstein_loss(
        torch.tensor(s), torch.tensor(t), labels=torch.tensor(labels), label_weight=1e4
    )
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_joint_with_logits_student_to_teacher(rng):
    s, t = _batches(rng, n=10)
    zs, zt = rng.standard_normal((10, 4)), rng.standard_normal((10, 4))
    ps, pt = ref_softmax(zs), ref_softmax(zt)
    beta = 3.0
    sq = ((ps[:, None, :] - pt[None, :, :]) ** 2).sum(-1)  # student i vs teacher j
    expected_sq = ot.emd2(ref_uniform(10), ref_uniform(10), ot.dist(s, t) + beta * sq)
    ce = -(np.log(ps) @ pt.T)  # -sum_k q_jk log p_ik
    expected_ce = ot.emd2(ref_uniform(10), ref_uniform(10), ot.dist(s, t) + beta * ce)
    logits_s = torch.tensor(zs, requires_grad=True)
    kwargs = {"student_logits": logits_s, "teacher_logits": torch.tensor(zt)}
    loss_fn = JointWassersteinLoss(label_weight=beta)
    got = loss_fn(torch.tensor(s), torch.tensor(t), **kwargs)
    assert float(got.detach()) == pytest.approx(expected_sq, rel=1e-12)
    got.backward()
    assert logits_s.grad is not None and logits_s.grad.abs().sum() > 0
    ce_fn = JointWassersteinLoss(label_weight=beta, label_cost="cross_entropy")
    assert float(ce_fn(torch.tensor(s), torch.tensor(t), **kwargs).detach()) == pytest.approx(
        expected_ce, rel=1e-12
    )
    # student logits against teacher one-hot labels
    labels = rng.integers(0, 4, 10)
    mixed = ((ps[:, None, :] - np.eye(4)[labels][None, :, :]) ** 2).sum(-1)
    expected_mixed = ot.emd2(ref_uniform(10), ref_uniform(10), ot.dist(s, t) + beta * mixed)
    got_mixed = loss_fn(
        torch.tensor(s),
        torch.tensor(t),
        labels=torch.tensor(labels),
        student_logits=torch.tensor(zs),
    )
    assert float(got_mixed) == pytest.approx(expected_mixed, rel=1e-12)


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.uint8, torch.int16, torch.int8])
def test_joint_accepts_every_integer_label_dtype(rng, label_dtype):
    s, t = _batches(rng, n=12)
    zs = rng.standard_normal((12, 4))
    labels = rng.integers(0, 4, 12)
    beta = 2.0
    # student logits against the teacher's one-hot labels (the one_hot path)
    mixed = ((ref_softmax(zs)[:, None, :] - np.eye(4)[labels][None, :, :]) ** 2).sum(-1)
    expected_mixed = ot.emd2(ref_uniform(12), ref_uniform(12), ot.dist(s, t) + beta * mixed)
    one_hot = 2.0 * (labels[:, None] != labels[None, :])
    expected_labels = ot.emd2(ref_uniform(12), ref_uniform(12), ot.dist(s, t) + beta * one_hot)
    student, teacher = torch.tensor(s), torch.tensor(t)
    narrow = torch.tensor(labels).to(label_dtype)
    wide = torch.tensor(labels, dtype=torch.int64)
    loss_fn = JointWassersteinLoss(label_weight=beta)
    for given in (narrow, wide):
        got = loss_fn(student, teacher, labels=given, student_logits=torch.tensor(zs))
        assert float(got) == pytest.approx(expected_mixed, rel=1e-12)
        got = joint_wasserstein_loss(student, teacher, labels=given, label_weight=beta)
        assert float(got) == pytest.approx(expected_labels, rel=1e-12)
    conditional = wasserstein_loss(student, teacher, labels=narrow, conditional=True)
    assert float(conditional) == pytest.approx(ref_per_class_emd(s, t, labels), rel=1e-12)


def test_joint_sinkhorn_gradcheck(rng):
    s = torch.tensor(rng.standard_normal((6, 3)), requires_grad=True)
    z = torch.tensor(rng.standard_normal((6, 3)), requires_grad=True)
    t, zt = torch.tensor(rng.standard_normal((6, 3))), torch.tensor(rng.standard_normal((6, 3)))

    def fn(x, logits):
        return joint_wasserstein_loss(
            x,
            t,
            student_logits=logits,
            teacher_logits=zt,
            solver="sinkhorn",
            reg=0.5,
            tol=1e-14,
            max_iter=100_000,
        )

    assert torch.autograd.gradcheck(fn, (s, z), atol=1e-6)


# ---------------------------------------------------------------- module, routing, robustness


def test_module_equals_function_and_routes_gradient(rng):
    s = torch.randn(12, 6, requires_grad=True)
    t = torch.randn(12, 6, requires_grad=True)
    loss_fn = WassersteinLoss("sinkhorn", reg=0.1)
    loss = loss_fn(s, t)
    torch.testing.assert_close(loss, wasserstein_loss(s, t, solver="sinkhorn", reg=0.1))
    loss.backward()
    assert s.grad is not None and t.grad is None
    assert set(loss_fn.last_parts) >= {"wasserstein", "transport", "entropy", "iterations"}
    assert all(not v.requires_grad for v in loss_fn.last_parts.values())


def test_projector_is_owned_and_trained():
    projector = torch.nn.Linear(5, 8)
    loss_fn = WassersteinLoss(projector=projector)
    assert list(loss_fn.parameters()) == list(projector.parameters())
    loss_fn(torch.randn(10, 5), torch.randn(10, 8)).backward()
    assert projector.weight.grad is not None and projector.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("solver", ["emd", "sinkhorn", "sliced"])
@pytest.mark.parametrize("p", [1.0, 2.0])
def test_no_nan_at_zero_distances(solver, p):
    x = torch.randn(8, 5)
    for s, t in [(x, x), (torch.ones(8, 5), torch.ones(8, 5)), (x * 1e4, x * 1e4 + 1)]:
        student = s.clone().requires_grad_()
        loss = wasserstein_loss(student, t, solver=solver, p=p)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_half_precision_runs_in_float32():
    s, t = torch.randn(8, 4), torch.randn(8, 4)
    got = wasserstein_loss(s.bfloat16(), t.bfloat16())
    assert got.dtype == torch.float32
    # the same values in float32: equal up to float32 rounding (a bfloat16 computation is not)
    assert float(got) == pytest.approx(
        float(wasserstein_loss(s.bfloat16().float(), t.bfloat16().float())), rel=1e-6
    )


# options the constructor accepted (or failed on deep inside torch) before they were validated
INVALID_OPTIONS = [
    ({"solver": "sliced", "seed": 2.5}, "seed: expected None, an integer seed >= 0"),
    ({"solver": "sliced", "seed": -1}, "seed: expected None, an integer seed >= 0"),
    ({"solver": "sliced", "seed": True}, "seed: expected None, an integer seed >= 0"),
    ({"solver": "sliced", "seed": "0"}, "seed: expected None, an integer seed >= 0"),
    ({"conditional": "no"}, "conditional: expected True or False, got 'no'"),
    ({"solver": "sinkhorn", "relative_reg": 1}, "relative_reg: expected True or False, got 1"),
    ({"solver": "sinkhorn", "debias": "yes"}, "debias: expected True or False, got 'yes'"),
    ({"solver": "sinkhorn", "max_iter": True}, "max_iter: expected an integer >= 1, got True"),
    ({"solver": "sinkhorn", "check_every": True}, "check_every: expected an integer >= 1"),
    ({"solver": "sliced", "n_projections": True}, "n_projections: expected an integer >= 1"),
]


@pytest.mark.parametrize(("options", "message"), INVALID_OPTIONS)
def test_every_option_is_validated_at_construction(options, message):
    with pytest.raises(ChoiceError, match=message):
        WassersteinLoss(**options)
    # the options that also apply to the joint loss (a sinkhorn one)
    shared = ("relative_reg", "debias", "max_iter", "check_every")
    joint = {k: v for k, v in options.items() if k in shared}
    if joint:
        with pytest.raises(ChoiceError, match=message):
            JointWassersteinLoss(solver="sinkhorn", **joint)
    # the function form: the same checks before any maths
    s, t = torch.randn(8, 4), torch.randn(8, 4)
    with pytest.raises(ChoiceError, match=message):
        wasserstein_loss(s, t, **options)


def test_errors():
    s, t = torch.randn(8, 4), torch.randn(8, 4)
    with pytest.raises(ChoiceError, match="solver: expected one of 'emd', 'sinkhorn', 'sliced'"):
        WassersteinLoss("exact")
    with pytest.raises(ChoiceError, match="p: expected a finite number >= 1"):
        wasserstein_loss(s, t, p=0.5)
    with pytest.raises(ChoiceError, match="reg"):
        WassersteinLoss("sinkhorn", reg=0.0)
    with pytest.raises(FeatkdInputError, match=r"labels: expected class indices of shape \(8,\)"):
        wasserstein_loss(s, t, conditional=True)
    with pytest.raises(ShapeError, match="projector="):
        wasserstein_loss(s, torch.randn(8, 5))
    with pytest.raises(ShapeError, match=r"teacher: expected batch size 8"):
        wasserstein_loss(s, torch.randn(7, 4))
    with pytest.raises(ShapeError, match=r"student: expected \(B, D\), got \(8, 4, 2\)"):
        wasserstein_loss(torch.randn(8, 4, 2), t)
    with pytest.raises(ChoiceError, match=r"label_weight.*'sliced'"):
        WassersteinLoss("sliced", label_weight=1.0)
    with pytest.raises(ChoiceError, match="debias"):
        WassersteinLoss("emd", debias=True)
    with pytest.raises(ChoiceError, match="label_weight: expected 0 with conditional"):
        WassersteinLoss(conditional=True, label_weight=1.0)
    with pytest.raises(ChoiceError, match="solver: the joint"):
        JointWassersteinLoss(solver="sliced")
    with pytest.raises(FeatkdInputError, match="student_logits: label_cost='cross_entropy'"):
        joint_wasserstein_loss(
            s, t, labels=torch.zeros(8, dtype=torch.long), label_cost="cross_entropy"
        )
    with pytest.raises(FeatkdInputError, match=r"labels: expected class indices .* joint"):
        joint_wasserstein_loss(s, t)
    with pytest.raises(ChoiceError, match="labels: expected class indices < 3"):
        joint_wasserstein_loss(s, t, labels=torch.full((8,), 5), student_logits=torch.randn(8, 3))
    with pytest.raises(ShapeError, match="teacher_logits: expected 3 classes"):
        joint_wasserstein_loss(
            s, t, student_logits=torch.randn(8, 3), teacher_logits=torch.randn(8, 4)
        )
    with pytest.raises(ChoiceError, match="n_projections"):
        WassersteinLoss("sliced", n_projections=0)


def test_checkpoint_without_generator_state_still_loads():
    """A state_dict saved before the sliced generator's state was kept has no ``_extra_state``;
    a strict load must still work (the generator keeps its position)."""
    saved = WassersteinLoss("sliced", seed=0, projector=torch.nn.Linear(3, 4)).state_dict()
    del saved["_extra_state"]
    loaded = WassersteinLoss("sliced", seed=0, projector=torch.nn.Linear(3, 4))
    loaded.load_state_dict(saved)  # strict
    torch.testing.assert_close(loaded.projector.weight, saved["projector.weight"])


def test_convergence_warning_points_at_the_caller_through_wrappers():
    """Through KD2MLoss, GlobalBatch and the joint function the warning still names the user's
    line, not a line inside featkd (a fixed stacklevel landed in kd2m.py or joint_wasserstein.py)."""
    s, t, labels = torch.randn(16, 4), torch.randn(16, 4), torch.arange(16) % 3
    calls = {
        "KD2MLoss": lambda: featkd.KD2MLoss("w2_sinkhorn", max_iter=2)(s, t),
        "GlobalBatch": lambda: featkd.GlobalBatch(WassersteinLoss("sinkhorn", max_iter=2))(s, t),
        "joint": lambda: joint_wasserstein_loss(s, t, labels=labels, solver="sinkhorn", max_iter=2),
    }
    for name, call in calls.items():
        with pytest.warns(SinkhornConvergenceWarning) as record:
            call()
        assert record[0].filename == __file__, (name, record[0].filename)


@pytest.mark.parametrize("padded", [False, True])
def test_sinkhorn_group_with_broken_scalings_keeps_its_exact_step(monkeypatch, padded):
    """A group whose scaling updates under- or overflow (here: its kernel products forced to
    0, so its scalings are inf) keeps the potentials of the exact log-domain step; the other
    group is unaffected. The exact step is transcribed from the formula, not the code."""
    from featkd.kd2m import _transport

    gen = torch.Generator().manual_seed(0)
    cost = torch.rand(2, 5, 5, generator=gen, dtype=torch.float64) * 3
    log_a = torch.full((2, 5), -np.log(5.0), dtype=torch.float64)
    log_b = log_a.clone()
    if padded:  # the last member of group 1 is padding on both sides
        log_a[1, 4] = log_b[1, 4] = -np.inf
        log_a[1, :4] = log_b[1, :4] = -np.log(4.0)
    kwargs = dict(max_iter=6, tol=None, check_every=5, padded=padded)
    u_clean, v_clean, _, _ = _transport.sinkhorn_log(cost, log_a, log_b, **kwargs)

    kernel_times = _transport._kernel_times

    def broken(kernel, vector):
        out = kernel_times(kernel, vector).clone()
        out[1] = 0.0
        return out

    monkeypatch.setattr(_transport, "_kernel_times", broken)
    u, v, _, _ = _transport.sinkhorn_log(cost, log_a, log_b, **kwargs)
    torch.testing.assert_close(u[0], u_clean[0], rtol=0, atol=0)
    torch.testing.assert_close(v[0], v_clean[0], rtol=0, atol=0)
    # group 1: u = log a - LSE_j(v0_j - C_ij) with v0 = log b, then v = log b - LSE_i(u_i - C_ij)
    real = torch.isfinite(log_a[1])
    c = cost[1][real][:, real]
    la, lb = log_a[1][real], log_b[1][real]
    u_exact = la - torch.logsumexp(lb[None, :] - c, dim=1)
    v_exact = lb - torch.logsumexp(u_exact[:, None] - c, dim=0)
    torch.testing.assert_close(u[1][real], u_exact)
    torch.testing.assert_close(v[1][real], v_exact)
    assert torch.isfinite(u_clean).sum() == torch.isfinite(u).sum()

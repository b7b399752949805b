"""Multi-teacher distillation (issue 15): the loss, its standardisers and teacher dropping."""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.linalg
import torch
from host_sync import record_host_syncs
from references import ref_cosine_distance, ref_phi_standardize, ref_smooth_l1_per_vector
from torch import nn

import featkd
from featkd import MultiTeacherLoss, PHIStandardize, RunningStandardize, Teacher
from featkd._sync import simulate_accelerator
from featkd.functional import multi_teacher_loss
from featkd.multiteacher import hadamard_matrix


def _tokens(batch, tokens, width, seed, scale=1.0, shift=0.0):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, tokens, width, generator=generator, dtype=torch.float64) * scale + shift
    )


# ------------------------------------------------------------------ the terms
@pytest.mark.parametrize("term", ["cosine", "smooth_l1", "mse", "cosine_smooth_l1"])
def test_function_matches_numpy(term):
    s = {"a": _tokens(5, 7, 8, 0), "b": _tokens(5, 1, 6, 1)[:, 0]}
    t = {"a": _tokens(5, 7, 8, 2, scale=2.0), "b": _tokens(5, 1, 6, 3)[:, 0]}
    weights = {"a": 0.7, "b": 2.0}
    got = multi_teacher_loss(s, t, terms=term, weights=weights, reduction="none", mix=(0.6, 0.4))
    per_teacher = {}
    for name in s:
        a, b = s[name].numpy(), t[name].numpy()
        values = {
            "cosine": ref_cosine_distance(a, b),
            "smooth_l1": ref_smooth_l1_per_vector(a, b),
            "mse": ((a - b) ** 2).mean(-1),
            "cosine_smooth_l1": 0.6 * ref_cosine_distance(a, b)
            + 0.4 * ref_smooth_l1_per_vector(a, b),
        }[term]
        per_teacher[name] = values.reshape(5, -1).mean(axis=1)
    expected = sum(weights[n] * per_teacher[n] for n in s)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    mean = multi_teacher_loss(s, t, terms=term, weights=weights, mix=(0.6, 0.4))
    assert float(mean) == pytest.approx(expected.mean(), rel=1e-12)


def test_gradcheck_and_teacher_gets_no_gradient():
    s = {"a": _tokens(3, 4, 5, 0).requires_grad_(True)}
    t = {"a": _tokens(3, 4, 5, 1).requires_grad_(True)}
    for term in ("cosine", "smooth_l1", "mse", "cosine_smooth_l1"):
        assert torch.autograd.gradcheck(
            lambda x, term=term: multi_teacher_loss({"a": x}, t, terms=term), (s["a"],)
        )
    multi_teacher_loss(s, t).backward()
    assert t["a"].grad is None


def test_function_errors_name_the_argument():
    s, t = {"a": torch.randn(4, 8)}, {"a": torch.randn(4, 8)}
    with pytest.raises(featkd.FeatkdInputError, match=r"student: expected one tensor per teacher"):
        multi_teacher_loss({"b": s["a"]}, t)
    with pytest.raises(featkd.ShapeError, match=r"student\['a'\]: expected the shape"):
        multi_teacher_loss({"a": torch.randn(4, 6)}, t)
    with pytest.raises(featkd.ChoiceError, match=r"terms\['a'\]"):
        multi_teacher_loss(s, t, terms="l2")
    with pytest.raises(featkd.NonFiniteError, match=r"teacher\['a'\]"):
        multi_teacher_loss(s, {"a": torch.full((4, 8), float("nan"))})
    with pytest.raises(featkd.FeatkdInputError, match=r"weights: expected keys among"):
        multi_teacher_loss(s, t, weights={"aa": 2.0})
    with pytest.raises(featkd.ShapeError, match=r"keep\['a'\]"):
        multi_teacher_loss(s, t, keep={"a": torch.ones(3)})


# ------------------------------------------------------------------ one teacher = that loss
def test_one_teacher_equals_the_single_teacher_loss():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 1 + 16, 12), torch.randn(6, 1 + 16, 20)
    cospress = featkd.CosPressLoss(student_dim=12, teacher_dim=20)
    alone = featkd.CosPressLoss(student_dim=12, teacher_dim=20)
    alone.load_state_dict(cospress.state_dict())
    multi = MultiTeacherLoss(12, {"dino": Teacher(20, head="identity", term=cospress)})
    # the pooled form: CosPress on the summary vectors of the batch
    got = multi(student[:, 0], {"dino": teacher[:, 0]})
    expected = alone(student[:, 0], teacher[:, 0])
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    for key in ("total", "global", "cls"):  # CosPress's parts on pooled inputs
        assert torch.equal(multi.last_parts[f"dino/summary/{key}"], alone.last_parts[key])


def test_one_teacher_with_a_linear_head_equals_the_cosine_of_its_output():
    torch.manual_seed(0)
    loss_fn = MultiTeacherLoss(8, {"t": Teacher(6, tokens="both", patch_weight=0.5)})
    student = torch.randn(3, 1 + 9, 8, requires_grad=True)
    teacher = torch.randn(3, 1 + 9, 6)
    got = loss_fn(student, {"t": teacher})
    head = loss_fn.parts["t"].head
    with torch.no_grad():
        summary = ref_cosine_distance(head(student[:, 0]).numpy(), teacher[:, 0].numpy())
        patches = ref_cosine_distance(head(student[:, 1:]).numpy(), teacher[:, 1:].numpy())
    expected = summary.mean() + 0.5 * patches.mean(axis=1).mean()
    assert float(got) == pytest.approx(expected, rel=1e-5)
    got.backward()
    assert head.weight.grad is not None and student.grad is not None


def test_patch_grids_are_aligned_to_the_teacher():
    torch.manual_seed(0)
    loss_fn = MultiTeacherLoss(4, {"t": Teacher(4, head="identity", tokens="patches")})
    student, teacher = torch.randn(2, 1 + 16, 4), torch.randn(2, 1 + 64, 4)
    got = loss_fn(student, {"t": teacher})
    resized = featkd.align_tokens(student[:, 1:], (8, 8), num_prefix_tokens=0)
    expected = ref_cosine_distance(resized.numpy(), teacher[:, 1:].numpy()).mean()
    assert float(got) == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------ standardisers
@pytest.mark.parametrize("size", [2, 4, 8, 64])
def test_hadamard_matrix_is_sylvesters_up_to_the_order_of_rows_and_columns(size):
    ours = (hadamard_matrix(size) * size**0.5).round().numpy()
    theirs = scipy.linalg.hadamard(size)
    # the same set of rows (a Kronecker product in the other order permutes rows and columns)
    assert sorted(map(tuple, np.sort(ours, axis=1))) == sorted(map(tuple, np.sort(theirs, axis=1)))
    np.testing.assert_allclose(ours @ ours.T, size * np.eye(size))


@pytest.mark.parametrize("size", [12, 20, 24, 384, 768, 1152])
def test_hadamard_matrix_of_paley_orders(size):
    h = hadamard_matrix(size).numpy()
    np.testing.assert_allclose(np.abs(h) * np.sqrt(size), 1.0, rtol=1e-12)
    np.testing.assert_allclose(h @ h.T, np.eye(size), atol=1e-12)


@pytest.mark.parametrize("size", [6, 10, 36])
def test_hadamard_matrix_of_an_unsupported_order_is_an_error(size):
    with pytest.raises(featkd.ShapeError, match=f"no Hadamard matrix of order {size}"):
        hadamard_matrix(size)


def test_phi_s_matches_the_direct_computation():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)) @ rng.standard_normal((8, 8)) * 3 + 2
    phis = PHIStandardize(8).double()
    got = phis(torch.tensor(x)).numpy()
    hadamard = hadamard_matrix(8).numpy()
    expected, _ = ref_phi_standardize(x, hadamard)
    # the eigenvectors' signs are free: y H = (x - mu) U S / a, so compare it up to signs
    np.testing.assert_allclose(np.abs(got @ hadamard), np.abs(expected @ hadamard), atol=1e-10)
    # isotropic: every output channel has variance 1
    np.testing.assert_allclose(got.var(axis=0), 1.0, rtol=1e-10)
    np.testing.assert_allclose(phis.inverse(torch.tensor(got)).numpy(), x, atol=1e-10)


def test_phi_s_fixes_the_eigenvectors_signs():
    # eigh's eigenvectors have arbitrary signs; PHI-S makes each one's largest entry positive,
    # so that a small change of the statistics cannot turn a target direction around
    rng = np.random.default_rng(3)
    phis = PHIStandardize(12).double()
    for _ in range(3):
        phis(torch.tensor(rng.standard_normal((50, 12)) @ rng.standard_normal((12, 12))))
        hadamard = hadamard_matrix(12)
        vectors = (hadamard.T @ phis.rotation).T  # rotation = H U^T, so U = (H^T R)^T
        largest = vectors.gather(0, vectors.abs().argmax(dim=0, keepdim=True))
        assert (largest > 0).all()
        torch.testing.assert_close(vectors.T @ vectors, torch.eye(12, dtype=torch.float64))


def test_running_statistics_are_those_of_every_batch_seen():
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((n, 5)) * rng.uniform(1, 9, 5) + 4 for n in (10, 30, 7)]
    running, phis = RunningStandardize(5).double(), PHIStandardize(8).double()
    for batch in batches:
        running(torch.tensor(batch))
        phis(torch.tensor(np.tile(batch, (1, 2))[:, :8]))
    everything = np.concatenate(batches)
    np.testing.assert_allclose(running.mean.numpy(), everything.mean(0), rtol=1e-12)
    np.testing.assert_allclose(running.second.numpy(), everything.var(0), rtol=1e-12)
    wide = np.tile(everything, (1, 2))[:, :8]
    np.testing.assert_allclose(phis.second.numpy(), np.cov(wide.T, bias=True), atol=1e-10)
    # eval mode reads the statistics and leaves them alone
    running.eval()
    before = running.mean.clone()
    y = running(torch.tensor(batches[0]))
    assert torch.equal(running.mean, before)
    expected = (batches[0] - everything.mean(0)) / np.sqrt(everything.var(0) + 1e-6)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-10)
    np.testing.assert_allclose(running.inverse(y).numpy(), batches[0], rtol=1e-10)


def test_exponential_average():
    rng = np.random.default_rng(2)
    first, second = rng.standard_normal((2, 20, 3))
    norm = RunningStandardize(3, momentum=0.25).double()
    norm(torch.tensor(first))
    norm(torch.tensor(second))
    mean = 0.75 * first.mean(0) + 0.25 * second.mean(0)
    # the mixture's variance: the weighted variances plus the spread of the means
    var = 0.75 * first.var(0) + 0.25 * second.var(0)
    var += 0.75 * 0.25 * (second.mean(0) - first.mean(0)) ** 2
    np.testing.assert_allclose(norm.mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(norm.second.numpy(), var, rtol=1e-12)


def test_statistics_are_saved_in_the_state_dict():
    loss_fn = MultiTeacherLoss(8, {"t": Teacher(8, normalize="phi_s", tokens="both")})
    loss_fn(torch.randn(4, 5, 8), {"t": torch.randn(4, 5, 8) * 3})
    copy = MultiTeacherLoss(8, {"t": Teacher(8, normalize="phi_s", tokens="both")})
    copy.load_state_dict(loss_fn.state_dict())
    for key, value in loss_fn.state_dict().items():
        if key == "_extra_state":  # the dropping generator's position: none without seed=
            assert value == copy.state_dict()[key] == {"generator_state": None}
            continue
        assert torch.equal(copy.state_dict()[key], value), key
    assert any(key.endswith("rotation") for key in loss_fn.state_dict())


# ------------------------------------------------------------------ dropping
def test_teacher_dropping_is_seeded_and_keeps_one_teacher_per_sample():
    specs = {name: Teacher(4, head="identity") for name in ("a", "b", "c")}
    student = torch.randn(2000, 4)
    teachers = {name: torch.randn(2000, 4) for name in specs}
    runs = []
    for _ in range(2):
        loss_fn = MultiTeacherLoss(4, specs, teacher_drop=0.5, seed=3, reduction="none")
        values = loss_fn(student, teachers)
        runs.append((values, loss_fn.last_parts))
    assert torch.equal(runs[0][0], runs[1][0])
    kept = torch.stack([runs[0][1][f"{n}/kept"] for n in specs])
    # each kept with probability 1/2, plus the fallback when all three were dropped (1/8)
    assert torch.allclose(kept, torch.full((3,), 0.5 + 1 / 24), atol=0.03)
    per_teacher = torch.stack(
        [multi_teacher_loss({n: student}, {n: teachers[n]}, reduction="none") for n in specs]
    )
    # every sample's value is a sum of whole per-teacher terms, at least one of them
    dropped = runs[0][0][None, :] - per_teacher
    assert (runs[0][0] > 0).all()
    assert ((dropped.abs() < 1e-5) | (dropped > 0)).any(dim=0).all()


def _reloaded(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)  # weights_only: the generator state is a plain uint8 tensor


def test_teacher_drops_resume_from_state_dict():
    specs = {name: Teacher(4, head="identity") for name in ("a", "b")}
    student = torch.randn(64, 4)
    teachers = {name: torch.randn(64, 4) for name in specs}

    def make(seed=3):
        return MultiTeacherLoss(4, specs, teacher_drop=0.5, seed=seed, reduction="none")

    run = make()
    for _ in range(3):
        run(student, teachers)
    checkpoint = _reloaded(run.state_dict())
    expected = torch.stack([run(student, teachers) for _ in range(2)])
    resumed = make()
    resumed.load_state_dict(checkpoint)
    assert torch.equal(torch.stack([resumed(student, teachers) for _ in range(2)]), expected)
    assert not torch.equal(make()(student, teachers), expected[0])  # a fresh run restarts
    # rebuilt without seed= (to evaluate, say): everything else loads, and a warning says why
    # the drops do not resume
    with pytest.warns(UserWarning, match="sequence of teacher drops"):
        make(seed=None).load_state_dict(checkpoint)


def test_no_dropping_in_eval_mode():
    specs = {"a": Teacher(4, head="identity"), "b": Teacher(4, head="identity")}
    student, teachers = torch.randn(8, 4), {"a": torch.randn(8, 4), "b": torch.randn(8, 4)}
    loss_fn = MultiTeacherLoss(4, specs, teacher_drop=0.9, seed=0).eval()
    full = MultiTeacherLoss(4, specs)
    assert torch.equal(loss_fn(student, teachers), full(student, teachers))


def test_dropping_a_batch_level_term_is_refused():
    term = featkd.GaussianWassersteinLoss()
    with pytest.raises(featkd.ChoiceError, match="teacher_drop: dropping teacher 'g'"):
        MultiTeacherLoss(4, {"g": Teacher(4, head="identity", term=term)}, teacher_drop=0.2)


# ------------------------------------------------------------------ module errors and guards
def test_module_errors_name_the_argument():
    with pytest.raises(featkd.ChoiceError, match="normalize: expected one of"):
        MultiTeacherLoss(4, {"t": Teacher(4, normalize="zca")})
    with pytest.raises(featkd.ChoiceError, match="head: 'identity' needs"):
        MultiTeacherLoss(4, {"t": Teacher(6, head="identity")})
    with pytest.raises(featkd.ChoiceError, match="tokens: expected one of"):
        Teacher(4, tokens="cls")
    with pytest.raises(featkd.FeatkdInputError, match="teachers: expected a non-empty mapping"):
        MultiTeacherLoss(4, {})
    loss_fn = MultiTeacherLoss(4, {"t": Teacher(6, tokens="both")})
    with pytest.raises(featkd.FeatkdInputError, match=r"teachers: expected features for \['t'\]"):
        loss_fn(torch.randn(2, 5, 4), {"u": torch.randn(2, 5, 6)})
    with pytest.raises(featkd.ShapeError, match=r"teachers\['t'\]"):
        loss_fn(torch.randn(2, 5, 4), {"t": torch.randn(2, 5, 7)})
    with pytest.raises(featkd.ShapeError, match="tokens='both' matches patch tokens"):
        loss_fn(torch.randn(2, 4), {"t": torch.randn(2, 6)})


def test_no_host_sync_on_the_accelerator_path():
    specs = {
        "a": Teacher(6, normalize="running", tokens="both", term="cosine_smooth_l1"),
        "b": Teacher(4, head="orthogonal", normalize="layer_norm"),
    }
    loss_fn = MultiTeacherLoss(4, specs, teacher_drop=0.3, seed=0)
    student = torch.randn(3, 1 + 4, 4, requires_grad=True)
    teachers = {"a": torch.randn(3, 1 + 16, 6), "b": torch.randn(3, 1 + 4, 4)}
    with simulate_accelerator(), record_host_syncs() as syncs:
        loss_fn(student, teachers).backward()
    assert syncs == []


def test_compiles_to_one_graph():
    torch._dynamo.reset()
    specs = {"a": Teacher(6, normalize="running", tokens="both"), "b": Teacher(4, head="linear")}
    loss_fn = MultiTeacherLoss(4, specs)
    student = torch.randn(3, 1 + 4, 4)
    teachers = {"a": torch.randn(3, 1 + 4, 6), "b": torch.randn(3, 4)}
    eager = loss_fn(student, teachers)
    loss_fn.eval()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(student, teachers), loss_fn(student, teachers))
    assert torch.isfinite(eager)


def test_heads_train_and_match_their_teachers():
    # two linear teachers of one input: a student learns both through its heads
    torch.manual_seed(0)
    x = torch.randn(256, 6)
    teachers = {"a": x @ torch.randn(6, 5), "b": torch.tanh(x @ torch.randn(6, 3))}
    student = nn.Linear(6, 8)
    loss_fn = MultiTeacherLoss(8, {"a": Teacher(5, term="mse"), "b": Teacher(3, term="mse")})
    optimiser = torch.optim.Adam([*student.parameters(), *loss_fn.parameters()], lr=0.02)
    first = None
    for _ in range(300):
        loss = loss_fn(student(x), teachers)
        first = float(loss) if first is None else first
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert float(loss) < 0.05 * first


def test_review_fixes_of_the_standardisers_and_grids():
    # the count is an integer: half precision cannot round it or make it inf
    norm = RunningStandardize(2).half()
    for _ in range(8):
        norm(torch.randn(10_000, 2).half())
    assert norm.count.dtype == torch.long and int(norm.count) == 80_000
    # eval before any training call: the batch's statistics, not a division by sqrt(eps)
    fresh = RunningStandardize(3).eval()
    y = fresh(torch.tensor([[1.0, 2.0, 3.0], [3.0, 6.0, 9.0]]))
    torch.testing.assert_close(y, torch.tensor([[-1.0] * 3, [1.0] * 3]), rtol=1e-4, atol=1e-4)
    # an empty batch leaves the statistics alone
    norm = RunningStandardize(2)
    norm(torch.randn(5, 2))
    norm(torch.randn(0, 2))
    assert torch.isfinite(norm.mean).all() and int(norm.count) == 5
    # patch tokens that do not form a square grid are refused, naming the teacher
    loss_fn = MultiTeacherLoss(4, {"t": Teacher(4, tokens="patches")})
    with pytest.raises(featkd.ShapeError, match=r"teachers\['t'\]: expected a square grid"):
        loss_fn(torch.randn(2, 1 + 4, 4), {"t": torch.randn(2, 1 + 2, 4)})

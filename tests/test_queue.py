"""FeatureQueue (issue 15): a batch-level loss over the current batch and K queued ones."""

from __future__ import annotations

import pytest
import torch
from host_sync import record_host_syncs

import featkd
from featkd import FeatureQueue
from featkd._sync import simulate_accelerator

LOSSES = {
    "gaussian_w2": lambda: featkd.GaussianWassersteinLoss(),
    "mmd": lambda: featkd.MMDLoss("rbf", bandwidth=2.0),
    "sinkhorn": lambda: featkd.WassersteinLoss("sinkhorn", tol=None, max_iter=50),
    "gaussian_kl_conditional": lambda: featkd.GaussianKLLoss(conditional=True, num_classes=3),
}


def _batches(count, batch=6, width=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        s = torch.randn(batch, width, generator=generator, dtype=torch.float64)
        t = torch.randn(batch, width, generator=generator, dtype=torch.float64) + 0.5
        labels = torch.randint(3, (batch,), generator=generator)
        out.append((s, t, labels))
    return out


@pytest.mark.parametrize("name", list(LOSSES))
def test_equals_the_loss_on_the_population_with_gradient_for_the_current_batch(name):
    queue = FeatureQueue(LOSSES[name](), batches=3)
    batches = _batches(6)
    for s, t, labels in batches[:-1]:
        queue(s.clone().requires_grad_(True), t, labels=labels)
    s, t, labels = batches[-1]
    current = s.clone().requires_grad_(True)
    got = queue(current, t, labels=labels)
    got.backward()
    # the population: this batch, then the three before it (a batch-level loss does not
    # depend on the order of the rows)
    past = batches[-4:-1]
    reference_s = s.clone().requires_grad_(True)
    population_s = torch.cat([reference_s, *[b[0] for b in past]])
    population_t = torch.cat([t, *[b[1] for b in past]])
    population_l = torch.cat([labels, *[b[2] for b in past]])
    expected = LOSSES[name]()(population_s, population_t, labels=population_l)
    expected.backward()
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(current.grad, reference_s.grad, rtol=1e-8, atol=1e-12)
    assert float(queue.last_parts["population"]) == 24
    assert not queue.student_queue.requires_grad


def test_queue_is_fifo_and_fills_up():
    queue = FeatureQueue(featkd.MMDLoss("linear"), batches=2)
    batches = _batches(5)
    sizes = []
    for s, t, _ in batches:
        queue(s.requires_grad_(True), t)
        sizes.append(int(queue.last_parts["population"]))
    assert sizes == [6, 12, 18, 18, 18]
    held = {tuple(row.tolist()) for row in queue.teacher_queue}
    newest = {tuple(row.tolist()) for b in batches[-2:] for row in b[1]}
    assert held == newest


def test_eval_and_no_grad_calls_do_not_push():
    queue = FeatureQueue(featkd.MMDLoss("linear"), batches=2)
    (s, t, _), (s2, t2, _) = _batches(2)
    queue(s.requires_grad_(True), t)
    snapshot = queue.teacher_queue.clone()
    with torch.no_grad():
        queue(s2, t2)
    queue.eval()
    queue(s2, t2)
    assert torch.equal(queue.teacher_queue, snapshot)
    assert queue.extra_repr() == "batches=2, queued=6"


def test_state_dict_round_trip():
    queue = FeatureQueue(featkd.GaussianWassersteinLoss(), batches=2)
    batches = _batches(4)
    for s, t, _ in batches[:3]:
        queue(s.requires_grad_(True), t)
    fresh = FeatureQueue(featkd.GaussianWassersteinLoss(), batches=2)
    fresh.load_state_dict(queue.state_dict())
    s, t, _ = batches[3]
    assert torch.equal(fresh(s, t), queue(s, t))


def test_errors_name_the_argument():
    queue = FeatureQueue(featkd.MMDLoss("linear"), batches=2)
    with pytest.raises(featkd.FeatkdInputError, match="loss_fn: expected a callable"):
        FeatureQueue("mmd", batches=2)
    with pytest.raises(featkd.ChoiceError, match="batches: expected an integer >= 1"):
        FeatureQueue(featkd.MMDLoss(), batches=0)
    with pytest.raises(featkd.ShapeError, match=r"student: expected \(B, D\) features"):
        queue(torch.randn(2, 3, 4), torch.randn(2, 4))
    queue(torch.randn(4, 3, requires_grad=True), torch.randn(4, 3))
    with pytest.raises(featkd.ShapeError, match="teacher: expected width 3"):
        queue(torch.randn(4, 3), torch.randn(4, 5))
    with pytest.raises(featkd.FeatkdInputError, match="labels: the queue was started without"):
        queue(torch.randn(4, 3), torch.randn(4, 3), labels=torch.zeros(4, dtype=torch.long))


def test_no_host_sync_on_the_accelerator_path():
    queue = FeatureQueue(featkd.GaussianWassersteinLoss(), batches=2)
    for s, t, _ in _batches(3):
        with simulate_accelerator(), record_host_syncs() as syncs:
            queue(s.float().requires_grad_(True), t.float()).backward()
        assert syncs == []


def test_a_queue_gives_the_covariance_the_rank_a_small_batch_lacks():
    # 6 samples of 16-d features: the batch covariance has rank 5; with 3 queued batches the
    # population has 24 rows and full rank, and the Bures term sees every direction
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(4, 6, 16, generator=generator, dtype=torch.float64)
    queue = FeatureQueue(featkd.GaussianWassersteinLoss(), batches=3)
    for batch in data:
        queue(batch.clone().requires_grad_(True), batch * 2)
    population = torch.cat(list(data))
    assert torch.linalg.matrix_rank(torch.cov(population.T)) == 16
    assert torch.linalg.matrix_rank(torch.cov(data[0].T)) == 5


def test_the_queue_is_sized_by_the_first_training_batch():
    # found in review: an evaluation call first must not size the queue
    queue = FeatureQueue(featkd.MMDLoss("linear"), batches=2)
    queue.eval()
    queue(torch.randn(64, 3), torch.randn(64, 3))
    queue.train()
    for _ in range(4):
        queue(torch.randn(4, 3, requires_grad=True), torch.randn(4, 3))
    assert queue.student_queue.shape == (8, 3)
    assert int(queue.last_parts["population"]) == 12

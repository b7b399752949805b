"""No host synchronisation in any loss or head, except where its case says why (issue 13).

``torch.cuda.set_sync_debug_mode`` gives the truth on a GPU; on CPU nothing waits, so
``host_sync.record_host_syncs`` records the operations that would. Every case of
``tests/loss_cases.py`` runs forward and backward on the accelerator path
(``featkd._sync.simulate_accelerator``) with the default value-check policy, which there counts
non-finite inputs on the device instead of raising. A case whose
``host_syncs`` is empty must record none; a case with a reason must still record one, so that
the reason is removed when the sync is.

The exact OT solver's copy of the cost to the host is part of the method and invisible on CPU
(the copy is within one device), so ``W2-emd`` records nothing here.
"""

from __future__ import annotations

import math

import pytest
import torch
from host_sync import HostSyncRecorder, record_host_syncs
from loss_cases import CASES, PAIRS, Case

import featkd
from featkd._loss import DistillationLoss
from featkd._sync import device_values, simulate_accelerator


@pytest.fixture(autouse=True)
def _accelerator_path():
    previous = featkd.set_finite_check("auto")
    with simulate_accelerator():
        yield
    featkd.set_finite_check(previous)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_host_syncs_are_only_the_documented_ones(case: Case):
    module = case.make()
    s, t, labels = case.inputs(8, generator=torch.Generator().manual_seed(0))
    s.requires_grad_(True)
    with record_host_syncs() as syncs:
        case.scalar(module, s, t, labels).backward()
    if case.host_syncs:
        assert syncs, f"{case.name}: no host sync any more; clear its host_syncs reason"
    else:
        assert not syncs, f"{case.name}: host syncs {sorted(set(syncs))}"


@pytest.mark.parametrize("case", PAIRS, ids=lambda c: c.name)
def test_validation_reads_shapes_only(case: Case):
    """A loss's one validation reads shapes, dtypes and devices, and on the accelerator path
    dispatches no operation at all: each costs host time per call (a pooled width once came
    from pooling a ``meta`` tensor: some 150 microseconds per tensor, two a call, in Python)."""
    module = case.make()
    if getattr(type(module), "_check", DistillationLoss._check) is DistillationLoss._check:
        pytest.skip(f"{type(module).__name__} validates in its own forward")
    s, t, labels = case.inputs(8, generator=torch.Generator().manual_seed(0))
    with HostSyncRecorder() as recorder:
        module._check(s.requires_grad_(True), t, labels)
    assert recorder.ops == []


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_identities_and_index_tables_are_kept(case: Case):
    """After a first call, no forward+backward builds an identity or an index table again: each
    would be a kernel launch per call for a constant (kept by ``featkd._sync.device_eye`` and
    ``device_constant``)."""
    module = case.make()
    s, t, labels = case.inputs(8, generator=torch.Generator().manual_seed(0))
    s.requires_grad_(True)
    case.scalar(module, s, t, labels).backward()
    with HostSyncRecorder() as recorder:
        case.scalar(module, s, t, labels).backward()
    assert not {"eye", "triu_indices", "tril_indices"} & set(recorder.ops)


def test_the_recorder_sees_what_it_should():
    x = torch.randn(6)
    with record_host_syncs() as syncs:
        float(x.sum())  # _local_scalar_dense
        x[x > 0]  # a boolean mask: nonzero or masked_select, a data-dependent shape
        x.tolist()
        torch.unique(x)
        torch.linalg.eigh(torch.eye(3))
    assert {"_local_scalar_dense", "tolist", "_linalg_eigh"} <= set(syncs)
    assert "index with a boolean mask" in syncs
    assert {"_unique2", "_unique", "unique_dim"} & set(syncs)
    with record_host_syncs() as quiet:
        torch.where(x > 0, x, 0.0).sum()  # masks without a data-dependent shape: no sync
    assert quiet == []


@pytest.mark.parametrize(("num_paths", "syncs"), [("all", []), (1, ["tolist"])])
def test_fcfd_syncs_only_to_draw_its_paths(num_paths, syncs):
    """FCFD runs the networks' stages without a host sync; drawing ``num_paths`` of its paths
    reads the draw on the host (``randperm(...).tolist()``), once per call."""
    from loss_cases import stage_outputs, tiny_fcfd

    fcfd, student, teacher = tiny_fcfd(num_paths=num_paths, seed=0)
    images = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with record_host_syncs() as recorded:
        fcfd(stage_outputs(student, images), stage_outputs(teacher, images)).backward()
    assert recorded == syncs


def test_device_values_are_filled_once_and_kept():
    """Constants (temperatures, bandwidths) cost their fills on the first call only."""
    x = torch.zeros(3, dtype=torch.float64)
    first = device_values((0.5, 2), x)
    assert first.dtype == torch.float64 and first.tolist() == [0.5, 2.0]
    assert device_values([0.5, 2.0], x) is first
    assert device_values((0.5, 2), x.float()) is not first  # per dtype (and device)
    assert device_values((0.5, 3), x).tolist() == [0.5, 3.0]


def test_device_values_first_made_under_inference_mode_serve_autograd():
    with torch.inference_mode():
        device_values((0.25, 4.0), torch.zeros(1))
    x = torch.ones(2, requires_grad=True)
    (x * device_values((0.25, 4.0), x)).sum().backward()  # autograd saves the constant
    assert x.grad.tolist() == [0.25, 4.0]


@pytest.mark.parametrize("fake_first", [True, False])
def test_kept_constants_and_fake_tensor_tracing_do_not_mix(fake_first):
    """A trace with fake tensors (``make_fx``, export) neither keeps its fake constants nor
    meets a kept real one, whichever comes first (found in review: the Gaussian losses'
    kept identities broke both orders)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from featkd.functional import gaussian_kl_loss, gaussian_wasserstein_loss

    s, t = torch.randn(16, 8), torch.randn(16, 8)
    for loss in (gaussian_kl_loss, gaussian_wasserstein_loss):

        def call(a, b, loss=loss):
            return loss(a, b)

        steps = [lambda: make_fx(lambda a, b: call(a, b), tracing_mode="fake")(s, t)]
        steps.append(lambda: call(s, t))
        for step in steps if fake_first else steps[::-1]:
            step()
        assert torch.isfinite(call(s, t))


def test_large_constants_are_not_kept():
    """An identity or index table above 16 MiB is rebuilt in each call rather than held."""
    from featkd._sync import device_eye

    small = torch.zeros(1)
    assert device_eye(64, small) is device_eye(64, small)
    big = device_eye(2100, small)  # 2100^2 float32 entries: 17.6 MB
    assert big.shape == (2100, 2100) and device_eye(2100, small) is not big


def test_device_values_keys_tell_signed_zeros_and_nan_apart():
    x = torch.zeros(1)
    assert str(device_values([-0.0], x).tolist()) == str(device_values([-0.0], x).tolist())
    assert device_values([0.0], x) is not device_values([-0.0], x)
    assert torch.signbit(device_values([-0.0], x)).item()
    assert device_values([math.nan], x) is device_values([float("nan")], x)  # kept, not regrown


def test_device_values_made_inside_vmap_are_plain_tensors():
    out = torch.func.vmap(lambda r: r * device_values([5.0], r))(torch.ones(3, 1))
    assert out.flatten().tolist() == [5.0, 5.0, 5.0]
    assert (torch.ones(2) * device_values([5.0], torch.ones(2))).tolist() == [5.0, 5.0]

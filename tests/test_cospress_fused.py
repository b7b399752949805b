"""The fused Triton kernels of CosPress's neighbourhood KL (issue 13, item 4), run on CPU by
Triton's interpreter: against the float64 numpy reference, against the torch path (values and
gradients), through the whole loss, and the policy that picks them (``set_fused_kernels``).

On a CUDA machine the device-parametrised tests of ``test_cospress_distances.py`` run the
compiled kernels too (float32 on CUDA takes them by default); ``test_fused_on_cuda`` compares
them with the torch path at the benchmark's size.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest
import torch
from host_sync import record_host_syncs
from references import numpy64, ref_neighbourhood_kl

import featkd
from featkd import ChoiceError, CosPressLoss
from featkd._fused import fused_kernels_enabled, interpret_on_cpu
from featkd.cospress._neighbourhood import _fused_kl, neighbourhood_kl_per_set

KERNELS = "featkd.cospress._kl_triton"
TEMPERATURES = (0.01, 0.07, 1.0)

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs Triton in interpreter mode (conftest.py chooses it on machines without CUDA)",
)


@pytest.fixture
def interpreted():
    """The kernels on CPU tensors, in Triton's interpreter."""
    previous = featkd.set_fused_kernels("auto")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with interpret_on_cpu():
        yield
    torch.set_num_threads(threads)
    featkd.set_fused_kernels(previous)


def _kl(reference, candidate, style, temperatures=TEMPERATURES):
    return neighbourhood_kl_per_set(reference, candidate, temperatures, style, 1 << 24)


def _torch_path(fn):
    previous = featkd.set_fused_kernels("off")
    try:
        return fn()
    finally:
        featkd.set_fused_kernels(previous)


@needs_triton
@pytest.mark.parametrize("style", ["full", "half"])
def test_fused_matches_numpy_reference(interpreted, style):
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(2, 23, 7, generator=g)
    candidate = torch.randn(2, 23, 5, generator=g)
    out = _kl(reference, candidate, style)
    assert KERNELS in sys.modules, "the fused kernels did not run"
    expected = [
        ref_neighbourhood_kl(numpy64(reference[s]), numpy64(candidate[s]), TEMPERATURES, style)
        for s in range(2)
    ]
    np.testing.assert_allclose(numpy64(out), expected, rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("style", ["full", "half"])
def test_fused_gradient_matches_torch_path(interpreted, style):
    g = torch.Generator().manual_seed(1)
    # a set size that is not a power of two: the padded lanes of a row must not count
    reference = torch.randn(3, 19, 6, generator=g)
    candidate = torch.randn(3, 19, 4, generator=g, requires_grad=True)
    upstream = torch.rand(3, generator=g) + 0.5
    (fused,) = torch.autograd.grad(_kl(reference, candidate, style), candidate, upstream)
    assert KERNELS in sys.modules

    def float64_torch_path():
        x = candidate.detach().double().requires_grad_(True)
        value = _kl(reference.double(), x, style)
        return torch.autograd.grad(value, x, upstream.double())[0]

    exact = _torch_path(float64_torch_path)
    scale = exact.abs().max()
    assert scale > 0
    # float32 rounding of a logit 1 / 0.01 = 100 is 6e-6, amplified by exp: the torch path
    # in float32 is 6e-6 (full) and 2e-6 (half) off on these inputs too
    np.testing.assert_allclose(numpy64(fused / scale), numpy64(exact / scale), atol=2e-5)


@needs_triton
def test_fused_without_gradient(interpreted):
    g = torch.Generator().manual_seed(2)
    reference, candidate = torch.randn(2, 11, 5, generator=g), torch.randn(2, 11, 3, generator=g)
    with torch.no_grad():
        fused = _kl(reference, candidate, "full")
    assert KERNELS in sys.modules
    exact = _torch_path(lambda: _kl(reference.double(), candidate.double(), "full"))
    np.testing.assert_allclose(numpy64(fused), numpy64(exact), rtol=1e-5)


@needs_triton
def test_cospress_on_tokens_same_with_and_without_kernels(interpreted):
    """The whole loss (local term on the tokens of each image, global term on the batch)."""
    torch.manual_seed(3)
    loss_fn = CosPressLoss(student_dim=6, teacher_dim=10, temperatures=(0.02, 0.2))
    student = torch.randn(4, 9, 6, requires_grad=True)
    teacher = torch.randn(4, 9, 10)

    def value_and_gradients():
        loss = loss_fn(student, teacher)
        return (loss, *torch.autograd.grad(loss, [student, loss_fn.head.weight]))

    fused = value_and_gradients()
    assert KERNELS in sys.modules
    reference = _torch_path(value_and_gradients)
    for a, b in zip(fused, reference, strict=True):
        np.testing.assert_allclose(numpy64(a), numpy64(b), rtol=2e-5, atol=1e-7)


@needs_triton
def test_fused_records_no_host_sync(interpreted):
    g = torch.Generator().manual_seed(4)
    reference = torch.randn(2, 8, 5, generator=g)
    candidate = torch.randn(2, 8, 3, generator=g, requires_grad=True)
    with record_host_syncs() as syncs:
        _kl(reference, candidate, "full").sum().backward()
    assert KERNELS in sys.modules
    assert syncs == []


def test_which_inputs_take_the_kernels(monkeypatch):
    # plain CPU tensors: the torch path, whatever is installed
    assert not fused_kernels_enabled(torch.zeros(1))
    monkeypatch.setattr("featkd._fused._TRITON", True)  # as if installed
    monkeypatch.setattr("featkd._fused._ON_CPU", True)  # as inside interpret_on_cpu
    previous = featkd.set_fused_kernels("auto")
    try:
        assert _fused_kl(torch.zeros(1, 4, 4))
        assert not _fused_kl(torch.zeros(1, 4, 4, dtype=torch.float64))  # float32 only
        assert not _fused_kl(torch.zeros(1, 1, 4097))  # a row longer than one program holds
        featkd.set_fused_kernels("off")
        assert not _fused_kl(torch.zeros(1, 4, 4))
    finally:
        featkd.set_fused_kernels(previous)
    monkeypatch.setattr("featkd._fused._TRITON", False)  # not installed
    monkeypatch.setattr("featkd._fused._ON_CPU", True)
    assert not fused_kernels_enabled(torch.zeros(1))


def test_set_fused_kernels_modes():
    previous = featkd.set_fused_kernels(False)
    try:
        assert featkd.set_fused_kernels(True) == "off"
        assert featkd.set_fused_kernels("auto") == "auto"
        with pytest.raises(ChoiceError, match=r"mode: expected one of 'auto', 'off'.*'fast'"):
            featkd.set_fused_kernels("fast")
    finally:
        featkd.set_fused_kernels(previous)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("style", ["full", "half"])
def test_fused_on_cuda(style):
    """The compiled kernels at the benchmark's shape (B=32 images of 197 tokens here), against
    the torch path in float64 on the same device."""
    g = torch.Generator(device="cuda").manual_seed(5)
    reference = torch.randn(32, 197, 64, device="cuda", generator=g)
    candidate = torch.randn(32, 197, 48, device="cuda", generator=g, requires_grad=True)
    temperatures = tuple(round(0.01 * k, 2) for k in range(1, 11))
    previous = featkd.set_fused_kernels("auto")
    try:
        value = _kl(reference, candidate, style, temperatures)
        (grad,) = torch.autograd.grad(value.sum(), candidate)
    finally:
        featkd.set_fused_kernels(previous)
    assert KERNELS in sys.modules

    def float64_torch_path():
        x = candidate.detach().double().requires_grad_(True)
        exact = _kl(reference.double(), x, style, temperatures)
        return exact, torch.autograd.grad(exact.sum(), x)[0]

    exact, exact_grad = _torch_path(float64_torch_path)
    np.testing.assert_allclose(numpy64(value), numpy64(exact), rtol=1e-4, atol=1e-6)
    scale = exact_grad.abs().max()
    np.testing.assert_allclose(numpy64(grad / scale), numpy64(exact_grad / scale), atol=1e-4)


def test_a_kernel_that_fails_falls_back_to_torch_with_a_warning(monkeypatch):
    """A Triton that cannot compile for this GPU must not stop a training run: the torch path
    computes the same loss, once warned about, and the kernels stay off until asked again."""
    import types

    def broken(*args, **kwargs):
        raise RuntimeError("PTXAS error: no kernel image for this architecture")

    monkeypatch.setitem(sys.modules, KERNELS, types.SimpleNamespace(neighbourhood_kl=broken))
    monkeypatch.setattr("featkd._fused._TRITON", True)  # as if installed
    monkeypatch.setattr("featkd._fused._ON_CPU", True)  # as on a CUDA tensor
    torch.manual_seed(5)
    loss_fn = CosPressLoss(student_dim=6, teacher_dim=10, temperatures=(0.05, 0.5))
    student, teacher = torch.randn(3, 7, 6, requires_grad=True), torch.randn(3, 7, 10)
    previous = featkd.set_fused_kernels("auto")
    try:
        with pytest.warns(featkd.FusedKernelWarning, match="neighbourhood_kl failed.*PTXAS"):
            loss = loss_fn(student, teacher)
        grads = torch.autograd.grad(loss, [student, loss_fn.head.weight])
        assert not fused_kernels_enabled(student)  # off from now on: no warning per step
        reference = _torch_path(lambda: loss_fn(student, teacher))
        torch.testing.assert_close(loss, reference, rtol=0, atol=0)
        expected = torch.autograd.grad(reference, [student, loss_fn.head.weight])
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        featkd.set_fused_kernels("auto")  # an explicit choice tries the kernels again
        assert fused_kernels_enabled(student)
    finally:
        featkd.set_fused_kernels(previous)

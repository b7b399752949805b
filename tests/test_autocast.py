"""Every loss and head under ``torch.autocast``: finite values and gradients, and results within
the documented tolerance of float32 (the table in ``docs/reliability.md``, checked against
each case's ``autocast_tolerance`` by :func:`test_docs_table_matches_the_tolerances`).

Two ways features reach a loss inside an autocast region:

- float32 features (the loss called inside the region, on features computed outside it, or
  teacher features from a float32 teacher): the losses turn autocast off for their maths, so
  the result equals float32 up to float32 rounding. A KD2M ``projector`` and the LayerNorm ->
  Linear heads run under autocast like any layer; the orthogonal projector and whitening turn
  it off.
- half-precision features (produced by a network under autocast): the loss computes in float32
  from the rounded features and answers in their dtype. The difference from float32 is the
  rounding of the inputs (bfloat16: 8 significant bits) and of the result.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from loss_cases import CASES, Case, head_scalar, stage_outputs, tiny_fcfd

GRADIENT_COSINE = 0.99  # minimum cosine between the autocast and float32 student gradients
FCFD_TOLERANCE = (5e-2, 1e-2)  # the networks' stages and the bridges run under autocast

DOCS = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"


@pytest.fixture(params=[torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def amp_dtype(request, device):
    if device.type == "cpu" and request.param == torch.float16:
        pytest.skip("CPU autocast is tested in bfloat16")
    return request.param


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is faster, and immune to oversubscription on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def ids(cases):
    return [c.name for c in cases]


def run(case: Case, module, s, t, labels, amp_dtype=None):
    """The output (a head's raw output) and the gradients of the student and of the module's
    parameters, with ``amp_dtype`` autocast on the inputs' device (None: no autocast)."""
    s = s.detach().requires_grad_(True)
    with torch.autocast(s.device.type, dtype=amp_dtype or torch.float32, enabled=bool(amp_dtype)):
        out = case.call(module, s, t, labels)
    scalar = head_scalar(out) if case.is_head else out
    scalar.float().backward()
    params = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    return out.detach(), s.grad, params


def check_against_float32(case, device, amp_dtype, low_precision_features: bool, seed: int):
    generator = torch.Generator().manual_seed(seed)
    s, t, labels = case.inputs(16, generator=generator)
    s, t = s.to(device), None if t is None else t.to(device)
    labels = None if labels is None else labels.to(device)
    reference, ref_grad, _ = run(case, case.make().to(device), s, t, labels)
    if low_precision_features:
        s, t = s.to(amp_dtype), None if t is None else t.to(amp_dtype)
    out, grad, param_grads = run(case, case.make().to(device), s, t, labels, amp_dtype)

    follows_autocast = low_precision_features or case.plain_layer
    # features follow the input; a loss value is float32 for half inputs (no fp16 overflow)
    expected_dtype = amp_dtype if follows_autocast and case.is_head else torch.float32
    assert out.dtype == expected_dtype
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert all(torch.isfinite(g).all() for g in param_grads.values())
    rtol, atol = case.autocast_tolerance[int(low_precision_features)]
    torch.testing.assert_close(out.float(), reference.float(), rtol=rtol, atol=atol)
    cosine = torch.nn.functional.cosine_similarity(
        grad.float().flatten(), ref_grad.float().flatten(), dim=0
    )
    assert cosine >= GRADIENT_COSINE, float(cosine)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_float32_features_under_autocast(case, device, amp_dtype, seed):
    check_against_float32(case, device, amp_dtype, low_precision_features=False, seed=seed)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_half_precision_features_under_autocast(case, device, amp_dtype, seed):
    check_against_float32(case, device, amp_dtype, low_precision_features=True, seed=seed)


def test_fcfd_under_autocast(device, amp_dtype):
    """Stage outputs produced by the networks under autocast, the loss called in the region."""
    fcfd, student, teacher = tiny_fcfd()
    fcfd, student, teacher = fcfd.to(device), student.to(device), teacher.to(device)
    images = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0)).to(device)

    def loss_and_grads(enabled):
        student.zero_grad()
        fcfd.zero_grad()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=enabled):
            with torch.no_grad():
                t_feats = stage_outputs(teacher, images)
            loss = fcfd(stage_outputs(student, images), t_feats)
        loss.float().backward()
        grads = [p.grad.clone() for p in (*student.parameters(), *fcfd.parameters())]
        return loss.detach(), grads

    reference, _ = loss_and_grads(False)
    loss, grads = loss_and_grads(True)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)  # a loss value: float32
    assert all(torch.isfinite(g).all() for g in grads)
    rtol, atol = FCFD_TOLERANCE
    torch.testing.assert_close(loss.float(), reference, rtol=rtol, atol=atol)


def test_docs_table_matches_the_tolerances():
    """``docs/reliability.md`` states the tolerances asserted here, row by row."""
    tolerances = {case.name: case.autocast_tolerance for case in CASES}
    rows = {}
    for line in DOCS.read_text().splitlines():
        match = re.match(r"\|\s*`([^`]+)`\s*\|[^|]*\|\s*([^|]+)\|\s*([^|]+)\|", line)
        if match and (match.group(1) in tolerances or match.group(1) == "FCFD"):
            rows[match.group(1)] = (match.group(2).strip(), match.group(3).strip())

    def text(tol):
        return f"rtol {tol[0]:g}, atol {tol[1]:g}"

    expected = {name: (text(f32), text(rounded)) for name, (f32, rounded) in tolerances.items()}
    expected["FCFD"] = ("n/a", text(FCFD_TOLERANCE))
    assert rows == expected

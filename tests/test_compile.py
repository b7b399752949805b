"""Every loss and head under ``torch.compile``: same values and gradients as eager.

The suite compiles with ``backend="aot_eager"``: dynamo tracing and AOT autograd (the parts that
can break on a loss's Python) without the minutes of C++ code generation of inductor, which has
one test of its own (marked slow). Under the default value-check policy a compiled loss counts
non-finite inputs on the device (no graph break); ``set_finite_check("raise")`` breaks the graph
at the check. Most tests turn the check off to compare bare maths.

What compiles to one graph (``fullgraph=True`` asserts it) and why the others break it is each
case's ``graph_break`` (in ``tests/loss_cases.py``), explained in ``docs/reliability.md``: exact OT's solver runs on the host in
numpy (one opaque custom op, which does not break the graph), Sinkhorn's stopping test and the class grouping of ``conditional=True`` read values on
the host, and the sliced directions come from a ``torch.Generator``.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from loss_cases import CASES, Case

import featkd
from featkd import NonFiniteError

# torch's own deprecation noise from inside the compiler
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method`:DeprecationWarning")


def params(cases):
    return [
        pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.slow_compile else [])
        for c in cases
    ]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """A clean dynamo cache per test (no recompilation limit carried over) and one thread."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(previous_threads)


@pytest.fixture
def no_finite_check():
    previous = featkd.set_finite_check(False)
    yield
    featkd.set_finite_check(previous)


def value_and_grads(case: Case, module, s, t, labels, call=None):
    """The value and the gradients of the student and of ``module``'s parameters, calling
    ``call`` (the compiled module) or ``module``."""
    s = s.detach().requires_grad_(True)
    out = case.scalar(module if call is None else call, s, t, labels)
    out.backward()
    grads = {"student": s.grad}
    grads.update({n: p.grad for n, p in module.named_parameters() if p.grad is not None})
    return out.detach(), grads


def check_compiled_equals_eager(case: Case, backend: str, fullgraph: bool, batch: int = 8):
    generator = torch.Generator().manual_seed(0)
    s, t, labels = case.inputs(batch, generator=generator)
    eager_value, eager_grads = value_and_grads(case, case.make(), s, t, labels)
    module = case.make()
    compiled = torch.compile(module, backend=backend, fullgraph=fullgraph)
    value, grads = value_and_grads(case, module, s, t, labels, call=compiled)
    torch.testing.assert_close(value, eager_value, rtol=1e-4, atol=1e-5)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    return compiled


@pytest.mark.parametrize("case", params(CASES))
def test_compiled_equals_eager(case, no_finite_check):
    check_compiled_equals_eager(case, "aot_eager", fullgraph=not case.graph_break)


@pytest.mark.parametrize("name", ["KDLoss", "CosPress-tokens"])
def test_finite_check_is_a_device_count_when_compiled(name):
    """Under the default policy, compiling defers the value check to the device: the loss
    compiles to one graph, gives the eager result, and reports NaN inputs in ``last_parts``."""
    case = next(c for c in CASES if c.name == name)
    compiled = check_compiled_equals_eager(case, "aot_eager", fullgraph=not case.graph_break)
    s, t, labels = case.inputs(8)
    s.view(-1)[:3] = float("nan")
    case.call(compiled, s, t, labels)
    assert compiled.last_parts["nonfinite_inputs"].item() == 3.0


@pytest.mark.parametrize("name", ["KDLoss", "CosPress-tokens", "LinearHead"])
def test_raising_finite_check_still_works_when_compiled(name):
    """``set_finite_check("raise")``: dynamo breaks the graph at the check; the loss still
    compiles, still gives the eager result, and NaN in the input still raises."""
    case = next(c for c in CASES if c.name == name)
    previous = featkd.set_finite_check("raise")
    try:
        compiled = check_compiled_equals_eager(case, "aot_eager", fullgraph=False)
        s, t, labels = case.inputs(8)
        s.view(-1)[0] = float("nan")
        with pytest.raises(NonFiniteError, match=case.names[0]):
            case.call(compiled, s, t, labels)
    finally:
        featkd.set_finite_check(previous)


@pytest.mark.slow
def test_inductor():
    """One loss through the default backend (C++ code generation on CPU)."""
    case = next(c for c in CASES if c.name == "Proteus-tokens")
    previous = featkd.set_finite_check(False)
    try:
        check_compiled_equals_eager(case, "inductor", fullgraph=True)
    finally:
        featkd.set_finite_check(previous)


@pytest.mark.parametrize("num_paths", ["all", 1])
def test_fcfd_compiled_equals_eager(num_paths, no_finite_check):
    """FCFD through ``torch.compile``: the same value and gradients (student stages and bridges).
    With ``num_paths`` below "all" the paths are drawn on the host (a graph break); a seeded
    generator makes the compiled and the eager call draw the same ones."""
    from loss_cases import stage_outputs, tiny_fcfd

    images = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(1))

    def value_and_grads(compiled: bool):
        fcfd, student, teacher = tiny_fcfd(num_paths=num_paths, seed=3)
        call = torch.compile(fcfd, backend="aot_eager") if compiled else fcfd
        with torch.no_grad():
            t_feats = stage_outputs(teacher, images)
        loss = call(stage_outputs(student, images), t_feats)
        loss.backward()
        named = [*student.named_parameters(), *fcfd.named_parameters()]
        return loss.detach(), list(fcfd.last_paths), {n: p.grad for n, p in named}

    eager_value, eager_paths, eager_grads = value_and_grads(compiled=False)
    value, paths, grads = value_and_grads(compiled=True)
    assert paths == eager_paths
    torch.testing.assert_close(value, eager_value, rtol=1e-4, atol=1e-5)
    # a bridge on a path not drawn gets no gradient, in both
    assert {n for n, g in grads.items() if g is None} == {
        n for n, g in eager_grads.items() if g is None
    }
    assert sum(g is not None for g in grads.values()) > len(grads) // 2
    for name, grad in grads.items():
        if grad is not None:
            torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)

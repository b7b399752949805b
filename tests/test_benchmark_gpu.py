"""benchmarks/gpu.py --quick runs on the CPU and reports every loss, head and anchor."""

import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    benchmarks = str(ROOT / "benchmarks")
    if benchmarks not in sys.path:  # the script imports its sibling modules
        sys.path.insert(0, benchmarks)
    spec = importlib.util.spec_from_file_location("benchmark_gpu", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_gpu"] = module
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_quick(tmp_path):
    bench = load_benchmark()
    bench.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "gpu-quick.json").read_text())
    names = {row["name"] for row in result["losses"]}
    assert {"KDLoss", "CosPressLoss (tokens)", "OrthogonalProjector (matrix_exp)"} <= names
    assert all(row["ms"] > 0 and row["host_ms"] > 0 for row in result["losses"])
    # with the finite-input check on (the default), KD reads its inputs' check on the host
    kd = next(row for row in result["losses"] if row["name"] == "KDLoss")
    assert kd["syncs"] >= 1 and "aten::_local_scalar_dense" in kd["sync_ops"]
    families = {row["family"] for row in result["anchors"]}
    assert families == {"Gaussian W2 (full)", "Sinkhorn to tolerance"}
    for row in result["anchors"]:
        assert row["featkd_float32_error"] < 1e-3 and row["POT_float32_error"] < 1e-3
    assert set(result["student_step_ms"]) == {"float32", "bfloat16"}
    table = (tmp_path / "gpu-quick.md").read_text()
    assert "| KDLoss |" in table and "| ms | host ms |" in table


def test_sync_counter_sees_a_host_read():
    """The CPU stand-in for set_sync_debug_mode records what would stall a GPU."""
    bench = load_benchmark()
    x = torch.randn(5)
    count, ops = bench.count_syncs(lambda: bool((x > 0).any()), torch.device("cpu"))
    assert count == 1 and ops == ["aten::_local_scalar_dense"]
    count, ops = bench.count_syncs(lambda: x.nonzero(), torch.device("cpu"))
    assert count == 1 and ops == ["aten::nonzero"]
    count, _ = bench.count_syncs(lambda: (x * 2).sum(), torch.device("cpu"))
    assert count == 0


def load_script(stem: str):
    """``benchmarks/<stem>.py`` as a module (gpu.py's siblings on ``sys.path`` first)."""
    load_benchmark()
    spec = importlib.util.spec_from_file_location(
        f"benchmark_{stem}", ROOT / "benchmarks" / f"{stem}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_launch_counter():
    return load_script("launches")


def test_launch_counter_counts_kernels_not_views():
    launches = load_launch_counter()
    x = torch.randn(4, 3)
    with launches.CountLaunches() as mode:
        y = x.t()[:2].unsqueeze(0)  # views: no kernel
        torch.empty(3)  # an allocation: no kernel
        (y * 2).sum()  # two kernels
        y.reshape(-1)  # a copy: y is not contiguous
    assert dict(mode.ops) == {"aten.mul": 1, "aten.sum": 1, "aten.clone": 1}


def test_launch_counts_quick(tmp_path):
    launches = load_launch_counter()
    result = launches.main(["--quick", "--out", str(tmp_path), "--label", "smoke"])
    counts = {name: sum(ops.values()) for name, ops in result["launches"].items()}
    assert {"KDLoss", "CosPressLoss (tokens)", "OrthogonalProjector (matrix_exp)"} <= set(counts)
    assert all(n > 0 for n in counts.values())
    # the accelerator path reads nothing back: no host read among the counted operations
    assert not any("_local_scalar_dense" in ops for ops in result["launches"].values())
    assert "| KDLoss |" in (tmp_path / "launches-smoke.md").read_text()
    # every case also has a host time, the fastest of its calls at tiny sizes
    assert set(result["host_us"]) == set(counts)
    assert all(us > 0 for us in result["host_us"].values())
    # re-rendered beside a baseline: one more column, the baseline's numbers
    saved = tmp_path / "launches-smoke.json"
    launches.main(["--render", str(saved), "--baseline", str(saved)])
    kd = f"| KDLoss | {counts['KDLoss']} | {counts['KDLoss']} |"
    assert kd in (tmp_path / "launches-smoke.md").read_text()


def test_host_calibration_table():
    launches = load_launch_counter()
    meta = {"src": "abc", "label": "base", "batch": 256, "tokens": 197, "d_s": 192, "d_t": 768}
    baseline = {"meta": meta, "host_us": {"KDLoss": 400.0, "LinearHead": 200.0}}
    current = {"meta": {**meta, "label": "cpu"}, "host_us": {"KDLoss": 300.0}}
    gpu = {
        "meta": {"device": "NVIDIA H200"},
        "losses": [
            {"name": "KDLoss", "ms": 1.2, "syncs": 2},
            {"name": "LinearHead", "ms": 1.0, "syncs": 1},
            {"name": "Whitening (cholesky)", "ms": 3.0, "syncs": 2},  # no host time: left out
        ],
    }
    table = launches.calibration(gpu, baseline, current)
    assert "| KDLoss | 1.20 | 2 | 400 | 3.0 | 300 |" in table  # 1200 us / 400 us
    assert "| LinearHead | 1.00 | 1 | 200 | 5.0 | n/a |" in table
    assert "Whitening" not in table


def test_launch_counts_leave_out_a_case_this_featkd_cannot_run(tmp_path, monkeypatch):
    # what --src meets in an older checkout: a step calling a function it lacks
    launches = load_launch_counter()
    every = launches.cases

    def missing() -> None:
        raise AttributeError("module 'featkd' has no attribute 'set_fused_kernels'")

    monkeypatch.setattr(launches, "cases", lambda *sizes: {**every(*sizes), "Missing": missing})
    result = launches.main(["--quick", "--out", str(tmp_path), "--label", "old"])
    assert result["launches"]["Missing"] is None
    assert result["host_us"]["Missing"] is None
    assert result["host_us"]["KDLoss"] > 0


def test_accelerator_error_quick(tmp_path):
    result = load_script("accelerator_error").main(["--quick", "--out", str(tmp_path)])
    names = {row["name"] for row in result["rows"]}
    assert {"KDLoss", "GaussianWassersteinLoss (full)", "OrthogonalProjector (matrix_exp)"} <= names
    assert "WassersteinLoss (sliced)" not in names  # its draws differ by dtype
    for row in result["rows"]:  # tiny, well-scaled cases: float32 rounding only
        assert row["cpu_value"] < 1e-3 and row["accelerator_value"] < 1e-3, row
    assert "| KDLoss | standard normal |" in (tmp_path / "accelerator-error-cpu.md").read_text()


def test_compiled_benchmark_quick(tmp_path):
    result = load_script("compiled").main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    (row,) = result["rows"]
    assert row["name"] == "KDLoss" and row["mode"] == "default"
    assert row["eager_ms"] > 0 and row["compiled_ms"] > 0
    assert "| KDLoss |" in (tmp_path / "compiled-quick.md").read_text()
    assert row["graphed_ms"] is None and row["graphed_error"] == "CUDA only"  # no CUDA here


def test_compiled_benchmark_graphs_the_losses_parameters_and_survives_a_failing_case():
    """What CPU can check of the graphed way: the module handed to make_graphed_callables owns
    the loss's parameters (else their gradients would not be captured) and computes the eager
    step's scalar; a way that fails is recorded, and its table lists the failure."""
    compiled = load_script("compiled")
    gpu = compiled.gpu
    cpu = torch.device("cpu")
    raw, labels = gpu.seeded_inputs(cpu, 8, 5, 12, 24)
    for name in ("MMDLoss (rbf)", "OrthogonalProjector (matrix_exp)"):
        factory, kind = gpu.loss_and_head_cases(12, 24)[name]
        module = factory()
        objective = compiled.Objective(module, kind, labels)
        owned = list(module.parameters())
        assert owned and list(objective.parameters()) == owned
        args = gpu.step_inputs(kind, raw, cpu)
        objective(*args).backward()
        graphed_grads = [p.grad.clone() for p in owned]
        module.zero_grad()
        gpu.forward_backward(module, kind, raw, labels, cpu)()
        for got, expected in zip(graphed_grads, [p.grad for p in owned], strict=True):
            torch.testing.assert_close(got, expected)
    step, got = compiled._warmed(lambda: 1 / 0, cpu)
    assert step is None and got["error"].startswith("ZeroDivisionError")
    row = {"name": "X", "mode": "default", "eager_ms": 1.0, "compiled_ms": None,
           "graphed_ms": None, "compile_s": None, "compiled_error": got["error"]}  # fmt: skip
    table = compiled.markdown({"rows": [row], "meta": {
        "device": "cpu", "torch": "t", "date": "d", "command": "c",
        "batch": 1, "tokens": 1, "d_s": 1, "d_t": 1}})  # fmt: skip
    assert "| X | 1.00 | n/a | n/a | n/a | n/a |" in table
    assert "- X, compiled: ZeroDivisionError" in table


def test_exact_ot_benchmark_quick(tmp_path):
    result = load_script("exact_ot").main(["--quick", "--out", str(tmp_path)])
    assert [row["kind"] for row in result["rows"]] == ["correlated", "independent", "clustered",
                                                       "conditional"]  # fmt: skip
    for row in result["rows"]:  # two exact solvers: the same transport cost
        assert row["assignment_ms"] > 0 and row["network_simplex_ms"] > 0
        assert row["relative_difference"] < 1e-12
    assert "| 64 | clustered | 1 |" in (tmp_path / "exact-ot-quick.md").read_text()

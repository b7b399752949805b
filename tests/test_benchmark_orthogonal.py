"""benchmarks/orthogonal.py runs end to end on one tiny shape and reports every method."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    benchmarks = str(ROOT / "benchmarks")
    if benchmarks not in sys.path:  # the script imports its sibling _measure.py
        sys.path.insert(0, benchmarks)
    name = "benchmark_orthogonal"
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "orthogonal.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def test_orthogonal_benchmark_tiny(tmp_path):
    bench = load_benchmark()
    settings = bench.Settings(repeats=2, min_repeats=1, budget_s=0.5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a busy machine: one thread does not wait for another
    try:
        result = bench.benchmark(
            torch.device("cpu"),
            [(8, 20)],
            ["small", "large"],
            list(bench.METHODS),
            settings,
            quick=True,
            log=lambda line: None,
        )
    finally:
        torch.set_num_threads(threads)
    stem = tmp_path / "orthogonal-cpu"
    bench.write(result, stem, publish=False)

    saved = json.loads(stem.with_suffix(".json").read_text())
    rows = saved["rows"]
    assert {row["method"] for row in rows} == set(bench.METHODS)
    assert len(rows) == 2 * len(bench.METHODS)
    for row in rows:
        assert not row["skipped"]
        assert math.isfinite(row["time_ms"]) and row["time_ms"] > 0
        assert row["finite"]
        assert row["orthogonality_error"] < 1e-4, row
        if "max_diff_vs_torch" in row:  # featkd and torch compute the same P
            assert row["max_diff_vs_torch"] < 1e-4, row
    assert {t["target"] for t in saved["targets"]} >= {
        "featkd matrix_exp >= 10x faster than torch matrix_exp",
        "peak memory of featkd matrix_exp <= torch cayley",
    }
    assert "### Targets" in stem.with_suffix(".md").read_text()
    assert stem.with_suffix(".png").stat().st_size > 1000

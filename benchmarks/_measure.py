"""Measurement helpers shared by the benchmark scripts: one timed call, the peak memory of one
call (CUDA allocator statistics, or the rise of the CPU process's resident set), and the naming
and saving of a run's results."""

from __future__ import annotations

import ctypes
import gc
import json
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch

DOCS_ASSETS = Path(__file__).resolve().parents[1] / "docs" / "assets" / "benchmarks"


def figure_path(stem: Path, publish: bool) -> Path:
    """Where a run's figure goes: a published run's (a full run into ``benchmarks/results``)
    to the docs' assets only, so that each figure is committed once; any other beside its
    JSON."""
    if publish:
        DOCS_ASSETS.mkdir(parents=True, exist_ok=True)
        return DOCS_ASSETS / f"{stem.name}.png"
    return stem.with_suffix(".png")


# glibc mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


class PeakMemory:
    """Peak extra memory of one call: CUDA allocator statistics, or the CPU resident set."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.libc = None
        self.method = "cuda.max_memory_allocated"
        if device.type == "cpu":
            self.method = "unavailable"
            try:
                libc = ctypes.CDLL("libc.so.6")
                with open("/proc/self/clear_refs", "w") as handle:
                    handle.write("5")
                self.libc = libc
                self.method = (
                    "VmHWM rise (peak resident set; mmap threshold pinned at 64 KiB for the call)"
                )
            except OSError:
                pass
            self._release_pin()

    @staticmethod
    def _status_kib(field: str) -> int:
        with open("/proc/self/status") as handle:
            return int(re.search(rf"{field}:\s+(\d+)", handle.read()).group(1))

    def _release_pin(self) -> None:
        """Thresholds for the timed calls: glibc's dynamic maxima, fixed."""
        if self.libc is not None:
            self.libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
            self.libc.mallopt(_M_TRIM_THRESHOLD, 64 * 2**20)

    def measure(self, run: Callable[[], None]) -> float | None:
        """MiB above what was in use before ``run()``, at the peak of the call."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            run()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - before) / 2**20
        if self.libc is None:
            run()
            return None
        self.libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)  # big buffers mapped, returned on free
        self.libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        before = self._status_kib("VmRSS")
        try:
            run()
            return max(self._status_kib("VmHWM") - before, 0) / 1024
        finally:
            self._release_pin()


def time_once(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds of one call of ``fn``: CUDA events on a GPU, the wall clock on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def host_time_once(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes to hand control back to the host, the device idle
    before it: on a GPU what queuing its kernels costs the CPU (the wall clock on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def device_label(device: torch.device, quick: bool = False) -> tuple[str, str]:
    """The device's name for a report, and the slug of its results' file names (``quick`` for
    a smoke run, which must not overwrite the real results)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    name = name or device.type
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or device.type
    return name, "quick" if quick else slug


def save_results(stem: Path, result: dict, table: str) -> None:
    """``stem.json`` (the result) and ``stem.md`` (its table), the folder made if needed; says
    where they went."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(table)
    print(f"saved {stem}.json/.md")

"""float32 error of the accelerator path against float64, beside the CPU path's, at the GPU
benchmark's sizes: does a synchronisation-free algorithm lose digits the CPU one keeps?

On CPU tensors, ``featkd._sync.simulate_accelerator`` runs what a GPU runs (Newton-Schulz
instead of an SVD, a fixed number of squarings, device-side checks). For every case of
``benchmarks/gpu.py`` the script computes the loss (a head: a fixed weighted sum of its output)
and the student's gradient in float64 on the CPU path, the reference, and in float32 on both
paths, and reports the relative errors ``|v - v64| / |v64|`` and ``||g - g64|| / ||g64||``.
Inputs: pooled features ``(B, D)`` and tokens ``(B / 8, N, D)``, standard normal and
ill-conditioned (multiplied by a Gaussian ``D x D`` matrix, condition numbers around 1e3), where
sync-free iterations are the most likely to fall short. The sliced Wasserstein loss is left out:
its random directions are drawn in the working dtype, so float32 and float64 differ by the
Monte Carlo draw, not by rounding.

    python benchmarks/accelerator_error.py            # B=256, N=17, D_s=192, D_t=768
    python benchmarks/accelerator_error.py --quick    # tiny sizes: a check that everything runs

Writes ``benchmarks/results/accelerator-error-cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # gpu.py, _measure.py

from _measure import save_results

RESULTS = Path(__file__).parent / "results"
SKIPPED = {"WassersteinLoss (sliced)"}  # random directions drawn in the working dtype


def inputs(kind: str, batch: int, tokens: int, d_s: int, d_t: int, ill: bool, seed: int = 0):
    """Float64 ``(student, teacher)`` (teacher ``None`` for a head) of the case's kind."""
    gen = torch.Generator().manual_seed(seed)

    def features(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        if ill:  # a random mixing: the features' covariance gets a wide spectrum
            width = shape[-1]
            x = x @ (torch.randn(width, width, generator=gen, dtype=torch.float64) / width**0.5)
        return x

    if kind == "logits":
        return features(batch, 1000), features(batch, 1000)
    if kind == "tokens":
        return features(batch // 8, tokens, d_s), features(batch // 8, tokens, d_t)
    if kind == "head-teacher":
        return features(batch, d_t), None
    if kind == "head-student":
        return features(batch, d_s), None
    return features(batch, d_s), features(batch, d_t)


def value_and_gradient(module, student, teacher, labels, dtype, accelerator: bool):
    """The loss (a head: a fixed weighted sum of its output) and the student's gradient, in
    ``dtype`` on the chosen path, as float64."""
    from featkd._sync import simulate_accelerator

    module = copy.deepcopy(module).to(dtype)
    s = student.detach().to(dtype).clone().requires_grad_()
    path = simulate_accelerator() if accelerator else torch.enable_grad()
    with path:
        if teacher is None:
            out = module(s)
            weights = torch.linspace(-1.0, 1.0, out.numel(), dtype=dtype).view_as(out)
            value = (out * weights).sum()
        else:
            value = module(s, teacher.to(dtype), labels=labels)
        value.backward()
    return value.detach().double(), s.grad.double()


def errors(module, student, teacher, labels) -> dict[str, float]:
    v64, g64 = value_and_gradient(module, student, teacher, labels, torch.float64, False)
    row = {}
    for path, accelerator in (("cpu", False), ("accelerator", True)):
        v, g = value_and_gradient(module, student, teacher, labels, torch.float32, accelerator)
        row[f"{path}_value"] = float((v - v64).abs() / v64.abs().clamp_min(1e-30))
        row[f"{path}_gradient"] = float((g - g64).norm() / g64.norm().clamp_min(1e-30))
    return row


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        "# float32 error of the accelerator path (run on the CPU)",
        "",
        f"featkd {meta['featkd']}, torch {meta['torch']}, {meta['date']}; B={meta['batch']}, "
        f"tokens (B/8, {meta['tokens']}, D), D_s={meta['d_s']}, D_t={meta['d_t']}; relative "
        "error against float64 on the CPU path (`python benchmarks/accelerator_error.py`).",
        "",
        "| loss or head | inputs | CPU path: value | gradient | accelerator path: value "
        "| gradient |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        cells = [row["name"], row["inputs"]]
        cells += [
            f"{row[k]:.1e}"
            for k in ("cpu_value", "cpu_gradient", "accelerator_value", "accelerator_gradient")
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import gpu

    import featkd

    batch, tokens, d_s, d_t = (16, 5, 8, 12) if args.quick else (256, 17, 192, 768)
    labels = torch.arange(batch) % 10
    rows = []
    with warnings.catch_warnings():  # never stepped: FrozenParametersWarning
        warnings.simplefilter("ignore")
        for name, (factory, kind) in gpu.loss_and_head_cases(d_s, d_t).items():
            if name in SKIPPED:
                continue
            torch.manual_seed(0)
            module = factory()
            for ill in (False, True):
                student, teacher = inputs(kind, batch, tokens, d_s, d_t, ill)
                case_labels = labels[: student.shape[0]]
                row = {"name": name, "inputs": "ill-conditioned" if ill else "standard normal"}
                row.update(errors(module, student, teacher, case_labels))
                rows.append(row)
                print(
                    f"{name:<45} {row['inputs']:<16} cpu {row['cpu_value']:.1e} "
                    f"{row['cpu_gradient']:.1e}  accelerator {row['accelerator_value']:.1e} "
                    f"{row['accelerator_gradient']:.1e}",
                    flush=True,
                )
    result = {
        "rows": rows,
        "meta": {
            "featkd": featkd.__version__,
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
            **dict(zip(("batch", "tokens", "d_s", "d_t"), (batch, tokens, d_s, d_t), strict=True)),
        },
    }
    stem = args.out / "accelerator-error-cpu"
    save_results(stem, result, markdown(result))
    return result


if __name__ == "__main__":
    main()

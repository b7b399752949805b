"""The public contract of DESIGN.md: these names must stay importable from ``featkd``."""

import doctest
import importlib
import os
import pkgutil
from pathlib import Path

import pytest

import featkd

# Grows as each method lands; a name may be added, never silently removed.
PUBLIC_NAMES = {
    "WarmupSkippedWarning",
    "pool",
    "align_tokens",
    "to_tokens",
    "FeatureTap",
    "KDLoss",
    "orthogonality_error",
    "cosine_preservation",
    "linear_cka",
    "FeatkdInputError",
    "ShapeError",
    "DTypeError",
    "NonFiniteError",
    "ChoiceError",
    "DeviceError",
    "set_finite_check",
    "__version__",
    # VkD
    "OrthogonalProjector",
    "Whitening",
    "VkDLoss",
    # CosPress and its baseline
    "SinkhornConvergenceWarning",
    "TeacherCompressionHead",
    "LinearHead",
    "CosPressLoss",
    "ProteusLoss",
    # FCFD
    "FCFDLoss",
    "build_bridge",
    "FeatureSpec",
    # KD2M
    "WassersteinLoss",
    "JointWassersteinLoss",
    "GaussianWassersteinLoss",
    "GaussianKLLoss",
    "MMDLoss",
    "KD2MLoss",
    # multi-teacher
    "MultiTeacherLoss",
    "Teacher",
    "PHIStandardize",
    "RunningStandardize",
    "FeatureQueue",
    # multi-process
    "GlobalBatch",
    "gather_with_grad",
    # cached teacher features
    "cache_teacher_features",
    "TeacherCache",
    "CachedTeacherDataset",
    "RandomTransformWarning",
    "CacheError",
    # results and errors the above return or raise
    "CosinePreservation",
    "NotCapturedError",
    "UnknownModuleError",
}


def test_public_names_are_exported():
    missing = PUBLIC_NAMES - set(featkd.__all__)
    assert not missing, f"public names disappeared from featkd.__all__: {sorted(missing)}"
    for name in featkd.__all__:
        assert hasattr(featkd, name), name


def test_all_is_sorted_and_unique():
    assert len(set(featkd.__all__)) == len(featkd.__all__)
    assert featkd.__all__ == sorted(featkd.__all__)


def test_version_is_a_string():
    assert isinstance(featkd.__version__, str) and featkd.__version__.count(".") == 2


MODULES = sorted(m.name for m in pkgutil.walk_packages(featkd.__path__, "featkd."))


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name):
    if module_name.endswith("_triton"):  # the fused kernels: importable only with Triton
        pytest.importorskip("triton")
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_packaging_files():
    """MIT licence text, the PEP 561 marker shipped with the package, a citation file naming
    the four methods' papers."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    assert (root / "LICENSE").read_text().startswith("MIT License")
    assert (root / "src" / "featkd" / "py.typed").exists()
    pyproject = (root / "pyproject.toml").read_text()
    assert 'featkd = ["py.typed"]' in pyproject
    citation = yaml.safe_load((root / "CITATION.cff").read_text())
    titles = " | ".join(ref["title"] for ref in citation["references"])
    for method in ("VkD", "Preserving Angles", "Function-Consistent", "KD2M"):
        assert method in titles


def test_import_loads_neither_dynamo_nor_pot():
    """``import featkd`` costs little more than ``import torch``: dynamo (about as long to
    import as torch), POT and Triton load only when compile, the capped network simplex
    (``WassersteinLoss("emd", max_iter=N)``) or a fused kernel is used."""
    import subprocess
    import sys

    code = "import sys, featkd; print(sorted(m for m in ('torch._dynamo', 'ot', 'triton') if m in sys.modules))"
    src = str(Path(__file__).resolve().parents[1] / "src")  # this checkout, not an installed copy
    env = {**os.environ, "PYTHONPATH": src}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("name", "home"),
    [
        ("neighbourhood_kl", "featkd.cospress"),
        ("flat_cosine_loss", "featkd.cospress"),
        ("layer_norm", "featkd.vkd.normalize"),
        ("batch_standardize", "featkd.vkd.normalize"),
        ("whiten", "featkd.vkd.normalize"),
        ("gather_with_grad", "featkd"),
    ],
)
def test_building_blocks_moved_out_of_functional_still_resolve_for_one_release(name, home):
    import featkd.functional

    assert name not in featkd.functional.__all__
    with pytest.warns(FutureWarning, match=f"featkd.functional.{name} moved to {home}.{name}"):
        moved = getattr(featkd.functional, name)
    assert moved is getattr(importlib.import_module(home), name)
    with pytest.raises(AttributeError, match="no attribute 'not_a_loss'"):
        featkd.functional.not_a_loss

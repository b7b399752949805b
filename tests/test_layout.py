"""The house rules of the source tree (issue 12): short files, one precision fence, private
modules below public ones, one function per loss in ``featkd.functional``."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
from pathlib import Path

import pytest
from torch import nn

import featkd
import featkd.functional
from featkd._loss import DistillationLoss

SRC = Path(featkd.__file__).resolve().parent
SOURCES = sorted(SRC.rglob("*.py"))
MAX_LINES = 400
LOSSES = sorted(name for name in featkd.__all__ if name.endswith("Loss"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # the parent is a module, not a package
        return False


def _featkd_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "featkd":
                # "from featkd.vkd import _expm" imports the module featkd.vkd._expm
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    found.append(submodule if _is_module(submodule) else node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "featkd"]
    return found


def test_the_tree_is_where_this_test_looks():
    assert len(SOURCES) > 20 and (SRC / "_precision.py") in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_source_file_is_over_400_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(SRC)}: {lines} lines"


def test_autocast_is_switched_only_in_the_precision_module():
    """One precision fence: every ``autocast(...)`` call lives in ``_precision.py``."""
    fences = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name == "autocast":
                    fences.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert fences and all(f.startswith("_precision.py:") for f in fences), fences


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_private_modules_import_only_private_modules(path):
    """A private module (``_name.py``) is a lower layer: it never imports a public module,
    where the loss classes live (no import climbs back up)."""
    if not path.name.startswith("_") or path.name == "__init__.py":
        return
    imported = _featkd_imports(path)
    public = [m for m in imported if not m.split(".")[-1].startswith("_")]
    assert not public, f"{_module_name(path)} imports {public}"
    holding_losses = [m for m in imported if _defines_a_loss(m)]
    assert not holding_losses, f"{_module_name(path)} imports loss classes' {holding_losses}"


def _defines_a_loss(module_name: str) -> bool:
    module = importlib.import_module(module_name)
    return any(
        inspect.isclass(value)
        and issubclass(value, nn.Module)
        and value.__module__ == module_name
        and value.__name__.endswith("Loss")
        and value is not DistillationLoss  # the contract's base, below every family
        for value in vars(module).values()
    )


# methods named by one word in their papers
_ONE_WORD = {"CosPressLoss": "cospress_loss", "VkDLoss": "vkd_loss"}


def _function_name(loss: str) -> str:
    """``GaussianKLLoss`` -> ``gaussian_kl_loss``, ``KD2MLoss`` -> ``kd2m_loss``."""
    if loss in _ONE_WORD:
        return _ONE_WORD[loss]
    return re.sub(r"(?<=[a-z])(?=[A-Z])", "_", loss.removesuffix("Loss")).lower() + "_loss"


def test_functional_lists_exactly_one_function_per_loss():
    expected = sorted(_function_name(name) for name in LOSSES)
    assert sorted(featkd.functional.__all__) == expected
    for name in expected:
        assert inspect.isfunction(getattr(featkd.functional, name)), name


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_is_on_the_contract(name):
    """A thin module over the shared base; its function takes the student first and accepts
    ``labels`` and ``reduction``."""
    cls = getattr(featkd, name)
    assert issubclass(cls, DistillationLoss)
    function = getattr(featkd.functional, _function_name(name))
    parameters = inspect.signature(function).parameters
    assert list(parameters)[:2] == ["student", "teacher"]
    for keyword in ("labels", "reduction"):
        assert parameters[keyword].kind is inspect.Parameter.KEYWORD_ONLY, (name, keyword)
    forward = inspect.signature(cls.forward).parameters
    assert forward["labels"].kind is inspect.Parameter.KEYWORD_ONLY


def test_references_are_independent_and_name_their_source():
    """``tests/references.py`` holds the independent references: it never imports featkd (a
    reference that ran the library would check it against itself), and every function says
    where its formula comes from; no other test module keeps a ``ref_`` function of its own."""
    tests = Path(__file__).resolve().parent
    path = tests / "references.py"
    assert _featkd_imports(path) == []
    tree = ast.parse(path.read_text())
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    assert len(functions) > 20
    for node in functions:
        assert not node.name.startswith("_"), node.name
        assert len(ast.get_docstring(node) or "") > 20, node.name
    for other in sorted(tests.glob("*.py")):
        if other != path:
            defined = [
                n.name for n in ast.parse(other.read_text()).body if isinstance(n, ast.FunctionDef)
            ]
            assert not [name for name in defined if name.startswith("ref_")], other.name

"""Every ```python block in README.md and the docs pages runs, one test case per block.

Blocks are found in README.md and every ``docs/**/*.md`` page (the fence may be indented, as in an
admonition). Each block runs on its own, in a fresh namespace, the way a reader would paste it:
it must import and define what it uses. A block that stands for the reader's own training loop
may instead use a few names the reader already has (``student``, ``teacher``, ``loader``, ...);
the test then supplies tiny stand-ins for exactly those names, from ``STAND_INS`` below, and the
page must say what they are in the prose right above the block, in its section (checked: every
such name must appear there in backticks). Any other name a block uses without defining it fails the test.

Blocks of ``docs/distributed.md`` run inside a one-process gloo group (``world_size=1``, a
``FileStore`` in a temporary folder), destroyed afterwards: ``DistributedDataParallel`` is built
for real, and ``GlobalBatch`` runs with an initialised group of one process.
"""

from __future__ import annotations

import builtins
import contextlib
import re
import symtable
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import featkd

ROOT = Path(__file__).resolve().parents[1]

# An opening or closing fence: indent, three or more backticks or tildes, an info string.
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
# What makes a fenced block "Python" for this test (and for the guard against escapes).
PYTHON_INFO = re.compile(r"^\s*\{?\s*\.?(python3?|py|pycon|ipython3?)\b", re.IGNORECASE)


def markdown_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    code: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def python_blocks(path: Path) -> list[Block]:
    """The fenced Python blocks of one page (CommonMark fences: a closing fence is the same
    character, at least as long, with nothing after it)."""
    page = path.relative_to(ROOT).as_posix()
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, indent = opening["fence"], opening["indent"]
        body, j = [], i + 1
        while j < len(lines):
            closing = FENCE.match(lines[j])
            if (
                closing
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and not closing["info"].strip()
            ):
                break
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        if PYTHON_INFO.match(opening["info"]):
            blocks.append(Block(page, i + 1, textwrap.dedent("\n".join(body)) + "\n"))
        i = j + 1
    return blocks


def python_fence_openers(path: Path) -> list[int]:
    """Lines that open a Python fence, counted without the block parser: the guard that no block
    escapes the parser (an unusual fence, indentation, info string or page)."""
    return [
        number
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if (m := FENCE.match(line)) and PYTHON_INFO.match(m["info"])
    ]


BLOCKS = [block for path in markdown_pages() for block in python_blocks(path)]


# ------------------------------------------------------------------------------- stand-ins
class TokenNet(nn.Module):
    """A ViT-shaped stand-in: images (B, 3, 16, 16) -> a CLS token and 16 patch tokens of width
    ``dim`` (``forward_features``), through ``depth`` blocks named ``blocks.0``, ``blocks.1``...;
    ``forward`` returns ``(tokens, logits)``."""

    def __init__(self, dim: int, depth: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(
            *(
                nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
                for _ in range(depth)
            )
        )
        self.head = nn.Linear(dim, num_classes)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(images).flatten(2).transpose(1, 2)
        return self.blocks(torch.cat([self.cls_token.expand(len(images), -1, -1), patches], 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.forward_features(images)
        return tokens, self.head(tokens[:, 0])


class MapNet(nn.Module):
    """A CNN-shaped stand-in: images (B, 3, 16, 16) -> a (B, channels, 4, 4) map
    (``forward_features``, also called ``features``). ``forward`` returns what ``returns`` names,
    from the pooled features and the logits."""

    def __init__(self, channels: int, returns: str = "logits", num_classes: int = 10) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, channels, 3, stride=4, padding=1), nn.ReLU())
        self.fc = nn.Linear(channels, num_classes)
        self.returns = returns

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)

    def forward(self, images: torch.Tensor) -> Any:
        pooled = self.trunk(images).mean((2, 3))
        outputs = {"features": pooled, "logits": self.fc(pooled)}
        names = self.returns.split(",")
        return outputs[names[0]] if len(names) == 1 else tuple(outputs[n] for n in names)


def batches(count: int = 2, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The stand-in loader: ``count`` batches of random 16 x 16 images and labels of 10 classes."""
    return [(torch.randn(size, 3, 16, 16), torch.randint(0, 10, (size,))) for _ in range(count)]


def readme_names() -> dict[str, Any]:
    return {"student": TokenNet(192), "teacher": MapNet(768), "loader": batches()}


def quickstart_names() -> dict[str, Any]:
    return {"student": TokenNet(192), "teacher": TokenNet(768, depth=12), "loader": batches()}


def vkd_names() -> dict[str, Any]:
    return {"student": TokenNet(192), "teacher": MapNet(3024), "loader": batches()}


def cospress_names() -> dict[str, Any]:
    return {"student": TokenNet(192), "teacher": TokenNet(384), "loader": batches()}


def kd2m_names() -> dict[str, Any]:
    s, t = torch.randn(8, 64, requires_grad=True), torch.randn(8, 64)
    return {
        "student": MapNet(64, returns="logits,features"),
        "teacher": MapNet(64),
        "loader": batches(),
        "KD2MLoss": featkd.KD2MLoss,
        "s": s,
        "t": t,
        "labels": torch.randint(0, 10, (8,)),
        "logits": torch.randn(8, 10, requires_grad=True),
        "t_logits": torch.randn(8, 10),
    }


def distributed_names() -> dict[str, Any]:
    images, labels = batches(1)[0]
    return {
        "student": MapNet(32, returns="features,logits"),
        "teacher": MapNet(64, returns="features"),
        "batch_level_loss": featkd.CosPressLoss(teacher_dim=64, student_dim=32),
        "device": torch.device("cpu"),
        "local_rank": 0,
        "images": images,
        "labels": labels,
    }


# Page -> the stand-ins its loop-shaped blocks may use; each block gets only the names it uses.
STAND_INS: dict[str, Callable[[], dict[str, Any]]] = {
    "README.md": readme_names,
    "docs/quickstart.md": quickstart_names,
    "docs/vkd.md": vkd_names,
    "docs/cospress.md": cospress_names,
    "docs/kd2m.md": kd2m_names,
    "docs/distributed.md": distributed_names,
}

# Pages whose blocks run inside a one-process gloo group.
PROCESS_GROUP_PAGES = {"docs/distributed.md"}

# Pages that do not yet say above a block which stand-ins it uses.
NOTE_PENDING: set[str] = set()


# ------------------------------------------------------------------------------- analysis
def free_names(code: str) -> set[str]:
    """Names a block reads from its module namespace without binding them there (nor builtins)."""
    module = symtable.symtable(code, "<block>", "exec")
    bound = {
        sym.get_name()
        for sym in module.get_symbols()
        if sym.is_assigned() or sym.is_imported() or sym.is_namespace()
    }
    read, tables = set(), [module]
    while tables:
        table = tables.pop()
        tables.extend(table.get_children())
        for sym in table.get_symbols():
            if sym.is_referenced() and (table is module or sym.is_global()):
                read.add(sym.get_name())
    return read - bound - set(dir(builtins))


def prose_above(block: Block) -> str:
    """The prose of the block's section above it: from the nearest heading to the opening fence,
    without the code of earlier blocks (a note may introduce the two blocks that follow it)."""
    lines = (ROOT / block.page).read_text().splitlines()[: block.line - 1]
    prose: list[str] = []
    fence: str | None = None
    for line in lines:
        match = FENCE.match(line)
        if fence is None and match:
            fence = match["fence"]
        elif fence is not None:
            if match and match["fence"].startswith(fence) and not match["info"].strip():
                fence = None
        elif line.startswith("#"):
            prose = []
        else:
            prose.append(line)
    return " ".join(prose)


@contextlib.contextmanager
def one_process_group(tmp_path: Path) -> Iterator[None]:
    assert not dist.is_initialized()
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------- tests
def test_every_python_block_is_collected():
    """Every Python fence of README.md and docs/ is a test case below, and there are 18."""
    openers = {
        f"{path.relative_to(ROOT).as_posix()}:{line}"
        for path in markdown_pages()
        for line in python_fence_openers(path)
    }
    assert {block.id for block in BLOCKS} == openers
    assert len(BLOCKS) == len(openers) == 18  # update when a page gains or loses a block


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_python_block_runs(block: Block, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    needed = free_names(block.code)
    offered = STAND_INS[block.page]() if block.page in STAND_INS else {}
    missing = sorted(needed - offered.keys())
    assert not missing, (
        f"{block.id} uses {missing} without defining them: define them in the block, or add "
        "stand-ins to STAND_INS and say what they are right above the block"
    )
    if needed and block.page not in NOTE_PENDING:
        above = prose_above(block)
        undocumented = sorted(name for name in needed if f"`{name}`" not in above)
        assert not undocumented, (
            f"{block.id}: the prose above the block, in its section, must say what {undocumented} are"
        )

    namespace: dict[str, Any] = {"__name__": "__docs_example__"}
    namespace.update({name: offered[name] for name in needed})
    code = compile(block.code, block.id, "exec")
    with (
        one_process_group(tmp_path)
        if block.page in PROCESS_GROUP_PAGES
        else contextlib.nullcontext()
    ):
        exec(code, namespace)
    capsys.readouterr()  # what a block prints is for its reader

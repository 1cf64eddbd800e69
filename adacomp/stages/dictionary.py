"""DirNet stage: dictionary-learning compression of recurrent (and linear) layers.

Zhang, Wang, Li, Wang, *Dynamically Hierarchy Revolution: DirNet for Compressing Recurrent Neural
Network on Mobile Devices* (IJCAI 2018, arXiv 1806.01248). The paper has no public code; where its
exact formulation cannot be recovered this module implements the reading stated here (and in
``docs/dirnet.md``).

The factorization
-----------------
A weight matrix ``M`` (``m x n``, rows = output units, columns = the input it acts on) is written as
sparse codes times a projection dictionary, ``M ~= Z D``: ``D`` holds ``k`` unit-norm atoms in the
``n``-dimensional input space (``k x n``) and every row of ``Z`` (``m x k``) has at most ``s``
non-zeros. The dictionary is learned with scikit-learn's :class:`MiniBatchDictionaryLearning`,
which minimises ``1/2 ||M - Z D||_F^2 + lambda ||Z||_1`` over unit-norm atoms (the paper's
objective), started from the top-``k`` right singular vectors of ``M``; ``lambda`` is
``alpha`` times the mean over rows of the smallest ``lambda`` that zeroes the row's code (scale
free). The stored codes are then computed by orthogonal matching pursuit (:func:`omp`: the
algorithm of scikit-learn's ``orthogonal_mp_gram``, vectorized over rows in ``torch``) with exactly
``s`` non-zeros per row, so the size is known exactly, and OMP's values are the least-squares
optimum on their support. When ``s`` is so close to ``k`` that a
dense ``m x k`` code matrix is smaller than values plus indices, the codes are stored dense.

Shared projection (after Prabhavalkar et al. 2016)
--------------------------------------------------
In a stacked RNN the recurrent matrix of layer ``l`` (``W_hh^l``) and the input matrix of layer
``l+1`` (``W_ih^(l+1)``) both act on ``h^l``; with ``shared_projection=True`` they are stacked,
``[W_hh^l ; W_ih^(l+1)] ~= Z D_l``, and share one dictionary. At inference ``h^l`` is projected
once, ``p = D_l h^l`` (``k`` numbers), and both the next step's recurrent gates and the next
layer's input gates are sparse combinations of ``p``. In a bidirectional RNN the column block of
``W_ih^(l+1)`` (both directions) that reads direction ``d`` of ``h^l`` joins that direction's
group, and the two ``W_ih^0`` of layer 0 share the dictionary of the input ``x``. ``W_ih^0`` (of
the input) and the last layer's ``W_hh`` have no partner inside the module and get their own
dictionaries. Biases stay dense. ``nn.Linear`` (selected by ``filter_fn``) is one group.

Adaptive choices (``method="dirnet"``)
--------------------------------------
For every group the stage learns dictionaries for a grid of atom counts ``k`` (``atom_grid``,
fractions of ``n``) and measures, for every sparsity ``s <= max_nonzeros`` at once (OMP's path),
the reconstruction error ``||M - Z D||_F^2``. Both the learned dictionary and its starting point
(the SVD basis) are candidates, as are dense codes. The stage then picks one ``(k, s)`` per group
to minimise the *summed* squared error of all groups subject to the size budget (a
multiple-choice knapsack solved exactly by dynamic programming over bytes, rounded up to
``1/4000`` of the budget). Within a layer this chooses the number of atoms; across the hierarchy
it chooses each layer's sparsity. ``method="uniform"`` is DirNet without the adaptive choices (one
atom fraction and one code density ``s/k`` for every group); ``method="svd"`` is the shared
projection SVD baseline (dense codes on the top singular vectors, ranks allocated by the same
dynamic program); ``method="fixed"`` takes ``atoms``/``nonzeros`` by group name.

Storage
-------
A group stores ``D`` (``k n`` values), the code values (``m s``) and the code indices (``m s``,
``uint8`` when ``k <= 256``, else ``int16``/``int32``), or dense codes (``m k`` values). These are
exactly the compressed module's parameters and persistent buffers, so ``Report.bytes_after`` is
the sum of the ``nbytes`` of its state-dict tensors (tested).

Inference
---------
A compressed module runs in one of two ways, chosen per module (``inference``): ``"codes"``
computes ``Z (D h)`` step by step without ever forming a dense weight (the shared projection is
computed once per step); ``"dense"`` rebuilds the dense weights once per call and runs PyTorch's
fused RNN kernel. ``"auto"`` (default) times both on the call shapes ``inference_batch`` (default
``(1, 1)``: one token of one sequence, i.e. streaming generation), two warm-up calls and the median
of ``timing_repeats`` calls per path, and keeps the faster; ``"codes"`` / ``"dense"`` force a path.
Training (fine-tuning) always uses the dense path, which back-propagates into ``D`` and the code
values; the sparsity pattern stays fixed.

A compressed module is an ordinary ``nn.Module``: it deep-copies, pickles (``torch.save(model)``)
and takes ``torch.ao`` dynamic quantization, which finds the dictionaries and dense codes as
``nn.Linear`` submodules (:class:`SparseCodes`).

Selection and progress
----------------------
Without ``filter_fn`` the stage compresses every ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``; an
``nn.Linear`` only when ``filter_fn`` selects it. Learning the dictionaries is the slow part (a
2 x 256 LSTM at 4x: 15 to 45 s on two busy cores with the default grid, ``docs/dirnet.md``);
``compress_`` shows a ``tqdm`` bar over them when stderr is a terminal (``progress=True`` always,
``False`` never).
"""

from __future__ import annotations

import functools
import hashlib
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .frame import (
    EXTRA_STATE_KEY,
    SKLEARN_INSTALL,
    LayerRecord,
    Stage,
    finetune,
    layer_sizes,
    module_bytes,
    optional_import,
    progress_bar,
    register_stage,
)

__all__ = [
    "DICTIONARY_METHODS",
    "DictionaryConfig",
    "DictionaryStage",
    "DictLinear",
    "DictRNN",
    "SparseCodes",
    "set_inference",
]

STAGE_NAME = "dirnet"
DICTIONARY_METHODS = ("dirnet", "uniform", "svd", "fixed")
INFERENCE_MODES = ("auto", "codes", "dense")
_RNN_MODES = {nn.LSTM: "LSTM", nn.GRU: "GRU"}
_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


# --------------------------------------------------------------------------- config


@dataclass
class DictionaryConfig:
    """Configuration of the DirNet stage (see the module docstring for the method).

    Attributes:
        ratio: the compression factor of the selected layers' stored bytes, ``> 1``
            (``ratio=8``: at most 1/8 of the bytes, weights and biases). Either this or
            ``budget_bytes`` (not used by ``method="fixed"``).
        budget_bytes: an absolute byte budget for the selected layers instead of ``ratio``
            (e.g. to compare methods at the same stored bytes).
        method: ``"dirnet"`` (adaptive atoms and sparsity), ``"uniform"`` (one atom fraction and
            one code density for all groups), ``"svd"`` (shared-projection SVD baseline) or
            ``"fixed"`` (``atoms`` and ``nonzeros`` by group name).
        shared_projection: stack ``W_hh^l`` with ``W_ih^(l+1)`` under one dictionary.
        atom_grid: candidate atom counts as fractions of the input size ``n`` (``dirnet``). The
            default stops at ``3/4``: ``k = n`` atoms (``1.0``) cost a dictionary as large as an
            ``n x n`` block, which pays only below about 2x, and more time than all other
            fractions together; add ``1.0`` for such ratios.
        max_nonzeros: the largest code sparsity ``s`` tried (``dirnet``).
        uniform_density: ``s / k`` of every group for ``method="uniform"``.
        atoms, nonzeros: ``{group name: k}`` and ``{group name: s}`` for ``method="fixed"``
            (group names: ``report.info["groups"]``).
        alpha: the lasso weight of dictionary learning relative to its scale-free maximum.
        dl_epochs: passes of :class:`MiniBatchDictionaryLearning` over the rows.
        inference: ``"auto"``, ``"codes"`` or ``"dense"`` (see the module docstring); ``"codes"``
            or ``"dense"`` forces that path without timing.
        inference_batch: the call shape ``"auto"`` times, ``(batch, time steps)``, or a list of
            such shapes (their median times are summed): set it to the deployment's calls. The
            default ``(1, 1)`` is streaming generation, one token of one sequence, where the codes
            path wins; from about 32 time steps per call the dense path wins.
        timing_repeats: timed calls per path and shape after two warm-up calls; the median counts.
        timing_batch, timing_steps: deprecated (0.2.0) spelling of ``inference_batch=(batch,
            steps)``; given, they override it with a ``DeprecationWarning``.
        finetune_steps: steps of training after compression (needs ``data`` and ``train_step``).
        optimizer: ``"adam"`` or ``"sgd"`` for fine-tuning (unless ``make_optimizer`` is given).
        lr, momentum, weight_decay, schedule: fine-tuning settings (``schedule``: ``"cosine"``
            or ``"constant"``).
        seed: seed of dictionary learning.
    """

    ratio: float | None = None
    budget_bytes: int | None = None
    method: str = "dirnet"
    shared_projection: bool = True
    atom_grid: tuple[float, ...] = (1 / 32, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 3 / 4)
    max_nonzeros: int = 64
    uniform_density: float = 0.25
    atoms: dict[str, int] | None = None
    nonzeros: dict[str, int] | None = None
    alpha: float = 0.1
    dl_epochs: int = 3
    inference: str = "auto"
    inference_batch: tuple[int, int] | list[tuple[int, int]] = (1, 1)
    timing_repeats: int = 9
    timing_batch: int | None = None
    timing_steps: int | None = None
    finetune_steps: int = 0
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in DICTIONARY_METHODS:
            raise ValueError(f"method must be one of {', '.join(DICTIONARY_METHODS)}, got {self.method!r}")
        if self.method == "fixed":
            if not self.atoms or not self.nonzeros:
                raise ValueError(
                    'method="fixed" needs atoms={group: k} and nonzeros={group: s} '
                    '(group names are in report.info["groups"] of an earlier run)'
                )
            for label, table in (("atoms", self.atoms), ("nonzeros", self.nonzeros)):
                bad = {k: v for k, v in table.items() if not _is_int(v) or v < 1}
                if bad:
                    raise ValueError(f"{label} must map group names to positive integers, got {bad}")
            if set(self.atoms) != set(self.nonzeros):
                raise ValueError("atoms and nonzeros must name the same groups")
            big = {
                g: (self.nonzeros[g], self.atoms[g]) for g in self.atoms if self.nonzeros[g] > self.atoms[g]
            }
            if big:
                raise ValueError(f"nonzeros cannot exceed atoms (s <= k), got {{group: (s, k)}} = {big}")
        else:
            if self.atoms is not None or self.nonzeros is not None:
                raise ValueError(f'atoms/nonzeros are only used by method="fixed", not {self.method!r}')
            if (self.ratio is None) == (self.budget_bytes is None):
                raise ValueError(
                    f"method={self.method!r} needs exactly one of ratio (the compression factor of the "
                    f"selected layers' bytes, > 1, e.g. ratio=8 for 8x) and budget_bytes"
                )
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not self.ratio > 1:
                hint = ""
                if isinstance(self.ratio, float) and 0 < self.ratio < 1:
                    keep = 1 - self.ratio
                    hint = f" (to keep {100 * keep:g} % of the bytes pass ratio={1 / keep:g})"
                raise ValueError(
                    f"ratio is the compression factor bytes_before / bytes_after and must be > 1 "
                    f"(ratio=8 keeps 1/8 of the bytes), got {self.ratio!r}{hint}"
                )
        if self.budget_bytes is not None and (not _is_int(self.budget_bytes) or self.budget_bytes < 1):
            raise ValueError(f"budget_bytes must be a positive integer, got {self.budget_bytes!r}")
        self.atom_grid = tuple(float(g) for g in self.atom_grid)
        if not self.atom_grid or any(not (0 < g and math.isfinite(g)) for g in self.atom_grid):
            raise ValueError(
                f"atom_grid must hold positive fractions of the input size, got {self.atom_grid}"
            )
        for name in ("max_nonzeros", "dl_epochs", "timing_repeats"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.timing_batch is not None or self.timing_steps is not None:
            warnings.warn(
                "DictionaryConfig(timing_batch=, timing_steps=) is deprecated: pass "
                "inference_batch=(batch, steps)",
                DeprecationWarning,
                stacklevel=3,
            )
            batch, steps = self.timing_batch or 1, self.timing_steps or 1
            if not _is_int(batch) or not _is_int(steps) or batch < 1 or steps < 1:
                raise ValueError(
                    f"timing_batch and timing_steps must be positive integers, got {batch!r}, {steps!r}"
                )
            self.inference_batch = (batch, steps)
            self.timing_batch = self.timing_steps = None
        self.inference_batch = _shapes(self.inference_batch)
        if not _is_int(self.finetune_steps) or self.finetune_steps < 0:
            raise ValueError(f"finetune_steps must be a non-negative integer, got {self.finetune_steps!r}")
        if not 0 < self.uniform_density <= 1:
            raise ValueError(f"uniform_density (s / k) must lie in (0, 1], got {self.uniform_density}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if self.inference not in INFERENCE_MODES:
            raise ValueError(f"inference must be one of {', '.join(INFERENCE_MODES)}, got {self.inference!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if not self.lr > 0 or not 0 <= self.momentum < 1 or not self.weight_decay >= 0:
            raise ValueError(
                f"need lr > 0, 0 <= momentum < 1 and weight_decay >= 0, got {self.lr}, {self.momentum}, "
                f"{self.weight_decay}"
            )


def _is_int(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer))


def _shapes(value: Any) -> tuple[int, int] | tuple[tuple[int, int], ...]:
    """``inference_batch`` normalized: one ``(batch, steps)`` pair, or a tuple of them (a list
    from JSON is accepted); ``ValueError`` naming the field otherwise."""

    def pair(v: Any) -> tuple[int, int] | None:
        if isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_int(x) and x >= 1 for x in v):
            return int(v[0]), int(v[1])
        return None

    one = pair(value)
    if one is not None:
        return one
    if isinstance(value, (tuple, list)) and value and all(pair(v) is not None for v in value):
        return tuple(pair(v) for v in value)
    raise ValueError(
        f"inference_batch must be (batch, time steps) with positive integers, or a list of such "
        f"pairs, e.g. (1, 1) or [(1, 1), (20, 250)]; got {value!r}"
    )


# --------------------------------------------------------------------------- sparse codes


def index_dtype(atoms: int) -> torch.dtype:
    """The smallest integer dtype that holds atom indices ``0 .. atoms - 1``."""
    if atoms <= 256:
        return torch.uint8
    return torch.int16 if atoms <= 32768 else torch.int32


def code_bytes(m: int, n: int, k: int, s: int, value_bytes: int = 4) -> tuple[int, bool]:
    """Bytes of ``Z D`` with ``D`` ``k x n`` and ``s`` non-zeros in each of the ``m`` rows of ``Z``,
    and whether the codes are stored dense (cheaper than values plus indices)."""
    idx = torch.empty((), dtype=index_dtype(k)).element_size()
    sparse, dense = m * s * (value_bytes + idx), m * k * value_bytes
    return k * n * value_bytes + min(sparse, dense), dense <= sparse


class SparseCodes(nn.Module):
    """``M ~= Z D``: a ``k x n`` dictionary and an ``m x k`` code matrix with ``s`` non-zeros a row.

    Submodules and tensors (all ``float32`` unless built with another ``dtype``):

    * ``dictionary``: an ``nn.Linear(n, k, bias=False)`` whose ``weight`` is ``D`` (``k x n``), so
      ``dictionary(x) = D x`` projects onto the atoms;
    * sparse codes: parameter ``values`` (``m x s``) and buffer ``indices`` (``m x s``, the smallest
      integer dtype for ``k``, :func:`index_dtype`): row ``i`` of ``Z`` holds ``values[i, j]`` at
      column ``indices[i, j]``; ``dense_codes`` is ``None``;
    * dense codes (``dense=True``): ``dense_codes``, an ``nn.Linear(k, m, bias=False)`` whose
      ``weight`` is ``Z`` (``m x k``); ``values`` and ``indices`` are ``None``.

    The dense parts are ordinary ``nn.Linear`` modules so that ``torch.ao`` dynamic quantization
    (``quantize_dynamic(model, {nn.Linear, ...})``) finds and quantizes them; every method here
    also works on the quantized modules (their weights are dequantized where a matrix is needed).
    The sparse code matrix is built on the fly (a CSR tensor cached for inference) and never
    stored, so the module deep-copies and pickles like any other. State-dict keys of 0.2.0
    (``dictionary``; ``values`` of dense codes) still load.
    """

    def __init__(self, m: int, n: int, k: int, s: int, dense: bool, dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.m, self.n, self.k, self.s, self.dense = m, n, k, (k if dense else s), dense
        self.dictionary = nn.Linear(n, k, bias=False, **kw)
        nn.init.zeros_(self.dictionary.weight)
        if dense:
            self.dense_codes = nn.Linear(k, m, bias=False, **kw)
            nn.init.zeros_(self.dense_codes.weight)
            self.values = None
            self.indices = None
        else:
            self.dense_codes = None
            self.values = nn.Parameter(torch.zeros(m, s, **kw))
            self.register_buffer("indices", torch.zeros(m, s, dtype=index_dtype(k), device=device))
        self._cache: tuple | None = None

    # -- pickling and copying: the CSR cache is derived data (and cannot be deep-copied)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # keys of 0.2.0, where the dictionary and dense codes were plain parameters
        legacy = {"dictionary": "dictionary.weight", "values": "dense_codes.weight" if self.dense else None}
        for old, new in legacy.items():
            if new is not None and prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        self._cache = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- the matrices

    @staticmethod
    def _weight(linear: nn.Module) -> torch.Tensor:
        """The float weight of an ``nn.Linear`` or of its ``torch.ao`` (dynamic) quantized version."""
        w = linear.weight
        return w().dequantize() if callable(w) else w

    def dictionary_matrix(self) -> torch.Tensor:
        """``D`` (``k x n``; differentiable unless the dictionary was quantized)."""
        return self._weight(self.dictionary)

    def code_matrix(self, rows: slice = slice(None)) -> torch.Tensor:
        """The dense ``Z[rows]`` (``rows x k``; differentiable in the code values)."""
        if self.dense:
            return self._weight(self.dense_codes)[rows]
        vals = self.values[rows]
        z = vals.new_zeros(vals.shape[0], self.k)
        return z.scatter_add(1, self.indices[rows].long(), vals)

    def matrix(self, rows: slice = slice(None)) -> torch.Tensor:
        """``Z[rows] D`` (``rows x n``)."""
        return self.code_matrix(rows) @ self.dictionary_matrix()

    @torch.no_grad()
    def set_(self, dictionary: torch.Tensor, values: torch.Tensor, indices: torch.Tensor | None) -> None:
        """Copy in ``D`` (``k x n``), the code values (``m x s``, or ``m x k`` dense codes) and,
        for sparse codes, their atom indices (``m x s``)."""
        self.dictionary.weight.copy_(dictionary)
        if self.dense:
            self.dense_codes.weight.copy_(values)
        else:
            self.values.copy_(values)
            self.indices.copy_(indices)
        self._cache = None

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``D x`` over the last dimension (``... x n -> ... x k``)."""
        return self.dictionary(x)

    def _sparse(self, rows: slice) -> torch.Tensor:
        """``Z[rows]`` as a CSR tensor, cached while the parameters do not change."""
        key = (rows.start, rows.stop, self.values._version, self.values.data_ptr(), self.indices._version)
        if self._cache is None or self._cache[0] != key:
            vals = self.values[rows].detach()
            idx = self.indices[rows].long()
            crow = torch.arange(0, vals.numel() + 1, self.s, dtype=torch.int64, device=vals.device)
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore")
                csr = torch.sparse_csr_tensor(
                    crow, idx.reshape(-1), vals.reshape(-1), (vals.shape[0], self.k)
                )
            self._cache = (key, csr)
        return self._cache[1]

    def decode(self, p: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """``Z[rows] p`` over the last dimension (``... x k -> ... x rows``), never forming ``Z D``."""
        if self.dense:
            if callable(self.dense_codes.weight):  # quantized: its own kernel, then the rows
                out = self.dense_codes(p)
                return out if rows == slice(None) else out[..., rows]
            return F.linear(p, self.dense_codes.weight[rows])
        if torch.is_grad_enabled():
            return p @ self.code_matrix(rows).t()
        flat = p.reshape(-1, self.k)
        out = (self._sparse(rows) @ flat.t()).t()
        return out.reshape(*p.shape[:-1], out.shape[-1])

    def extra_repr(self) -> str:
        codes = "dense codes" if self.dense else f"{self.s} non-zeros/row"
        return f"{self.m} x {self.n} ~= codes({self.m} x {self.k}, {codes}) @ dictionary({self.k} x {self.n})"


# --------------------------------------------------------------------------- groups of matrices


@dataclass
class _Member:
    """One block of a group: rows ``row0 : row0 + rows`` of the group's ``M`` are columns
    ``col0 : col1`` of the module's weight ``weight``."""

    weight: str
    row0: int
    rows: int
    col0: int
    col1: int

    def to_dict(self) -> dict:
        return {
            "weight": self.weight,
            "row0": self.row0,
            "rows": self.rows,
            "col0": self.col0,
            "col1": self.col1,
        }


def _rnn_mode(module: nn.Module) -> str:
    if type(module) is nn.RNN:
        return "RNN_TANH" if module.nonlinearity == "tanh" else "RNN_RELU"
    return _RNN_MODES[type(module)]


def _group_layout(module: nn.Module, shared: bool) -> list[tuple[str, list[_Member]]]:
    """``[(group name, members)]`` of a supported module (see the module docstring)."""
    if type(module) is nn.Linear:
        return [("weight", [_Member("weight", 0, module.out_features, 0, module.in_features)])]
    gh = _GATES[_rnn_mode(module)] * module.hidden_size
    h, layers = module.hidden_size, module.num_layers
    dirs = ["", "_reverse"] if module.bidirectional else [""]
    groups: list[tuple[str, list[_Member]]] = []

    def stack(name: str, blocks: list[tuple[str, int, int]]) -> None:
        members, row = [], 0
        for weight, c0, c1 in blocks:
            members.append(_Member(weight, row, gh, c0, c1))
            row += gh
        groups.append((name, members))

    if not shared:
        for layer in range(layers):
            for sfx in dirs:
                for kind in ("ih", "hh"):
                    w = f"weight_{kind}_l{layer}{sfx}"
                    stack(w, [(w, 0, getattr(module, w).shape[1])])
        return groups
    stack("x", [(f"weight_ih_l0{sfx}", 0, module.input_size) for sfx in dirs])
    for layer in range(layers):
        for d, sfx in enumerate(dirs):
            blocks = [(f"weight_hh_l{layer}{sfx}", 0, h)]
            if layer + 1 < layers:
                blocks += [(f"weight_ih_l{layer + 1}{s2}", d * h, (d + 1) * h) for s2 in dirs]
            stack(f"h{layer}{sfx}", blocks)
    return groups


def _group_matrix(module: nn.Module, members: list[_Member]) -> np.ndarray:
    with torch.no_grad():
        blocks = [getattr(module, mb.weight)[:, mb.col0 : mb.col1] for mb in members]
        return torch.cat(blocks, 0).double().cpu().numpy()


# --------------------------------------------------------------------------- candidates


@dataclass
class _Option:
    """One way to store a group: ``k`` atoms from ``source``, ``s`` non-zeros, its bytes and error."""

    k: int
    s: int
    source: str  # "svd" (the SVD basis) or "learned" (dictionary learning)
    dense: bool
    nbytes: int
    error: float  # ||M - Z D||_F^2


def _one_blas_thread(method):
    """Run ``method`` with NumPy's BLAS (and OpenMP) on one thread, when ``threadpoolctl`` (a
    scikit-learn dependency) is there: the matrices are small, and on a busy CPU the threads'
    waiting made dictionary learning 3 to 10 times slower."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            return method(*args, **kwargs)
        with threadpool_limits(limits=1):
            return method(*args, **kwargs)

    return wrapper


class _GroupFit:
    """Dictionaries and error curves of one group, computed lazily and cached."""

    def __init__(self, name: str, matrix: np.ndarray, config: DictionaryConfig, cache: dict | None):
        self.name = name
        self.matrix = matrix
        self.m, self.n = matrix.shape
        self.config = config
        self.cache = {} if cache is None else cache
        digest = hashlib.sha1(np.ascontiguousarray(matrix).tobytes()).hexdigest()
        self.key = (digest, config.alpha, config.dl_epochs, config.seed)
        self.energy = float((matrix**2).sum())
        self._svd: tuple | None = None

    @_one_blas_thread
    def svd(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._svd is None:
            key = self.key + ("svd",)
            if key not in self.cache:
                svd = np.linalg.svd(self.matrix, full_matrices=False)
                for a in svd:
                    a.flags.writeable = False  # shared through the cache
                self.cache[key] = svd
            self._svd = self.cache[key]
        return self._svd

    def tail_energy(self, r: int) -> float:
        """``||M - M_r||_F^2`` of the rank-``r`` truncated SVD."""
        s = self.svd()[1]
        return float((s[r:] ** 2).sum())

    @_one_blas_thread
    def dictionary(self, k: int, source: str) -> np.ndarray:
        """``k`` unit-norm atoms (``k x n``): the SVD basis, or learned from it by scikit-learn."""
        key = self.key + ("dict", k, source)
        if key in self.cache:
            return self.cache[key]
        vt = self.svd()[2]
        init = vt[: min(k, vt.shape[0])]
        if k > init.shape[0]:  # overcomplete: add normalized rows of M
            rng = np.random.default_rng(self.config.seed)
            extra = self.matrix[rng.choice(self.m, k - init.shape[0], replace=k - init.shape[0] > self.m)]
            extra = extra / np.maximum(np.linalg.norm(extra, axis=1, keepdims=True), 1e-12)
            init = np.vstack([init, extra])
        if source == "svd":
            atoms = init
        else:
            MiniBatchDictionaryLearning = optional_import(
                "sklearn.decomposition", SKLEARN_INSTALL, "DirNet's dictionary learning"
            ).MiniBatchDictionaryLearning
            # lambda_max of a row is max_j |<d_j, x>|: the smallest lasso weight that zeroes its code
            scale = float(np.abs(self.matrix @ init.T).max(axis=1).mean())
            learner = MiniBatchDictionaryLearning(
                n_components=k,
                alpha=self.config.alpha * max(scale, 1e-12),
                max_iter=self.config.dl_epochs,
                batch_size=min(256, self.m),
                dict_init=init.copy(),  # scikit-learn updates it in place
                fit_algorithm="cd",
                random_state=self.config.seed,
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                learner.fit(self.matrix)
            atoms = learner.components_
        atoms = atoms / np.maximum(np.linalg.norm(atoms, axis=1, keepdims=True), 1e-12)
        atoms.flags.writeable = False
        self.cache[key] = atoms
        return atoms

    def omp_errors(self, k: int, source: str, s_max: int) -> np.ndarray:
        """``errors[s - 1] = ||M - Z_s D||_F^2`` for ``s = 1 .. s_max`` (OMP's path, :func:`omp`)."""
        key = self.key + ("omp", k, source)
        if key in self.cache and len(self.cache[key]) >= s_max:
            return self.cache[key][:s_max]
        d = self.dictionary(k, source)
        errors = omp(d, self.matrix, s_max)[0]  # rows x s_max
        # a row whose path ended early keeps its error: the curve never rises
        total = np.minimum.accumulate(errors, axis=1).sum(0)
        self.cache[key] = total
        return total

    @_one_blas_thread
    def dense_error(self, k: int, source: str) -> float:
        """Error of the least-squares (dense) codes on the ``k``-atom dictionary."""
        if source == "svd":
            return self.tail_energy(min(k, self.n))
        d = self.dictionary(k, source)
        z = np.linalg.lstsq(d.T, self.matrix.T, rcond=None)[0].T
        return float(((self.matrix - z @ d) ** 2).sum())

    def atoms_for(self, fraction: float) -> int:
        return max(1, int(round(fraction * self.n)))

    def atom_counts(self, max_bytes: int) -> list[int]:
        """The atom counts of ``atom_grid`` whose sparsest codes fit in ``max_bytes``."""
        ks = sorted({self.atoms_for(f) for f in self.config.atom_grid})
        return [k for k in ks if code_bytes(self.m, self.n, k, 1)[0] <= max_bytes]

    def options(self, max_bytes: int, tick: Callable[[], Any] | None = None) -> list[_Option]:
        """The DirNet candidates of this group that fit in ``max_bytes``; ``tick()`` after each
        dictionary (two per atom count: the SVD basis and the learned one)."""
        out = []
        for k in self.atom_counts(max_bytes):
            # no more non-zeros than the budget can hold (values and indices of all m rows)
            per_nonzero = 4 + torch.empty((), dtype=index_dtype(k)).element_size()
            s_max = min(
                k, self.config.max_nonzeros, max(1, (max_bytes - k * self.n * 4) // (self.m * per_nonzero))
            )
            for source in ("svd", "learned"):
                errors = self.omp_errors(k, source, s_max)
                for s in range(1, s_max + 1):
                    nbytes, dense = code_bytes(self.m, self.n, k, s)
                    if nbytes <= max_bytes and not dense:
                        out.append(_Option(k, s, source, False, nbytes, float(errors[s - 1])))
                nbytes, _ = code_bytes(self.m, self.n, k, k)
                if nbytes <= max_bytes:
                    out.append(_Option(k, k, source, True, nbytes, self.dense_error(k, source)))
                if tick is not None:
                    tick()
        return out

    def svd_options(self, max_bytes: int) -> list[_Option]:
        out = []
        for r in range(1, min(self.m, self.n) + 1):
            nbytes = r * (self.m + self.n) * 4
            if nbytes > max_bytes:
                break
            out.append(_Option(r, r, "svd", True, nbytes, self.tail_energy(r)))
        return out

    def option(self, k: int, s: int, source: str = "learned") -> _Option:
        """The option with ``k`` atoms and ``s`` non-zeros (dense codes if cheaper)."""
        nbytes, dense = code_bytes(self.m, self.n, k, s)
        if dense:
            return _Option(k, k, source, True, nbytes, math.nan)
        return _Option(k, s, source, False, nbytes, math.nan)

    @_one_blas_thread
    def codes(self, opt: _Option) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, float]:
        """``(D, values, indices, error)`` for ``opt`` (``indices`` is ``None`` for dense codes)."""
        if opt.source == "svd" and opt.dense:
            u, s, vt = self.svd()
            r = min(opt.k, len(s))
            d = vt[:r]
            z = u[:, :r] * s[:r]
            if r < opt.k:  # more atoms than the rank: pad with zero codes
                d = np.vstack([d, self.dictionary(opt.k, "svd")[r:]])
                z = np.hstack([z, np.zeros((self.m, opt.k - r))])
            return d, z, None, float(((self.matrix - z @ d) ** 2).sum())
        d = self.dictionary(opt.k, opt.source)
        if opt.dense:
            z = np.linalg.lstsq(d.T, self.matrix.T, rcond=None)[0].T
            return d, z, None, float(((self.matrix - z @ d) ** 2).sum())
        # s slots a row: the OMP support (a row that ended early has zero values on unused atoms)
        _, support, values = omp(d, self.matrix, opt.s)
        order = np.argsort(support, axis=1, kind="stable")  # ascending atom index in each row
        support = np.take_along_axis(support, order, axis=1)
        values = np.take_along_axis(values, order, axis=1)
        z = np.zeros((self.m, opt.k))
        np.put_along_axis(z, support, values, axis=1)
        return d, values, support, float(((self.matrix - z @ d) ** 2).sum())


def omp(
    dictionary: np.ndarray, matrix: np.ndarray, steps: int, chunk: int = 256
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Orthogonal matching pursuit of every row of ``matrix`` on ``dictionary``, ``steps`` atoms.

    The algorithm of scikit-learn's ``orthogonal_mp_gram`` (Cholesky-updated least squares on the
    Gram matrix, the atom of largest ``|<d_j, residual>|`` added at each step, a row ending early
    when that correlation or the new atom's independence falls below machine epsilon), vectorized
    over the rows in float64 ``torch`` instead of a Python loop per row.

    Args:
        dictionary: ``D``, ``k x n`` (unit-norm atoms), ``steps <= k``.
        matrix: ``M``, ``rows x n``.
        steps: the number of atoms per row, ``>= 1``.
        chunk: rows solved together (memory ``chunk * k * steps`` float64 values).

    Returns:
        ``(errors, support, values)``: ``errors[i, t] = ||M_i - z D||^2`` after ``t + 1`` steps
        (``rows x steps``, float64); ``support`` (``rows x steps``, int64, distinct atoms in the
        order chosen) and ``values`` (``rows x steps``, float64) the codes after ``steps`` steps;
        a row that ended early holds value 0 on its remaining (unused) atoms.
    """
    d = torch.tensor(np.asarray(dictionary), dtype=torch.float64)  # copies (cached arrays are read-only)
    x = torch.tensor(np.asarray(matrix), dtype=torch.float64)
    if not 1 <= steps <= d.shape[0]:
        raise ValueError(f"steps must lie in 1 .. {d.shape[0]} (the atoms), got {steps}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small steps: threads would mostly wait (and stall on a busy CPU)
    try:
        return _omp(d, x, steps, chunk)
    finally:
        torch.set_num_threads(threads)


def _omp(d: torch.Tensor, x: torch.Tensor, steps: int, chunk: int) -> tuple[np.ndarray, ...]:
    """The body of :func:`omp`, on float64 tensors."""
    k = d.shape[0]
    gram = d @ d.t()
    eps = float(np.finfo(np.float64).eps)  # scikit-learn's threshold for both early ends
    errors, supports, values = [], [], []
    for start in range(0, x.shape[0], chunk):
        xc = x[start : start + chunk]
        rows = xc.shape[0]
        index = torch.arange(rows)
        alpha = xc @ d.t()  # rows x k: <d_j, residual>, at first <d_j, x>
        xy = alpha.clone()
        norms = (xc * xc).sum(1)
        # The support's atoms D_S = L Q with orthonormal rows q_j (Cholesky L of G_SS):
        # c[:, j] = D q_j, u = L^-1 D_S x, residual energy ||x||^2 - ||u||^2.
        lower = torch.zeros(rows, steps, steps, dtype=torch.float64)
        c = torch.zeros(rows, steps, k, dtype=torch.float64)
        u = torch.zeros(rows, steps, dtype=torch.float64)
        support = torch.zeros(rows, steps, dtype=torch.int64)
        taken = torch.zeros(rows, k, dtype=torch.float64)  # -inf on atoms in the support
        alive = torch.ones(rows, dtype=torch.bool)
        err = torch.zeros(rows, steps, dtype=torch.float64)
        for t in range(steps):
            lam = (alpha.abs() + taken).argmax(1)  # the unused atom most correlated with the residual
            ok = alive & (alpha[index, lam] ** 2 >= eps)
            w = c[index, :t, lam]  # L^-1 G[S, lam] = (<q_j, d_lam>)_j
            lkk = gram[lam, lam] - (w * w).sum(1)
            ok &= lkk > eps
            alive = ok
            diag = torch.where(ok, lkk.clamp_min(eps).sqrt(), 1.0)
            c_t = (gram[lam] - torch.bmm(w[:, None, :], c[:, :t]).squeeze(1)) / diag[:, None]
            u_t = (xy[index, lam] - (w * u[:, :t]).sum(1)) / diag
            # a row that ended gets a neutral slot: unit diagonal, no coupling, zero coefficient
            c[:, t] = torch.where(ok[:, None], c_t, 0.0)
            u[:, t] = torch.where(ok, u_t, 0.0)
            lower[:, t, :t] = torch.where(ok[:, None], w, 0.0)
            lower[:, t, t] = diag
            support[:, t] = lam
            taken[index, lam] = -math.inf
            alpha = alpha - c[:, t] * u[:, t : t + 1]
            err[:, t] = (norms - (u[:, : t + 1] ** 2).sum(1)).clamp_min(0.0)
        # the coefficients on the support: L^T gamma = u
        gamma = torch.linalg.solve_triangular(lower.transpose(1, 2), u[..., None], upper=True).squeeze(-1)
        errors.append(err)
        supports.append(support)
        values.append(gamma)
    return (
        torch.cat(errors).numpy(),
        torch.cat(supports).numpy(),
        torch.cat(values).numpy(),
    )


# --------------------------------------------------------------------------- allocation


def _pareto(options: list[_Option]) -> list[_Option]:
    """Options no other option beats in both bytes and error, by increasing bytes."""
    out: list[_Option] = []
    for opt in sorted(options, key=lambda o: (o.nbytes, o.error)):
        if not out or opt.error < out[-1].error:
            out.append(opt)
    return out


def _allocate(options: list[list[_Option]], budget: int, cells: int = 4000) -> list[_Option] | None:
    """Pick one option per group minimising the summed error within ``budget`` bytes (exact DP over
    bytes rounded up to ``budget / cells``); ``None`` if nothing fits."""
    quantum = max(1, math.ceil(budget / cells))
    cap = budget // quantum
    best = np.full(cap + 1, np.inf)  # best[c]: least summed error of the groups so far in exactly c cells
    best[0] = 0.0
    choice = []
    for opts in options:
        new = np.full(cap + 1, np.inf)
        arg = np.full(cap + 1, -1)
        for j, opt in enumerate(opts):
            w = math.ceil(opt.nbytes / quantum)
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = best[: cap + 1 - w] + opt.error
            better = cand < new
            new[better], arg[better] = cand[better], j
        choice.append(arg)
        best = new
    if not np.isfinite(best).any():
        return None
    c = int(np.argmin(best))
    picked: list[_Option] = []
    for g in range(len(options) - 1, -1, -1):
        opt = options[g][int(choice[g][c])]
        picked.append(opt)
        c -= math.ceil(opt.nbytes / quantum)
    return picked[::-1]


def _uniform(fits: list[_GroupFit], budget: int, density: float) -> list[_Option] | None:
    """One atom fraction for every group (the largest that fits) and ``s = ceil(density * k)``."""

    def plan(fraction: float) -> list[_Option]:
        out = []
        for fit in fits:
            k = fit.atoms_for(fraction)
            out.append(fit.option(k, max(1, min(k, math.ceil(density * k)))))
        return out

    lo, hi = 0.0, 4.0
    if sum(o.nbytes for o in plan(1e-9)) > budget:
        return None
    for _ in range(40):
        mid = (lo + hi) / 2
        if sum(o.nbytes for o in plan(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    return plan(max(lo, 1e-9))


# --------------------------------------------------------------------------- compressed modules


class _Compressed(nn.Module):
    """Common part: the groups of :class:`SparseCodes`, the layout and the extra state."""

    kind = ""
    adacomp_compressed = True  # frame.COMPRESSED_ATTR: never selected again

    def __init__(self, layout: list[dict], dtype=None, device=None):
        super().__init__()
        self.layout = [dict(g) for g in layout]
        self.inference = "dense"
        self.codes = nn.ModuleList(
            SparseCodes(g["m"], g["n"], g["k"], g["s"], bool(g["dense"]), dtype=dtype, device=device)
            for g in self.layout
        )
        # weight name -> [(group index, rows slice, col0, col1)]
        self.members: dict[str, list[tuple[int, slice, int, int]]] = {}
        for gi, g in enumerate(self.layout):
            for mb in g["members"]:
                rows = slice(mb["row0"], mb["row0"] + mb["rows"])
                self.members.setdefault(mb["weight"], []).append((gi, rows, mb["col0"], mb["col1"]))
        for blocks in self.members.values():
            blocks.sort(key=lambda b: b[2])

    def weight(self, name: str) -> torch.Tensor:
        """The dense reconstruction of weight ``name`` (differentiable)."""
        blocks = [self.codes[g].matrix(rows) for g, rows, _, _ in self.members[name]]
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, 1)

    def apply_weight(self, name: str, x: torch.Tensor, projections: dict | None = None) -> torch.Tensor:
        """``x @ W^T`` for weight ``name`` through the codes; ``projections[g]`` reuses ``D_g x``."""
        out = None
        for g, rows, c0, c1 in self.members[name]:
            codes = self.codes[g]
            p = projections.get(g) if projections is not None else None
            if p is None:
                p = codes.project(x[..., c0:c1])
                if projections is not None:
                    projections[g] = p
            y = codes.decode(p, rows)
            out = y if out is None else out + y
        return out

    def get_extra_state(self) -> dict:
        return {
            EXTRA_STATE_KEY: STAGE_NAME,
            "kind": self.kind,
            "inference": self.inference,
            "groups": [dict(g) for g in self.layout],
        }

    def set_extra_state(self, state: dict) -> None:
        if state.get("kind") != self.kind or state.get("groups") != self.layout:
            raise ValueError(
                f"checkpoint holds a dictionary-coded {state.get('kind')} with another layout than this "
                f"{self.kind}; rebuild the module with adacomp.stages.load"
            )
        self.inference = str(state.get("inference", "dense"))

    def extra_repr(self) -> str:
        return f"inference={self.inference!r}"


class DictLinear(_Compressed):
    """``nn.Linear`` with its weight stored as sparse codes times a dictionary."""

    kind = "Linear"

    def __init__(self, linear: nn.Linear, layout: list[dict]):
        w = linear.weight
        super().__init__(layout, dtype=w.dtype, device=w.device)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = nn.Parameter(torch.zeros_like(linear.bias)) if linear.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.inference == "dense":
            return F.linear(x, self.weight("weight"), self.bias)
        y = self.apply_weight("weight", x)
        return y + self.bias if self.bias is not None else y


class DictRNN(_Compressed):
    """``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` with dictionary-coded weights (same call signature,
    ``PackedSequence`` excepted)."""

    def __init__(self, rnn: nn.RNNBase, layout: list[dict]):
        w = rnn.weight_ih_l0
        super().__init__(layout, dtype=w.dtype, device=w.device)
        self.kind = type(rnn).__name__
        self.mode = _rnn_mode(rnn)
        for attr in (
            "input_size",
            "hidden_size",
            "num_layers",
            "bias",
            "batch_first",
            "dropout",
            "bidirectional",
        ):
            setattr(self, attr, getattr(rnn, attr))
        self.directions = 2 if rnn.bidirectional else 1
        self.suffixes = ["", "_reverse"][: self.directions]
        self.weight_names: list[str] = []
        for layer in range(self.num_layers):
            for sfx in self.suffixes:
                names = [f"weight_ih_l{layer}{sfx}", f"weight_hh_l{layer}{sfx}"]
                if self.bias:
                    for b in (f"bias_ih_l{layer}{sfx}", f"bias_hh_l{layer}{sfx}"):
                        setattr(self, b, nn.Parameter(torch.zeros_like(getattr(rnn, b))))
                    names += [f"bias_ih_l{layer}{sfx}", f"bias_hh_l{layer}{sfx}"]
                self.weight_names += names

    def _flat_weights(self) -> list[torch.Tensor]:
        return [getattr(self, n) if n.startswith("bias") else self.weight(n) for n in self.weight_names]

    def _zeros(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros(self.num_layers * self.directions, batch, self.hidden_size)

    def forward(self, input: torch.Tensor, hx=None):
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{type(self).__name__} takes a padded tensor, not {type(input).__name__}")
        unbatched = input.dim() == 2
        if unbatched:  # T x in: a batch of one, sequence first
            input = input.unsqueeze(1)
            if hx is not None:
                hx = tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)
        batch = input.shape[0 if self.batch_first and not unbatched else 1]
        if self.mode == "LSTM":
            if hx is None:
                hx = (self._zeros(batch, input), self._zeros(batch, input))
        elif hx is None:
            hx = self._zeros(batch, input)
        if self.training or self.inference == "dense":
            out, state = self._forward_dense(input, hx, unbatched)
        else:
            out, state = self._forward_codes(input, hx, unbatched)
        if unbatched:
            out = out.squeeze(1)
            state = tuple(s.squeeze(1) for s in state) if isinstance(state, tuple) else state.squeeze(1)
        return out, state

    def _forward_dense(self, x, hx, unbatched):
        batch_first = self.batch_first and not unbatched
        args = (
            self._flat_weights(),
            self.bias,
            self.num_layers,
            self.dropout,
            self.training,
            self.bidirectional,
            batch_first,
        )
        if self.mode == "LSTM":
            out, h, c = torch._VF.lstm(x, hx, *args)
            return out, (h, c)
        fn = {"GRU": torch._VF.gru, "RNN_TANH": torch._VF.rnn_tanh, "RNN_RELU": torch._VF.rnn_relu}[self.mode]
        return fn(x, hx, *args)

    def _cell(self, gx, gh, h, c):
        if self.mode == "LSTM":
            i, f, g, o = (gx + gh).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        if self.mode == "GRU":
            xr, xz, xn = gx.chunk(3, -1)
            hr, hz, hn = gh.chunk(3, -1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            return (1 - z) * n + z * h, c
        pre = gx + gh
        return (torch.tanh(pre) if self.mode == "RNN_TANH" else torch.relu(pre)), c

    def _forward_codes(self, x, hx, unbatched):
        """Step by step through the codes: ``gates = Z_ih (D x) + Z_hh (D h)``, no dense weight."""
        if self.batch_first and not unbatched:
            x = x.transpose(0, 1)  # T x B x in
        steps = x.shape[0]
        h0, c0 = hx if self.mode == "LSTM" else (hx, None)
        projections: dict[int, torch.Tensor] = {}  # group -> D_g (input of that group), all steps
        layer_input = x
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outs = []
            for d, sfx in enumerate(self.suffixes):
                idx = layer * self.directions + d
                gx = self.apply_weight(f"weight_ih_l{layer}{sfx}", layer_input, projections)
                bias_hh = None
                if self.bias:
                    gx = gx + getattr(self, f"bias_ih_l{layer}{sfx}")
                    bias_hh = getattr(self, f"bias_hh_l{layer}{sfx}")
                ((g, rows, _, _),) = self.members[f"weight_hh_l{layer}{sfx}"]
                codes = self.codes[g]
                shared = len(self.layout[g]["members"]) > 1
                h, c = h0[idx], (c0[idx] if c0 is not None else None)
                p = codes.project(h)
                out = [None] * steps
                proj = [None] * steps
                order = range(steps) if d == 0 else range(steps - 1, -1, -1)
                for t in order:
                    gh = codes.decode(p, rows)
                    if bias_hh is not None:
                        gh = gh + bias_hh
                    h, c = self._cell(gx[t], gh, h, c)
                    out[t] = h
                    p = codes.project(h)
                    proj[t] = p
                if shared:  # the next layer's input gates reuse D h of every step
                    projections[g] = torch.stack(proj)
                outs.append(torch.stack(out))
                h_n.append(h)
                c_n.append(c)
            layer_input = outs[0] if len(outs) == 1 else torch.cat(outs, -1)
        out = layer_input.transpose(0, 1) if self.batch_first and not unbatched else layer_input
        h_n = torch.stack(h_n)
        return out, ((h_n, torch.stack(c_n)) if self.mode == "LSTM" else h_n)


def _log(log: Callable[[str], None] | None, bar, msg: str) -> None:
    """``log(msg)``, with a drawn progress bar stepping aside while the line is written."""
    if log is None:
        return
    if bar is None:
        log(msg)
    else:
        with bar.external_write_mode(file=sys.stderr):
            log(msg)


def _build(module: nn.Module, layout: list[dict]) -> _Compressed:
    return DictLinear(module, layout) if type(module) is nn.Linear else DictRNN(module, layout)


def set_inference(model: nn.Module, mode: str) -> None:
    """Switch every dictionary-coded module of ``model`` to ``"codes"`` or ``"dense"`` inference."""
    if mode not in ("codes", "dense"):
        raise ValueError(f"mode must be 'codes' or 'dense', got {mode!r}")
    for mod in model.modules():
        if isinstance(mod, _Compressed):
            mod.inference = mode


def _timing_input(module: _Compressed, batch: int, steps: int) -> torch.Tensor:
    """A random input of ``batch`` sequences of ``steps`` time steps in the module's layout."""
    p = next(module.parameters())
    if isinstance(module, DictLinear):
        return torch.randn(batch, steps, module.in_features, dtype=p.dtype, device=p.device)
    shape = (batch, steps, module.input_size) if module.batch_first else (steps, batch, module.input_size)
    return torch.randn(*shape, dtype=p.dtype, device=p.device)


def _time_modes(
    module: _Compressed,
    batch: int | None = None,
    steps: int | None = None,
    repeats: int = 9,
    *,
    shapes: Any = None,
    warmup: int = 2,
) -> dict[str, float]:
    """Seconds of one call in each inference mode, ``{"codes": s, "dense": s}``.

    For every ``(batch, steps)`` of ``shapes`` (or the one pair ``batch, steps``) on a random
    input: ``warmup`` untimed calls of each path (caches, allocator), then ``repeats`` timed calls
    of each, the two paths alternating so that a burst of other load hits both; the median of a
    path's calls counts, summed over the shapes. Runs in eval mode without gradients and restores
    the module's mode and path.
    """
    if shapes is None:
        shapes = ((batch or 1, steps or 1),)
    elif isinstance(shapes[0], int):
        shapes = (tuple(shapes),)
    was_training, mode = module.training, module.inference
    module.eval()
    times = {"codes": 0.0, "dense": 0.0}
    try:
        with torch.no_grad():
            for b, t in shapes:
                x = _timing_input(module, b, t)
                samples: dict[str, list[float]] = {m: [] for m in times}
                for i in range(warmup + repeats):
                    for m in times:
                        module.inference = m
                        t0 = time.perf_counter()
                        module(x)
                        if i >= warmup:
                            samples[m].append(time.perf_counter() - t0)
                for m in times:
                    times[m] += float(np.median(samples[m]))
    finally:
        module.train(was_training)
        module.inference = mode
    return times


# --------------------------------------------------------------------------- the stage


def _supported(module: nn.Module) -> bool:
    if type(module) in (nn.LSTM, nn.GRU, nn.RNN):
        return getattr(module, "proj_size", 0) == 0 and module.weight_ih_l0.dtype.is_floating_point
    return type(module) is nn.Linear


def _recurrent(module: nn.Module) -> bool:
    """Selected without ``filter_fn``: the supported recurrent layers (``nn.Linear`` only on request)."""
    return type(module) is not nn.Linear and _supported(module)


@register_stage(STAGE_NAME, DictionaryConfig)
class DictionaryStage(Stage):
    """DirNet: sparse codes times a (shared) projection dictionary, adaptive atoms and sparsity.

    Without ``filter_fn`` it compresses every ``nn.LSTM`` (``proj_size=0``), ``nn.GRU`` and
    ``nn.RNN`` of the model; an ``nn.Linear`` is compressed only when ``filter_fn`` selects it.
    """

    supports = staticmethod(_supported)
    selects_by_default = staticmethod(_recurrent)
    layer_kinds = "nn.LSTM (proj_size=0), nn.GRU, nn.RNN, nn.Linear (exact types)"
    default_kinds = "nn.LSTM (proj_size=0), nn.GRU and nn.RNN (nn.Linear only when filter_fn selects it)"

    def compress_layers(
        self, model, config, layers, inputs, info, cache: dict | None = None, **kwargs
    ) -> list[LayerRecord]:
        """Compress ``layers``; ``cache`` (a dict) keeps dictionaries and error curves between runs
        on the same weights (e.g. several ratios), keyed by a hash of each matrix."""
        if config.finetune_steps > 0:
            inputs.require_training("finetune_steps needs")
        start = time.perf_counter()
        before = layer_sizes(layers)
        fits: list[tuple[str, _GroupFit, list[_Member]]] = []
        fixed_bytes = 0  # biases stay dense
        for name, module in layers.items():
            if next(module.parameters()).dtype != torch.float32:
                raise TypeError(
                    f"layer {name!r}: the dictionary stage stores float32 weights; got "
                    f"{next(module.parameters()).dtype}, call model.float() first"
                )
            for gname, members in _group_layout(module, config.shared_projection):
                full = f"{name}:{gname}" if name else gname
                fits.append((name, _GroupFit(full, _group_matrix(module, members), config, cache), members))
            fixed_bytes += sum(
                p.numel() * p.element_size() for n, p in module.named_parameters() if "bias" in n
            )
        group_names = [f.name for _, f, _ in fits]
        info["groups"] = group_names
        selected_bytes = sum(size.bytes for size in before.values())
        if config.method == "fixed":
            unknown = sorted(set(config.atoms) ^ set(group_names))
            if unknown:
                raise ValueError(
                    f"method='fixed' needs atoms/nonzeros for exactly the groups {group_names}; "
                    f"mismatch: {unknown}"
                )
            plan = [f.option(config.atoms[f.name], config.nonzeros[f.name]) for _, f, _ in fits]
            budget = None
        else:
            budget = (
                config.budget_bytes
                if config.budget_bytes is not None
                else math.floor(selected_bytes / config.ratio)
            )
            room = budget - fixed_bytes
            if room <= 0:
                raise ValueError(
                    f"the budget of {budget:,} bytes does not even hold the dense biases "
                    f"({fixed_bytes:,} bytes)"
                )
            if config.method == "uniform":
                plan = _uniform([f for _, f, _ in fits], room, config.uniform_density)
            else:
                options = []
                svd = config.method == "svd"
                units = [1 if svd else 2 * len(f.atom_counts(room)) for _, f, _ in fits]
                label = "dirnet svd" if svd else "dirnet dictionaries"
                bar = progress_bar(sum(units), label, inputs.progress, unit="dict")
                try:
                    for _, fit, _ in fits:
                        _log(inputs.log, bar, f"  candidates of {fit.name} ({fit.m} x {fit.n})")
                        if bar is not None:
                            bar.set_postfix_str(fit.name, refresh=False)
                        tick = bar.update if bar is not None else None
                        opts = fit.svd_options(room) if svd else fit.options(room, tick=tick)
                        if svd and tick is not None:
                            tick()
                        options.append(_pareto(opts))
                finally:
                    if bar is not None:
                        bar.close()
                plan = _allocate(options, room) if all(options) else None
            if plan is None:
                raise ValueError(
                    f"a budget of {budget:,} bytes (ratio {selected_bytes / budget:.1f}x) is unreachable: "
                    f"even the smallest codes of every group need more; use a smaller ratio"
                )
        info["budget_bytes"] = budget
        info["selection_seconds"] = time.perf_counter() - start
        # build the compressed modules
        per_module: dict[str, list[tuple[dict, np.ndarray, np.ndarray, np.ndarray | None]]] = {
            n: [] for n in layers
        }
        group_info = []
        for (name, fit, members), opt in zip(fits, plan):
            d, values, indices, error = fit.codes(opt)
            entry = {
                "name": fit.name.split(":")[-1],
                "m": fit.m,
                "n": fit.n,
                "k": opt.k,
                "s": opt.s,
                "dense": int(opt.dense),
                "members": [mb.to_dict() for mb in members],
            }
            per_module[name].append((entry, d, values, indices))
            nbytes, _ = code_bytes(fit.m, fit.n, opt.k, opt.s)
            value_bytes = fit.m * opt.s * 4
            group_info.append(
                {
                    "group": fit.name,
                    "shape": [fit.m, fit.n],
                    "atoms": opt.k,
                    "nonzeros": opt.s,
                    "dense_codes": opt.dense,
                    "source": opt.source,
                    "dictionary_bytes": opt.k * fit.n * 4,
                    "value_bytes": value_bytes,
                    "index_bytes": nbytes - opt.k * fit.n * 4 - value_bytes,
                    "bytes": nbytes,
                    "dense_bytes": fit.m * fit.n * 4,
                    "relative_error": error / fit.energy if fit.energy > 0 else 0.0,
                }
            )
        info["group_choices"] = group_info
        info["atoms"] = {g["group"]: g["atoms"] for g in group_info}
        info["nonzeros"] = {g["group"]: g["nonzeros"] for g in group_info}
        info["relative_error"] = sum(
            g["relative_error"] * f.energy for g, (_, f, _) in zip(group_info, fits)
        ) / max(sum(f.energy for _, f, _ in fits), 1e-30)
        for name, groups in per_module.items():
            old = model.get_submodule(name)
            new = _build(old, [g[0] for g in groups])
            with torch.no_grad():
                for codes, (_, d, values, indices) in zip(new.codes, groups):
                    idx = None if indices is None else torch.tensor(indices)
                    codes.set_(torch.tensor(d), torch.tensor(values), idx)
                for pname, p in old.named_parameters():
                    if "bias" in pname:
                        getattr(new, pname).copy_(p)
            new.train(old.training)
            model.set_submodule(name, new)
        if config.finetune_steps > 0:
            if inputs.make_optimizer is not None:
                optimizer = inputs.make_optimizer
            elif config.optimizer == "adam":
                optimizer = functools.partial(
                    torch.optim.Adam, lr=config.lr, weight_decay=config.weight_decay
                )
            else:
                optimizer = functools.partial(
                    torch.optim.SGD, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
                )
            info["finetune"] = finetune(
                model,
                config.finetune_steps,
                data=inputs.data,
                train_step=inputs.train_step,
                optimizer=optimizer,
                scheduler=config.schedule,
                log=inputs.log,
                progress=inputs.progress,
            )
        timings = {}
        for name in layers:
            new = model.get_submodule(name)
            if config.inference == "auto":
                timings[name] = _time_modes(new, shapes=config.inference_batch, repeats=config.timing_repeats)
                new.inference = min(timings[name], key=timings[name].get)
            else:
                new.inference = config.inference
        info["inference_seconds"] = timings
        info["inference_batch"] = config.inference_batch if config.inference == "auto" else None
        info["inference"] = {name: model.get_submodule(name).inference for name in layers}
        records = []
        by_module: dict[str, list[dict]] = {n: [] for n in layers}
        for (name, _, _), g in zip(fits, group_info):
            by_module[name].append(g)
        for name, size in before.items():
            new = model.get_submodule(name)
            gs = by_module[name]
            detail = " ".join(
                f"{g['group'].split(':')[-1]}:k{g['atoms']}"
                + ("d" if g["dense_codes"] else f"s{g['nonzeros']}")
                for g in gs
            )
            choice = {
                "groups": [{k: g[k] for k in ("group", "atoms", "nonzeros", "dense_codes")} for g in gs],
                "dictionary_bytes": sum(g["dictionary_bytes"] for g in gs),
                "value_bytes": sum(g["value_bytes"] for g in gs),
                "index_bytes": sum(g["index_bytes"] for g in gs),
                "bias_bytes": module_bytes(new) - sum(g["bytes"] for g in gs),
                "inference": new.inference,
            }
            records.append(size.record(new, choice, detail))
        return records

    def rebuild(self, module: nn.Module, extra_state: dict) -> nn.Module:
        kind = self.rebuilt_kind(module, extra_state, "dictionary-coded")
        layout = [dict(g) for g in extra_state.get("groups", [])]
        expected = {mb.weight for _, mbs in _group_layout(module, True) for mb in mbs} | {
            mb.weight for _, mbs in _group_layout(module, False) for mb in mbs
        }
        got = {mb["weight"] for g in layout for mb in g["members"]}
        if not got or not got <= expected:
            raise ValueError(
                f"checkpoint groups name weights {sorted(got)} that a {kind} of this shape lacks"
            )
        new = _build(module, layout)
        new.inference = str(extra_state.get("inference", "dense"))
        return new

"""Low-rank stage: truncated-SVD factorization with BSR rank selection and the modified stable rank.

Eo, Kang, Rhee, *A Highly Effective Low-Rank Compression of Deep Neural Networks with Modified
Beam-Search and Modified Stable Rank* (arXiv 2111.15179; Neural Networks 2023), "BSR". The paper
has no public code; where its exact formulas cannot be recovered this module implements the
reading stated here (and in ``docs/stages.md``).

Factorization
-------------
A layer's weight is read as a matrix ``W`` of ``m x n``: ``nn.Linear`` as is (``out x in``),
``nn.Conv2d`` reshaped to ``out x (in * kh * kw)``. With the SVD ``W = U S V^T`` and rank ``r``,
``W ~= A B`` with ``B = S_r^{1/2} V_r^T`` (``r x n``) and ``A = U_r S_r^{1/2}`` (``m x r``); the
square root is split evenly so both factors have the same scale for fine-tuning. A Linear becomes
``Linear(in -> r, no bias)`` then ``Linear(r -> out, bias)``; a Conv2d becomes the ``kh x kw``
convolution to ``r`` channels (same stride, padding, dilation; no bias) then a ``1 x 1``
convolution to ``out`` channels carrying the bias (Jaderberg et al.'s scheme 2 layout). At full
rank both reproduce the layer up to floating-point rounding. A factorized layer stores
``r (m + n)`` weights instead of ``m n``, so it only pays for ``r < m n / (m + n)``; a selected
rank at or above that break-even keeps the layer dense.

The ratio
---------
``LowRankConfig.ratio`` is the share of the *selected layers'* parameters (weights and biases)
to remove: ``ratio=0.8`` keeps at most 20 % of them (5x). Biases are kept. Rank choices are
discrete, so every method keeps at most the budget; BSR then tops the allocation up to within
one rank step of the budget (within 1 % of the ratio on any model where one rank step of each
layer is below 1 % of the parameters).

Rank selection (``method``)
---------------------------
* ``"uniform"``: one rank fraction ``f`` for every layer, ``r = max(1, floor(f * min(m, n)))``,
  the largest ``f`` that fits the budget.
* ``"energy"``: one share ``tau`` of singular-value energy for every layer, ``r`` the smallest rank
  with ``sum_{i<=r} s_i^2 >= tau * sum_i s_i^2``, the largest ``tau`` that fits the budget.
* ``"bsr"``: the modified beam search, our reading of the paper's: ranks are chosen jointly for
  all layers by scoring complete allocations with the user's ``evaluate`` on calibration data,
  without fine-tuning. Layers are decided one at a time, largest first. Every candidate is a
  *complete* allocation that meets the budget: the layers not yet decided are filled by the
  energy rule with the budget left over, so all candidates are compared at the same size. At
  each layer, every beam member tries a coarse grid of ranks around the rank the energy rule
  would give that layer (``rank_grid`` multipliers, plus keeping it dense); the ``beam_width``
  best-scoring allocations survive. Because the energy rule's own choice is always among the
  options, the search starts from the ``"energy"`` allocation and only moves away from it when
  the metric improves. Layers holding less than ``min_search_share`` of the parameters are not
  searched (they follow the energy rule). At the end any budget left by rank rounding is spent
  greedily on the rank step that adds the most normalized energy per parameter, and the
  surviving allocations are scored once more. SVDs are computed once and cached; a candidate is
  scored by writing its truncated weights ``U_r S_r V_r^T`` into the dense layers, so the model
  is not rebuilt per candidate. ``Report.evaluations`` says how many scores were computed.
* ``"fixed"``: the ranks in ``ranks`` (``{layer name: rank}``, e.g. ``report.info["ranks"]`` of
  an earlier run); layers not named stay dense.

Compression-friendly training: the modified stable rank
-------------------------------------------------------
The stable rank of ``W`` is ``||W||_F^2 / ||W||_2^2 = sum_i s_i^2 / s_1^2``. BSR modifies it to
measure the energy beyond the selected rank ``r`` relative to the energy within it::

    msr_r(W) = sum_{i>r} s_i^2 / sum_{i<=r} s_i^2  =  ||W||_F^2 / ||W_r||_F^2 - 1

(at ``r = 1`` this is the stable rank minus one); it is zero exactly when ``rank(W) <= r``.
:func:`regularize` sums it over the layers, differentiably (the ``s_i^2`` come from
``eigvalsh`` of the smaller Gram matrix, equal to ``torch.linalg.svdvals(W) ** 2`` and cheaper).
With ``regularize_steps > 0`` the stage trains ``train_step`` loss ``+ regularize_weight *
regularize(model, ranks)`` at the selected ranks *before* factorizing, which pushes the energy
past each rank toward zero so that truncation loses little; ``finetune_steps`` of plain training
follow the factorization.
"""

from __future__ import annotations

import bisect
import functools
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .frame import EXTRA_STATE_KEY, LayerRecord, Stage, finetune, layer_sizes, register_stage

__all__ = [
    "METHODS",
    "LowRankConfig",
    "LowRankConv2d",
    "LowRankLinear",
    "LowRankStage",
    "factorize",
    "modified_stable_rank",
    "regularize",
    "squared_singular_values",
    "weight_matrix",
]

METHODS = ("bsr", "uniform", "energy", "fixed")
STAGE_NAME = "lowrank"


# --------------------------------------------------------------------------- config


@dataclass
class LowRankConfig:
    """Configuration of the low-rank stage (see the module docstring for the method).

    Attributes:
        ratio: share of the selected layers' parameters to remove, in ``(0, 1)``
            (``0.8``: keep 20 %, a 5x reduction). Not used by ``method="fixed"``.
        method: ``"bsr"`` (beam search), ``"uniform"``, ``"energy"`` or ``"fixed"``.
        ranks: ``{layer name: rank}`` for ``method="fixed"``.
        beam_width: allocations kept per search step (``bsr``).
        rank_grid: multipliers of the energy-rule rank tried per layer (``bsr``); the energy
            rule's rank itself and "keep dense" are always tried too.
        min_search_share: layers holding less than this share of the selected parameters follow
            the energy rule instead of being searched (``bsr``).
        regularize_steps: steps of training with the modified stable-rank regulariser at the
            selected ranks before factorizing (needs ``data`` and ``train_step``).
        regularize_weight: the regulariser's weight ``lambda``; the default 10 was chosen on
            calibration accuracy for the SmallCNN with cross-entropy (see ``docs/stages.md``).
        finetune_steps: steps of plain training after factorizing.
        lr, momentum, weight_decay: SGD settings of both training phases (unless
            ``make_optimizer`` is given to :func:`adacomp.stages.compress_`).
        schedule: ``"cosine"`` (each phase decays its learning rate from ``lr`` to 0, so a
            converged model is not left noisier than it came) or ``"constant"``.
    """

    ratio: float | None = None
    method: str = "bsr"
    ranks: dict[str, int] | None = None
    beam_width: int = 3
    rank_grid: tuple[float, ...] = (0.25, 0.5, 0.7, 0.85, 1.2, 1.4, 2.0, 4.0)
    min_search_share: float = 0.01
    regularize_steps: int = 0
    regularize_weight: float = 10.0
    finetune_steps: int = 0
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method == "fixed":
            if not self.ranks:
                raise ValueError('method="fixed" needs ranks={layer name: rank}')
            bad = {
                k: v for k, v in self.ranks.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1
            }
            if bad:
                raise ValueError(f"ranks must be positive integers, got {bad}")
            self.ranks = {str(k): int(v) for k, v in self.ranks.items()}
            if self.ratio is not None:
                _check_ratio(self.ratio)
        else:
            if self.ranks is not None:
                raise ValueError(f'ranks is only used by method="fixed", not {self.method!r}')
            if self.ratio is None:
                raise ValueError(
                    f"ratio is required for method={self.method!r} (the share of parameters "
                    f"to remove, in (0, 1), e.g. ratio=0.8)"
                )
            _check_ratio(self.ratio)
        self.rank_grid = tuple(float(g) for g in self.rank_grid)
        if not self.rank_grid or any(not (g > 0 and math.isfinite(g)) for g in self.rank_grid):
            raise ValueError(
                f"rank_grid must be a non-empty tuple of positive multipliers, got {self.rank_grid}"
            )
        if int(self.beam_width) != self.beam_width or self.beam_width < 1:
            raise ValueError(f"beam_width must be a positive integer, got {self.beam_width}")
        if not 0.0 <= self.min_search_share < 1.0:
            raise ValueError(f"min_search_share must lie in [0, 1), got {self.min_search_share}")
        for name in ("regularize_steps", "finetune_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value}")
        if not self.regularize_weight >= 0:
            raise ValueError(f"regularize_weight must be >= 0, got {self.regularize_weight}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.momentum < 1 or not self.weight_decay >= 0:
            raise ValueError(
                f"need 0 <= momentum < 1 and weight_decay >= 0, got {self.momentum}, {self.weight_decay}"
            )


def _check_ratio(ratio: float) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
        raise ValueError(
            f"ratio must lie in (0, 1) (the share of the selected layers' parameters to remove, "
            f"0.8 = keep 20 %), got {ratio!r}"
        )


# --------------------------------------------------------------------------- factorized modules


class _LowRank(nn.Module):
    """Common part of the factorized modules: ``second(first(x))`` plus the extra state."""

    kind = ""
    adacomp_compressed = True  # frame.COMPRESSED_ATTR: never selected again

    def __init__(self, first: nn.Module, second: nn.Module, rank: int, shape: tuple[int, ...]):
        super().__init__()
        self.first = first
        self.second = second
        self.rank = rank
        self.weight_shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def get_extra_state(self) -> dict:
        return {
            EXTRA_STATE_KEY: STAGE_NAME,
            "kind": self.kind,
            "rank": self.rank,
            "shape": list(self.weight_shape),
        }

    def set_extra_state(self, state: dict) -> None:
        if state.get("kind") != self.kind or int(state.get("rank", -1)) != self.rank:
            raise ValueError(
                f"checkpoint holds a {state.get('kind')} of rank {state.get('rank')}, "
                f"this module is a {self.kind} of rank {self.rank}"
            )

    def weight_matrix(self) -> torch.Tensor:
        """The product ``A B`` as an ``m x n`` matrix (differentiable)."""
        return self.second.weight.reshape(self.second.weight.shape[0], -1) @ self.first.weight.reshape(
            self.rank, -1
        )

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


class LowRankLinear(_LowRank):
    """``Linear(in -> rank, no bias)`` followed by ``Linear(rank -> out, bias)``."""

    kind = "Linear"

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None
    ):
        kw = {"device": device, "dtype": dtype}
        super().__init__(
            nn.Linear(in_features, rank, bias=False, **kw),
            nn.Linear(rank, out_features, bias=bias, **kw),
            rank,
            (out_features, in_features),
        )

    @classmethod
    def like(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        """An (uninitialized) factorized module shaped for ``linear`` at ``rank``."""
        w = linear.weight
        return cls(linear.in_features, linear.out_features, rank, linear.bias is not None, w.device, w.dtype)


class LowRankConv2d(_LowRank):
    """``Conv2d(in -> rank, kh x kw, no bias)`` followed by ``Conv2d(rank -> out, 1 x 1, bias)``."""

    kind = "Conv2d"

    def __init__(self, conv: nn.Conv2d, rank: int):
        w = conv.weight
        kw = {"device": w.device, "dtype": w.dtype}
        first = nn.Conv2d(
            conv.in_channels,
            rank,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=False,
            padding_mode=conv.padding_mode,
            **kw,
        )
        second = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None, **kw)
        super().__init__(first, second, rank, tuple(w.shape))

    @classmethod
    def like(cls, conv: nn.Conv2d, rank: int) -> LowRankConv2d:
        return cls(conv, rank)


def _supported(module: nn.Module) -> bool:
    # Exact types: a subclass may use its weight in its own forward (e.g. MultiheadAttention's out_proj).
    if type(module) is nn.Linear:
        return True
    return type(module) is nn.Conv2d and module.groups == 1


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as the ``m x n`` matrix that is factorized (differentiable)."""
    if isinstance(module, _LowRank):
        return module.weight_matrix()
    if not _supported(module):
        raise TypeError(
            f"low-rank factorization supports nn.Linear and nn.Conv2d (groups=1), not {type(module).__name__}"
        )
    return module.weight.reshape(module.weight.shape[0], -1)


def _svd(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of the layer's weight matrix in float64 (so that full rank is exact to fp32 rounding)."""
    with torch.no_grad():
        return torch.linalg.svd(weight_matrix(module).double(), full_matrices=False)


def factorize(module: nn.Module, rank: int, svd: tuple | None = None) -> _LowRank:
    """Return the rank-``rank`` factorized replacement of an ``nn.Linear`` or ``nn.Conv2d``.

    At ``rank = min(m, n)`` the result computes the same function up to fp rounding.
    """
    m, n = weight_matrix(module).shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must lie in [1, {min(m, n)}] for a {m} x {n} weight, got {rank}")
    u, s, vh = svd if svd is not None else _svd(module)
    root = s[:rank].sqrt()
    a = u[:, :rank] * root  # m x r
    b = root[:, None] * vh[:rank]  # r x n
    new = LowRankLinear.like(module, rank) if type(module) is nn.Linear else LowRankConv2d.like(module, rank)
    with torch.no_grad():
        new.first.weight.copy_(b.reshape(new.first.weight.shape))
        new.second.weight.copy_(a.reshape(new.second.weight.shape))
        if module.bias is not None:
            new.second.bias.copy_(module.bias)
    new.train(module.training)
    return new


# --------------------------------------------------------------------------- the regulariser


def squared_singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """``s_i^2`` of ``matrix`` in descending order, differentiably.

    Computed as the eigenvalues of the smaller Gram matrix (``W W^T`` or ``W^T W``, formed at the
    input's precision, eigen-decomposed in float64): the same values as
    ``torch.linalg.svdvals(W) ** 2`` (tested) at a fraction of the cost for the wide matrices of
    conv and fully connected layers, and ``eigvalsh``'s gradient stays defined for repeated values.
    """
    gram = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
    return torch.linalg.eigvalsh(gram.double()).flip(0).clamp_min(0.0).to(matrix.dtype)


def modified_stable_rank(matrix: torch.Tensor, rank: int, eps: float = 1e-12) -> torch.Tensor:
    """``sum_{i>rank} s_i^2 / sum_{i<=rank} s_i^2`` of ``matrix``, differentiable.

    Zero when ``rank >= min(m, n)``; see the module docstring.
    """
    s2 = squared_singular_values(matrix)
    return s2[rank:].sum() / s2[:rank].sum().clamp_min(eps)


def regularize(model: nn.Module, ranks: Mapping[str, int | None]) -> torch.Tensor:
    """BSR's modified stable-rank regulariser, summed over the layers in ``ranks``.

    ``ranks`` maps layer names to the target rank (``None`` or a rank at or above the layer's full
    rank contributes nothing). Add ``weight * regularize(model, ranks)`` to the loss; the layers
    may be dense (``nn.Linear``/``nn.Conv2d``) or already factorized (then the product is used).
    """
    total: torch.Tensor | None = None
    for name, rank in ranks.items():
        module = model.get_submodule(name)
        w = weight_matrix(module)
        if rank is None or rank >= min(w.shape):
            continue
        term = modified_stable_rank(w, int(rank))
        total = term if total is None else total + term
    if total is None:
        p = next(model.parameters())
        return torch.zeros((), device=p.device, dtype=p.dtype)
    return total


# --------------------------------------------------------------------------- rank allocation


class _Layer:
    """Per-layer facts for rank allocation: shape, costs, cached SVD and cumulative energy."""

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module
        self.kind = type(module).__name__
        w = weight_matrix(module)
        self.m, self.n = w.shape
        self.full = min(self.m, self.n)
        self.bias = module.bias.numel() if module.bias is not None else 0
        self.dense = self.m * self.n
        # largest rank whose factors are smaller than the dense weight; above it the layer stays dense
        self.max_rank = min(self.full, -(-self.dense // (self.m + self.n)) - 1)
        self.svd = _svd(module)
        s2 = self.svd[1].square()
        total = float(s2.sum())
        if total > 0:
            cum = (s2.cumsum(0) / total).tolist()
        else:
            cum = [1.0] * self.full
        cum[-1] = 1.0
        self.energy = cum  # energy[r - 1]: share of energy in the top r singular values

    def rank_value(self, r: int) -> int:
        """Normalize a rank: values above the break-even mean dense (``self.full``)."""
        r = max(1, int(r))
        return self.full if r > self.max_rank else r

    def cost(self, r: int) -> int:
        return (r * (self.m + self.n) if r <= self.max_rank else self.dense) + self.bias

    def kept(self, r: int) -> float:
        return self.energy[min(r, self.full) - 1]

    def rank_for_energy(self, tau: float) -> int:
        return self.rank_value(bisect.bisect_left(self.energy, tau - 1e-12) + 1)

    def step_up(self, r: int) -> tuple[int, int, float] | None:
        """The next rank above ``r``: ``(rank, extra params, extra energy)``, or None if dense."""
        if r >= self.full:
            return None
        nxt = self.rank_value(r + 1)
        return nxt, self.cost(nxt) - self.cost(r), self.kept(nxt) - self.kept(r)


Plan = dict[str, int]


def _plan_cost(layers: list[_Layer], plan: Plan) -> int:
    return sum(layer.cost(plan[layer.name]) for layer in layers)


def _largest_fitting(
    layers: list[_Layer], values: list[float], plan: Callable[[float], Plan], budget: int
) -> Plan | None:
    """``plan(v)`` for the largest ``v`` of ``values`` (sorted, smallest first; plans grow with
    ``v``) whose ranks fit ``budget``, by bisection; None if not even ``plan(values[0])`` fits."""
    if _plan_cost(layers, plan(values[0])) > budget:
        return None
    lo, hi = 0, len(values) - 1  # invariant: values[lo] fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _plan_cost(layers, plan(values[mid])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return plan(values[lo])


def _energy_plan(layers: list[_Layer], budget: int) -> Plan | None:
    """The largest common energy share ``tau`` whose ranks fit ``budget``; None if rank 1 does not fit."""
    if not layers:
        return {} if budget >= 0 else None
    taus = sorted({0.0, *(e for layer in layers for e in layer.energy)})
    return _largest_fitting(
        layers, taus, lambda tau: {layer.name: layer.rank_for_energy(tau) for layer in layers}, budget
    )


def _uniform_plan(layers: list[_Layer], budget: int) -> Plan | None:
    """The largest common rank fraction ``f`` whose ranks fit ``budget``; None if rank 1 does not fit."""
    fracs = sorted({0.0, *(k / layer.full for layer in layers for k in range(1, layer.full + 1))})

    def plan(f):
        return {layer.name: layer.rank_value(math.floor(f * layer.full + 1e-9)) for layer in layers}

    return _largest_fitting(layers, fracs, plan, budget)


def _fill(layers: list[_Layer], plan: Plan, budget: int) -> Plan:
    """Spend what is left of ``budget`` on the rank steps adding the most energy per parameter."""
    plan = dict(plan)
    left = budget - _plan_cost(layers, plan)
    while True:
        best = None
        for layer in layers:
            step = layer.step_up(plan[layer.name])
            if step is None or step[1] > left:
                continue
            gain = step[2] / max(step[1], 1)
            if best is None or gain > best[0]:
                best = (gain, layer.name, step[0], step[1])
        if best is None:
            return plan
        plan[best[1]] = best[2]
        left -= best[3]


class _Scorer:
    """Scores allocations with ``evaluate`` by writing truncated weights into the dense layers."""

    def __init__(self, model: nn.Module, layers: list[_Layer], evaluate: Callable[[nn.Module], float]):
        self.model = model
        self.layers = layers
        self.evaluate = evaluate
        self.original = {layer.name: layer.module.weight.detach().clone() for layer in layers}
        self.current = {layer.name: layer.full for layer in layers}
        self.cache: dict[tuple[int, ...], float] = {}

    def key(self, plan: Plan) -> tuple[int, ...]:
        return tuple(plan[layer.name] for layer in self.layers)

    def __call__(self, plan: Plan) -> float:
        key = self.key(plan)
        if key not in self.cache:
            self._load(plan)
            with torch.no_grad():
                self.cache[key] = float(self.evaluate(self.model))
        return self.cache[key]

    def _load(self, plan: Plan) -> None:
        with torch.no_grad():
            for layer in self.layers:
                r = plan[layer.name]
                if self.current[layer.name] == r:
                    continue
                w = layer.module.weight
                if r >= layer.full:
                    w.copy_(self.original[layer.name])
                else:
                    u, s, vh = layer.svd
                    w.copy_(((u[:, :r] * s[:r]) @ vh[:r]).reshape(w.shape).to(w.dtype))
                self.current[layer.name] = r

    def restore(self) -> None:
        self._load({layer.name: layer.full for layer in self.layers})


def _unreachable(ratio: float, budget: int, layers: list[_Layer]) -> str:
    """Why ``ratio`` cannot be met: the budget, what rank 1 everywhere keeps, the largest ratio."""
    total = sum(layer.cost(layer.full) for layer in layers)
    floor = sum(layer.cost(layer.rank_value(1)) for layer in layers)
    return (
        f"ratio={ratio} is unreachable: it leaves a budget of {budget:,} of the selected layers' "
        f"{total:,} parameters (weights and biases), but rank 1 in every selected layer keeps "
        f"{floor:,}; the largest reachable ratio is about {math.floor(1e4 * (1 - floor / total)) / 1e4:.4f}"
    )


def _beam_search(
    layers: list[_Layer],
    budget: int,
    scorer: _Scorer,
    config: LowRankConfig,
    log: Callable[[str], None] | None,
) -> tuple[Plan, list[dict]]:
    """BSR's modified beam search (see the module docstring); returns the plan and a trace."""
    searchable = [layer for layer in layers if layer.max_rank >= 1]
    total = sum(layer.cost(layer.full) for layer in layers)
    order = sorted(
        (layer for layer in searchable if layer.cost(layer.full) >= config.min_search_share * total),
        key=lambda layer: -layer.cost(layer.full),
    )
    fixed_dense = {layer.name: layer.full for layer in layers if layer.max_rank < 1}

    def complete(fixed: Plan) -> Plan | None:
        free = [layer for layer in searchable if layer.name not in fixed]
        rest = _energy_plan(free, budget - _plan_cost([lay for lay in layers if lay.name in fixed], fixed))
        return None if rest is None else {**fixed, **rest}

    def tiebreak(plan: Plan) -> float:
        return sum(layer.kept(plan[layer.name]) for layer in layers)

    root = complete(dict(fixed_dense))
    if root is None:
        raise ValueError(_unreachable(config.ratio, budget, layers))
    beam: list[tuple[float, float, Plan, Plan]] = [(scorer(root), tiebreak(root), dict(fixed_dense), root)]
    trace = [{"layer": None, "best_score": beam[0][0], "plan": root}]
    for depth, layer in enumerate(order):
        children: dict[tuple[int, ...], tuple[float, float, Plan, Plan]] = {}
        for _, _, fixed, plan in beam:
            center = plan[layer.name]
            options = {center, layer.full, *(layer.rank_value(round(center * g)) for g in config.rank_grid)}
            for r in sorted(options):
                child_fixed = {**fixed, layer.name: r}
                child = complete(child_fixed)
                if child is None:
                    continue  # the rest would not fit even at rank 1
                key = scorer.key(child)
                if key not in children:
                    children[key] = (scorer(child), tiebreak(child), child_fixed, child)
        beam = sorted(children.values(), key=lambda c: (c[0], c[1]), reverse=True)[: config.beam_width]
        trace.append(
            {"layer": layer.name, "best_score": beam[0][0], "candidates": len(children), "plan": beam[0][3]}
        )
        if log is not None:
            ranks = ", ".join(f"{k}={v}" for k, v in beam[0][3].items())
            log(
                f"  bsr [{depth + 1}/{len(order)}] {layer.name}: {len(children)} candidates, "
                f"best {beam[0][0]:.4f} ({ranks}); {len(scorer.cache)} evaluations so far"
            )
    finals = []
    for _, _, _, plan in beam:
        filled = _fill(layers, plan, budget)
        finals.append((scorer(filled), tiebreak(filled), filled))
    best = max(finals, key=lambda c: (c[0], c[1]))
    trace.append({"layer": "fill", "best_score": best[0], "plan": best[2]})
    return best[2], trace


# --------------------------------------------------------------------------- the stage


@register_stage(STAGE_NAME, LowRankConfig)
class LowRankStage(Stage):
    """Truncated-SVD factorization of ``nn.Linear`` and ``nn.Conv2d`` (groups=1) layers."""

    supports = staticmethod(_supported)
    layer_kinds = "nn.Linear, nn.Conv2d with groups=1 (exact types)"

    def select(
        self,
        model: nn.Module,
        config: LowRankConfig,
        layers: dict[str, nn.Module],
        evaluate: Callable[[nn.Module], float] | None = None,
        log: Callable[[str], None] | None = None,
        info: dict | None = None,
    ) -> Plan:
        """Choose the ranks (``{name: rank}``; the full rank means dense) without changing the model."""
        info = {} if info is None else info
        infos = [_Layer(name, module) for name, module in layers.items()]
        if config.method == "fixed":
            unknown = sorted(set(config.ranks) - set(layers))
            if unknown:
                raise ValueError(
                    f"ranks names layers that are not selected: {', '.join(unknown)}; "
                    f"selected: {', '.join(layers)}"
                )
            return {
                lay.name: lay.rank_value(min(config.ranks.get(lay.name, lay.full), lay.full)) for lay in infos
            }
        budget = math.floor((1.0 - config.ratio) * sum(lay.cost(lay.full) for lay in infos))
        if config.method == "uniform":
            plan = _uniform_plan(infos, budget)
        elif config.method == "energy":
            plan = _energy_plan(infos, budget)
        else:
            if evaluate is None:
                raise ValueError(
                    'method="bsr" scores candidates with evaluate(model) -> float (higher is '
                    "better, e.g. accuracy on held-out calibration data); pass evaluate=..."
                )
            start = time.perf_counter()
            scorer = _Scorer(model, infos, evaluate)
            was_training = model.training
            model.eval()
            try:
                plan, trace = _beam_search(infos, budget, scorer, config, log)
            finally:
                scorer.restore()
                model.train(was_training)
            info.update(
                search_evaluations=len(scorer.cache),
                search_seconds=time.perf_counter() - start,
                search_trace=trace,
            )
        if plan is None:
            raise ValueError(_unreachable(config.ratio, budget, infos))
        info["budget_params"] = budget
        return plan

    def compress_layers(self, model, config, layers, inputs, info, **kwargs) -> list[LayerRecord]:
        if config.regularize_steps > 0 or config.finetune_steps > 0:
            inputs.require_training("regularize_steps/finetune_steps need")
        before = layer_sizes(layers)
        plan = self.select(model, config, layers, evaluate=inputs.evaluate, log=inputs.log, info=info)
        full = {name: min(weight_matrix(m).shape) for name, m in layers.items()}
        ranks = {name: (r if r < full[name] else None) for name, r in plan.items()}
        info["ranks"] = {k: v for k, v in ranks.items() if v is not None}
        sgd = functools.partial(
            torch.optim.SGD, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        train = functools.partial(  # both phases: SGD (or make_optimizer) over the trainable parameters
            finetune,
            data=inputs.data,
            train_step=inputs.train_step,
            optimizer=inputs.make_optimizer or sgd,
            scheduler=config.schedule,
            log=inputs.log,
            progress=inputs.progress,
        )
        if config.regularize_steps > 0:
            targets = dict(info["ranks"])
            info["regularize"] = train(
                model,
                config.regularize_steps,
                penalty=lambda mod: regularize(mod, targets),
                penalty_weight=config.regularize_weight,
                penalty_name="msr",
                label="msr",
            )
        for name, r in ranks.items():
            if r is not None:
                model.set_submodule(name, factorize(model.get_submodule(name), r))
        if config.finetune_steps > 0:
            info["finetune"] = train(model, config.finetune_steps, label="finetune")
        records = [
            size.record(
                model.get_submodule(name),
                {"rank": ranks[name], "full_rank": full[name]},
                f"rank {ranks[name]}/{full[name]}" if ranks[name] is not None else f"dense ({full[name]})",
            )
            for name, size in before.items()
        ]
        selected_before = sum(size.params for size in before.values())
        info["selected_reduction"] = 1.0 - sum(r.params_after for r in records) / selected_before
        return records

    def rebuild(self, module: nn.Module, extra_state: dict) -> nn.Module:
        kind = self.rebuilt_kind(module, extra_state, "low-rank")
        rank = int(extra_state.get("rank", 0))
        shape = list(module.weight.shape)
        if list(extra_state.get("shape", shape)) != shape:
            raise ValueError(
                f"checkpoint layer shape {extra_state.get('shape')} != model layer shape {shape}"
            )
        return LowRankLinear.like(module, rank) if kind == "Linear" else LowRankConv2d.like(module, rank)

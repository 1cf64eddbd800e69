"""What a user would pick instead of a stage: int8, fp16 and plain SVD, measured like the stages.

The helpers here compare a compressed model with the usual alternatives on the same footing
(``benchmarks/baselines.py``, ``docs/stages_baselines.md``):

* :func:`saved_bytes`: the bytes of ``torch.save(model.state_dict())``, written to a buffer. This
  is what a deployment stores: every tensor (``torch.ao`` packed int8 weights included) plus the
  serialization's own overhead (names, pickle, zip headers), the same way for every variant.
* :func:`quantize_int8`: ``torch.ao`` dynamic int8 quantization
  (``torch.ao.quantization.quantize_dynamic``) of ``nn.Linear`` and ``nn.LSTM`` (weights int8 per
  tensor, activations quantized on the fly), on a copy by default. It also reaches the layers a
  stage swapped in when they are built from ``nn.Linear`` (BSR's factors, DirNet's dictionaries
  and dense codes), so a stage and int8 stack.
* :func:`fp16_rounded` / :func:`fp16_state_dict`: fp16 *storage*. The floating-point tensors are
  stored at half precision (half the bytes); the model computes in fp32 from the fp16-rounded
  values, so its metric is that of the rounded weights and its latency that of the fp32 model.
* :func:`plain_svd_ranks` / :func:`plain_svd_config`: plain truncated SVD at a given parameter
  budget with a standard rank rule (below), as a ``LowRankConfig(method="fixed")`` so that it gets
  exactly the fine-tuning the low-rank stage gets.
* :func:`median_seconds` and :func:`mean_se`: latency (median of repeats after warm-up) and the
  mean with its standard error over seeds.

The plain-SVD rank rule
-----------------------
The rule a practitioner would write without a search: *small layers stay dense, every other
layer is cut by the same factor*. A selected layer is small when it has fewer than
``min_outputs`` outputs (rows of its weight matrix, e.g. a 10-class head) or holds less than
``min_share`` of the selected layers' parameters; it keeps its dense weights and its parameters
count against the budget. Every other layer ``m x n`` gets the rank ``r = max(1, floor(q m n /
(m + n)))``, i.e. keeps the share ``q`` of its weights as factors, with the largest common ``q``
whose total (factors, biases, the dense small layers) fits the budget. The budget is the low-rank
stage's: ``floor((1 - ratio) * P)`` with ``P`` the selected layers' weights and biases, so
``plain_svd_config(model, ratio)`` and ``LowRankConfig(ratio=ratio)`` compress to (nearly) the
same size. Unlike the stage's ``method="uniform"``, which applies one rank fraction to every
layer and so cuts a 10-output head to rank 1 or 2, the rule never factorizes a small layer.
"""

from __future__ import annotations

import copy
import io
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .frame import _select, get_stage
from .lowrank import LowRankConfig, _Layer

__all__ = [
    "fp16_rounded",
    "fp16_state_dict",
    "mean_se",
    "median_seconds",
    "plain_svd_config",
    "plain_svd_ranks",
    "quantize_int8",
    "saved_bytes",
]


# --------------------------------------------------------------------------- bytes on disk


def saved_bytes(model_or_state: nn.Module | Mapping[str, Any]) -> int:
    """Bytes of ``torch.save(state_dict)`` (to a buffer): what the model needs on disk.

    ``model_or_state`` is a module (its ``state_dict()`` is saved) or a state dict. Counts the
    tensors at their stored dtypes, ``torch.ao`` packed int8 weights included, and the file
    format's overhead (about 0.1 to 1 kB per tensor), the same way for every variant.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getbuffer().nbytes


# --------------------------------------------------------------------------- int8 and fp16


def quantize_int8(
    model: nn.Module, kinds: Iterable[type] = (nn.Linear, nn.LSTM), *, inplace: bool = False
) -> nn.Module:
    """``torch.ao`` dynamic int8 quantization of every module of a type in ``kinds``.

    Weights become int8 (per tensor), activations are quantized on the fly; biases stay fp32.
    Works on a deep copy unless ``inplace``; returns the quantized model. Modules whose *type* is
    not in ``kinds`` exactly are left alone, but their ``nn.Linear`` children are quantized (so a
    BSR-factorized layer or a DirNet layer after its stage is quantized too).
    """
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, set(kinds), dtype=torch.qint8, inplace=inplace)


def fp16_state_dict(model: nn.Module) -> dict[str, Any]:
    """``model.state_dict()`` with every fp32/fp64 tensor stored as fp16 (others unchanged)."""
    out: dict[str, Any] = {}
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float16:
            value = value.to(torch.float16)
        out[key] = value
    return out


def fp16_rounded(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose floating-point parameters and buffers are rounded to fp16
    and kept at their own dtype: the model a user gets by loading :func:`fp16_state_dict` and
    casting back to fp32 (the metric of fp16 storage; compute stays fp32)."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for t in list(twin.parameters()) + list(twin.buffers()):
            if t.is_floating_point() and t.dtype != torch.float16:
                t.copy_(t.to(torch.float16).to(t.dtype))
    return twin


# --------------------------------------------------------------------------- plain truncated SVD


def _is_small(layer: _Layer, total: int, min_outputs: int, min_share: float) -> bool:
    return layer.m < min_outputs or layer.cost(layer.full) < min_share * total or layer.max_rank < 1


def plain_svd_ranks(
    model: nn.Module,
    ratio: float | None = None,
    *,
    budget: int | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    min_outputs: int = 32,
    min_share: float = 0.02,
) -> dict[str, int]:
    """The plain truncated-SVD ranks ``{layer name: rank}`` of ``model`` (module docstring's rule).

    Args:
        model: the model; the layers are those the low-rank stage selects (``filter_fn`` as in
            :func:`adacomp.stages.compress_`; default every ``nn.Linear`` / ``nn.Conv2d``).
        ratio: the share of the selected layers' parameters (weights and biases) to remove, as
            ``LowRankConfig.ratio``. Either this or ``budget``.
        budget: the parameters the selected layers may keep instead.
        min_outputs: a layer with fewer outputs (weight rows) stays dense.
        min_share: a layer holding less than this share of the selected parameters stays dense.

    Returns:
        ranks of the factorized layers only; the layers left out stay dense (the form
        ``LowRankConfig(method="fixed", ranks=...)`` takes).

    Raises:
        ValueError: neither or both of ``ratio`` and ``budget``; the budget cannot be met (the
            dense small layers and rank 1 elsewhere already exceed it).
    """
    if (ratio is None) == (budget is None):
        raise ValueError("give either ratio (share of parameters to remove) or budget (parameters to keep)")
    layers, _ = _select(model, get_stage(LowRankConfig), filter_fn)
    if not layers:
        raise ValueError("no nn.Linear / nn.Conv2d layer selected")
    infos = [_Layer(name, module) for name, module in layers.items()]
    total = sum(layer.cost(layer.full) for layer in infos)
    if budget is None:
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"ratio must lie in (0, 1), got {ratio}")
        budget = math.floor((1.0 - ratio) * total)
    small = [layer for layer in infos if _is_small(layer, total, min_outputs, min_share)]
    large = [layer for layer in infos if layer not in small]
    fixed = sum(layer.cost(layer.full) for layer in small)

    def plan(q: float) -> dict[str, int]:
        return {
            layer.name: layer.rank_value(math.floor(q * layer.m * layer.n / (layer.m + layer.n) + 1e-9))
            for layer in large
        }

    def cost(p: dict[str, int]) -> int:
        return fixed + sum(layer.cost(p[layer.name]) for layer in large)

    if not large or cost(plan(0.0)) > budget:
        floor_cost = cost(plan(0.0)) if large else fixed
        raise ValueError(
            f"budget of {budget:,} parameters unreachable by plain SVD: the {len(small)} dense small "
            f"layer(s) and rank 1 in the {len(large)} other(s) keep {floor_cost:,} of {total:,}"
        )
    lo, hi = 0.0, 1.0  # plan(lo) fits; plans grow with q
    for _ in range(60):
        mid = (lo + hi) / 2
        if cost(plan(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    full = {layer.name: layer.full for layer in large}
    return {name: r for name, r in plan(lo).items() if r < full[name]}


def plain_svd_config(
    model: nn.Module,
    ratio: float,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    min_outputs: int = 32,
    min_share: float = 0.02,
    **lowrank: Any,
) -> LowRankConfig:
    """``LowRankConfig(method="fixed", ranks=plain_svd_ranks(model, ratio, ...), **lowrank)``.

    ``lowrank`` takes the stage's training settings (``finetune_steps``, ``lr``, ...), so the
    baseline gets the same fine-tuning as the stage it is compared with.
    """
    ranks = plain_svd_ranks(model, ratio, filter_fn=filter_fn, min_outputs=min_outputs, min_share=min_share)
    if not ranks:
        raise ValueError(f"plain SVD at ratio={ratio} factorizes no layer")
    return LowRankConfig(method="fixed", ranks=ranks, **lowrank)


# --------------------------------------------------------------------------- timing and statistics


def median_seconds(fn: Callable[[], Any], repeats: int = 50, warmup: int = 5) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed calls, under
    ``torch.no_grad()`` (the median, since other jobs' bursts on a shared machine hit a mean)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, standard error of the mean)``; the error is ``nan`` for a single value."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, statistics.stdev(values) / math.sqrt(len(values))

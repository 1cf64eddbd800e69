"""Pure-PyTorch reference of the AdaComp selection (docs/algorithm.md section 1).

This module *defines* correctness: the C++, CUDA and numba kernels must reproduce its
outputs bit for bit for fp32 input. It runs on any device and favours clarity over speed.

The selection op, in every backend, takes the flat fp32 gradient ``dW`` and residue ``R``
of one tensor and returns:

* ``residue_new``: ``R' = G - Q`` with ``G = R + dW`` (fp32, same length),
* ``counts``: int32, one entry per bin, how many elements that bin sends,
* ``offsets``: int32, the bin-local position of every sent element, in flat order,
* ``values``: fp32, the decoded value ``Q_i`` of every sent element, in flat order,
* ``scale``: fp32 tensor of one element (the ternary scale ``s``; 0 for unquantized values),
* ``info``: int64 tensor ``[n_sent, nonfinite]``.

Project choices where the paper is silent (documented in the README too):

* An element whose ``G_i`` is exactly zero is never sent: its quantized value would be
  ``sign(0) * s = 0``, which carries nothing and which one sign bit cannot express.
* The scale is a mean computed *exactly reproducibly*: the fp32 terms are split into
  exponent and 24-bit integer mantissa, mantissas are summed per exponent in int64
  (integer sums do not depend on order, so threads and GPU blocks may add in any order),
  then the 254 per-exponent sums are combined in fp64 from the largest exponent down,
  divided by the count in fp64 and rounded once to fp32. See :func:`exact_mean`.
* ``values="fp16"`` saturates at the largest finite half (65504) instead of overflowing to
  infinity; the residue keeps what was cut off, so error feedback stays lossless.
* If any ``G_i`` is not finite the op reports ``nonfinite = 1``; the caller then keeps the
  old residue and sends a payload that decodes to NaN. Outputs other than ``info`` are
  unspecified in that case.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SCALE_MODES = {"binmax_mean": 0, "selected_mean": 1}
VALUE_MODES = {"ternary": 0, "fp16": 1, "fp32": 2}
FP16_MAX = 65504.0
HIST_SIZE = 256  # exponent histogram slots (effective exponents 1..254 are used)


def exponent_histogram(v: torch.Tensor) -> torch.Tensor:
    """Integer mantissa sums per fp32 exponent of the non-negative finite values ``v``.

    ``v = mant * 2**(e - 150)`` with ``e = max(biased_exponent, 1)`` and the implicit bit
    folded into ``mant`` (so subnormals need no special case). Returns int64[256].
    """
    bits = v.contiguous().view(torch.int32).to(torch.int64)
    biased = bits >> 23
    mant = (bits & 0x7FFFFF) | ((biased > 0).to(torch.int64) << 23)
    e = biased.clamp(min=1)
    hist = torch.zeros(HIST_SIZE, dtype=torch.int64, device=v.device)
    hist.scatter_add_(0, e, mant)
    return hist


def combine_histogram(hist, count: int) -> float:
    """The fp32 mean from an exponent histogram: fixed-order fp64 sum, one rounding.

    Every term ``hist[e] * 2**(e-150)`` is exact in fp64 (``hist[e] < 2**53`` for fewer
    than 2**29 terms), so the only roundings are the additions, done in one fixed order.
    """
    if count == 0:
        return 0.0
    h = [int(x) for x in hist]
    acc = 0.0
    for e in range(HIST_SIZE - 1, 0, -1):
        if h[e]:
            acc += math.ldexp(float(h[e]), e - 150)
    return float(np.float32(acc / float(count)))


def exact_mean(v: torch.Tensor) -> float:
    """Order-independent, bit-reproducible mean of non-negative finite fp32 values."""
    return combine_histogram(exponent_histogram(v).tolist(), v.numel())


def select(
    grad: torch.Tensor,
    residue: torch.Tensor,
    bin_size: int,
    scale_mode: int = 0,
    value_mode: int = 0,
):
    """Reference selection; see the module docstring for inputs and outputs."""
    if grad.dtype != torch.float32 or residue.dtype != torch.float32:
        raise TypeError("reference select expects fp32 grad and residue")
    d = grad.reshape(-1)
    n = d.numel()
    L = int(bin_size)
    nb = -(-n // L) if n else 0
    g = residue.reshape(-1) + d
    h = g + d
    nonfinite = bool((~torch.isfinite(g)).any())
    padded = torch.zeros(nb * L, dtype=torch.float32, device=d.device)
    padded[:n] = g.abs()
    gmax = padded.view(nb, L).amax(dim=1) if nb else padded
    gmax_e = gmax.repeat_interleave(L)[:n]
    sent = (gmax_e > 0) & (h.abs() >= gmax_e) & (g != 0)
    sent_p = torch.zeros(nb * L, dtype=torch.bool, device=d.device)
    sent_p[:n] = sent
    counts = sent_p.view(nb, L).sum(dim=1).to(torch.int32)
    idx = sent.nonzero().squeeze(1)
    offsets = (idx % L).to(torch.int32)
    gs = g[idx]
    if value_mode == VALUE_MODES["ternary"]:
        if nonfinite:
            s = float("nan")
        elif scale_mode == SCALE_MODES["binmax_mean"]:
            s = exact_mean(gmax[counts > 0])
        elif scale_mode == SCALE_MODES["selected_mean"]:
            s = exact_mean(gs.abs())
        else:
            raise ValueError(f"unknown scale mode {scale_mode}")
        st = torch.tensor(s, dtype=torch.float32, device=d.device)
        q = torch.where(gs < 0, -st, st)
    elif value_mode == VALUE_MODES["fp16"]:
        s = 0.0
        q = gs.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(torch.float32)
    elif value_mode == VALUE_MODES["fp32"]:
        s = 0.0
        q = gs.clone()
    else:
        raise ValueError(f"unknown value mode {value_mode}")
    residue_new = g.clone()
    residue_new[idx] = gs - q
    scale = torch.tensor([s], dtype=torch.float32, device=d.device)
    info = torch.tensor([idx.numel(), int(nonfinite)], dtype=torch.int64, device=d.device)
    return residue_new, counts, offsets, q, scale, info

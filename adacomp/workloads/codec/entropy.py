"""Entropy models of the hyperprior codec: a factorized prior for ``z``, a Gaussian conditional for ``y``.

Both give likelihoods of (noisy or rounded) values for training, and the tables the entropy
coder needs (see :mod:`adacomp.workloads.codec.bitstream`):

* :class:`FactorizedPrior` (Balle et al., ICLR 2018, appendix 6.1): one univariate density per
  channel, its CDF a small monotone network. :meth:`FactorizedPrior.update` fills the coding
  tables: each channel's median (where the CDF is 1/2, found by bisection: ``z`` is rounded
  around it) and its probability mass function on the integer offsets ``k`` (``z = median + k``)
  whose CDF lies within ``tail_mass`` of 0 or 1, clamped to ``max_support`` either side. Symbols
  outside the support are *clamped* to its ends (a rare distortion of the hyper-latent only,
  which the encoder then uses consistently); there is no escape code.
* :class:`GaussianConditional`: ``P(y) = Phi((y - mu + 1/2) / s) - Phi((y - mu - 1/2) / s)`` with
  ``s >= SCALE_MIN``. For coding, scales are snapped to the nearest entry (in log space) of a
  fixed table (:data:`SCALE_TABLE`, 128 steps of 5 %) so encoder and decoder agree on the model
  even if the scales they compute differ in the last float bits.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SCALE_MIN", "SCALE_TABLE", "FactorizedPrior", "GaussianConditional", "LIKELIHOOD_MIN"]

LIKELIHOOD_MIN = 1e-9
"""Likelihoods are clamped below at this value (as the coders give every symbol some mass)."""
SCALE_MIN = 0.11
"""Lower bound of the Gaussian conditional's scales (CompressAI's value)."""
SCALE_TABLE = np.exp(np.linspace(np.log(SCALE_MIN), np.log(64.0), 128))
"""The scales the coder uses: 128 log-spaced values from 0.11 to 64 (ratio 1.051 per step)."""


class FactorizedPrior(nn.Module):
    """Per-channel learned density ``p(z_c)``, evaluated on unit bins: ``P(z) = c(z + 1/2) - c(z - 1/2)``.

    ``filters=(3, 3, 3)`` and ``init_scale=10`` as in Balle et al. 2018 and CompressAI.
    """

    def __init__(
        self,
        channels: int,
        filters=(3, 3, 3),
        init_scale: float = 10.0,
        tail_mass: float = 1e-9,
        max_support: int = 64,
    ):
        super().__init__()
        self.channels = int(channels)
        self.tail_mass = float(tail_mass)
        self.max_support = int(max_support)
        dims = (1, *filters, 1)
        scale = init_scale ** (1.0 / (len(filters) + 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(filters) + 1):
            init = math.log(math.expm1(1.0 / scale / dims[i + 1]))
            self.matrices.append(nn.Parameter(torch.full((channels, dims[i + 1], dims[i]), init)))
            self.biases.append(nn.Parameter(torch.rand(channels, dims[i + 1], 1) - 0.5))
            if i < len(filters):
                self.factors.append(nn.Parameter(torch.zeros(channels, dims[i + 1], 1)))
        # coding tables, filled by update(); not part of the state dict (recomputed from the weights)
        self.register_buffer("medians", torch.zeros(0), persistent=False)
        self.pmf_low: np.ndarray | None = None  # (C,) int: smallest offset k of each channel
        self.pmfs: list[np.ndarray] | None = None  # per channel float64 PMF over k = low .. high

    def _logits_cumulative(self, v: torch.Tensor) -> torch.Tensor:
        """Logit of the CDF; ``v`` has shape ``(C, 1, n)``. Monotone increasing in ``v``."""
        logits = v
        for i, matrix in enumerate(self.matrices):
            logits = torch.matmul(F.softplus(matrix).to(v.dtype), logits) + self.biases[i].to(v.dtype)
            if i < len(self.factors):
                logits = logits + torch.tanh(self.factors[i]).to(v.dtype) * torch.tanh(logits)
        return logits

    def likelihood(self, z: torch.Tensor) -> torch.Tensor:
        """``P(z)`` on unit bins centred at ``z`` (any real ``z``), shape of ``z`` ``(B, C, h, w)``."""
        b, c, h, w = z.shape
        v = z.permute(1, 0, 2, 3).reshape(c, 1, -1)
        lower = self._logits_cumulative(v - 0.5)
        upper = self._logits_cumulative(v + 0.5)
        # evaluate in the tail where sigmoid is accurate; never a zero sign (lower + upper can be exactly 0)
        sign = torch.where(lower + upper > 0, -1.0, 1.0).to(lower.dtype).detach()
        lik = (torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower)).abs()
        lik = lik.reshape(c, b, h, w).permute(1, 0, 2, 3)
        return lik.clamp_min(LIKELIHOOD_MIN)

    def _solve(self, target_logit: float) -> torch.Tensor:
        """Per channel, the ``v`` with logit-CDF ``target_logit`` (bisection in float64)."""
        lo = torch.full((self.channels, 1, 1), -1e4, dtype=torch.float64)
        hi = torch.full((self.channels, 1, 1), 1e4, dtype=torch.float64)
        for _ in range(80):
            mid = (lo + hi) / 2
            above = self._logits_cumulative(mid) > target_logit
            hi = torch.where(above, mid, hi)
            lo = torch.where(above, lo, mid)
        return ((lo + hi) / 2).reshape(-1)

    @torch.no_grad()
    def update(self) -> None:
        """Fill the coding tables (medians, per-channel PMFs) from the current weights."""
        tail = math.log(self.tail_mass / (1 - self.tail_mass))
        medians = self._solve(0.0)
        low = torch.floor(self._solve(tail) - medians).clamp(-self.max_support, 0)
        high = torch.ceil(self._solve(-tail) - medians).clamp(0, self.max_support)
        self.medians = medians.float()
        pmfs = []
        for c in range(self.channels):
            k = torch.arange(int(low[c]), int(high[c]) + 1, dtype=torch.float64)
            v = (self.medians[c].double() + k).view(1, 1, -1)
            lower = self._logits_cumulative(v - 0.5)[c]
            upper = self._logits_cumulative(v + 0.5)[c]
            pmf = (torch.sigmoid(upper) - torch.sigmoid(lower)).reshape(-1).clamp_min(0)
            pmfs.append(pmf.numpy().astype(np.float64))
        self.pmf_low = low.numpy().astype(np.int64)
        self.pmfs = pmfs

    @property
    def ready(self) -> bool:
        return self.pmfs is not None and self.medians.numel() == self.channels

    def check_ready(self) -> None:
        if not self.ready:
            raise RuntimeError(
                "the factorized prior's coding tables are empty: call codec.update() after training "
                "or loading weights (and after any change of the entropy model's parameters)"
            )

    def support(self, c: int) -> tuple[int, int]:
        """Smallest and largest integer offset of channel ``c`` that the coder can represent."""
        self.check_ready()
        low = int(self.pmf_low[c])
        return low, low + len(self.pmfs[c]) - 1

    def offsets(self, z: torch.Tensor) -> torch.Tensor:
        """The medians broadcast to ``z``'s shape ``(B, C, h, w)`` (``z`` is rounded around them)."""
        self.check_ready()
        return self.medians.view(1, -1, 1, 1).to(z.dtype).expand_as(z)

    def clamp_symbols(self, k: torch.Tensor) -> torch.Tensor:
        """Clamp integer offsets ``k`` (``(B, C, h, w)``) into each channel's support."""
        self.check_ready()
        low = torch.as_tensor(self.pmf_low, dtype=k.dtype).view(1, -1, 1, 1)
        high = low + torch.as_tensor([len(p) - 1 for p in self.pmfs], dtype=k.dtype).view(1, -1, 1, 1)
        return torch.maximum(torch.minimum(k, high), low)


class GaussianConditional(nn.Module):
    """Gaussian likelihood of ``y`` on unit bins, given means and scales from the hyper-synthesis."""

    def __init__(self, scale_min: float = SCALE_MIN, symbol_range: int = 255):
        super().__init__()
        self.scale_min = float(scale_min)
        self.symbol_range = int(symbol_range)
        """Coded symbols (``y - mu`` rounded, or rounded ``y``) are clamped to ``[-range, range]``."""

    def likelihood(
        self, y: torch.Tensor, scales: torch.Tensor, means: torch.Tensor | None = None
    ) -> torch.Tensor:
        values = y - means if means is not None else y
        values = values.abs()
        scales = scales.clamp_min(self.scale_min)
        upper = torch.special.ndtr((0.5 - values) / scales)
        lower = torch.special.ndtr((-0.5 - values) / scales)
        return (upper - lower).clamp_min(LIKELIHOOD_MIN)

    @staticmethod
    def table_scales(scales: torch.Tensor) -> np.ndarray:
        """Snap scales to :data:`SCALE_TABLE` (nearest in log space); float64 numpy array."""
        s = np.log(np.clip(scales.detach().double().cpu().numpy(), SCALE_TABLE[0], SCALE_TABLE[-1]))
        step = (np.log(SCALE_TABLE[-1]) - np.log(SCALE_TABLE[0])) / (len(SCALE_TABLE) - 1)
        index = np.rint((s - np.log(SCALE_TABLE[0])) / step).astype(np.int64)
        return SCALE_TABLE[np.clip(index, 0, len(SCALE_TABLE) - 1)]

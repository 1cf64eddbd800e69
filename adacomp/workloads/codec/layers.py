"""Generalized divisive normalization (Balle, Laparra, Simoncelli, ICLR 2016)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GDN"]


class GDN(nn.Module):
    """``y_i = x_i / sqrt(beta_i + sum_j gamma_ij x_j^2)`` (``inverse=True``: multiply instead).

    ``beta = beta_p^2 + beta_min`` and ``gamma = gamma_p^2`` keep both positive with a gradient
    everywhere; ``gamma`` starts at ``0.1 I`` plus a small off-diagonal ``1e-4`` (a squared
    parametrization would pin exact zeros), ``beta`` at one.
    """

    def __init__(self, channels: int, inverse: bool = False, beta_min: float = 1e-6, gamma_init: float = 0.1):
        super().__init__()
        self.inverse = bool(inverse)
        self.beta_min = float(beta_min)
        self.beta_p = nn.Parameter(torch.full((channels,), (1.0 - beta_min) ** 0.5))
        gamma = gamma_init * torch.eye(channels) + 1e-4
        self.gamma_p = nn.Parameter(gamma.sqrt())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        beta = self.beta_p.square() + self.beta_min
        gamma = self.gamma_p.square().view(c, c, 1, 1)
        norm = F.conv2d(x * x, gamma, beta)
        return x * norm.sqrt() if self.inverse else x * torch.rsqrt(norm)

    def extra_repr(self) -> str:
        return f"{self.beta_p.numel()}, inverse={self.inverse}"

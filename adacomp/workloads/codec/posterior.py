"""The hyper-latent posterior of bits-back coding (Yang, Bamler, Mandt, NeurIPS 2020, sec. 3.3).

Once ``y_hat`` is fixed, ``q(z) = N(m, s^2)`` (per element, discretized on the grid of the
factorized prior, ``z = median + k``) is fitted to the *net* rate of bits-back coding::

    E_q[ -log2 p(z) - log2 p(y_hat | z) ] - H(q)        (bits; H the discretized entropy)

by ``steps`` Adam steps from ``m = h_a(y_hat)``, ``s = init_std``, one reparametrized sample
``z = m + s * eps`` per step (``p(z)`` on unit bins, ``p(y_hat | z)`` with the continuous
``z``), ``eps`` from a ``torch.Generator`` seeded with ``seed``. Everything depends on
``y_hat`` only, so the decoder, which has ``y_hat`` once it has decoded it, replays the same
fit to find ``q`` and encode ``z`` back (the returned bits). The replay must give the same
floats: same code, same torch build and thread count on both sides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["PosteriorFit", "fit_posterior", "STD_MIN", "STD_MAX"]

STD_MIN, STD_MAX = 0.05, 4.0
_WINDOW = 14  # discretized entropy summed over round(m) +- _WINDOW (covers 3.5 STD_MAX)


@dataclass(frozen=True)
class PosteriorFit:
    """Settings of the deterministic posterior fit; stored in the stream header."""

    steps: int = 100
    lr: float = 0.05
    seed: int = 0
    init_std: float = 0.5

    def __post_init__(self):
        # the header stores lr and init_std as float32: use exactly those values on both sides
        object.__setattr__(self, "lr", float(np.float32(self.lr)))
        object.__setattr__(self, "init_std", float(np.float32(self.init_std)))
        if not (isinstance(self.steps, int) and 0 <= self.steps < 65536):
            raise ValueError(f"posterior steps must be an int in [0, 65535], got {self.steps!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"posterior lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**32):
            raise ValueError(f"posterior seed must be an int in [0, 2**32), got {self.seed!r}")
        if not STD_MIN <= self.init_std <= STD_MAX:
            raise ValueError(f"posterior init_std must lie in [{STD_MIN}, {STD_MAX}], got {self.init_std!r}")


def discretized_entropy(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of ``N(mean, std^2)`` discretized on unit bins around the integers, elementwise."""
    centre = torch.round(mean.detach())
    k = torch.arange(-_WINDOW, _WINDOW + 1, dtype=mean.dtype).view(*([1] * mean.dim()), -1)
    grid = centre.unsqueeze(-1) + k
    d = grid - mean.unsqueeze(-1)
    s = std.unsqueeze(-1)
    p = torch.special.ndtr((d + 0.5) / s) - torch.special.ndtr((d - 0.5) / s)
    p = p.clamp_min(1e-12)
    return -(p * torch.log2(p)).sum(-1)


def posterior_objective(
    codec, y_hat: torch.Tensor, m: torch.Tensor, log_s: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """One-sample estimate of the net bits-back rate (bits) for ``q = N(m, exp(log_s)^2)``."""
    s = log_s.exp()
    z = m + s * eps
    means, scales = codec.hyper_params(z)
    bits = -torch.log2(codec.entropy_bottleneck.likelihood(z)).sum()
    bits = bits - torch.log2(codec.gaussian_conditional.likelihood(y_hat, scales, means)).sum()
    medians = codec.entropy_bottleneck.offsets(m)
    return bits - discretized_entropy(m - medians, s).sum()


def fit_posterior(codec, y_hat: torch.Tensor, fit: PosteriorFit) -> tuple[torch.Tensor, torch.Tensor]:
    """Means and stds of ``q(z | y_hat)`` (float32, ``z``'s shape); deterministic for a given input.

    Gradients are taken with ``torch.autograd.grad`` so the codec's own ``.grad`` stays untouched.
    """
    generator = torch.Generator().manual_seed(fit.seed)
    with torch.enable_grad():
        y_hat = y_hat.detach()
        m = codec.h_a(y_hat).detach().clone().requires_grad_(True)
        log_s = torch.full_like(m, math.log(fit.init_std)).requires_grad_(True)
        opt = torch.optim.Adam([m, log_s], lr=fit.lr)
        for _ in range(fit.steps):
            eps = torch.randn(m.shape, generator=generator, dtype=m.dtype)
            loss = posterior_objective(codec, y_hat, m, log_s, eps)
            gm, gs = torch.autograd.grad(loss, [m, log_s])
            m.grad, log_s.grad = gm, gs
            opt.step()
            with torch.no_grad():
                log_s.clamp_(math.log(STD_MIN), math.log(STD_MAX))
    return m.detach(), log_s.detach().exp().clamp(STD_MIN, STD_MAX)

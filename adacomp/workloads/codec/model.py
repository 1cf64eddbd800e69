"""A small mean-scale hyperprior image codec (Minnen, Balle, Toderici, NeurIPS 2018, without the
context model), with real bitstreams.

The refinement of :mod:`adacomp.stages.sga` works with any module that has the same pieces
(the *codec interface*):

* ``g_a(x) -> y`` and ``g_s(y_hat) -> x_hat``: analysis and synthesis transforms, ``x`` in
  ``[0, 1]`` of shape ``(B, 3, H, W)`` with ``H``, ``W`` multiples of ``downsampling``;
* ``h_a(y) -> z`` and ``hyper_params(z_hat) -> (means, scales)``: hyper-analysis and
  hyper-synthesis (the latter split into the means and the scales of ``p(y | z)``);
* ``entropy_bottleneck``: a :class:`~adacomp.workloads.codec.entropy.FactorizedPrior` for ``z``;
* ``gaussian_conditional``: a :class:`~adacomp.workloads.codec.entropy.GaussianConditional` for ``y``;
* ``downsampling`` (an int: ``H / z``'s height) and ``update()`` (fills the coding tables).

``compress()`` / ``decompress()`` (in :mod:`adacomp.workloads.codec.bitstream`) need nothing else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import bitstream
from .entropy import FactorizedPrior, GaussianConditional
from .layers import GDN

__all__ = ["MeanScaleHyperprior", "rd_loss"]


def _conv(cin: int, cout: int, k: int = 5, stride: int = 2) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)


def _deconv(cin: int, cout: int, k: int = 5, stride: int = 2) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, k, stride=stride, padding=k // 2, output_padding=stride - 1)


class MeanScaleHyperprior(nn.Module):
    """Mean-scale hyperprior: ``y = g_a(x)``, ``z = h_a(y)``, ``p(y | z) = N(mu(z), s(z))`` on unit bins.

    ``N`` channels in the transforms, ``M`` in ``y``; ``z`` has ``N`` channels. ``y`` is 16 times
    smaller than the image in each direction, ``z`` 64 times (``downsampling``). Trained with
    ``bpp + lmbda * MSE`` (pixels on 0..255), see :func:`rd_loss`.
    """

    downsampling = 64

    def __init__(self, N: int = 64, M: int = 96):
        super().__init__()
        self.N, self.M = int(N), int(M)
        self.g_a = nn.Sequential(
            _conv(3, N),
            GDN(N),
            _conv(N, N),
            GDN(N),
            _conv(N, N),
            GDN(N),
            _conv(N, M),
        )
        self.g_s = nn.Sequential(
            _deconv(M, N),
            GDN(N, inverse=True),
            _deconv(N, N),
            GDN(N, inverse=True),
            _deconv(N, N),
            GDN(N, inverse=True),
            _deconv(N, 3),
        )
        self.h_a = nn.Sequential(
            _conv(M, N, 3, 1),
            nn.LeakyReLU(inplace=True),
            _conv(N, N),
            nn.LeakyReLU(inplace=True),
            _conv(N, N),
        )
        self.h_s = nn.Sequential(
            _deconv(N, M),
            nn.LeakyReLU(inplace=True),
            _deconv(M, M * 3 // 2),
            nn.LeakyReLU(inplace=True),
            _conv(M * 3 // 2, 2 * M, 3, 1),
        )
        self.entropy_bottleneck = FactorizedPrior(N)
        self.gaussian_conditional = GaussianConditional()

    def hyper_params(self, z_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Means and scales (``>= SCALE_MIN``) of ``p(y | z_hat)``."""
        means, raw = self.h_s(z_hat).chunk(2, dim=1)
        return means, self.gaussian_conditional.scale_min + F.softplus(raw)

    def forward(self, x: torch.Tensor) -> dict:
        """Training pass with additive uniform noise in place of rounding; returns
        ``{"x_hat", "likelihoods": {"y", "z"}}``."""
        y = self.g_a(x)
        z = self.h_a(y)
        z_tilde = z + torch.empty_like(z).uniform_(-0.5, 0.5)
        means, scales = self.hyper_params(z_tilde)
        y_tilde = y + torch.empty_like(y).uniform_(-0.5, 0.5)
        return {
            "x_hat": self.g_s(y_tilde),
            "likelihoods": {
                "y": self.gaussian_conditional.likelihood(y_tilde, scales, means),
                "z": self.entropy_bottleneck.likelihood(z_tilde),
            },
        }

    def update(self) -> None:
        """Fill the entropy coder's tables; call after training or loading weights."""
        self.entropy_bottleneck.update()

    def compress(self, x: torch.Tensor) -> bytes:
        """Amortized encoding of one image (``(3, H, W)`` or ``(1, 3, H, W)``, values in ``[0, 1]``)."""
        return bitstream.compress(self, x)

    def decompress(self, data: bytes):
        """Decode a stream of :meth:`compress` or :func:`adacomp.stages.encode`: the image
        ``(1, 3, H, W)`` in ``[0, 1]``, or a list of them for a stream of several images."""
        return bitstream.decompress(self, data)


def rd_loss(out: dict, x: torch.Tensor, lmbda: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``bpp + lmbda * MSE`` (MSE on 0..255 pixels) of a :meth:`MeanScaleHyperprior.forward` output;
    returns ``(loss, bpp, mse)`` averaged over the batch."""
    b, _, h, w = x.shape
    bits = sum(-torch.log2(lik).sum() for lik in out["likelihoods"].values())
    bpp = bits / (b * h * w)
    mse = F.mse_loss(out["x_hat"], x) * 255.0**2
    return bpp + lmbda * mse, bpp, mse

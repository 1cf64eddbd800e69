"""A small learned image codec with real bitstreams: the mean-scale hyperprior of Minnen et al. 2018
(no context model) in plain PyTorch, entropy coded with ``constriction``'s ANS coder.

    from adacomp.workloads.codec import MeanScaleHyperprior, load_photo
    codec = MeanScaleHyperprior(N=64, M=96)          # train it with benchmarks/train_codec.py
    codec.update()                                   # fill the coding tables
    data = codec.compress(load_photo("astronaut"))   # bytes
    x_hat = codec.decompress(data)                   # (1, 3, H, W) in [0, 1]

:func:`adacomp.stages.encode` refines the latents of a trained codec per image (SGA, bits-back)
and writes streams the same ``decompress()`` reads. See ``docs/sga.md``.
"""

from .bitstream import (
    Latents,
    check_image,
    information_content,
    pad_image,
    quantize,
    read_stream,
    reconstruct,
    write_stream,
)
from .entropy import SCALE_MIN, SCALE_TABLE, FactorizedPrior, GaussianConditional
from .images import TEST_PHOTOS, TRAIN_PHOTOS, center_crop, load_checkpoint, load_photo, psnr, random_crops
from .layers import GDN
from .metrics import bd_psnr, bd_rate
from .model import MeanScaleHyperprior, rd_loss
from .posterior import PosteriorFit, fit_posterior

__all__ = [
    "GDN",
    "SCALE_MIN",
    "SCALE_TABLE",
    "TEST_PHOTOS",
    "TRAIN_PHOTOS",
    "FactorizedPrior",
    "GaussianConditional",
    "Latents",
    "MeanScaleHyperprior",
    "PosteriorFit",
    "bd_psnr",
    "bd_rate",
    "center_crop",
    "check_image",
    "fit_posterior",
    "information_content",
    "load_checkpoint",
    "load_photo",
    "pad_image",
    "psnr",
    "quantize",
    "random_crops",
    "rd_loss",
    "read_stream",
    "reconstruct",
    "write_stream",
]

"""The bundled photographs (scikit-image and scikit-learn) for training and testing the codec.

Training photographs: ``rocket``, ``hubble_deep_field``, ``retina``, ``camera`` (grey, repeated
to RGB), ``stereo_motorcycle`` (left view). Held-out test photographs, never used in training:
``astronaut``, ``coffee``, ``chelsea`` (scikit-image) and ``china``, ``flower`` (scikit-learn).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from ..data import DataNotFound

__all__ = [
    "TEST_PHOTOS",
    "TRAIN_PHOTOS",
    "center_crop",
    "load_checkpoint",
    "load_photo",
    "psnr",
    "random_crops",
]

TRAIN_PHOTOS = ("rocket", "hubble_deep_field", "retina", "camera", "stereo_motorcycle")
TEST_PHOTOS = ("astronaut", "coffee", "chelsea", "china", "flower")
_SKIMAGE = TRAIN_PHOTOS + ("astronaut", "coffee", "chelsea")
_SKLEARN = ("china", "flower")


def _array(name: str) -> np.ndarray:
    if name in _SKLEARN:
        try:
            from sklearn.datasets import load_sample_image
        except ImportError as e:
            raise DataNotFound(f"photograph {name!r} needs scikit-learn: pip install scikit-learn") from e
        return load_sample_image(f"{name}.jpg")
    try:
        import skimage.data
    except ImportError as e:
        raise DataNotFound(f"photograph {name!r} needs scikit-image: pip install scikit-image") from e
    try:
        img = getattr(skimage.data, name)()
    except Exception as e:  # a missing bundled file or a failed download (offline)
        raise DataNotFound(
            f"scikit-image could not load {name!r} ({e}); pip install scikit-image "
            "(the bundled images ship with the wheel)"
        ) from e
    return img[0] if isinstance(img, tuple) else img


def load_photo(name: str) -> torch.Tensor:
    """A bundled photograph as float32 ``(3, H, W)`` in ``[0, 1]``; raises
    :class:`adacomp.workloads.data.DataNotFound` (with the install command) when its package is absent."""
    if name not in _SKIMAGE + _SKLEARN:
        raise ValueError(f"unknown photograph {name!r}; known: {', '.join(_SKIMAGE + _SKLEARN)}")
    img = np.asarray(_array(name))
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3]
    if img.dtype != np.uint8:
        raise ValueError(f"photograph {name!r} is not 8-bit ({img.dtype})")
    return torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float() / 255.0


def center_crop(x: torch.Tensor, height: int, width: int | None = None) -> torch.Tensor:
    """The central ``height x width`` window of a ``(..., H, W)`` tensor."""
    width = height if width is None else width
    h, w = x.shape[-2:]
    if height > h or width > w:
        raise ValueError(f"crop {height}x{width} larger than the image {h}x{w}")
    top, left = (h - height) // 2, (w - width) // 2
    return x[..., top : top + height, left : left + width]


def random_crops(images: list[torch.Tensor], size: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random ``size x size`` crops (random image, position and horizontal flip), ``(n, 3, s, s)``."""
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        img = images[int(torch.randint(len(images), (1,), generator=generator))]
        h, w = img.shape[-2:]
        top = int(torch.randint(h - size + 1, (1,), generator=generator))
        left = int(torch.randint(w - size + 1, (1,), generator=generator))
        crop = img[:, top : top + size, left : left + size]
        if torch.rand(1, generator=generator).item() < 0.5:
            crop = crop.flip(-1)
        out[i] = crop
    return out


def psnr(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """PSNR in dB of ``x_hat`` against ``x`` (both in ``[0, 1]``), after rounding both to 8 bits."""
    a = torch.round(x.clamp(0, 1) * 255).double()
    b = torch.round(x_hat.clamp(0, 1) * 255).double()
    mse = torch.mean((a - b) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def load_checkpoint(path: str | os.PathLike):
    """Rebuild a codec saved by ``benchmarks/train_codec.py`` (``{"config", "state_dict", ...}``)
    and fill its coding tables."""
    from .model import MeanScaleHyperprior

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    codec = MeanScaleHyperprior(**ckpt["config"])
    codec.load_state_dict(ckpt["state_dict"])
    codec.eval()
    codec.update()
    codec.lmbda = float(ckpt["lmbda"]) if "lmbda" in ckpt else None  # the trade-off SGA refines for
    return codec

"""Real bitstreams for the hyperprior codec, with ``constriction``'s ANS coder (a stack).

Stream layout (little endian)::

    b"AC" | version u8 | n_images u16 | n_images x (height u16, width u16, flags u8)
    [posterior fit, only if an image has bits back: steps u16, lr f32, seed u32, init_std f32]
    ANS words (u32 ...)

(10 bytes of header for one image, so that small images do not pay much for it.)

Image ``i`` is decoded ``i``-th from the top of the stack: ``z`` (factorized prior, one
``Categorical`` per channel over its integer offsets around the channel median), then ``y``
given ``z`` (``QuantizedGaussian`` on ``[-R, R]``, ``R = gaussian_conditional.symbol_range``,
scales snapped to :data:`~adacomp.workloads.codec.entropy.SCALE_TABLE`). ``flags``:

* bit 0, *integer y*: the symbols are ``round(y)`` coded with ``N(mu, s)``; otherwise they are
  ``round(y - mu)`` coded with ``N(0, s)`` and ``y_hat = mu + symbols`` (mean-centred rounding);
* bit 1, *bits back*: after decoding ``y_hat`` the decoder fits ``q(z | y_hat)``
  (:mod:`adacomp.workloads.codec.posterior`, settings from the header) and encodes ``z`` back with it,
  returning to the stack the bits the encoder took from it to choose ``z``. Needs integer y
  (``q`` must not depend on ``z``) and bits on the stack: the image coded first (the last one
  in the stream) cannot borrow, so it is coded without bits back.

The images are encoded last to first, so the decoder meets them in order. Encoder and decoder
must compute the same means and scales from ``z_hat`` (and, for bits back, the same posterior):
run both with the same torch build and thread count. Scales are snapped to a table, so float
noise below the table's 5 % spacing never changes the coding model, but the means of integer-y
images and the posterior parameters are used as computed.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .posterior import PosteriorFit, fit_posterior

__all__ = [
    "CODEC_EXTRA",
    "Latents",
    "check_image",
    "compress",
    "decompress",
    "information_content",
    "pad_image",
    "quantize",
    "reconstruct",
    "write_stream",
    "read_stream",
    "require_constriction",
]

CODEC_EXTRA = "pip install 'adacomp[codec]'"
"""The command that installs the codec's optional dependencies (``constriction``, ``scikit-image``)."""


def require_constriction():
    """The ``constriction`` module, imported on first use (it is an optional dependency).

    Raises:
        ModuleNotFoundError: (an ``ImportError``) when it is not installed; the message names the
            extra to install, ``pip install 'adacomp[codec]'``.
    """
    try:
        import constriction
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"the image codec's entropy coder (SGA / bits-back encode, codec.compress/decompress) needs "
            f"the optional package constriction, which is not installed: {CODEC_EXTRA}",
            name="constriction",
        ) from exc
    return constriction

MAGIC = b"AC"
VERSION = 1
FLAG_INTEGER_Y = 1
FLAG_BITS_BACK = 2
MAX_SIDE = 65535
_HEAD = struct.Struct("<2sBH")
_FIT = struct.Struct("<HfIf")
_IMAGE = struct.Struct("<HHB")


def check_image(x) -> torch.Tensor:
    """Validate an image and return it as a float32 ``(1, 3, H, W)`` tensor in ``[0, 1]``."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor (3, H, W) or (1, 3, H, W), got {type(x).__name__}")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"image must have shape (3, H, W) or (1, 3, H, W), got {tuple(x.shape)}")
    if x.shape[1] != 3:
        raise ValueError(
            f"image must have 3 (RGB) channels in dim -3, got {x.shape[1]} (shape {tuple(x.shape)})"
        )
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"image is empty (shape {tuple(x.shape)})")
    if x.shape[2] > MAX_SIDE or x.shape[3] > MAX_SIDE:
        raise ValueError(f"image sides must be at most {MAX_SIDE} pixels, got {tuple(x.shape)}")
    if not (x.is_floating_point()):
        raise TypeError(
            f"image must be floating point with values in [0, 1] (divide uint8 by 255), got {x.dtype}"
        )
    x = x.detach().float().cpu()
    if not torch.isfinite(x).all():
        raise ValueError("image has NaN or infinite values")
    lo, hi = x.min().item(), x.max().item()
    if lo < 0 or hi > 1:
        raise ValueError(
            f"image values must lie in [0, 1] (divide 8-bit pixels by 255), got [{lo:.4g}, {hi:.4g}]"
        )
    return x


def pad_image(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad ``(B, 3, H, W)`` on the bottom and right to multiples of ``multiple`` (replicating the edge)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (0, pw, 0, ph), mode="replicate")


@dataclass
class Latents:
    """The hard-rounded latents of one image, as coded. ``z_symbols`` are offsets around the
    prior's medians; ``y_symbols`` are ``round(y - mu)`` or, with ``integer_y``, ``round(y)``."""

    height: int
    width: int
    z_symbols: torch.Tensor  # (1, N, h, w) int64
    y_symbols: torch.Tensor  # (1, M, 4h, 4w) int64
    integer_y: bool = False
    bits_back: bool = False
    returned_bits: float = 0.0  # -log2 q(z_hat) of a bits-back image (set when coded)

    @property
    def flags(self) -> int:
        return (FLAG_INTEGER_Y if self.integer_y else 0) | (FLAG_BITS_BACK if self.bits_back else 0)


def _hyper(codec, z_symbols: torch.Tensor):
    z_hat = z_symbols.float() + codec.entropy_bottleneck.offsets(z_symbols.float())
    means, scales = codec.hyper_params(z_hat)
    return z_hat, means, scales


def _y_hat(y_symbols: torch.Tensor, means: torch.Tensor, integer_y: bool) -> torch.Tensor:
    return y_symbols.float() if integer_y else y_symbols.float() + means


@torch.no_grad()
def quantize(
    codec,
    y: torch.Tensor,
    z: torch.Tensor,
    height: int,
    width: int,
    integer_y: bool = False,
    bits_back: bool = False,
) -> Latents:
    """Hard-round one image's latents (``(1, M, ., .)``, ``(1, N, ., .)``): ``z`` around the prior's
    medians, then ``y`` around the means predicted from ``z_hat`` (or to integers), clamped to
    what the coder can represent."""
    eb = codec.entropy_bottleneck
    z_symbols = eb.clamp_symbols(torch.round(z - eb.offsets(z)).long())
    _, means, _ = _hyper(codec, z_symbols)
    r = codec.gaussian_conditional.symbol_range
    y_symbols = torch.round(y if integer_y else y - means).long().clamp(-r, r)
    return Latents(int(height), int(width), z_symbols, y_symbols, integer_y, bits_back)


@torch.no_grad()
def reconstruct(codec, latents: Latents) -> torch.Tensor:
    """What the decoder outputs for these latents: ``g_s(y_hat)`` cropped, clamped to ``[0, 1]``."""
    _, means, _ = _hyper(codec, latents.z_symbols)
    x_hat = codec.g_s(_y_hat(latents.y_symbols, means, latents.integer_y))
    return x_hat[..., : latents.height, : latents.width].clamp(0, 1)


CODER_FLOOR = 2.0**-24
"""The smallest probability constriction's coders (24-bit precision) give a symbol."""


@torch.no_grad()
def information_content(codec, latents: Latents, floor: float = CODER_FLOOR) -> float:
    """The model's information content ``-log2 p(z_hat) - log2 p(y_hat | z_hat)`` in bits
    (continuous scales, float likelihoods; no bits back). Each likelihood is floored at
    ``floor``: by default the coder's smallest probability, as a symbol the model finds less
    likely still costs about 24 bits in the stream; ``floor=LIKELIHOOD_MIN`` gives the
    training-time value (1e-9, about 30 bits)."""
    z_hat, means, scales = _hyper(codec, latents.z_symbols)
    y_hat = _y_hat(latents.y_symbols, means, latents.integer_y)
    lik_z = codec.entropy_bottleneck.likelihood(z_hat).clamp_min(floor)
    lik_y = codec.gaussian_conditional.likelihood(y_hat, scales, means).clamp_min(floor)
    return float(-torch.log2(lik_z).sum() - torch.log2(lik_y).sum())


def _np(t: torch.Tensor, dtype) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy().reshape(-1).astype(dtype))


def _gaussian(lo: int, hi: int):
    return require_constriction().stream.model.QuantizedGaussian(int(lo), int(hi))


def _y_model_params(codec, latents_integer_y: bool, means, scales):
    mu = _np(means, np.float64) if latents_integer_y else np.zeros(means.numel())
    return mu, np.ascontiguousarray(codec.gaussian_conditional.table_scales(scales).reshape(-1))


def _posterior_params(codec, y_hat: torch.Tensor, fit: PosteriorFit):
    m, s = fit_posterior(codec, y_hat, fit)
    offsets = m - codec.entropy_bottleneck.offsets(m)
    return offsets[0], s[0]


def _pop_z_from_posterior(codec, coder, y_hat, fit, shape) -> tuple[torch.Tensor, float]:
    """Draw ``z`` from ``q(z | y_hat)`` by decoding it off the stack; also ``-log2 q(z)`` (bits taken)."""
    offsets, stds = _posterior_params(codec, y_hat, fit)
    eb = codec.entropy_bottleneck
    z = torch.empty(shape, dtype=torch.long)
    for c in range(shape[1]):
        lo, hi = eb.support(c)
        sym = coder.decode(_gaussian(lo, hi), _np(offsets[c], np.float64), _np(stds[c], np.float64))
        z[0, c] = torch.from_numpy(sym.astype(np.int64)).view(shape[2:])
    d, s = z[0].double() - offsets.double(), stds.double()
    q = torch.special.ndtr((d + 0.5) / s) - torch.special.ndtr((d - 0.5) / s)
    return z, float(-torch.log2(q.clamp_min(1e-300)).sum())


def _push_z_to_posterior(codec, coder, y_hat, fit, z_symbols) -> None:
    offsets, stds = _posterior_params(codec, y_hat, fit)
    eb = codec.entropy_bottleneck
    for c in reversed(range(z_symbols.shape[1])):  # undo the pops last to first
        lo, hi = eb.support(c)
        coder.encode_reverse(
            _np(z_symbols[0, c], np.int32),
            _gaussian(lo, hi),
            _np(offsets[c], np.float64),
            _np(stds[c], np.float64),
        )


def _categorical(pmf: np.ndarray):
    return require_constriction().stream.model.Categorical(pmf, perfect=False)


@torch.no_grad()
def write_stream(codec, latents: list[Latents], fit: PosteriorFit | None = None) -> tuple[bytes, list[int]]:
    """Code the images' latents into one stream; returns ``(bytes, net bits each image added to
    the ANS stack)``. For bits-back images ``z_symbols`` is replaced by the ``z`` drawn from the
    posterior (and ``bits_back`` cleared on the image coded first, which has nothing to borrow)."""
    eb, gc = codec.entropy_bottleneck, codec.gaussian_conditional
    eb.check_ready()
    if not latents:
        raise ValueError("nothing to encode: the list of images is empty")
    if len(latents) >= 2**16:
        raise ValueError(f"at most 65535 images per stream, got {len(latents)}")
    fit = fit or PosteriorFit()
    coder = require_constriction().stream.stack.AnsCoder()
    net_bits = [0] * len(latents)
    for i in reversed(range(len(latents))):
        lat = latents[i]
        before = coder.num_bits()
        if lat.bits_back and not lat.integer_y:
            raise ValueError("bits-back coding needs integer-rounded y (integer_y=True)")
        if lat.bits_back and coder.is_empty():
            lat.bits_back = False
        if lat.bits_back:
            lat.z_symbols, lat.returned_bits = _pop_z_from_posterior(
                codec, coder, lat.y_symbols.float(), fit, lat.z_symbols.shape
            )
        _, means, scales = _hyper(codec, lat.z_symbols)
        mu, std = _y_model_params(codec, lat.integer_y, means, scales)
        r = gc.symbol_range
        coder.encode_reverse(_np(lat.y_symbols, np.int32), _gaussian(-r, r), mu, std)
        for c in reversed(range(lat.z_symbols.shape[1])):
            low = int(eb.pmf_low[c])
            coder.encode_reverse(_np(lat.z_symbols[0, c] - low, np.int32), _categorical(eb.pmfs[c]))
        net_bits[i] = coder.num_bits() - before
    head = _HEAD.pack(MAGIC, VERSION, len(latents))
    head += b"".join(_IMAGE.pack(lat.height, lat.width, lat.flags) for lat in latents)
    if any(lat.bits_back for lat in latents):
        head += _FIT.pack(fit.steps, fit.lr, fit.seed, fit.init_std)
    words = coder.get_compressed().astype("<u4")
    return head + words.tobytes(), net_bits


@torch.no_grad()
def read_stream(codec, data: bytes) -> list[Latents]:
    """Decode the latents of every image in a stream (bits-back images give their bits back)."""
    eb, gc = codec.entropy_bottleneck, codec.gaussian_conditional
    eb.check_ready()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _HEAD.size or data[:2] != MAGIC:
        raise ValueError("not an adacomp codec stream (bad magic or too short)")
    _, version, n = _HEAD.unpack_from(data)
    if version != VERSION:
        raise ValueError(f"stream version {version} is not supported (expected {VERSION})")
    offset = _HEAD.size + n * _IMAGE.size
    if len(data) < offset:
        raise ValueError("truncated stream")
    images = [_IMAGE.unpack_from(data, _HEAD.size + i * _IMAGE.size) for i in range(n)]
    fit = None
    if any(flags & FLAG_BITS_BACK for _, _, flags in images):
        if len(data) < offset + _FIT.size:
            raise ValueError("truncated stream")
        steps, lr, seed, init_std = _FIT.unpack_from(data, offset)
        fit = PosteriorFit(steps=steps, lr=float(lr), seed=seed, init_std=float(init_std))
        offset += _FIT.size
    if (len(data) - offset) % 4:
        raise ValueError("truncated or corrupt stream")
    words = np.frombuffer(data[offset:], dtype="<u4").astype(np.uint32)
    ans = require_constriction().stream.stack.AnsCoder
    coder = ans(words) if len(words) else ans()
    d = codec.downsampling
    out = []
    for height, width, flags in images:
        h, w = math.ceil(height / d), math.ceil(width / d)
        z = torch.empty((1, codec.N, h, w), dtype=torch.long)
        for c in range(codec.N):
            sym = coder.decode(_categorical(eb.pmfs[c]), h * w).astype(np.int64) + int(eb.pmf_low[c])
            z[0, c] = torch.from_numpy(sym).view(h, w)
        _, means, scales = _hyper(codec, z)
        integer_y, bits_back = bool(flags & FLAG_INTEGER_Y), bool(flags & FLAG_BITS_BACK)
        mu, std = _y_model_params(codec, integer_y, means, scales)
        r = gc.symbol_range
        y = torch.from_numpy(coder.decode(_gaussian(-r, r), mu, std).astype(np.int64)).view(means.shape)
        if bits_back:
            _push_z_to_posterior(codec, coder, y.float(), fit, z)
        out.append(Latents(height, width, z, y, integer_y, bits_back))
    return out


@torch.no_grad()
def analyse(codec, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad a checked ``(B, 3, H, W)`` image batch and return ``(x_padded, y, z)`` (amortized inference)."""
    xp = pad_image(x, codec.downsampling)
    y = codec.g_a(xp)
    return xp, y, codec.h_a(y)


def compress(codec, x) -> bytes:
    """Amortized encoding of one image: ``y = g_a(x)``, ``z = h_a(y)``, hard-rounded and coded."""
    x = check_image(x)
    _, y, z = analyse(codec, x)
    data, _ = write_stream(codec, [quantize(codec, y, z, x.shape[2], x.shape[3])])
    return data


def decompress(codec, data: bytes):
    """The decoded image ``(1, 3, H, W)`` in ``[0, 1]``, or a list of them for a multi-image stream."""
    images = [reconstruct(codec, lat) for lat in read_stream(codec, data)]
    return images[0] if len(images) == 1 else images

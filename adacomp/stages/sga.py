"""Better inference for neural image codecs: stochastic Gumbel annealing (SGA) and bits-back coding.

Yang, Bamler, Mandt, *Improving Inference for Neural Image Compression*, NeurIPS 2020. The codec
is not changed; only how each image is encoded. Its latents ``y = g_a(x)``, ``z = h_a(y)`` are
treated as free variables and refined by Adam on the image's own rate-distortion loss::

    L(y, z) = [-log2 p(z~) - log2 p(y~ | z~)] / pixels + lambda * MSE(g_s(y~), x)     (pixels 0..255)

where ``y~``, ``z~`` are *stochastic Gumbel-softmax roundings* of ``v`` between ``floor(v)`` and
``ceil(v)``, with logits ``-atanh(v - floor(v)) / tau`` and ``-atanh(ceil(v) - v) / tau`` and a
relaxed one-hot sample at temperature ``tau`` (as in the authors' code); ``tau`` is annealed from
0.5 towards 0 (:class:`TemperatureSchedule`). ``v = y - mu(z~)`` (``y`` is rounded around the
predicted means, as the final hard rounding does) and ``v = z - median`` (``z`` around the prior's
offsets). After the last step the latents are hard-rounded and coded into a real bitstream
that the codec's unchanged ``decompress()`` reads.

Bits-back (:class:`BitsBackConfig`): SGA with ``y`` rounded to integers (``q(z)`` may not depend
on ``z``, so ``y_hat`` must not either), then ``z`` is *drawn* from a Gaussian posterior
``q(z | y_hat)`` fitted for the net rate by popping it off the ANS stack; the decoder fits the
same posterior from ``y_hat`` and pushes ``z`` back, so ``-log2 q(z)`` bits are returned. Bits
can only be borrowed from a stack that holds some: with several images in one stream every image
but the one coded first (the last in the stream) gets them back. See :mod:`adacomp.workloads.codec.bitstream`.

This is not a :func:`~adacomp.stages.compress_` stage: ``compress_`` changes a model's modules in
place, while the refinement leaves the codec untouched and acts per image at encode time, so it
is exposed as :func:`encode` (and ``adacomp.stages.encode``).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..workloads.codec import bitstream
from ..workloads.codec.posterior import PosteriorFit

__all__ = ["BitsBackConfig", "SGAConfig", "TemperatureSchedule", "encode", "refine_latents", "sga_round"]

_ATANH_EPS = 1e-5


@dataclass(frozen=True)
class TemperatureSchedule:
    """Annealed temperature ``tau(t) = clip(tau_max * exp(-rate * (t' - t0)), tau_min, tau_max)``.

    ``t' = t * reference_steps / steps``.

    With ``steps == reference_steps`` (2000) this is the paper's schedule
    ``clip(0.5 exp(-0.001 (t - 700)), 1e-8, 0.5)``; shorter runs follow the same curve compressed in time.
    """

    tau_max: float = 0.5
    rate: float = 1e-3
    t0: float = 700.0
    tau_min: float = 1e-8
    reference_steps: int = 2000

    def __post_init__(self):
        if not 0 < self.tau_min <= self.tau_max:
            raise ValueError(f"need 0 < tau_min <= tau_max, got {self.tau_min}, {self.tau_max}")
        if self.rate < 0 or self.reference_steps <= 0:
            raise ValueError("rate must be >= 0 and reference_steps > 0")

    def __call__(self, t: int, steps: int) -> float:
        tt = t * self.reference_steps / max(steps, 1)
        return float(
            min(max(self.tau_max * math.exp(-self.rate * (tt - self.t0)), self.tau_min), self.tau_max)
        )


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


@dataclass(frozen=True)
class SGAConfig:
    """Settings of the SGA refinement (defaults: the paper's).

    * ``steps``: Adam steps (2000); ``lr``: Adam learning rate (0.005).
    * ``schedule``: a :class:`TemperatureSchedule` or any ``callable(t, steps) -> tau``.
    * ``lmbda``: the rate-distortion trade-off; ``None`` takes the codec's ``lmbda`` attribute
      (set by :func:`adacomp.workloads.codec.load_checkpoint` to the training value).
    * ``seed``: seeds the Gumbel noise (a private generator; the global RNG is not touched).
    * ``keep_best``: evaluate the true (hard-rounded) loss at the start, every ``eval_every``
      steps (0: ``steps // 10``) and at the end, and code the best latents of each image, so
      refinement never ends worse than amortized encoding.
    """

    steps: int = 2000
    lr: float = 0.005
    schedule: Callable[[int, int], float] = field(default_factory=TemperatureSchedule)
    lmbda: float | None = None
    seed: int = 0
    keep_best: bool = True
    eval_every: int = 0

    def __post_init__(self):
        _check_positive_int("steps", self.steps)
        _check_positive_int("eval_every", self.eval_every)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not callable(self.schedule):
            raise TypeError("schedule must be callable (t, steps) -> tau, e.g. TemperatureSchedule()")
        if self.lmbda is not None and not (self.lmbda > 0 and math.isfinite(self.lmbda)):
            raise ValueError(f"lmbda must be a positive number or None, got {self.lmbda!r}")


@dataclass(frozen=True)
class BitsBackConfig(SGAConfig):
    """SGA with integer rounding of ``y``, then bits-back coding of ``z`` (``posterior`` settings:
    :class:`adacomp.workloads.codec.PosteriorFit`, replayed by the decoder)."""

    posterior: PosteriorFit = field(default_factory=PosteriorFit)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.posterior, PosteriorFit):
            raise TypeError("posterior must be an adacomp.workloads.codec.PosteriorFit")


def sga_round(v: torch.Tensor, tau: float, generator: torch.Generator) -> torch.Tensor:
    """Stochastic Gumbel-annealed rounding of ``v`` to ``floor(v)`` or ``ceil(v)`` (differentiable)."""
    v_floor, v_ceil = torch.floor(v).detach(), torch.ceil(v).detach()
    logits = torch.stack(
        [
            -torch.atanh((v - v_floor).clamp(-1 + _ATANH_EPS, 1 - _ATANH_EPS)) / tau,
            -torch.atanh((v_ceil - v).clamp(-1 + _ATANH_EPS, 1 - _ATANH_EPS)) / tau,
        ],
        dim=-1,
    )
    u = torch.rand(logits.shape, generator=generator, dtype=v.dtype).clamp(1e-20, 1 - 1e-7)
    gumbel = -torch.log(-torch.log(u))
    weights = torch.softmax((logits + gumbel) / tau, dim=-1)
    return v_floor * weights[..., 0] + v_ceil * weights[..., 1]


def _distortion(codec, y_hat, x, height, width):
    """Per-image MSE on 0..255 pixels over the unpadded ``height x width`` window."""
    x_hat = codec.g_s(y_hat)[..., :height, :width]
    return ((x_hat - x[..., :height, :width]) ** 2).flatten(1).mean(1) * 255.0**2


def _soft_loss(codec, y, z, x, height, width, lmbda, tau, generator, integer_y):
    eb, gc = codec.entropy_bottleneck, codec.gaussian_conditional
    medians = eb.offsets(z)
    z_t = medians + sga_round(z - medians, tau, generator)
    means, scales = codec.hyper_params(z_t)
    y_t = sga_round(y, tau, generator) if integer_y else means + sga_round(y - means, tau, generator)
    bits = -torch.log2(eb.likelihood(z_t)).flatten(1).sum(1) - torch.log2(
        gc.likelihood(y_t, scales, means)
    ).flatten(1).sum(1)
    return bits / (height * width) + lmbda * _distortion(codec, y_t, x, height, width)


@torch.no_grad()
def _hard_losses(codec, y, z, x, height, width, lmbda, integer_y):
    """True loss per image: the coded latents' information content and the decoder's output."""
    out = []
    for i in range(y.shape[0]):
        lat = bitstream.quantize(codec, y[i : i + 1], z[i : i + 1], height, width, integer_y)
        bits = bitstream.information_content(codec, lat)
        x_hat = bitstream.reconstruct(codec, lat)
        mse = torch.mean((x_hat - x[i : i + 1, :, :height, :width]) ** 2).item() * 255.0**2
        out.append(bits / (height * width) + lmbda * mse)
    return torch.tensor(out)


class _Progress:
    """A one-line progress display on stderr (no extra dependency)."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled, self.start = total, label, enabled, time.time()

    def update(self, t: int, loss: float, tau: float) -> None:
        if not self.enabled or (t % max(1, self.total // 100) and t != self.total):
            return
        frac = t / max(self.total, 1)
        bar = "#" * int(30 * frac)
        elapsed = time.time() - self.start
        eta = elapsed / max(frac, 1e-9) - elapsed
        sys.stderr.write(
            f"\r{self.label} [{bar:<30}] {t}/{self.total} loss {loss:.4f} tau {tau:.3g} "
            f"{elapsed:.0f}s<{eta:.0f}s"
        )
        if t == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def refine_latents(
    codec,
    x: torch.Tensor,
    height: int,
    width: int,
    config: SGAConfig,
    *,
    integer_y: bool = False,
    progress: bool = False,
    info: dict | None = None,
):
    """SGA on a batch of padded images ``x`` ``(B, 3, Hp, Wp)`` sharing the size ``height x width``;
    returns the refined continuous ``(y, z)``. Images are independent (the loss is a sum of
    per-image losses and Adam acts elementwise), so a batch refines several images at once."""
    lmbda = _lmbda(codec, config)
    with torch.no_grad():
        y0 = codec.g_a(x)
        z0 = codec.h_a(y0)
    y = y0.clone().requires_grad_(True)
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.Adam([y, z], lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    eval_every = config.eval_every or max(1, config.steps // 10)
    best_loss = _hard_losses(codec, y0, z0, x, height, width, lmbda, integer_y)
    start_loss = best_loss.clone()
    best_y, best_z, best_step = y0.clone(), z0.clone(), torch.zeros(len(best_loss), dtype=torch.long)
    trace = []
    bar = _Progress(config.steps, "SGA" if not integer_y else "SGA (bits-back)", progress)
    for t in range(config.steps):
        tau = float(config.schedule(t, config.steps))
        with torch.enable_grad():
            loss = _soft_loss(codec, y, z, x, height, width, lmbda, tau, generator, integer_y)
            gy, gz = torch.autograd.grad(loss.sum(), [y, z])
        y.grad, z.grad = gy, gz
        opt.step()
        trace.append(loss.detach().tolist())
        bar.update(t + 1, loss.mean().item(), tau)
        if config.keep_best and ((t + 1) % eval_every == 0 or t + 1 == config.steps):
            hard = _hard_losses(codec, y.detach(), z.detach(), x, height, width, lmbda, integer_y)
            better = hard < best_loss
            best_loss = torch.where(better, hard, best_loss)
            best_y[better], best_z[better] = y.detach()[better], z.detach()[better]
            best_step[better] = t + 1
    if not config.keep_best:
        best_y, best_z = y.detach(), z.detach()
        best_loss = _hard_losses(codec, best_y, best_z, x, height, width, lmbda, integer_y)
        best_step[:] = config.steps
    if info is not None:
        info.update(
            {
                "loss_start": start_loss.tolist(),
                "loss_final": best_loss.tolist(),
                "best_step": best_step.tolist(),
                "soft_loss_trace": trace,
                "lmbda": lmbda,
            }
        )
    return best_y, best_z


def _lmbda(codec, config: SGAConfig) -> float:
    lmbda = config.lmbda if config.lmbda is not None else getattr(codec, "lmbda", None)
    if lmbda is None:
        raise ValueError(
            "the rate-distortion trade-off is unknown: pass SGAConfig(lmbda=...) "
            "or set codec.lmbda (load_checkpoint sets it to the training value)"
        )
    return float(lmbda)


def _as_images(images) -> tuple[list[torch.Tensor], bool]:
    """Checked ``(1, 3, H, W)`` images and whether a single image was given."""
    if isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[0] != 1:
        if images.shape[0] == 0:
            raise ValueError("the batch of images is empty")
        return [bitstream.check_image(img) for img in images], False
    if isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        if len(images) == 0:
            raise ValueError("the list of images is empty")
        return [bitstream.check_image(img) for img in images], False
    return [bitstream.check_image(images)], True


def encode(
    codec,
    images,
    refine: SGAConfig | None = None,
    *,
    separate: bool = False,
    progress: bool = False,
    info: dict | None = None,
) -> bytes | list[bytes]:
    """Encode one image or several into bytes that ``codec.decompress()`` reads.

    ``images``: a ``(3, H, W)`` / ``(1, 3, H, W)`` tensor in ``[0, 1]``, a ``(B, 3, H, W)`` batch or
    a list of images (any sizes). ``refine``: ``None`` (amortized encoding), :class:`SGAConfig` or
    :class:`BitsBackConfig`. Images of the same size are refined together as one batch.

    Returns one stream holding all images (``decompress`` gives a list for several), or with
    ``separate=True`` one stream per image (bits-back then has nothing to borrow from and is off).
    ``info``, if a dict, receives per image: ``bits`` (net bits on the ANS stack), ``bytes`` (of its
    own stream when ``separate``), ``information_content`` (the model's ``-log2 p`` of the coded
    latents, no bits back), ``returned_bits`` (``-log2 q(z_hat)`` of a bits-back image),
    ``loss_start`` / ``loss_final`` (true R-D loss before and after refinement), ``best_step``,
    ``latents`` (the coded :class:`~adacomp.workloads.codec.Latents`) and the refinement's
    ``soft_loss_trace``.

    Raises:
        ModuleNotFoundError: (an ``ImportError``) when the optional entropy coder ``constriction``
            is not installed, before any work; the message says ``pip install 'adacomp[codec]'``.
        TypeError: ``refine`` is not ``None``, :class:`SGAConfig` or :class:`BitsBackConfig`.
    """
    if refine is not None and not isinstance(refine, SGAConfig):
        raise TypeError(f"refine must be None, SGAConfig or BitsBackConfig, got {type(refine).__name__}")
    bitstream.require_constriction()  # optional dependency: fail before refining, naming the extra
    codec.entropy_bottleneck.check_ready()
    xs, single = _as_images(images)
    bits_back = isinstance(refine, BitsBackConfig)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, x in enumerate(xs):
        groups.setdefault(tuple(x.shape[-2:]), []).append(i)
    latents: list = [None] * len(xs)
    records: list[dict] = [{} for _ in xs]
    for (height, width), idx in groups.items():
        xp = bitstream.pad_image(torch.cat([xs[i] for i in idx]), codec.downsampling)
        if refine is None:
            _, y, z = bitstream.analyse(codec, xp)
            group_info = {}
        else:
            group_info = {}
            y, z = refine_latents(
                codec, xp, height, width, refine, integer_y=bits_back, progress=progress, info=group_info
            )
        for j, i in enumerate(idx):
            latents[i] = bitstream.quantize(
                codec, y[j : j + 1], z[j : j + 1], height, width, integer_y=bits_back, bits_back=bits_back
            )
            for key in ("loss_start", "loss_final", "best_step"):
                if key in group_info:
                    records[i][key] = group_info[key][j]
            if "soft_loss_trace" in group_info:
                records[i]["soft_loss_trace"] = [step[j] for step in group_info["soft_loss_trace"]]
    fit = refine.posterior if bits_back else None
    if separate or single:
        streams = []
        for i, lat in enumerate(latents):
            if separate:
                lat.bits_back = False
            data, bits = bitstream.write_stream(codec, [lat], fit)
            streams.append(data)
            records[i].update(bits=bits[0], bytes=len(data))
        result = streams[0] if single else streams
    else:
        result, bits = bitstream.write_stream(codec, latents, fit)
        for i, b in enumerate(bits):
            records[i]["bits"] = b
    for i, lat in enumerate(latents):
        records[i]["information_content"] = bitstream.information_content(codec, lat)
        records[i]["bits_back"] = lat.bits_back
        records[i]["returned_bits"] = lat.returned_bits
        records[i]["latents"] = lat
    if info is not None:
        info["images"] = records
    return result

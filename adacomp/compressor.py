"""One worker's AdaComp compressor: residues (error feedback) plus the selection kernels.

Chen et al., "AdaComp: Adaptive Residual Gradient Compression for Data-Parallel
Distributed Training", AAAI 2018 (arXiv 1712.02679); the exact computation is
docs/algorithm.md section 1 and :mod:`adacomp._reference`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Union

import torch

from . import ops, payload
from ._reference import SCALE_MODES, VALUE_MODES

BinSize = Union[None, int, Mapping[str, Union[int, None]], Callable[[str, torch.Tensor], Union[int, None]]]  # noqa: UP007

#: Paper defaults (section "Experimental results"): bin 50 for convolutions, 500 for
#: fully connected / recurrent / embedding weights.
CONV_BIN_SIZE = 50
FC_BIN_SIZE = 500
#: Tensors smaller than this are sent dense by default (biases, norms, tiny layers).
DEFAULT_MIN_NUMEL = 1024

_PAYLOAD_KIND = {"ternary": payload.KIND_TERNARY, "fp16": payload.KIND_FP16, "fp32": payload.KIND_FP32}


def _check_bin_size(value, where: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"bin_size{where} must be an int or None, got {value!r}")
    if value < 1:
        raise ValueError(f"bin_size{where} must be >= 1, got {value}")
    if value > payload.MAX_BIN_SIZE:
        raise ValueError(f"bin_size{where} must be at most {payload.MAX_BIN_SIZE}, got {value}")


def all_zero(g: torch.Tensor) -> bool:
    """Whether every element of ``g`` is zero (a quick look at the head first: a gradient
    that is used almost never starts with 256 zeros, so the full pass is rare)."""
    flat = g.detach().reshape(-1)
    if bool(flat[:256].any()):
        return False
    return not bool(flat.any())


def default_bin_size(tensor: torch.Tensor, min_numel: int = DEFAULT_MIN_NUMEL) -> int | None:
    """docs/algorithm.md section 1: 50 for 3+-D tensors, 500 for 2-D, None (dense) otherwise."""
    if tensor.numel() < min_numel or tensor.dim() < 2:
        return None
    return CONV_BIN_SIZE if tensor.dim() >= 3 else FC_BIN_SIZE


class AdaComp:
    """One worker's compressor, holding one residue per parameter name.

    Args:
        bin_size: ``None`` (the paper's defaults, see :func:`default_bin_size`), an int (that
            bin size for every tensor of at least ``min_numel`` elements, whatever its
            shape), a dict from name to int or ``None`` (names not in it follow the
            defaults; ``None`` sends that tensor dense), or a callable
            ``(name, tensor) -> int | None``.
        scale: ``"binmax_mean"`` (mean of the bin maxima over bins that send; default) or
            ``"selected_mean"`` (mean of ``|G_i|`` over sent elements).
        values: ``"ternary"`` (sign times scale; default), ``"fp16"`` or ``"fp32"``
            (send ``G_i`` itself).
        min_numel: tensors with fewer elements are sent dense (int and default rules).
        device: where residues live and selection runs; default: each gradient's device.
    """

    def __init__(self, bin_size: BinSize = None, scale: str = "binmax_mean",
                 values: str = "ternary", min_numel: int = DEFAULT_MIN_NUMEL,
                 device: torch.device | str | None = None):
        if scale not in SCALE_MODES:
            raise ValueError(f"scale must be one of {sorted(SCALE_MODES)}, got {scale!r}")
        if values not in VALUE_MODES:
            raise ValueError(f"values must be one of {sorted(VALUE_MODES)}, got {values!r}")
        if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0:
            raise ValueError(f"min_numel must be a non-negative int, got {min_numel!r}")
        if isinstance(bin_size, Mapping):
            for k, v in bin_size.items():
                _check_bin_size(v, f" for {k!r}")
        elif not callable(bin_size):
            _check_bin_size(bin_size, "")
        self.bin_size = bin_size
        self.scale = scale
        self.values = values
        self.min_numel = min_numel
        self.device = torch.device(device) if device is not None else None
        self._residues: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._spare: dict[tuple[int, torch.device], torch.Tensor] = {}

    # ------------------------------------------------------------------ configuration
    def config(self) -> dict:
        """The settings that must agree between ranks (callables reported by name)."""
        bs = self.bin_size
        if callable(bs) and not isinstance(bs, Mapping):
            bs = getattr(bs, "__qualname__", repr(bs))
        elif isinstance(bs, Mapping):
            bs = dict(sorted(bs.items()))
        return {"bin_size": bs, "scale": self.scale, "values": self.values,
                "min_numel": self.min_numel}

    def bin_size_for(self, name: str, tensor: torch.Tensor) -> int | None:
        """The bin size used for ``tensor`` under ``name``; ``None`` means sent dense."""
        bs = self.bin_size
        if bs is None:
            return default_bin_size(tensor, self.min_numel)
        if isinstance(bs, Mapping):
            if name in bs:
                return bs[name]
            return default_bin_size(tensor, self.min_numel)
        if callable(bs):
            value = bs(name, tensor)
            _check_bin_size(value, f" returned for {name!r}")
            return value
        return None if tensor.numel() < self.min_numel else bs

    # ------------------------------------------------------------------ compression
    def compress(self, name: str, grad: torch.Tensor) -> payload.Payload:
        """Run docs/algorithm.md section 1 on ``grad``, update ``name``'s residue, return the payload.

        fp16/bf16 and non-contiguous gradients are accepted (the math is fp32). If the
        gradient holds NaN/Inf the payload carries the non-finite flag (it decodes to NaN)
        and the residue is left as it was.
        """
        p, pending = self.prepare(name, grad)
        self.commit(pending)
        return p

    def prepare(self, name: str, grad: torch.Tensor, *, bin_size: int | None = None):
        """Two-phase :meth:`compress`: the payload, and a pending residue update.

        Integrations call :meth:`commit` once every rank agreed that the payload is used,
        or :meth:`discard` (residue untouched) when the step goes dense or another rank saw
        a non-finite gradient. ``pending`` is ``None`` when there is nothing to commit.
        ``bin_size`` overrides the configured bin size for this call (the sharded exchange's
        owners re-compress shards with the bin size of the first level).
        """
        payloads, pending = self._prepare(name, grad, None, bin_size)
        return payloads[0], pending

    def prepare_split(self, name: str, grad: torch.Tensor, shards: int, *, bin_size: int | None = None):
        """:meth:`prepare`, with the payload split into ``shards`` bin-aligned pieces
        (:func:`adacomp.payload.shard_bounds`): a list of payloads of 1-D shards, one per
        shard. A tensor sent dense by rule gives one dense payload whatever ``shards`` is."""
        return self._prepare(name, grad, shards, bin_size)

    def _prepare(self, name, grad, shards, bin_size):
        if isinstance(grad, torch.Tensor) and self._native(grad):
            L = bin_size if bin_size is not None else self.bin_size_for(name, grad)
            if L is not None:  # one call into the extension, as for a bucket of one
                bp, pending = self._prepare_bucket_native([name], [grad], [L], shards)
                return [payload.Payload(bp.piece(0, s)) for s in range(bp.pieces)], pending[0]
        return self._prepare_loop(name, grad, shards, bin_size)

    def _native(self, grad: torch.Tensor) -> bool:
        """Whether ``grad`` goes through the bucket op of the extension: CPU tensors with the
        C++ backend, CUDA tensors with the CUDA backend (on the compressor's device)."""
        return ops.has_bucket_ops(grad.device if self.device is None else self.device)

    def _checked(self, name, grad) -> torch.Tensor:
        """``grad`` detached (on the compressor's device), after the checks every path makes."""
        if not isinstance(grad, torch.Tensor):
            raise TypeError(f"compress({name!r}): expected a tensor, got {type(grad).__name__}")
        if not grad.is_floating_point():
            raise ValueError(f"compress({name!r}): gradient must be floating point, got {grad.dtype}")
        shape = tuple(grad.shape)
        known = self._shapes.get(name)
        if known is not None and known != shape:
            raise ValueError(f"compress({name!r}): gradient shape changed from {known} to {shape}; "
                             "a residue is kept per name, so use a new name for a new tensor")
        g = grad.detach()
        if self.device is not None and g.device != self.device:
            g = g.to(self.device)
        return g

    def _prepare_loop(self, name, grad, shards, bin_size):
        g = self._checked(name, grad)
        shape = tuple(grad.shape)
        if bin_size is not None:
            _check_bin_size(bin_size, f" for {name!r}")
            L = bin_size
        else:
            L = self.bin_size_for(name, grad)
        self._shapes[name] = shape
        if L is None:
            return [payload.encode_dense(g)], None
        flat = g.reshape(-1)
        if flat.dtype != torch.float32:
            flat = flat.to(torch.float32)
        flat = flat.contiguous()
        n = flat.numel()
        L = max(1, min(L, n))  # a bin larger than the tensor is the whole tensor
        residue = self._residue_buffer(name, n, flat.device)
        out = self._take_spare(n, flat.device)
        counts, offsets, values, scale, info = ops.select(
            flat, residue, out, L, SCALE_MODES[self.scale], VALUE_MODES[self.values])
        n_sent, nonfinite = (int(x) for x in info.tolist())
        kind = _PAYLOAD_KIND[self.values]
        if shards is None:
            if nonfinite:
                self._spare[(n, flat.device)] = out
                return [payload.encode_nonfinite(shape, L, kind, flat.device)], None
            return [payload.encode(shape, L, counts, offsets, values, float(scale[0]), kind)], (name, out)
        bounds = payload.shard_bounds(n, L, shards)
        if nonfinite:
            self._spare[(n, flat.device)] = out
            return [payload.encode_nonfinite((e - s,), payload.shard_bin_size(L, s, e), kind, flat.device)
                    for s, e in bounds], None
        return payload.encode_split(n, L, counts, offsets, values, float(scale[0]), kind, bounds), (name, out)

    def prepare_bucket(self, names, grads, bins, shards: int | None = None):
        """:meth:`prepare` (``shards=None``) or :meth:`prepare_split` (into ``shards``
        pieces) for a whole bucket at once: one call into the extension on CPU
        (``adacomp::compress_bucket``), a loop over the per-tensor path on the other
        backends; the same bytes either way.

        ``bins``: each tensor's bin size (an int: every tensor here is compressed; tensors
        sent dense by rule stay out of the bucket). Returns a
        :class:`adacomp.payload.BucketPayloads` (one contiguous uint8 buffer, piece-major,
        and its size table) and the pending residue updates, one per tensor (``None`` for
        a non-finite gradient), for :meth:`commit` / :meth:`discard`.

        Raises ``ValueError`` for a non-floating-point gradient, a changed shape or an
        invalid bin size, before any residue is touched.
        """
        names, grads, bins = list(names), list(grads), list(bins)
        if not (len(names) == len(grads) == len(bins)):
            raise ValueError(f"prepare_bucket: {len(names)} names, {len(grads)} gradients and "
                             f"{len(bins)} bin sizes")
        if shards is not None and shards < 1:
            raise ValueError(f"prepare_bucket: shards must be >= 1, got {shards}")
        if not (grads and all(isinstance(g, torch.Tensor) and self._native(g) for g in grads)):
            return self._prepare_bucket_loop(names, grads, bins, shards)
        return self._prepare_bucket_native(names, grads, bins, shards)

    def _prepare_bucket_native(self, names, grads, bins, shards):
        flats, residues, Ls, shapes = [], [], [], []
        for name, grad, L in zip(names, grads, bins):
            flat, L = self._flat_input(name, grad, L)
            flats.append(flat)
            residues.append(self._residue_buffer(name, flat.numel(), flat.device))
            Ls.append(L)
            shapes += [grad.dim(), *grad.shape]
        # spares taken only once every input is valid
        outs = [self._take_spare(f.numel(), f.device) for f in flats]
        data, sizes, info = torch.ops.adacomp.compress_bucket(
            flats, residues, outs, Ls, shapes, shards or 0, SCALE_MODES[self.scale], VALUE_MODES[self.values])
        info_l = info.tolist()
        pending = []
        for name, out, (_, nonfinite, _) in zip(names, outs, info_l):
            if nonfinite:
                self._spare[(out.numel(), out.device)] = out
                pending.append(None)
            else:
                pending.append((name, out))
        bp = payload.BucketPayloads(data, sizes, [int(x[1]) != 0 for x in info_l],
                                    [int(x[2]) != 0 for x in info_l])
        return bp, pending

    def _prepare_bucket_loop(self, names, grads, bins, shards):
        per, pending = [], []
        try:
            for name, grad, L in zip(names, grads, bins):
                ps, pend = self._prepare_loop(name, grad, shards, L)
                per.append(ps)
                pending.append(pend)
        except BaseException:
            for pend in pending:
                self.discard(pend)
            raise
        return payload.BucketPayloads.from_payloads(
            per, [all_zero(g) for g in grads]), pending

    def _flat_input(self, name, grad, L):
        """The checks of :meth:`_prepare`, and the flat fp32 input and clamped bin size."""
        g = self._checked(name, grad)
        if L is None:
            raise ValueError(f"prepare_bucket({name!r}): a tensor sent dense has no place in a bucket")
        _check_bin_size(L, f" for {name!r}")
        self._shapes[name] = tuple(grad.shape)
        flat = g.reshape(-1)
        if flat.dtype != torch.float32:
            flat = flat.to(torch.float32)
        flat = flat.contiguous()
        return flat, max(1, min(L, flat.numel()))

    def commit(self, pending) -> None:
        """Make a pending residue update from :meth:`prepare` the residue."""
        if pending is None:
            return
        name, out = pending
        old = self._residues[name]
        self._residues[name] = out
        self._spare[(old.numel(), old.device)] = old

    def discard(self, pending) -> None:
        """Drop a pending residue update: the residue stays as it was before the step."""
        if pending is None:
            return
        _, out = pending
        self._spare[(out.numel(), out.device)] = out

    def _residue_buffer(self, name: str, n: int, device: torch.device) -> torch.Tensor:
        r = self._residues.get(name)
        if r is None:
            r = self._residues[name] = torch.zeros(n, dtype=torch.float32, device=device)
        elif r.device != device:
            r = self._residues[name] = r.to(device)
        return r

    def _take_spare(self, n: int, device: torch.device) -> torch.Tensor:
        # One spare buffer per (size, device) instead of one per name: the new residue is
        # written into it, and the old residue becomes the spare. Writing into a separate
        # buffer is what lets a non-finite step leave the residue untouched.
        buf = self._spare.pop((n, device), None)
        if buf is None:
            buf = torch.empty(n, dtype=torch.float32, device=device)
        return buf

    # ------------------------------------------------------------------ state
    def residue(self, name: str) -> torch.Tensor:
        """The residue of ``name`` in the gradient's shape (zeros before its first step)."""
        if name not in self._shapes:
            raise KeyError(f"no residue for {name!r}: it has not been compressed yet")
        r = self._residues.get(name)
        if r is None:  # sent dense: no error feedback
            return torch.zeros(self._shapes[name])
        return r.view(self._shapes[name])

    def names(self) -> list[str]:
        return list(self._shapes)

    def scale_residues_(self, factor: float) -> None:
        """Multiply every residue by ``factor`` in place (a loss scale changed; exact for
        powers of two)."""
        if self._residues:
            torch._foreach_mul_(list(self._residues.values()), float(factor))

    def set_residue(self, name: str, value: torch.Tensor) -> None:
        """Set ``name``'s residue (fp32, any shape with the right number of elements); its
        shape becomes ``value``'s. For carrying residues between runs."""
        v = value.detach().to(torch.float32).reshape(-1).clone().contiguous()
        if self.device is not None:
            v = v.to(self.device)
        self._residues[name] = v
        self._shapes[name] = tuple(value.shape)

    def state_dict(self) -> dict:
        return {
            "config": self.config(),
            "residues": {k: v.detach().clone().cpu() for k, v in self._residues.items()},
            "shapes": dict(self._shapes),
        }

    def load_state_dict(self, state: dict) -> None:
        try:
            residues, shapes, cfg = state["residues"], state["shapes"], state["config"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not an AdaComp state_dict (missing {exc})") from None
        if cfg != self.config():
            raise ValueError(f"AdaComp state_dict was saved with settings {cfg}, this compressor "
                             f"has {self.config()}")
        new = {}
        for k, v in residues.items():
            if k not in shapes or tuple(v.reshape(shapes[k]).shape) != tuple(shapes[k]):
                raise ValueError(f"AdaComp state_dict: residue {k!r} does not match its shape")
            if v.dtype != torch.float32:
                raise ValueError(f"AdaComp state_dict: residue {k!r} must be fp32, got {v.dtype}")
            dev = self.device or v.device
            new[k] = v.detach().reshape(-1).to(dev, copy=True).contiguous()
        self._residues = new
        self._shapes = {k: tuple(s) for k, s in shapes.items()}
        self._spare.clear()

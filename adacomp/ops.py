"""The AdaComp kernels and the choice of backend.

Two ops are declared once in ``csrc/adacomp.cpp`` with ``TORCH_LIBRARY``:

* ``adacomp::select``: the fused selection (docs/algorithm.md section 1, steps 1 to 6),
* ``adacomp::decompress_sum_``: validate and add many payload bodies into a dense tensor.

Backends, fastest first: ``"cuda"`` (CUDA tensors, extension built with CUDA), ``"cpp"``
(the C++ CPU kernel), ``"numba"`` (a ``@njit(parallel=True)`` kernel, used on CPU when
the extension is not built) and ``"torch"`` (the pure-PyTorch reference in
:mod:`adacomp._reference`, any device). The environment variable ``ADACOMP_BACKEND``
forces one. For fp32 input all backends give bit-identical results.
"""

from __future__ import annotations

import os
import warnings

import torch

from . import _reference

BACKENDS = ("cuda", "cpp", "numba", "torch")

try:  # importing the extension registers the C++ (and CUDA) kernels
    from . import _C  # noqa: F401

    HAS_EXTENSION = True
    _EXTENSION_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the build
    HAS_EXTENSION = False
    _EXTENSION_ERROR = exc


def _has_numba() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def extension_has_cuda() -> bool:
    """Whether the built extension carries the CUDA kernels."""
    if not HAS_EXTENSION:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("adacomp::select", "CUDA")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device``, fastest first."""
    device = torch.device(device)
    found = []
    if device.type == "cuda":
        if extension_has_cuda():
            found.append("cuda")
    elif device.type == "cpu":
        if HAS_EXTENSION:
            found.append("cpp")
        if _has_numba():
            found.append("numba")
    found.append("torch")
    return found


def backend(device: torch.device | str = "cpu") -> str:
    """The backend used for tensors on ``device`` (``ADACOMP_BACKEND`` overrides)."""
    forced = os.environ.get("ADACOMP_BACKEND")
    avail = available_backends(device)
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"ADACOMP_BACKEND={forced!r}: choose one of {', '.join(BACKENDS)}")
        if forced not in avail:
            hint = ""
            if forced in ("cpp", "cuda") and not HAS_EXTENSION:
                hint = f" (the extension adacomp._C is not built: {_EXTENSION_ERROR})"
            raise RuntimeError(
                f"ADACOMP_BACKEND={forced!r} is not available for {torch.device(device)} "
                f"tensors{hint}; available: {', '.join(avail)}"
            )
        return forced
    if not HAS_EXTENSION and torch.device(device).type == "cpu" and not _warned[0]:
        _warned[0] = True
        warnings.warn(
            f"adacomp: native extension not built ({_EXTENSION_ERROR}); using the "
            f"{avail[0]} backend. Reinstall with `pip install --no-build-isolation -e .`.",
            stacklevel=2,
        )
    return avail[0]


def has_bucket_ops(device: torch.device | str) -> bool:
    """Whether tensors on ``device`` take the extension's per-bucket ops
    (``adacomp::compress_bucket`` / ``decode_bucket_``): the C++ backend on CPU, the CUDA
    backend on CUDA."""
    return backend(device) in ("cpp", "cuda")


_warned = [False]


def cpu_isa() -> str | None:
    """The vector version of the C++ selection kernel on this CPU: ``"avx2"`` or
    ``"generic"`` (capped by the environment variable ``ADACOMP_CPU_ISA``, read once per
    process), or None without the native extension. Both give the same bits."""
    return torch.ops.adacomp.cpu_isa() if HAS_EXTENSION else None


if HAS_EXTENSION:

    @torch.library.register_fake("adacomp::select")
    def _select_fake(grad, residue, residue_out, bin_size, scale_mode, value_mode):
        n = grad.numel()
        nb = -(-n // bin_size) if n else 0
        if grad.device.type == "cuda":
            cap = n
        else:
            cap = torch.library.get_ctx().new_dynamic_size()
        return (
            grad.new_empty((nb,), dtype=torch.int32),
            grad.new_empty((cap,), dtype=torch.int32),
            grad.new_empty((cap,), dtype=torch.float32),
            grad.new_empty((1,), dtype=torch.float32),
            grad.new_empty((2,), dtype=torch.int64),
        )

    @torch.library.register_fake("adacomp::encode_body")
    def _encode_body_fake(counts, offsets, values, offset_width, kind):
        return counts.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.uint8)

    @torch.library.register_fake("adacomp::decompress_sum_")
    def _decompress_sum_fake(out, data, meta):
        return None


def select(grad, residue, residue_out, bin_size: int, scale_mode: int, value_mode: int):
    """Run the selection on flat fp32 tensors with the backend in use for their device.

    Returns ``(counts, offsets, values, scale, info)`` with exact sizes (``n_sent``
    elements in offsets/values); ``residue_out`` receives the new residue.
    """
    which = backend(grad.device)
    if which in ("cpp", "cuda"):
        counts, offsets, values, scale, info = torch.ops.adacomp.select(
            grad, residue, residue_out, bin_size, scale_mode, value_mode
        )
        if which == "cuda":  # capacity-sized outputs; one sync here, outside the kernel
            k = int(info[0])
            offsets, values = offsets[:k], values[:k]
        return counts, offsets, values, scale, info
    if which == "numba":
        from . import _numba

        return _numba.select(grad, residue, residue_out, bin_size, scale_mode, value_mode)
    residue_new, counts, offsets, values, scale, info = _reference.select(
        grad, residue, bin_size, scale_mode, value_mode
    )
    residue_out.copy_(residue_new)
    return counts, offsets, values, scale, info


def encode_body(counts: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor,
                offset_width: int, kind: int) -> torch.Tensor:
    """The payload body of one selection result (:func:`adacomp.payload.reference_encode_body`
    defines it) with the backend in use for its device: one pass in C++ or numba on CPU,
    PyTorch ops on CUDA. Returns a 1-D uint8 tensor on the same device."""
    which = backend(counts.device)
    if which == "cpp":
        return torch.ops.adacomp.encode_body(counts.to(torch.int32), offsets.to(torch.int32),
                                             values.to(torch.float32), offset_width, kind)
    if which == "numba":
        from . import _numba

        return _numba.encode_body(counts, offsets, values, offset_width, kind)
    from . import payload

    return payload.reference_encode_body(counts, offsets, values, offset_width, kind)


def decompress_sum_(out: torch.Tensor, data: list[torch.Tensor], meta: list[int]) -> None:
    """Validate all payload bodies, then add them into flat fp32 ``out`` in order."""
    which = backend(out.device)
    if which in ("cpp", "cuda"):
        torch.ops.adacomp.decompress_sum_(out, data, meta)
    elif which == "numba":
        from . import _numba

        _numba.decompress_sum_(out, data, meta)
    else:
        from . import payload

        payload.reference_decompress_sum_(out, data, meta)

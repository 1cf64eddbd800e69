"""The AdaComp wire format: the one module that encodes and decodes payloads.

A payload is the bytes one worker sends for one tensor in one step. Layout, version 1
(all multi-byte numbers little-endian; bit streams LSB-first within each byte)::

    offset  size      field
    0       2         magic b"AC"
    2       1         format version (1)
    3       1         flags: bit 0 = non-finite gradient, bits 1-2 = value kind
                      (0 ternary, 1 fp16, 2 fp32, 3 dense fp32), bits 3-7 zero
    4       1         ndim (0..32)
    5       varints   the ndim sizes of the original shape, then bin_size, then n_sent
                      (unsigned LEB128, at most 9 bytes each, no redundant zero bytes)
    ...     4         scale (fp32), ternary kind only
    ...     body

The body (empty when the non-finite flag is set: such a payload decodes to all NaN):

* count stream, ``n_bins + n_sent`` bits: each bin's number of sent elements in unary
  (that many 1-bits, then one 0-bit), padded with 0-bits to a whole byte;
* entry stream, ``n_sent * field_bits`` bits: per sent element in flat order, its offset
  inside its bin (``w = ceil(log2(bin_size))`` bits) and, ternary kind only, one sign bit
  above it (1 = negative), padded with 0-bits to a whole byte;
* value stream (fp16 / fp32 kinds): the ``n_sent`` values.

Dense kind: the body is the ``numel`` fp32 values (no count or entry stream).

So a ternary element costs ``w + 1`` bits plus one bit of count stream, and each bin one
more bit: 8 bits for bin size 50, 11 bits for bin size 500, against 32 dense. The
decoder checks everything it reads (magic, version, flags, sizes, exact length, unary
counts against bin lengths, offsets inside their bin and strictly increasing, zero
padding, finite values) and raises :class:`ValueError` naming the problem. The native
decoders (``csrc/decode.h``, the numba kernel) walk the body the same way and are
tested against :func:`reference_decompress_sum_` here.
"""

from __future__ import annotations

import math
import struct
import sys
from dataclasses import dataclass

import torch

MAGIC = b"AC"
VERSION = 1
KIND_TERNARY, KIND_FP16, KIND_FP32, KIND_DENSE = 0, 1, 2, 3
KIND_NAMES = {KIND_TERNARY: "ternary", KIND_FP16: "fp16", KIND_FP32: "fp32", KIND_DENSE: "dense"}
MAX_NDIM = 32
MAX_VARINT_BYTES = 9  # 63 bits
MAX_NUMEL = 1 << 48
MAX_BIN_SIZE = (1 << 31) - 1
MAX_HEADER_BYTES = 5 + (MAX_NDIM + 2) * MAX_VARINT_BYTES + 4
META_PER_PAYLOAD = 8

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("adacomp payloads assume a little-endian host")


def _put_varint(out: bytearray, value: int) -> None:
    if value < 0:
        raise ValueError(f"cannot encode negative size {value}")
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def _get_varint(buf, pos: int, what: str) -> tuple[int, int]:
    value = 0
    for i in range(MAX_VARINT_BYTES):
        if pos + i >= len(buf):
            raise ValueError(f"adacomp payload truncated inside the header field {what}")
        byte = buf[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise ValueError(f"adacomp payload header field {what} has a redundant zero byte")
            return value, pos + i + 1
    raise ValueError(f"adacomp payload header field {what} is longer than {MAX_VARINT_BYTES} bytes")


def offset_width(bin_size: int) -> int:
    """Bits needed for an offset inside a bin: ceil(log2(bin_size))."""
    return (bin_size - 1).bit_length()


@dataclass(frozen=True)
class Header:
    """A parsed, validated payload header and the body layout it implies."""

    shape: tuple[int, ...]
    bin_size: int
    n_sent: int
    kind: int
    nonfinite: bool
    scale: float
    header_bytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_bins(self) -> int:
        return -(-self.numel // self.bin_size) if self.numel else 0

    @property
    def width(self) -> int:
        return offset_width(self.bin_size)

    @property
    def field_bits(self) -> int:
        return self.width + (1 if self.kind == KIND_TERNARY else 0)

    @property
    def body_bytes(self) -> int:
        if self.nonfinite:
            return 0
        if self.kind == KIND_DENSE:
            return 4 * self.numel
        count = (self.n_bins + self.n_sent + 7) // 8
        entry = (self.n_sent * self.field_bits + 7) // 8
        value = {KIND_FP16: 2, KIND_FP32: 4}.get(self.kind, 0) * self.n_sent
        return count + entry + value

    @property
    def total_bytes(self) -> int:
        return self.header_bytes + self.body_bytes

    def meta(self) -> list[int]:
        """The 8 integers the native decoders take for this payload."""
        scale_bits = struct.unpack("<I", struct.pack("<f", self.scale))[0]
        return [self.header_bytes, self.numel, self.bin_size, self.n_sent, self.kind,
                int(self.nonfinite), scale_bits, 0]


def encode_header(shape, bin_size: int, n_sent: int, kind: int, nonfinite: bool,
                  scale: float) -> bytes:
    if len(shape) > MAX_NDIM:
        raise ValueError(f"tensors of more than {MAX_NDIM} dimensions are not supported")
    out = bytearray(MAGIC)
    out.append(VERSION)
    out.append((1 if nonfinite else 0) | (kind << 1))
    out.append(len(shape))
    for s in shape:
        _put_varint(out, int(s))
    _put_varint(out, int(bin_size))
    _put_varint(out, int(n_sent))
    if kind == KIND_TERNARY:
        out += struct.pack("<f", scale)
    return bytes(out)


def check_claim(shape, expected=None, max_numel: int | None = None) -> None:
    """Raise ``ValueError`` if a payload's claimed ``shape`` is not the ``expected`` one or
    holds more than ``max_numel`` elements (what the receiver will allocate for it)."""
    shape = tuple(shape)
    if expected is not None and shape != tuple(int(x) for x in expected):
        raise ValueError(f"adacomp payload claims shape {shape}, the receiver expects "
                         f"{tuple(int(x) for x in expected)}")
    numel = math.prod(shape)
    if max_numel is not None and numel > max_numel:
        raise ValueError(f"adacomp payload claims {numel} elements, more than the {max_numel} the "
                         "receiver accepts (pass max_numel= or shape= to decode larger tensors)")


def parse_header(buf, total_len: int | None = None, *, shape=None, max_numel: int | None = None) -> Header:
    """Parse and validate a header from a bytes-like object (or its first bytes).

    ``total_len`` is the full payload length; it must equal what the header implies.
    ``shape``: the shape the receiver expects (the claimed shape must equal it);
    ``max_numel``: the most elements the receiver accepts. Both bound what a decoder
    allocates for a payload from the wire; a larger claim raises ``ValueError``.
    """
    n = len(buf)
    if n < 5:
        raise ValueError(f"adacomp payload truncated: {n} bytes, a header needs at least 5")
    if bytes(buf[0:2]) != MAGIC:
        raise ValueError(f"not an adacomp payload: magic {bytes(buf[0:2])!r}, expected {MAGIC!r}")
    if buf[2] != VERSION:
        raise ValueError(f"adacomp payload format version {buf[2]} is not supported "
                         f"(this build reads version {VERSION})")
    flags = buf[3]
    if flags & ~0x07:
        raise ValueError(f"adacomp payload has unknown flag bits set: {flags:#04x}")
    nonfinite = bool(flags & 1)
    kind = (flags >> 1) & 3
    ndim = buf[4]
    if ndim > MAX_NDIM:
        raise ValueError(f"adacomp payload claims {ndim} dimensions (at most {MAX_NDIM})")
    expected = shape
    pos = 5
    shape = []
    for i in range(ndim):
        s, pos = _get_varint(buf, pos, f"shape[{i}]")
        shape.append(s)
    bin_size, pos = _get_varint(buf, pos, "bin_size")
    n_sent, pos = _get_varint(buf, pos, "n_sent")
    numel = math.prod(shape)
    if numel > MAX_NUMEL:
        raise ValueError(f"adacomp payload claims {numel} elements (at most {MAX_NUMEL})")
    check_claim(shape, expected, max_numel)
    if bin_size < 1 or bin_size > max(numel, 1) or bin_size > MAX_BIN_SIZE:
        raise ValueError(f"adacomp payload has bin_size {bin_size} for {numel} elements "
                         f"(must be between 1 and the element count)")
    if n_sent > numel:
        raise ValueError(f"adacomp payload claims {n_sent} sent elements of {numel}")
    if (nonfinite or kind == KIND_DENSE) and n_sent != 0:
        raise ValueError("adacomp payload: a non-finite or dense payload must have n_sent = 0")
    scale = 0.0
    if kind == KIND_TERNARY:
        if pos + 4 > n:
            raise ValueError("adacomp payload truncated inside the header field scale")
        (scale,) = struct.unpack("<f", bytes(buf[pos:pos + 4]))
        pos += 4
        if not nonfinite and n_sent and not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"adacomp payload has invalid scale {scale} for sent elements")
    header = Header(tuple(shape), bin_size, n_sent, kind, nonfinite, scale, pos)
    if total_len is not None and total_len != header.total_bytes:
        what = "truncated" if total_len < header.total_bytes else "oversized"
        raise ValueError(f"adacomp payload {what}: {total_len} bytes, its header implies "
                         f"{header.total_bytes}")
    return header


class Payload:
    """What one worker sends for one tensor in one step: validated bytes.

    ``payload.tensor`` is a 1-D uint8 tensor (on the compressor's device) to hand to a
    collective; ``bytes(payload)`` and :meth:`from_bytes` convert to and from ``bytes``.
    """

    __slots__ = ("tensor", "header")

    def __init__(self, tensor: torch.Tensor, header: Header | None = None, *, shape=None,
                 max_numel: int | None = None):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8 or tensor.dim() != 1:
            raise ValueError("a Payload wraps a 1-D uint8 tensor")
        if header is None:
            head = tensor[:MAX_HEADER_BYTES]
            head = head.cpu() if head.device.type != "cpu" else head
            header = parse_header(head.numpy().tobytes(), tensor.numel(), shape=shape, max_numel=max_numel)
        self.tensor = tensor
        self.header = header

    @classmethod
    def from_bytes(cls, data, *, shape=None, max_numel: int | None = None) -> Payload:
        """Parse (and validate the header and length of) a payload from bytes.

        ``shape`` (the shape the receiver expects) or ``max_numel`` (the most elements it
        accepts) bound what decoding the payload allocates: a payload from the wire claiming
        more raises ``ValueError`` here, before anything is allocated. Give one of them for
        bytes you did not produce."""
        data = bytes(data)
        header = parse_header(data, len(data), shape=shape, max_numel=max_numel)
        t = torch.empty(0, dtype=torch.uint8)
        if data:
            t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return cls(t, header)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, *, shape=None, max_numel: int | None = None) -> Payload:
        """Wrap a received uint8 tensor (exactly one payload long), validating its header
        (``shape`` / ``max_numel``: as :meth:`from_bytes`)."""
        return cls(tensor, shape=shape, max_numel=max_numel)

    def __bytes__(self) -> bytes:
        return self.tensor.cpu().numpy().tobytes()

    @property
    def nbytes(self) -> int:
        return self.tensor.numel()

    @property
    def shape(self) -> tuple[int, ...]:
        return self.header.shape

    @property
    def n_sent(self) -> int:
        return self.header.n_sent

    @property
    def nonfinite(self) -> bool:
        return self.header.nonfinite

    @property
    def kind(self) -> str:
        return KIND_NAMES[self.header.kind]

    def __repr__(self) -> str:
        h = self.header
        return (f"Payload(shape={h.shape}, kind={self.kind}, bin_size={h.bin_size}, "
                f"n_sent={h.n_sent}, nbytes={self.nbytes}, nonfinite={h.nonfinite})")


# ----------------------------------------------------------------------------- encoding

_BIT_WEIGHTS = {}


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """uint8 0/1 tensor -> bytes, LSB-first, zero-padded to a whole byte."""
    n = bits.numel()
    pad = (-n) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    dev = bits.device
    w = _BIT_WEIGHTS.get(dev)
    if w is None:
        w = _BIT_WEIGHTS[dev] = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=dev)
    return (bits.view(-1, 8) * w).sum(dim=1, dtype=torch.uint8)


def _unpack_bits(data: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=data.device)
    return ((data.unsqueeze(1) >> shifts) & 1).reshape(-1)


def reference_encode_body(counts: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor,
                          offset_width: int, kind: int) -> torch.Tensor:
    """The body of a payload (count stream, entry stream, value stream) from a selection
    result, built from PyTorch ops on the selection's device: the definition that the
    native encoders (``csrc/cpu/encode_kernel.cpp``, the numba kernel) match byte for byte.

    ``counts``: int32/int64 ``[n_bins]``; ``offsets``: ``[n_sent]``, each inside its bin;
    ``values``: fp32 ``[n_sent]``; ``offset_width``: bits per offset; ``kind``: ternary,
    fp16 or fp32. Returns a 1-D uint8 tensor."""
    device = counts.device
    k = offsets.numel()
    nb = counts.numel()
    count_bits = torch.ones(nb + k, dtype=torch.uint8, device=device)
    if nb:
        ends = torch.cumsum(counts, 0, dtype=torch.int64) + torch.arange(nb, device=device)
        count_bits[ends] = 0
    parts = [_pack_bits(count_bits)]
    w = offset_width
    fbits = w + (1 if kind == KIND_TERNARY else 0)
    if k and fbits:
        field = offsets.to(torch.int64)
        if kind == KIND_TERNARY:
            field = field | ((values < 0).to(torch.int64) << w)
        shifts = torch.arange(fbits, dtype=torch.int64, device=device)
        parts.append(_pack_bits(((field.unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)))
    if kind == KIND_FP16:
        parts.append(values.to(torch.float16).view(torch.uint8))
    elif kind == KIND_FP32:
        parts.append(values.to(torch.float32).contiguous().view(torch.uint8))
    return torch.cat(parts)


def encode(shape, bin_size: int, counts: torch.Tensor, offsets: torch.Tensor,
           values: torch.Tensor, scale: float, kind: int) -> Payload:
    """Encode a (finite) selection result as a payload on the selection's device (the body
    by the backend's encoder, :func:`adacomp.ops.encode_body`)."""
    from . import ops

    device = counts.device
    k = offsets.numel()
    head = encode_header(shape, bin_size, k, kind, False, scale)
    body = ops.encode_body(counts, offsets, values, offset_width(bin_size), kind)
    data = torch.cat([torch.frombuffer(bytearray(head), dtype=torch.uint8).to(device), body])
    return Payload(data, parse_header(head, data.numel()))


def shard_bounds(numel: int, bin_size: int, shards: int) -> list[tuple[int, int]]:
    """Split ``numel`` elements into ``shards`` contiguous ranges on bin boundaries.

    Shard ``s`` holds bins ``[s * nb // shards, (s + 1) * nb // shards)`` of the ``nb`` bins,
    so every bin (and so every selection decision) lies inside one shard; shards differ
    by at most one bin, and some are empty when there are fewer bins than shards.
    """
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    L = max(1, min(int(bin_size), numel)) if numel else 1
    nb = -(-numel // L) if numel else 0
    edges = [min(numel, (s * nb // shards) * L) for s in range(shards + 1)]
    edges[-1] = numel
    return [(edges[s], edges[s + 1]) for s in range(shards)]


def shard_bin_size(bin_size: int, start: int, end: int) -> int:
    """The bin size a shard's payload declares: ``bin_size`` clamped to the shard length
    (a shard shorter than one bin is the tensor's last, partial bin; empty shards say 1)."""
    return max(1, min(int(bin_size), end - start))


def encode_split(numel: int, bin_size: int, counts: torch.Tensor, offsets: torch.Tensor,
                 values: torch.Tensor, scale: float, kind: int,
                 bounds: list[tuple[int, int]]) -> list[Payload]:
    """Encode one selection result as one payload per shard ``bounds`` (bin-aligned, from
    :func:`shard_bounds`). Each payload is that of a 1-D tensor of the shard's length with
    the tensor's scale, so ``decompress_sum`` of a shard payload into ``out[start:end]``
    adds exactly what the unsplit payload adds there."""
    L = max(1, min(int(bin_size), numel)) if numel else 1
    # Entries before each shard's first bin: the counts' prefix sums at the shard edges only
    # (one small host read, not one per bin).
    edges = sorted({-(-x // L) for se in bounds for x in se})
    at = {0: 0}
    if counts.numel() and edges:
        idx = torch.tensor([max(e, 1) - 1 for e in edges], dtype=torch.int64, device=counts.device)
        sums = torch.cumsum(counts.to(torch.int64), 0)[idx].tolist()
        at.update({e: (v if e else 0) for e, v in zip(edges, sums)})
    out = []
    for start, end in bounds:
        b0, b1 = -(-start // L), -(-end // L)
        e0, e1 = at[b0], at[b1]
        out.append(encode((end - start,), shard_bin_size(L, start, end), counts[b0:b1],
                          offsets[e0:e1], values[e0:e1], scale, kind))
    return out


def encode_dense(values: torch.Tensor) -> Payload:
    """A dense payload (fp32 values), for tensors the compressor does not select on."""
    shape = tuple(values.shape)
    flat = values.detach().reshape(-1).to(torch.float32)
    nonfinite = not bool(torch.isfinite(flat).all())
    head = encode_header(shape, 1, 0, KIND_DENSE, nonfinite, 0.0)
    parts = [torch.frombuffer(bytearray(head), dtype=torch.uint8).to(flat.device)]
    if not nonfinite:
        parts.append(flat.contiguous().view(torch.uint8))
    data = torch.cat(parts)
    return Payload(data, parse_header(head, data.numel()))


def encode_nonfinite(shape, bin_size: int, kind: int, device=None) -> Payload:
    """The payload of a step whose gradient held NaN/Inf: a header only, decodes to NaN."""
    head = encode_header(shape, bin_size, 0, kind, True, float("nan"))
    data = torch.frombuffer(bytearray(head), dtype=torch.uint8).to(device or "cpu")
    return Payload(data, parse_header(head, data.numel()))


# ----------------------------------------------------------------------------- decoding

def reference_decompress_sum_(out: torch.Tensor, data: list[torch.Tensor], meta: list[int]) -> None:
    """Pure-PyTorch body decoder: validates every body, then adds them in order.

    Same contract as the native ``adacomp::decompress_sum_`` op (``csrc/decode.h``).
    """
    decoded = []
    for p, t in enumerate(data):
        m = meta[p * META_PER_PAYLOAD:(p + 1) * META_PER_PAYLOAD]
        decoded.append(_reference_decode_body(p, t, *m[:7], out.numel()))
    for d in decoded:
        if d is None:
            out.fill_(float("nan"))
        elif isinstance(d, torch.Tensor):
            out.add_(d)
        else:
            idx, vals = d
            out[idx] += vals


def _bad(p: int, msg: str):
    return ValueError(f"adacomp payload {p} is malformed: {msg}")


def _reference_decode_body(p, t, body_offset, numel, bin_size, n_sent, kind, nonfinite,
                           scale_bits, out_numel):
    if numel != out_numel:
        raise ValueError(f"adacomp::decompress_sum_: payload {p} holds {numel} elements but "
                         f"out has {out_numel}")
    if nonfinite:
        return None
    body = t[body_offset:]
    if kind == KIND_DENSE:
        if body.numel() != 4 * numel:
            raise _bad(p, "payload length differs from the length its header implies")
        vals = body.clone().view(torch.float32)  # clone: realign to 4 bytes
        if not bool(torch.isfinite(vals).all()):
            raise _bad(p, "a stored value is not finite but the non-finite flag is clear")
        return vals
    device = t.device
    L = bin_size
    nb = -(-numel // L) if numel else 0
    w = offset_width(L)
    fbits = w + (1 if kind == KIND_TERNARY else 0)
    count_bytes = (nb + n_sent + 7) // 8
    entry_bytes = (n_sent * fbits + 7) // 8
    value_bytes = {KIND_FP16: 2, KIND_FP32: 4}.get(kind, 0) * n_sent
    if body.numel() != count_bytes + entry_bytes + value_bytes:
        raise _bad(p, "payload length differs from the length its header implies")
    cbits = _unpack_bits(body[:count_bytes])
    nbits = nb + n_sent
    if bool(cbits[nbits:].any()):
        raise _bad(p, "non-zero padding bits after the count stream")
    zeros = (cbits[:nbits] == 0).nonzero().squeeze(1)
    if zeros.numel() != nb or (nb and int(zeros[-1]) != nbits - 1):
        raise _bad(p, "bin counts do not add up to the header's n_sent")
    counts = torch.diff(zeros, prepend=torch.tensor([-1], device=device)) - 1
    lens = torch.full((nb,), L, dtype=torch.int64, device=device)
    if nb:
        lens[-1] = numel - (nb - 1) * L
    if bool((counts > lens).any()):
        raise _bad(p, "a bin claims more sent elements than it holds")
    ebits = _unpack_bits(body[count_bytes:count_bytes + entry_bytes])
    if bool(ebits[n_sent * fbits:].any()):
        raise _bad(p, "non-zero padding bits after the entry stream")
    if fbits:
        weights = (1 << torch.arange(fbits, dtype=torch.int64, device=device))
        fields = (ebits[:n_sent * fbits].view(n_sent, fbits).to(torch.int64) * weights).sum(1)
    else:
        fields = torch.zeros(n_sent, dtype=torch.int64, device=device)
    offs = fields & ((1 << w) - 1)
    bins = torch.repeat_interleave(torch.arange(nb, device=device), counts)
    if bool((offs >= lens[bins]).any()):
        raise _bad(p, "an element offset lies outside its bin")
    if n_sent > 1:
        same = bins[1:] == bins[:-1]
        if bool((same & (offs[1:] <= offs[:-1])).any()):
            raise _bad(p, "element offsets within a bin are not strictly increasing")
    vstart = count_bytes + entry_bytes
    if kind == KIND_TERNARY:
        scale = struct.unpack("<f", struct.pack("<I", scale_bits))[0]
        s = torch.tensor(scale, dtype=torch.float32, device=device)
        vals = torch.where((fields >> w) != 0, -s, s)
    elif kind == KIND_FP16:
        vals = body[vstart:vstart + 2 * n_sent].clone().view(torch.float16).to(torch.float32)
    else:
        vals = body[vstart:vstart + 4 * n_sent].clone().view(torch.float32)
    if kind != KIND_TERNARY and not bool(torch.isfinite(vals).all()):
        raise _bad(p, "a stored value is not finite but the non-finite flag is clear")
    return bins * L + offs, vals


# ----------------------------------------------------------------------------- buckets

class BucketPayloads:
    """Every payload of one bucket (``T`` tensors, each in ``pieces`` bin-aligned pieces)
    in one contiguous uint8 buffer, piece-major: piece 0 of every tensor, then piece 1, ...

    ``sizes``: int64 ``[pieces, T]`` bytes per payload (on the host), and ``size_rows`` the
    same as lists; ``nonfinite`` and ``zero``: per tensor, whether its gradient held
    NaN/Inf, and whether it was all zero.
    """

    __slots__ = ("data", "sizes", "size_rows", "nonfinite", "zero", "_starts")

    def __init__(self, data: torch.Tensor, sizes: torch.Tensor, nonfinite: list[bool], zero: list[bool]):
        self.data = data
        self.sizes = sizes
        self.size_rows = sizes.tolist()
        self.nonfinite = nonfinite
        self.zero = zero
        pos, self._starts = 0, []
        for row in self.size_rows:
            self._starts.append([])
            for x in row:
                self._starts[-1].append(pos)
                pos += x

    @classmethod
    def from_payloads(cls, per_tensor: list[list[Payload]], zero: list[bool]) -> BucketPayloads:
        """From per-tensor payload lists (all of one length): what the native op builds."""
        pieces = len(per_tensor[0]) if per_tensor else 1
        parts = [per_tensor[t][s].tensor for s in range(pieces) for t in range(len(per_tensor))]
        device = parts[0].device if parts else torch.device("cpu")
        data = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=device)
        sizes = torch.tensor([[per_tensor[t][s].nbytes for t in range(len(per_tensor))]
                              for s in range(pieces)], dtype=torch.int64).reshape(pieces, len(per_tensor))
        return cls(data, sizes, [ps[0].nonfinite for ps in per_tensor], zero)

    @property
    def pieces(self) -> int:
        return self.sizes.shape[0]

    def piece(self, t: int, s: int = 0) -> torch.Tensor:
        """The bytes of tensor ``t``'s piece ``s`` (a view)."""
        start = self._starts[s][t]
        return self.data[start:start + self.size_rows[s][t]]

    def select(self, tensors: list[int], pieces=None) -> torch.Tensor:
        """The bytes of ``tensors``' payloads, piece-major (of ``pieces``, default all): a
        view of the buffer when that is all of it, else a copy."""
        T = self.sizes.shape[1]
        pieces = range(self.pieces) if pieces is None else list(pieces)
        if list(tensors) == list(range(T)):
            if len(pieces) == self.pieces:
                return self.data
            if len(pieces) == 1:
                s = pieces[0]
                start = self._starts[s][0] if T else 0
                return self.data[start:start + sum(self.size_rows[s])]
        parts = [self.piece(t, s) for s in pieces for t in tensors]
        if not parts:
            return self.data[:0]
        return torch.cat(parts)


def decode_bucket_(outs: list[torch.Tensor], rows: list[torch.Tensor], entries: list[tuple],
                   divisor: int = 1) -> None:
    """Decode a bucket's received payloads into ``outs`` with one call.

    ``outs``: contiguous fp32 tensors (read flat); ``rows``: 1-D uint8 tensors (one per
    sending rank); ``entries``: per payload ``(out, start, end, row, offset, nbytes,
    shape)``: its bytes are ``rows[row][offset:offset + nbytes]``, the receiver expects
    ``shape`` (``end - start`` elements), and consecutive entries with the same
    ``(out, start, end)`` are summed, in order, into ``outs[out].view(-1)[start:end]``
    (zeroed first; NaN if one of them carries the non-finite flag), and the sum divided by
    ``divisor`` (the average over ``divisor`` ranks; IEEE division, on every device). Ranges
    may not overlap.

    Every payload is validated first (the checks and messages of :func:`parse_header`
    with ``shape=`` and of :func:`decompress_sum`); on a ``ValueError`` no output is
    touched. On CPU and CUDA with the extension this is ``adacomp::decode_bucket_``
    (on CUDA: validation on the device, one host synchronisation for its verdict, and the
    CPU decoder's message, from a host copy, when it rejects); elsewhere the loop
    :func:`decode_bucket_loop_`.

    Raises:
        ValueError: a malformed payload, a payload of another shape than its entry expects,
            or (native op) an entry table whose ranges overlap or point outside the rows or
            outputs, or outputs that are not contiguous fp32 CPU tensors.

    Source: the wire format of this module (version 1); the summation order is that of
    docs/algorithm.md section 4 (rank order, so every rank gets the same bits).
    """
    from . import ops

    device = outs[0].device if outs else None
    if device is not None and all(t.device == device for t in (*outs, *rows)) and ops.has_bucket_ops(device):
        flat = []
        for o, s, e, r, off, nb, shape in entries:
            flat += [o, s, e, r, off, nb, len(shape), *shape]
        torch.ops.adacomp.decode_bucket_(outs, rows, flat, divisor)
        return
    decode_bucket_loop_(outs, rows, entries, divisor)


def decode_bucket_loop_(outs: list[torch.Tensor], rows: list[torch.Tensor], entries: list[tuple],
                        divisor: int = 1) -> None:
    """:func:`decode_bucket_` as a loop of :meth:`Payload.from_tensor` and
    :func:`decompress_sum` calls (with the backend in use): the definition the native op
    matches, message for message."""
    groups = []
    for e in entries:
        if groups and groups[-1][0] == e[:3]:
            groups[-1][1].append(e)
        else:
            groups.append((e[:3], [e]))
    done = []
    for (o, start, end), items in groups:
        plist = [Payload.from_tensor(rows[r][off:off + nb], shape=shape)
                 for _, _, _, r, off, nb, shape in items]
        tmp = torch.zeros(items[0][6], dtype=torch.float32, device=outs[o].device)
        decompress_sum(plist, tmp)
        if divisor != 1:  # a tensor divisor: CUDA divides (by a number it would multiply by 1/d)
            tmp.div_(torch.full((), float(divisor), dtype=torch.float32, device=tmp.device))
        done.append((o, start, end, tmp))
    for o, start, end, tmp in done:
        outs[o].view(-1)[start:end].copy_(tmp.reshape(-1))


# ----------------------------------------------------------------------------- public API

def _as_payload(p) -> Payload:
    if isinstance(p, Payload):
        return p
    if isinstance(p, torch.Tensor):
        return Payload.from_tensor(p)
    if isinstance(p, (bytes, bytearray, memoryview)):
        return Payload.from_bytes(p)
    raise TypeError(f"expected a Payload, bytes or uint8 tensor, got {type(p).__name__}")


def decompress_sum(payloads, out: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """Add the decoded ``payloads`` into ``out`` (fp32, the payloads' shape), in order.

    Every payload is validated before ``out`` is touched. Returns ``out``.
    """
    from . import ops

    what = f" for parameter {name!r}" if name else ""
    if out.dtype != torch.float32:
        raise ValueError(f"decompress_sum{what}: out must be fp32, got {out.dtype}")
    if not out.is_contiguous():
        raise ValueError(f"decompress_sum{what}: out must be contiguous")
    plist = [_as_payload(p) for p in payloads]
    meta = []
    data = []
    for i, p in enumerate(plist):
        if tuple(p.shape) != tuple(out.shape):
            raise ValueError(f"decompress_sum{what}: payload {i} has shape {tuple(p.shape)} but "
                             f"out has shape {tuple(out.shape)}")
        t = p.tensor
        if t.device != out.device:
            t = t.to(out.device)
        data.append(t)
        meta += p.header.meta()
    if plist:
        ops.decompress_sum_(out.view(-1), data, meta)
    return out


#: What :func:`decompress` allocates at most unless told otherwise (256 MiB of fp32).
DEFAULT_MAX_DECODE_NUMEL = 1 << 26


def decompress(payload, *, shape=None, max_numel: int | None = None) -> torch.Tensor:
    """Decode one payload (a :class:`Payload`, bytes or a uint8 tensor) to a dense fp32
    tensor of its original shape.

    The output's size comes from the payload's header, so for bytes from the wire give the
    ``shape`` you expect or a ``max_numel``; without either, at most
    :data:`DEFAULT_MAX_DECODE_NUMEL` elements (2^26, 256 MiB) are decoded. Raises
    ``ValueError`` for a malformed payload or a larger claim (before allocating anything).
    """
    if max_numel is None and shape is None:
        max_numel = DEFAULT_MAX_DECODE_NUMEL
    p = _as_payload(payload)
    check_claim(p.shape, shape, max_numel)
    out = torch.zeros(p.shape, dtype=torch.float32, device=p.tensor.device)
    return decompress_sum([p], out)

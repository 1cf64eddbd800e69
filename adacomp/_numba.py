"""numba backend: the CPU selection and decoder when the C++ extension is not built.

Same computation as :mod:`adacomp._reference` and ``csrc/cpu/select_kernel.cpp``, bit for
bit for fp32 input: chunks of whole bins are processed in parallel (``prange``), each
streaming its bins once; sent positions are written into the chunk's own region of a
scratch buffer and compacted afterwards; the ternary scale comes from per-chunk integer
exponent histograms (see ``_reference.exact_mean``), so it does not depend on threads.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import njit, prange

from ._reference import FP16_MAX, HIST_SIZE
from .payload import META_PER_PAYLOAD

CHUNK_ELEMS = 1 << 16


@njit(cache=True, inline="always")
def _split_term(v):
    bits = np.int64(np.float32(v).view(np.int32))
    biased = bits >> 23
    mant = bits & 0x7FFFFF
    if biased > 0:
        mant |= 0x800000
        slot = biased
    else:
        slot = 1
    return slot, mant


@njit(cache=True)
def _combine(hist, count):
    if count == 0:
        return np.float32(0.0)
    acc = 0.0
    for e in range(HIST_SIZE - 1, 0, -1):
        if hist[e] != 0:
            acc += float(hist[e]) * math.ldexp(1.0, e - 150)
    return np.float32(acc / float(count))


@njit(cache=True)
def _float_to_half_bits(f):
    # Round to nearest even, as csrc/common.h float_to_half_bits (numba has no float16).
    x = np.int64(np.float32(f).view(np.uint32))
    sign = (x >> 16) & 0x8000
    ax = x & 0x7FFFFFFF
    if ax >= 0x7F800000:
        return sign | (0x7E00 if ax > 0x7F800000 else 0x7C00)
    if ax >= 0x477FF000:
        return sign | 0x7C00
    if ax < 0x38800000:
        if ax < 0x33000000:
            return sign
        e = ax >> 23
        m = (ax & 0x7FFFFF) | 0x800000
        shift = 126 - e
        q = m >> shift
        rem = m & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        if rem > half or (rem == half and (q & 1)):
            q += 1
        return sign | q
    e = (ax >> 23) - 112
    m = ax & 0x7FFFFF
    q = (e << 10) | (m >> 13)
    rem = m & 0x1FFF
    if rem > 0x1000 or (rem == 0x1000 and (q & 1)):
        q += 1
    return sign | q


@njit(cache=True)
def _half_bits_to_float(h):
    sign = (np.int64(h) & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0x1F:
        return np.uint32(sign | 0x7F800000 | (m << 13)).view(np.float32)
    if e == 0:
        v = np.float32(m) * np.float32(1.0 / 16777216.0)
        return -v if sign else v
    return np.uint32(sign | ((e + 112) << 23) | (m << 13)).view(np.float32)


@njit(cache=True)
def _round_value(g, value_mode):
    if value_mode == 2:
        return g
    c = min(max(g, np.float32(-FP16_MAX)), np.float32(FP16_MAX))
    return _half_bits_to_float(_float_to_half_bits(c))


@njit(parallel=True, cache=True)
def _select_kernel(d, r, ro, L, scale_mode, value_mode):
    n = d.shape[0]
    nb = (n + L - 1) // L if n > 0 else 0
    bins_per_chunk = max(1, CHUNK_ELEMS // L)
    n_chunks = (nb + bins_per_chunk - 1) // bins_per_chunk
    counts = np.empty(nb, np.int32)
    scratch_idx = np.empty(n, np.int64)
    scratch_g = np.empty(n, np.float32)
    chunk_k = np.zeros(n_chunks, np.int64)
    hist = np.zeros((n_chunks, HIST_SIZE), np.int64)
    hcount = np.zeros(n_chunks, np.int64)
    bad = np.zeros(n_chunks, np.uint8)
    ternary = value_mode == 0
    binmax = scale_mode == 0
    fmax = np.float32(3.4028234663852886e38)
    for c in prange(n_chunks):
        b0 = c * bins_per_chunk
        b1 = min(nb, b0 + bins_per_chunk)
        base = b0 * L
        k = 0
        nonfinite = False
        for b in range(b0, b1):
            s = b * L
            e = min(s + L, n)
            gmax = np.float32(0.0)
            for i in range(s, e):
                g = r[i] + d[i]
                ro[i] = g
                a = abs(g)
                if a > gmax:
                    gmax = a
                if not (a <= fmax):
                    nonfinite = True
            sent = 0
            if gmax > 0:
                for i in range(s, e):
                    g = ro[i]
                    h = g + d[i]
                    if abs(h) >= gmax and g != 0:
                        scratch_idx[base + k] = i
                        if ternary:
                            scratch_g[base + k] = g
                            if not binmax:
                                slot, m = _split_term(abs(g))
                                hist[c, slot] += m
                                hcount[c] += 1
                        else:
                            q = _round_value(g, value_mode)
                            scratch_g[base + k] = q
                            ro[i] = g - q
                        k += 1
                        sent += 1
            counts[b] = sent
            if ternary and binmax and sent > 0:
                slot, m = _split_term(gmax)
                hist[c, slot] += m
                hcount[c] += 1
        chunk_k[c] = k
        bad[c] = 1 if nonfinite else 0
    start = np.zeros(n_chunks + 1, np.int64)
    for c in range(n_chunks):
        start[c + 1] = start[c] + chunk_k[c]
    total = start[n_chunks]
    any_bad = False
    for c in range(n_chunks):
        if bad[c]:
            any_bad = True
    scale = np.float32(0.0)
    if ternary:
        tot = np.zeros(HIST_SIZE, np.int64)
        cnt = 0
        for c in range(n_chunks):
            cnt += hcount[c]
            for e in range(HIST_SIZE):
                tot[e] += hist[c, e]
        scale = np.float32(np.nan) if any_bad else _combine(tot, cnt)
    offsets = np.empty(total, np.int32)
    values = np.empty(total, np.float32)
    for c in prange(n_chunks):
        base = c * bins_per_chunk * L
        o = start[c]
        for j in range(chunk_k[c]):
            i = scratch_idx[base + j]
            offsets[o + j] = np.int32(i % L)
            if ternary:
                g = scratch_g[base + j]
                q = -scale if g < 0 else scale
                values[o + j] = q
                ro[i] = g - q
            else:
                values[o + j] = scratch_g[base + j]
    return counts, offsets, values, scale, total, any_bad


def select(grad, residue, residue_out, bin_size, scale_mode, value_mode):
    """numba selection on flat fp32 CPU tensors; same outputs as the other backends."""
    for t in (grad, residue, residue_out):
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError("numba select expects contiguous fp32 CPU tensors")
    if bin_size < 1:
        raise ValueError(f"bin_size must be >= 1, got {bin_size}")
    counts, offsets, values, scale, total, bad = _select_kernel(
        grad.numpy(), residue.numpy(), residue_out.numpy(), int(bin_size), int(scale_mode),
        int(value_mode))
    return (torch.from_numpy(counts), torch.from_numpy(offsets), torch.from_numpy(values),
            torch.tensor([scale], dtype=torch.float32),
            torch.tensor([int(total), int(bad)], dtype=torch.int64))


# ----------------------------------------------------------------------------- decoding
# Error codes match csrc/decode.h (DecodeError).
_MESSAGES = {
    1: "count stream ends inside a bin (truncated or corrupt counts)",
    2: "a bin claims more sent elements than it holds",
    3: "bin counts do not add up to the header's n_sent",
    4: "non-zero padding bits after the count stream",
    5: "an element offset lies outside its bin",
    6: "element offsets within a bin are not strictly increasing",
    7: "non-zero padding bits after the entry stream",
    8: "a stored value is not finite but the non-finite flag is clear",
    9: "payload length differs from the length its header implies",
}


@njit(cache=True)
def _get_bits(buf, pos, nbits):
    v = np.int64(0)
    for t in range(nbits):
        p = pos + t
        v |= np.int64((buf[p >> 3] >> (p & 7)) & 1) << t
    return v


@njit(cache=True)
def _walk(body, numel, L, n_sent, kind, scale, out, apply):
    if kind == 3:
        if body.shape[0] != 4 * numel:
            return 9
        vals = body.view(np.float32)
        for i in range(numel):
            v = vals[i]
            if not apply:
                if not np.isfinite(v):
                    return 8
            else:
                out[i] += v
        return 0
    nb = (numel + L - 1) // L if numel > 0 else 0
    w = 0
    while (1 << w) < L:
        w += 1
    fbits = w + (1 if kind == 0 else 0)
    count_bits = nb + n_sent
    count_bytes = (count_bits + 7) // 8
    entry_bytes = (n_sent * fbits + 7) // 8
    value_bytes = 2 * n_sent if kind == 1 else (4 * n_sent if kind == 2 else 0)
    if body.shape[0] != count_bytes + entry_bytes + value_bytes:
        return 9
    ebase = count_bytes * 8
    vstart = count_bytes + entry_bytes
    mask = (np.int64(1) << w) - 1
    cpos = 0
    epos = 0
    j = 0
    for b in range(nb):
        start = b * L
        blen = min(L, numel - start)
        c = 0
        while True:
            if cpos >= count_bits:
                return 1
            bit = (body[cpos >> 3] >> (cpos & 7)) & 1
            cpos += 1
            if bit == 0:
                break
            c += 1
        if c > blen:
            return 2
        if j + c > n_sent:
            return 3
        prev = -1
        for _ in range(c):
            f = _get_bits(body, ebase + epos, fbits)
            epos += fbits
            o = f & mask
            if o >= blen:
                return 5
            if o <= prev:
                return 6
            prev = o
            if kind == 0:
                v = -scale if (f >> w) != 0 else scale
            elif kind == 1:
                lo = np.int64(body[vstart + 2 * j])
                v = _half_bits_to_float(lo | (np.int64(body[vstart + 2 * j + 1]) << 8))
                if not np.isfinite(v):
                    return 8
            else:
                v = body[vstart + 4 * j:vstart + 4 * j + 4].copy().view(np.float32)[0]
                if not np.isfinite(v):
                    return 8
            if apply:
                out[start + o] += v
            j += 1
    if j != n_sent or cpos != count_bits:
        return 3
    for p in range(count_bits, count_bytes * 8):
        if (body[p >> 3] >> (p & 7)) & 1:
            return 4
    for p in range(n_sent * fbits, entry_bytes * 8):
        q = ebase + p
        if (body[q >> 3] >> (q & 7)) & 1:
            return 7
    return 0


def decompress_sum_(out: torch.Tensor, data: list[torch.Tensor], meta: list[int]) -> None:
    """numba body decoder: validates every payload, then adds them into ``out`` in order."""
    o = out.numpy()
    for apply in (False, True):
        for p, t in enumerate(data):
            m = meta[p * META_PER_PAYLOAD:(p + 1) * META_PER_PAYLOAD]
            body_offset, numel, L, n_sent, kind, nonfinite, scale_bits = m[:7]
            if numel != out.numel():
                raise ValueError(f"adacomp::decompress_sum_: payload {p} holds {numel} elements "
                                 f"but out has {out.numel()}")
            if nonfinite:
                if apply:
                    out.fill_(float("nan"))
                continue
            body = t.numpy()[body_offset:]
            scale = np.uint32(scale_bits).view(np.float32)
            code = _walk(body, numel, L, n_sent, kind, scale, o, apply)
            if code:
                raise ValueError(f"adacomp payload {p} is malformed: {_MESSAGES[code]}")


__all__ = ["select", "decompress_sum_", "numba"]


@njit(cache=True)
def _encode_body_kernel(counts, offsets, values, w, kind, out):
    # LSB-first bit streams, as csrc/cpu/encode_kernel.cpp.
    nb, k = counts.shape[0], offsets.shape[0]
    pos = 0
    acc = np.uint64(0)
    nacc = 0
    for b in range(nb):
        c = np.int64(counts[b])
        for j in range(c + 1):  # c ones, then a zero
            if j < c:
                acc |= np.uint64(1) << np.uint64(nacc)
            nacc += 1
            if nacc == 8:
                out[pos] = np.uint8(acc & np.uint64(0xFF))
                pos += 1
                acc = np.uint64(0)
                nacc = 0
    if nacc:
        out[pos] = np.uint8(acc & np.uint64(0xFF))
        pos += 1
    fbits = w + (1 if kind == 0 else 0)
    if k and fbits:
        acc = np.uint64(0)
        nacc = 0
        for i in range(k):
            field = np.uint64(offsets[i])
            if kind == 0 and values[i] < 0:
                field |= np.uint64(1) << np.uint64(w)
            acc |= field << np.uint64(nacc)
            nacc += fbits
            while nacc >= 8:
                out[pos] = np.uint8(acc & np.uint64(0xFF))
                pos += 1
                acc >>= np.uint64(8)
                nacc -= 8
        if nacc:
            out[pos] = np.uint8(acc & np.uint64(0xFF))
            pos += 1
    return pos


def encode_body(counts, offsets, values, offset_width, kind):
    """numba version of :func:`adacomp.payload.reference_encode_body` (CPU tensors)."""
    c = counts.to(torch.int64).contiguous().numpy()
    o = offsets.to(torch.int64).contiguous().numpy()
    v = values.to(torch.float32).contiguous().numpy()
    nb, k = c.shape[0], o.shape[0]
    fbits = offset_width + (1 if kind == 0 else 0)
    nbytes = (nb + k + 7) // 8 + ((k * fbits + 7) // 8 if k and fbits else 0)
    out = np.empty(nbytes, dtype=np.uint8)
    _encode_body_kernel(c, o, v, offset_width, kind, out)
    body = torch.from_numpy(out)
    if kind == 1:
        body = torch.cat([body, values.to(torch.float16).view(torch.uint8)])
    elif kind == 2:
        body = torch.cat([body, values.to(torch.float32).contiguous().view(torch.uint8)])
    return body

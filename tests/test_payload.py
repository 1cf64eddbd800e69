"""The wire format: exact bytes, round trips, size bound, and fuzzing of the decoder."""

import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adacomp
from adacomp import ops, payload
from adacomp._reference import select

from .test_reference import DW, R

DECODERS = [b for b in ("cpp", "numba", "torch") if b in ops.available_backends("cpu")]


def decode_with(backend, plist, shape, monkeypatch=None):
    import os

    old = os.environ.get("ADACOMP_BACKEND")
    os.environ["ADACOMP_BACKEND"] = backend
    try:
        return adacomp.decompress_sum(plist, torch.zeros(shape))
    finally:
        if old is None:
            del os.environ["ADACOMP_BACKEND"]
        else:
            os.environ["ADACOMP_BACKEND"] = old


def test_hand_worked_bytes():
    _, counts, offsets, values, scale, _ = select(DW, R, 4, 0, 0)
    p = payload.encode((11,), 4, counts, offsets, values, float(scale), payload.KIND_TERNARY)
    b = bytes(p)
    head = b"AC" + bytes([1, 0, 1, 11, 4, 5]) + struct.pack("<f", np.float32(5 / 3))
    # counts [2, 2, 1] in unary: 1 1 0 1 1 0 1 0 -> 0x5B
    # entries (offset | sign << 2, 3 bits each): 0, 5, 0, 7, 1 -> 0x28 0x1E
    assert b == head + bytes([0x5B, 0x28, 0x1E])
    for backend in DECODERS:
        dense = decode_with(backend, [p], (11,))
        s = float(np.float32(5 / 3))
        assert dense.tolist() == [s, -s, 0, 0, s, 0, 0, -s, 0, s, 0]


def random_payloads(seed, n=1000, shape=None, values="ternary", bin_size=50, steps=3):
    g = torch.Generator().manual_seed(seed)
    shape = shape or (n,)
    comp = adacomp.AdaComp(bin_size=bin_size, values=values, min_numel=0)
    out = []
    for _ in range(steps):
        out.append(comp.compress("w", torch.randn(shape, generator=g)))
    return out


@pytest.mark.parametrize("values", ["ternary", "fp16", "fp32"])
@pytest.mark.parametrize("bin_size", [1, 7, 50, 500])
def test_round_trip_and_decoders_agree(values, bin_size):
    plist = random_payloads(1, shape=(13, 77), values=values, bin_size=bin_size)
    plist.append(payload.encode_dense(torch.randn(13, 77)))
    for p in plist:
        q = adacomp.Payload.from_bytes(bytes(p))
        assert bytes(q) == bytes(p) and q.nbytes == p.nbytes and q.shape == (13, 77)
        assert torch.equal(adacomp.decompress(q), adacomp.decompress(p))
    results = [decode_with(b, plist, (13, 77)) for b in DECODERS]
    for r in results[1:]:
        assert torch.equal(r.view(torch.int32), results[0].view(torch.int32))


def test_decompress_sum_is_in_order_sum():
    plist = random_payloads(2, n=5000, steps=5)
    out = adacomp.decompress_sum(plist, torch.zeros(5000))
    manual = torch.zeros(5000)
    for p in plist:
        manual += adacomp.decompress(p)
    assert torch.equal(out, manual)


def test_bits_per_sent_element():
    for L, limit in ((50, 8.5), (500, 11.5)):
        p = random_payloads(3, n=200_000, bin_size=L, steps=4)[-1]
        h = p.header
        body_bits = 8 * (p.nbytes - h.header_bytes)
        assert body_bits / h.n_sent <= limit  # 17 is the spec's ceiling
        assert p.nbytes - h.header_bytes >= 0 and h.header_bytes <= 16


def test_nonfinite_payload_decodes_to_nan():
    comp = adacomp.AdaComp(bin_size=10, min_numel=0)
    g = torch.randn(100)
    g[3] = float("nan")
    p = comp.compress("w", g)
    assert p.nonfinite and p.n_sent == 0
    for b in DECODERS:
        assert torch.isnan(decode_with(b, [p], (100,))).all()
    assert torch.isnan(adacomp.decompress(adacomp.Payload.from_bytes(bytes(p)))).all()


def test_wrong_shape_out_names_parameter():
    p = random_payloads(4, n=100, steps=1)[0]
    with pytest.raises(ValueError, match="'layer1.weight'.*shape"):
        adacomp.decompress_sum([p], torch.zeros(101), name="layer1.weight")
    with pytest.raises(ValueError, match="fp32"):
        adacomp.decompress_sum([p], torch.zeros(100, dtype=torch.float16))


@pytest.mark.parametrize("mutate,match", [
    (lambda b: b[:-1], "truncated"),
    (lambda b: b + b"\0", "oversized"),
    (lambda b: b[:3], "truncated"),
    (lambda b: b"XY" + b[2:], "magic"),
    (lambda b: b[:2] + bytes([9]) + b[3:], "version"),
    (lambda b: b[:3] + bytes([0x40]) + b[4:], "flag"),
    (lambda b: b[:4] + bytes([40]) + b[5:], "dimensions"),
])
def test_malformed_headers(mutate, match):
    p = random_payloads(5, n=1000, steps=1)[0]
    with pytest.raises(ValueError, match=match):
        adacomp.Payload.from_bytes(mutate(bytes(p)))


def test_malformed_body_detected_by_every_decoder():
    p = random_payloads(6, n=1000, bin_size=50, steps=1)[0]
    h = p.header
    raw = bytearray(bytes(p))
    raw[h.header_bytes] ^= 0xFF  # scramble the first byte of the count stream
    q = adacomp.Payload.from_bytes(bytes(raw))  # header and length are still fine
    for b in DECODERS:
        out = torch.ones(1000)
        with pytest.raises(ValueError, match="malformed"):
            decode_with_out(b, [q], out)
        assert torch.equal(out, torch.ones(1000)), "out must be untouched on error"


def decode_with_out(backend, plist, out):
    import os

    old = os.environ.get("ADACOMP_BACKEND")
    os.environ["ADACOMP_BACKEND"] = backend
    try:
        return adacomp.decompress_sum(plist, out)
    finally:
        if old is None:
            del os.environ["ADACOMP_BACKEND"]
        else:
            os.environ["ADACOMP_BACKEND"] = old


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SEEDS = [bytes(p) for p in random_payloads(7, n=300, bin_size=20, steps=2)]
SEEDS += [bytes(p) for p in random_payloads(8, n=64, bin_size=8, values="fp16", steps=1)]
SEEDS += [bytes(payload.encode_dense(torch.randn(5)))]


def _decode_all(data):
    """Decode with every backend; return the verdicts (error or result bits)."""
    verdicts = []
    for b in DECODERS:
        try:
            p = adacomp.Payload.from_bytes(data)
            out = decode_with(b, [p], p.shape)
            verdicts.append(("ok", out.view(torch.int32).tolist()))
        except ValueError as exc:
            verdicts.append(("error", type(exc)))
    return verdicts


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data):
    v = _decode_all(data)
    assert all(x == v[0] for x in v)


@FUZZ
@given(seed=st.sampled_from(SEEDS), pos=st.integers(0, 10_000), value=st.integers(0, 255),
       cut=st.integers(-3, 3))
def test_fuzz_mutated_payloads(seed, pos, value, cut):
    data = bytearray(seed)
    data[pos % len(data)] = value
    if cut < 0:
        data = data[:cut]
    elif cut > 0:
        data += bytes(cut)
    v = _decode_all(bytes(data))
    assert all(x == v[0] for x in v)


@pytest.mark.parametrize("log2", [28, 32, 36, 40])
def test_decoder_bounds_what_it_allocates(log2):
    """A well-formed, tiny payload claiming 2^28-2^40 elements (the non-finite flag needs no
    body) is refused with ValueError before anything is allocated, unless the receiver
    expects that shape or allows that many elements."""
    from adacomp import payload as pl

    p = pl.encode_nonfinite((1 << log2,), 500, pl.KIND_TERNARY)
    data = bytes(p)
    assert len(data) < 24
    with pytest.raises(ValueError, match="max_numel"):
        pl.decompress(data)
    with pytest.raises(ValueError, match="expects"):
        pl.Payload.from_bytes(data, shape=(1000,))
    with pytest.raises(ValueError, match="receiver accepts"):
        pl.Payload.from_bytes(data, max_numel=1 << 20)
    with pytest.raises(ValueError, match="receiver accepts"):
        pl.Payload.from_tensor(p.tensor, max_numel=1 << 20)
    small = pl.encode_nonfinite((1000,), 500, pl.KIND_TERNARY)
    assert bool(pl.decompress(bytes(small), shape=(1000,)).isnan().all())
    with pytest.raises(ValueError, match="expects"):
        pl.decompress(bytes(small), shape=(999,))

"""The CUDA bucket ops' logic, run on the CPU: ``adacomp::_compress_bucket_emulated`` and
``adacomp::_decode_bucket_emulated_`` call, one index after another, the very
``__host__ __device__`` functions of csrc/wire.h and csrc/wire_check.h that the CUDA kernels
(csrc/cuda/bucket_core.cu) call once per thread. So the device-side wire format writer and
the device-side validation are checked here, where no GPU is present, against the CPU
kernels (byte for byte) and against the CPU decoder's verdict on fuzzed and bit-flipped
payloads. The GPU runs of the same ops are in tests/test_cuda.py (``-m gpu``)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adacomp import AdaComp, ops, payload
from adacomp.payload import decode_bucket_

from .test_bucket import _SEEDS, BINS, NAMES, SHAPES, _bucket, _decode, _grads, _ternary

pytestmark = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="the native extension is not built")

VALUES = {"ternary": 0, "fp16": 1, "fp32": 2}  # value_mode


def _compress(op, grads, bins, pieces, values, residue_seed=1):
    """op's (data, sizes, info, new residues) from fixed residues."""
    g = torch.Generator().manual_seed(residue_seed)
    flats = [x.reshape(-1).float().contiguous() for x in grads]
    residues = [torch.randn(f.numel(), generator=g) * 0.7 for f in flats]
    outs = [torch.empty_like(f) for f in flats]
    shapes = []
    for x in grads:
        shapes += [x.dim(), *x.shape]
    bins = [max(1, min(L, f.numel())) for L, f in zip(bins, flats)]
    data, sizes, info = op(flats, residues, outs, bins, shapes, pieces, 0, VALUES[values])
    return data, sizes, info, outs


def _same(a, b):
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1], b[1])
    assert torch.equal(a[2], b[2])
    for x, y in zip(a[3], b[3]):
        assert torch.equal(x.view(torch.int32), y.view(torch.int32))


@pytest.mark.parametrize("values", list(VALUES))
@pytest.mark.parametrize("pieces", [0, 1, 3, 4])
@pytest.mark.parametrize("special", [None, "nonfinite", "zero"])
def test_emulated_compress_is_compress_bucket(values, pieces, special):
    grads = _grads(1, special)  # step 1: the "nonfinite" case puts an inf in tensor 0
    native = _compress(torch.ops.adacomp.compress_bucket, grads, BINS, pieces, values)
    emulated = _compress(torch.ops.adacomp._compress_bucket_emulated, grads, BINS, pieces, values)
    _same(native, emulated)
    if special == "nonfinite":
        assert native[2][0, 1] == 1
    if special == "zero":
        assert native[2][2, 2] == 1 and native[2][0, 2] == 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 30_000), L=st.sampled_from([1, 2, 3, 8, 63, 64, 65, 500, 4097]),
       pieces=st.sampled_from([0, 1, 2, 5, 9]), values=st.sampled_from(list(VALUES)),
       sparse=st.booleans(), seed=st.integers(0, 2**16))
def test_emulated_compress_random_sizes(n, L, pieces, values, sparse, seed):
    """Random sizes, bin sizes (1: zero-width offsets) and piece counts (more pieces than
    bins: empty pieces), dense and mostly-zero gradients: the same bytes."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g)
    if sparse:
        a = a * (torch.rand(n, generator=g) < 0.01)
    grads = [a, torch.randn(5, 3, generator=g)]
    bins = [L, 4]
    _same(_compress(torch.ops.adacomp.compress_bucket, grads, bins, pieces, values, seed),
          _compress(torch.ops.adacomp._compress_bucket_emulated, grads, bins, pieces, values, seed))


def _emulated(outs, rows, entries, divisor=1):
    flat = []
    for o, s, e, r, off, nb, shape in entries:
        flat += [o, s, e, r, off, nb, len(shape), *shape]
    torch.ops.adacomp._decode_bucket_emulated_(outs, rows, flat, divisor)  # ValueError, no CPU message


def _verdicts(rows, entries, divisor=1):
    native = _decode(decode_bucket_, rows, entries, divisor=divisor)
    emulated = _decode(_emulated, rows, entries, divisor=divisor)
    return native, emulated


@pytest.mark.parametrize("values", list(VALUES))
@pytest.mark.parametrize("shards", [None, 3])
@pytest.mark.parametrize("divisor", [1, 3])
def test_emulated_decode_is_decode_bucket(values, shards, divisor):
    rows, entries = _bucket(W=3, shards=shards, values=values)
    native, emulated = _verdicts(rows, entries, divisor)
    assert native[0] == "ok"
    assert emulated == native


def test_emulated_decode_nonfinite_and_dense_payloads():
    """A non-finite payload makes its range NaN (the CPU's NaN bits, not divided); a dense
    payload (kind 3) is added value by value."""
    comp = AdaComp(min_numel=0)
    g = _grads(0)
    g[1][7] = float("nan")
    bp, _ = comp.prepare_bucket(NAMES, g, BINS)
    dense = payload.encode_dense(torch.randn(SHAPES[2])).tensor
    rows = [bp.data, dense]
    entries = [(t, 0, torch.Size(s).numel(), 0, int(bp.sizes[0, :t].sum()), int(bp.sizes[0, t]), s)
               for t, s in enumerate(SHAPES)]
    entries.insert(3, (2, 0, torch.Size(SHAPES[2]).numel(), 1, 0, dense.numel(), SHAPES[2]))
    for divisor in (1, 2, 3):
        native, emulated = _verdicts(rows, entries, divisor)
        assert native[0] == "ok" and emulated == native


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(sorted(_SEEDS, key=str)),
       edits=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1 << 20), st.integers(0, 255),
                                st.booleans()), min_size=1, max_size=3))
def test_fuzz_emulated_decode_agrees_with_the_cpu_decoder(case, edits):
    """Mutated bytes: the device validation accepts exactly what the CPU decoder accepts,
    sums to the same bits, and writes nothing when it rejects."""
    rows, entries = _SEEDS[case]
    rows = [r.clone() for r in rows]
    for r, pos, value, in_header in edits:
        mine = [e for e in entries if e[3] == r]
        if in_header:
            e = mine[pos % len(mine)]
            pos = e[4] + pos % min(e[5], 12)
        rows[r][pos % rows[r].numel()] = value
    native, emulated = _verdicts(rows, entries)
    assert emulated[0] == native[0]
    if native[0] == "ok":
        assert emulated == native


@pytest.mark.parametrize("values", ["ternary", "fp16", "fp32"])
def test_every_single_bit_flip_gets_the_cpu_verdict(values):
    """Every bit of a small bucket (two ranks, every part of every payload: header, count
    stream, entry stream, values, padding) flipped in turn."""
    shapes, bins = [(40,), (3, 7), (9,)], [8, 5, 1]
    rows, sizes = [], []
    for r in range(2):
        comp = AdaComp(values=values, min_numel=0)
        gen = torch.Generator().manual_seed(r)
        bp, _ = comp.prepare_bucket(["a", "b", "c"], [torch.randn(s, generator=gen) for s in shapes], bins)
        rows.append(bp.data.clone())
        sizes.append(bp.sizes[0].tolist())
    entries = []
    for t, s in enumerate(shapes):
        for r in range(2):
            entries.append((t, 0, torch.Size(s).numel(), r, sum(sizes[r][:t]), sizes[r][t], s))
    outs_shape = [torch.Size(s).numel() for s in shapes]
    rejected = 0
    for r in range(2):
        for i in range(rows[r].numel() * 8):
            bad = [x.clone() for x in rows]
            bad[r][i // 8] ^= 1 << (i % 8)
            native, emulated = _verdicts(bad, entries)
            assert emulated[0] == native[0], (values, r, i)
            if native[0] == "ok":
                assert emulated == native, (values, r, i)
            rejected += native[0] == "error"
    assert rejected > 0 and len(outs_shape) == 3


@pytest.mark.parametrize("data", [
    b"", b"AC\x01", b"A'\x01\x00\x01\x64\x01\x00", b"AC\x02\x00\x01", b"AC\x01\x08\x01", b"AC\x01\x00\x21",
    b"AC\x01\x00\x01\x80\x00", b"AC\x01\x00\x01" + b"\xff" * 9, b"AC\x01\x00\x01\x64\x01\x00",
    _ternary((100,), 10, 3, 0x7FC00000), _ternary((100,), 10, 3, 0), _ternary((101,), 1, 0, 0x3F800000),
    _ternary([(1 << 62) + 5] * 3, 1, 0, 0), _ternary((0, 1 << 62), 1, 0, 0), _ternary((100,), 0, 0, 0),
    _ternary((100,), 101, 0, 0), _ternary((100,), 10, 101, 0x3F800000), _ternary((100,), 10, 3, 0, flags=1),
])
def test_emulated_decode_rejects_malformed_headers(data):
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    entries = [(0, 0, 100, 0, 0, len(data), (100,))]
    out = torch.full((100,), 7.0)
    with pytest.raises(ValueError):
        decode_bucket_([out], [t], entries)
    with pytest.raises(ValueError, match="rejected"):
        torch.ops.adacomp._decode_bucket_emulated_([out], [t], [0, 0, 100, 0, 0, len(data), 1, 100], 1)
    assert bool((out == 7).all())


def test_emulated_decode_checks_the_table_as_the_cpu_op():
    rows, entries = _bucket(W=2)
    outs = [torch.zeros(torch.Size(s).numel()) for s in SHAPES]
    e = entries[0]
    for bad, match in [([e, (e[0], 1, e[2], *e[3:6], (e[2] - 1,))], "overlap"),
                       ([(*e[:5], 10 ** 9, e[6])], "outside their row"),
                       ([(99, *e[1:])], "does not exist")]:
        with pytest.raises(ValueError, match=match):
            decode_bucket_(outs, rows, bad)
        with pytest.raises(ValueError, match=match):
            _emulated(outs, rows, bad)


def test_a_wrapping_byte_range_is_rejected_not_read():
    """offset + nbytes beyond 2^63 wraps around to a small number; the table check must not
    be fooled into handing the decoder a pointer outside the row (CPU op and emulation)."""
    rows, entries = _bucket(W=2)
    outs = [torch.zeros(torch.Size(s).numel()) for s in SHAPES]
    e = entries[0]
    huge = (1 << 63) - 10
    for fn in (decode_bucket_, _emulated):
        with pytest.raises(ValueError, match="outside their row"):
            fn(outs, rows, [(*e[:4], huge, huge, e[6])])

"""The CUDA kernels (csrc/cuda/) against the pure-PyTorch reference and the CPU path.

docs/algorithm.md section 6: the reference defines correctness, and for fp32 input the selection
and the residue must match it bit for bit. Every float comparison below is therefore on
the int32 view of the bits. These tests need a GPU and an extension built with CUDA
(``FORCE_CUDA=1 pip install --no-build-isolation -e .``); elsewhere they are skipped.
"""

from __future__ import annotations

import pytest
import torch

import adacomp
from adacomp import _reference, ops, payload

HAS_CUDA = torch.cuda.is_available()

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"),
    pytest.mark.skipif(
        HAS_CUDA and not ops.extension_has_cuda(),
        reason="adacomp._C has no CUDA kernel: rebuild it with "
        "FORCE_CUDA=1 pip install --no-build-isolation -e .",
    ),
]

# (scale_mode, value_mode): both scales with each of the three value modes.
MODES = [(s, v) for v in _reference.VALUE_MODES.values() for s in _reference.SCALE_MODES.values()]
KINDS = ("normal", "ties", "sparse", "wide")
SIZES = (1, 33, 1000, 4096, 4097, 12_345, 100_003)
# Bin sizes around the kernel's limits: warp width (32), tile (4096 elements; larger bins
# take the two-kernel path), and larger than the tensor ("n+7", "3n").
BINS = (1, 2, 31, 32, 50, 500, 2049, 4096, 4097, 10_000, "n+7", "3n")


def _bin(n: int, b) -> int:
    return {"n+7": n + 7, "3n": 3 * n}.get(b, b)


CASES = [(n, _bin(n, b)) for n in SIZES for b in BINS]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(torch.int32)


def _inputs(n: int, kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad, residue) on the CPU, fp32."""
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        grad = torch.randn(n, generator=g)
        residue = 0.5 * torch.randn(n, generator=g)
    elif kind == "ties":  # quarter integers: exact ties |H| == gmax, G == 0, all-zero bins
        grad = 0.25 * torch.randint(-3, 4, (n,), generator=g).float()
        residue = 0.25 * torch.randint(-2, 3, (n,), generator=g).float()
    elif kind == "sparse":  # mostly zero: empty bins and empty tiles
        grad = torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.02)
        residue = torch.zeros(n)
    elif kind == "wide":  # subnormals up to 2^100: fp16 saturation, every exponent slot
        def spread():
            return torch.exp2(torch.randint(-140, 100, (n,), generator=g).float())

        grad = torch.randn(n, generator=g) * spread()
        residue = torch.randn(n, generator=g) * spread()
    else:
        raise ValueError(kind)
    return grad.contiguous(), residue.contiguous()


def _select_cuda(grad, residue, bin_size, scale_mode, value_mode, residue_out=None):
    """The CUDA op, with offsets/values cut to info[0] as adacomp.ops.select does."""
    out = torch.empty_like(grad) if residue_out is None else residue_out
    counts, offsets, values, scale, info = torch.ops.adacomp.select(
        grad, residue, out, bin_size, scale_mode, value_mode)
    assert offsets.numel() == values.numel() == grad.numel()  # capacity-sized on CUDA
    k = int(info[0])
    return out, counts, offsets[:k], values[:k], scale, info


def _assert_same(got, ref, what: str) -> None:
    names = ("residue", "counts", "offsets", "values", "scale", "info")
    for name, a, b in zip(names, got, ref):
        a, b = a.detach().cpu(), b.detach().cpu()
        assert a.shape == b.shape, \
            f"{what}: {name} has shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        assert a.dtype == b.dtype, f"{what}: {name} has dtype {a.dtype}, expected {b.dtype}"
        if a.dtype == torch.float32:
            a, b = _bits(a), _bits(b)
        if not torch.equal(a, b):
            first = int((a != b).nonzero()[0, 0])
            raise AssertionError(f"{what}: {name} differs, first at index {first}: "
                                 f"{a[first].item()} != {b[first].item()}")


# ----------------------------------------------------------------------------- select


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,bin_size", CASES)
def test_select_matches_reference(n, bin_size, kind):
    grad, residue = _inputs(n, kind, seed=31 * n + bin_size)
    g, r = grad.cuda(), residue.cuda()
    for scale_mode, value_mode in MODES:
        what = f"n={n} bin_size={bin_size} {kind} scale_mode={scale_mode} value_mode={value_mode}"
        got = _select_cuda(g, r, bin_size, scale_mode, value_mode)
        ref_cuda = _reference.select(g, r, bin_size, scale_mode, value_mode)
        _assert_same(got, ref_cuda, what + " (CUDA reference)")
        ref_cpu = _reference.select(grad, residue, bin_size, scale_mode, value_mode)
        _assert_same(got, ref_cpu, what + " (CPU reference)")
        assert got[5].tolist()[1] == 0
    # The inputs are read only.
    assert torch.equal(_bits(g), _bits(grad)) and torch.equal(_bits(r), _bits(residue))


@pytest.mark.parametrize("bin_size", [1, 50, 2049, 5000])
def test_select_many_tiles(bin_size):
    # Enough tiles (about 2^24 / 4096) that the one-block scan over tile counts runs
    # several rounds.
    n = (1 << 24) + 5 if bin_size == 1 else 10_000_019
    grad, residue = _inputs(n, "normal", seed=bin_size)
    g, r = grad.cuda(), residue.cuda()
    for scale_mode, value_mode in [(0, 0), (1, 0), (0, 1)]:
        got = _select_cuda(g, r, bin_size, scale_mode, value_mode)
        _assert_same(got, _reference.select(g, r, bin_size, scale_mode, value_mode),
                     f"n={n} bin_size={bin_size} modes={scale_mode},{value_mode}")


def test_select_empty():
    g = torch.empty(0, device="cuda")
    for scale_mode, value_mode in MODES:
        got = _select_cuda(g, g.clone(), 50, scale_mode, value_mode)
        assert got[1].numel() == got[2].numel() == got[3].numel() == 0
        assert got[5].tolist() == [0, 0]
        assert got[4].item() == 0.0


@pytest.mark.parametrize("bin_size", [1 << 20, (1 << 31) - 1])
def test_select_huge_bin_matches_cpu_kernel(bin_size):
    # The reference pads to a whole bin (8 GiB at 2^31 - 1), so compare against the C++
    # CPU kernel, which is itself tested against the reference.
    grad, residue = _inputs(5000, "normal", seed=7)
    for scale_mode, value_mode in MODES:
        cpu_out = torch.empty_like(grad)
        cpu = torch.ops.adacomp.select(grad, residue, cpu_out, bin_size, scale_mode, value_mode)
        got = _select_cuda(grad.cuda(), residue.cuda(), bin_size, scale_mode, value_mode)
        _assert_same(got, (cpu_out, *cpu), f"bin_size={bin_size} modes={scale_mode},{value_mode}")


@pytest.mark.parametrize("bin_size", [7, 50, 5000])
def test_select_residue_out_may_alias_residue(bin_size):
    grad, residue = _inputs(20_000, "normal", seed=3)
    for scale_mode, value_mode in MODES:
        ref = _reference.select(grad, residue, bin_size, scale_mode, value_mode)
        r = residue.cuda()
        got = _select_cuda(grad.cuda(), r, bin_size, scale_mode, value_mode, residue_out=r)
        assert got[0].data_ptr() == r.data_ptr()
        _assert_same(got, ref, f"in place, bin_size={bin_size} modes={scale_mode},{value_mode}")


@pytest.mark.parametrize("bin_size", [1, 50, 500, 5000])
@pytest.mark.parametrize("where", ["nan_grad", "inf_residue", "neg_inf_grad", "overflow"])
def test_select_flags_nonfinite(bin_size, where):
    grad, residue = _inputs(20_000, "normal", seed=11)
    if where == "nan_grad":
        grad[1234] = float("nan")
    elif where == "inf_residue":
        residue[-1] = float("inf")
    elif where == "neg_inf_grad":
        grad[0] = float("-inf")
    else:  # G = R + dW overflows although both are finite
        grad[777], residue[777] = 3e38, 3e38
    for scale_mode, value_mode in MODES:
        got = _select_cuda(grad.cuda(), residue.cuda(), bin_size, scale_mode, value_mode)
        ref = _reference.select(grad, residue, bin_size, scale_mode, value_mode)
        assert got[5].tolist()[1] == 1 == int(ref[5][1])
    # Outputs other than info are unspecified then, but a single non-finite element must
    # not hide the others: the same tensor without it reports finite.
    clean, _ = _inputs(20_000, "normal", seed=11)
    info = _select_cuda(clean.cuda(), torch.zeros_like(clean).cuda(), bin_size, 0, 0)[5]
    assert info.tolist()[1] == 0


def test_select_runs_inside_cuda_graph():
    # Capture fails on any host synchronisation or any work outside the current stream,
    # so this checks that the op only enqueues work.
    grad, residue = _inputs(50_000, "normal", seed=5)
    g, r = grad.cuda(), residue.cuda()
    out = torch.empty_like(g)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        torch.ops.adacomp.select(g, r, out, 50, 0, 0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = torch.ops.adacomp.select(g, r, out, 50, 0, 0)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    counts, offsets, values, scale, info = captured
    k = int(info[0])
    _assert_same((out, counts, offsets[:k], values[:k], scale, info),
                 _reference.select(grad, residue, 50, 0, 0), "graph replay")


def test_select_rejects_bad_arguments():
    g = torch.randn(100, device="cuda")
    r = torch.zeros(100, device="cuda")
    out = torch.empty(100, device="cuda")
    sel = torch.ops.adacomp.select
    with pytest.raises(ValueError, match="bin_size"):
        sel(g, r, out, 0, 0, 0)
    with pytest.raises(ValueError, match="bin_size"):
        sel(g, r, out, 1 << 31, 0, 0)
    with pytest.raises(ValueError, match="scale_mode"):
        sel(g, r, out, 50, 2, 0)
    with pytest.raises(ValueError, match="value_mode"):
        sel(g, r, out, 50, 0, 3)
    with pytest.raises(ValueError, match="fp32"):
        sel(g.double(), r, out, 50, 0, 0)
    with pytest.raises(ValueError, match="contiguous"):
        sel(torch.randn(100, 2, device="cuda")[:, 0], r, out, 50, 0, 0)
    with pytest.raises(ValueError, match="device"):
        sel(g, r.cpu(), out, 50, 0, 0)
    with pytest.raises(ValueError, match="elements"):
        sel(g, r[:50], out, 50, 0, 0)
    with pytest.raises(ValueError, match="grad"):
        sel(g, r, g, 50, 0, 0)


def test_cuda_backend_is_chosen(monkeypatch):
    monkeypatch.delenv("ADACOMP_BACKEND", raising=False)
    assert ops.backend("cuda") == "cuda"
    assert ops.available_backends("cuda")[0] == "cuda"


# ----------------------------------------------------------------------------- decode


def _worker_payloads(shape, bin_size, scale, values, seed, ranks=3, steps=2):
    """Payloads of several workers over a few steps, compressed on the CPU."""
    g = torch.Generator().manual_seed(seed)
    found = []
    for rank in range(ranks):
        comp = adacomp.AdaComp(bin_size=bin_size, scale=scale, values=values, min_numel=0)
        for _ in range(steps):
            found.append(comp.compress("w", torch.randn(shape, generator=g) * 10.0 ** (rank - 1)))
    return found


@pytest.mark.parametrize("values", ["ternary", "fp16", "fp32"])
@pytest.mark.parametrize("scale", ["binmax_mean", "selected_mean"])
@pytest.mark.parametrize("shape,bin_size", [
    ((37,), 1), ((64, 50), 7), ((3, 4, 5, 7), 50), ((2000, 3), 500), ((300, 40), 5000),
    ((1000,), 1000), ((9, 9), None),
])
def test_decompress_sum_matches_cpu(shape, bin_size, scale, values):
    payloads = _worker_payloads(shape, bin_size, scale, values, seed=sum(shape))
    payloads.append(payload.encode_dense(torch.randn(shape)))
    start = torch.randn(shape)
    out_cpu = start.clone()
    adacomp.decompress_sum(payloads, out_cpu)
    out_cuda = start.cuda()
    assert adacomp.decompress_sum(payloads, out_cuda) is out_cuda
    assert torch.equal(_bits(out_cuda), _bits(out_cpu))
    # Payload tensors already on the GPU take the same path.
    out_cuda2 = start.cuda()
    on_gpu = [payload.Payload(p.tensor.cuda(), p.header) for p in payloads]
    adacomp.decompress_sum(on_gpu, out_cuda2)
    assert torch.equal(_bits(out_cuda2), _bits(out_cpu))


def test_decompress_sum_nonfinite_payload_gives_nan():
    shape = (40, 30)
    payloads = _worker_payloads(shape, 50, "binmax_mean", "ternary", seed=1, ranks=2, steps=1)
    bad = torch.randn(shape)
    bad[3, 4] = float("inf")
    payloads.insert(1, adacomp.AdaComp(bin_size=50, min_numel=0).compress("w", bad))
    assert payloads[1].nonfinite
    out_cpu = torch.zeros(shape)
    out_cuda = torch.zeros(shape, device="cuda")
    adacomp.decompress_sum(payloads, out_cpu)
    adacomp.decompress_sum(payloads, out_cuda)
    assert bool(torch.isnan(out_cpu).all()) and bool(torch.isnan(out_cuda).all())


def test_decompress_sum_rejects_malformed_before_writing():
    shape = (64, 50)
    good, victim = _worker_payloads(shape, 50, "binmax_mean", "ternary", seed=2, ranks=2, steps=1)
    data = bytearray(bytes(victim))
    data[victim.header.header_bytes] ^= 1  # one count-stream bit: the bin counts no longer add up
    corrupt = payload.Payload.from_bytes(bytes(data))
    out = torch.zeros(shape, device="cuda")
    with pytest.raises(ValueError, match="malformed"):
        adacomp.decompress_sum([good, corrupt], out)
    assert not bool(out.any()), "out was written before every payload was validated"


def test_decompress_sum_rejects_payload_on_other_device():
    (p,) = _worker_payloads((100,), 10, "binmax_mean", "ternary", seed=4, ranks=1, steps=1)
    out = torch.zeros(100, device="cuda")
    with pytest.raises(ValueError, match="device"):
        torch.ops.adacomp.decompress_sum_(out, [p.tensor.cpu()], p.header.meta())


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("values", ["ternary", "fp16", "fp32"])
@pytest.mark.parametrize("scale", ["binmax_mean", "selected_mean"])
def test_adacomp_on_cuda_matches_cpu(scale, values):
    params = {
        "conv.weight": (16, 8, 3, 3),  # bin 50
        "fc.weight": (300, 70),        # bin 500
        "emb.weight": (1000, 64),
        "fc.bias": (300,),             # dense
        "half.weight": (64, 64),       # fp16 gradient
        "big_bin.weight": (50, 200),   # bin 6000 > tile: two-kernel path
    }
    bin_size = {"big_bin.weight": 6000}
    cpu = adacomp.AdaComp(bin_size=bin_size, scale=scale, values=values)
    gpu = adacomp.AdaComp(bin_size=bin_size, scale=scale, values=values, device="cuda")
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        for name, shape in params.items():
            grad = torch.randn(shape, generator=g) * 10.0 ** (-step)
            if name == "half.weight":
                grad = grad.half()
            if step == 2 and name == "fc.weight":
                grad[0, 0] = float("nan")  # a skipped step: flagged payload, residue kept
            p_cpu = cpu.compress(name, grad)
            p_gpu = gpu.compress(name, grad.cuda())
            # (A non-finite payload is a bare header that payload.encode_nonfinite builds
            # on the CPU whatever the compressor's device.)
            assert p_gpu.tensor.is_cuda or p_gpu.nonfinite
            assert bytes(p_gpu) == bytes(p_cpu), f"step {step}, {name}: payload bytes differ"
            assert torch.equal(_bits(gpu.residue(name)), _bits(cpu.residue(name))), \
                f"step {step}, {name}: residues differ"
            out_cpu = torch.zeros(shape)
            out_gpu = torch.zeros(shape, device="cuda")
            adacomp.decompress_sum([p_cpu, p_cpu], out_cpu)
            adacomp.decompress_sum([p_gpu, p_gpu], out_gpu)
            assert torch.equal(_bits(out_gpu), _bits(out_cpu)) or (
                p_cpu.nonfinite and bool(torch.isnan(out_gpu).all()))


# ----------------------------------------------------------------------------- one call per bucket
# adacomp::compress_bucket and adacomp::decode_bucket_ on CUDA (csrc/cuda/bucket_core.cu)
# against the CPU ops: the same bytes, residues and sums; the CPU decoder's verdict and
# message; one host synchronisation per call. Their logic also runs on the CPU in
# tests/test_cuda_logic.py (the emulation), which CI runs without a GPU.

B_SHAPES = [(64, 3, 3, 3), (1000,), (257, 5), (7,), (1,), (3, 40), (300, 70), (50, 200)]
B_BINS = [50, 500, 17, 500, 3, 50, 500, 6000]
B_NAMES = [f"t{i}" for i in range(len(B_SHAPES))]


def _bucket_grads(step, special=None, device="cpu"):
    g = torch.Generator().manual_seed(step)
    out = [torch.randn(s, generator=g) * (i + 1) for i, s in enumerate(B_SHAPES)]
    if special == "nonfinite" and step == 1:
        out[0].view(-1)[5] = float("inf")
    if special == "zero":
        out[2].zero_()
    return [x.to(device) for x in out]


def _bucket_run(device, values, shards, special, steps=3):
    comp = adacomp.AdaComp(values=values, min_numel=0)
    seen = []
    for step in range(steps):
        bp, pending = comp.prepare_bucket(B_NAMES, _bucket_grads(step, special, device), B_BINS, shards)
        assert bp.data.device.type == device and bp.sizes.device.type == "cpu"
        for p in pending:
            comp.commit(p)
        seen.append((bytes(bp.data.cpu().numpy()), bp.sizes.tolist(), bp.nonfinite, bp.zero))
    return seen, [_bits(comp.residue(n)) for n in B_NAMES]


@pytest.mark.parametrize("values", ["ternary", "fp16", "fp32"])
@pytest.mark.parametrize("shards", [None, 1, 3, 4])
@pytest.mark.parametrize("special", [None, "nonfinite", "zero"])
def test_compress_bucket_cuda_is_the_cpu_op(values, shards, special):
    gpu, gpu_res = _bucket_run("cuda", values, shards, special)
    cpu, cpu_res = _bucket_run("cpu", values, shards, special)
    assert gpu == cpu
    for x, y in zip(gpu_res, cpu_res):
        assert torch.equal(x, y)


def _bucket_rows(W, shards, values, seed=0):
    from .test_bucket import _bucket

    return _bucket(W, shards, values, seed, shapes=B_SHAPES, bins=B_BINS, make=_bucket_grads)


def _decode_on(device, rows, entries, divisor=1):
    outs = [torch.full((torch.Size(s).numel(),), 7.0, device=device) for s in B_SHAPES]
    try:
        payload.decode_bucket_(outs, [r.to(device) for r in rows], entries, divisor)
    except ValueError as exc:
        assert all(bool((o == 7.0).all()) for o in outs), "outputs must be untouched on error"
        return ("error", str(exc))
    return ("ok", [_bits(o).tolist() for o in outs])


@pytest.mark.parametrize("values", ["ternary", "fp16", "fp32"])
@pytest.mark.parametrize("shards", [None, 3])
@pytest.mark.parametrize("divisor", [1, 3])
def test_decode_bucket_cuda_is_the_cpu_op(values, shards, divisor):
    rows, entries = _bucket_rows(3, shards, values)
    cpu = _decode_on("cpu", rows, entries, divisor)
    assert cpu[0] == "ok"
    assert _decode_on("cuda", rows, entries, divisor) == cpu


@pytest.mark.parametrize("seed", range(40))
def test_decode_bucket_cuda_rejects_with_the_cpu_message(seed):
    """Random byte edits (half of them in headers): the CPU decoder's verdict and message,
    and nothing written on error."""
    rows, entries = _bucket_rows(2, 2 if seed % 2 else None, "fp16" if seed % 3 == 0 else "ternary", seed=1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(1 + seed % 3):
        r = int(torch.randint(2, (1,), generator=g))
        if seed % 4 < 2:
            e = [x for x in entries if x[3] == r][int(torch.randint(len(entries) // 2, (1,), generator=g))]
            pos = e[4] + int(torch.randint(min(e[5], 12), (1,), generator=g))
        else:
            pos = int(torch.randint(rows[r].numel(), (1,), generator=g))
        rows[r][pos] = int(torch.randint(256, (1,), generator=g))
    assert _decode_on("cuda", rows, entries) == _decode_on("cpu", rows, entries)


def _syncs(fn):
    """(result, number of host synchronisations that fn made), from sync-debug warnings."""
    import warnings

    torch.cuda.synchronize()
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fn()
    finally:
        torch.cuda.set_sync_debug_mode(old)
    return out, sum("synchroniz" in str(w.message) for w in caught)


def test_one_host_synchronisation_per_bucket():
    """compress_bucket: one (the size table); decode_bucket_: one (the verdict), whatever
    the number of tensors and ranks; and none at all in what runs between them. Under
    set_sync_debug_mode("error") the ops therefore raise at that one copy and nowhere else."""
    comp = adacomp.AdaComp(min_numel=0)
    grads = _bucket_grads(0, device="cuda")
    comp.prepare_bucket(B_NAMES, grads, B_BINS)  # residues exist from here on
    (bp, pending), n = _syncs(lambda: comp.prepare_bucket(B_NAMES, grads, B_BINS, 4))
    assert n == 1, f"compress_bucket made {n} host synchronisations for {len(B_NAMES)} tensors"
    rows, entries = _bucket_rows(3, None, "ternary")
    rows = [r.cuda() for r in rows]
    outs = [torch.empty(torch.Size(s).numel(), device="cuda") for s in B_SHAPES]
    _, n = _syncs(lambda: payload.decode_bucket_(outs, rows, entries, 3))
    assert n == 1, f"decode_bucket_ made {n} host synchronisations for {len(entries)} payloads"
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            comp.prepare_bucket(B_NAMES, grads, B_BINS)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_group_exchange_prepares_a_bucket_with_one_synchronisation():
    """A DDP bucket's compressed tensors and its small tensors sent dense by rule (biases):
    their flags travel behind the compression and are read after its one synchronisation."""
    from adacomp.parallel.exchange import GroupExchange

    comp = adacomp.AdaComp()  # default rules: 1-D and small tensors go dense
    names = ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=g).cuda() for s in [(64, 8, 3, 3), (64,), (300, 70), (300,)]]
    GroupExchange(comp, names, grads, 2, rank=0, exchange="allgather")  # residues exist now
    ex, n = _syncs(lambda: GroupExchange(comp, names, grads, 2, rank=0, exchange="allgather"))
    assert n == 1, f"preparing the bucket made {n} host synchronisations"
    assert ex.bucket is not None and ex.bucket.data.is_cuda

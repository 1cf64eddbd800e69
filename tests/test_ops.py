"""Every backend against the reference, bit for bit (property-based)."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adacomp
from adacomp import _reference as ref
from adacomp import ops

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def bits(t):
    return t.contiguous().view(torch.int32)


def run_backend(name, d, r, L, sm, vm):
    out = torch.full_like(d, float("nan"))
    if name == "cpp":
        res = torch.ops.adacomp.select(d, r, out, L, sm, vm)
    elif name == "numba":
        from adacomp import _numba

        res = _numba.select(d, r, out, L, sm, vm)
    else:
        res = ops.select(d, r, out, L, sm, vm)
    return (out,) + tuple(res)


def assert_same(got, want):
    residue, counts, offsets, values, scale, info = got
    r2, c2, o2, v2, s2, i2 = want
    assert torch.equal(info, i2)
    assert torch.equal(counts, c2)
    assert torch.equal(offsets, o2)
    assert torch.equal(bits(values), bits(v2))
    assert torch.equal(bits(scale), bits(s2))
    assert torch.equal(bits(residue), bits(r2))


def test_extension_is_built():
    """CI builds the extension; a silent fallback to a slower backend must fail here."""
    if os.environ.get("ADACOMP_NO_EXTENSION") == "1":
        pytest.skip("ADACOMP_NO_EXTENSION=1: extension deliberately not built")
    assert ops.HAS_EXTENSION, f"adacomp._C failed to import: {ops._EXTENSION_ERROR}"
    assert adacomp.ops.backend() == "cpp" or os.environ.get("ADACOMP_BACKEND")


@st.composite
def cases(draw):
    n = draw(st.integers(0, 3000))
    L = draw(st.one_of(st.integers(1, 64), st.sampled_from([50, 500, 4097]), st.integers(1, 5000)))
    L = max(1, min(L, max(n, 1)))
    seed = draw(st.integers(0, 2**31 - 1))
    sm = draw(st.sampled_from([0, 1]))
    vm = draw(st.sampled_from([0, 1, 2]))
    style = draw(st.sampled_from(["normal", "wide", "sparse", "ties"]))
    return n, L, seed, sm, vm, style


def make(n, seed, style):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, generator=g)
    r = torch.randn(n, generator=g) * 0.3
    if style == "wide":  # magnitudes over many decades, fp16 saturation, subnormals
        d = d * torch.pow(10.0, torch.randint(-40, 38, (n,), generator=g).float() / 2)
    elif style == "sparse":  # mostly exact zeros: all-zero bins and G == 0 cases
        mask = torch.rand(n, generator=g) < 0.9
        d[mask] = 0.0
        r[mask] = 0.0
        r[~mask & (torch.rand(n, generator=g) < 0.5)] *= -1
    elif style == "ties":  # small integers: many |H| == gmax ties and G == 0 cancellations
        d = torch.randint(-3, 4, (n,), generator=g).float()
        r = torch.randint(-3, 4, (n,), generator=g).float()
    return d, r


@pytest.mark.parametrize("backend", ["cpp", "numba"])
@SETTINGS
@given(case=cases())
def test_backend_matches_reference(backend, case):
    if backend not in ops.available_backends("cpu"):
        pytest.skip(f"{backend} not available in this build")
    n, L, seed, sm, vm, style = case
    d, r = make(n, seed, style)
    want = ref.select(d, r, L, sm, vm)
    got = run_backend(backend, d, r, L, sm, vm)
    assert_same(got, want)


def encode_with(backend, counts, offsets, values, w, kind):
    if backend == "cpp":
        return torch.ops.adacomp.encode_body(counts, offsets, values, w, kind)
    from adacomp import _numba

    return _numba.encode_body(counts, offsets, values, w, kind)


@pytest.mark.parametrize("backend", ["cpp", "numba"])
@SETTINGS
@given(case=cases())
def test_encoder_matches_reference(backend, case):
    """The native encoders write the wire format's body byte for byte as the reference
    (adacomp.payload.reference_encode_body), for every value kind and bin size."""
    from adacomp import payload

    if backend not in ops.available_backends("cpu"):
        pytest.skip(f"{backend} not available in this build")
    n, L, seed, sm, vm, style = case
    d, r = make(n, seed, style)
    _, counts, offsets, values, _, info = ref.select(d, r, L, sm, vm)
    if int(info[1]):
        return
    counts, offsets = counts.to(torch.int32), offsets.to(torch.int32)
    kind = [payload.KIND_TERNARY, payload.KIND_FP16, payload.KIND_FP32][vm]
    w = payload.offset_width(L)
    want = payload.reference_encode_body(counts, offsets, values, w, kind)
    got = encode_with(backend, counts, offsets, values, w, kind)
    assert got.dtype == torch.uint8 and torch.equal(got, want), (n, L, vm)


def test_cpp_encoder_rejects_inconsistent_input():
    if "cpp" not in ops.available_backends("cpu"):
        pytest.skip("cpp not available in this build")
    c = torch.tensor([2, 1], dtype=torch.int32)
    o = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="counts sum to 3"):
        torch.ops.adacomp.encode_body(c, o, torch.ones(2), 3, 0)
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.adacomp.encode_body(c.long(), o, torch.ones(2), 3, 0)


@pytest.mark.parametrize("backend", ["cpp", "numba"])
def test_large_tensor_many_threads(backend):
    if backend not in ops.available_backends("cpu"):
        pytest.skip(f"{backend} not available in this build")
    d, r = make(1_000_003, 7, "normal")
    for L in (50, 500):
        assert_same(run_backend(backend, d, r, L, 0, 0), ref.select(d, r, L, 0, 0))


@pytest.mark.parametrize("backend", ["cpp", "numba"])
def test_nonfinite_detected(backend):
    if backend not in ops.available_backends("cpu"):
        pytest.skip(f"{backend} not available in this build")
    d, r = make(10_000, 1, "normal")
    d[9_999] = float("nan")
    assert run_backend(backend, d, r, 50, 0, 0)[5][1].item() == 1
    d[9_999] = float("-inf")
    assert run_backend(backend, d, r, 50, 1, 1)[5].tolist()[1] == 1


def test_cpp_kernel_rejects_bad_input():
    if "cpp" not in ops.available_backends("cpu"):
        pytest.skip("cpp not available in this build")
    d = torch.randn(10)
    with pytest.raises(ValueError, match="bin_size must be >= 1"):
        torch.ops.adacomp.select(d, d, torch.empty(10), 0, 0, 0)
    with pytest.raises(ValueError, match="fp32"):
        torch.ops.adacomp.select(d.double(), d, torch.empty(10), 5, 0, 0)
    with pytest.raises(ValueError, match="elements"):
        torch.ops.adacomp.select(d, torch.randn(9), torch.empty(10), 5, 0, 0)
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.adacomp.select(torch.randn(20)[::2], d, torch.empty(10), 5, 0, 0)


def test_backend_env_override(monkeypatch):
    monkeypatch.setenv("ADACOMP_BACKEND", "torch")
    assert ops.backend() == "torch"
    monkeypatch.setenv("ADACOMP_BACKEND", "tpu")
    with pytest.raises(ValueError, match="choose one of"):
        ops.backend()
    monkeypatch.setenv("ADACOMP_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="not available"):
        ops.backend("cpu")


def test_torch_compile_traces_the_op():
    if not ops.HAS_EXTENSION:
        pytest.skip("torch.compile test needs the extension (the op is declared in C++)")

    def step(d, r, out):
        d = d * 2.0
        counts, offsets, values, scale, info = torch.ops.adacomp.select(d, r, out, 50, 0, 0)
        return counts.sum() + info[0], values.abs().sum()

    d, r = make(5000, 3, "normal")
    out1, out2 = torch.empty(5000), torch.empty(5000)
    eager = step(d, r, out1)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(d, r, out2)
    assert torch.equal(eager[0], got[0]) and torch.equal(eager[1], got[1])
    assert torch.equal(out1, out2)


def test_package_works_without_the_extension():
    """With adacomp._C missing, the package imports, warns, and runs on numba, giving the
    same payload bytes as the C++ kernel."""
    import subprocess
    import sys

    code = (
        "import sys, warnings; sys.modules['adacomp._C'] = None\n"
        "import torch, adacomp\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always'); b = adacomp.ops.backend()\n"
        "assert any('not built' in str(x.message) for x in w), w\n"
        "g = torch.Generator().manual_seed(5)\n"
        "c = adacomp.AdaComp(bin_size=50, min_numel=0)\n"
        "out = [bytes(c.compress('w', torch.randn(40, 75, generator=g))).hex() for _ in range(3)]\n"
        "print(b); print(','.join(out))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    backend_used, payloads = proc.stdout.split()
    assert backend_used == "numba"
    g = torch.Generator().manual_seed(5)
    c = adacomp.AdaComp(bin_size=50, min_numel=0)
    assert payloads.split(",") == [bytes(c.compress("w", torch.randn(40, 75, generator=g))).hex()
                                   for _ in range(3)]


ISA_CHECK = """
import os, sys
import torch
from adacomp import _reference as ref, ops, AdaComp
assert ops.cpu_isa() == sys.argv[1], ops.cpu_isa()
torch.set_num_threads(2)
raw = lambda t: t.reshape(-1).view(torch.uint8) if t.is_floating_point() else t
for n, L in [(0, 3), (7, 3), (1000, 1), (12345, 50), (100003, 500), (5000, 4097), (70000, 16), (9000, 31)]:
    for sm in (0, 1):
        for vm in (0, 1, 2):
            g = torch.Generator().manual_seed(n + L)
            d = torch.randint(-3, 4, (n,), generator=g).float()
            d = d * torch.rand(n, generator=g).round()
            r = torch.randn(n, generator=g)
            out = torch.empty(n)
            got = torch.ops.adacomp.select(d, r, out, L, sm, vm)
            want = ref.select(d, r, L, sm, vm)
            assert torch.equal(out.view(torch.int32), want[0].view(torch.int32))
            for a, b in zip(got, want[1:]):
                assert torch.equal(raw(a), raw(b))
# Whole buckets of large tensors: many chunks on 2 threads, shard pieces that cut chunks,
# so the payload's bit streams are written in segments by both threads.
g = torch.Generator().manual_seed(1)
shapes, bins = [(1_100_003,), (600, 1001), (300_000,)], [50, 7, 4099]
for values in ("ternary", "fp16", "fp32"):
    for shards in (None, 3):
        out = []
        for backend in ("cpp", "torch"):
            os.environ["ADACOMP_BACKEND"] = backend
            c = AdaComp(values=values, min_numel=0)
            names = [f"t{i}" for i in range(len(shapes))]
            g = torch.Generator().manual_seed(2)
            seen = []
            for step in range(2):
                grads = [torch.randn(s, generator=g) for s in shapes]
                prep = c.prepare_bucket if backend == "cpp" else c._prepare_bucket_loop
                bp, pending = prep(names, grads, bins, shards)
                for p in pending:
                    c.commit(p)
                seen.append(bytes(bp.data.numpy()))
            out.append((seen, [c.residue(n).view(torch.int32).clone() for n in names]))
        assert out[0][0] == out[1][0], (values, shards)
        assert all(torch.equal(x, y) for x, y in zip(out[0][1], out[1][1])), (values, shards)
print("ok")
"""


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_every_cpu_kernel_version_matches_reference(isa):
    """Each vector version of the C++ selection (chosen with ADACOMP_CPU_ISA, read once per
    process, hence the subprocess) against the reference: the selection op, and whole
    buckets of large tensors compressed on 2 threads against the pure-PyTorch path, bytes
    and residues."""
    import subprocess
    import sys

    if "cpp" not in ops.available_backends("cpu"):
        pytest.skip("cpp not available in this build")
    if isa != "generic":
        best = subprocess.run([sys.executable, "-c", "from adacomp import ops; print(ops.cpu_isa())"],
                              capture_output=True, text=True, timeout=120,
                              env={k: v for k, v in os.environ.items() if k != "ADACOMP_CPU_ISA"})
        order = ["generic", "avx2"]
        if order.index(best.stdout.strip()) < order.index(isa):
            pytest.skip(f"this CPU has no {isa} (its best is {best.stdout.strip()})")
    proc = subprocess.run([sys.executable, "-c", ISA_CHECK, isa], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "ADACOMP_CPU_ISA": isa})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]

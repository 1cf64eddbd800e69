"""The public compressor: error feedback, bin-size rules, state, and bad input."""

import pytest
import torch

import adacomp
from adacomp import _reference as ref
from adacomp.compressor import default_bin_size


def test_matches_reference_step_after_step(cpu_backend):
    comp = adacomp.AdaComp(bin_size=50, min_numel=0)
    g = torch.Generator().manual_seed(0)
    R = torch.zeros(3000)
    for _ in range(10):
        grad = torch.randn(30, 100, generator=g)
        p = comp.compress("w", grad)
        r_new, counts, offsets, values, scale, info = ref.select(grad.reshape(-1), R, 50)
        dense = torch.zeros(3000)
        idx = torch.repeat_interleave(torch.arange(counts.numel()), counts.long()) * 50 + offsets
        dense[idx] = values
        assert torch.equal(adacomp.decompress(p).reshape(-1), dense)
        assert torch.equal(comp.residue("w").reshape(-1), r_new)
        R = r_new


@pytest.mark.parametrize("values", ["ternary", "fp16", "fp32"])
@pytest.mark.parametrize("scale", ["binmax_mean", "selected_mean"])
def test_error_feedback_is_lossless(cpu_backend, values, scale):
    """sum(decoded payloads) + residue == sum(grads), up to fp32 rounding, over many steps."""
    comp = adacomp.AdaComp(bin_size=None, scale=scale, values=values)
    g = torch.Generator().manual_seed(1)
    shapes = {"conv": (16, 8, 3, 3), "fc": (64, 100)}
    sent = {k: torch.zeros(s, dtype=torch.float64) for k, s in shapes.items()}
    total = {k: torch.zeros(s, dtype=torch.float64) for k, s in shapes.items()}
    for _ in range(60):
        for name, shape in shapes.items():
            grad = torch.randn(shape, generator=g)
            total[name] += grad.double()
            sent[name] += adacomp.decompress(comp.compress(name, grad)).double()
    for name in shapes:
        lhs = sent[name] + comp.residue(name).double()
        assert torch.allclose(lhs, total[name], atol=2e-4, rtol=0), name
        assert comp.residue(name).abs().max() > 0  # something really stayed behind


def test_payload_is_much_smaller_than_dense():
    comp = adacomp.AdaComp()
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        pc = comp.compress("conv", torch.randn(64, 32, 3, 3, generator=g))
        pf = comp.compress("fc", torch.randn(256, 512, generator=g))
    assert 64 * 32 * 9 * 4 / pc.nbytes > 20
    assert 256 * 512 * 4 / pf.nbytes > 100


def test_default_bin_sizes():
    assert default_bin_size(torch.empty(64, 32, 3, 3)) == 50
    assert default_bin_size(torch.empty(512, 256)) == 500
    assert default_bin_size(torch.empty(5000)) is None  # 1-D: dense
    assert default_bin_size(torch.empty(10, 10)) is None  # below min_numel
    comp = adacomp.AdaComp(bin_size={"a": 7, "b": None}, min_numel=0)
    assert comp.bin_size_for("a", torch.empty(100)) == 7
    assert comp.bin_size_for("b", torch.empty(100, 100)) is None
    assert comp.bin_size_for("c", torch.empty(100, 100)) == 500
    comp = adacomp.AdaComp(bin_size=lambda name, t: 3 if "x" in name else None)
    assert comp.bin_size_for("x", torch.empty(4)) == 3
    assert comp.compress("y", torch.randn(8)).kind == "dense"
    comp = adacomp.AdaComp(bin_size=64, min_numel=100)
    assert comp.bin_size_for("z", torch.empty(99)) is None
    assert comp.bin_size_for("z", torch.empty(100)) == 64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_gradients(dtype):
    comp = adacomp.AdaComp(bin_size=50, min_numel=0)
    grad = torch.randn(40, 50).to(dtype)
    p = comp.compress("w", grad)
    r_new, *_ = ref.select(grad.float().reshape(-1), torch.zeros(2000), 50)
    assert torch.equal(comp.residue("w").reshape(-1), r_new)
    assert torch.allclose(adacomp.decompress(p) + comp.residue("w"), grad.float())


def test_edge_shapes():
    comp = adacomp.AdaComp(bin_size=50, min_numel=0)
    p = comp.compress("empty", torch.empty(0, 5))
    assert adacomp.decompress(p).shape == (0, 5)
    nc = torch.randn(30, 40).t()  # non-contiguous
    assert torch.allclose(adacomp.decompress(comp.compress("nc", nc)) + comp.residue("nc"), nc)
    for L, n in ((1, 37), (50, 123), (10_000, 37)):  # bin 1, not a multiple, bin > tensor
        c = adacomp.AdaComp(bin_size=L, min_numel=0)
        grad = torch.randn(n)
        p = c.compress("w", grad)
        assert torch.allclose(adacomp.decompress(p) + c.residue("w"), grad)
    scalar = adacomp.AdaComp(bin_size=4, min_numel=0).compress("s", torch.tensor(3.0))
    assert adacomp.decompress(scalar).shape == ()


def test_bad_configuration_errors():
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="bin_size"):
            adacomp.AdaComp(bin_size=bad)
    with pytest.raises(ValueError, match="'fc'"):
        adacomp.AdaComp(bin_size={"fc": 0})
    with pytest.raises(ValueError, match="scale"):
        adacomp.AdaComp(scale="max")
    with pytest.raises(ValueError, match="values"):
        adacomp.AdaComp(values="int8")
    comp = adacomp.AdaComp(bin_size=lambda n, t: -1)
    with pytest.raises(ValueError, match="returned for 'w'"):
        comp.compress("w", torch.randn(10))


def test_shape_change_names_parameter():
    comp = adacomp.AdaComp(bin_size=10, min_numel=0)
    comp.compress("layer.weight", torch.randn(10, 10))
    with pytest.raises(ValueError, match="'layer.weight'.*shape changed"):
        comp.compress("layer.weight", torch.randn(10, 11))
    with pytest.raises(ValueError, match="floating point"):
        comp.compress("i", torch.ones(10, dtype=torch.int64))


def test_nonfinite_leaves_residue(cpu_backend):
    comp = adacomp.AdaComp(bin_size=10, min_numel=0)
    comp.compress("w", torch.randn(100))
    before = comp.residue("w").clone()
    for bad in (float("nan"), float("inf")):
        g = torch.randn(100)
        g[50] = bad
        p = comp.compress("w", g)
        assert p.nonfinite
        assert not torch.isfinite(adacomp.decompress(p)).any()
        assert torch.equal(comp.residue("w"), before)
    comp.compress("w", torch.randn(100))  # and it carries on normally
    assert not torch.equal(comp.residue("w"), before)


def test_state_dict_resume_is_exact(tmp_path):
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(20, 60, generator=g) for _ in range(8)]
    a = adacomp.AdaComp(bin_size=30, min_numel=0)
    full = [bytes(a.compress("w", x)) for x in grads]
    b = adacomp.AdaComp(bin_size=30, min_numel=0)
    for x in grads[:4]:
        b.compress("w", x)
    torch.save(b.state_dict(), tmp_path / "ckpt.pt")
    c = adacomp.AdaComp(bin_size=30, min_numel=0)
    c.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    assert [bytes(c.compress("w", x)) for x in grads[4:]] == full[4:]
    with pytest.raises(ValueError, match="settings"):
        adacomp.AdaComp(bin_size=31, min_numel=0).load_state_dict(b.state_dict())

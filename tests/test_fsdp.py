"""AdaComp under FSDP2 (``adacomp.parallel.fsdp``): the compressing reduce-scatter on real
processes (gloo, world sizes 2 and 3), against a single-process simulation of the same
algorithm (tests/_fsdp_workers.py), and the contracts of docs/algorithm.md section 5."""

from __future__ import annotations

import math

import pytest
import torch

from . import _dist
from . import _fsdp_workers as w

pytestmark = pytest.mark.distributed

fully_shard = pytest.importorskip("torch.distributed.fsdp").fully_shard


def _run(tmp_path_factory, name, fn, world, timeout=240):
    out = tmp_path_factory.mktemp(name)
    return _dist.results(_dist.run(fn, world, out_dir=str(out), timeout=timeout))


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    """One spawn per world size runs the whole schedule; the tests below read it."""
    cache = {}

    def get(world):
        if world not in cache:
            cache[world] = (_run(tmp_path_factory, f"exact{world}", w.exact_worker, world),
                            w.simulate(world))
        return cache[world]

    return get


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    bits = [t.contiguous().view(torch.int32) for t in (a, b)]
    return a.shape == b.shape and torch.equal(*bits)


def _shard(full: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    r0, r1 = w.rows(full.shape[0], world, rank)
    return full[r0:r1]


@pytest.mark.parametrize("world", [2, 3])
def test_shards_equal_simulation(exact, world):
    """Every rank's shard, after every step, is bit-identical to the rows of the simulated
    parameters, and every rank's residues to the simulated worker's."""
    res, sim = exact(world)
    for step, s in enumerate(sim):
        for rank, r in enumerate(res):
            rec = r["recs"][step]
            assert rec["skipped"] == s["skipped"], (world, step, rank)
            for n, full in s["params"].items():
                assert _bits_equal(rec["shards"][n], _shard(full, world, rank)), (world, step, rank, n)
            for n, full in s["residues"][rank].items():
                assert _bits_equal(rec["residues"][n], full), (world, step, rank, n, "residue")
    assert [r["skipped"] for r in sim] == [i == w.BAD_STEP for i in range(w.STEPS)]
    assert res[0]["recs"][0]["ops"] == ["RedOpType.AVG"]
    assert all(r["iter"] == w.STEPS for r in res)


@pytest.mark.parametrize("world", [2, 3])
def test_error_feedback_is_lossless(exact, world):
    """Summed over the applied steps, the mean local gradient (as FSDP handed it to the
    reduce-scatter) equals the applied update plus the mean residue, to fp32 rounding."""
    res, _ = exact(world)
    theta0 = dict(w.make_model().named_parameters())
    applied = [s for s in range(w.STEPS) if not res[0]["recs"][s]["skipped"]]
    for n, p0 in theta0.items():
        lhs = torch.zeros(p0.shape, dtype=torch.float64)
        for step in applied:
            lhs += sum(r["recs"][step]["grads"][n].double() for r in res) / world
        final = torch.cat([r["recs"][-1]["shards"][n] for r in res])
        rhs = -(final.double() - p0.detach().double()) / w.LR
        rhs += sum(r["recs"][-1]["residues"][n].double() for r in res) / world
        err = float((lhs - rhs).abs().max())
        # fp32 rounding: of the sums (relative), and of the parameter updates theta -= lr * g
        # (one rounding of |theta| per applied step, divided by lr)
        theta = max(float(p0.detach().abs().max()), float(final.abs().max()))
        tol = 2e-5 * float(lhs.abs().max()) + 2 * len(applied) * 2.0 ** -24 * theta / w.LR
        assert err < tol, (world, n, err, tol, float(lhs.abs().max()))
    # The compressed parameters do carry residues (the check is not vacuous).
    assert float(res[0]["recs"][-1]["residues"]["blocks.0.fc1.weight"].abs().max()) > 0


@pytest.mark.parametrize("world", [2, 3])
def test_skipped_step_keeps_every_residue(exact, world):
    """Rank 1's head.weight gradient holds an Inf: every rank outputs non-finite values for
    it (rank 0 sees NaN in its own shard), the step is skipped, and no residue of any module
    changes on any rank; the next step changes them again."""
    res, _ = exact(world)
    for rank, r in enumerate(res):
        before, bad, after = (r["recs"][w.BAD_STEP + i] for i in (-1, 0, 1))
        assert bad["skipped"] and not before["skipped"] and not after["skipped"]
        for n in before["residues"]:
            assert _bits_equal(bad["residues"][n], before["residues"][n]), (rank, n)
            assert _bits_equal(bad["shards"][n], before["shards"][n]), (rank, n)
        key = "blocks.0.fc1.weight"
        assert not _bits_equal(after["residues"][key], bad["residues"][key])
    assert res[0]["recs"][w.BAD_STEP]["finite_here"] is False  # the NaN reached rank 0's shard


def test_gradient_accumulation_reduces_once(exact):
    """Under set_requires_gradient_sync(False) FSDP does not call the reduce-scatter; the
    last micro-batch reduces the accumulated gradient once per FSDP module (the result is
    checked bit for bit by test_shards_equal_simulation)."""
    res, _ = exact(2)
    for r in res:
        assert r["recs"][w.ACC_STEP]["calls"] == [0, 3]
        assert all(rec["calls"] == [3] for i, rec in enumerate(r["recs"]) if i != w.ACC_STEP)


def test_stats_compression_and_memory(exact):
    res, _ = exact(2)
    world = 2
    model = w.make_model()
    st = res[0]["stats"]
    total = st["total"]
    # What FSDP2's dense reduce-scatter is handed, every step: the padded fp32 input.
    per_step = sum(-(-p.shape[0] // world) * world * p[0].numel() * 4 for p in model.parameters())
    assert st["reduce_scatter"]["dense_bytes"] == w.STEPS * per_step
    assert total["fc"]["ratio"] > 10, total["fc"]
    assert total["conv"]["ratio"] > 2, total["conv"]
    assert st["reduce_scatter"]["ratio"] > 3, st["reduce_scatter"]
    assert total["dense"]["ratio"] == pytest.approx(1.0, rel=0.2)
    mem = st["memory"]
    compressed = sum(p.numel() * 4 for n, p in model.named_parameters() if p.dim() >= 2)
    assert mem["residue_bytes"] == compressed  # the full unsharded gradient of compressed params
    assert mem["param_bytes_local"] == sum(r.numel() * 4 for r in res[0]["recs"][-1]["shards"].values())
    assert mem["param_bytes_unsharded"] == sum(p.numel() * 4 for p in model.parameters())


def test_resume_is_exact(tmp_path_factory):
    res = _run(tmp_path_factory, "resume", w.resume_worker, 2)
    for rank, r in enumerate(res):
        for n, p in r["full"].items():
            assert _bits_equal(r["resumed"][n], p), (rank, n)
        # control: without the saved residues the run differs
        assert any(not _bits_equal(r["fresh"][n], p) for n, p in r["full"].items())
        assert r["wrong_rank"].startswith("ValueError") and "saved by rank" in r["wrong_rank"]
        assert (r["saved_world"], r["saved_rank"]) == (2, rank)
        assert r["iter"] == 4


@pytest.fixture(scope="module")
def misc(tmp_path_factory):
    """One spawn (W = 2) for mixed precision, an owner's overflow, FSDP's PREMUL_SUM and a
    block nobody ran."""
    return _run(tmp_path_factory, "precision", w.precision_worker, 2)


def test_bf16_params_with_fp32_residues(misc):
    for r in misc:
        a, b = r["bf16-params-fp32-reduce"], r["bf16-reduce"]
        for case, dtype in ((a, "torch.float32"), (b, "torch.bfloat16")):
            assert case["finite"] and case["skipped"] == [False] * 3, case
            assert case["residue_dtypes"] == ["torch.float32"], case
            assert case["residue_abs"] > 0 and math.isfinite(case["residue_abs"]), case
            assert case["dtypes"] == [dtype], case  # what FSDP handed the reduce-scatter
            assert case["ratio_fc"] > 10, case
            assert case["param_dtypes"] == ["torch.float32"]  # sharded params stay fp32


def test_owner_overflow_keeps_every_residue(misc):
    """An owner's sum of finite values overflowed on rank 0 only: every rank, rank 1 whose
    outputs are all finite included, keeps its residues (the step's flag all-reduce)."""
    assert [r["overflow"]["finite_here"] for r in misc] == [False, True]
    for r in misc:
        assert r["overflow"]["skipped"] and r["overflow"]["kept"], r["overflow"]


def test_gradient_divide_factor_uses_premul_sum(misc):
    """set_gradient_divide_factor(2W) makes FSDP ask for PREMUL_SUM(1 / 2W); with twice the
    learning rate the shards equal the AVG run's bit for bit."""
    for r in misc:
        assert r["ops_avg"] == ["RedOpType.AVG"] and r["ops_premul"] == ["RedOpType.PREMUL_SUM"], r
        assert r["premul_equal"]


def test_block_nobody_ran_keeps_its_residue(misc):
    """Step 1 skips blocks.1 on every rank: FSDP's final callback hands it over as zeros; it
    outputs zero and keeps its residue; step 2 uses it again."""
    for r in misc:
        u = r["unused"]
        assert [x["decision"] for x in u] == ["compressed", "zero", "compressed"], u
        assert [x["calls"] for x in u] == [1, 2, 3] and u[1]["grad_zero"] and not u[0]["grad_zero"]
        assert _bits_equal(u[1]["residue"], u[0]["residue"])
        assert not _bits_equal(u[2]["residue"], u[1]["residue"])


def test_start_iter_is_a_plain_reduce_scatter_first(misc):
    """apply_(start_iter=2): two steps equal FSDP2 without AdaComp (up to the order of the
    gloo sum) with every residue zero; the third compresses (residues appear)."""
    for r in misc:
        s = r["start_iter"]
        assert [x["equal"] for x in s[:2]] == [True, True], s
        assert [x["residue_abs"] for x in s[:2]] == [0.0, 0.0], s
        assert s[2]["residue_abs"] > 0 and [x["iter"] for x in s] == [1, 2, 3], s


def test_grad_scaler_run_equals_the_unscaled_run_that_skips(tmp_path_factory):
    """apply_(scaler=GradScaler): the residues follow the scale (growth every 2 steps, back-off
    at rank 1's Inf), so the scaled run's shards equal, bit for bit, those of the unscaled run
    that skips the same step, and its residues are the unscaled ones times the scale."""
    res = _run(tmp_path_factory, "scaler", w.scaler_worker, 2)
    for r in res:
        a, b = r["scaled"], r["plain"]
        assert a["scales"] == [1024.0, 2048.0, 1024.0, 1024.0, 2048.0, 2048.0], a["scales"]
        assert a["skipped"] == b["skipped"] == [False, False, True, False, False, False]
        for n in a["shards"]:
            assert _bits_equal(a["shards"][n], b["shards"][n]), n
        scale = a["scales"][-1]
        assert any(bool(v.any()) for v in b["residues"].values())
        for n in a["residues"]:
            assert torch.equal(a["residues"][n], b["residues"][n] * scale), n


def test_mismatch_raises_on_every_rank_and_hsdp_is_refused(tmp_path_factory):
    res = _run(tmp_path_factory, "errors", w.errors_worker, 2, timeout=180)
    for r in res:
        assert r["hsdp"].startswith("ValueError") and "HSDP" in r["hsdp"], r["hsdp"]
        assert r["mismatch"].startswith("ConfigMismatchError"), r["mismatch"]
        assert "differs between ranks" in r["mismatch"], r["mismatch"]
        assert r["residues_after"] == 0 and r["ledger_entries"] == 0
        assert r["frozen"].startswith("ConfigMismatchError") and "tensors per rank: [4, 3]" in r["frozen"], r
    local0 = res[0]["local"]
    assert local0.startswith("ConfigMismatchError") and "rank(s) [1] failed" in local0, local0
    assert res[1]["local"].startswith("ValueError") and "shape changed" in res[1]["local"], res[1]

"""Workers (spawned with tests/_dist.py, gloo) and the single-process simulation for
tests/test_fsdp.py: AdaComp's compressing reduce-scatter under FSDP2.

The model: a convolution and a 2-row head in the root FSDP module, and two blocks of two
linear layers, each its own FSDP module. With the settings below the conv weight (bin 50),
the linear weights (bin 500) and the head weight (bin 500 clamped; with 3 ranks rank 2's
rows of it are empty) are compressed; the biases go dense.

The schedule (``SCHEDULE``): plain steps; at ``BAD_STEP`` rank 1's gradient of
``head.weight`` gets an Inf (the step is skipped, as ``GradScaler`` would); at ``ACC_STEP``
two micro-batches, the first under ``set_requires_gradient_sync(False)``.
"""

from __future__ import annotations

import io

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

LR = 0.1
CFG = {"bin_size": None, "min_numel": 128}
BAD_STEP = 2
ACC_STEP = 4
STEPS = 6
BATCH = 8


class _PoisonGrad(torch.autograd.Function):
    """Identity forward; backward puts an Inf into the first element of the gradient."""

    @staticmethod
    def forward(ctx, w):
        return w.clone()

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g.view(-1)[0] = float("inf")
        return g


class _HugeRow0(torch.autograd.Function):
    """Identity forward; backward sets row 0 of the gradient to 2e38: finite on every rank,
    but twice it (the owner's sum) overflows fp32."""

    @staticmethod
    def forward(ctx, w):
        return w.clone()

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g[0] = 2e38
        return g


class Block(nn.Module):
    def __init__(self, d_in, d):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d)
        self.fc2 = nn.Linear(d, d)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)      # 864-element weight: bin 50
        self.blocks = nn.ModuleList([Block(512, 96), Block(96, 96)])
        self.head = nn.Linear(96, 2)                    # 192-element weight, 2 rows
        self.poison = False
        self.huge = False
        self.skip_block1 = False

    def forward(self, x):
        h = F.avg_pool2d(F.relu(self.conv(x)), 2).flatten(1)
        for i, b in enumerate(self.blocks):
            if not (self.skip_block1 and i == 1):
                h = F.relu(b(h))
        w = _PoisonGrad.apply(self.head.weight) if self.poison else self.head.weight
        w = _HugeRow0.apply(w) if self.huge else w
        return F.linear(h, w, self.head.bias)


def make_model() -> Net:
    torch.manual_seed(7)
    return Net()


def batch(rank: int, step: int, micro: int = 0):
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    return torch.randn(BATCH, 3, 8, 8, generator=g), torch.randint(0, 2, (BATCH,), generator=g)


def micro_batches(step: int) -> int:
    return 2 if step == ACC_STEP else 1


def poisoned(rank: int, step: int) -> bool:
    return rank == 1 and step == BAD_STEP


def rows(d0: int, world: int, dst: int) -> tuple[int, int]:
    """FSDP2's Shard(0) rows of rank ``dst``: dim 0 padded to a multiple of the world size."""
    k = -(-d0 // world)
    return min(dst * k, d0), min((dst + 1) * k, d0)


# ------------------------------------------------------------------------------ FSDP side

class Recorder:
    """Wraps an installed reduce-scatter and keeps a copy of every input it is handed."""

    def __init__(self, inner, log, fqn):
        self.inner, self.log, self.fqn = inner, log, fqn

    def allocate(self, size, *, dtype, device):
        return self.inner.allocate(size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        self.log.append((self.fqn, input_tensor.detach().clone(), op))
        return self.inner(output_tensor, input_tensor, group, op, async_op)


def build(mp_policy=None, cfg=None, record=None):
    from torch.distributed.fsdp import fully_shard

    from adacomp.parallel import fsdp as adacomp_fsdp

    model = make_model()
    kw = {} if mp_policy is None else {"mp_policy": mp_policy}
    for b in model.blocks:
        fully_shard(b, **kw)
    fully_shard(model, **kw)
    state = adacomp_fsdp.apply_(model, **(cfg or CFG))
    if record is not None:
        for fqn, m in adacomp_fsdp._fsdp_modules(model):
            if fqn in state.comms:
                m.set_custom_reduce_scatter(Recorder(state.comms[fqn], record, fqn))
    return model, state


def local_grads(model, log, world):
    """Each recorded reduce-scatter input, turned back into this rank's local unsharded
    gradients (FSDP's layout: ``W`` chunks, each the concatenation over the group's
    parameters of that rank's padded dim-0 rows)."""
    from adacomp.parallel import fsdp as adacomp_fsdp

    names = {id(p): n for n, p in model.named_parameters()}
    groups = {fqn: m._get_fsdp_state()._fsdp_param_groups[0] for fqn, m in adacomp_fsdp._fsdp_modules(model)
              if m._get_fsdp_state()._fsdp_param_groups}
    out = {}
    for fqn, inp, _ in log:
        fps = groups[fqn].fsdp_params
        shapes = [tuple(fp._orig_size) for fp in fps]
        chunk = [(-(-s[0] // world)) * torch.Size(s[1:]).numel() for s in shapes]
        x = inp.view(world, -1).float()
        off = 0
        for fp, s, c in zip(fps, shapes, chunk):
            row = torch.Size(s[1:]).numel()
            parts = []
            for dst in range(world):
                r0, r1 = rows(s[0], world, dst)
                parts.append(x[dst, off:off + (r1 - r0) * row])
            out[names[id(fp.sharded_param)]] = torch.cat(parts).view(s)
            off += c
    return out


def train_steps(model, state, rank, world, steps, log=None):
    """Run ``steps`` of the schedule; returns per-step records."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    recs = []
    for step in steps:
        opt.zero_grad()
        n_micro = micro_batches(step)
        calls = []
        if log is not None:
            log.clear()
        for micro in range(n_micro):
            last = micro == n_micro - 1
            model.set_requires_gradient_sync(last)
            before = sum(c.calls for c in state.comms.values())
            model.poison = poisoned(rank, step) and last
            x, y = batch(rank, step, micro)
            F.cross_entropy(model(x), y).backward()
            calls.append(sum(c.calls for c in state.comms.values()) - before)
        model.poison = False
        finite = all(bool(torch.isfinite(p.grad.to_local()).all()) for p in model.parameters())
        flag = torch.tensor([0 if finite else 1])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank skips together
        skipped = bool(flag.item())
        if not skipped:
            opt.step()
        rec = {"step": step, "calls": calls, "skipped": skipped, "finite_here": finite,
               "shards": {n: p.to_local().detach().clone() for n, p in model.named_parameters()},
               "residues": {n: state.residue(n).clone() for n in state.names()}}
        if log is not None:
            rec["grads"] = local_grads(model, log, world)
            rec["ops"] = sorted({str(getattr(op, "op", op)) for _, _, op in log})
            rec["dtypes"] = sorted({str(inp.dtype) for _, inp, _ in log})
        recs.append(rec)
    return recs


def exact_worker(rank, world):
    """The schedule, recording inputs, shards and residues after every step."""
    torch.set_num_threads(1)
    log = []
    model, state = build(record=log)
    recs = train_steps(model, state, rank, world, range(STEPS), log=log)
    return {"recs": recs, "stats": state.stats(), "iter": state.iter}


def _save(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def resume_worker(rank, world):
    torch.set_num_threads(1)
    out = {}
    # Uninterrupted: steps 0-3 (plain steps only: 0, 1, 3 and the accumulation-free ones).
    steps_a, steps_b = [0, 1], [3, 5]
    model, state = build()
    train_steps(model, state, rank, world, steps_a)
    sd = _save(state.state_dict())
    shards = {n: p.to_local().detach().clone() for n, p in model.named_parameters()}
    full = train_steps(model, state, rank, world, steps_b)[-1]["shards"]
    # Resumed: a fresh model and state, the shards and the AdaComp state loaded.
    model2, state2 = build()
    with torch.no_grad():
        for n, p in model2.named_parameters():
            p.to_local().copy_(shards[n])
    state2.load_state_dict(sd)
    resumed = train_steps(model2, state2, rank, world, steps_b)[-1]["shards"]
    # Without the AdaComp state (control: residues matter).
    model3, state3 = build()
    with torch.no_grad():
        for n, p in model3.named_parameters():
            p.to_local().copy_(shards[n])
    fresh = train_steps(model3, state3, rank, world, steps_b)[-1]["shards"]
    try:
        state3.load_state_dict(dict(sd, rank=1 - rank))
        wrong = "accepted"
    except ValueError as exc:
        wrong = f"ValueError: {exc}"
    out.update(full=full, resumed=resumed, fresh=fresh, wrong_rank=wrong, saved_world=sd["world"],
               saved_rank=sd["rank"], iter=state2.iter)
    return out


def precision_worker(rank, world):
    """bf16 mixed precision, then an owner's sum that overflows from finite values."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from adacomp.parallel import fsdp as adacomp_fsdp

    torch.set_num_threads(1)
    out = {}
    # Overflow: at step 1 every rank's row 0 of head.weight's gradient is 2e38 (finite); the
    # owner of row 0 (rank 0) sums it to Inf. Rank 1's outputs are all finite, yet it must
    # discard its residue updates of that step too.
    model, state = build()
    before = after = None
    for step in range(2):
        if step == 1:
            before = {n: state.residue(n).clone() for n in state.names()}
            model.huge = True
        rec = train_steps(model, state, rank, world, [step])[0]
        model.huge = False
    after = {n: state.residue(n).clone() for n in state.names()}
    out["overflow"] = {"finite_here": rec["finite_here"], "skipped": rec["skipped"],
                       "kept": all(torch.equal(before[n], after[n]) for n in before)}
    # A gradient divide factor of 2W: FSDP asks for PREMUL_SUM(1 / 2W); with twice the
    # learning rate the shards equal the AVG run's (powers of two: bit for bit at W = 2).
    shards = {}
    for label, factor, lr in (("avg", None, LR), ("premul", 2.0 * world, 2 * LR)):
        log = []
        model, state = build(record=log)
        if factor is not None:
            for _, m in adacomp_fsdp._fsdp_modules(model):  # per FSDP module
                m.set_gradient_divide_factor(factor)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for step in range(2):
            opt.zero_grad()
            x, y = batch(rank, step)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        shards[label] = {n: p.to_local().detach().clone() for n, p in model.named_parameters()}
        out[f"ops_{label}"] = sorted({str(getattr(op, "op", op)) for _, _, op in log})
    out["premul_equal"] = all(torch.equal(shards["avg"][n], shards["premul"][n]) for n in shards["avg"])
    # A block no rank runs on odd steps: FSDP's final callback reduce-scatters it as zeros;
    # it outputs zero and keeps its residue.
    model, state = build()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    unused = []
    for step in range(3):
        skip_block = step % 2 == 1
        opt.zero_grad()
        x, y = batch(rank, step)
        model.skip_block1 = skip_block
        F.cross_entropy(model(x), y).backward()
        model.skip_block1 = False
        opt.step()
        unused.append({"decision": state.stats()["decisions"]["blocks.1.fc1.weight"],
                       "residue": state.residue("blocks.1.fc1.weight").clone(),
                       "grad_zero": not bool(model.blocks[1].fc1.weight.grad.to_local().any()),
                       "calls": state.comms["blocks.1"].calls})
    out["unused"] = unused
    # start_iter=2: the first two steps are FSDP2's plain reduce-scatter (shards equal an FSDP2
    # run without AdaComp's; residues untouched), the third compresses.
    from torch.distributed.fsdp import fully_shard

    plain = make_model()
    for b in plain.blocks:
        fully_shard(b)
    fully_shard(plain)
    model, state = build(cfg=dict(CFG, start_iter=2))
    opts = [torch.optim.SGD(m.parameters(), lr=LR) for m in (plain, model)]
    warm = []
    for step in range(3):
        for m, opt in zip((plain, model), opts):
            opt.zero_grad()
            x, y = batch(rank, step)
            F.cross_entropy(m(x), y).backward()
            opt.step()
        warm.append({"equal": all(torch.allclose(a.to_local(), b.to_local(), rtol=0, atol=1e-6)
                                  for a, b in zip(plain.parameters(), model.parameters())),
                     "residue_abs": sum(float(state.residue(n).abs().sum()) for n in state.names()),
                     "iter": state.iter})
    out["start_iter"] = warm
    for label, policy in (("bf16-params-fp32-reduce", MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                            reduce_dtype=torch.float32)),
                          ("bf16-reduce", MixedPrecisionPolicy(param_dtype=torch.bfloat16))):
        log = []
        model, state = build(mp_policy=policy, record=log)
        recs = train_steps(model, state, rank, world, [0, 1, 3], log=log)
        comp = state.compressor
        out[label] = {
            "finite": all(bool(torch.isfinite(p.to_local()).all()) for p in model.parameters()),
            "skipped": [r["skipped"] for r in recs],
            "residue_dtypes": sorted({str(v.dtype) for v in comp._residues.values()}),
            "residue_abs": sum(float(v.abs().sum()) for v in comp._residues.values()),
            "dtypes": recs[-1]["dtypes"],
            "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
            "ratio_fc": state.stats()["total"]["fc"]["ratio"],
        }
    return out


def errors_worker(rank, world):
    """HSDP is refused; settings that differ on one rank raise on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from adacomp.parallel import fsdp as adacomp_fsdp

    torch.set_num_threads(1)
    out = {}
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    model = make_model()
    fully_shard(model, mesh=mesh)
    try:
        adacomp_fsdp.apply_(model, **CFG)
        out["hsdp"] = "accepted"
    except ValueError as exc:
        out["hsdp"] = f"ValueError: {exc}"
    cfg = dict(CFG, bin_size=100) if rank == 1 else CFG
    model, state = build(cfg=cfg)
    x, y = batch(rank, 0)
    try:
        F.cross_entropy(model(x), y).backward()
        out["mismatch"] = "no error"
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out["mismatch"] = f"{type(exc).__name__}: {exc}"
    out["residues_after"] = sum(float(v.abs().sum()) for v in state.compressor._residues.values())
    out["ledger_entries"] = len(state.ledger.entries)
    # Rank 1 froze a parameter: the ranks hand over different parameters.
    model, state = build()
    if rank == 1:
        model.blocks[1].fc2.bias.requires_grad_(False)
    try:
        F.cross_entropy(model(x), y).backward()
        out["frozen"] = "no error"
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out["frozen"] = f"{type(exc).__name__}: {exc}"
    # A local error on rank 1 before the exchange (its compressor knows another shape for a
    # piece): rank 1 raises its own error, every other rank ConfigMismatchError.
    model, state = build()
    if rank == 1:
        state.compressor._shapes["blocks.1.fc1.weight@rows[48:96]"] = (7,)
    try:
        F.cross_entropy(model(x), y).backward()
        out["local"] = "no error"
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out["local"] = f"{type(exc).__name__}: {exc}"
    return out


# ------------------------------------------------------------------------------ simulation

def simulate(world: int, steps=range(STEPS), cfg=None):
    """The same algorithm in one process: ``world`` plain replicas compute their local
    gradients; per parameter and destination rank each worker compresses its rows with its
    own compressor (bin size of the parameter's shape); a piece goes dense when some
    worker's payload is not smaller than its dense bytes; the owner decodes in rank order
    (dense pieces: summed in rank order) and divides by the world size; a step where any
    worker's gradient is not finite is skipped with every residue kept."""
    from adacomp import AdaComp, decompress_sum

    cfg = cfg or CFG
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_model()
        params = dict(model.named_parameters())
        comps = [AdaComp(**cfg) for _ in range(world)]
        bins = {n: comps[0].bin_size_for(n, p) for n, p in params.items()}
        out = []
        for step in steps:
            grads = []
            for r in range(world):
                model.zero_grad(set_to_none=True)
                n_micro = micro_batches(step)
                for micro in range(n_micro):
                    model.poison = poisoned(r, step) and micro == n_micro - 1
                    x, y = batch(r, step, micro)
                    F.cross_entropy(model(x), y).backward()
                model.poison = False
                grads.append({n: p.grad.detach().clone() for n, p in params.items()})
            bad = any(not bool(torch.isfinite(g[n]).all()) for g in grads for n in g)
            pending, update = [], {}
            for n, p in params.items():
                shape, d0 = tuple(p.shape), p.shape[0]
                row = p[0].numel()
                avg = torch.zeros(p.numel())
                for dst in range(world):
                    r0, r1 = rows(d0, world, dst)
                    if r1 == r0:
                        continue
                    pieces = [g[n].reshape(-1)[r0 * row:r1 * row].view((r1 - r0,) + shape[1:]) for g in grads]
                    acc = torch.zeros((r1 - r0) * row)
                    dense = bins[n] is None
                    if not dense:
                        prepared = [comps[r].prepare(f"{n}@rows[{r0}:{r1}]", pieces[r], bin_size=bins[n])
                                    for r in range(world)]
                        if any(pl.nbytes >= pieces[0].numel() * 4 for pl, _ in prepared):
                            dense = True
                            for r, (_, pend) in enumerate(prepared):
                                comps[r].discard(pend)
                        else:
                            decompress_sum([pl for pl, _ in prepared], acc.view(pieces[0].shape))
                            pending += [(comps[r], pend) for r, (_, pend) in enumerate(prepared)]
                    if dense:
                        for r in range(world):
                            acc.add_(pieces[r].reshape(-1).float())
                    acc.div_(world)
                    avg[r0 * row:r1 * row] = acc
                update[n] = avg.view(shape)
            for comp, pend in pending:
                (comp.discard if bad else comp.commit)(pend)
            if not bad:
                with torch.no_grad():
                    for n, p in params.items():
                        p.add_(update[n], alpha=-LR)
            residues = []
            for r in range(world):
                res = {}
                for n, p in params.items():
                    full = torch.zeros(p.numel())
                    row = p[0].numel()
                    for dst in range(world):
                        r0, r1 = rows(p.shape[0], world, dst)
                        key = f"{n}@rows[{r0}:{r1}]"
                        if r1 > r0 and key in comps[r].names() and bins[n] is not None:
                            full[r0 * row:r1 * row] = comps[r].residue(key).reshape(-1)
                    res[n] = full.view(p.shape)
                residues.append(res)
            out.append({"step": step, "skipped": bad,
                        "params": {n: p.detach().clone() for n, p in params.items()},
                        "residues": residues})
        return out
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ figures

def _report(world: int) -> str:
    """The traffic and memory figures of the schedule on ``world`` gloo processes (rank 0)."""
    import tempfile

    from . import _dist

    with tempfile.TemporaryDirectory() as tmp:
        res = _dist.results(_dist.run(exact_worker, world, out_dir=tmp))
    st = res[0]["stats"]
    lines = [f"FSDP2 + AdaComp, {world} ranks, {STEPS} steps ({CFG}), rank 0:",
             f"{'kind':10}{'FSDP dense B':>14}{'AdaComp B':>12}{'ratio':>9}"]
    for kind in ("conv", "fc", "dense", "overhead", "all"):
        t = st["total"][kind]
        ratio = f"{t['ratio']:.1f}x" if t["ratio"] else "-"
        lines.append(f"{kind:10}{t['dense_bytes']:>14}{t['wire_bytes']:>12}{ratio:>9}")
    m = st["memory"]
    lines.append(f"memory: residues {m['residue_bytes']} B + spare buffers {m['spare_bytes']} B; "
                 f"parameters: this rank's shards {m['param_bytes_local']} B, unsharded "
                 f"{m['param_bytes_unsharded']} B (compressed ones "
                 f"{m['compressed_param_bytes_unsharded']} B)")
    lines.append(f"received from the others: {st['received_bytes']['total']} B")
    return "\n".join(lines)


def wide_worker(rank, world, width=1024, blocks=4, steps=6):
    """A wider MLP (``blocks`` FSDP blocks of ``width x width`` linear layers, a root head):
    bytes and memory after ``steps`` steps, and the mean step time (after the first) with
    FSDP2's dense reduce-scatter and with AdaComp's, on this machine's loopback."""
    import time

    from torch.distributed.fsdp import fully_shard

    from adacomp.parallel import fsdp as adacomp_fsdp

    torch.set_num_threads(1)
    out = {}
    for mode in ("dense", "adacomp"):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(blocks)],
                              nn.Linear(width, 10))
        for b in list(model)[:-1]:
            fully_shard(b)
        fully_shard(model)
        state = adacomp_fsdp.apply_(model) if mode == "adacomp" else None
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        times = []
        for step in range(steps):
            g = torch.Generator().manual_seed(100 * step + rank)
            x, y = torch.randn(32, width, generator=g), torch.randint(0, 10, (32,), generator=g)
            t0 = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        out[mode] = {"step_s": sum(times[1:]) / (steps - 1),
                     "stats": state.stats() if state is not None else None}
    return out


def _report_wide(world: int) -> str:
    import tempfile

    from . import _dist

    with tempfile.TemporaryDirectory() as tmp:
        res = _dist.results(_dist.run(wide_worker, world, out_dir=tmp))
    st = res[0]["adacomp"]["stats"]
    t, m = st["total"], st["memory"]
    return (f"wide MLP (4 x Linear(1024, 1024) blocks + head), {world} ranks, 6 steps, rank 0: "
            f"FSDP dense reduce-scatter {t['all']['dense_bytes']} B, AdaComp {t['all']['wire_bytes']} B "
            f"({t['all']['ratio']:.1f}x; fc {t['fc']['ratio']:.1f}x); residues {m['residue_bytes']} B + "
            f"spare {m['spare_bytes']} B vs this rank's shards {m['param_bytes_local']} B; step time "
            f"(loopback, 1 thread) dense {res[0]['dense']['step_s'] * 1e3:.1f} ms, "
            f"AdaComp {res[0]['adacomp']['step_s'] * 1e3:.1f} ms")


if __name__ == "__main__":  # python -m tests._fsdp_workers [--wide] [world ...]
    import sys

    args = [a for a in sys.argv[1:] if a != "--wide"]
    for ws in args or ["2", "3"]:
        print(_report_wide(int(ws)) if "--wide" in sys.argv else _report(int(ws)))


def scaler_worker(rank, world, steps=6):
    """The same schedule (an Inf on rank 1 at ``BAD_STEP``) twice: with ``torch.amp.GradScaler``
    (``apply_(scaler=...)``, growth every 2 steps, back-off at the Inf) and without a scaler,
    skipping the step whose gradients are not finite. Returns both runs' shards and residues
    and the scales seen."""
    torch.set_num_threads(1)
    out = {}
    for label in ("scaled", "plain"):
        scaler = None
        if label == "scaled":
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
        model, state = build(cfg=dict(CFG, scaler=scaler))
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        scales, skipped = [], []
        for step in range(steps):
            opt.zero_grad()
            model.poison = poisoned(rank, step)
            x, y = batch(rank, step)
            loss = F.cross_entropy(model(x), y)
            model.poison = False
            if scaler is not None:
                scaler.scale(loss).backward()
                before = float(scaler.get_scale())
                scaler.step(opt)
                scaler.update()
                scales.append(float(scaler.get_scale()))
                skipped.append(scales[-1] < before)
            else:
                loss.backward()
                finite = all(bool(torch.isfinite(p.grad.to_local()).all()) for p in model.parameters())
                skipped.append(not finite)
                if finite:
                    opt.step()
        out[label] = {"shards": {n: p.to_local().detach().clone() for n, p in model.named_parameters()},
                      "residues": {n: state.residue(n).clone() for n in state.names()},
                      "scales": scales, "skipped": skipped}
    return out

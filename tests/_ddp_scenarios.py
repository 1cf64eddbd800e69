"""Worker code for the DDP hook tests, and the single-process simulation they compare to.

Both sides build the same model from the same seed and feed rank ``w`` the same batches,
so the hook's parameters must equal the simulation's (docs/algorithm.md section 5).
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import adacomp
from adacomp import _reference
from adacomp.parallel.exchange import SlotCapacity, SlotPlan
from adacomp.payload import shard_bounds
from adacomp.workloads.models import CharLSTM, SmallCNN

LR = 0.05
BATCH = 16


class WithUnused(nn.Module):
    """A CNN with a branch that forward never uses (find_unused_parameters)."""

    def __init__(self):
        super().__init__()
        self.net = SmallCNN(image_size=8, channels=(8, 16, 16), hidden=32)
        self.unused = nn.Linear(64, 40)

    def forward(self, x):
        return self.net(x)


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(1234)
    if kind == "cnn":
        return SmallCNN(image_size=8, channels=(8, 16, 16), hidden=32)
    if kind == "lstm":
        return CharLSTM(vocab_size=24, embed=16, hidden=48, layers=2)
    if kind == "unused":
        return WithUnused()
    raise ValueError(kind)


_DIGITS = {}


def batch(kind: str, rank: int, world: int, step: int):
    if kind == "lstm":
        g = torch.Generator().manual_seed(1000 * step + rank)
        seq = torch.randint(0, 24, (BATCH // 2, 13), generator=g)
        return seq[:, :-1], seq[:, 1:]
    if "x" not in _DIGITS:
        from adacomp.workloads import data

        d = data.load("digits", split="train")
        _DIGITS["x"], _DIGITS["y"] = d.x, d.y
    n = _DIGITS["x"].shape[0]
    start = ((step * world + rank) * BATCH) % (n - BATCH)
    return _DIGITS["x"][start:start + BATCH], _DIGITS["y"][start:start + BATCH]


def loss_of(kind, model, x, y):
    out = model(x)
    if kind == "lstm":
        logits, _ = out
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return F.cross_entropy(out, y)


def digest(model: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for _, p in sorted(model.named_parameters()):
        h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def comp_settings(cfg):
    return {k: cfg[k] for k in ("bin_size", "min_numel", "values", "scale") if k in cfg}


# ---------------------------------------------------------------------------- workers

def train(rank, world, kind, cfg, steps, *, resume=None, save_at=None, dtype=None):
    """DDP training with the AdaComp hook; returns per-step digests, params, stats."""
    model = make_model(kind)
    if dtype is not None:
        model = model.to(dtype)
    ddp = DDP(model, bucket_cap_mb=cfg.get("bucket_cap_mb", 0.01),
              find_unused_parameters=cfg.get("find_unused", False),
              static_graph=cfg.get("static_graph", False))
    state = adacomp.AdaCompState(model=ddp, start_iter=cfg.get("start_iter", 0), log_every=0,
                                 exchange=cfg.get("exchange", "allgather"),
                                 overlap=cfg.get("overlap", True), one_round=cfg.get("one_round", True),
                                 **comp_settings(cfg))
    if "slot_capacity" in cfg:
        state._slots = FixedSlots(cfg["slot_capacity"])
    ddp.register_comm_hook(state, adacomp.adacomp_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    first = 0
    if resume is not None:
        ck = resume[rank]
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        state.load_state_dict(ck["hook"])
        first = ck["step"]
    digests, saved = [], None
    accum = cfg.get("accumulate", 1)
    for step in range(first, steps):
        opt.zero_grad()
        for micro in range(accum):
            x, y = batch(kind, rank, world, step * accum + micro)
            if dtype is not None:
                x = x.to(dtype) if x.is_floating_point() else x
            if micro < accum - 1:
                with ddp.no_sync():
                    loss_of(kind, ddp, x, y).backward()
            else:
                loss_of(kind, ddp, x, y).backward()
        opt.step()
        digests.append(digest(model))
        if save_at is not None and step + 1 == save_at:
            saved = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                     "opt": opt.state_dict(), "hook": state.state_dict(), "step": step + 1}
    residues = {n: state.compressor.residue(n).clone() for n in state.compressor.names()}
    owner = state.owner
    owner_res = {n: owner.residue(n).clone() for n in owner.names()} if owner is not None else {}
    return {"digests": digests, "params": params(model), "stats": state.stats(),
            "residues": residues, "owner_residues": owner_res, "saved": saved, "iter": state.iter}


class FixedSlots(SlotCapacity):
    """Slots of a fixed capacity (bytes after the meta vector), whatever the payloads need:
    a small one makes every one-round exchange overflow into its second all-gather."""

    def __init__(self, capacity):
        super().__init__()
        self.capacity = capacity

    def update(self, key, need, rule_bytes=0, next_allgather=True):
        super().update(key, need, rule_bytes, next_allgather)
        plan = self.plan(key)
        if plan is not None:
            self._groups[key]["plan"] = SlotPlan(self.capacity, plan.merge_dense)


def fail_in_step(rank, world, fail_rank, fail_step, overlap):
    """Rank ``fail_rank`` cannot name a parameter in step ``fail_step`` (after the buckets'
    first exchanges, so in a one-round slot exchange): it raises its own error and every
    other rank a ConfigMismatchError, none hangs."""
    model = make_model("cnn")
    ddp = DDP(model, bucket_cap_mb=0.01)
    state = adacomp.AdaCompState(model=ddp, log_every=0, exchange="allgather", min_numel=64,
                                 overlap=overlap)
    ddp.register_comm_hook(state, adacomp.adacomp_hook)
    for step in range(fail_step + 1):
        if step == fail_step and rank == fail_rank:
            state.bind(named_parameters=[])  # names no parameter: name_of raises KeyError
        x, y = batch("cnn", rank, world, step)
        loss_of("cnn", ddp, x, y).backward()
        if step == fail_step - 1:  # the failing step's exchanges are one-round ones
            assert state.stats()["slots"]["one_round"] > 0, state.stats()["slots"]
    return "no error"


def train_scaler(rank, world, kind, cfg, steps, bad_step, bad_rank):
    """AMP-style training with GradScaler; rank ``bad_rank`` produces an Inf gradient at
    ``bad_step``. Returns params and residues before and after every step."""
    model = make_model(kind)
    ddp = DDP(model, bucket_cap_mb=cfg.get("bucket_cap_mb", 0.01))
    state = adacomp.AdaCompState(model=ddp, log_every=0, exchange=cfg.get("exchange", "allgather"),
                                 **comp_settings(cfg))
    ddp.register_comm_hook(state, adacomp.adacomp_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    history = []
    for step in range(steps):
        x, y = batch(kind, rank, world, step)
        before = params(model)
        res_before = {n: state.compressor.residue(n).clone() for n in state.compressor.names()}
        opt.zero_grad()
        loss = loss_of(kind, ddp, x, y)
        if step == bad_step and rank == bad_rank:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        grads_finite = all(bool(torch.isfinite(p.grad).all())
                           for p in model.parameters() if p.grad is not None)
        scaler.step(opt)
        scaler.update()
        res_after = {n: state.compressor.residue(n).clone() for n in state.compressor.names()}
        history.append({"before": before, "after": params(model), "res_before": res_before,
                        "res_after": res_after, "grads_finite": grads_finite, "scale": scaler.get_scale()})
    return history


def mismatch(rank, world):
    """Rank 1 configures a different bin size: every rank must raise, none may hang."""
    model = make_model("cnn")
    ddp = DDP(model, bucket_cap_mb=0.01)
    state = adacomp.AdaCompState(model=ddp, bin_size=50 if rank == 0 else 64, min_numel=0, log_every=0)
    ddp.register_comm_hook(state, adacomp.adacomp_hook)
    x, y = batch("cnn", rank, world, 0)
    loss_of("cnn", ddp, x, y).backward()
    return "no error"


def init_only(rank, world):
    return dist.get_world_size()


# ---------------------------------------------------------------------------- simulation

def simulate(kind, world, cfg, steps):
    """One process, ``world`` simulated workers, each with its own AdaComp compressor:
    the algorithm of docs/algorithm.md section 1 with the hook's dense/fallback rules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: kernels' float sums depend on thread count
    try:
        return _simulate(kind, world, cfg, steps)
    finally:
        torch.set_num_threads(threads)


def _simulate(kind, world, cfg, steps):
    model = make_model(kind)
    comps = [adacomp.AdaComp(**comp_settings(cfg)) for _ in range(world)]
    owner_residues = {}
    sharded = cfg.get("exchange", "allgather") == "sharded"
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    accum = cfg.get("accumulate", 1)
    start_iter = cfg.get("start_iter", 0)
    digests = []
    for step in range(steps):
        grads = []
        for w in range(world):
            model.zero_grad()
            for micro in range(accum):
                x, y = batch(kind, w, world, step * accum + micro)
                loss_of(kind, model, x, y).backward()
            grads.append({n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                          for n, p in model.named_parameters()})
        for n, p in model.named_parameters():
            gs = [grads[w][n] for w in range(world)]
            if sharded:
                p.grad = average_sharded(comps, owner_residues, n, gs, world, compress=step >= start_iter)
            else:
                p.grad = average(comps, n, gs, world, compress=step >= start_iter)
        opt.step()
        digests.append(digest(model))
    return {"digests": digests, "params": params(model),
            "residues": {n: comps[0].residue(n) for n in comps[0].names()},
            "all_residues": [{n: c.residue(n) for n in c.names()} for c in comps],
            "owner_residues": owner_residues}


def dense_sum(gs):
    acc = gs[0].clone()
    for g in gs[1:]:
        acc += g
    return acc


def average(comps, name, gs, world, compress=True):
    if not compress or comps[0].bin_size_for(name, gs[0]) is None:
        return dense_sum(gs).div_(world)
    prepared = [c.prepare(name, g) for c, g in zip(comps, gs)]
    if any(p.nonfinite for p, _ in prepared):
        for c, (_, pend) in zip(comps, prepared):
            c.discard(pend)
        return torch.full_like(gs[0], math.nan)
    if max(p.nbytes for p, _ in prepared) >= gs[0].numel() * gs[0].element_size():
        for c, (_, pend) in zip(comps, prepared):
            c.discard(pend)
        return dense_sum(gs).div_(world)
    for c, (_, pend) in zip(comps, prepared):
        c.commit(pend)
    out = torch.zeros(gs[0].shape)
    adacomp.decompress_sum([p for p, _ in prepared], out)
    return out.div_(world).to(gs[0].dtype)


def average_sharded(comps, owner_residues, name, gs, world, compress=True):
    """The sharded exchange written out for ``world`` simulated workers: first-level
    payloads as in :func:`average`; the average of each bin-aligned shard is re-selected by
    the reference kernel with a second-level (owner) residue kept per shard."""
    if not compress or comps[0].bin_size_for(name, gs[0]) is None:
        return dense_sum(gs).div_(world)
    n = gs[0].numel()
    L = max(1, min(comps[0].bin_size_for(name, gs[0]), n))
    prepared = [c.prepare_split(name, g, world) for c, g in zip(comps, gs)]
    if any(ps[0].nonfinite for ps, _ in prepared):
        for c, (_, pend) in zip(comps, prepared):
            c.discard(pend)
        return torch.full_like(gs[0], math.nan)
    if max(sum(p.nbytes for p in ps) for ps, _ in prepared) >= n * gs[0].element_size():
        for c, (_, pend) in zip(comps, prepared):
            c.discard(pend)
        return dense_sum(gs).div_(world)
    for c, (_, pend) in zip(comps, prepared):
        c.commit(pend)
    c0 = comps[0]
    out = torch.zeros(n)
    for s, (start, end) in enumerate(shard_bounds(n, L, world)):
        if start == end:
            continue
        avg = torch.zeros(end - start)
        adacomp.decompress_sum([ps[s] for ps, _ in prepared], avg)
        avg.div_(world)
        key = f"{name}@shard[{start}:{end}]"
        res = owner_residues.get(key, torch.zeros(end - start))
        Ls = max(1, min(L, end - start))
        res_new, counts, offsets, q, _, info = _reference.select(
            avg, res, Ls, _reference.SCALE_MODES[c0.scale], _reference.VALUE_MODES[c0.values])
        assert not int(info[1])
        owner_residues[key] = res_new
        bins = torch.repeat_interleave(torch.arange(counts.numel()), counts.to(torch.int64))
        out[start:end][bins * Ls + offsets.to(torch.int64)] = q
    return out.view(gs[0].shape).to(gs[0].dtype)

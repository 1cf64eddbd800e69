"""DDP communication hook overhead: time per training step with each gradient hook, on loopback.

Trains each model for ``--warmup`` + ``--steps`` steps under DistributedDataParallel (gloo
on 127.0.0.1, one spawned process per rank, no rate limit: the link costs next to nothing,
so what is measured is the hook's own cost) with every variant in turn:

* ``none``: DDP's built-in dense fp32 allreduce (no hook registered), the baseline;
* ``fp16``, ``bf16``: PyTorch's ``fp16_compress_hook`` / ``bf16_compress_hook``;
* ``fp16+round`` (a diagnostic, not in the default set): the fp16 hook after one blocking
  all-gather of a 40-integer tensor per bucket, the shape of AdaComp's size exchange, to
  measure what one more collective round per bucket costs;
* ``powersgd``: PyTorch's ``powerSGD_hook``, rank 4 (``--powersgd-rank``), compressing from
  step 2 on (the warm-up covers its dense steps); one bucket at a time, since on gloo its
  collectives, issued from future callbacks, can otherwise run in different orders on
  different ranks and abort the run (see :func:`one_bucket_at_a_time`);
* ``adacomp:allgather``, ``adacomp:sharded``, ``adacomp:auto``: :func:`adacomp.adacomp_hook`
  with that exchange (``auto`` with the default cost model, measured) and the default
  one-round exchange (sizes and payloads in one all-gather of slots after each bucket's
  first exchange);
* ``adacomp:allgather:two-round`` (a diagnostic, not in the default set): the same with
  ``one_round=False`` (sizes first, then payloads, in every exchange).

Models (the project's, as ``launch/train.py`` trains them): ``cnn`` (SmallCNN on 28x28
Fashion-MNIST, SGD), ``lstm`` (the 2 x 256 char-LSTM on Shakespeare, SGD), ``gpt`` (the
``"gpt"`` preset of :data:`adacomp.workloads.models.GPT_PRESETS`, 5.8 M parameters in 78
tensors, on Shakespeare characters, AdamW). Without the data sets, or with ``--synthetic``,
inputs are random tensors of the same shapes (the JSON says which).

All variants of a model are built side by side (same initial weights, same batches); after
each one's warm-up steps (left out: DDP rebuilds its buckets after the first step, PowerSGD
starts compressing at step 2) the timed steps are interleaved, one step of every variant per
round, starting at a different variant each round, so that changes in the machine's load hit
every variant alike (``--sequential``: one variant after another). Every rank times every
step (a barrier before it, so ranks start together; not timed); a step's time is the slowest
rank's, and the figure is the median over the timed steps. Ratios are against the dense
baseline of the same model and world size in the same run, since the machines are shared and
noisy; the 1-minute load average is recorded at every timed step, and per world size and
model before and after.

For the AdaComp variants the hook's time is broken down by wrapping, inside the workers,
the functions the hook calls (``adacomp/parallel`` is not changed): *compress*
(``state.compressor.prepare_bucket``, or ``prepare`` / ``prepare_split``), *setup* (the rest of building the
exchange: configuration hash, size vector), *sizes* (the all-gathers of payload sizes, and
``decide``), *slots* (the one-round exchange's all-gathers of slots, and of the bytes that
overflowed them), *a2a* and *owner* (sharded: the all-to-all to the shard owners; the owners'
decoding and re-compression), *payload* (from handing the payload to its all-gather until
decoding starts: the payload all-gather and the dense allreduce, overlapping the backward
pass where the hook runs them asynchronously), *decode* (``finish``: decode in rank order,
average, copy out) and *hook* (the time DDP's hook call itself takes on the backward
thread). Times are per step (summed over buckets), the median over timed steps of the mean
over ranks. Usage::

    python benchmarks/hook_overhead.py                                 # 2 and 4 ranks, 3 models
    python benchmarks/hook_overhead.py --ranks 2 --models cnn gpt --steps 10 --json results/hook.json
    python benchmarks/hook_overhead.py --quick --models cnn --json /tmp/h.json   # smoke test, < 1 min
"""

# No `from __future__ import annotations`: DDP inspects the hooks' annotations at runtime.
import argparse
import functools
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = ("none", "fp16", "bf16", "powersgd", "adacomp:allgather", "adacomp:sharded", "adacomp:auto")
DIAGNOSTIC_VARIANTS = ("fp16+round", "adacomp:allgather:two-round")
MODELS = ("cnn", "lstm", "gpt")
#: per model: per-rank batch, optimizer and learning rate (as launch/train.py trains them)
MODEL_SETTINGS = {
    "cnn": {"batch": 32, "optimizer": "sgd", "lr": 0.02},
    "lstm": {"batch": 16, "seq_len": 64, "optimizer": "sgd", "lr": 1.0, "momentum": 0.0},
    "gpt": {"batch": 8, "seq_len": 64, "optimizer": "adamw", "lr": 1e-3},
}
#: the AdaComp breakdown, in table order
PARTS = ("hook", "compress", "setup", "sizes", "slots", "a2a", "owner", "payload", "decode")
QUICK = {"ranks": [2], "steps": 3, "warmup": 2, "synthetic": True}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--ranks", nargs="+", type=int, default=None, help="world sizes (default: 2 4)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3, at least 2)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS + DIAGNOSTIC_VARIANTS)
    p.add_argument("--powersgd-rank", type=int, default=4)
    p.add_argument("--overlap", default="default", choices=["default", "on", "off"],
                   help="AdaComp: AdaCompState(overlap=...) where the installed hook has it "
                        "(default: the library's default)")
    p.add_argument("--adamw", default="plain", choices=["plain", "frozen"],
                   help="the GPT's optimizer, the same for every variant: torch.optim.AdamW "
                        "(plain) or adacomp.optim.FrozenVarianceAdamW frozen after the warm-up "
                        "steps (frozen; the README's recipe for AdaComp)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the models and gradients live; cuda: every rank on GPU 0 (gloo "
                        "carries CUDA tensors), steps timed after torch.cuda.synchronize()")
    p.add_argument("--sequential", action="store_true",
                   help="one variant after another (default: timed steps interleaved round by round)")
    p.add_argument("--synthetic", action="store_true", help="random inputs instead of the data sets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per world size before giving up")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {QUICK['ranks']} ranks, {QUICK['warmup']} + {QUICK['steps']} steps, "
                        f"synthetic data (models as given; pass --models cnn for < 1 min)")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    p.add_argument("--worker", metavar="CONFIG", help=argparse.SUPPRESS)  # one rank (internal)
    args = p.parse_args(argv)
    if args.device == "cuda" and not args.worker:
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: this machine has no CUDA device (or torch is a CPU build)")
    quick = QUICK if args.quick else {}
    if args.ranks is None:
        args.ranks = quick.get("ranks", [2, 4])
    if args.steps is None:
        args.steps = quick.get("steps", 10)
    if args.warmup is None:
        args.warmup = quick.get("warmup", 3)
    args.synthetic = args.synthetic or quick.get("synthetic", False)
    if args.steps < 1 or args.warmup < 2:
        p.error("need --steps >= 1 and --warmup >= 2 (DDP rebuilds its buckets after step 1; "
                "PowerSGD compresses from step 2 on)")
    if any(w < 1 for w in args.ranks):
        p.error("--ranks must be positive")
    return args


# ------------------------------------------------------------------------------ worker side

class Recorder:
    """Seconds spent per breakdown part in the current step (any thread; DDP's backward waits
    for every bucket's future, so all of a step's parts land before the step ends)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.parts = {}

    def add(self, part, seconds):
        with self.lock:
            self.parts[part] = self.parts.get(part, 0.0) + seconds

    def take(self) -> dict:
        with self.lock:
            out, self.parts = self.parts, {}
        return out


REC = Recorder()


def _timed(fn, part, rec=REC):
    @functools.wraps(fn)
    def wrapped(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            rec.add(part, time.perf_counter() - t0)

    return wrapped


def instrument_exchange():
    """Wrap (in this process only) the steps of the AdaComp exchange that the DDP hook runs:
    module-level helpers of adacomp.parallel.ddp and GroupExchange methods."""
    from adacomp.parallel import ddp as ddp_mod
    from adacomp.parallel import exchange as ex_mod

    GE = ex_mod.GroupExchange
    ddp_mod._allgather_int64 = _timed(ddp_mod._allgather_int64, "sizes")
    ddp_mod._alltoallv = _timed(ddp_mod._alltoallv, "a2a")
    if hasattr(ddp_mod, "_allgather_slots"):  # releases with the one-round exchange
        ddp_mod._allgather_slots = _timed(ddp_mod._allgather_slots, "slots")
    GE.__init__ = _timed(GE.__init__, "setup")  # compress is subtracted from it afterwards
    GE.decide = _timed(GE.decide, "sizes")
    GE.reduce_owned = _timed(GE.reduce_owned, "owner")

    def mark(fn):
        @functools.wraps(fn)
        def wrapped(self, *a, **k):
            out = fn(self, *a, **k)
            if out is not None and getattr(self, "_bench_issued", None) is None:
                self._bench_issued = time.perf_counter()  # its collective is issued next
            return out

        return wrapped

    GE.payload_buffer = mark(GE.payload_buffer)
    GE.dense_buffer = mark(GE.dense_buffer)
    finish = GE.finish

    @functools.wraps(finish)
    def timed_finish(self, *a, **k):
        t0 = time.perf_counter()
        issued = getattr(self, "_bench_issued", None)
        if issued is not None:
            REC.add("payload", t0 - issued)
        try:
            return finish(self, *a, **k)
        finally:
            REC.add("decode", time.perf_counter() - t0)

    GE.finish = timed_finish


def instrument_state(state):
    """Time this state's compressors (first level, and the owners' re-compression, which
    runs inside ``reduce_owned`` and is counted there)."""
    comp = state.compressor
    comp.prepare = _timed(comp.prepare, "compress")
    comp.prepare_split = _timed(comp.prepare_split, "compress")
    comp.prepare_bucket = _timed(comp.prepare_bucket, "compress")


def timed_hook(hook):
    """``hook`` with the time DDP's call to it takes (the backward thread's share)."""
    import torch
    import torch.distributed as dist

    def wrapped(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        t0 = time.perf_counter()
        try:
            return hook(state, bucket)
        finally:
            REC.add("hook", time.perf_counter() - t0)

    return wrapped


def one_bucket_at_a_time(hook):
    """``hook`` that first waits for the previous bucket's future. PowerSGD issues collectives
    from future callbacks (its Q allreduce): on gloo, with two buckets in flight, ranks can
    then issue them in different orders and abort ("Received data size doesn't match
    expected size"; PyTorch's own PowerSGD parity test skips gloo, pytorch/pytorch#58467).
    Waiting keeps the order (at the cost of less overlap); the arithmetic is unchanged."""
    import torch
    import torch.distributed as dist

    prev = [None]

    def wrapped(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        if prev[0] is not None:
            prev[0].wait()
        fut = hook(state, bucket)
        prev[0] = None if bucket.is_last() else fut
        return fut

    return wrapped


def load_inputs(name, rank, world, cfg):
    """Per-step ``(x, y)`` batches for this rank (its own shard of the data), and the data's name."""
    import torch

    from adacomp.workloads import data as datasets

    s = MODEL_SETTINGS[name]
    n = cfg["warmup"] + cfg["steps"]
    gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + rank)
    if name == "cnn":
        try:
            if cfg["synthetic"]:
                raise datasets.DataNotFound("synthetic")
            d = datasets.load("fashion-mnist", split="train")
            idx = datasets.shard(len(d), rank, world)
            picks = [idx[torch.randint(idx.numel(), (s["batch"],), generator=gen)] for _ in range(n)]
            return [(d.x[i], d.y[i]) for i in picks], "fashion-mnist"
        except datasets.DataNotFound:
            return [(torch.rand(s["batch"], 1, 28, 28, generator=gen),
                     torch.randint(10, (s["batch"],), generator=gen)) for _ in range(n)], "synthetic"
    try:
        if cfg["synthetic"]:
            raise datasets.DataNotFound("synthetic")
        d = datasets.load("shakespeare", split="train", max_chars=1_000_000)
        tokens = d.data[datasets.shard(d.data.numel(), rank, world)]
        batches = [datasets.sample_char_batch(tokens, s["batch"], s["seq_len"], gen) for _ in range(n)]
        return batches, "shakespeare"
    except datasets.DataNotFound:
        x = torch.randint(84, (n, s["batch"], s["seq_len"] + 1), generator=gen)
        return [(b[:, :-1], b[:, 1:]) for b in x], "synthetic"


def build(name):
    from adacomp.workloads.models import build_model

    if name == "cnn":
        return build_model("cnn", in_channels=1, num_classes=10, image_size=28)
    if name == "lstm":
        return build_model("lstm", vocab_size=84, hidden=256)
    return build_model("gpt", preset="gpt")  # the shape: vocab 2048, 5.8 M parameters


def make_optimizer(name, model, cfg):
    import torch

    s = MODEL_SETTINGS[name]
    if s["optimizer"] == "adamw":
        decay = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
        if cfg["adamw"] == "frozen":
            from adacomp.optim import FrozenVarianceAdamW

            return FrozenVarianceAdamW(groups, lr=s["lr"], betas=(0.9, 0.95), freeze_step=cfg["warmup"])
        return torch.optim.AdamW(groups, lr=s["lr"], betas=(0.9, 0.95))
    return torch.optim.SGD(model.parameters(), lr=s["lr"], momentum=s.get("momentum", 0.9))


def attach(ddp, model, variant, cfg):
    """Register ``variant``'s hook; return the AdaComp state (or None)."""
    import inspect

    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

    from adacomp import AdaCompState, adacomp_hook

    if variant == "none":
        return None
    if variant in ("fp16", "bf16"):
        hook = getattr(default_hooks, f"{variant}_compress_hook")
        ddp.register_comm_hook(None, timed_hook(hook))
        return None
    if variant == "fp16+round":
        import torch
        import torch.distributed as dist

        def fp16_after_a_round(state, bucket):
            sizes = torch.zeros(40, dtype=torch.int64)
            out = torch.empty(40 * dist.get_world_size(), dtype=torch.int64)
            dist.all_gather_into_tensor(out, sizes)  # blocking, as AdaComp's size exchange
            return default_hooks.fp16_compress_hook(state, bucket)

        ddp.register_comm_hook(None, timed_hook(fp16_after_a_round))
        return None
    if variant == "powersgd":
        st = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=cfg["powersgd_rank"],
                                start_powerSGD_iter=2, random_seed=cfg["seed"])
        ddp.register_comm_hook(st, timed_hook(one_bucket_at_a_time(psgd.powerSGD_hook)))
        return None
    _, exchange, *how = variant.split(":")
    kw = {"exchange": exchange, "log_every": 0}
    if how == ["two-round"]:
        kw["one_round"] = False
    if cfg["overlap"] != "default":
        if "overlap" not in inspect.signature(AdaCompState).parameters:
            raise SystemExit("--overlap: this AdaCompState has no overlap option")
        kw["overlap"] = cfg["overlap"] == "on"
    state = AdaCompState(model=ddp, **kw)
    instrument_state(state)
    ddp.register_comm_hook(state, timed_hook(adacomp_hook))
    return state


class VariantRun:
    """One variant's DDP model, optimizer and hook, stepped one step at a time."""

    def __init__(self, name, variant, batches, world, cfg):
        import torch
        from torch.nn.parallel import DistributedDataParallel as DDP

        torch.manual_seed(cfg["seed"])  # every variant starts from the same weights
        self.name, self.variant, self.batches, self.world, self.cfg = name, variant, batches, world, cfg
        self.device = torch.device("cuda", 0) if cfg.get("device") == "cuda" else torch.device("cpu")
        self.model = build(name).to(self.device)
        self.opt = make_optimizer(name, self.model, cfg)
        self.ddp = DDP(self.model, device_ids=[0] if self.device.type == "cuda" else None)
        self.state = attach(self.ddp, self.model, variant, cfg)
        self.done = 0
        self.steps = []

    def step(self, timed: bool) -> float:
        """Train on the next batch; record it if ``timed``. Returns its seconds."""
        import torch
        import torch.distributed as dist
        import torch.nn.functional as F

        x, y = self.batches[self.done]
        x, y = x.to(self.device), y.to(self.device)
        self.done += 1
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        dist.barrier()  # all ranks start the step together (not timed)
        REC.take()
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        out = self.ddp(x)
        logits = out[0] if isinstance(out, tuple) else out
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        if self.name != "cnn":  # text models clip, as launch/train.py does
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        sync()
        t3 = time.perf_counter()
        parts = REC.take()
        if "setup" in parts:  # building the exchange includes compressing
            parts["setup"] = max(0.0, parts["setup"] - parts.get("compress", 0.0))
        if timed:
            self.steps.append({"step": t3 - t0, "fwd": t1 - t0, "bwd": t2 - t1, "opt": t3 - t2,
                               "loss": loss.item(), "parts": parts, "load1": os.getloadavg()[0]})
        return t3 - t0

    def result(self, rank) -> dict:
        row = {"model": self.name, "variant": self.variant, "world": self.world, "rank": rank,
               "steps": self.steps}
        if self.state is not None:
            st = self.state.stats()
            row["exchanges"] = st.get("exchanges", {})
            row["slots"] = st.get("slots", {})
            t = st["total"]["all"]
            row["wire_bytes_per_step"] = t["wire_bytes"] / max(1, self.state.iter)
            row["ratio"] = t["ratio"]
            row["overlap"] = getattr(self.state, "overlap", None)
        return row


def run_model(name, batches, rank, world, cfg) -> list[dict]:
    """Every variant of one model: warm-up steps first, then the timed steps. Interleaved
    (default): round k runs one step of every variant, starting at variant k mod n, so that
    a change in the machine's load hits every variant alike; else one variant after another."""
    import gc

    variants = cfg["variants"]
    runs = []
    if cfg["interleave"]:
        runs = [VariantRun(name, v, batches, world, cfg) for v in variants]
        for run in runs:
            for _ in range(cfg["warmup"]):
                run.step(timed=False)
        for k in range(cfg["steps"]):
            for j in range(len(runs)):
                runs[(k + j) % len(runs)].step(timed=True)
        rows = [run.result(rank) for run in runs]
    else:
        rows = []
        for v in variants:
            run = VariantRun(name, v, batches, world, cfg)
            for i in range(cfg["warmup"] + cfg["steps"]):
                run.step(timed=i >= cfg["warmup"])
            rows.append(run.result(rank))
            del run
            gc.collect()
    del runs
    gc.collect()
    if rank == 0:
        for r in rows:
            med = statistics.median(s["step"] for s in r["steps"])
            print(f"  W={world} {name:<5} {r['variant']:<18} {1e3 * med:8.1f} ms/step (rank 0)",
                  file=sys.stderr, flush=True)
    return rows


def worker(config_path):
    import gc

    import torch
    import torch.distributed as dist

    with open(config_path) as f:
        cfg = json.load(f)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(cfg["threads"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    instrument_exchange()
    rows, info = [], {}
    for name in cfg["models"]:
        batches, data_name = load_inputs(name, rank, world, cfg)
        m = build(name)
        load_before = os.getloadavg()
        rows += run_model(name, batches, rank, world, cfg)
        info[name] = {"data": data_name, "params": sum(p.numel() for p in m.parameters()),
                      "tensors": len(list(m.parameters())), **MODEL_SETTINGS[name],
                      "load_before": [round(x, 2) for x in load_before],
                      "load_after": [round(x, 2) for x in os.getloadavg()]}
    with open(os.path.join(cfg["out_dir"], f"rank{rank}.json"), "w") as f:
        json.dump({"rows": rows, "models": info}, f)
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # Gloo's threads can still hold finished work at interpreter exit (pytorch/pytorch#179291,
    # see adacomp.workloads.training.run_and_exit): leave without finalization.
    os._exit(0)


# ------------------------------------------------------------------------------ driver side

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(p: subprocess.Popen) -> None:
    """End a rank this script started (it leads its own session) and its children."""
    if p.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(5)
            return
        except subprocess.TimeoutExpired:
            pass


def run_world(world, args) -> dict:
    """Spawn ``world`` ranks on loopback; return their rows and model info."""
    out_dir = tempfile.mkdtemp(prefix="hook_overhead_")
    try:
        cfg = {"models": args.models, "variants": args.variants, "steps": args.steps, "warmup": args.warmup,
               "seed": args.seed, "threads": args.threads, "synthetic": args.synthetic,
               "powersgd_rank": args.powersgd_rank, "overlap": args.overlap, "adamw": args.adamw,
               "device": args.device, "out_dir": out_dir,
               "interleave": not args.sequential}
        config = os.path.join(out_dir, "config.json")
        with open(config, "w") as f:
            json.dump(cfg, f)
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world),
                   OMP_NUM_THREADS=str(args.threads), GLOO_SOCKET_IFNAME="lo")
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", config],
                                  env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), start_new_session=True)
                 for r in range(world)]
        try:
            deadline = time.time() + args.timeout
            while any(p.poll() is None for p in procs):
                failed = [p for p in procs if p.poll() not in (None, 0)]
                if failed:
                    raise RuntimeError(f"a rank failed (exit {failed[0].returncode}) at W={world}")
                if time.time() > deadline:
                    raise RuntimeError(f"W={world} did not finish within --timeout {args.timeout:g} s")
                time.sleep(0.2)
            if any(p.returncode != 0 for p in procs):
                raise RuntimeError(f"ranks exited with {[p.returncode for p in procs]} at W={world}")
        finally:
            for p in procs:
                _kill(p)
        per_rank = []
        for r in range(world):
            with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                per_rank.append(json.load(f))
        return {"per_rank": per_rank}
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def combine(world, per_rank, variants) -> list[dict]:
    """One row per (model, variant): per step the slowest rank's time, medians over steps."""
    rows = []
    for i, r0 in enumerate(per_rank[0]["rows"]):
        ranks = [pr["rows"][i] for pr in per_rank]
        n = len(r0["steps"])
        step = [max(rk["steps"][k]["step"] for rk in ranks) for k in range(n)]
        row = {"model": r0["model"], "variant": r0["variant"], "world": world,
               "step_ms": 1e3 * statistics.median(step), "step_ms_all": [round(1e3 * t, 3) for t in step]}
        if n >= 2:  # the spread of the timed steps: first and third quartile
            q = statistics.quantiles(step, n=4)
            row["step_ms_quartiles"] = [round(1e3 * q[0], 3), round(1e3 * q[2], 3)]
        for key in ("fwd", "bwd", "opt"):
            row[f"{key}_ms"] = 1e3 * statistics.median(
                statistics.mean(rk["steps"][k][key] for rk in ranks) for k in range(n))
        row["loss_last"] = statistics.mean(rk["steps"][-1]["loss"] for rk in ranks)
        row["load1_median"] = statistics.median(s["load1"] for s in r0["steps"])  # rank 0's view
        if r0["variant"] != "none":
            parts = {}
            for part in PARTS:
                vals = [statistics.mean(rk["steps"][k]["parts"].get(part, 0.0) for rk in ranks)
                        for k in range(n)]
                parts[part] = 1e3 * statistics.median(vals)
            row["breakdown_ms"] = parts if r0["variant"].startswith("adacomp") else {"hook": parts["hook"]}
        for key in ("exchanges", "slots", "wire_bytes_per_step", "ratio", "overlap"):
            if key in r0:
                row[key] = r0[key]
        rows.append(row)
    dense = {(r["model"], r["world"]): r["step_ms"] for r in rows if r["variant"] == "none"}
    for r in rows:
        base = dense.get((r["model"], r["world"]))
        r["vs_dense"] = r["step_ms"] / base if base else None
    return rows


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _source_state() -> dict:
    """Which adacomp/parallel code was measured: a hash of the hook's sources, and whether
    they differ from the last commit (other work may be under way in the checkout)."""
    files = [os.path.join(ROOT, "adacomp", "parallel", f) for f in ("ddp.py", "exchange.py")]
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            h.update(f.read())
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *files], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        dirty, commit = "", ""
    return {"sha256": h.hexdigest()[:16], "commit": commit, "uncommitted_changes": bool(dirty)}


def table(res) -> str:
    rows, variants = res["rows"], res["meta"]["variants"]
    short = {"none": "dense", "powersgd": f"psgd r{res['meta']['powersgd_rank']}",
             "adacomp:allgather": "ada/allgather", "adacomp:sharded": "ada/sharded",
             "adacomp:auto": "ada/auto", "adacomp:allgather:two-round": "ada/ag 2 rnd"}
    by = {(r["model"], r["world"], r["variant"]): r for r in rows}
    keys = sorted({(r["model"], r["world"]) for r in rows},
                  key=lambda k: (res["meta"]["models"].index(k[0]), k[1]))
    w = 15
    head = f"{'model':<6} {'W':>2} " + " ".join(f"{short.get(v, v):>{w}}" for v in variants) + "   load"
    lines = ["median ms per step (slowest rank) and ratio to dense in the same run; load: median "
             "1-min load average during the timed steps", head, "-" * len(head)]
    for m, world in keys:
        cells = []
        for v in variants:
            r = by.get((m, world, v))
            if r is None:
                cells.append(f"{'-':>{w}}")
            elif v == "none":
                cells.append(f"{r['step_ms']:>{w}.1f}")
            else:
                ratio = f"({r['vs_dense']:.2f}x)" if r["vs_dense"] else ""
                cells.append(f"{r['step_ms']:>8.1f} {ratio}".rstrip().rjust(w))
        load = statistics.median(r["load1_median"] for r in rows if r["model"] == m and r["world"] == world)
        lines.append(f"{m:<6} {world:>2} " + " ".join(cells) + f" {load:>6.1f}")
    ada = [r for r in rows if r["variant"].startswith("adacomp")]
    if ada:
        lines += ["", "AdaComp per step, ms (median over steps of the mean over ranks); step = whole step, "
                      "bwd = backward incl. waiting for the exchanges"]
        head = (f"{'model':<6} {'W':>2} {'exchange':<12} {'step':>7} {'bwd':>7} "
                + " ".join(f"{p:>8}" for p in PARTS) + f" {'ratio':>7}  modes")
        lines += [head, "-" * len(head)]
        for r in sorted(ada, key=lambda r: (res["meta"]["models"].index(r["model"]), r["world"])):
            b = r["breakdown_ms"]
            modes = ",".join(f"{k} {v}" for k, v in sorted(r.get("exchanges", {}).items()) if v)
            sl = r.get("slots") or {}
            if sl.get("one_round"):
                modes += f" (one round {sl['one_round']}, overflowed {sl.get('overflow', 0)})"
            exchange = r["variant"].split(":", 1)[1].replace(":two-round", " 2r")
            lines.append(f"{r['model']:<6} {r['world']:>2} {exchange:<12} {r['step_ms']:>7.1f} "
                         f"{r['bwd_ms']:>7.1f} " + " ".join(f"{b[p]:>8.2f}" for p in PARTS)
                         + f" {r.get('ratio', 0):>6.1f}x  {modes}")
    meta = res["meta"]
    lines += ["", f"{meta['warmup']} warm-up + {meta['steps']} timed steps; gloo on loopback, no rate limit; "
                  f"{meta['threads']} thread(s) per rank on {meta['cpu_count']} CPUs; "
                  f"tensors on {meta.get('device', 'cpu')}; adacomp backend "
                  f"{meta['adacomp_backend']}, torch {meta['torch']}",
              "load average (1/5/15 min): "
              + "; ".join(f"W={w}: {v['load_before']} before, {v['load_after']} after"
                          for w, v in meta["per_world"].items())]
    lines.append("models: " + "; ".join(
        f"{m} {i['params'] / 1e6:.2f} M params in {i['tensors']} tensors, batch {i['batch']}"
        + (f"x{i['seq_len']}" if "seq_len" in i else "") + f", {i['optimizer']}"
        + (" (FrozenVarianceAdamW, frozen after the warm-up)" if i["optimizer"] == "adamw"
           and meta.get("adamw") == "frozen" else "") + f", {i['data']}"
        for m, i in meta["model_info"].items()))
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return {}
    import torch

    import adacomp

    cli = sys.argv[1:] if argv is None else list(argv)
    meta = {"command": " ".join(["python", os.path.relpath(__file__, ROOT)] + cli),
            "models": args.models, "variants": args.variants, "ranks": args.ranks, "steps": args.steps,
            "warmup": args.warmup, "threads": args.threads, "powersgd_rank": args.powersgd_rank,
            "overlap": args.overlap, "adamw": args.adamw, "synthetic": args.synthetic,
            "interleaved": not args.sequential,
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "device": args.device,
            "adacomp_backend": adacomp.ops.backend(args.device),
            "python": platform.python_version(),
            "machine": platform.machine(), "link": "gloo on 127.0.0.1, no rate limit",
            "source": _source_state(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "per_world": {}}
    rows = []
    for world in args.ranks:
        before = _load()
        t0 = time.time()
        out = run_world(world, args)
        models = out["per_rank"][0]["models"]
        meta["per_world"][str(world)] = {"load_before": before, "load_after": _load(),
                                         "wall_s": round(time.time() - t0, 1),
                                         "models": {m: {k: i[k] for k in ("load_before", "load_after")}
                                                    for m, i in models.items()}}
        meta["model_info"] = {m: {k: v for k, v in i.items() if not k.startswith("load")}
                              for m, i in models.items()}
        rows += combine(world, out["per_rank"], args.variants)
    res = {"meta": meta, "rows": rows}
    print(table(res))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    main()

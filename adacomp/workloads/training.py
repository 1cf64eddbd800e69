"""The main job: data-parallel training that compares gradient compressors side by side.

Run by ``launch/train.py`` under ``torchrun`` (or ``python -m torch.distributed.run``)::

    torchrun --standalone --nproc_per_node 2 launch/train.py
    torchrun --nproc_per_node 4 launch/train.py --model lstm --data shakespeare \\
        --compressor none adacomp --epochs 1 --json results/lstm.json
    torchrun --nproc_per_node 2 launch/train.py --model gpt --data shakespeare \\
        --compressor none adacomp --max-steps 200

Models: ``cnn`` (image data), ``lstm`` and ``gpt`` (text: character-level next-token
prediction; the GPT is the ``--gpt-preset`` of :data:`adacomp.workloads.models.GPT_PRESETS`
with the corpus's vocabulary, trained on ``--seq-len`` windows with AdamW and a cosine
schedule by default; the CNN and the LSTM with SGD and momentum at a constant rate).

Every compressor in ``--compressor`` trains the same model from the same seed on the same
data shards, one after the other, through DDP with that compressor's communication hook:

* ``none``: PyTorch's allreduce hook (dense fp32),
* ``fp16``: PyTorch's ``fp16_compress_hook``,
* ``bf16``: PyTorch's ``bf16_compress_hook`` (the 16-bit baseline for bf16 training),
* ``powersgd``: PyTorch's ``PowerSGDState`` / ``powerSGD_hook`` (rank ``--powersgd-rank``),
* ``adacomp``: this project's :func:`adacomp.adacomp_hook`.

``--autocast bf16`` runs forward and loss under ``torch.autocast(<device>, torch.bfloat16)``
(weights, gradients and optimizer state stay fp32; validation runs in fp32 either way).

Rank 0 shows a progress bar, prints a summary table (accuracy or validation loss / bits per
character, wall time, compression ratio by layer kind, bytes per worker on the wire) and
writes ``--json`` and ``--plot`` (loss curves and cumulative bytes).
"""

# No `from __future__ import annotations`: DDP inspects hook annotations at runtime.
import argparse
import gc
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
from torch.nn.parallel import DistributedDataParallel as DDP

from ..optim import FrozenVarianceAdamW
from ..parallel.ddp import AdaCompState, adacomp_hook
from ..parallel.exchange import CostModel, MeasuredCost
from ..stats import TrafficStats, layer_kind, ring_allreduce_received
from . import data as datasets
from .models import GPT_PRESETS, CharGPT, build_model

COMPRESSORS = ("none", "fp16", "bf16", "powersgd", "adacomp")
IMAGE_DATA = ("digits", "mnist", "fashion-mnist")
TEXT_DATA = ("shakespeare",)
IMAGE_MODELS = ("cnn",)
TEXT_MODELS = ("lstm", "gpt")
#: per optimizer: its default learning rate (--lr)
DEFAULT_LR = {"sgd": 0.05, "adamw": 1e-3}
#: AdaComp with AdamW: dense warm-up steps that estimate AdamW's second moment, which is then
#: frozen (adacomp.optim.FrozenVarianceAdamW; docs/results.md, "GPT with AdamW in bf16")
ADAMW_FREEZE_STEP = 30


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default unless it is None or its help already says it."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Data-parallel training comparing gradient compressors.",
                                formatter_class=_DefaultsFormatter)
    p.add_argument("--compressor", nargs="+", default=["none", "adacomp"], choices=COMPRESSORS,
                   help="compressors to train with, one after the other")
    p.add_argument("--model", default=None, choices=list(IMAGE_MODELS + TEXT_MODELS),
                   help="default: cnn for image data, lstm for text (gpt: a GPT-style transformer)")
    p.add_argument("--data", default="digits", choices=IMAGE_DATA + TEXT_DATA)
    p.add_argument("--data-root", default=None, help="where the data set lies (default: its usual place)")
    p.add_argument("--epochs", type=float, default=10)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no limit)")
    p.add_argument("--batch-size", type=int, default=32, help="per worker")
    p.add_argument("--optimizer", default=None, choices=list(DEFAULT_LR),
                   help="default: adamw for gpt, sgd (with --momentum) otherwise")
    p.add_argument("--lr", type=float, default=None,
                   help=f"default: {DEFAULT_LR['sgd']} for sgd, {DEFAULT_LR['adamw']} for adamw")
    p.add_argument("--momentum", type=float, default=0.9, help="sgd")
    p.add_argument("--weight-decay", type=float, default=0.1, help="adamw (matrices only)")
    p.add_argument("--freeze-step", type=int, default=None,
                   help="adamw: freeze the second moment after this many steps in every run "
                        "(adacomp.optim.FrozenVarianceAdamW; 0: plain AdamW everywhere). Default: "
                        f"the transformer recipe for adacomp runs ({ADAMW_FREEZE_STEP} dense AdamW "
                        "steps, then the second moment frozen and compression on: --start-iter is "
                        "raised to it), plain AdamW for the others")
    p.add_argument("--schedule", default=None, choices=["constant", "cosine"],
                   help="learning rate: constant, or cosine decay to 10%% after a linear warm-up "
                        "(--warmup-steps); default: cosine for gpt, constant otherwise")
    p.add_argument("--warmup-steps", type=int, default=20, help="cosine schedule: linear warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-chars", type=int, default=1_000_000, help="text: characters of the corpus used")
    p.add_argument("--seq-len", type=int, default=64,
                   help="text: BPTT length (lstm), context length (gpt, at most its block size)")
    p.add_argument("--hidden", type=int, default=256, help="lstm: hidden size")
    p.add_argument("--gpt-preset", default="gpt", choices=list(GPT_PRESETS),
                   help="gpt: sizes (models.GPT_PRESETS; the vocabulary comes from the data)")
    p.add_argument("--gpt-layers", type=int, default=None, help="gpt: blocks (default: the preset's)")
    p.add_argument("--gpt-embd", type=int, default=None, help="gpt: width (default: the preset's)")
    p.add_argument("--gpt-heads", type=int, default=None, help="gpt: attention heads (default: the preset's)")
    p.add_argument("--dropout", type=float, default=0.0, help="gpt: dropout")
    p.add_argument("--autocast", default="none", choices=["none", "bf16"],
                   help="forward and loss under torch.autocast in bfloat16 (fp32 master weights)")
    p.add_argument("--bin-size", type=_bin_size_arg, default=None,
                   help="adacomp: one bin size for all, or per parameter name 'SUBSTR=N,...,N' (the "
                        "first SUBSTR found in the name wins, a bare N is the rest; default: the paper's)")
    p.add_argument("--min-numel", type=int, default=1024, help="adacomp: smaller tensors go dense")
    p.add_argument("--values", default="ternary", choices=["ternary", "fp16", "fp32"])
    p.add_argument("--scale", default="binmax_mean", choices=["binmax_mean", "selected_mean"])
    p.add_argument("--start-iter", type=int, default=0, help="adacomp/powersgd: dense steps first")
    p.add_argument("--exchange", default="auto", choices=["allgather", "sharded", "auto"],
                   help="adacomp: how payloads travel (auto: per bucket and step, by the cost model)")
    p.add_argument("--one-round", default="on", choices=["on", "off"],
                   help="DDP backend, adacomp: after a bucket's first exchange, sizes and payloads in "
                        "one all-gather of padded slots (on: AdaCompState(one_round=True), the "
                        "default) or sizes first, then payloads, unpadded (off)")
    p.add_argument("--overlap", default="on", choices=["on", "off"],
                   help="DDP backend, adacomp: each bucket's whole exchange on a worker thread (on: "
                        "AdaCompState(overlap=True), the default) or the size exchange on the hook's "
                        "thread (off)")
    p.add_argument("--cost-model", default="measured", choices=["measured", "link"],
                   help="adacomp auto: measured (times each mode during the run: MeasuredCost) or "
                        "link (bytes and rounds on --link-mbps / --link-latency-ms: CostModel)")
    p.add_argument("--link-mbps", type=float, default=1000.0,
                   help="adacomp auto with --cost-model link: link bandwidth, Mbit/s")
    p.add_argument("--link-latency-ms", type=float, default=0.1,
                   help="adacomp auto with --cost-model link: latency per collective round, ms")
    p.add_argument("--powersgd-rank", type=int, default=4)
    p.add_argument("--bucket-cap-mb", type=float, default=25)
    p.add_argument("--log-every", type=int, default=10, help="steps between loss records")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PATH", default=None,
                   help="write loss and bytes curves as PNG ('' for none; default: "
                        "results/train_<data>_<backend>.png, one file per launcher)")
    p.add_argument("--backend", default="ddp", choices=["ddp", "horovod", "mpi", "fsdp"],
                   help="integration: DDP hooks (torchrun), Horovod (horovodrun), mpi4py (mpiexec), "
                        "FSDP2 reduce-scatter (torchrun; none and adacomp)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.model is None:
        args.model = "lstm" if args.data in TEXT_DATA else "cnn"
    if args.optimizer is None:
        args.optimizer = "adamw" if args.model == "gpt" else "sgd"
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    if args.schedule is None:
        args.schedule = "cosine" if args.model == "gpt" else "constant"
    if args.plot is None:
        args.plot = default_plot_path(args)
    unsupported = {"horovod": {"powersgd", "bf16"},
                   "mpi": {"powersgd", "fp16", "bf16"},
                   "fsdp": {"powersgd", "fp16", "bf16"}}.get(args.backend, set())
    bad = sorted(set(args.compressor) & unsupported)
    if bad:
        p.error(f"--compressor {' '.join(bad)} is not available with --backend {args.backend} "
                f"(PowerSGD, fp16 and bf16 are DDP hooks; the mpi4py and FSDP2 paths offer none "
                f"and adacomp)")
    if (args.model in TEXT_MODELS) != (args.data in TEXT_DATA):
        p.error(f"--model {args.model} does not fit --data {args.data}: cnn takes image data "
                f"({', '.join(IMAGE_DATA)}), lstm and gpt take text ({', '.join(TEXT_DATA)})")
    block = GPT_PRESETS[args.gpt_preset]["block_size"]
    if args.model == "gpt" and args.seq_len > block:
        p.error(f"--seq-len {args.seq_len} exceeds the block size {block} of --gpt-preset {args.gpt_preset}")
    return args


class BinSizeByName:
    """``--bin-size`` per parameter name: ``[(substring, size), ...]`` tried in order, then
    ``rest`` (None: the paper's default for that tensor)."""

    def __init__(self, rules, rest):
        self.rules, self.rest = rules, rest

    def __call__(self, name, tensor):
        for sub, size in self.rules:
            if sub in name:
                return size
        if self.rest is not None:
            return self.rest
        from ..compressor import default_bin_size

        return default_bin_size(tensor)

    def __repr__(self):
        return ",".join([f"{s}={n}" for s, n in self.rules] + ([str(self.rest)] if self.rest else []))


def _bin_size_arg(text: str):
    if "=" not in text:
        return int(text)
    rules, rest = [], None
    for part in text.split(","):
        if "=" in part:
            sub, n = part.split("=", 1)
            rules.append((sub, int(n)))
        else:
            rest = int(part)
    return BinSizeByName(rules, rest)


def _started_by_mpiexec() -> bool:
    return "RANK" not in os.environ and ("OMPI_COMM_WORLD_SIZE" in os.environ or "PMI_SIZE" in os.environ)


def default_plot_path(args) -> str:
    """``results/train_<data>_<backend>.png`` (``..._ddp-mpiexec.png`` for the DDP hook under
    mpiexec): runs of the same job under different launchers do not overwrite each other's plot."""
    launcher = "-mpiexec" if args.backend == "ddp" and _started_by_mpiexec() else ""
    return os.path.join("results", f"train_{args.data}_{args.backend}{launcher}.png")


# ------------------------------------------------------------------------------ progress

#: what the bar looks like; benchmarks/netbench.py parses it (its ``PROGRESS`` pattern)
BAR_FORMAT = "{desc:>9} [{bar:30}] {n}/{total}{postfix}, {rate_fmt}"


def progress_bar(total: int, label: str, enabled: bool):
    """A tqdm bar on stderr for rank 0, redrawn at every loss record (``--log-every``).

    Off where ``enabled`` is false (other ranks, ``--quiet``) and where stderr is not a
    terminal (a log file gets the summary table, not a redrawn bar)."""
    import shutil

    from tqdm import tqdm

    # a terminal that reports no size (a bare pty, as netbench's) would make tqdm print nothing
    cols, rows = shutil.get_terminal_size((100, 24))
    return tqdm(total=total, desc=label, bar_format=BAR_FORMAT, ascii=" #", mininterval=0, miniters=1,
                disable=not (enabled and sys.stderr.isatty()), file=sys.stderr, ncols=cols, nrows=rows)


# ------------------------------------------------------------------------------ hooks

class _Counting:
    """Wraps a PyTorch hook state to count the bytes it hands to collectives."""

    def __init__(self, inner, kind: str, world: int, rank_pg: int = 4):
        self.inner, self.kind, self.world, self.rank = inner, kind, world, rank_pg
        self.traffic = TrafficStats()
        self.step = 0
        self.pending = None  # the previous bucket's future (serialized hooks)

    def count(self, bucket) -> None:
        for g in bucket.gradients():
            dense = g.numel() * 4
            if self.kind == "none":
                wire = g.numel() * g.element_size()
            elif self.kind in ("fp16", "bf16"):
                wire = g.numel() * 2
            else:  # PowerSGD: P and Q of rank r for matrices it compresses, else dense
                wire = g.numel() * g.element_size()
                if g.dim() > 1 and self.step >= self.inner.start_powerSGD_iter:
                    n, m = g.shape[0], g.numel() // g.shape[0]
                    r = min(n, m, self.rank)
                    if n * m >= (n + m) * r * self.inner.min_compression_rate:
                        wire = (n + m) * r * 4
            self.traffic.add(layer_kind(g.shape) if g.dim() >= 2 else "dense", dense, wire)
            self.traffic.add_received(ring_allreduce_received(wire, self.world))  # each is an allreduce
        if bucket.is_last():
            self.traffic.end_step()
            self.step += 1


def _counting_hook(hook, serial: bool = False):
    """``hook`` on ``state.inner``, counting bytes. With ``serial`` each bucket's hook first
    waits for the previous bucket's exchange: PowerSGD issues collectives from future
    callbacks (its Q allreduce), and on gloo with two buckets in flight the ranks can then
    issue them in different orders and abort ("Received data size doesn't match expected
    size"; PyTorch's PowerSGD parity test skips gloo, pytorch/pytorch#58467). The
    arithmetic is the same; only the overlap of buckets with each other is lost."""
    def wrapped(state: _Counting, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        state.count(bucket)
        if serial and state.pending is not None:
            state.pending.wait()
        fut = hook(state.inner, bucket)
        state.pending = None if bucket.is_last() else fut
        return fut

    return wrapped


def exchange_settings(args) -> dict:
    """The AdaComp exchange mode and cost model from the command line."""
    if args.cost_model == "link":
        cost = CostModel(bandwidth=args.link_mbps * 1e6 / 8, latency=args.link_latency_ms / 1e3)
    else:
        cost = MeasuredCost()
    return {"exchange": args.exchange, "cost_model": cost}


def attach_compressor(ddp: DDP, model, name: str, args, world: int):
    """Register ``name``'s communication hook on ``ddp``; return an object with ``traffic``."""
    if name == "adacomp":
        state = AdaCompState(model=model, bin_size=args.bin_size, min_numel=args.min_numel,
                             values=args.values, scale=args.scale, start_iter=args.start_iter,
                             log_every=0, overlap=args.overlap == "on",
                             one_round=args.one_round == "on", **exchange_settings(args))
        ddp.register_comm_hook(state, adacomp_hook)
        return state
    if name == "none":
        counting = _Counting(None, "none", world)
        ddp.register_comm_hook(counting, _counting_hook(default_hooks.allreduce_hook))
    elif name == "fp16":
        counting = _Counting(None, "fp16", world)
        ddp.register_comm_hook(counting, _counting_hook(default_hooks.fp16_compress_hook))
    elif name == "bf16":
        counting = _Counting(None, "bf16", world)
        ddp.register_comm_hook(counting, _counting_hook(default_hooks.bf16_compress_hook))
    elif name == "powersgd":
        inner = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=args.powersgd_rank,
                                   start_powerSGD_iter=max(2, args.start_iter), random_seed=args.seed)
        counting = _Counting(inner, "powersgd", world, args.powersgd_rank)
        ddp.register_comm_hook(counting, _counting_hook(psgd.powerSGD_hook, serial=True))
    else:
        raise ValueError(name)
    return counting


# ------------------------------------------------------------------------------ backends

class _Steps:
    """Counts the bytes a dense baseline hands to collectives (Horovod: fp32 or fp16) and,
    as for the DDP baselines, the bytes it receives: a ring allreduce's ``2 (W-1)/W``."""

    def __init__(self, bytes_per_element: int, world: int):
        self.traffic = TrafficStats()
        self.bpe, self.world = bytes_per_element, world

    def count(self, model) -> None:
        for p in model.parameters():
            if p.grad is not None:
                kind = layer_kind(p.shape) if p.dim() >= 2 else "dense"
                wire = p.numel() * self.bpe
                self.traffic.add(kind, p.numel() * 4, wire)
                self.traffic.add_received(ring_allreduce_received(wire, self.world))
        self.traffic.end_step()


class DDPBackend:
    """torch.distributed (gloo) from torchrun's environment; compressors as DDP hooks."""

    name = "ddp"

    def init(self):
        if not dist.is_initialized() and _started_by_mpiexec():
            from ..parallel.mpi import init_torch_distributed  # started by mpiexec, not torchrun

            return init_torch_distributed("gloo")
        if not dist.is_initialized():
            if "RANK" not in os.environ:  # a plain `python launch/train.py` runs as world 1
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                os.environ.setdefault("MASTER_PORT", "29533")
                os.environ.update(RANK="0", WORLD_SIZE="1")
            dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size()

    def allreduce_(self, t):
        dist.all_reduce(t)
        return t

    def shutdown(self):
        close_process_group()

    def prepare(self, model, opt, name, args, world, clip):
        ddp = DDP(model, bucket_cap_mb=args.bucket_cap_mb)
        hook_state = attach_compressor(ddp, model, name, args, world)

        def step():
            clip()
            opt.step()

        return ddp, step, hook_state


class HorovodBackend:
    """Horovod (horovodrun); AdaComp through adacomp.parallel.horovod.DistributedOptimizer."""

    name = "horovod"

    def init(self):
        import horovod.torch as hvd

        hvd.init()
        self.hvd = hvd
        return hvd.rank(), hvd.size()

    def allreduce_(self, t):
        t.copy_(self.hvd.allreduce(t, op=self.hvd.Sum))
        return t

    def shutdown(self):
        self.hvd.join()

    def prepare(self, model, opt, name, args, world, clip):
        hvd = self.hvd
        if name == "adacomp":
            from ..parallel import horovod as ada_hvd

            opt = ada_hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                               bin_size=args.bin_size, min_numel=args.min_numel,
                                               values=args.values, scale=args.scale,
                                               start_iter=args.start_iter, **exchange_settings(args))
            counter = None
        else:
            compression = hvd.Compression.fp16 if name == "fp16" else hvd.Compression.none
            opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                           compression=compression)
            counter = _Steps(2 if name == "fp16" else 4, world)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(opt, root_rank=0)

        def step():
            opt.synchronize()
            clip()
            with opt.skip_synchronize():
                opt.step()
            if counter is not None:
                counter.count(model)

        traffic = counter if counter is not None else opt._adacomp_state
        return model, step, traffic, opt


class MPIBackend:
    """mpi4py (mpiexec); gradients averaged by adacomp.parallel.mpi.Communicator."""

    name = "mpi"

    def init(self):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        return self.comm.Get_rank(), self.comm.Get_size()

    def allreduce_(self, t):
        buf = t.numpy()
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return t

    def shutdown(self):
        self.comm.Barrier()

    def prepare(self, model, opt, name, args, world, clip):
        from ..parallel.mpi import Communicator

        if name == "adacomp":
            comm = Communicator(self.comm, bin_size=args.bin_size, min_numel=args.min_numel,
                                values=args.values, scale=args.scale, start_iter=args.start_iter,
                                **exchange_settings(args))
        else:  # dense baseline: every tensor by rule dense, one MPI Allreduce
            comm = Communicator(self.comm, bin_size=_all_dense)
        with torch.no_grad():  # same start everywhere, as DDP's and Horovod's broadcast
            for p in model.state_dict().values():
                if p.is_floating_point():
                    buf = p.numpy()
                    self.comm.Bcast(buf, root=0)

        # the dense baseline is counted as Horovod's is: by layer kind, received as a ring
        counter = _Steps(4, world) if name != "adacomp" else None

        def step():
            named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
            for (_, p), avg in zip(named, comm.allreduce([n for n, _ in named], [p.grad for _, p in named])):
                p.grad.copy_(avg)
            clip()
            opt.step()
            if counter is not None:
                counter.count(model)

        return model, step, counter if counter is not None else comm


def _all_dense(name, tensor):
    return None


class _FSDPDense:
    """Counts what FSDP2's dense reduce-scatter hands over: every rank's whole unsharded
    gradient in the reduce dtype (fp32), and receives ``(W-1)/W`` of it."""

    def __init__(self, world: int):
        self.traffic = TrafficStats()
        self.world = world

    def count(self, model) -> None:
        for p in model.parameters():
            if p.grad is not None:
                kind = layer_kind(p.shape) if p.dim() >= 2 else "dense"
                wire = p.numel() * 4
                self.traffic.add(kind, wire, wire)
                self.traffic.add_received((self.world - 1) * wire // self.world)
        self.traffic.end_step()


class FSDPBackend(DDPBackend):
    """FSDP2 (``fully_shard`` per block, then the root; torchrun); AdaComp as the compressing
    reduce-scatter of :mod:`adacomp.parallel.fsdp`, the baseline FSDP2's dense one."""

    name = "fsdp"

    def prepare(self, model, opt, name, args, world, clip):
        from torch.distributed.fsdp import fully_shard

        blocks = getattr(model, "blocks", None)
        for child in (blocks if blocks is not None else model.children()):
            if any(True for _ in child.parameters()):
                fully_shard(child, reshard_after_forward=False)
        fully_shard(model, reshard_after_forward=False)
        opt = make_optimizer(args, model)  # over the sharded parameters
        if name == "adacomp":
            from ..parallel import fsdp as adacomp_fsdp

            state = adacomp_fsdp.apply_(model, bin_size=args.bin_size, min_numel=args.min_numel,
                                        values=args.values, scale=args.scale, start_iter=args.start_iter)

            def step():
                clip()
                opt.step()

            return model, step, state, opt
        counter = _FSDPDense(world)

        def dense_step():
            counter.count(model)
            clip()
            opt.step()

        return model, dense_step, counter, opt


BACKENDS = {"ddp": DDPBackend, "horovod": HorovodBackend, "mpi": MPIBackend, "fsdp": FSDPBackend}


# ------------------------------------------------------------------------------ training

def load_data(args, rank: int, world: int):
    if args.data in TEXT_DATA:
        train = datasets.load(args.data, root=args.data_root, split="train", max_chars=args.max_chars)
        val = datasets.load(args.data, root=args.data_root, split="val", max_chars=args.max_chars)
        return {"kind": "text", "train": train, "val": val, "vocab": train.vocab_size}
    train = datasets.load(args.data, root=args.data_root, split="train")
    test = datasets.load(args.data, root=args.data_root, split="test")
    return {"kind": "image", "train": train, "test": test}


def make_model(args, d):
    torch.manual_seed(args.seed)
    if args.model == "gpt":
        sizes = {k: v for k, v in (("n_layer", args.gpt_layers), ("n_embd", args.gpt_embd),
                                   ("n_head", args.gpt_heads)) if v is not None}
        return build_model("gpt", preset=args.gpt_preset, vocab_size=d["vocab"], dropout=args.dropout,
                           **sizes)
    if d["kind"] == "text":
        return build_model("lstm", vocab_size=d["vocab"], hidden=args.hidden)
    x = d["train"].x
    return build_model("cnn", in_channels=x.shape[1], num_classes=d["train"].num_classes,
                       image_size=x.shape[-1])


def make_optimizer(args, model):
    """SGD with momentum, or AdamW with weight decay on matrices (2-D and up: linear and
    embedding weights) and none on biases and LayerNorm parameters."""
    if args.optimizer == "adamw":
        decay = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": args.weight_decay},
                  {"params": rest, "weight_decay": 0.0}]
        if args.freeze_step:
            return FrozenVarianceAdamW(groups, lr=args.lr, betas=(0.9, 0.95), freeze_step=args.freeze_step)
        return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)


def lr_factor(args, step: int, total: int) -> float:
    """The learning rate multiplier before step ``step`` (0-based) of ``total``: 1, or with
    ``--schedule cosine`` a linear warm-up over ``--warmup-steps`` and then a cosine decay
    to 10 %."""
    if args.schedule != "cosine":
        return 1.0
    warm = min(args.warmup_steps, max(total - 1, 0))
    if step < warm:
        return (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(frac, 1.0)))


def text_forward(model, x, state):
    """One text batch through a language model (DDP-wrapped or not): ``(logits, state)``;
    the LSTM carries its (detached) state across batches, the GPT has none."""
    inner = model.module if isinstance(model, DDP) else model
    if isinstance(inner, CharGPT):
        return model(x), None
    logits, state = model(x, state)
    return logits, tuple(s.detach() for s in state)


def autocast(args):
    """The ``--autocast`` context for forward and loss (a no-op for ``none``)."""
    import contextlib

    if args.autocast == "none":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


def batches(args, d, rank, world, epoch):
    if d["kind"] == "text":
        tokens = d["train"].data
        shard = tokens[datasets.shard(tokens.numel(), rank, world)]
        return datasets.char_batches(shard, args.batch_size, args.seq_len,
                                     generator=args.seed * 1000 + epoch * 10 + rank)
    idx = datasets.shard(len(d["train"]), rank, world)
    return datasets.image_batches(d["train"], args.batch_size, indices=idx,
                                  generator=args.seed * 1000 + epoch * 10 + rank)


def evaluate(model, d, args, rank, world, backend) -> dict:
    model.eval()
    with torch.no_grad():
        if d["kind"] == "text":
            tokens = d["val"].data
            shard = tokens[datasets.shard(tokens.numel(), rank, world)]
            total = torch.zeros(2, dtype=torch.float64)
            state = None
            for x, y in datasets.char_batches(shard, min(args.batch_size, 16), args.seq_len):
                logits, state = text_forward(model, x, state)
                total[0] += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                            reduction="sum").double()
                total[1] += y.numel()
            backend.allreduce_(total)
            loss = float(total[0] / total[1])
            out = {"val_loss": loss, "bits_per_char": loss / math.log(2)}
        else:
            test = d["test"]
            idx = datasets.shard(len(test), rank, world)
            correct = torch.zeros(2, dtype=torch.float64)
            for i in range(0, idx.numel(), 512):
                b = idx[i:i + 512]
                pred = model(test.x[b]).argmax(dim=1)
                correct[0] += (pred == test.y[b]).sum()
                correct[1] += b.numel()
            backend.allreduce_(correct)
            out = {"test_accuracy": float(correct[0] / correct[1])}
    model.train()
    return out


def run_settings(args, name: str) -> argparse.Namespace:
    """The settings of ``name``'s run: ``args``, with AdaComp's AdamW recipe resolved
    (``--freeze-step`` unset: an ``adacomp`` run with AdamW freezes the second moment after
    :data:`ADAMW_FREEZE_STEP` dense steps and compresses from then on; other runs use plain
    AdamW; 0 means plain AdamW everywhere)."""
    run = argparse.Namespace(**vars(args))
    if args.optimizer != "adamw":
        run.freeze_step = None
        return run
    if args.freeze_step is None:
        run.freeze_step = ADAMW_FREEZE_STEP if name == "adacomp" else None
    elif args.freeze_step == 0:
        run.freeze_step = None
    if run.freeze_step and name == "adacomp":
        run.start_iter = max(args.start_iter, run.freeze_step)  # v is estimated from exact gradients
    return run


def train_one(args, name: str, d, rank: int, world: int, backend) -> dict:
    args = run_settings(args, name)
    model = make_model(args, d)
    opt = make_optimizer(args, model)

    def clip():
        if d["kind"] == "text":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)

    prepared = backend.prepare(model, opt, name, args, world, clip)
    ddp, do_step, hook_state = prepared[:3]
    if len(prepared) > 3:
        opt = prepared[3]
    base_lrs = [g["lr"] for g in opt.param_groups]
    steps_per_epoch = len(batches(args, d, rank, world, 0))
    total = int(math.ceil(args.epochs * steps_per_epoch))
    if args.max_steps:
        total = min(total, args.max_steps)
    bar = progress_bar(total, name, rank == 0 and not args.quiet)
    curve, wire_curve = [], []
    step = 0
    epoch = 0
    loss_acc = torch.zeros(2, dtype=torch.float64)
    t0 = t_last = time.time()
    step_times = []
    while step < total:
        state = None
        for x, y in batches(args, d, rank, world, epoch):
            if step >= total:
                break
            if args.schedule != "constant":
                factor = lr_factor(args, step, total)
                for g, lr in zip(opt.param_groups, base_lrs):
                    g["lr"] = lr * factor
            with autocast(args):
                if d["kind"] == "text":
                    logits, state = text_forward(ddp, x, state)
                    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
                else:
                    loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            do_step()
            step += 1
            now = time.time()
            step_times.append(round(now - t_last, 6))
            t_last = now
            loss_acc += torch.tensor([loss.item(), 1.0], dtype=torch.float64)
            if step % args.log_every == 0 or step == total:
                backend.allreduce_(loss_acc)  # mean training loss over ranks since the last record
                mean = float(loss_acc[0] / loss_acc[1])
                loss_acc.zero_()
                curve.append((step, mean))
                wire_curve.append((step, hook_state.traffic.as_dict()["total"]["all"]["wire_bytes"]))
                bar.set_postfix_str(f"loss {mean:.4f}", refresh=False)
                bar.update(step - bar.n)
        epoch += 1
    wall = time.time() - t0
    bar.close()
    metrics = evaluate(model, d, args, rank, world, backend)
    traffic = hook_state.traffic.as_dict()
    modes = name == "adacomp" and getattr(backend, "name", "") != "fsdp"  # FSDP: one all-to-all
    return {"compressor": name, "exchange": args.exchange if modes else None, "steps": step,
            "freeze_step": args.freeze_step, "start_iter": args.start_iter, "wall_s": wall,
            "step_times": step_times, "metrics": metrics,
            "loss_curve": curve, "wire_curve": wire_curve, "traffic": traffic}


# ------------------------------------------------------------------------------ report

def _ratio(x):
    return f"{x:.1f}x" if x else "-"


def summary_table(results: list[dict], world: int) -> str:
    metric_name = "test acc" if "test_accuracy" in results[0]["metrics"] else "val loss (bpc)"
    head = (f"{'compressor':<17} {metric_name:>15} {'wall s':>7} {'MB/worker':>10} {'MB recv':>8} "
            f"{'ratio':>7} {'conv':>7} {'fc/rnn':>7} {'dense':>7}")
    lines = [head, "-" * len(head)]
    for r in results:
        m = r["metrics"]
        metric = (f"{100 * m['test_accuracy']:.2f}%" if "test_accuracy" in m
                  else f"{m['val_loss']:.4f} ({m['bits_per_char']:.3f})")
        t = r["traffic"]["total"]
        recv = r["traffic"].get("received_bytes", {}).get("total", 0)
        label = f"{r['compressor']}/{r['exchange']}" if r.get("exchange") else r["compressor"]
        lines.append(f"{label:<17} {metric:>15} {r['wall_s']:>7.1f} "
                     f"{t['all']['wire_bytes'] / 1e6:>10.2f} {recv / 1e6:>8.2f} "
                     f"{_ratio(t['all']['ratio']):>7} "
                     f"{_ratio(t['conv']['ratio']):>7} {_ratio(t['fc']['ratio']):>7} "
                     f"{_ratio(t['dense']['ratio']):>7}")
    lines.append(f"({world} workers; MB/worker: bytes handed to collectives; MB recv: bytes received "
                 f"from the others (allreduce as a ring); ratio = dense fp32 bytes / bytes handed to "
                 f"collectives, headers and padding included)")
    frozen = [f"{r['compressor']}: frozen after {r['freeze_step']}, compressed from step {r['start_iter']}"
              for r in results if r.get("freeze_step")]
    if frozen:
        lines.append(f"(AdamW's second moment frozen, FrozenVarianceAdamW: {'; '.join(frozen)})")
    return "\n".join(lines)


def plot(results: list[dict], path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path} (pip install matplotlib)")
        return
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4))
    for r in results:
        s, loss = zip(*r["loss_curve"])
        a.plot(s, loss, label=r["compressor"])
        s, w = zip(*r["wire_curve"])
        b.plot(s, [x / 1e6 for x in w], label=r["compressor"])
        c.plot([x / 1e6 for x in w], loss, label=r["compressor"])  # records at the same steps
    a.set_xlabel("step")
    a.set_ylabel("training loss")
    a.legend()
    b.set_xlabel("step")
    b.set_ylabel("cumulative MB handed to collectives (per worker)")
    b.set_yscale("log")
    b.legend()
    c.set_xlabel("cumulative MB handed to collectives (per worker)")
    c.set_ylabel("training loss")
    c.set_xscale("log")
    c.legend()
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    backend = BACKENDS[args.backend]()
    rank, world = backend.init()
    try:
        d = load_data(args, rank, world)
    except datasets.DataNotFound as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    results = [train_one(args, name, d, rank, world, backend) for name in args.compressor]
    if rank == 0:
        title = f"{args.model} on {args.data}, {world} workers ({args.backend})"
        print(f"\n{title}\n" + summary_table(results, world))
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "world": world, "runs": results}, f, indent=2, default=repr)
            print(f"wrote {args.json}")
        if args.plot:
            plot(results, args.plot, title)
    backend.shutdown()
    return results


def run_and_exit(argv=None) -> None:
    """``main`` for scripts. Under torch.distributed (DDP backend) the process then leaves
    with ``os._exit``: Gloo's C++ worker threads can still hold finished work whose tensors
    reach back into Python, and tearing those down during interpreter finalization aborts
    the process now and then (SIGABRT, "terminate called without an active exception";
    pytorch/pytorch#179291). Everything is flushed and the process group destroyed first.
    MPI and Horovod finalize through their own exit handlers, so they exit normally."""
    args_backend = parse_args(argv).backend
    main(argv)
    if args_backend in ("ddp", "fsdp"):
        exit_distributed(0)


def close_process_group() -> None:
    """Destroy the default process group, if it is up, once every rank got here: garbage
    collected first (DDP reducers and finished work hold tensors), then a barrier."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def exit_distributed(code: int = 0) -> None:
    """Leave a torch.distributed (Gloo) process with ``os._exit(code)`` instead of a normal
    interpreter exit, which aborts now and then while it tears down Gloo work
    (pytorch/pytorch#179291; see :func:`run_and_exit`). Output is flushed; if the process
    group is still up, every rank meets at a barrier (all have written their results) and
    it is destroyed; MPI is finalized when torch.distributed came up under mpiexec."""
    sys.stdout.flush()
    sys.stderr.flush()
    close_process_group()
    mpi = sys.modules.get("mpi4py.MPI")  # torch.distributed initialised from mpiexec
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()  # else mpiexec reports the rank as exited without finalize, rc 1
    os._exit(code)

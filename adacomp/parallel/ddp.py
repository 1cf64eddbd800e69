"""AdaComp as a DDP communication hook.

Usage, like PyTorch's PowerSGD hook::

    from adacomp import AdaCompState, adacomp_hook
    model = DistributedDataParallel(net)
    state = AdaCompState(model=model)          # process group: the world
    model.register_comm_hook(state, adacomp_hook)

The hook compresses each gradient of the bucket on its own (bins never straddle two
parameters of the flat bucket), exchanges the payloads with an allgather (in a bucket's
first exchange the sizes first, then one padded allgather of the bytes; after it, sizes
and bytes together in one allgather of fixed-size slots, see ``one_round``), decodes and
sums them with ``decompress_sum`` and divides by the world size. Tensors sent dense (1-D,
small, or a payload that would not be smaller than the dense bytes) travel together in one
allreduce per bucket. See :mod:`adacomp.parallel.exchange` for the protocol and
docs/algorithm.md section 5 for the contracts.
"""

# No `from __future__ import annotations`: DDP inspects the hook's annotations at runtime.
import contextlib
import functools
import logging
import queue
import threading
import weakref

import torch
import torch.distributed as dist
from torch import nn

from ..compressor import DEFAULT_MIN_NUMEL, AdaComp
from .exchange import (
    CostModel,
    ExchangeState,
    MeasuredCost,
    SlotCapacity,
    StepLedger,
    check_exchange,
    check_headers,
    check_start_iter,
    error_meta,
)

logger = logging.getLogger(__name__)


def _named_parameters(model: nn.Module | None, named_parameters):
    if named_parameters is not None:
        items = list(named_parameters)
    elif model is not None:
        items = list(model.named_parameters())
    else:
        raise ValueError("AdaCompState needs model=... or named_parameters=... to key residues by "
                         "parameter name (DDP rebuilds its buckets after the first step)")
    out = []
    for name, p in items:
        if isinstance(model, nn.parallel.DistributedDataParallel) and name.startswith("module."):
            name = name[len("module."):]
        out.append((name, p))
    return out


def _model_group(model, process_group):
    """The process group of the hook: the DDP model's own when none is given; a given group
    must be the DDP model's."""
    ddp_group = getattr(model, "process_group", None) if isinstance(
        model, nn.parallel.DistributedDataParallel) else None
    if process_group is None:
        return ddp_group
    if ddp_group is not None and process_group is not ddp_group:
        raise ValueError("AdaCompState(process_group=...) is not the process group of the DDP model; "
                         "the hook's collectives must run on the group DDP reduces over: leave "
                         "process_group out (it is taken from model=) or pass model.process_group")
    return process_group


class AdaCompState(ExchangeState):
    """All mutable state of the AdaComp hook, in one checkpointable object.

    Args:
        process_group: the group to reduce over (default: the DDP model's group if ``model``
            is a ``DistributedDataParallel``, else the world). A group that is not the DDP
            model's raises ``ValueError``.
        model: the (DDP-wrapped or plain) model, to name its parameters; or give
            ``named_parameters`` instead.
        bin_size, scale, values, min_numel, device: the compressor settings of
            :class:`adacomp.AdaComp`.
        start_iter: dense allreduce (no compression, residues untouched) before this step.
        exchange: how payloads travel (see :mod:`adacomp.parallel.exchange`): ``"allgather"``,
            ``"sharded"`` (traffic per worker about two payloads whatever the world size;
            owner residues are a second level of error feedback) or ``"auto"`` (default:
            per bucket and step, the fastest under ``cost_model``).
        cost_model: for ``exchange="auto"``: :class:`adacomp.parallel.MeasuredCost` (default:
            times each mode on this machine and links during the run and plans each bucket's
            next exchange from the slowest rank's times) or
            :class:`adacomp.parallel.CostModel` (analytic: bytes and rounds on a link of the
            bandwidth and latency you give it).
        scaler: the ``torch.amp.GradScaler`` scaling the loss, if any: residues follow its
            scale (docs/algorithm.md, loss scaling).
        overlap: run each bucket's whole exchange (compression, size exchange, payloads,
            decoding) on a worker thread with a process group of its own (a copy of the
            hook's group, made on the first compressed step), so that the backward pass never
            waits on the network; buckets are exchanged in order, so every rank issues the
            same collectives in the same order. ``False``: the size exchange blocks the hook
            and only the payload transfers are asynchronous. Not yet checked on CUDA (see
            docs/algorithm.md, known gaps): use ``False`` on GPUs for now.
        one_round: after a bucket's first all-gather exchange, send the size vector and the
            payloads together in one all-gather of fixed-size slots, sized from the sizes
            every rank saw in the bucket's earlier exchanges, with a second all-gather only
            when a payload does not fit; or a
            :class:`adacomp.parallel.exchange.SlotCapacity` with the padding margin and
            history to size the slots with (the default's pad about 20 % of the payload
            bytes); ``False``: sizes first, then payloads, two rounds per bucket always.
        log_every: log the traffic statistics through ``logging`` every this many steps
            (0: never).

    Parameters are bound by identity (``model.to(...)``, ``.half()`` keep them bound). A
    state that was pickled or copied (``torch.save`` / ``torch.load``) is not bound to any
    model: call :meth:`bind` with the new model before training, or the first ``backward()``
    raises on every rank.
    """

    __slots__ = [
        # tuned knobs
        "bin_size", "scale", "values", "min_numel", "start_iter", "exchange", "cost_model",
        # switches and plumbing
        "process_group", "log_every", "_param_names", "_model_ref", "scaler", "overlap", "_worker_obj",
        "one_round", "_slots",
        # internal state
        "compressor", "owner", "iter", "traffic", "ledger", "residue_scale", "owner_pending",
    ]

    def __init__(self, process_group=None, model: nn.Module | None = None, *, named_parameters=None,
                 bin_size=None, scale: str = "binmax_mean", values: str = "ternary",
                 min_numel: int = DEFAULT_MIN_NUMEL, start_iter: int = 0, exchange: str = "auto",
                 cost_model: CostModel | MeasuredCost | None = None, log_every: int = 100, device=None,
                 scaler=None, overlap: bool = True, one_round: bool | SlotCapacity = True):
        check_start_iter(start_iter)
        self.process_group = _model_group(model, process_group)
        self.bin_size, self.scale, self.values, self.min_numel = bin_size, scale, values, min_numel
        self.start_iter = start_iter
        self.log_every = log_every
        self._init_exchange_state(AdaComp(bin_size=bin_size, scale=scale, values=values,
                                          min_numel=min_numel, device=device),
                                  check_exchange(exchange), cost_model or MeasuredCost(), scaler)
        self.overlap = bool(overlap)
        if not isinstance(one_round, (bool, SlotCapacity)):
            raise TypeError(f"one_round must be a bool or a SlotCapacity, got {type(one_round).__name__}")
        self.one_round = one_round is not False
        self._slots = one_round if isinstance(one_round, SlotCapacity) else SlotCapacity()
        self._worker_obj = None
        self._param_names = {}
        self._model_ref = None
        self.bind(model, named_parameters=named_parameters)

    # -- naming -------------------------------------------------------------------------
    def bind(self, model: nn.Module | None = None, *, named_parameters=None) -> None:
        """Name the parameters of ``model`` (or ``named_parameters``) for the hook: call it
        after loading a pickled state (``torch.load``) into a new run, before training."""
        named = _named_parameters(model, named_parameters)
        self._param_names = {id(p): (p, name) for name, p in named}
        # Re-walk the model on a miss (parameters replaced since) only when it named them.
        self._model_ref = weakref.ref(model) if model is not None and named_parameters is None else None
        if isinstance(model, nn.parallel.DistributedDataParallel) and self.process_group is None:
            self.process_group = model.process_group

    def name_of(self, param: torch.Tensor) -> str:
        """The name of ``param`` (a parameter of the bound model). Raises ``KeyError``."""
        hit = self._param_names.get(id(param))
        if hit is not None and hit[0] is param:
            return hit[1]
        model = self._model_ref() if self._model_ref is not None else None
        if model is not None:  # parameters were replaced since: bind again
            self.bind(model)
            hit = self._param_names.get(id(param))
            if hit is not None and hit[0] is param:
                return hit[1]
        if not self._param_names:
            raise KeyError("AdaCompState is not bound to a model's parameters (it was unpickled or "
                           "copied): call state.bind(ddp_model) after loading it and before training")
        raise KeyError(f"AdaComp hook: a parameter of shape {tuple(param.shape)} is not among the "
                       "parameters given to AdaCompState (pass the model that DDP wraps, or call "
                       "state.bind(ddp_model))")

    def _identity(self) -> dict:
        if not dist.is_available() or not dist.is_initialized():
            return {"world": None, "rank": None}
        group = _group(self)
        return {"world": dist.get_world_size(group), "rank": dist.get_rank(group)}

    # -- step counter (advances on the last bucket, as PowerSGD's) -----------------------
    # -- the exchange thread ------------------------------------------------------------
    def _worker(self, group):
        """The thread (and its process group, a copy of ``group``) that runs the exchanges
        when ``overlap=True``; created on first use, by every rank in the same bucket."""
        if self._worker_obj is None:
            ranks = dist.get_process_group_ranks(group)
            own = dist.new_group(ranks, use_local_synchronization=True)
            self._worker_obj = _Worker(own)
        return self._worker_obj

    def __getstate__(self):
        # The process group cannot be pickled (as PowerSGD's state); the parameter bindings
        # are for one model in one process (bind() again after loading).
        skip = ("process_group", "_param_names", "_model_ref", "scaler", "_worker_obj")
        return {s: getattr(self, s) for s in self.__slots__ if s not in skip}

    def __setstate__(self, state):
        self.process_group = None
        self._param_names = {}
        self._model_ref = None
        self._worker_obj = None
        self.overlap = True
        self.one_round = True
        self._slots = SlotCapacity()  # states pickled before the one-round exchange
        for k, v in state.items():
            setattr(self, k, v)
        for k, default in (("ledger", StepLedger), ("scaler", lambda: None),
                           ("residue_scale", lambda: None), ("owner_pending", dict)):
            if not hasattr(self, k):
                setattr(self, k, default())


# all_gather_single is the new name of all_gather_into_tensor (deprecated in recent PyTorch).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _allgather_rows(t, world, group):
    """All-gather a 1-D tensor of the same length on every rank -> ``[world, n]``."""
    out = torch.empty(world * t.numel(), dtype=t.dtype, device=t.device)
    _all_gather_single(out, t, group=group)
    return out.view(world, -1)


# Two names for the two kinds of exchange (benchmarks/hook_overhead.py times them apart).
def _allgather_int64(t, world, group):
    """The size exchange: every rank's int64 meta vector -> ``[world, n]``."""
    return _allgather_rows(t, world, group)


def _allgather_slots(t, world, group):
    """The slot exchange: every rank's slot (1-D uint8 of one length) -> ``[world, n]``."""
    return _allgather_rows(t, world, group)


def _alltoallv(parts, recv_sizes, group):
    send = torch.cat(parts)
    recv = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=send.device)
    dist.all_to_all_single(recv, send, output_split_sizes=list(recv_sizes),
                           input_split_sizes=[p.numel() for p in parts], group=group)
    return list(torch.split(recv, list(recv_sizes)))


def _group(state):
    return state.process_group if state.process_group is not None else dist.group.WORLD


def adacomp_hook(state: AdaCompState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook running AdaComp on every gradient of ``bucket``.

    Returns a future of the bucket's flat buffer holding the averaged gradients. Raises
    :class:`adacomp.parallel.ConfigMismatchError` on every rank when the ranks' settings
    differ or a rank failed before the exchange (that rank raises its own error).
    """
    if isinstance(bucket, tuple):
        # torch._dynamo.config.optimize_ddp = "python_reducer" (compiled autograd) calls the
        # hook once per parameter as hook(state, (grad, param)), from inside the compiled
        # backward; the exchange needs the bucket's host-side protocol, so refuse it clearly
        # (every rank runs the same setting, so every rank raises here, before any collective).
        raise RuntimeError(
            "adacomp_hook needs DDP's bucketed reducer, but it was called per parameter, as DDP "
            "does under torch._dynamo.config.optimize_ddp = 'python_reducer' (compiled "
            "autograd). Keep the default optimize_ddp ('ddp_optimizer'): torch.compile(model) "
            "and torch.compile(DDP(model)) both work with this hook")
    group = _group(state)
    world = dist.get_world_size(group)
    buf = bucket.buffer()
    state.begin_step()
    last = bucket.is_last()
    params = bucket.parameters()
    # Sparse buckets (averaged uncompressed, as PyTorch's default) and dense warm-up steps.
    dense_only = buf.is_sparse or state.iter < state.start_iter
    if dense_only:
        for p in params:
            state.traffic.add("dense", p.numel() * 4, 0 if buf.is_sparse else p.numel() * p.element_size())
    if state.overlap:
        worker = state._worker(group)
        if dense_only:
            work = functools.partial(_average_sync, state, buf, last, world, group=worker.group)
        else:
            work = functools.partial(_exchange_sync, state, buf, bucket.gradients(), params, last,
                                     world=world, group=worker.group, index=bucket.index())
        return worker.submit(work, buf.device)
    if dense_only:
        fut = dist.all_reduce(buf, group=group, async_op=True).get_future()
        _maybe_end_step(state, last)
        return fut.then(lambda f: f.value()[0].div_(world))
    return _exchange_async(state, buf, bucket.gradients(), params, last, group, world, bucket.index())


def _average_sync(state, buf, last, world, *, group):
    dist.all_reduce(buf, group=group)
    _maybe_end_step(state, last)
    return buf.div_(world)


def _maybe_end_step(state, last):
    if last:
        # The last bucket closes the step: every bucket's residue updates are committed now,
        # or all kept back if any rank saw a non-finite value in any tensor of the step.
        state.end_step()
        if state.log_every and state.iter % state.log_every == 0:
            logger.info("AdaComp %s", state.traffic.format())


def _slot_plan(state, index, grads):
    """The bucket's key in the state's :class:`SlotCapacity` (DDP's bucket index and its
    tensors' sizes, in size order: the same on every rank, the same when DDP rebuilds the
    bucket in another order, as it does after the first step of a run and of a resumed
    run, whose payloads need the same bytes), and the slot plan of its exchange now (None:
    two rounds, sizes first)."""
    key = (index, tuple(sorted(g.numel() for g in grads)))
    return key, (state._slots.plan(key) if state.one_round else None)


def _prepare(state, grads, params, group, world, slot=None):
    """Name and compress the bucket's gradients; on a local error, tell the other ranks (they
    raise ConfigMismatchError in the same size exchange, or slot exchange) and raise this
    rank's error."""
    try:
        names = [state.name_of(p) for p in params]
        return state.group_exchange(names, grads, world, dist.get_rank(group), slot=slot)
    except Exception:
        state.abort_step()
        meta = error_meta(len(grads), world, device=grads[0].device if grads else None)
        if slot is None:
            all_meta = _allgather_int64(meta, world, group)
        else:  # the other ranks wait in the slot all-gather: send a slot of its length
            mine = torch.zeros(meta.numel() * 8 + slot.capacity, dtype=torch.uint8, device=meta.device)
            mine[:meta.numel() * 8] = meta.view(torch.uint8)
            slots = _allgather_slots(mine, world, group)
            all_meta = slots[:, :meta.numel() * 8].contiguous().view(torch.int64)
        check_headers(all_meta, world, len(grads), 1, local_error=True)
        raise


def _decide(state, ex, group, world):
    try:
        ex.decide(_allgather_int64(ex.meta(), world, group))  # raises on every rank if configs differ
        if ex.mode == "sharded":
            ex.reduce_owned(_alltoallv(ex.alltoall_parts(), ex.alltoall_recv_sizes(), group))
            ex.set_owner_sizes(_allgather_int64(ex.owner_sizes(), world, group))
    except Exception:
        state.abort_step()
        raise


def _slot_round(state, ex, group, world):
    """The one-round exchange: one all-gather of every rank's slot (meta vector and
    payloads), the decisions from the slots' meta, and only when some rank's bytes did not
    fit in its slot, a second all-gather of the rest. Returns every rank's bytes."""
    try:
        slots = _allgather_slots(ex.slot_buffer(), world, group)
        ex.decide(ex.meta_of_slots(slots))  # raises on every rank if configs differ
        tails = _allgather_slots(ex.tail_buffer(), world, group) if max(ex.tail_sizes()) else None
        return ex.slot_rows(slots, tails)
    except Exception:
        state.abort_step()
        raise


def _end_bucket(state, ex, last, key):
    ex.account(state.traffic)
    if state.one_round:  # the same on every rank: from the gathered sizes
        state._slots.update(key, *ex.slot_need())
    _maybe_end_step(state, last)


def _transfers(state, ex, world, group, async_op: bool):
    """Run the exchange of ``ex`` up to its decoding: the one-round slot exchange, or the
    size exchange and the payload all-gather; then the dense allreduce. Returns the
    gathered bytes (``[world, n]`` or one row per rank), the dense buffer (summed in place)
    and the works of the collectives issued with ``async_op``."""
    works = []
    if ex.slot_plan is not None:
        gathered = _slot_round(state, ex, group, world)
    else:
        _decide(state, ex, group, world)
        gathered = None
        mine = ex.payload_buffer()
        if mine is not None:
            flat = torch.empty(world * mine.numel(), dtype=torch.uint8, device=mine.device)
            works.append(_all_gather_single(flat, mine, group=group, async_op=async_op))
            gathered = flat.view(world, mine.numel())
    dense = ex.dense_buffer()
    if dense is not None:
        works.append(dist.all_reduce(dense, group=group, async_op=async_op))
    return gathered, dense, [w for w in works if w is not None]


def _exchange_sync(state, buf, grads, params, last, *, world, group, index):
    """The whole exchange of one bucket with blocking collectives (on the state's worker
    thread and its own process group, so it overlaps with the rest of the backward pass)."""
    key, slot = _slot_plan(state, index, grads)
    ex = _prepare(state, grads, params, group, world, slot)
    gathered, dense, _ = _transfers(state, ex, world, group, async_op=False)
    _end_bucket(state, ex, last, key)
    ex.finish(gathered, dense)
    return buf


def _exchange_async(state, buf, grads, params, last, group, world, index):
    """The exchange on the hook's thread: the size exchange (or the one-round slot
    exchange) and the sharded exchange's owner rounds block it; the payload all-gather and
    the dense allreduce are asynchronous."""
    key, slot = _slot_plan(state, index, grads)
    ex = _prepare(state, grads, params, group, world, slot)
    # Issuing the size exchange from a Future callback instead would let it interleave with
    # the next bucket's collectives in a different order on different ranks: overlap=True
    # runs the whole exchange on a worker thread with its own process group instead.
    gathered, dense, works = _transfers(state, ex, world, group, async_op=True)
    _end_bucket(state, ex, last, key)

    def finish(_):
        ex.finish(gathered, dense)
        return buf

    if not works:
        fut = torch.futures.Future()
        fut.set_result(finish(None))
        return fut
    return torch.futures.collect_all([w.get_future() for w in works]).then(finish)


class _Worker:
    """One thread per state running bucket exchanges in submission (bucket) order over a
    process group of its own, so that every rank issues that group's collectives in the same
    order, and none of them waits on the hook's thread (the backward pass goes on)."""

    def __init__(self, group):
        self.group = group
        self.queue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="adacomp-exchange", daemon=True)
        self.thread.start()

    def submit(self, fn, device: torch.device | None = None) -> torch.futures.Future:
        """Queue ``fn``; for a bucket on a CUDA device it runs on the hook caller's current
        stream, after the kernels that produced the gradients and before whatever DDP
        enqueues once the future is done."""
        fut = torch.futures.Future()
        stream = torch.cuda.current_stream(device) if device is not None and device.type == "cuda" else None
        self.queue.put((fn, fut, stream))
        # An error is raised from a callback, so that the future DDP waits on carries it as
        # an error (with the exception's type and message), not as a value.
        return fut.then(_unwrap)

    def _run(self):
        while True:
            fn, fut, stream = self.queue.get()
            try:
                with contextlib.nullcontext() if stream is None else torch.cuda.stream(stream):
                    fut.set_result((True, fn()))
            except BaseException as exc:  # noqa: BLE001 - handed to DDP, which raises it
                fut.set_result((False, exc))


def _unwrap(fut):
    ok, value = fut.value()
    if not ok:
        raise value
    return value

"""AdaComp under FSDP2 (``torch.distributed.fsdp.fully_shard``): a compressing
reduce-scatter with error feedback.

Usage, after ``fully_shard`` (per block, then the root)::

    from adacomp.parallel import fsdp as adacomp_fsdp
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    state = adacomp_fsdp.apply_(model)            # AdaComp settings as keywords
    ...                                           # train as usual
    state.stats()                                 # bytes vs FSDP's dense reduce-scatter, memory
    torch.save(state.state_dict(), f"adacomp_fsdp_rank{dist.get_rank()}.pt")

How one reduce-scatter call of an FSDP parameter group runs (docs/fsdp.md):

* FSDP hands over ``input_tensor``: ``W`` equal chunks, chunk ``d`` for destination rank
  ``d``, each the concatenation over the group's parameters of that rank's rows of the
  (dim-0 padded) unsharded gradient. Every parameter's piece within every chunk is
  compressed as its own named tensor, ``"<param>@rows[a:b]"`` (rows ``a:b`` of the
  unsharded gradient), so bins never straddle a chunk or a parameter, with the bin size of
  the parameter's original shape (:meth:`adacomp.AdaComp.bin_size_for`). Together the
  pieces' residues are the residue of the full unsharded gradient, on every rank.
* Size exchange: one all-gather of a small int64 vector per rank (the exchange protocol's
  meta layout: header with a configuration hash, then per parameter ``W`` payload sizes and
  a non-finite / all-zero flag), so every rank decides the same way for every piece
  (compressed, dense by rule, dense fallback, non-finite, zero) and learns every flag.
* One ``all_to_all_single`` of bytes: each owner receives its pieces (payloads, or the raw
  values of dense pieces) from every rank.
* The owner decodes in rank order (one ``decode_bucket_`` call; dense pieces summed in fp32
  in rank order) and applies FSDP's reduce op (``AVG``: divide by ``W``; ``SUM``: as is, FSDP
  divides before/after itself; ``PREMUL_SUM(f)``: multiply the sum by ``f``) into
  ``output_tensor``.

The call is synchronous (FSDP 2.13 calls it without ``async_op``; with ``async_op=True`` it
returns a completed ``Work``). Residue updates of the step are held in a
:class:`~adacomp.parallel.exchange.StepLedger` and committed when the backward pass ends (an
autograd final callback, queued by the step's first call, which also all-reduces one flag
saying whether an owner's decoded sum overflowed), or all discarded when any rank flagged a
non-finite value anywhere in the step.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from torch import nn

from ..compressor import DEFAULT_MIN_NUMEL, AdaComp
from ..payload import decode_bucket_
from ..stats import TrafficStats, layer_kind
from .exchange import (
    COMPRESSED,
    DECISION_NAMES,
    DENSE_FALLBACK,
    DENSE_RULE,
    FLAG_NONFINITE,
    FLAG_ZERO,
    META_FIXED,
    NONFINITE,
    ZERO,
    ConfigMismatchError,
    ExchangeState,
    check_headers,
    check_start_iter,
    config_hash,
    dense_flags_of,
    error_meta,
    header_fields,
    parse_range_key,
    range_key,
)

try:  # the protocol class FSDP2 documents; custom comms need not subclass it
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter as _ReduceScatterBase
except ImportError:  # pragma: no cover - other torch versions
    _ReduceScatterBase = object

logger = logging.getLogger(__name__)

__all__ = ["apply_", "FSDPAdaCompState", "AdaCompReduceScatter", "piece_key", "parse_piece_key"]

#: The ``exchange`` an FSDP state records in its checkpoint.
EXCHANGE_NAME = "fsdp-alltoall"
#: A piece of an unused rank range (the parameter has fewer rows than ranks).
EMPTY = -2


def piece_key(name: str, start: int, end: int) -> str:
    """The residue name of rows ``[start, end)`` of parameter ``name``'s unsharded gradient."""
    return range_key(name, start, end, "rows")


def parse_piece_key(key: str) -> tuple[str, int, int]:
    """Inverse of :func:`piece_key`."""
    return parse_range_key(key, "rows")


class _Param:
    """One parameter of an FSDP parameter group, as the reduce-scatter input lays it out."""

    __slots__ = ("name", "shape", "d0", "row", "k", "bin_size", "fsdp_param", "dtype")

    def __init__(self, name, shape, world, bin_size, fsdp_param, dtype):
        self.name = name
        self.shape = tuple(int(s) for s in shape)
        self.d0 = self.shape[0] if self.shape else 1
        self.row = math.prod(self.shape[1:]) if self.shape else 1  # elements per dim-0 row
        self.k = -(-self.d0 // world)                               # rows per rank, padded
        self.bin_size = bin_size
        self.fsdp_param = fsdp_param
        self.dtype = dtype

    def rows(self, dst: int) -> tuple[int, int]:
        """The unsharded rows that rank ``dst`` owns (empty past the end)."""
        return min(dst * self.k, self.d0), min((dst + 1) * self.k, self.d0)

    def piece_shape(self, dst: int) -> tuple[int, ...]:
        r0, r1 = self.rows(dst)
        return (r1 - r0,) + self.shape[1:] if self.shape else (r1 - r0,)

    @property
    def chunk_numel(self) -> int:
        """Elements of this parameter in each rank's chunk (padding included)."""
        return self.k * self.row

    @property
    def numel(self) -> int:
        return self.d0 * self.row


class _Done:
    """``dist.Work`` of a call that already finished (``async_op=True``)."""

    @staticmethod
    def make(result: torch.Tensor):
        fut = torch.futures.Future()
        fut.set_result(result)
        create = getattr(torch._C._distributed_c10d, "_create_work_from_future", None)
        return create(fut) if create is not None else None


def _apply_reduce_(total: torch.Tensor, kind: str, factor: float | None, world: int) -> None:
    """Turn the sum over ``world`` ranks into FSDP's reduction (``kind``, ``factor`` from
    :func:`_reduce_factor`), in place."""
    if kind == "avg":
        total.div_(world)
    elif kind == "premul":
        total.mul_(factor)


def _reduce_factor(op) -> tuple[str, float | None]:
    """FSDP's reduce op as ``("avg" | "sum" | "premul", factor)``."""
    kind = getattr(op, "op", op)  # a ReduceOp object (PREMUL_SUM) or a RedOpType
    R = dist.ReduceOp
    if kind == R.AVG:
        return "avg", None
    if kind == R.SUM:
        return "sum", None
    if kind == R.PREMUL_SUM:
        factor = getattr(op, "factor", None)
        if not isinstance(factor, (int, float)):
            raise ValueError("AdaComp FSDP reduce-scatter: PREMUL_SUM with a tensor factor is not "
                             "supported (use a float gradient divide factor)")
        return "premul", float(factor)
    raise ValueError(f"AdaComp FSDP reduce-scatter: reduce op {op!r} is not supported "
                     "(FSDP uses AVG, SUM or PREMUL_SUM)")


class _ChunkExchange:
    """One rank's side of one compressing reduce-scatter call (one FSDP parameter group,
    one step): the pieces, their payloads and pending residue updates, the decisions."""

    def __init__(self, state: FSDPAdaCompState, params: list[_Param], inp: torch.Tensor,
                 world: int, rank: int, slots: int):
        self.state, self.comp = state, state.compressor
        self.params, self.world, self.rank = params, world, rank
        T, W = len(params), world
        self.C = sum(p.chunk_numel for p in params)
        if inp.numel() != W * self.C:
            raise ValueError(
                f"AdaComp FSDP reduce-scatter: the input holds {inp.numel()} elements, the "
                f"parameter group {[p.name for p in params]} lays out {W} x {self.C}; were "
                "parameters added, frozen or replaced after adacomp.parallel.fsdp.apply_()?")
        if not inp.is_floating_point():
            raise ValueError(f"AdaComp FSDP reduce-scatter: gradients must be floating point, "
                             f"got {inp.dtype}")
        self.dtype, self.esize, self.device = inp.dtype, inp.element_size(), inp.device
        x = inp.view(W, self.C)
        self.offsets, off = [], 0
        for p in params:
            self.offsets.append(off)
            off += p.chunk_numel
        self.pieces: list[list[torch.Tensor | None]] = []
        # payload bytes per (parameter, destination), all compressed with one call
        self.payloads: list[list[torch.Tensor | None]] = [[None] * W for _ in range(T)]
        self.pending: list[list] = [[None] * W for _ in range(T)]
        sizes = [0] * (T * W)
        nonfinite, zero = [False] * T, [True] * T
        todo = []  # (t, dst, key, piece) to compress
        dense = []  # (t, piece) sent dense by rule
        for t, p in enumerate(params):
            pieces = []
            for dst in range(W):
                r0, r1 = p.rows(dst)
                if r1 == r0:
                    pieces.append(None)
                    continue
                o = self.offsets[t]
                piece = x[dst, o:o + (r1 - r0) * p.row].view(p.piece_shape(dst))
                pieces.append(piece)
                if p.bin_size is None:
                    sizes[t * W + dst] = -1
                    dense.append((t, piece))
                else:
                    todo.append((t, dst, piece_key(p.name, r0, r1), piece))
            self.pieces.append(pieces)
        for (t, _), f in zip(dense, dense_flags_of([piece for _, piece in dense])):
            nonfinite[t] |= bool(f & FLAG_NONFINITE)
            zero[t] &= bool(f & FLAG_ZERO)
        if todo:
            try:
                bp, pend = self.comp.prepare_bucket([k for _, _, k, _ in todo], [g for *_, g in todo],
                                                    [params[t].bin_size for t, *_ in todo])
            except BaseException:
                self._discard_all()
                raise
            for i, (t, dst, _, _) in enumerate(todo):
                self.payloads[t][dst] = bp.piece(i)
                self.pending[t][dst] = pend[i]
                sizes[t * W + dst] = bp.size_rows[0][i]
                nonfinite[t] |= bp.nonfinite[i]
                zero[t] = zero[t] and not nonfinite[t] and bp.zero[i]
        flags = [FLAG_NONFINITE if nf else (FLAG_ZERO if z else 0) for nf, z in zip(nonfinite, zero)]
        metas = [torch.empty(p.shape, dtype=self.dtype, device="meta") for p in params]
        self.hash = config_hash(self.comp, [p.name for p in params], metas,
                                [p.bin_size for p in params], f"{EXCHANGE_NAME}/W={W}")
        # Padded to the length for all ``slots`` parameters of the group, so that ranks
        # handing over different parameters (one froze a parameter) still all-gather vectors of
        # one length and raise ConfigMismatchError together (check_headers).
        pad = [0] * ((W + 1) * (slots - T))
        self._meta = torch.tensor(header_fields(self.hash, T, W) + sizes + flags + pad,
                                  dtype=torch.int64, device=self.device)
        self.decisions: list[int] = []
        self.piece_dec: list[list[int]] = []
        self.sizes = None

    def meta(self) -> torch.Tensor:
        return self._meta

    def _discard_all(self):
        for pend_list in self.pending:
            for pend in pend_list:
                self.comp.discard(pend)
        self.pending = [[None] * self.world for _ in self.pending]

    # ------------------------------------------------------------------ decisions
    def decide(self, all_meta: torch.Tensor) -> None:
        T, W = len(self.params), self.world
        m = all_meta.reshape(W, -1).cpu()
        try:
            check_headers(m, W, T, W)
            if bool((m[:, 1] != m[0, 1]).any()):
                bad = [r for r in range(W) if int(m[r, 1]) != int(m[0, 1])]
                raise ConfigMismatchError(
                    f"AdaComp configuration differs between ranks (ranks {bad} differ from rank 0) "
                    f"in the FSDP reduce-scatter: bin sizes, value mode, scale, min_numel, parameter "
                    f"names, shapes, dtypes and the world size must match on every rank. This rank "
                    f"has {self.comp.config()} for "
                    f"{[(p.name, p.bin_size) for p in self.params][:8]}...")
        except ConfigMismatchError:
            self._discard_all()
            raise
        sizes = m[:, META_FIXED:META_FIXED + W * T].reshape(W, T, W)
        flags = m[:, META_FIXED + W * T:META_FIXED + (W + 1) * T]
        self.sizes = sizes
        ledger = self.state.ledger
        for t, p in enumerate(self.params):
            if bool(((flags[:, t] & FLAG_NONFINITE) != 0).any()):
                d = NONFINITE
            elif bool(((flags[:, t] & FLAG_ZERO) != 0).all()):
                d = ZERO
            elif p.bin_size is None:
                d = DENSE_RULE
            else:
                d = COMPRESSED
            self.decisions.append(d)
            per = []
            for dst in range(W):
                r0, r1 = p.rows(dst)
                if r1 == r0:
                    per.append(EMPTY)
                elif d == COMPRESSED and int(sizes[:, t, dst].max()) >= (r1 - r0) * p.row * self.esize:
                    per.append(DENSE_FALLBACK)  # some rank's payload is not smaller: dense
                else:
                    per.append(d)
            self.piece_dec.append(per)
        if NONFINITE in self.decisions:
            ledger.bad = True
        try:
            for t in range(T):
                for dst in range(W):
                    pend = self.pending[t][dst]
                    if self.piece_dec[t][dst] == COMPRESSED:
                        ledger.add(self.comp, pend)
                    else:
                        self.comp.discard(pend)
                    self.pending[t][dst] = None
        except ValueError:
            self._discard_all()
            raise

    def _wire_bytes(self, src: int, t: int, dst: int) -> int:
        d = self.piece_dec[t][dst]
        if d == COMPRESSED:
            return int(self.sizes[src, t, dst])
        if d in (DENSE_RULE, DENSE_FALLBACK):
            r0, r1 = self.params[t].rows(dst)
            return (r1 - r0) * self.params[t].row * self.esize
        return 0  # empty, zero or non-finite: nothing travels

    # ------------------------------------------------------------------ the all-to-all
    def send_parts(self) -> list[torch.Tensor]:
        parts = []
        for dst in range(self.world):
            bufs = []
            for t in range(len(self.params)):
                d = self.piece_dec[t][dst]
                if d == COMPRESSED:
                    bufs.append(self.payloads[t][dst].to(self.device))
                elif d in (DENSE_RULE, DENSE_FALLBACK):
                    bufs.append(self.pieces[t][dst].contiguous().view(-1).view(torch.uint8))
            parts.append(torch.cat(bufs) if bufs else torch.empty(0, dtype=torch.uint8, device=self.device))
        return parts

    def recv_sizes(self) -> list[int]:
        me = self.rank
        return [sum(self._wire_bytes(r, t, me) for t in range(len(self.params))) for r in range(self.world)]

    # ------------------------------------------------------------------ the owner's side
    def finish(self, received: list[torch.Tensor], out: torch.Tensor, op) -> bool:
        """Decode this rank's pieces in rank order, reduce with FSDP's op, write ``out``.
        Returns whether a sum of finite values overflowed."""
        kind, factor = _reduce_factor(op)
        W, me = self.world, self.rank
        # Where each piece lies in each rank's bytes; then every compressed piece decoded
        # (and validated, before anything is written) with one call.
        cursor = [0] * W
        at = []
        for t in range(len(self.params)):
            at.append(list(cursor))
            for r in range(W):
                cursor[r] += self._wire_bytes(r, t, me)
        accs, entries = {}, []
        for t, p in enumerate(self.params):
            if self.piece_dec[t][me] == COMPRESSED:
                r0, r1 = p.rows(me)
                accs[t] = torch.empty((r1 - r0) * p.row, dtype=torch.float32, device=out.device)
                entries += [(len(accs) - 1, 0, (r1 - r0) * p.row, r, at[t][r], int(self.sizes[r, t, me]),
                             tuple(p.piece_shape(me))) for r in range(W)]
        if accs:
            decode_bucket_(list(accs.values()), received, entries)
        overflow = False
        for t, p in enumerate(self.params):
            o = self.offsets[t]
            region = out[o:o + p.chunk_numel]
            r0, r1 = p.rows(me)
            n = (r1 - r0) * p.row
            if n < region.numel():
                region[n:].zero_()  # padding rows
            d = self.piece_dec[t][me]
            if d == EMPTY:
                continue
            acc = accs[t] if d == COMPRESSED else torch.zeros(n, dtype=torch.float32, device=out.device)
            if d in (DENSE_RULE, DENSE_FALLBACK):
                nbytes = n * self.esize
                for r in range(W):
                    raw = received[r][at[t][r]:at[t][r] + nbytes].clone()  # clone: realign
                    acc.add_(raw.view(self.dtype).to(torch.float32))
            elif d == NONFINITE:
                acc.fill_(float("nan"))
            if d in (COMPRESSED, DENSE_RULE, DENSE_FALLBACK):
                _apply_reduce_(acc, kind, factor, W)
                if not bool(torch.isfinite(acc).all()):
                    overflow = True  # an owner's sum of finite values overflowed
            region[:n].copy_(acc)
        return overflow

    # ------------------------------------------------------------------ accounting
    def account(self, stats: TrafficStats) -> None:
        """Bytes this rank hands to the collectives (the all-to-all's send buffer, its own
        part included, and the size vector) against the bytes FSDP2's dense reduce-scatter
        is handed (the whole input, padding included), by kind of layer."""
        W, me, es = self.world, self.rank, self.esize
        for t, p in enumerate(self.params):
            d = self.decisions[t]
            kind = "dense" if p.bin_size is None else layer_kind(p.shape)
            for dst in range(W):
                r0, r1 = p.rows(dst)
                dense_b = (r1 - r0) * p.row * es
                pd = self.piece_dec[t][dst]
                if pd == EMPTY:
                    continue
                if pd == DENSE_FALLBACK:
                    stats.add("dense", dense_b, dense_b)
                else:
                    stats.add(kind, dense_b, self._wire_bytes(me, t, dst))
            pad = (p.k * W - p.d0) * p.row * es
            if pad:
                stats.add("overhead", pad, 0)  # FSDP hands over padding rows; AdaComp does not
            stats.last_exchange[p.name] = DECISION_NAMES[d]
        meta_bytes = self._meta.numel() * 8
        stats.add("overhead", 0, meta_bytes)
        recv = self.recv_sizes()
        stats.add_received(sum(recv) - recv[me] + (W - 1) * meta_bytes)
        stats.note_exchange(self.params[0].name if self.params else "", "alltoall",
                            {"mode": "alltoall", "reason": "FSDP reduce-scatter"})


class AdaCompReduceScatter(_ReduceScatterBase):
    """FSDP2's ``ReduceScatter`` protocol for one FSDP module: ``allocate`` and
    ``__call__(output_tensor, input_tensor, group, op, async_op)``, compressing with the
    shared :class:`FSDPAdaCompState`. Installed by :func:`apply_`."""

    def __init__(self, state: FSDPAdaCompState, module_fqn: str, params: list[_Param]):
        self.state = state
        self.module_fqn = module_fqn
        self.params = params
        self.calls = 0

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    @torch.no_grad()
    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, op,
                 async_op: bool = False):
        self.calls += 1
        self.state._reduce_scatter(self, output_tensor, input_tensor, group, op)
        return _Done.make(output_tensor) if async_op else None


class FSDPAdaCompState(ExchangeState):
    """The AdaComp state of one FSDP2 model, checkpointable per rank: one compressor whose
    residues are keyed ``"<parameter fqn>@rows[a:b]"`` (every rank holds the residue of its
    full unsharded gradient, piece by piece), the :class:`StepLedger` shared by all the
    model's FSDP modules (a step is committed whole or not at all), the loss scaler the
    residues follow, and the traffic statistics. Build it with :func:`apply_`."""

    __slots__ = ("compressor", "owner", "exchange", "cost_model", "iter", "traffic", "ledger",
                 "scaler", "residue_scale", "owner_pending", "world", "rank", "process_group",
                 "comms", "params", "log_every", "_queued", "_task", "_overflow", "_step_group",
                 "_step_device", "start_iter")

    def __init__(self, compressor: AdaComp, process_group, *, scaler=None, log_every: int = 0,
                 start_iter: int = 0):
        self._init_exchange_state(compressor, EXCHANGE_NAME, None, scaler)
        self.start_iter = check_start_iter(start_iter)
        self.process_group = process_group
        self.world = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.comms: dict[str, AdaCompReduceScatter] = {}
        self.params: dict[str, _Param] = {}
        self.log_every = log_every
        self._queued = False
        self._task = None
        self._overflow = False
        self._step_group = None
        self._step_device = None

    def _identity(self) -> dict:
        return {"world": self.world, "rank": self.rank}

    # -- the reduce-scatter ------------------------------------------------------------
    def _reduce_scatter(self, comm: AdaCompReduceScatter, out, inp, group, op) -> None:
        W, me = group.size(), dist.get_rank(group)
        self._open_step(group, inp.device)
        if self.iter < self.start_iter:  # dense warm-up: a plain reduce-scatter, residues untouched
            try:
                kind, factor = _reduce_factor(op)
                # SUM, then FSDP's op (gloo has no AVG reduce-scatter), as the compressed path does
                dist.reduce_scatter_tensor(out, inp, op=dist.ReduceOp.SUM, group=group)
                _apply_reduce_(out, kind, factor, W)
            except Exception:
                self.abort_step()
                raise
            nbytes = inp.numel() * inp.element_size()
            self.traffic.add("dense", inp.numel() * 4, nbytes)
            self.traffic.add_received((W - 1) * nbytes // W)
            if not self._queued:
                self._close_step()
            return
        included = [p for p in comm.params if p.fsdp_param is None
                    or p.fsdp_param.sharded_param.requires_grad]
        try:
            if W != self.world:
                raise ValueError(f"AdaComp FSDP reduce-scatter on a group of {W} ranks; the state was "
                                 f"built for {self.world}")
            _reduce_factor(op)
            ex = _ChunkExchange(self, included, inp, W, me, len(comm.params))
        except Exception:
            # Tell the other ranks (they raise ConfigMismatchError), then raise this error.
            self.abort_step()
            meta = error_meta(len(comm.params), W, pieces=W, device=inp.device)
            meta[2] = len(included)
            check_headers(_allgather_int64(meta, W, group), W, len(included), W, local_error=True)
            raise
        try:
            ex.decide(_allgather_int64(ex.meta(), W, group))  # raises on every rank on mismatch
            parts = ex.send_parts()
            received = _alltoallv(parts, ex.recv_sizes(), group)
            self._overflow |= ex.finish(received, out, op)
            ex.account(self.traffic)
        except Exception:
            self.abort_step()
            raise
        if not self._queued:  # not inside a backward pass: this call is the whole step
            self._close_step()

    def _open_step(self, group, device) -> None:
        task = _graph_task_id()
        if self._queued and task != self._task:
            # The backward pass that opened the step died before its end (an error elsewhere):
            # its updates are dropped and a new step opens.
            self.abort_step()
        if self._queued or self.ledger.open:
            return
        self.begin_step()  # follows the loss scaler's scale
        self._step_group, self._step_device = group, device
        if task is not None and task >= 0:
            try:
                torch.autograd.Variable._execution_engine.queue_callback(self._close_step)
                self._queued, self._task = True, task
            except RuntimeError:
                self._queued = False

    def _close_step(self) -> None:
        """The end of the backward pass: commit the step's residue updates, or discard them
        all if any rank flagged a non-finite value or an owner's sum overflowed."""
        self._queued, self._task = False, None
        flag = torch.tensor([1 if self._overflow else 0], dtype=torch.int64, device=self._step_device)
        self._overflow = False
        try:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._step_group)
        except Exception:
            self.abort_step()
            raise
        if int(flag.item()):
            self.ledger.bad = True
        self.traffic.add("overhead", 0, 8)
        self.traffic.add_received(8 * (self.world - 1))
        self.end_step()
        if self.log_every and self.iter % self.log_every == 0:
            logger.info("AdaComp FSDP %s", self.traffic.format())

    def abort_step(self) -> None:
        self._queued, self._task, self._overflow = False, None, False
        super().abort_step()

    # -- residues and statistics -------------------------------------------------------
    def names(self) -> list[str]:
        """The fully qualified names of the parameters under AdaComp."""
        return list(self.params)

    def residue(self, name: str) -> torch.Tensor:
        """This rank's residue of parameter ``name``'s full unsharded gradient (fp32, the
        parameter's shape; zeros where nothing is pending)."""
        p = self.params[name]
        full = torch.zeros(p.numel, dtype=torch.float32)
        known = set(self.compressor.names())
        for dst in range(self.world):
            r0, r1 = p.rows(dst)
            key = piece_key(name, r0, r1)
            if r1 > r0 and key in known:
                full[r0 * p.row:r1 * p.row] = self.compressor.residue(key).reshape(-1).cpu()
        return full.view(p.shape)

    def memory(self) -> dict:
        """Bytes this rank holds: residues (committed) and the compressor's spare buffers
        (two-phase updates), next to the parameters (this rank's shards and the unsharded
        model)."""
        comp = self.compressor
        residue = sum(v.numel() * v.element_size() for v in comp._residues.values())
        spare = sum(v.numel() * v.element_size() for v in comp._spare.values())
        local = unsharded = compressed = 0
        for p in self.params.values():
            es = torch.empty(0, dtype=p.dtype).element_size()
            sp = p.fsdp_param.sharded_param if p.fsdp_param is not None else None
            local += sp.to_local().numel() * es if sp is not None else 0
            unsharded += p.numel * es
            if p.bin_size is not None:
                compressed += p.numel * es
        return {"residue_bytes": residue, "spare_bytes": spare, "param_bytes_local": local,
                "param_bytes_unsharded": unsharded, "compressed_param_bytes_unsharded": compressed,
                "residue_over_local_params": (residue / local) if local else None}

    def stats(self) -> dict:
        """:meth:`ExchangeState.stats` (``total`` / ``last_step``: ``dense_bytes`` is what
        FSDP2's dense reduce-scatter would be handed, padding included, ``wire_bytes`` what
        this rank hands to the all-to-all and the size exchange, headers included, by kind),
        plus ``reduce_scatter`` (the totals and their ratio) and ``memory``
        (:meth:`memory`)."""
        d = super().stats()
        tot = d["total"]["all"]
        d["reduce_scatter"] = {"dense_bytes": tot["dense_bytes"], "handed_bytes": tot["wire_bytes"],
                               "ratio": tot["ratio"]}
        d["memory"] = self.memory()
        return d

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._queued, self._task, self._overflow = False, None, False

    def __getstate__(self):
        raise TypeError("FSDPAdaCompState is bound to a live FSDP model and process group: save "
                        "state.state_dict() instead and load it into the state apply_() returns")


# ----------------------------------------------------------------------------- collectives

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _allgather_int64(t: torch.Tensor, world: int, group) -> torch.Tensor:
    out = torch.empty(world * t.numel(), dtype=t.dtype, device=t.device)
    _all_gather_single(out, t, group=group)
    return out.view(world, -1)


def _alltoallv(parts: list[torch.Tensor], recv_sizes: list[int], group) -> list[torch.Tensor]:
    send = torch.cat(parts)
    recv = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=send.device)
    dist.all_to_all_single(recv, send, output_split_sizes=list(recv_sizes),
                           input_split_sizes=[p.numel() for p in parts], group=group)
    return list(torch.split(recv, list(recv_sizes)))


def _graph_task_id():
    f = getattr(torch._C, "_current_graph_task_id", None)
    return f() if f is not None else None


# ----------------------------------------------------------------------------- apply_

def _fsdp_modules(model: nn.Module):
    from torch.distributed.fsdp import FSDPModule

    return [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, FSDPModule)]


def apply_(model: nn.Module, *, bin_size=None, scale: str = "binmax_mean", values: str = "ternary",
           min_numel: int = DEFAULT_MIN_NUMEL, device=None, scaler=None,
           log_every: int = 0, start_iter: int = 0) -> FSDPAdaCompState:
    """Install AdaComp's compressing reduce-scatter on every FSDP module of ``model`` (call it
    after ``fully_shard``, on every rank, with the same settings); returns the model's
    :class:`FSDPAdaCompState` (residues, ``stats()``, ``state_dict()``).

    ``bin_size``, ``scale``, ``values``, ``min_numel``, ``device``: as :class:`adacomp.AdaComp`
    (bin sizes by each parameter's original shape and fully qualified name). ``scaler``: the
    ``torch.amp.GradScaler`` whose scale the residues follow. ``start_iter``: steps before
    it use FSDP2's dense reduce-scatter (residues untouched; e.g. the dense warm-up of
    :class:`adacomp.optim.FrozenVarianceAdamW`). It also turns on
    ``set_reduce_scatter_unused_params(True)`` (a parameter without a gradient takes part as
    zeros, so every rank hands over the same parameters). Raises ``ValueError`` for HSDP (a
    2-D device mesh), ``Shard(dim > 0)`` placements, several parameter groups per module, or a
    model without FSDP modules.
    """
    mods = _fsdp_modules(model)
    if not mods:
        raise ValueError("adacomp.parallel.fsdp.apply_: the model has no FSDP module; call "
                         "torch.distributed.fsdp.fully_shard on its blocks and on the model first")
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    comp = AdaComp(bin_size=bin_size, scale=scale, values=values, min_numel=min_numel, device=device)
    plan, group = [], None
    for fqn, m in mods:
        fsdp_state = m._get_fsdp_state()
        groups = list(getattr(fsdp_state, "_fsdp_param_groups", []) or [])
        if len(groups) > 1:
            raise ValueError(f"adacomp.parallel.fsdp: FSDP module {fqn or '<root>'!r} has "
                             f"{len(groups)} parameter groups (per-parameter meshes); one is supported")
        if not groups:
            continue
        params = []
        for fp in groups[0].fsdp_params:
            sp = fp.sharded_param
            name = names.get(id(sp))
            if name is None:
                raise ValueError(f"adacomp.parallel.fsdp: a parameter of FSDP module {fqn!r} is not "
                                 "among model.named_parameters()")
            mesh = getattr(sp, "device_mesh", None)
            if mesh is not None and mesh.ndim != 1:
                raise ValueError(
                    f"adacomp.parallel.fsdp: {name!r} lives on a {mesh.ndim}-D device mesh (HSDP); "
                    "AdaComp's FSDP reduce-scatter supports 1-D meshes (plain FSDP) only")
            placement = getattr(fp, "fsdp_placement", None)
            if placement is not None and getattr(placement, "dim", 0) != 0:
                raise ValueError(f"adacomp.parallel.fsdp: {name!r} is sharded on dim "
                                 f"{placement.dim}; only Shard(0) is supported")
            g = mesh.get_group() if mesh is not None else dist.group.WORLD
            if group is None:
                group = g
            elif g is not group:
                raise ValueError("adacomp.parallel.fsdp: the FSDP modules use different process "
                                 "groups; one is supported")
            shape = tuple(fp._orig_size)
            params.append((name, shape, fp, sp.dtype))
        plan.append((fqn, m, params))
    if group is None:
        raise ValueError("adacomp.parallel.fsdp.apply_: no FSDP module manages a parameter")
    state = FSDPAdaCompState(comp, group, scaler=scaler, log_every=log_every, start_iter=start_iter)
    W = state.world
    for fqn, m, params in plan:
        entries = []
        for name, shape, fp, dtype in params:
            b = comp.bin_size_for(name, torch.empty(shape, dtype=dtype, device="meta"))
            p = _Param(name, shape, W, b, fp, dtype)
            padded = getattr(fp, "padded_sharded_param_size", None)
            if padded is not None and len(shape) and int(padded[0]) != p.k:
                raise ValueError(f"adacomp.parallel.fsdp: FSDP pads {name!r} to {tuple(padded)} "
                                 f"rows per rank, this integration expected {p.k}")
            entries.append(p)
            state.params[name] = p
        comm = AdaCompReduceScatter(state, fqn, entries)
        m.set_custom_reduce_scatter(comm)
        if hasattr(m, "set_reduce_scatter_unused_params"):
            m.set_reduce_scatter_unused_params(True, recurse=False)
        state.comms[fqn] = comm
    return state

"""The transport-independent part of one AdaComp exchange of a group of named gradients.

Every integration (DDP hook, Horovod wrapper, mpi4py communicator) runs the same protocol
and differs only in which collectives carry the bytes (a :class:`Transport`):

1. :class:`GroupExchange` compresses each gradient locally (two-phase: residues are not
   updated yet) and builds a small int64 ``meta`` vector: a configuration hash, and per
   tensor its payload sizes (one per shard in the sharded and auto modes; always ``W``
   slots, so that ranks configured with different modes still send equal-length vectors
   and get a clear error instead of a failed collective) and non-finite flag.
2. The integration all-gathers ``meta`` (Horovod and mpi4py: with the payloads right behind
   it in the all-gather exchange, :func:`run_exchange`; the DDP hook: in fixed-size slots
   after a bucket's first exchange, :class:`SlotCapacity`); :meth:`GroupExchange.decide` checks that every
   rank runs the same configuration (a clear error on every rank otherwise) and decides,
   identically on every rank, per tensor: *non-finite* (any rank saw NaN/Inf: every rank
   outputs NaN and keeps its residue), *dense* (by rule, or because some rank's payload is
   not smaller than the dense bytes: residue kept, plain allreduce), or *compressed*
   (residue committed); and for the group the exchange of the compressed tensors
   (``exchange="auto"``: the mode :class:`MeasuredCost` planned from the times it measured
   in earlier exchanges of the group, or the one :class:`CostModel` estimates fastest):

   * **allgather**: every rank all-gathers every rank's payloads (per-worker traffic grows
     as ``(W - 1)`` payloads);
   * **sharded**: each tensor's index range is split into ``W`` bin-aligned shards, shard
     ``s`` owned by rank ``s``. One all-to-all sends each owner its shard of every rank's
     payload; the owner decodes and averages them, re-compresses the average with AdaComp
     and its own *owner residue* (a second level of error feedback), and the owners'
     payloads are all-gathered (after a small all-gather of their sizes). Per-worker
     traffic stays near two payloads whatever ``W`` is;
   * **dense**: the compressed tensors join the dense allreduce (residues kept).
3. The integration all-gathers :meth:`gather_buffer` and all-reduces (sums)
   :meth:`dense_buffer`.
4. :meth:`finish` decodes in rank order (one ``decode_bucket_`` call for the group),
   averages, and writes the results into the output tensors.

Because every rank decodes the same bytes in the same order, the compressed tensors come
out bit-identical on every rank and in every integration. :func:`run_exchange` drives the
whole protocol over a synchronous :class:`Transport` (Horovod, mpi4py); the DDP hook runs
the same steps with asynchronous collectives for the last one.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass

import torch

from ..compressor import AdaComp
from ..payload import Payload, decode_bucket_, shard_bounds
from ..stats import TrafficStats, layer_kind, ring_allreduce_received

META_MAGIC = 0xADAC04
#: The fixed-size header of the meta vector: magic, config hash, number of tensors, pieces
#: per tensor, status (0, or :data:`STATUS_LOCAL_ERROR` when this rank failed before the
#: exchange), then the measured cost model's fields (:data:`PLAN_FIELDS`: the group's call
#: count and this rank's measured seconds per mode, in microseconds, -1 if not measured).
#: Transports where ranks may disagree on the number of tensors exchange it first
#: (:func:`run_exchange`), so a mismatch is a clear error and not a failed collective.
PLAN_MODES = ("allgather", "sharded", "dense")
PLAN_FIELDS = 1 + len(PLAN_MODES)
META_FIXED = 5 + PLAN_FIELDS
STATUS_OK, STATUS_LOCAL_ERROR = 0, 1
#: Per-tensor flag bits of the meta vector.
FLAG_NONFINITE, FLAG_ZERO = 1, 2

DENSE_RULE, COMPRESSED, DENSE_FALLBACK, NONFINITE, ZERO = 0, 1, 2, 3, 4
#: Tensors sent dense by rule join the payload all-gather (instead of an allreduce) while
#: their bytes are at most this or the largest rank's payload bytes, whichever is larger.
MERGE_DENSE_BYTES = 1 << 16
DECISION_NAMES = {DENSE_RULE: "dense", COMPRESSED: "compressed", DENSE_FALLBACK: "dense-fallback",
                  NONFINITE: "non-finite", ZERO: "zero"}
EXCHANGES = ("allgather", "sharded", "auto")


def check_exchange(exchange: str) -> str:
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    return exchange


def check_start_iter(start_iter) -> int:
    """``start_iter`` (dense steps before compression) of an integration, checked."""
    if isinstance(start_iter, bool) or not isinstance(start_iter, int) or start_iter < 0:
        raise ValueError(f"start_iter must be a non-negative int, got {start_iter!r}")
    return start_iter


@dataclass(frozen=True)
class CostModel:
    """An analytic cost model for ``exchange="auto"`` (the default is
    :class:`MeasuredCost`): seconds = bytes / ``bandwidth`` + rounds x ``latency``, for the
    busiest worker's link, with ring collectives. It has no term for computing (compression,
    decoding): use it where the link is known and dominates.

    For ``W`` workers, the compressed tensors' dense bytes ``D`` and the payload sizes
    ``P[r, t, s]`` (rank ``r``, tensor ``t``, shard ``s``) every rank knows after the size
    exchange:

    * dense ring allreduce: ``2 (W-1)/W * D`` bytes, ``2 (W-1)`` rounds;
    * allgather: ``(W-1) * max_r sum_{t,s} P[r,t,s]`` bytes (padded to the longest
      rank's), ``W - 1`` rounds;
    * sharded: the all-to-all's busiest link, ``max_r max(sent_r, received_r)``, plus the
      owners' all-gather, estimated as ``(W-1) * max_s max_r sum_t P[r,t,s]`` (an owner's
      re-compressed shard is about as dense as one rank's shard), and ``3 (W-1)`` rounds
      (all-to-all, owner sizes, owner payloads).

    The defaults describe a 1 Gbit/s link with 100 us per round; set them to the cluster's.
    """

    bandwidth: float = 1.25e8
    latency: float = 1e-4

    def __post_init__(self):
        if not self.bandwidth > 0 or not self.latency >= 0:
            raise ValueError(f"CostModel needs bandwidth > 0 and latency >= 0, got {self}")

    def seconds(self, nbytes: float, rounds: int) -> float:
        return nbytes / self.bandwidth + rounds * self.latency

    def estimate(self, world: int, dense_bytes: int, sizes: torch.Tensor) -> dict:
        """Estimated ``{mode: (seconds, bytes)}``; ``sizes`` is ``[W, T, S]`` (int64)."""
        W = world
        out = {"dense": (2 * (W - 1) * dense_bytes / W, 2 * (W - 1))}
        per_rank = sizes.sum(dim=(1, 2))
        out["allgather"] = ((W - 1) * int(per_rank.max()) if W > 1 else 0, W - 1)
        if sizes.shape[2] == W:
            by_shard = sizes.sum(dim=1)                       # [W ranks, W shards]
            own = torch.diagonal(by_shard)
            sent = by_shard.sum(dim=1) - own
            received = by_shard.sum(dim=0) - own
            a2a = int(torch.maximum(sent, received).max()) if W > 1 else 0
            owners = int(by_shard.max(dim=0).values.max()) if W > 1 else 0
            out["sharded"] = (a2a + (W - 1) * owners, 3 * (W - 1))
        return {m: (self.seconds(b, r), int(b)) for m, (b, r) in out.items()}


class MeasuredCost:
    """The default cost model of ``exchange="auto"``: it times the exchange modes on this
    machine, in this run, and plans each group's next exchange from what it measured.

    Per exchange group (a DDP bucket, a Horovod or mpi4py call, keyed by its parameter
    names) each rank times its whole exchange, from compressing to the decoded average
    (compression, every collective round and the wait in it for slower ranks, decoding,
    the owners' re-compression), and keeps the last ``window`` times per mode. The median
    travels to the other ranks in the header of the next exchange (:data:`META_FIXED`), so
    every rank sees the same figures and, taking the slowest rank's, plans the same mode for
    the group's next exchange; the mode is known before compressing, so the allgather
    exchange does not pay for splitting payloads into shards.

    Schedule per group: the first ``trials`` exchanges with each mode of ``modes`` in turn
    (exploring), then the first mode of ``modes`` unless another one measured at least
    ``margin`` (a fraction) faster, in which case the fastest; every ``refresh`` exchanges
    each mode is tried once more, so a change (a slower link, bigger payloads as residues
    fill up) is noticed. The margin keeps measurement noise (an exchange's time includes
    waiting for the slowest rank) from flipping between modes that cost about the same.

    ``modes``: ``("allgather", "sharded")`` (default: how compressed payloads travel), or
    with ``"dense"`` too (then a group whose compression does not pay on this link is sent
    as a plain allreduce, its residues kept for later). :class:`CostModel` is the analytic
    alternative (bytes and rounds on a link you describe).

    Raises ``ValueError`` on unknown modes or non-positive counts.
    """

    def __init__(self, modes=("allgather", "sharded"), trials: int = 2, window: int = 5,
                 refresh: int = 200, margin: float = 0.1):
        modes = tuple(modes)
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"MeasuredCost margin must be in [0, 1), got {margin!r}")
        if not modes or any(m not in PLAN_MODES for m in modes) or len(set(modes)) != len(modes):
            raise ValueError(f"MeasuredCost modes must be distinct entries of {PLAN_MODES}, got {modes}")
        for k, v in (("trials", trials), ("window", window), ("refresh", refresh)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MeasuredCost {k} must be an int >= 1, got {v!r}")
        if refresh <= trials * len(modes):
            raise ValueError(f"MeasuredCost refresh ({refresh}) must exceed the exploring "
                             f"exchanges (trials x modes = {trials * len(modes)})")
        self.modes, self.trials, self.window, self.refresh = modes, trials, window, refresh
        self.margin = float(margin)
        self._groups: dict = {}

    def __repr__(self):
        return (f"MeasuredCost(modes={self.modes}, trials={self.trials}, window={self.window}, "
                f"refresh={self.refresh}, margin={self.margin})")

    def __getstate__(self):  # measurements are of this run's machine and links: not saved
        return {"modes": self.modes, "trials": self.trials, "window": self.window,
                "refresh": self.refresh, "margin": self.margin, "_groups": {}}

    def _group(self, key):
        g = self._groups.get(key)
        if g is None:
            g = self._groups[key] = {"count": 0, "plan": self.modes[0], "times": {}}
        return g

    def plan(self, key) -> str:
        """The mode of the group's next exchange (the same on every rank)."""
        return self._group(key)["plan"]

    def header_fields(self, key) -> list[int]:
        """This rank's :data:`PLAN_FIELDS` header entries for the group: call count and the
        median measured microseconds per mode of :data:`PLAN_MODES` (-1: none yet)."""
        g = self._group(key)
        out = [g["count"]]
        for m in PLAN_MODES:
            t = g["times"].get(m)
            out.append(int(round(sorted(t)[(len(t) - 1) // 2] * 1e6)) if t else -1)  # lower median
        return out

    def observe(self, key, headers: torch.Tensor) -> dict:
        """Plan the group's next exchange from every rank's header (``[W, META_FIXED]``):
        the same on every rank. Returns the figures it used (seconds per mode, slowest
        rank's median; None where some rank has no measurement)."""
        g = self._group(key)
        h = headers[:, 5:5 + PLAN_FIELDS].cpu()
        count = int(h[0, 0])  # rank 0's count: the same schedule everywhere
        shared = {}
        for i, m in enumerate(PLAN_MODES):
            col = h[:, 1 + i]
            shared[m] = None if bool((col < 0).any()) else float(col.max()) * 1e-6
        nxt = count + 1
        explore = self.trials * len(self.modes)
        if nxt < explore:
            g["plan"] = self.modes[nxt // self.trials]
        elif nxt % self.refresh < len(self.modes) and nxt >= self.refresh:
            g["plan"] = self.modes[nxt % self.refresh]
        else:
            known = [m for m in self.modes if shared[m] is not None]
            plan = known[0] if known else self.modes[0]
            for m in known[1:]:
                if shared[m] < shared[plan] * (1.0 - self.margin):
                    plan = m
            g["plan"] = plan
        return shared

    def record(self, key, mode: str, seconds: float) -> None:
        """This rank's time for the group's exchange just finished (``mode``: as planned)."""
        g = self._group(key)
        g["count"] += 1
        t = g["times"].setdefault(mode, [])
        t.append(seconds)
        del t[:-self.window]


@dataclass(frozen=True)
class SlotPlan:
    """How a group's one-round exchange sends its bytes (:class:`SlotCapacity`):
    ``capacity`` bytes per rank after the meta vector (the merged dense tensors, then the
    payloads; None: each rank sends exactly its bytes, for transports whose all-gather
    takes a different length per rank), and whether the group's small fp32 tensors sent
    dense by rule ride in the slot (``merge_dense``)."""

    capacity: int | None
    merge_dense: bool


class SlotCapacity:
    """The slot sizes of the one-round all-gather exchange, per exchange group.

    A group's first exchange sends its meta vector (payload sizes) in one all-gather and its
    payloads in a second one, padded to the longest rank's. After it every rank knows every
    rank's payload bytes, so while the group keeps to the all-gather exchange each later
    exchange sends meta and payloads together in **one** all-gather of fixed-size slots:
    ``capacity`` = the largest payload bytes of any rank over the group's last ``history``
    exchanges, times ``1 + margin``, rounded up to 64 bytes (plus the bytes of the small
    dense tensors that ride along). Every rank computes it from the
    same gathered sizes, so every rank sends slots of the same length without asking. A
    payload longer than its slot sends its first ``capacity`` bytes in the slot and the rest
    in a second all-gather, which every rank knows to issue from the slots' meta vectors
    (the exchange stays correct, it only costs the round it saved).

    On a link where a round costs more than the padding's bytes this saves one collective
    round per bucket (measured in docs/results.md, "DDP hook overhead"). ``margin`` and
    ``history`` trade padding bytes against overflow rounds: on the CNN, char-LSTM and GPT
    of the benchmarks the defaults pad 19-24 % of the payload bytes and overflow in 0-11 %
    of the exchanges; ``history=4`` pads 26-32 % and overflows in 0-4 %; ``margin=0.0625,
    history=1`` pads 9-12 % and overflows in 0-29 % (CNN the most: its payload sizes vary
    +-15 % from step to step). The DDP hook's state saves it with its checkpoint
    (``state_dict``), so a resumed run sends the same slots as the uninterrupted one (the
    same bytes, when DDP forms the same buckets). Raises ``ValueError`` on a negative
    ``margin`` or a ``history`` below 1.
    """

    ALIGN = 64

    def __init__(self, margin: float = 0.125, history: int = 2):
        if not (isinstance(margin, (int, float)) and margin >= 0 and math.isfinite(margin)):
            raise ValueError(f"SlotCapacity margin must be a finite number >= 0, got {margin!r}")
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"SlotCapacity history must be an int >= 1, got {history!r}")
        self.margin, self.history = float(margin), history
        self._groups: dict = {}

    def __repr__(self):
        return f"SlotCapacity(margin={self.margin}, history={self.history})"

    def state_dict(self) -> dict:
        """Each group's recent payload sizes and next plan (a resumed run then sends the
        same slots, so its traffic is the uninterrupted run's)."""
        return {key: {"needs": list(g["needs"]),
                      "plan": None if g["plan"] is None else (g["plan"].capacity, g["plan"].merge_dense)}
                for key, g in self._groups.items()}

    def load_state_dict(self, state: dict) -> None:
        self._groups = {key: {"needs": list(g["needs"])[-self.history:],
                              "plan": None if g["plan"] is None else SlotPlan(*g["plan"])}
                        for key, g in state.items()}

    def plan(self, key) -> SlotPlan | None:
        """The slot plan of the group's next exchange, or None (two rounds: sizes first)."""
        g = self._groups.get(key)
        return None if g is None else g["plan"]

    def update(self, key, need: int, rule_bytes: int = 0, next_allgather: bool = True) -> None:
        """After an exchange of group ``key``, identically on every rank: ``need`` is the
        largest rank's payload bytes, ``rule_bytes`` the bytes of its small fp32 tensors
        sent dense by rule, ``next_allgather`` whether the group's next exchange is an
        all-gather (if not, it gets no slot plan, but its sizes are remembered for when the
        group returns to the all-gather)."""
        g = self._groups.setdefault(key, {"needs": [], "plan": None})
        g["needs"].append(int(need))
        del g["needs"][:-self.history]
        if not next_allgather:
            g["plan"] = None
            return
        cap = math.ceil(max(g["needs"]) * (1.0 + self.margin) / self.ALIGN) * self.ALIGN
        merge = 0 < rule_bytes <= max(MERGE_DENSE_BYTES, cap)
        g["plan"] = SlotPlan(cap + (rule_bytes if merge else 0), merge)


class Transport:
    """The collectives an integration provides to :func:`run_exchange` (synchronous)."""

    world: int
    rank: int
    padded = False  # True if allgatherv pads every rank's bytes to the longest

    def allgather_int64(self, t: torch.Tensor) -> torch.Tensor:
        """All-gather a 1-D int64 tensor of the same length on every rank -> ``[W, n]``."""
        raise NotImplementedError

    def allgatherv(self, own: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
        """All-gather 1-D uint8 tensors of ``sizes[r]`` bytes -> one tensor per rank (each at
        least ``sizes[r]`` long)."""
        raise NotImplementedError

    def allgather_bytes(self, own: torch.Tensor) -> list[torch.Tensor]:
        """All-gather 1-D uint8 tensors whose lengths the ranks do not know of each other
        -> one tensor per rank, exactly as long as that rank's. This default sends the
        lengths first (two rounds); a transport whose all-gather takes a different length
        per rank does it in one."""
        lengths = self.allgather_int64(torch.tensor([own.numel()], dtype=torch.int64))
        return self.allgatherv(own, [int(x) for x in lengths.reshape(-1).tolist()])

    def alltoallv(self, parts: list[torch.Tensor], recv_sizes: list[int]) -> list[torch.Tensor]:
        """Send ``parts[s]`` (1-D uint8) to rank ``s``; receive ``recv_sizes[r]`` bytes from
        each rank ``r`` -> one tensor per source rank."""
        raise NotImplementedError

    def allreduce_sum(self, flat: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks of a 1-D tensor."""
        raise NotImplementedError


def _headers_of(got: list[torch.Tensor]) -> torch.Tensor:
    """``[W, META_FIXED]`` headers from every rank's gathered bytes (a rank whose bytes are
    too short to hold one gets a header that :func:`check_headers` reports as failed)."""
    n = META_FIXED * 8
    return torch.stack([g[:n].cpu().clone().view(torch.int64) if g.numel() >= n
                        else torch.zeros(META_FIXED, dtype=torch.int64) for g in got])


def run_exchange(ex: GroupExchange, transport: Transport, stats: TrafficStats) -> None:
    """Run the whole protocol of :class:`GroupExchange` ``ex`` over ``transport``.

    The first all-gather (:meth:`Transport.allgather_bytes`, any length per rank) carries
    every rank's meta vector, and when ``ex`` was built ``inband`` (the group's exchange is
    the all-gather) its payloads too, unpadded: one round where the transport's all-gather
    takes a different length per rank (Horovod). Every rank checks every rank's fixed-size
    header first, so ranks that disagree on the tensors raise :class:`ConfigMismatchError`
    together instead of failing inside a collective. Then, unless the payloads came in
    band, the sharded rounds and the payload all-gather; then the dense sum."""
    got = transport.allgather_bytes(ex.first_buffer())
    check_headers(_headers_of(got), ex.world, len(ex.grads), ex.pieces)
    mb = ex.meta_bytes()
    if any(g.numel() < mb for g in got):
        ex._discard_all()
        raise ConfigMismatchError("AdaComp: ranks disagree on the tensors exchanged together (a meta "
                                  "vector is shorter than this rank's); every rank must exchange "
                                  "the same named parameters with the same settings")
    ex.decide(torch.stack([g[:mb].cpu().clone().view(torch.int64) for g in got]))
    gathered = None
    if ex.slot_plan is not None:
        sizes = ex.gather_sizes()
        if [g.numel() - mb for g in got] != sizes:  # the same verdict on every rank
            raise ConfigMismatchError(f"AdaComp: ranks sent {[g.numel() - mb for g in got]} payload "
                                      f"bytes where their meta vectors say {sizes}: the ranks run "
                                      "different versions or settings of adacomp")
        gathered = [g[mb:] for g in got]
    else:
        if ex.mode == "sharded":
            received = transport.alltoallv(ex.alltoall_parts(), ex.alltoall_recv_sizes())
            ex.reduce_owned(received)
            ex.set_owner_sizes(transport.allgather_int64(ex.owner_sizes()))
        if ex.compressed:
            gathered = transport.allgatherv(ex.gather_buffer(), ex.gather_sizes())
    dense = ex.dense_buffer()
    dense_sum = transport.allreduce_sum(dense) if dense is not None else None
    ex.account(stats, padded=transport.padded)
    ex.finish(gathered, dense_sum)


def header_fields(config: int, num_tensors: int, pieces: int, status: int = STATUS_OK,
                  plan: list[int] | None = None) -> list[int]:
    """The :data:`META_FIXED` header entries (``plan``: :meth:`MeasuredCost.header_fields`)."""
    return [META_MAGIC, config, num_tensors, pieces, status] + (plan or [0] + [-1] * len(PLAN_MODES))


def error_header(num_tensors: int, pieces: int = 1) -> torch.Tensor:
    """The header a rank sends when it failed before it could build its exchange, so that
    the other ranks raise too (:func:`check_headers`) instead of waiting for it."""
    return torch.tensor(header_fields(0, num_tensors, pieces, STATUS_LOCAL_ERROR), dtype=torch.int64)


def error_meta(num_tensors: int, world: int, pieces: int = 1, device=None) -> torch.Tensor:
    """:func:`error_header` padded to the length of a full meta vector of ``num_tensors``
    (for transports that need equal lengths on every rank, as the DDP hook's all-gather)."""
    m = torch.zeros(META_FIXED + (world + 1) * num_tensors, dtype=torch.int64)
    m[:META_FIXED] = error_header(num_tensors, pieces)
    return m.to(device) if device is not None else m


def check_headers(all_headers: torch.Tensor, world: int, num_tensors: int, pieces: int,
                  local_error: bool = False) -> None:
    """Raise :class:`ConfigMismatchError` on every rank if a rank reported a local error or
    ranks disagree on the number of tensors or the exchange mode. ``all_headers``: the
    all-gathered :meth:`GroupExchange.header` (``[W, META_FIXED]``, or full meta vectors,
    whose first columns are the header). A rank with ``local_error`` returns without
    raising (it raises its own error)."""
    h = all_headers.reshape(world, -1)[:, :META_FIXED].cpu()
    failed = [r for r in range(world) if int(h[r, 4]) != STATUS_OK or int(h[r, 0]) != META_MAGIC]
    if local_error:
        return
    if failed:
        raise ConfigMismatchError(
            f"AdaComp: rank(s) {failed} failed before this exchange (see the traceback on that "
            "rank); every rank stops here instead of waiting for it")
    counts = h[:, 2].tolist()
    if any(c != num_tensors for c in counts) or bool((h[:, 3] != pieces).any()):
        raise ConfigMismatchError(
            f"AdaComp: ranks disagree on the tensors exchanged together (tensors per rank: "
            f"{counts}) or on the exchange mode (pieces per tensor: {h[:, 3].tolist()}); every "
            "rank must exchange the same named parameters with the same settings (a parameter "
            "whose .grad is None on some ranks only is a common cause)")


class StepLedger:
    """The residue updates of one training step, held until the step's last exchange.

    A step is applied whole or not at all (docs/algorithm.md, step atomicity): the
    exchanges of a step add their pending residue updates here, and :meth:`close` commits
    them all, or discards them all when any rank saw a non-finite value in any tensor of
    the step (the step that ``GradScaler`` skips)."""

    __slots__ = ("entries", "names", "bad", "open")

    def __init__(self):
        self.entries: list = []
        self.names: set = set()
        self.bad = False
        self.open = False

    def add(self, comp: AdaComp, pending) -> None:
        if pending is None:
            return
        name = pending[0]
        key = (id(comp), name)
        if key in self.names:
            comp.discard(pending)
            raise ValueError(f"AdaComp: {name!r} is exchanged twice in one step; each parameter "
                             "goes into one exchange per step (gradient accumulation sums first)")
        self.names.add(key)
        self.entries.append((comp, pending))

    def close(self) -> bool:
        """Commit (or, if the step is bad, discard) every held update; returns whether the
        updates were committed."""
        commit = not self.bad
        for comp, pending in self.entries:
            (comp.commit if commit else comp.discard)(pending)
        self._reset()
        return commit

    def abort(self) -> None:
        """Discard every held update (the step failed)."""
        self.bad = True
        self.close()

    def _reset(self):
        self.entries, self.names, self.bad, self.open = [], set(), False, False


class ExchangeState:
    """What every integration keeps per rank: the compressor (residues), the owner
    compressor of the sharded exchange (owner residues), the exchange mode and cost model,
    the step counter, the :class:`StepLedger` of the open step, the loss scaler whose scale
    the residues follow, and the traffic statistics; checkpointed together, one entry per
    rank."""

    __slots__ = ()  # subclasses declare compressor, owner, exchange, cost_model, iter, traffic,
    #                 ledger, scaler, residue_scale, owner_pending

    def _init_exchange_state(self, compressor: AdaComp, exchange: str, cost_model, scaler) -> None:
        """Set the attributes every exchange state has (fresh: no residues, step 0)."""
        self.compressor = compressor
        self.owner = None
        self.exchange = exchange
        self.cost_model = cost_model
        self.iter = 0
        self.traffic = TrafficStats()
        self.ledger = StepLedger()
        self.scaler = None
        self.set_scaler(scaler)
        self.residue_scale = None
        self.owner_pending = {}

    def owner_compressor(self) -> AdaComp:
        """The compressor holding this rank's owner residues (created on first use)."""
        if self.owner is None:
            c = self.compressor
            self.owner = AdaComp(bin_size=None, scale=c.scale, values=c.values, min_numel=0,
                                 device=c.device)
        return self.owner

    def group_exchange(self, names, grads, world: int, rank: int, outputs=None, *,
                       slot: SlotPlan | None = None, inband: bool = False) -> GroupExchange:
        self.begin_step()
        return GroupExchange(self.compressor, names, grads, world, outputs=outputs, rank=rank,
                             exchange=self.exchange, owner=self.owner_compressor(),
                             cost_model=self.cost_model, ledger=self.ledger,
                             owner_pending=self.owner_pending, slot=slot, inband=inband)

    # -- steps ------------------------------------------------------------------------------
    def begin_step(self) -> None:
        """Open a step (idempotent within a step): follow the loss scaler's scale."""
        if self.ledger.open:
            return
        self.ledger.open = True
        self.follow_loss_scale()

    def end_step(self) -> bool:
        """Close the step: commit its residue updates (or keep every residue if any rank saw
        a non-finite value in any tensor of it), count it. Returns whether it committed."""
        committed = self.ledger.close()
        self.iter += 1
        self.traffic.end_step()
        return committed

    def abort_step(self) -> None:
        """The step failed (an error on some rank): every residue stays as it was."""
        self.ledger.abort()

    def run(self, names, grads, transport: Transport, outputs=None, *, end_step: bool = True):
        """One exchange over a synchronous ``transport`` (Horovod, mpi4py), errors included:
        a rank that fails while compressing still sends its header, marked failed, so every
        other rank raises :class:`ConfigMismatchError` instead of waiting in a collective."""
        try:
            ex = self.group_exchange(names, grads, transport.world, transport.rank, outputs=outputs,
                                     inband=True)
        except Exception:
            self.abort_step()
            got = transport.allgather_bytes(error_header(len(names)).view(torch.uint8))
            check_headers(_headers_of(got), transport.world, len(names), 1, local_error=True)
            raise
        try:
            run_exchange(ex, transport, self.traffic)
        except Exception:
            self.abort_step()
            raise
        if end_step:
            self.end_step()

    # -- loss scaling -----------------------------------------------------------------------
    def follow_loss_scale(self) -> None:
        """Keep residues in the units of the gradients the loss scaler produces now.

        Residues hold scaled gradient mass; when the scaler's scale changed since they were
        last updated (growth every ``growth_interval`` steps, backoff on overflow), every
        residue (owner residues included) is multiplied by ``new / old``: exact for the
        scaler's power-of-two factors. Reads the scale once per step (``get_scale()``)."""
        scaler = self.scaler
        if scaler is None:
            return
        scale = float(scaler.get_scale()) if scaler.is_enabled() else 1.0
        old = self.residue_scale
        if old is not None and scale != old:
            factor = scale / old
            self.compressor.scale_residues_(factor)
            if self.owner is not None:
                self.owner.scale_residues_(factor)
        self.residue_scale = scale

    def set_scaler(self, scaler) -> None:
        """Follow ``scaler`` (a ``torch.amp.GradScaler``, or None): see
        :meth:`follow_loss_scale`."""
        if scaler is not None and not (hasattr(scaler, "get_scale") and hasattr(scaler, "is_enabled")):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.scaler = scaler

    # -- statistics -------------------------------------------------------------------------
    def stats(self) -> dict:
        """Bytes, cumulative (``total``) and for the last step (``last_step``): dense fp32
        bytes, bytes handed to collectives, their ratio, split by kind of layer (``conv``,
        ``fc`` = fully connected / recurrent, ``dense`` = sent dense, ``overhead``);
        ``received_bytes`` (what this rank received from the others); ``decisions``: how
        each parameter travelled in its last exchange; ``exchanges``: how many groups went
        each way; ``slots``: how many exchanges went in one round of slots and how many of
        them overflowed into a second (:class:`SlotCapacity`); ``last_choice``: per group
        (named by its first parameter) the mode, the reason and the cost model's estimates."""
        d = self.traffic.as_dict()
        d["decisions"] = dict(self.traffic.last_exchange)
        d["exchanges"] = dict(self.traffic.modes)
        d["slots"] = dict(self.traffic.slots)
        d["last_choice"] = dict(self.traffic.last_choice)
        return d

    # -- checkpoints ------------------------------------------------------------------------
    def _identity(self) -> dict:
        """Where this state belongs: ``{"world": W, "rank": r}`` of its process group
        (subclasses know it; ``None`` values when unknown)."""
        return {"world": None, "rank": None}

    def state_dict(self) -> dict:
        """This rank's residues, owner residues, step counter, loss scale of the residues and
        statistics, with the world size, rank and exchange they belong to (save one per
        rank; :func:`reshard_state_dicts` moves a run to another world size)."""
        if self.ledger.entries:
            raise RuntimeError("AdaComp state_dict() in the middle of a step (between the first "
                               "and the last bucket's exchange): save after optimizer.step()")
        ident = self._identity()
        return {"format": STATE_FORMAT, "world": ident["world"], "rank": ident["rank"],
                "exchange": self.exchange, "compressor": self.compressor.state_dict(),
                "iter": self.iter, "stats": self.traffic.state_dict(),
                "residue_scale": self.residue_scale,
                "owner": self.owner.state_dict() if self.owner is not None else None,
                "owner_pending": {k: v.clone() for k, v in self.owner_pending.items()},
                "slots": self._slot_capacity().state_dict() if self._slot_capacity() else None}

    def _slot_capacity(self) -> SlotCapacity | None:
        """The one-round exchange's slot sizes, where the integration has them (DDP)."""
        return getattr(self, "_slots", None)

    def load_state_dict(self, state: dict) -> None:
        """Load what :meth:`state_dict` saved on this rank of a run of the same world size.

        Raises ``ValueError`` when the state was saved by another rank, another world size or
        another exchange mode (use :func:`reshard_state_dicts` to change the world size)."""
        if not isinstance(state, dict) or "compressor" not in state:
            raise ValueError("not an AdaComp exchange state_dict (no 'compressor' entry)")
        ident = self._identity()
        saved_world, saved_rank = state.get("world"), state.get("rank")
        if ident["world"] is not None and saved_world is not None:
            if saved_world != ident["world"]:
                raise ValueError(
                    f"AdaComp state_dict was saved in a run of {saved_world} ranks; this run has "
                    f"{ident['world']}. Residues are per rank (and owner residues per shard): "
                    "convert the saved states of all ranks with "
                    "adacomp.parallel.exchange.reshard_state_dicts(states, new_world) first")
            if saved_rank != ident["rank"]:
                raise ValueError(
                    f"AdaComp state_dict was saved by rank {saved_rank}; this is rank "
                    f"{ident['rank']}. Save one state per rank and load each rank's own")
        if state.get("exchange", self.exchange) != self.exchange:
            raise ValueError(f"AdaComp state_dict was saved with exchange={state['exchange']!r}; "
                             f"this state has exchange={self.exchange!r}")
        self.compressor.load_state_dict(state["compressor"])
        self.iter = int(state["iter"])
        self.traffic.load_state_dict(state["stats"])
        self.residue_scale = state.get("residue_scale")
        owner = state.get("owner")
        self.owner = None
        if owner is not None:
            self.owner_compressor().load_state_dict(owner)
        self.owner_pending = {k: v.detach().reshape(-1).float().clone()
                              for k, v in (state.get("owner_pending") or {}).items()}
        if self._slot_capacity() is not None and state.get("slots") is not None:
            self._slot_capacity().load_state_dict(state["slots"])
        self.ledger = StepLedger()


STATE_FORMAT = 2


def reshard_state_dicts(states: list[dict], new_world: int) -> list[dict]:
    """Move the saved AdaComp states of every rank of a run to a run of ``new_world`` ranks
    (an elastic restart, ``torchrun --nnodes 1:4``), preserving the pending gradient mass.

    ``states``: the :meth:`ExchangeState.state_dict` of every rank, in rank order. Returns
    one state per new rank. What is preserved, exactly up to fp32 rounding: the mean of the
    first-level residues (every new rank starts from the old ranks' mean residue) and, for
    the sharded exchange, the sum of the owner residues (each parameter's owner residues are
    put together into one vector and split again at the first use, along the new world's
    shard bounds). The step counter and statistics of rank 0 carry over.

    Raises ``ValueError`` if the states are not one per rank of one run.
    """
    if not states:
        raise ValueError("reshard_state_dicts needs the saved states of every rank")
    if isinstance(new_world, bool) or not isinstance(new_world, int) or new_world < 1:
        raise ValueError(f"new_world must be a positive int, got {new_world!r}")
    W = len(states)
    worlds = {s.get("world") for s in states}
    if worlds != {W} or [s.get("rank") for s in states] != list(range(W)):
        raise ValueError(f"reshard_state_dicts needs one state per rank, in rank order, of one run: "
                         f"got {len(states)} states with world sizes {sorted(map(str, worlds))} and "
                         f"ranks {[s.get('rank') for s in states]}")
    cfgs = {repr(s["compressor"]["config"]) for s in states}
    if len(cfgs) != 1 or len({s.get("exchange") for s in states}) != 1:
        raise ValueError("reshard_state_dicts: the ranks' states have different settings")
    scales = {s.get("residue_scale") for s in states}
    if len(scales) != 1:
        raise ValueError(f"reshard_state_dicts: the ranks' residues are at different loss scales {scales}")
    if any(s.get("owner_pending") for s in states):
        raise ValueError("reshard_state_dicts: these states were resharded and have not trained a "
                         "step since; reshard the states they came from instead")
    first = states[0]["compressor"]
    residues = {}
    for name in first["residues"]:
        acc = torch.zeros_like(first["residues"][name], dtype=torch.float64)
        for s in states:
            acc += s["compressor"]["residues"][name].double()
        residues[name] = (acc / W).float()
    owner_full: dict[str, torch.Tensor] = {}
    for s in states:
        for key, r in ((s.get("owner") or {}).get("residues") or {}).items():
            name, start, end = parse_owner_key(key)
            if name not in first["shapes"]:
                raise ValueError(f"reshard_state_dicts: owner residue {key!r} names no known parameter")
            full = owner_full.setdefault(name, torch.zeros(math.prod(first["shapes"][name])))
            full[start:end] += r.reshape(-1)
    out = []
    for r in range(new_world):
        comp = {"config": first["config"], "shapes": dict(first["shapes"]),
                "residues": {k: v.clone() for k, v in residues.items()}}
        # Every new rank gets each parameter's whole owner residue; at its first sharded
        # exchange each owner keeps only its new shard's part, so their sum is preserved.
        out.append({"format": STATE_FORMAT, "world": new_world, "rank": r,
                    "exchange": states[0].get("exchange"), "compressor": comp,
                    "iter": states[0]["iter"], "stats": states[0]["stats"],
                    "residue_scale": states[0].get("residue_scale"), "owner": None,
                    "owner_pending": {k: v.clone() for k, v in owner_full.items()}})
    return out


class PlainExchangeState(ExchangeState):
    """An :class:`ExchangeState` holder for integrations that are not one themselves."""

    __slots__ = ("compressor", "owner", "exchange", "cost_model", "iter", "traffic", "ledger",
                 "scaler", "residue_scale", "owner_pending", "world", "rank")

    def __init__(self, compressor: AdaComp, exchange: str = "auto", cost_model: CostModel | None = None,
                 *, scaler=None, world: int | None = None, rank: int | None = None):
        self._init_exchange_state(compressor, check_exchange(exchange), cost_model or MeasuredCost(), scaler)
        self.world, self.rank = world, rank

    def _identity(self) -> dict:
        return {"world": self.world, "rank": self.rank}


class ConfigMismatchError(RuntimeError):
    """The ranks do not run the same AdaComp configuration or parameter set."""


def dense_flags_of(tensors: list[torch.Tensor]) -> list[int]:
    """:func:`dense_flags` of many tensors, with one reduction call and one host read."""
    live = [t.detach() for t in tensors if t.numel() and t.is_floating_point()]
    if len(live) < len(tensors):  # empty or integer tensors: one at a time
        return [dense_flags(t) for t in tensors]
    if not live:
        return []
    return _flags_of_amax(torch.stack(torch._foreach_norm(live, float("inf"))).tolist())


def _flags_of_amax(amax: list[float]) -> list[int]:
    """Meta flags from each dense tensor's largest magnitude: non-finite, all zero, or 0."""
    return [FLAG_NONFINITE if not math.isfinite(a) else (FLAG_ZERO if a == 0 else 0) for a in amax]


def dense_flags_start(tensors: list[torch.Tensor]):
    """:func:`dense_flags_of`, started now and read by :func:`dense_flags_finish`. On CUDA the
    reduction is enqueued and its result copied to pinned host memory without waiting, so
    that reading it after a synchronisation of the stream that comes anyway (the bucket
    compression's copy of its size table) costs no host synchronisation of its own."""
    live = [t.detach() for t in tensors if t.numel() and t.is_floating_point()]
    if not live or len(live) < len(tensors) or live[0].device.type != "cuda":
        return tensors  # read as dense_flags_of does, in dense_flags_finish
    amax = torch.stack(torch._foreach_norm(live, float("inf")))
    host = torch.empty(amax.shape, dtype=amax.dtype, pin_memory=True)
    host.copy_(amax, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


def dense_flags_finish(started) -> list[int]:
    """The flags of :func:`dense_flags_start`'s tensors."""
    if isinstance(started, list):
        return dense_flags_of(started)
    host, done = started
    if not done.query():  # not yet copied: wait (a synchronisation the caller did not save)
        done.synchronize()
    return _flags_of_amax(host.tolist())


def dense_flags(g: torch.Tensor) -> int:
    """Meta flags of a tensor sent dense: non-finite, or all zero."""
    if g.numel() == 0:
        return FLAG_ZERO
    return _flags_of_amax([float(g.detach().abs().amax())])[0]


def config_hash(comp: AdaComp, names, grads, bins, exchange: str) -> int:
    tensors = [[n, list(g.shape), str(g.dtype), b] for n, g, b in zip(names, grads, bins)]
    desc = json.dumps({"config": comp.config(), "exchange": exchange, "tensors": tensors},
                      sort_keys=True, default=str)
    return int.from_bytes(hashlib.blake2b(desc.encode(), digest_size=8).digest(), "little") >> 1


def range_key(name: str, start: int, end: int, what: str) -> str:
    """The residue name of the part ``[start, end)`` of parameter ``name`` (``what``: the kind
    of part, e.g. ``"shard"``)."""
    return f"{name}@{what}[{start}:{end}]"


def parse_range_key(key: str, what: str) -> tuple[str, int, int]:
    """Inverse of :func:`range_key`: ``(name, start, end)``."""
    name, _, rng = key.rpartition(f"@{what}[")
    start, _, end = rng.rstrip("]").partition(":")
    return name, int(start), int(end)


def owner_key(name: str, start: int, end: int) -> str:
    """The owner residue's name for shard ``[start, end)`` of parameter ``name``."""
    return range_key(name, start, end, "shard")


def parse_owner_key(key: str) -> tuple[str, int, int]:
    """Inverse of :func:`owner_key`."""
    return parse_range_key(key, "shard")


class GroupExchange:
    """One rank's side of exchanging ``grads`` (named ``names``) with AdaComp.

    ``outputs`` (default: ``grads``) receive the averaged gradients in :meth:`finish`.
    ``exchange``: ``"allgather"``, ``"sharded"`` (needs ``owner``, the compressor of this
    rank's owner residues) or ``"auto"`` (chooses per call: with a :class:`MeasuredCost`
    ``cost_model``, the mode it planned for the group ``plan_key`` from earlier exchanges,
    before compressing; with a :class:`CostModel`, from this call's payload sizes).
    """

    def __init__(self, comp: AdaComp, names: list[str], grads: list[torch.Tensor], world: int,
                 outputs: list[torch.Tensor] | None = None, *, rank: int = 0,
                 exchange: str = "allgather", owner: AdaComp | None = None,
                 cost_model: CostModel | MeasuredCost | None = None, ledger: StepLedger | None = None,
                 owner_pending: dict | None = None, plan_key=None, slot: SlotPlan | None = None,
                 inband: bool = False):
        self._t0 = time.perf_counter()
        if len(names) != len(grads):
            raise ValueError(f"one name per gradient: {len(names)} names for {len(grads)} gradients")
        if len(set(names)) != len(names):
            raise ValueError(f"a parameter name appears twice in one exchange: {sorted(names)}")
        check_exchange(exchange)
        if exchange != "allgather" and owner is None:
            raise ValueError(f"exchange={exchange!r} needs the owner compressor (owner=...)")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        self.comp = comp
        self.owner = owner
        self.names = list(names)
        self.grads = list(grads)
        self.outputs = list(outputs) if outputs is not None else self.grads
        self.world = world
        self.rank = rank
        self.exchange = exchange
        self.cost_model = cost_model or CostModel()
        # Without a ledger the exchange is its own step: residues are committed in decide().
        self.ledger = ledger
        self.owner_pending = owner_pending if owner_pending is not None else {}
        # A measured cost model plans the mode before compressing (the same on every rank).
        measured = exchange == "auto" and isinstance(self.cost_model, MeasuredCost)
        self.planner = self.cost_model if measured else None
        self.plan_key = plan_key if plan_key is not None else tuple(self.names)
        self.plan = self.planner.plan(self.plan_key) if self.planner is not None else None
        # Payloads split into one piece per shard when the sharded exchange may be used.
        self.split = exchange == "sharded" or (exchange == "auto" and self.plan in (None, "sharded"))
        self.pieces = world if self.split else 1
        # One round (SlotCapacity): meta and payloads travel together in fixed-size slots.
        if slot is not None and (self.split or self.plan == "dense"):
            raise ValueError("the one-round exchange (slot=...) needs the all-gather exchange: "
                             f"exchange={exchange!r}, planned {self.plan!r}")
        self.bins = [comp.bin_size_for(n, g) for n, g in zip(names, grads)]
        # The small fp32 tensors sent dense by rule (they may ride with the payloads).
        self.rule_fp32 = [t for t in range(len(grads)) if self.bins[t] is None
                          and self.grads[t].dtype == torch.float32]
        # In band (run_exchange, Horovod, mpi4py): an all-gather exchange sends its payloads,
        # unpadded, in the all-gather that carries the meta vectors.
        if inband and slot is None and not self.split and self.plan != "dense":
            rule_bytes = self._merged_bytes_of(self.rule_fp32)
            slot = SlotPlan(None, 0 < rule_bytes <= MERGE_DENSE_BYTES)
        self.slot_plan = slot
        # Every tensor that is compressed goes through one call (AdaComp.prepare_bucket):
        # its payloads lie in one buffer, self.bucket, at index self.slot[t].
        T = len(self.grads)
        chosen = [t for t in range(T) if self.bins[t] is not None and self.plan != "dense"]
        self.slot = {t: i for i, t in enumerate(chosen)}
        self.bucket = None
        self.pending = [None] * T
        dense_t = [t for t in range(T) if t not in self.slot]
        dense_started = dense_flags_start([self.grads[t] for t in dense_t])  # read after compressing
        if chosen:
            try:
                self.bucket, pend = comp.prepare_bucket([self.names[t] for t in chosen],
                                                        [self.grads[t] for t in chosen],
                                                        [self.bins[t] for t in chosen],
                                                        self.pieces if self.split else None)
            except BaseException:
                self._discard_all()
                raise
            for t, p in zip(chosen, pend):
                self.pending[t] = p
            piece_sizes = [list(col) for col in zip(*self.bucket.size_rows)]  # [tensor][piece]
        flags, sizes = [], []
        pad = [0] * (world - self.pieces)
        dflags = dict(zip(dense_t, dense_flags_finish(dense_started)))
        for t in range(T):
            i = self.slot.get(t)
            if i is None:
                sizes += [-1] * world
                flags.append(dflags[t])
            else:
                sizes += piece_sizes[i] + pad
                flags.append(FLAG_NONFINITE if self.bucket.nonfinite[i] else
                             (FLAG_ZERO if self.bucket.zero[i] else 0))
        self.hash = config_hash(comp, self.names, self.grads, self.bins, exchange)
        device = grads[0].device if grads else torch.device("cpu")
        plan = self.planner.header_fields(self.plan_key) if self.planner is not None else None
        meta = torch.tensor(header_fields(self.hash, len(self.grads), self.pieces, STATUS_OK, plan)
                            + sizes + flags, dtype=torch.int64)
        if device.type == "cuda":  # pinned and non-blocking: no host synchronisation
            meta = meta.pin_memory().to(device, non_blocking=True)
        self._meta = meta.to(device)
        self.owner_pending_used: list[str] = []
        self.decisions: list[int] | None = None
        self.mode = None
        self.owner_payloads: list[torch.Tensor] = []  # the owner's payload bytes per compressed tensor
        self.owner_nonfinite: list[bool] = []
        self.merged: list[int] = []  # dense tensors carried in the payload all-gather (decide)
        self.owner_size_table = None
        # The tensors sent dense by rule that ride in the slot.
        self.premerged = self.rule_fp32 if slot is not None and slot.merge_dense else []
        self.row_tensors: list[int] = []  # whose payloads the gathered rows hold, in order

    # -------------------------------------------------------------- step 1: metadata
    def meta(self) -> torch.Tensor:
        """int64 vector to all-gather (same length on every rank with the same bucket)."""
        return self._meta

    def meta_bytes(self) -> int:
        """Length of :meth:`meta` in bytes."""
        return self._meta.numel() * 8

    def header(self) -> torch.Tensor:
        """The fixed-size first :data:`META_FIXED` entries of :meth:`meta` (same length on
        every rank whatever it exchanges)."""
        return self._meta[:META_FIXED]

    # -------------------------------------------------------------- step 2: decisions
    def decide(self, all_meta: torch.Tensor) -> list[int]:
        """Check configurations and decide each tensor's fate, and the exchange, from every
        rank's meta."""
        T, S, W = len(self.grads), self.pieces, self.world
        m = all_meta.reshape(self.world, -1).cpu()
        try:
            check_headers(m, W, T, S)
        except ConfigMismatchError:
            self._discard_all()
            raise
        if m.shape[1] != META_FIXED + (W + 1) * T:
            self._discard_all()
            raise ConfigMismatchError(
                f"AdaComp: ranks disagree on the tensors exchanged together ({T} here); every "
                "rank must wrap the same model with the same settings")
        if bool((m[:, 1] != m[0, 1]).any()) or bool((m[:, 2] != T).any()):
            self._discard_all()
            bad = [r for r in range(self.world) if int(m[r, 1]) != int(m[0, 1])]
            raise ConfigMismatchError(
                f"AdaComp configuration differs between ranks (ranks {bad} differ from rank 0): "
                f"bin sizes, value mode, scale, min_numel, exchange, parameter names, shapes and "
                f"dtypes must match on every rank. This rank has {self.comp.config()}, "
                f"exchange={self.exchange!r} for {list(zip(self.names, self.bins))[:8]}...")
        sizes = m[:, META_FIXED:META_FIXED + W * T].reshape(W, T, W)[:, :, :S]
        flags = m[:, META_FIXED + W * T:META_FIXED + (W + 1) * T]
        self.sizes = sizes
        self.measured = (self.planner.observe(self.plan_key, m[:, :META_FIXED])
                         if self.planner is not None else None)
        # Host lists from here on: one conversion instead of a few tensor ops per tensor.
        flag_rows = flags.t().tolist()  # [T][W]
        largest = sizes.sum(dim=2).max(dim=0).values.tolist() if T else []  # per tensor, over ranks
        decisions = []
        for t in range(T):
            fl = flag_rows[t]
            if any(f & FLAG_NONFINITE for f in fl):
                decisions.append(NONFINITE)
            elif all(f & FLAG_ZERO for f in fl):
                decisions.append(ZERO)  # nobody touched it: zero out, residue kept
            elif self.bins[t] is None:
                decisions.append(DENSE_RULE)
            elif self.plan == "dense":
                decisions.append(DENSE_FALLBACK)
            elif largest[t] >= self.grads[t].numel() * self.grads[t].element_size():
                decisions.append(DENSE_FALLBACK)
            else:
                decisions.append(COMPRESSED)
        comp_t = [t for t in range(T) if decisions[t] == COMPRESSED]
        self.mode, self.choice = self._choose(comp_t)
        if self.mode == "dense":
            for t in comp_t:
                decisions[t] = DENSE_FALLBACK
            comp_t = []
        for t in range(T):
            if decisions[t] != COMPRESSED:
                self.comp.discard(self.pending[t])
                self.pending[t] = None
        self.nonfinite = NONFINITE in decisions
        if self.ledger is None:  # the exchange is the whole step
            for t in range(T):
                (self.comp.discard if self.nonfinite else self.comp.commit)(self.pending[t])
        else:
            if self.nonfinite:
                self.ledger.bad = True
            try:
                for t in range(T):
                    self.ledger.add(self.comp, self.pending[t])
            except ValueError:
                self.pending = [None] * T
                raise
        self.pending = [None] * T
        self.decisions = decisions
        self.compressed = comp_t
        self.dense = [t for t in range(T) if decisions[t] in (DENSE_RULE, DENSE_FALLBACK)]
        # Small fp32 tensors sent dense by rule (biases, norms) ride in the payload
        # all-gather instead of an allreduce of their own: one collective round less.
        self.merged = []
        self.row_tensors = comp_t
        if self.slot_plan is not None:
            # Every chosen tensor's payload is in the slots, whatever was decided for it.
            self.merged = list(self.premerged)
            self.dense = [t for t in self.dense if t not in self.merged]
            self.row_tensors = sorted(self.slot)
        elif self.mode == "allgather":
            rule = [t for t in self.dense if decisions[t] == DENSE_RULE
                    and self.grads[t].dtype == torch.float32]
            nbytes = self._merged_bytes_of(rule)
            payload = max(self.gather_sizes()) if comp_t else 0
            if rule and nbytes <= max(MERGE_DENSE_BYTES, payload):
                self.merged = rule
                self.dense = [t for t in self.dense if t not in rule]
        if comp_t:
            self.bounds = {t: shard_bounds(self.grads[t].numel(), self.bins[t], self.world) for t in comp_t}
        return decisions

    def _choose(self, comp_t: list[int]) -> tuple[str | None, dict]:
        if self.plan is not None:
            fig = ", ".join(f"{k} " + ("?" if self.measured[k] is None
                                       else f"{self.measured[k] * 1e3:.3f} ms") for k in self.planner.modes)
            mode = self.plan if comp_t or self.plan == "dense" else None
            return mode, {"mode": mode, "reason": f"auto, measured (slowest rank's median "
                                                  f"exchange time): {fig}; next: "
                                                  f"{self.planner.plan(self.plan_key)}",
                          "measured": dict(self.measured)}
        if not comp_t:
            return None, {"mode": None, "reason": "nothing compressed"}
        if self.exchange != "auto":
            return self.exchange, {"mode": self.exchange, "reason": f"exchange={self.exchange!r}"}
        dense_bytes = sum(self.grads[t].numel() * self.grads[t].element_size() for t in comp_t)
        est = self.cost_model.estimate(self.world, dense_bytes, self.sizes[:, comp_t, :])
        order = ["allgather", "sharded", "dense"]  # ties go to the simpler exchange
        mode = min(order, key=lambda k: (est[k][0], order.index(k)))
        detail = ", ".join(f"{k} {est[k][0] * 1e3:.3f} ms ({est[k][1]} B)" for k in order)
        return mode, {"mode": mode, "reason": f"auto, least estimated time: {detail}",
                      "estimates": {k: {"seconds": est[k][0], "bytes": est[k][1]} for k in order}}

    def _discard_all(self):
        for pend in self.pending:
            self.comp.discard(pend)
        self.pending = [None] * len(self.grads)

    # -------------------------------------------------------------- sharded: owners
    def alltoall_parts(self) -> list[torch.Tensor]:
        """Per owner ``s``: this rank's shard-``s`` payloads of the compressed tensors."""
        slots = [self.slot[t] for t in self.compressed]
        return [self.bucket.select(slots, [s]) for s in range(self.world)]

    def alltoall_recv_sizes(self) -> list[int]:
        return [int(self.sizes[r, self.compressed, self.rank].sum()) for r in range(self.world)]

    def reduce_owned(self, received: list[torch.Tensor]) -> None:
        """As owner of shard ``rank``: decode every rank's shard payloads (rank order),
        average, and re-compress with the owner residues (committed with the step's other
        residue updates)."""
        W, me = self.world, self.rank
        device = self._device()
        offsets = [0] * W
        avgs, entries = [], []
        for i, t in enumerate(self.compressed):
            start, end = self.bounds[t][me]
            avgs.append(torch.empty(end - start, dtype=torch.float32, device=device))
            for r in range(W):
                size = int(self.sizes[r, t, me])
                entries.append((i, 0, end - start, r, offsets[r], size, (end - start,)))
                offsets[r] += size
        decode_bucket_(avgs, received, entries, W)  # the average of every rank's shard
        keys, inputs, bins, where = [], [], [], []
        self.owner_payloads = [None] * len(self.compressed)
        self.owner_nonfinite = [False] * len(self.compressed)
        for i, t in enumerate(self.compressed):
            start, end = self.bounds[t][me]
            if end == start:  # fewer bins than ranks: nothing to own (and no residue to keep)
                first = entries[i * W]  # rank 0's entry of this tensor
                p = Payload.from_tensor(received[0][first[4]:first[4] + first[5]], shape=(0,))
                self.owner_payloads[i], self.owner_nonfinite[i] = p.tensor, p.nonfinite
                if self.names[t] in self.owner_pending:
                    self.owner_pending_used.append(self.names[t])
                continue
            avg = avgs[i]
            key = owner_key(self.names[t], start, end)
            seed = self.owner_pending.get(self.names[t])
            if seed is not None and key not in self.owner.names():
                # owner residue carried over from a run of another world size
                self.owner.set_residue(key, seed[start:end].to(avg.device))
                self.owner_pending_used.append(self.names[t])
            keys.append(key)
            inputs.append(avg)
            bins.append(max(1, min(self.bins[t], end - start)))
            where.append(i)
        if keys:
            owned, pend = self.owner.prepare_bucket(keys, inputs, bins)
            for j, (i, pe) in enumerate(zip(where, pend)):
                if self.ledger is None:
                    self.owner.commit(pe)
                else:
                    self.ledger.add(self.owner, pe)
                self.owner_payloads[i] = owned.piece(j)
                self.owner_nonfinite[i] = owned.nonfinite[j]
        for name in self.owner_pending_used:
            self.owner_pending.pop(name, None)

    def owner_sizes(self) -> torch.Tensor:
        """This owner's payload sizes, then their non-finite flags (the average of finite
        shards can overflow), one each per compressed tensor."""
        sizes = [p.numel() for p in self.owner_payloads]
        flags = [int(x) for x in self.owner_nonfinite]
        return torch.tensor(sizes + flags, dtype=torch.int64, device=self._device())

    def set_owner_sizes(self, all_sizes: torch.Tensor) -> None:
        table = all_sizes.reshape(self.world, -1).cpu()
        n = len(self.compressed)
        self.owner_size_table = table[:, :n]
        self.owner_flags = table[:, n:]
        if bool(table[:, n:].any()):  # an owner's average overflowed: the step is skipped
            self.nonfinite = True
            if self.ledger is not None:
                self.ledger.bad = True

    # -------------------------------------------------------------- step 3: buffers
    def gather_sizes(self) -> list[int]:
        """Bytes every rank contributes to the payload all-gather."""
        if self.mode == "sharded":
            return self.owner_size_table.sum(dim=1).tolist()
        extra = self._merged_bytes()
        return [x + extra for x in self._row_sizes().sum(dim=(1, 2)).tolist()]

    def _dense_bytes(self, t: int) -> int:
        return self.grads[t].numel() * self.grads[t].element_size()

    def _row_sizes(self, tensors=None) -> torch.Tensor:
        """``[W, len(tensors), pieces]`` bytes each rank's row holds for ``tensors``
        (default: :attr:`row_tensors`). In a slot or in band, a rank leaves out a payload
        that is not smaller than its tensor's dense bytes (that tensor goes dense whatever
        the other ranks sent), and every rank sees that from its meta vector."""
        tensors = self.row_tensors if tensors is None else tensors
        sz = self.sizes[:, tensors, :]
        if self.slot_plan is None or not tensors:
            return sz
        dense = torch.tensor([self._dense_bytes(t) for t in tensors], dtype=sz.dtype)
        return sz * (sz.sum(dim=2) < dense).unsqueeze(2)

    def _own_row(self) -> list[int]:
        """Bucket indices of this rank's payloads that go in its slot (see :meth:`_row_sizes`)."""
        rows = self.bucket.size_rows if self.bucket is not None else [[]]
        return [i for t, i in sorted(self.slot.items())
                if sum(r[i] for r in rows) < self._dense_bytes(t)]

    def _merged_bytes(self) -> int:
        return self._merged_bytes_of(self.merged)

    def _merged_bytes_of(self, tensors) -> int:
        return 4 * sum(self.grads[t].numel() for t in tensors)

    def gather_buffer(self) -> torch.Tensor:
        """This rank's bytes for the payload all-gather: the fp32 values of the small dense
        tensors it carries, then its payloads of the compressed tensors, piece-major
        (allgather); or its owner payloads (sharded)."""
        if self.mode == "sharded":
            return self._cat(self.owner_payloads, self._device())
        own = self.bucket.select([self.slot[t] for t in self.compressed])
        if not self.merged:
            return own
        dense = [self.grads[t].detach().reshape(-1).view(torch.uint8) for t in self.merged]
        return torch.cat(dense + [own.to(dense[0].device)])

    def payload_buffer(self) -> torch.Tensor | None:
        """:meth:`gather_buffer` padded to the longest rank's (for a plain all-gather that
        needs equal sizes). None if nothing is compressed."""
        if not self.compressed:
            return None
        own = self.gather_buffer()
        longest = max(self.gather_sizes())
        if own.numel() < longest:
            own = torch.cat([own, torch.zeros(longest - own.numel(), dtype=torch.uint8, device=own.device)])
        return own

    # -------------------------------------------------------------- one round (slots)
    def slot_bytes(self) -> int:
        """Length of this rank's slot: the meta vector's bytes, then the capacity (without
        one, in band: exactly this rank's merged dense tensors and payloads)."""
        cap = self.slot_plan.capacity
        if cap is None:
            payloads = sum(self.bucket.size_rows[0][i] for i in self._own_row())
            cap = self._merged_bytes_of(self.premerged) + payloads
        return self.meta_bytes() + cap

    def slot_buffer(self) -> torch.Tensor:
        """This rank's slot of the one-round all-gather (:class:`SlotCapacity`), 1-D uint8
        of :meth:`slot_bytes`: the meta vector's bytes, the fp32 bytes of the merged dense
        tensors, the payloads of every tensor chosen for compression (in tensor order,
        whatever :meth:`decide` makes of them), zero padding. Bytes beyond the capacity
        are kept for :meth:`tail_buffer`."""
        meta = self._meta.view(torch.uint8)
        mb, end = meta.numel(), self.slot_bytes()
        out = torch.empty(end, dtype=torch.uint8, device=meta.device)
        out[:mb] = meta
        parts = [self.grads[t].detach().reshape(-1).view(torch.uint8) for t in self.premerged]
        if self.bucket is not None:
            parts.append(self.bucket.select(self._own_row()))
        pos, self._tail = mb, []
        for part in parts:
            k = min(end - pos, part.numel())
            out[pos:pos + k] = part[:k].to(out.device)
            if k < part.numel():
                self._tail.append(part[k:].to(out.device))
            pos += k
        out[pos:].zero_()
        return out

    def first_buffer(self) -> torch.Tensor:
        """What this rank sends in :func:`run_exchange`'s first all-gather: its slot in band,
        else its meta vector's bytes."""
        if self.slot_plan is not None:
            return self.slot_buffer()
        return self._meta.view(torch.uint8)

    def meta_of_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """Every rank's meta vector from the gathered slots (``[W, slot_bytes]`` uint8),
        for :meth:`decide`."""
        return slots[:, :self.meta_bytes()].contiguous().view(torch.int64)

    def tail_sizes(self) -> list[int]:
        """Per rank, the bytes that did not fit in its slot (after :meth:`decide`): all zero
        unless some payload overflowed, when a second all-gather (:meth:`tail_buffer`)
        carries them."""
        cap = self.slot_plan.capacity
        if cap is None:
            return [0] * self.world
        return [max(0, n - cap) for n in self.gather_sizes()]

    def tail_buffer(self) -> torch.Tensor:
        """This rank's bytes beyond its slot, zero-padded to the longest rank's."""
        longest = max(self.tail_sizes())
        mine = torch.cat(self._tail) if self._tail else self._meta.new_empty(0, dtype=torch.uint8)
        out = torch.zeros(longest, dtype=torch.uint8, device=self._meta.device)
        out[:mine.numel()] = mine
        return out

    def slot_rows(self, slots: torch.Tensor, tails: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Every rank's gathered bytes for :meth:`finish`, from the slots and, after an
        overflow, the gathered tails (``[W, longest tail]``)."""
        mb = self.meta_bytes()
        rows = [slots[r, mb:] for r in range(self.world)]
        if tails is not None:
            rows = [torch.cat([rows[r], tails[r]]) for r in range(self.world)]
        return rows

    def slot_need(self) -> tuple[int, int, bool]:
        """What :meth:`SlotCapacity.update` needs after this exchange (:meth:`decide`),
        the same on every rank: the largest rank's payload bytes of the tensors chosen for
        compression (all pieces of a split payload), the bytes of the fp32 tensors sent
        dense by rule, and whether the group's next exchange is an all-gather."""
        rule = self._merged_bytes_of(self.rule_fp32)
        nxt = self.planner.plan(self.plan_key) if self.planner is not None else self.exchange
        chosen = sorted(self.slot)
        need = int(self._row_sizes(chosen).sum(dim=(1, 2)).max()) if chosen else 0
        return need, rule, nxt == "allgather"

    def dense_buffer(self) -> torch.Tensor | None:
        """The dense tensors (by rule and by fallback), flattened together, to be summed."""
        if not self.dense:
            return None
        return torch.cat([self.grads[t].detach().reshape(-1) for t in self.dense])

    def _device(self):
        return self.grads[0].device if self.grads else torch.device("cpu")

    @staticmethod
    def _cat(parts, device):
        if not parts:
            return torch.empty(0, dtype=torch.uint8, device=device)
        return torch.cat([p.to(device) for p in parts])

    # -------------------------------------------------------------- step 4: results
    def finish(self, gathered: torch.Tensor | list | None, dense_sum: torch.Tensor | None) -> None:
        """Decode and average; write into the outputs. ``gathered``: the all-gathered
        buffers, ``[world, n]`` or a list of per-rank 1-D uint8 tensors (padding after
        each rank's bytes is ignored)."""
        W = self.world
        if self.compressed or self.merged:
            self._decode(gathered)
        if self.dense:
            dense_sum = dense_sum.div_(W) if dense_sum.is_floating_point() else dense_sum
            pos = 0
            for t in self.dense:
                n = self.grads[t].numel()
                self.outputs[t].copy_(dense_sum[pos:pos + n].view(self.grads[t].shape))
                pos += n
        for t, d in enumerate(self.decisions):
            if d == NONFINITE:
                self.outputs[t].fill_(float("nan"))
            elif d == ZERO:
                self.outputs[t].zero_()
        if self.planner is not None:
            self.planner.record(self.plan_key, self.plan, time.perf_counter() - self._t0)

    def _decode(self, gathered) -> None:
        """Every compressed tensor's payloads, decoded with one :func:`decode_bucket_` call
        into the outputs (through an fp32 buffer where an output is not fp32)."""
        W, comp = self.world, self.compressed
        rows = [gathered[r] for r in range(W)]
        if self.merged:
            self._sum_merged(rows)
            skip = self._merged_bytes()
            rows = [row[skip:] for row in rows]
        outs, copies = [], []
        for t in comp:
            o = self.outputs[t]
            if o.dtype == torch.float32 and o.is_contiguous() and o.numel() == self.grads[t].numel():
                outs.append(o)
            else:
                outs.append(torch.empty(self.grads[t].numel(), dtype=torch.float32, device=o.device))
                copies.append(len(outs) - 1)
        entries = []
        nonfinite = [False] * len(comp)
        sharded = self.mode == "sharded"  # owners' payloads are averages already
        if sharded:  # rank s holds the averaged shard s of every tensor, in order
            starts = (torch.cumsum(self.owner_size_table, 1) - self.owner_size_table).tolist()
            sizes = self.owner_size_table.tolist()
            for i, t in enumerate(comp):
                for s, (start, end) in enumerate(self.bounds[t]):
                    entries.append((i, start, end, s, starts[s][i], sizes[s][i], (end - start,)))
        else:  # rank r's bytes: piece 0 of every tensor in the rows, then piece 1, ...
            S, rt = self.pieces, self.row_tensors
            sz = self._row_sizes().permute(0, 2, 1).reshape(W, S * len(rt))  # [W, S*T] piece-major
            starts = (torch.cumsum(sz, 1) - sz).tolist()
            sz = sz.tolist()
            where = {t: k for k, t in enumerate(rt)}
            for i, t in enumerate(comp):
                pieces = self.bounds[t] if self.split else [(0, self.grads[t].numel())]
                for s, (start, end) in enumerate(pieces):
                    shape = (end - start,) if self.split else tuple(self.grads[t].shape)
                    j = s * len(rt) + where[t]
                    entries += [(i, start, end, r, starts[r][j], sz[r][j], shape) for r in range(W)]
        if entries:
            decode_bucket_(outs, rows, entries, 1 if sharded else W)
        if sharded:
            flags = self.owner_flags.tolist()
            nonfinite = [any(flags[s][i] for s in range(W)) for i in range(len(comp))]
        for out, bad in zip(outs, nonfinite):
            if bad:  # an owner's average overflowed: the whole tensor is non-finite
                out.fill_(float("nan"))
        for i in copies:
            t = comp[i]
            self.outputs[t].copy_(outs[i].view(self.grads[t].shape))

    def _sum_merged(self, rows) -> None:
        """The dense tensors carried in the all-gather: summed in rank order, averaged."""
        nbytes = self._merged_bytes()
        total = rows[0][:nbytes].clone().view(torch.float32)
        for r in range(1, self.world):
            total += rows[r][:nbytes].clone().view(torch.float32)
        total.div_(self.world)
        pos = 0
        for t in self.merged:
            n = self.grads[t].numel()
            self.outputs[t].copy_(total[pos:pos + n].view(self.grads[t].shape))
            pos += n

    def account(self, stats: TrafficStats, padded: bool = True) -> None:
        """Add this exchange's bytes to ``stats``: bytes handed to collectives by this rank
        (``padded``: the payload all-gather pads each rank to the longest) and bytes it
        receives from the others (the dense allreduce counted as a ring's
        ``2 (W-1)/W`` of its bytes)."""
        W, me = self.world, self.rank
        sharded = self.mode == "sharded"
        owner_payload = dict(zip(self.compressed, self.owner_payloads)) if sharded else {}
        own = 0
        for t, d in enumerate(self.decisions):
            g = self.grads[t]
            dense_b = g.numel() * 4  # ratios are against dense fp32
            if d == COMPRESSED:
                if sharded:  # the all-to-all (to the other owners) and this rank's owner payload
                    size = int(self.sizes[me, t, :].sum() - self.sizes[me, t, me])
                    size += owner_payload[t].numel()
                else:
                    size = int(self.sizes[me, t, :].sum())
                own += size
                stats.add(layer_kind(g.shape), dense_b, size)
            elif d in (DENSE_RULE, DENSE_FALLBACK):
                stats.add("dense", dense_b, g.numel() * g.element_size())
            elif d == NONFINITE:
                stats.add("dense", dense_b, 0)
            # ZERO: nothing sent, and not counted as compressed
        received = 0
        meta_bytes = self.meta_bytes()
        overhead = meta_bytes
        received += (W - 1) * meta_bytes
        if self.slot_plan is not None:  # one round: every rank sends its whole slot (and tail)
            counted = self._merged_bytes_of([t for t in self.merged if self.decisions[t] == DENSE_RULE])
            sizes = self.gather_sizes()
            if self.slot_plan.capacity is None:  # in band: each rank its own bytes
                sent = sizes[me]
                received += sum(sizes) - sizes[me]
            else:
                sent = self.slot_plan.capacity + max(self.tail_sizes())
                received += (W - 1) * sent
            overhead += sent - own - counted
            overflow = max(self.tail_sizes()) > 0
            self.choice = dict(self.choice, slot={"capacity": self.slot_plan.capacity,
                                                  "overflow": overflow})
            stats.note_slots(overflow)
        elif self.compressed:
            sizes = self.gather_sizes()
            longest = max(sizes)
            others = [r for r in range(W) if r != me]
            if sharded:
                from_others = self.alltoall_recv_sizes()
                received += sum(from_others) - from_others[me]
                overhead += 16 * len(self.compressed)
                received += (W - 1) * 16 * len(self.compressed)
                mine = sizes[me]
            else:
                mine = own + self._merged_bytes()
            received += sum((longest if padded else sizes[r]) for r in others)
            if padded:
                overhead += longest - mine
        if self.dense:
            nbytes = sum(self.grads[t].numel() * self.grads[t].element_size() for t in self.dense)
            received += ring_allreduce_received(nbytes, W)
        stats.add("overhead", 0, overhead)
        stats.add_received(received)
        stats.note_exchange(self.names[0] if self.names else "", self.mode, self.choice)
        stats.last_exchange.update({self.names[t]: DECISION_NAMES[d] for t, d in enumerate(self.decisions)})

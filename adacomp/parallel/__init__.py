"""Integrations: how AdaComp payloads travel between workers (DDP hook, Horovod, mpi4py, FSDP2).

One protocol, several transports. :mod:`~adacomp.parallel.exchange` holds the
transport-independent steps of one exchange (compress every named gradient, agree on
sizes and on the exchange mode, move the payloads, decode in rank order, commit the
residues); each integration drives it over its own collectives:

* :mod:`~adacomp.parallel.ddp`: :class:`AdaCompState` and :func:`adacomp_hook`, a DDP
  communication hook (``torch.distributed``, gloo or NCCL);
* :mod:`~adacomp.parallel.horovod`: ``DistributedOptimizer``, shaped like Horovod's
  (needs Horovod; imported only when used);
* :mod:`~adacomp.parallel.mpi`: ``Communicator`` for programs that use mpi4py (needs mpi4py).
* :mod:`~adacomp.parallel.fsdp`: ``apply_(model)``, a compressing reduce-scatter for FSDP2
  (``fully_shard``), imported when used.

The contracts every integration keeps are in docs/algorithm.md, section 5.
"""

from .ddp import AdaCompState, adacomp_hook
from .exchange import ConfigMismatchError, CostModel, MeasuredCost

__all__ = ["AdaCompState", "adacomp_hook", "ConfigMismatchError", "CostModel", "MeasuredCost"]

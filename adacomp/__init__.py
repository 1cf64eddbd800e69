"""adacomp: AdaComp adaptive residual gradient compression for distributed PyTorch.

The package is laid out by layer (README.md, "Layout"):

* here, at the top: the algorithm and its wire format, the public core API:
  :class:`AdaComp` (one worker's compressor with per-name residues), :class:`Payload` (the
  bytes that travel), :func:`decompress`, :func:`decompress_sum`, :mod:`adacomp.ops` (the
  kernels and :func:`adacomp.ops.backend`);
* :mod:`adacomp.parallel`: the exchange protocol and the integrations (DDP hook
  :class:`AdaCompState` / :func:`adacomp_hook`, Horovod, mpi4py);
* :mod:`adacomp.stages`: post-training compression stages (``compress_``);
* :mod:`adacomp.workloads`: the main job and the models and data sets of the evidence runs.

The algorithm and its contracts: docs/algorithm.md.
"""

from . import _moved

_moved.install()  # old module paths (adacomp.ddp, adacomp.horovod, ...) keep importing

from . import ops  # noqa: E402
from .compressor import AdaComp, default_bin_size  # noqa: E402
from .parallel.ddp import AdaCompState, adacomp_hook  # noqa: E402
from .payload import Payload, decompress, decompress_sum  # noqa: E402

__all__ = ["AdaComp", "AdaCompState", "adacomp_hook", "Payload", "decompress", "decompress_sum",
           "default_bin_size", "ops"]
__version__ = "0.2.0"

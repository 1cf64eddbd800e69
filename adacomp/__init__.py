"""adacomp: AdaComp adaptive residual gradient compression for distributed PyTorch.

Core API (see README.md and ADACOMP.md):

* :class:`AdaComp` - one worker's compressor with per-name residues,
* :class:`Payload` - the bytes that travel, :func:`decompress`, :func:`decompress_sum`,
* :mod:`adacomp.ops` - the kernels and :func:`adacomp.ops.backend`.
"""

from . import ops
from .compressor import AdaComp, default_bin_size
from .ddp import AdaCompState, adacomp_hook
from .payload import Payload, decompress, decompress_sum

__all__ = ["AdaComp", "AdaCompState", "adacomp_hook", "Payload", "decompress", "decompress_sum",
           "default_bin_size", "ops"]
__version__ = "0.1.0"

"""Old import paths of the modules that moved in 0.2.0, kept working (see CHANGELOG.md).

Version 0.2.0 sorted the package into rooms: the integrations went to
:mod:`adacomp.parallel`, the main job and the evidence workloads to
:mod:`adacomp.workloads`. Code written against 0.1 keeps importing them by their old
names::

    import adacomp.horovod                      # is adacomp.parallel.horovod
    from adacomp.mpi import Communicator        # from adacomp.parallel.mpi
    from adacomp.codec.bitstream import Latents # from adacomp.workloads.codec.bitstream

An old name gives the *same* module object as the new one (not a copy), so classes,
``isinstance`` checks and pickles agree whichever name was used. ``python -m`` with an
old name is refused with the new command (``python -m adacomp.data`` ->
``python -m adacomp.workloads.data``): running a module as ``__main__`` under another
package would resolve its relative imports in the wrong package.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

#: old module name -> new module name; submodules follow their package.
MOVED = {
    "adacomp.exchange": "adacomp.parallel.exchange",
    "adacomp.ddp": "adacomp.parallel.ddp",
    "adacomp.horovod": "adacomp.parallel.horovod",
    "adacomp.mpi": "adacomp.parallel.mpi",
    "adacomp.training": "adacomp.workloads.training",
    "adacomp.data": "adacomp.workloads.data",
    "adacomp.models": "adacomp.workloads.models",
    "adacomp.nlu": "adacomp.workloads.nlu",
    "adacomp.codec": "adacomp.workloads.codec",
}


def new_name(old: str) -> str | None:
    """The current name of module ``old``, or ``None`` if it did not move."""
    for before, after in MOVED.items():
        if old == before or old.startswith(before + "."):
            return after + old[len(before):]
    return None


class _AliasLoader(importlib.abc.Loader):
    """Loads an old name as the already imported module of its new name."""

    def __init__(self, target: str):
        self.target = target
        self._spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self._spec = module.__spec__  # the import system overwrites it with the alias spec
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self._spec  # already executed under its own name; keep its own spec

    def get_code(self, fullname: str):
        # only ``python -m <old name>`` (runpy) asks for code
        raise ImportError(f"{fullname} moved to {self.target}: run python -m {self.target}")


class _MovedFinder(importlib.abc.MetaPathFinder):
    """A meta path finder that answers only the old names in :data:`MOVED`."""

    def find_spec(self, fullname, path=None, target=None):
        target_name = new_name(fullname)
        if target_name is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(target_name))


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once); called by ``adacomp/__init__.py``.

    First, not last: once ``adacomp.codec`` is the codec package, its ``__path__`` would let
    the path finder load ``adacomp.codec.bitstream`` a second time, as a copy. The finder
    answers only the names in :data:`MOVED` and declines everything else at once."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())

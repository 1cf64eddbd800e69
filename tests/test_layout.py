"""The package layout is the architecture: layers, their dependencies, docstrings, old paths."""

import ast
import importlib
import os
import pickle
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "adacomp")
ROOMS = ("parallel", "stages", "workloads")


def _modules():
    for dirpath, _, files in os.walk(PKG):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                yield (rel[: -len(".__init__")] if rel.endswith(".__init__") else rel), path


def _room(name: str) -> str:
    """The room of a dotted name under adacomp: a subpackage's name, or 'core' for the top."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else "core"


def _imports(module: str, path: str) -> set[str]:
    with open(path) as f:
        tree = ast.parse(f.read())
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out |= {f"{name}.{a.name}" for a in node.names}
    return {n for n in out if n == "adacomp" or n.startswith("adacomp.")}


# which room may import which (besides itself and the core); the one exception is named
ALLOWED = {
    "adacomp": {"parallel.ddp"},  # the package's __init__ re-exports the DDP hook (public API)
    "core": set(),
    "parallel": set(),
    "stages": {"workloads.codec"},  # the SGA stage writes the image codec's bitstreams
    "workloads": {"parallel", "stages"},
}


def test_layers_depend_only_downward():
    """The algorithm depends on no room; integrations only on the algorithm; stages not on the
    workloads (but for the codec the SGA stage codes for); workloads on anything."""
    bad = []
    for module, path in _modules():
        room = _room(module)
        allowed = ALLOWED["adacomp" if module == "adacomp" else room]
        for name in _imports(module, path):
            target = _room(name)
            sub = ".".join(name.split(".")[1:3])
            if target in ("core", room) or target in allowed or sub in allowed:
                continue
            bad.append(f"{module} ({room}) imports {name} ({target})")
    assert not bad, "\n".join(bad)


def test_every_module_says_what_it_is_for():
    missing = [m for m, p in _modules() if not (ast.get_docstring(ast.parse(open(p).read())) or "").strip()]
    assert not missing, f"modules without a docstring: {missing}"


def test_the_top_level_holds_the_algorithm_only():
    """`ls adacomp` shows the algorithm and wire format, and one folder per room."""
    entries = {e for e in os.listdir(PKG) if not e.startswith("__") and not e.endswith((".so", ".pyd"))}
    folders = {e for e in entries if os.path.isdir(os.path.join(PKG, e))}
    assert folders == set(ROOMS), folders
    assert entries - folders == {"compressor.py", "payload.py", "ops.py", "_reference.py", "_numba.py",
                                 "stats.py", "_moved.py", "optim.py"}


OLD_NAMES = ["adacomp.exchange", "adacomp.ddp", "adacomp.mpi", "adacomp.training", "adacomp.data",
             "adacomp.models", "adacomp.nlu", "adacomp.codec", "adacomp.codec.bitstream"]


@pytest.mark.parametrize("old", OLD_NAMES)
def test_old_module_paths_are_the_new_modules(old):
    from adacomp._moved import new_name

    if old.startswith(("adacomp.mpi",)):
        pytest.importorskip("mpi4py", reason="adacomp.parallel.mpi needs mpi4py: pip install mpi4py")
    if old.startswith("adacomp.codec"):
        pytest.importorskip("constriction", reason="the codec needs constriction: pip install constriction")
    new = importlib.import_module(new_name(old))
    assert importlib.import_module(old) is new
    assert new.__spec__.name == new.__name__ == new_name(old)  # the alias did not rename it


def test_public_imports_of_0_1_keep_working():
    code = ("from adacomp import AdaComp, AdaCompState, adacomp_hook\n"
            "from adacomp.stages import compress_\n"
            "import adacomp.ddp, adacomp.parallel.ddp\n"
            "from adacomp.data import DataNotFound\n"
            "from adacomp.exchange import CostModel\n"
            "assert adacomp.ddp is adacomp.parallel.ddp and adacomp.ddp.AdaCompState is AdaCompState\n"
            "from adacomp.parallel.exchange import CostModel as C2\n"
            "assert CostModel is C2\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_horovod_old_path():
    pytest.importorskip("horovod.torch", reason="needs Horovod: make distributed")
    import adacomp.horovod

    import adacomp.parallel.horovod

    assert adacomp.horovod is adacomp.parallel.horovod


def test_objects_pickled_by_either_name_are_one_class():
    from adacomp.exchange import CostModel

    obj = pickle.loads(pickle.dumps(CostModel(bandwidth=1e9, latency=1e-4)))
    from adacomp.parallel.exchange import CostModel as New

    assert type(obj) is New


def test_running_an_old_module_path_names_the_new_command():
    proc = subprocess.run([sys.executable, "-m", "adacomp.data", "check"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "python -m adacomp.workloads.data" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_submodule_still_fails_plainly():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("adacomp.no_such_module")

"""The ``adacomp`` command: run a post-training compression stage on a saved model.

::

    adacomp compress --stage lowrank --config '{"ratio": 0.8, "method": "bsr"}' \\
        --module examples/stages_cnn.py model.pt model_small.pt
    adacomp compress --stage lowrank --set ratio=0.5 --set method=energy --module my_task IN OUT
    adacomp stages                      # the registered stages and their config fields

(``python -m adacomp.stages.cli ...`` works without the console-script entry point.)

``IN`` is a ``torch.save(model.state_dict(), path)`` file (plain or already compressed), e.g. the
one ``python examples/stages_cnn.py train model.pt`` writes; ``OUT`` gets the compressed model's
state dict, which :func:`adacomp.stages.load` reads back (its directory is created if missing).
``--module`` is a ``.py`` path or an importable module name that provides:

* ``build_model()`` (required): the model as it was built before compression;
* ``evaluate(model) -> float`` (optional): the task metric, higher is better, on held-out
  calibration data; needed by ``method=bsr``, and shown before/after in the report;
* ``train_step(model, batch) -> loss`` and ``data`` (optional): needed for fine-tuning; ``data``
  is an iterable of batches or a zero-argument function returning one (called only if used);
* ``filter_fn(module, name) -> bool`` (optional): which layers to compress.

``--config`` takes a JSON object or the path of a JSON file; each ``--set KEY=VALUE`` then
overrides one field (``VALUE`` is parsed as JSON when it parses, else taken as a string).

A user error (a bad config; ``IN`` missing, unreadable, not a state dict or not of the model
``build_model()`` returns; ``OUT`` not writable; ``--module`` not found or without
``build_model``) prints one line ``adacomp compress: ...`` to stderr and exits with status 2.
``adacomp --help`` is plain text written for the terminal, not this docstring.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

import torch

from .frame import compress_, config_from_dict, get_stage, load, stages

__all__ = ["UsageError", "load_user_module", "main", "parse_config", "read_state_dict"]


class UsageError(Exception):
    """A user error of the command: printed as one line ``adacomp <command>: <message>``, status 2."""


def load_user_module(spec: str) -> ModuleType:
    """Import ``spec``: a path to a ``.py`` file or a dotted module name.

    Raises:
        UsageError: no such file, or no such module (an error raised while the module runs
            propagates as it is).
    """
    if spec.endswith(".py") or os.sep in spec or "/" in spec:
        path = Path(spec)
        if not path.is_file():
            raise UsageError(f"--module {spec}: no such file; give a .py file or an importable module name")
        name = f"adacomp_user_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
        return module
    try:
        found = importlib.util.find_spec(spec)
    except (ImportError, ValueError):  # a parent package is missing, or the name is malformed
        found = None
    if found is None:
        raise UsageError(
            f"--module {spec}: no module of that name can be imported; give a .py file "
            f"(e.g. examples/stages_cnn.py) or a module on the Python path"
        )
    return importlib.import_module(spec)


def _one_line(exc: object, limit: int = 300) -> str:
    """The message of ``exc`` on one line (white space folded), cut to ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


_MAKE_IN = 'save one with torch.save(model.state_dict(), "model.pt") (see adacomp compress --help)'


def read_state_dict(path: str) -> Mapping:
    """The state dict saved in ``path`` (``torch.load(..., weights_only=True)``, on the CPU).

    Raises:
        UsageError: ``path`` is missing, a directory, unreadable, not loadable by ``torch.load``
            with ``weights_only=True``, or holds something other than a state dict.
    """
    if not os.path.exists(path):
        raise UsageError(f"IN file {path} does not exist; {_MAKE_IN}")
    if os.path.isdir(path):
        raise UsageError(f"IN {path} is a directory, not a saved state dict; {_MAKE_IN}")
    if not os.access(path, os.R_OK):
        raise UsageError(f"IN file {path} is not readable (permission denied); check its permissions")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise UsageError(f"cannot read IN file {path}: {exc.strerror or _one_line(exc)}") from None
    except Exception as exc:  # torch.load raises what its unpickler raises
        first = re.sub(r"\x1b\[[0-9;]*m", "", _one_line(exc)).split(". ")[0][:100]  # no terminal codes
        raise UsageError(
            f"IN file {path} is not a state dict torch.load(weights_only=True) can read "
            f"({type(exc).__name__}: {first}); a whole model saved with torch.save(model) will not do: "
            f"{_MAKE_IN}"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise UsageError(
            f"IN file {path} holds a {type(state).__name__}, not a state dict (a mapping of names to "
            f"tensors); {_MAKE_IN}"
        )
    return state


def _writable(path: str, what: str) -> None:
    """Raise :class:`UsageError` unless a file can be written at ``path`` (missing directories can
    be created: the nearest existing one must be a writable directory)."""
    if os.path.isdir(path):
        raise UsageError(f"{what} {path} is a directory; give the path of the file to write")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"{what} {path} exists and is not writable; choose another path")
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"cannot create the directory of {what} {path}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(
            f"cannot write {what} {path}: directory {existing} is not writable; choose another path"
        )


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_config(stage: str, config: str | None, sets: Sequence[str] = ()):
    """Build the stage's config from ``--config`` (JSON text or file) and ``--set KEY=VALUE`` items."""
    values: dict = {}
    if config:
        text = Path(config).read_text() if Path(config).is_file() else config
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--config is neither a JSON object nor a JSON file: {exc}") from None
        if not isinstance(values, dict):
            raise ValueError(f"--config must be a JSON object, got {type(values).__name__}")
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        values[key.strip()] = _parse_value(value.strip())
    return config_from_dict(stage, values)


class _LazyData:
    """Calls the user's ``data()`` factory on first iteration, then re-iterates its result."""

    def __init__(self, factory):
        self.factory = factory
        self.data = None

    def __iter__(self):
        if self.data is None:
            self.data = self.factory()
        return iter(self.data)


def _describe_stages() -> str:
    lines = []
    for name, stage in sorted(stages().items()):
        lines.append(f"{name}: {stage.config_type.__name__} (layers: {stage.supported_kinds()})")
        for f in dataclasses.fields(stage.config_type):
            default = f.default if f.default is not dataclasses.MISSING else "(required)"
            lines.append(f"    {f.name} = {default!r}")
    return "\n".join(lines)


def _compress(args) -> int:
    try:
        return _run_compress(args)
    except UsageError as exc:
        print(f"adacomp compress: {exc}", file=sys.stderr)
        return 2


def _run_compress(args) -> int:
    try:
        config = parse_config(args.stage, args.config, args.set or [])
    except (ValueError, TypeError, KeyError, OSError) as exc:
        raise UsageError(f"bad config for stage {args.stage!r}: {exc}") from None
    user = load_user_module(args.module)
    if not hasattr(user, "build_model"):
        raise UsageError(f"{args.module} must define build_model()")
    state = read_state_dict(args.input)
    _writable(args.output, "OUT")
    if args.report_json:
        _writable(args.report_json, "--report-json")
    try:
        model = load(user.build_model(), state)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        why = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc  # str(KeyError) is quoted
        raise UsageError(
            f"IN file {args.input} does not fit the model build_model() of {args.module} returns "
            f"({_one_line(why, 200)}); was it saved from that model?"
        ) from None
    data = getattr(user, "data", None)
    if callable(data):
        data = _LazyData(data)
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        report = compress_(
            model,
            config,
            data=data,
            filter_fn=getattr(user, "filter_fn", None),
            evaluate=getattr(user, "evaluate", None),
            train_step=getattr(user, "train_step", None),
            log=log,
            progress=False if args.quiet else None,  # a bar on a terminal only
        )
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        torch.save(model.state_dict(), args.output)
    except OSError as exc:
        raise UsageError(f"cannot write OUT {args.output}: {exc.strerror or _one_line(exc)}") from None
    print(report)
    print(
        f"wrote {args.output} ({os.path.getsize(args.output):,} bytes on disk); load it with "
        f"adacomp.stages.load(build_model(), {args.output!r})"
    )
    if args.report_json:
        try:
            with open(args.report_json, "w") as f:
                json.dump(report.to_dict(), f, indent=2)
        except OSError as exc:
            raise UsageError(f"cannot write --report-json {args.report_json}: {exc.strerror}") from None
    return 0


# Help texts: plain text for the terminal (the module docstring above is reST for the API docs).
_MAIN_EPILOG = """\
examples:
  adacomp compress --stage lowrank --set ratio=0.8 --set method=bsr \\
      --module examples/stages_cnn.py model.pt model_small.pt
  adacomp compress --stage lowrank --config cfg.json --module my_task IN OUT
  adacomp stages        list the registered stages and their config fields

"adacomp compress --help" says what IN, OUT and --module must be.
Without the console script: python -m adacomp.stages.cli compress ...
"""

_COMPRESS_EPILOG = """\
IN is a model's state dict saved with
  torch.save(model.state_dict(), "model.pt")
plain or already compressed. For the example task (a small CNN on Fashion-MNIST),
run from the root of the adacomp repository:
  python examples/stages_cnn.py train model.pt
OUT gets the compressed model's state dict (its directory is created if missing);
read it back in Python with
  adacomp.stages.load(build_model(), "model_small.pt")

--module is a .py file or an importable module name that provides:
  build_model()             required: the model as it was built before compression
  evaluate(model) -> float  optional: the task metric, higher is better, on held-out
                            calibration data; needed by method=bsr, shown before/after
  train_step(model, batch)  optional: the loss of one batch, not back-propagated
  data                      optional: an iterable of batches, or a function returning
                            one; with train_step needed for fine-tuning
                            (e.g. --set finetune_steps=200)
  filter_fn(module, name)   optional: True for the layers to compress

--config takes a JSON object or the path of a JSON file; each --set KEY=VALUE then
overrides one field (VALUE is parsed as JSON when it parses, else taken as a string).
"adacomp stages" lists each stage's fields and their defaults.

example:
  python examples/stages_cnn.py train model.pt --epochs 1
  adacomp compress --stage lowrank --set ratio=0.8 --set method=bsr \\
      --module examples/stages_cnn.py model.pt model_small.pt
  python examples/stages_cnn.py test model_small.pt
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adacomp`` command; returns the exit status."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="adacomp",
        description="adacomp post-training compression stages: shrink a trained model's saved state dict.",
        epilog=_MAIN_EPILOG,
        formatter_class=raw,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    comp = sub.add_parser(
        "compress",
        help="run a stage on a saved model",
        description="Compress the model saved in IN with one stage and write it to OUT.",
        epilog=_COMPRESS_EPILOG,
        formatter_class=raw,
    )
    comp.add_argument("--stage", required=True, choices=sorted(stages()), help="the stage to run")
    comp.add_argument("--config", default=None, help="JSON object or JSON file with the stage's config")
    comp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config field")
    comp.add_argument(
        "--module",
        required=True,
        help="a .py file or module name providing build_model() and optionally evaluate, "
        "train_step, data, filter_fn",
    )
    comp.add_argument("--report-json", default=None, help="also write the report as JSON here")
    comp.add_argument("--quiet", action="store_true", help="no progress messages, no progress bar")
    comp.add_argument("input", metavar="IN", help="state dict of the model to compress (torch.save)")
    comp.add_argument("output", metavar="OUT", help="where to write the compressed state dict")
    sub.add_parser(
        "stages",
        help="list the registered stages and their config fields",
        description="List the registered stages, the layers they compress and their config fields.",
    )
    args = parser.parse_args(argv)
    if args.cmd == "stages":
        print(_describe_stages())
        return 0
    get_stage(args.stage)
    return _compress(args)


if __name__ == "__main__":
    sys.exit(main())

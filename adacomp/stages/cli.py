"""The ``adacomp`` command: run a post-training compression stage on a saved model.

::

    adacomp compress --stage lowrank --config '{"ratio": 0.8, "method": "bsr"}' \\
        --module examples/stages_cnn.py model.pt model_small.pt
    adacomp compress --stage lowrank --set ratio=0.5 --set method=energy --module my_task IN OUT
    adacomp stages                      # the registered stages and their config fields

(``python -m adacomp.stages.cli ...`` works without the console-script entry point.)

``IN`` is a ``torch.save(model.state_dict())`` file (plain or already compressed); ``OUT`` gets the
compressed model's state dict, which :func:`adacomp.stages.load` reads back. ``--module`` is a
``.py`` path or an importable module name that provides:

* ``build_model()`` (required): the model as it was built before compression;
* ``evaluate(model) -> float`` (optional): the task metric, higher is better, on held-out
  calibration data; needed by ``method=bsr``, and shown before/after in the report;
* ``train_step(model, batch) -> loss`` and ``data`` (optional): needed for fine-tuning; ``data``
  is an iterable of batches or a zero-argument function returning one (called only if used);
* ``filter_fn(module, name) -> bool`` (optional): which layers to compress.

``--config`` takes a JSON object or the path of a JSON file; each ``--set KEY=VALUE`` then
overrides one field (``VALUE`` is parsed as JSON when it parses, else taken as a string).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from .frame import compress_, config_from_dict, get_stage, load, stages

__all__ = ["load_user_module", "main", "parse_config"]


def load_user_module(spec: str) -> ModuleType:
    """Import ``spec``: a path to a ``.py`` file or a dotted module name."""
    if spec.endswith(".py") or os.sep in spec or "/" in spec:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"--module {spec}: no such file")
        name = f"adacomp_user_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
        return module
    return importlib.import_module(spec)


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
        config = parse_config(args.stage, args.config, args.set or [])
    except (ValueError, TypeError, KeyError) as exc:
        print(f"adacomp compress: bad config for stage {args.stage!r}: {exc}", file=sys.stderr)
        return 2
    user = load_user_module(args.module)
    if not hasattr(user, "build_model"):
        print(f"adacomp compress: {args.module} must define build_model()", file=sys.stderr)
        return 2
    model = load(user.build_model(), args.input)
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
        )
    except (ValueError, TypeError) as exc:
        print(f"adacomp compress: {exc}", file=sys.stderr)
        return 2
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    torch.save(model.state_dict(), args.output)
    print(report)
    print(
        f"wrote {args.output} ({os.path.getsize(args.output):,} bytes on disk); load it with "
        f"adacomp.stages.load(build_model(), {args.output!r})"
    )
    if args.report_json:
        with open(args.report_json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adacomp`` command; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="adacomp",
        description="adacomp post-training compression stages.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    comp = sub.add_parser("compress", help="run a stage on a saved model")
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
    comp.add_argument("--quiet", action="store_true", help="no progress messages")
    comp.add_argument("input", metavar="IN", help="state dict of the model to compress")
    comp.add_argument("output", metavar="OUT", help="where to write the compressed state dict")
    sub.add_parser("stages", help="list the registered stages and their config fields")
    args = parser.parse_args(argv)
    if args.cmd == "stages":
        print(_describe_stages())
        return 0
    get_stage(args.stage)
    return _compress(args)


if __name__ == "__main__":
    sys.exit(main())

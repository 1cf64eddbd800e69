"""The frame shared by the post-training compression stages: registry, ``compress_``, ``Report``, ``load``.

Shaped after torchao's ``quantize_(model, config, filter_fn=...)``: a stage is chosen by the *type*
of its config (a small dataclass validated in ``__post_init__``), changes the model in place, and
returns a :class:`Report`. A stage that must run the model takes the user's callables, never a
training loop of its own tied to one data set:

* ``evaluate(model) -> float``: the task metric, higher is better (e.g. accuracy on held-out
  calibration data). Used to score candidates and for the metric before/after in the report.
* ``train_step(model, batch) -> Tensor``: the loss of one batch, *not* yet back-propagated. The
  stage adds its own terms (a regulariser), calls ``backward`` and steps an optimizer it builds
  itself, because a compression stage replaces parameters, so an optimizer the user built
  beforehand would point at stale tensors (override with ``make_optimizer(params)``).
* ``data``: an iterable of batches for ``train_step``, re-iterated as often as needed.

Saving and loading
------------------
Every module a stage swaps in carries its structural choice (stage name, kind, rank, ...) as
PyTorch *extra state*, so it lands in ``model.state_dict()`` under ``<layer>._extra_state``. A
compressed model therefore saves with a plain ``torch.save(model.state_dict(), path)``, and

    model = adacomp.stages.load(build_model(), path)

rebuilds it: the model is built as it was before compression, every ``_extra_state`` entry tagged
with a stage name is handed to that stage's :meth:`Stage.rebuild`, which swaps in the compressed
module, and then the weights are loaded strictly. The checkpoint loads with
``torch.load(..., weights_only=True)`` (extra states are plain dicts of ``str``/``int``).

Adding a stage
--------------
``compress_layers`` gets the caller's ``data``, ``evaluate``, ``train_step``, ``make_optimizer``,
``log`` and ``progress`` as one :class:`StageInputs`. A stage that trains (regularises or fine-tunes)
calls :func:`finetune`, the one training loop of all stages, after
:meth:`StageInputs.require_training` has checked that the caller passed ``data`` and
``train_step``. :func:`layer_sizes`, taken before the layers are swapped, builds the per-layer records
(:meth:`LayerSizes.record`). ::

    @dataclass
    class MyConfig:
        strength: float = 1.0
        def __post_init__(self): ...          # raise ValueError with a clear message

    @register_stage("mine", MyConfig)
    class MyStage(Stage):
        layer_kinds = "nn.Linear"                     # for error messages
        def supports(self, module): return isinstance(module, nn.Linear)
        def compress_layers(self, model, config, layers, inputs, info) -> list[LayerRecord]: ...
        def rebuild(self, module, extra_state): ...   # only if it swaps modules
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = [
    "COMPRESSED_ATTR",
    "EXTRA_STATE_KEY",
    "LayerRecord",
    "LayerSizes",
    "Report",
    "Stage",
    "StageInputs",
    "UnsupportedLayerError",
    "compress_",
    "config_from_dict",
    "finetune",
    "get_stage",
    "layer_sizes",
    "load",
    "module_bytes",
    "module_params",
    "optional_import",
    "progress_bar",
    "register_stage",
    "save",
    "stages",
]

EXTRA_STATE_KEY = "adacomp_stage"
"""Key, in a swapped-in module's extra state, that names the stage which can rebuild it."""

COMPRESSED_ATTR = "adacomp_compressed"
"""Class attribute (``True``) of the modules stages swap in: they and their children are never
selected again, so compressing an already compressed model touches only its remaining layers.
(A module whose extra state names a stage, :data:`EXTRA_STATE_KEY`, counts as swapped in too.)"""

FilterFn = Callable[[nn.Module, str], bool]


class UnsupportedLayerError(TypeError):
    """``filter_fn`` selected a layer the stage cannot compress."""


# --------------------------------------------------------------------------- counting storage


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters and persistent buffers of ``module`` (recursively), each shared tensor once."""
    seen: set[int] = set()
    out: list[torch.Tensor] = []
    tensors = [p for p in module.parameters()]
    for mod in module.modules():
        non_persistent = getattr(mod, "_non_persistent_buffers_set", set())
        tensors += [b for name, b in mod.named_buffers(recurse=False) if name not in non_persistent]
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def module_params(module: nn.Module) -> int:
    """Number of stored elements: parameters plus persistent buffers, shared tensors counted once."""
    return sum(t.numel() for t in _tensors(module))


def module_bytes(module: nn.Module) -> int:
    """Bytes that must be stored: every element at its dtype's size (4 for fp32)."""
    return sum(t.numel() * t.element_size() for t in _tensors(module))


def optional_import(name: str, install: str, needed_by: str) -> Any:
    """Import the optional module ``name`` when a stage first needs it.

    Args:
        name: the module, e.g. ``"sklearn.decomposition"``.
        install: the command that installs it, e.g. ``"pip install scikit-learn"``.
        needed_by: what needs it, for the message, e.g. ``"DirNet's dictionary learning"``.

    Raises:
        ModuleNotFoundError: (an ``ImportError``) when it is not installed, naming ``install``.
    """
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        top = name.split(".")[0]
        raise ModuleNotFoundError(
            f"{needed_by} needs the optional package {top!r}, which is not installed: {install}", name=top
        ) from exc


SKLEARN_INSTALL = "pip install scikit-learn (also in pip install 'adacomp[data]')"
"""How to install scikit-learn, which DirNet and the embedding stage's k-means need."""


# --------------------------------------------------------------------------- records and report


@dataclass
class LayerRecord:
    """What a stage did to one layer.

    Attributes:
        name: fully qualified module name (``model.get_submodule(name)``).
        kind: the original module class, e.g. ``"Conv2d"``.
        params_before / params_after: stored elements of the layer (weights, biases, buffers).
        bytes_before / bytes_after: bytes those elements need at their dtypes (fp32: 4 each).
        choice: the per-layer decision, JSON-able (e.g. ``{"rank": 12, "full_rank": 64}``).
        detail: the same decision in a few words, for the table.
    """

    name: str
    kind: str
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    choice: dict = field(default_factory=dict)
    detail: str = ""

    @property
    def ratio(self) -> float:
        """Compression ratio of the layer, ``bytes_before / bytes_after``."""
        return self.bytes_before / self.bytes_after if self.bytes_after else float("inf")


class LayerSizes(NamedTuple):
    """Storage of one layer before a stage changes it (see :func:`layer_sizes`)."""

    name: str
    """fully qualified module name."""
    params: int
    """stored elements: parameters plus persistent buffers (:func:`module_params`)."""
    bytes: int
    """bytes of those elements at their dtypes (:func:`module_bytes`)."""
    kind: str
    """the module class, e.g. ``"Conv2d"``."""

    def record(self, module: nn.Module, choice: dict, detail: str) -> LayerRecord:
        """The :class:`LayerRecord` of this layer: these sizes against those of ``module``, the
        layer as it is now (compressed or left as it was)."""
        return LayerRecord(
            name=self.name,
            kind=self.kind,
            params_before=self.params,
            params_after=module_params(module),
            bytes_before=self.bytes,
            bytes_after=module_bytes(module),
            choice=choice,
            detail=detail,
        )


def layer_sizes(layers: Mapping[str, nn.Module]) -> dict[str, LayerSizes]:
    """``{name: LayerSizes(name, params, bytes, kind)}`` of ``layers`` as they are now.

    A stage takes it before swapping the layers; :meth:`LayerSizes.record` then makes each
    layer's record.
    """
    return {
        name: LayerSizes(name, module_params(m), module_bytes(m), type(m).__name__)
        for name, m in layers.items()
    }


def _fmt_int(n: int) -> str:
    return f"{n:,}"


@dataclass
class Report:
    """Returned by :func:`compress_`; ``print(report)`` shows a table.

    ``params_*`` / ``bytes_*`` count the whole model; ``layers`` holds one record per selected
    layer. ``ratio`` is the compression ratio of its bytes and ``bytes_reduction`` the share of
    its bytes removed (the table's headline, ``-95.2% bytes``); ``reduction`` is the share of its
    stored *elements* removed, which differs where dtypes change (a packed ``uint8`` code byte,
    an fp16 codebook value and an fp32 weight each count as one element). ``evaluations``
    counts the calls of ``evaluate`` the stage made itself (candidate scoring), not the two made
    for ``metric_before/after``.
    """

    stage: str
    config: dict
    layers: list[LayerRecord]
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    metric_before: float | None = None
    metric_after: float | None = None
    evaluations: int = 0
    seconds: float = 0.0
    info: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict, repr=False)

    @property
    def ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("inf")

    @property
    def reduction(self) -> float:
        """Share of the model's stored elements removed (a packed ``uint8`` byte is one element)."""
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def bytes_reduction(self) -> float:
        """Share of the model's stored bytes removed, ``1 - 1 / ratio``: the table's headline."""
        return 1.0 - self.bytes_after / self.bytes_before if self.bytes_before else 0.0

    @property
    def choices(self) -> dict[str, dict]:
        """``{layer name: choice}``, e.g. to re-apply an allocation."""
        return {r.name: dict(r.choice) for r in self.layers}

    def to_dict(self) -> dict:
        """A JSON-able dict (records, totals, ratio, reduction, metrics, info)."""
        d = dataclasses.asdict(self)
        d.pop("defaults")
        d["ratio"] = self.ratio
        d["reduction"] = self.reduction
        d["bytes_reduction"] = self.bytes_reduction
        for rec, obj in zip(d["layers"], self.layers):
            rec["ratio"] = obj.ratio
        return d

    def table(self) -> str:
        cols = (
            "layer",
            "kind",
            "choice",
            "params before",
            "params after",
            "bytes before",
            "bytes after",
            "ratio",
        )
        rows = [
            (
                r.name,
                r.kind,
                r.detail,
                _fmt_int(r.params_before),
                _fmt_int(r.params_after),
                _fmt_int(r.bytes_before),
                _fmt_int(r.bytes_after),
                f"{r.ratio:.2f}x",
            )
            for r in self.layers
        ]
        rows.append(
            (
                "total (model)",
                "",
                f"-{100 * self.bytes_reduction:.1f}% bytes",
                _fmt_int(self.params_before),
                _fmt_int(self.params_after),
                _fmt_int(self.bytes_before),
                _fmt_int(self.bytes_after),
                f"{self.ratio:.2f}x",
            )
        )
        widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]

        def line(row):
            return "  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))

        settings = ", ".join(
            f"{k}={v}" for k, v in self.config.items() if k not in self.defaults or self.defaults[k] != v
        )
        head = f"stage {self.stage} ({settings}): {self.evaluations} evaluations, {self.seconds:.1f} s"
        out = [head, line(cols), "-" * len(line(cols))]
        out += [line(r) for r in rows[:-1]]
        out += ["-" * len(line(cols)), line(rows[-1])]
        if self.metric_before is not None or self.metric_after is not None:
            out.append(
                f"metric (evaluate): {_fmt_metric(self.metric_before)} -> {_fmt_metric(self.metric_after)}"
            )
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def _fmt_metric(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


# --------------------------------------------------------------------------- training (for stages)

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class StageInputs:
    """What the caller of :func:`compress_` hands on to the stage (see the module doc).

    Attributes:
        data: iterable of batches for ``train_step``, or ``None``.
        evaluate: ``evaluate(model) -> float``, higher is better, or ``None``.
        train_step: ``train_step(model, batch) -> loss`` (a 0-dim tensor), or ``None``.
        make_optimizer: ``make_optimizer(params) -> Optimizer``, overriding the stage's optimizer,
            or ``None``.
        log: ``log(message)`` for progress messages, or ``None`` (silent).
        progress: progress bars of long phases (:func:`progress_bar`): ``None`` on a terminal
            only, ``True`` always, ``False`` never.
    """

    data: Iterable | None = None
    evaluate: Callable[[nn.Module], float] | None = None
    train_step: Callable[[nn.Module, Any], torch.Tensor] | None = None
    make_optimizer: OptimizerFactory | None = None
    log: Callable[[str], None] | None = None
    progress: bool | None = None

    def require_training(self, what: str) -> None:
        """Raise ``ValueError(f"{what} data=<iterable of batches> and train_step=<fn(model, batch) ->
        loss tensor>")`` unless both ``data`` and ``train_step`` were given; ``what`` names the
        setting that trains, ending with its verb, e.g. ``"finetune_steps needs"``."""
        if self.data is None or self.train_step is None:
            raise ValueError(
                f"{what} data=<iterable of batches> and train_step=<fn(model, batch) -> loss tensor>"
            )


def _cycle(data: Iterable) -> Iterator:
    """The batches of ``data``, re-iterated without end; ``ValueError`` if a pass yields none."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise ValueError("data yielded no batch")


def progress_bar(total: int, label: str, progress: bool | None, unit: str = "step"):
    """A ``tqdm`` bar on stderr over ``total`` units, or ``None`` when ``progress`` is ``False``.

    ``progress=None`` (the default of :func:`compress_`) draws the bar only when stderr is a
    terminal (the bar object exists either way, disabled off a terminal); ``True`` (asked for)
    draws it on any stderr; ``False`` gives ``None``. Close it when done (``bar.close()``).
    """
    if progress is False:
        return None
    from tqdm import tqdm  # an install requirement; imported only when a bar is wanted

    return tqdm(
        total=total,
        desc=label or "train",
        unit=unit,
        leave=False,
        file=sys.stderr,
        disable=progress is None and not sys.stderr.isatty(),
    )


def finetune(
    model: nn.Module,
    steps: int,
    *,
    data: Iterable,
    train_step: Callable[[nn.Module, Any], torch.Tensor],
    optimizer: torch.optim.Optimizer | OptimizerFactory,
    scheduler: str = "cosine",
    penalty: Callable[[nn.Module], torch.Tensor] | None = None,
    penalty_weight: float = 1.0,
    penalty_name: str = "penalty",
    on_step: Callable[[int], None] | None = None,
    frozen: Iterable[nn.Parameter] = (),
    log: Callable[[str], None] | None = None,
    label: str = "finetune",
    progress: bool | None = False,
) -> dict:
    """Train ``model`` for ``steps`` optimizer steps on the user's task loss: the loop of every stage.

    Step ``k`` (``0 .. steps - 1``) does, in this order: ``on_step(k)``; ``loss = train_step(model,
    batch)`` on the next batch of ``data``; with a ``penalty``, ``loss = loss + penalty_weight *
    penalty(model)``; ``zero_grad(set_to_none=True)``; ``loss.backward()``; ``optimizer.step()``;
    the scheduler's step. ``model`` is put in training mode (``model.train()``) and left so.

    Args:
        model: the model to train, in place.
        steps: the number of optimizer steps, ``>= 1``.
        data: iterable of batches, re-iterated as often as needed.
        train_step: ``train_step(model, batch) -> loss``, a 0-dim tensor not yet back-propagated.
        optimizer: an optimizer over the parameters to train, or a factory ``optimizer(params)``
            (e.g. the user's ``make_optimizer``) called once with the model's parameters that
            require gradients, in ``model.parameters()`` order, after ``frozen`` is frozen.
        scheduler: ``"cosine"`` (``CosineAnnealingLR`` with ``T_max=steps``: every group's
            learning rate decays from its initial value to 0 over the run) or ``"constant"``.
        penalty: ``penalty(model) -> 0-dim tensor`` added to the loss, e.g. a regulariser.
        penalty_weight: its factor in the loss (the recorded values are unweighted).
        penalty_name: its name in the returned keys and the log lines.
        on_step: called with the step index before each step (e.g. to anneal a noise level).
        frozen: parameters held at ``requires_grad=False`` during training; those that required
            gradients require them again afterwards, also when training raises.
        log: gets a line about five times a run, ``"  {label} step {k}/{steps}: loss {mean:.4f}"``
            (the mean task loss since the previous line; ``"  step ..."`` when ``label`` is empty),
            with a penalty followed by ``", {penalty_name} {last value:.4f}"``.
        label: the phase's name, in log lines and on the progress bar.
        progress: a ``tqdm`` progress bar on stderr: ``None`` only when stderr is a terminal,
            ``True`` always, ``False`` (default) never (:func:`progress_bar`).

    Returns:
        ``{"steps": steps, "loss_first": float, "loss_last": float}``: the task loss (without the
        penalty) of the first and last step; with a penalty also ``f"{penalty_name}_first"`` and
        ``f"{penalty_name}_last"``.

    Raises:
        ValueError: ``steps < 1``, an unknown ``scheduler``, or ``data`` yields no batch.
        TypeError: ``train_step`` returns anything but a 0-dim tensor.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if scheduler not in ("cosine", "constant"):
        raise ValueError(f"scheduler must be 'cosine' or 'constant', got {scheduler!r}")
    frozen = [p for p in frozen if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    bar = None
    try:
        if not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = optimizer([p for p in model.parameters() if p.requires_grad])
        sched = (
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
            if scheduler == "cosine"
            else None
        )
        model.train()
        batches = _cycle(data)
        losses: list[float] = []
        penalties: list[float] = []
        every = max(1, steps // 5)
        prefix = f"  {label} step" if label else "  step"
        bar = progress_bar(steps, label, progress)
        for step in range(steps):
            if on_step is not None:
                on_step(step)
            loss = train_step(model, next(batches))
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise TypeError(
                    "train_step(model, batch) must return the scalar loss tensor (not back-propagated)"
                )
            losses.append(float(loss.detach()))
            if penalty is not None:
                reg = penalty(model)
                penalties.append(float(reg.detach()))
                loss = loss + penalty_weight * reg
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if sched is not None:
                sched.step()
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
                bar.update()
            if log is not None and ((step + 1) % every == 0 or step + 1 == steps):
                msg = f"{prefix} {step + 1}/{steps}: loss {sum(losses[-every:]) / len(losses[-every:]):.4f}"
                if penalties:
                    msg += f", {penalty_name} {penalties[-1]:.4f}"
                if bar is None:
                    log(msg)
                else:  # the bar steps aside while the line is written, then is redrawn below it
                    with bar.external_write_mode(file=sys.stderr):
                        log(msg)
    finally:
        if bar is not None:
            bar.close()
        for p in frozen:
            p.requires_grad_(True)
    out = {"steps": steps, "loss_first": losses[0], "loss_last": losses[-1]}
    if penalties:
        out[f"{penalty_name}_first"], out[f"{penalty_name}_last"] = penalties[0], penalties[-1]
    return out


# --------------------------------------------------------------------------- stages and registry


class Stage:
    """Base class of a post-training compression stage.

    Subclasses are registered with :func:`register_stage`, which sets :attr:`name` and
    :attr:`config_type`. :func:`compress_` selects the layers (``filter_fn`` or
    :meth:`supports`), raises :class:`UnsupportedLayerError` for a selected layer the stage does
    not support, and calls :meth:`apply`. A stage implements :meth:`compress_layers`, which gets
    the caller's inputs as one :class:`StageInputs` (or overrides :meth:`apply` itself).
    """

    name: str = ""
    config_type: type = object
    layer_kinds: str = "see the stage's documentation"
    """Human-readable list of the supported layer kinds, for error messages."""

    default_kinds: str | None = None
    """Human-readable list of the layer kinds :meth:`selects_by_default` picks, when they differ
    from :attr:`layer_kinds` (for error messages); ``None``: the same."""

    def supports(self, module: nn.Module) -> bool:
        """Whether this stage can compress ``module`` (a module owning parameters)."""
        raise NotImplementedError

    def selects_by_default(self, module: nn.Module) -> bool:
        """Whether :func:`compress_` without ``filter_fn`` compresses ``module`` (default:
        :meth:`supports`). A stage that supports some layers only on request (``filter_fn``)
        narrows it, and names what it selects in :attr:`default_kinds`."""
        return self.supports(module)

    def supported_kinds(self) -> str:
        """Human-readable list of the supported layer kinds (default: :attr:`layer_kinds`)."""
        return self.layer_kinds

    def apply(
        self,
        model: nn.Module,
        config: Any,
        *,
        layers: dict[str, nn.Module],
        data: Iterable | None = None,
        evaluate: Callable[[nn.Module], float] | None = None,
        train_step: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
        log: Callable[[str], None] | None = None,
        info: dict | None = None,
        progress: bool | None = None,
        **kwargs: Any,
    ) -> list[LayerRecord]:
        """Compress ``layers`` (``{name: module}``) of ``model`` in place; return one record each.

        ``info`` is a dict the stage may fill with run facts that go into ``Report.info``;
        ``progress`` is handed to the stage's progress bars (:func:`progress_bar`). This
        default bundles the inputs into a :class:`StageInputs` and calls :meth:`compress_layers`.
        """
        inputs = StageInputs(data, evaluate, train_step, make_optimizer, log, progress)
        return self.compress_layers(model, config, layers, inputs, {} if info is None else info, **kwargs)

    def compress_layers(
        self,
        model: nn.Module,
        config: Any,
        layers: dict[str, nn.Module],
        inputs: StageInputs,
        info: dict,
        **kwargs,
    ) -> list[LayerRecord]:
        """What :meth:`apply` does, with the caller's callables and data in ``inputs`` and ``info``
        a dict (never ``None``) for run facts; ``kwargs`` are the stage's own options."""
        raise NotImplementedError(f"stage {self.name!r} implements neither apply nor compress_layers")

    def rebuild(self, module: nn.Module, extra_state: dict) -> nn.Module:
        """Return the compressed module that replaces ``module`` (as built before compression),
        shaped as recorded in ``extra_state``; its weights are loaded afterwards."""
        raise NotImplementedError(f"stage {self.name!r} does not swap modules, nothing to rebuild")

    def rebuilt_kind(self, module: nn.Module, extra_state: dict, what: str) -> str:
        """The layer kind ``extra_state["kind"]`` (e.g. ``"Linear"``), for :meth:`rebuild`.

        Raises ``TypeError("checkpoint holds a {what} {kind}, but the model has a ... there")``
        unless this stage supports ``module`` and ``module`` is of that kind (class name).
        """
        kind = extra_state.get("kind")
        if not self.supports(module) or type(module).__name__ != kind:
            raise TypeError(
                f"checkpoint holds a {what} {kind}, but the model has a {type(module).__name__} there"
            )
        return kind


_STAGES: dict[str, Stage] = {}
_BY_CONFIG: dict[type, Stage] = {}


def register_stage(name: str, config_cls: type) -> Callable[[type[Stage]], type[Stage]]:
    """Class decorator: register a :class:`Stage` subclass under ``name`` for ``config_cls``."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config class of stage {name!r} must be a dataclass, got {config_cls!r}")

    def deco(cls: type[Stage]) -> type[Stage]:
        if name in _STAGES and type(_STAGES[name]) is not cls:
            raise ValueError(f"a stage named {name!r} is already registered ({type(_STAGES[name]).__name__})")
        if config_cls in _BY_CONFIG and type(_BY_CONFIG[config_cls]) is not cls:
            raise ValueError(
                f"{config_cls.__name__} already belongs to stage {_BY_CONFIG[config_cls].name!r}"
            )
        cls.name = name
        cls.config_type = config_cls
        stage = cls()
        _STAGES[name] = stage
        _BY_CONFIG[config_cls] = stage
        return cls

    return deco


def stages() -> dict[str, Stage]:
    """The registered stages, ``{name: stage}``."""
    return dict(_STAGES)


def get_stage(key: str | Any) -> Stage:
    """Return the stage registered under a name, or for a config instance or class."""
    if isinstance(key, str):
        try:
            return _STAGES[key]
        except KeyError:
            raise KeyError(
                f"unknown stage {key!r}; registered: {', '.join(sorted(_STAGES)) or '(none)'}"
            ) from None
    cls = key if isinstance(key, type) else type(key)
    for base in cls.__mro__:
        if base in _BY_CONFIG:
            return _BY_CONFIG[base]
    known = ", ".join(sorted(c.__name__ for c in _BY_CONFIG)) or "(none)"
    raise TypeError(f"{cls.__name__} is not a registered stage config; known configs: {known}")


def config_from_dict(stage: str, values: Mapping[str, Any]) -> Any:
    """Build the config of stage ``stage`` from a mapping (e.g. parsed JSON), with clear errors."""
    cls = get_stage(stage).config_type
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"unknown field(s) {', '.join(unknown)} for {cls.__name__}; fields: {', '.join(sorted(names))}"
        )
    return cls(**values)


# --------------------------------------------------------------------------- compress_


def _select(
    model: nn.Module, stage: Stage, filter_fn: FilterFn | None
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """``({name: module}`` of the layers to compress (modules that own parameters directly),
    ``{name: stage or class}`` of the modules a stage already swapped in, which are skipped)."""
    chosen: dict[str, nn.Module] = {}
    compressed: dict[str, str] = {}
    seen: set[int] = set()
    done: list[str] = []  # prefixes of modules a stage already swapped in
    for name, module in model.named_modules():
        if _is_compressed(module):
            done.append(name + ".")
            compressed[name] = _compressed_by(module)
            continue
        if any(name.startswith(prefix) for prefix in done):
            continue
        if id(module) in seen or next(module.parameters(recurse=False), None) is None:
            continue
        seen.add(id(module))
        if filter_fn is None:
            if stage.selects_by_default(module):
                chosen[name] = module
            continue
        if not filter_fn(module, name):
            continue
        if not stage.supports(module):
            raise UnsupportedLayerError(
                f"filter_fn selected layer {name or '(root)'!r} of kind {type(module).__name__}, which stage "
                f"{stage.name!r} cannot compress; supported: {stage.supported_kinds()}. Make filter_fn "
                f"return False for it."
            )
        chosen[name] = module
    return chosen, compressed


def _stage_state(module: nn.Module) -> dict | None:
    """The extra state of a module a stage swapped in (a dict naming the stage), else ``None``."""
    if type(module).get_extra_state is nn.Module.get_extra_state:
        return None  # no extra state at all
    try:
        state = module.get_extra_state()
    except Exception:  # noqa: BLE001 - whatever a foreign module's extra state does
        return None
    return state if isinstance(state, dict) and EXTRA_STATE_KEY in state else None


def _is_compressed(module: nn.Module) -> bool:
    """A module a stage swapped in: it sets :data:`COMPRESSED_ATTR` or its extra state names a stage."""
    return bool(getattr(module, COMPRESSED_ATTR, False)) or _stage_state(module) is not None


def _compressed_by(module: nn.Module) -> str:
    """``"stage 'lowrank'"`` for a module a stage swapped in (its extra state), else its class."""
    state = _stage_state(module)
    return f"stage {state[EXTRA_STATE_KEY]!r}" if state is not None else type(module).__name__


def _nothing_selected(stage: Stage, filter_fn: FilterFn | None, compressed: dict[str, str]) -> str:
    """The message of the ``ValueError`` when no layer is selected: what the stage would select,
    and which layers were skipped because a stage had already compressed them."""
    kinds = stage.supported_kinds()
    if filter_fn is None and stage.default_kinds:
        what = f"without filter_fn it selects {stage.default_kinds}; supported with filter_fn: {kinds}"
    elif filter_fn is None:
        what = f"supported: {kinds}"
    else:
        what = f"filter_fn selected none; supported: {kinds}"
    msg = f"no layer selected for stage {stage.name!r} ({what})"
    if compressed:
        names = sorted(compressed)
        shown = ", ".join(f"{n or '(root)'!r} ({compressed[n]})" for n in names[:8])
        more = f" and {len(names) - 8} more" if len(names) > 8 else ""
        msg += (
            f". The model's layers {shown}{more} are already compressed, and a compressed layer is "
            f"never compressed again; to compress differently, start from the uncompressed model"
        )
    return msg


class _Counted:
    """Wraps ``evaluate`` and counts the calls."""

    def __init__(self, fn: Callable[[nn.Module], float]):
        self.fn = fn
        self.calls = 0

    def __call__(self, model: nn.Module) -> float:
        self.calls += 1
        with torch.no_grad():  # scoring never needs gradients
            return float(self.fn(model))


def compress_(
    model: nn.Module,
    config: Any,
    *,
    data: Iterable | None = None,
    filter_fn: FilterFn | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    train_step: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool | None = None,
    **kwargs: Any,
) -> Report:
    """Run the stage that ``config`` belongs to on ``model``, in place, and return a :class:`Report`.

    Args:
        model: the model; the selected layers are replaced by compressed modules.
        config: a registered stage config, e.g. :class:`adacomp.stages.LowRankConfig`.
        data: iterable of batches for ``train_step`` (fine-tuning); re-iterated as needed.
        filter_fn: ``filter_fn(module, name) -> bool`` over the modules that own parameters;
            default: the layers the stage selects by default (:meth:`Stage.selects_by_default`;
            every layer it supports, except where its documentation says otherwise, e.g. DirNet
            leaves ``nn.Linear`` to ``filter_fn``). Selecting an unsupported layer raises
            :class:`UnsupportedLayerError`.
        evaluate: ``evaluate(model) -> float``, higher is better; called (under
            ``torch.no_grad()``) before and after, for the report, and by stages that score
            candidates.
        train_step: ``train_step(model, batch) -> loss`` (not back-propagated; see the module doc).
        make_optimizer: ``make_optimizer(params) -> Optimizer`` overrides the stage's optimizer.
        log: progress messages go here (e.g. ``print``); default: silent.
        progress: ``tqdm`` progress bars on stderr while a stage works (training, DirNet's
            dictionaries): ``None`` (default) when stderr is a terminal, ``True`` also when it is
            not, ``False`` never.
        **kwargs: passed to the stage.

    Raises:
        ValueError: no layer is selected (the message says what the stage selects, and which
            layers are already compressed), or the model itself is the only layer; a stage's own
            errors (e.g. an unreachable budget).
        UnsupportedLayerError: ``filter_fn`` selected a layer the stage cannot compress.
    """
    stage = get_stage(config)
    layers, compressed = _select(model, stage, filter_fn)
    if "" in layers:
        raise ValueError(
            "the model itself is a single layer; wrap it, e.g. nn.Sequential(model), to compress it"
        )
    if not layers:
        raise ValueError(_nothing_selected(stage, filter_fn, compressed))
    start = time.perf_counter()
    was_training = model.training
    params_before, bytes_before = module_params(model), module_bytes(model)
    counted = _Counted(evaluate) if evaluate is not None else None
    metric_before = counted(model) if counted is not None else None
    if counted is not None:
        counted.calls = 0  # count only the stage's own calls
    info: dict = {}
    records = stage.apply(
        model,
        config,
        layers=layers,
        data=data,
        evaluate=counted,
        train_step=train_step,
        make_optimizer=make_optimizer,
        log=log,
        info=info,
        progress=progress,
        **kwargs,
    )
    model.train(was_training)
    evaluations = counted.calls if counted is not None else 0
    metric_after = counted(model) if counted is not None else None
    return Report(
        stage=stage.name,
        config=dataclasses.asdict(config),
        layers=records,
        params_before=params_before,
        params_after=module_params(model),
        bytes_before=bytes_before,
        bytes_after=module_bytes(model),
        metric_before=metric_before,
        metric_after=metric_after,
        evaluations=evaluations,
        seconds=time.perf_counter() - start,
        info=info,
        defaults=_defaults(type(config)),
    )


def _defaults(cls: type) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


# --------------------------------------------------------------------------- save / load


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """``torch.save(model.state_dict(), path)``: all :func:`load` needs (see the module doc)."""
    torch.save(model.state_dict(), path)


def _extra_states(state_dict: Mapping[str, Any]) -> list[tuple[str, dict]]:
    suffix = "_extra_state"
    found = []
    for key, value in state_dict.items():
        if (
            (key == suffix or key.endswith("." + suffix))
            and isinstance(value, dict)
            and EXTRA_STATE_KEY in value
        ):
            found.append((key[: -len(suffix)].rstrip("."), value))
    found.sort(key=lambda kv: (kv[0].count(".") if kv[0] else -1, kv[0]))
    return found


def load(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    strict: bool = True,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Load a compressed checkpoint into ``model`` as built *before* compression; return the model.

    ``source`` is a path written by ``torch.save(model.state_dict(), path)`` (or :func:`save`) or a
    state dict. Each module whose entry ``<name>._extra_state`` names a stage is swapped for the
    compressed module that stage rebuilds, then the state dict is loaded (``strict`` as in
    ``load_state_dict``). A plain, uncompressed state dict loads as usual.
    """
    if isinstance(source, Mapping):
        state_dict = source
    else:
        state_dict = torch.load(source, map_location=map_location, weights_only=True)
    for name, extra in _extra_states(state_dict):
        if not name:
            raise ValueError(
                "a compressed root module cannot be rebuilt in place; wrap the model in a container"
            )
        stage = get_stage(str(extra[EXTRA_STATE_KEY]))
        try:
            original = model.get_submodule(name)
        except AttributeError as exc:
            raise KeyError(f"checkpoint has compressed layer {name!r}, which the given model lacks") from exc
        model.set_submodule(name, stage.rebuild(original, extra))
    model.load_state_dict(state_dict, strict=strict)
    return model

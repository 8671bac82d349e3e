"""A stage is a typed object declared once: a frozen dataclass in its service's module whose fields
are its parameters, whose `requires()` returns the upstream stage objects (daisy's
`upstream_tasks`) and whose `make_tasks()` makes its tasks. A class attribute names the service
whose queue runs it.

Everything else is derived from these declarations, so adding a stage is one class (and, for a
new command or pipeline section, one registration beside it):
- the fingerprint that decides whether a recorded completion still stands (from the fields:
  a parameter cannot be left out of it);
- the dependency order the runner follows (`stage_graph`), including requirements the caller did
  not list;
- the list of services, their queues, and the deployment lists (`services()`,
  `exaconnect services`);
- the CLI's `NOUN run|enqueue` verbs (`StageCommand`) and the pipeline file's sections
  (`PipelineSection`).

A lab adds its own stages from its own module, registered either as a Python entry point in the
group `exaconnect.stages` or by naming the module in `EXACONNECT_PLUGINS` (comma-separated);
`load_stage_modules()` imports those beside ours.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping, Sequence

from exaconnect.errors import InputError

if TYPE_CHECKING:
    from exaconnect.precomputed.empty_outputs import TakenBack

# The order in which `services()` lists ours (the pipeline's order); a lab's follow, by name.
SERVICE_ORDER = ("montage", "ingest", "downsample", "align", "segment", "mesh", "skeleton", "evaluate", "train")

PLUGINS_VARIABLE = "EXACONNECT_PLUGINS"
ENTRY_POINT_GROUP = "exaconnect.stages"

STAGE_TYPES: dict[str, type["Stage"]] = {}


def _valid_name(name: str) -> bool:
    return bool(name) and not any(c in name for c in "/\\ ")


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One batch of tasks on one service's queue (subclass it; see the module docstring).

    `make_tasks` is called only once every stage in `requires()` is complete (task creation often
    reads what those stages wrote). `reads()` and `writes()` name layers or store files, for the
    run's record and for people; `lease_seconds` should exceed the longest task.
    """

    service: ClassVar[str] = ""
    stage_name: ClassVar[str] = ""
    lease_seconds: ClassVar[int] = 600
    description: ClassVar[str] = ""

    # The instance's name in a run; empty: the class's `stage_name` (two instances of one class in
    # one run, such as the image's and the labels' ingest, pass their own).
    name: str = ""
    # This instance's lease, where it differs from the class's (e.g. a user's --lease-seconds).
    lease: int | None = dataclasses.field(default=None, metadata={"fingerprint": False})
    # Stages that must be complete before this one starts (what produced its inputs); a stage
    # with requirements of its own making (the previous step of a chain) overrides `requires()`.
    upstream: tuple["Stage", ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.service:
            if not _valid_name(cls.service):
                raise InputError(f"stage class {cls.__qualname__}: service {cls.service!r}; expected a name "
                                 "without '/', '\\' or spaces")
            key = cls.stage_name or f"{cls.service}.{cls.__name__.lower()}"
            STAGE_TYPES[f"{cls.__module__}.{cls.__qualname__}"] = cls
            if not cls.stage_name:
                cls.stage_name = key

    def __post_init__(self) -> None:
        if not type(self).service:
            raise InputError(f"stage class {type(self).__qualname__} names no service")
        if not self.name:
            object.__setattr__(self, "name", type(self).stage_name)
        if self.lease is not None:
            object.__setattr__(self, "lease_seconds", int(self.lease))
        if not _valid_name(self.name):
            raise InputError(f"stage name {self.name!r}: expected a non-empty name without '/', '\\' or spaces")
        _normalise_layer_fields(self)

    # ---- what a subclass provides
    def requires(self) -> tuple["Stage", ...]:
        return tuple(self.upstream)

    def make_tasks(self) -> Iterable[Any]:
        raise NotImplementedError(f"{type(self).__qualname__}.make_tasks")

    def reads(self) -> tuple[str, ...]:
        return ()

    def writes(self) -> tuple[str, ...]:
        return ()

    def after_failure(self) -> TakenBack | None:
        """Called by the runner when the stage failed (tasks dead-lettered or lost): take back
        what would read as data but holds none (a mip in the info with no chunk written, a layer
        with no chunk at all), returning what was taken so a requeue can put it back."""
        return None

    # ---- derived
    def parameters(self) -> dict[str, Any]:
        """Every field except the name: what changes the stage's result. An upstream stage held as a
        field counts by its name (its own parameters reach the fingerprint through `requires()`)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name != "name" and f.metadata.get("fingerprint", True)}


@dataclass(frozen=True, kw_only=True)
class ChainedStep(Stage):
    """One step of a fixed chain (a refinement pass, an alignment): `steps` names them in order,
    each step requires the one before it (`previous`), the first requires `upstream`. A subclass
    sets `steps`, `step_kind` (for errors) and `step_names` (its stages' names, `{step}` filled
    in); `chain()` makes the whole chain."""

    steps: ClassVar[tuple[str, ...]] = ()
    step_kind: ClassVar[str] = "step"
    step_names: ClassVar[str] = "{step}"
    step: str = ""  # empty: the first of `steps`
    previous: Stage | None = None

    def __post_init__(self) -> None:
        if not self.step:
            object.__setattr__(self, "step", type(self).steps[0])
        if self.step not in type(self).steps:
            raise InputError(f"{type(self).step_kind} step {self.step!r}: expected one of {type(self).steps}")
        if not self.name:
            object.__setattr__(self, "name", type(self).step_names.format(step=self.step))
        super().__post_init__()

    def requires(self) -> tuple[Stage, ...]:
        return (self.previous,) if self.previous is not None else self.upstream

    @classmethod
    def chain(cls, upstream: tuple[Stage, ...] = (), steps: Iterable[str] | None = None,
              name: Callable[[str], str] | None = None, **fields: Any) -> list:
        """The steps (all, or those named in `steps`, in chain order), each requiring the one
        before it; `name(step)`, if given, names them instead of `step_names`."""
        wanted = set(cls.steps if steps is None else steps)
        stages: list = []
        previous: Stage | None = None
        for step in cls.steps:
            if step not in wanted:
                continue
            named = {"name": name(step)} if name is not None else {}
            previous = cls(step=step, previous=previous, upstream=upstream if previous is None else (), **named,
                           **fields)
            stages.append(previous)
        return stages


def _normalise_layer_fields(stage: "Stage") -> None:
    """Every field declared `LayerUrl` (or `LayerUrl | None`) holds the layer's one name from
    construction on, however the stage was made (CLI, pipeline file, a lab's code): the services
    and tasks below use it as it is."""
    from exaconnect.precomputed.layers import layer_url

    for f in dataclasses.fields(stage):
        if "LayerUrl" in str(f.type):
            value = getattr(stage, f.name)
            if value is not None and value != "":
                object.__setattr__(stage, f.name, layer_url(value))


def _plain(value: Any) -> Any:
    if isinstance(value, Stage):
        return {"stage": value.name}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "as_dict"):
        return _plain(value.as_dict())
    if hasattr(value, "to_list"):
        return value.to_list()
    return value


def not_fingerprinted(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A field that does not change the stage's result (a progress switch, a cache folder)."""
    return dataclasses.field(default=default, metadata={"fingerprint": False}, **kwargs)


def fingerprint(stage: Stage, required: Sequence[str] = ()) -> str:
    """SHA-256 of the stage's class, parameters and its requirements' fingerprints: a change anywhere
    upstream makes every stage below it run again."""
    text = json.dumps({"name": stage.name, "stage": type(stage).stage_name, "service": stage.service,
                       "parameters": stage.parameters(), "writes": list(stage.writes()), "requires": list(required)},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def stage_graph(stages: Sequence[Stage]) -> list[Stage]:
    """The given stages and everything they require, in an order that respects `requires()`
    (stable otherwise). Two different stages of one name, or a cycle, is an InputError."""
    by_name: dict[str, Stage] = {}
    order: list[Stage] = []
    visiting: set[str] = set()

    def visit(stage: Stage, path: tuple[str, ...]) -> None:
        known = by_name.get(stage.name)
        if known is not None:
            if known != stage:
                raise InputError(f"stage {stage.name!r} is declared twice, with different parameters")
            return
        if stage.name in visiting:
            raise InputError(f"stages {list(path) + [stage.name]} require each other (a cycle)")
        visiting.add(stage.name)
        for need in stage.requires():
            if not isinstance(need, Stage):
                raise InputError(f"stage {stage.name!r} requires {need!r}; expected a stage object")
            visit(need, path + (stage.name,))
        visiting.discard(stage.name)
        by_name[stage.name] = stage
        order.append(stage)

    for stage in stages:
        visit(stage, ())
    return order


# ---------------------------------------------------------------- the registry

def load_stage_modules(extra: Sequence[str] = ()) -> None:
    """Import every module that declares stages: ours (every module of exaconnect.services), a
    lab's entry points, the modules named in EXACONNECT_PLUGINS, and `extra`."""
    from exaconnect import services as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    for name in plugin_modules() + [m for m in extra if m]:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise InputError(f"stage module {name!r} ({PLUGINS_VARIABLE} or an entry point): cannot import it "
                             f"({exc})") from None


def plugin_modules() -> list[str]:
    """A lab's stage modules: entry points of the group `exaconnect.stages`, then EXACONNECT_PLUGINS."""
    from importlib.metadata import entry_points

    names = [ep.value.split(":")[0] for ep in entry_points(group=ENTRY_POINT_GROUP)]
    names += [m.strip() for m in os.environ.get(PLUGINS_VARIABLE, "").split(",") if m.strip()]
    return list(dict.fromkeys(names))


def services() -> list[str]:
    """Every service a deployment runs workers for: those the registered stages declare (ours,
    then a lab's)."""
    load_stage_modules()
    declared = {cls.service for cls in STAGE_TYPES.values()}
    rank = {name: i for i, name in enumerate(SERVICE_ORDER)}
    return sorted(declared, key=lambda name: (rank.get(name, len(rank)), name))


# ---------------------------------------------------------------- commands and pipeline sections

@dataclass(frozen=True)
class StageCommand:
    """`exaconnect NOUN run|enqueue ...` for a family of stages: `add_arguments(parser)` declares the
    verb's own arguments (argparse), `make_stages(args)` returns the stages in order. `run` drains
    them all (here, or through --queue ROOT); `enqueue --stage X` puts one stage's tasks on its
    queue."""

    noun: str
    help: str
    add_arguments: Callable[[Any], None]
    make_stages: Callable[[Any], list[Stage]]
    # The stage names `enqueue --stage` takes, with the noun's prefix left off (e.g. forge, merge).
    stage_choices: tuple[str, ...] = ()


COMMANDS: dict[str, StageCommand] = {}


def register_command(command: StageCommand) -> StageCommand:
    COMMANDS[command.noun] = command
    return command


@dataclass(frozen=True)
class PipelineSection:
    """A section of the pipeline file: `config` is a frozen dataclass loaded strictly from it (an
    `enabled` field switches it on or off), `plan(config, context)` adds its stages to the run.
    Sections plan in the order of `order` (ours: source 10, misalign 20, align 30, pyramid 40,
    segment 50, mesh 60, skeletons 70, evaluate 80); a lab's section picks a number between."""

    key: str
    config: type
    plan: Callable[[Any, Any], None]
    order: float = 100.0


SECTIONS: dict[str, PipelineSection] = {}


def register_section(section: PipelineSection) -> PipelineSection:
    SECTIONS[section.key] = section
    return section


def plugin_sections() -> dict[str, PipelineSection]:
    load_stage_modules()
    return dict(SECTIONS)


@dataclass
class PlanContext:
    """What the sections of a pipeline have planned so far: the output location, the layers by role
    ("image", "groundtruth", "segmentation", ...) and the stage that produces each, and every
    stage so far. A section reads the roles it needs and publishes the ones it makes."""

    output: str
    stages: list[Stage] = dataclasses.field(default_factory=list)
    layers: dict[str, str] = dataclasses.field(default_factory=dict)
    producers: dict[str, Stage | None] = dataclasses.field(default_factory=dict)
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

    def layer(self, name: str) -> str:
        """A new layer in the run's output folder."""
        return f"{self.output}/{name}"

    def add(self, *stages: Stage) -> None:
        self.stages.extend(stages)

    def publish(self, role: str, layer: str, producer: Stage | None) -> None:
        self.layers[role] = layer
        self.producers[role] = producer

    def requires(self, *roles: str) -> tuple[Stage, ...]:
        """The stages producing these roles (layers that already existed need none)."""
        return tuple(p for r in roles if (p := self.producers.get(r)) is not None)


# ---------------------------------------------------------------- arguments shared by stage commands

def at_least(minimum: float, kind: type = int):
    """argparse `type=` for a number no smaller than `minimum` (`--dust-threshold -5` was taken)."""
    import argparse

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {'a whole number' if kind is int else 'a number'}") from None
        if not value >= minimum:  # also refuses NaN
            raise argparse.ArgumentTypeError(f"{text!r}: expected a number >= {minimum:g}")
        return value

    parse.__name__ = f"{kind.__name__} >= {minimum:g}"
    return parse


def layer_argument(text: str) -> str:
    """argparse `type=` for a layer: a path or URL normalised once, here at the edge, to the one
    name every service and task receives (`file:///abs/path`, `gs://...`)."""
    import argparse

    from exaconnect.precomputed.layers import layer_url

    try:
        return layer_url(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_allow_missing_argument(parser: Any) -> None:
    parser.add_argument("--allow-missing", action="store_true",
                        help="read missing input chunks as zeros instead of refusing to start (a layer with holes)")


def records_location(queue_root: str, fallback: str | None = None) -> str:
    """Where the stage records of every run on `queue_root` live, whichever command started it
    (`exaconnect run`, `segment run --queue ROOT`, ...): ROOT/records, so one command's finished
    stages are found by the next. An SQS queue root holds no files: then `fallback`."""
    root = str(queue_root)
    if root.startswith("fq://") or "://" not in root:
        return os.path.join(os.path.abspath(root[len("fq://"):] if root.startswith("fq://") else root), "records")
    if fallback:
        return fallback
    raise InputError(f"queue root {root}: an SQS queue root keeps no files, and this command has no output folder "
                     "for its stage records; use a shared folder as the queue root")

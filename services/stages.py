"""A stage described as data: what it is called, which service's queue runs it, how its tasks
are made, what it reads and writes, and which stages must be complete before it starts.

Every service declares its stages this way (`ingest_stages`, `segment_stages`, `align_stages`,
...); `services/runner.py` runs any list of them, locally or through remote workers, and the
pipeline file (`exaconnect run`) is nothing but a list of stages. This is daisy's idea of
dependencies as data (`requires()`) rather than shell loops.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from exaconnect.errors import InputError

# The queues of a pipeline, one per service, live under one queue root: ROOT/<service>.
SERVICES = ("ingest", "downsample", "align", "segment", "mesh", "skeletonize", "train", "evaluate")


@dataclass(frozen=True)
class Stage:
    """One batch of tasks on one service's queue.

    `make_tasks` is called only once every stage in `requires` is complete (task creation often
    reads what those stages wrote). `parameters` are everything that changes the stage's result;
    their fingerprint, together with its requirements' fingerprints, decides whether a recorded
    completion still stands. `reads` and `writes` name layers or store files, for the run's
    record and for people; `lease_seconds` should exceed the longest task.
    """

    name: str
    service: str
    make_tasks: Callable[[], Iterable[Any]] = field(compare=False, repr=False)
    requires: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    parameters: Mapping[str, Any] = field(default_factory=dict, compare=False)
    lease_seconds: int = 600
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\ "):
            raise InputError(f"stage name {self.name!r}: expected a non-empty name without '/', '\\' or spaces")
        if self.service not in SERVICES:
            raise InputError(f"stage {self.name}: service {self.service!r}; expected one of {SERVICES}")


def fingerprint(stage: Stage, required: Sequence[str] = ()) -> str:
    """SHA-256 of the stage's parameters and its requirements' fingerprints: a change anywhere
    upstream makes every stage below it run again."""
    text = json.dumps({"name": stage.name, "service": stage.service, "parameters": stage.parameters,
                       "writes": list(stage.writes), "requires": list(required)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def order_stages(stages: Sequence[Stage]) -> list[Stage]:
    """The stages in an order that respects `requires` (stable for independent ones); a
    duplicate name, an unknown requirement or a cycle is an InputError naming the stage."""
    by_name: dict[str, Stage] = {}
    for stage in stages:
        if stage.name in by_name:
            raise InputError(f"stage {stage.name!r} is declared twice")
        by_name[stage.name] = stage
    for stage in stages:
        for need in stage.requires:
            if need not in by_name:
                raise InputError(f"stage {stage.name!r} requires {need!r}, which is not part of this run; "
                                 f"stages: {sorted(by_name)}")
    ordered: list[Stage] = []
    placed: set[str] = set()
    pending = list(stages)
    while pending:
        ready = [s for s in pending if set(s.requires) <= placed]
        if not ready:
            raise InputError(f"stages {[s.name for s in pending]} require each other (a cycle)")
        for stage in ready:
            ordered.append(stage)
            placed.add(stage.name)
        pending = [s for s in pending if s.name not in placed]
    return ordered

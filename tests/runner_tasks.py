"""Task classes for the runner tests (run in-process, so defining them registers them)."""

from taskqueue import RegisteredTask


class AppendLineTask(RegisteredTask):
    """Appends `line` to the file `path`: a record of every execution."""

    def __init__(self, path: str, line: str):
        super().__init__(path, line)

    def execute(self):
        with open(self.path, "a") as f:
            f.write(self.line + "\n")


class RaiseTask(RegisteredTask):
    def __init__(self, message: str):
        super().__init__(message)

    def execute(self):
        raise RuntimeError(self.message)


# ---- stages for the runner tests: a list of tasks on a chosen service's queue

from dataclasses import dataclass  # noqa: E402
from typing import Any, Callable, ClassVar  # noqa: E402

from exaconnect.services.stages import Stage, not_fingerprinted  # noqa: E402


@dataclass(frozen=True)
class TaskListStage(Stage):
    """`make()`'s tasks as one stage; `settings` stand for parameters (a change reruns it)."""

    service: ClassVar[str] = "ingest"
    stage_name: ClassVar[str] = "tasks"
    make: Callable[[], list] = not_fingerprinted(None, compare=False)
    after: tuple[Stage, ...] = ()
    settings: tuple = ()

    def requires(self):
        return self.after

    def make_tasks(self):
        return list(self.make())


_BY_SERVICE: dict[str, type] = {}


def task_stage(name: str, service: str = "ingest", make: Callable[[], list] = list, after: tuple = (),
               **settings: Any) -> Stage:
    cls = _BY_SERVICE.get(service)
    if cls is None:
        cls = _BY_SERVICE[service] = type(f"TaskListStage_{service}", (TaskListStage,), {"service": service})
    return cls(name=name, make=make, after=tuple(after), settings=tuple(sorted(settings.items())))


def lines_stage(name: str, log, lines=("x",), after: tuple = (), **settings: Any) -> Stage:
    return task_stage(name, "ingest", lambda: [AppendLineTask(str(log), f"{name}:{line}") for line in lines], after,
                      lines=list(lines), **settings)

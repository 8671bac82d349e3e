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

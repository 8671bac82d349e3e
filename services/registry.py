"""Importing this module registers every exaconnect task class with python-task-queue,
so a worker can turn any payload on any of our queues back into a task."""

from exaconnect.services import ingest  # noqa: F401
from exaconnect.services import segment  # noqa: F401
from exaconnect.services import stitch  # noqa: F401
from exaconnect.services import train  # noqa: F401
from exaconnect.services import align  # noqa: F401

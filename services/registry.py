"""Importing this module registers every exaconnect task class with python-task-queue,
so a worker can turn any payload on any of our queues back into a task."""

from exaconnect.services import ingest  # noqa: F401
from exaconnect.services import segment  # noqa: F401
from exaconnect.services import stitch  # noqa: F401
from exaconnect.services import train  # noqa: F401
from exaconnect.services import align  # noqa: F401
from exaconnect.services import evaluate  # noqa: F401
from exaconnect.services import perturb  # noqa: F401

# Every chunk a worker's tasks decode, igneous's included, is checked before a C decoder sees it
# (a damaged chunk fails its task by name instead of decoding to wrong labels or a segfault).
from exaconnect.precomputed.chunks import install_chunk_guard  # noqa: E402

install_chunk_guard()

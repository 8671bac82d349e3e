"""Importing this module registers every exaconnect task class with python-task-queue,
so a worker can turn any payload on any of our queues back into a task."""

# Every module of exaconnect.services (and a lab's stage modules: EXACONNECT_PLUGINS, entry points)
# is imported: a task class is registered by defining it, so there is no list to keep here.
from exaconnect.services.stages import load_stage_modules  # noqa: E402

load_stage_modules()

# Every chunk a worker's tasks decode, igneous's included, is checked before a C decoder sees it
# (a damaged chunk fails its task by name instead of decoding to wrong labels or a segfault).
from exaconnect.precomputed.chunks import install_chunk_guard  # noqa: E402

install_chunk_guard()

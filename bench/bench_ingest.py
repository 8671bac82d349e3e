"""Ingest throughput (MB/s) of the FIB-25 PNG stack and its ground truth: in one process, and
through an fq:// queue drained by two worker processes.

    .venv/bin/python bench/bench_ingest.py
"""

import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, require_fib25, timed  # noqa: E402

from exaconnect.services.ingest import IngestOptions, ingest_now  # noqa: E402


def main() -> None:
    fib = require_fib25()
    image_mb = 250 ** 3 / 1e6
    labels_mb = 250 ** 3 * 4 / 1e6  # uint32 layer
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t_image, _ = timed(ingest_now, str(fib / "grayscale_maps"), str(tmp / "image"),
                           IngestOptions("image", (10, 10, 10)), progress=False)
        t_labels, _ = timed(ingest_now, f"{fib}/groundtruth.h5:stack", str(tmp / "labels"),
                            IngestOptions("segmentation", (10, 10, 10)), progress=False)
        # Through the runner: enqueue one task per slab on a file queue, drain with 2 processes.
        t_queue, _ = timed(subprocess.run, [sys.executable, "-m", "exaconnect.cli", "ingest", "run", str(fib / "grayscale_maps"),
                                            str(tmp / "image-q"), "--resolution", "10,10,10", "--queue", str(tmp / "queue"),
                                            "--workers", "2"], check=True, capture_output=True)
    emit("ingest_fib25",
         image_mb_per_s=round(image_mb / t_image, 2), image_seconds=round(t_image, 2),
         labels_mb_per_s=round(labels_mb / t_labels, 2), labels_seconds=round(t_labels, 2),
         image_queue_2_workers_mb_per_s=round(image_mb / t_queue, 2), image_queue_seconds_incl_worker_start=round(t_queue, 2))


if __name__ == "__main__":
    main()

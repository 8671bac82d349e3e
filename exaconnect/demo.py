"""`make demo`: the whole pipeline on the built-in synthetic sample (or a real volume), through
the same queues and workers a cluster run uses, ending with a neuroglancer link."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from exaconnect.precomputed.bbox import Triple

log = logging.getLogger("exaconnect.demo")


@dataclass(frozen=True)
class DemoOptions:
    data_dir: str = "data/demo"
    queue_dir: str = "queues/demo"
    workers: int = 2
    seed: int = 0
    source: str | None = None
    groundtruth: str | None = None
    resolution: tuple[float, float, float] = (10.0, 10.0, 10.0)
    shape: Triple = (96, 96, 96)
    # FFN segmentation through the segment service: "none", "train" (the small demo FFN,
    # trained on other synthetic seeds and cached under data_dir), or a checkpoint path.
    ffn: str = "none"


def _stage(name: str, queue: str, tasks, workers: int, layers: list[str] | None = None) -> float:
    """Enqueue a batch, drain it with local worker processes, fail loudly on dead-lettered tasks;
    then log a link to the stage's output layers and record it in their provenance."""
    from exaconnect.errors import ExaconnectError
    from exaconnect.services.queue import enqueue, open_queue, queue_status
    from exaconnect.services.worker import WorkerOptions, run_workers

    started = time.time()
    open_queue(queue).purge()
    shutil.rmtree(Path(queue) / "dead-letter", ignore_errors=True)
    shutil.rmtree(Path(queue) / "failures", ignore_errors=True)
    count = enqueue(queue, tasks, description=name)
    run_workers(queue, WorkerOptions(lease_seconds=300, exit_when_empty=True, idle_poll_seconds=0.5),
                processes=min(workers, max(count, 1)))
    status = queue_status(queue)
    if status.failed or status.enqueued:
        raise ExaconnectError(f"demo stage {name}: {status.failed} tasks failed, {status.enqueued} left on {queue}")
    elapsed = time.time() - started
    print(f"[demo] {name}: {count} tasks in {elapsed:.1f}s")
    if layers:
        _record_link(name, layers)
    return elapsed


def _record_link(stage: str, layers: list[str]) -> None:
    from exaconnect.precomputed.layers import Provenance, add_provenance, open_layer

    url = _link(layers)
    log.info("%s done: %s", stage, url)
    for layer in layers:
        add_provenance(open_layer(layer), Provenance("link", {"after_stage": stage, "url": url}, [layer]))


def run_demo(options: DemoOptions) -> int:
    import numpy as np

    from exaconnect.precomputed.layers import layer_url
    from exaconnect.precomputed.synthetic import SyntheticSpec, synthetic_volume
    from exaconnect.services.downsample import create_downsample_tasks
    from exaconnect.services.ingest import IngestOptions, create_ingest_tasks
    from exaconnect.services.mesh import create_mesh_forge_tasks, create_mesh_merge_tasks
    from exaconnect.services.skeletonize import create_skeleton_forge_tasks, create_skeleton_merge_tasks

    data = Path(options.data_dir).resolve()
    queues = Path(options.queue_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    if options.source:
        image_src, labels_src = options.source, options.groundtruth
    else:
        spec = SyntheticSpec(shape=tuple(reversed(options.shape)), seed=options.seed)  # type: ignore[arg-type]
        image, labels = synthetic_volume(spec)
        image_src, labels_src = str(data / "sample_image.npy"), str(data / "sample_labels.npy")
        np.save(image_src, image)
        np.save(labels_src, labels)
        print(f"[demo] synthetic sample seed {options.seed}: {options.shape} voxels, {labels.max()} objects")

    image_layer = layer_url(str(data / "image"))
    labels_layer = layer_url(str(data / "groundtruth")) if labels_src else None
    chunk = (64, 64, 64)
    timings = {}
    tasks = create_ingest_tasks(image_src, image_layer, IngestOptions("image", options.resolution, chunk_size=chunk, overwrite=True))
    if labels_src:
        tasks += create_ingest_tasks(labels_src, labels_layer, IngestOptions("segmentation", options.resolution, chunk_size=chunk, overwrite=True))
    ingested = [image_layer] + ([labels_layer] if labels_layer else [])
    timings["ingest"] = _stage("ingest", str(queues / "ingest"), tasks, options.workers, ingested)

    tasks = list(create_downsample_tasks(image_layer, num_mips=2))
    if labels_layer:
        tasks += list(create_downsample_tasks(labels_layer, num_mips=2))
    timings["downsample"] = _stage("downsample", str(queues / "downsample"), tasks, options.workers, ingested)

    segmentation_layer = labels_layer
    metrics = None
    if options.ffn != "none":
        segmentation_layer, timings["segment"], metrics = _segment(options, data, queues, image_layer, labels_src)
    if segmentation_layer:
        timings["mesh"] = _stage("mesh", str(queues / "mesh"), create_mesh_forge_tasks(segmentation_layer), options.workers)
        timings["mesh-merge"] = _stage("mesh-merge", str(queues / "mesh"), create_mesh_merge_tasks(segmentation_layer), options.workers, [segmentation_layer])
        timings["skeletonize"] = _stage("skeletonize", str(queues / "skeletonize"), create_skeleton_forge_tasks(segmentation_layer), options.workers)
        timings["skeleton-merge"] = _stage("skeleton-merge", str(queues / "skeletonize"), create_skeleton_merge_tasks(segmentation_layer), options.workers, [segmentation_layer])

    layers = [image_layer] + [layer for layer in (labels_layer, segmentation_layer) if layer]
    layers = list(dict.fromkeys(layers))
    summary = {"layers": layers, "seconds": timings, **({"ffn_metrics": metrics} if metrics else {})}
    (data / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    print("[demo] layers:", *layers, sep="\n  ")
    print("[demo] neuroglancer link (serve the local layers first: make view, or exaconnect view LAYER...):")
    print(_link(layers))
    return 0


def _segment(options: DemoOptions, data: Path, queues: Path, image_layer: str, labels_src: str | None):
    """FFN passes, stitching and downsampling through the segment service's queue stages."""
    from exaconnect.precomputed.layers import layer_url
    from exaconnect.services.segment_run import SegmentPlan, segment_volume
    from exaconnect.services.segment_staging import PassSpec

    if options.ffn == "train":
        from exaconnect.ffn.training.demo import train_demo_model

        model = str(train_demo_model(data / "ffn", seed=options.seed))
    else:
        model = options.ffn
    started = time.time()
    out = layer_url(str(data / "ffn_segmentation"))
    # 64^3 subvolumes (the chunk size) give the 96^3 sample 8 tasks and 7 stitched faces.
    plan = SegmentPlan(image_layer, out, (PassSpec("initial", model),), subvolume=(64, 64, 64), overlap=(16, 16, 16))
    run, times = segment_volume(plan, str(queues / "segment"), workers=options.workers)
    for stage, seconds in times.seconds.items():
        print(f"[demo] {stage}: {times.tasks[stage]} tasks in {seconds:.1f}s")
    metrics = None
    if labels_src:
        import numpy as np

        from exaconnect.precomputed.evaluate import segmentation_metrics
        from exaconnect.precomputed.layers import layer_bounds, open_layer, read_box

        vol = open_layer(out)
        labels = np.load(labels_src) if labels_src.endswith(".npy") else None
        if labels is not None:
            metrics = segmentation_metrics(read_box(vol, layer_bounds(vol)), labels)
            print(f"[demo] FFN vs ground truth: VI split {metrics['vi_split']:.3f}, merge {metrics['vi_merge']:.3f}, "
                  f"adapted Rand error {metrics['adapted_rand_error']:.3f}")
    return run.segmentation_layer, time.time() - started, metrics


def _link(layers: list[str]) -> str:
    """A shareable link through exaconnect.viewer (which serves local layers itself)."""
    from exaconnect.viewer import links

    return links.link(layers)

"""The `exaconnect` command: one subcommand per verb, each a thin layer over library functions.

Errors from our own checks (ExaconnectError) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Callable, Sequence

from exaconnect.errors import ExaconnectError
from exaconnect.precomputed.bbox import Box, parse_triple


def _resolution(text: str) -> tuple[float, float, float]:
    parts = text.split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ExaconnectError(f"--resolution {text!r}: expected three numbers X,Y,Z in nm") from None
    if len(values) != 3 or min(values) <= 0:
        raise ExaconnectError(f"--resolution {text!r}: expected three positive numbers X,Y,Z in nm")
    return values  # type: ignore[return-value]


def _bbox(args: argparse.Namespace) -> Box | None:
    return Box.parse(args.bbox) if getattr(args, "bbox", None) else None


# ---------------------------------------------------------------- ingest

def cmd_ingest(args: argparse.Namespace) -> int:
    from exaconnect.services.ingest import IngestOptions, create_ingest_tasks, ingest_now
    from exaconnect.services.queue import enqueue

    options = IngestOptions(
        layer_type=args.type,
        resolution=_resolution(args.resolution),
        voxel_offset=parse_triple(args.voxel_offset, "--voxel-offset", positive=False),
        chunk_size=parse_triple(args.chunk_size, "--chunk-size"),
        encoding=args.encoding,
        overwrite=args.overwrite,
    )
    if args.queue:
        tasks = create_ingest_tasks(args.src, args.dest, options)
        count = enqueue(args.queue, tasks, description="ingest")
        print(f"enqueued {count} ingest tasks on {args.queue}")
    else:
        ingest_now(args.src, args.dest, options)
    return 0


# ---------------------------------------------------------------- enqueue

def cmd_enqueue(args: argparse.Namespace) -> int:
    from exaconnect.services.queue import enqueue

    tasks = ENQUEUE_STAGES[args.stage][1](args)
    count = enqueue(args.queue, tasks, description=args.stage)
    print(f"enqueued {count} {args.stage} tasks on {args.queue}")
    return 0


def _downsample_tasks(args):
    from exaconnect.services.downsample import create_downsample_tasks

    return create_downsample_tasks(args.layer, num_mips=args.num_mips, mip=args.mip, bbox=_bbox(args),
                                   factor=parse_triple(args.factor, "--factor"))


def _mesh_tasks(args):
    from exaconnect.services.mesh import create_mesh_forge_tasks

    return create_mesh_forge_tasks(args.layer, mip=args.mip, shape=parse_triple(args.shape, "--shape"))


def _mesh_merge_tasks(args):
    from exaconnect.services.mesh import create_mesh_merge_tasks

    return create_mesh_merge_tasks(args.layer, magnitude=args.magnitude)


def _skeleton_tasks(args):
    from exaconnect.services.skeletonize import create_skeleton_forge_tasks

    return create_skeleton_forge_tasks(args.layer, mip=args.mip, shape=parse_triple(args.shape, "--shape"))


def _skeleton_merge_tasks(args):
    from exaconnect.services.skeletonize import create_skeleton_merge_tasks

    return create_skeleton_merge_tasks(args.layer, magnitude=args.magnitude)


def _segment_tasks(args):
    from exaconnect.services.segment_cli import stage_tasks

    return stage_tasks(args)


def _align_tasks(args):
    from exaconnect.services.align_cli import enqueue_tasks

    return enqueue_tasks(args)


ENQUEUE_STAGES: dict[str, tuple[str, Callable]] = {
    "align": ("elastic alignment SRC -> DEST, one stage per call (--stage flow|mesh|compose|render)", _align_tasks),
    "downsample": ("image pyramid (mean for images, mode for labels)", _downsample_tasks),
    "mesh": ("mesh fragments per task box (forge)", _mesh_tasks),
    "mesh-merge": ("mesh manifests (merge; after mesh)", _mesh_merge_tasks),
    "skeletonize": ("kimimaro skeleton fragments (forge)", _skeleton_tasks),
    "skeleton-merge": ("join skeleton fragments (merge; after skeletonize)", _skeleton_merge_tasks),
    "segment": ("FFN pass per overlapping subvolume (IMAGE_LAYER OUT_LAYER --model)", _segment_tasks),
    "segment-faces": ("match objects across subvolume faces (after segment)", _segment_tasks),
    "segment-equivalence": ("global ID equivalence, one task (after segment-faces)", _segment_tasks),
    "segment-relabel": ("stitched labels into OUT_LAYER (after segment-equivalence)", _segment_tasks),
}


# ---------------------------------------------------------------- worker / status

def cmd_worker(args: argparse.Namespace) -> int:
    from exaconnect.services.worker import WorkerOptions, run_workers

    options = WorkerOptions(lease_seconds=args.lease_seconds, exit_when_empty=args.exit_when_empty,
                            max_attempts=args.max_attempts, ledger_dir=args.ledger_dir,
                            task_modules=tuple(args.task_module))
    return run_workers(args.queue, options, processes=args.processes)


def cmd_status(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from exaconnect.services.queue import queue_status

    status = queue_status(args.queue, args.ledger_dir)
    if not args.watch:
        print(json.dumps(status.as_dict()))
        return 1 if status.failed else 0
    total = max(status.inserted, 1)
    with tqdm(total=total, desc=f"{args.queue}", unit="task") as bar:
        while True:
            status = queue_status(args.queue, args.ledger_dir)
            bar.total = max(status.inserted, 1)
            bar.n = status.completed + status.failed
            bar.set_postfix(enqueued=status.enqueued, leased=status.leased, failed=status.failed)
            bar.refresh()
            if status.enqueued == 0:
                break
            time.sleep(args.interval)
    print(json.dumps(status.as_dict()))
    return 1 if status.failed else 0


# ---------------------------------------------------------------- evaluate / sample / demo

def cmd_evaluate(args: argparse.Namespace) -> int:
    from exaconnect.precomputed.evaluate_report import evaluate

    metrics = evaluate(args.segmentation, args.groundtruth, _bbox(args), args.out, args.ignore_segmentation_zero)
    print(json.dumps(metrics))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from exaconnect.precomputed.synthetic import SyntheticSpec, synthetic_volume

    spec = SyntheticSpec(shape=tuple(reversed(parse_triple(args.shape, "--shape"))), seed=args.seed)  # type: ignore[arg-type]
    image, labels = synthetic_volume(spec)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "image.npy", image)
    np.save(out / "labels.npy", labels)
    print(f"wrote {out / 'image.npy'} and {out / 'labels.npy'} ({image.shape[2]}x{image.shape[1]}x{image.shape[0]} voxels, {labels.max()} objects)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from exaconnect.demo import DemoOptions, run_demo

    return run_demo(DemoOptions(data_dir=args.data_dir, queue_dir=args.queue_dir, workers=args.workers,
                                seed=args.seed, source=args.source, groundtruth=args.groundtruth,
                                resolution=_resolution(args.resolution), shape=parse_triple(args.shape, "--shape"),
                                ffn=args.ffn))


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    from exaconnect import __version__

    parser = argparse.ArgumentParser(prog="exaconnect", description="Connectomics pipeline: EM sections in, neurons out.")
    parser.add_argument("--version", action="version", version=f"exaconnect {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="sections (folder of PNG/TIFF, multi-page TIFF, file.h5:dataset, .npy) -> precomputed layer")
    p.add_argument("src")
    p.add_argument("dest", help="layer path or URL (file://, gs://, s3://)")
    p.add_argument("--resolution", required=True, help="X,Y,Z voxel size in nm")
    p.add_argument("--type", choices=["image", "segmentation"], default="image")
    p.add_argument("--chunk-size", default="64,64,64", help="X,Y,Z chunk size (default 64,64,64)")
    p.add_argument("--voxel-offset", default="0,0,0", help="X,Y,Z of the first voxel")
    p.add_argument("--encoding", default=None, help="raw|jpeg for images, compressed_segmentation|compresso for labels")
    p.add_argument("--queue", default=None, help="enqueue one task per z-slab here instead of ingesting now")
    p.add_argument("--overwrite", action="store_true", help="replace an existing layer's info")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("enqueue", help="enqueue a batch of tasks for a stage")
    stages = p.add_subparsers(dest="stage", required=True)
    for name, (description, _) in ENQUEUE_STAGES.items():
        s = stages.add_parser(name, help=description)
        s.set_defaults(func=cmd_enqueue)
        if name == "align":
            from exaconnect.services.align_cli import add_enqueue_arguments

            add_enqueue_arguments(s)
            continue
        s.add_argument("layer")
        s.add_argument("--queue", required=True)
        s.add_argument("--mip", type=int, default=0)
        if name == "downsample":
            s.add_argument("--num-mips", type=int, default=2)
            s.add_argument("--factor", default="2,2,2")
            s.add_argument("--bbox", default=None, help="x0,y0,z0,x1,y1,z1 in mip-0 voxels")
        if name in ("mesh", "skeletonize"):
            s.add_argument("--shape", default="256,256,256", help="task box X,Y,Z")
        if name.endswith("merge"):
            s.add_argument("--magnitude", type=int, default=1, help="digits of object-id prefix per task")
        if name.startswith("segment"):
            from exaconnect.services.segment_cli import add_arguments

            add_arguments(s, name)
        s.set_defaults(func=cmd_enqueue)

    p = sub.add_parser("worker", help="lease, run and delete tasks from a queue")
    p.add_argument("queue", help="fq://PATH, a path, or an SQS URL")
    p.add_argument("--lease-seconds", type=int, default=600)
    p.add_argument("--exit-when-empty", action="store_true")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--max-attempts", type=int, default=3, help="failures before a task goes to the dead letter")
    p.add_argument("--ledger-dir", default=None, help="failure/dead-letter folder (default: inside an fq:// queue)")
    p.add_argument("--task-module", action="append", default=[], help="import this module's task classes too (repeatable)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("status", help="enqueued, leased, completed, failed")
    p.add_argument("queue")
    p.add_argument("--watch", action="store_true")
    p.add_argument("--interval", type=float, default=2.0)
    p.add_argument("--ledger-dir", default=None)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("evaluate", help="VI (split, merge), adapted Rand error, split/merged objects")
    p.add_argument("segmentation", help="layer, .npy, .npz or file.h5:dataset")
    p.add_argument("groundtruth", help="layer, .npy, .npz or file.h5:dataset")
    p.add_argument("--bbox", default=None)
    p.add_argument("--out", default=None, help="write JSON here and a PNG beside it")
    p.add_argument("--ignore-segmentation-zero", action="store_true", help="score only voxels the segmentation labelled")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sample", help="write the built-in synthetic EM-like sample (image.npy, labels.npy)")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", default="96,96,96", help="X,Y,Z")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("demo", help="run the whole pipeline on the built-in sample (or --source) and print a link")
    p.add_argument("--data-dir", default="data/demo")
    p.add_argument("--queue-dir", default="queues/demo")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", default="96,96,96", help="synthetic sample size X,Y,Z")
    p.add_argument("--source", default=None, help="a real volume instead of the sample (folder of sections, .h5:ds, .npy)")
    p.add_argument("--groundtruth", default=None, help="labels for --source (e.g. groundtruth.h5:stack)")
    p.add_argument("--resolution", default="10,10,10")
    p.add_argument("--ffn", default="none", help="FFN segmentation through the queue: none, train (small demo FFN), or a checkpoint")
    p.set_defaults(func=cmd_demo)

    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub) -> None:
    """Commands defined beside the code they drive; each module registers its own options."""
    from exaconnect import segment
    from exaconnect.ffn import train_cli
    from exaconnect.services import align_cli
    from exaconnect.viewer import cli as viewer_cli

    segment.add_cli(sub)
    align_cli.add_cli(sub)
    train_cli.add_cli(sub)
    viewer_cli.add_cli(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose or args.command == "worker" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ExaconnectError as exc:
        print(f"exaconnect {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

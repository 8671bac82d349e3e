"""The committed demo FFN (ffn/demo_model/): check it, or build it again.

    python bench/build_demo_model.py check
    python bench/build_demo_model.py build --work runs/demo-model   # about 1.5 h on 2 cores

`build` makes the selection volumes with the demo pipeline itself (synthetic seeds misaligned and
aligned, no segmentation), trains the demo FFN in the phases of ffn/training/demo.py, chooses the
checkpoint by mean VI on those volumes and writes the model, its training config and
`demo_model.json` (SHA-256 of every file) into ffn/demo_model/. It lives here, not in ffn/, because
it runs the whole pipeline (exaconnect/), which the kernels never import.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from exaconnect.errors import InputError
from exaconnect.ffn.training.demo import COMMITTED_MODEL_DIR, SELECTION_SEEDS, build_demo_model, committed_demo_model


def selection_volumes(work_dir: Path, progress: bool = True) -> list:
    """VolumeSources of the aligned images and labels of `SELECTION_SEEDS`, made by the demo
    pipeline (misaligned with the volume's own seed, then aligned; no segmentation)."""
    from exaconnect.ffn.training.config import VolumeSource
    from exaconnect.pipeline import default_pipeline_file, run_pipeline
    from exaconnect.pipeline_config import load_pipeline

    sources = []
    for seed in SELECTION_SEEDS:
        output = work_dir / f"selection-seed{seed}"
        sets = {"source": {"synthetic_seed": seed}, "misalign": {"seed": seed}, "segment": {"enabled": False},
                "pipeline": {"output": str(output), "queue_root": str(work_dir / f"queues-seed{seed}"),
                             "name": f"selection-{seed}"}}
        summary = run_pipeline(load_pipeline(default_pipeline_file(), sets), progress=progress)
        layers = summary["layers"]
        sources.append(VolumeSource(name=f"synthetic-{seed}-aligned", image=layers["image"],
                                    labels=layers["groundtruth"]))
    return sources


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/build_demo_model.py",
                                     description="the committed demo FFN: check it, or build it again")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="train, choose and write the demo model (about 1.5 h on 2 cores)")
    build.add_argument("--work", required=True, help="working folder (selection volumes, the training run)")
    build.add_argument("--dest", default=str(COMMITTED_MODEL_DIR), help="where the model goes (default: %(default)s)")
    sub.add_parser("check", help="verify the committed model's files against their SHA-256")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "check":
            directory, digest = committed_demo_model()
            print(json.dumps({"model": str(directory), "digest": digest, "ok": True}))
        else:
            work = Path(args.work).resolve()
            work.mkdir(parents=True, exist_ok=True)
            manifest = build_demo_model(work, selection_volumes(work), args.dest)
            print(json.dumps({k: v for k, v in manifest.items() if k != "files"}))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

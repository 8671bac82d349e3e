"""Checkpoint evaluation of a FIB-25 training run (bench_train_fib25.py); prints one JSON line.

Two suites per checkpoint, both with the run's inference options (ffn.training.evaluation):

- `evaluations/` (selection): three boxes of the *training* half, off the origin and off the
  chunk grid, 48 x 96 x 96 each (x 60-156, y 50-146, z 40-88; x 10-106, y 150-246, z 5-53;
  x 150-246, y 10-106, z 5-53; each has 11-15 bodies over 1,000 voxels and none filling over
  40 % of it), their metrics averaged by voxels. The run's model is chosen on them; the held-out
  half never takes part in the choice. (One box alone ranked checkpoints by noise: its ARE
  moved by 0.1 between neighbouring checkpoints.)
- `heldout/` (test): the whole held-out half (z >= 125, 125 x 250 x 250), label 0 of the
  segmentation counted as one segment, as in the issue-5 and issue-16 tables.

Then `summarize_run` writes evaluation.png/.md (selection curves, chosen checkpoint marked,
held-out curves beside them) and exports the chosen checkpoint as the run's model.

    nice .venv/bin/python bench/bench_train_checkpoints.py --run /work/runs/fib25/long \\
        --steps 1243,5000 --suites selection,heldout
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

SELECTION_BBOXES = ([60, 50, 40, 156, 146, 88], [10, 150, 5, 106, 246, 53], [150, 10, 5, 246, 106, 53])
HELDOUT_BBOX = [0, 0, 125, 250, 250, 250]


def boxes(work: Path, which: str):
    from exaconnect.ffn.training.config import VolumeSource

    image, labels = str(work / "layers" / "image"), str(work / "layers" / "groundtruth")
    bboxes = SELECTION_BBOXES if which == "selection" else (HELDOUT_BBOX,)
    return [VolumeSource(name=f"fib25-{which}-{i}", image=image, labels=labels, bbox=tuple(bbox))
            for i, bbox in enumerate(bboxes)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run folder (inside the bench's --work folder)")
    parser.add_argument("--steps", default="", help="comma list of checkpoint steps (default: all kept ones)")
    parser.add_argument("--suites", default="selection,heldout")
    parser.add_argument("--metric", default="adapted_rand_error")
    parser.add_argument("--no-summary", action="store_true")
    parser.add_argument("--keep-segmentation", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from exaconnect.ffn.training.evaluation import (
        EVALUATIONS_DIR, evaluate_checkpoint, list_checkpoints, read_evaluations, summarize_run)
    from exaconnect.ffn.training.loop import set_tf_threads

    set_tf_threads(1, 1)
    run = Path(args.run)
    work = run.parent
    have = list_checkpoints(run)
    steps = [int(s) for s in args.steps.split(",") if s] or sorted(have)
    report: dict = {"bench": "train_checkpoints", "run": str(run), "evaluated": []}
    for step in steps:
        if step not in have:
            logging.warning("no checkpoint at step %d", step)
            continue
        for suite in args.suites.split(","):
            t0 = time.time()
            record = evaluate_checkpoint(run, step, have[step], boxes=boxes(work, suite),
                                         suite=EVALUATIONS_DIR if suite == "selection" else suite,
                                         keep_segmentation=args.keep_segmentation)
            report["evaluated"].append({"step": step, "suite": suite, "seconds": round(time.time() - t0, 1),
                                        **{k: round(record[k], 4) for k in ("vi", "vi_split", "vi_merge",
                                                                            "adapted_rand_error",
                                                                            "unsegmented_fraction")}})
    if not args.no_summary and read_evaluations(run):
        summary = summarize_run(run, args.metric, extra_suites=("heldout",))
        report["chosen"] = summary["chosen"]
        report["plot"] = summary["plot"]
        held = {r["step"]: r for r in read_evaluations(run, "heldout")}
        if summary["chosen"] and summary["chosen"]["step"] in held:
            report["chosen_heldout"] = {k: held[summary["chosen"]["step"]][k]
                                        for k in ("step", "vi", "vi_split", "vi_merge", "adapted_rand_error",
                                                  "unsegmented_fraction")}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

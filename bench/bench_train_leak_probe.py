"""Why merges grow while F1 rises: a cheap probe of how far FFN checkpoints leak across
membranes, with the membranes as they are and made faint; prints one JSON line.

Examples are drawn (fixed seed) from the held-out half at object boundaries (the centre's
object fills 20-80 % of the FOV). One FOV evaluation from a fresh seed; per checkpoint and
condition:

- `leak_confident`: fraction of the *other* objects' voxels in the FOV that the network
  calls >= move_threshold (0.9), i.e. where inference would move the FOV into a neighbour;
- `leak`: fraction of them above 0.5 (what a merge paints);
- `recall`: fraction of the object's own voxels above 0.5 (what voxel F1 rewards).

Conditions: `original`, and `faint`, where every voxel darker than the mean (membranes in
FIB-25) is pulled halfway to the mean, i.e. membranes with half their contrast. A training
example with a blanked section (augment.missing_section_probability) shows exactly such a
plane at the mean and asks the network to continue the object through it.

    nice .venv/bin/python bench/bench_train_leak_probe.py --ckpt /work/runs/fib25/long:500 \\
        --ckpt /work/runs/fib25/noaug:500
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def examples(run: Path, count: int, seed: int = 7):
    from exaconnect.ffn.training.config import VolumeSource
    from exaconnect.ffn.training.data import build_example_source
    from exaconnect.ffn.training.evaluation import run_config

    config = run_config(run)
    work = run.parent
    held = VolumeSource("fib25-heldout", str(work / "layers" / "image"), str(work / "layers" / "groundtruth"),
                        (0, 0, 125, 250, 250, 250))
    fov = config.model.fov_zyx
    source = build_example_source([held], fov, config.lom_radius_zyx, config.data.thresholds, config.data.min_size,
                                  config.data.image_mean, config.data.image_stddev, str(work / "partitions"))
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < count:
        image, mask, _ = source.draw(rng)
        if 0.2 <= mask.mean() <= 0.8:
            out.append((image, mask))
    return out, config


def probe(predictor, config, batch, move_threshold: float) -> dict:
    from scipy.special import logit

    fov = np.array(config.model.fov_zyx)
    seeds = np.full((len(batch), *fov), logit(config.training.seed_pad), np.float32)
    seeds[(slice(None), *(fov // 2))] = logit(config.training.init_activation)
    result = {}
    for name in ("original", "faint"):
        images = np.stack([b[0] for b in batch])
        if name == "faint":
            images = np.where(images < 0, images * 0.5, images).astype(np.float32)
        masks = np.stack([b[1] for b in batch])
        probs = 1.0 / (1.0 + np.exp(-np.concatenate([predictor(images[i:i + 16], seeds[i:i + 16])
                                                     for i in range(0, len(batch), 16)])))
        result[name] = {"leak_confident": float(np.mean(probs[~masks] >= move_threshold)),
                        "leak": float(np.mean(probs[~masks] > 0.5)),
                        "recall": float(np.mean(probs[masks] > 0.5))}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", action="append", required=True, help="RUN_DIR:STEP (repeatable)")
    parser.add_argument("--examples", type=int, default=128)
    args = parser.parse_args()
    from exaconnect.ffn.training.evaluation import list_checkpoints, load_checkpoint_predictor, run_config
    from exaconnect.ffn.training.loop import set_tf_threads

    set_tf_threads(1, 1)
    report = {"bench": "train_leak_probe", "examples": args.examples, "checkpoints": []}
    batch = None
    for item in args.ckpt:
        run_text, _, step_text = item.rpartition(":")
        run, step = Path(run_text), int(step_text)
        if batch is None:
            batch, base = examples(run, args.examples)
        config = run_config(run)
        predictor = load_checkpoint_predictor(list_checkpoints(run)[step], config)
        row = {"run": run.name, "step": step, **probe(predictor, config, batch, config.inference.move_threshold)}
        report["checkpoints"].append(row)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

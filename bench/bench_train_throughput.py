"""FFN training throughput (examples per second): one device vs the mirrored strategy; one JSON line.

Each mode runs in a fresh interpreter (logical CPU devices must be set before TensorFlow
starts). On a CPU-only node, 'mirrored' splits the CPU into --replicas logical devices; on a
GPU/XPU node it uses every accelerator. The global batch is the same in both modes
(--batch per replica in 'mirrored', --batch x replicas on one device), so the numbers compare
the same work per step.

    nice .venv/bin/python bench/bench_train_throughput.py [--steps 40] [--batch 4] [--replicas 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
import numpy as np
from exaconnect.ffn.training.config import train_config_from_dict
from exaconnect.ffn.training.loop import train
mode, steps, batch, replicas, out, model = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], json.loads(sys.argv[6])
training = {"out_dir": out, "max_steps": steps, "summary_every_steps": max(steps // 4, 1), "validation_examples": 0,
            "progress": False, "checkpoint_every_steps": 10**6, "checkpoint_every_seconds": 1e9}
if mode == "mirrored":
    training.update(strategy="mirrored", batch_size=batch, logical_cpus=replicas if replicas > 1 else 0)
else:
    training.update(strategy="default", batch_size=batch * replicas)
config = train_config_from_dict({"model": model,
    "data": {"volumes": [{"name": "s", "image": "synthetic:0", "labels": "synthetic:0:labels"}], "min_size": 1000},
    "optimizer": {"name": "adam"}, "training": training})
result = train(config)
from exaconnect.ffn.training.monitor import read_metrics
rates = [r["examples_per_second"] for r in read_metrics(out) if r["kind"] == "train"][1:]  # first window traces
import tensorflow as tf
print("RESULT " + json.dumps({"mode": mode, "examples_per_second": round(float(np.median(rates)), 2) if rates else None,
      "overall_examples_per_second": round(result.examples_per_second, 2), "steps": result.step,
      "devices": [d.name for d in tf.config.list_logical_devices() if d.device_type in ("CPU", "GPU", "XPU")]}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4, help="per replica")
    parser.add_argument("--replicas", type=int, default=2, help="logical CPU devices for 'mirrored' on a CPU")
    parser.add_argument("--model", default='{"depth": 4, "fov_size": [17, 17, 17], "deltas": [4, 4, 4], "features": 16}')
    args = parser.parse_args()
    report = {"bench": "train_throughput", "model": json.loads(args.model), "global_batch": args.batch * args.replicas}
    for mode in ("single", "mirrored"):
        with tempfile.TemporaryDirectory() as out:
            proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(args.steps), str(args.batch),
                                   str(args.replicas), out, args.model], capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            report[mode] = {"error": proc.stderr[-2000:]}
            continue
        report[mode] = json.loads(lines[-1][len("RESULT "):])
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Multi-worker FFN training on one machine: N local processes joined by TF_CONFIG; one JSON line.

Checks what a multi-node job relies on: the workers agree on every update (the chief's exported
weights equal a non-chief's), stop together under a time budget, and the chief alone writes
metrics; reports examples per second of the whole job.

    nice .venv/bin/python bench/bench_train_multiworker.py [--workers 2] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys
from exaconnect.ffn.training.config import train_config_from_dict
from exaconnect.ffn.training.loop import train
out, steps = sys.argv[1], int(sys.argv[2])
config = train_config_from_dict({
    "model": {"depth": 2, "fov_size": [11, 11, 11], "deltas": [3, 3, 3], "features": 8},
    "data": {"volumes": [{"name": "s", "image": "synthetic:0", "labels": "synthetic:0:labels"}], "min_size": 500,
             "cache_dir": out + "/partitions"},
    "optimizer": {"name": "adam"},
    "training": {"out_dir": out + "/run", "max_steps": steps, "batch_size": 2, "strategy": "multi_worker",
                 "summary_every_steps": 2, "validation_examples": 0, "progress": False}})
result = train(config)
print("RESULT " + json.dumps({"model_dir": str(result.model_dir), "step": result.step,
                              "examples_per_second": result.examples_per_second}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    workers = [f"127.0.0.1:{free_port()}" for _ in range(args.workers)]
    with tempfile.TemporaryDirectory() as out:
        procs = []
        for index in range(args.workers):
            env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": {"worker": workers},
                                                         "task": {"type": "worker", "index": index}}))
            procs.append(subprocess.Popen([sys.executable, "-c", CHILD, out, str(args.steps)], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        results = []
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=900)
            lines = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
            results.append(json.loads(lines[-1][7:]) if lines else {"error": stderr[-1500:]})
        report = {"bench": "train_multiworker", "workers": args.workers, "results": results}
        if all("model_dir" in r for r in results):
            from exaconnect.ffn.checkpoint import load_network

            import numpy as np

            weights = [load_network(r["model_dir"])[0].numpy_weights()[0] for r in results]
            report["max_weight_diff_between_workers"] = max(
                float(np.abs(w[k] - weights[0][k]).max()) for w in weights[1:] for k in w)
            report["chief_metrics_lines"] = len((Path(out) / "run" / "metrics.jsonl").read_text().splitlines())
            report["examples_per_second"] = round(results[0]["examples_per_second"], 2)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

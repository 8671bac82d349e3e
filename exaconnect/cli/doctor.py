"""`exaconnect doctor`: what TensorFlow, intel-extension-for-tensorflow and the drivers see, as JSON.

    exaconnect doctor                 # report, exit 0
    exaconnect doctor --device xpu    # report, then exit 2 when no XPU is usable (same check as workers)
"""

from __future__ import annotations

import argparse
import json


def cmd_doctor(args: argparse.Namespace) -> int:
    from exaconnect.ffn.device import require_device, runtime_report

    report = runtime_report()
    print(json.dumps(report, indent=None if args.compact else 2, default=str), flush=True)
    if args.device:
        require_device(args.device)  # InputError -> one line on stderr, exit 2
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="print what TensorFlow, ITEX and the GPU drivers see (JSON)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu", "xpu"], default=None,
                   help="also require this device: exit 2 when it is absent (as a worker with --device would)")
    p.add_argument("--compact", action="store_true", help="one JSON line")
    p.set_defaults(func=cmd_doctor)

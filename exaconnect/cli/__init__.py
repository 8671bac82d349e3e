"""The `exaconnect` command, shaped `exaconnect <noun> <verb>`: one module per noun in this folder,
each a thin layer over library functions and the stage runner.

Errors from our own checks (ExaconnectError) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from typing import Sequence

# The order `exaconnect --help` lists them in: the pipeline first, then each stage, then tools.
# `stages` adds one noun per registered stage family (ingest, downsample, mesh, skeleton, a lab's).
COMMAND_MODULES = ("pipeline", "stages", "align", "segment", "train", "evaluate", "queue", "layer", "view", "doctor")


class _Parser(argparse.ArgumentParser):
    """Bad arguments get one line, as every other error does (`-h` shows the usage); subcommand
    parsers are made of the same class."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # argparse takes `-8,8,8` for an option (its own pattern admits only `-8` and `-.5`), so
        # `--resolution -8,8,8` said "expected one argument"; as a value, our check names what is wrong.
        self._negative_number_matcher = re.compile(r"^-\.?\d[\d.,eE+-]*$")

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from exaconnect import __version__

    parser = _Parser(prog="exaconnect", description="Connectomics pipeline: EM sections in, neurons out.")
    parser.add_argument("--version", action="version", version=f"exaconnect {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"exaconnect.cli.{name}").register(sub)
    importlib.import_module("exaconnect.cli.stages").register_services(sub)
    return parser


def commands() -> list[str]:
    """Every top-level command, as `exaconnect --help` lists them."""
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(action.choices)


def _quiet_tensorflow() -> None:
    # TensorFlow's start-up chatter (oneDNN notices, CUDA probing) is for developers, not users.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv: Sequence[str] | None = None) -> int:
    from exaconnect.errors import ExaconnectError

    _quiet_tensorflow()
    try:
        parser = build_parser()  # imports every stage module, a lab's included
    except ExaconnectError as exc:
        print(f"exaconnect: error: {exc}", file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a bad argument (argparse printed which): a code, not an exit
        return int(exc.code or 0)
    verbose = args.verbose or (args.command == "queue" and getattr(args, "verb", None) == "work")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ExaconnectError as exc:
        print(f"exaconnect {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # A file where a folder should be, a read-only or full output folder, a vanished path:
        # what the system said and the path, not a traceback.
        print(f"exaconnect {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

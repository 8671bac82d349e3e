"""`exaconnect link` and `exaconnect view`: argparse subcommands over `links.link` and `server.serve`."""

from __future__ import annotations

import argparse

from exaconnect.viewer.roots import DEFAULT_BIND, DEFAULT_PORT

_LAYER_HELP = "layer path or URL (file://, gs://, s3://, https://, or a local directory)"


def _run_link(args: argparse.Namespace) -> int:
    from exaconnect.viewer.links import link

    print(link(args.layers, base_url=args.base_url, server=args.server))
    return 0


def _run_view(args: argparse.Namespace) -> int:
    from exaconnect.viewer.server import serve

    serve(args.layers, port=args.port, bind=args.bind, token=args.token, tasks_file=args.tasks)
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register `link` and `view`; each sets `func(args) -> exit code`.

    Errors are raised as ExaconnectError subclasses (InputError, LayerError) for the main CLI
    to print as one line.
    """
    link_parser = subparsers.add_parser(
        "link",
        help="print a neuroglancer link to layers",
        description="Print a shareable neuroglancer link (state in the URL fragment). Remote layers are "
        "linked directly; local ones through `exaconnect view` on its default port.",
    )
    link_parser.add_argument("layers", nargs="+", metavar="LAYER", help=_LAYER_HELP)
    link_parser.add_argument(
        "--base-url",
        default=None,
        help="neuroglancer client URL (default: the public client, or the local server's for local layers)",
    )
    link_parser.add_argument(
        "--server",
        default=None,
        metavar="URL",
        help=f"origin of the `exaconnect view` server for local layers (default http://127.0.0.1:{DEFAULT_PORT})",
    )
    link_parser.set_defaults(func=_run_link)

    view_parser = subparsers.add_parser(
        "view",
        help="serve layers and the neuroglancer client locally",
        description="Serve the bundled neuroglancer client and local layers read-only over HTTP, "
        "and print the URL to open.",
    )
    view_parser.add_argument("layers", nargs="+", metavar="LAYER", help=_LAYER_HELP)
    view_parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port to listen on, 0 for any free one (default {DEFAULT_PORT})"
    )
    view_parser.add_argument(
        "--bind", default=DEFAULT_BIND, help=f"address to listen on (default {DEFAULT_BIND}: this machine only)"
    )
    view_parser.add_argument(
        "--token",
        default=None,
        help="access token required on every request (made up when --bind is not loopback and none is given)",
    )
    view_parser.add_argument(
        "--tasks", default=None, metavar="FILE", help="task-state JSON file to show as live task boxes"
    )
    view_parser.set_defaults(func=_run_view)

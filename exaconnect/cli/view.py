"""`exaconnect view` (serve layers and the neuroglancer client) and `exaconnect link` (a shareable link)."""

from __future__ import annotations

import argparse
import sys
import urllib.parse

from exaconnect.viewer.roots import DEFAULT_BIND, DEFAULT_PORT

_LAYER_HELP = "layer path or URL (file://, gs://, s3://, https://, or a local directory)"


def cmd_link(args: argparse.Namespace) -> int:
    from exaconnect.viewer.links import link, short_link

    if args.long:
        print(link(args.layers, base_url=args.base_url, server=args.server))
        return 0
    short = short_link(args.layers, state_dir=args.state_dir, name=args.name, base_url=args.base_url,
                       server=args.server)
    print(short.url)
    if "://" not in short.state_location:
        where = f" --state-dir {args.state_dir}" if args.state_dir is not None else ""
        client = urllib.parse.urlsplit(short.url)
        server = urllib.parse.urlsplit(short.state_url)
        if (client.scheme, client.netloc) != (server.scheme, server.netloc):
            # Another client reads our server cross-origin, which `view` allows only when told.
            where += f" --allow-origin {client.scheme}://{client.netloc}"
        print(f"state saved to {short.state_location}; open the link while `exaconnect view LAYER...{where}` runs",
              file=sys.stderr)
    else:
        print(f"state saved to {short.state_location}", file=sys.stderr)
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    from exaconnect.viewer.server import serve

    serve(args.layers, port=args.port, bind=args.bind, token=args.token, tasks_file=args.tasks,
          state_dir=args.state_dir, allow_origins=args.allow_origin)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `link` and `view`; each sets `func(args) -> exit code` (errors are ExaconnectError)."""
    p = subparsers.add_parser(
        "link",
        help="print a short neuroglancer link to layers (state saved as JSON)",
        description="Save the viewer state of the layers as JSON (beside the first local layer in states/, or "
        "beside a gs:// / s3:// layer, or in --state-dir) and print a short link to it "
        "(CLIENT#!STATE_URL). Local layers and local states are read through `exaconnect view` on its "
        "default port. --long prints the state in the link itself instead.",
    )
    p.add_argument("layers", nargs="+", metavar="LAYER", help=_LAYER_HELP)
    p.add_argument("--long", action="store_true", help="print the long link (whole state in the URL fragment); save nothing")
    p.add_argument("--state-dir", default=None, metavar="DIR",
                   help="where to save the state: a local folder (serve it with `view --state-dir DIR`) or gs:// / s3:// "
                        "(default: states/ beside the first local layer, else beside the first layer)")
    p.add_argument("--name", default=None, help="state file name (default: a hash of the state, so the same view gives the same link)")
    p.add_argument("--base-url", default=None,
                   help="neuroglancer client URL (default: the local server's when anything is local, else the public client)")
    p.add_argument("--server", default=None, metavar="URL",
                   help=f"origin of the `exaconnect view` server for local layers and states (default http://127.0.0.1:{DEFAULT_PORT})")
    p.set_defaults(func=cmd_link)

    p = subparsers.add_parser(
        "view",
        help="serve layers and the neuroglancer client locally",
        description="Serve the bundled neuroglancer client, local layers and saved states (states/ beside each "
        "local layer, and --state-dir) read-only over HTTP, and print the URL to open.",
    )
    p.add_argument("layers", nargs="+", metavar="LAYER", help=_LAYER_HELP)
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on, 0 for any free one (default {DEFAULT_PORT})")
    p.add_argument("--bind", default=DEFAULT_BIND, help=f"address to listen on (default {DEFAULT_BIND}: this machine only)")
    p.add_argument("--token", default=None,
                   help="access token required on every request (made up when --bind is not loopback and none is given)")
    p.add_argument("--tasks", default=None, metavar="FILE", help="task-state JSON file to show as live task boxes")
    p.add_argument("--state-dir", default=None, metavar="DIR", help="also serve saved states from this folder (as `link --state-dir`)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="let another neuroglancer client read the data, e.g. https://neuroglancer-demo.appspot.com (repeatable)")
    p.set_defaults(func=cmd_view)

"""Serve a Hub until Ctrl-C.

Usage: ``python -m hubmerge.hubserver --root DIR [--port N] [--token TOKEN=USER]... [--org ORG=USER]...
[--cdn-ttl S]``
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .server import serve_forever


def _pairs(values: list[str], option: str) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        left, sep, right = value.partition("=")
        if not sep or not left or not right:
            raise SystemExit(f"error: {option} expects KEY=VALUE, got {value!r}")
        pairs.append((left, right))
    return pairs


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and serve.

    Args:
        argv: Arguments without the program name; defaults to ``sys.argv[1:]``.

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m hubmerge.hubserver", description=__doc__)
    parser.add_argument("--root", type=Path, required=True, help="storage folder (created if missing)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (default: 0, a free one)")
    parser.add_argument("--token", action="append", default=[], metavar="TOKEN=USER", help="accepted token")
    parser.add_argument("--org", action="append", default=[], metavar="ORG=USER", help="organisation member")
    parser.add_argument(
        "--cdn-ttl",
        type=int,
        default=0,
        metavar="S",
        help="redirect LFS files to signed URLs valid S seconds",
    )
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    orgs: dict[str, list[str]] = {}
    for org, user in _pairs(args.org, "--org"):
        orgs.setdefault(org, []).append(user)
    serve_forever(
        args.root,
        host=args.host,
        port=args.port,
        tokens=dict(_pairs(args.token, "--token")),
        orgs=orgs,
        on_ready=lambda url: print(url, flush=True),
        cdn_ttl=args.cdn_ttl,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

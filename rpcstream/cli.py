"""The ``rpcstream`` command.

``rpcstream demo`` runs the demo: a server with the embedded (SQLite) run store
and a client that starts a token-streaming run, watches it, loses its
connection midway and resumes without losing or repeating an event.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = argparse.ArgumentParser(prog="rpcstream", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the demo (server and client in one process)")
    demo.add_argument("--loop", choices=["asyncio", "trio"], default="asyncio")
    demo.add_argument("--db", default=None, help="SQLite file (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args.loop, args.db)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())

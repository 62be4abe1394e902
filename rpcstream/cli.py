"""The ``rpcstream`` command (also ``python -m rpcstream``).

::

    rpcstream serve [APP] [--store memory|sqlite:PATH|redis://...] [--host H] [--port P]
                    [--certfile PEM [--keyfile PEM]]   wss:// with that certificate
    rpcstream call URL METHOD [ARGS...]        each ARG is JSON where it parses, else a string
    rpcstream tail URL RUN_ID [--after N]      a run's events as JSON lines, through disconnects
    (call and tail take --cafile PEM: trust that CA for a wss:// URL, not the system's)
    rpcstream demo                             the demo: a run streamed, cut, and resumed
    rpcstream bench [--quick]                  the benchmark workloads (from a source checkout)

Errors are one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

import anyio
import msgspec

from .errors import RemoteError, RpcStreamError

__all__ = ["main"]


class CliError(Exception):
    """A failure to report as one line and exit code 1."""


_CAFILE_HELP = "PEM CA certificates to verify a wss:// server with (default: the system's)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rpcstream", description="Calls, streams and resumable run streams over WebSockets."
    )
    parser.add_argument(
        "--loop",
        choices=["asyncio", "trio"],
        default="asyncio",
        help="event loop (default asyncio)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="serve an app (module:attribute) or the built-in demo")
    serve.add_argument(
        "app",
        nargs="?",
        default="rpcstream.demo:runs",
        help="module:attribute of a RunServer "
        "or Router (default: the built-in demo, rpcstream.demo:runs)",
    )
    serve.add_argument(
        "--store", default=None, help="memory, sqlite:PATH or redis://HOST:PORT/DB (RunServer apps)"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    serve.add_argument("--ping-interval", type=float, default=20.0, help="heartbeat seconds")
    serve.add_argument(
        "--ping-timeout", type=float, default=20.0, help="seconds without a pong: peer is dead"
    )
    serve.add_argument("--certfile", help="PEM certificate chain: serve wss:// (TLS)")
    serve.add_argument("--keyfile", help="PEM private key, if not in --certfile")

    call = sub.add_parser("call", help="call a method and print its JSON result")
    call.add_argument("url")
    call.add_argument("method")
    call.add_argument("args", nargs="*", help="JSON values (or plain strings)")
    call.add_argument("--timeout", type=float, default=30.0)
    call.add_argument("--token", default=os.environ.get("RPCSTREAM_TOKEN"))
    call.add_argument("--cafile", help=_CAFILE_HELP)

    tail = sub.add_parser("tail", help="print a run's events as they come, resuming on drops")
    tail.add_argument("url", nargs="+", help="server URL(s), rotated through on reconnect")
    tail.add_argument("run_id")
    tail.add_argument("--after", type=int, default=0, help="start after this event id")
    tail.add_argument("--token", default=os.environ.get("RPCSTREAM_TOKEN"))
    tail.add_argument("--give-up-after", type=float, default=60.0, help="seconds offline")
    tail.add_argument("--cafile", help=_CAFILE_HELP)

    demo = sub.add_parser("demo", help="run the demo (server and client in one process)")
    demo.add_argument("--db", default=None, help="SQLite file (default: a temporary one)")

    bench = sub.add_parser("bench", help="run the benchmark workloads (JSON lines)")
    bench.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    bench.add_argument(
        "--suite", choices=["peer", "runs", "store", "all"], default="all", help="which workloads"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(args.loop, args.db)
        if args.command == "bench":
            return _bench(args)
        runner = {"serve": _serve, "call": _call, "tail": _tail}[args.command]
        result: int = anyio.run(runner, args, backend=args.loop)
        return result
    except CliError as exc:
        print(f"rpcstream {args.command}: {exc}", file=sys.stderr)
        return 1
    except RemoteError as exc:
        print(f"rpcstream {args.command}: error {exc}", file=sys.stderr)
        return 1
    except (RpcStreamError, OSError) as exc:
        print(f"rpcstream {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _load_app(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CliError(f"app must be module:attribute, not {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CliError(f"cannot import {module_name!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise CliError(f"module {module_name!r} has no attribute {attr!r}") from None


def make_store(spec: str) -> Any:
    """Build an event store from ``memory``, ``sqlite:PATH`` or ``redis://...``."""
    from .store.memory import MemoryStore
    from .store.sqlite import SQLiteStore

    if spec == "memory":
        return MemoryStore()
    if spec.startswith("sqlite:"):
        path = spec.removeprefix("sqlite:")
        if not path:
            raise CliError("sqlite store needs a path: sqlite:runs.db")
        return SQLiteStore(Path(path))
    if spec.startswith(("redis://", "rediss://", "unix://")):
        try:
            redis_module = importlib.import_module("rpcstream.store.redis")
        except ImportError as exc:
            raise CliError(f"the Redis store needs the 'redis' package: {exc}") from exc
        return redis_module.RedisStore(spec)
    raise CliError(f"unknown store {spec!r}: expected memory, sqlite:PATH or redis://...")


async def _serve(args: argparse.Namespace) -> int:
    from .runs.server import RunServer
    from .server import serve

    app = _load_app(args.app)
    if args.store is not None:
        if not isinstance(app, RunServer):
            raise CliError("--store applies to RunServer apps only")
        app.store = make_store(args.store)
    options: dict[str, Any] = {
        "ping_interval": args.ping_interval,
        "ping_timeout": args.ping_timeout,
    }
    if args.certfile is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.certfile, args.keyfile)
        options["ssl"] = context
    elif args.keyfile is not None:
        raise CliError("--keyfile needs --certfile")
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with serve(app, args.host, args.port, **options) as server:
            print(f"rpcstream: serving {args.app} on {server.url}", flush=True)
            async for _ in signals:
                break
    print("rpcstream: stopped", file=sys.stderr)
    return 0


def _parse_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _client_tls(args: argparse.Namespace, urls: list[str]) -> dict[str, Any]:
    """``connect()``'s ``ssl`` option for ``--cafile``: nothing without one."""
    if args.cafile is None:
        return {}
    if not all(url.startswith("wss://") for url in urls):
        raise CliError("--cafile applies to wss:// URLs only")
    return {"ssl": ssl.create_default_context(cafile=args.cafile)}


async def _call(args: argparse.Namespace) -> int:
    from .client import connect

    params = [_parse_arg(a) for a in args.args]
    async with connect(args.url, token=args.token, **_client_tls(args, [args.url])) as peer:
        result = await peer.call(args.method, *params, timeout=args.timeout)
    print(msgspec.json.encode(result).decode())
    return 0


async def _tail(args: argparse.Namespace) -> int:
    from .runs.client import RunClient

    progress = sys.stderr
    count = 0
    last: dict[str, Any] | None = None
    tls = _client_tls(args, args.url)
    async with RunClient(
        args.url, token=args.token, give_up_after=args.give_up_after, **tls
    ) as client:
        connections = 0
        async for event in client.subscribe(args.run_id, after=args.after):
            if client.connections != connections:
                if connections:
                    progress.write(f"\n[reconnected to {client.url}; resuming]\n")
                connections = client.connections
            count += 1
            last = event
            print(msgspec.json.encode(event).decode(), flush=True)
            progress.write(f"\r{count} events, last id {event['id']} ({event['type']})")
            progress.flush()
    if last is None:
        progress.write(f"run {args.run_id}: no events after {args.after}\n")
    else:
        progress.write(f"\nrun ended: {last['type']} after {count} events\n")
    return 0


def _bench(args: argparse.Namespace) -> int:
    # The workloads live in benchmarks/ of a source checkout (beside the package).
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks").is_dir():
        raise CliError("the benchmarks ship with the source checkout: run from one")
    sys.path.insert(0, str(root))
    suites = ["peer", "runs", "store"] if args.suite == "all" else [args.suite]
    argv = ["--quick"] if args.quick else []
    status = 0
    for suite in suites:
        module = importlib.import_module(f"benchmarks.bench_{suite}")
        status |= int(module.main(list(argv)) or 0)
    return status


if __name__ == "__main__":
    sys.exit(main())

"""The ``rpcstream`` command (also ``python -m rpcstream``).

::

    rpcstream serve [APP] [--store memory|sqlite:PATH|redis://...] [--host H] [--port P]
                    [--certfile PEM [--keyfile PEM]]   wss:// with that certificate
                    [--log-level info] [--log-format text|json]   logs on stderr
    rpcstream call URL METHOD [ARGS...]        print the result as JSON
    rpcstream stream URL METHOD [ARGS...]      print a streaming method's items as JSON lines
    rpcstream tail URL RUN_ID [--after N]      a run's events as JSON lines, through disconnects
    rpcstream demo                             the demo: a run streamed, cut, and resumed
    rpcstream bench [--quick]                  the benchmark workloads (from a source checkout)
    rpcstream --version

ARGS: each is a JSON value where it parses (``1``, ``true``, ``'{"a": 1}'``),
else a string (``hello``); ``NAME=VALUE`` is a keyword argument (VALUE read the
same way); ``--strings`` reads every value as a string (``greet 42``). URLs may
be ``ws://``, ``wss://``, ``http://`` (meaning ws), ``https://`` (wss) or a bare
``host:port``. ``call``, ``stream`` and ``tail`` take ``--cafile PEM`` to trust
that CA for a ``wss://`` URL instead of the system's.

Errors are one line on stderr and a non-zero exit code: 1 for a failure, 2 for
a command line that does not parse, 130 on Ctrl-C. ``RPCSTREAM_TRACEBACK=1``
shows the traceback of an unexpected one.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import sqlite3
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import anyio
import msgspec

from . import __version__
from .errors import ConnectionClosed, HandshakeRefused, RemoteError, RpcStreamError
from .observe import logs
from .transport.websocket import describe_failure
from .urls import websocket_url

if TYPE_CHECKING:
    from .peer import RpcPeer

__all__ = ["main"]


class CliError(Exception):
    """A failure to report as one line and exit code 1."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (usage text stays behind ``--help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")


_CAFILE_HELP = "PEM CA certificates to verify a wss:// server with (default: the system's)"


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port {text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is not in 0-65535")
    return port


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def _client_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--token", default=os.environ.get("RPCSTREAM_TOKEN"))
    command.add_argument("--cafile", help=_CAFILE_HELP)


def _call_arguments(command: argparse.ArgumentParser, timeout: float | None) -> None:
    command.add_argument("url", help="ws://, wss://, http://, https:// or host:port")
    command.add_argument("method")
    command.add_argument(
        "args",
        nargs="*",
        default=[],
        help="JSON values (else strings); NAME=VALUE for a keyword argument",
    )
    command.add_argument(
        "--strings", action="store_true", help="pass every value as a string, not JSON"
    )
    command.add_argument("--timeout", type=_positive, default=timeout, help="seconds")
    _client_options(command)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rpcstream", description="Calls, streams and resumable run streams over WebSockets."
    )
    parser.add_argument("--version", action="version", version=f"rpcstream {__version__}")
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
    serve.add_argument("--port", type=_port, default=8765, help="0 picks a free port")
    serve.add_argument("--ping-interval", type=_positive, default=20.0, help="heartbeat seconds")
    serve.add_argument(
        "--ping-timeout", type=_positive, default=20.0, help="seconds without a pong: peer is dead"
    )
    serve.add_argument("--certfile", help="PEM certificate chain: serve wss:// (TLS)")
    serve.add_argument("--keyfile", help="PEM private key, if not in --certfile")
    logs.add_arguments(serve)  # --log-level, --log-format

    call = sub.add_parser("call", help="call a method and print its JSON result")
    _call_arguments(call, timeout=30.0)
    stream = sub.add_parser("stream", help="call a streaming method, print items as JSON lines")
    _call_arguments(stream, timeout=None)

    tail = sub.add_parser("tail", help="print a run's events as they come, resuming on drops")
    tail.add_argument("url", nargs="+", help="server URL(s), rotated through on reconnect")
    tail.add_argument("run_id")
    tail.add_argument("--after", type=int, default=0, help="start after this event id")
    tail.add_argument("--give-up-after", type=_positive, default=60.0, help="seconds offline")
    tail.add_argument(
        "--max-attempts", type=int, default=None, help="failed connection attempts in a row"
    )
    _client_options(tail)

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
        runner = {"serve": _serve, "call": _call, "stream": _stream, "tail": _tail}[args.command]
        result: int = anyio.run(runner, args, backend=args.loop)
        return result
    except BaseException as exc:  # every failure becomes one line
        return _report(args, _unwrap(exc))


def _unwrap(exc: BaseException) -> BaseException:
    """The one exception a task group's ``ExceptionGroup`` is about."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _report(args: argparse.Namespace, exc: BaseException) -> int:
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, SystemExit):
        raise exc
    if isinstance(exc, RemoteError):
        message = f"error {exc}"
        if "call it with stream()" in exc.message and args.command == "call":
            message += f" (rpcstream stream {args.url} {args.method} ...)"
    elif isinstance(exc, (CliError, RpcStreamError, OSError)):
        message = str(exc) or type(exc).__name__
    elif isinstance(exc, sqlite3.Error):
        store = getattr(args, "store", None) or getattr(args, "db", None)
        message = f"SQLite store {store}: {exc}" if store else f"SQLite: {exc}"
    else:
        if os.environ.get("RPCSTREAM_TRACEBACK"):
            raise exc
        message = f"unexpected {type(exc).__name__}: {exc} (RPCSTREAM_TRACEBACK=1 shows where)"
    line = " ".join(message.split())  # one line, whatever the message held
    print(f"rpcstream {args.command}: {line}", file=sys.stderr)
    return 1


def _load_app(spec: str) -> Any:
    from .router import Router

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CliError(f"app must be module:attribute, not {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CliError(f"cannot import {module_name!r}: {exc}") from exc
    except Exception as exc:  # the module itself failed: still a one-line answer
        raise CliError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from exc
    try:
        app = getattr(module, attr)
    except AttributeError:
        raise CliError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(app, Router) and not isinstance(getattr(app, "router", None), Router):
        raise CliError(f"{spec} is a {type(app).__name__}, not a Router or a RunServer")
    return app


def make_store(spec: str) -> Any:
    """Build an event store from ``memory``, ``sqlite:PATH`` or ``redis://...``."""
    from .store.memory import MemoryStore
    from .store.sqlite import SQLiteStore

    if spec == "memory":
        return MemoryStore()
    if spec.startswith("sqlite:"):
        if spec == "sqlite:":
            raise CliError("sqlite store needs a path: sqlite:runs.db")
        path = Path(spec.removeprefix("sqlite:"))
        if not path.parent.is_dir():
            raise CliError(f"--store {spec}: directory {str(path.parent)!r} does not exist")
        if path.is_dir():
            raise CliError(f"--store {spec}: {str(path)!r} is a directory, not a database file")
        return SQLiteStore(path)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        try:
            redis_module = importlib.import_module("rpcstream.store.redis")
        except ImportError as exc:
            raise CliError(f"the Redis store needs the 'redis' package: {exc}") from exc
        return redis_module.RedisStore(spec)
    raise CliError(f"unknown store {spec!r}: expected memory, sqlite:PATH or redis://...")


def _pem(option: str, path: str) -> str:
    """``path`` if it names a readable file, else a CliError naming option and file."""
    if not Path(path).is_file():
        raise CliError(f"{option} {path}: no such file")
    if not os.access(path, os.R_OK):
        raise CliError(f"{option} {path}: not readable")
    return path


def _tls_error(option: str, path: str, exc: Exception) -> CliError:
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
    return CliError(f"{option} {path}: not usable PEM ({reason})")


def _server_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.certfile is None:
        if args.keyfile is not None:
            raise CliError("--keyfile needs --certfile")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certfile = _pem("--certfile", args.certfile)
    keyfile = None if args.keyfile is None else _pem("--keyfile", args.keyfile)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as exc:
        files = certfile if keyfile is None else f"{certfile} (with --keyfile {keyfile})"
        raise _tls_error("--certfile", files, exc) from exc
    return context


def _startup_error(args: argparse.Namespace, exc: BaseException) -> CliError | None:
    """What a failure to start serving means, naming the address or the store."""
    leaf = _unwrap(exc)
    if isinstance(leaf, OSError):
        reason = os.strerror(leaf.errno) if leaf.errno and leaf.errno > 0 else leaf.strerror
        return CliError(f"cannot listen on {args.host}:{args.port}: {reason or leaf}")
    if isinstance(leaf, sqlite3.Error):
        return CliError(f"--store {args.store}: {leaf}")
    return None  # not a bad address or store: as it is


async def _serve(args: argparse.Namespace) -> int:
    from .runs.server import RunServer
    from .server import serve

    logs.configure_logging(args.log_level, args.log_format)
    app = _load_app(args.app)
    if args.store is not None:
        if not isinstance(app, RunServer):
            raise CliError("--store applies to RunServer apps only")
        app.store = make_store(args.store)
    options: dict[str, Any] = {
        "ping_interval": args.ping_interval,
        "ping_timeout": args.ping_timeout,
    }
    context = _server_tls(args)
    if context is not None:
        options["ssl"] = context
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with contextlib.AsyncExitStack() as stack:
            try:
                server = await stack.enter_async_context(
                    serve(app, args.host, args.port, **options)
                )
            except BaseException as exc:
                error = _startup_error(args, exc)
                if error is None:
                    raise
                raise error from exc
            print(f"rpcstream: serving {args.app} on {server.url}", flush=True)
            async for _ in signals:
                break
    print("rpcstream: stopped", file=sys.stderr)
    return 0


def _value(text: str, as_string: bool) -> Any:
    if as_string:
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


# Keyword arguments that RpcPeer.call()/stream() keep for themselves.
_RESERVED = {"timeout", "result_type", "item_type", "window_items", "window_bytes"}


def parse_arguments(texts: list[str], strings: bool = False) -> tuple[list[Any], dict[str, Any]]:
    """The command line's ARGS as ``(args, kwargs)``: ``NAME=VALUE`` is a keyword.

    Values are JSON where they parse, else strings (every value a string with
    ``strings=True``). To pass a string that looks like ``NAME=VALUE``
    positionally, quote it as JSON: ``'"a=b"'``.
    """
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for text in texts:
        name, eq, value = text.partition("=")
        if eq and name.isidentifier():
            if name in kwargs:
                raise CliError(f"keyword argument {name!r} given twice")
            if name in _RESERVED:
                raise CliError(f"keyword argument {name!r} is reserved: pass it positionally")
            kwargs[name] = _value(value, strings)
        elif kwargs:
            raise CliError(f"positional argument {text!r} after keyword arguments")
        else:
            args.append(_value(text, strings))
    return args, kwargs


def _urls(texts: list[str]) -> list[str]:
    try:
        return [websocket_url(text) for text in texts]
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _client_tls(args: argparse.Namespace, urls: list[str]) -> dict[str, Any]:
    """``connect()``'s ``ssl`` option for ``--cafile``: nothing without one."""
    if args.cafile is None:
        return {}
    if not all(url.startswith("wss://") for url in urls):
        raise CliError("--cafile applies to wss:// URLs only")
    cafile = _pem("--cafile", args.cafile)
    try:
        return {"ssl": ssl.create_default_context(cafile=cafile)}
    except (ssl.SSLError, OSError) as exc:
        raise _tls_error("--cafile", cafile, exc) from exc


def describe_connect_failure(exc: ConnectionClosed, secure: bool) -> str:
    """Why a connection could not open, in words (see
    :func:`rpcstream.transport.websocket.describe_failure`)."""
    if exc.__cause__ is None:
        return exc.reason or str(exc)
    return describe_failure(exc.__cause__, secure)


@contextlib.asynccontextmanager
async def _connected(args: argparse.Namespace) -> AsyncIterator[RpcPeer]:
    from .client import connect

    (url,) = _urls([args.url])
    tls = _client_tls(args, [url])
    async with contextlib.AsyncExitStack() as stack:
        try:
            peer = await stack.enter_async_context(connect(url, token=args.token, **tls))
        except HandshakeRefused:
            raise
        except ConnectionClosed as exc:
            why = describe_connect_failure(exc, url.startswith("wss://"))
            raise CliError(f"cannot connect to {url}: {why}") from exc
        yield peer


async def _call(args: argparse.Namespace) -> int:
    params, kwargs = parse_arguments(args.args, args.strings)
    async with _connected(args) as peer:
        result = await peer.call(args.method, *params, timeout=args.timeout, **kwargs)
    print(msgspec.json.encode(result).decode())
    return 0


async def _stream(args: argparse.Namespace) -> int:
    params, kwargs = parse_arguments(args.args, args.strings)
    async with (
        _connected(args) as peer,
        peer.stream(args.method, *params, timeout=args.timeout, **kwargs) as items,
    ):
        async for item in items:
            print(msgspec.json.encode(item).decode(), flush=True)
    return 0


class _Progress:
    """The ``\r`` progress line and the retry lines of ``tail``, on stderr."""

    def __init__(self, urls: list[str], max_attempts: int | None) -> None:
        self.urls = urls
        self.max_attempts = max_attempts
        self.retries = 0
        self._open = False  # a \r progress line awaits its newline

    def line(self, text: str) -> None:
        sys.stderr.write(("\n" if self._open else "") + text + "\n")
        sys.stderr.flush()
        self._open = False

    def update(self, text: str) -> None:
        sys.stderr.write("\r" + text)
        sys.stderr.flush()
        self._open = True

    def retry(self, attempt: int, delay: float, error: BaseException | None) -> None:
        self.retries += 1
        of = "" if self.max_attempts is None else f" of {self.max_attempts}"
        why = self.why_not_connected(error)
        self.line(f"rpcstream tail: {why}; retrying in {delay:.1f} s (attempt {attempt + 1}{of})")

    def why_not_connected(self, error: BaseException | None) -> str:
        """The last connection failure, in words."""
        if isinstance(error, ConnectionClosed) and not isinstance(error, HandshakeRefused):
            secure = any(url.startswith("wss://") for url in self.urls)
            why = describe_connect_failure(error, secure)
            return f"cannot connect to {' or '.join(self.urls)}: {why}"
        return "connection lost" if error is None else str(error)


async def _tail(args: argparse.Namespace) -> int:
    from .errors import ReconnectFailed
    from .runs.client import RunClient

    urls = _urls(args.url)
    if args.max_attempts is not None and args.max_attempts < 1:
        raise CliError(f"--max-attempts {args.max_attempts}: at least 1")
    progress = _Progress(urls, args.max_attempts)
    count = 0
    last: dict[str, Any] | None = None
    client = RunClient(
        urls,
        token=args.token,
        give_up_after=args.give_up_after,
        max_attempts=args.max_attempts,
        on_retry=progress.retry,
        **_client_tls(args, urls),
    )
    try:
        async with client:
            connections = 0
            async for event in client.subscribe(args.run_id, after=args.after):
                if client.connections != connections:
                    if connections:
                        progress.line(f"[reconnected to {client.url}; resuming]")
                    connections = client.connections
                count += 1
                last = event
                print(msgspec.json.encode(event).decode(), flush=True)
                progress.update(f"{count} events, last id {event['id']} ({event['type']})")
    except ReconnectFailed as exc:
        cause = exc.__cause__
        if isinstance(cause, HandshakeRefused):
            raise cause from None
        attempts = progress.retries + 1
        raise CliError(
            f"{progress.why_not_connected(cause)} (gave up after {attempts} "
            f"attempt{'s' if attempts > 1 else ''})"
        ) from exc
    if last is None:
        progress.line(f"run {args.run_id}: no events after {args.after}")
    else:
        progress.line(f"run ended: {last['type']} after {count} events")
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

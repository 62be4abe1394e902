"""Every bad input to the rpcstream command: one line on stderr, a non-zero exit, no traceback.

Each row runs the real command (``python -m rpcstream``) as a subprocess, on
asyncio and on trio; rows run in parallel threads, and each fails fast (a dead
port is tried once: ``--max-attempts 1``), so the table stays quick to run.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.test_cli import ENV, ROOT, loop, serving

__all__ = ["loop"]  # the fixture, imported for its parametrization


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """The built-in demo app (add, greet, runs.*) on a free port, memory store."""
    with serving("serve", "--store", "memory") as url:
        yield url


def table(url: str, tmp: Path, loop: str) -> dict[tuple[str, ...], str]:
    """Command line -> what its one line must say (compared case-insensitively).

    The rows that do I/O run on both loops; those refused before any (arguments,
    files, imports) only on asyncio.
    """
    hostport = url.removeprefix("ws://")
    port = hostport.rsplit(":", 1)[1]
    dead = f"127.0.0.1:{free_port()}"
    refused = f"cannot connect to ws://{dead}: connection refused"
    garbage = tmp / "garbage.pem"
    garbage.write_text("not a certificate\n")
    not_a_db = tmp / "not-a.db"
    not_a_db.write_bytes(b"not a database, just bytes" * 100)
    io_rows = {
        # Nobody there, or not what was expected there
        ("call", f"http://{dead}", "add", "1", "2"): refused,
        ("call", dead, "add"): refused,
        ("stream", dead, "count"): refused,
        ("tail", dead, "run", "--max-attempts", "1"): f"{refused} (gave up after 1 attempt)",
        ("call", f"wss://{hostport}", "add"): "tls handshake (a plain ws:// server?)",
        ("call", "ws://nonexistent.invalid:80", "add"): "connect to ws://nonexistent.invalid:80",
        # The server's answers
        ("call", url, "nope"): "error [method_not_found] no method 'nope'",
        ("call", url, "add", "1", "x"): "error [invalid_params]",
        ("call", url, "runs.subscribe", "x"): f"(rpcstream stream {url} runs.subscribe ...)",
        ("stream", url, "runs.subscribe", "no-such-run"): "error [run_not_found]",
        ("tail", url, "no-such-run"): "error [run_not_found]",
        # Opening the store, binding the address
        ("serve", "--port", "0", "--store", f"sqlite:{not_a_db}"): (
            f"--store sqlite:{not_a_db}: file is not a database"
        ),
        ("demo", "--db", "/nonexistent/x.db"): "sqlite store /nonexistent/x.db: unable to open",
        ("serve", "--port", port): f"cannot listen on 127.0.0.1:{port}: address already in use",
        ("serve", "--port", "0", "--host", "nonexistent.invalid"): (
            "cannot listen on nonexistent.invalid:0"
        ),
    }
    if loop != "asyncio":
        return io_rows
    return io_rows | {
        # URLs: what people type instead of ws://
        ("call", "ftp://127.0.0.1:1", "add"): "scheme 'ftp' is not ws, wss, http or https",
        ("call", "ws://127.0.0.1:99999", "add"): "port out of range",
        ("call", "ws://[::1", "add"): "invalid ipv6 url",
        ("call", "ws://127.0.0.1:1/#top", "add"): "fragment",
        ("call", "localhost:http", "add"): "invalid server url 'localhost:http'",
        ("tail", "ftp://x", "run"): "scheme 'ftp'",
        # Arguments
        ("call", url, "add", "a=1", "2"): "positional argument '2' after keyword arguments",
        ("call", url, "add", "a=1", "a=2"): "keyword argument 'a' given twice",
        ("call", url, "add", "timeout=1"): "keyword argument 'timeout' is reserved",
        ("call", url, "add", "--timeout", "-1"): "argument --timeout: -1 is not a positive number",
        ("call", url): "the following arguments are required: method",
        ("tail", url, "run", "--max-attempts", "0"): "--max-attempts 0: at least 1",
        ("nope",): "invalid choice: 'nope'",
        ("--loop", "uv", "call", url, "add"): "argument --loop: invalid choice: 'uv'",
        # TLS files
        ("call", "ws://127.0.0.1:1", "add", "--cafile", "x.pem"): "--cafile applies to wss://",
        ("call", "wss://127.0.0.1:1", "add", "--cafile", str(tmp / "no.pem")): (
            f"--cafile {tmp / 'no.pem'}: no such file"
        ),
        ("call", "wss://127.0.0.1:1", "add", "--cafile", str(garbage)): f"--cafile {garbage}",
        ("serve", "--keyfile", "k.pem"): "--keyfile needs --certfile",
        ("serve", "--port", "0", "--certfile", "/nope.pem"): "--certfile /nope.pem: no such file",
        ("serve", "--port", "0", "--certfile", str(garbage)): f"--certfile {garbage}: not usable",
        # Apps and stores
        ("serve", "--port", "0", "no.such.module:app"): "cannot import 'no.such.module'",
        ("serve", "--port", "0", "examples.llm"): "app must be module:attribute",
        ("serve", "--port", "0", "examples.llm:nothing"): "has no attribute 'nothing'",
        ("serve", "--port", "0", "examples.llm:time"): (
            "examples.llm:time is a module, not a router or a runserver"
        ),
        ("serve", "--port", "0", "--store", "postgres://x"): "unknown store 'postgres://x'",
        ("serve", "--port", "0", "--store", "sqlite:"): "sqlite store needs a path",
        ("serve", "--port", "0", "--store", "sqlite:/nonexistent/x.db"): (
            "--store sqlite:/nonexistent/x.db: directory '/nonexistent' does not exist"
        ),
        ("serve", "--port", "0", "tests.apps:router", "--store", "memory"): (
            "--store applies to runserver apps only"
        ),
        ("serve", "--port", "70000"): "port 70000 is not in 0-65535",
    }


def run(args: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rpcstream", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=30,
    )


def test_every_bad_input_is_one_line_naming_the_problem(
    server: str, loop: str, tmp_path: Path
) -> None:
    rows = table(server, tmp_path, loop)
    # --loop goes before the command; rows that test --loop itself keep theirs.
    commands = [args if args[0] == "--loop" else ("--loop", loop, *args) for args in rows]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, commands))
    wrong = []
    for (args, says), result in zip(rows.items(), results, strict=True):
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        if (
            result.returncode == 0
            or len(lines) != 1
            or "Traceback" in result.stderr
            or says.lower() not in lines[0].lower()
        ):
            wrong.append(f"{' '.join(args)}\n  exit {result.returncode}: {result.stderr!r}")
    assert not wrong, f"{len(wrong)} of {len(rows)} rows:\n" + "\n".join(wrong)

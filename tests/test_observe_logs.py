"""Logs as an operator reads them: ``rpcstream serve --log-level/--log-format``, run
as a real subprocess, and the JSON formatter."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from typing import IO, Any

import anyio
import pytest

import rpcstream
from rpcstream.observe.logs import JsonFormatter, configure_logging
from tests.test_cli import ENV, ROOT


class Served:
    """``rpcstream serve tests.apps:router`` with its stderr read line by line."""

    def __init__(self, process: subprocess.Popen[str], url: str) -> None:
        self.process = process
        self.url = url
        assert process.stderr is not None
        self.stderr: IO[str] = process.stderr

    def lines_until(self, predicate: Any) -> list[str]:
        """stderr lines up to and including the first that ``predicate`` accepts
        (each read blocks until the server writes it: the test's timeout bounds it)."""
        lines = []
        while True:
            line = self.stderr.readline()
            assert line, f"the server's stderr ended; so far: {lines}"
            lines.append(line.rstrip("\n"))
            if predicate(lines[-1]):
                return lines


@contextlib.contextmanager
def serve(loop: str, *options: str) -> Iterator[Served]:
    with subprocess.Popen(
        [sys.executable, "-m", "rpcstream", "--loop", loop, "serve", "tests.apps:router", *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=ENV,
    ) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert " on ws://127.0.0.1:" in line, line
            yield Served(process, line.split(" on ")[1].strip())
        finally:
            process.terminate()
            process.wait(timeout=10)


@pytest.fixture(params=["asyncio", "trio"])
def loop(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def calls(url: str, loop: str) -> dict[str, Any]:
    """One connection: a good call, then one whose handler raises ZeroDivisionError."""
    out: dict[str, Any] = {}

    async def main() -> None:
        async with rpcstream.connect(url) as peer:
            out["echo"] = await peer.call("echo", 1)
            with pytest.raises(rpcstream.InternalError) as info:
                await peer.call("divide", 1, 0)
            out["error"] = info.value.message

    anyio.run(main, backend=loop)
    return out


def test_serve_logs_json_lines_for_connections_and_a_failing_handler(loop: str) -> None:
    with serve(loop, "--port", "0", "--log-format", "json") as served:
        assert calls(served.url, loop) == {
            "echo": 1,
            "error": "ZeroDivisionError: internal error (see the server log)",
        }
        lines = served.lines_until(lambda line: "connection closed from" in line)
        records = [json.loads(line) for line in lines]  # every line is one JSON object
        for r in records:
            assert {"time", "level", "logger", "message"} <= r.keys(), r
            assert r["time"].endswith("Z")
        opened = [r for r in records if r["message"].startswith("connection opened")]
        failed = [r for r in records if r["level"] == "ERROR"]
        closed = records[-1]
        assert len(opened) == 1 and opened[0]["level"] == "INFO"
        assert opened[0]["logger"] == "rpcstream.server"
        assert opened[0]["remote_address"].startswith("127.0.0.1:")
        assert opened[0]["principal"] is None
        # The handler's exception: once, with its traceback, method and peer.
        assert len(failed) == 1, failed
        assert failed[0]["logger"] == "rpcstream.peer"
        assert failed[0]["method"] == "divide"
        assert failed[0]["remote_address"] == opened[0]["remote_address"]
        assert "Traceback" in failed[0]["exception"]
        assert "ZeroDivisionError: float division by zero" in failed[0]["exception"]
        assert closed["level"] == "INFO" and closed.get("code") == 1000, closed
        assert closed["remote_address"] == opened[0]["remote_address"]
        assert 0 <= closed["duration"] < 60


def test_serve_logs_text_at_the_level_asked(loop: str) -> None:
    with serve(loop, "--port", "0", "--log-level", "warning") as served:
        calls(served.url, loop)
        # At WARNING the connection lines (INFO) are left out: the first line is the failure.
        lines = served.lines_until(lambda line: "Traceback" in line)
        assert " ERROR rpcstream.peer: handler 'divide' failed (peer 127.0.0.1:" in lines[0]
        assert len(lines) == 2, lines


def test_log_options_refuse_unknown_values_in_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rpcstream", "serve", "--log-format", "xml"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=30,
    )
    assert result.returncode == 2
    assert "invalid choice: 'xml'" in result.stderr


def test_the_json_formatter_writes_extra_fields_and_what_json_cannot_hold_as_text() -> None:
    record = logging.LogRecord("rpcstream.x", logging.WARNING, "f.py", 1, "hi %s", ("you",), None)
    record.remote_address = "127.0.0.1:5"
    record.thing = object()
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "hi you"
    assert line["level"] == "WARNING" and line["logger"] == "rpcstream.x"
    assert line["remote_address"] == "127.0.0.1:5"
    assert line["thing"].startswith("<object object")


def test_configure_logging_replaces_the_root_handlers_and_checks_its_arguments() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = io.StringIO()
    try:
        configure_logging("debug", "json", stream=out)
        logging.getLogger("rpcstream.test").debug("quiet %d", 1)
        assert json.loads(out.getvalue())["message"] == "quiet 1"
        with pytest.raises(ValueError, match="unknown log level"):
            configure_logging("loud")
        with pytest.raises(ValueError, match="unknown log format"):
            configure_logging("info", "xml")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("websockets").setLevel(logging.NOTSET)

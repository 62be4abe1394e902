"""The rpcstream command, run as a subprocess (console script and python -m)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from rpcstream import __version__ as rpcstream_version

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def rpcstream(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rpcstream", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=timeout,
    )


@pytest.fixture(params=["asyncio", "trio"])
def loop(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.contextmanager
def serving(*args: str, expect: str = " on ws://127.0.0.1:") -> Iterator[str]:
    """``rpcstream serve ARGS`` on a free port; yields the URL it prints when ready."""
    with subprocess.Popen(
        [sys.executable, "-m", "rpcstream", *args, "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=ENV,
    ) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()  # blocks until the server prints its URL
            assert expect in line, line
            yield line.split(" on ")[1].strip()
        finally:
            process.terminate()
            process.wait(timeout=10)


@pytest.fixture
def server(tmp_path: Path, loop: str) -> Iterator[str]:
    """``rpcstream serve`` of the built-in demo app on a free port, SQLite store."""
    store = f"sqlite:{tmp_path / 'runs.db'}"
    with serving(
        "--loop",
        loop,
        "serve",
        "--store",
        store,
        expect="serving rpcstream.demo:runs on ws://127.0.0.1:",
    ) as url:
        yield url


def test_every_command_has_help() -> None:
    for command in ["serve", "call", "stream", "tail", "demo", "bench"]:
        result = rpcstream(command, "--help")
        assert result.returncode == 0, result.stderr
        assert f"usage: rpcstream {command}" in result.stdout


def test_the_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "rpcstream"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert "serve" in result.stdout and "tail" in result.stdout


def test_call_prints_the_json_result_reading_each_argument_as_json_or_string(
    server: str, loop: str
) -> None:
    result = rpcstream("--loop", loop, "call", server, "add", "1", "2")
    assert (result.returncode, result.stdout.strip()) == (0, "3"), result.stderr
    run = rpcstream("call", server, "runs.start", "ml-inference", '{"prompt": "hi", "tokens": 3}')
    assert run.returncode == 0, run.stderr
    assert set(json.loads(run.stdout)) == {"run_id", "stream_id", "created"}


def test_tail_prints_a_runs_events_as_json_lines_after_an_id(server: str, loop: str) -> None:
    run = rpcstream("call", server, "runs.start", "ml-inference", '{"prompt": "x", "tokens": 4}')
    run_id = json.loads(run.stdout)["run_id"]
    result = rpcstream("--loop", loop, "tail", server, run_id, "--after", "2")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["id"] for e in events] == [3, 4, 5, 6, 7]
    assert [e["type"] for e in events] == ["token"] * 4 + ["complete"]
    assert "run ended: complete after 5 events" in result.stderr


def test_errors_are_one_clear_line_and_a_non_zero_exit(server: str) -> None:
    cases = {
        ("call", server, "nope"): "rpcstream call: error [method_not_found] no method 'nope'",
        ("tail", server, "no-such-run"): "rpcstream tail: error [run_not_found]",
        ("call", server, "add", "1", "x"): "rpcstream call: error [invalid_params]",
        ("call", "ws://127.0.0.1:9", "add"): "rpcstream call: cannot connect to ws://127.0.0.1:9",
        ("serve", "no.such.module:app"): "rpcstream serve: cannot import 'no.such.module'",
        ("serve", "--store", "postgres://x"): "rpcstream serve: unknown store 'postgres://x'",
    }
    for args, message in cases.items():
        result = rpcstream(*args)
        assert result.returncode == 1, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), (args, result.stderr)


def test_serve_runs_a_module_attribute_app() -> None:
    with serving("serve", "tests.apps:router") as url:
        result = rpcstream("call", url, "echo", '{"a": [1, 2]}')
        assert result.stdout.strip() == '{"a":[1,2]}'


def test_version_prints_the_package_version() -> None:
    result = rpcstream("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"rpcstream {rpcstream_version}")


def test_arguments_are_json_else_strings_and_name_value_is_a_keyword(loop: str) -> None:
    with serving("serve", "tests.apps:router") as url:
        cases = {
            ("42",): "42",
            ("hello",): '"hello"',  # not JSON: a string, no quoting needed
            ("42", "--strings"): '"42"',  # every value a string
            ('"a=b"',): '"a=b"',  # JSON-quoted: positional, even with an =
            ("value=[1, 2]",): "[1,2]",  # a keyword argument, its value JSON
            ("value=hi there",): '"hi there"',
        }
        for args, printed in cases.items():
            result = rpcstream("--loop", loop, "call", url, "echo", *args)
            assert (result.returncode, result.stdout.strip()) == (0, printed), (args, result)


def test_http_urls_and_a_bare_host_port_reach_the_server(server: str, loop: str) -> None:
    hostport = server.removeprefix("ws://")
    for url in (f"http://{hostport}", hostport):
        result = rpcstream("--loop", loop, "call", url, "add", "a=1", "b=2")
        assert (result.returncode, result.stdout.strip()) == (0, "3"), result.stderr


def test_stream_prints_each_item_as_a_json_line(server: str, loop: str) -> None:
    run = rpcstream("call", server, "runs.start", "ml-inference", '{"prompt": "x", "tokens": 3}')
    run_id = json.loads(run.stdout)["run_id"]
    result = rpcstream("--loop", loop, "stream", server, "runs.subscribe", run_id, "after=1")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["id"] for e in events] == [2, 3, 4, 5, 6]
    assert events[-1]["type"] == "complete"


def test_tail_says_when_it_retries_then_gives_up_in_one_more_line(loop: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"ws://127.0.0.1:{s.getsockname()[1]}"
    result = rpcstream("--loop", loop, "tail", dead, "run", "--max-attempts", "3")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    refused = f"rpcstream tail: cannot connect to {dead}: Connection refused"
    assert [line.split("; retrying in ")[0] for line in lines[:2]] == [refused, refused]
    assert [line.split(" s ")[1] for line in lines[:2]] == ["(attempt 2 of 3)", "(attempt 3 of 3)"]
    assert lines[2:] == [f"{refused} (gave up after 3 attempts)"], result.stderr


def test_the_demo_resumes_after_the_cut_with_no_gap(loop: str) -> None:
    result = rpcstream("--loop", loop, "demo", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "[server cuts the connection after event 17]" in result.stdout
    assert "[reconnected; resumed after event 17]" in result.stdout
    assert "no gap, no duplicate" in result.stdout


def test_bench_prints_json_lines() -> None:
    result = rpcstream("bench", "--suite", "store", "--quick", timeout=120)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert {r["bench"] for r in records} >= {"append_one_run", "replay"}
    assert all(r["events_per_s"] > 0 for r in records)


def test_serve_call_and_tail_over_tls_with_a_private_ca(tmp_path: Path, loop: str) -> None:
    ca = trustme.CA()
    ca_file, chain = tmp_path / "ca.pem", tmp_path / "server.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(chain))
    with serving("--loop", loop, "serve", "--certfile", str(chain), expect=" on wss://") as url:
        ok = rpcstream("--loop", loop, "call", url, "add", "1", "2", "--cafile", str(ca_file))
        assert (ok.returncode, ok.stdout.strip()) == (0, "3"), ok.stderr
        run = rpcstream(
            "call", url, "runs.start", "ml-inference", '{"prompt": "x", "tokens": 2}',
            "--cafile", str(ca_file),
        )  # fmt: skip
        run_id = json.loads(run.stdout)["run_id"]
        tail = rpcstream("--loop", loop, "tail", url, run_id, "--cafile", str(ca_file))
        assert tail.returncode == 0, tail.stderr
        assert [json.loads(e)["type"] for e in tail.stdout.splitlines()][-1] == "complete"
        # Without the CA, the system's CAs do not know this certificate: one line.
        refused = rpcstream("call", url, "add", "1", "2")
        assert refused.returncode == 1
        assert "CERTIFICATE_VERIFY_FAILED" in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr


def test_tls_options_that_cannot_apply_are_refused_in_one_line(tmp_path: Path) -> None:
    cases = {
        ("call", "ws://127.0.0.1:9", "add", "--cafile", "x.pem"): "--cafile applies to wss://",
        ("serve", "--port", "0", "--keyfile", "k.pem"): "--keyfile needs --certfile",
        ("serve", "--port", "0", "--certfile", str(tmp_path / "missing.pem")): "rpcstream serve:",
    }
    for args, message in cases.items():
        result = rpcstream(*args)
        assert result.returncode == 1, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)

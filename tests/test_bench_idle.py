"""bench_idle holds connections open from client processes and reports the server's
memory per connection: the figure is reported, never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_both_servers_hold_every_connection_and_report_memory_per_connection() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_idle", "--connections", "6"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=100, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["impl"] for line in lines] == ["raw", "rpcstream"]
    for line in lines:
        assert line["connections"] == 6
        assert line["server_rss_after_kib"] > 0 and "kib_per_connection" in line
    assert "ratio_to_baseline" in lines[1] or lines[0]["kib_per_connection"] == 0


def test_too_few_connections_is_a_usage_error() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_idle", "--connections", "1"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "at least" in done.stderr

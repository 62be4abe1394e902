"""fanout_instructions' children run to the end (each round waits until every
connection has its message, so finishing is the check); valgrind is not needed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
@pytest.mark.parametrize("impl", ["raw", "rpcstream", "runs_raw", "runs_rpcstream"])
@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_each_child_delivers_every_event_to_every_connection(impl: str, loop: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.fanout_instructions", "--child", f"{impl}:{loop}:4:3"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=100, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr

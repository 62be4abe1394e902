"""The suite's own harness: a hung async test fails alone, on both loops, and the run goes on."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HUNG = """
import anyio
import pytest


@pytest.mark.anyio
async def test_hangs_in_a_task_group() -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.sleep_forever)
        await anyio.Event().wait()


@pytest.mark.anyio
async def test_after_it() -> None:
    await anyio.sleep(0)
"""


@pytest.mark.timeout(60)
def test_a_hung_async_test_fails_where_it_waits_and_the_run_goes_on(tmp_path: Path) -> None:
    shutil.copy(Path(__file__).parent / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_hung.py").write_text(HUNG)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "anyio", "-p", "no:cacheprovider",
         "--timeout", "4", "-q", "-W", "error", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, timeout=50, check=False,
    )  # fmt: skip
    # Without the harness's deadline pytest-timeout's signal left anyio's trio runner
    # waiting forever: this subprocess would time out instead of reporting.
    assert done.returncode == 1, done.stdout + done.stderr
    assert "2 failed, 2 passed" in done.stdout, done.stdout
    assert done.stdout.count("TimeoutError") >= 2

"""The instruction-count benchmark's workloads and arithmetic (valgrind itself is not run)."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks import bench_instructions as bench


@pytest.mark.anyio
@pytest.mark.parametrize(("workload", "impl"), bench.CASES)
async def test_each_child_workload_runs_and_checks_its_answers(workload: str, impl: str) -> None:
    await bench.CHILDREN[workload, impl](3)


def test_per_op_figures_are_differences_over_calls(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Invented counts: a fixed start-up cost plus a per-operation cost per case.
    per_op = {"W3raw": 100, "W3rpcstream": 150, "W3frpcstream": 110, "spawnnative": 40}
    per_op["spawnanyio"] = 120

    def fake_count(workload: str, impl: str, loop: str, n: int) -> int:
        return 5_000_000 + n * per_op[workload + impl]

    monkeypatch.setattr(bench, "count", fake_count)
    records: list[dict[str, Any]] = bench.measure("asyncio", 10)
    got = {(r["workload"], r["impl"]): r for r in records}
    assert got["W3", "raw"]["instructions_per_op"] == 100
    assert "ratio_to_baseline" not in got["W3", "raw"]
    assert got["W3", "rpcstream"]["ratio_to_baseline"] == 1.5
    assert got["W3f", "rpcstream"]["ratio_to_baseline"] == 1.1  # against W3's raw
    assert got["spawn", "anyio"]["ratio_to_baseline"] == 3.0
    assert len(capsys.readouterr().out.splitlines()) == len(bench.CASES)


def test_a_failed_child_is_an_error_not_a_figure(monkeypatch: pytest.MonkeyPatch) -> None:
    class Done:
        returncode = 1
        stderr = "valgrind: something broke"

    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: Done())
    with pytest.raises(RuntimeError, match="something broke"):
        bench.count("W3", "raw", "asyncio", 1)


@pytest.mark.parametrize(("loop", "expected"), [("asyncio", 3), ("trio", 2)])
def test_steps_count_what_the_event_loop_runs_per_operation(loop: str, expected: int) -> None:
    # spawn native: each operation starts a task (one step) and the main task
    # lets it run (one more step when it resumes); asyncio also runs the task's
    # done callback.
    per_op = (
        bench.steps("spawn", "native", loop, 20) - bench.steps("spawn", "native", loop, 0)
    ) / 20
    assert per_op == expected


def test_workloads_pick_the_cases_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[tuple[str, str]] = []

    def fake_count(workload: str, impl: str, loop: str, n: int) -> int:
        ran.append((workload, impl))
        return n

    monkeypatch.setattr(bench, "count", fake_count)
    bench.measure("trio", 10, ["W3f"])
    assert ran == [("W3f", "rpcstream")] * 2
    ran.clear()
    bench.measure("trio", 10, ["W3"])  # W3f is measured against W3's baseline
    assert ran == [("W3", "raw")] * 2 + [("W3", "rpcstream")] * 2 + [("W3f", "rpcstream")] * 2

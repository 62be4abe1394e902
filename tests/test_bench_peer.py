"""bench_peer runs as deployed, checks its answers and reports failures: no figure is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import bench_peer
from benchmarks.peer_measure import measure, summarise
from benchmarks.peer_procs import ChildFailed, spawn
from benchmarks.peer_workloads import QUICK, WorkloadFailed, WrongAnswer, check

ROOT = Path(__file__).resolve().parent.parent
MEASURED = ("W1", "W2", "W3", "W3f", "W4", "W5")


def _run(*args: str) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_peer", "--size", "tiny", *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=100, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def _by_case(lines: list[dict[str, Any]]) -> dict[tuple[Any, ...], dict[str, Any]]:
    return {(r["workload"], r.get("rtt_ms"), r["impl"]): r for r in lines if "workload" in r}


@pytest.mark.timeout(120)
def test_separate_processes_on_loopback_and_a_link_every_workload_verified() -> None:
    lines = _run("--rtt-ms", "0,5")
    assert lines[0]["meta"]["python"] == sys.version.split()[0]
    cases = _by_case(lines)
    for rtt in (0, 5):
        for workload in MEASURED:
            for impl in ("raw", "rpcstream"):
                line = cases[workload, rtt, impl]
                assert line["mode"] == "processes"
                assert line["verified"] is True, line
                assert "server_cpu_s" in line
                assert ("link_cpu_s" in line) == (rtt > 0)
            assert "ratio_to_raw" in cases[workload, rtt, "rpcstream"]
    for impl in ("raw", "rpcstream"):
        assert cases["slow", None, impl]["consumed_mib"] > 0
    table = bench_peer.markdown_tables(lines)
    assert "separate processes, a 5 ms, 1000 Mbit/s link" in table
    assert "separate processes, loopback" in table


@pytest.mark.timeout(120)
def test_one_process_mode_stays_as_an_option() -> None:
    lines = _run("--in-process", "--workloads", "W1,W3,W5")
    cases = _by_case(lines)
    for workload in ("W1", "W3", "W5"):
        for impl in ("raw", "rpcstream"):
            assert cases[workload, 0, impl]["mode"] == "in-process"
            assert cases[workload, 0, impl]["verified"] is True


@pytest.mark.parametrize(
    "args",
    [["--in-process", "--rtt-ms", "20"], ["--profile"], ["--rtt-ms", "-1"], ["--mbit", "0"]],
)
def test_contradictory_options_are_usage_errors(args: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        bench_peer.parse_args(args)
    assert info.value.code == 2


def test_on_a_link_sequential_calls_are_capped_by_time_not_by_count() -> None:
    assert QUICK.on_link(0).w3_calls == QUICK.w3_calls
    assert QUICK.on_link(0.020).w3_calls == 100  # 2 s of 20 ms round trips
    assert QUICK.on_link(10.0).w3_calls == 10  # never fewer than 10 samples


@pytest.mark.anyio
async def test_a_failed_run_becomes_an_error_with_its_details() -> None:
    async def refused() -> dict[str, Any]:
        raise WorkloadFailed("W5: 3 of 5 streams failed", {"failed_streams": {"Overloaded": 3}})

    async def wrong() -> dict[str, Any]:
        check(False, "W1: 3 items")
        return {}

    got = await measure(refused())
    assert got["error"] == "W5: 3 of 5 streams failed"
    assert got["failed_streams"] == {"Overloaded": 3}
    assert (await measure(wrong()))["error"] == "WrongAnswer: W1: 3 items"
    assert isinstance(WrongAnswer("x"), RuntimeError)


def test_a_workload_with_a_failed_run_reports_the_failure_and_no_ratio() -> None:
    ok = [{"items_per_s": v, "seconds": 1.0} for v in (3, 1, 2)]
    raw, rpc = summarise("W5", {"loop": "asyncio"}, ok, [*ok[:2], {"error": "refused"}])
    assert raw["items_per_s"] == 2 and raw["runs"] == [3, 1, 2] and raw["verified"]
    assert rpc["error"] == "refused" and rpc["failed_runs"] == 1
    assert "ratio_to_raw" not in rpc and "verified" not in rpc
    _, rpc = summarise("W5", {"loop": "asyncio"}, ok, ok)
    assert rpc["ratio_to_raw"] == 1.0 and rpc["target_met"] is False


def test_a_child_that_prints_no_address_is_an_error_and_is_stopped() -> None:
    with (
        pytest.raises(ChildFailed, match="not its address"),
        spawn([sys.executable, "-c", "print('hello')"]),
    ):
        pass


def test_a_child_is_stopped_when_the_run_fails() -> None:
    code = "import json, sys; print(json.dumps({'ready': 1}), flush=True); sys.stdin.read()"
    with pytest.raises(RuntimeError, match="boom"), spawn([sys.executable, "-c", code]) as child:
        assert child.info == {"ready": 1}
        raise RuntimeError("boom")
    assert child.proc.returncode == 0  # it saw stdin close and exited by itself


def test_the_stream_targets_are_the_issues_three_times_raw() -> None:
    # Issue 14 asks W1 and W5 for at least 3x raw websockets; 2.9x must not read as met.
    raw = [{"items_per_s": 100, "seconds": 1.0}]
    for workload in ("W1", "W5"):
        _, under = summarise(
            workload, {"loop": "asyncio"}, raw, [{"items_per_s": 290, "seconds": 1.0}]
        )
        _, over = summarise(
            workload, {"loop": "asyncio"}, raw, [{"items_per_s": 300, "seconds": 1.0}]
        )
        assert under["target_met"] is False and over["target_met"] is True

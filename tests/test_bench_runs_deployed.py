"""runs_deployed runs its children and checks every subscription: no figure is asserted."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from redis_server import require_redis_server

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.runs_deployed", "--tiny", *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=100, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.timeout(120)
def test_every_workload_runs_in_separate_processes_and_is_verified() -> None:
    lines = _run()
    assert lines[0]["bench"] == "environment" and lines[0]["cores"] == os.cpu_count()
    results = lines[1:]
    assert not [r for r in results if "error" in r]
    seen = {(r["store"], r["workload"], r.get("batch")) for r in results}
    for store in ("memory", "sqlite"):
        for workload in ("fanout", "fanout_shared", "runs", "append"):
            assert (store, workload, True) in seen
    assert ("memory", "replay", True) in seen and ("memory", "replay", False) in seen
    # fanout runs beside its raw-websockets baseline, then a line of medians.
    raw = [r for r in results if r.get("code") == "raw websockets"]
    assert [(r["store"], r["workload"]) for r in raw] == [
        ("memory", "fanout"),
        ("sqlite", "fanout"),
    ]
    summaries = [r for r in results if "summary" in r]
    assert [(r["store"], r["workload"]) for r in summaries] == [
        (s, "fanout") for s in ("memory", "sqlite")
    ]
    for r in summaries:
        assert r["verified"] is True, r
        assert {"p99_us", "baseline_p99_us", "ratio_to_baseline_p99_us"} <= set(r)
    for r in results:
        if "summary" in r:
            continue
        assert "server" in r["busy"]
        if r["workload"] == "append":
            _check_appends(r)
            continue
        assert r["verified"] is True, r
        if r["workload"] != "replay":
            assert {"p50_us", "p99_us", "messages_per_delivery"} <= set(r)
            assert r["deliveries"] == r["subscribers"] * r["events_per_run"]
        if r["workload"] == "runs":
            gcs = r["gc_full"]
            assert gcs["count"] >= 0 and gcs["max_ms"] <= gcs["total_ms"]
            # A connection with one subscription, and its run, are dozens of objects
            # at least: a count that missed the server's connections would be near 0.
            assert r["tracked_per_connection"] > 20, r
            # SQLite's group commits: each paced event appended, in at least one commit.
            if r["store"] == "sqlite":
                assert 1 <= r["store_commits"] <= r["runs"] * r["events_per_run"]
                assert r["appends_per_commit"] >= 1
            else:
                assert "store_commits" not in r  # the memory store has no group commit


@pytest.mark.timeout(120)
def test_the_census_and_a_collector_policy_reach_the_server() -> None:
    lines = _run(
        "--stores", "memory", "--workloads", "runs", "--census", "3",
        "--server-gc", "threshold=5000,freeze",
    )  # fmt: skip
    (r,) = lines[1:]
    assert r["verified"] is True, r
    # The policy was set in the server process, not here: it reports its own.
    assert r["server_gc"]["threshold"] == 5000 and r["server_gc"]["frozen"] > 1000, r
    for key in ("census_types", "census_coroutines", "census_tasks"):
        assert 1 <= len(r[key]) <= 3 and all(count > 0 for _, count in r[key]), r
    # The default: the interpreter's own threshold, nothing frozen.
    (default,) = _run("--stores", "memory", "--workloads", "runs")[1:]
    assert default["server_gc"] == {"threshold": gc.get_threshold()[0], "frozen": 0}, default


@pytest.mark.timeout(120)
def test_server_code_runs_the_server_on_that_copy(tmp_path: Path) -> None:
    # An A/B runs the server on another commit's package: it must not be this
    # checkout's (which python -m would put first on sys.path).
    shutil.copytree(ROOT / "rpcstream", tmp_path / "rpcstream")
    (r,) = _run("--stores", "memory", "--workloads", "runs", "--server-code", str(tmp_path))[1:]
    assert r["verified"] is True and r["code"] == "server-code", r
    assert Path(r["server_package"]) == tmp_path / "rpcstream", r
    (this,) = _run("--stores", "memory", "--workloads", "runs")[1:]
    assert Path(this["server_package"]) == ROOT / "rpcstream", this


def _check_appends(r: dict[str, Any]) -> None:
    """Every append of every flow was counted, beside the store alone doing the same."""
    assert r["events"] == r["flow_runs"] * 20 == r["baseline_events"]  # --tiny: 4 x 20
    assert r["events_per_s"] > 0 and r["baseline_events_per_s"] > 0


@pytest.mark.timeout(120)
def test_two_servers_on_one_redis_deliver_to_subscribers_on_both() -> None:
    require_redis_server()
    lines = _run("--stores", "redis", "--workloads", "runs,append")
    results = lines[1:]
    assert [(r["store"], r["workload"], r["nodes"]) for r in results] == [
        ("redis", "runs", 2),
        ("redis", "append", 2),
    ]
    paced, appended = results
    # Every run was started on node a; each has one subscriber on a and one on b.
    assert paced["verified"] is True, paced
    assert paced["subscribers"] == 2 * paced["runs"]
    assert paced["deliveries"] == paced["subscribers"] * paced["events_per_run"]
    assert set(paced["by_node"]) == {"a", "b"}
    assert {"server_a", "server_b"} <= set(paced["busy"])
    assert {"baseline_p50_us", "baseline_p99_us"} <= set(paced)
    # The appends were split between the two nodes; the store alone did the same.
    assert {"server_a", "server_b"} == set(appended["busy"])
    _check_appends(appended)


@pytest.mark.timeout(120)
def test_subscribers_without_batches_are_measured_too() -> None:
    lines = _run("--no-batch", "--stores", "memory", "--workloads", "runs,replay")
    results = lines[1:]
    assert {r["workload"] for r in results} == {"runs", "replay"}
    assert all(r["verified"] is True and r["batch"] is False for r in results)


@pytest.mark.timeout(120)
def test_runs_beside_raw_websockets_alternate_and_end_with_a_line_of_medians() -> None:
    lines = _run("--stores", "memory", "--workloads", "runs_raw", "--rounds", "2")
    results = lines[1:]
    rounds = [r for r in results if "summary" not in r]
    # Rounds alternate which goes first: raw, this, then this, raw.
    assert [r["code"] for r in rounds] == ["raw websockets", "this", "this", "raw websockets"]
    for r in rounds:
        assert r["verified"] is True, r
        # One run per connection on both sides: each subscriber got its own run's events.
        assert r["runs"] == r["subscribers"] == r["connections"]
        assert r["deliveries"] == r["subscribers"] * r["events_per_run"]
    (summary,) = [r for r in results if "summary" in r]
    assert summary["workload"] == "runs_raw" and summary["verified"] is True
    assert len(summary["baseline_p99_us_rounds"]) == len(summary["p99_us_rounds"]) == 2


@pytest.mark.timeout(120)
def test_clients_can_run_niced_so_that_the_server_gets_a_core_first() -> None:
    lines = _run("--stores", "memory", "--workloads", "runs_raw", "--clients-nice", "5")
    assert lines[0]["clients_nice"] == 5
    rounds = [r for r in lines[1:] if "summary" not in r]
    assert {r["code"] for r in rounds} == {"this", "raw websockets"}
    for r in rounds:
        assert r["verified"] is True, r
        assert r["clients_nice"] == 5, r  # what each client process read of itself

"""How ``bench_peer`` measures: a run's figures and CPU time, the targets, the lines."""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass

from .peer_workloads import Figures, WorkloadFailed


@dataclass(frozen=True)
class Target:
    """What rpcstream should reach, as a ratio to raw of the workload's main figure."""

    metric: str
    ratio: float
    higher_is_better: bool = True

    def met(self, ratio: float) -> bool:
        return ratio >= self.ratio if self.higher_is_better else ratio <= self.ratio

    def __str__(self) -> str:
        return f"{self.metric} {'>=' if self.higher_is_better else '<='} {self.ratio}x raw"


TARGETS = {
    "W1": Target("items_per_s", 3.0),
    "W2": Target("mb_per_s", 0.9),
    "W3": Target("p50_us", 1.2, higher_is_better=False),
    "W3f": Target("p50_us", 1.2, higher_is_better=False),
    "W4": Target("calls_per_s", 0.8),
    "W5": Target("items_per_s", 3.0),
}


# -- memory ------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mib() -> float | None:
    """The current resident set size in MiB (Linux only)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else round(kib / 1024, 1)


def peak_rss_mib() -> float:
    """The process's peak resident set size in MiB."""
    kib = _status_kib("VmHWM")
    if kib is None:  # not Linux: ru_maxrss is KiB on Linux and BSD, bytes on macOS
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kib = maxrss // 1024 if sys.platform == "darwin" else maxrss
    return round(kib / 1024, 1)


# -- one measurement, and the lines that report several --------------------------------


def proc_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) process ``pid`` has used so far; None off Linux."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    # After the command name: state is field 3, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


BUSY_MIN_SECONDS = 0.5  # CPU times tick in 10 ms: shorter runs give no useful share


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


async def measure(work: Awaitable[Figures], watch: dict[str, int] | None = None) -> Figures:
    """Run one measurement: its figures (or its error) and the CPU time it took.

    ``cpu_s`` is this process's; ``<name>_cpu_s`` that of each process in ``watch``
    (name: pid), e.g. the server's, so a line shows which side was the bottleneck:
    ``busy`` is each one's CPU time as a share of the workload's wall time.
    """
    watch = watch or {}
    before = {name: proc_cpu_s(pid) for name, pid in watch.items()}
    cpu = time.process_time()
    try:
        figures = await work
    except Exception as exc:  # a failed run is reported as such, and the others go on
        leaf = _first_leaf(exc)
        details = leaf.details if isinstance(leaf, WorkloadFailed) else {}
        name = "" if isinstance(leaf, WorkloadFailed) else f"{type(leaf).__name__}: "
        figures = {"error": f"{name}{leaf}", **details}
    out = {**figures, "cpu_s": round(time.process_time() - cpu, 3)}
    for name, pid in watch.items():
        after, start = proc_cpu_s(pid), before[name]
        if after is not None and start is not None:
            out[f"{name}_cpu_s"] = round(after - start, 3)
    if figures.get("seconds", 0) >= BUSY_MIN_SECONDS:
        busy = {"client": out["cpu_s"]} | {
            n: out[f"{n}_cpu_s"] for n in watch if f"{n}_cpu_s" in out
        }
        out["busy"] = {n: round(v / figures["seconds"], 2) for n, v in busy.items()}
    return out


def median_run(runs: list[Figures], metric: str) -> Figures:
    """The run with the median ``metric``, and every run's ``metric``."""
    ordered = sorted(runs, key=lambda r: r[metric])
    return {**ordered[len(ordered) // 2], "runs": [r[metric] for r in runs]}


def summarise(name: str, base: Figures, raws: list[Figures], rpcs: list[Figures]) -> list[Figures]:
    """The raw line and the rpcstream line for one workload's runs.

    A workload whose runs all succeeded reports its median run (``verified``: its
    answers were checked); one with a failed run reports the first failure instead,
    and no ratio.
    """
    target = TARGETS[name]
    base = {"workload": name, **base, "metric": target.metric}
    lines: list[Figures] = []
    for impl, runs in (("raw", raws), ("rpcstream", rpcs)):
        errors = [r for r in runs if "error" in r]
        if errors:
            lines.append({**base, "impl": impl, **errors[0], "failed_runs": len(errors)})
        else:
            lines.append(
                {**base, "impl": impl, **median_run(runs, target.metric), "verified": True}
            )
    raw, rpc = lines
    if "error" not in raw and "error" not in rpc:
        ratio = rpc[target.metric] / raw[target.metric]
        rpc.update(ratio_to_raw=round(ratio, 2), target=str(target), target_met=target.met(ratio))
    return lines

"""The examples run to completion on their own, on asyncio and on trio."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOOPS = ["asyncio", "trio"]


def run_example(name: str, *args: str) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("loop", LOOPS)
def test_peer_to_peer_streams_prices_one_way_and_orders_the_other(loop: str) -> None:
    out = run_example("peer_to_peer.py", "--loop", loop, "--ticks", "30")
    lines = out.splitlines()
    assert re.match(
        r"exchange serving on ws://127\.0\.0\.1:\d+, desk on ws://127\.0\.0\.1:\d+", lines[0]
    )
    quoted = [line for line in lines if line.startswith("exchange: ACME quoted at ")]
    seen = [line for line in lines if line.startswith("desk: saw ACME at ")]
    assert len(quoted) == len(seen) == 30
    # Every price the exchange quoted reached the desk, in order.
    assert [q.rsplit(" ", 1)[1] for q in quoted] == [s.rsplit(" ", 1)[1] for s in seen]
    sent = [line for line in lines if line.startswith("desk: sending order #")]
    filled = [line for line in lines if line.startswith("exchange: filled order #")]
    assert sent, "the desk sent no order"
    assert len(filled) == len(sent)
    assert f"desk: sent {len(sent)} orders" in lines
    assert f"exchange: filled {len(sent)} orders" in lines
    assert lines[-1] == "done"


@pytest.mark.parametrize("loop", LOOPS)
def test_chat_answers_each_line_then_says_goodbye(loop: str) -> None:
    out = run_example("chat.py", "--loop", loop)
    assert out.splitlines() == [
        "you> Hello there",
        "bot> Hello! What's your name?",
        "you> My name is Ada.",
        "bot> Nice to meet you, Ada.",
        "you> Streams go both ways on one connection",
        "bot> You said 7 words: 'noitcennoc eno no syaw htob og smaertS' backwards.",
        "you> Can you hear me?",
        "bot> Good question. All I know is how to stream.",
        "bot> Bye, Ada! We exchanged 4 lines.",
    ]

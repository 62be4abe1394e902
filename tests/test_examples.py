"""The examples run to completion on their own, on asyncio and on trio."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import rpcstream

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


@pytest.mark.anyio
async def test_fastapi_app_serves_its_routes_and_rpcstream_on_one_port_under_uvicorn() -> None:
    from tests.test_asgi import http_get, serving

    with serving("uvicorn", "examples.fastapi_app:app") as port:
        url = f"ws://127.0.0.1:{port}/rpc/"
        async with rpcstream.connect(url) as peer:
            assert await peer.call("add", 1, 2) == 3
            assert [i async for i in peer.stream("count", 3)] == [0, 1, 2]
            status, body, _ = await http_get(f"http://127.0.0.1:{port}/api/status")
            assert (status, json.loads(body)) == (200, {"connections": 1, "runs": 0})
        async with rpcstream.RunClient(url) as client:
            run_id = await client.start("countdown", {"start": 2, "delay": 0})
            events = [(e["type"], e["data"]) async for e in client.subscribe(run_id)]
        assert [e for e in events if e[0] != "started"] == [
            ("tick", 2),
            ("tick", 1),
            ("complete", "liftoff"),
        ]
        status, body, _ = await http_get(f"http://127.0.0.1:{port}/")
        assert status == 200 and b'from "/rpc/rpcstream.js"' in body
        assert (await http_get(f"http://127.0.0.1:{port}/rpc/readyz"))[:2] == (200, b"ready\n")


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the browser is the client
async def test_fastapi_apps_page_calls_streams_and_follows_a_run_in_a_browser() -> None:
    from tests.browser import CHROMIUM, cdp_session, launch
    from tests.test_asgi import serving

    if not os.access(CHROMIUM, os.X_OK):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true, so the browser tests must run, but {CHROMIUM} is missing")
        pytest.skip(f"{CHROMIUM} not found: install the Debian package chromium")
    browser = launch()
    try:
        with serving("uvicorn", "examples.fastapi_app:app") as port:
            async with cdp_session(browser.ws_url) as cdp:
                page = await cdp.new_page()
                await page.goto(f"http://127.0.0.1:{port}/")
                # Resolves once the page has written the run's last event.
                text = await page.evaluate(
                    """new Promise((resolve) => {
                      const out = document.getElementById("out");
                      const check = () => {
                        if (out.textContent.includes("complete")) resolve(out.textContent);
                      };
                      new MutationObserver(check).observe(
                        out, { childList: true, characterData: true, subtree: true });
                      check();
                    })"""
                )
                await page.close()
    finally:
        browser.close()
    assert text.splitlines() == [
        "add(1, 2) = 3",
        "count: 0",
        "count: 1",
        "count: 2",
        'started {"flow":"countdown"}',
        "tick 3",
        "tick 2",
        "tick 1",
        'complete "liftoff"',
    ]

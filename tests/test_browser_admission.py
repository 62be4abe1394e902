"""Admission that waits, in the browser module (rpcstream/static/rpcstream/admission.js).

A page's calls and stream calls beyond the server's advertised
``max_concurrent_handlers`` wait in the page for a slot instead of being refused
``OVERLOADED``; a wait gives up at its deadline or signal, is bounded by
``maxWaitingCalls``, and fails at once when the connection drops. As in
tests/test_browser.py: a real server on loopback (asyncio and trio), headless
Chromium driving the page, and waits on events, never sleeps.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

import rpcstream
from tests import test_browser
from tests.browser import Chromium, Page, cdp_session
from tests.test_browser import BLANK, SERVE, http_url, js

pytestmark = pytest.mark.anyio

chromium = test_browser.chromium  # one headless Chromium for the module, as there

# What the page's calls settle to: {"ok": value} or the error's name, code and message.
HELPERS = """
const outcome = (p) => p.then((ok) => ({ ok }),
  (e) => ({ error: e.name, code: e.code ?? null, message: e.message }));
const drain = async (stream) => {
  const xs = [];
  for await (const x of stream) xs.push(x);
  return xs;
};
"""


class Handlers:
    """``hold`` and ``ticks`` block on ``gate`` while they hold a slot, counting how
    many run at once; ``echo`` answers at once and ``endless`` never ends."""

    def __init__(self, expect: int) -> None:
        self.gate = anyio.Event()
        self.full = anyio.Event()  # set once ``expect`` handlers run at once
        self.expect = expect
        self.running = 0
        self.most = 0  # the most handlers that ever ran at once

    def enter(self) -> None:
        self.running += 1
        self.most = max(self.most, self.running)
        if self.running >= self.expect:
            self.full.set()

    def router(self) -> rpcstream.Router:
        router = rpcstream.Router()

        @router.method
        async def hold(i: int) -> int:
            self.enter()
            try:
                await self.gate.wait()
                return i
            finally:
                self.running -= 1

        @router.method
        async def ticks(i: int, n: int) -> AsyncIterator[int]:
            self.enter()
            try:
                await self.gate.wait()
                for k in range(n):
                    yield i * 10 + k
            finally:
                self.running -= 1

        @router.method
        async def echo(i: int) -> int:
            return i

        @router.method
        async def endless() -> AsyncIterator[int]:
            i = 0
            while True:
                yield i
                i += 1

        return router

    async def wait_full(self) -> None:
        with anyio.fail_after(20):
            await self.full.wait()


@contextlib.asynccontextmanager
async def page_on(
    chromium: Chromium, handlers: Handlers, connect: str = "{}", **options: Any
) -> AsyncIterator[tuple[rpcstream.Server, Page]]:
    """A server of ``handlers`` (with ``options``) and a tab on it whose
    ``window.peer`` is ``rs.connect("/", <connect>)``, after a ping: the server's
    settings (its first frame) arrived before the ping's answer."""
    async with (
        rpcstream.serve(handlers.router(), routes={"/": BLANK}, **SERVE, **options) as server,
        cdp_session(chromium.ws_url) as cdp,
    ):
        tab = await cdp.new_page()
        await tab.goto(http_url(server) + "/")
        await js(
            tab,
            f"window.peer = await rs.connect('/', {connect}); await peer.call(\"rpcstream.ping\");",
        )
        yield server, tab
        await tab.close()


async def test_calls_and_streams_beyond_the_servers_limit_wait_and_all_complete(
    chromium: Chromium,
) -> None:
    limit, calls, streams = 4, 20, 10
    handlers = Handlers(expect=limit)
    async with page_on(chromium, handlers, "{}", max_concurrent_handlers=limit) as (server, page):
        first = await js(
            page,
            HELPERS
            + """
            const limit = peer.remoteMaxConcurrentHandlers;
            window.results = [];
            for (let i = 0; i < args.calls; i++) results.push(outcome(peer.call("hold", [i])));
            for (let i = 0; i < args.streams; i++) {
              results.push(outcome(drain(peer.stream("ticks", [100 + i, 3]))));
            }
            return { limit, waiting: peer.stats.waitingCalls };
            """,
            calls=calls,
            streams=streams,
        )
        assert first == {"limit": limit, "waiting": calls + streams - limit}
        await handlers.wait_full()  # the first four run; the others wait in the page
        [served] = server.peers
        assert served.stats["running_handlers"] == limit
        assert (await js(page, "return peer.stats;"))["waitingCalls"] == calls + streams - limit
        handlers.gate.set()
        out = await js(
            page, "const r = await Promise.all(results); return [r, peer.stats.waitingCalls];"
        )
    results, waiting = out
    # None was refused OVERLOADED: every call answered, every stream whole.
    assert results[:calls] == [{"ok": i} for i in range(calls)]
    assert results[calls:] == [{"ok": [i * 10, i * 10 + 1, i * 10 + 2]} for i in range(100, 110)]
    assert waiting == 0
    assert handlers.most == limit  # the page never had more running on the server


async def test_a_wait_gives_up_at_its_deadline_or_signal_and_is_bounded(
    chromium: Chromium,
) -> None:
    handlers = Handlers(expect=1)
    connect = "{ maxWaitingCalls: 3 }"
    async with page_on(chromium, handlers, connect, max_concurrent_handlers=1) as (server, page):
        await js(page, HELPERS + 'window.held = outcome(peer.call("hold", [0]));')
        await handlers.wait_full()
        [served] = server.peers
        received = served.calls_received
        out = await js(
            page,
            HELPERS
            + """
            const out = { limit: peer.remoteMaxConcurrentHandlers };
            out.deadline = await outcome(peer.call("hold", [1], {}, { timeout: 0.05 }));
            const abort = new AbortController();
            const aborted = outcome(peer.call("hold", [2], {}, { signal: abort.signal }));
            out.waitingBeforeAbort = peer.stats.waitingCalls;
            abort.abort();
            out.abort = await aborted;
            out.streamDeadline = await outcome(
              drain(peer.stream("ticks", [3, 2], {}, { timeout: 0.05 })));
            const streamAbort = new AbortController();
            const stream = peer.stream("ticks", [4, 2], {}, { signal: streamAbort.signal });
            const streamAborted = outcome(drain(stream));
            streamAbort.abort();
            out.streamAbort = await streamAborted;
            const left = peer.stream("ticks", [5, 2]);
            out.waitingBeforeReturn = peer.stats.waitingCalls;
            await left.return();  // the consumer leaves before the stream started
            out.waitingAfter = peer.stats.waitingCalls;
            // The heartbeat takes no slot: the server answers it without a handler.
            out.ping = await outcome(peer.call("rpcstream.ping"));
            // The bound: three wait, the fourth call fails at once, as does a stream.
            window.queued = [
              outcome(peer.call("hold", [6])),
              outcome(drain(peer.stream("ticks", [7, 2]))),
              outcome(peer.call("hold", [8])),
            ];
            out.waiting = peer.stats.waitingCalls;
            out.bound = await outcome(peer.call("hold", [9]));
            try {
              peer.stream("ticks", [10, 2]);
              out.streamBound = "started";
            } catch (e) {
              out.streamBound = { error: e.name, code: e.code, typed: e instanceof rs.Overloaded };
            }
            return out;
            """,
        )
        # Nothing was sent for the calls that gave up or were refused: only the ping.
        assert served.calls_received == received + 1
        handlers.gate.set()
        rest = await js(page, "return [await held, ...(await Promise.all(queued))];")
    assert out["limit"] == 1
    assert out["deadline"] == {
        "error": "DeadlineExceeded",
        "code": 6,
        "message": "hold: no handler slot on the server within 0.05 s",
    }
    assert out["waitingBeforeAbort"] == 1
    assert out["abort"]["error"] == "AbortError"
    assert out["streamDeadline"]["error"] == "DeadlineExceeded"
    assert out["streamAbort"]["error"] == "AbortError"
    assert (out["waitingBeforeReturn"], out["waitingAfter"]) == (1, 0)
    assert out["ping"] == {"ok": None}
    assert out["waiting"] == 3
    assert out["bound"] == {
        "error": "Overloaded",
        "code": 7,
        "message": "3 calls wait for the server's 1 handler slots (maxWaitingCalls)",
    }
    assert out["streamBound"] == {"error": "Overloaded", "code": 7, "typed": True}
    assert rest == [{"ok": 0}, {"ok": 6}, {"ok": [70, 71]}, {"ok": 8}]
    assert handlers.most == 1


async def test_a_slot_given_up_is_free_on_both_sides_at_once(chromium: Chromium) -> None:
    # Limit 1: each slot given up (a stream left, a deadline, an abort) goes to the
    # next call in line at once, and the server, freeing it when the StreamCancel
    # or Cancel arrives (ahead of that call), refuses none of them.
    handlers = Handlers(expect=1)
    async with page_on(chromium, handlers, max_concurrent_handlers=1) as (_, page):
        out = await js(
            page,
            HELPERS
            + """
            const out = {};
            const echo = (...ids) => Promise.all(ids.map((i) => outcome(peer.call("echo", [i]))));
            const endless = peer.stream("endless");
            const afterStream = echo(1, 2, 3);
            out.waiting = peer.stats.waitingCalls;
            for await (const x of endless) break;  // StreamCancel
            out.afterStream = await afterStream;
            const timedOut = outcome(peer.call("hold", [0], {}, { timeout: 0.1 }));
            const afterDeadline = echo(4, 5);
            out.timedOut = (await timedOut).error;  // Cancel
            out.afterDeadline = await afterDeadline;
            const abort = new AbortController();
            const aborted = outcome(peer.call("hold", [0], {}, { signal: abort.signal }));
            const afterAbort = echo(6, 7);
            await peer.call("rpcstream.ping");  // takes no slot: the hold call is running
            abort.abort();  // Cancel
            out.aborted = (await aborted).error;
            out.afterAbort = await afterAbort;
            out.left = peer.stats.waitingCalls;
            return out;
            """,
        )
    assert out == {
        "waiting": 3,
        "afterStream": [{"ok": 1}, {"ok": 2}, {"ok": 3}],
        "timedOut": "DeadlineExceeded",
        "afterDeadline": [{"ok": 4}, {"ok": 5}],
        "aborted": "AbortError",
        "afterAbort": [{"ok": 6}, {"ok": 7}],
        "left": 0,
    }


async def test_a_dropped_connection_fails_the_waiting_calls_at_once(chromium: Chromium) -> None:
    handlers = Handlers(expect=1)
    async with page_on(chromium, handlers, "{}", max_concurrent_handlers=1) as (server, page):
        await js(
            page,
            HELPERS
            + """
            window.pending = [
              outcome(peer.call("hold", [0])),
              outcome(peer.call("hold", [1])),
              outcome(drain(peer.stream("ticks", [2, 2]))),
            ];
            """,
        )
        await handlers.wait_full()
        [served] = server.peers
        await served.aclose(1012, "test cut")  # as a restart would
        out = await js(
            page, "const r = await Promise.all(pending); return [r, peer.stats.waitingCalls];"
        )
        handlers.gate.set()
    results, waiting = out
    assert [r["error"] for r in results] == ["ConnectionClosed"] * 3
    assert all("code 1012" in r["message"] for r in results)
    assert waiting == 0


@pytest.mark.parametrize(("calls", "streams"), [(10_000, 0), (0, 1_000)])
async def test_many_calls_or_streams_at_once_work_at_the_servers_defaults(
    chromium: Chromium, calls: int, streams: int
) -> None:
    limit = 256  # the server's default max_concurrent_handlers
    handlers = Handlers(expect=limit)
    async with page_on(chromium, handlers) as (_, page):
        waiting = await js(
            page,
            HELPERS
            + """
            window.results = [];
            for (let i = 0; i < args.calls; i++) results.push(outcome(peer.call("hold", [i])));
            for (let i = 0; i < args.streams; i++) {
              results.push(outcome(drain(peer.stream("ticks", [i, 2]))));
            }
            return peer.stats.waitingCalls;
            """,
            calls=calls,
            streams=streams,
        )
        assert waiting == calls + streams - limit
        await handlers.wait_full()
        handlers.gate.set()
        out = await js(
            page,
            """
            const r = await Promise.all(results);
            const wrong = r.filter((x, i) => JSON.stringify(x.ok) !== JSON.stringify(
              i < args.calls ? i : [(i - args.calls) * 10, (i - args.calls) * 10 + 1]));
            return { n: r.length, wrong: wrong.slice(0, 3), waiting: peer.stats.waitingCalls };
            """,
            timeout=45,
            calls=calls,
        )
    assert out == {"n": calls + streams, "wrong": [], "waiting": 0}
    assert handlers.most == limit

"""The browser module (rpcstream/static/rpcstream.js) end to end, in headless Chromium.

Each test serves an app with ``rpcstream.serve`` on 127.0.0.1 in this process
and drives a Chromium tab over the DevTools protocol (``tests/browser.py``): the
page imports ``/rpcstream.js`` from the server and talks to it; the test waits
by awaiting promises the page resolves, never by sleeping.

Chromium is the Debian package (``/usr/bin/chromium``). Without it these tests
skip, except under ``CI=true``, where they fail: CI must run them.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import rpcstream
from benchmarks.link import LinkParams, open_link
from rpcstream import demo
from rpcstream.handshake import StaticFile
from tests.browser import CHROMIUM, Chromium, Page, cdp_session, launch, png_info

pytestmark = pytest.mark.anyio

CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}

BLANK = StaticFile("text/html; charset=utf-8", b"<!doctype html><title>rpcstream test</title>")

# Chromium keeps speculative (preconnected) sockets to an origin it has visited.
# They never send a request, and leaving serve() waits for every connection still
# in its opening handshake until open_timeout (10 s by default): keep it short.
SERVE: dict[str, Any] = {"open_timeout": 2.0}
LINK = LinkParams(rtt=0.020, rate=100e6)  # 20 ms, 800 Mbit/s (benchmarks/link.py)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Chromium]:
    """One headless Chromium for the module; each test opens its own tab."""
    if not os.access(CHROMIUM, os.X_OK):
        message = f"{CHROMIUM} not found: install the Debian package chromium"
        if CI:
            pytest.fail(f"CI=true, so the browser tests must run, but {message}", pytrace=False)
        pytest.skip(f"{message} (under CI=true this is a failure, not a skip)")
    browser = launch()
    try:
        yield browser
    finally:
        browser.close()


class State:
    """What the server's handlers saw, for the test to wait on."""

    def __init__(self) -> None:
        self._events: dict[str, anyio.Event] = {}
        self.produced = 0  # items the latest ``count`` stream produced
        self.notes: list[str] = []
        self.gate = anyio.Event()  # a paused ``ticks`` run continues when set

    def event(self, name: str) -> anyio.Event:
        if name not in self._events:
            self._events[name] = anyio.Event()
        return self._events[name]

    async def wait(self, name: str, timeout: float = 10) -> None:
        with anyio.fail_after(timeout):
            await self.event(name).wait()


TRICKY: list[Any] = [
    "é",
    "€uro",
    "😀 emoji",
    'quote " and \\ backslash',
    "control \n\t\x01 chars",
    "\u2028 separator",
    1.0,
    1e-7,
    -2.5e300,
    2**53,
    {"a": [1, 2, {"b": "ü"}], "c": None, "d": True},
    [],
    {},
    "",
]


def tricky_item(i: int) -> Any:
    """Payloads whose JSON text JavaScript would not write the same way (1.0, escapes,
    non-ASCII): the page must count credit on the bytes as they travel."""
    value = TRICKY[i % len(TRICKY)]
    return {"i": i, "v": value} if i % 3 else value


def make_app(state: State) -> rpcstream.RunServer:
    router = rpcstream.Router()

    @router.method
    async def add(a: int, b: int) -> int:
        return a + b

    @router.method
    async def greet(name: str) -> str:
        shout = await rpcstream.current_peer().call("shout", f"hello, {name}")
        return f"server heard: {shout}"

    @router.method
    async def ask_kwargs() -> Any:
        return await rpcstream.current_peer().call("describe", 7, unit="s")

    @router.method
    async def pull(n: int) -> list[int]:
        # A stream the page's async generator sends, 8 items of credit at a time.
        peer = rpcstream.current_peer()
        return [x async for x in peer.stream("countdown", n, window_items=8)]

    @router.method
    async def withdraw(amount: int) -> int:
        raise rpcstream.RemoteError(1001, "insufficient funds", {"balance": 100})

    @router.method
    async def store_down() -> None:
        raise rpcstream.StoreUnavailable("redis is down")

    @router.method
    async def slow(tag: str) -> None:
        state.event(f"started {tag}").set()
        try:
            await anyio.sleep(30)
        finally:
            state.event(f"cancelled {tag}").set()

    @router.method
    async def total(xs: AsyncIterator[int]) -> int:
        return sum([x async for x in xs])

    @router.method
    async def note(text: str) -> None:
        state.notes.append(text)
        state.event("note").set()

    @router.method
    async def count(n: int) -> AsyncIterator[int]:
        for i in range(n):
            state.produced = i + 1
            if state.produced == 11:
                state.event("produced 11").set()
            yield i

    @router.method
    async def produced() -> int:
        return state.produced

    @router.method
    async def forever() -> AsyncIterator[int]:
        i = 0
        try:
            while True:
                yield i
                i += 1
        finally:
            state.event("forever closed").set()

    @router.method
    async def tricky(n: int) -> AsyncIterator[Any]:
        for i in range(n):
            yield tricky_item(i)

    @router.method
    async def whoami() -> Any:
        return rpcstream.current_principal()

    runs = rpcstream.RunServer(router=router)

    @runs.flow("ticks")
    async def ticks(ctx: rpcstream.RunContext, n: int, pause_at: int = -1, pad: int = 0) -> None:
        for i in range(n):
            if i == pause_at:
                await state.gate.wait()
            await ctx.client.send("tick", [i, "x" * pad] if pad else i)

    return runs


@pytest.fixture
def state() -> State:
    return State()


@pytest.fixture
async def server(state: State) -> AsyncIterator[rpcstream.Server]:
    # A 16-item window for what the server receives: the page's stream senders
    # wait for credit often.
    async with rpcstream.serve(
        make_app(state), routes={"/": BLANK}, window_items=16, **SERVE
    ) as srv:
        yield srv


def http_url(server: rpcstream.Server) -> str:
    return f"http://127.0.0.1:{server.port}"


@pytest.fixture
async def page(chromium: Chromium, server: rpcstream.Server) -> AsyncIterator[Page]:
    async with cdp_session(chromium.ws_url) as cdp:
        tab = await cdp.new_page()
        await tab.goto(http_url(server) + "/")
        yield tab
        await tab.close()


async def js(page: Page, body: str, timeout: float = 20, **args: Any) -> Any:
    """Run ``body`` as an async function in the page, with ``rs`` (the module) and
    ``args`` in scope; return its JSON result."""
    source = (
        '(async (args) => { const rs = await import("/rpcstream.js");\n'
        f"{body}\n}})({json.dumps(args)})"
    )
    return await page.evaluate(source, timeout)


async def test_calls_both_ways_errors_deadlines_and_cancel(page: Page, state: State) -> None:
    out = await js(
        page,
        """
        const peer = await rs.connect("/", { router: {
          shout: async (text) => text.toUpperCase() + "!",
          async describe(x, kw) { return { x, kw, kwargs: this.kwargs, method: this.method }; },
          async *countdown(n) { for (let i = n; i > 0; i--) yield i; },
        } });
        window.peer = peer;
        const out = {};
        out.add = await peer.call("add", [1, 2]);
        out.addKw = await peer.call("add", [1], { b: 41 });
        out.greet = await peer.call("greet", ["ada"]);      // the server calls the page back
        out.describe = await peer.call("ask_kwargs");
        out.pull = await peer.call("pull", [100]);           // the page streams to the server
        const catching = async (p) => {
          try { await p; return null; } catch (e) {
            return { name: e.name, remote: e instanceof rs.RemoteError, code: e.code,
                     message: e.message, data: e.data ?? null };
          }
        };
        out.withdraw = await catching(peer.call("withdraw", [500]));
        out.missing = await catching(peer.call("nope"));
        out.invalid = await catching(peer.call("add", ["x", 1]));
        out.unavailable = await catching(peer.call("store_down"));
        out.unavailableClass = await peer.call("store_down").catch(
          (e) => e instanceof rs.StoreUnavailable && e.code === rs.ErrorCode.UNAVAILABLE);
        const t0 = performance.now();
        out.deadline = await catching(peer.call("slow", ["deadline"], {}, { timeout: 0.2 }));
        out.deadlineMs = performance.now() - t0;
        async function* numbers(n) { for (let i = 1; i <= n; i++) yield i; }
        out.total = await peer.call("total", [numbers(5000)]);  // credit: 16 items at a time
        peer.notify("note", ["hello"]);
        return out;
        """,
    )
    assert out["add"] == 3 and out["addKw"] == 42
    assert out["greet"] == "server heard: HELLO, ADA!"
    assert out["describe"] == {
        "x": 7,
        "kw": {"unit": "s"},
        "kwargs": {"unit": "s"},
        "method": "describe",
    }
    assert out["pull"] == list(range(100, 0, -1))
    assert out["withdraw"] == {
        "name": "RemoteError",
        "remote": True,
        "code": 1001,
        "message": "insufficient funds",
        "data": {"balance": 100},
    }
    assert (out["missing"]["name"], out["missing"]["code"]) == ("MethodNotFound", 2)
    assert (out["invalid"]["name"], out["invalid"]["code"]) == ("InvalidParams", 3)
    assert (out["unavailable"]["name"], out["unavailable"]["code"]) == ("StoreUnavailable", 14)
    assert out["unavailable"]["message"] == "redis is down" and out["unavailableClass"] is True
    assert (out["deadline"]["name"], out["deadline"]["code"]) == ("DeadlineExceeded", 6)
    assert out["deadlineMs"] < 5000
    await state.wait("cancelled deadline")  # the server's handler was cancelled too
    assert out["total"] == 5000 * 5001 // 2
    await state.wait("note")
    assert state.notes == ["hello"]

    # Aborting a call's signal sends Cancel: the server's handler is cancelled.
    await js(
        page,
        """
        window.abort = new AbortController();
        window.aborted = peer.call("slow", ["abort"], {}, { signal: abort.signal })
          .then(() => "answered", (e) => e.name);
        """,
    )
    await state.wait("started abort")
    assert await js(page, "abort.abort(); return await aborted;") == "AbortError"
    await state.wait("cancelled abort")


async def test_streams_in_order_with_credit_flow_control(page: Page, state: State) -> None:
    out = await js(
        page,
        """
        const peer = await rs.connect("/");
        window.peer = peer;
        const big = peer.stream("count", [10000]);
        let n = 0, inOrder = true;
        for await (const x of big) { if (x !== n) inOrder = false; n++; }
        const tricky = [];
        const trickyStream = peer.stream("tricky", [3000], {}, { windowBytes: 64 });
        for await (const x of trickyStream) tricky.push(x);
        let taken = 0;
        for await (const x of peer.stream("forever")) if (++taken === 5) break;
        return { n, inOrder, maxBuffered: big.maxBuffered, window: big.windowItems, tricky };
        """,
        timeout=40,
    )
    assert (out["n"], out["inOrder"]) == (10000, True)
    # Never more than the window, which may have grown for this fast reader.
    assert out["maxBuffered"] <= out["window"]
    assert out["tricky"] == [tricky_item(i) for i in range(3000)]
    await state.wait("forever closed")  # breaking out of for-await sent StreamCancel

    # A page that does not read holds the server's sender: the window (10 items)
    # is sent, the generator produced one more, and nothing else moves.
    await js(page, 'window.slow = peer.stream("count", [1000], {}, { windowItems: 10 });')
    await state.wait("produced 11")
    held = await js(
        page,
        """
        await new Promise((resolve) => {
          const check = () => (slow.buffered >= 10 ? resolve() : setTimeout(check, 5));
          check();
        });
        return { buffered: slow.buffered, produced: await peer.call("produced") };
        """,
    )
    assert held == {"buffered": 10, "produced": 11}
    assert state.produced == 11
    rest = await js(
        page,
        """
        const items = [];
        for await (const x of slow) items.push(x);
        return {
          ok: items.every((x, i) => x === i), n: items.length,
          withinWindow: slow.maxBuffered <= slow.windowItems,
        };
        """,
    )
    assert rest == {"ok": True, "n": 1000, "withinWindow": True}
    assert state.produced == 1000


async def test_windows_grow_across_a_long_link_for_a_page_that_keeps_up(
    chromium: Chromium, server: rpcstream.Server
) -> None:
    # The page, its module and its WebSocket all come through a 20 ms link: a
    # 256-item window would cap a stream at 256 items per round trip.
    async with (
        open_link(LINK, [("127.0.0.1", server.port)]) as link,
        cdp_session(chromium.ws_url) as cdp,
    ):
        tab = await cdp.new_page()
        await tab.goto(f"http://127.0.0.1:{link.ports[0]}/")
        out = await js(
            tab,
            """
            const peer = await rs.connect("/");
            const fast = peer.stream("count", [20000]);
            let n = 0, inOrder = true;
            for await (const x of fast) { if (x !== n) inOrder = false; n++; }
            // A page slower than the link: items always wait, so its window stays.
            const slow = peer.stream("count", [60], {}, { windowItems: 16 });
            let m = 0;
            for await (const x of slow) {
              if (x === m) m++;
              await new Promise((resolve) => setTimeout(resolve, 10));
            }
            const rtt = peer._streams.rtt.seconds;
            peer.close();
            return {
              n, inOrder, fast: [fast.windowItems, fast.maxBuffered],
              m, slow: [slow.windowItems, slow.maxBuffered], rtt,
            };
            """,
            timeout=60,
        )
        await tab.close()
    assert (out["n"], out["inOrder"], out["m"]) == (20000, True, 60)
    window, most = out["fast"]
    assert window > 256 and most <= window, out["fast"]
    assert out["slow"][0] == 16 and out["slow"][1] <= 16, out["slow"]
    # Measured from credit, a round trip is never shorter than the link's.
    assert out["rtt"] is not None and out["rtt"] >= LINK.rtt, out["rtt"]


async def test_byte_windows_draw_from_one_receive_budget(page: Page) -> None:
    out = await js(
        page,
        """
        // 64 KiB for 8 streams: a floor of 4 KiB each, and 32 KiB of pool.
        const peer = await rs.connect("/", { maxStreams: 8, maxReceiveBuffer: 65536 });
        const first = peer.stream("count", [3]);
        const second = peer.stream("count", [3]); // both open at once: slots are free
        const opened = [first.windowBytes, second.windowBytes];
        const items = [];
        for await (const x of first) items.push(x);
        const third = peer.stream("count", [3]); // the first one's share is back
        for await (const x of third) items.push(x);
        for await (const x of second) items.push(x);
        // Options the peer refuses reject connect() (they used to leave it waiting).
        const refused = [];
        for (const bad of [{ maxStreams: 8, maxReceiveBuffer: 15 }, { windowItems: 0 }]) {
          try { await rs.connect("/", bad); refused.push(null); }
          catch (error) { refused.push(error.name); }
        }
        peer.close();
        return { opened, third: third.windowBytes, items, refused };
        """,
    )
    assert out["opened"] == [4096 + 32768, 4096]
    assert out["third"] == 4096 + 32768
    assert out["items"] == [0, 1, 2] * 3
    assert out["refused"] == ["RangeError", "RangeError"]


async def cut(server: rpcstream.Server) -> int:
    """Close every connection from the server side, as a restart would."""
    peers = list(server.peers)
    for peer in peers:
        await peer.aclose(1012, "test cut")
    return len(peers)


async def test_run_subscription_resumes_exactly_through_server_side_cuts(
    page: Page, server: rpcstream.Server, state: State
) -> None:
    n = 300
    run_id = await js(
        page,
        """
        // Windows that may not grow (maxWindow*): at each cut the server must
        // still hold events back, however fast this page reads.
        const client = new rs.RunClient(
          location.origin.replace(/^http/, "ws") + "/",
          { backoffBase: 0.05, maxWindowItems: 8, maxWindowBytes: 262144 },
        );
        window.client = client;
        window.states = [];
        client.onstatechange = (e) => states.push(e.detail.state);
        window.resumedAfter = [];
        client.addEventListener("resume", (e) => resumedAfter.push(e.detail.after));
        // Events of 8 KB: a batch (runs.subscribe's items are lists of events, up
        // to 64 KiB) holds 8 of them, so a window of 8 items leaves events that
        // the server still holds back at each cut.
        const runId = await client.start("ticks", { n: args.n, pause_at: 150, pad: 8000 });
        // A small window: at each cut the server still holds events back.
        window.sub = client.subscribe(runId, { windowItems: 8 });
        window.ids = [];
        let waiters = [];
        window.whenId = (id) => ids.length >= id ? Promise.resolve(ids.length)
          : new Promise((resolve) => waiters.push([id, resolve]));
        // The page stops reading at event 200 until the test lets it go on, so
        // the second cut finds events the server still holds back.
        let release;
        const held = new Promise((resolve) => (release = resolve));
        window.release = release;
        window.done = (async () => {
          for await (const event of sub) {
            ids.push(event.id);
            for (const [id, resolve] of waiters) if (event.id >= id) resolve(event.id);
            waiters = waiters.filter(([id]) => event.id < id);
            if (event.id === 200) await held;
          }
          return ids;
        })();
        return runId;
        """,
        n=n,
    )
    assert isinstance(run_id, str)
    await js(page, "return await whenId(50);")
    assert await cut(server) == 1  # the run is paused at its 150th tick: mid-run
    await js(page, "return await whenId(120);")
    state.gate.set()
    await js(page, "return await whenId(200);")
    assert await cut(server) == 1  # while the server holds events back
    await js(page, "release();")
    ids = await js(page, "return await done;")
    assert ids == list(range(1, n + 3))  # started, n ticks, complete: no gap, no duplicate
    info = await js(
        page,
        "return { connections: client.connections, states, resumedAfter, "
        "lastEventId: sub.lastEventId, resumes: sub.resumes };",
    )
    assert info["connections"] == 3 and info["resumes"] == 2, info
    assert info["lastEventId"] == n + 2
    assert len(info["resumedAfter"]) == 2 and info["resumedAfter"][0] >= 50
    assert info["states"][:2] == ["connecting", "open"]
    assert info["states"].count("reconnecting") == 2 and info["states"][-1] == "open"


async def test_start_with_a_run_id_starts_once_then_resumes_the_same_run(
    page: Page, server: rpcstream.Server
) -> None:
    result = await js(
        page,
        """
        const client = new rs.RunClient(location.origin.replace(/^http/, "ws") + "/");
        try {
          const first = await client.start("ticks", { n: 3 }, { runId: "chat-7" });
          const again = await client.start("ticks", { n: 99 }, { runId: "chat-7" });
          const types = [];
          for await (const event of client.subscribe(again)) types.push(event.type);
          let bad = null;
          try { await client.start("ticks", { n: 1 }, { runId: "no spaces" }); }
          catch (e) { bad = e.name; }
          return { first, again, types, bad };
        } finally { client.close(); }
        """,
    )
    assert result["first"] == result["again"] == "chat-7"
    assert result["types"] == ["started", "tick", "tick", "tick", "complete"]  # one run of n=3
    assert result["bad"] == "InvalidParams"


async def test_token_travels_as_access_token_and_reconnects_give_up(chromium: Chromium) -> None:
    def authenticate(request: rpcstream.HandshakeRequest) -> str | None:
        return "alice" if request.bearer_token == "s3cret" else None

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    state = State()
    async with (
        rpcstream.serve(
            make_app(state), authenticate=authenticate, routes={"/": BLANK}, **SERVE
        ) as server,
        cdp_session(chromium.ws_url) as cdp,
    ):
        tab = await cdp.new_page()
        await tab.goto(http_url(server) + "/")
        out = await js(
            tab,
            """
            const out = {};
            try { await rs.connect("/"); } catch (e) {
              out.refused = [e instanceof rs.ConnectionClosed, e.code];  // HTTP 401
            }
            const peer = await rs.connect("/", { token: "s3cret" });
            out.whoami = await peer.call("whoami");
            await peer.close();
            const r = await fetch("/rpcstream.d.ts");
            out.dts = [r.status, r.headers.get("content-type"),
                       (await r.text()).includes("export declare class RunClient")];
            const client = new rs.RunClient(`ws://127.0.0.1:${args.port}/`,
                                            { maxAttempts: 2, backoffBase: 0.01 });
            const states = [];
            client.onstatechange = (e) => states.push(e.detail.state);
            try { await client.start("ticks", { n: 1 }); } catch (e) {
              out.gaveUp = [e.name, e instanceof rs.ReconnectFailed,
                            e instanceof rs.ConnectionClosed];
            }
            out.states = states;
            return out;
            """,
            port=closed_port,
        )
        await tab.close()
    assert out["refused"] == [True, 1006]
    assert out["whoami"] == "alice"
    assert out["dts"] == [200, "application/typescript; charset=utf-8", True]
    assert out["gaveUp"] == ["ReconnectFailed", True, True]
    assert out["states"] == ["connecting", "reconnecting", "connecting", "failed"]


async def test_demo_page_streams_tokens_survives_a_drop_and_renders(
    chromium: Chromium, tmp_path: Path
) -> None:
    prompt, tokens = "Explain run streams", 40
    async with (
        rpcstream.serve(demo.make_app(), **SERVE) as server,
        cdp_session(chromium.ws_url) as cdp,
    ):
        tab = await cdp.new_page(width=1000, height=900)
        await tab.goto(http_url(server) + "/")
        await tab.evaluate(
            f"""(() => {{
              document.getElementById("prompt").value = {json.dumps(prompt)};
              document.getElementById("tokens").value = {tokens};
              document.getElementById("delay").value = 0.02;
              document.getElementById("start").click();
              return true;
            }})()"""
        )
        await tab.evaluate("demo.whenEvent(12)")
        await tab.evaluate('document.getElementById("drop").click(), true')  # the server drops us
        summary = await tab.evaluate("demo.whenDone()")
        page = await tab.evaluate(
            """(() => {
              const rect = document.getElementById("output").getBoundingClientRect();
              return {
                output: document.getElementById("output").innerText,
                progress: [document.getElementById("progress").value,
                           document.getElementById("progress").max],
                progressText: document.getElementById("progress-text").innerText,
                state: document.getElementById("state").innerText,
                log: document.getElementById("log").innerText,
                visible: rect.top >= 0 && rect.bottom <= innerHeight && rect.height > 0,
              };
            })()"""
        )
        png = await tab.screenshot()
        await tab.close()
    words = list(demo._fake_model(prompt, tokens))
    assert summary["error"] is None
    assert summary["words"] == words
    assert summary["ids"] == list(range(1, tokens + 4))  # started, status, tokens, complete
    assert summary["connections"] == 2 and summary["resumes"] == 1
    assert page["output"] == " ".join(words)
    assert page["visible"]
    assert page["progress"] == [tokens, tokens]
    assert page["progressText"] == f"{tokens} / {tokens} tokens"
    assert page["state"] == "connected (connection #2)"
    assert "code 1012: demo drop" in page["log"]
    assert "resumed: subscribed again after event" in page["log"]
    assert f"received events 1..{tokens + 3} in order" in page["log"]
    shot = tmp_path / "demo.png"
    shot.write_bytes(png)
    width, height, distinct_rows = png_info(shot.read_bytes())
    assert (width, height) == (1000, 900)
    assert distinct_rows > 100 and len(png) > 20_000  # text, not a blank page


def callee_probe_app() -> rpcstream.Router:
    """The server as the caller: what the page's handlers look like from Python."""
    router = rpcstream.Router()

    @router.method
    async def probe_boom() -> list[str]:
        try:
            await rpcstream.current_peer().call("boom")
        except rpcstream.RemoteError as exc:
            return [type(exc).__name__, exc.message]
        return ["no error"]

    @router.method
    async def probe() -> dict[str, Any]:
        peer = rpcstream.current_peer()
        out: dict[str, Any] = {"page_limit": peer.remote_max_concurrent_handlers}

        async def error_of(call: Any) -> list[Any]:
            try:
                await call
            except rpcstream.RemoteError as exc:
                return [type(exc).__name__, exc.message]
            return ["no error"]

        async def drain(method: str, *args: Any, **options: Any) -> list[Any]:
            return [x async for x in peer.stream(method, *args, **options)]

        out["boom"] = await error_of(peer.call("boom"))
        out["missing"] = await error_of(peer.call("nothere"))
        out["deadline"] = await error_of(peer.call("hang", timeout=0.1))
        with anyio.move_on_after(0.1):
            await peer.call("hang")  # cancelled: the page's handler sees its signal abort
        out["not_a_stream"] = await error_of(drain("unary"))
        out["not_unary"] = await error_of(peer.call("numbers", 3))
        out["stream_deadline"] = await error_of(drain("ticking", timeout=0.2))

        async def numbers() -> AsyncIterator[int]:
            for i in range(50):
                yield i

        out["sum"] = await peer.call("sum", numbers())  # a stream argument, to the page
        sid, squares = peer.receive_stream()  # a raw stream the page sends on our id
        await peer.call("send_squares", sid, 5)
        out["raw"] = [x async for x in squares]
        async with peer.stream("numbers", 1000) as items:
            async for x in items:
                if x == 3:
                    break  # the page's generator is closed
        out["log"] = await peer.call("log")
        return out

    return router


async def test_page_handlers_answer_like_python_ones_and_heartbeats_run(
    chromium: Chromium,
) -> None:
    async with (
        rpcstream.serve(callee_probe_app(), routes={"/": BLANK}, **SERVE) as server,
        cdp_session(chromium.ws_url) as cdp,
    ):
        tab = await cdp.new_page()
        await tab.goto(http_url(server) + "/")
        out = await js(
            tab,
            """
            const log = [];
            const aborted = (signal) => new Promise((_, reject) => {
              signal.addEventListener("abort", () => {
                log.push(`aborted: ${signal.reason.name}`);
                reject(signal.reason);
              });
            });
            const options = { pingInterval: 0.05, maxConcurrentHandlers: 7, exposeErrors: true };
            const peer = await rs.connect("/", { ...options, router: {
              async boom() { throw new TypeError("boom!"); },
              hang() { return aborted(this.signal); },
              async unary() { return 5; },
              async *numbers(n) {
                try { for (let i = 0; i < n; i++) yield i; } finally { log.push("numbers closed"); }
              },
              async *ticking() {
                for (let i = 0; ; i++) { await aborted(this.signal).catch(() => {}); yield i; }
              },
              async sum(xs) { let s = 0; for await (const x of xs) s += x; return s; },
              async send_squares(sid, n) {
                this.peer.sendStream((async function* () {
                  for (let i = 0; i < n; i++) yield i * i;
                })(), sid);
              },
              async log() { return log; },
            } });
            const out = await peer.call("probe");
            out.alive = !peer.isClosed;  // heartbeats (rpcstream.ping, answered) ran meanwhile
            out.stats = peer.stats;
            out.server_limit = peer.remoteMaxConcurrentHandlers;
            // By default a page, like Python, tells only the error's name.
            const quiet = await rs.connect("/", { router: {
              async boom() { throw new TypeError("a secret"); },
            } });
            out.quiet = await quiet.call("probe_boom");
            quiet.close();
            return out;
            """,
        )
        await tab.close()
    # Each side advertised its limits first (rpcstream.settings).
    assert (out["page_limit"], out["server_limit"]) == (7, 256)
    assert out["boom"] == ["InternalError", "TypeError: boom!"]  # the page opted in
    assert out["quiet"] == ["InternalError", "TypeError: internal error (see the browser console)"]
    assert out["missing"] == ["MethodNotFound", "no method 'nothere'"]
    # Both sides enforce the deadline: the page's answer or Python's own timer wins.
    assert out["deadline"][0] == "DeadlineExceeded"
    assert out["deadline"][1] in {
        "hang: deadline of 0.1 s exceeded",
        "hang: no answer within 0.1 s",
    }
    assert out["not_a_stream"] == [
        "MethodNotFound",
        "'unary' does not stream: call it with call()",
    ]
    assert out["not_unary"] == [
        "MethodNotFound",
        "'numbers' streams its result: call it with stream()",
    ]
    assert out["stream_deadline"][0] == "DeadlineExceeded"
    assert out["sum"] == sum(range(50))
    assert out["raw"] == [0, 1, 4, 9, 16]
    # hang() was stopped twice: by its deadline (or the Cancel Python sent at it), then by Cancel.
    assert out["log"][0] in {"aborted: DeadlineExceeded", "aborted: Cancelled"}
    assert out["log"][1] == "aborted: Cancelled"
    assert "numbers closed" in out["log"]
    assert out["alive"] is True
    assert out["stats"]["pendingCalls"] <= 1  # a heartbeat may be in flight
    assert out["stats"]["faultsReceived"] == 0


async def test_a_server_that_stops_answering_heartbeats_is_taken_for_dead(
    chromium: Chromium,
) -> None:
    router = rpcstream.Router()

    @router.method("rpcstream.ping")
    async def ping() -> None:
        await anyio.sleep(30)  # the heartbeat never gets an answer

    async with (
        rpcstream.serve(router, routes={"/": BLANK}, **SERVE) as server,
        cdp_session(chromium.ws_url) as cdp,
    ):
        tab = await cdp.new_page()
        await tab.goto(http_url(server) + "/")
        closed = await js(
            tab,
            """
            const peer = await rs.connect("/", { pingInterval: 0.05, pingTimeout: 0.1 });
            const pending = peer.call("rpcstream.ping").catch((e) => e.name);  // never answered
            const e = await peer.closed;
            return [e.name, e.code, e.reason, await pending];
            """,
        )
        with anyio.fail_after(10):
            await server.wait_idle()  # the page closed the socket too
        await tab.close()
    assert closed == [
        "ConnectionClosed",
        1006,
        "no answer to a heartbeat within 0.1 s",
        "ConnectionClosed",
    ]

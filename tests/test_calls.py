"""Calls both ways over a real WebSocket on 127.0.0.1, on asyncio and trio."""

from __future__ import annotations

import contextvars
import dataclasses
import math
import os
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc
import msgspec
import pytest

import rpcstream
from rpcstream.messages import MSGPACK, Error, Notify
from rpcstream.peer.driver import ANSWER
from rpcstream.testing import memory_peer_pair

pytestmark = pytest.mark.anyio


class User(msgspec.Struct):
    id: int
    name: str


@dataclasses.dataclass
class Point:
    x: float
    y: float


class Probe:
    """Events a test waits on, set by handlers."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.release = anyio.Event()
        self.finished = anyio.Event()
        self.deadline = math.inf
        self.notes: list[Any] = []
        self.noted = anyio.Event()


def make_router(probe: Probe) -> rpcstream.Router:
    router = rpcstream.Router()

    @router.method
    async def add(a: int, b: int) -> int:
        return a + b

    @router.method("users.get")
    async def get_user(user_id: int) -> User:
        return User(user_id, f"user{user_id}")

    @router.method
    async def norm(p: Point) -> Point:
        return Point(p.x * 2, p.y * 2)

    @router.method
    async def log(message: str) -> None:
        probe.notes.append(message)
        probe.noted.set()

    @router.method
    async def block() -> str:
        probe.started.set()
        try:
            await probe.release.wait()
            return "released"
        finally:
            probe.finished.set()

    @router.method
    async def see_deadline() -> float:
        probe.deadline = anyio.current_effective_deadline() - anyio.current_time()
        return probe.deadline

    @router.method
    async def fail() -> None:
        raise ValueError("something broke")

    @router.method
    async def refuse() -> None:
        raise rpcstream.RemoteError(1042, "not today", {"retry_after": 5})

    @router.method
    async def ask_client(x: int) -> int:
        # Calls back into the client while the client's own call is pending.
        return int(await rpcstream.current_peer().call("client_double", x)) + 1

    @router.method
    async def server_inc(x: int) -> int:
        return x + 1

    @router.method
    async def numbers(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    return router


def make_client_router() -> rpcstream.Router:
    router = rpcstream.Router()

    @router.method
    async def client_double(x: int) -> int:
        # Nested the other way: calls the server again from inside a callback.
        return 2 * int(await rpcstream.current_peer().call("server_inc", x))

    return router


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def server(probe: Probe) -> AsyncIterator[rpcstream.Server]:
    async with rpcstream.serve(make_router(probe), "127.0.0.1", 0) as srv:
        yield srv


async def test_calls_with_positional_and_keyword_parameters(server: rpcstream.Server) -> None:
    assert server.url == f"ws://127.0.0.1:{server.port}"
    async with rpcstream.connect(server.url) as peer:
        assert await peer.call("add", 1, 2) == 3
        assert await peer.call("add", a=1, b=2, timeout=5.0) == 3
        assert await peer.call("add", 1, b=2) == 3


@pytest.mark.parametrize("codec", ["msgpack", "json"])
async def test_structs_and_dataclasses_travel_in_both_codecs(
    server: rpcstream.Server, codec: str
) -> None:
    async with rpcstream.connect(server.url, codec=codec) as peer:
        assert await peer.call("users.get", 7) == {"id": 7, "name": "user7"}
        assert await peer.call("users.get", 7, result_type=User) == User(7, "user7")
        got = await peer.call("norm", {"x": 1.5, "y": -2}, result_type=Point)
        assert got == Point(3.0, -4.0)


async def test_a_notification_reaches_its_handler_without_an_answer(
    server: rpcstream.Server, probe: Probe
) -> None:
    async with rpcstream.connect(server.url) as peer:
        assert await peer.notify("log", "hello") is None
        await probe.noted.wait()
    assert probe.notes == ["hello"]


async def test_bad_parameters_are_invalid_params_with_msgspecs_message(
    server: rpcstream.Server,
) -> None:
    async with rpcstream.connect(server.url) as peer:
        with pytest.raises(rpcstream.InvalidParams, match=r"'a'.*Expected `int`, got `str`"):
            await peer.call("add", "one", 2)
        with pytest.raises(rpcstream.InvalidParams, match="missing required argument"):
            await peer.call("add", 1)
        with pytest.raises(rpcstream.InvalidParams, match="unexpected keyword argument 'c'"):
            await peer.call("add", 1, 2, c=3)
        with pytest.raises(rpcstream.InvalidParams, match="takes 2 positional arguments"):
            await peer.call("add", 1, 2, 3)
        assert (await peer.call("add", 1, 2)) == 3  # the connection carries on


async def test_standard_errors_carry_their_code(server: rpcstream.Server) -> None:
    async with rpcstream.connect(server.url) as peer:
        with pytest.raises(rpcstream.MethodNotFound) as nf:
            await peer.call("nope")
        assert nf.value.code == rpcstream.ErrorCode.METHOD_NOT_FOUND
        with pytest.raises(rpcstream.InternalError) as ie:
            await peer.call("fail")
        # By default only the type crosses the wire: the text may hold secrets.
        assert ie.value.message == "ValueError: internal error (see the server log)"
        assert ie.value.data is None  # nor the traceback
        with pytest.raises(rpcstream.RemoteError) as app:
            await peer.call("refuse")
        assert (app.value.code, app.value.message, app.value.data) == (
            1042,
            "not today",
            {"retry_after": 5},
        )
        with pytest.raises(rpcstream.MethodNotFound, match="streams its result"):
            await peer.call("numbers", 3)


async def test_error_text_and_tracebacks_cross_the_wire_only_when_the_server_opts_in(
    probe: Probe,
) -> None:
    async with (
        rpcstream.serve(make_router(probe), expose_errors=True) as server,
        rpcstream.connect(server.url) as peer,
    ):
        with pytest.raises(rpcstream.InternalError) as ie:
            await peer.call("fail")
    assert ie.value.message == "ValueError: something broke"
    assert "Traceback" in ie.value.data["traceback"]
    assert "something broke" in ie.value.data["traceback"]


async def test_nested_calls_both_ways_never_deadlock(server: rpcstream.Server) -> None:
    async with rpcstream.connect(server.url, router=make_client_router()) as peer:
        # client -> ask_client -> client_double -> server_inc, all pending at once
        assert await peer.call("ask_client", 5) == 2 * (5 + 1) + 1


async def test_a_slow_handler_never_holds_back_the_others(
    server: rpcstream.Server, probe: Probe
) -> None:
    async with rpcstream.connect(server.url) as peer, anyio.create_task_group() as tg:
        results: list[str] = []

        async def slow() -> None:
            results.append(await peer.call("block"))

        tg.start_soon(slow)
        await probe.started.wait()
        assert [await peer.call("add", i, i) for i in range(50)] == [2 * i for i in range(50)]
        probe.release.set()
    assert results == ["released"]


async def test_callers_beyond_the_advertised_limit_wait_for_a_slot_within_their_deadline(
    probe: Probe,
) -> None:
    async with (
        rpcstream.serve(make_router(probe), max_concurrent_handlers=1) as server,
        rpcstream.connect(server.url) as peer,
        anyio.create_task_group() as tg,
    ):
        assert await peer.call("rpcstream.ping") is None  # the settings came first
        assert peer.remote_max_concurrent_handlers == 1
        tg.start_soon(peer.call, "block")
        await probe.started.wait()
        [served] = server.peers
        received = served.calls_received
        # No slot before the deadline: nothing was sent, nothing refused.
        with pytest.raises(rpcstream.DeadlineExceeded, match="no handler slot"):
            await peer.call("add", 1, 2, timeout=0.05)
        assert served.calls_received == received
        assert peer.stats["waiting_calls"] == 0
        answers: list[int] = []

        async def add() -> None:
            answers.append(await peer.call("add", 1, 2))

        tg.start_soon(add)
        probe.release.set()
    assert answers == [3]


async def test_a_ping_takes_no_slot_and_a_stream_that_waited_sends_the_time_it_has_left(
    probe: Probe,
) -> None:
    router = make_router(probe)

    @router.method
    async def stream_deadline() -> AsyncIterator[float]:
        yield anyio.current_effective_deadline() - anyio.current_time()

    waited = 0.3
    async with (
        rpcstream.serve(router, max_concurrent_handlers=1) as server,
        rpcstream.connect(server.url) as peer,
        anyio.create_task_group() as tg,
    ):
        assert await peer.call("add", 1, 2) == 3  # the settings came first
        tg.start_soon(peer.call, "block")
        await probe.started.wait()
        with anyio.fail_after(10):  # the one slot is taken: a ping does not wait for it
            assert await peer.call("rpcstream.ping") is None
        stream = peer.stream("stream_deadline", timeout=30.0)
        remaining: list[float] = []

        async def read() -> None:
            remaining.extend([x async for x in stream])

        tg.start_soon(read)
        await anyio.sleep(waited)  # time passes while the stream waits for its slot
        probe.release.set()
    [left] = remaining
    # The server's deadline counts from the time the stream had left, not from 30 s.
    assert 0 < left <= 30.0 - waited


@pytest.mark.parametrize("kind", ["calls", "streams"])
async def test_ten_thousand_calls_or_a_thousand_streams_at_once_work_at_the_defaults(
    kind: str,
) -> None:
    router = rpcstream.Router()
    gate = anyio.Event()

    @router.method
    async def wait(i: int) -> int:
        await gate.wait()
        return i

    @router.method
    async def count(n: int) -> AsyncIterator[int]:
        await gate.wait()
        for i in range(n):
            yield i

    results: list[Any] = []
    n = 10_000 if kind == "calls" else 1_000
    async with rpcstream.serve(router) as server, rpcstream.connect(server.url) as peer:

        async def one(i: int) -> None:
            if kind == "calls":
                results.append(await peer.call("wait", i))
            else:
                results.append([x async for x in peer.stream("count", 3)])

        with anyio.fail_after(50):
            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(one, i)
                await anyio.lowlevel.checkpoint()
                gate.set()
        assert peer.stats["waiting_calls"] == 0
    if kind == "calls":
        assert sorted(results) == list(range(n))
    else:
        assert results == [[0, 1, 2]] * n


async def test_cancelling_the_caller_cancels_the_handler_on_the_other_side(
    server: rpcstream.Server, probe: Probe
) -> None:
    async with rpcstream.connect(server.url) as peer:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(peer.call, "block")
                await probe.started.wait()
                scope.cancel()
        assert scope.cancelled_caught
        await probe.finished.wait()  # the handler's finally ran
        assert not probe.release.is_set()
        assert await peer.call("add", 1, 1) == 2


async def test_a_timeout_raises_deadline_exceeded_and_cancels_the_handler(
    server: rpcstream.Server, probe: Probe
) -> None:
    async with rpcstream.connect(server.url) as peer:
        with pytest.raises(rpcstream.DeadlineExceeded) as info:
            await peer.call("block", timeout=0.2)
        assert isinstance(info.value, TimeoutError)
        await probe.finished.wait()


async def test_the_callers_timeout_travels_as_a_deadline_the_callee_enforces(
    server: rpcstream.Server, probe: Probe
) -> None:
    async with rpcstream.connect(server.url) as peer:
        remaining = await peer.call("see_deadline", timeout=30.0)
        assert 0 < remaining <= 30.0
        assert await peer.call("see_deadline") == math.inf


async def test_the_callee_answers_deadline_exceeded_when_its_deadline_passes() -> None:
    # Over memory, the caller's own timer is out of the picture: the Call frame
    # carries timeout=0.1 while the caller waits without one.
    router = rpcstream.Router()

    @router.method
    async def forever() -> None:
        await anyio.sleep_forever()

    async with memory_peer_pair(None, router) as (a, _b):
        driver = a._driver
        cid = driver.proto.send_call("forever", a.codec.empty_array, a.codec.empty_map, 0.1)
        answered = anyio.Event()
        driver.waiters.add(ANSWER, cid, answered.set)
        await answered.wait()
        answer = driver.proto.take_answer(cid)
        assert isinstance(answer, Error)
        assert answer.code == rpcstream.ErrorCode.DEADLINE_EXCEEDED


async def test_closing_the_client_fails_pending_calls_and_cancels_server_handlers(
    server: rpcstream.Server, probe: Probe
) -> None:
    async with rpcstream.connect(server.url) as peer:
        async with anyio.create_task_group() as tg:

            async def pending() -> None:
                with pytest.raises(rpcstream.ConnectionClosed):
                    await peer.call("block")

            tg.start_soon(pending)
            await probe.started.wait()
            await peer.aclose()
        await probe.finished.wait()
    await server.wait_idle()
    assert server.stats == {"connections": 0, "tasks": 0}


async def test_the_server_going_away_fails_every_pending_call_at_once(probe: Probe) -> None:
    failures: list[BaseException] = []
    stop = anyio.Event()

    async def run_server(*, task_status: anyio.abc.TaskStatus[rpcstream.Server]) -> None:
        async with rpcstream.serve(make_router(probe)) as srv:
            task_status.started(srv)
            await stop.wait()

    async with anyio.create_task_group() as outer:
        server = await outer.start(run_server)
        async with rpcstream.connect(server.url) as peer:

            async def pending() -> None:
                try:
                    await peer.call("block")
                except rpcstream.ConnectionClosed as exc:
                    failures.append(exc)

            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(pending)
                await probe.started.wait()
                stop.set()  # the server exits, closing every connection
    assert len(failures) == 5
    assert probe.finished.is_set()


async def test_a_thousand_connections_leave_no_connection_task_or_call_behind(
    probe: Probe,
) -> None:
    router = make_router(probe)
    async with rpcstream.serve(router) as server:

        async def one(i: int) -> None:
            async with rpcstream.connect(server.url) as peer:
                if i % 3 == 0:
                    assert await peer.call("add", i, 1) == i + 1
                elif i % 3 == 1:
                    # Leave mid-call: the handler is still blocked when we close.
                    with anyio.move_on_after(0):
                        await peer.call("block")
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(peer.call, "block")
                        await anyio.lowlevel.checkpoint()
                        tg.cancel_scope.cancel()

        for batch in range(0, 1000, 50):
            async with anyio.create_task_group() as tg:
                for i in range(batch, batch + 50):
                    tg.start_soon(one, i)
        await server.wait_idle()
        assert server.stats == {"connections": 0, "tasks": 0}
        assert server.connections_accepted == 1000


async def test_a_memory_pair_calls_both_ways_without_sockets() -> None:
    a_router, b_router = rpcstream.Router(), rpcstream.Router()

    @a_router.method
    async def where() -> str:
        return "a"

    @b_router.method
    async def where_b() -> str:
        return "b:" + str(await rpcstream.current_peer().call("where"))

    async with memory_peer_pair(a_router, b_router) as (a, b):
        assert await a.call("where_b") == "b:a"
        assert await b.call("where") == "a"


leaky: contextvars.ContextVar[str] = contextvars.ContextVar("leaky", default="clean")


async def test_plain_function_handlers_answer_at_once_over_the_wire() -> None:
    router = rpcstream.Router()
    notified: list[int] = []
    got_notification = anyio.Event()

    @router.method
    def add(a: int, b: int) -> int:
        return a + b

    @router.method
    def fail() -> None:
        raise ValueError("plain failure")

    @router.method
    def peer_and_context() -> str:
        before = leaky.get()
        leaky.set("set by a handler")  # must not leak into the next call
        return f"{before} {rpcstream.current_peer().principal}"

    @router.method
    def note(n: int) -> None:
        notified.append(n)
        got_notification.set()

    async def real(x: int) -> int:
        return x

    def wrapped(x: int) -> Any:  # a wrapper that hides that it is async
        return real(x)

    router.add(wrapped, "wrapped")

    class Doubler:  # an object whose __call__ is async is an async handler
        async def __call__(self, x: int) -> int:
            await anyio.lowlevel.checkpoint()
            return 2 * x

    router.add(Doubler(), "double")

    async with (
        rpcstream.serve(router, "127.0.0.1", 0) as server,
        rpcstream.connect(server.url) as peer,
    ):
        assert await peer.call("add", 2, b=3) == 5
        with pytest.raises(rpcstream.InvalidParams):
            await peer.call("add", "two", 3)
        with pytest.raises(rpcstream.InternalError, match=r"] ValueError: internal error"):
            await peer.call("fail")
        assert await peer.call("peer_and_context") == "clean None"
        assert await peer.call("peer_and_context") == "clean None"
        with pytest.raises(rpcstream.InternalError, match="returned an awaitable"):
            await peer.call("wrapped", 1)
        assert await peer.call("double", 21) == 42
        with pytest.raises(rpcstream.MethodNotFound, match="does not stream"):
            async for _ in peer.stream("add", 1, 2):
                pass
        await peer.notify("note", 7)
        with anyio.fail_after(5):
            await got_notification.wait()
        assert notified == [7]
        # Many at once: every answer comes back (they leave together).
        results: dict[int, int] = {}

        async def one(i: int) -> None:
            results[i] = await peer.call("add", i, 1)

        async with anyio.create_task_group() as tg:
            for i in range(300):
                tg.start_soon(one, i)
        assert results == {i: i + 1 for i in range(300)}
        assert server.stats["running_handlers"] == 0  # plain functions never hold a slot


async def test_text_the_codec_cannot_encode_is_refused_or_escaped_never_fatal() -> None:
    # msgpack cannot encode a lone surrogate, which os.fsdecode() makes of a bad
    # file name. A method name is refused to the caller; an error message from
    # a handler is escaped; the connection carries on either way.
    router = rpcstream.Router()

    @router.method
    async def open_file(name: str) -> None:
        raise FileNotFoundError("no such file: " + os.fsdecode(b"bad-\xff"))

    @router.method
    async def lines() -> AsyncIterator[str]:
        yield "first"
        raise rpcstream.RemoteError(2**70, os.fsdecode(b"\xfe"))

    async with (
        rpcstream.serve(router, "127.0.0.1", 0, expose_errors=True) as server,
        rpcstream.connect(server.url) as peer,
    ):
        with pytest.raises(UnicodeEncodeError):
            await peer.call("bad\ud800")
        with pytest.raises(UnicodeEncodeError):
            peer.stream("bad\ud800")
        with pytest.raises(rpcstream.InternalError, match=r"bad-\\udcff"):
            await peer.call("open_file", "x")
        got: list[str] = []
        with pytest.raises(rpcstream.InternalError, match=r"\\udcfe"):
            async for line in peer.stream("lines"):
                got.append(line)
        assert got == ["first"]
        assert await peer.call("rpcstream.ping") is None
        assert peer.stats["pending_calls"] == 0


async def test_a_frame_that_fails_to_encode_ends_the_connection_with_1011(
    server: rpcstream.Server,
) -> None:
    # Defence in depth: should a frame that cannot be encoded reach the queue
    # anyway, the connection ends (1011) whether the frame was being written
    # directly (asyncio) or by the writer (trio), and nothing is left waiting.
    async with rpcstream.connect(server.url) as peer:
        driver = peer._driver
        bad = Notify("bad\ud800", MSGPACK.empty_array, MSGPACK.empty_map, [])
        driver.send_now(driver.proto.send, bad)
        with anyio.fail_after(5):
            await peer.wait_closed()
        with pytest.raises(rpcstream.ConnectionClosed) as info:
            await peer.call("add", 1, 2)
        assert info.value.code == 1011


async def test_closing_the_server_does_not_wait_for_sockets_that_never_sent_a_request() -> None:
    # Browsers open sockets ahead of need. Leaving serve() used to wait for each
    # one's open_timeout; such sockets have nothing to finish and are dropped.
    with anyio.fail_after(5):  # open_timeout is 30 s: waiting for it fails here
        async with rpcstream.serve(rpcstream.Router(), "127.0.0.1", 0, open_timeout=30) as srv:
            idle = await anyio.connect_tcp("127.0.0.1", srv.port)
            # A whole call on a second connection: the server accepted the first by now.
            async with rpcstream.connect(srv.url) as peer:
                assert await peer.call("rpcstream.ping") is None
        with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            await idle.receive()  # the server dropped it
    await idle.aclose()


async def test_stream_refuses_a_handler_annotated_unary_before_running_it() -> None:
    router = rpcstream.Router()
    ran: list[str] = []

    @router.method
    async def charge(amount: int) -> int:  # a side effect a refused stream() must not cause
        ran.append("charge")
        return amount

    async def numbers(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    @router.method
    async def unannotated(n):  # type: ignore[no-untyped-def]
        ran.append("unannotated")
        return numbers(n)  # an async iterable after all: it streams

    @router.method
    async def says_none(n: int) -> None:
        ran.append("says_none")

    async with (
        rpcstream.serve(router, "127.0.0.1", 0) as server,
        rpcstream.connect(server.url) as peer,
    ):
        for method in ("charge", "says_none"):
            with pytest.raises(rpcstream.MethodNotFound, match="does not stream"):
                async for _ in peer.stream(method, 5):
                    pass
        assert [i async for i in peer.stream("unannotated", 3)] == [0, 1, 2]
        assert await peer.call("charge", 5) == 5  # call() still runs it
    assert ran == ["unannotated", "charge"]

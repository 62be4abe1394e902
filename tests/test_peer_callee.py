"""The callee side over a real WebSocket, driven by a raw client that sends exactly the
frames a test names: what another language's client may legally (or illegally) send."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import pytest

import rpcstream
from rpcstream.errors import ErrorCode
from rpcstream.messages import (
    MSGPACK,
    Call,
    Cancel,
    Fault,
    Frame,
    Notify,
    Result,
    StreamCancel,
    StreamData,
    StreamEnd,
    StreamError,
)
from tests.raw import raw_connect

pytestmark = pytest.mark.anyio


class Probe:
    def __init__(self) -> None:
        self.started: dict[str, anyio.Event] = {}
        self.cancelled: dict[str, anyio.Event] = {}
        self.seen: list[Any] = []
        self.notified = anyio.Event()

    def event(self, table: dict[str, anyio.Event], key: str) -> anyio.Event:
        return table.setdefault(key, anyio.Event())


def make_router(probe: Probe) -> rpcstream.Router:
    router = rpcstream.Router()

    @router.method
    async def park(tag: str) -> None:
        probe.event(probe.started, tag).set()
        try:
            await anyio.sleep_forever()
        finally:
            probe.event(probe.cancelled, tag).set()

    @router.method
    async def total(xs: AsyncIterator[int]) -> int:
        return sum([x async for x in xs])

    @router.method
    async def shout(text: str, extra: Any = None) -> str:
        return text.upper()

    @router.method
    async def record(xs: AsyncIterator[int]) -> None:
        try:
            probe.seen.append([x async for x in xs])
        except rpcstream.RemoteError as exc:
            probe.seen.append(exc.code)
        probe.notified.set()

    return router


def raw(value: Any) -> msgspec.Raw:
    return MSGPACK.encode_raw(value)


async def send(ws: Any, *frames: Frame) -> None:
    await ws.send(MSGPACK.encode_batch(list(frames)))


async def receive_until(ws: Any, kind: type, limit: int = 20) -> tuple[Any, list[Any]]:
    """Read frames until one of type ``kind``; return it and every frame read."""
    seen: list[Any] = []
    for _ in range(limit):
        for frame in MSGPACK.decode_batch(await ws.recv()):
            seen.append(frame)
            if type(frame) is kind:
                return frame, seen
    raise AssertionError(f"no {kind.__name__} in {seen}")


@pytest.fixture
async def served() -> AsyncIterator[tuple[rpcstream.Server, Probe]]:
    probe = Probe()
    async with rpcstream.serve(make_router(probe), "127.0.0.1", 0) as server:
        yield server, probe


async def test_a_second_call_with_an_id_in_flight_is_a_fault_and_cancel_still_reaches_the_first(
    served: tuple[rpcstream.Server, Probe],
) -> None:
    server, probe = served
    with anyio.fail_after(10):
        async with raw_connect(server.url, MSGPACK.subprotocol) as ws:
            await send(ws, Call(1, "park", raw(["a"]), MSGPACK.empty_map))
            await probe.event(probe.started, "a").wait()
            await send(ws, Call(1, "park", raw(["b"]), MSGPACK.empty_map))
            fault, _ = await receive_until(ws, Fault)
            assert fault.code == ErrorCode.PROTOCOL_ERROR
            assert "already in flight" in fault.message
            await send(ws, Cancel(1))
            await probe.event(probe.cancelled, "a").wait()
            # The first call's id is free again once it ended: a new call may use it.
            await send(ws, Call(1, "total", raw([7]), MSGPACK.empty_map, None, [0]))
            await send(ws, StreamEnd(7))
            result, _ = await receive_until(ws, Result)
            assert (result.id, MSGPACK.decode(result.value)) == (1, 0)
    assert "b" not in probe.started


@pytest.mark.parametrize("together", [True, False], ids=["same-message", "next-message"])
async def test_a_stream_argument_that_ends_before_its_first_credit_still_ends(
    served: tuple[rpcstream.Server, Probe], together: bool
) -> None:
    # docs/protocol.md 7.7: StreamEnd and StreamError need no credit, so an
    # empty stream argument may end in the very message that carries the call.
    server, probe = served
    call = Call(1, "total", raw([3]), MSGPACK.empty_map, None, [0])
    with anyio.fail_after(10):
        async with raw_connect(server.url, MSGPACK.subprotocol) as ws:
            if together:
                await send(ws, call, StreamEnd(3))
            else:
                await send(ws, call)
                await send(ws, StreamEnd(3))
            result, _ = await receive_until(ws, Result)
            assert (result.id, MSGPACK.decode(result.value)) == (1, 0)

            # A StreamError before the credit reaches the handler as the sender's error.
            await send(
                ws,
                Call(2, "total", raw([5]), MSGPACK.empty_map, None, [0]),
                StreamError(5, 1234, "the sender failed"),
            )
            answer, _ = await receive_until(ws, rpcstream.messages.Error)
            assert (answer.id, answer.code, answer.message) == (2, 1234, "the sender failed")

            # The same for a notification.
            await send(ws, Notify("record", raw([9]), MSGPACK.empty_map, [0]), StreamEnd(9))
            await probe.notified.wait()
    assert probe.seen == [[]]


async def test_stream_data_before_the_first_credit_fails_the_argument_with_protocol_error(
    served: tuple[rpcstream.Server, Probe],
) -> None:
    # docs/protocol.md 7.6: data beyond the credit granted (none yet) fails the
    # stream with PROTOCOL_ERROR and cancels its sender; the call is answered.
    server, _probe = served
    with anyio.fail_after(10):
        async with raw_connect(server.url, MSGPACK.subprotocol) as ws:
            await send(
                ws,
                Call(1, "total", raw([3]), MSGPACK.empty_map, None, [0]),
                StreamData(3, raw(5)),
                StreamData(3, raw(6)),
                StreamEnd(3),
            )
            answer, seen = await receive_until(ws, rpcstream.messages.Error)
            assert (answer.id, answer.code) == (1, ErrorCode.PROTOCOL_ERROR)
            assert "before the first credit" in answer.message
            assert StreamCancel(3) in seen
            # The connection carries on.
            await send(ws, Call(2, "rpcstream.ping", MSGPACK.empty_array, MSGPACK.empty_map))
            result, _ = await receive_until(ws, Result)
            assert result.id == 2


@pytest.mark.parametrize("where", ["typed", "untyped"])
async def test_a_string_argument_that_is_not_utf8_is_answered_invalid_params(
    served: tuple[rpcstream.Server, Probe], where: str
) -> None:
    server, _probe = served
    bad_str = b"\xa2\xff\xfe"  # a msgpack str of two bytes that are not UTF-8
    args = b"\x91" + bad_str if where == "typed" else b"\x92\xa1x" + bad_str
    with anyio.fail_after(10):
        async with raw_connect(server.url, MSGPACK.subprotocol) as ws:
            await send(ws, Call(1, "shout", msgspec.Raw(args), MSGPACK.empty_map))
            answer, _ = await receive_until(ws, rpcstream.messages.Error)
            assert (answer.id, answer.code) == (1, ErrorCode.INVALID_PARAMS)
            assert "UTF-8" in answer.message


async def test_a_peer_that_ignores_the_advertised_limit_is_refused_and_a_cancel_frees_a_slot() -> (
    None
):
    probe = Probe()
    async with rpcstream.serve(
        make_router(probe), "127.0.0.1", 0, max_concurrent_handlers=1
    ) as server:
        with anyio.fail_after(10):
            async with raw_connect(server.url, MSGPACK.subprotocol) as ws:
                # The server's first frame advertises its limit.
                [settings, *_] = MSGPACK.decode_batch(await ws.recv())
                assert isinstance(settings, Notify) and settings.method == "rpcstream.settings"
                assert MSGPACK.decode(settings.kwargs) == {"max_concurrent_handlers": 1}
                await send(ws, Call(1, "park", raw(["a"]), MSGPACK.empty_map))
                await probe.event(probe.started, "a").wait()
                await send(ws, Call(2, "park", raw(["b"]), MSGPACK.empty_map))
                answer, _ = await receive_until(ws, rpcstream.messages.Error)
                assert (answer.id, answer.code) == (2, ErrorCode.OVERLOADED)
                # A Cancel frees the slot when it arrives, as the caller counts it:
                # a call right behind it, in the same message, is admitted.
                await send(ws, Cancel(1), Call(3, "park", raw(["c"]), MSGPACK.empty_map))
                await probe.event(probe.started, "c").wait()
                await probe.event(probe.cancelled, "a").wait()

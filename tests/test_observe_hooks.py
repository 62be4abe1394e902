"""What the peer and the server report: log lines (connections, refused handshakes,
handler failures) and the observer interface, over real WebSockets."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

import rpcstream
import rpcstream.testing
from rpcstream.observe import hooks
from rpcstream.observe.outcomes import outcome_of

pytestmark = pytest.mark.anyio


def make_router() -> rpcstream.Router:
    router = rpcstream.Router()

    @router.method
    async def add(a: int, b: int) -> int:
        return a + b

    @router.method
    async def refuse() -> None:
        raise rpcstream.RemoteError(1042, "not today", {"retry_after": 5})

    @router.method
    async def divide(a: int, b: int) -> float:
        return a / b

    @router.method
    async def dry(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
        raise OSError("the well ran dry")

    @router.method
    async def hang() -> None:
        await anyio.sleep_forever()

    @router.method
    async def count(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    return router


class Recorder(hooks.Observer):
    """Keeps every report."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def connection_opened(self, peer: Any) -> None:
        self.events.append(("opened",))

    def connection_closed(self, peer: Any, code: int, reason: str, duration: float) -> None:
        self.events.append(("closed", code))

    def handshake_refused(self, status: int, reason: str, remote_address: Any) -> None:
        self.events.append(("refused", status))

    def call_received(
        self, peer: Any, kind: str, method: str, meta: dict[str, str] | None
    ) -> hooks.CallObservation | None:
        return self._follow("received", kind, method)

    def call_sent(self, peer: Any, kind: str, method: str) -> hooks.CallObservation | None:
        return self._follow("sent", kind, method)

    def stream_stalled(self, peer: Any, stream_id: int) -> None:
        self.events.append(("stalled",))

    def _follow(self, side: str, kind: str, method: str) -> hooks.CallObservation:
        events = self.events

        class Call(hooks.CallObservation):
            def end(self, outcome: str, error: BaseException | None = None) -> None:
                if not self.ended:
                    self.ended = True
                    events.append((side, kind, method, outcome))

        return Call()

    def calls(self) -> list[tuple[Any, ...]]:
        return [e for e in self.events if e[0] in ("sent", "received")]


async def test_handler_failures_are_logged_once_with_method_and_peer_and_remote_errors_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "rpcstream")
    async with rpcstream.serve(make_router()) as server:
        async with rpcstream.connect(server.url) as peer:
            with pytest.raises(rpcstream.RemoteError) as info:
                await peer.call("refuse")
            assert (info.value.code, info.value.message) == (1042, "not today")  # on purpose
            with pytest.raises(rpcstream.InternalError) as failed:
                await peer.call("divide", 1, 0)
            assert failed.value.message == "ZeroDivisionError: internal error (see the server log)"
            with pytest.raises(rpcstream.InternalError, match=r"\] OSError: internal error"):
                async for _ in peer.stream("dry", 2):
                    pass
        await server.wait_idle()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.method for r in errors] == ["divide", "dry"]  # type: ignore[attr-defined]
    for record in errors:
        assert record.name == "rpcstream.peer" and record.exc_info is not None
        assert record.remote_address.startswith("127.0.0.1:")  # type: ignore[attr-defined]
        assert "principal None" in record.getMessage()
    assert "not today" not in caplog.text  # a RemoteError raised on purpose is no bug
    opened = [r for r in caplog.records if r.getMessage().startswith("connection opened")]
    closed = [r for r in caplog.records if r.getMessage().startswith("connection closed")]
    assert len(opened) == len(closed) == 1
    assert opened[0].levelno == closed[0].levelno == logging.INFO
    assert closed[0].code == 1000  # type: ignore[attr-defined]
    assert closed[0].remote_address == opened[0].remote_address  # type: ignore[attr-defined]


async def test_each_refused_handshake_is_one_line_with_status_reason_and_address(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "rpcstream")

    def authenticate(request: rpcstream.HandshakeRequest) -> str | None:
        if request.bearer_token == "banned":
            raise rpcstream.Refused("banned", 403)
        return "ada" if request.bearer_token == "good" else None

    async with rpcstream.serve(
        make_router(), authenticate=authenticate, max_connections_per_principal=1
    ) as server:
        for token, status in [("bad", 401), ("banned", 403)]:
            with pytest.raises(rpcstream.HandshakeRefused) as info:
                async with rpcstream.connect(server.url, token=token):
                    pass
            assert info.value.status == status
        async with rpcstream.connect(server.url, token="good") as peer:
            with pytest.raises(rpcstream.HandshakeRefused):
                async with rpcstream.connect(server.url, token="good"):
                    pass
            assert await peer.call("add", 1, 1) == 2
        await server.wait_idle()
    refused = [r for r in caplog.records if "handshake refused" in r.getMessage()]
    assert [r.status for r in refused] == [401, 403, 429]  # type: ignore[attr-defined]
    assert [r.reason for r in refused][:2] == ["unauthorized", "banned"]  # type: ignore[attr-defined]
    assert all(r.remote_address.startswith("127.0.0.1:") for r in refused)  # type: ignore[attr-defined]
    opened = [r for r in caplog.records if r.getMessage().startswith("connection opened")]
    assert [r.principal for r in opened] == ["ada"]  # type: ignore[attr-defined]


async def test_an_observer_sees_both_sides_of_calls_streams_stalls_and_connections() -> None:
    recorder = Recorder()
    with hooks.observing(recorder):
        async with rpcstream.serve(make_router()) as server:
            async with rpcstream.connect(server.url) as peer:
                assert await peer.call("add", 1, 2) == 3
                with pytest.raises(rpcstream.InternalError):
                    await peer.call("divide", 1, 0)
                with anyio.move_on_after(0.05):
                    await peer.call("hang")
                assert [i async for i in peer.stream("count", 10, window_items=1)] == list(
                    range(10)
                )
                async with peer.stream("count", 100, window_items=1) as items:
                    assert await items.__anext__() == 0  # then stops early
                await peer.notify("add", 1, 1)
                assert await peer.call("add", 2, 2) == 4  # the notification was handled first
            await server.wait_idle()
    calls = recorder.calls()
    assert ("sent", "call", "add", "ok") in calls
    assert ("received", "call", "add", "ok") in calls
    assert ("sent", "call", "divide", "internal_error") in calls
    assert ("received", "call", "divide", "internal_error") in calls
    assert ("sent", "call", "hang", "cancelled") in calls
    assert ("sent", "stream", "count", "ok") in calls
    assert ("sent", "stream", "count", "cancelled") in calls
    assert ("sent", "notify", "add", "ok") in calls
    assert ("received", "notify", "add", "ok") in calls
    assert ("stalled",) in recorder.events
    assert recorder.events[0] == ("opened",)
    assert ("closed", 1000) in recorder.events


async def test_peers_built_with_no_observer_keep_none() -> None:
    assert hooks.current() is None
    async with rpcstream.testing.memory_peer_pair() as (a, b):
        assert a._driver.observer is None and b._driver.observer is None
    recorder = Recorder()
    with hooks.observing(recorder):
        assert hooks.current() is recorder
        other = Recorder()
        with hooks.observing(other):
            both = hooks.current()
            assert both is not None and both is not recorder
            call = both.call_sent(None, hooks.CALL, "x")
            assert call is not None
            call.end("ok")
        assert hooks.current() is recorder
    assert hooks.current() is None
    assert recorder.calls() == other.calls() == [("sent", "call", "x", "ok")]


def test_outcomes_are_ok_or_the_name_of_an_error_code() -> None:
    assert outcome_of(None) == "ok"
    assert outcome_of(rpcstream.Overloaded("busy")) == "overloaded"
    assert outcome_of(rpcstream.RemoteError(1042, "app")) == "error"
    assert outcome_of(ValueError("bug")) == "internal_error"


def test_importing_rpcstream_imports_neither_prometheus_nor_opentelemetry() -> None:
    code = (
        "import sys, rpcstream, rpcstream.observe; "
        "assert not any(m.startswith(('opentelemetry', 'prometheus_client')) "
        "for m in sys.modules), 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)

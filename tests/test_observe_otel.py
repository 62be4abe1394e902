"""OpenTelemetry tracing: a call from client to server makes a client span and a
server span in the same trace, the trace context carried in the call frame."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import msgspec
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import rpcstream
import rpcstream.testing
from rpcstream.messages import JSON, MSGPACK, Call, Notify, StreamCall
from rpcstream.observe import hooks
from rpcstream.observe.otel import TracingObserver

pytestmark = pytest.mark.anyio


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Trace into memory for the test, with a provider of its own (not the global one)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with hooks.observing(TracingObserver(tracer_provider=provider)):
        yield exporter
    provider.shutdown()


def make_router() -> rpcstream.Router:
    router = rpcstream.Router()

    @router.method
    async def add(a: int, b: int) -> int:
        return a + b

    @router.method
    async def trace_id() -> str:
        # The server span is current in the handler: its own spans join the trace.
        return format(trace.get_current_span().get_span_context().trace_id, "032x")

    @router.method
    async def fail() -> None:
        raise ZeroDivisionError("no")

    @router.method
    async def count(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    return router


def by_kind(spans: tuple[ReadableSpan, ...], name: str) -> dict[SpanKind, ReadableSpan]:
    found = {s.kind: s for s in spans if s.name == name}
    assert set(found) == {SpanKind.CLIENT, SpanKind.SERVER}, spans
    return found


def assert_parent_child(client: ReadableSpan, server: ReadableSpan) -> None:
    assert client.context is not None and server.context is not None
    assert server.context.trace_id == client.context.trace_id
    assert server.parent is not None and server.parent.span_id == client.context.span_id
    assert server.parent.is_remote


async def test_a_call_makes_a_client_span_and_a_server_span_in_one_trace(
    spans: InMemorySpanExporter,
) -> None:
    async with (
        rpcstream.serve(make_router()) as server,
        rpcstream.connect(server.url) as peer,
    ):
        assert await peer.call("add", 1, 2) == 3
        current = await peer.call("trace_id")
    add = by_kind(spans.get_finished_spans(), "add")
    assert_parent_child(add[SpanKind.CLIENT], add[SpanKind.SERVER])
    for span in add.values():
        assert span.attributes is not None
        assert span.attributes["rpc.system"] == "rpcstream"
        assert span.attributes["rpc.method"] == "add"
        assert span.attributes["rpcstream.outcome"] == "ok"
    server_span = by_kind(spans.get_finished_spans(), "trace_id")[SpanKind.SERVER]
    assert server_span.context is not None
    assert current == format(server_span.context.trace_id, "032x")


async def test_streams_notifications_and_failures_are_traced(
    spans: InMemorySpanExporter,
) -> None:
    async with (
        rpcstream.serve(make_router()) as server,
        rpcstream.connect(server.url) as peer,
    ):
        assert [i async for i in peer.stream("count", 3)] == [0, 1, 2]
        with pytest.raises(rpcstream.InternalError):
            await peer.call("fail")
        with pytest.raises(rpcstream.MethodNotFound):
            await peer.call("made up by the client")
    finished = spans.get_finished_spans()
    count = by_kind(finished, "count")
    assert_parent_child(count[SpanKind.CLIENT], count[SpanKind.SERVER])
    assert count[SpanKind.SERVER].attributes["rpcstream.kind"] == "stream"  # type: ignore[index]
    fail = by_kind(finished, "fail")
    assert_parent_child(fail[SpanKind.CLIENT], fail[SpanKind.SERVER])
    for span in fail.values():
        assert span.status.status_code is StatusCode.ERROR
        assert span.attributes["rpcstream.outcome"] == "internal_error"  # type: ignore[index]
    # The handler's exception is recorded where it ran, with its text.
    (event,) = fail[SpanKind.SERVER].events
    assert event.name == "exception" and event.attributes is not None
    assert event.attributes["exception.type"] == "ZeroDivisionError"
    # A name the server does not have never names a server span.
    unknown = [s for s in finished if s.kind is SpanKind.SERVER and s.name == "rpcstream.unknown"]
    assert len(unknown) == 1
    assert unknown[0].attributes["rpcstream.outcome"] == "method_not_found"  # type: ignore[index]


async def calls_received(router: rpcstream.Router) -> list[Call]:
    """The Call frames a server peer receives for one call of ``add``."""
    received: list[Call] = []
    async with rpcstream.testing.memory_peer_pair(None, router) as (client, server):
        on_call = server._driver.on_call

        def record(frame: Call) -> None:
            if type(frame) is Call:  # not the client's rpcstream.settings notification
                received.append(frame)
            on_call(frame)

        server._driver.on_call = record
        assert await client.call("add", 1, 2) == 3
    return received


async def test_the_trace_context_rides_in_the_call_frame(spans: InMemorySpanExporter) -> None:
    (frame,) = await calls_received(make_router())
    assert frame.meta is not None
    version, trace_id, span_id, flags = frame.meta["traceparent"].split("-")
    client = by_kind(spans.get_finished_spans(), "add")[SpanKind.CLIENT]
    assert client.context is not None
    assert version == "00" and int(flags, 16) & 1  # sampled
    assert (trace_id, span_id) == (
        format(client.context.trace_id, "032x"),
        format(client.context.span_id, "016x"),
    )


async def test_with_tracing_off_peers_carry_no_meta_and_observe_nothing() -> None:
    assert hooks.current() is None
    (frame,) = await calls_received(make_router())
    assert frame.meta is None


def test_frames_from_older_peers_without_meta_still_decode() -> None:
    old_call = b'[[1, 7, "add", [1, 2], {}, null, []]]'
    old_notify = b'[[2, "note", [], {}, []]]'
    old_stream = b'[[3, 1, "count", [3], {}, null, []]]'
    short = b'[[1, 8, "add", [1, 2], {}]]'
    frames = [JSON.decode_batch(m)[0] for m in (old_call, old_notify, old_stream, short)]
    assert [type(f) for f in frames] == [Call, Notify, StreamCall, Call]
    assert all(f.meta is None for f in frames)  # type: ignore[union-attr]
    # And a newer frame keeps its trace context through both codecs.
    meta = {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
    call = Call(9, "add", msgspec.Raw(b"[]"), msgspec.Raw(b"{}"), None, [], meta)
    for codec in (JSON, MSGPACK):
        raw = codec.encode_batch([Call(9, "add", codec.empty_array, codec.empty_map, meta=meta)])
        assert codec.decode_batch(raw)[0].meta == meta  # type: ignore[union-attr]
    assert call.meta == meta

"""Malformed frames thrown at a live server: each is answered with a Fault (or an
error frame) or closes that one connection with a clear code, and a bystander's
run subscription on another connection carries on untouched.

Hypothesis draws the messages; each example runs against a fresh server on
127.0.0.1, on asyncio and on trio.
"""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rpcstream
from tests.raw import raw_connect

MSGPACK = "rpcstream.v1.msgpack"
JSON = "rpcstream.v1.json"
PROBE_ID = 2**40  # a call id the fuzzer's own calls never use

# -- strategies ------------------------------------------------------------------------

ints = st.one_of(st.integers(-(2**63), 2**64 - 1), st.integers(-3, 40))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.binary(max_size=30),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=15,
)
# Frames with a real or nearly real tag and fields of any type.
tagged = st.builds(
    lambda tag, rest: [tag, *rest], st.integers(-2, 16), st.lists(values, max_size=7)
)
stream_ids = st.one_of(st.integers(-5, 20), st.integers(2**31, 2**63 - 1))
# Frames that are well formed but wrong in what they say.
plausible = st.one_of(
    st.builds(lambda s, i, b: [10, s, i, b], stream_ids, ints, ints),  # Credit: overflow, negative
    st.builds(lambda s, p: [7, s, p], stream_ids, values),  # StreamData for streams never opened
    st.builds(lambda s: [8, s], stream_ids),  # StreamEnd for nothing
    st.builds(lambda s: [11, s], stream_ids),  # StreamCancel for nothing
    st.builds(lambda i: [6, i], ints),  # Cancel of calls never made
    st.builds(
        lambda i, m, a, k, t: [1, i, m, a, k, t],
        ints,
        st.sampled_from(["runs.status", "runs.cancel", "runs.start", "nope", ""]),
        st.lists(values, max_size=3),
        st.dictionaries(st.text(max_size=8), values, max_size=3),
        st.one_of(st.none(), st.floats(-1, 0.01)),
    ),  # Calls with wrong parameters and silly deadlines
    st.builds(
        lambda s, m, a: [3, s, m, a, {}], stream_ids, st.sampled_from(["runs.subscribe"]), values
    ),  # StreamCalls with wrong ids and arguments
    st.builds(lambda i, sa: [1, i, "runs.status", [1], {}, None, sa], ints, values),  # stream_args
)
batch = st.lists(st.one_of(tagged, plausible, values), max_size=5)


def encode(frames: Any, codec: str) -> bytes:
    if codec == "msgpack":
        return msgspec.msgpack.encode(frames)
    return msgspec.json.encode(frames)


extremes = st.sampled_from(
    [
        b"\x91" * 100_000 + b"\xc0",  # msgpack nested 100,000 deep
        b"[" * 100_000 + b"]" * 100_000,  # JSON nested 100,000 deep
        msgspec.msgpack.encode([[1, 1, "x" * 1_000_000, [], {}]]),  # a 1 MB method name
        msgspec.json.encode([[12, 1, "y" * 1_000_000]]),  # a 1 MB Fault message
        b"",
        b"[]",
        b"\x90",
        b"\xff\xfe\xfd",
    ]
)

# One message: (payload, send as text?). Binary JSON, text msgpack (valid UTF-8
# or not: invalid UTF-8 in a text frame is a WebSocket error, close 1007), garbage.
messages = st.one_of(
    st.tuples(st.builds(encode, batch, st.sampled_from(["msgpack", "json"])), st.booleans()),
    st.tuples(st.binary(max_size=200), st.booleans()),
    st.tuples(st.text(max_size=200).map(str.encode), st.just(True)),
    st.tuples(extremes, st.booleans()),
)

# -- the scenario ------------------------------------------------------------------------


def make_runs() -> rpcstream.RunServer:
    runs = rpcstream.RunServer()

    @runs.flow("ticks")
    async def ticks(ctx: rpcstream.RunContext, n: int, go: str) -> None:
        await ctx.client.receive()  # held until the fuzzing is over
        for i in range(n):
            await ctx.client.send("tick", i)

    return runs


async def probe(ws: Any, codec: str, run_id: str) -> None:
    """A valid call on the fuzzed connection is still answered."""
    call = [[1, PROBE_ID, "runs.status", [run_id], {}]]
    await ws.send(encode(call, codec), text=codec == "json")
    decode = msgspec.msgpack.decode if codec == "msgpack" else msgspec.json.decode
    with anyio.fail_after(10):
        while True:
            for frame in decode(await ws.recv(decode=False)):
                if frame[0] == 4 and frame[1] == PROBE_ID:  # Result
                    assert frame[2]["status"] == "running"
                    return


async def scenario(attack: list[tuple[bytes, bool]], codec: str) -> None:
    import websockets.exceptions

    subprotocol = MSGPACK if codec == "msgpack" else JSON
    async with rpcstream.serve(make_runs(), max_message_size=2 * 1024 * 1024) as server:
        async with rpcstream.connect(server.url) as bystander:
            run = await bystander.call("runs.start", "ticks", {"n": 30, "go": "x"})
            run_id = run["run_id"]
            async with bystander.stream("runs.subscribe", run_id) as events:
                assert (await anext(events))["type"] == "started"
                async with raw_connect(server.url, subprotocol, max_size=None) as ws:
                    try:
                        for payload, text in attack:
                            await ws.send(payload, text=text)
                        await probe(ws, codec, run_id)
                    except websockets.exceptions.ConnectionClosed as exc:
                        # Closed: only that connection, with a clear code and reason.
                        assert exc.rcvd is not None, "closed without a close frame"
                        assert exc.rcvd.code in (1002, 1007, 1008, 1009), exc
                        assert exc.rcvd.reason
                await bystander.call("runs.send", run_id, "go")
                rest = [e async for e in events]
            assert [e["id"] for e in rest] == list(range(2, 33))  # untouched: no gap
        await server.wait_idle()
        assert server.stats == {"connections": 0, "tasks": 0}


@pytest.mark.parametrize("codec", ["msgpack", "json"])
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(attack=st.lists(messages, min_size=1, max_size=8))
def test_malformed_messages_hurt_no_one_else(
    backend: str, codec: str, attack: list[tuple[bytes, bool]]
) -> None:
    anyio.run(scenario, attack, codec, backend=backend)

"""docs/protocol.md's worked examples are what Python encodes, byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from rpcstream.messages import (
    JSON,
    MSGPACK,
    Call,
    Codec,
    Credit,
    Frame,
    Result,
    StreamCall,
    StreamData,
    StreamEnd,
)

DOC = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()


def _examples(codec: Codec) -> list[list[Frame]]:
    raw, empty_map = codec.encode_raw, codec.empty_map
    return [
        [Call(1, "add", raw([1, 2]), empty_map)],
        [Result(1, raw(3))],
        [Credit(1, 256, 262144), StreamCall(1, "count", raw([2]), empty_map)],
        [StreamData(1, raw(0)), StreamData(1, raw(1)), StreamEnd(1)],
    ]


@pytest.mark.parametrize("index", range(4))
def test_each_worked_example_shows_the_bytes_python_sends(index: int) -> None:
    msgpack = MSGPACK.encode_batch(_examples(MSGPACK)[index]).hex(" ")
    json = JSON.encode_batch(_examples(JSON)[index]).decode()
    assert f"\n{msgpack}\n" in DOC
    assert json in DOC


def test_the_flow_control_example_sends_credit_before_the_stream_call_as_python_does() -> None:
    batch = [Credit(1, 4, 262144), StreamCall(1, "count", JSON.encode_raw([5]), JSON.empty_map)]
    assert JSON.encode_batch(batch).decode() in DOC

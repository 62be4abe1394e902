"""Every wire frame, as msgspec Structs in one tagged union, and the two codecs.

A WebSocket message carries a *batch*: an array of one or more frames. Batching
is what lets a busy writer pack many small stream items into one WebSocket
message (one message costs about as much as encoding dozens of small frames).

Each frame is an array whose first element is its tag (``array_like=True``):
``[1, 7, "add", [1, 2], {}]`` is ``Call(id=7, method="add", args=[1, 2])``.
Fields are only ever appended, with defaults, so older peers keep decoding.
Payloads (``args``, ``value``, ``payload``...) stay ``msgspec.Raw`` until the
receiving side knows the type to convert them to.

The codec is chosen by WebSocket subprotocol: ``rpcstream.v1.msgpack`` (binary
messages, the default) or ``rpcstream.v1.json`` (text messages). See
``docs/protocol.md`` for the field-by-field description.
"""

from __future__ import annotations

from typing import Any, Final, NewType, TypeAlias

import msgspec

from . import models

__all__ = [
    "CODECS",
    "JSON",
    "MSGPACK",
    "Call",
    "Cancel",
    "Codec",
    "Credit",
    "Error",
    "Fault",
    "Frame",
    "Notify",
    "Result",
    "StreamCall",
    "StreamCancel",
    "StreamData",
    "StreamEnd",
    "StreamError",
    "StreamId",
    "PROTOCOL_VERSION",
]

PROTOCOL_VERSION: Final = 1

StreamId = NewType("StreamId", int)
"""A stream's id: odd when allocated by the connecting side, even by the accepting side."""


class Call(msgspec.Struct, tag=1, array_like=True, frozen=True):
    """Call ``method``; answered by exactly one ``Result`` or ``Error`` with the same ``id``."""

    id: int
    method: str
    args: msgspec.Raw
    kwargs: msgspec.Raw
    timeout: float | None = None  # seconds; the callee enforces it as a deadline
    stream_args: list[int | str] = []  # which args/kwargs are stream ids (see Notify)
    meta: dict[str, str] | None = None  # call metadata: W3C trace context (traceparent)


class Notify(msgspec.Struct, tag=2, array_like=True, frozen=True):
    """Call ``method`` expecting no answer.

    ``stream_args`` names the positional indexes (ints) and keyword names (strs)
    whose value is a stream id: the caller sends an async iterable there, and the
    callee's handler receives an async iterator of its items.
    """

    method: str
    args: msgspec.Raw
    kwargs: msgspec.Raw
    stream_args: list[int | str] = []
    meta: dict[str, str] | None = None  # as Call's


class StreamCall(msgspec.Struct, tag=3, array_like=True, frozen=True):
    """Call a streaming ``method``; its items come back on ``stream_id``.

    The caller allocates ``stream_id`` and grants credit for it with a ``Credit``
    frame; the callee answers with ``StreamData``... then ``StreamEnd`` or
    ``StreamError`` on that stream (errors before the first item included).
    """

    stream_id: int
    method: str
    args: msgspec.Raw
    kwargs: msgspec.Raw
    timeout: float | None = None
    stream_args: list[int | str] = []
    meta: dict[str, str] | None = None  # as Call's


class Result(msgspec.Struct, tag=4, array_like=True, frozen=True):
    """The value returned by the call ``id``."""

    id: int
    value: msgspec.Raw


class Error(msgspec.Struct, tag=5, array_like=True, frozen=True):
    """The call ``id`` failed with ``code`` (see ``ErrorCode``), ``message`` and ``data``."""

    id: int
    code: int
    message: str
    data: Any = None


class Cancel(msgspec.Struct, tag=6, array_like=True, frozen=True):
    """The caller gave up on call ``id``: the callee cancels its handler, sends no answer."""

    id: int


class StreamData(msgspec.Struct, tag=7, array_like=True, frozen=True):
    """One item of stream ``stream_id``; costs the sender one item and len(payload) bytes
    of credit."""

    stream_id: int
    payload: msgspec.Raw


class StreamEnd(msgspec.Struct, tag=8, array_like=True, frozen=True):
    """The sender finished stream ``stream_id``; no frame for it follows."""

    stream_id: int


class StreamError(msgspec.Struct, tag=9, array_like=True, frozen=True):
    """The sender's iterator failed; the receiver raises this after the items before it."""

    stream_id: int
    code: int
    message: str
    data: Any = None


class Credit(msgspec.Struct, tag=10, array_like=True, frozen=True):
    """The receiver of ``stream_id`` lets its sender send ``items`` more items and
    ``bytes`` more payload bytes. The first ``Credit`` opens the stream: a sender
    sends nothing before it."""

    stream_id: int
    items: int
    bytes: int


class StreamCancel(msgspec.Struct, tag=11, array_like=True, frozen=True):
    """The receiver of ``stream_id`` stopped reading: the sender closes its iterator."""

    stream_id: int


class Fault(msgspec.Struct, tag=12, array_like=True, frozen=True):
    """A message could not be decoded or broke the protocol. The connection stays
    open unless the sender of the ``Fault`` closes it."""

    code: int
    message: str


Frame: TypeAlias = (
    Call
    | Notify
    | StreamCall
    | Result
    | Error
    | Cancel
    | StreamData
    | StreamEnd
    | StreamError
    | Credit
    | StreamCancel
    | Fault
)

# Struct sizes used for buffered-byte accounting: what a frame costs beyond its payload.
FRAME_OVERHEAD: Final = 16


class Codec:
    """Encodes batches of frames and payload values for one wire format.

    Encoders and decoders are built once; per-type decoders are cached so a
    handler's parameter types are only compiled on first use. pydantic models
    are encoded and validated through msgspec's hooks (see :mod:`rpcstream.models`),
    which msgspec only calls for values it cannot handle itself: Structs,
    dataclasses and builtins pay nothing for it.
    """

    __slots__ = (
        "_batch_decoder",
        "_decoder_cls",
        "_decoders",
        "_encoder",
        "binary",
        "empty_array",
        "empty_map",
        "name",
        "subprotocol",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.subprotocol = f"rpcstream.v{PROTOCOL_VERSION}.{name}"
        self._decoders: dict[Any, Any] = {}
        if name == "msgpack":
            self.binary = True
            self._encoder: msgspec.msgpack.Encoder | msgspec.json.Encoder = msgspec.msgpack.Encoder(
                enc_hook=models.enc_hook
            )
            self._decoder_cls: Any = msgspec.msgpack.Decoder
            self._batch_decoder: Any = msgspec.msgpack.Decoder(list[Frame])
        elif name == "json":
            self.binary = False
            self._encoder = msgspec.json.Encoder(enc_hook=models.enc_hook)
            self._decoder_cls = msgspec.json.Decoder
            self._batch_decoder = msgspec.json.Decoder(list[Frame])
        else:
            raise ValueError(f"unknown codec {name!r}: expected 'msgpack' or 'json'")
        self.empty_array = msgspec.Raw(self._encoder.encode([]))
        self.empty_map = msgspec.Raw(self._encoder.encode({}))

    def __repr__(self) -> str:
        return f"<Codec {self.name}>"

    def encode(self, value: Any) -> bytes:
        """Encode a payload value (raises ``TypeError`` for unsupported types)."""
        return self._encoder.encode(value)

    def encode_raw(self, value: Any) -> msgspec.Raw:
        """Encode a payload value as a ``Raw`` ready to embed in a frame."""
        return msgspec.Raw(self._encoder.encode(value))

    def decoder(self, type_: Any) -> Any:
        """A decoder converting a payload to ``type_`` (cached per type); its
        ``decode`` raises ``msgspec.ValidationError`` or ``msgspec.DecodeError``."""
        try:
            return self._decoders[type_]
        except KeyError:
            dec = self._decoders[type_] = models.build_decoder(self._decoder_cls, type_)
            return dec
        except TypeError:  # an unhashable annotation: build one each time
            return models.build_decoder(self._decoder_cls, type_)

    def decode(self, raw: msgspec.Raw | bytes, type_: Any = Any) -> Any:
        """Decode a payload to ``type_`` (raises ``msgspec.ValidationError``)."""
        return self.decoder(type_).decode(raw)

    def encode_batch(self, frames: list[Frame]) -> bytes:
        """Encode frames as one message body (bytes; UTF-8 JSON for the JSON codec)."""
        return self._encoder.encode(frames)

    def decode_batch(self, data: bytes | str) -> list[Frame]:
        """Decode one message body to its frames (raises ``msgspec.DecodeError``)."""
        return self._batch_decoder.decode(data)  # type: ignore[no-any-return]


MSGPACK: Final = Codec("msgpack")
JSON: Final = Codec("json")
CODECS: Final = {MSGPACK.subprotocol: MSGPACK, JSON.subprotocol: JSON}
"""Codecs by subprotocol, in order of preference."""

"""The run-event vocabulary: the one place that says what a run's events are.

A run's events are what :class:`~rpcstream.runs.server.RunServer` flows,
:class:`~rpcstream.runs.writer.RunWriter` workers and the event stores write,
and what :class:`~rpcstream.runs.client.RunClient` and the browser module
(``rpcstream/static/rpcstream.js``) read. They all take the words from here:

* :class:`EventType`: the types the framework gives meaning to. Every run
  begins with ``started`` (data ``{"flow": name}``, see :func:`begin_run`) and
  ends with exactly one event of a type in :data:`TERMINAL_TYPES`.
* :class:`ErrorData`: the data of an ``error`` event, ``{"message", "type"}``.
* :class:`RunStatus`: the ``status`` strings of ``runs.status`` and ``runs.cancel``.
* :func:`encode_data`: event data is stored and sent as JSON, encoded by msgspec.

This module imports nothing of rpcstream beyond msgspec and the standard
library, so the stores (which must never import the server) can use it too.
"""

from __future__ import annotations

import enum
import re
from typing import Any, Final, Protocol

import msgspec

__all__ = [
    "INTERRUPTED",
    "MAX_EVENT_ID",
    "RUN_ID_MAX_LENGTH",
    "TERMINAL_TYPES",
    "ErrorData",
    "EventType",
    "RunEvent",
    "RunStatus",
    "StartedData",
    "begin_run",
    "decode_data",
    "encode_data",
    "run_id_problem",
    "started_data",
]


class EventType(enum.StrEnum):
    """The event types the framework writes, or reads as the end of a run.

    A flow or worker may send any other type; ``complete`` it may send itself.
    """

    STARTED = "started"
    """The first event of every run; data :class:`StartedData`."""
    COMPLETE = "complete"
    """Terminal: the run succeeded; data is its result (any JSON)."""
    ERROR = "error"
    """Terminal: the run failed; data is :class:`ErrorData`."""
    CANCELLED = "cancelled"
    """Terminal: ``runs.cancel``, or the server stopped; data is ``null``."""


MAX_EVENT_ID: Final = 2**63 - 1
"""The largest event id: ids are signed 64-bit integers in every store (SQLite
``INTEGER``, Redis ``HINCRBY``), so ``after`` beyond it names no event."""

TERMINAL_TYPES: Final[frozenset[str]] = frozenset(
    {EventType.COMPLETE.value, EventType.ERROR.value, EventType.CANCELLED.value}
)
"""Event types that end a run; a run's status becomes its terminal event's type."""


INTERRUPTED: Final = "Interrupted"
"""The :attr:`ErrorData.type` of a run whose flow died with its process: the server
restarted under it (embedded stores), or the node running it stopped renewing its
lease (shared stores). No flow code raised it: nobody is left to end the run."""

RUN_ID_MAX_LENGTH: Final = 128
"""The longest run id a caller may choose (``runs.start(..., run_id=...)``)."""

_RUN_ID = re.compile(r"[A-Za-z0-9_.:-]+")


def run_id_problem(run_id: object) -> str | None:
    """Why ``run_id`` may not be a caller-chosen run id, or ``None`` when it may.

    A run id is 1 to :data:`RUN_ID_MAX_LENGTH` characters among ASCII letters,
    digits and ``_ . : -``: safe in URLs, file names, Redis keys and logs.
    """
    if not isinstance(run_id, str):
        return f"a run id is a string, not {type(run_id).__name__}"
    if not 1 <= len(run_id) <= RUN_ID_MAX_LENGTH:
        return f"a run id has 1 to {RUN_ID_MAX_LENGTH} characters, not {len(run_id)}"
    if _RUN_ID.fullmatch(run_id) is None:
        return "a run id has only ASCII letters, digits and the characters _ . : -"
    return None


class RunStatus(enum.StrEnum):
    """The ``status`` of a run, as ``runs.status`` (and ``runs.cancel``) answer it."""

    RUNNING = "running"
    """No terminal event yet."""
    CANCELLING = "cancelling"
    """Only in a ``runs.cancel`` answer: the flow was told to stop; ``cancelled`` follows."""
    COMPLETE = EventType.COMPLETE.value
    """Ended by a ``complete`` event."""
    ERROR = EventType.ERROR.value
    """Ended by an ``error`` event."""
    CANCELLED = EventType.CANCELLED.value
    """Ended by a ``cancelled`` event."""


class StartedData(msgspec.Struct, frozen=True):
    """The data of a ``started`` event."""

    flow: str
    """The name of the flow the run executes."""


class ErrorData(msgspec.Struct, frozen=True):
    """The data of an ``error`` event: what went wrong, and the kind of failure."""

    message: str
    """For people: ``str()`` of the exception, or the worker's words."""
    type: str
    """For programs: the exception's class name (``"RuntimeError"``), or a word the
    framework chose: :data:`INTERRUPTED` for a run its server died under."""

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorData:
        """The data of the ``error`` event that ends a run whose flow raised ``exc``."""
        return cls(str(exc), type(exc).__name__)


class RunEvent(msgspec.Struct):
    """One event as a subscriber receives it (an item of ``runs.subscribe``)."""

    id: int
    """Contiguous per run, from 1: resume with ``after=<the last id seen>``."""
    type: str
    data: Any
    timestamp: str
    """ISO 8601, UTC, millisecond precision."""
    run_id: str
    flow: str


encode_data = msgspec.json.Encoder().encode
"""Event data as stored and sent: JSON, by msgspec (Structs, dataclasses, dicts...)."""

decode_data = msgspec.json.Decoder().decode
"""The inverse of :func:`encode_data` (to plain Python values)."""


class _RunLog(Protocol):
    """What :func:`begin_run` needs of an event store (every EventStore has it)."""

    async def create_run(self, run_id: str, flow: str, owner: str | None = None, /) -> Any: ...

    async def append(
        self, run_id: str, type: str, data: bytes, /, *, terminal: bool = False
    ) -> Any: ...


async def begin_run(store: _RunLog, run_id: str, flow: str, owner: str | None = None) -> None:
    """Create the run in ``store`` and append its ``started`` event, as every run begins.

    Used by ``runs.start`` and :meth:`RunWriter.create`, so a run looks the same
    whichever of them began it. Raises what ``create_run`` raises (a
    :class:`ValueError` for a run id taken already).
    """
    await store.create_run(run_id, flow, owner)
    await store.append(run_id, EventType.STARTED.value, started_data(flow))


def started_data(flow: str) -> bytes:
    """The encoded data of a run's ``started`` event."""
    return encode_data(StartedData(flow))

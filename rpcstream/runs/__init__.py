"""Run streams: run ids mapped to persisted, resumable event streams.

* :mod:`~rpcstream.runs.events`: the vocabulary (event types, error data, statuses)
  that every part below, the stores and the browser module share.
* :mod:`~rpcstream.runs.server`: :class:`RunServer`, its flows and the ``runs.*`` methods.
* :mod:`~rpcstream.runs.writer`: :class:`RunWriter`, for workers that only have a store.
* :mod:`~rpcstream.runs.client`: :class:`RunClient`, which follows runs through disconnects.

The stores import :mod:`rpcstream.runs.events`, which runs this file first; so
it imports the server, writer and client only when one of their names is asked
for. Otherwise a store would import the server, which imports the stores.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .events import TERMINAL_TYPES, ErrorData, EventType, RunEvent, RunStatus

if TYPE_CHECKING:
    from .client import RunClient
    from .server import (
        ClientEvent,
        EventValidationError,
        RunChannel,
        RunContext,
        RunServer,
        owner_only,
    )
    from .writer import RunWriter

_LAZY = {
    "RunClient": "client",
    "ClientEvent": "server",
    "EventValidationError": "server",
    "RunChannel": "server",
    "RunContext": "server",
    "RunServer": "server",
    "owner_only": "server",
    "RunWriter": "writer",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rpcstream.runs' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = [
    "TERMINAL_TYPES",
    "ClientEvent",
    "ErrorData",
    "EventType",
    "EventValidationError",
    "RunChannel",
    "RunClient",
    "RunContext",
    "RunEvent",
    "RunServer",
    "RunStatus",
    "RunWriter",
    "owner_only",
]

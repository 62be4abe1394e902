"""Log lines for operators: a JSON formatter and the set-up ``rpcstream serve`` uses.

rpcstream logs through the standard :mod:`logging` module, under ``rpcstream.*``
loggers (``rpcstream.server``: connections and refused handshakes;
``rpcstream.peer``: handler failures; ``rpcstream.runs``, ``rpcstream.store``).
Each line about a connection or a call carries context fields as ``extra``
(``remote_address``, ``principal``, ``method``, ``code``, ``reason``,
``duration``, ``status``): the text format folds them into the message, the JSON
format also gives them as fields of their own.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, Final, TextIO

__all__ = ["FORMATS", "LEVELS", "JsonFormatter", "add_arguments", "configure_logging"]

LEVELS: Final = ("debug", "info", "warning", "error", "critical")
"""The names ``--log-level`` accepts."""
FORMATS: Final = ("text", "json")
"""The names ``--log-format`` accepts."""

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# What every LogRecord has: anything else on a record came from ``extra``.
_STANDARD: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (ISO 8601, UTC), ``level``, ``logger``,
    ``message``, the record's context fields, and ``exception`` (the traceback)
    when there is one. Values JSON cannot hold are written as ``str()``."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        line: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure_logging(
    level: str = "info", format: str = "text", stream: TextIO | None = None
) -> logging.Handler:
    """Send log records at ``level`` and above to ``stream`` (standard error) in
    ``format`` (``text`` or ``json``), replacing the root logger's handlers;
    returns the handler installed. ``websockets``' own INFO lines (the same
    connections again) are left out unless ``level`` is ``debug``. For programs
    (``rpcstream serve``), not libraries: an application that configures
    logging itself needs none of it.
    """
    if level.lower() not in LEVELS:
        raise ValueError(f"unknown log level {level!r}: expected one of {', '.join(LEVELS)}")
    if format not in FORMATS:
        raise ValueError(f"unknown log format {format!r}: expected one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # websockets logs each connection at INFO as well: rpcstream's own lines say
    # the same with the principal and the duration, so one of each is enough.
    logging.getLogger("websockets").setLevel(
        logging.DEBUG if level.lower() == "debug" else logging.WARNING
    )
    return handler


def add_arguments(parser: Any) -> None:
    """``--log-level`` and ``--log-format`` on an ``argparse`` parser (``rpcstream serve``)."""
    parser.add_argument(
        "--log-level", choices=LEVELS, default="info", help="lowest level logged (default info)"
    )
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default="text",
        help="text lines, or one JSON object per line (default text)",
    )

"""The HTTP request before a WebSocket upgrade, and what a server may answer instead.

A server transport reads each request into an :class:`HttpRequest` and asks the
server's hook what to do: answer it with an :class:`HttpResponse` (a plain route,
a refusal) or :class:`Upgrade` it, carrying whatever the server wants handed to
the connection's handler (rpcstream: the principal). Nothing here knows a
WebSocket library, so the ASGI transport (``asgi``) speaks the same.
"""

from __future__ import annotations

import http
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, overload

__all__ = ["Headers", "HttpRequest", "HttpResponse", "OnRequest", "Upgrade"]


class Headers(Protocol):
    """HTTP headers: names compare case-insensitively, and a name may repeat."""

    @overload
    def get(self, key: str) -> str | None: ...
    @overload
    def get(self, key: str, default: str) -> str: ...
    def get(self, key: str, default: str | None = None) -> str | None:
        """The value of ``key`` (raises if it repeats), or ``default``."""
        ...

    def get_all(self, key: str) -> list[str]:
        """Every value of ``key``, in order."""
        ...

    def __getitem__(self, key: str) -> str: ...
    def __contains__(self, key: object) -> bool: ...
    def __iter__(self) -> Iterator[str]: ...


@dataclass(frozen=True, eq=False)
class HttpRequest:
    """One HTTP request as the server transport read it."""

    target: str
    """The request target: path and query string."""
    headers: Headers
    remote_address: Any
    """The client's (host, port), where known."""
    websocket: bool | None = None
    """Whether the server knows it asks for a WebSocket (an ASGI ``websocket``
    scope, which may come over HTTP/2 with no ``Upgrade`` header); ``None``:
    judge from the headers."""

    @property
    def path(self) -> str:
        """The target's path, without the query string."""
        return urllib.parse.urlsplit(self.target).path

    @property
    def query(self) -> dict[str, str]:
        """The query string's parameters (the last of repeated ones)."""
        return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.target).query))

    @property
    def is_upgrade(self) -> bool:
        """Whether it asks for a WebSocket (otherwise it is plain HTTP)."""
        if self.websocket is not None:
            return self.websocket
        return "websocket" in self.headers.get("Upgrade", "").lower()

    @property
    def subprotocols(self) -> list[str]:
        """The WebSocket subprotocols offered, in the client's order."""
        return [
            name.strip()
            for value in self.headers.get_all("Sec-WebSocket-Protocol")
            for name in value.split(",")
            if name.strip()
        ]


@dataclass(frozen=True)
class HttpResponse:
    """An answer sent instead of the upgrade (a plain route, a refusal)."""

    status: int
    body: bytes = field(repr=False)
    content_type: str

    @property
    def reason(self) -> str:
        """The status line's reason phrase."""
        try:
            return http.HTTPStatus(self.status).phrase
        except ValueError:
            return "Error"

    def header_list(self) -> list[tuple[str, str]]:
        """The headers to send with it."""
        return [
            ("Content-Type", self.content_type),
            ("Content-Length", str(len(self.body))),
            ("Cache-Control", "no-cache"),
            ("X-Content-Type-Options", "nosniff"),
        ]


@dataclass(frozen=True)
class Upgrade:
    """Go on with the upgrade; ``context`` goes to the connection's handler."""

    context: Any = None


OnRequest = Callable[[HttpRequest], Awaitable[HttpResponse | Upgrade]]
"""The server's hook: sees every request before the upgrade."""

"""What happens before the WebSocket opens: plain HTTP routes, and authentication.

The server transport hands every HTTP request (an :class:`HttpRequest`) to the
server's hook before the upgrade. With what is here, the hook either answers a
plain HTTP route (``GET /rpcstream.js``, the browser module, and any routes the
app declares), or runs the ``authenticate`` hook and refuses with HTTP
401/403/429 before the upgrade. Nothing here knows frames, peers or a WebSocket
library; ``server.py`` wires it in.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .transport.http import Headers, HttpRequest, HttpResponse

__all__ = [
    "Authenticate",
    "HandshakeRequest",
    "HttpResponse",
    "Route",
    "StaticFile",
    "current_principal",
    "principal_id",
]

STATIC_DIR = Path(__file__).parent / "static"

_principal: contextvars.ContextVar[Any] = contextvars.ContextVar("rpcstream_principal")


def current_principal() -> Any:
    """The principal ``authenticate`` returned for the connection being served
    (in handlers, and in flows started from them); ``None`` without ``authenticate``."""
    return _principal.get(None)


def principal_id(principal: Any) -> str | None:
    """The string a run records as its owner: the principal itself when it is a
    ``str``, else its ``id`` attribute, else ``str(principal)``."""
    if principal is None:
        return None
    if isinstance(principal, str):
        return principal
    return str(getattr(principal, "id", principal))


@dataclass(frozen=True)
class HandshakeRequest:
    """The upgrade request, as ``authenticate`` sees it."""

    path: str
    query: Mapping[str, str]
    headers: Headers
    subprotocols: list[str]
    remote_address: Any

    @property
    def bearer_token(self) -> str | None:
        """The token of ``Authorization: Bearer <token>``, or of the ``access_token``
        query parameter (browsers cannot set headers on a WebSocket)."""
        auth = self.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return self.query.get("access_token") or None


Authenticate = Callable[[HandshakeRequest], Any | Awaitable[Any]]
"""``authenticate(request) -> principal``: return the principal, or ``None`` (or
raise :class:`Refused`) to refuse before the upgrade. May be sync or async."""


@dataclass(frozen=True)
class StaticFile:
    """A plain HTTP ``GET`` route: its content type and body."""

    content_type: str
    body: bytes = field(repr=False)

    @classmethod
    def from_path(cls, path: Path, content_type: str) -> StaticFile:
        """Read a file once, at start-up."""
        return cls(content_type, path.read_bytes())


Route = StaticFile | Callable[[HandshakeRequest], Awaitable[HttpResponse]]
"""A plain HTTP ``GET`` route: a fixed :class:`StaticFile`, or an async function that
answers each request (health checks, metrics) with an :class:`HttpResponse`."""


def builtin_routes() -> dict[str, StaticFile]:
    """The browser module and its type declarations, when shipped.

    ``/rpcstream.js`` is the entry point a page imports; it imports the modules
    of ``static/rpcstream/`` relatively, so each is served at
    ``/rpcstream/<name>.js``, as it is (no bundler).
    """
    js = "text/javascript; charset=utf-8"
    files = [
        ("rpcstream.js", js),
        ("rpcstream.d.ts", "application/typescript; charset=utf-8"),
    ]
    modules = sorted((STATIC_DIR / "rpcstream").glob("*.js"))
    files += [(f"rpcstream/{path.name}", js) for path in modules]
    routes = {}
    for name, kind in files:
        path = STATIC_DIR / name
        if path.is_file():
            routes["/" + name] = StaticFile.from_path(path, kind)
    return routes


def respond(status: int, body: bytes, content_type: str) -> HttpResponse:
    """An HTTP response sent instead of the upgrade."""
    return HttpResponse(status, body, content_type)


def refuse(status: int, message: str) -> HttpResponse:
    """A plain-text refusal (401, 403, 429...)."""
    return respond(status, f"{message}\n".encode(), "text/plain; charset=utf-8")


def parse_request(request: HttpRequest) -> HandshakeRequest:
    """The upgrade request as ``authenticate`` sees it."""
    return HandshakeRequest(
        request.path, request.query, request.headers, request.subprotocols, request.remote_address
    )


async def run_authenticate(authenticate: Authenticate, request: HandshakeRequest) -> Any:
    """Call the hook (sync or async); ``None`` means refused."""
    result = authenticate(request)
    if inspect.isawaitable(result):
        result = await result
    return result

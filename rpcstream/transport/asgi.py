"""The ASGI WebSocket interface as a :class:`Transport`, and the ASGI side of a server.

Theory of operation
-------------------
Under an ASGI server (uvicorn, hypercorn, ...) the server owns the socket, the
WebSocket framing, pings and the closing handshake; the application sees
events (ASGI 3, "WebSocket" and "HTTP" specs). :func:`serve_asgi_websocket`
turns a ``websocket`` scope into what :func:`~.websocket.serve_websocket` does
with a websockets connection: it reads the request into an :class:`HttpRequest`,
asks the server's ``on_request`` hook, then either refuses before the upgrade
(with the ``websocket.http.response`` extension where the server offers it: the
client gets the real HTTP status; without it, a close before ``accept``,
which every ASGI server answers with HTTP 403) or accepts with the first
subprotocol the client offers among ours and runs the handler on an
:class:`AsgiTransport`. :func:`serve_asgi_http` answers plain ``http`` scopes
from the same hook.

Backpressure. :meth:`AsgiTransport.send` awaits the server's ``send``, one
message at a time (the peer's writer is its only caller), so a server whose
socket is full (uvicorn pauses sends above its transport's write-buffer
high-water mark, hypercorn awaits the drain) holds the writer, the peer's
queue grows to ``max_buffered_amount`` and stream senders wait. What the
server has accepted but not written cannot be seen through ASGI:
:attr:`AsgiTransport.buffered_amount` is 0, and the bytes beyond the peer's
count are bounded by the server's own buffer (a 64 KiB high-water mark for
asyncio transports under uvicorn).

Limits. The server has buffered a whole message before the application sees
it, so its own limit (uvicorn ``--ws-max-size``, hypercorn
``websocket_max_message_size``; both 16 MiB by default) is what bounds memory;
:class:`AsgiTransport` also closes with 1009 on messages above
``max_message_size``. Text is UTF-8 by then: the server checked it (1007).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping, Sequence
from typing import Any, overload

from ..errors import ConnectionClosed
from .base import Transport
from .http import HttpRequest, HttpResponse, OnRequest

__all__ = [
    "AsgiTransport",
    "Receive",
    "Scope",
    "ScopeHeaders",
    "Send",
    "refuse_websocket",
    "route_target",
    "serve_asgi_http",
    "serve_asgi_websocket",
]

Scope = MutableMapping[str, Any]
"""An ASGI connection scope."""
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
"""An ASGI ``receive`` callable."""
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
"""An ASGI ``send`` callable."""

_MAX_REASON = 123  # bytes a close frame's reason may hold (RFC 6455, 5.5)
_RESPONSE_EXTENSION = "websocket.http.response"


class ScopeHeaders:
    """An ASGI scope's headers (``(name, value)`` byte pairs) as :class:`~.http.Headers`."""

    __slots__ = ("_items",)

    def __init__(self, raw: Iterable[tuple[bytes, bytes]]) -> None:
        # HTTP header bytes are Latin-1 (RFC 9110, 5.5); names compare lowercased.
        self._items = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in raw]

    @overload
    def get(self, key: str) -> str | None: ...
    @overload
    def get(self, key: str, default: str) -> str: ...
    def get(self, key: str, default: str | None = None) -> str | None:
        """The value of ``key``, or ``default``; raises ``LookupError`` if it repeats."""
        values = self.get_all(key)
        if not values:
            return default
        if len(values) > 1:
            raise LookupError(f"the {key} header is repeated")
        return values[0]

    def get_all(self, key: str) -> list[str]:
        """Every value of ``key``, in order."""
        key = key.lower()
        return [v for k, v in self._items if k == key]

    def __getitem__(self, key: str) -> str:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and any(k == key.lower() for k, _ in self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(k for k, _ in self._items)


def route_target(scope: Scope) -> str:
    """The request target as the app sees it: the path below the mount point
    (Starlette's ``Mount`` keeps ``path`` whole and extends ``root_path``) and
    the query string."""
    path: str = scope.get("path") or "/"
    root: str = scope.get("root_path") or ""
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        path = path[len(root) :] or "/"
    query: bytes = scope.get("query_string") or b""
    return f"{path}?{query.decode('latin-1')}" if query else path


def _client(scope: Scope) -> Any:
    client = scope.get("client")
    return tuple(client) if client else None


def _request(scope: Scope, *, websocket: bool) -> HttpRequest:
    headers = ScopeHeaders(scope.get("headers") or ())
    return HttpRequest(route_target(scope), headers, _client(scope), websocket=websocket)


def _short_reason(reason: str) -> str:
    """A close reason that fits a close frame, cut at a character boundary."""
    data = reason.encode()
    if len(data) <= _MAX_REASON:
        return reason
    return data[: _MAX_REASON - 3].decode(errors="ignore") + "..."


def _header_pairs(response: HttpResponse) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response.header_list()]


class AsgiTransport(Transport):
    """One accepted ASGI WebSocket (see the module docstring)."""

    def __init__(
        self,
        receive: Receive,
        send: Send,
        *,
        subprotocol: str | None,
        remote_address: Any = None,
        max_message_size: int | None = None,
    ) -> None:
        self._receive = receive
        self._send = send
        self.subprotocol = subprotocol
        self._remote_address = remote_address
        self._max_message_size = max_message_size
        self._code: int | None = None  # once closed, by either side
        self._reason = ""
        self._disconnected = False  # the server reported websocket.disconnect
        self._close_sent = False

    def _closed(self) -> ConnectionClosed:
        return ConnectionClosed(self._code or 1006, self._reason or "connection lost")

    async def send(self, message: bytes, *, text: bool) -> None:
        """Hand one message to the server; waits while the server's socket is full."""
        if self._code is not None:
            raise self._closed()
        event: dict[str, Any] = {"type": "websocket.send"}
        if text:
            event["text"] = message.decode()
        else:
            event["bytes"] = message
        try:
            await self._send(event)
        except OSError as exc:  # ASGI: a send on a closed connection raises an OSError
            if self._code is None:
                self._code, self._reason = 1006, "connection lost"
            raise self._closed() from exc

    async def receive(self) -> bytes:
        """The next message, text or binary, as bytes; :class:`ConnectionClosed`
        once the server reports the connection's end."""
        while not self._disconnected:
            event = await self._receive()
            kind = event.get("type")
            if kind == "websocket.receive":
                data = event.get("bytes")
                if data is None:
                    data = (event.get("text") or "").encode()
                limit = self._max_message_size
                if limit is not None and len(data) > limit:
                    reason = f"message of {len(data)} bytes exceeds {limit}"
                    await self.aclose(1009, reason)
                    raise ConnectionClosed(1009, reason)
                return bytes(data)
            if kind == "websocket.disconnect":
                self._disconnected = True
                code = event.get("code")
                self._code = int(code) if code is not None else 1005
                self._reason = str(event.get("reason") or "")
        raise self._closed()

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Ask the server to close with ``code`` (it runs the closing handshake
        once the application returns)."""
        if self._close_sent or self._disconnected:
            return
        self._close_sent = True
        if self._code is None:
            self._code, self._reason = code, reason
        with contextlib.suppress(OSError):  # gone already: nothing to say goodbye to
            await self._send(
                {"type": "websocket.close", "code": code, "reason": _short_reason(reason)}
            )

    @property
    def close_code(self) -> int | None:
        """The close code, once closed (ours if we closed first)."""
        return self._code

    @property
    def remote_address(self) -> object:
        """The client's (host, port) from the scope, where the server knows it."""
        return self._remote_address


async def refuse_websocket(scope: Scope, send: Send, answer: HttpResponse) -> None:
    """Refuse a WebSocket before it is accepted: with ``answer`` itself where
    the server has the ``websocket.http.response`` extension, else with a close
    (code 1008, policy violation), which ASGI servers answer with HTTP 403."""
    if _RESPONSE_EXTENSION in (scope.get("extensions") or {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": answer.status,
                "headers": _header_pairs(answer),
            }
        )
        await send({"type": "websocket.http.response.body", "body": answer.body})
        return
    reason = answer.body.decode(errors="replace").strip()
    await send({"type": "websocket.close", "code": 1008, "reason": _short_reason(reason)})


async def serve_asgi_websocket(
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    on_request: OnRequest,
    handler: Callable[[AsgiTransport, Any], Awaitable[None]],
    subprotocols: Sequence[str],
    max_message_size: int | None,
) -> None:
    """Serve one ``websocket`` scope: ``on_request`` decides, then ``handler``
    runs on the accepted connection (as :func:`~.websocket.serve_websocket`)."""
    event = await receive()
    if event.get("type") != "websocket.connect":
        return  # the client left before the handshake
    answer = await on_request(_request(scope, websocket=True))
    if isinstance(answer, HttpResponse):
        await refuse_websocket(scope, send, answer)
        return
    accepted = set(subprotocols)
    offered: list[str] = list(scope.get("subprotocols") or ())
    chosen = next((name for name in offered if name in accepted), None)
    accept: dict[str, Any] = {"type": "websocket.accept"}
    if chosen is not None:
        accept["subprotocol"] = chosen
    try:
        await send(accept)
    except OSError:
        return  # gone during the handshake
    transport = AsgiTransport(
        receive,
        send,
        subprotocol=chosen,
        remote_address=_client(scope),
        max_message_size=max_message_size,
    )
    await handler(transport, answer.context)


async def serve_asgi_http(
    scope: Scope, receive: Receive, send: Send, on_request: OnRequest
) -> None:
    """Answer one plain ``http`` scope from ``on_request`` (``GET`` and ``HEAD``;
    other methods get 405)."""
    method = scope.get("method", "GET")
    if method in ("GET", "HEAD"):
        answer = await on_request(_request(scope, websocket=False))
        assert isinstance(answer, HttpResponse), "plain requests are answered, never upgraded"
        headers = _header_pairs(answer)
    else:
        answer = HttpResponse(405, b"method not allowed\n", "text/plain; charset=utf-8")
        headers = [*_header_pairs(answer), (b"allow", b"GET, HEAD")]
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if method == "HEAD" else answer.body})

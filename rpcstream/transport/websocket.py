"""A websockets connection as a :class:`Transport`, on asyncio or on trio.

websockets ships one connection class per event loop (``websockets.asyncio`` and
``websockets.trio``) with the same ``send``/``recv`` API. :class:`WebSocketTransport`
takes either, maps their ``ConnectionClosed`` to ours and reports the bytes the
asyncio transport still holds, so the peer's ``buffered_amount`` counts
everything not yet handed to the kernel.

:func:`open_websocket` and :func:`serve_websocket` are the only places that ask
which event loop runs: ``asyncio_ws`` and ``trio_ws`` hold each loop's
connections. Clients and servers above see transports, :class:`WebSocketOptions`
and the loop-free :mod:`~rpcstream.transport.http` types, never websockets.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import ssl as ssl_module
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import websockets.exceptions
from websockets.asyncio.connection import Connection as AsyncioConnection
from websockets.datastructures import Headers
from websockets.http11 import Response
from websockets.protocol import State

from ..errors import ConnectionClosed, HandshakeRefused
from .base import Transport
from .http import HttpRequest, HttpResponse, OnRequest
from .loop import NextTurn, TrioNextTurn, is_trio, next_turn, trio_next_turn
from .options import WebSocketOptions

__all__ = ["WebSocketTransport", "open_websocket", "serve_websocket"]


class WebSocketTransport(Transport):
    """Wraps a ``websockets.asyncio`` or ``websockets.trio`` connection."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.subprotocol = ws.subprotocol
        # asyncio connections expose their transport's write buffer; on trio only
        # what a write at once left for the background flush lingers (see trio_ws).
        self._asyncio_transport = getattr(ws, "transport", None)
        self._close = getattr(ws, "close", None) or ws.aclose
        # On asyncio a message can be written without waiting (websockets' own
        # send() does exactly this, then awaits a drain only when paused).
        self._direct: AsyncioConnection | None = ws if isinstance(ws, AsyncioConnection) else None
        # For run_soon: one context for every callback, not a copy per call.
        self._context = contextvars.copy_context()
        # On trio the connections of trio_ws write at once themselves, when they can.
        self._trio: Any = ws if self._direct is None and hasattr(ws, "send_now") else None
        # For run_soon: the loop's one handle a turn that the connections share.
        self._next_turn: NextTurn | TrioNextTurn | None = None
        if self._direct is not None:
            self._next_turn = next_turn(self._direct.loop)
        elif self._trio is not None:
            self._next_turn = trio_next_turn()

    async def send(self, message: bytes, *, text: bool) -> None:
        """Send one message (a text frame when ``text``)."""
        try:
            await self.ws.send(message, text=text)
        except websockets.exceptions.ConnectionClosed as exc:
            raise _closed(exc) from exc

    async def receive(self) -> bytes:
        """Receive one message as bytes, whatever its frame type. (The
        connections :func:`open_websocket` and :func:`serve_websocket` make have
        checked that text is UTF-8 as it arrived.)"""
        try:
            data = await self.ws.recv(decode=False)
        except websockets.exceptions.ConnectionClosed as exc:
            raise _closed(exc) from exc
        return data  # type: ignore[no-any-return]

    def deliver(
        self, on_messages: Callable[[list[bytes]], None], on_lost: Callable[[], None]
    ) -> bool:
        """Have messages handed over as they arrive (the asyncio connections
        :func:`open_websocket` and :func:`serve_websocket` make)."""
        deliver = getattr(self.ws, "deliver", None)
        if deliver is None:
            return False
        deliver(on_messages, on_lost)
        return True

    def can_send_now(self) -> bool:
        """asyncio: open, not sending a fragmented message, and the socket's write
        buffer below its high-water mark (so nothing would wait); trio: see
        ``trio_ws`` (plain TCP, and nothing else writing)."""
        ws = self._direct
        if ws is None:
            return self._trio is not None and bool(self._trio.can_send_now())
        return (
            ws.protocol.state is State.OPEN
            and ws.send_in_progress is None
            and not ws.paused
            and not ws.transport.is_closing()
        )

    def send_now(self, message: bytes, *, text: bool) -> None:
        """Write one message to the asyncio transport, as websockets' ``send()``
        does before it would wait for a drain (trio: to the socket, see ``trio_ws``)."""
        ws = self._direct
        if ws is None:
            self._trio.send_now(message, text=text)
            return
        try:
            if text:
                ws.protocol.send_text(message)
            else:
                ws.protocol.send_binary(message)
            ws.send_data()
        except Exception as exc:  # as in websockets' send(): the connection is broken
            ws.set_connection_exc(exc)
            ws.transport.abort()

    def run_soon(self, callback: Callable[[], None]) -> bool:
        """Run ``callback`` in the loop's next turn (a callback costs less than
        waking a task; the loop's connections share one handle a turn, see
        :class:`~rpcstream.transport.loop.NextTurn`); ``False`` for a connection
        this package's asyncio and trio modules did not make, which has no way to
        write without awaiting."""
        turn = self._next_turn
        if turn is None:
            return False
        turn.add(callback, self._context)
        return True

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Run the WebSocket closing handshake (bounded by websockets' close_timeout)."""
        await self._close(code, reason)

    async def abort(self) -> None:
        """Close the TCP connection at once (asyncio: abort the transport; trio:
        close the stream)."""
        if self._asyncio_transport is not None:
            self._asyncio_transport.abort()
        else:
            await self.ws.stream.aclose()

    @property
    def buffered_amount(self) -> int:
        """Bytes in the asyncio transport's write buffer (trio: what a write at
        once left for the background flush)."""
        t = self._asyncio_transport
        if t is None:
            return int(self._trio.buffered_amount) if self._trio is not None else 0
        try:
            return int(t.get_write_buffer_size())
        except (AttributeError, RuntimeError):
            return 0

    @property
    def close_code(self) -> int | None:
        """The WebSocket close code, once closed."""
        code = self.ws.close_code
        return None if code is None else int(code)

    @property
    def remote_address(self) -> object:
        """The remote (host, port)."""
        try:
            return self.ws.remote_address
        except (AttributeError, OSError):
            return None


def _closed(exc: websockets.exceptions.ConnectionClosed) -> ConnectionClosed:
    frame = exc.rcvd or exc.sent
    if frame is None:
        return ConnectionClosed(1006, "connection lost")
    return ConnectionClosed(int(frame.code), frame.reason)


@contextlib.asynccontextmanager
async def open_websocket(
    url: str,
    *,
    subprotocol: str,
    options: WebSocketOptions,
    headers: Sequence[tuple[str, str]] = (),
    ssl: ssl_module.SSLContext | None = None,
) -> AsyncIterator[WebSocketTransport]:
    """Open a WebSocket to ``url`` offering ``subprotocol``, on the running loop.

    Raises :class:`ConnectionClosed` (1006) when the server cannot be reached or
    the handshake fails, :class:`HandshakeRefused` when the server answers with
    an HTTP status instead. Leaving the block runs the closing handshake.
    """
    kwargs: dict[str, Any] = {
        "subprotocols": [subprotocol],
        **options.websockets_kwargs(),
        "additional_headers": list(headers) or None,
    }
    if ssl is not None:
        kwargs["ssl"] = ssl
    if is_trio():
        from . import trio_ws as loop_ws
    else:
        from . import asyncio_ws as loop_ws  # type: ignore[no-redef]
    try:
        cm = loop_ws.connect(url, **kwargs)
        ws = await cm.__aenter__()
    except loop_ws.UNREACHABLE as exc:
        reason = describe_failure(exc, secure=url.startswith("wss://"))
        raise ConnectionClosed(1006, f"cannot connect to {url}: {reason}") from exc
    except websockets.exceptions.InvalidStatus as exc:
        status = exc.response.status_code
        body = exc.response.body.decode(errors="replace").strip()[:200]
        detail = f": {body}" if body else ""
        raise HandshakeRefused(
            status, f"{url} refused the handshake: HTTP {status}{detail}"
        ) from exc
    except websockets.exceptions.InvalidHandshake as exc:
        raise ConnectionClosed(1006, f"{url}: WebSocket handshake failed: {exc}") from exc
    try:
        yield WebSocketTransport(ws)
    finally:
        await cm.__aexit__(None, None, None)


@contextlib.asynccontextmanager
async def serve_websocket(
    handler: Callable[[WebSocketTransport, Any], Awaitable[None]],
    on_request: OnRequest,
    host: str,
    port: int,
    *,
    subprotocols: Sequence[str],
    options: WebSocketOptions,
    origins: Sequence[str | None] | None = None,
    ssl: ssl_module.SSLContext | None = None,
) -> AsyncIterator[int]:
    """Accept WebSocket connections on ``host:port`` (0: any free port) on the
    running loop, and yield the port bound.

    ``on_request`` sees every HTTP request first: it answers it with an
    :class:`HttpResponse`, or returns :class:`Upgrade` and then
    ``handler(transport, upgrade.context)`` runs for the connection's lifetime.
    The subprotocol chosen is the first the client offers among ``subprotocols``
    (none if it offers none of them: the handler decides). ``origins`` lists the
    ``Origin`` headers accepted (``None`` in it: no header); default: any.
    """
    accepted = set(subprotocols)

    async def process_request(connection: Any, request: Any) -> Response | None:
        answer = await on_request(
            HttpRequest(request.path, request.headers, getattr(connection, "remote_address", None))
        )
        if isinstance(answer, HttpResponse):
            headers = Headers(answer.header_list())
            return Response(answer.status, answer.reason, headers, answer.body)
        connection.rpcstream_context = answer.context
        return None

    def select_subprotocol(connection: Any, offered: Iterable[str]) -> str | None:
        return next((name for name in offered if name in accepted), None)

    async def ws_handler(ws: Any) -> None:
        await handler(WebSocketTransport(ws), getattr(ws, "rpcstream_context", None))

    kwargs: dict[str, Any] = {
        "subprotocols": list(subprotocols),
        "select_subprotocol": select_subprotocol,
        **options.websockets_kwargs(),
        "process_request": process_request,
        "origins": list(origins) if origins is not None else None,
        "ssl": ssl,
    }
    if is_trio():
        from . import trio_ws as loop_ws
    else:
        from . import asyncio_ws as loop_ws  # type: ignore[no-redef]
    async with loop_ws.serve(ws_handler, host, port, **kwargs) as bound:
        yield bound


_TLS_REFUSED = "the server closed the connection in the TLS handshake (a plain ws:// server?)"


def describe_failure(exc: BaseException, secure: bool) -> str:
    """Why a connection attempt failed, in words, the same on asyncio and trio: the
    specific failures under the generic ones the loops wrap them in (trio's "all
    attempts to connect ... failed (1 sub-exception)", an empty BrokenResourceError
    over the TLS error). ``secure``: the URL was ``wss://``, so a reset means the
    TLS handshake failed (asyncio sees a reset, trio an EOF, when a plain server
    drops a TLS hello)."""
    texts: list[str] = []
    for leaf in _leaves(exc):
        if isinstance(leaf, (ssl_module.SSLEOFError, ssl_module.SSLZeroReturnError)) or (
            secure and isinstance(leaf, ConnectionResetError)
        ):
            text = _TLS_REFUSED
        elif isinstance(leaf, OSError) and not isinstance(leaf, ssl_module.SSLError) and leaf.errno:
            # getaddrinfo's errors are negative: their text is in strerror.
            text = os.strerror(leaf.errno) if leaf.errno > 0 else str(leaf.strerror)
        else:
            text = str(leaf) or type(leaf).__name__
        if text not in texts:
            texts.append(text)
    return "; ".join(texts)


def _leaves(exc: BaseException) -> list[BaseException]:
    """The specific failures under the generic ones a connection attempt wraps them in."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    cause = exc.__cause__
    if cause is not None and (isinstance(cause, BaseExceptionGroup) or not str(exc)):
        return _leaves(cause)
    return [exc]

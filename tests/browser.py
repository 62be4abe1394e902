"""Drive headless Chromium over the Chrome DevTools Protocol (CDP), with websockets.

No browser is downloaded: this runs the system's Chromium (Debian package
``chromium``, ``/usr/bin/chromium``) with ``--remote-debugging-port=0`` and reads
the DevTools URL it prints on stderr. :func:`launch` starts the process (sync:
one per test module); :func:`cdp_session` opens a CDP connection to it from a
test (on asyncio or trio) and :meth:`CDPSession.new_page` a fresh tab.

Pages are driven with ``Runtime.evaluate`` and ``awaitPromise``: a test waits for
something by evaluating a promise the page resolves when it happens, never by
sleeping.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from rpcstream.transport import is_trio

CHROMIUM = os.environ.get("RPCSTREAM_CHROMIUM", "/usr/bin/chromium")

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-port=0",
]


class BrowserError(Exception):
    """Chromium failed to start, or a page did something unexpected."""


class JSError(BrowserError):
    """An expression evaluated in a page threw (or its promise rejected)."""


class Chromium:
    """A headless Chromium process and the DevTools URL it listens on."""

    def __init__(self, path: str = CHROMIUM, *, start_timeout: float = 30.0) -> None:
        self.profile = tempfile.mkdtemp(prefix="rpcstream-chromium-")
        self.stderr_tail: deque[str] = deque(maxlen=50)
        self.ws_url = ""
        found = threading.Event()
        # Our own process group, so closing ends Chromium's helper processes too.
        self.process = subprocess.Popen(
            [path, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )

        def drain() -> None:
            # Read stderr until Chromium exits: a full pipe would block it.
            assert self.process.stderr is not None
            for line in self.process.stderr:
                self.stderr_tail.append(line.rstrip())
                if not found.is_set() and line.startswith("DevTools listening on "):
                    self.ws_url = line.removeprefix("DevTools listening on ").strip()
                    found.set()
            found.set()  # exited: wake the waiter, which then reports the failure

        self._drain = threading.Thread(target=drain, name="chromium-stderr", daemon=True)
        self._drain.start()
        if not found.wait(start_timeout) or not self.ws_url:
            tail = "\n".join(self.stderr_tail)
            self.close()
            raise BrowserError(f"{path} did not print its DevTools URL:\n{tail}")

    def close(self) -> None:
        """End Chromium (and its helpers: the process group we created)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self._drain.join(timeout=10)  # it stops at EOF, once every helper is gone
        if self.process.stderr is not None:
            self.process.stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)


def launch(path: str = CHROMIUM) -> Chromium:
    """Start headless Chromium; close it with :meth:`Chromium.close`."""
    return Chromium(path)


@dataclass
class _Waiter:
    event: anyio.Event = field(default_factory=anyio.Event)
    result: Any = None
    error: dict[str, Any] | None = None


class CDPSession:
    """One CDP WebSocket connection to the browser; pages attach to it as sessions."""

    def __init__(self, ws: Any) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiters: dict[int, _Waiter] = {}
        self._listeners: list[tuple[str | None, str, Callable[[dict[str, Any]], None]]] = []
        self._closed: BaseException | None = None

    async def send(
        self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None
    ) -> Any:
        """Send one command and return its result (raises BrowserError on a CDP error)."""
        if self._closed is not None:
            raise BrowserError(f"the DevTools connection is closed: {self._closed}")
        msg_id = next(self._ids)
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        waiter = self._waiters[msg_id] = _Waiter()
        try:
            await self._ws.send(json.dumps(message))
            await waiter.event.wait()
        finally:
            del self._waiters[msg_id]
        if waiter.error is not None:
            raise BrowserError(f"{method}: {waiter.error.get('message')} {waiter.error}")
        return waiter.result

    def on(
        self, method: str, callback: Callable[[dict[str, Any]], None], session: str | None
    ) -> None:
        """Call ``callback(params)`` for every ``method`` event of ``session``."""
        self._listeners.append((session, method, callback))

    async def _read(self) -> None:
        try:
            async for raw in self._ws:
                message = json.loads(raw)
                if "id" in message:
                    waiter = self._waiters.get(message["id"])
                    if waiter is not None:
                        waiter.result = message.get("result")
                        waiter.error = message.get("error")
                        waiter.event.set()
                    continue
                for session, method, callback in list(self._listeners):
                    if method == message.get("method") and session == message.get("sessionId"):
                        callback(message.get("params", {}))
        except Exception as exc:
            self._closed = exc
        else:
            self._closed = BrowserError("closed")
        finally:
            for waiter in self._waiters.values():
                waiter.error = {"message": f"DevTools connection lost: {self._closed}"}
                waiter.event.set()

    async def new_page(self, width: int = 1000, height: int = 760) -> Page:
        """A new tab, attached, with its console recorded and a fixed viewport."""
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self, target["targetId"], attached["sessionId"])
        await page._setup(width, height)
        return page


class Page:
    """One tab: navigate, evaluate JavaScript, take screenshots."""

    def __init__(self, cdp: CDPSession, target_id: str, session_id: str) -> None:
        self.cdp = cdp
        self.target_id = target_id
        self.session_id = session_id
        self.console: list[str] = []
        """What the page logged (console.*, uncaught exceptions), for failure messages."""
        self._loaded = anyio.Event()

    async def send(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """A CDP command for this tab."""
        return await self.cdp.send(method, params, session=self.session_id)

    async def _setup(self, width: int, height: int) -> None:
        def console(params: dict[str, Any]) -> None:
            args = [_describe(a) for a in params.get("args", [])]
            self.console.append(f"console.{params.get('type')}: {' '.join(args)}")

        def exception(params: dict[str, Any]) -> None:
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text")
            self.console.append(f"uncaught: {text}")

        def loaded(params: dict[str, Any]) -> None:
            self._loaded.set()

        self.cdp.on("Runtime.consoleAPICalled", console, self.session_id)
        self.cdp.on("Runtime.exceptionThrown", exception, self.session_id)
        self.cdp.on("Page.loadEventFired", loaded, self.session_id)
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    async def goto(self, url: str, timeout: float = 15.0) -> None:
        """Navigate and wait for the load event."""
        self._loaded = anyio.Event()
        result = await self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"cannot load {url}: {result['errorText']}")
        with anyio.fail_after(timeout):
            await self._loaded.wait()

    async def evaluate(self, expression: str, timeout: float = 20.0) -> Any:
        """Evaluate ``expression`` (awaiting it if it is a promise); return its JSON value.

        Raises :class:`JSError` with the exception's stack if it throws, and
        ``TimeoutError`` (with what the page logged) if it takes over ``timeout`` s.
        """
        try:
            with anyio.fail_after(timeout):
                reply = await self.send(
                    "Runtime.evaluate",
                    {"expression": expression, "awaitPromise": True, "returnByValue": True},
                )
        except TimeoutError:
            raise TimeoutError(
                f"evaluate() took over {timeout} s; the page logged:\n" + self.log()
            ) from None
        details = reply.get("exceptionDetails")
        if details is not None:
            exc = details.get("exception", {})
            text = exc.get("description") or exc.get("value") or details.get("text")
            raise JSError(f"{text}\nthe page logged:\n{self.log()}")
        return reply["result"].get("value")

    async def screenshot(self) -> bytes:
        """A PNG of the viewport."""
        result = await self.send("Page.captureScreenshot", {"format": "png"})
        return base64.b64decode(result["data"])

    def log(self) -> str:
        """What the page logged so far, one line each."""
        return "\n".join(self.console) or "(nothing)"

    async def close(self) -> None:
        """Close the tab."""
        await self.cdp.send("Target.closeTarget", {"targetId": self.target_id})


def _describe(arg: dict[str, Any]) -> str:
    if "value" in arg:
        return str(arg["value"])
    return str(arg.get("description") or arg.get("type"))


@contextlib.asynccontextmanager
async def cdp_session(ws_url: str) -> AsyncIterator[CDPSession]:
    """A CDP connection to the browser at ``ws_url``, on the running event loop."""
    if is_trio():
        from websockets.trio.client import connect
    else:
        from websockets.asyncio.client import connect  # type: ignore[assignment]
    # Screenshots are large messages; Chromium does not need our pings.
    async with connect(ws_url, max_size=None, ping_interval=None) as ws:  # noqa: SIM117
        async with anyio.create_task_group() as tg:
            session = CDPSession(ws)
            tg.start_soon(session._read)
            try:
                yield session
            finally:
                tg.cancel_scope.cancel()


def png_info(data: bytes) -> tuple[int, int, int]:
    """``(width, height, distinct rows)`` of an 8-bit RGB(A) PNG, to tell a real
    rendering from a blank image without an imaging library."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat = 8, b""
    width = height = channels = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            if depth != 8 or color not in (2, 6):
                raise ValueError(f"unexpected PNG format: depth {depth}, color type {color}")
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = 1 + width * channels
    # Rows are left filtered (unfiltering in pure Python is slow): a blank or
    # uniform picture has a handful of distinct filtered rows, text has hundreds.
    rows = {raw[i * stride : (i + 1) * stride] for i in range(height)}
    return width, height, len(rows)

"""serve()'s health endpoints and the store's readiness hook they ask.

(The rest of ``serve()`` is tested where its behaviour lives: tests/test_security.py
for routes, origins and authentication, tests/test_calls.py for calls.)
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import pytest

import rpcstream
from rpcstream.store.memory import MemoryStore

pytestmark = pytest.mark.anyio


async def http_get(url: str) -> tuple[int, bytes]:
    def get() -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            with error:
                return error.code, error.read()

    return await anyio.to_thread.run_sync(get)


class FlakyStore(MemoryStore):
    """A memory store whose backend can be made unreachable."""

    down = False

    async def _check(self) -> None:
        if self.down:
            raise rpcstream.StoreUnavailable("the backend is down")


async def test_healthz_and_readyz_answer_200_for_a_router() -> None:
    async with rpcstream.serve(rpcstream.Router()) as server:
        base = server.url.replace("ws://", "http://")
        assert await http_get(f"{base}/healthz") == (200, b"ok\n")
        assert await http_get(f"{base}/readyz") == (200, b"ready\n")


async def test_readyz_answers_503_while_the_store_is_unreachable() -> None:
    store = FlakyStore()
    async with rpcstream.serve(rpcstream.RunServer(store)) as server:
        base = server.url.replace("ws://", "http://")
        assert await http_get(f"{base}/readyz") == (200, b"ready\n")
        store.down = True
        # The reason goes to the log: a probe's answer tells no one where Redis is.
        assert await http_get(f"{base}/readyz") == (503, b"store unavailable\n")
        assert await http_get(f"{base}/healthz") == (200, b"ok\n")  # alive all the same
        store.down = False
        assert await http_get(f"{base}/readyz") == (200, b"ready\n")


async def test_routes_may_replace_the_health_endpoints() -> None:
    async def healthz(request: rpcstream.HandshakeRequest) -> rpcstream.HttpResponse:
        return rpcstream.HttpResponse(200, b"mine", "text/plain")

    async with rpcstream.serve(rpcstream.Router(), routes={"/healthz": healthz}) as server:
        base = server.url.replace("ws://", "http://")
        assert await http_get(f"{base}/healthz") == (200, b"mine")


async def test_a_sqlite_store_checks_with_a_query_and_fails_once_closed(tmp_path: Path) -> None:
    store = rpcstream.SQLiteStore(tmp_path / "runs.db")
    async with store:
        await store.check()
    with pytest.raises(anyio.ClosedResourceError):
        await store.check()


async def test_the_default_check_only_asks_that_the_store_is_open() -> None:
    store = MemoryStore()
    async with store:
        await store.check()
    with pytest.raises(anyio.ClosedResourceError):
        await store.check()


class _Boom(BaseException):
    """Not an Exception: a handler's failure that goes on up after its caller is answered."""


async def test_a_handler_raising_a_base_exception_answers_its_caller_and_never_hangs(
    anyio_backend_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    router = rpcstream.Router()

    @router.method
    async def boom() -> None:
        raise _Boom

    expected: Any = rpcstream.InternalError
    if anyio_backend_name == "trio":  # the connection may end before the answer leaves
        expected = (rpcstream.InternalError, rpcstream.ConnectionClosed)
    left: BaseException | None = None
    try:
        async with (
            rpcstream.serve(router, "127.0.0.1", 0) as server,
            rpcstream.connect(server.url) as peer,
        ):
            # The caller is answered, not left waiting (on asyncio it once waited
            # for ever). trio: the exception then ends the connection, as a task
            # group would; asyncio: the handler's task ends alone.
            with pytest.raises(expected):
                await peer.call("boom")
            if anyio_backend_name == "asyncio":
                assert await peer.call("rpcstream.ping") is None  # still open
    except BaseException as exc:  # what leaving serve() raised (trio)
        left = exc
    # Leaving serve() once hung for ever on trio: websockets' server, ended by the
    # exception, never set what its aclose() waits for.
    if anyio_backend_name == "trio":
        assert isinstance(left, BaseExceptionGroup), repr(left)
        assert left.subgroup(_Boom) is not None
    else:
        assert left is None
    # Logged once, where it was raised, with the method.
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "handler 'boom' failed" in record.message

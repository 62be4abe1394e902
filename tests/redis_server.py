"""A private ``redis-server`` for tests and benchmarks, on a free loopback port.

It never touches a Redis it did not start: it picks a free port on 127.0.0.1
(never 6379), starts ``redis-server`` there with its own directory, and stops
it at the end. Use the ``redis_server`` fixture (one server per test module;
give each store its own key prefix) or :class:`RedisServer` directly when a
test must kill and restart its server::

    from redis_server import redis_server  # noqa: F401 - the fixture

When ``redis-server`` is not installed, tests that need it are skipped with a
clear reason, except under ``CI=true``, where they fail: CI must run them.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

__all__ = ["REDIS_SERVER", "RedisServer", "redis_server", "require_redis_server"]

REDIS_SERVER = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
)
"""The ``redis-server`` executable, or ``None`` when it is not installed."""

_READY = b"Ready to accept connections"
_START_TIMEOUT = 10.0
_SHARED_PORT = 6379  # somebody else's Redis: never ours


def require_redis_server() -> str:
    """The ``redis-server`` path; skips the test without it (fails under ``CI=true``)."""
    if REDIS_SERVER is not None:
        return REDIS_SERVER
    reason = (
        "redis-server is not installed, so the Redis store tests cannot run; "
        "install it (apt-get install redis-server) or put it on PATH"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (never 6379)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port != _SHARED_PORT:
            return port


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1, in ``directory``.

    ``appendonly=True`` makes every write durable (``appendfsync always``), so
    the data survives :meth:`kill` and :meth:`start` again on the same port.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        port: int | None = None,
        appendonly: bool = False,
        executable: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.port = port if port is not None else free_port()
        if self.port == _SHARED_PORT:
            raise ValueError("port 6379 belongs to the shared Redis: tests must not use it")
        self.appendonly = appendonly
        self.executable = executable or require_redis_server()
        self.process: subprocess.Popen[bytes] | None = None
        self._drain: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and return once it accepts connections."""
        if self.process is not None:
            raise RuntimeError("the server is running already")
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            self.executable,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            "",
            "--loglevel",
            "notice",
        ]
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.process = process
        try:
            self._wait_ready(process)
        except BaseException:
            self._stop(signal.SIGKILL)
            raise

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        # Wait on the server's own log line, not on a timer.
        assert process.stdout is not None
        deadline = time.monotonic() + _START_TIMEOUT
        log = b""
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while _READY not in log:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    raise RuntimeError(f"redis-server did not start in time:\n{log.decode()}")
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(
                        f"redis-server exited ({process.wait()}) while starting:\n{log.decode()}"
                    )
                log += chunk
        # Keep reading its log in the background, so a full pipe never blocks it.
        self._drain = threading.Thread(
            target=_drain, args=(process.stdout.fileno(),), name="redis-server log", daemon=True
        )
        self._drain.start()

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        self._stop(signal.SIGKILL)

    def stop(self) -> None:
        """Stop the server (SIGTERM) and wait for it to exit."""
        self._stop(signal.SIGTERM)

    def _stop(self, signum: int) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signum)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if self._drain is not None:
            self._drain.join(timeout=10)  # the pipe reached EOF when the process exited
            self._drain = None
        if process.stdout is not None:
            process.stdout.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _drain(fd: int) -> None:
    while os.read(fd, 65536):
        pass


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server for the test module (skipped without one, failed under CI)."""
    executable = require_redis_server()
    with tempfile.TemporaryDirectory(prefix="rpcstream-redis-") as directory:
        server = RedisServer(directory, executable=executable)
        for attempt in range(3):
            try:
                server.start()
                break
            except RuntimeError:
                if attempt == 2:
                    raise
                server.port = free_port()  # someone took the port in between: try another
        try:
            yield server
        finally:
            server.stop()

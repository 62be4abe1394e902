"""An emulated network link on loopback: a TCP proxy with a round-trip time, a bandwidth
and a bounded queue, for measuring the peer as it runs across a real network.

Run it as its own process; it prints one JSON line with its listening ports::

    python -m benchmarks.link --rtt-ms 20 --mbit 1000 --target 127.0.0.1:8765
    {"ports": [41203], "rtt_ms": 20.0, "mbit": 1000.0, "queue_bytes": 5000000}

Theory of operation. Each direction of each listener is one :class:`LinkModel`: a
bottleneck that serialises bytes at ``rate`` bytes/s into a wire that delays them by
half the round-trip time. In front of the bottleneck sits a queue of ``queue_bytes``
(by default two bandwidth-delay products, as a well-sized router buffer). A sender
whose bytes would overflow the queue is not dropped but *waits*: the proxy stops
reading its socket, so TCP's own flow control pushes back on it. The model is a pure
object driven by timestamps passed in, so it is tested with a fake clock; the proxy
(:func:`open_link`) only reads, asks the model when bytes may enter and when they
arrive, sleeps until then and writes.

What the proxy holds in memory is bounded: what waits at the bottleneck (at most
``queue_bytes``), what is on the wire (``rate`` x one-way delay), and one read. If the
receiving side stops reading, the bound still holds: the proxy stops reading from the
sender too.

Both connections of a proxied pair are loopback TCP, so the kernel's TCP sees no delay
(no slow start across the emulated link): what is emulated is the path's latency,
bandwidth and buffering as an application protocol sees them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import anyio
import anyio.abc

__all__ = ["LinkModel", "LinkParams", "Proxy", "main", "open_link"]

READ_SIZE = 64 * 1024  # the most the proxy reads from a socket at once
# A queue of one read would leave the bottleneck idle while the next read comes in:
# even a link with no delay queues a few, so it can run at its rate.
MIN_QUEUE = 4 * READ_SIZE


@dataclass(frozen=True)
class LinkParams:
    """The link's shape: round-trip time (s), bandwidth (bytes/s), queue (bytes).

    ``queue_bytes`` defaults to two bandwidth-delay products, and never less than
    :data:`MIN_QUEUE`.
    """

    rtt: float
    rate: float
    queue_bytes: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rtt) and self.rtt >= 0):
            raise ValueError(f"rtt must be a finite number of seconds >= 0, not {self.rtt!r}")
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"rate must be a finite number of bytes/s > 0, not {self.rate!r}")
        if self.queue_bytes < 0:
            raise ValueError(f"queue_bytes must be >= 0, not {self.queue_bytes!r}")
        if self.queue_bytes == 0:
            default = max(MIN_QUEUE, math.ceil(2 * self.rate * self.rtt))
            object.__setattr__(self, "queue_bytes", default)

    @property
    def read_size(self) -> int:
        """The most the proxy reads at once: a read must fit in an empty queue."""
        return min(READ_SIZE, self.queue_bytes)

    @property
    def max_held(self) -> int:
        """The most one direction of one connection holds: queue, wire and one read."""
        return self.queue_bytes + math.ceil(self.rate * self.rtt / 2) + self.read_size


class LinkModel:
    """One direction of the link, as a function of time: no I/O, no clock of its own.

    ``admit_at(n, now)`` says when ``n`` more bytes fit in the queue; ``send(n, now)``
    puts them in and returns when their last byte arrives at the far end. Deliveries
    come out in the order bytes went in.
    """

    def __init__(self, params: LinkParams) -> None:
        self.params = params
        self._delay = params.rtt / 2
        self._busy_until = -math.inf  # when the bottleneck has serialised all it was given

    def backlog(self, now: float) -> float:
        """Bytes waiting at the bottleneck at time ``now``."""
        return max(0.0, self._busy_until - now) * self.params.rate

    def admit_at(self, n: int, now: float) -> float:
        """The earliest time, not before ``now``, at which ``n`` bytes fit in the queue."""
        if not 0 < n <= self.params.queue_bytes:
            raise ValueError(f"{n} bytes cannot enter a queue of {self.params.queue_bytes}")
        excess = self.backlog(now) + n - self.params.queue_bytes
        return now if excess <= 0 else now + excess / self.params.rate

    def send(self, n: int, now: float) -> float:
        """Put ``n`` bytes on the link at ``now``; return when the last one arrives.

        The caller waits for :meth:`admit_at` first; the model does not check it, so
        that a float rounding error cannot refuse bytes at the very time it named.
        """
        start = max(now, self._busy_until)
        self._busy_until = start + n / self.params.rate
        return self._busy_until + self._delay


class _Direction:
    """Carries one direction of one proxied connection through a :class:`LinkModel`."""

    def __init__(
        self, model: LinkModel, clock: Callable[[], float], broken: Callable[[], None]
    ) -> None:
        self.model = model
        self.clock = clock
        self.broken = broken  # ends the whole connection, both directions
        self.held = 0  # bytes read from the source and not yet written to the sink
        self.peak_held = 0
        self.stalled = anyio.Event()  # set once the sink held reading back (for tests)
        self._room = anyio.Event()
        self._queue: deque[tuple[float, bytes]] = deque()
        self._arrived = anyio.Event()
        self._eof = False

    async def run(self, src: anyio.abc.ByteStream, dst: anyio.abc.ByteStream) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._deliver, dst)
            await self._admit(src)

    async def _admit(self, src: anyio.abc.ByteStream) -> None:
        params = self.model.params
        while True:
            while self.held + params.read_size > params.max_held:
                # The sink is not keeping up: stop reading, so the sender's TCP pushes back.
                self.stalled.set()
                self._room = anyio.Event()
                await self._room.wait()
            try:
                data = await src.receive(params.read_size)
            except anyio.EndOfStream:
                break
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                self.broken()
                return
            admit = self.model.admit_at(len(data), self.clock())
            if admit > self.clock():
                await anyio.sleep_until(admit)
            self.held += len(data)
            self.peak_held = max(self.peak_held, self.held)
            self._queue.append((self.model.send(len(data), self.clock()), data))
            self._arrived.set()
        self._eof = True
        self._arrived.set()

    async def _deliver(self, dst: anyio.abc.ByteStream) -> None:
        while True:
            if not self._queue:
                if self._eof:
                    break
                self._arrived = anyio.Event()
                await self._arrived.wait()
                continue
            due, data = self._queue[0]
            if due > self.clock():
                await anyio.sleep_until(due)
            self._queue.popleft()
            try:
                await dst.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                self.broken()
                return
            self.held -= len(data)
            self._room.set()
        # The source finished cleanly: pass the half-close on, as TCP would.
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            await dst.send_eof()


class Proxy:
    """The link's listeners: ``ports[i]`` forwards to ``targets[i]`` through the link.

    Connections to one listener share that listener's link (one model per direction),
    as connections on one network path share it.
    """

    def __init__(self, params: LinkParams, targets: Sequence[tuple[str, int]]) -> None:
        self.params = params
        self.targets = list(targets)
        self.ports: list[int] = []
        self.connections = 0
        # The latest connections' directions (bounded: the proxy may run for long), for tests.
        self.directions: deque[_Direction] = deque(maxlen=64)
        self.carrying = anyio.Event()  # set once a connection reached its target

    def _handler(
        self, target: tuple[str, int]
    ) -> Callable[[anyio.abc.SocketStream], Awaitable[None]]:
        upstream, downstream = LinkModel(self.params), LinkModel(self.params)

        async def handle(client: anyio.abc.SocketStream) -> None:
            self.connections += 1
            async with client:
                try:
                    server = await anyio.connect_tcp(*target)
                except OSError:
                    return
                async with server, anyio.create_task_group() as tg:
                    up = _Direction(upstream, anyio.current_time, tg.cancel_scope.cancel)
                    down = _Direction(downstream, anyio.current_time, tg.cancel_scope.cancel)
                    self.directions.extend((up, down))
                    self.carrying.set()
                    tg.start_soon(up.run, client, server)
                    tg.start_soon(down.run, server, client)

        return handle


@contextlib.asynccontextmanager
async def open_link(
    params: LinkParams, targets: Sequence[tuple[str, int]], host: str = "127.0.0.1"
) -> AsyncIterator[Proxy]:
    """Listen on ``host`` (a free port per target), forwarding through the link."""
    proxy = Proxy(params, targets)
    async with contextlib.AsyncExitStack() as stack:
        listeners = []
        for _target in proxy.targets:
            listener = await anyio.create_tcp_listener(local_host=host, local_port=0)
            listeners.append(await stack.enter_async_context(listener))
            proxy.ports.append(listener.extra(anyio.abc.SocketAttribute.local_port))
        # The task group exits (its serve() tasks cancelled) before the listeners close.
        async with anyio.create_task_group() as tg:
            for listener, target in zip(listeners, proxy.targets, strict=True):
                tg.start_soon(listener.serve, proxy._handler(target))
            try:
                yield proxy
            finally:
                tg.cancel_scope.cancel()


def _target(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    return host or "127.0.0.1", int(port)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.link",
        description="A TCP proxy that emulates a link: round-trip time, bandwidth, queue.",
    )
    parser.add_argument("--rtt-ms", type=float, required=True, help="round-trip time, ms")
    parser.add_argument("--mbit", type=float, default=1000.0, help="bandwidth, Mbit/s")
    parser.add_argument(
        "--queue-bytes", type=int, default=0, help="queue per direction (default: 2 x BDP)"
    )
    parser.add_argument(
        "--target", type=_target, action="append", required=True, help="HOST:PORT (repeatable)"
    )
    parser.add_argument(
        "--exit-on-stdin-eof",
        action="store_true",
        help="stop when stdin closes (so a parent that dies takes the proxy with it)",
    )
    args = parser.parse_args(argv)
    try:
        args.params = LinkParams(args.rtt_ms / 1000, args.mbit * 1e6 / 8, args.queue_bytes)
    except ValueError as exc:
        parser.error(str(exc))
    return args


async def _serve(args: argparse.Namespace) -> None:
    async with open_link(args.params, args.target) as proxy:
        info = {
            "ports": proxy.ports,
            "rtt_ms": args.rtt_ms,
            "mbit": args.mbit,
            "queue_bytes": args.params.queue_bytes,
        }
        print(json.dumps(info), flush=True)
        if args.exit_on_stdin_eof:
            await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
        else:
            await anyio.sleep_forever()


def main(argv: list[str] | None = None) -> int:
    """Run the proxy until interrupted (or, if asked, until stdin closes)."""
    args = parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(_serve, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

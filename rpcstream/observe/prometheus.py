"""Prometheus metrics for rpcstream, and a ``/metrics`` route to scrape them.

Needs ``prometheus-client`` (``pip install "rpcstream[prometheus]"``)::

    async with rpcstream.serve(app, routes={"/metrics": metrics_route()}):
        ...

:func:`metrics_route` (or :func:`enable`) installs a :class:`PrometheusObserver`
(see :mod:`rpcstream.observe.hooks`): peers built from then on report to it, so
call it before serving. Metrics count what this process serves: the calls the
other side makes on it, its connections, its streams and runs. Every metric is
described in ``docs/operations.md``.

Label cardinality stays bounded: a call's ``method`` label is its name only when
the serving router has that method (or it is ``rpcstream.ping``), else
``unknown``, since method names come from the other side; ``flow`` labels are
names of registered flows; ``outcome`` is ``ok`` or an error code's name.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Final

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..handshake import HandshakeRequest
from ..transport.http import HttpResponse
from .hooks import CallObservation, Observer, install

__all__ = ["LATENCY_BUCKETS", "PrometheusObserver", "enable", "metrics_route"]

LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Buckets of ``rpcstream_call_duration_seconds``, in seconds: sub-millisecond calls
on a LAN up to a minute-long stream."""

_PING: Final = "rpcstream.ping"
UNKNOWN: Final = "unknown"


class _Call(CallObservation):
    __slots__ = ("kind", "method", "metrics", "started")

    def __init__(self, metrics: PrometheusObserver, kind: str, method: str) -> None:
        super().__init__()
        self.metrics = metrics
        self.kind = kind
        self.method = method
        self.started = time.perf_counter()

    def end(self, outcome: str, error: BaseException | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        m = self.metrics
        m.calls.labels(self.method, self.kind, outcome).inc()
        m.call_duration.labels(self.method, self.kind).observe(time.perf_counter() - self.started)


class PrometheusObserver(Observer):
    """Keeps rpcstream's metrics in ``registry`` (default: prometheus_client's own)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else prometheus_client.REGISTRY
        r = self.registry
        self._peers: weakref.WeakSet[Any] = weakref.WeakSet()
        self.connections = Gauge(
            "rpcstream_connections_open", "WebSocket connections open now", registry=r
        )
        self.connections_total = Counter(
            "rpcstream_connections_accepted", "WebSocket connections accepted", registry=r
        )
        self.handshakes_refused = Counter(
            "rpcstream_handshakes_refused",
            "Upgrade requests answered with an HTTP error, by status",
            ["status"],
            registry=r,
        )
        self.calls = Counter(
            "rpcstream_calls",
            "Calls handled, by method, kind (call, notify, stream) and outcome",
            ["method", "kind", "outcome"],
            registry=r,
        )
        self.call_duration = Histogram(
            "rpcstream_call_duration_seconds",
            "Time from a call's arrival to its answer (a stream: to its end)",
            ["method", "kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.streams = Gauge(
            "rpcstream_streams_open",
            "Streams open now on the open connections, both directions",
            registry=r,
        )
        self.streams.set_function(self._open_streams)
        self.stalls = Counter(
            "rpcstream_stream_stalls",
            "Times a stream sender had an item ready and no credit from its receiver",
            registry=r,
        )
        self.runs = Counter(
            "rpcstream_runs",
            "Runs started (status running) and ended (their terminal type), by flow",
            ["flow", "status"],
            registry=r,
        )
        self.runs_running = Gauge(
            "rpcstream_runs_running",
            "Runs executing in this process now, by flow",
            ["flow"],
            registry=r,
        )
        self.events_appended_total = Counter(
            "rpcstream_run_events_appended", "Run events stored", registry=r
        )
        self.events_delivered_total = Counter(
            "rpcstream_run_events_delivered",
            "Run events handed to subscribers (one per subscriber)",
            registry=r,
        )
        self.store_errors = Counter(
            "rpcstream_store_errors",
            "Store operations that failed for the store's own reasons, by operation",
            ["operation"],
            registry=r,
        )

    def _open_streams(self) -> float:
        return float(sum(peer.stats["streams"] for peer in list(self._peers)))

    def connection_opened(self, peer: Any) -> None:
        self._peers.add(peer)
        self.connections.inc()
        self.connections_total.inc()

    def connection_closed(self, peer: Any, code: int, reason: str, duration: float) -> None:
        self._peers.discard(peer)
        self.connections.dec()

    def handshake_refused(self, status: int, reason: str, remote_address: Any) -> None:
        self.handshakes_refused.labels(str(status)).inc()

    def call_received(
        self, peer: Any, kind: str, method: str, meta: dict[str, str] | None
    ) -> CallObservation | None:
        if method != _PING and peer.router.get(method) is None:
            method = UNKNOWN  # named by the other side: never a label of its own
        return _Call(self, kind, method)

    def stream_stalled(self, peer: Any, stream_id: int) -> None:
        self.stalls.inc()

    def run_status(self, flow: str, status: str) -> None:
        self.runs.labels(flow, status).inc()
        if status == "running":
            self.runs_running.labels(flow).inc()
        else:
            self.runs_running.labels(flow).dec()

    def events_appended(self, count: int) -> None:
        self.events_appended_total.inc(count)

    def events_delivered(self, count: int) -> None:
        self.events_delivered_total.inc(count)

    def store_error(self, operation: str, error: BaseException) -> None:
        self.store_errors.labels(operation).inc()


_enabled: dict[int, PrometheusObserver] = {}


def enable(registry: CollectorRegistry | None = None) -> PrometheusObserver:
    """Install the observer that keeps the metrics in ``registry`` (once per registry)."""
    target = registry if registry is not None else prometheus_client.REGISTRY
    observer = _enabled.get(id(target))
    if observer is None or observer.registry is not target:
        observer = _enabled[id(target)] = PrometheusObserver(target)
    install(observer)
    return observer


def metrics_route(
    registry: CollectorRegistry | None = None,
) -> Callable[[HandshakeRequest], Awaitable[HttpResponse]]:
    """An async route (:data:`rpcstream.Route`) answering with the metrics in
    Prometheus' text format; enables them (:func:`enable`) in ``registry``.

    ``serve(app, routes={"/metrics": metrics_route()})``. In an ASGI app, mount
    ``prometheus_client.make_asgi_app()`` instead (after :func:`enable`).
    """
    observer = enable(registry)

    async def metrics(request: HandshakeRequest) -> HttpResponse:
        body = prometheus_client.generate_latest(observer.registry)
        return HttpResponse(200, body, prometheus_client.CONTENT_TYPE_LATEST)

    return metrics

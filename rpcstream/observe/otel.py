"""OpenTelemetry spans for calls and streams, both sides, with the trace context
carried in the call frames.

Needs ``opentelemetry-api`` (``pip install "rpcstream[otel]"``) and an SDK set up
by the application. Nothing imports this module (nor OpenTelemetry) unless you
do; :func:`enable` turns tracing on for peers built from then on::

    from rpcstream.observe import otel
    otel.enable()          # the global tracer provider and propagator

Each call, notification and stream call this side makes gets a ``CLIENT`` span
(from the call until its answer, or the stream's end); its context is injected
into the frame's ``meta`` field (``traceparent``/``tracestate``, W3C Trace
Context, by the global propagator unless another is given). The side that
handles the call extracts it and runs the handler inside a ``SERVER`` span, a
child of the caller's, which is current while the handler runs: calls the
handler makes, and spans it starts, join the same trace.

Span names are method names. On the handling side a name the router does not
have is ``rpcstream.unknown`` (the other side chose it; ``rpc.method`` keeps it,
shortened). Attributes: ``rpc.system`` (``rpcstream``), ``rpc.method``,
``rpcstream.kind`` (``call``, ``notify``, ``stream``), ``rpcstream.outcome``
(``ok`` or an error code's name); a span whose call failed has status ERROR,
and a handler's unexpected exception is recorded on the server span.
"""

from __future__ import annotations

from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import SpanKind, Status, StatusCode

from .. import __version__
from ..errors import RemoteError
from .hooks import CallObservation, Observer, install

__all__ = ["TracingObserver", "enable"]

SYSTEM: Final = "rpcstream"
UNKNOWN: Final = "rpcstream.unknown"
_PING: Final = "rpcstream.ping"


class _Span(CallObservation):
    __slots__ = ("span", "token")

    def __init__(self, span: Any, meta: dict[str, str] | None, token: Any = None) -> None:
        super().__init__(meta)
        self.span = span
        self.token = token  # the context this span was made current in, to undo

    def end(self, outcome: str, error: BaseException | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        span = self.span
        span.set_attribute("rpcstream.outcome", outcome)
        if outcome != "ok":
            description = outcome if error is None else f"{type(error).__name__}: {outcome}"
            span.set_status(Status(StatusCode.ERROR, description))
            if error is not None and not isinstance(error, RemoteError) and self.token is not None:
                span.record_exception(error)  # a handler's bug, on the side that ran it
        span.end()
        if self.token is not None:
            otel_context.detach(self.token)


class TracingObserver(Observer):
    """Makes the spans (see the module docstring) with ``tracer_provider`` (default:
    the global one) and ``propagator`` (default: the global one, W3C Trace Context
    and Baggage unless configured otherwise)."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        self.tracer = trace.get_tracer("rpcstream", __version__, tracer_provider=tracer_provider)
        self.propagator = propagator

    def _propagator(self) -> TextMapPropagator:
        return self.propagator if self.propagator is not None else propagate.get_global_textmap()

    def call_sent(self, peer: Any, kind: str, method: str) -> CallObservation | None:
        span = self.tracer.start_span(
            method, kind=SpanKind.CLIENT, attributes=_attributes(kind, method)
        )
        carrier: dict[str, str] = {}
        self._propagator().inject(carrier, context=trace.set_span_in_context(span))
        return _Span(span, carrier or None)

    def call_received(
        self, peer: Any, kind: str, method: str, meta: dict[str, str] | None
    ) -> CallObservation | None:
        parent = self._propagator().extract(meta) if meta else otel_context.Context()
        name = method if method == _PING or peer.router.get(method) is not None else UNKNOWN
        span = self.tracer.start_span(
            name, context=parent, kind=SpanKind.SERVER, attributes=_attributes(kind, method)
        )
        # Current while the handler runs (it runs in this context): its own calls
        # and spans join the trace. Undone when the call ends, in the same context.
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        return _Span(span, None, token)


def _attributes(kind: str, method: str) -> dict[str, str]:
    return {"rpc.system": SYSTEM, "rpc.method": method[:200], "rpcstream.kind": kind}


def enable(
    tracer_provider: trace.TracerProvider | None = None,
    propagator: TextMapPropagator | None = None,
) -> TracingObserver:
    """Trace calls and streams from now on (peers built from now on); returns the
    observer (``rpcstream.observe.uninstall(observer)`` turns it off)."""
    return install(TracingObserver(tracer_provider, propagator))

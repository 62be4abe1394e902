"""Logs, metrics and tracing: what rpcstream reports to operators.

* :mod:`rpcstream.observe.hooks`: the :class:`Observer` interface the peer,
  server and run server report to, and its registry (no observer: no cost).
* :mod:`rpcstream.observe.logs`: a JSON log formatter and ``configure_logging``
  (what ``rpcstream serve --log-format json`` uses).
* :mod:`rpcstream.observe.prometheus`: Prometheus metrics and a ``/metrics``
  route (needs ``rpcstream[prometheus]``).
* :mod:`rpcstream.observe.otel`: OpenTelemetry spans for calls and streams,
  with the trace context carried in call frames (needs ``rpcstream[otel]``).

See ``docs/operations.md``.
"""

from __future__ import annotations

from .hooks import CallObservation, Observer, install, observing, uninstall

__all__ = ["CallObservation", "Observer", "install", "observing", "uninstall"]

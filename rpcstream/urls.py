"""Server URLs as people type them, turned into the ``ws://``/``wss://`` URLs WebSockets need.

A pure function, no I/O and no websockets import, so :func:`rpcstream.connect`,
the ``rpcstream`` command and tests share one set of rules:

========================  ==============================
given                     used
========================  ==============================
``ws://h:p/x``            unchanged
``wss://h:p/x``           unchanged
``http://h:p/x``          ``ws://h:p/x``
``https://h:p/x``         ``wss://h:p/x``
``h:p`` or ``h:p/x``      ``ws://h:p`` (no scheme: plain)
anything else             :class:`ValueError` saying why
========================  ==============================

The browser module accepts ``http(s)://`` the same way (a page's own origin is
an ``http(s)`` URL), so one URL works in both.
"""

from __future__ import annotations

import urllib.parse

__all__ = ["websocket_url"]

# http(s) is what a browser's address bar and most config files hold; the
# WebSocket upgrade is an HTTP request, so the same host and port are meant.
_SCHEMES = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}


def websocket_url(url: str) -> str:
    """Return ``url`` as a ``ws://`` or ``wss://`` URL, or raise :class:`ValueError`.

    ``http`` becomes ``ws``, ``https`` becomes ``wss``, and a bare
    ``host:port`` gets ``ws://``. The result has a host, a valid port (if any),
    no fragment, and a password wherever it has a user name, so websockets
    will accept it.
    """
    if not isinstance(url, str):
        raise TypeError(f"a server URL is a str, not {type(url).__name__}")
    text = url.strip()
    if not text:
        raise ValueError("empty server URL: expected ws://HOST:PORT")
    if "://" not in text:
        text = "ws://" + text
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port  # parsed lazily: range and digits are checked here
    except ValueError as exc:
        raise ValueError(f"invalid server URL {url!r}: {exc}") from None
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise ValueError(
            f"invalid server URL {url!r}: scheme {parts.scheme!r} is not ws, wss, http or https"
        )
    if not parts.hostname:
        raise ValueError(f"invalid server URL {url!r}: no host name")
    if parts.fragment:
        raise ValueError(f"invalid server URL {url!r}: a #fragment means nothing to a server")
    if parts.username is not None and parts.password is None:
        raise ValueError(f"invalid server URL {url!r}: a user name needs a password (user:pw@)")
    if port == 0:
        raise ValueError(f"invalid server URL {url!r}: port 0 is not a server's port")
    return urllib.parse.urlunsplit((scheme, *parts[1:]))

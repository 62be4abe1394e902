"""The WebSocket options client and server share (``transport/options.py``)."""

from __future__ import annotations

import dataclasses

import pytest

from rpcstream.transport import WebSocketOptions


def test_options_are_frozen_and_checked_when_built() -> None:
    options = WebSocketOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.ping_interval = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="compression"):
        WebSocketOptions(compression="gzip")


def test_the_close_timeout_defaults_to_the_ping_timeout() -> None:
    assert WebSocketOptions(ping_timeout=3.0).websockets_kwargs()["close_timeout"] == 3.0
    assert WebSocketOptions(ping_timeout=None).websockets_kwargs()["close_timeout"] == 10.0
    assert WebSocketOptions(close_timeout=0.5).websockets_kwargs()["close_timeout"] == 0.5


def test_options_map_to_websockets_names() -> None:
    kwargs = WebSocketOptions(max_message_size=1000, compression="deflate").websockets_kwargs()
    assert kwargs == {
        "compression": "deflate",
        "max_size": 1000,
        "ping_interval": 20.0,
        "ping_timeout": 20.0,
        "close_timeout": 20.0,
        "open_timeout": 10.0,
    }

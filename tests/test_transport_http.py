"""The request before an upgrade and the answers to it (``transport/http.py``)."""

from __future__ import annotations

from websockets.datastructures import Headers

from rpcstream.transport import HttpRequest, HttpResponse


def test_a_request_reads_its_path_query_upgrade_and_offered_subprotocols() -> None:
    headers = Headers(
        [
            ("Upgrade", "WebSocket"),
            ("Sec-WebSocket-Protocol", "a, b"),
            ("sec-websocket-protocol", "c"),
        ]
    )
    request = HttpRequest("/ws?access_token=t&x=1", headers, ("127.0.0.1", 1))
    assert request.path == "/ws"
    assert request.query == {"access_token": "t", "x": "1"}
    assert request.is_upgrade
    assert request.subprotocols == ["a", "b", "c"]
    assert not HttpRequest("/rpcstream.js", Headers(), None).is_upgrade


def test_a_response_names_its_status_and_sends_its_length() -> None:
    response = HttpResponse(429, b"slow down\n", "text/plain")
    assert response.reason == "Too Many Requests"
    assert ("Content-Length", "10") in response.header_list()
    assert HttpResponse(599, b"", "text/plain").reason == "Error"

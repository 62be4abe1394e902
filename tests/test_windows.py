"""Windows that fill the link: the growth rule on its own (protocol/windows.py),
then streams across an emulated link of 20 ms (benchmarks/link.py, a delay proxy
on loopback) over a real WebSocket, on asyncio and trio.

The link tests assert no durations: the proxy holds every byte for its round
trip, so what is measured is at least that long whatever the machine's speed,
and a sender that produces an item only every few round trips leaves more than
two round trips between grants however slow the machine.
"""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

import rpcstream
from benchmarks.link import LinkParams, open_link
from rpcstream.protocol.windows import MIN_RTT, SPREAD, Pace, RoundTrip, grown, shrunk

HOST = "127.0.0.1"
WAIT = 20  # seconds: how long one stream may take before the test fails
LINK = LinkParams(rtt=0.020, rate=100e6)  # 20 ms, 800 Mbit/s
KIB = 1024

# -- the rule, with times passed in -------------------------------------------------------


def test_the_connection_smooths_its_round_trips_within_a_spread_of_the_least() -> None:
    rtt = RoundTrip()
    assert rtt.seconds is None
    rtt.note(0.020)
    assert rtt.seconds == rtt.least == 0.020
    rtt.note(0.028)  # smoothed: 7/8 of the old, 1/8 of the new
    assert rtt.seconds == pytest.approx(0.021) and rtt.least == 0.020
    rtt.note(10.0)  # a slow sender's pace: counts for SPREAD round trips at most
    assert rtt.seconds == pytest.approx(0.021 + (SPREAD * 0.020 - 0.021) / 8)
    rtt.note(0.0)  # never below the floor
    assert rtt.least == MIN_RTT


def test_a_grant_is_timed_to_the_first_item_that_needed_it() -> None:
    rtt, pace = RoundTrip(), Pace()
    pace.granted(10.0, credit_bytes=200, credit_items=50)  # the sender had 200 bytes left
    pace.arrived(10.001, 100, rtt)
    pace.arrived(10.002, 100, rtt)  # the last of the credit before the grant, early on
    assert rtt.seconds is None
    pace.arrived(10.020, 100, rtt)  # could only be sent with the grant
    assert rtt.seconds == pytest.approx(0.020)
    assert pace.probe_at is None


def test_a_sender_that_spent_its_credit_late_went_at_its_own_pace_and_times_nothing() -> None:
    rtt, pace = RoundTrip(), Pace()
    pace.granted(10.0, credit_bytes=200, credit_items=50)
    pace.arrived(10.5, 100, rtt)
    pace.arrived(11.0, 100, rtt)  # a slow sender: an item every half second
    pace.arrived(11.5, 100, rtt)  # it needed the grant, but never waited for it
    assert rtt.seconds is None and pace.probe_at is None


def test_a_grant_the_sender_was_not_waiting_for_is_not_timed_in_its_place() -> None:
    rtt, pace = RoundTrip(), Pace()
    pace.granted(10.0, credit_bytes=0, credit_items=5)  # the sender waits for this one
    pace.granted(10.001, credit_bytes=500, credit_items=5)
    pace.arrived(10.020, 100, rtt)
    assert rtt.seconds == pytest.approx(0.020)  # timed from the first grant, not the second


def test_only_a_starved_consumer_whose_grants_come_within_two_round_trips_grows() -> None:
    pace = Pace()
    pace.granted(10.0, 0, 0)
    pace.waiting(10.001)
    assert pace.growth(10.030, None) is None  # no round trip measured yet
    assert pace.growth(10.041, 0.020) is None  # more than two round trips since
    pace.granted(10.041, 0, 0)
    assert pace.growth(10.045, 0.020) is None  # the consumer did not wait


def test_a_row_of_growing_grants_sizes_the_window_from_the_pace_and_a_lag_ends_it() -> None:
    pace = Pace()
    pace.granted(10.0, 0, 0)
    pace.waiting(10.001)
    pace.came(lambda: 10.0015)
    assert pace.growth(10.002, 0.020) == 0.0  # the first in a row: double
    pace.granted(10.002, 0, 0)
    assert pace.growth(10.003, 0.020) is None  # the same burst, no wait: the row goes on
    pace.granted(10.003, 0, 0)
    pace.waiting(10.004)
    pace.came(lambda: 10.019)  # waited 15 ms; items then came for 4 ms
    assert pace.growth(10.023, 0.020) == pytest.approx(0.020 / 0.005)
    pace.granted(10.023, 0, 0)
    assert pace.growth(10.100, 0.020) is None  # items waiting, long after: a lag
    pace.granted(10.100, 0, 0)
    pace.waiting(10.101)
    assert pace.growth(10.102, 0.020) == 0.0  # so the next row starts by doubling


@pytest.mark.parametrize(
    ("window", "consumed", "per_rtt", "limit", "expected"),
    [
        (100, 50, 1.0, 10_000, 200),  # twice what came in a round trip is less: double
        (100, 50, 5.0, 10_000, 500),  # toward twice what comes in a round trip
        (100, 50, 100.0, 10_000, 800),  # at most eight times
        (100, 50, 100.0, 300, 300),  # at most the limit
        (400, 50, 1.0, 300, 400),  # never shrinks
    ],
)
def test_a_window_grows_toward_twice_a_round_trip_of_items(
    window: int, consumed: int, per_rtt: float, limit: int, expected: int
) -> None:
    assert grown(window, consumed, per_rtt, limit) == expected


def test_a_lagging_consumer_gives_back_half_its_window_down_to_its_first_size() -> None:
    pace = Pace()
    pace.granted(10.0, 0, 0)
    assert not pace.lags(10.079, 0.020)  # within four round trips
    assert pace.lags(10.080, 0.020) and not pace.lags(10.080, None)
    pace.waiting(10.001)
    assert not pace.lags(10.080, 0.020)  # it waited for items: it keeps up
    assert shrunk(8000, 1000, 4000) == 4000
    assert shrunk(1500, 1000, 4000) == 500  # down to its first size
    assert shrunk(8000, 1000, 300) == 300  # never more than the grant


# -- across a link of 20 ms ---------------------------------------------------------------


def _router() -> rpcstream.Router:
    router = rpcstream.Router()

    @router.method
    async def chunks(n: int, size: int) -> AsyncIterator[bytes]:
        for i in range(n):
            yield i.to_bytes(4, "big") * (size // 4)

    @router.method
    async def trickle(n: int, size: int, round_trips: int) -> AsyncIterator[bytes]:
        # A slow producer: one item every few link round trips (it is the pace under
        # test, not a wait for something that happens).
        for i in range(n):
            await anyio.sleep(round_trips * LINK.rtt)
            yield i.to_bytes(4, "big") * (size // 4)

    return router


@contextlib.asynccontextmanager
async def _across_the_link(**client_options: Any) -> AsyncIterator[rpcstream.RpcPeer]:
    async with rpcstream.serve(_router(), HOST, 0) as server:
        port = urllib.parse.urlsplit(server.url).port
        assert port is not None
        async with open_link(LINK, [(HOST, port)]) as proxy:
            url = urllib.parse.urlsplit(server.url)._replace(netloc=f"{HOST}:{proxy.ports[0]}")
            async with rpcstream.connect(url.geturl(), **client_options) as peer:
                yield peer


def _round_trip(peer: rpcstream.RpcPeer) -> float | None:
    return peer._driver.proto.streams.rtt.seconds  # what the receiving side measured


async def _read(stream: Any) -> tuple[int, int]:
    """Read every item, in order; return how many and the widest window seen."""
    count = widest = 0
    async for item in stream:
        assert item[:4] == count.to_bytes(4, "big")
        count += 1
        widest = max(widest, stream.window_bytes)
    return count, widest


@pytest.mark.anyio
async def test_a_window_grows_across_a_long_link_for_a_consumer_that_keeps_up() -> None:
    opts = {"window_bytes": 64 * KIB, "max_window_bytes": 2048 * KIB}
    async with _across_the_link(**opts) as peer:
        with anyio.fail_after(WAIT):
            async with peer.stream("chunks", 300, 16 * KIB) as fast:
                assert fast.window_bytes == 64 * KIB
                count, grew_to = await _read(fast)
        rtt = _round_trip(peer)
    assert count == 300
    assert grew_to > 64 * KIB, grew_to
    # Measured from credit, the round trip is the link's at least: a sample is
    # never shorter than the trip it times.
    assert rtt is not None and rtt >= LINK.rtt, rtt


@pytest.mark.anyio
async def test_a_sender_that_trickles_large_items_across_a_long_link_keeps_its_window() -> None:
    opts = {"window_bytes": 64 * KIB, "max_window_bytes": 2048 * KIB}
    async with _across_the_link(**opts) as peer:
        with anyio.fail_after(WAIT):
            # First a stream that measures the link's round trip (and grows)...
            async with peer.stream("chunks", 100, 16 * KIB) as fast:
                assert (await _read(fast))[0] == 100
            assert _round_trip(peer) is not None
            # ...then items larger than half the window, each taken at once by a
            # consumer that then waits: starved, but never held back by its window.
            async with peer.stream("trickle", 6, 40 * KIB, 10) as slow:
                count = 0
                async for _item in slow:
                    count += 1
                    assert slow.window_bytes == 64 * KIB
    assert count == 6

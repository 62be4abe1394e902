"""Windows that fill the link: the round trip one connection measures, and the
rule that grows the windows of the streams it receives.

A small window caps a stream at one window per round trip, so windows grow, as
QUIC's auto-tune (Chromium's ``QuicFlowController``): a grant grows a window
when (1) the consumer found nothing waiting since the previous grant (it keeps
up; waiting for the first items does not count) and (2) that grant was less
than two round trips ago: the sender went through the window in about a round
trip, so the window, not the sender, sets the pace. The window (bytes if half
the byte window triggered the grant, items if half the item window did) then
takes twice what arrives in a round trip at the pace items came while they
came (the time the consumer waited left out), at least double and at most
eight times what it was, up to ``max_window_bytes`` or ``max_window_items``:
doubling alone costs a round trip per doubling, which is what made a long link
slow. The first of such grants in a row only doubles: a slow consumer that
caught up with a burst once looks fast for that one grant.

A lagging consumer always has items waiting, so its windows never grow; and a
window that grew while its consumer kept up is narrowed back, by half at each
grant down to its first size, once its consumer lags (items waiting at every
take, four round trips or more between grants): a consumer that was fast for a
while then slow ends up holding its first window again. A sender that trickles,
even items as large as the window, leaves more than two round trips between
grants, so its window stays; a window stops growing once half of it takes two
round trips to arrive.

The round trip is measured from credit: a grant (not a stream's first) is timed
until the first item that could only be sent with it arrives, the sender having
used all the credit granted before it. That takes a round trip or more: the
connection smooths its samples (:class:`RoundTrip`), each counted for at most
:data:`SPREAD` times the least, itself at least :data:`MIN_RTT`; the I/O layer
may add its own (:meth:`RoundTrip.note`). A time counts only if the sender was
waiting for the grant: the credit before it was spent within the first quarter
of the time; spent later, the sender went at its own pace, which is what the
time would measure. Without a sample no window grows. One case remains that
timing alone cannot tell from a long link: a slow sender whose every item is
larger than the window waits for each grant; if nothing else on the connection
was timed, its pace passes for the round trip and its window grows.

Everything here is told the time (``now``): the stream table reads its clock.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["MIN_RTT", "SPREAD", "Pace", "RoundTrip", "grown", "shrunk"]

MIN_RTT = 0.001
"""The least round trip the windows assume (s): below a millisecond, what a
credit round trip measures is how soon two event loops get to run."""


SPREAD = 16
"""How many times the least round trip one sample may count for: what an event
loop's turns add to a round trip, not a slow sender's pace."""


class Pace:
    """How the items of one incoming stream came since its last grant."""

    __slots__ = (
        "granted_at",
        "grew",
        "probe_at",
        "probe_bytes",
        "probe_items",
        "regranted",
        "spent_at",
        "starved",
        "wait_from",
        "waited",
    )

    def __init__(self) -> None:
        self.starved = False  # the consumer found no item waiting since the last grant
        self.regranted = False  # a grant was made: waiting from now on counts as starving
        self.granted_at = 0.0  # when the last grant was made
        self.grew = False  # a grant grew a window, and none since showed a lag
        self.wait_from: float | None = None  # since when the consumer waits for items
        self.waited = 0.0  # how long it waited since the last grant
        # The grant being timed: when it was made, and the credit granted before
        # it that the sender had left then (the first item that arrives with none
        # of it left could only be sent with this grant).
        self.probe_at: float | None = None
        self.probe_bytes = 0
        self.probe_items = 0
        self.spent_at = 0.0  # when the item that spent that credit arrived

    def waiting(self, now: float) -> None:
        """The consumer found no item waiting."""
        self.starved = self.regranted  # waiting for the first items is no sign
        if self.starved and self.wait_from is None:
            self.wait_from = now

    def came(self, clock: Callable[[], float]) -> None:
        """Items came after none were waiting: how long the consumer waited for
        them is left out of the pace."""
        if self.wait_from is not None:
            self.waited += clock() - self.wait_from
            self.wait_from = None

    def arrived(self, now: float, size: int, rtt: RoundTrip) -> None:
        """An item arrived while a grant is being timed."""
        assert self.probe_at is not None
        if self.probe_bytes <= 0 or self.probe_items <= 0:  # it needed the timed grant
            # A round trip if the sender was waiting for the grant: it had spent the
            # credit before it early on. Spent late, the sender went at its own
            # pace, which is what the time would measure.
            if 4 * (self.spent_at - self.probe_at) <= now - self.probe_at:
                rtt.note(now - self.probe_at)
            self.probe_at = None
            return
        self.probe_bytes -= size
        self.probe_items -= 1
        if self.probe_bytes <= 0 or self.probe_items <= 0:
            self.spent_at = now

    def granted(self, now: float, credit_bytes: int, credit_items: int) -> None:
        """A grant is being made; the sender has this credit left before it."""
        if self.probe_at is None or (self.probe_bytes > 0 and self.probe_items > 0):
            # Time this grant, unless the one being timed is what the sender
            # waits for: it used all the credit granted before that one.
            self.probe_at = self.spent_at = now
            self.probe_bytes, self.probe_items = credit_bytes, credit_items
        self.granted_at = now
        self.waited = 0.0
        self.starved = False
        self.regranted = True

    def growth(self, now: float, rtt: float | None) -> float | None:
        """At a grant, when the window is what holds the stream back: how many
        times what came since the last grant would come in a round trip at the
        pace it came (0 for the first such grant in a row: a consumer that once
        caught up with a burst looks fast for that one grant); else ``None``."""
        since = now - self.granted_at
        quick = rtt is not None and since < 2 * rtt
        if not (self.starved and quick):
            # A grant within the same burst (items waiting, but soon after the
            # last) does not break a row; a consumer that lags does.
            self.grew = self.grew and quick
            return None
        assert rtt is not None
        factor = rtt / max(since - self.waited, 1e-6) if self.grew else 0.0
        self.grew = True
        return factor

    def lags(self, now: float, rtt: float | None) -> bool:
        """At a grant: whether the consumer lags (items were waiting at every
        take since the last grant, four round trips or more ago)."""
        return not self.starved and rtt is not None and now - self.granted_at >= 4 * rtt


class RoundTrip:
    """One connection's round trip, measured (see above): samples smoothed as
    TCP's and QUIC's ``smoothed_rtt`` (7/8 of the old, 1/8 of the new), each
    taken at most :data:`SPREAD` times the least seen. The least alone is too
    short when two busy processes answer each other (every round trip also
    waits for each side's event loop to come round), and windows sized from it
    starve a fast stream; an unbounded average would take a trickling sender's
    pace for the round trip."""

    __slots__ = ("least", "seconds")

    def __init__(self) -> None:
        self.seconds: float | None = None
        """The smoothed round trip (s), ``None`` before a sample."""
        self.least: float | None = None
        """The least sample (s)."""

    def note(self, sample: float) -> None:
        """Take a round-trip sample (s), never below MIN_RTT."""
        sample = max(sample, MIN_RTT)
        if self.least is None or sample < self.least:
            self.least = sample
        sample = min(sample, SPREAD * self.least)
        if self.seconds is None:
            self.seconds = sample
        else:
            self.seconds += (sample - self.seconds) / 8


def grown(window: int, consumed: int, per_rtt: float, limit: int) -> int:
    """The window a stream its window holds back grows to: twice what comes in a
    round trip, at least double and at most eight times ``window``, at most
    ``limit`` (never less than ``window``)."""
    return max(window, min(limit, 8 * window, max(2 * window, int(2 * consumed * per_rtt))))


def shrunk(window: int, first: int, grant: int) -> int:
    """How much a window whose consumer lags gives back: half of it, down to its
    first size, and no more than the grant it is taken from."""
    return max(0, min(window - first, window // 2, grant))

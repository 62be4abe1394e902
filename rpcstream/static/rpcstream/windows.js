// windows.js: windows that fill the link, as Python's rpcstream/protocol/windows.py
// (docs/protocol.md, section 7.5). A small window caps a stream at one window per
// round trip, so the window of a stream this page receives grows while the window,
// not the sender nor the page, sets the pace:
//   - the page's code found nothing waiting since the previous grant (it keeps up),
//   - and that grant was less than two round trips ago (the sender went through
//     the window in about a round trip).
// It then takes twice what arrives in a round trip at the pace items came, at least
// double and at most eight times what it was (only double for the first such grant
// in a row). A page that lags always has items waiting, so its windows never grow,
// and a byte window that grew is narrowed back once it lags. The round trip is
// measured from credit: a grant is timed until the first item that could only be
// sent with it, if the sender was waiting for it. Nothing here touches the wire or
// a clock: callers pass the time (seconds).

/** The least round trip the windows assume (s). */
export const MIN_RTT = 0.001;

/** How many times the least round trip one sample may count for. */
export const SPREAD = 16;

/** The time in seconds, for the windows (monotonic). */
export const now = () => performance.now() / 1000;

/** How the items of one incoming stream came since its last grant. */
export class Pace {
  constructor(grantedAt) {
    this.starved = false; // the consumer found no item waiting since the last grant
    this.regranted = false; // a grant was made: waiting from now on counts as starving
    this.grantedAt = grantedAt; // when the last grant was made
    this.grew = false; // a grant grew a window, and none since showed a lag
    this.waitFrom = null; // since when the consumer waits for items
    this.waited = 0; // how long it waited since the last grant
    // The grant being timed: when it was made, and the credit granted before it
    // that the sender had left then.
    this.probeAt = null;
    this.probeBytes = 0;
    this.probeItems = 0;
    this.spentAt = 0; // when the item that spent that credit arrived
  }

  /** The consumer found no item waiting. */
  waiting(t) {
    this.starved = this.regranted; // waiting for the first items is no sign
    if (this.starved && this.waitFrom === null) this.waitFrom = t;
  }

  /** Items came after none were waiting: the wait is left out of the pace. */
  came(t) {
    if (this.waitFrom !== null) {
      this.waited += t - this.waitFrom;
      this.waitFrom = null;
    }
  }

  /** An item arrived while a grant is being timed. */
  arrived(t, size, rtt) {
    if (this.probeBytes <= 0 || this.probeItems <= 0) { // it needed the timed grant
      // A round trip only if the sender waited for the grant: it had spent the
      // credit before it early on; spent late, it went at its own pace.
      if (4 * (this.spentAt - this.probeAt) <= t - this.probeAt) rtt.note(t - this.probeAt);
      this.probeAt = null;
      return;
    }
    this.probeBytes -= size;
    this.probeItems -= 1;
    if (this.probeBytes <= 0 || this.probeItems <= 0) this.spentAt = t;
  }

  /** A grant is being made; the sender has this credit left before it. */
  granted(t, creditBytes, creditItems) {
    if (this.probeAt === null || (this.probeBytes > 0 && this.probeItems > 0)) {
      this.probeAt = this.spentAt = t;
      this.probeBytes = creditBytes;
      this.probeItems = creditItems;
    }
    this.grantedAt = t;
    this.waited = 0;
    this.starved = false;
    this.regranted = true;
  }

  /**
   * At a grant, when the window holds the stream back: how many times what came
   * since the last grant would come in a round trip (0 for the first such grant
   * in a row); else null.
   */
  growth(t, rtt) {
    const since = t - this.grantedAt;
    const quick = rtt !== null && since < 2 * rtt;
    if (!(this.starved && quick)) {
      this.grew = this.grew && quick;
      return null;
    }
    const factor = this.grew ? rtt / Math.max(since - this.waited, 1e-6) : 0;
    this.grew = true;
    return factor;
  }

  /** At a grant: whether the consumer lags (items waiting at every take, four round trips or more). */
  lags(t, rtt) {
    return !this.starved && rtt !== null && t - this.grantedAt >= 4 * rtt;
  }
}

/** One connection's round trip: samples smoothed as TCP's, each at most SPREAD times the least. */
export class RoundTrip {
  constructor() {
    this.seconds = null; // the smoothed round trip (s), null before a sample
    this.least = null;
  }

  note(sample) {
    sample = Math.max(sample, MIN_RTT);
    if (this.least === null || sample < this.least) this.least = sample;
    sample = Math.min(sample, SPREAD * this.least);
    if (this.seconds === null) this.seconds = sample;
    else this.seconds += (sample - this.seconds) / 8;
  }
}

/** The window a stream its window holds back grows to (at most `limit`, never less than `window`). */
export function grown(window, consumed, perRtt, limit) {
  return Math.max(
    window, Math.min(limit, 8 * window, Math.max(2 * window, Math.floor(2 * consumed * perRtt))),
  );
}

/** How much a lagging stream's window gives back: half, down to its first size, at most `grant`. */
export function shrunk(window, first, grant) {
  return Math.max(0, Math.min(window - first, Math.floor(window / 2), grant));
}

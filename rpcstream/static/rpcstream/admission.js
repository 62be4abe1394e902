// admission.js: our calls in flight stay within the limit the server advertised,
// and callers beyond it wait for a slot instead of being refused OVERLOADED.
//
// As rpcstream/peer/admission.py (and HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS):
// each side sends its limits in the reserved notification rpcstream.settings as
// its first frame. A Call or StreamCall takes a slot before it leaves and gives
// it back when its answer came (or its result stream ended) or when the page
// gave up on it (Cancel / StreamCancel): the server frees the slot when that
// cancel arrives, before its handler has wound down, so both sides count alike.
// Until the server's settings arrive its limit is taken to be the default (256),
// which is what a server that never advertises enforces. Notifications take no
// slot (nobody learns when their handler ends), nor does the heartbeat
// (rpcstream.ping is answered without running a handler).

import { ConnectionClosed, Overloaded } from "./errors.js";

/**
 * The server's limit until it advertises one, and the page's own default
 * (rpcstream.peer.admission.DEFAULT_MAX_CONCURRENT_HANDLERS; tests/test_static.py
 * compares them).
 */
export const DEFAULT_MAX_CONCURRENT_HANDLERS = 256;

/**
 * Callers waiting for a slot beyond which a call fails OVERLOADED at once (the
 * default of RpcPeer's max_waiting_calls; tests/test_static.py compares them).
 */
export const DEFAULT_MAX_WAITING_CALLS = 100000;

const NEW = 0;
const WAITING = 1;
const HELD = 2;
const DONE = 3;

/**
 * One call's claim on a slot. `onSlot()` runs when the slot is the call's (at
 * once, inside `Admission.enter`, when one is free); `onFail(error)` when it
 * never will be: too many callers wait already (Overloaded) or the connection
 * closed (ConnectionClosed). `done()` gives the slot back, or stops waiting.
 */
export class Ticket {
  constructor(onSlot, onFail) {
    this._onSlot = onSlot;
    this._onFail = onFail;
    this._state = NEW;
    this._admission = null;
  }

  /** Whether the slot is this call's (and not given back yet). */
  get held() {
    return this._state === HELD;
  }

  /** Whether it is in line for a slot. */
  get waiting() {
    return this._state === WAITING;
  }

  /** Give the slot back, or leave the line. Idempotent. */
  done() {
    const state = this._state;
    this._state = DONE;
    if (state === WAITING) this._admission._waiting.delete(this);
    else if (state === HELD) this._admission.release();
  }

  _fail(error) {
    this._state = DONE;
    this._onFail(error);
  }
}

/** Slots for our calls on the server, and the calls waiting for one, in order. */
export class Admission {
  constructor(maxWaiting = DEFAULT_MAX_WAITING_CALLS, limit = DEFAULT_MAX_CONCURRENT_HANDLERS) {
    if (!(Number.isInteger(maxWaiting) && maxWaiting >= 0)) {
      throw new RangeError("maxWaitingCalls must be an integer >= 0");
    }
    this.limit = limit;
    this.maxWaiting = maxWaiting;
    this.used = 0;
    this._waiting = new Set(); // tickets in line, oldest first (a Set keeps insertion order)
    this._closed = null; // the ConnectionClosed, once the connection is gone
    this._handing = false;
  }

  /** Calls waiting for a slot. */
  get waiting() {
    return this._waiting.size;
  }

  /** The server advertised its limit: callers in line may fit now. */
  setLimit(limit) {
    this.limit = limit;
    this._handOver();
  }

  /**
   * Take a slot for `ticket`: at once if one is free and nobody waits ahead (its
   * onSlot runs before this returns), else in line, else refused (its onFail
   * runs before this returns).
   */
  enter(ticket) {
    ticket._admission = this;
    if (this._closed) {
      ticket._fail(new ConnectionClosed(this._closed.code, this._closed.reason));
    } else if (this.used < this.limit && this._waiting.size === 0) {
      this.used += 1;
      ticket._state = HELD;
      ticket._onSlot();
    } else if (this._waiting.size >= this.maxWaiting) {
      ticket._fail(new Overloaded(
        `${this._waiting.size} calls wait for the server's ${this.limit} handler slots ` +
        "(maxWaitingCalls)",
      ));
    } else {
      ticket._state = WAITING;
      this._waiting.add(ticket);
    }
  }

  /** Give a slot back (Ticket.done does, once). */
  release() {
    this.used -= 1;
    this._handOver();
  }

  _handOver() {
    // A ticket's onSlot may give its slot back at once (its call failed to
    // encode): the loop already running here hands it on, not a nested one.
    if (this._handing || this._closed) return;
    this._handing = true;
    try {
      while (this._waiting.size > 0 && this.used < this.limit) {
        const ticket = this._waiting.values().next().value;
        this._waiting.delete(ticket);
        this.used += 1;
        ticket._state = HELD;
        ticket._onSlot();
      }
    } finally {
      this._handing = false;
    }
  }

  /** The connection is gone: every caller in line fails with ConnectionClosed, now. */
  close(error) {
    if (this._closed) return;
    this._closed = error;
    const waiting = [...this._waiting];
    this._waiting.clear();
    for (const ticket of waiting) {
      ticket._fail(new ConnectionClosed(error.code, error.reason));
    }
  }
}

// runs.js: RunClient, a client of a RunServer that survives disconnects, and
// the subscriptions that follow a run's events through them (as
// rpcstream/runclient.py).

import { ConnectionClosed, DeadlineExceeded, InvalidParams, ReconnectFailed } from "./errors.js";
import { connect } from "./peer.js";
import { deferred, raceAbort, safeUrl, sleep } from "./util.js";

/**
 * The event types that mean something to rpcstream (the run vocabulary): a run
 * starts with "started" and ends with one of TERMINAL_TYPES; a flow's own
 * events have types of its choosing. tests/test_static.py reads this table from
 * the source and compares it with Python's: keep one `NAME: "type",` per line.
 */
export const EventType = Object.freeze({
  STARTED: "started",
  COMPLETE: "complete",
  ERROR: "error",
  CANCELLED: "cancelled",
});

/** The event types that end a run. */
export const TERMINAL_TYPES = Object.freeze(
  new Set([EventType.COMPLETE, EventType.ERROR, EventType.CANCELLED]),
);

/**
 * A client of a RunServer that survives disconnects (as rpcstream/runclient.py).
 *
 * One background loop, the keeper, holds a connection open: it connects to the
 * next URL of its list, waits until the connection closes, sleeps a backoff
 * delay (uniform in [0, min(backoffCap, backoffBase * 2**failures)]: "full
 * jitter") and tries the next URL. After `maxAttempts` failed attempts in a
 * row, or `giveUpAfter` seconds without a connection, it gives up: waiters get
 * ReconnectFailed.
 *
 * State changes dispatch a "statechange" event (and call `onstatechange`) with
 * `detail` = {state, url, attempt, delay, error, connections}; `state` is one
 * of "connecting", "open", "reconnecting" (waiting `delay` seconds before the
 * next attempt), "failed" and "closed". A subscription that resumes after a
 * drop dispatches "resume" with detail {runId, after}.
 *
 * Calls are not retried (runs.start is not idempotent, unless given a runId): a call in flight when
 * the connection drops rejects with ConnectionClosed. A call made while
 * disconnected waits for the next connection (bounded by its timeout) unless
 * `wait: false`.
 */
export class RunClient extends EventTarget {
  constructor(urls, options = {}) {
    super();
    this.urls = typeof urls === "string" ? [urls] : [...urls];
    if (!this.urls.length) throw new TypeError("RunClient needs at least one URL");
    const {
      token, router, backoffBase = 0.1, backoffCap = 5, maxAttempts = null,
      giveUpAfter = null, wait = true, pingInterval = 10, pingTimeout = 10, ...rest
    } = options;
    this.backoffBase = backoffBase;
    this.backoffCap = backoffCap;
    this.maxAttempts = maxAttempts;
    this.giveUpAfter = giveUpAfter;
    this.wait = wait;
    this._connectOptions = { ...rest, token, router, pingInterval, pingTimeout };
    /** How many connections were opened so far (1 + reconnects). */
    this.connections = 0;
    /** The URL of the current (or last) connection, without the token. */
    this.url = null;
    /** "connecting" | "open" | "reconnecting" | "failed" | "closed" */
    this.state = "connecting";
    /** Called with each "statechange" event, like a DOM on... property. */
    this.onstatechange = null;
    this._peer = null;
    // Peers of servers that refused runs.subscribe's `batch` (older ones).
    this._noBatches = new WeakSet();
    this._failed = null;
    this._closed = false;
    this._stop = new AbortController();
    this._changed = deferred();
    // Start on the next microtask, so listeners added right after `new` see every state.
    queueMicrotask(() => this._keepConnected());
  }

  /** Whether a connection is open now. */
  get connected() {
    return this._peer !== null && !this._peer.isClosed;
  }

  _setState(state, detail = {}) {
    this.state = state;
    const event = new CustomEvent("statechange", {
      detail: { state, url: this.url, connections: this.connections, ...detail },
    });
    this.dispatchEvent(event);
    if (typeof this.onstatechange === "function") {
      try {
        this.onstatechange(event);
      } catch (exc) {
        console.error("rpcstream: onstatechange failed", exc);
      }
    }
  }

  _notify() {
    const changed = this._changed;
    this._changed = deferred();
    changed.resolve();
  }

  async _keepConnected() {
    let failures = 0;
    let index = 0;
    let downSince = performance.now();
    let lastError = null;
    while (!this._closed) {
      const url = this.urls[index % this.urls.length];
      index += 1;
      this._setState("connecting", { url: safeUrl(url), attempt: failures + 1 });
      let peer = null;
      try {
        peer = await connect(url, { ...this._connectOptions, signal: this._stop.signal });
      } catch (exc) {
        lastError = exc;
      }
      if (this._closed) {
        peer?.close();
        return;
      }
      if (peer) {
        failures = 0;
        this.connections += 1;
        this.url = peer.url;
        this._peer = peer;
        this._setState("open", { url: peer.url });
        this._notify();
        lastError = await peer.closed;
        this._peer = null;
        this._notify();
        downSince = performance.now();
        if (this._closed) return;
      }
      failures += 1;
      const waited = (performance.now() - downSince) / 1000;
      if ((this.maxAttempts !== null && failures >= this.maxAttempts) ||
          (this.giveUpAfter !== null && waited >= this.giveUpAfter)) {
        this._failed = new ReconnectFailed(
          `gave up after ${failures} failed attempts over ${waited.toFixed(1)} s ` +
          `(${this.urls.map(safeUrl).join(", ")}): ${lastError?.message ?? lastError}`,
          { cause: lastError },
        );
        this._setState("failed", { error: this._failed });
        this._notify(); // every waiter rejects with _failed
        return;
      }
      let delay = Math.random() * Math.min(this.backoffCap, this.backoffBase * 2 ** failures);
      if (this.giveUpAfter !== null) delay = Math.min(delay, Math.max(0, this.giveUpAfter - waited));
      this._setState("reconnecting", { delay, attempt: failures, error: lastError });
      try {
        await sleep(delay, this._stop.signal);
      } catch {
        return; // closed
      }
    }
  }

  /** The open connection's Peer, waiting for the (re)connection if allowed. */
  async peer({ wait } = {}) {
    for (;;) {
      const changed = this._changed.promise;
      if (this._failed) throw this._failed;
      if (this._closed) throw new ConnectionClosed(1000, "the RunClient is closed");
      const peer = this._peer;
      if (peer && !peer.isClosed) return peer;
      if (!(wait ?? this.wait)) {
        throw new ConnectionClosed(1006, "not connected (the RunClient is reconnecting)");
      }
      await changed;
    }
  }

  /**
   * Call `method` on the server (see Peer.call). `timeout` bounds the wait for
   * a connection and the call together.
   */
  async call(method, args = [], kwargs = {}, { timeout = null, wait, signal } = {}) {
    if (timeout === null || timeout === undefined) {
      const peer = await raceAbort(this.peer({ wait }), signal);
      return peer.call(method, args, kwargs, { signal });
    }
    const deadline = performance.now() + timeout * 1000;
    const peer = await raceAbort(
      Promise.race([
        this.peer({ wait }),
        sleep(timeout).then(() => {
          throw new DeadlineExceeded(`${method}: no connection within ${timeout} s`);
        }),
      ]),
      signal,
    );
    const remaining = Math.max(0, (deadline - performance.now()) / 1000);
    return peer.call(method, args, kwargs, { timeout: remaining, signal });
  }

  /**
   * Start a run of `flow`; resolves with its id.
   *
   * `options.runId` (1 to 128 of A-Z a-z 0-9 _ . : -) chooses the id: the run
   * starts, or, when a run of `flow` the caller may see holds it already, that
   * run's id is returned and nothing starts ("resume or start the stream for
   * chat X"). Safe to call again after a dropped connection. A bad id rejects
   * with InvalidParams; another principal's run, with RunNotFound.
   */
  async start(flow, params = {}, options = {}) {
    const { runId, ...callOptions } = options;
    const kwargs = runId === undefined || runId === null ? {} : { run_id: runId };
    const run = await this.call("runs.start", [flow, params ?? {}], kwargs, callOptions);
    return String(run.run_id);
  }

  /** The run's status (runs.status). */
  status(runId, options = {}) {
    return this.call("runs.status", [runId], {}, options);
  }

  /** Cancel the run (runs.cancel). */
  cancel(runId, options = {}) {
    return this.call("runs.cancel", [runId], {}, options);
  }

  /** Send an event to the running flow (runs.send). */
  async send(runId, type, data = null, options = {}) {
    await this.call("runs.send", [runId, type, data], {}, options);
  }

  /**
   * Every event of the run with id > `after`, then live ones, until its
   * terminal event; through disconnects, with no gap and no duplicate. Returns
   * an async iterable whose `lastEventId` is the id of the last event handed
   * out, and whose `close()` stops it at once.
   */
  subscribe(runId, { after = 0, windowItems, windowBytes } = {}) {
    return new Subscription(this, runId, after, { windowItems, windowBytes });
  }

  /** Stop reconnecting and close the connection. */
  close() {
    if (this._closed) return;
    this._closed = true;
    this._stop.abort(new ConnectionClosed(1000, "the RunClient is closed"));
    this._peer?.close();
    this._setState("closed");
    this._notify();
  }
}

/** A run's events through disconnects: see RunClient.subscribe. */
class Subscription {
  constructor(client, runId, after, streamOptions) {
    this.client = client;
    this.runId = runId;
    /** The id of the last event handed out: a resume continues after it. */
    this.lastEventId = after;
    /** How many times it resumed on a new connection. */
    this.resumes = 0;
    this._streamOptions = streamOptions;
    this._stream = null;
    this._closed = false;
    this._stop = new AbortController();
    this._events = this._run();
  }

  async *_run() {
    let downgraded = false; // retrying at once without batches: not a resume
    for (let first = true; ; first = false) {
      if (this._closed) return;
      let peer;
      try {
        peer = await raceAbort(this.client.peer({ wait: true }), this._stop.signal);
      } catch (exc) {
        if (this._closed) return;
        throw exc; // ReconnectFailed, or the RunClient was closed
      }
      if (!first && !downgraded) {
        this.resumes += 1;
        this.client.dispatchEvent(new CustomEvent("resume", {
          detail: { runId: this.runId, after: this.lastEventId },
        }));
      }
      downgraded = false;
      const batch = !this.client._noBatches.has(peer);
      try {
        // batch: each item is a list of events (replay and catch-up arrive many
        // per message). Events of a batch not handed out when the connection
        // drops are read again after lastEventId: nothing is lost.
        const kwargs = batch ? { after: this.lastEventId, batch: true } : { after: this.lastEventId };
        this._stream = peer.stream("runs.subscribe", [this.runId], kwargs, this._streamOptions);
        for await (const item of this._stream) {
          for (const event of Array.isArray(item) ? item : [item]) {
            this.lastEventId = event.id;
            yield event;
            if (TERMINAL_TYPES.has(event.type)) return;
          }
        }
        return; // the run had ended before `after`: nothing more will come
      } catch (exc) {
        if (batch && exc instanceof InvalidParams && String(exc.message).includes("batch")) {
          // A server from before batches: ask it for one event per item.
          this.client._noBatches.add(peer);
          downgraded = true;
          continue;
        }
        // Lost with the connection: subscribe again after the last id handed out.
        if (!(exc instanceof ConnectionClosed) || exc instanceof ReconnectFailed) throw exc;
      } finally {
        this._stream?.close();
        this._stream = null;
      }
    }
  }

  [Symbol.asyncIterator]() {
    return this;
  }

  next() {
    return this._events.next();
  }

  return(value) {
    this.close();
    return this._events.return(value);
  }

  throw(error) {
    return this._events.throw(error);
  }

  /** Stop now, even while waiting for an event (the server is told to stop). */
  close() {
    this._closed = true;
    this._stop.abort();
    this._stream?.close(); // ends the pending next() at once
  }
}

// rpcstream.js: the browser client of rpcstream (wire protocol v1, JSON codec).
//
// One dependency-free ES module, served by `rpcstream serve` at /rpcstream.js:
//
//     import { connect, RunClient } from "/rpcstream.js";
//
// `connect()` opens one WebSocket and returns a `Peer`: calls, notifications and
// credit-controlled streams in both directions, exactly as docs/protocol.md
// describes and rpcstream/peer.py implements. `RunClient` keeps a connection
// open through drops (backoff with full jitter, rotating through URLs) and
// follows a run's events, resuming after the last event id it handed out.
//
// All durations are in seconds, as on the wire and in the Python API.

/** The subprotocol this module speaks: the JSON codec, in text messages. */
export const SUBPROTOCOL = "rpcstream.v1.json";

/** Error codes of `Error`, `StreamError` and `Fault` frames (rpcstream.ErrorCode). */
export const ErrorCode = Object.freeze({
  PROTOCOL_ERROR: 1,
  METHOD_NOT_FOUND: 2,
  INVALID_PARAMS: 3,
  INTERNAL_ERROR: 4,
  CANCELLED: 5,
  DEADLINE_EXCEEDED: 6,
  OVERLOADED: 7,
  RUN_NOT_FOUND: 8,
  RUN_EXPIRED: 9,
  EVENTS_TRIMMED: 10,
  RUN_FINISHED: 11,
  UNAUTHORIZED: 12,
  RATE_LIMITED: 13,
});

/** The event types that end a run. */
export const TERMINAL_TYPES = Object.freeze(new Set(["complete", "error", "cancelled"]));

// Frame tags (docs/protocol.md, section 3).
const CALL = 1, NOTIFY = 2, STREAM_CALL = 3, RESULT = 4, ERROR = 5, CANCEL = 6;
const STREAM_DATA = 7, STREAM_END = 8, STREAM_ERROR = 9, CREDIT = 10, STREAM_CANCEL = 11;
const FAULT = 12;

const MAX_CREDIT = 2 ** 31; // running credit totals beyond this are a violation
const MAX_MESSAGE_BYTES = 256 * 1024; // a batch stops taking stream data at this size
const HEARTBEAT_METHOD = "rpcstream.ping";

// ---------------------------------------------------------------------------------
// Errors: the same tree as rpcstream/errors.py.
// ---------------------------------------------------------------------------------

const CODE_NAMES = Object.fromEntries(
  Object.entries(ErrorCode).map(([name, code]) => [code, name.toLowerCase()]),
);

/** Base class of every error this module throws. */
export class RpcStreamError extends Error {
  constructor(message, options) {
    super(message, options);
    this.name = new.target.name;
  }
}

/**
 * An error that crossed (or will cross) the wire. `message` is the remote
 * message exactly; `code` and `data` as sent. Throw one from a handler to
 * choose what the caller sees.
 */
export class RemoteError extends RpcStreamError {
  constructor(code, message = "", data = null) {
    super(message);
    this.code = code;
    this.data = data === undefined ? null : data;
  }

  /** `[method_not_found] no method 'x'`, as Python's str() of the error. */
  toString() {
    const name = CODE_NAMES[this.code] ?? `code ${this.code}`;
    return this.message ? `${this.name}: [${name}] ${this.message}` : `${this.name}: [${name}]`;
  }

  /** Rebuild an error received in a frame as the subclass its code names. */
  static fromWire(code, message, data = null) {
    const Sub = BY_CODE.get(code);
    return Sub ? new Sub(message, data) : new RemoteError(code, message, data);
  }
}

function coded(name, code) {
  // A RemoteError subclass whose code is fixed: new Sub(message, data).
  const cls = {
    [name]: class extends RemoteError {
      constructor(message = "", data = null) {
        super(code, message, data);
      }
    },
  }[name];
  cls.code = code;
  return cls;
}

export const MethodNotFound = coded("MethodNotFound", ErrorCode.METHOD_NOT_FOUND);
export const InvalidParams = coded("InvalidParams", ErrorCode.INVALID_PARAMS);
export const InternalError = coded("InternalError", ErrorCode.INTERNAL_ERROR);
export const Cancelled = coded("Cancelled", ErrorCode.CANCELLED);
export const DeadlineExceeded = coded("DeadlineExceeded", ErrorCode.DEADLINE_EXCEEDED);
export const Overloaded = coded("Overloaded", ErrorCode.OVERLOADED);
export const ProtocolViolation = coded("ProtocolViolation", ErrorCode.PROTOCOL_ERROR);
export const RunNotFound = coded("RunNotFound", ErrorCode.RUN_NOT_FOUND);
export const RunExpired = coded("RunExpired", ErrorCode.RUN_EXPIRED);
export const RunFinished = coded("RunFinished", ErrorCode.RUN_FINISHED);
export const RateLimited = coded("RateLimited", ErrorCode.RATE_LIMITED);

/** Events after the requested id were trimmed away; `firstId` is the first one kept. */
export class EventsTrimmed extends coded("EventsTrimmed", ErrorCode.EVENTS_TRIMMED) {
  get firstId() {
    return this.data && typeof this.data === "object" ? Number(this.data.first_id ?? 0) : 0;
  }
}

const BY_CODE = new Map(
  [
    MethodNotFound, InvalidParams, InternalError, Cancelled, DeadlineExceeded, Overloaded,
    ProtocolViolation, RunNotFound, RunExpired, EventsTrimmed, RunFinished, RateLimited,
  ].map((cls) => [cls.code, cls]),
);

/** The connection closed (either side) or broke; pending work fails with this. */
export class ConnectionClosed extends RpcStreamError {
  constructor(code = null, reason = "") {
    let text = "connection closed";
    if (code !== null && code !== undefined) text += ` (code ${code}${reason ? ": " + reason : ""})`;
    super(text);
    this.code = code;
    this.reason = reason;
  }
}

/** A RunClient gave up reconnecting (maxAttempts or giveUpAfter ran out). */
export class ReconnectFailed extends ConnectionClosed {
  constructor(reason, options) {
    super(1006, reason);
    if (options?.cause !== undefined) this.cause = options.cause;
  }
}

/** We were asked to do something the protocol forbids (an id in use, say). */
export class LocalProtocolError extends RpcStreamError {}

/** What a handler's exception looks like on the wire (as peer.py's _internal_error). */
function toRemoteError(exc, exposeTracebacks = false) {
  if (exc instanceof RemoteError) return exc;
  const name = exc?.name ?? typeof exc;
  const text = exc?.message ?? String(exc);
  const data = exposeTracebacks && exc?.stack ? { traceback: String(exc.stack) } : null;
  return new InternalError(`${name}: ${text}`, data);
}

// ---------------------------------------------------------------------------------
// The JSON codec.
// ---------------------------------------------------------------------------------

/** Bytes of `text` in UTF-8 (what the other side counts for credit). */
function utf8Length(text) {
  let n = text.length;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c < 0x80) continue;
    if (c < 0x800) n += 1;
    else if (c >= 0xd800 && c <= 0xdbff) i++, (n += 2); // a surrogate pair: 2 chars, 4 bytes
    else n += 2;
  }
  return n;
}

/** A payload value as JSON text; `undefined` travels as null, as in arrays. */
function encodeValue(value) {
  const text = JSON.stringify(value);
  return text === undefined ? "null" : text;
}

/** `data` if it can be encoded, else null: error details never break a batch. */
function encodable(data) {
  if (data === undefined || data === null) return null;
  try {
    return JSON.stringify(data) === undefined ? null : data;
  } catch {
    return null;
  }
}

// Field types per tag, after the tag: [required count, ...types]. i: integer,
// s: string, a: any value, f: number or null, l: list of (integer | string).
const SPECS = {
  [CALL]: [4, "i", "s", "a", "a", "f", "l"],
  [NOTIFY]: [3, "s", "a", "a", "l"],
  [STREAM_CALL]: [4, "i", "s", "a", "a", "f", "l"],
  [RESULT]: [2, "i", "a"],
  [ERROR]: [3, "i", "i", "s", "a"],
  [CANCEL]: [1, "i"],
  [STREAM_DATA]: [2, "i", "a"],
  [STREAM_END]: [1, "i"],
  [STREAM_ERROR]: [3, "i", "i", "s", "a"],
  [CREDIT]: [3, "i", "i", "i"],
  [STREAM_CANCEL]: [1, "i"],
  [FAULT]: [2, "i", "s"],
};

function checkField(value, type) {
  switch (type) {
    case "i": return Number.isInteger(value);
    case "s": return typeof value === "string";
    case "f": return value === null || typeof value === "number";
    case "l":
      return Array.isArray(value) &&
        value.every((k) => Number.isInteger(k) || typeof k === "string");
    default: return true;
  }
}

/** Parse one message to its frames; throws (and nothing takes effect) if any is bad. */
function decodeBatch(text) {
  const frames = JSON.parse(text);
  if (!Array.isArray(frames)) throw new TypeError("a message must be an array of frames");
  for (const frame of frames) {
    if (!Array.isArray(frame) || !Number.isInteger(frame[0]) || !(frame[0] in SPECS)) {
      throw new TypeError(`unknown frame ${JSON.stringify(frame)?.slice(0, 80)}`);
    }
    const [required, ...types] = SPECS[frame[0]];
    if (frame.length - 1 < required) throw new TypeError(`frame ${frame[0]} has too few fields`);
    // Extra trailing fields are ignored: that is how newer peers add fields.
    for (let i = 0; i < types.length && i + 1 < frame.length; i++) {
      if (!checkField(frame[i + 1], types[i])) {
        throw new TypeError(`frame ${frame[0]}: field ${i + 1} has the wrong type`);
      }
    }
  }
  return frames;
}

/**
 * The size of each StreamData payload as it appears in the message text.
 *
 * Credit is counted in payload bytes exactly as they travel (protocol.md, section
 * 2), and JSON.parse forgets the text: re-encoding would not give the same bytes
 * (Python writes 1.0 where JavaScript writes 1, escapes differ). So scan the text
 * once, track where each element of each frame starts and ends, and measure the
 * third element (the payload) of every StreamData frame, in UTF-8 bytes.
 */
function streamDataSizes(text, frames) {
  const sizes = new Array(frames.length).fill(0);
  let depth = 0; // 1: inside the batch; 2: inside a frame; more: inside a field's value
  let frame = -1; // index of the current frame
  let field = 0; // index of the current element within it (0 is the tag)
  let start = -1; // byte offset where the current element starts (-1: not yet)
  let end = 0; // byte offset just past the last non-whitespace byte seen
  let pos = 0; // byte offset of text[i]
  const finish = () => {
    if (field === 2 && frames[frame][0] === STREAM_DATA) sizes[frame] = end - start;
  };
  for (let i = 0; i < text.length; i++) {
    let c = text.charCodeAt(i);
    if (c === 0x20 || c === 0x09 || c === 0x0a || c === 0x0d) {
      pos++; // whitespace between tokens is not part of any element
      continue;
    }
    if (depth === 2 && start < 0) start = pos;
    if (c === 0x22) {
      // A string: skip to its closing quote, counting UTF-8 bytes.
      pos++;
      for (i++; i < text.length; i++) {
        c = text.charCodeAt(i);
        if (c === 0x22) break;
        if (c === 0x5c) {
          i++; // an escape is a backslash and one ASCII character (then maybe hex digits)
          pos += 2;
        } else if (c < 0x80) pos += 1;
        else if (c < 0x800) pos += 2;
        else if (c >= 0xd800 && c <= 0xdbff) i++, (pos += 4);
        else pos += 3;
      }
      end = ++pos;
    } else if (c === 0x5b || c === 0x7b) {
      depth++; // [ or {
      pos++;
      if (depth === 2) {
        frame++;
        field = 0;
        start = -1;
      } else end = pos;
    } else if (c === 0x5d || c === 0x7d) {
      if (depth === 2) finish(); // the frame ends, and so does its last element
      depth--;
      end = ++pos;
    } else if (c === 0x2c && depth === 2) {
      finish(); // a comma between two elements of a frame
      field++;
      start = -1;
      pos++;
    } else {
      end = ++pos; // digits, literals, and the punctuation of nested values
    }
  }
  return sizes;
}

// ---------------------------------------------------------------------------------
// Small helpers.
// ---------------------------------------------------------------------------------

/** A wrong type here would make the server drop the whole message (a Fault). */
function checkCall(method, timeout) {
  if (typeof method !== "string") throw new TypeError("method must be a string");
  if (timeout !== null && timeout !== undefined && !Number.isFinite(timeout)) {
    throw new TypeError("timeout must be a number of seconds or null");
  }
}

function isAsyncIterable(value) {
  return value !== null && typeof value === "object" &&
    typeof value[Symbol.asyncIterator] === "function";
}

function isAsyncGeneratorFunction(fn) {
  return Object.prototype.toString.call(fn) === "[object AsyncGeneratorFunction]";
}

/** A promise that rejects with `signal.reason` as soon as it aborts. */
function raceAbort(promise, signal) {
  if (!signal) return promise;
  return new Promise((resolve, reject) => {
    if (signal.aborted) {
      promise.catch(() => {}); // the abandoned promise must not report an unhandled error
      reject(signal.reason);
      return;
    }
    const onAbort = () => {
      promise.catch(() => {});
      reject(signal.reason);
    };
    signal.addEventListener("abort", onAbort, { once: true });
    promise.then(
      (v) => { signal.removeEventListener("abort", onAbort); resolve(v); },
      (e) => { signal.removeEventListener("abort", onAbort); reject(e); },
    );
  });
}

function sleep(seconds, signal) {
  return raceAbort(new Promise((r) => setTimeout(r, Math.max(0, seconds) * 1000)), signal);
}

/** A promise with its resolve function, replaced whenever a state changes. */
function deferred() {
  let resolve;
  const promise = new Promise((r) => (resolve = r));
  return { promise, resolve };
}

// Run `f` soon, after the current task. Frames queued during one task (a burst
// of calls, a window of stream items) then leave in one message. A MessageChannel
// is not throttled in background tabs the way setTimeout is.
const soon = (() => {
  if (typeof MessageChannel !== "function") return (f) => setTimeout(f, 0);
  const queue = [];
  const channel = new MessageChannel();
  channel.port1.onmessage = () => {
    for (const f of queue.splice(0)) f();
  };
  channel.port1.unref?.(); // Node: do not keep the process alive
  return (f) => {
    queue.push(f);
    if (queue.length === 1) channel.port2.postMessage(0);
  };
})();

function lookup(router, method) {
  if (!router) return undefined;
  // Own properties only: a method named "constructor" or "toString" is not a handler.
  const fn = router instanceof Map
    ? router.get(method)
    : Object.hasOwn(router, method) ? router[method] : undefined;
  return typeof fn === "function" ? fn : undefined;
}

/** The WebSocket URL: relative and http(s) URLs allowed, the token as ?access_token=. */
function socketUrl(url, token) {
  const base = typeof location === "undefined" ? undefined : location.href;
  const u = new URL(url, base);
  if (u.protocol === "http:") u.protocol = "ws:";
  else if (u.protocol === "https:") u.protocol = "wss:";
  // Browsers cannot set an Authorization header on a WebSocket; the server's
  // HandshakeRequest.bearer_token reads this query parameter instead.
  if (token !== undefined && token !== null) u.searchParams.set("access_token", token);
  return u.href;
}

/** A URL fit for messages: never the token. */
function safeUrl(url) {
  try {
    const u = new URL(url, typeof location === "undefined" ? undefined : location.href);
    u.searchParams.delete("access_token");
    return u.href;
  } catch {
    return String(url);
  }
}

// ---------------------------------------------------------------------------------
// Streams.
// ---------------------------------------------------------------------------------

/**
 * The items of a stream this side receives: an async iterator.
 *
 * The receiver opens the stream with a window of credit and re-grants what its
 * consumer has taken once half a window is consumed (protocol.md, section 7).
 * So the buffer never holds more than the window plus one item: a page that
 * reads slowly holds the sender back instead of growing memory. Breaking out of
 * `for await` (which calls return()) tells the sender to stop.
 */
export class IncomingStream {
  constructor(peer, streamId, { windowItems, windowBytes, timeout = null, signal } = {}) {
    this.peer = peer;
    this.streamId = streamId;
    this.windowItems = windowItems ?? peer.windowItems;
    this.windowBytes = windowBytes ?? peer.windowBytes;
    if (!(this.windowItems >= 1 && this.windowBytes >= 1)) {
      throw new RangeError("stream windows must allow at least one item and one byte");
    }
    this._items = []; // [value, size] pairs, oldest first
    this._head = 0; // index of the oldest item in _items
    this._creditItems = this.windowItems; // what the sender may still send, as we see it
    this._creditBytes = this.windowBytes;
    this._consumedItems = 0; // taken since the last Credit we sent
    this._consumedBytes = 0;
    this._done = false; // no more frames will be accepted (ended, failed, closed)
    this._error = null;
    this._open = true; // the consumer has not closed it
    this._waiter = null;
    this._last = Promise.resolve(); // next() calls run one after the other
    this.maxBuffered = 0; // the most items this stream ever held at once
    peer._openIncoming(this); // checks the id, grants the first credit
    if (timeout !== null && timeout !== undefined) {
      // The deadline bounds the whole stream (section 6).
      this._timer = setTimeout(() => {
        this._fail(new DeadlineExceeded(`stream ${streamId}: deadline exceeded`), true);
      }, Math.max(0, timeout) * 1000);
    }
    if (signal) {
      const onAbort = () => this._fail(signal.reason, true);
      if (signal.aborted) onAbort();
      else signal.addEventListener("abort", onAbort, { once: true });
    }
  }

  /** Items received and not yet taken. */
  get buffered() {
    return this._items.length - this._head;
  }

  /** Whether the consumer closed it or it ended. */
  get closed() {
    return !this._open;
  }

  [Symbol.asyncIterator]() {
    return this;
  }

  next() {
    const result = this._last.then(() => this._next());
    this._last = result.catch(() => {});
    return result;
  }

  async _next() {
    for (;;) {
      if (!this._open) return { value: undefined, done: true };
      if (this.buffered > 0) return { value: this._take(), done: false };
      if (this._done) {
        const error = this._error;
        this.close();
        if (error) throw error;
        return { value: undefined, done: true };
      }
      await new Promise((resolve) => (this._waiter = resolve));
    }
  }

  _take() {
    const [value, size] = this._items[this._head];
    this._items[this._head++] = undefined;
    if (this._head > 1024 && this._head * 2 > this._items.length) {
      this._items = this._items.slice(this._head); // compact now and then
      this._head = 0;
    }
    if (!this._done) {
      // Re-grant what was consumed once half a window is, as protocol.py's pop_item.
      this._consumedItems += 1;
      this._consumedBytes += size;
      if (this._consumedItems * 2 >= this.windowItems ||
          this._consumedBytes * 2 >= this.windowBytes) {
        this._creditItems += this._consumedItems;
        this._creditBytes += this._consumedBytes;
        this.peer._queueControl(
          `[${CREDIT},${this.streamId},${this._consumedItems},${this._consumedBytes}]`,
        );
        this._consumedItems = this._consumedBytes = 0;
      }
    }
    return value;
  }

  /** Stop receiving; the sender is told to stop (StreamCancel). */
  close() {
    if (!this._open) return;
    this._open = false;
    clearTimeout(this._timer);
    this._items = [];
    this._head = 0;
    this.peer._closeIncoming(this);
    this._wake();
  }

  async return(value) {
    this.close();
    return { value, done: true };
  }

  async throw(error) {
    this.close();
    throw error;
  }

  _wake() {
    const waiter = this._waiter;
    this._waiter = null;
    waiter?.();
  }

  // -- called by the peer as frames arrive --

  _receive(value, size) {
    if (this._done) return;
    if (this._creditItems <= 0 || this._creditBytes <= 0) {
      // Data beyond the credit we granted: fail the stream, stop the sender.
      this._fail(new ProtocolViolation(
        `stream ${this.streamId}: data sent beyond the credit granted`,
      ), true);
      return;
    }
    this._creditItems -= 1;
    this._creditBytes -= size;
    this._items.push([value, size]);
    if (this.buffered > this.maxBuffered) this.maxBuffered = this.buffered;
    this._wake();
  }

  _end(error = null) {
    if (this._done) return;
    this._done = true;
    this._error = error;
    clearTimeout(this._timer);
    this._wake();
  }

  /** Fail locally; the items that arrived before the failure are still delivered. */
  _fail(error, cancelSender) {
    if (this._done || !this._open) return;
    if (cancelSender) this.peer._queueControl(`[${STREAM_CANCEL},${this.streamId}]`);
    this._end(error);
  }
}

/** The state of a stream this side sends: the credit its receiver granted. */
class Outgoing {
  constructor() {
    this.creditItems = 0;
    this.creditBytes = 0;
    this.cancelled = false; // the receiver stopped it (or the connection closed)
    this.finished = false;
    this.controller = new AbortController(); // aborted to stop the pump at once
    this._waiter = null;
  }

  get canSend() {
    return this.creditItems > 0 && this.creditBytes > 0 && !this.cancelled;
  }

  wake() {
    const waiter = this._waiter;
    this._waiter = null;
    waiter?.();
  }

  /** Wait until credit arrives, the receiver cancels, or `signal` aborts. */
  waitWritable(signal) {
    return raceAbort(new Promise((resolve) => (this._waiter = resolve)), signal);
  }
}

// ---------------------------------------------------------------------------------
// The peer.
// ---------------------------------------------------------------------------------

/**
 * One end of an rpcstream connection (the connecting side: odd stream ids).
 * Get one from `connect()`. Dispatches a "close" event (detail: the
 * ConnectionClosed) once, when the connection closes or breaks.
 */
export class Peer extends EventTarget {
  constructor(ws, options = {}) {
    super();
    this.url = options.url ?? safeUrl(ws.url);
    this.router = options.router ?? {};
    this.windowItems = options.windowItems ?? 256;
    this.windowBytes = options.windowBytes ?? 256 * 1024;
    this.maxConcurrentHandlers = options.maxConcurrentHandlers ?? 256;
    this.maxStreams = options.maxStreams ?? 4096;
    this.maxBufferedAmount = options.maxBufferedAmount ?? 1024 * 1024;
    this.exposeTracebacks = options.exposeTracebacks ?? false;
    if (!(this.windowItems >= 1 && this.windowBytes >= 1)) {
      throw new RangeError("stream windows must allow at least one item and one byte");
    }
    this._ws = ws;
    this._nextCallId = 1;
    this._nextStreamId = 1; // the connecting side allocates odd stream ids
    this._calls = new Map(); // our call id -> pending call
    this._handlers = new Map(); // their call id -> AbortController of the handler
    this._incoming = new Map(); // stream id -> IncomingStream
    this._outgoing = new Map(); // stream id -> Outgoing
    // Credit/StreamCancel that arrive for an id the server allocated before we
    // registered the stream (raw streams); bounded by maxStreams.
    this._early = new Map();
    this._ended = new Set(); // server-allocated ids of outgoing streams that ended
    this._endedOrder = [];
    // Two queues, as protocol.py: control frames go ahead of stream data.
    this._control = [];
    this._data = []; // [text, payload bytes]
    this._queuedBytes = 0;
    this._flushScheduled = false;
    this._running = 0;
    this._closeError = null;
    this._closedPromise = deferred();
    /** Resolves (never rejects) with the ConnectionClosed when the connection ends. */
    this.closed = this._closedPromise.promise;
    this.faultsReceived = 0;
    this.faultsSent = 0;
    this.callsReceived = 0;

    ws.binaryType = "arraybuffer";
    ws.onmessage = (event) => this._onMessage(event.data);
    ws.onclose = (event) => {
      this._shutdown(new ConnectionClosed(event.code || 1006, event.reason || ""));
    };
    ws.onerror = () => {}; // a close event always follows

    const interval = options.pingInterval === undefined ? 20 : options.pingInterval;
    const timeout = options.pingTimeout === undefined ? 20 : options.pingTimeout;
    if (interval) this._startHeartbeat(interval, timeout ?? interval);
  }

  /** Whether the connection is closed (by either side) or broken. */
  get isClosed() {
    return this._closeError !== null;
  }

  /** Bytes queued for the socket and not yet sent (ours plus the WebSocket's). */
  get bufferedAmount() {
    return this._queuedBytes + (this._ws.bufferedAmount || 0);
  }

  /** Counts of live work on this connection. */
  get stats() {
    return {
      pendingCalls: this._calls.size,
      runningHandlers: this._running,
      streams: this._incoming.size + this._outgoing.size,
      faultsReceived: this.faultsReceived,
      faultsSent: this.faultsSent,
    };
  }

  // -- calling the other side ------------------------------------------------------

  /**
   * Call `method` and resolve with its result.
   *
   * `timeout` (seconds) travels in the Call frame as a deadline the server
   * enforces; when it passes here first, a Cancel is sent and the promise
   * rejects with DeadlineExceeded. Aborting `signal` sends Cancel and rejects
   * with the signal's reason. Async iterables among the arguments travel as
   * streams.
   */
  call(method, args = [], kwargs = {}, { timeout = null, signal } = {}) {
    return new Promise((resolve, reject) => {
      this._checkOpen();
      checkCall(method, timeout);
      if (signal?.aborted) throw signal.reason;
      const { argsOut, kwargsOut, streamArgs, sids } = this._encodeParams(args, kwargs);
      const id = this._nextCallId++;
      let text;
      try {
        text = JSON.stringify([CALL, id, method, argsOut, kwargsOut, timeout ?? null, streamArgs]);
      } catch (exc) {
        for (const sid of sids) this.abortStream(sid);
        throw new TypeError(`parameters cannot be encoded: ${exc.message}`);
      }
      const pending = { method, sids, timer: null, signal, onAbort: null };
      const settle = () => {
        clearTimeout(pending.timer);
        if (pending.onAbort) signal.removeEventListener("abort", pending.onAbort);
        this._calls.delete(id);
      };
      // Our side gave up (deadline, abort): tell the callee, forget any late answer.
      const giveUp = (error) => {
        if (!this._calls.has(id)) return;
        settle();
        this._queueControl(`[${CANCEL},${id}]`);
        this._stopUnopened(sids);
        reject(error);
      };
      pending.resolve = (value) => { settle(); resolve(value); };
      pending.reject = (error) => { settle(); this._stopUnopened(sids); reject(error); };
      if (timeout !== null && timeout !== undefined) {
        pending.timer = setTimeout(
          () => giveUp(new DeadlineExceeded(`${method}: no answer within ${timeout} s`)),
          Math.max(0, timeout) * 1000,
        );
      }
      if (signal) {
        pending.onAbort = () => giveUp(signal.reason);
        signal.addEventListener("abort", pending.onAbort, { once: true });
      }
      this._calls.set(id, pending);
      this._queueControl(text);
    });
  }

  /** Call `method` without an answer (errors are only logged by the server). */
  notify(method, args = [], kwargs = {}) {
    this._checkOpen();
    checkCall(method, null);
    const { argsOut, kwargsOut, streamArgs, sids } = this._encodeParams(args, kwargs);
    let text;
    try {
      text = JSON.stringify([NOTIFY, method, argsOut, kwargsOut, streamArgs]);
    } catch (exc) {
      for (const sid of sids) this.abortStream(sid);
      throw new TypeError(`parameters cannot be encoded: ${exc.message}`);
    }
    this._queueControl(text);
  }

  /**
   * Call a streaming method; iterate the result with `for await`.
   *
   * Options: `timeout` (bounds the whole stream), `signal`, `windowItems`,
   * `windowBytes` (the credit this stream grants).
   */
  stream(method, args = [], kwargs = {}, options = {}) {
    this._checkOpen();
    checkCall(method, options.timeout);
    if (!((options.windowItems ?? this.windowItems) >= 1 &&
          (options.windowBytes ?? this.windowBytes) >= 1)) {
      throw new RangeError("stream windows must allow at least one item and one byte");
    }
    const sid = this._allocStreamId();
    this._checkNew(sid);
    const { argsOut, kwargsOut, streamArgs, sids } = this._encodeParams(args, kwargs);
    const timeout = options.timeout ?? null;
    let text;
    try {
      text = JSON.stringify([STREAM_CALL, sid, method, argsOut, kwargsOut, timeout, streamArgs]);
    } catch (exc) {
      for (const s of sids) this.abortStream(s);
      throw new TypeError(`parameters cannot be encoded: ${exc.message}`);
    }
    // The StreamCall, then the Credit that opens the stream (queued by the
    // IncomingStream): both leave in the same message.
    this._queueControl(text);
    return new IncomingStream(this, sid, options);
  }

  // -- raw streams -----------------------------------------------------------------

  /**
   * Send `items` (an async iterable) as a stream, in the background; return its
   * id. Without `streamId` one is allocated: tell the receiver by a call.
   */
  sendStream(items, streamId = undefined) {
    this._checkOpen();
    return this._startPump(items, streamId);
  }

  /**
   * Open a stream to receive: the id the server allocated, or a new one to hand
   * to the server. Returns the IncomingStream (its id is `.streamId`).
   */
  receiveStream(streamId = undefined, options = {}) {
    this._checkOpen();
    const sid = streamId ?? this._allocStreamId();
    return new IncomingStream(this, sid, options);
  }

  /** Sender side: stop an outgoing stream; its receiver gets Cancelled. */
  abortStream(streamId) {
    this._outgoing.get(streamId)?.controller.abort(
      new Cancelled(`stream ${streamId}: the sender stopped`),
    );
  }

  // -- closing ---------------------------------------------------------------------

  /**
   * Close the connection: fail pending calls, stop streams and handlers, send
   * what is queued, then run the closing handshake. Browsers only allow the
   * codes 1000 and 3000-4999.
   */
  close(code = 1000, reason = "") {
    if (code !== 1000 && !(code >= 3000 && code <= 4999)) {
      throw new RangeError(`browsers can only close with 1000 or 3000-4999, not ${code}`);
    }
    this._shutdown(new ConnectionClosed(code, reason || "closed locally"));
    this._flush(); // cancels and answers queued before the close still go out
    try {
      this._ws.close(code, reason.slice(0, 120));
    } catch {
      // already closing
    }
    return this.closed;
  }

  _checkOpen() {
    if (this._closeError) {
      throw new ConnectionClosed(this._closeError.code, this._closeError.reason);
    }
  }

  /** Fail everything that depends on the connection, at once. Idempotent. */
  _shutdown(error) {
    if (this._closeError) return;
    this._closeError = error;
    clearInterval(this._heartbeat);
    for (const pending of [...this._calls.values()]) {
      pending.reject(new ConnectionClosed(error.code, error.reason));
    }
    for (const stream of this._incoming.values()) stream._end(error);
    for (const out of this._outgoing.values()) {
      out.cancelled = true; // nothing more is sent on them, not even StreamEnd
      out.controller.abort(error);
      out.wake();
    }
    for (const controller of this._handlers.values()) controller.abort(error);
    this._closedPromise.resolve(error);
    this.dispatchEvent(new CustomEvent("close", { detail: error }));
  }

  // -- heartbeat -------------------------------------------------------------------

  // Browsers answer the server's WebSocket pings but cannot send their own, so a
  // dead network would only be noticed when TCP gives up. Instead, call a method
  // the server does not have: any answer, METHOD_NOT_FOUND included, proves the
  // connection is alive; no answer within the timeout means it is not.
  _startHeartbeat(interval, timeout) {
    let inFlight = false;
    this._heartbeat = setInterval(() => {
      if (inFlight || this._closeError) return;
      inFlight = true;
      const timer = setTimeout(() => {
        this._abort(`no answer to a heartbeat within ${timeout} s`, 4000);
      }, timeout * 1000);
      const done = () => {
        inFlight = false;
        clearTimeout(timer);
      };
      this.call(HEARTBEAT_METHOD).then(done, done);
    }, interval * 1000);
  }

  /** Give up on a connection that looks dead: fail everything now, close the socket. */
  _abort(reason, code) {
    this._shutdown(new ConnectionClosed(1006, reason));
    try {
      this._ws.close(code, reason.slice(0, 120));
    } catch {
      // already closing
    }
  }

  // -- sending ---------------------------------------------------------------------

  _allocStreamId() {
    const sid = this._nextStreamId;
    this._nextStreamId += 2;
    return sid;
  }

  _isOurs(sid) {
    return sid % 2 === 1;
  }

  /** Queue a control frame (already encoded); it goes ahead of stream data. */
  _queueControl(text) {
    if (this._closeError) return;
    this._control.push(text);
    this._queuedBytes += text.length;
    this._scheduleFlush();
  }

  _queueData(text, size) {
    if (this._closeError) return;
    this._data.push([text, size]);
    this._queuedBytes += size;
    this._scheduleFlush();
  }

  _scheduleFlush() {
    if (this._flushScheduled) return;
    this._flushScheduled = true;
    soon(() => this._flush());
  }

  /** Send what is queued: all control frames first, then stream data, in batches. */
  _flush() {
    this._flushScheduled = false;
    while (this._control.length || this._data.length) {
      const parts = this._control;
      this._control = [];
      let size = 0;
      for (const text of parts) size += text.length;
      let taken = 0;
      while (taken < this._data.length && size < MAX_MESSAGE_BYTES) {
        const [text, bytes] = this._data[taken++];
        parts.push(text);
        size += bytes;
      }
      this._data = taken ? this._data.slice(taken) : this._data;
      this._queuedBytes = Math.max(0, this._queuedBytes - size);
      if (this._ws.readyState === 1) this._ws.send(`[${parts.join(",")}]`);
    }
  }

  _fault(message) {
    this.faultsSent += 1;
    this._queueControl(JSON.stringify([FAULT, ErrorCode.PROTOCOL_ERROR, message]));
  }

  /** Replace async iterables among the arguments by stream ids; start their pumps. */
  _encodeParams(args, kwargs) {
    if (!Array.isArray(args)) throw new TypeError("args must be an array");
    if (kwargs === null || typeof kwargs !== "object" || Array.isArray(kwargs)) {
      throw new TypeError("kwargs must be an object");
    }
    const streamArgs = [];
    const sids = [];
    let argsOut = args;
    let kwargsOut = kwargs;
    if (args.some(isAsyncIterable) || Object.values(kwargs).some(isAsyncIterable)) {
      argsOut = args.map((value, i) => {
        if (!isAsyncIterable(value)) return value;
        const sid = this._startPump(value);
        streamArgs.push(i);
        sids.push(sid);
        return sid;
      });
      kwargsOut = {};
      for (const [key, value] of Object.entries(kwargs)) {
        if (isAsyncIterable(value)) {
          kwargsOut[key] = this._startPump(value);
          streamArgs.push(key);
          sids.push(kwargsOut[key]);
        } else kwargsOut[key] = value;
      }
    }
    return { argsOut, kwargsOut, streamArgs, sids };
  }

  /** A call that ended will never open the streams it did not open yet: stop them. */
  _stopUnopened(sids) {
    for (const sid of sids) {
      const out = this._outgoing.get(sid);
      if (out && !out.cancelled && !out.canSend) this.abortStream(sid);
    }
  }

  _startPump(items, streamId = undefined) {
    if (!isAsyncIterable(items)) throw new TypeError("a stream must be an async iterable");
    const sid = streamId ?? this._allocStreamId();
    this._checkNew(sid);
    const out = this._takeEarly(sid);
    this._outgoing.set(sid, out);
    this._runPump(sid, out, () => items);
    return sid;
  }

  /** Send a stream's items, then its end (or error). `produce` returns the iterable. */
  async _runPump(sid, out, produce, { deadline = null, onDone } = {}) {
    const signal = out.controller.signal;
    let error = null;
    let timer = null;
    if (deadline !== null) {
      timer = setTimeout(() => out.controller.abort(deadline.error), deadline.seconds * 1000);
    }
    try {
      const items = await raceAbort(Promise.resolve().then(produce), signal);
      await this._pumpItems(sid, out, items, signal);
    } catch (exc) {
      // Aborted: the reason says why. A StreamCancel or the connection closing
      // marked the stream cancelled, and _endOutgoing then sends nothing.
      error = signal.aborted ? signal.reason : exc;
    } finally {
      clearTimeout(timer);
      this._endOutgoing(sid, error === null ? null : toRemoteError(error, this.exposeTracebacks));
      onDone?.();
    }
  }

  async _pumpItems(sid, out, items, signal) {
    if (!isAsyncIterable(items)) throw new TypeError("a stream must be an async iterable");
    const iterator = items[Symbol.asyncIterator]();
    let finished = false;
    try {
      for (;;) {
        if (out.cancelled || this._closeError) return;
        let step;
        try {
          step = await raceAbort(iterator.next(), signal);
        } catch (exc) {
          finished = !signal.aborted; // the iterator itself threw: it is over
          throw exc;
        }
        if (step.done) {
          finished = true;
          return;
        }
        if (out.cancelled || this._closeError) return;
        const text = encodeValue(step.value); // a TypeError here fails the stream
        while (!out.canSend) {
          if (out.cancelled || this._closeError) return;
          await out.waitWritable(signal);
        }
        // Hold fast producers back while the socket is slow: wait until it drains
        // below a quarter of the limit (browsers have no drain event: poll).
        if (this.bufferedAmount > this.maxBufferedAmount) {
          while (this.bufferedAmount > this.maxBufferedAmount / 4 && !this._closeError) {
            await sleep(0.01, signal);
          }
        }
        if (out.cancelled || this._closeError) return;
        const size = utf8Length(text);
        out.creditItems -= 1;
        out.creditBytes -= size;
        this._queueData(`[${STREAM_DATA},${sid},${text}]`, size);
      }
    } finally {
      // Stopped early: close the iterator so its finally blocks run. Not awaited:
      // a generator busy in an await only returns once that await settles.
      if (!finished) Promise.resolve().then(() => iterator.return?.()).catch(() => {});
    }
  }

  /** Finish an outgoing stream cleanly or with `error`; nothing if it was cancelled. */
  _endOutgoing(sid, error) {
    const out = this._outgoing.get(sid);
    if (!out) return;
    this._outgoing.delete(sid);
    if (!this._isOurs(sid)) {
      this._ended.add(sid);
      this._endedOrder.push(sid);
      if (this._endedOrder.length > this.maxStreams) this._ended.delete(this._endedOrder.shift());
    }
    if (out.cancelled || out.finished) return;
    out.finished = true;
    // StreamEnd/StreamError ride in the data queue: they must not overtake items.
    const text = error === null
      ? `[${STREAM_END},${sid}]`
      : JSON.stringify([STREAM_ERROR, sid, error.code, error.message, encodable(error.data)]);
    this._queueData(text, 0);
  }

  _checkNew(sid) {
    if (!Number.isInteger(sid) || sid <= 0 || this._incoming.has(sid) || this._outgoing.has(sid)) {
      throw new LocalProtocolError(`stream id ${sid} is invalid or already open`);
    }
    if (this._incoming.size + this._outgoing.size >= this.maxStreams) {
      throw new Overloaded(`too many open streams on this connection (max_streams=${this.maxStreams})`);
    }
  }

  _takeEarly(sid) {
    const early = this._early.get(sid);
    if (early) {
      this._early.delete(sid);
      return early;
    }
    return new Outgoing();
  }

  _earlyOutgoing(sid) {
    // Only the server's own ids can be announced before we register them; a
    // frame for one that already ended was simply in flight.
    if (this._isOurs(sid) || sid <= 0 || this._ended.has(sid)) return undefined;
    let early = this._early.get(sid);
    if (!early) {
      if (this._early.size >= this.maxStreams) {
        this._fault("too many streams announced but never opened");
        return undefined;
      }
      early = new Outgoing();
      this._early.set(sid, early);
    }
    return early;
  }

  _openIncoming(stream) {
    this._checkOpen();
    this._checkNew(stream.streamId);
    this._incoming.set(stream.streamId, stream);
    this._queueControl(
      `[${CREDIT},${stream.streamId},${stream.windowItems},${stream.windowBytes}]`,
    );
  }

  _closeIncoming(stream) {
    if (this._incoming.get(stream.streamId) !== stream) return;
    this._incoming.delete(stream.streamId);
    if (!stream._done) this._queueControl(`[${STREAM_CANCEL},${stream.streamId}]`);
  }

  // -- receiving -------------------------------------------------------------------

  _onMessage(data) {
    const text = typeof data === "string" ? data : new TextDecoder().decode(data);
    let frames;
    try {
      frames = decodeBatch(text);
    } catch (exc) {
      // The whole message is dropped: none of its frames takes effect.
      this._fault(`undecodable message: ${exc.message}`);
      return;
    }
    let sizes = null;
    for (const frame of frames) {
      if (frame[0] === STREAM_DATA) {
        sizes = streamDataSizes(text, frames);
        break;
      }
    }
    for (let i = 0; i < frames.length && !this._closeError; i++) {
      try {
        this._dispatch(frames[i], sizes?.[i] ?? 0);
      } catch (exc) {
        console.error("rpcstream: failed to handle a frame", frames[i], exc);
      }
    }
  }

  _dispatch(frame, size) {
    switch (frame[0]) {
      case STREAM_DATA: {
        const stream = this._incoming.get(frame[1]);
        // Data for a stream we closed (it was in flight) or never opened.
        if (!stream) this._queueControl(`[${STREAM_CANCEL},${frame[1]}]`);
        else stream._receive(frame[2], size);
        return;
      }
      case STREAM_END:
        this._incoming.get(frame[1])?._end(null);
        return;
      case STREAM_ERROR:
        this._incoming.get(frame[1])?._end(RemoteError.fromWire(frame[2], frame[3], frame[4] ?? null));
        return;
      case CREDIT:
        this._receiveCredit(frame[1], frame[2], frame[3]);
        return;
      case STREAM_CANCEL: {
        const sid = frame[1];
        const out = this._outgoing.get(sid) ?? this._earlyOutgoing(sid);
        if (out && !out.cancelled) {
          out.cancelled = true;
          out.controller.abort(new Cancelled(`stream ${sid}: the receiver stopped reading`));
          out.wake();
        }
        return;
      }
      case RESULT:
        this._calls.get(frame[1])?.resolve(frame[2]);
        return;
      case ERROR:
        this._calls.get(frame[1])?.reject(RemoteError.fromWire(frame[2], frame[3], frame[4] ?? null));
        return;
      case CALL:
      case NOTIFY:
      case STREAM_CALL:
        this._receiveCall(frame);
        return;
      case CANCEL:
        this._handlers.get(frame[1])?.abort(CANCELLED_BY_CALLER);
        return;
      case FAULT:
        this.faultsReceived += 1;
        console.warn(`rpcstream: the server reported a protocol fault: [${frame[1]}] ${frame[2]}`);
        return;
    }
  }

  _receiveCredit(sid, items, bytes) {
    if (items < 0 || bytes < 0) {
      this._fault(`negative credit for stream ${sid}`);
      return;
    }
    const out = this._outgoing.get(sid) ?? this._earlyOutgoing(sid);
    if (!out) return; // a stream that already finished: late credit is harmless
    const wasBlocked = out.creditItems <= 0 || out.creditBytes <= 0;
    out.creditItems += items;
    out.creditBytes += bytes;
    if (out.creditItems > MAX_CREDIT || out.creditBytes > MAX_CREDIT) {
      this._fault(`credit overflow for stream ${sid}`);
      out.creditItems = Math.min(out.creditItems, MAX_CREDIT);
      out.creditBytes = Math.min(out.creditBytes, MAX_CREDIT);
    }
    if (wasBlocked && out.creditItems > 0 && out.creditBytes > 0) out.wake();
  }

  // -- handling the server's calls -------------------------------------------------

  _receiveCall(frame) {
    const tag = frame[0];
    const method = tag === NOTIFY ? frame[1] : frame[2];
    this.callsReceived += 1;
    if (tag === STREAM_CALL) {
      // The caller allocates the id of the stream it will receive.
      const sid = frame[1];
      if (this._isOurs(sid) || sid <= 0 || this._outgoing.has(sid) || this._incoming.has(sid)) {
        this._fault(`StreamCall with a stream id of the wrong side or in use: ${sid}`);
        return;
      }
      const out = this._takeEarly(sid);
      this._outgoing.set(sid, out);
      if (this._incoming.size + this._outgoing.size > this.maxStreams) {
        this._endOutgoing(sid, new Overloaded(
          `too many open streams on this connection (max_streams=${this.maxStreams})`,
        ));
        return;
      }
    }
    const fn = lookup(this.router, method);
    let refusal = null;
    if (this._running >= this.maxConcurrentHandlers) {
      refusal = new Overloaded(
        `${this._running} handlers running (max_concurrent_handlers=${this.maxConcurrentHandlers})`,
      );
    } else if (!fn) {
      refusal = new MethodNotFound(`no method '${method}'`);
    }
    if (refusal) {
      if (tag === CALL) this._answer(frame[1], refusal);
      else if (tag === STREAM_CALL) this._endOutgoing(frame[1], refusal);
      else console.warn(`rpcstream: dropped notification '${method}': ${refusal.message}`);
      this._cancelStreamArgs(frame, new Map());
      return;
    }
    this._running += 1;
    if (tag === CALL) this._runCall(frame, fn);
    else if (tag === NOTIFY) this._runNotify(frame, fn);
    else this._runStreamCall(frame, fn);
  }

  /** Queue a Result or an Error for their call `id`. */
  _answer(id, errorOrNull, value = undefined) {
    if (errorOrNull === null) {
      this._queueControl(`[${RESULT},${id},${encodeValue(value)}]`);
    } else {
      const e = errorOrNull;
      this._queueControl(JSON.stringify([ERROR, id, e.code, e.message, encodable(e.data)]));
    }
  }

  /**
   * Convert the frame's parameters to the handler's arguments: positional
   * arguments in order, then the keyword arguments as one object when there are
   * any. Stream arguments become IncomingStreams (opened here: credit is granted
   * before the handler runs).
   */
  _bind(frame, opened) {
    const tag = frame[0];
    const method = tag === NOTIFY ? frame[1] : frame[2];
    const [args, kwargs, streamArgs] = tag === NOTIFY
      ? [frame[2], frame[3], frame[4] ?? []]
      : [frame[3], frame[4], frame[6] ?? []];
    if (!Array.isArray(args)) throw new InvalidParams(`${method}: malformed parameters: args must be an array`);
    if (kwargs === null || typeof kwargs !== "object" || Array.isArray(kwargs)) {
      throw new InvalidParams(`${method}: malformed parameters: kwargs must be a map`);
    }
    const outArgs = args.slice();
    const outKwargs = { ...kwargs };
    for (const key of streamArgs) {
      const holder = typeof key === "number" ? outArgs : outKwargs;
      if (!Object.hasOwn(holder, key)) continue;
      const sid = holder[key];
      if (!Number.isInteger(sid)) {
        throw new InvalidParams(`${method}(): stream id of '${key}' must be an integer`);
      }
      if (this._isOurs(sid)) throw new InvalidParams(`${method}: stream id ${sid} is of the wrong side`);
      let stream;
      try {
        stream = new IncomingStream(this, sid);
      } catch (exc) {
        if (exc instanceof LocalProtocolError) throw new InvalidParams(`${method}: ${exc.message}`);
        throw exc;
      }
      opened.set(sid, stream);
      holder[key] = stream;
    }
    const callArgs = Object.keys(outKwargs).length ? [...outArgs, outKwargs] : outArgs;
    return { callArgs, kwargs: outKwargs };
  }

  /** The call is over: close the stream arguments it opened; stop the ones it never did. */
  _cancelStreamArgs(frame, opened) {
    const tag = frame[0];
    const [args, kwargs, streamArgs] = tag === NOTIFY
      ? [frame[2], frame[3], frame[4] ?? []]
      : [frame[3], frame[4], frame[6] ?? []];
    if (!streamArgs.length) return;
    for (const stream of opened.values()) stream.close();
    for (const key of streamArgs) {
      const holder = typeof key === "number" ? args : kwargs;
      const sid = holder && typeof holder === "object" ? holder[key] : undefined;
      if (Number.isInteger(sid) && !opened.has(sid)) this._queueControl(`[${STREAM_CANCEL},${sid}]`);
    }
  }

  _context(method, kwargs, signal, timeout) {
    // `this` inside a handler (not an arrow function).
    return { peer: this, method, kwargs, signal, timeout };
  }

  async _runCall(frame, fn) {
    const [, id, method, , , timeout = null] = frame;
    const controller = new AbortController();
    this._handlers.set(id, controller);
    const opened = new Map();
    let timer = null;
    let answer = null; // [error, value]
    try {
      const { callArgs, kwargs } = this._bind(frame, opened);
      if (isAsyncGeneratorFunction(fn)) {
        throw new MethodNotFound(`'${method}' streams its result: call it with stream()`);
      }
      if (timeout !== null) {
        timer = setTimeout(() => controller.abort(
          new DeadlineExceeded(`${method}: deadline of ${timeout} s exceeded`),
        ), Math.max(0, timeout) * 1000);
      }
      const ctx = this._context(method, kwargs, controller.signal, timeout);
      const result = await raceAbort(
        Promise.resolve().then(() => fn.apply(ctx, callArgs)),
        controller.signal,
      );
      if (isAsyncIterable(result)) {
        throw new MethodNotFound(`'${method}' streams its result: call it with stream()`);
      }
      try {
        encodeValue(result);
      } catch (exc) {
        throw new InternalError(`${method}: result cannot be encoded: ${exc.message}`);
      }
      answer = [null, result];
    } catch (exc) {
      if (!controller.signal.aborted) {
        answer = [toRemoteError(exc, this.exposeTracebacks), undefined];
      } else if (controller.signal.reason instanceof DeadlineExceeded) {
        answer = [controller.signal.reason, undefined];
      } // else cancelled by the caller or by the connection closing: no answer at all
    } finally {
      clearTimeout(timer);
      this._handlers.delete(id);
      this._running -= 1;
      if (answer && !this._closeError) this._answer(id, answer[0], answer[1]);
      this._cancelStreamArgs(frame, opened);
    }
  }

  async _runNotify(frame, fn) {
    const controller = new AbortController();
    const opened = new Map();
    const closed = () => controller.abort(this._closeError);
    this.addEventListener("close", closed);
    try {
      const { callArgs, kwargs } = this._bind(frame, opened);
      const ctx = this._context(frame[1], kwargs, controller.signal, null);
      await fn.apply(ctx, callArgs);
    } catch (exc) {
      console.error(`rpcstream: notification handler '${frame[1]}' failed`, exc);
    } finally {
      this.removeEventListener("close", closed);
      this._running -= 1;
      this._cancelStreamArgs(frame, opened);
    }
  }

  _runStreamCall(frame, fn) {
    const [, sid, method, , , timeout = null] = frame;
    const out = this._outgoing.get(sid);
    const opened = new Map();
    const deadline = timeout === null ? null : {
      seconds: Math.max(0, timeout),
      error: new DeadlineExceeded(`${method}: deadline of ${timeout} s exceeded`),
    };
    const produce = async () => {
      const { callArgs, kwargs } = this._bind(frame, opened);
      const ctx = this._context(method, kwargs, out.controller.signal, timeout);
      if (isAsyncGeneratorFunction(fn)) return fn.apply(ctx, callArgs);
      const items = await fn.apply(ctx, callArgs);
      if (!isAsyncIterable(items)) {
        throw new MethodNotFound(`'${method}' does not stream: call it with call()`);
      }
      return items;
    };
    this._runPump(sid, out, produce, {
      deadline,
      onDone: () => {
        this._running -= 1;
        this._cancelStreamArgs(frame, opened);
      },
    });
  }
}

// The abort reason of a handler whose caller sent Cancel: it answers nothing.
const CANCELLED_BY_CALLER = new Cancelled("the caller cancelled the call");

// ---------------------------------------------------------------------------------
// connect()
// ---------------------------------------------------------------------------------

/**
 * Open a WebSocket to an rpcstream server and resolve with its Peer.
 *
 * `url` may be ws(s)://, http(s):// or relative to the page. Options: `token`
 * (sent as ?access_token=), `router` (the methods the server may call: an
 * object or a Map of name -> async function or async generator function),
 * `windowItems`, `windowBytes`, `maxConcurrentHandlers`, `maxStreams`,
 * `maxBufferedAmount`, `pingInterval`/`pingTimeout` (heartbeat, seconds;
 * null turns it off), `openTimeout` (seconds), `signal`.
 */
export function connect(url, options = {}) {
  const { token, openTimeout = 10, signal } = options;
  const shown = safeUrl(url);
  return new Promise((resolve, reject) => {
    if (signal?.aborted) throw signal.reason;
    const ws = new WebSocket(socketUrl(url, token), [SUBPROTOCOL]);
    let timer = null;
    const fail = (error) => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
      ws.onopen = ws.onclose = ws.onerror = null;
      try {
        ws.close();
      } catch {
        // not open yet
      }
      reject(error);
    };
    const onAbort = () => fail(signal.reason);
    signal?.addEventListener("abort", onAbort, { once: true });
    if (openTimeout) {
      timer = setTimeout(
        () => fail(new ConnectionClosed(1006, `cannot connect to ${shown}: no answer within ${openTimeout} s`)),
        openTimeout * 1000,
      );
    }
    // A refused handshake (HTTP 401, say) looks like any network failure to a
    // page: browsers do not expose the status. Both end here with code 1006.
    ws.onclose = (event) => {
      fail(new ConnectionClosed(event.code || 1006, `cannot connect to ${shown}${event.reason ? ": " + event.reason : ""}`));
    };
    ws.onerror = () => {};
    ws.onopen = () => {
      if (ws.protocol !== SUBPROTOCOL) {
        fail(new ConnectionClosed(1002, `server did not accept ${SUBPROTOCOL}`));
        return;
      }
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
      resolve(new Peer(ws, { ...options, url: shown }));
    };
  });
}

// ---------------------------------------------------------------------------------
// RunClient
// ---------------------------------------------------------------------------------

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
 * Calls are not retried (runs.start is not idempotent): a call in flight when
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

  /** Start a run of `flow`; resolves with its id. */
  async start(flow, params = {}, options = {}) {
    const run = await this.call("runs.start", [flow, params ?? {}], {}, options);
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
    for (let first = true; ; first = false) {
      if (this._closed) return;
      let peer;
      try {
        peer = await raceAbort(this.client.peer({ wait: true }), this._stop.signal);
      } catch (exc) {
        if (this._closed) return;
        throw exc; // ReconnectFailed, or the RunClient was closed
      }
      if (!first) {
        this.resumes += 1;
        this.client.dispatchEvent(new CustomEvent("resume", {
          detail: { runId: this.runId, after: this.lastEventId },
        }));
      }
      try {
        this._stream = peer.stream(
          "runs.subscribe", [this.runId], { after: this.lastEventId }, this._streamOptions,
        );
        for await (const event of this._stream) {
          this.lastEventId = event.id;
          yield event;
          if (TERMINAL_TYPES.has(event.type)) return;
        }
        return; // the run had ended before `after`: nothing more will come
      } catch (exc) {
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

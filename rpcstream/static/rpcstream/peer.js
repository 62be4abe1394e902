// peer.js: one end of an rpcstream connection, and connect().
//
// The Peer is the page's side of the connection: it sends calls and streams,
// decodes every message and dispatches its frames, and fails everything at once
// when the connection ends. Two parts work for it: its StreamTable
// (streams.js: every open stream, both directions) and its Callee (callee.js:
// the handlers of the server's calls). Outgoing frames wait in two queues,
// control frames ahead of stream data, and leave in one message per task.

import { ConnectionClosed, DeadlineExceeded, ErrorCode, RemoteError } from "./errors.js";
import {
  Admission, DEFAULT_MAX_CONCURRENT_HANDLERS, DEFAULT_MAX_WAITING_CALLS, Ticket,
} from "./admission.js";
import { decodeBatch, streamDataSizes } from "./codec.js";
import { Callee } from "./callee.js";
import {
  FrameTag, HEARTBEAT_METHOD, MAX_MESSAGE_BYTES, SETTINGS_METHOD, SUBPROTOCOL,
} from "./protocol.js";
import { IncomingStream, StreamTable } from "./streams.js";
import { checkCall, deferred, safeUrl, socketUrl, soon } from "./util.js";

const { CALL, CANCEL, CREDIT, ERROR, FAULT, NOTIFY, RESULT, STREAM_CALL } = FrameTag;
const { STREAM_CANCEL, STREAM_DATA, STREAM_END, STREAM_ERROR } = FrameTag;

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
    this.maxConcurrentHandlers = options.maxConcurrentHandlers ?? DEFAULT_MAX_CONCURRENT_HANDLERS;
    this.maxStreams = options.maxStreams ?? 4096;
    // How far the windows of the streams this page receives may grow, and the
    // budget all of them draw from (windows.js; Python's defaults).
    this.maxWindowItems = options.maxWindowItems ?? 16384;
    this.maxWindowBytes = options.maxWindowBytes ?? 16 * 1024 * 1024;
    this.maxReceiveBuffer = options.maxReceiveBuffer ?? 32 * 1024 * 1024;
    this.maxBufferedAmount = options.maxBufferedAmount ?? 1024 * 1024;
    this.exposeErrors = options.exposeErrors ?? false;
    if (!(this.windowItems >= 1 && this.windowBytes >= 1)) {
      throw new RangeError("stream windows must allow at least one item and one byte");
    }
    if (!(this.maxReceiveBuffer >= 2 * this.maxStreams)) {
      throw new RangeError("maxReceiveBuffer must allow two bytes per stream (maxStreams)");
    }
    this._ws = ws;
    this._nextCallId = 1;
    this._calls = new Map(); // our call id -> pending call
    this._streams = new StreamTable(this);
    this._callee = new Callee(this);
    // Two queues, as rpcstream/protocol/outbox.py: control frames go ahead of stream data.
    this._control = [];
    this._data = []; // [text, payload bytes]
    this._queuedBytes = 0;
    this._flushScheduled = false;
    this._closeError = null;
    this._closedPromise = deferred();
    /** Resolves (never rejects) with the ConnectionClosed when the connection ends. */
    this.closed = this._closedPromise.promise;
    this.faultsReceived = 0;
    this.faultsSent = 0;
    this.callsReceived = 0;
    // Slots for our calls on the server (admission.js).
    this._admission = new Admission(options.maxWaitingCalls ?? DEFAULT_MAX_WAITING_CALLS);

    ws.binaryType = "arraybuffer";
    ws.onmessage = (event) => this._onMessage(event.data);
    ws.onclose = (event) => {
      this._shutdown(new ConnectionClosed(event.code || 1006, event.reason || ""));
    };
    ws.onerror = () => {}; // a close event always follows

    // Our limits go first, as the Python peer's do (rpcstream/peer/admission.py).
    const limits = { max_concurrent_handlers: this.maxConcurrentHandlers };
    this._queueControl(JSON.stringify([NOTIFY, SETTINGS_METHOD, [], limits, []]));

    const interval = options.pingInterval === undefined ? 20 : options.pingInterval;
    const timeout = options.pingTimeout === undefined ? 20 : options.pingTimeout;
    if (interval) this._startHeartbeat(interval, timeout ?? interval);
  }

  /** The server's max_concurrent_handlers, as it advertised (256 until it does). */
  get remoteMaxConcurrentHandlers() {
    return this._admission.limit;
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
      waitingCalls: this._admission.waiting,
      runningHandlers: this._callee.running,
      streams: this._streams.size,
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
   * streams. Beyond the server's advertised max_concurrent_handlers the call
   * first waits for a slot, its timeout and signal counting (admission.js).
   */
  call(method, args = [], kwargs = {}, { timeout = null, signal } = {}) {
    return new Promise((resolve, reject) => {
      this._checkOpen();
      checkCall(method, timeout);
      if (signal?.aborted) throw signal.reason;
      const started = performance.now();
      let id = 0; // the call's id once its Call is queued
      let sids = [];
      let timer = null;
      let onAbort = null;
      let settled = false;
      // Every way out: stop the timer, forget the call, give its slot back.
      const settle = () => {
        settled = true;
        clearTimeout(timer);
        if (onAbort) signal.removeEventListener("abort", onAbort);
        if (id) this._calls.delete(id);
        ticket?.done();
      };
      const fail = (error) => {
        if (settled) return;
        settle();
        this._streams.stopUnopened(sids);
        reject(error);
      };
      // Our side gave up (deadline, abort): tell the callee first, so that the
      // Call our slot goes to next reaches it after the Cancel that frees it.
      const giveUp = (error) => {
        if (settled) return;
        if (id) this._queueControl(`[${CANCEL},${id}]`);
        fail(error);
      };
      const send = () => {
        const params = this._streams.encodeParams(args, kwargs);
        const { argsOut, kwargsOut, streamArgs } = params;
        // Time spent waiting for a slot counts against the deadline the server gets.
        const left = remaining(timeout, started, waited);
        const callId = this._nextCallId++;
        let text;
        try {
          text = JSON.stringify([CALL, callId, method, argsOut, kwargsOut, left, streamArgs]);
        } catch (exc) {
          for (const sid of params.sids) this._streams.abort(sid);
          throw new TypeError(`parameters cannot be encoded: ${exc.message}`);
        }
        id = callId;
        sids = params.sids;
        const answered = (value) => {
          if (settled) return;
          settle();
          resolve(value);
        };
        this._calls.set(id, { method, resolve: answered, reject: fail });
        this._queueControl(text);
      };
      const start = () => {
        try {
          send();
        } catch (exc) {
          fail(exc);
        }
      };
      if (timeout !== null && timeout !== undefined) {
        timer = setTimeout(() => giveUp(new DeadlineExceeded(id
          ? `${method}: no answer within ${timeout} s`
          : `${method}: no handler slot on the server within ${timeout} s`,
        )), Math.max(0, timeout) * 1000);
      }
      if (signal) {
        onAbort = () => giveUp(signal.reason);
        signal.addEventListener("abort", onAbort, { once: true });
      }
      // The heartbeat takes no slot: the server answers it without a handler.
      let waited = false;
      const ticket = method === HEARTBEAT_METHOD ? null : new Ticket(start, fail);
      if (ticket === null) start();
      else {
        this._admission.enter(ticket);
        waited = ticket.waiting;
      }
    });
  }

  /** Call `method` without an answer (errors are only logged by the server). */
  notify(method, args = [], kwargs = {}) {
    this._checkOpen();
    checkCall(method, null);
    const { argsOut, kwargsOut, streamArgs, sids } = this._streams.encodeParams(args, kwargs);
    let text;
    try {
      text = JSON.stringify([NOTIFY, method, argsOut, kwargsOut, streamArgs]);
    } catch (exc) {
      for (const sid of sids) this._streams.abort(sid);
      throw new TypeError(`parameters cannot be encoded: ${exc.message}`);
    }
    this._queueControl(text);
  }

  /**
   * Call a streaming method; iterate the result with `for await`.
   *
   * Options: `timeout` (bounds the whole stream), `signal`, `windowItems`,
   * `windowBytes` (the credit this stream grants). Beyond the server's limit it
   * waits for a slot before the StreamCall leaves, as call() does.
   */
  stream(method, args = [], kwargs = {}, options = {}) {
    this._checkOpen();
    checkCall(method, options.timeout);
    if (!((options.windowItems ?? this.windowItems) >= 1 &&
          (options.windowBytes ?? this.windowBytes) >= 1)) {
      throw new RangeError("stream windows must allow at least one item and one byte");
    }
    const sid = this._streams.allocId();
    const timeout = options.timeout ?? null;
    const started = performance.now();
    const send = (waited) => {
      this._streams.checkNew(sid);
      const { argsOut, kwargsOut, streamArgs, sids } = this._streams.encodeParams(args, kwargs);
      const left = remaining(timeout, started, waited);
      let text;
      try {
        text = JSON.stringify([STREAM_CALL, sid, method, argsOut, kwargsOut, left, streamArgs]);
      } catch (exc) {
        for (const s of sids) this._streams.abort(s);
        throw new TypeError(`parameters cannot be encoded: ${exc.message}`);
      }
      // The StreamCall, then the Credit that opens the stream (queued by the
      // IncomingStream): both leave in the same message.
      this._queueControl(text);
    };
    let stream = null;
    let refused = null;
    const ticket = new Ticket(() => {
      if (stream === null) {
        send(false); // a slot was free: errors reach the caller now
        return;
      }
      try {
        send(true);
        stream._start();
      } catch (exc) {
        stream._end(exc);
      }
    }, (error) => {
      if (stream === null) refused = error;
      else stream._end(error);
    });
    try {
      this._admission.enter(ticket);
    } catch (exc) {
      ticket.done();
      throw exc;
    }
    if (refused) throw refused;
    // Beyond the server's limit the stream waits for a slot (its deadline and
    // signal count meanwhile); it gives the slot back once it is done.
    stream = new IncomingStream(this, sid, options, {
      started: ticket.held,
      onDone: () => ticket.done(),
    });
    return stream;
  }

  // -- raw streams -----------------------------------------------------------------

  /**
   * Send `items` (an async iterable) as a stream, in the background; return its
   * id. Without `streamId` one is allocated: tell the receiver by a call.
   */
  sendStream(items, streamId = undefined) {
    this._checkOpen();
    return this._streams.startPump(items, streamId);
  }

  /**
   * Open a stream to receive: the id the server allocated, or a new one to hand
   * to the server. Returns the IncomingStream (its id is `.streamId`).
   */
  receiveStream(streamId = undefined, options = {}) {
    this._checkOpen();
    const sid = streamId ?? this._streams.allocId();
    return new IncomingStream(this, sid, options);
  }

  /** Sender side: stop an outgoing stream; its receiver gets Cancelled. */
  abortStream(streamId) {
    this._streams.abort(streamId);
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
    // First, so that the slots the failing calls give back go to nobody.
    this._admission.close(error);
    for (const pending of [...this._calls.values()]) {
      pending.reject(new ConnectionClosed(error.code, error.reason));
    }
    this._streams.closeAll(error);
    this._callee.abortAll(error);
    this._closedPromise.resolve(error);
    this.dispatchEvent(new CustomEvent("close", { detail: error }));
  }

  // -- heartbeat -------------------------------------------------------------------

  // Browsers answer the server's WebSocket pings but cannot send their own, so a
  // dead network would only be noticed when TCP gives up. Instead, call the
  // reserved method rpcstream.ping, which servers answer at once: any answer
  // (METHOD_NOT_FOUND from an older server included) proves the connection is
  // alive; no answer within the timeout means it is not.
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
        const stream = this._streams.incoming.get(frame[1]);
        // Data for a stream we closed (it was in flight) or never opened.
        if (!stream) this._queueControl(`[${STREAM_CANCEL},${frame[1]}]`);
        else stream._receive(frame[2], size);
        return;
      }
      case STREAM_END:
        this._streams.incoming.get(frame[1])?._end(null);
        return;
      case STREAM_ERROR:
        this._streams.incoming.get(frame[1])?._end(
          RemoteError.fromWire(frame[2], frame[3], frame[4] ?? null),
        );
        return;
      case CREDIT:
        this._streams.receiveCredit(frame[1], frame[2], frame[3]);
        return;
      case STREAM_CANCEL:
        this._streams.receiveCancel(frame[1]);
        return;
      case RESULT:
        this._calls.get(frame[1])?.resolve(frame[2]);
        return;
      case ERROR:
        this._calls.get(frame[1])?.reject(RemoteError.fromWire(frame[2], frame[3], frame[4] ?? null));
        return;
      case CALL:
      case NOTIFY:
      case STREAM_CALL:
        this._callee.receive(frame);
        return;
      case CANCEL:
        this._callee.cancel(frame[1]);
        return;
      case FAULT:
        this.faultsReceived += 1;
        console.warn(`rpcstream: the server reported a protocol fault: [${frame[1]}] ${frame[2]}`);
        return;
    }
  }
}

/** The seconds of `timeout` left since `started` (performance.now()), if it `waited`. */
function remaining(timeout, started, waited) {
  if (timeout === null || timeout === undefined) return null;
  if (!waited) return timeout;
  return Math.max(0, timeout - (performance.now() - started) / 1000);
}

/**
 * Open a WebSocket to an rpcstream server and resolve with its Peer.
 *
 * `url` may be ws(s)://, http(s):// or relative to the page. Options: `token`
 * (sent as ?access_token=), `router` (the methods the server may call: an
 * object or a Map of name -> async function or async generator function),
 * `windowItems`, `windowBytes`, `maxWindowItems`, `maxWindowBytes`,
 * `maxReceiveBuffer`, `maxConcurrentHandlers`, `maxStreams`,
 * `maxBufferedAmount`, `pingInterval`/`pingTimeout` (heartbeat, seconds;
 * null turns it off), `openTimeout` (seconds), `signal`. Options it refuses
 * reject with a RangeError.
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
      let peer;
      try {
        peer = new Peer(ws, { ...options, url: shown });
      } catch (error) {
        fail(error); // options it refuses (a RangeError): a rejection, not a hang
        return;
      }
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
      resolve(peer);
    };
  });
}

// streams.js: credit-controlled streams, both directions (docs/protocol.md,
// section 7). An IncomingStream is what this side receives, an Outgoing what it
// sends, and a StreamTable every open stream of one connection by id. The Peer
// owns one StreamTable; streams reach the connection only through the peer's
// queues (_queueControl, _queueData) and its state (_closeError, bufferedAmount).

import {
  Cancelled, DeadlineExceeded, LocalProtocolError, Overloaded, ProtocolViolation, toRemoteError,
} from "./errors.js";
import { encodable, encodeValue, utf8Length } from "./codec.js";
import { FrameTag, MAX_CREDIT } from "./protocol.js";
import { isAsyncIterable, raceAbort, sleep } from "./util.js";
import { Pace, RoundTrip, grown, now, shrunk } from "./windows.js";

const { CREDIT, STREAM_CANCEL, STREAM_DATA, STREAM_END, STREAM_ERROR } = FrameTag;


/**
 * The items of a stream this side receives: an async iterator.
 *
 * The receiver opens the stream with a window of credit and re-grants what its
 * consumer has taken once half a window is consumed (protocol.md, section 7).
 * So the buffer never holds more than the window plus one item: a page that
 * reads slowly holds the sender back instead of growing memory. The window
 * grows while it is what holds a fast stream back, as Python's (windows.js):
 * `windowItems` and `windowBytes` are what it holds now. Breaking out of
 * `for await` (which calls return()) tells the sender to stop.
 */
export class IncomingStream {
  // The last argument is for a stream call's result (peer.js): `started` is false
  // while it waits for a handler slot on the server, and `onDone` runs once it is
  // over, to give the slot back or stop waiting (admission.js).
  constructor(peer, streamId, { windowItems, windowBytes, timeout = null, signal } = {},
    { started = true, onDone = null } = {}) {
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
    this._creditBytes = this.windowBytes; // set again when it opens (the budget may cut it)
    this._wantedBytes = this.windowBytes; // its own byte window, which the budget may cut
    this._grown = 0; // bytes of window above the floor, drawn from the connection's pool
    this._pace = new Pace(0); // how its items come, for its windows' growth
    this._consumedItems = 0; // taken since the last Credit we sent
    this._consumedBytes = 0;
    this._done = false; // no more frames will be accepted (ended, failed, closed)
    this._error = null;
    this._open = true; // the consumer has not closed it
    this._waiter = null;
    this._last = Promise.resolve(); // next() calls run one after the other
    this.maxBuffered = 0; // the most items this stream ever held at once
    this._started = started;
    this._onDone = onDone;
    if (started) peer._streams.openIncoming(this); // checks the id, grants the first credit
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
      if (!this._done) this._pace.waiting(now());
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
      // Re-grant what was consumed once half a window is, as the Python StreamTable's pop_item (rpcstream/protocol/streams.py).
      this._consumedItems += 1;
      this._consumedBytes += size;
      if (this._consumedItems * 2 >= this.windowItems ||
          this._consumedBytes * 2 >= this.windowBytes) {
        this.peer._streams.grant(this);
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
    this.peer._streams.closeIncoming(this);
    this._settle();
    this._wake();
  }

  /** A handler slot on the server is ours now: open the stream (the first credit). */
  _start() {
    this._started = true;
    this.peer._streams.openIncoming(this);
  }

  /** Over (ended, failed, closed): its slot goes back, or it stops waiting for one. */
  _settle() {
    const onDone = this._onDone;
    this._onDone = null;
    onDone?.();
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
    if (this._pace.probeAt !== null) this._pace.arrived(now(), size, this.peer._streams.rtt);
    this._creditItems -= 1;
    this._creditBytes -= size;
    this._items.push([value, size]);
    if (this.buffered === 1) this._pace.came(now());
    if (this.buffered > this.maxBuffered) this.maxBuffered = this.buffered;
    this._wake();
  }

  _end(error = null) {
    if (this._done) return;
    this._done = true;
    this._error = error;
    clearTimeout(this._timer);
    this._settle();
    this._wake();
  }

  /** Fail locally; the items that arrived before the failure are still delivered. */
  _fail(error, cancelSender) {
    if (this._done || !this._open) return;
    if (cancelSender && this._started) {
      this.peer._queueControl(`[${STREAM_CANCEL},${this.streamId}]`);
    }
    this._end(error);
  }
}

/**
 * A stream this side sends: the credit its receiver granted, and the pump that
 * sends items while that credit lasts.
 */
export class Outgoing {
  constructor(peer, streamId) {
    this.peer = peer;
    this.streamId = streamId;
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

  /** Nothing more may be sent: the receiver cancelled, or the connection is gone. */
  get stopped() {
    return this.cancelled || this.peer.isClosed;
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

  /**
   * Send the items of the async iterable `produce()` returns (or resolves to),
   * then the stream's end, or its error. `deadline` ({seconds, error}) bounds it;
   * `onDone` runs once it is over.
   */
  async run(produce, { deadline = null, onDone } = {}) {
    const signal = this.controller.signal;
    let error = null;
    let timer = null;
    if (deadline !== null) {
      timer = setTimeout(() => this.controller.abort(deadline.error), deadline.seconds * 1000);
    }
    try {
      const items = await raceAbort(Promise.resolve().then(produce), signal);
      await this._pump(items, signal);
    } catch (exc) {
      // Aborted: the reason says why. A StreamCancel or the connection closing
      // marked the stream cancelled, and endOutgoing then sends nothing.
      error = signal.aborted ? signal.reason : exc;
    } finally {
      clearTimeout(timer);
      const remote = error === null ? null : toRemoteError(error, this.peer.exposeErrors);
      this.peer._streams.endOutgoing(this.streamId, remote);
      onDone?.();
    }
  }

  async _pump(items, signal) {
    if (!isAsyncIterable(items)) throw new TypeError("a stream must be an async iterable");
    const peer = this.peer;
    const iterator = items[Symbol.asyncIterator]();
    let finished = false;
    try {
      for (;;) {
        if (this.stopped) return;
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
        if (this.stopped) return;
        const text = encodeValue(step.value); // a TypeError here fails the stream
        while (!this.canSend) {
          if (this.stopped) return;
          await this.waitWritable(signal);
        }
        // Hold fast producers back while the socket is slow: wait until it drains
        // below a quarter of the limit (browsers have no drain event: poll).
        if (peer.bufferedAmount > peer.maxBufferedAmount) {
          while (peer.bufferedAmount > peer.maxBufferedAmount / 4 && !peer.isClosed) {
            await sleep(0.01, signal);
          }
        }
        if (this.stopped) return;
        const size = utf8Length(text);
        this.creditItems -= 1;
        this.creditBytes -= size;
        peer._queueData(`[${STREAM_DATA},${this.streamId},${text}]`, size);
      }
    } finally {
      // Stopped early: close the iterator so its finally blocks run. Not awaited:
      // a generator busy in an await only returns once that await settles.
      if (!finished) Promise.resolve().then(() => iterator.return?.()).catch(() => {});
    }
  }
}

/**
 * Every open stream of one connection, both directions, by id.
 *
 * This side (the connecting one) allocates odd ids, the server even ones. A
 * Credit or StreamCancel may arrive for an id the server allocated before this
 * side registered the stream (a raw stream announced by a call): it waits in
 * `_early`, bounded by maxStreams, until the stream opens.
 */
export class StreamTable {
  constructor(peer) {
    this.peer = peer;
    this.incoming = new Map(); // stream id -> IncomingStream
    this.outgoing = new Map(); // stream id -> Outgoing
    this._early = new Map(); // server-allocated stream id -> Outgoing not yet opened
    this._ended = new Set(); // server-allocated ids of outgoing streams that ended
    this._endedOrder = [];
    this._nextId = 1; // the connecting side allocates odd stream ids
    this.rtt = new RoundTrip(); // measured from credit (windows.js)
    // The receive budget, as Python's StreamTable: a floor for each possible
    // stream, the rest a pool that windows above their floors draw from.
    const budget = peer.maxReceiveBuffer;
    this.floorBytes = Math.max(1, Math.min(peer.windowBytes, Math.floor(budget / (2 * peer.maxStreams))));
    this.poolLeft = budget - this.floorBytes * peer.maxStreams;
  }

  /** How many streams are open, both directions. */
  get size() {
    return this.incoming.size + this.outgoing.size;
  }

  allocId() {
    const sid = this._nextId;
    this._nextId += 2;
    return sid;
  }

  isOurs(sid) {
    return sid % 2 === 1;
  }

  /** Throw unless a stream `sid` may open now. */
  checkNew(sid) {
    if (!Number.isInteger(sid) || sid <= 0 || this.incoming.has(sid) || this.outgoing.has(sid)) {
      throw new LocalProtocolError(`stream id ${sid} is invalid or already open`);
    }
    if (this.size >= this.peer.maxStreams) {
      throw new Overloaded(
        `too many open streams on this connection (max_streams=${this.peer.maxStreams})`,
      );
    }
  }

  openIncoming(stream) {
    this.peer._checkOpen();
    this.checkNew(stream.streamId);
    this.incoming.set(stream.streamId, stream);
    stream.windowBytes = Math.min(stream._wantedBytes, this.floorBytes);
    this._draw(stream, stream._wantedBytes - stream.windowBytes);
    stream._creditBytes = stream.windowBytes;
    stream._pace.grantedAt = now();
    this.peer._queueControl(
      `[${CREDIT},${stream.streamId},${stream.windowItems},${stream.windowBytes}]`,
    );
  }

  /** Grant back what `stream`'s consumer took; grow the windows that hold it back. */
  grant(stream) {
    const t = now();
    const pace = stream._pace;
    const consumedItems = stream._consumedItems;
    const consumedBytes = stream._consumedBytes;
    let grantBytes = consumedBytes;
    let grantItems = consumedItems;
    const perRtt = pace.growth(t, this.rtt.seconds);
    if (perRtt !== null) { // the window holds the stream back: it grows
      const peer = this.peer;
      if (consumedBytes * 2 >= stream.windowBytes) {
        const want = grown(stream.windowBytes, consumedBytes, perRtt, peer.maxWindowBytes);
        grantBytes += this._draw(stream, want - stream.windowBytes);
      }
      if (consumedItems * 2 >= stream.windowItems) {
        const want = grown(stream.windowItems, consumedItems, perRtt, peer.maxWindowItems);
        grantItems += want - stream.windowItems;
        stream.windowItems = want;
      }
    }
    if (stream.windowBytes < stream._wantedBytes) { // cut by the budget: grow back
      grantBytes += this._draw(stream, stream._wantedBytes - stream.windowBytes);
    } else if (pace.lags(t, this.rtt.seconds)) { // a consumer that lags: narrow it back
      grantBytes += this._draw(stream, -shrunk(stream.windowBytes, stream._wantedBytes, grantBytes));
    }
    pace.granted(t, stream._creditBytes, stream._creditItems);
    stream._creditItems += grantItems;
    stream._creditBytes += grantBytes;
    this.peer._queueControl(`[${CREDIT},${stream.streamId},${grantItems},${grantBytes}]`);
    stream._consumedItems = stream._consumedBytes = 0;
  }

  /** Widen a stream's byte window by up to `want` bytes from the pool (narrow it if negative). */
  _draw(stream, want) {
    const extra = Math.min(want, this.poolLeft);
    stream.windowBytes += extra;
    stream._grown += extra;
    this.poolLeft -= extra;
    return extra;
  }

  closeIncoming(stream) {
    if (this.incoming.get(stream.streamId) !== stream) return;
    this.incoming.delete(stream.streamId);
    this.poolLeft += stream._grown;
    if (!stream._done) this.peer._queueControl(`[${STREAM_CANCEL},${stream.streamId}]`);
  }

  /** Register an outgoing stream, with any credit (or cancel) that came early. */
  openOutgoing(sid) {
    let out = this._early.get(sid);
    if (out) this._early.delete(sid);
    else out = new Outgoing(this.peer, sid);
    this.outgoing.set(sid, out);
    return out;
  }

  /** Send `items` (an async iterable) in the background as `streamId` (or a new id). */
  startPump(items, streamId = undefined) {
    if (!isAsyncIterable(items)) throw new TypeError("a stream must be an async iterable");
    const sid = streamId ?? this.allocId();
    this.checkNew(sid);
    this.openOutgoing(sid).run(() => items);
    return sid;
  }

  /** Sender side: stop outgoing stream `sid`; its receiver gets Cancelled. */
  abort(sid) {
    this.outgoing.get(sid)?.controller.abort(new Cancelled(`stream ${sid}: the sender stopped`));
  }

  /** Replace async iterables among the arguments by stream ids; start their pumps. */
  encodeParams(args, kwargs) {
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
        const sid = this.startPump(value);
        streamArgs.push(i);
        sids.push(sid);
        return sid;
      });
      kwargsOut = {};
      for (const [key, value] of Object.entries(kwargs)) {
        if (isAsyncIterable(value)) {
          kwargsOut[key] = this.startPump(value);
          streamArgs.push(key);
          sids.push(kwargsOut[key]);
        } else kwargsOut[key] = value;
      }
    }
    return { argsOut, kwargsOut, streamArgs, sids };
  }

  /** A call that ended will never open the streams it did not open yet: stop them. */
  stopUnopened(sids) {
    for (const sid of sids) {
      const out = this.outgoing.get(sid);
      if (out && !out.cancelled && !out.canSend) this.abort(sid);
    }
  }

  /** Finish an outgoing stream cleanly or with `error`; nothing if it was cancelled. */
  endOutgoing(sid, error) {
    const out = this.outgoing.get(sid);
    if (!out) return;
    this.outgoing.delete(sid);
    if (!this.isOurs(sid)) {
      this._ended.add(sid);
      this._endedOrder.push(sid);
      if (this._endedOrder.length > this.peer.maxStreams) {
        this._ended.delete(this._endedOrder.shift());
      }
    }
    if (out.cancelled || out.finished) return;
    out.finished = true;
    // StreamEnd/StreamError ride in the data queue: they must not overtake items.
    const text = error === null
      ? `[${STREAM_END},${sid}]`
      : JSON.stringify([STREAM_ERROR, sid, error.code, error.message, encodable(error.data)]);
    this.peer._queueData(text, 0);
  }

  _earlyOutgoing(sid) {
    // Only the server's own ids can be announced before we register them; a
    // frame for one that already ended was simply in flight.
    if (this.isOurs(sid) || sid <= 0 || this._ended.has(sid)) return undefined;
    let early = this._early.get(sid);
    if (!early) {
      if (this._early.size >= this.peer.maxStreams) {
        this.peer._fault("too many streams announced but never opened");
        return undefined;
      }
      early = new Outgoing(this.peer, sid);
      this._early.set(sid, early);
    }
    return early;
  }

  /** A Credit frame: the receiver of stream `sid` grants `items` and `bytes` more. */
  receiveCredit(sid, items, bytes) {
    if (items < 0 || bytes < 0) {
      this.peer._fault(`negative credit for stream ${sid}`);
      return;
    }
    const out = this.outgoing.get(sid) ?? this._earlyOutgoing(sid);
    if (!out) return; // a stream that already finished: late credit is harmless
    const wasBlocked = out.creditItems <= 0 || out.creditBytes <= 0;
    out.creditItems += items;
    out.creditBytes += bytes;
    if (out.creditItems > MAX_CREDIT || out.creditBytes > MAX_CREDIT) {
      this.peer._fault(`credit overflow for stream ${sid}`);
      out.creditItems = Math.min(out.creditItems, MAX_CREDIT);
      out.creditBytes = Math.min(out.creditBytes, MAX_CREDIT);
    }
    if (wasBlocked && out.creditItems > 0 && out.creditBytes > 0) out.wake();
  }

  /** A StreamCancel frame: the receiver of stream `sid` stopped reading. */
  receiveCancel(sid) {
    const out = this.outgoing.get(sid) ?? this._earlyOutgoing(sid);
    if (out && !out.cancelled) {
      out.cancelled = true;
      out.controller.abort(new Cancelled(`stream ${sid}: the receiver stopped reading`));
      out.wake();
    }
  }

  /** The connection is gone: every stream ends with `error`; nothing more is sent. */
  closeAll(error) {
    for (const stream of this.incoming.values()) stream._end(error);
    for (const out of this.outgoing.values()) {
      out.cancelled = true; // not even StreamEnd
      out.controller.abort(error);
      out.wake();
    }
  }
}

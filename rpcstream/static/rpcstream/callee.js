// callee.js: the side of a Peer that answers the server's calls: it looks the
// method up in the page's router, binds the arguments (stream arguments become
// IncomingStreams), runs the handler under an AbortSignal (Cancel, deadline,
// the connection closing) and sends the answer, as rpcstream/peer/callee.py does.

import {
  Cancelled, DeadlineExceeded, InternalError, InvalidParams, LocalProtocolError, MethodNotFound,
  Overloaded, toRemoteError,
} from "./errors.js";
import { encodable, encodeValue } from "./codec.js";
import { FrameTag, SETTINGS_METHOD } from "./protocol.js";
import { IncomingStream } from "./streams.js";
import { isAsyncGeneratorFunction, isAsyncIterable, lookup, raceAbort } from "./util.js";

const { CALL, ERROR, NOTIFY, RESULT, STREAM_CALL, STREAM_CANCEL } = FrameTag;

// The abort reason of a handler whose caller sent Cancel: it answers nothing.
const CANCELLED_BY_CALLER = new Cancelled("the caller cancelled the call");

/** Runs the handlers of one Peer. */
export class Callee {
  constructor(peer) {
    this.peer = peer;
    this.handlers = new Map(); // their call id -> AbortController of the handler
    this.running = 0; // handlers running now (bounded by maxConcurrentHandlers)
  }

  /** A Cancel frame: the caller gave up on call `id`; its handler is aborted. */
  cancel(id) {
    this.handlers.get(id)?.abort(CANCELLED_BY_CALLER);
  }

  /** The connection is gone: abort every handler with `error`. */
  abortAll(error) {
    for (const controller of this.handlers.values()) controller.abort(error);
  }

  /** A Call, Notify or StreamCall frame from the server: run its handler, or refuse. */
  receive(frame) {
    const tag = frame[0];
    const method = tag === NOTIFY ? frame[1] : frame[2];
    this.peer.callsReceived += 1;
    if (tag === NOTIFY && method === SETTINGS_METHOD && !lookup(this.peer.router, method)) {
      const limit = frame[3]?.max_concurrent_handlers;
      if (Number.isInteger(limit) && limit >= 1) this.peer._admission.setLimit(limit);
      return;
    }
    if (tag === STREAM_CALL) {
      // The caller allocates the id of the stream it will receive.
      const streams = this.peer._streams;
      const sid = frame[1];
      const inUse = streams.outgoing.has(sid) || streams.incoming.has(sid);
      if (streams.isOurs(sid) || sid <= 0 || inUse) {
        this.peer._fault(`StreamCall with a stream id of the wrong side or in use: ${sid}`);
        return;
      }
      streams.openOutgoing(sid);
      if (streams.size > this.peer.maxStreams) {
        streams.endOutgoing(sid, new Overloaded(
          `too many open streams on this connection (max_streams=${this.peer.maxStreams})`,
        ));
        return;
      }
    }
    const fn = lookup(this.peer.router, method);
    let refusal = null;
    if (this.running >= this.peer.maxConcurrentHandlers) {
      refusal = new Overloaded(
        `${this.running} handlers running (max_concurrent_handlers=${this.peer.maxConcurrentHandlers})`,
      );
    } else if (!fn) {
      refusal = new MethodNotFound(`no method '${method}'`);
    }
    if (refusal) {
      if (tag === CALL) this._answer(frame[1], refusal);
      else if (tag === STREAM_CALL) this.peer._streams.endOutgoing(frame[1], refusal);
      else console.warn(`rpcstream: dropped notification '${method}': ${refusal.message}`);
      this._cancelStreamArgs(frame, new Map());
      return;
    }
    this.running += 1;
    if (tag === CALL) this._runCall(frame, fn);
    else if (tag === NOTIFY) this._runNotify(frame, fn);
    else this._runStreamCall(frame, fn);
  }

  /** Queue a Result or an Error for their call `id`. */
  _answer(id, errorOrNull, value = undefined) {
    if (errorOrNull === null) {
      this.peer._queueControl(`[${RESULT},${id},${encodeValue(value)}]`);
    } else {
      const e = errorOrNull;
      this.peer._queueControl(JSON.stringify([ERROR, id, e.code, e.message, encodable(e.data)]));
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
      if (this.peer._streams.isOurs(sid)) throw new InvalidParams(`${method}: stream id ${sid} is of the wrong side`);
      let stream;
      try {
        stream = new IncomingStream(this.peer, sid);
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
      if (Number.isInteger(sid) && !opened.has(sid)) this.peer._queueControl(`[${STREAM_CANCEL},${sid}]`);
    }
  }

  _context(method, kwargs, signal, timeout) {
    // `this` inside a handler (not an arrow function).
    return { peer: this.peer, method, kwargs, signal, timeout };
  }

  async _runCall(frame, fn) {
    const [, id, method, , , timeout = null] = frame;
    const controller = new AbortController();
    this.handlers.set(id, controller);
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
        answer = [toRemoteError(exc, this.peer.exposeErrors), undefined];
      } else if (controller.signal.reason instanceof DeadlineExceeded) {
        answer = [controller.signal.reason, undefined];
      } // else cancelled by the caller or by the connection closing: no answer at all
    } finally {
      clearTimeout(timer);
      this.handlers.delete(id);
      this.running -= 1;
      if (answer && !this.peer._closeError) this._answer(id, answer[0], answer[1]);
      this._cancelStreamArgs(frame, opened);
    }
  }

  async _runNotify(frame, fn) {
    const controller = new AbortController();
    const opened = new Map();
    const closed = () => controller.abort(this.peer._closeError);
    this.peer.addEventListener("close", closed);
    try {
      const { callArgs, kwargs } = this._bind(frame, opened);
      const ctx = this._context(frame[1], kwargs, controller.signal, null);
      await fn.apply(ctx, callArgs);
    } catch (exc) {
      console.error(`rpcstream: notification handler '${frame[1]}' failed`, exc);
    } finally {
      this.peer.removeEventListener("close", closed);
      this.running -= 1;
      this._cancelStreamArgs(frame, opened);
    }
  }

  _runStreamCall(frame, fn) {
    const [, sid, method, , , timeout = null] = frame;
    const out = this.peer._streams.outgoing.get(sid);
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
    out.run(produce, {
      deadline,
      onDone: () => {
        this.running -= 1;
        this._cancelStreamArgs(frame, opened);
      },
    });
  }
}

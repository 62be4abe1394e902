// errors.js: the same exception tree as rpcstream/errors.py.
//
//     RpcStreamError
//     ├── RemoteError(code, message, data)   the only error that crosses the wire
//     │   └── one subclass per ErrorCode (MethodNotFound ... StoreUnavailable)
//     ├── ConnectionClosed(code, reason)     the connection is gone; pending work failed
//     │   └── ReconnectFailed                a RunClient gave up reconnecting
//     └── LocalProtocolError                 we were asked to do what the protocol forbids

/**
 * Error codes of `Error`, `StreamError` and `Fault` frames (rpcstream.ErrorCode).
 * tests/test_static.py reads this table from the source and compares it with
 * Python's: keep one `NAME: number,` per line.
 */
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
  UNAVAILABLE: 14,
});

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

// tests/test_static.py compares these with Python's classes: one per line, in this form.
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
/** The server's event store (Redis, say) failed or cannot be reached; retry later. */
export const StoreUnavailable = coded("StoreUnavailable", ErrorCode.UNAVAILABLE);

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
    StoreUnavailable,
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

/**
 * What a handler's exception looks like on the wire (as Callee.remote_error in rpcstream/peer/callee.py): a
 * RemoteError as it is; anything else, a bug, is logged to the console once and sent
 * as its type only, unless the peer opted in with exposeErrors (then its text, and
 * its stack in data).
 */
export function toRemoteError(exc, exposeErrors = false) {
  if (exc instanceof RemoteError) return exc;
  const name = exc?.name ?? typeof exc;
  console.error("rpcstream: a handler failed", exc);
  if (!exposeErrors) return new InternalError(`${name}: internal error (see the browser console)`);
  const text = exc?.message ?? String(exc);
  return new InternalError(`${name}: ${text}`, exc?.stack ? { traceback: String(exc.stack) } : null);
}

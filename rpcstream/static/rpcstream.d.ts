// Type declarations for rpcstream.js, the browser client of rpcstream
// (wire protocol v1, JSON codec). Served by `rpcstream serve` at /rpcstream.d.ts.
// They declare the public API, all of it exported by /rpcstream.js; the modules
// under /rpcstream/ that it imports are an implementation detail.
//
// All durations are in seconds, as on the wire and in the Python API.

/** A value the JSON codec carries. */
export type JSONValue =
  | null
  | boolean
  | number
  | string
  | JSONValue[]
  | { [key: string]: JSONValue };

/** The subprotocol this module speaks: "rpcstream.v1.json". */
export declare const SUBPROTOCOL: "rpcstream.v1.json";

/** Error codes of Error, StreamError and Fault frames. Applications use codes >= 1000. */
export declare const ErrorCode: Readonly<{
  PROTOCOL_ERROR: 1;
  METHOD_NOT_FOUND: 2;
  INVALID_PARAMS: 3;
  INTERNAL_ERROR: 4;
  CANCELLED: 5;
  DEADLINE_EXCEEDED: 6;
  OVERLOADED: 7;
  RUN_NOT_FOUND: 8;
  RUN_EXPIRED: 9;
  EVENTS_TRIMMED: 10;
  RUN_FINISHED: 11;
  UNAUTHORIZED: 12;
  RATE_LIMITED: 13;
  UNAVAILABLE: 14;
}>;

/** The event types that end a run: "complete", "error", "cancelled". */
export declare const TERMINAL_TYPES: ReadonlySet<string>;

// -- errors ---------------------------------------------------------------------------

/** Base class of every error this module throws. */
export declare class RpcStreamError extends Error {}

/** An error that crossed (or will cross) the wire. Throw one from a handler. */
export declare class RemoteError extends RpcStreamError {
  constructor(code: number, message?: string, data?: unknown);
  readonly code: number;
  /** The remote message, exactly. */
  readonly message: string;
  readonly data: unknown;
  /** Rebuild an error received in a frame as the subclass its code names. */
  static fromWire(code: number, message: string, data?: unknown): RemoteError;
}

export declare class MethodNotFound extends RemoteError {
  constructor(message?: string, data?: unknown);
  static readonly code: 2;
}
export declare class InvalidParams extends RemoteError {
  constructor(message?: string, data?: unknown);
  static readonly code: 3;
}
export declare class InternalError extends RemoteError {
  constructor(message?: string, data?: unknown);
  static readonly code: 4;
}
export declare class Cancelled extends RemoteError {
  constructor(message?: string, data?: unknown);
  static readonly code: 5;
}
/** The call's deadline passed, on either side. */
export declare class DeadlineExceeded extends RemoteError {
  constructor(message?: string, data?: unknown);
  static readonly code: 6;
}
export declare class Overloaded extends RemoteError {
  constructor(message?: string, data?: unknown);
  static readonly code: 7;
}
export declare class ProtocolViolation extends RemoteError {
  constructor(message?: string, data?: unknown);
  static readonly code: 1;
}
export declare class RunNotFound extends RemoteError {
  constructor(message?: string, data?: unknown);
  static readonly code: 8;
}
export declare class RunExpired extends RemoteError {
  constructor(message?: string, data?: unknown);
  static readonly code: 9;
}
/** Events after the requested id were trimmed away. */
export declare class EventsTrimmed extends RemoteError {
  constructor(message?: string, data?: unknown);
  static readonly code: 10;
  /** The first event id still stored (from data.first_id). */
  readonly firstId: number;
}
export declare class RunFinished extends RemoteError {
  constructor(message?: string, data?: unknown);
  static readonly code: 11;
}
export declare class RateLimited extends RemoteError {
  constructor(message?: string, data?: unknown);
  static readonly code: 13;
}
/** The server's event store (Redis, say) failed or cannot be reached; retry later. */
export declare class StoreUnavailable extends RemoteError {
  constructor(message?: string, data?: unknown);
  static readonly code: 14;
}

/** The connection closed (either side) or broke; pending work fails with this. */
export declare class ConnectionClosed extends RpcStreamError {
  constructor(code?: number | null, reason?: string);
  /** The WebSocket close code: 1000 normal, 1006 lost or refused, 1012 restart... */
  readonly code: number | null;
  readonly reason: string;
}

/** A RunClient gave up reconnecting (maxAttempts or giveUpAfter ran out). */
export declare class ReconnectFailed extends ConnectionClosed {
  constructor(reason: string, options?: { cause?: unknown });
}

/** We were asked to do something the protocol forbids (a stream id in use, say). */
export declare class LocalProtocolError extends RpcStreamError {}

// -- handlers -------------------------------------------------------------------------

/** `this` inside a handler (a `function`, not an arrow function). */
export interface CallContext {
  /** The connection the call came in on: call the server back with it. */
  readonly peer: Peer;
  readonly method: string;
  /** The keyword arguments (also passed as the last argument when there are any). */
  readonly kwargs: Record<string, unknown>;
  /** Aborted when the caller cancels, the deadline passes, or the connection closes. */
  readonly signal: AbortSignal;
  /** The caller's deadline in seconds, or null. */
  readonly timeout: number | null;
}

/**
 * A method the server may call: an async function (its result is the answer) or
 * an async generator function (each yield is a stream item, sent as the server
 * grants credit). It receives the positional arguments, then the keyword
 * arguments as one object when there are any; stream arguments arrive as
 * IncomingStreams.
 */
export type Handler =
  | ((this: CallContext, ...args: any[]) => unknown | Promise<unknown>)
  | ((this: CallContext, ...args: any[]) => AsyncIterable<unknown>);

/** Method names to handlers. Only own properties are looked up. */
export type Router = Record<string, Handler> | Map<string, Handler>;

/** An argument value: a JSON value, or an async iterable sent as a stream. */
export type Argument = unknown;

// -- the peer -------------------------------------------------------------------------

export interface ConnectOptions {
  /** Sent as the access_token query parameter (browsers cannot set headers). */
  token?: string;
  /** The methods the server may call on this page. */
  router?: Router;
  /** Credit each stream this side receives grants at first (default 256 items); it grows while it holds a fast stream back. */
  windowItems?: number;
  /** ... and in payload bytes (default 262144). */
  windowBytes?: number;
  /** How far a stream's item window may grow (16384). */
  maxWindowItems?: number;
  /** How far a stream's byte window may grow (16 MiB). */
  maxWindowBytes?: number;
  /** The bytes all streams this side receives may hold at once (32 MiB). */
  maxReceiveBuffer?: number;
  /** Calls from the server running at once beyond which more are refused (256). */
  maxConcurrentHandlers?: number;
  /**
   * Calls and streams waiting for a handler slot on the server (beyond its
   * advertised max_concurrent_handlers) beyond which a call fails Overloaded at
   * once (100000).
   */
  maxWaitingCalls?: number;
  /** Open streams, both directions (4096). */
  maxStreams?: number;
  /** Stream senders wait while more than this many bytes are queued (1 MiB). */
  maxBufferedAmount?: number;
  /** Seconds between heartbeats (default 20; null: off). */
  pingInterval?: number | null;
  /** Seconds a heartbeat may take before the connection is taken for dead (20). */
  pingTimeout?: number | null;
  /** Seconds the WebSocket handshake may take (10; 0: no limit). */
  openTimeout?: number;
  /** Send the text of handlers' unexpected errors, and their stacks in error data, to
   * the server (default false: only the error's name, the rest to the console). */
  exposeErrors?: boolean;
  /** Abort the connection attempt. */
  signal?: AbortSignal;
}

export interface CallOptions {
  /**
   * Seconds from the call: travels as the Call frame's timeout (less any time spent
   * waiting for a slot on the server); rejects with DeadlineExceeded.
   */
  timeout?: number | null;
  /** Aborting sends Cancel (or stops waiting for a slot) and rejects with the signal's reason. */
  signal?: AbortSignal;
}

export interface StreamOptions {
  /** Seconds bounding the whole stream (sent in the StreamCall). */
  timeout?: number | null;
  /** Aborting stops the stream (StreamCancel); iteration rejects with the reason. */
  signal?: AbortSignal;
  windowItems?: number;
  windowBytes?: number;
}

/**
 * The items of a stream this side receives. Breaking out of `for await`, or
 * close(), sends StreamCancel. A sender's error is thrown after the items sent
 * before it; a closed connection throws ConnectionClosed.
 */
export declare class IncomingStream<T = any> implements AsyncIterableIterator<T> {
  readonly peer: Peer;
  readonly streamId: number;
  /** Its item window now (it grows while it holds a fast stream back). */
  readonly windowItems: number;
  /** Its byte window now. */
  readonly windowBytes: number;
  /** Items received and not yet taken (never more than the window plus one). */
  readonly buffered: number;
  /** The most items this stream ever held at once. */
  readonly maxBuffered: number;
  /** Whether it was closed or has ended. */
  readonly closed: boolean;
  next(): Promise<IteratorResult<T, undefined>>;
  return(value?: any): Promise<IteratorResult<T, any>>;
  throw(error?: any): Promise<IteratorResult<T, any>>;
  /** Stop receiving; the sender is told to stop. */
  close(): void;
  [Symbol.asyncIterator](): IncomingStream<T>;
}

export interface PeerStats {
  pendingCalls: number;
  /** Calls and streams waiting for a handler slot on the server. */
  waitingCalls: number;
  runningHandlers: number;
  streams: number;
  faultsReceived: number;
  faultsSent: number;
}

/** One connection. Dispatches "close" (a CustomEvent, detail: ConnectionClosed). */
export declare class Peer extends EventTarget {
  /** The server URL, without the token. */
  readonly url: string;
  router: Router;
  readonly windowItems: number;
  readonly windowBytes: number;
  /** Resolves (never rejects) with the ConnectionClosed when the connection ends. */
  readonly closed: Promise<ConnectionClosed>;
  readonly isClosed: boolean;
  /** Bytes queued for the socket and not yet sent. */
  readonly bufferedAmount: number;
  readonly stats: PeerStats;
  /**
   * The server's max_concurrent_handlers as it advertised it (256 until it does):
   * calls and streams beyond it wait for a slot.
   */
  readonly remoteMaxConcurrentHandlers: number;

  /** Call `method` with positional `args` and keyword `kwargs`; resolve with the result. */
  call<R = any>(
    method: string,
    args?: Argument[],
    kwargs?: Record<string, Argument>,
    options?: CallOptions,
  ): Promise<R>;
  /** Call `method` expecting no answer. */
  notify(method: string, args?: Argument[], kwargs?: Record<string, Argument>): void;
  /** Call a streaming method; iterate the result with `for await`. */
  stream<T = any>(
    method: string,
    args?: Argument[],
    kwargs?: Record<string, Argument>,
    options?: StreamOptions,
  ): IncomingStream<T>;
  /** Send `items` as a raw stream in the background; return its id. */
  sendStream(items: AsyncIterable<unknown>, streamId?: number): number;
  /** Open a raw stream to receive (the server's id, or a new one to hand it). */
  receiveStream<T = any>(
    streamId?: number,
    options?: { windowItems?: number; windowBytes?: number },
  ): IncomingStream<T>;
  /** Stop an outgoing stream; its receiver gets Cancelled. */
  abortStream(streamId: number): void;
  /** Close: 1000 or 3000-4999 (browsers allow no other codes). */
  close(code?: number, reason?: string): Promise<ConnectionClosed>;
}

/** Open a WebSocket (ws(s)://, http(s):// or relative URL) and resolve with its Peer. */
export declare function connect(url: string, options?: ConnectOptions): Promise<Peer>;

// -- run streams ----------------------------------------------------------------------

/** One event of a run, as runs.subscribe sends it (with `batch: true`, arrays of them). */
export interface RunEvent<D = any> {
  /** Contiguous from 1: a resume continues after the last id seen. */
  id: number;
  /** "started", then the flow's own types, then "complete" | "error" | "cancelled". */
  type: string;
  data: D;
  /** ISO 8601, UTC, millisecond precision. */
  timestamp: string;
  run_id: string;
  flow: string;
}

export interface RunStatus {
  run_id: string;
  flow: string;
  status: string;
  last_id: number;
  first_id: number;
  created: string;
  finished: string | null;
  subscribers: number;
}

export type ConnectionState = "connecting" | "open" | "reconnecting" | "failed" | "closed";

export interface StateChangeDetail {
  state: ConnectionState;
  /** The URL of the attempt or connection (without the token). */
  url: string | null;
  /** Connections opened so far. */
  connections: number;
  /** "connecting": the attempt number; "reconnecting": failures in a row. */
  attempt?: number;
  /** "reconnecting": seconds until the next attempt. */
  delay?: number;
  /** "reconnecting": why the last connection or attempt ended; "failed": ReconnectFailed. */
  error?: unknown;
}

export interface RunClientOptions extends Omit<ConnectOptions, "signal"> {
  /** Reconnect delays are uniform in [0, min(backoffCap, backoffBase * 2**failures)]. */
  backoffBase?: number;
  backoffCap?: number;
  /** Failed attempts in a row before giving up (null: never). */
  maxAttempts?: number | null;
  /** Seconds without a connection before giving up (null: never). */
  giveUpAfter?: number | null;
  /** Whether calls made while disconnected wait for the reconnect (true). */
  wait?: boolean;
}

export interface RunCallOptions extends CallOptions {
  /** Override the client's `wait` for this call. */
  wait?: boolean;
}

export interface StartOptions extends RunCallOptions {
  /**
   * The run's id, chosen by the caller: 1 to 128 of `A-Z a-z 0-9 _ . : -`.
   * When a run of the same flow holds it, that run is returned ("resume or start").
   */
  runId?: string;
}

export interface SubscribeOptions {
  /** Start after this event id (0: from the start). */
  after?: number;
  /** Credit in stream items: the subscription asks for batches, so an item is an
   * array of events (up to 64 KiB of them), handed out one at a time. */
  windowItems?: number;
  windowBytes?: number;
}

/** A run's events through disconnects: exactly once each, in order. */
export interface Subscription<D = any> extends AsyncIterableIterator<RunEvent<D>> {
  readonly runId: string;
  /** The id of the last event handed out: a resume continues after it. */
  readonly lastEventId: number;
  /** How many times it resumed on a new connection. */
  readonly resumes: number;
  /** Stop now, even while waiting for an event. */
  close(): void;
}

export interface RunClientEventMap {
  statechange: CustomEvent<StateChangeDetail>;
  resume: CustomEvent<{ runId: string; after: number }>;
}

/** A client of a RunServer that survives disconnects and resumes subscriptions exactly. */
export declare class RunClient extends EventTarget {
  constructor(urls: string | string[], options?: RunClientOptions);
  readonly urls: string[];
  backoffBase: number;
  backoffCap: number;
  maxAttempts: number | null;
  giveUpAfter: number | null;
  wait: boolean;
  /** Connections opened so far (1 + reconnects). */
  readonly connections: number;
  /** The URL of the current (or last) connection, without the token. */
  readonly url: string | null;
  readonly state: ConnectionState;
  readonly connected: boolean;
  /** Called with every "statechange" event. */
  onstatechange: ((event: CustomEvent<StateChangeDetail>) => void) | null;

  addEventListener<K extends keyof RunClientEventMap>(
    type: K,
    listener: (event: RunClientEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void;

  /** The open connection's Peer, waiting for the (re)connection if allowed. */
  peer(options?: { wait?: boolean }): Promise<Peer>;
  /** Call a method; `timeout` bounds the wait for a connection and the call together. */
  call<R = any>(
    method: string,
    args?: Argument[],
    kwargs?: Record<string, Argument>,
    options?: RunCallOptions,
  ): Promise<R>;
  /**
   * Start a run of `flow`; resolves with its id. With `options.runId`: start
   * the run under that id, or resolve with the run of `flow` that holds it.
   */
  start(flow: string, params?: Record<string, unknown>, options?: StartOptions): Promise<string>;
  status(runId: string, options?: RunCallOptions): Promise<RunStatus>;
  cancel(runId: string, options?: RunCallOptions): Promise<RunStatus | { run_id: string; status: "cancelling" }>;
  send(runId: string, type: string, data?: unknown, options?: RunCallOptions): Promise<void>;
  /** Every event with id > after, then live ones, until the terminal event. */
  subscribe<D = any>(runId: string, options?: SubscribeOptions): Subscription<D>;
  /** Stop reconnecting and close the connection. */
  close(): void;
}

// rpcstream.js: the browser client of rpcstream (wire protocol v1, JSON codec).
//
// Dependency-free ES modules, served by `rpcstream serve` as they are (no
// bundler). This one is the only import a page needs:
//
//     import { connect, RunClient } from "/rpcstream.js";
//
// `connect()` opens one WebSocket and returns a `Peer`: calls, notifications and
// credit-controlled streams in both directions, exactly as docs/protocol.md
// describes and rpcstream/peer/ implements. `RunClient` keeps a connection
// open through drops (backoff with full jitter, rotating through URLs) and
// follows a run's events, resuming after the last event id it handed out.
//
// The work is done by the modules under rpcstream/, one per job, which this one
// imports relatively (they are served at /rpcstream/<name>.js):
//
//     errors.js    the exception tree and ErrorCode, as rpcstream/errors.py
//     protocol.js  the wire vocabulary: subprotocol, frame tags, frame fields, limits
//     codec.js     JSON messages in and out, payload sizes as they travel
//     util.js      abortable promises, scheduling, URLs
//     admission.js slots for our calls on the server, and the calls waiting for one
//     streams.js   credit-controlled streams, both directions, by id
//     callee.js    running the handlers of the server's calls
//     peer.js      Peer (the connection: queues, dispatch, close) and connect()
//     runs.js      RunClient and its resumable subscriptions
//
// Each imports only modules above it in that list. All durations are in
// seconds, as on the wire and in the Python API.

export { SUBPROTOCOL } from "./rpcstream/protocol.js";
export {
  Cancelled,
  ConnectionClosed,
  DeadlineExceeded,
  ErrorCode,
  EventsTrimmed,
  InternalError,
  InvalidParams,
  LocalProtocolError,
  MethodNotFound,
  Overloaded,
  ProtocolViolation,
  RateLimited,
  ReconnectFailed,
  RemoteError,
  RpcStreamError,
  RunExpired,
  RunFinished,
  RunNotFound,
  StoreUnavailable,
} from "./rpcstream/errors.js";
export { IncomingStream } from "./rpcstream/streams.js";
export { Peer, connect } from "./rpcstream/peer.js";
export { RunClient, TERMINAL_TYPES } from "./rpcstream/runs.js";

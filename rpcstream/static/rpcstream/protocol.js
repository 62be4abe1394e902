// protocol.js: the wire vocabulary of protocol v1 (docs/protocol.md), as
// rpcstream/messages.py defines it: the subprotocol, the frame tags and the
// fields of each frame, and the limits both sides hold to.

/** The subprotocol this module speaks: the JSON codec, in text messages. */
export const SUBPROTOCOL = "rpcstream.v1.json";

/**
 * Frame tags (docs/protocol.md, section 3): the first element of every frame.
 * tests/test_static.py reads this table from the source and compares it with
 * the Structs of rpcstream/messages.py: keep one `NAME: number,` per line.
 */
export const FrameTag = Object.freeze({
  CALL: 1,
  NOTIFY: 2,
  STREAM_CALL: 3,
  RESULT: 4,
  ERROR: 5,
  CANCEL: 6,
  STREAM_DATA: 7,
  STREAM_END: 8,
  STREAM_ERROR: 9,
  CREDIT: 10,
  STREAM_CANCEL: 11,
  FAULT: 12,
});

const T = FrameTag;

/**
 * Field types per tag, after the tag: [required count, ...types]. i: integer,
 * s: string, a: any value, f: number or null, l: list of (integer | string).
 * Fields past the required ones are optional: newer peers append fields.
 */
export const FRAME_FIELDS = Object.freeze({
  [T.CALL]: [4, "i", "s", "a", "a", "f", "l"],
  [T.NOTIFY]: [3, "s", "a", "a", "l"],
  [T.STREAM_CALL]: [4, "i", "s", "a", "a", "f", "l"],
  [T.RESULT]: [2, "i", "a"],
  [T.ERROR]: [3, "i", "i", "s", "a"],
  [T.CANCEL]: [1, "i"],
  [T.STREAM_DATA]: [2, "i", "a"],
  [T.STREAM_END]: [1, "i"],
  [T.STREAM_ERROR]: [3, "i", "i", "s", "a"],
  [T.CREDIT]: [3, "i", "i", "i"],
  [T.STREAM_CANCEL]: [1, "i"],
  [T.FAULT]: [2, "i", "s"],
});

/** Running credit totals beyond this are a violation. */
export const MAX_CREDIT = 2 ** 31;

/** A batch stops taking stream data at this size. */
export const MAX_MESSAGE_BYTES = 256 * 1024;

/** The reserved method every peer answers at once (rpcstream.peer.PING). */
export const HEARTBEAT_METHOD = "rpcstream.ping";

/**
 * The reserved notification each side sends first, its kwargs its limits
 * (rpcstream/peer/admission.py): `{max_concurrent_handlers: n}`.
 */
export const SETTINGS_METHOD = "rpcstream.settings";

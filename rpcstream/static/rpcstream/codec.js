// codec.js: the JSON codec. Messages are JSON arrays of frames, in text
// WebSocket messages; credit counts payload bytes exactly as they travel.

import { FRAME_FIELDS, FrameTag } from "./protocol.js";

const { STREAM_DATA } = FrameTag;

/** Bytes of `text` in UTF-8 (what the other side counts for credit). */
export function utf8Length(text) {
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
export function encodeValue(value) {
  const text = JSON.stringify(value);
  return text === undefined ? "null" : text;
}

/** `data` if it can be encoded, else null: error details never break a batch. */
export function encodable(data) {
  if (data === undefined || data === null) return null;
  try {
    return JSON.stringify(data) === undefined ? null : data;
  } catch {
    return null;
  }
}

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
export function decodeBatch(text) {
  const frames = JSON.parse(text);
  if (!Array.isArray(frames)) throw new TypeError("a message must be an array of frames");
  for (const frame of frames) {
    if (!Array.isArray(frame) || !Number.isInteger(frame[0]) || !(frame[0] in FRAME_FIELDS)) {
      throw new TypeError(`unknown frame ${JSON.stringify(frame)?.slice(0, 80)}`);
    }
    const [required, ...types] = FRAME_FIELDS[frame[0]];
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
export function streamDataSizes(text, frames) {
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

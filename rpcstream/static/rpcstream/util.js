// util.js: small helpers with no knowledge of frames: promises that abort,
// scheduling, argument checks, URLs.

/** A wrong type here would make the server drop the whole message (a Fault). */
export function checkCall(method, timeout) {
  if (typeof method !== "string") throw new TypeError("method must be a string");
  if (timeout !== null && timeout !== undefined && !Number.isFinite(timeout)) {
    throw new TypeError("timeout must be a number of seconds or null");
  }
}

export function isAsyncIterable(value) {
  return value !== null && typeof value === "object" &&
    typeof value[Symbol.asyncIterator] === "function";
}

export function isAsyncGeneratorFunction(fn) {
  return Object.prototype.toString.call(fn) === "[object AsyncGeneratorFunction]";
}

/** A promise that rejects with `signal.reason` as soon as it aborts. */
export function raceAbort(promise, signal) {
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

export function sleep(seconds, signal) {
  return raceAbort(new Promise((r) => setTimeout(r, Math.max(0, seconds) * 1000)), signal);
}

/** A promise with its resolve function, replaced whenever a state changes. */
export function deferred() {
  let resolve;
  const promise = new Promise((r) => (resolve = r));
  return { promise, resolve };
}

// Run `f` soon, after the current task. Frames queued during one task (a burst
// of calls, a window of stream items) then leave in one message. A MessageChannel
// is not throttled in background tabs the way setTimeout is.
export const soon = (() => {
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

export function lookup(router, method) {
  if (!router) return undefined;
  // Own properties only: a method named "constructor" or "toString" is not a handler.
  const fn = router instanceof Map
    ? router.get(method)
    : Object.hasOwn(router, method) ? router[method] : undefined;
  return typeof fn === "function" ? fn : undefined;
}

/** The WebSocket URL: relative and http(s) URLs allowed, the token as ?access_token=. */
export function socketUrl(url, token) {
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
export function safeUrl(url) {
  try {
    const u = new URL(url, typeof location === "undefined" ? undefined : location.href);
    u.searchParams.delete("access_token");
    return u.href;
  } catch {
    return String(url);
  }
}

// The REST API and its Server-Sent Events, as the CLI uses them (cli/client.py), from the browser.
//
// The API key lives in sessionStorage (gone with the tab) and travels only as a bearer token in the
// Authorization header, never in a URL. EventSource cannot send headers, so event streams are read
// with fetch() and a ReadableStream; a dropped stream reconnects with Last-Event-ID, and the server
// sends only the metric points after it.

const KEY = "maml.apiKey";
export const API = "/api/v1";

export const auth = {
  get: () => sessionStorage.getItem(KEY),
  set: (key) => sessionStorage.setItem(KEY, key),
  clear: () => sessionStorage.removeItem(KEY),
};

/** A failed call: `status` is the HTTP status (0: the service could not be reached), `detail` the server's. */
export class ApiError extends Error {
  constructor(status, detail, body) {
    super(formatDetail(status, detail));
    this.status = status;
    this.detail = detail;
    this.body = body || {};
  }
  get unreachable() { return this.status === 0; }
  get rejected() { return this.status === 401; }
}

/** pydantic's 422 list as "field: message" lines (as cli/client.py's format_detail). */
export function validationErrors(detail) {
  if (!Array.isArray(detail)) return [];
  return detail.map((e) => ({
    field: (e.loc || []).filter((p) => p !== "body").join("."),
    message: e.msg || String(e),
  }));
}

function formatDetail(status, detail) {
  if (status === 0) return "The service could not be reached.";
  if (Array.isArray(detail)) return validationErrors(detail).map((e) => `${e.field || "body"}: ${e.message}`).join("; ");
  return typeof detail === "string" ? detail : JSON.stringify(detail);
}

const listeners = new Set();
/** `fn(error)` on every 401 or unreachable answer: the shell shows the signed-out or offline state. */
export function onAuthOrNetworkError(fn) { listeners.add(fn); }

function headers(extra = {}, key = auth.get()) {
  return key ? { Authorization: `Bearer ${key}`, ...extra } : { ...extra };
}

async function raw(path, { method = "GET", body, signal, key, accept = "application/json" } = {}) {
  let response;
  try {
    response = await fetch(API + path, {
      method, signal,
      headers: headers(body === undefined ? { Accept: accept } : { Accept: accept, "Content-Type": "application/json" }, key),
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    const error = new ApiError(0, String(err));
    listeners.forEach((fn) => fn(error));
    throw error;
  }
  if (!response.ok) {
    let payload = {};
    try { payload = await response.json(); } catch { payload = { detail: response.statusText }; }
    const error = new ApiError(response.status, payload.detail ?? response.statusText, payload);
    if (error.rejected && key === undefined) listeners.forEach((fn) => fn(error));
    throw error;
  }
  return response;
}

/** JSON of a call: `api("/jobs?limit=50")`, `api("/jobs", {method: "POST", body: spec})`. */
export async function api(path, options = {}) {
  const response = await raw(path, options);
  return response.status === 204 ? null : response.json();
}

/** Check a key without keeping it: resolves, or throws ApiError (401: rejected; 0: unreachable). */
export async function checkKey(key) {
  await raw("/jobs?limit=1", { key });
}

/** A binary download with the bearer header (weights), saved under `filename`. */
export async function download(path, filename) {
  const response = await raw(path, { accept: "application/octet-stream" });
  const url = URL.createObjectURL(await response.blob());
  const a = Object.assign(document.createElement("a"), { href: url, download: filename });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/**
 * Follow a Server-Sent Events stream until its `end` event, `signal` aborts, or the key is rejected.
 * `onEvent(name, data, id)` gets each event's parsed JSON. A dropped connection is retried (the
 * server's `retry`, else 1 s, doubling to 15 s) with `Last-Event-ID: <last id seen>`.
 * `onState("live" | "reconnecting")` says where the stream stands.
 */
export async function follow(path, { onEvent, onState = () => {}, signal }) {
  let lastId = null;
  let delay = 1000;
  while (!signal?.aborted) {
    let ended = false;
    try {
      const response = await fetch(API + path, {
        signal,
        headers: headers({ Accept: "text/event-stream", ...(lastId !== null ? { "Last-Event-ID": lastId } : {}) }),
      });
      if (!response.ok) {
        let payload = {};
        try { payload = await response.json(); } catch { /* not JSON */ }
        const error = new ApiError(response.status, payload.detail ?? response.statusText, payload);
        if (error.rejected) listeners.forEach((fn) => fn(error));
        if (response.status !== 429 && response.status < 500) throw error;
        throw Object.assign(error, { retryable: true });
      }
      onState("live");
      delay = 1000;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      let event = { name: "message", data: [], id: null };
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        // Lines end with \r\n, \n or \r (sse-starlette sends \r\n).
        const lines = buffer.split(/\r\n|\n|\r/);
        buffer = lines.pop();
        for (const line of lines) {
          if (line === "") {  // dispatch
            if (event.data.length) {
              if (event.id !== null) lastId = event.id;
              const data = JSON.parse(event.data.join("\n"));
              onEvent(event.name, data, event.id);
              if (event.name === "end") ended = true;
            }
            event = { name: "message", data: [], id: null };
            continue;
          }
          if (line.startsWith(":")) continue;  // a comment: the server's ping
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let val = colon < 0 ? "" : line.slice(colon + 1);
          if (val.startsWith(" ")) val = val.slice(1);
          if (field === "event") event.name = val;
          else if (field === "data") event.data.push(val);
          else if (field === "id") event.id = val;
          else if (field === "retry" && /^\d+$/.test(val)) delay = Number(val);
        }
        if (ended) { reader.cancel().catch(() => {}); return; }
      }
    } catch (err) {
      if (signal?.aborted || err.name === "AbortError") return;
      if (err instanceof ApiError && !err.retryable) throw err;
    }
    if (ended || signal?.aborted) return;
    onState("reconnecting");
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 15_000);
  }
}

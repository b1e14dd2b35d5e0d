/**
 * crier.js: subscribe to a crier hub from a browser, every event once and in
 * order, across token expiry, network drops and hub restarts.
 *
 *   import { subscribe } from "https://hub.example/crier.js";
 *   const sub = subscribe({
 *     topics: ["news", "sport"],              // one topic: /topics/news; several: /events
 *     ticket: async (topics) => {             // a fresh single-use ticket for every stream
 *       const r = await fetch("/app/crier-ticket", { method: "POST" }); // the app's backend,
 *       return (await r.json()).ticket;       // which POSTs {"topics": [...]} to the hub's
 *     },                                      // /tickets with its token
 *     events: ["update"],                     // named event types to hear besides "message"
 *     onEvent: ({ topic, id, event, data }) => {},
 *     onReset: (info, { topic, id }) => {},   // a position could not be honoured: reload state
 *     onError: (error) => {},                 // each failure; it retries until close()
 *   });
 *   sub.close();
 *
 * Why it exists: EventSource cannot send headers, so a page subscribes with a
 * single-use ticket in the URL, and EventSource's own reconnection would send
 * the spent ticket again. So this module closes an EventSource as soon as it
 * fails, and opens a new one with a fresh ticket and `lastEventId=` (the last
 * id it saw) after a bounded, jittered backoff. A `reauth` event (the token
 * behind the ticket expired) reopens at once. The hub replays what was missed.
 *
 * Without `ticket` (an open hub, public topics, or the auth cookie) or when it
 * resolves to null, streams go without one.
 *
 * Options besides those above (all optional):
 *   hub        the hub's base URL; default: where this module was loaded from
 *   lastEventId  start after this id; last: start with the last N events
 *              (used only until the first event arrives); default: from now
 *   withCredentials  send cookies to a hub on another origin
 *   onOpen()   each time a stream is open
 *   transport  "sse" (default: EventSource), "websocket" (one JSON frame per
 *              event, for networks that pass WebSockets but buffer streams),
 *              or "poll" (long-polling: a request per batch of events, for
 *              networks that pass neither). The same ids, so a page may
 *              switch by subscribing anew with `lastEventId` set.
 *   minDelay, maxDelay  the backoff's bounds in ms (250, 10000)
 * `error.refused` says the hub answered with an error status rather than the
 * network failing; `error.retryIn` is the wait (ms) before the next attempt.
 * The returned object: close(), listen(name) to hear another event type from
 * now on, and lastEventId (the last id seen).
 * Until its first event, a stream restarts from where it was asked to start:
 * by default "from now", so what is published while it is down is not replayed.
 */
export function subscribe({
  hub = new URL(".", import.meta.url).href,
  topics,
  ticket = null,
  events = [],
  lastEventId = "",
  last = null,
  withCredentials = false,
  onEvent = () => {},
  onReset = () => {},
  onError = () => {},
  onOpen = () => {},
  minDelay = 250,
  maxDelay = 10000,
  transport = "sse",
}) {
  if (!["sse", "websocket", "poll"].includes(transport)) {
    throw new TypeError("crier subscribe: transport is sse, websocket or poll");
  }
  topics = [].concat(topics || []);
  if (!topics.length) throw new TypeError("crier subscribe: name at least one topic");
  const single = topics.length === 1 ? topics[0] : null;
  const names = new Set(["message", ...events.filter((n) => n !== "reset" && n !== "reauth")]);
  const base = new URL(hub.endsWith("/") ? hub : hub + "/", location.href); // throws if malformed
  let source = null, timer = null, closed = false, failures = 0, lastId = lastEventId;

  function url(ticketString) {
    const u = new URL(single !== null ? "topics/" + encodeURIComponent(single) : "events", base);
    if (single === null) for (const t of topics) u.searchParams.append("topic", t);
    if (lastId) u.searchParams.set("lastEventId", lastId);
    else if (last !== null) u.searchParams.set("last", String(last));
    if (ticketString) u.searchParams.set("ticket", ticketString);
    return u.href;
  }

  // Multi-topic ids say their topic first: `news/4.kq3z,7.x9`.
  const topicOf = (e) => (single !== null ? single : e.lastEventId.split("/")[0]);

  function deliver(e) {
    if (e.target !== source) return; // a straggler from a source already closed
    lastId = e.lastEventId || lastId;
    onEvent({ topic: topicOf(e), id: e.lastEventId, event: e.type, data: e.data });
  }

  function reset(e) {
    if (e.target !== source) return;
    lastId = e.lastEventId || lastId;
    let info = {};
    try { info = JSON.parse(e.data); } catch (_) { info = { raw: e.data }; }
    onReset(info, { topic: info.topic || topicOf(e), id: e.lastEventId });
  }

  function drop() {
    if (source) source.close();
    source = null;
  }

  // A WebSocket frame or long-poll entry, handled as the SSE event it
  // stands for. Returns false for `reauth` (reopen with fresh credentials).
  function entry(frame, from) {
    if (frame.type === "open") {
      // The start the hub chose: resume from it if nothing comes first.
      if (!lastId && frame.id) lastId = frame.id;
      failures = 0;
      onOpen();
    } else if (frame.type === "event") {
      lastId = frame.id;
      const event = frame.event || "message";
      if (names.has(event)) onEvent({ topic: frame.topic, id: frame.id, event, data: frame.data });
    } else if (frame.type === "reset") {
      lastId = frame.id;
      const { type, id, ...info } = frame;
      onReset(info, { topic: info.topic, id });
    } else if (frame.type === "reauth") {
      return false;
    }
    return from === source;
  }

  function openSocket(ticketString) {
    const ws = new WebSocket(url(ticketString).replace(/^http/, "ws"));
    const handle = { close: () => ws.close() };
    source = handle;
    let reauth = false;
    ws.onmessage = (m) => {
      if (handle !== source) return;
      let frame;
      try { frame = JSON.parse(m.data); } catch (_) { return; }
      if (!entry(frame, handle)) reauth = frame.type === "reauth";
    };
    ws.onclose = (e) => {
      if (handle !== source) return;
      source = null;
      if (reauth || e.code === 1008) return connect();
      const error = new Error("the socket closed (" + e.code + ")");
      error.refused = e.code === 1006 && !e.wasClean && failures > 0;
      retry(error);
    };
  }

  async function openPoll(ticketString) {
    const handle = { closed: false, close() { this.closed = true; } };
    source = handle;
    const u = new URL(url(ticketString));
    u.searchParams.set("poll", "1");
    let response;
    try {
      response = await fetch(u.href, { credentials: withCredentials ? "include" : "same-origin" });
    } catch (error) {
      if (handle !== source || handle.closed) return;
      source = null;
      return retry(new Error("the poll was interrupted"));
    }
    if (handle !== source || handle.closed) return;
    if (!response.ok) {
      source = null;
      const error = new Error("the hub refused the poll (" + response.status + ")");
      error.refused = true;
      return retry(error);
    }
    const answer = await response.json();
    if (handle !== source || handle.closed) return;
    failures = 0;
    let reauth = false;
    for (const frame of answer.events) if (!entry(frame, handle)) reauth ||= frame.type === "reauth";
    if (answer.next) lastId = answer.next;
    source = null;
    connect(); // at once: the next poll waits on the hub
  }

  async function connect() {
    timer = null;
    let ticketString = null;
    if (ticket) {
      try {
        ticketString = await ticket(topics.slice());
      } catch (error) {
        return retry(error instanceof Error ? error : new Error(String(error)));
      }
      if (closed) return;
    }
    if (transport === "websocket") return openSocket(ticketString);
    if (transport === "poll") return openPoll(ticketString);
    const es = new EventSource(url(ticketString), { withCredentials });
    source = es;
    es.onopen = () => { failures = 0; onOpen(); };
    es.onerror = () => {
      if (es !== source) return;
      // CLOSED: the hub answered with an error status. CONNECTING: the
      // network failed, and EventSource would retry with the spent ticket.
      const refused = es.readyState === EventSource.CLOSED;
      drop();
      const error = new Error(refused ? "the hub refused the stream" : "the stream was interrupted");
      error.refused = refused;
      retry(error);
    };
    es.addEventListener("reauth", () => {
      if (es !== source) return;
      drop();
      connect();
    });
    es.addEventListener("reset", reset);
    for (const name of names) es.addEventListener(name, deliver);
  }

  function retry(error) {
    if (closed) return;
    const ceiling = Math.min(maxDelay, minDelay * 2 ** failures++);
    error.retryIn = Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
    onError(error);
    if (!closed) timer = setTimeout(connect, error.retryIn);
  }

  connect();
  return {
    close() {
      closed = true;
      clearTimeout(timer);
      drop();
    },
    listen(name) {
      if (names.has(name) || name === "reset" || name === "reauth") return;
      names.add(name);
      if (source && source.addEventListener) source.addEventListener(name, deliver);
    },
    get lastEventId() {
      return lastId;
    },
  };
}

// The wstally live page. It speaks wstally.v1 (docs/protocol.md) the way `wstally client`
// does (src/wstally/client/session.py): a hello with a client id kept in this browser, an id
// per add, an outbox of unacknowledged adds resent after every reconnect (the server's
// deduplication makes each count once), reconnects with backoff and jitter, and since/epoch
// recovery so a tab that slept shows what it missed.
//
// Three rules hold throughout: integers stay exact (BigInt, never a float), text from the
// server only ever reaches the page through textContent, and the DOM is touched at most once
// per animation frame however fast updates arrive.
"use strict";

(() => {
  const SUBPROTOCOL = "wstally.v1";
  const BACKOFF = [0.1, 5.0]; // seconds: first retry, longest wait (as wstally client)
  const OPEN_TIMEOUT = 10_000; // ms for a handshake before it counts as failed
  const RETRY_TRANSIENT = 500; // ms before an add refused "not now" is sent again
  const TRANSIENT = new Set(["shutting_down", "store_failed", "unavailable"]);
  const RECENT = 50; // updates listed
  const OUTBOX_SHOWN = 20; // pending adds listed
  const OWN_KEPT = 1000; // seqs of our own acked adds remembered, to mark them
  const WINDOW = 300_000; // chart: the last 5 minutes...
  const BUCKET = 500; // ...in half-second buckets: at most 600 of them
  const CHART_EVERY = 250; // ms: a bucket is under 2 px wide, redrawing faster shows nothing
  const INT64_MIN = -(2n ** 63n);
  const INT64_MAX = 2n ** 63n - 1n;
  const NUMBER = /^[ \t\r\n]*([+-]?)([0-9]+)[ \t\r\n]*$/; // the server's grammar
  // Letters, marks, numbers, punctuation, symbols and the plain space: all printable for
  // the server (Python's str.isprintable), so a hello never fails on our name.
  const NAME = /^[\p{L}\p{M}\p{N}\p{P}\p{S} ]+$/u;

  // ---- Exact integers --------------------------------------------------------------------

  // JSON.parse turns 9007199254740993 into 9007199254740992. Its reviver's third argument
  // carries the number's source text (Chromium 114+, recent Firefox and Safari), from
  // which every integer becomes a BigInt. Older engines get the integers quoted first.
  const sourceText = (() => {
    let seen;
    try {
      JSON.parse("1", (key, value, context) => {
        seen = context && context.source;
        return value;
      });
    } catch {
      return false;
    }
    return seen === "1";
  })();
  const INTEGER = /^-?[0-9]+$/;

  function bySource(key, value, context) {
    if (typeof value === "number" && context && INTEGER.test(context.source)) {
      return BigInt(context.source);
    }
    return value;
  }

  // The fallback: every integer token outside a string becomes the string "\0<digits>",
  // turned back into a BigInt by the reviver. (The server never sends a NUL in a string.)
  function quoteIntegers(text) {
    let out = "";
    let start = 0;
    let i = 0;
    while (i < text.length) {
      const c = text[i];
      if (c === '"') {
        i += 1;
        while (i < text.length && text[i] !== '"') i += text[i] === "\\" ? 2 : 1;
        i += 1;
      } else if (c === "-" || (c >= "0" && c <= "9")) {
        let j = i + 1;
        while (j < text.length && "0123456789.eE+-".includes(text[j])) j += 1;
        const token = text.slice(i, j);
        if (INTEGER.test(token)) {
          out += text.slice(start, i) + '"\\u0000' + token + '"';
          start = j;
        }
        i = j;
      } else {
        i += 1;
      }
    }
    return out + text.slice(start);
  }

  function byMarker(key, value) {
    if (typeof value === "string" && value.startsWith("\0")) return BigInt(value.slice(1));
    return value;
  }

  const parseExact = sourceText
    ? (text) => JSON.parse(text, bySource)
    : (text) => JSON.parse(quoteIntegers(text), byMarker);

  function isInt(value) {
    return typeof value === "bigint";
  }

  function signed(delta) {
    return delta < 0n ? "\u2212" + (-delta).toString() : "+" + delta.toString();
  }

  // ---- Storage (may be unavailable: private modes, disabled cookies) ---------------------

  function stored(key) {
    try {
      return window.localStorage.getItem(key);
    } catch {
      return null;
    }
  }

  function store(key, value) {
    try {
      if (value === null) window.localStorage.removeItem(key);
      else window.localStorage.setItem(key, value);
    } catch {
      // Kept for this tab only.
    }
  }

  function randomHex(bytes) {
    const buf = new Uint8Array(bytes);
    crypto.getRandomValues(buf);
    return Array.from(buf, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // ---- State ----------------------------------------------------------------------------

  let clientId = stored("wstally.client");
  if (!clientId || clientId.length > 64) {
    clientId = "web-" + randomHex(8);
    store("wstally.client", clientId);
  }
  // Every tab of this browser shares the client id, hence one id space on the server:
  // ids carry a per-load prefix so that two tabs, or two loads, never reuse one.
  const idPrefix = randomHex(6) + "-";
  const token = new URLSearchParams(window.location.search).get("token");

  const s = {
    conn: "connecting", // connecting, connected, reconnecting
    detail: "",
    everOpened: false,
    ws: null,
    attempt: 0,
    timer: null,
    restart: false,
    sent: new Set(), // ids sent on the current connection
    name: validName(stored("wstally.name")),
    epoch: null,
    seq: null, // BigInt once the first snapshot arrived
    total: null,
    clients: null,
    recovering: false,
    nextId: 0,
    outbox: new Map(), // id -> delta (BigInt), in the order added
    own: new Set(), // seqs of our acked adds
    owned: 0, // acks so far: the list re-checks its marks when this moves
    recent: [], // the latest updates: {n, seq, delta, total, by}, n counting every one
    listed: 0,
    buckets: [], // chart: {t, first, min, max, last}
    notice: "",
  };

  function validName(name) {
    if (typeof name !== "string") return null;
    const trimmed = name.trim();
    const length = [...trimmed].length;
    return length >= 1 && length <= 32 && NAME.test(trimmed) ? trimmed : null;
  }

  // ---- The connection -------------------------------------------------------------------

  function wsUrl() {
    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    const query = token === null ? "" : "?token=" + encodeURIComponent(token);
    return scheme + "//" + window.location.host + "/" + query;
  }

  function connect() {
    clearTimeout(s.timer);
    s.timer = null;
    let ws;
    try {
      ws = new WebSocket(wsUrl(), SUBPROTOCOL);
    } catch (error) {
      retry(String(error));
      return;
    }
    s.ws = ws;
    setConn(s.everOpened ? "reconnecting" : "connecting", "");
    // A handshake the network swallowed fails here rather than after the browser's own,
    // much longer, timeout; closing it leads to closed() and the next attempt.
    setTimeout(() => {
      if (ws.readyState === WebSocket.CONNECTING) ws.close();
    }, OPEN_TIMEOUT);
    ws.onopen = () => opened(ws);
    ws.onmessage = (event) => {
      if (typeof event.data === "string") receive(event.data);
    };
    ws.onclose = (event) => closed(ws, event);
  }

  function opened(ws) {
    // Hello goes first, before anything is read: the server holds the snapshot (or, for a
    // returning tab, the replay of what it missed) until it has seen it.
    const fields = ['"type":"hello"', '"client":' + JSON.stringify(clientId)];
    if (s.name !== null) fields.push('"name":' + JSON.stringify(s.name));
    if (s.epoch !== null) {
      fields.push('"since":' + s.seq.toString(), '"epoch":' + JSON.stringify(s.epoch));
      s.recovering = true;
    }
    ws.send("{" + fields.join(",") + "}");
    s.everOpened = true;
    s.sent = new Set();
    setConn("connected", "");
    sendOutbox();
  }

  function closed(ws, event) {
    if (s.ws !== ws) return;
    s.ws = null;
    s.recovering = false;
    if (s.restart) {
      s.restart = false;
      connect();
      return;
    }
    let why = event.code === 1006 ? "connection lost" : "closed (" + event.code + ")";
    if (event.reason) why = "closed (" + event.code + " " + event.reason + ")";
    retry(why);
  }

  function retry(why) {
    s.attempt += 1;
    const [low, high] = BACKOFF;
    // Exponential backoff with full jitter: a restarted server is not stampeded.
    const delay = low + Math.random() * (Math.min(high, low * 2 ** s.attempt) - low);
    let detail = why + "; retrying in " + delay.toFixed(1) + " s";
    if (!s.everOpened) {
      detail += ". If the server needs a token, open this page as /?token=\u2026";
    }
    setConn("reconnecting", detail);
    s.timer = setTimeout(connect, delay * 1000);
  }

  // A tab that wakes up, or a machine back online, need not wait out its backoff.
  function retryNow() {
    if (s.ws === null && s.timer !== null) connect();
  }
  window.addEventListener("online", retryNow);
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") retryNow();
    invalidate();
  });

  function sendOutbox() {
    const ws = s.ws;
    if (ws === null || ws.readyState !== WebSocket.OPEN) return;
    // Everything unacked goes out again, in order, with its original id and delta.
    for (const [id, delta] of s.outbox) {
      if (s.sent.has(id)) continue;
      s.sent.add(id);
      ws.send('{"type":"add","delta":' + delta.toString() + ',"id":' + JSON.stringify(id) + "}");
    }
  }

  function add(delta) {
    s.nextId += 1;
    s.outbox.set(idPrefix + s.nextId, delta);
    sendOutbox();
    invalidate();
  }

  // ---- Server messages --------------------------------------------------------------------

  function receive(text) {
    let msg;
    try {
      msg = parseExact(text);
    } catch {
      return; // a frame we cannot read is not worth the connection
    }
    if (msg === null || typeof msg !== "object") return;
    try {
      switch (msg.type) {
        case "snapshot":
          onSnapshot(msg);
          break;
        case "updates":
          onUpdates(msg);
          break;
        case "ack":
          onAck(msg);
          break;
        case "error":
          onError(msg);
          break;
        case "presence":
          if (isInt(msg.clients)) s.clients = msg.clients;
          break;
        default:
          return;
      }
    } catch {
      return; // malformed fields: dropped like an unreadable frame
    }
    invalidate();
  }

  function onSnapshot(msg) {
    if (!isInt(msg.seq) || !isInt(msg.total) || typeof msg.epoch !== "string") return;
    s.attempt = 0; // served, not just accepted: the backoff starts over
    if (s.recovering) {
      if (!("recovered" in msg)) return; // the connect-time snapshot: the replay follows
      s.recovering = false;
      if (msg.recovered === true && msg.seq === s.seq) {
        if (isInt(msg.clients)) s.clients = msg.clients;
        return; // every update we missed was replayed
      }
    }
    const newHistory = s.epoch !== null && msg.epoch !== s.epoch;
    if (newHistory) {
      s.notice = "The server started a new history (its epoch changed).";
    } else if (s.epoch !== null && msg.seq > s.seq) {
      const missed = msg.seq - s.seq;
      const reason = typeof msg.reason === "string" ? " (" + msg.reason + ")" : "";
      s.notice =
        missed + " updates were not shown one by one" + reason + "; the total includes them.";
    }
    s.epoch = msg.epoch;
    s.seq = msg.seq;
    s.total = msg.total;
    if (isInt(msg.clients)) s.clients = msg.clients;
    plot(Date.now(), msg.total);
  }

  function onUpdates(msg) {
    if (s.seq === null || !Array.isArray(msg.items)) return;
    // Only what continues our position counts: during a replay, a live frame that got
    // ahead of it is dropped (the replay covers it); a repeat is dropped too.
    const fresh = [];
    let seq = s.seq;
    for (const item of msg.items) {
      if (!isInt(item.seq) || !isInt(item.delta) || !isInt(item.total)) continue;
      if (item.seq === seq + 1n || (!s.recovering && item.seq > seq)) {
        fresh.push(item);
        seq = item.seq;
      }
    }
    if (fresh.length === 0) return;
    const now = Date.now();
    for (const item of fresh) plot(now, item.total);
    for (const item of fresh.slice(-RECENT)) {
      const by = typeof item.by === "string" ? item.by : null;
      s.listed += 1;
      s.recent.push({ n: s.listed, seq: item.seq, delta: item.delta, total: item.total, by });
    }
    if (s.recent.length > RECENT) s.recent.splice(0, s.recent.length - RECENT);
    const last = fresh[fresh.length - 1];
    s.seq = last.seq;
    s.total = last.total;
  }

  function onAck(msg) {
    const delta = s.outbox.get(msg.id);
    if (delta === undefined || !isInt(msg.seq)) return; // an answer to a resend we had
    s.outbox.delete(msg.id);
    s.own.add(msg.seq);
    s.owned += 1;
    if (s.own.size > OWN_KEPT) s.own.delete(s.own.values().next().value);
    const again = msg.duplicate === true ? " (already counted)" : "";
    s.notice = signed(delta) + " acknowledged as #" + msg.seq + again + ".";
  }

  function onError(msg) {
    const code = String(msg.code);
    const message = typeof msg.message === "string" ? msg.message : code;
    const id = typeof msg.id === "string" ? msg.id : null;
    if (id !== null && s.outbox.has(id)) {
      if (TRANSIENT.has(code)) {
        // "Not now": send it again shortly, same id, on this connection or the next.
        const sent = s.sent;
        setTimeout(() => {
          sent.delete(id);
          if (sent === s.sent) sendOutbox();
        }, RETRY_TRANSIENT);
        s.notice = "Not applied yet (" + message + "); it will be sent again.";
        return;
      }
      const delta = s.outbox.get(id);
      s.outbox.delete(id);
      s.notice = signed(delta) + " refused: " + message;
      return;
    }
    s.notice = "The server says: " + message;
  }

  // ---- The chart's data: bounded buckets -------------------------------------------------

  function plot(now, total) {
    const t = now - (now % BUCKET);
    const last = s.buckets[s.buckets.length - 1];
    if (last !== undefined && last.t === t) {
      if (total < last.min) last.min = total;
      if (total > last.max) last.max = total;
      last.last = total;
      return;
    }
    s.buckets.push({ t, first: total, min: total, max: total, last: total });
    const oldest = now - WINDOW - BUCKET;
    let drop = 0;
    // Keep one bucket from before the window: the line enters from the left edge.
    while (drop + 1 < s.buckets.length && s.buckets[drop + 1].t < oldest) drop += 1;
    if (drop > 0) s.buckets.splice(0, drop);
  }

  // ---- Rendering: at most once per animation frame ---------------------------------------

  const $ = (id) => document.getElementById(id);
  const el = {
    body: document.body,
    state: $("state"),
    total: $("total"),
    seq: $("seq"),
    clients: $("clients"),
    epoch: $("epoch"),
    notice: $("notice"),
    pending: $("pending"),
    outbox: $("outbox"),
    updates: $("updates"),
    line: $("line"),
    yMax: $("y-max"),
    yMin: $("y-min"),
    form: $("add-form"),
    delta: $("delta"),
    plusOne: $("plus-one"),
    minusOne: $("minus-one"),
    name: $("name"),
    saveName: $("save-name"),
    clientId: $("client-id"),
  };

  let scheduled = false;
  function invalidate() {
    if (scheduled) return;
    scheduled = true;
    requestAnimationFrame(render);
  }

  function setConn(conn, detail) {
    s.conn = conn;
    s.detail = detail;
    invalidate();
  }

  function text(node, value) {
    if (node.textContent !== value) node.textContent = value;
  }

  function render() {
    scheduled = false;
    el.body.dataset.state = s.conn;
    text(el.state, s.detail ? s.conn + ": " + s.detail : s.conn);
    text(el.total, s.total === null ? "\u2026" : s.total.toString());
    text(el.seq, s.seq === null ? "\u2026" : s.seq.toString());
    text(el.clients, s.clients === null ? "\u2026" : s.clients.toString());
    text(el.epoch, s.epoch === null ? "\u2026" : s.epoch);
    text(el.notice, s.notice);
    text(el.pending, String(s.outbox.size));
    renderOutbox();
    renderRecent();
    const wait = chartDrawn + CHART_EVERY - performance.now();
    if (wait <= 0) {
      chartDrawn = performance.now();
      renderChart();
    } else if (chartTimer === null) {
      chartTimer = setTimeout(() => {
        chartTimer = null;
        invalidate();
      }, wait);
    }
  }

  let chartDrawn = -Infinity;
  let chartTimer = null;

  let outboxShown = "";
  function renderOutbox() {
    const ids = [...s.outbox.keys()].slice(0, OUTBOX_SHOWN);
    const key = ids.join(",") + "|" + s.outbox.size;
    if (key === outboxShown) return;
    outboxShown = key;
    const rows = ids.map((id) => {
      const li = document.createElement("li");
      li.textContent = signed(s.outbox.get(id)) + " waiting for its ack";
      return li;
    });
    if (s.outbox.size > ids.length) {
      const li = document.createElement("li");
      li.textContent = "and " + (s.outbox.size - ids.length) + " more";
      rows.push(li);
    }
    el.outbox.replaceChildren(...rows);
  }

  // Only the rows that are new are built: at a thousand updates a second that is a dozen
  // or so per frame, not the whole list.
  let listedShown = 0;
  let ownedShown = 0;
  function renderRecent() {
    const fresh = s.recent.filter((u) => u.n > listedShown);
    if (fresh.length > 0) {
      listedShown = fresh[fresh.length - 1].n;
      el.updates.prepend(...fresh.reverse().map(row));
      while (el.updates.childElementCount > RECENT) el.updates.lastElementChild.remove();
    }
    if (s.owned !== ownedShown) {
      ownedShown = s.owned;
      for (const li of el.updates.children) mark(li);
    }
  }

  function row(u) {
    const li = document.createElement("li");
    li.dataset.seq = u.seq.toString();
    li.append(
      span("seq", "#" + u.seq),
      span("delta", signed(u.delta)),
      span("arrow", "\u2192"),
      span("sum", u.total.toString()),
      span(u.by === null ? "by anonymous" : "by", u.by === null ? "anonymous" : u.by),
    );
    mark(li);
    return li;
  }

  function mark(li) {
    if (!li.classList.contains("own") && s.own.has(BigInt(li.dataset.seq))) {
      li.classList.add("own");
      li.append(span("mine", "you \u2713"));
    }
  }

  function span(className, value) {
    const node = document.createElement("span");
    node.className = className;
    node.textContent = value; // text, never markup: names come from other people
    return node;
  }

  function renderChart() {
    const now = Date.now();
    const start = now - WINDOW;
    const buckets = s.buckets;
    if (buckets.length === 0 || s.total === null) {
      el.line.setAttribute("points", "");
      text(el.yMax, "");
      text(el.yMin, "");
      return;
    }
    let lo = s.total;
    let hi = s.total;
    for (const b of buckets) {
      if (b.min < lo) lo = b.min;
      if (b.max > hi) hi = b.max;
    }
    // BigInt differences are exact; only the pixel position is rounded.
    const range = hi - lo;
    const y = (v) => (range === 0n ? 150 : 290 - (Number(v - lo) / Number(range)) * 280).toFixed(1);
    const x = (t) => Math.max(0, ((t - start) / WINDOW) * 1000).toFixed(1);
    const points = [];
    for (const b of buckets) {
      const bx = x(b.t);
      points.push(bx + "," + y(b.first), bx + "," + y(b.min), bx + "," + y(b.max));
      points.push(bx + "," + y(b.last));
    }
    points.push("1000," + y(s.total));
    el.line.setAttribute("points", points.join(" "));
    text(el.yMax, hi.toString());
    text(el.yMin, lo.toString());
  }

  // The chart moves with the clock even when nothing happens.
  setInterval(invalidate, 1000);

  // ---- Input ------------------------------------------------------------------------------

  function submitted(event) {
    event.preventDefault();
    const raw = el.delta.value;
    const match = raw.length <= 40 ? NUMBER.exec(raw) : null;
    if (match === null) {
      const empty = raw.trim() === "";
      s.notice = empty ? "Type an integer such as 5 or -3." : "Not an integer: try 5, -3 or +12.";
      invalidate();
      return;
    }
    const delta = BigInt(match[1] === "-" ? "-" + match[2] : match[2]);
    if (delta < INT64_MIN || delta > INT64_MAX) {
      s.notice = "Outside the signed 64-bit range.";
      invalidate();
      return;
    }
    el.delta.value = "";
    s.notice = "";
    add(delta);
  }

  function nameSaved() {
    const raw = el.name.value.trim();
    const name = raw === "" ? null : validName(raw);
    if (raw !== "" && name === null) {
      s.notice = "A name is 1 to 32 letters, digits, spaces, punctuation or symbols.";
      invalidate();
      return;
    }
    s.name = name;
    store("wstally.name", name);
    s.notice = name === null ? "Your adds are now anonymous." : "Your adds now show " + name + ".";
    // The name travels in the hello: reconnect now. The outbox is resent under the same
    // client id, so nothing is counted twice.
    if (s.ws !== null) {
      s.restart = true;
      s.ws.close(1000);
    }
    invalidate();
  }

  el.form.addEventListener("submit", submitted);
  el.plusOne.addEventListener("click", () => add(1n));
  el.minusOne.addEventListener("click", () => add(-1n));
  el.saveName.addEventListener("click", nameSaved);
  el.name.addEventListener("keydown", (event) => {
    if (event.key === "Enter") nameSaved();
  });
  el.name.value = s.name === null ? "" : s.name;
  el.clientId.textContent = clientId;

  connect();
  invalidate();
})();

#!/usr/bin/env node
// The peer server, as a benchmark reference: what a JavaScript developer would write with the
// `ws` package for wstally's protocol, with one optimisation every such developer reaches for,
// coalescing: the updates applied during one turn of the event loop go out as one `updates`
// frame per client, sent from a setImmediate callback.
//
// Memory only, no durability: an ack means "applied in this process", not "on disk". It speaks
// enough of wstally.v1 for scripts/loadtest.py (docs/protocol.md): snapshot on connect, hello,
// add with id -> ack (duplicates answered with the original result), `updates` frames with
// items, coalesced presence, plain mode (`Server records total=N`), and GET /healthz.
// Left out: slow-consumer handling, rate limits, recovery (`since`), tokens, TLS; totals are
// JavaScript numbers, exact up to 2^53 (adds that would leave that range are refused).
//
//   npm ci --prefix benchmarks
//   node benchmarks/node_ws_server.js --port 8767
"use strict";

const crypto = require("node:crypto");
const http = require("node:http");
const { parseArgs } = require("node:util");
const { WebSocketServer, WebSocket } = require("ws");

const PROTOCOL = "wstally.v1";
const MAX_ITEMS = 256; // items per updates frame (docs/protocol.md, section 4.5)
const ID_MEMORY = 100000; // ids remembered for duplicate detection (section 4.4)
const PRESENCE_MS = 100;
const PING_MS = 20000;
const NUMBER = /^[ \t\r\n]*[+-]?[0-9]+[ \t\r\n]*$/;

const epoch = crypto.randomBytes(8).toString("hex");
let seq = 0;
let total = 0;
let pending = []; // items applied since the last flush
let flushScheduled = false;
let presenceTimer = null;

// Duplicate detection: scope + id -> [seq, total], forgetting the oldest past ID_MEMORY (a ring
// of keys: Array.prototype.shift on a 100,000-element array copies it).
const results = new Map();
const ring = new Array(ID_MEMORY);
let ringAt = 0;

function send(ws, message) {
  if (ws.readyState === WebSocket.OPEN) ws.send(message);
}

function error(ws, code, message, id) {
  const frame = { type: "error", code, message };
  if (id !== undefined) frame.id = id;
  send(ws, JSON.stringify(frame));
}

function remember(key, result) {
  const oldest = ring[ringAt];
  if (oldest !== undefined) results.delete(oldest);
  ring[ringAt] = key;
  ringAt = (ringAt + 1) % ID_MEMORY;
  results.set(key, result);
}

function apply(delta, by) {
  if (!Number.isSafeInteger(total + delta)) return null;
  seq += 1;
  total += delta;
  pending.push({ seq, delta, total, by });
  if (!flushScheduled) {
    flushScheduled = true;
    setImmediate(flush);
  }
  return [seq, total];
}

// Once per event-loop turn: one frame for every JSON client, one line per update for plain ones.
function flush() {
  flushScheduled = false;
  const items = pending;
  pending = [];
  const frames = [];
  for (let i = 0; i < items.length; i += MAX_ITEMS) {
    const chunk = items.slice(i, i + MAX_ITEMS);
    const last = chunk[chunk.length - 1];
    frames.push(
      JSON.stringify({ type: "updates", seq: last.seq, total: last.total, items: chunk }),
    );
  }
  let lines = null;
  for (const client of wss.clients) {
    if (client.readyState !== WebSocket.OPEN) continue;
    if (client.protocol === PROTOCOL) {
      for (const frame of frames) client.send(frame);
    } else {
      lines = lines || items.map((item) => `Server records total=${item.total}`);
      for (const line of lines) client.send(line);
    }
  }
}

function schedulePresence() {
  if (presenceTimer) return;
  presenceTimer = setTimeout(() => {
    presenceTimer = null;
    const clients = wss.clients.size;
    const frame = JSON.stringify({ type: "presence", clients });
    for (const client of wss.clients) {
      if (client.protocol === PROTOCOL && client.toldClients !== clients) {
        client.toldClients = clients;
        send(client, frame);
      }
    }
  }, PRESENCE_MS);
}

function onJson(ws, data, isBinary) {
  if (isBinary) return error(ws, "binary_unsupported", "binary frames are not supported");
  let msg;
  try {
    msg = JSON.parse(data);
  } catch {
    return error(ws, "bad_json", "not valid JSON");
  }
  if (msg === null || typeof msg !== "object" || typeof msg.type !== "string") {
    return error(ws, "bad_message", "expected a JSON object with a string 'type'");
  }
  if (msg.type === "hello") return onHello(ws, msg);
  if (msg.type === "add") return onAdd(ws, msg);
  return error(ws, "unknown_type", `unknown type ${JSON.stringify(msg.type).slice(0, 40)}`);
}

function onHello(ws, msg) {
  if (ws.said) return error(ws, "hello_late", "hello is only allowed once, before any add");
  if (typeof msg.client !== "string" || msg.client.length < 1 || msg.client.length > 64) {
    return error(ws, "bad_client", "'client' must be a string of 1-64 characters");
  }
  if (msg.name != null && (typeof msg.name !== "string" || msg.name.length > 32)) {
    return error(ws, "bad_name", "'name' must be a string of 1-32 characters");
  }
  ws.said = true;
  ws.scope = msg.client;
  ws.name = msg.name == null ? null : msg.name;
}

function onAdd(ws, msg) {
  const id = msg.id == null ? undefined : msg.id;
  if (id !== undefined && (typeof id !== "string" || id.length < 1 || id.length > 64)) {
    return error(ws, "bad_id", "'id' must be a string of 1-64 characters");
  }
  ws.said = true;
  if (!Number.isSafeInteger(msg.delta)) {
    return error(ws, "bad_delta", "'delta' must be an integer", id);
  }
  const key = id === undefined ? null : `${ws.scope}\u0000${id}`;
  const known = key === null ? undefined : results.get(key);
  if (known !== undefined) {
    const [s, t] = known;
    return send(ws, JSON.stringify({ type: "ack", id, seq: s, total: t, duplicate: true }));
  }
  const result = apply(msg.delta, ws.name);
  if (result === null) return error(ws, "overflow", "the total would leave the safe range", id);
  if (key !== null) {
    remember(key, result);
    send(ws, JSON.stringify({ type: "ack", id, seq: result[0], total: result[1] }));
  }
}

function onPlain(ws, data, isBinary) {
  if (isBinary) return send(ws, "error: binary frames are not supported; send text");
  const text = data.toString();
  if (text.length > 40 || !NUMBER.test(text)) {
    return send(ws, `error: not an integer: ${JSON.stringify(text.slice(0, 40))}`);
  }
  const delta = Number(text.trim());
  if (!Number.isSafeInteger(delta) || apply(delta, null) === null) {
    send(ws, "error: the total would leave the safe range; total unchanged");
  }
}

function health(res) {
  const body = { status: "ok", seq, total, clients: wss.clients.size, epoch };
  res.writeHead(200, { "Content-Type": "application/json" });
  res.end(`${JSON.stringify(body)}\n`);
}

const wss = new WebSocketServer({
  noServer: true,
  maxPayload: 8192,
  perMessageDeflate: false,
  handleProtocols: (protocols) => (protocols.has(PROTOCOL) ? PROTOCOL : false),
});

wss.on("connection", (ws) => {
  ws.isAlive = true;
  ws.on("pong", () => {
    ws.isAlive = true;
  });
  if (ws.protocol === PROTOCOL) {
    ws.scope = crypto.randomUUID(); // ids without a hello are scoped by the connection
    ws.name = null;
    ws.toldClients = wss.clients.size;
    // Published position: what was flushed, so the first updates frame continues from it.
    const published = pending.length ? pending[0].seq - 1 : seq;
    const publishedTotal = pending.length ? pending[0].total - pending[0].delta : total;
    send(ws, JSON.stringify({
      type: "snapshot", epoch, seq: published, total: publishedTotal, clients: ws.toldClients,
    }));
    ws.on("message", (data, isBinary) => onJson(ws, data, isBinary));
  } else {
    ws.on("message", (data, isBinary) => onPlain(ws, data, isBinary));
  }
  ws.on("close", schedulePresence);
  schedulePresence();
});

const server = http.createServer((req, res) => {
  if (req.method === "GET" && req.url.split("?")[0] === "/healthz") return health(res);
  res.writeHead(404, { "Content-Type": "text/plain" });
  res.end("Not found: try /healthz, or / for WebSocket\n");
});

server.on("upgrade", (req, socket, head) => {
  const offered = (req.headers["sec-websocket-protocol"] || "").trim();
  const refuse = (status, text) => {
    socket.end(`HTTP/1.1 ${status}\r\nContent-Type: text/plain\r\nConnection: close\r\n` +
      `Content-Length: ${Buffer.byteLength(text)}\r\n\r\n${text}`);
  };
  if (req.url.split("?")[0] !== "/") {
    return refuse("404 Not Found", "Not found: the WebSocket endpoint is /");
  }
  if (offered && !offered.split(",").some((p) => p.trim() === PROTOCOL)) {
    return refuse("400 Bad Request", "unsupported subprotocol; this server speaks wstally.v1");
  }
  wss.handleUpgrade(req, socket, head, (ws) => wss.emit("connection", ws, req));
});

// Keepalive, the usual ws pattern: a peer that missed the last ping is dropped.
const heartbeat = setInterval(() => {
  for (const ws of wss.clients) {
    if (!ws.isAlive) {
      ws.terminate();
      continue;
    }
    ws.isAlive = false;
    ws.ping();
  }
}, PING_MS);

function stop() {
  clearInterval(heartbeat);
  for (const ws of wss.clients) ws.close(1001);
  server.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 2000).unref();
}

const { values } = parseArgs({
  options: {
    host: { type: "string", default: "127.0.0.1" },
    port: { type: "string", default: "8767" },
  },
});
process.on("SIGINT", stop);
process.on("SIGTERM", stop);
server.listen({ host: values.host, port: Number(values.port), backlog: 4096 }, () => {
  const { port } = server.address();
  console.log(JSON.stringify({ event: "server.started", port, epoch }));
});

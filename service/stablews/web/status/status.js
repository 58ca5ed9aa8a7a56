// The status page: the figures of /api/v1/websocket/stats, the recent drops, and a live stream
// through the browser client. Everything from the server is put into the page as text, never
// as markup (client names and causes are not trusted).
import { StableClient } from "/client/stablews.js";

const meta = (name) => document.querySelector(`meta[name="stablews-${name}"]`)?.content ?? "";
const query = new URLSearchParams(location.search);
const fragment = new URLSearchParams(location.hash.slice(1)); // #token=… stays out of access logs
const config = {
  wsPath: meta("ws-path") || "/ws",
  traceUrl: meta("trace-url"),
  channel: query.get("channel") || meta("demo-channel"),
  refresh: Math.min(Math.max(Number(query.get("refresh")) || 2, 0.25), 60),
  token: fragment.get("token") || null,
};
const KEY_STORE = "stablews-api-key";

// ------------------------------------------------------------------ formatting

const dash = "–";
const count = (v) => (typeof v === "number" ? v.toLocaleString("en-US") : dash);
const fixed = (digits) => (v) => (typeof v === "number" ? v.toFixed(digits) : dash);
const percent = (v) => (typeof v === "number" ? `${(v * 100).toFixed(1)}%` : dash);
const seconds = (v) => {
  if (typeof v !== "number") return dash;
  if (v < 120) return `${v.toFixed(1)} s`;
  if (v < 7200) return `${(v / 60).toFixed(1)} min`;
  if (v < 172800) return `${(v / 3600).toFixed(1)} h`;
  return `${(v / 86400).toFixed(1)} d`;
};
const pairs = (object) => {
  const entries = Object.entries(object ?? {});
  return entries.length ? entries.map(([k, v]) => `${k} ${typeof v === "number" ? count(v) : v}`).join(", ")
    : "none";
};

function figure(name, text) {
  for (const node of document.querySelectorAll(`[data-figure="${name}"]`)) node.textContent = text;
}

function element(tag, text, attributes = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  return node;
}

// ------------------------------------------------------------------ the HTTP figures

function apiHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { "X-API-Key": key } : {};
}

async function getJson(path) {
  const response = await fetch(path, { headers: apiHeaders(), cache: "no-store" });
  if (response.status === 401 || response.status === 403) {
    const err = new Error(response.status === 401 ? "needs the API key" : "refused");
    err.status = response.status;
    throw err;
  }
  if (!response.ok && response.status !== 503) throw new Error(`HTTP ${response.status}`);
  return response.json();
}

let lastStatsAt = null;

function renderStats(stats) {
  const badge = document.getElementById("status");
  badge.textContent = stats.status;
  badge.className = `badge ${stats.status}`;
  const reasons = document.getElementById("reasons");
  reasons.hidden = !stats.reasons?.length;
  reasons.textContent = (stats.reasons ?? []).join(" · ");
  figure("instance", stats.instance);
  figure("version", stats.version);
  figure("uptime", seconds(stats.uptime_seconds));
  figure("readiness", stats.draining ? "draining" : stats.ready ? "ready" : "not ready");

  const c = stats.connections;
  for (const name of ["active", "peak", "opened_total", "closed_total", "healthy", "unhealthy", "stale"]) {
    figure(`connections.${name}`, count(c[name]));
  }
  figure("connections.closed_by_cause", pairs(c.closed_by_cause));
  figure("connections.average_health_score", fixed(1)(c.average_health_score));
  figure("connections.unhealthy_ratio", percent(c.unhealthy_ratio));
  const total = c.active || 0;
  const healthyShare = total ? (c.healthy / total) * 100 : 0;
  const unhealthyShare = total ? (c.unhealthy / total) * 100 : 0;
  document.getElementById("bar-healthy").style.width = `${healthyShare}%`;
  document.getElementById("bar-unhealthy").style.width = `${unhealthyShare}%`;

  const h = stats.heartbeats;
  for (const q of ["p50", "p95", "p99", "max"]) figure(`heartbeats.rtt_ms.${q}`, fixed(1)(h.rtt_ms[q]));
  figure("heartbeats.rtt_ms.samples", count(h.rtt_ms.samples));
  figure("heartbeats.missed_ratio", percent(h.missed_ratio));
  figure("heartbeats.period", `${seconds(h.interval_ms / 1000)} / ${seconds(h.timeout_ms / 1000)}`);

  const m = stats.messages;
  figure("messages.messages_sent_per_second", fixed(1)(m.messages_sent_per_second));
  figure("messages.messages_received_per_second", fixed(1)(m.messages_received_per_second));
  figure("messages.errors_per_second", fixed(2)(m.errors_per_second));
  figure("messages.sent_total", count(m.sent_total));
  figure("errors.total", count(stats.errors?.total));
  const lag = stats.telemetry?.event_loop_lag?.last_ms;
  figure("telemetry.event_loop_lag.last_ms", typeof lag === "number" ? `${lag.toFixed(1)} ms` : dash);

  const r = stats.recovery;
  for (const name of ["resumes_requested", "recovered", "not_recovered", "messages_replayed"]) {
    figure(`recovery.${name}`, count(r[name]));
  }
  figure("recovery.success_rate", percent(r.success_rate));
  const broker = stats.broker ?? {};
  figure("broker", `${broker.type ?? dash}${broker.ready === false ? " (unavailable)" : ""}`);
  figure("circuit_breakers", pairs(stats.circuit_breakers));
}

function renderScores(listing) {
  const buckets = [[0, 25], [25, 50], [50, 75], [75, 90], [90, 101]];
  const counts = buckets.map(() => 0);
  for (const conn of listing.connections) {
    const score = conn.health?.score;
    if (typeof score !== "number") continue;
    const at = buckets.findIndex(([low, high]) => score >= low && score < high);
    if (at >= 0) counts[at] += 1;
  }
  const most = Math.max(1, ...counts);
  const list = document.getElementById("scores");
  list.replaceChildren(...buckets.map(([low, high], i) => {
    const item = element("li", null, { "data-bucket": `${low}-${Math.min(high, 100)}` });
    const bar = element("span", null, { class: "fill" });
    bar.style.width = `${(counts[i] / most) * 100}%`;
    item.append(element("span", `${low}–${Math.min(high, 100)}`, { class: "label" }), bar,
      element("span", count(counts[i]), { class: "count" }));
    return item;
  }));
  figure("scores.note", listing.returned < listing.total
    ? `(first ${count(listing.returned)} of ${count(listing.total)})`
    : `(${count(listing.total)} connection${listing.total === 1 ? "" : "s"})`);
}

function traceCell(traceId) {
  const cell = element("td");
  if (!traceId) {
    cell.textContent = dash;
    return cell;
  }
  if (config.traceUrl) {
    const href = config.traceUrl.replace("{trace_id}", encodeURIComponent(traceId));
    cell.append(element("a", traceId, { href, target: "_blank", rel: "noopener", class: "trace" }));
  } else {
    cell.append(element("code", traceId, { class: "trace" }));
  }
  return cell;
}

function renderDrops(listing) {
  const rows = listing.drops.map((drop) => {
    const row = element("tr", null, { "data-connection": drop.connection });
    const clientName = drop.client?.name ?? drop.client?.user_agent ?? "";
    row.append(
      element("td", new Date(drop.at * 1000).toLocaleTimeString("en-GB")),
      element("td", drop.connection),
      element("td", drop.cause, { class: "cause" }),
      element("td", drop.code ?? dash),
      element("td", seconds(drop.duration_s)),
      element("td", fixed(1)(drop.health_score)),
      element("td", typeof drop.last_rtt_ms === "number" ? `${drop.last_rtt_ms.toFixed(1)} ms` : dash),
      element("td", count(drop.missed_heartbeats)),
      element("td", `${drop.client?.address ?? ""} ${clientName}`.trim() || dash),
      traceCell(drop.trace_id),
    );
    return row;
  });
  document.querySelector("#drops tbody").replaceChildren(...rows);
  figure("drops.note", listing.recorded_total
    ? `(${count(listing.returned)} latest of ${count(listing.recorded_total)} recorded)` : "(none recorded)");
}

function needKey(note) {
  figure(note, "(needs the API key)");
  document.getElementById("api-key-form").hidden = false;
}

async function refreshAdminViews() {
  try {
    renderDrops(await getJson("/api/v1/websocket/drops?limit=20"));
  } catch (exc) {
    if (exc.status === 401) needKey("drops.note");
    else figure("drops.note", `(unavailable: ${exc.message})`);
  }
  try {
    renderScores(await getJson("/api/v1/websocket/connections?limit=1000"));
  } catch (exc) {
    if (exc.status === 401) needKey("scores.note");
    else figure("scores.note", `(unavailable: ${exc.message})`);
  }
}

async function refreshLoop() {
  try {
    const stats = await getJson("/api/v1/websocket/stats");
    renderStats(stats);
    lastStatsAt = Date.now();
    status.stats = stats;
    document.body.classList.remove("unreachable");
    figure("freshness", `updated ${new Date(lastStatsAt).toLocaleTimeString("en-GB")}`);
    await refreshAdminViews();
  } catch (exc) {
    document.body.classList.add("unreachable");
    const since = lastStatsAt ? ` (figures from ${new Date(lastStatsAt).toLocaleTimeString("en-GB")})` : "";
    figure("freshness", `server unreachable: ${exc.message}${since}`);
  }
  setTimeout(refreshLoop, config.refresh * 1000);
}

document.getElementById("api-key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORE, document.getElementById("api-key").value);
  document.getElementById("api-key-form").hidden = true;
  refreshAdminViews();
});

// ------------------------------------------------------------------ the live stream

const LOG_KEEP = 50;
const RECEIVED_KEEP = 20000;

function log(text, kind = "") {
  const list = document.getElementById("client-log");
  list.prepend(element("li", `${new Date().toLocaleTimeString("en-GB")} ${text}`, { class: kind }));
  while (list.children.length > LOG_KEEP) list.lastElementChild.remove();
}

function renderClientFigures(client) {
  const s = client.stats();
  for (const name of ["messages_received", "drops", "channels_resumed", "messages_replayed", "channels_resynced",
    "gaps", "duplicates_dropped", "attempts"]) {
    figure(`client.${name}`, count(s[name]));
  }
  figure("client.circuit_state", s.circuit_state);
  figure("client.time_to_recover", s.time_to_recover_seconds.last === null ? dash
    : `${s.time_to_recover_seconds.last.toFixed(2)} s`);
  const pos = client.position(config.channel);
  figure("client.epoch", pos ? pos.epoch : dash);
  figure("client.offset", pos ? count(pos.offset) : dash);
}

function renderTick(msg) {
  const data = msg.data && typeof msg.data === "object" ? msg.data : { value: msg.data };
  const key = String(data.symbol ?? msg.channel);
  const body = document.querySelector("#ticker tbody");
  let row = [...body.children].find((tr) => tr.dataset.symbol === key);
  const price = typeof data.price === "number" ? data.price : null;
  if (!row) {
    row = element("tr", null, { "data-symbol": key });
    row.append(element("td", key), element("td"), element("td"), element("td"));
    body.append(row);
    [...body.children].sort((a, b) => a.dataset.symbol.localeCompare(b.dataset.symbol)).forEach((tr) => body.append(tr));
  }
  const [, priceCell, offsetCell, atCell] = row.children;
  const previous = Number(row.dataset.price);
  priceCell.textContent = price === null ? JSON.stringify(data).slice(0, 80)
    : price.toLocaleString("en-US", { maximumFractionDigits: 6 });
  priceCell.className = price === null || Number.isNaN(previous) ? "" : price >= previous ? "up" : "down";
  row.dataset.price = String(price);
  offsetCell.textContent = count(msg.offset);
  atCell.textContent = typeof msg.ts === "number" ? new Date(msg.ts).toLocaleTimeString("en-GB") : dash;
}

// What the page's client did, for anyone who wants to check it (the tests do): every offset it
// was given, in order, and every resync.
const status = { config, client: null, stats: null, received: [], resyncs: [] };
window.stablewsStatus = status;

function startStream() {
  if (!config.channel) {
    figure("ticker.channel", "(no demo feed here: add ?channel=name to the address to watch a channel)");
    figure("client.state", "off");
    return;
  }
  figure("ticker.channel", config.channel);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const client = new StableClient(`${scheme}://${location.host}${config.wsPath}`, {
    channels: [config.channel], token: config.token, name: "stablews-status-page",
  });
  status.client = client;
  let pending = false;
  const figuresSoon = () => {
    if (pending) return;
    pending = true;
    setTimeout(() => { pending = false; renderClientFigures(client); }, 250);
  };
  client.on("message", (msg) => {
    status.received.push([msg.epoch, msg.offset]);
    if (status.received.length > RECEIVED_KEEP) status.received.splice(0, status.received.length - RECEIVED_KEEP);
    renderTick(msg);
    figuresSoon();
  });
  client.on("state", (state) => {
    const badge = document.getElementById("client-state");
    badge.textContent = state;
    badge.className = `badge ${state}`;
    renderClientFigures(client);
  });
  client.on("connected", (info) => {
    const back = info.recovered_in === null ? "" : ` after ${info.recovered_in.toFixed(2)} s`;
    log(`connected to ${info.server} as ${info.connection}${back}`, "good");
  });
  client.on("disconnected", (info) => log(`dropped: ${info.code ?? "no close code"} ${info.reason ?? ""}`, "bad"));
  client.on("reconnecting", (info) => log(`reconnecting in ${info.delay.toFixed(2)} s (attempt ${info.attempt}, ` +
    `circuit ${info.circuit})`));
  client.on("recovered", (channel, replayed) => log(`${channel} resumed: ${replayed} missed messages replayed`,
    "good"));
  client.on("resync", (channel, info) => {
    status.resyncs.push(info);
    const from = info.previous ? `${info.previous.epoch}@${info.previous.offset}` : "nothing";
    log(`resync ${channel} (${info.reason.replace("_", " ")}): was ${from}, now ${info.current.epoch}@` +
      `${info.current.offset}; history before that is gone`, "resync");
    for (const tr of document.querySelectorAll("#ticker tbody tr")) tr.classList.add("resynced");
  });
  client.on("circuit", (state) => log(`circuit breaker ${state}`, state === "open" ? "bad" : ""));
  client.on("error", (msg) => log(`server error ${msg.code}: ${msg.message}`, "bad"));
  client.connect();
}

startStream();
refreshLoop();

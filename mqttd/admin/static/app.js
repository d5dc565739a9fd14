// mqttd live dashboard: plain JavaScript, no build step, no CDN.
// Polls the admin API (/api/info, /api/stats, /api/topics, /api/clients) every
// POLL_MS, draws message/byte rates on a <canvas>, and shows one client's
// detail page with its "why" view at #/client/ID[?topic=T].
"use strict";

const POLL_MS = 2000;
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("mqttd-admin-token") || "";
let timer = null;

function fmt(n) {
  if (n === null || n === undefined) return "–";
  if (typeof n !== "number") return String(n);
  if (Math.abs(n) >= 1e9) return (n / 1e9).toFixed(1) + "G";
  if (Math.abs(n) >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (Math.abs(n) >= 1e4) return (n / 1e3).toFixed(1) + "k";
  return Number.isInteger(n) ? String(n) : n.toFixed(1);
}

function duration(s) {
  s = Math.floor(s);
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + m + "m " + (s % 60) + "s";
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function api(path) {
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const response = await fetch("/api/" + path, { headers, cache: "no-store" });
  if (response.status === 401) {
    $("login").hidden = false;
    throw new Error("admin token required");
  }
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function setStatus(text, error) {
  const status = $("status");
  status.textContent = text;
  status.className = "status" + (error ? " error" : "");
}

// --- overview ---------------------------------------------------------------------------

function rates(samples) {
  const out = [];
  for (let i = 1; i < samples.length; i++) {
    const a = samples[i - 1], b = samples[i], dt = b.t - a.t;
    if (dt <= 0) continue;
    out.push({ t: b.t, in: (b.messages_in - a.messages_in) / dt,
               out: (b.messages_out - a.messages_out) / dt,
               bytes: (b.bytes_out - a.bytes_out) / dt });
  }
  return out;
}

function drawChart(points) {
  const canvas = $("chart");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 960, height = canvas.clientHeight || 220;
  canvas.width = width * ratio; canvas.height = height * ratio;
  const ctx = canvas.getContext("2d");
  ctx.scale(ratio, ratio);
  ctx.clearRect(0, 0, width, height);
  const pad = { l: 48, r: 56, t: 8, b: 20 };
  const w = width - pad.l - pad.r, h = height - pad.t - pad.b;
  ctx.strokeStyle = "#e3e6eb"; ctx.fillStyle = "#6b7280"; ctx.font = "11px system-ui";
  const maxMsgs = Math.max(1, ...points.map((p) => Math.max(p.in, p.out)));
  const maxBytes = Math.max(1, ...points.map((p) => p.bytes));
  for (let i = 0; i <= 4; i++) {
    const y = pad.t + h - (h * i) / 4;
    ctx.beginPath(); ctx.moveTo(pad.l, y); ctx.lineTo(pad.l + w, y); ctx.stroke();
    ctx.fillText(fmt((maxMsgs * i) / 4), 4, y + 4);
    ctx.fillText(fmt((maxBytes * i) / 4), pad.l + w + 6, y + 4);
  }
  canvas.dataset.points = String(points.length);
  if (points.length < 2) {
    ctx.fillText("collecting samples…", pad.l + 8, pad.t + 16);
    return;
  }
  const t0 = points[0].t, t1 = points[points.length - 1].t, span = Math.max(1, t1 - t0);
  const line = (key, max, color) => {
    ctx.strokeStyle = color; ctx.lineWidth = 2; ctx.beginPath();
    points.forEach((p, i) => {
      const x = pad.l + ((p.t - t0) / span) * w, y = pad.t + h - (p[key] / max) * h;
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
  };
  const css = getComputedStyle(document.documentElement);
  line("in", maxMsgs, css.getPropertyValue("--in").trim() || "#2563eb");
  line("out", maxMsgs, css.getPropertyValue("--out").trim() || "#16a34a");
  line("bytes", maxBytes, css.getPropertyValue("--bytes").trim() || "#d97706");
  ctx.fillStyle = "#6b7280";
  ctx.fillText("-" + duration(span), pad.l, height - 4);
  ctx.fillText("now", pad.l + w - 20, height - 4);
}

function fillTable(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function showHeader(info) {
  $("broker-id").textContent = info.broker_id;
  $("version").textContent = "v" + info.version;
  $("uptime").textContent = "up " + duration(info.uptime);
}

async function refreshOverview() {
  const [info, stats, top, clients] = await Promise.all([
    api("info"), api("stats"), api("topics"), api("clients?sort=queued&limit=50")]);
  showHeader(info);
  $("clients-online").textContent = fmt(info.clients.online);
  $("clients-offline").textContent = fmt(info.clients.offline);
  $("subscriptions").textContent = fmt(info.subscriptions);
  $("retained").textContent = fmt(info.retained);
  $("dropped").textContent = fmt(info.messages.dropped);
  const samples = stats.history.concat(stats.now ? [stats.now] : []);
  const points = rates(samples);
  const last = points[points.length - 1];
  $("rate-in").textContent = last ? fmt(last.in) : "–";
  $("rate-out").textContent = last ? fmt(last.out) : "–";
  $("rate-bytes").textContent = last ? fmt(last.bytes) : "–";
  drawChart(points);
  $("top-since").textContent = top.since === null ? "" : "(since the dashboard opened)";
  fillTable($("top-topics").tBodies[0], top.topics.length ? top.topics.map((t) =>
    el("tr", { class: "topic-row" }, el("td", {}, t.topic), el("td", { class: "num" }, fmt(t.messages))))
    : [el("tr", {}, el("td", { colspan: 2, class: "muted" }, "no messages yet"))]);
  fillTable($("clients").tBodies[0], clients.clients.map((c) => {
    const dropped = Object.values(c.dropped).reduce((a, b) => a + b, 0);
    return el("tr", { class: "client-row", "data-client": c.client_id },
      el("td", {}, el("a", { href: "#/client/" + encodeURIComponent(c.client_id) }, c.client_id)),
      el("td", {}, el("span", { class: "badge " + (c.online ? "online" : "offline") },
                      c.online ? "online" : "offline")),
      el("td", {}, { 3: "3.1", 4: "3.1.1", 5: "5.0" }[c.protocol_level] || c.protocol_level),
      el("td", { class: "num" }, c.subscriptions.length),
      el("td", { class: "num" }, fmt(c.queued)),
      el("td", { class: "num" }, fmt(c.inflight)),
      el("td", { class: "num" }, fmt(dropped)));
  }));
  document.body.dataset.loaded = "overview";
}

// --- one client -------------------------------------------------------------------------

function when(t) {
  return new Date(t * 1000).toLocaleTimeString();
}

async function refreshClient(clientId) {
  showHeader(await api("info"));
  let c;
  try {
    c = await api("clients/" + encodeURIComponent(clientId));
  } catch (error) {
    c = { client_id: clientId, state: "gone", recent: [], subscriptions: [] };
  }
  $("client-id").textContent = clientId;
  const state = $("client-state");
  state.textContent = c.state; state.className = "badge " + c.state;
  const rows = [["protocol", { 3: "3.1", 4: "3.1.1", 5: "5.0" }[c.protocol_level]],
    ["persistent", c.persistent], ["peer", c.peer], ["user name", c.username],
    ["listener", c.listener], ["queued", c.queued], ["queued bytes", c.queued_bytes],
    ["in flight", c.inflight], ["expires at", c.expires_at ? when(c.expires_at) : null],
    ["dropped", c.dropped ? JSON.stringify(c.dropped) : null]];
  $("client-detail").replaceChildren(...rows.filter(([, v]) => v !== undefined && v !== null)
    .flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))]));
  fillTable($("client-subs").tBodies[0], (c.subscriptions || []).map((s) => el("tr", {},
    el("td", {}, el("code", {}, s.topic_filter)), el("td", {}, s.qos),
    el("td", {}, [s.no_local ? "no local" : "", s.retain_as_published ? "RAP" : ""]
      .filter(Boolean).join(", ")))));
  fillTable($("client-recent").tBodies[0], (c.recent || []).slice().reverse().map((i) =>
    el("tr", { class: "incident" }, el("td", {}, when(i.at)), el("td", {}, i.reason),
       el("td", {}, i.text + (i.repeated > 1 ? ` (×${i.repeated})` : "")))));
  document.body.dataset.loaded = "client";
}

async function explain(clientId, topic, qos, publisher) {
  const params = new URLSearchParams({ client: clientId, topic });
  if (qos !== "") params.set("qos", qos);
  if (publisher) params.set("publisher", publisher);
  const target = $("why-result");
  try {
    const answer = await api("why?" + params.toString());
    const steps = el("ol", { class: "steps" }, ...answer.steps.map((s) =>
      el("li", { class: s.ok === false ? "bad" : s.ok ? "good" : "" }, el("b", {}, s.check + ": "), s.detail)));
    const parts = [el("div", { class: "verdict " + answer.verdict, id: "why-verdict" },
                      answer.verdict.toUpperCase() + ": " + answer.summary), steps];
    if (answer.nearest && answer.nearest.length) {
      parts.push(el("h3", {}, "Nearest subscriptions"),
        el("ul", { id: "why-nearest" }, ...answer.nearest.map((n) =>
          el("li", {}, el("code", {}, n.filter), " — " + n.why))));
    }
    target.replaceChildren(...parts);
  } catch (error) {
    target.replaceChildren(el("div", { class: "verdict not-delivered" }, error.message));
  }
  target.dataset.ready = "1";
}

// --- routing and polling ------------------------------------------------------------------

function route() {
  const hash = decodeURIComponent(location.hash.slice(1) || "/");
  const match = hash.match(/^\/client\/([^?]*)(?:\?(.*))?$/);
  clearInterval(timer);
  const run = (fn) => {
    const tick = () => fn().then(() => setStatus("live · " + new Date().toLocaleTimeString()),
                                 (e) => setStatus(e.message, true));
    tick();
    timer = setInterval(tick, POLL_MS);
  };
  if (match) {
    const clientId = match[1];
    const query = new URLSearchParams(match[2] || "");
    $("overview-view").hidden = true;
    $("client-view").hidden = false;
    $("why-result").replaceChildren();
    $("why-form").onsubmit = (event) => {
      event.preventDefault();
      explain(clientId, $("why-topic").value, $("why-qos").value, $("why-publisher").value);
    };
    if (query.get("topic")) {
      $("why-topic").value = query.get("topic");
      $("why-qos").value = query.get("qos") || "";
      explain(clientId, query.get("topic"), query.get("qos") || "", query.get("publisher") || "");
    }
    run(() => refreshClient(clientId));
  } else {
    $("overview-view").hidden = false;
    $("client-view").hidden = true;
    run(refreshOverview);
  }
}

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  token = $("token").value;
  sessionStorage.setItem("mqttd-admin-token", token);
  $("login").hidden = true;
  route();
});
window.addEventListener("hashchange", route);
route();

// costmesh dashboard: a snapshot on connect, then one server-sent event per
// change. Everything from the bus is shown as text (textContent), never as
// markup.
"use strict";

const state = {
  connected: false, gpus: {}, budgets: {}, cache: {}, storage: null, summary: null, jobs: null,
  actions: [], admin: { enabled: false, why: "" }, runs: {}, marks: [], policy: null,
};
// Client-side history for the charts (since the page opened).
const history = { cost: [], costKeys: [], power: {}, powerT: [] };
const HISTORY = 600;
const GUARD_C = 75;
const HIT_TARGET = 0.85;

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k);
  return e;
}
const $ = (id) => document.getElementById(id);
const num = (v, d = 2) => (typeof v === "number" && isFinite(v) ? v.toFixed(d) : "–");
const pct = (v) => (typeof v === "number" && isFinite(v) ? (v * 100).toFixed(1) + " %" : "–");
const time = (t) => { const d = new Date(t); return isNaN(d) ? "" : d.toLocaleTimeString(); };

function setStatus(live, why) {
  const s = $("status");
  s.className = "pill " + (live ? "on" : "off");
  s.textContent = live ? "live" : "disconnected — " + why;
}

// ---- overview ---------------------------------------------------------
function tile(label, value, cls, title) {
  const t = el("div", { class: "tile " + (cls || ""), title: title || "" }, el("div", { class: "v", text: value }), el("div", { class: "l", text: label }));
  return t;
}

function budgetState() {
  const b = state.budgets.total || Object.values(state.budgets)[0];
  if (b) return b.state;
  const s = state.summary;
  const first = s && Array.isArray(s.budgets) && s.budgets[0];
  return first ? String(first.state).replace("BUDGET_STATE_", "").toLowerCase() : "";
}

function renderOverview() {
  const s = state.summary || {};
  const cur = s.currency || "";
  const st = budgetState();
  const cls = st === "exceeded" ? "bad" : st === "warning" ? "warn" : st ? "ok" : "";
  const a = s.attribution || {};
  const tiles = [
    Object.assign(tile("spent of " + num(s.budget) + " " + cur + (st ? " · " + st : ""), num(s.total) + " " + cur, cls), { id: "budget-tile" }),
    tile("month-end forecast", num(s.forecast_month_end) + " " + cur, s.forecast_month_end > s.budget ? "bad" : "ok"),
    tile("idle share of GPU cost", s.total > 0 && typeof a.idle_cost === "number" ? pct(a.idle_cost / s.total) : "–"),
    tile("energy", num(s.energy_kwh, 3) + " kWh"),
    tile("emissions", num(a.carbon_kg, 3) + " kg CO2e"),
    tile("saved by the cache", num(a.saved_by_cache) + " " + cur),
  ];
  $("tiles").replaceChildren(...tiles);
  const k = s.kpis || {};
  const kpis = [
    ["cost / training hour", k.cost_per_training_hour, (v) => v < 1, (v) => num(v)],
    ["cost / inference request", k.cost_per_inference_request, (v) => v < 0.01, (v) => num(v, 4)],
    ["cache hit rate", k.cache_hit_rate, (v) => v >= HIT_TARGET, pct],
    ["GPU utilisation", k.gpu_utilisation, (v) => v > 0.8, pct],
    ["storage utilisation", k.storage_utilisation, (v) => v > 0.7, pct],
    ["network share", k.network_share, (v) => v < 0.05, pct],
    ["forecast accuracy", k.forecast_accuracy, (v) => v >= 0.9, pct],
  ];
  $("kpis").replaceChildren(...kpis.map(([l, v, good, f]) => tile(l, v == null ? "–" : f(v), v == null ? "" : good(v) ? "ok" : "bad", "target: see docs/kpis.md")));
}

// ---- charts (uPlot) ---------------------------------------------------
const charts = {};
function chart(id, keys, data, unit) {
  const host = $(id);
  const width = Math.max(240, host.clientWidth || 400);
  const sig = keys.join("|");
  const c = charts[id];
  if (c && c.sig === sig) {
    c.plot.setData(data);
    if (Math.abs(c.plot.width - width) > 4) c.plot.setSize({ width, height: 180 });
    return;
  }
  if (c) c.plot.destroy();
  const colors = ["#3b6fd8", "#1f8f4e", "#c98a00", "#c8322b", "#7b4fd8", "#158fa8", "#8a8f98", "#d8503b"];
  const opts = {
    width, height: 180,
    scales: { x: { time: true } },
    axes: [{}, { label: unit, size: 60, values: (u, vals) => vals.map((v) => (Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(2))) }],
    series: [{}].concat(keys.map((k, i) => ({ label: k, stroke: colors[i % colors.length], width: 2 }))),
    legend: { live: false },
  };
  charts[id] = { sig, plot: new uPlot(opts, data, host) };
}

function costSeries() {
  const s = state.summary;
  if (!s) return;
  const by = $("cost-by").value;
  const t = Date.now() / 1000;
  const row = {};
  if (by === "category" && s.cost) Object.assign(row, s.cost);
  if (by === "team" && s.teams) Object.assign(row, s.teams);
  history.cost.push([t, row]);
  if (history.cost.length > HISTORY) history.cost.shift();
}

function renderCost() {
  const by = $("cost-by").value;
  const keys = [...new Set(history.cost.flatMap(([, r]) => Object.keys(r)))].sort();
  if (!keys.length) {
    $("cost-chart").replaceChildren(el("div", { class: "muted", text: by === "team" ? "no team costs yet" : "no cost yet" }));
    delete charts["cost-chart"];
    return;
  }
  if (!charts["cost-chart"]) $("cost-chart").replaceChildren();
  const xs = history.cost.map(([t]) => t);
  const data = [xs].concat(keys.map((k) => history.cost.map(([, r]) => (typeof r[k] === "number" ? r[k] : null))));
  chart("cost-chart", keys, data, (state.summary && state.summary.currency) || "");
}

// ---- GPUs -------------------------------------------------------------
function onGpu(g) {
  const key = g.node + "/" + g.gpu;
  state.gpus[key] = g;
  const t = Math.floor(Date.now() / 1000);
  if (history.powerT[history.powerT.length - 1] !== t) {
    history.powerT.push(t);
    for (const k of Object.keys(history.power)) history.power[k].push(null);
    if (history.powerT.length > HISTORY) { history.powerT.shift(); for (const k of Object.keys(history.power)) history.power[k].shift(); }
  }
  if (!history.power[key]) history.power[key] = history.powerT.map(() => null);
  history.power[key][history.powerT.length - 1] = g.power_w;
}

function renderGpus() {
  const rows = Object.keys(state.gpus).sort().map((k) => {
    const g = state.gpus[k];
    const share = g.limit_w > 0 ? Math.min(1, g.power_w / g.limit_w) : 0;
    const bar = el("div", { class: "bar", title: num(g.power_w, 0) + " W of " + num(g.limit_w, 0) + " W" }, el("i"));
    bar.firstChild.style.width = (share * 100).toFixed(0) + "%";
    const hot = g.temp_c >= GUARD_C;
    return el("tr", { "data-gpu": k },
      el("td", { text: k + " " + (g.model || "") }),
      el("td", {}, bar, el("span", { text: num(g.power_w, 0) + " / " + num(g.limit_w, 0) + " W" })),
      el("td", { class: hot ? "hot" : "", text: num(g.temp_c, 1) + " °C" }),
      el("td", { text: (g.util_pct ?? "–") + " %" }),
      el("td", { text: (g.profile || "–") + (g.mode ? " (" + g.mode + ")" : "") }),
      el("td", { text: g.job || "idle" }));
  });
  $("gpu-rows").replaceChildren(...rows);
  const keys = Object.keys(history.power).sort();
  if (keys.length && history.powerT.length) {
    if (!charts["power-chart"]) $("power-chart").replaceChildren();
    chart("power-chart", keys, [history.powerT.slice()].concat(keys.map((k) => history.power[k].slice())), "W");
  }
}

// ---- jobs -------------------------------------------------------------
function renderJobs() {
  const jobs = (state.jobs && state.jobs.jobs) || [];
  const counts = {};
  for (const j of jobs) counts[j.state] = (counts[j.state] || 0) + 1;
  $("job-counts").replaceChildren(...["queued", "assigned", "running", "succeeded", "failed", "cancelled"].map((s) => el("span", { text: s + " " + (counts[s] || 0) })));
  const order = { running: 0, assigned: 1, queued: 2 };
  const sorted = jobs.slice().sort((a, b) => (order[a.state] ?? 3) - (order[b.state] ?? 3) || (b.seq || 0) - (a.seq || 0));
  $("job-rows").replaceChildren(...sorted.slice(0, 50).map((j) => {
    const tr = el("tr", { class: "click", "data-job": j.id },
      el("td", { text: j.id }), el("td", { text: (j.spec && j.spec.name) || "" }), el("td", { text: j.state }),
      el("td", { text: j.node || "" }), el("td", { class: "muted", text: j.reason || "" }));
    tr.addEventListener("click", () => showJob(j.id));
    return tr;
  }));
}

async function showJob(id) {
  const box = $("job-detail");
  box.hidden = false;
  box.replaceChildren(el("div", { class: "muted", text: "loading " + id + "…" }));
  let body;
  try {
    const r = await fetch("/api/jobs/" + encodeURIComponent(id));
    body = await r.json();
    if (!r.ok) { box.replaceChildren(el("div", { class: "muted", text: body.error || r.statusText })); return; }
  } catch (e) { box.replaceChildren(el("div", { class: "muted", text: "not reachable" })); return; }
  const j = body.job;
  const lines = [
    ["state", j.state + (j.reason ? " — " + j.reason : "")], ["attempt", String(j.attempt)], ["node", (j.node || "–") + " GPUs " + JSON.stringify(j.gpus || [])],
    ["team", (j.spec && j.spec.team) || "–"], ["submitted", j.submitted_at || ""], ["started", j.started_at || "–"], ["last checkpoint", j.last_checkpoint || "–"],
  ];
  const c = body.cost;
  const cur = (state.summary && state.summary.currency) || "";
  lines.push(["cost so far", c ? num(c.cost) + " " + cur + " · " + num(c.energy_kwh, 3) + " kWh · " + num(c.gpu_hours, 2) + " GPU-h · " + num(c.carbon_kg, 3) + " kg CO2e" : "–"]);
  const dl = el("table", {}, ...lines.map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", { text: v }))));
  const cancel = el("button", { text: "cancel job" });
  const ended = ["succeeded", "failed", "cancelled"].includes(j.state);
  if (ended || !state.admin.enabled) {
    cancel.disabled = true;
    cancel.title = ended ? "the job has ended" : state.admin.why;
  }
  cancel.addEventListener("click", async () => {
    const token = sessionStorage.getItem("costmesh-admin") || prompt("admin token");
    if (!token) return;
    const r = await fetch("/api/jobs/" + encodeURIComponent(id) + "/cancel", { method: "POST", headers: { Authorization: "Bearer " + token } });
    const b = await r.json().catch(() => ({}));
    if (r.ok) sessionStorage.setItem("costmesh-admin", token); else sessionStorage.removeItem("costmesh-admin");
    cancel.title = r.ok ? "cancelled" : b.error || r.statusText;
    showJob(id);
  });
  const why = el("span", { class: "muted", text: cancel.disabled ? " " + cancel.title : "" });
  const log = el("pre", { class: "log", text: body.log_tail || "(no log)" });
  box.replaceChildren(el("h3", { text: id + " " + ((j.spec && j.spec.name) || "") }), dl, el("p", {}, cancel, why), el("div", { class: "l", text: "log tail" }), log);
}

// ---- job timeline: attempts over the tariff bands and the off-peak window
const secs = (t) => new Date(t).getTime() / 1000;

function renderTimeline() {
  const host = $("timeline-chart");
  const runs = Object.values(state.runs).filter((r) => r.start).sort((a, b) => secs(a.start) - secs(b.start)).slice(-40);
  if (!runs.length) {
    host.replaceChildren(el("div", { class: "muted", text: "no job has run yet" }));
    if (charts["timeline-chart"]) { charts["timeline-chart"].plot.destroy(); delete charts["timeline-chart"]; }
    return;
  }
  const now = Date.now() / 1000;
  const jobs = [...new Set(runs.map((r) => r.job))];
  const row = new Map(jobs.map((j, i) => [j, i + 1]));
  const nameOf = (id) => {
    const j = ((state.jobs && state.jobs.jobs) || []).find((x) => x.id === id);
    return (j && j.spec && j.spec.name) || id || "";
  };
  const marks = state.marks.filter((m) => row.has(m.job));
  const xs = [...new Set(runs.flatMap((r) => [secs(r.start), r.end ? secs(r.end) : now]).concat(marks.map((m) => secs(m.time))))].sort((a, b) => a - b);
  const at = new Map(xs.map((x, i) => [x, i]));
  const empty = () => xs.map(() => null);
  const data = [xs];
  const series = [{}];
  for (const r of runs) {
    const d = empty();
    d[at.get(secs(r.start))] = row.get(r.job);
    d[at.get(r.end ? secs(r.end) : now)] = row.get(r.job);
    data.push(d);
    const color = !r.end ? "#3b6fd8" : r.how === "exited" ? "#1f8f4e" : "#c8322b";
    series.push({ label: r.job + " #" + r.attempt, stroke: color, width: 8, spanGaps: true, points: { show: false } });
  }
  for (const [kind, color, shape] of [["checkpointed", "#1f8f4e", "circle"], ["interrupted", "#c8322b", "cross"], ["lost", "#c8322b", "cross"]]) {
    const d = empty();
    for (const m of marks.filter((m) => m.kind === kind)) d[at.get(secs(m.time))] = row.get(m.job);
    data.push(d);
    series.push({ label: kind, stroke: color, paths: () => null, points: { show: true, size: shape === "cross" ? 11 : 8, fill: shape === "cross" ? "#fff" : color, width: 2 } });
  }
  const policy = state.policy;
  const shade = (u) => {
    if (!policy) return;
    const ctx = u.ctx, top = u.bbox.top, h = u.bbox.height;
    const prices = (policy.bands || []).map((b) => b.price);
    const lo = Math.min(...prices), hi = Math.max(...prices);
    const band = (from, to, style) => {
      const x0 = u.valToPos(secs(from), "x", true), x1 = u.valToPos(secs(to), "x", true);
      const a = Math.max(x0, u.bbox.left), b = Math.min(x1, u.bbox.left + u.bbox.width);
      if (b > a) { ctx.fillStyle = style; ctx.fillRect(a, top, b - a, h); }
    };
    ctx.save();
    if (!policy.flat_tariff && hi > lo) for (const b of policy.bands) band(b.from, b.to, "rgba(201,138,0," + (0.05 + 0.25 * (b.price - lo) / (hi - lo)).toFixed(3) + ")");
    for (const w of policy.off_peak_windows || []) band(w.from, w.to, "rgba(31,143,78,0.12)");
    ctx.restore();
  };
  const sig = runs.map((r) => r.job + r.attempt).join("|") + "|" + jobs.length;
  const c = charts["timeline-chart"];
  const width = Math.max(240, host.clientWidth || 600), height = Math.max(140, 60 + 22 * jobs.length);
  if (c && c.sig === sig) { c.plot.setData(data); if (Math.abs(c.plot.width - width) > 4) c.plot.setSize({ width, height }); return; }
  if (c) c.plot.destroy();
  host.replaceChildren();
  const opts = {
    width, height, legend: { show: false },
    scales: { x: { time: true, range: (u, a, b) => [Math.min(a, now - 6 * 3600), Math.max(b, now + 600)] }, y: { range: [0, jobs.length + 1] } },
    axes: [{}, { size: 120, splits: () => jobs.map((_, i) => i + 1), values: (u, vals) => vals.map((v) => String(nameOf(jobs[v - 1])).slice(0, 18)) }],
    series, hooks: { drawClear: [shade] },
  };
  charts["timeline-chart"] = { sig, plot: new uPlot(opts, data, host) };
}

// ---- cache, storage, actions -------------------------------------------
function renderCache() {
  const routes = {};
  for (const c of Object.values(state.cache)) {
    for (const r of c.routes || []) {
      const x = (routes[r.route] = routes[r.route] || { requests: 0, hits: 0, stale: 0, coalesced: 0 });
      x.requests += Number(r.requests || 0); x.hits += Number(r.hits || 0); x.stale += Number(r.stale || 0); x.coalesced += Number(r.coalesced || 0);
    }
  }
  $("cache-rows").replaceChildren(...Object.keys(routes).sort().map((k) => {
    const r = routes[k];
    const rate = r.requests > 0 ? r.hits / r.requests : null;
    return el("tr", {}, el("td", { text: k }), el("td", { class: rate != null && rate < HIT_TARGET ? "hot" : "", text: pct(rate) }),
      el("td", { text: String(r.requests) }), el("td", { text: String(r.stale) }), el("td", { text: String(r.coalesced) }));
  }));
}

function renderBackends() {
  // The newest report of each gateway; a backend seen by several, once per gateway.
  const rows = [];
  for (const c of Object.values(state.cache)) for (const b of c.backends || []) rows.push(b);
  rows.sort((a, b) => (a.route + a.url < b.route + b.url ? -1 : 1));
  $("backend-rows").replaceChildren(...rows.map((b) => {
    const st = b.state || "ok";
    const until = b.drainedUntil ? " until " + time(b.drainedUntil) : "";
    return el("tr", { "data-state": st }, el("td", { text: b.route }), el("td", { text: b.url }), el("td", { text: b.pool || "" }),
      el("td", { text: b.node || "" }), el("td", { class: st === "ok" ? "" : "hot", text: st + until }));
  }));
}

function renderStorage() {
  const s = state.storage;
  if (!s) return;
  const usage = s.usage || [];
  const t = el("table", {}, el("tr", {}, el("th", { text: "root" }), el("th", { text: "tier" }), el("th", { text: "bytes" }), el("th", { text: "monthly cost" })),
    ...usage.map((u) => el("tr", {}, el("td", { text: u.root }), el("td", { text: String(u.tier || "local").replace("STORAGE_TIER_", "").toLowerCase() }),
      el("td", { text: String(u.bytes || 0) }), el("td", { text: u.monthlyCost ? num(Number(u.monthlyCost.micros || 0) / 1e6) + " " + (u.monthlyCost.currencyCode || "") : "–" }))));
  // What the pass saves a month: each freed byte at its root's price per byte.
  let saved = 0, cur = "";
  for (const a of s.actions || []) {
    const root = usage.filter((u) => a.path && a.path.startsWith(u.root)).sort((x, y) => y.root.length - x.root.length)[0];
    if (root && root.monthlyCost && Number(root.bytes) > 0) {
      saved += Number(a.bytesFreed || 0) * (Number(root.monthlyCost.micros || 0) / 1e6) / Number(root.bytes);
      cur = root.monthlyCost.currencyCode || cur;
    }
  }
  const dry = (s.actions || []).some((a) => a.dryRun) ? " (dry run: would free)" : "";
  const last = el("p", { class: "muted", text: "last pass " + time(s.time) + ": " + (s.actions || []).length + " action(s), " + (s.bytesFreed || 0) + " B freed" + dry + (cur ? ", about " + num(saved) + " " + cur + " a month" : "") });
  $("storage-body").replaceChildren(t, last);
}

function renderActions() {
  $("action-log").replaceChildren(...state.actions.slice(0, 100).map((a) =>
    el("li", { "data-kind": a.kind }, el("span", { class: "t", text: time(a.time) }), el("span", { class: "k", text: a.kind }),
      el("span", { text: a.text + " " }), el("span", { class: "r", text: a.reason || "" }))));
}

function renderAll() {
  renderOverview(); renderCost(); renderGpus(); renderJobs(); renderTimeline(); renderCache(); renderBackends(); renderStorage(); renderActions();
}

// ---- the stream -------------------------------------------------------
let dirty = false;
function later() { if (!dirty) { dirty = true; requestAnimationFrame(() => { dirty = false; renderAll(); }); } }

function connect() {
  const es = new EventSource("/api/events");
  const on = (name, f) => es.addEventListener(name, (m) => { try { f(JSON.parse(m.data)); } catch (e) { console.warn("bad " + name + " event", e); } later(); });
  on("snapshot", (s) => {
    Object.assign(state, { gpus: {}, budgets: s.budgets || {}, cache: s.cache || {}, storage: s.storage, summary: s.summary, jobs: s.jobs, actions: s.actions || [], admin: s.admin || state.admin, runs: s.runs || {}, marks: s.marks || [], policy: s.policy });
    for (const g of Object.values(s.gpus || {})) onGpu(g);
    state.connected = s.connected;
    $("prefix").textContent = s.prefix || "";
    setStatus(s.connected, "the server does not hear the mesh");
    if (s.summary) costSeries();
  });
  on("status", (s) => { state.connected = s.connected; setStatus(s.connected, "the server does not hear the mesh"); });
  on("gpu", onGpu);
  on("budget", (b) => { state.budgets[b.scope] = b; });
  on("action", (a) => { state.actions.unshift(a); state.actions.length = Math.min(state.actions.length, 200); });
  on("summary", (s) => { state.summary = s; costSeries(); });
  on("jobs", (j) => { state.jobs = j; });
  on("job", () => {});
  on("run", (r) => {
    if (r.run) state.runs[r.run.job + "#" + r.run.attempt] = r.run;
    if (r.mark) { state.marks.unshift(r.mark); state.marks.length = Math.min(state.marks.length, 500); }
  });
  on("policy", (p) => { state.policy = p; });
  on("cache", (c) => { state.cache[c.instance] = c; });
  on("storage", (s) => { state.storage = s; });
  es.onopen = () => setStatus(state.connected, "the server does not hear the mesh");
  // EventSource reconnects by itself; say so meanwhile.
  es.onerror = () => setStatus(false, "reconnecting to the dashboard server…");
}

document.addEventListener("DOMContentLoaded", () => {
  $("cost-by").addEventListener("change", () => { history.cost = []; costSeries(); later(); });
  window.addEventListener("resize", later);
  connect();
});

// The Homeostat dashboard: plain JavaScript, no build step, no dependencies.
// One EventSource on /dashboard/live: cell life events (born, dead, replaced, ...) as they
// happen, and a `snapshot` of the registry, the pool and the figures every second.
"use strict";

const ROLES = ["api", "crawler", "frontdoor", "healthchecker", "factory"];
const COLORS = { api: "#2b6cb0", crawler: "#2f855a", frontdoor: "#b7791f", healthchecker: "#805ad5", factory: "#c53030", other: "#4a5568" };
const KINDS = ["born", "serving", "draining", "retired", "dead", "replaced", "divided", "throttled", "retiring", "unknown"];
const HISTORY = 600;          // snapshots kept for the charts: ten minutes at one a second
const EVENTS_SHOWN = 400;     // events listed
const DEPARTED_FOR_MS = 120000; // how long a dead or retired cell stays in the table

const state = {
  snapshot: null,
  cells: new Map(),       // live cells by id, from the latest snapshot
  departed: new Map(),    // id -> {role, kind, at_ms, reason}: dead or retired lately
  lineage: new Map(),     // id -> {parent, role}
  events: [],             // newest last
  history: [],            // {t, count: {role: n}, pressure: {role: mean}, mean, p95, crawl}
  eventCount: 0,
};

const params = new URLSearchParams(location.search);
const token = params.get("token");

function esc(s) {
  return String(s == null ? "" : s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function color(role) { return COLORS[role] || COLORS.other; }
function ago(ms) {
  const s = Math.round(ms / 1000);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0");
  return Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0");
}
function clock(ms) { return new Date(ms).toLocaleTimeString([], { hour12: false }); }
function money(micros) {
  if (micros == null) return "–";
  return (Number(micros) / 1e6).toFixed(2);
}

function connect() {
  const url = "/dashboard/live" + (token ? "?token=" + encodeURIComponent(token) : "");
  const source = new EventSource(url);
  const link = document.getElementById("link");
  source.onopen = () => { link.dataset.link = "live"; link.textContent = "live"; };
  source.onerror = () => { link.dataset.link = "lost"; link.textContent = "reconnecting"; };
  source.addEventListener("snapshot", (e) => takeSnapshot(JSON.parse(e.data)));
  for (const kind of KINDS) {
    source.addEventListener(kind, (e) => takeEvent(JSON.parse(e.data), e.lastEventId));
  }
  source.addEventListener("lagged", (e) => {
    const missed = JSON.parse(e.data).missed;
    takeEvent({ kind: "lagged", cell_id: "", role: "", at_ms: Date.now(), reason: missed + " events were dropped before this page read them" }, "");
  });
}

function takeEvent(ev, id) {
  state.eventCount += 1;
  ev.id = id;
  state.events.push(ev);
  if (state.events.length > EVENTS_SHOWN) state.events.shift();
  if (ev.kind === "born" && ev.cell_id) {
    const known = state.lineage.get(ev.cell_id) || {};
    state.lineage.set(ev.cell_id, { parent: ev.parent || known.parent || null, role: ev.role });
    state.departed.delete(ev.cell_id);
  }
  if (ev.kind === "replaced" && ev.cell_id && ev.parent) {
    // The factory's new cell, with the dead one it replaces as its parent.
    const known = state.lineage.get(ev.cell_id) || {};
    state.lineage.set(ev.cell_id, { parent: known.parent || ev.parent, role: ev.role });
  }
  if ((ev.kind === "dead" || ev.kind === "retired") && ev.cell_id) {
    state.departed.set(ev.cell_id, { role: ev.role, kind: ev.kind, at_ms: ev.at_ms, reason: ev.reason });
    if (!state.lineage.has(ev.cell_id)) state.lineage.set(ev.cell_id, { parent: ev.parent || null, role: ev.role });
  }
  schedule();
}

function takeSnapshot(snap) {
  state.snapshot = snap;
  state.cells = new Map(snap.cells.map((c) => [c.cell_id, c]));
  for (const c of snap.cells) {
    const known = state.lineage.get(c.cell_id) || {};
    state.lineage.set(c.cell_id, { parent: c.parent || known.parent || null, role: c.role });
    // A cell the registry lists is alive, whatever an older event said.
    state.departed.delete(c.cell_id);
  }
  const count = {}, sum = {};
  for (const c of snap.cells) {
    count[c.role] = (count[c.role] || 0) + 1;
    sum[c.role] = (sum[c.role] || 0) + c.pressure;
  }
  const pressure = {};
  for (const r in count) pressure[r] = sum[r] / count[r];
  const f = snap.figures || {};
  state.history.push({ t: snap.at_ms, count, pressure, mean: f.search_mean_ms, p95: f.search_p95_ms, crawl: f.crawl_rate_per_s });
  if (state.history.length > HISTORY) state.history.shift();
  schedule();
}

let pending = false;
function schedule() {
  if (pending) return;
  pending = true;
  setTimeout(() => { pending = false; render(); }, 200);
}

function render() {
  const snap = state.snapshot;
  const now = snap ? snap.at_ms : Date.now();
  for (const [id, d] of state.departed) if (now - d.at_ms > DEPARTED_FOR_MS) state.departed.delete(id);
  if (snap) {
    document.getElementById("summary").textContent =
      snap.cells.length + " live cells · seen by " + snap.checker + " at " + clock(snap.at_ms) +
      (snap.figures && snap.figures.pages_indexed != null ? " · " + snap.figures.pages_indexed + " pages indexed" : "");
  }
  renderRoles();
  renderCells(now);
  renderEvents();
  renderLineage();
  renderPool();
  renderCharts();
}

function rolesPresent() {
  const roles = new Set(ROLES);
  for (const c of state.cells.values()) roles.add(c.role);
  return [...roles];
}

function renderRoles() {
  const by = {};
  for (const c of state.cells.values()) (by[c.role] = by[c.role] || []).push(c);
  document.getElementById("roles").innerHTML = rolesPresent().map((r) => {
    const cells = by[r] || [];
    const serving = cells.filter((c) => c.state === "serving").length;
    const mean = cells.length ? cells.reduce((a, c) => a + c.pressure, 0) / cells.length : 0;
    return `<div class="role-card" data-role-card="${esc(r)}" style="border-left-color:${color(r)}"><b>${cells.length}</b>${esc(r)}<br><span>${serving} serving · pressure ${mean.toFixed(2)}</span></div>`;
  }).join("");
}

function pressureBar(p) {
  const w = Math.min(100, Math.round(p * 100));
  const cls = p >= 1 ? "over" : p >= 0.75 ? "high" : "";
  return `<span class="bar"><i class="${cls}" style="width:${w}%"></i></span>${p.toFixed(2)}`;
}

function renderCells(now) {
  const rows = [];
  let live = 0;
  for (const role of rolesPresent()) {
    const cells = [...state.cells.values()].filter((c) => c.role === role).sort((a, b) => b.age_ms - a.age_ms);
    const gone = [...state.departed.entries()].filter(([, d]) => d.role === role);
    if (!cells.length && !gone.length) continue;
    rows.push(`<tr class="role-head"><td colspan="7" style="border-left:4px solid ${color(role)}">${esc(role)} · ${cells.length} live</td></tr>`);
    for (const c of cells) {
      live += 1;
      rows.push(`<tr data-cell="${esc(c.cell_id)}" data-role="${esc(c.role)}" data-state="${esc(c.state)}" data-live="true">` +
        `<td class="mono">${esc(c.cell_id)}</td><td>${esc(c.role)}</td><td class="state">${esc(c.state)}</td>` +
        `<td>${pressureBar(c.pressure)}</td><td>${ago(c.age_ms)}</td><td class="mono">${esc(c.parent || "")}</td><td>${esc(c.pid || "")}</td></tr>`);
    }
    for (const [id, d] of gone) {
      rows.push(`<tr data-cell="${esc(id)}" data-role="${esc(d.role)}" data-state="${esc(d.kind)}" data-live="false" title="${esc(d.reason)}">` +
        `<td class="mono">${esc(id)}</td><td>${esc(d.role)}</td><td class="state">${esc(d.kind)}</td>` +
        `<td colspan="4" class="reason">${esc(d.reason)} (${ago(now - d.at_ms)} ago)</td></tr>`);
    }
  }
  document.querySelector("#cells tbody").innerHTML = rows.join("");
  document.getElementById("cells-count").textContent = live + " live, " + state.departed.size + " departed lately";
}

function renderEvents() {
  const items = [];
  for (let i = state.events.length - 1; i >= 0; i--) {
    const e = state.events[i];
    items.push(`<li data-kind="${esc(e.kind)}" data-cell="${esc(e.cell_id)}"><time>${clock(e.at_ms)}</time>` +
      `<span class="kind ${esc(e.kind)}">${esc(e.kind)}</span><span class="mono">${esc(e.cell_id)}</span> ` +
      `<span style="color:${color(e.role)}">${esc(e.role)}</span> <span class="reason">${esc(e.reason)}</span>` +
      (e.parent ? ` <span class="reason">(parent ${esc(e.parent)})</span>` : "") + `</li>`);
  }
  document.getElementById("events").innerHTML = items.join("");
  document.getElementById("events-count").textContent = state.eventCount + " since this page opened";
}

function renderLineage() {
  const children = new Map();
  const roots = [];
  for (const [id, n] of state.lineage) {
    if (n.parent && state.lineage.has(n.parent) && n.parent !== id) {
      if (!children.has(n.parent)) children.set(n.parent, []);
      children.get(n.parent).push(id);
    } else {
      roots.push(id);
    }
  }
  const seen = new Set();
  const node = (id, depth) => {
    if (seen.has(id) || depth > 50) return "";
    seen.add(id);
    const n = state.lineage.get(id);
    const live = state.cells.has(id);
    const d = state.departed.get(id);
    const status = live ? state.cells.get(id).state : d ? d.kind : "gone";
    const kids = (children.get(id) || []).sort();
    return `<li class="${live ? "live" : "gone"}" data-lineage="${esc(id)}"><span><i class="dot" style="background:${color(n.role)}"></i>` +
      `<span class="mono">${esc(id)}</span> <span class="reason">${esc(n.role)}, ${esc(status)}</span></span>` +
      (kids.length ? "<ul>" + kids.map((k) => node(k, depth + 1)).join("") + "</ul>" : "") + "</li>";
  };
  roots.sort((a, b) => (state.lineage.get(a).role + a).localeCompare(state.lineage.get(b).role + b));
  document.getElementById("lineage").innerHTML = "<ul>" + roots.map((r) => node(r, 0)).join("") + "</ul>";
}

function renderPool() {
  const f = (state.snapshot && state.snapshot.figures) || {};
  const spendEl = document.getElementById("spend");
  const statesEl = document.getElementById("pool-states");
  const body = document.querySelector("#pool tbody");
  if (!f.pool) {
    spendEl.innerHTML = `<p class="note">${esc(f.pool_note || "waiting for a factory")}</p>`;
    statesEl.innerHTML = "";
    body.innerHTML = "";
    return;
  }
  const spend = f.pool.spend || {}, caps = spend.caps || {};
  const row = (label, used, cap) => {
    const share = cap > 0 ? Math.min(1, used / cap) : 0;
    const cls = share >= 1 ? "over" : share >= 0.8 ? "high" : "";
    return `<div class="spend-row" data-spend="${esc(label)}">${esc(label)}: <span class="bar"><i class="${cls}" style="width:${Math.round(share * 100)}%"></i></span>${money(used)} of ${money(cap)}</div>`;
  };
  spendEl.innerHTML = row("per hour", spend.committed_per_hour, caps.per_hour) +
    row("this month (with reserved hours)", spend.committed_month, caps.per_month) +
    `<div class="note">spent this month ${money(spend.spent_month)} · ${esc(spend.spending_servers)} servers spending</div>`;
  const servers = f.pool.servers || [];
  const byState = {};
  for (const s of servers) {
    const k = s.state + " / " + s.provider;
    byState[k] = (byState[k] || 0) + 1;
  }
  statesEl.innerHTML = Object.keys(byState).sort().map((k) => `<span class="kind">${esc(k)}: ${byState[k]}</span>`).join(" ");
  body.innerHTML = servers.map((s) => `<tr data-server="${esc(s.name)}"><td>${esc(s.name)}</td><td>${esc(s.provider)}</td><td>${esc(s.state)}</td>` +
    `<td>${esc(s.role || "–")}</td><td class="mono">${esc(s.cell_id || "–")}</td><td>${money(s.hourly_cost_micros)}</td></tr>`).join("");
}

// A line chart in inline SVG: one polyline per series, over the kept history.
function chart(id, series, legendId) {
  const svg = document.getElementById(id);
  const W = 400, H = 140, L = 28, B = 14;
  const h = state.history;
  if (!h.length) { svg.innerHTML = ""; return; }
  const t0 = h[0].t, t1 = Math.max(h[h.length - 1].t, t0 + 1);
  let max = 0;
  for (const s of series) for (const p of h) { const v = s.value(p); if (v != null && isFinite(v)) max = Math.max(max, v); }
  max = max > 0 ? max * 1.1 : 1;
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - 2);
  const y = (v) => H - B - (v / max) * (H - B - 4);
  let out = "";
  for (let i = 0; i <= 4; i++) {
    const v = (max * i) / 4;
    out += `<line class="grid" x1="${L}" x2="${W}" y1="${y(v)}" y2="${y(v)}"/><text x="0" y="${y(v) + 3}">${v >= 10 ? v.toFixed(0) : v.toFixed(2)}</text>`;
  }
  out += `<text x="${L}" y="${H - 2}">${clock(t0)}</text><text x="${W - 40}" y="${H - 2}">${clock(t1)}</text>`;
  for (const s of series) {
    const pts = [];
    for (const p of h) { const v = s.value(p); if (v != null && isFinite(v)) pts.push(x(p.t).toFixed(1) + "," + y(v).toFixed(1)); }
    if (pts.length) out += `<polyline points="${pts.join(" ")}" stroke="${s.color}"/>`;
  }
  svg.innerHTML = out;
  document.getElementById(legendId).innerHTML = series.map((s) => `<span><i style="background:${s.color}"></i>${esc(s.name)}</span>`).join("");
}

function renderCharts() {
  const roles = rolesPresent();
  chart("chart-cells", roles.map((r) => ({ name: r, color: color(r), value: (p) => p.count[r] || 0 })), "legend-cells");
  chart("chart-pressure", roles.map((r) => ({ name: r, color: color(r), value: (p) => p.pressure[r] })), "legend-pressure");
  chart("chart-latency", [
    { name: "mean", color: "#2b6cb0", value: (p) => p.mean },
    { name: "p95 (bucket bound)", color: "#c53030", value: (p) => p.p95 },
  ], "legend-latency");
  chart("chart-crawl", [{ name: "pages/s", color: "#2f855a", value: (p) => p.crawl }], "legend-crawl");
}

connect();

// ember's dashboard: polls /_ember/stats?series=1 once a second and draws tables and canvas charts.
// Plain JavaScript, no dependencies, no build step.
"use strict";

const POLL_MS = 1000;
const SPAN_S = 120;
const COLORS = {
  inv: "#5aa9e6", cold: "#ff7a3d", err: "#e06c75", thr: "#e5c07b",
  p50: "#7bc47f", p99: "#b48ead", idle: "#7bc47f", busy: "#ff7a3d", starting: "#e5c07b",
};

let polls = 0;
const chartPanels = new Map(); // function name -> {el, canvases}

function fmt(v, digits = 1) {
  if (v === null || v === undefined) return "–";
  if (typeof v !== "number") return String(v);
  if (Math.abs(v) >= 1000) return Math.round(v).toLocaleString("en-US");
  return v.toFixed(digits).replace(/\.0+$/, "");
}

function fmtAge(s) {
  if (s === null || s === undefined) return "–";
  if (s < 60) return s.toFixed(0) + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + String(Math.floor(s % 60)).padStart(2, "0") + "s";
  return Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
}

function el(tag, attrs = {}, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function setText(id, v) {
  const e = document.getElementById(id);
  if (e.textContent !== v) e.textContent = v;
}

// ------------------------------------------------------------------ tables

function renderFunctions(functions) {
  const tbody = document.querySelector("#functions tbody");
  const seen = new Set();
  const sorted = [...functions].sort((a, b) => b.rps - a.rps || a.name.localeCompare(b.name));
  for (const f of sorted) {
    seen.add(f.name);
    let tr = tbody.querySelector(`tr[data-function="${CSS.escape(f.name)}"]`);
    if (!tr) {
      tr = el("tr", { "data-function": f.name });
      for (const col of ["name", "rps", "p50", "p99", "warm", "idle", "busy", "starting",
                         "invocations", "cold", "errors", "throttles"]) {
        tr.appendChild(el("td", { "data-col": col, class: col === "name" ? "name" : "num" }));
      }
    }
    tbody.appendChild(tr); // keeps the sort order
    const cells = {
      name: f.name, rps: fmt(f.rps, 1), p50: fmt(f.p50_ms, 2), p99: fmt(f.p99_ms, 2),
      warm: f.warm_pct === null ? "–" : fmt(f.warm_pct, 0), idle: String(f.sandboxes.idle),
      busy: String(f.sandboxes.busy), starting: String(f.sandboxes.starting),
      invocations: String(f.invocations), cold: String(f.cold_starts), errors: String(f.errors),
      throttles: String(f.throttles),
    };
    for (const [col, v] of Object.entries(cells)) {
      const td = tr.querySelector(`td[data-col="${col}"]`);
      if (td.textContent !== v) td.textContent = v;
    }
    tr.querySelector('td[data-col="errors"]').classList.toggle("bad", f.errors > 0);
    tr.querySelector('td[data-col="throttles"]').classList.toggle("bad", f.throttles > 0);
  }
  for (const tr of [...tbody.querySelectorAll("tr")]) {
    if (!seen.has(tr.dataset.function)) tr.remove();
  }
  document.getElementById("no-functions").hidden = functions.length > 0;
}

function renderSandboxes(sandboxes) {
  const tbody = document.querySelector("#sandboxes tbody");
  const rows = [...sandboxes].sort((a, b) => a.function.localeCompare(b.function) || a.id - b.id);
  tbody.replaceChildren(...rows.map((s) => {
    const tr = el("tr", { "data-sandbox": String(s.id), "data-function": s.function });
    tr.appendChild(el("td", { class: "num" }, String(s.id)));
    tr.appendChild(el("td", {}, s.function));
    tr.appendChild(el("td", { "data-col": "state", class: "state-" + s.state }, s.state + (s.current ? "" : " (old)")));
    tr.appendChild(el("td", { class: "num" }, fmtAge(s.age_s)));
    tr.appendChild(el("td", { class: "num" }, s.idle_s === null ? "–" : fmtAge(s.idle_s)));
    tr.appendChild(el("td", { class: "num" }, String(s.invocations)));
    tr.appendChild(el("td", { class: "num" }, fmt(s.init_ms, 1)));
    tr.appendChild(el("td", { class: "num" }, s.pid === null ? "–" : String(s.pid)));
    return tr;
  }));
  document.getElementById("no-sandboxes").hidden = sandboxes.length > 0;
}

// ------------------------------------------------------------------ charts (canvas)

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

// lines: [{key, label, color}]; points: [{t, key: value}]; stacked: draw as stacked areas
function drawChart(canvas, points, lines, now, stacked) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const left = 40, right = 6, top = 6, bottom = 16;
  const pw = w - left - right, ph = h - top - bottom;
  let max = 0;
  for (const p of points) {
    if (stacked) max = Math.max(max, lines.reduce((s, l) => s + (p[l.key] || 0), 0));
    else for (const l of lines) if (p[l.key] !== null && p[l.key] !== undefined) max = Math.max(max, p[l.key]);
  }
  max = niceMax(max);
  const x = (t) => left + pw * (1 - (now - t) / SPAN_S);
  const y = (v) => top + ph * (1 - v / max);
  ctx.font = "10px system-ui, sans-serif";
  ctx.fillStyle = "#8a93a6";
  ctx.strokeStyle = "#262b36";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 2; i++) {
    const v = (max * i) / 2, yy = Math.round(y(v)) + 0.5;
    ctx.beginPath(); ctx.moveTo(left, yy); ctx.lineTo(w - right, yy); ctx.stroke();
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    ctx.fillText(fmt(v, v < 10 ? 1 : 0), left - 4, yy);
  }
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  for (const ago of [120, 90, 60, 30, 0]) ctx.fillText(ago ? `-${ago}s` : "now", Math.min(x(now - ago), w - 14), h - bottom + 3);
  const visible = points.filter((p) => now - p.t <= SPAN_S);
  if (stacked) {
    const base = visible.map(() => 0);
    for (const l of lines) {
      const tops = visible.map((p, i) => base[i] + (p[l.key] || 0));
      ctx.beginPath();
      visible.forEach((p, i) => (i ? ctx.lineTo(x(p.t), y(tops[i])) : ctx.moveTo(x(p.t), y(tops[i]))));
      for (let i = visible.length - 1; i >= 0; i--) ctx.lineTo(x(visible[i].t), y(base[i]));
      ctx.closePath();
      ctx.fillStyle = l.color + "99";
      ctx.fill();
      tops.forEach((v, i) => (base[i] = v));
    }
    return;
  }
  for (const l of lines) {
    ctx.beginPath();
    ctx.strokeStyle = l.color;
    ctx.lineWidth = 1.5;
    let pen = false;
    for (const p of visible) {
      const v = p[l.key];
      if (v === null || v === undefined) { pen = false; continue; }
      if (pen) ctx.lineTo(x(p.t), y(v)); else ctx.moveTo(x(p.t), y(v));
      pen = true;
    }
    ctx.stroke();
  }
}

const CHARTS = [
  { title: "invocations/s", lines: [{ key: "inv", label: "invocations" }, { key: "cold", label: "cold starts" },
                                     { key: "err", label: "errors" }, { key: "thr", label: "throttles" }] },
  { title: "latency ms", lines: [{ key: "p50", label: "p50" }, { key: "p99", label: "p99" }] },
  { title: "sandboxes", stacked: true, lines: [{ key: "busy", label: "busy" }, { key: "idle", label: "idle" },
                                               { key: "starting", label: "starting" }] },
];

function renderCharts(series, now) {
  const container = document.getElementById("charts");
  const names = Object.keys(series).sort();
  for (const [name, panel] of chartPanels) {
    if (!(name in series)) { panel.el.remove(); chartPanels.delete(name); }
  }
  for (const name of names) {
    let panel = chartPanels.get(name);
    if (!panel) {
      const div = el("div", { class: "fn-charts", "data-function": name });
      div.appendChild(el("h3", {}, name));
      const row = el("div", { class: "chart-row" });
      const canvases = [];
      for (const c of CHARTS) {
        const box = el("div", { class: "chart" });
        box.appendChild(el("div", { class: "title" }, c.title));
        const legend = el("div", { class: "legend" });
        for (const l of c.lines) {
          const s = el("span", {}, "■ " + l.label);
          s.style.color = COLORS[l.key];
          legend.appendChild(s);
        }
        box.appendChild(legend);
        const canvas = el("canvas", { "data-chart": c.title });
        box.appendChild(canvas);
        row.appendChild(box);
        canvases.push(canvas);
      }
      div.appendChild(row);
      panel = { el: div, canvases };
      chartPanels.set(name, panel);
    }
    container.appendChild(panel.el); // keeps the name order
    CHARTS.forEach((c, i) => {
      const lines = c.lines.map((l) => ({ ...l, color: COLORS[l.key] }));
      drawChart(panel.canvases[i], series[name], lines, now, !!c.stacked);
    });
  }
}

// ------------------------------------------------------------------ polling

async function poll() {
  const status = document.getElementById("status");
  try {
    const resp = await fetch("/_ember/stats?series=1", { cache: "no-store" });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    const doc = await resp.json();
    const a = doc.account;
    const rps = doc.functions.reduce((s, f) => s + f.rps, 0);
    setText("acct-rps", fmt(rps, 1));
    setText("acct-concurrent", String(a.concurrent));
    setText("acct-sandboxes", String(a.sandboxes));
    setText("acct-invocations", String(a.invocations));
    setText("acct-cold", String(a.cold_starts));
    setText("acct-errors", String(a.errors));
    setText("acct-throttles", String(a.throttles));
    setText("window", String(doc.window_s));
    renderFunctions(doc.functions);
    renderSandboxes(doc.sandboxes);
    renderCharts(doc.series || {}, doc.time);
    polls += 1;
    status.dataset.polls = String(polls);
    status.classList.remove("error");
    status.textContent = "updated " + new Date(doc.time * 1000).toLocaleTimeString();
  } catch (err) {
    status.classList.add("error");
    status.textContent = "cannot reach ember: " + err.message;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();

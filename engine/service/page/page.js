// msggc's status page: polls GET /v1/overview and draws each node. DOM and SVG only, textContent
// only (a run's error text is data, never markup); the token, when the service has one, stays in
// sessionStorage and goes out as a header, never in a URL.
"use strict";

const OVERVIEW = "/v1/overview";
const TOKEN_KEY = "msggc-token";
const FAST_MS = 1000;   // while a run is queued or running
const SLOW_MS = 3000;
const SVG = "http://www.w3.org/2000/svg";
const cards = new Map();
let timer = null;

const number = (n) => (n === null || n === undefined ? "–" : Math.round(n).toLocaleString("en-US"));

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
  return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
}

const ms = (v) => (v === null || v === undefined ? "–" : `${v.toFixed(1)} ms`);
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");

function schedule(delay) {
  clearTimeout(timer);
  timer = setTimeout(poll, delay);
}

function banner(text) {
  const el = document.getElementById("banner");
  el.textContent = text || "";
  el.hidden = !text;
}

function askToken(problem) {
  clearTimeout(timer);
  document.getElementById("token-form").hidden = false;
  document.getElementById("token-error").textContent = problem;
  document.getElementById("nodes").hidden = true;
  document.getElementById("token").focus();
}

async function poll() {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  let answer;
  try {
    answer = await fetch(OVERVIEW, { headers, cache: "no-store" });
  } catch (err) {
    banner(`msggc does not answer (${err.message}); trying again`);
    schedule(SLOW_MS);
    return;
  }
  if (answer.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    askToken(token ? "That token was refused." : "");
    return;
  }
  let body = null;
  try { body = await answer.json(); } catch (err) { body = null; }
  if (!answer.ok || !body) {
    const errors = (body && body.errors) || [];
    banner(errors.map((e) => `${e.code} ${e.title}: ${e.details}`).join("; ") || `HTTP ${answer.status}`);
    schedule(SLOW_MS);
    return;
  }
  banner("");
  render(body);
  const active = body.nodes.some((n) => n.latest && ["queued", "running"].includes(n.latest.status));
  schedule(active ? FAST_MS : SLOW_MS);
}

function render(body) {
  const field = (name) => document.querySelector(`header [data-field="${name}"]`);
  field("worker").textContent = body.worker;
  field("schedule").textContent = body.next_scheduled_gc
    ? `${when(body.next_scheduled_gc)} (${body.schedule})` : "none";
  field("updated").textContent = new Date(body.generated_at).toLocaleTimeString();
  const main = document.getElementById("nodes");
  main.hidden = false;
  for (const node of body.nodes) main.appendChild(card(node.node));
  renderNodes(body.nodes);
}

function card(name) {
  if (!cards.has(name)) {
    const section = document.getElementById("node-template").content.firstElementChild.cloneNode(true);
    section.dataset.node = name;
    cards.set(name, section);
  }
  return cards.get(name);
}

function renderNodes(nodes) {
  for (const node of nodes) {
    const section = card(node.node);
    const set = (name, text) => { section.querySelector(`[data-field="${name}"]`).textContent = text; };
    set("node", node.node);
    set("address", node.address);
    const error = section.querySelector('[data-field="error"]');
    error.hidden = !node.error;
    error.textContent = node.error ? `${node.error.code} ${node.error.title}: ${node.error.details}` : "";
    const status = node.error ? "unreachable" : node.latest ? node.latest.status : "idle";
    set("status", status);
    section.dataset.status = status;
    renderLatest(section, node.latest, set);
    renderOutbox(set, node.outbox);
    renderRecent(section, node.recent || []);
  }
}

function renderLatest(section, run, set) {
  const part = section.querySelector('[data-part="latest"]');
  part.hidden = !run;
  if (!run) return;
  const running = ["queued", "running"].includes(run.status);
  set("run", `run ${run.run_id} ${run.status}`);
  const workers = run.workers ? ` · ${run.workers} worker${run.workers > 1 ? "s" : ""}` : "";
  set("strategy", run.strategy ? `${run.strategy} walk${workers}` : "planning");
  set("reason", run.reason ? `— ${run.reason}` : "");
  set("deleted", number(run.messages_deleted));
  set("left", run.garbage_left === null ? "–" : number(run.garbage_left));
  set("rate", run.rows_per_s === null ? "–" : `${number(run.rows_per_s)} rows/s`);
  set("eta", running ? duration(run.eta_s) : "done");
  set("elapsed", duration(run.duration_s));
  const t = run.throttle;
  set("pauses", `${t.pauses} (${duration(t.paused_s)})`);
  set("held", duration(t.held_back_s));
  const guard = run.guard;
  set("p99", guard ? `${ms(guard.p99_ms)}${guard.budget_ms ? ` of ${ms(guard.budget_ms)} budget` : ""}`
    : "no guard");
  drawChart(section.querySelector('[data-field="chart"]'), run.chart);
}

function drawChart(svg, points) {
  const W = 640, H = 180, PAD = 30;
  svg.replaceChildren();
  svg.dataset.points = String(points.length);
  const lastT = points.length ? points[points.length - 1].t_s : 1;
  const maxRows = Math.max(1, ...points.map((p) => p.rows_per_s));
  const maxWal = Math.max(1, ...points.map((p) => p.wal_bytes_per_s));
  const x = (t) => PAD + (t / Math.max(lastT, 1)) * (W - 2 * PAD);
  const line = (key, max, cls) => {
    const poly = document.createElementNS(SVG, "polyline");
    poly.setAttribute("class", cls);
    poly.setAttribute("points", points.map((p) => `${x(p.t_s).toFixed(1)},${(H - PAD - (p[key] / max)
      * (H - 2 * PAD)).toFixed(1)}`).join(" "));
    svg.appendChild(poly);
  };
  const text = (content, tx, ty, anchor, cls) => {
    const label = document.createElementNS(SVG, "text");
    label.setAttribute("x", tx);
    label.setAttribute("y", ty);
    label.setAttribute("text-anchor", anchor);
    label.setAttribute("class", cls);
    label.textContent = content;
    svg.appendChild(label);
  };
  const axis = document.createElementNS(SVG, "path");
  axis.setAttribute("d", `M${PAD},${PAD} V${H - PAD} H${W - PAD} V${PAD}`);
  axis.setAttribute("class", "axis");
  svg.appendChild(axis);
  if (points.length) {
    line("rows_per_s", maxRows, "rows");
    line("wal_bytes_per_s", maxWal, "wal");
  }
  text(`${number(maxRows)} rows/s`, PAD, PAD - 8, "start", "rows");
  text(`${(maxWal / 1e6).toFixed(1)} MB/s`, W - PAD, PAD - 8, "end", "wal");
  text("0", PAD, H - PAD + 16, "middle", "tick");
  text(duration(points.length ? lastT : 0), W - PAD, H - PAD + 16, "middle", "tick");
}

function renderOutbox(set, outbox) {
  if (!outbox) { set("outbox", ""); return; }
  let text = `webhooks waiting: ${outbox.waiting}`;
  if (outbox.waiting) {
    text += ` · ${outbox.attempts} attempt(s) · next ${when(outbox.next_attempt_at)}`;
    if (outbox.last_error) text += ` · ${outbox.last_error}`;
  }
  set("outbox", text);
}

function renderRecent(section, runs) {
  const table = section.querySelector('[data-part="recent"]');
  table.hidden = runs.length === 0;
  const rows = runs.map((run) => {
    const tr = document.createElement("tr");
    tr.dataset.run = String(run.run_id);
    tr.dataset.status = run.status;
    const cells = [run.run_id, run.status, number(run.messages_deleted), duration(run.duration_s),
      number(run.rows_per_s), run.strategy || "–", number(run.kept_by_foreign_keys),
      number(run.rows_skipped_locked), `${run.throttle.pauses}`, run.error || ""];
    for (const value of cells) {
      const td = document.createElement("td");
      td.textContent = String(value);
      tr.appendChild(td);
    }
    return tr;
  });
  table.tBodies[0].replaceChildren(...rows);
}

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value);
  document.getElementById("token").value = "";
  document.getElementById("token-form").hidden = true;
  poll();
});

poll();

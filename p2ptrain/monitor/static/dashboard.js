// p2ptrain dashboard: polls /api/state every 2 s and redraws. No libraries, no network
// beyond this server, so it works offline. Charts are plain SVG.
"use strict";

const REFRESH_MS = 2000;
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

const fmt = {
  num: (x, d = 0) => (x === null || x === undefined) ? "-" : Number(x).toLocaleString("en-US", {maximumFractionDigits: d, minimumFractionDigits: d}),
  loss: (x) => (x === null || x === undefined) ? "-" : Number(x).toFixed(3),
  secs: (s) => s < 90 ? `${Math.round(s)} s` : s < 5400 ? `${Math.round(s / 60)} min` : `${(s / 3600).toFixed(1)} h`,
};

// ------------------------------------------------------------------ charts

function lineChart(svg, series, label) {
  // series: [{points: [[x, y], ...], cls}] ; the first series gets a circle per point
  const W = 480, H = 200, L = 44, R = 8, T = 8, B = 22;
  const all = series.flatMap((s) => s.points).filter((p) => p[1] !== null && Number.isFinite(p[1]));
  svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg";
  const mk = (tag, attrs) => { const n = document.createElementNS(ns, tag); for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v); svg.append(n); return n; };
  mk("line", {class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B});
  mk("line", {class: "axis", x1: L, y1: T, x2: L, y2: H - B});
  if (all.length === 0) { mk("text", {x: L + 10, y: H / 2}).textContent = "no data yet"; return; }
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.1 + 1e-3; y1 += Math.abs(y1) * 0.1 + 1e-3; }
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = (y) => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  mk("text", {x: 2, y: T + 8}).textContent = fmt.num(y1, y1 < 100 ? 2 : 0);
  mk("text", {x: 2, y: H - B}).textContent = fmt.num(y0, y0 < 100 ? 2 : 0);
  const xd = x1 - x0 < 10 ? 1 : 0;
  mk("text", {x: L, y: H - 6}).textContent = fmt.num(x0, xd);
  mk("text", {x: W - R - 30, y: H - 6}).textContent = fmt.num(x1, xd);
  mk("text", {x: W / 2 - 20, y: H - 6}).textContent = label;
  series.forEach((s, i) => {
    const pts = s.points.filter((p) => p[1] !== null && Number.isFinite(p[1]));
    if (pts.length === 0) return;
    mk("polyline", {class: s.cls || "", points: pts.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ")});
    if (i === 0) for (const p of pts) mk("circle", {class: "point", cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: 2.5});
  });
}

// -------------------------------------------------------------------- parts

function renderGrid(swarm, mine) {
  const grid = $("grid");
  grid.replaceChildren();
  if (!swarm || !swarm.run_found) { grid.append(el("p", {class: "muted"}, "no run record found on the DHT yet")); return; }
  const rows = new Map();  // "stem" or "L0" -> modules
  for (const m of swarm.modules) {
    const key = m.startsWith("stem") ? "stem" : m.split(".")[0];
    if (!rows.has(key)) rows.set(key, []);
    rows.get(key).push(m);
  }
  for (const [key, modules] of rows) {
    const row = el("div", {class: "grid-row"}, el("span", {class: "label"}, key === "stem" ? "stem" : `level ${key.slice(1)}`));
    for (const m of modules) {
      const n = swarm.coverage[m] || 0;
      const cls = `cell cov${Math.min(n, 2)}` + (mine.includes(m) ? " mine" : "");
      row.append(el("div", {class: cls, "data-module": m, title: `${m}: ${n} live peers`}, el("b", {}, n), m));
    }
    grid.append(row);
  }
}

function renderPeers(swarm) {
  const body = $("peers");
  body.replaceChildren();
  for (const p of (swarm ? swarm.peers : [])) {
    const probe = p.probe === null ? "-" : p.probe;
    const state = p.suspended.length ? `suspended: ${p.suspended.join(", ")}` : "training";
    body.append(el("tr", {class: "peer", "data-peer": p.peer_id, title: p.peer_id},
      el("td", {}, p.short_id), el("td", {}, p.path), el("td", {class: "num"}, p.round),
      el("td", {class: "num"}, fmt.loss(p.loss)), el("td", {class: "num"}, fmt.num(p.tokens_per_s)),
      el("td", {}, p.version), el("td", {}, p.reachability),
      el("td", {class: p.probe === "unreachable" ? "bad probe" : p.probe === "reachable" ? "good probe" : "probe"}, probe),
      el("td", {class: p.suspended.length ? "bad" : ""}, state), el("td", {class: "num"}, fmt.num(p.tokens)),
      el("td", {class: "num"}, fmt.secs(p.age_s)), el("td", {}, p.hardware)));
  }
}

function renderOutcomes(state) {
  const box = $("outcomes");
  box.replaceChildren();
  if (state.kind === "node") {
    const rounds = state.rounds.slice(-10);
    if (rounds.length === 0) { box.append(el("p", {class: "muted"}, "no round finished yet")); return; }
    const modules = state.node.modules;
    const table = el("table", {id: "rounds-table"}, el("thead", {}, el("tr", {}, el("th", {}, "round"), el("th", {}, "loss"),
      el("th", {}, "outer s"), ...modules.map((m) => el("th", {}, m)))));
    const tbody = el("tbody");
    for (const r of rounds.reverse()) {
      tbody.append(el("tr", {class: "round"}, el("td", {class: "num"}, r.round), el("td", {class: "num"}, fmt.loss(r.loss)),
        el("td", {class: "num"}, fmt.num(r.seconds_outer, 1)),
        ...modules.map((m) => { const o = r.modules[m]; return o ? el("td", {class: `o-${o.outcome}`}, `${o.outcome} (${o.peers})`) : el("td", {}, "-"); })));
    }
    table.append(tbody);
    box.append(table);
  }
  if (state.swarm && state.swarm.outcomes_from > 0) {
    const counts = Object.entries(state.swarm.outcomes).map(([o, n]) => el("span", {class: `o-${o}`}, `${o} ${n}   `));
    box.append(el("p", {}, `modules in the last rounds of ${state.swarm.outcomes_from} live peers: `, ...counts));
  }
}

function renderNode(state) {
  const panel = $("node-panel");
  const banner = $("suspended");
  if (state.kind !== "node") { panel.hidden = true; banner.hidden = true; return; }
  const n = state.node;
  panel.hidden = false;
  const items = [["peer", n.peer_id], ["run", n.run_id], ["path", n.path], ["state", n.state], ["round", n.round],
    ["loss", fmt.loss(n.loss)], ["tokens/s", fmt.num(n.tokens_per_s)], ["tokens", fmt.num(n.tokens)],
    ["rounds this session", n.rounds_done], ["uptime", fmt.secs(n.uptime_s)], ["reachability", n.reachability]];
  $("node").replaceChildren(...items.map(([k, v]) => el("div", {class: k === "peer" ? "wide" : ""}, el("dt", {}, k), el("dd", {}, v))));
  banner.hidden = n.suspended.length === 0;
  banner.textContent = n.suspended.length ? `suspended — ${n.suspended.join(", ")}` : "";
}

function render(state) {
  $("kind").textContent = state.kind === "node" ? "node" : "swarm monitor";
  const swarm = state.swarm;
  const mine = state.kind === "node" ? state.node.modules : [];
  const runId = state.kind === "node" ? state.node.run_id : state.run_id;
  $("summary").textContent = swarm
    ? `run ${runId} · ${swarm.peers.length} live peers · ${fmt.num(swarm.tokens_per_s)} tok/s` +
      (swarm.uncovered.length ? ` · uncovered: ${swarm.uncovered.join(", ")}` : "")
    : `run ${runId} · reading the swarm…`;
  renderNode(state);
  renderGrid(swarm, mine);
  renderPeers(swarm);
  renderOutcomes(state);
  if (state.kind === "node") {
    const times = state.rounds.map((r) => r.time).concat(state.steps.map((s) => s.time));
    const t0 = times.length ? Math.min(...times) : 0;
    const minutes = (t) => (t - t0) / 60;
    $("loss-title").textContent = "Loss (nats/token) per round; inner steps in light blue";
    $("speed-title").textContent = "Tokens/s per round";
    lineChart($("loss-chart"), [{points: state.rounds.map((r) => [minutes(r.time), r.loss])},
      {points: state.steps.map((s) => [minutes(s.time), s.loss]), cls: "steps"}], "minutes");
    lineChart($("speed-chart"), [{points: state.rounds.map((r) => [minutes(r.time), r.tokens_per_s])}], "minutes");
  } else {
    const t0 = state.history.length ? state.history[0].time : 0;
    $("loss-title").textContent = "Mean loss of the live peers (nats/token)";
    $("speed-title").textContent = "Swarm tokens/s";
    lineChart($("loss-chart"), [{points: state.history.map((h) => [(h.time - t0) / 60, h.loss])}], "minutes");
    lineChart($("speed-chart"), [{points: state.history.map((h) => [(h.time - t0) / 60, h.tokens_per_s])}], "minutes");
  }
  $("updated").textContent = `updated ${new Date(state.time * 1000).toLocaleTimeString()}`;
  document.body.dataset.ready = "1";
}

async function poll() {
  try {
    const response = await fetch("/api/state", {cache: "no-store"});
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
  } catch (e) {
    $("updated").textContent = `cannot reach the node: ${e.message}`;
  }
  setTimeout(poll, REFRESH_MS);
}

poll();

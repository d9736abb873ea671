// The microfed console: renders the fleet's snapshot (JSON from the console) and follows its
// server-sent events. Every string from the fleet goes through textContent, never HTML.
"use strict";

const SVG = "http://www.w3.org/2000/svg"; // the SVG namespace name, not a download
const COLOURS = ["#0063b1", "#d83b01", "#107c10", "#8764b8", "#b4009e", "#008575", "#986f0b", "#5c2e91"];

function el(tag, text, attrs) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = String(text);
  return e;
}

function ago(now, t) {
  if (!t) return "never";
  const s = Math.max(0, now - t);
  if (s < 90) return Math.round(s) + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  return Math.round(s / 3600) + " h ago";
}

function ms(v) { return v === null || v === undefined ? "–" : v.toFixed(0); }
function short(v) { return v ? v.slice(0, 12) : "–"; }

function row(cells, attrs) {
  const tr = el("tr", null, attrs);
  for (const c of cells) tr.appendChild(c instanceof Node ? c : el("td", c));
  return tr;
}

// The latest global, and what segments when it is not that one (or is the lab's fine-tune of it).
function live(d) {
  const iou = d.live_holdout_iou == null ? "" : ", hold-out IoU " + d.live_holdout_iou.toFixed(3);
  if (d.live_global_version === d.global_version && !d.live_personalised) {
    return String(d.global_version) + (iou ? " (" + iou.slice(2) + ")" : "");
  }
  return d.global_version + " (segmenting " + d.live_global_version +
    (d.live_personalised ? ", fine-tuned here" : "") + iou + ")";
}

function renderDevices(s) {
  const body = document.querySelector("#devices tbody");
  body.replaceChildren();
  for (const [name, d] of Object.entries(s.devices)) {
    const err = el("td", d.last_error || "", { class: "error" });
    body.appendChild(row([
      el("td", name),
      el("td", d.online ? "online" : "offline", { class: "state" }),
      el("td", short(d.model_version), { title: d.model_version }),
      el("td", live(d)),
      el("td", d.queue_depth),
      el("td", d.images_per_minute.toFixed(0)),
      el("td", ms(d.latency_p50_ms)),
      el("td", ms(d.latency_p99_ms)),
      el("td", ago(s.now, d.last_seen)),
      el("td", d.style_code ? "published (holds " + d.style_codes_held + ")" : "none"),
      err,
    ], { "data-device": name, "data-online": String(d.online) }));
  }
}

function renderRounds(s) {
  const body = document.querySelector("#rounds tbody");
  body.replaceChildren();
  for (const r of [...s.rounds].reverse()) {
    const rejected = Object.entries(r.rejected).map(([k, v]) => k + " " + v).join(", ") || "none";
    const bytes = Object.entries(r.labs).map(([k, v]) => k + " " + v.bytes).join(", ") || String(r.update_bytes);
    const eps = r.epsilon === null || r.epsilon === undefined ? "off" : r.epsilon.toFixed(2) + " (" + r.delta + ")";
    body.appendChild(row([
      el("td", r.round), el("td", r.global_version), el("td", r.accepted.join(" ") || "none"),
      el("td", r.stragglers.join(" ") || "none"), el("td", rejected), el("td", bytes),
      el("td", r.seconds.toFixed(1)), el("td", eps), el("td", r.secure_aggregation ? "on" : "off"),
    ], { "data-round": String(r.round) }));
  }
  const a = s.announced;
  document.getElementById("announced").textContent = a
    ? "round " + a.round + (a.closed ? " closed" : " open") + ", from global version " + a.global_version +
      ", " + a.local_epochs + " local epoch(s) at learning rate " + a.learning_rate
    : "no round announced yet";
}

function renderPlot(s) {
  const W = 640, H = 260, L = 44, R = 120, T = 12, B = 30;
  const labs = [...new Set(s.rounds.flatMap(r => Object.keys(r.labs)))].sort();
  const rounds = s.rounds.map(r => r.round);
  const box = svg("svg", { id: "iou-plot", width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img" });
  box.appendChild(svg("title", {}, "hold-out IoU of each lab's local model, per round"));
  const lo = rounds.length ? Math.min(...rounds) : 0, hi = rounds.length ? Math.max(...rounds) : 1;
  const x = r => L + (hi === lo ? 0.5 : (r - lo) / (hi - lo)) * (W - L - R);
  const y = v => T + (1 - v) * (H - T - B);
  for (const v of [0, 0.25, 0.5, 0.75, 1]) {
    box.appendChild(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#e3e7ea" }));
    box.appendChild(svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, v.toFixed(2)));
  }
  for (const r of rounds) {
    box.appendChild(svg("text", { x: x(r), y: H - 10, "text-anchor": "middle" }, r));
  }
  labs.forEach((lab, i) => {
    const colour = COLOURS[i % COLOURS.length];
    const pts = s.rounds
      .filter(r => r.labs[lab] && r.labs[lab].holdout_iou !== null && r.labs[lab].holdout_iou !== undefined)
      .map(r => [r.round, r.labs[lab].holdout_iou]);
    if (pts.length > 1) {
      box.appendChild(svg("polyline", {
        points: pts.map(([r, v]) => x(r) + "," + y(v)).join(" "),
        fill: "none", stroke: colour, "stroke-width": 2,
      }));
    }
    for (const [r, v] of pts) {
      const c = svg("circle", { cx: x(r), cy: y(v), r: 4, fill: colour, "data-round": r, "data-lab": lab });
      c.appendChild(svg("title", {}, lab + ", round " + r + ": IoU " + v.toFixed(3)));
      box.appendChild(c);
    }
    box.appendChild(svg("text", { x: W - R + 10, y: T + 14 + 16 * i, fill: colour }, lab));
  });
  if (!labs.length) {
    box.appendChild(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no closed round with hold-out figures yet"));
  }
  document.getElementById("plot").replaceChildren(box);
}

function renderFleet(s) {
  document.getElementById("fleet").textContent = s.fleet;
  const list = document.getElementById("models");
  list.replaceChildren();
  for (const [v, n] of Object.entries(s.model_versions)) {
    list.appendChild(el("li", short(v) + ": " + n + " device(s)", { title: v }));
  }
  document.getElementById("command").textContent = s.command
    ? "last fleet command: " + s.command.order + " for " + s.command.target
    : "no fleet command";
  const online = Object.values(s.devices).filter(d => d.online).length;
  document.getElementById("summary-line").textContent =
    online + " of " + Object.keys(s.devices).length + " devices online, " + s.rounds.length +
    " closed round(s) shown" + (s.signed ? "" : " (summaries not verified: no aggregator_key)");
  const r = s.refused;
  document.getElementById("refused").textContent = s.messages + " messages read; refused: " +
    r.malformed + " malformed, " + r.forged_sender + " forged sender, " + r.bad_signature +
    " bad signature, " + r.too_many_devices + " beyond the device cap";
}

function render(s) {
  renderFleet(s);
  renderDevices(s);
  renderRounds(s);
  renderPlot(s);
}

function live(on) {
  const p = document.getElementById("live");
  p.setAttribute("data-live", String(on));
  p.textContent = on ? "live" : "disconnected: retrying";
}

// The page holds the whole state; each event is an update with the devices and only the newest
// closed rounds (the console's snapshot at 100 devices and 50 rounds is ~0.5 MB, an update a small
// part of it). Rounds merge by number; a gap (more summaries than the update carries) or a
// reconnection reloads the whole state.
let state = JSON.parse(document.getElementById("initial").textContent);

function merge(update) {
  if (!update.partial) return update;
  if (update.rounds_seq - state.rounds_seq > update.rounds.length) return null;
  const byRound = new Map(state.rounds.map(r => [r.round, r]));
  for (const r of update.rounds) byRound.set(r.round, r);
  const rounds = [...byRound.values()].sort((a, b) => a.round - b.round).slice(-update.max_rounds);
  return Object.assign({}, update, { rounds, partial: false });
}

function reload() {
  fetch("/state.json", { cache: "no-store" })
    .then(r => r.json())
    .then(s => { state = s; render(state); })
    .catch(() => live(false));
}

render(state);
if (window.EventSource) {
  const events = new EventSource("/events");
  events.onopen = () => reload();
  events.onmessage = m => {
    live(true);
    const next = merge(JSON.parse(m.data));
    if (next === null) { reload(); return; }
    state = next;
    render(state);
  };
  events.onerror = () => live(false);
}

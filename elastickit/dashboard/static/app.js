// elastickit dashboard: polls /api/summary and draws the seven panels (plain DOM and inline SVG,
// no framework, no build step, nothing loaded from elsewhere). Every string from the logs goes
// into the page as text (textContent), never as HTML.
"use strict";

const POLL_MS = 1000;
const SVG = "http://www.w3.org/2000/svg";
const PHASE_COLORS = {
  detect: "#8e44ad", abort: "#c0392b", rendezvous: "#d35400", start: "#f39c12",
  restore: "#2980b9", first_step: "#16a085", lost_work: "#7f8c8d",
};
const SEGMENT_COLORS = ["#2c6fbb", "#e67e22", "#27ae60", "#8e44ad", "#c0392b", "#16a085"];
const state = { type: "", rank: "", data: null, failures: 0 };
window.__ekLoadedAt = Date.now();
window.__ekUpdates = 0;

// -- small helpers ---------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "style") Object.assign(el.style, v); // CSSOM: allowed by the page's CSP
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) el.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const title = (text) => s("title", {}, text);

function fmtS(x) {
  if (x === null || x === undefined) return "–";
  if (x < 1) return `${(x * 1000).toFixed(x < 0.01 ? 1 : 0)} ms`;
  if (x < 120) return `${x.toFixed(x < 10 ? 2 : 1)} s`;
  if (x < 7200) return `${(x / 60).toFixed(1)} min`;
  return `${(x / 3600).toFixed(1)} h`;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n.toFixed(0)} ${units[i]}`;
}

function fmtClock(t) {
  if (!t) return "–";
  return new Date(t * 1000).toLocaleTimeString([], { hour12: false });
}

function stat(label, value, extra) {
  return h("div", { class: "stat" }, h("div", { class: "stat-label" }, label),
    h("div", { class: "stat-value" }, value), extra ? h("div", { class: "stat-extra" }, extra) : null);
}

function unavailable(body, why) {
  body.replaceChildren(h("p", { class: "muted" }, why || "no data yet"));
}

function table(headers, rows, attrs) {
  return h("table", attrs || {}, h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows));
}

// -- panels ----------------------------------------------------------------------------------

// nodes.json states: a finished node is fine, one on its way (back) in is a warning.
const NODE_STATES = { running: "up", done: "up", starting: "warn", rejoining: "warn", spare: "warn" };

function renderJob(body, job, meta) {
  const gp = job.goodput || {};
  const rate = job.step_rate ? `${job.step_rate.toFixed(2)} steps/s` : "–";
  const stats = h("div", { class: "stats" },
    stat("step", job.step ?? "–", job.finished ? "run finished" : job.active ? "running" : "no new record lately"),
    stat("layout", job.layout || "–", job.world_size ? `world size ${job.world_size}` : ""),
    stat("step rate", rate, job.step_s ? `median step ${fmtS(job.step_s)}` : ""),
    stat("ETTR", gp.ettr !== undefined && gp.ettr !== null ? `${(gp.ettr * 100).toFixed(1)}%` : "–",
      gp.wall_s ? `of ${fmtS(gp.wall_s)} wall time` : ""),
    stat("since last failure", job.since_failure_s !== null ? fmtS(job.since_failure_s) : "none", ""),
  );
  const parts = [stats];
  if (gp.available) parts.push(goodputBar(gp));
  const alerts = job.alerts || [];
  parts.push(h("ul", { class: "alerts" }, alerts.length ? alerts.map((a) =>
    h("li", { class: `alert ${a.level}`, "data-kind": a.kind }, h("b", {}, a.level), " ", a.text))
    : h("li", { class: "alert ok" }, "no alerts")));
  if ((job.nodes || []).length) {
    parts.push(h("div", { class: "nodes" }, job.nodes.map((n) =>
      h("span", { class: `chip ${NODE_STATES[n.state] || "down"}`, "data-node": n.node, "data-state": n.state }, `node ${n.node}: ${n.state}`))));
  }
  if (meta.live) {
    parts.push(h("div", { class: "cards" }, (job.live || []).map((r) => {
      const bad = !r.reachable || (r.state === "running" && r.silent_s > 5);
      const inside = r.in_flight.length ? `in ${r.in_flight[0].op} for ${fmtS(r.in_flight[0].age_s)}` : "between ops";
      return h("div", { class: `card ${bad ? "bad" : r.state === "closed" ? "closed" : "good"}` },
        h("div", { class: "card-title" }, `rank ${r.rank}`),
        h("div", {}, `step ${r.step} · ${r.state}`),
        h("div", {}, `heartbeat ${fmtS(r.silent_s)} ago`),
        h("div", { class: "muted" }, `${r.host} pid ${r.pid} · ${inside}`));
    })));
  }
  body.replaceChildren(...parts);
}

function goodputBar(gp) {
  const parts = [["productive", gp.productive_s, "#27ae60"], ["recovery", gp.badput_s.recovery, "#c0392b"],
    ["lost work", gp.badput_s.lost_work, "#7f8c8d"], ["checkpoint", gp.badput_s.checkpoint, "#2980b9"],
    ["other", gp.badput_s.other, "#bdc3c7"]];
  const total = parts.reduce((a, p) => a + p[1], 0) || 1;
  const W = 600;
  let x = 0;
  const svg = s("svg", { class: "bar", viewBox: `0 0 ${W} 18`, width: "100%", height: 18, preserveAspectRatio: "none" });
  for (const [name, v, color] of parts) {
    const w = (v / total) * W;
    if (w > 0) svg.append(s("rect", { x, y: 0, width: w, height: 18, fill: color }, title(`${name}: ${fmtS(v)}`)));
    x += w;
  }
  const legend = h("div", { class: "legend" }, parts.map(([name, v, color]) =>
    h("span", {}, h("i", { style: { background: color } }), `${name} ${fmtS(v)}`)));
  return h("div", { class: "goodput" }, h("div", { class: "muted" }, "where the wall time went"), svg, legend);
}

function quantile(values, q) {
  const v = values.filter((x) => x !== null).sort((a, b) => a - b);
  return v.length ? v[Math.min(v.length - 1, Math.floor(q * (v.length - 1)))] : 0;
}

function renderHeatmap(body, hm) {
  if (!hm.available) return unavailable(body, hm.why);
  // One colour scale for the whole window: a rank the others wait on step after step stands out
  // as a dark row.
  const top95 = Math.max(quantile(hm.held_s.flat(), 0.95), 1e-3);
  const width = body.clientWidth || 600;
  const left = 120, top = 18;
  const cell = Math.max(10, Math.min(26, Math.floor((width - left - 10) / Math.max(1, hm.steps.length))));
  const W = left + hm.steps.length * cell + 4, H = top + hm.ranks.length * cell + 18;
  const svg = s("svg", { class: "heatmap", width: W, height: H, viewBox: `0 0 ${W} ${H}` });
  hm.steps.forEach((step, j) => {
    if (j === 0 || j === hm.steps.length - 1 || step % 10 === 0) {
      svg.append(s("text", { x: left + j * cell + cell / 2, y: top - 5, class: "tick", "text-anchor": "middle" }, step));
    }
    if (j > 0 && hm.segments[j] !== hm.segments[j - 1]) {
      svg.append(s("line", { x1: left + j * cell, x2: left + j * cell, y1: top - 2, y2: top + hm.ranks.length * cell + 4, class: "restart" },
        title("restart")));
    }
  });
  hm.ranks.forEach((rank, i) => {
    const slow = hm.slow.includes(rank);
    const score = hm.scores[String(rank)];
    const label = `rank ${rank}` + (score !== undefined ? ` · ${score.toFixed(2)}` : "") + (slow ? " slow" : "");
    svg.append(s("text", { x: left - 6, y: top + i * cell + cell - 3, "text-anchor": "end", class: slow ? "slow-label" : "row-label", "data-rank": rank }, label));
    hm.steps.forEach((step, j) => {
      const v = hm.held_s[i][j];
      if (v === null) return;
      const t = Math.max(0, Math.min(1, v / top95));
      const color = `hsl(${Math.round(210 - 210 * t)}, 70%, ${Math.round(92 - 42 * t)}%)`;
      svg.append(s("rect", { x: left + j * cell, y: top + i * cell, width: cell - 1, height: cell - 1, fill: color, class: slow ? "slow-cell" : null },
        title(`rank ${rank}, step ${step}: the others waited ${fmtS(v)} for it; step ${fmtS(hm.step_s[i][j])}, `
          + `its own wait ${fmtS(hm.wait_s[i][j])}, busy ${fmtS(hm.busy_s[i][j])}`)));
    });
  });
  body.replaceChildren(
    h("p", { class: "muted" }, `How long the other ranks waited for each rank, per step (darker is longer; `
      + `scale to ${fmtS(top95)}); rows: rank · straggler score (slow past ${hm.threshold}); dashed: restarts. Slow: `, hm.slow.length ? hm.slow.map((r) => `rank ${r}`).join(", ") : "none", "."),
    h("div", { class: "scroll" }, svg));
}

function renderLinks(body, lk) {
  if (!lk.available) return unavailable(body, lk.why);
  const n = lk.ranks.length, cell = Math.max(34, Math.min(56, Math.floor(360 / Math.max(1, n))));
  const left = 56, top = 30, W = left + n * cell + 4, H = top + n * cell + 4;
  const values = lk.matrix.flat().filter((v) => v !== null);
  const max = Math.max(...values, 1e-9);
  const slow = new Set(lk.slow.map((p) => `${p[0]}-${p[1]}`));
  const svg = s("svg", { class: "links", width: W, height: H, viewBox: `0 0 ${W} ${H}` });
  svg.append(s("text", { x: left + (n * cell) / 2, y: 10, "text-anchor": "middle", class: "tick" }, "peer (dst)"));
  lk.ranks.forEach((r, j) => svg.append(s("text", { x: left + j * cell + cell / 2, y: top - 5, "text-anchor": "middle", class: "tick" }, r)));
  lk.ranks.forEach((a, i) => {
    svg.append(s("text", { x: left - 8, y: top + i * cell + cell / 2 + 4, "text-anchor": "end", class: "tick" }, `src ${a}`));
    lk.ranks.forEach((b, j) => {
      const v = lk.matrix[i][j];
      const key = a < b ? `${a}-${b}` : `${b}-${a}`;
      const isSlow = v !== null && slow.has(key);
      const t = v === null ? 0 : v / max;
      const fill = v === null ? "#f4f5f7" : `hsl(${Math.round(200 - 200 * t)}, 65%, ${Math.round(90 - 40 * t)}%)`;
      const g = s("g", { "data-pair": `${a}-${b}`, class: isSlow ? "slow-link" : null });
      g.append(s("rect", { x: left + j * cell, y: top + i * cell, width: cell - 2, height: cell - 2, fill, stroke: isSlow ? "#c0392b" : "none", "stroke-width": isSlow ? 3 : 0 },
        title(v === null ? `${a} -> ${b}: no traffic` : `${a} -> ${b}: ${fmtS(v)} per ${lk.kind[i][j] === "p2p" ? "send/recv" : "collective (group floor)"}`)));
      if (v !== null) g.append(s("text", { x: left + j * cell + cell / 2 - 1, y: top + i * cell + cell / 2 + 3, "text-anchor": "middle", class: "cell-text" }, (v * 1000).toFixed(1)));
      svg.append(g);
    });
  });
  const rows = lk.groups.map((g) => h("tr", { class: g.slow ? "slow-row" : null },
    h("td", {}, g.group), h("td", {}, g.ranks.join(", ")), h("td", {}, fmtS(g.op_s)),
    h("td", {}, g.ops_per_step), h("td", {}, fmtBytes(g.bytes_per_step))));
  body.replaceChildren(
    h("p", { class: "muted" }, `ms per operation over steps ${lk.steps[0]}–${lk.steps[1]} (send/recv as each end saw it; two-rank groups: the fastest member's time per collective). Slow: `,
      lk.slow.length ? lk.slow.map((p) => `${p[0]} ↔ ${p[1]}`).join(", ") : "none", "."),
    h("div", { class: "scroll" }, svg),
    table(["group", "ranks", "per op", "ops/step", "bytes/step"], rows, { class: "compact" }));
}

function phaseBar(rec, scale) {
  const W = 420, bar = s("svg", { class: "bar", width: "100%", height: 20, viewBox: `0 0 ${W} 20`, preserveAspectRatio: "none" });
  let x = 0;
  for (const p of rec.phases) {
    const w = scale > 0 ? (p.s / scale) * W : 0;
    if (w > 0) bar.append(s("rect", { x, y: 0, width: w, height: 20, fill: PHASE_COLORS[p.phase] || "#999", "data-phase": p.phase }, title(`${p.phase}: ${fmtS(p.s)}`)));
    x += w;
  }
  return bar;
}

function renderIncidents(body, inc) {
  const head = h("div", { class: "stats" }, stat("failures", inc.num_failures, inc.num_unrecovered ? `${inc.num_unrecovered} not recovered` : ""),
    stat("MTTR (median)", fmtS(inc.mttr_s)), stat("total cost", fmtS(inc.total_cost_s), "downtime + lost work"));
  if (!inc.incidents.length) return body.replaceChildren(head, h("p", { class: "muted" }, "no failure so far"));
  const scale = Math.max(...inc.incidents.map((i) => i.cost_s), 1e-9);
  const legend = h("div", { class: "legend" }, inc.phases.map((p) => h("span", {}, h("i", { style: { background: PHASE_COLORS[p] } }), p.replace("_", " "))));
  const items = inc.incidents.map((i) => {
    const rec = i.recovery;
    const f = i.finding;
    const rows = [
      h("div", { class: "incident-head" }, h("b", {}, `#${i.id} `, i.summary),
        h("span", { class: `chip ${i.status === "recovered" ? "up" : i.status === "not recovered" ? "down" : "warn"}` }, i.status)),
      h("div", { class: "muted" }, `${fmtClock(i.time)} · rank${i.ranks.length === 1 ? "" : "s"} ${i.ranks.join(", ") || "?"}`
        + (i.node !== null && i.node !== undefined ? ` · node ${i.node}` : "") + (i.host ? ` · host ${i.host}` : "")
        + (f ? ` · seen by the monitor as ${f.type}${f.op ? ` in ${f.op}` : ""} (confidence ${f.confidence})` : "")),
    ];
    if (f && f.evidence && Object.keys(f.evidence).length) rows.push(h("code", { class: "evidence" }, JSON.stringify(f.evidence)));
    if (i.followed_by.length) rows.push(h("div", { class: "muted" }, "then: " + i.followed_by.map((x) => `${x.type} of rank ${x.ranks.join(", ")}`).join("; ")));
    if (rec) {
      rows.push(phaseBar(rec, scale));
      rows.push(h("div", { class: "muted" }, `cost ${fmtS(i.cost_s)}: ` + rec.phases.filter((p) => p.s > 0).map((p) => `${p.phase.replace("_", " ")} ${fmtS(p.s)}`).join(", ")
        + ` · restored step ${rec.restore.step ?? "?"} from ${rec.restore.tier || "?"}` + (rec.restore.bytes ? ` (${fmtBytes(rec.restore.bytes)})` : "")
        + ` · lost ${rec.lost_steps} step(s)` + (rec.old_layout ? ` · ${rec.old_layout} → ${rec.new_layout}` : "")));
    }
    return h("li", { class: `incident ${i.kind}`, "data-incident": i.id, "data-ranks": i.ranks.join(","), "data-node": i.node ?? "" }, rows);
  });
  body.replaceChildren(head, legend, h("ul", { class: "incidents" }, items));
}

function renderCheckpoints(body, ck) {
  const rows = ck.tiers.map((t) => h("tr", { "data-tier": t.tier },
    h("td", {}, h("b", {}, t.tier)), h("td", {}, t.newest_step ?? "–"),
    h("td", {}, t.age_s !== null ? fmtS(t.age_s) + " ago" : "–"),
    h("td", {}, t.at_risk_steps ?? "–"),
    h("td", {}, fmtBytes(t.stored_bytes)),
    h("td", {}, t.throughput_bps ? `${fmtBytes(t.throughput_bps)}/s` : "–"),
    h("td", {}, t.compression_ratio ? `${t.compression_ratio.toFixed(2)}×` : "–"),
    h("td", { title: t.last_failure ? `last failure: ${t.last_failure}` : null },
      t.committed === null ? "–" : `${t.committed}` + (t.superseded ? `, ${t.superseded} superseded` : ""),
      t.failed ? h("span", { class: "bad" }, `, ${t.failed} failed`) : null)));
  const whatIf = ck.what_if.map((w) => h("li", { class: `whatif ${w.step === null ? "bad" : ""}`, "data-node": w.node, "data-tier": w.tier || "", "data-step": w.step ?? "" },
    w.text + (w.lost_steps ? ` (${w.lost_steps} step(s) lost)` : "")));
  const blocking = ck.blocking_s.median !== null ? `save blocks training ${fmtS(ck.blocking_s.median)} (median), ${fmtS(ck.blocking_s.max)} at most` : "no checkpoint record";
  body.replaceChildren(
    h("div", { class: "scroll" }, table(["tier", "newest step", "age", "at risk", "size", "throughput", "zstd", "saves"], rows, { class: "compact tiers" })),
    h("p", { class: "muted" }, `${ck.num_checkpoints} checkpoints · ${blocking}` + (ck.skipped_saves ? ` · ${ck.skipped_saves} skipped` : "")),
    h("h3", {}, "If a node died now"),
    h("ul", { class: "whatifs" }, whatIf),
    h("p", { class: "muted" }, "Read from the tiers' contents, as a restore by the surviving nodes would choose (memory snapshots die with their processes and are not counted)."));
}

function lineChart(series, markers, key, label, fmt) {
  const W = 560, H = 200, L = 56, R = 10, T = 10, B = 26;
  const pts = series.flat().filter((p) => p[key] !== null);
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, width: "100%", height: H, "data-curve": key });
  if (!pts.length) return svg;
  const x0 = Math.min(...pts.map((p) => p.step)), x1 = Math.max(...pts.map((p) => p.step), x0 + 1);
  const ys = pts.map((p) => p[key]);
  // A few huge values (the first step compiles and allocates) must not flatten the rest.
  let y0 = Math.min(...ys), y1 = Math.min(Math.max(...ys), 2 * quantile(ys, 0.9));
  if (y1 - y0 < 1e-12) { y0 -= 1; y1 += 1; }
  const X = (v) => L + ((v - x0) / (x1 - x0)) * (W - L - R);
  const Y = (v) => T + (1 - (Math.min(v, y1) - y0) / (y1 - y0)) * (H - T - B);
  svg.append(s("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }), s("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
  for (const v of [y0, (y0 + y1) / 2, y1]) svg.append(s("text", { x: L - 4, y: Y(v) + 3, "text-anchor": "end", class: "tick" }, fmt(v)));
  for (const v of [x0, Math.round((x0 + x1) / 2), x1]) svg.append(s("text", { x: X(v), y: H - 8, "text-anchor": "middle", class: "tick" }, v));
  svg.append(s("text", { x: W - R, y: T + 8, "text-anchor": "end", class: "tick" }, label));
  // Labels of restarts close together (a failure, then its node back a step later) go on
  // separate lines instead of over each other.
  let lastX = -Infinity, line = 0;
  for (const m of markers) {
    if (m.step === null || m.step < x0 || m.step > x1) continue;
    const x = X(m.step);
    line = x - lastX < 60 ? line + 1 : 0;
    lastX = x;
    svg.append(s("line", { x1: x, x2: x, y1: T, y2: H - B, class: "restart" }, title(`${m.cause}: restored step ${m.step}, then ${m.new_layout}`)));
    svg.append(s("text", { x: x + 3, y: T + 18 + 11 * (line % 4), class: "marker-text" }, m.cause));
  }
  series.forEach((seg, k) => {
    const d = seg.filter((p) => p[key] !== null).map((p, i) => `${i ? "L" : "M"}${X(p.step).toFixed(1)},${Y(p[key]).toFixed(1)}`).join("");
    if (d) svg.append(s("path", { d, fill: "none", stroke: SEGMENT_COLORS[k % SEGMENT_COLORS.length], "stroke-width": 1.6 }, title(`incarnation ${k + 1}`)));
  });
  return svg;
}

function renderCurves(body, cv) {
  if (!cv.available) return unavailable(body, cv.why);
  body.replaceChildren(h("div", { class: "charts" },
    lineChart(cv.series, cv.markers, "loss", "loss", (v) => v.toFixed(3)),
    lineChart(cv.series, cv.markers, "step_s", "step time", fmtS)),
    h("p", { class: "muted" }, `${cv.series.length} incarnation(s), one colour each; dashed lines: restarts at the step they restored.`
      + (cv.stride > 1 ? ` Every ${cv.stride}th of ${cv.num_points} points drawn.` : "")));
}

function renderEvents(body, ev) {
  const typeSel = h("select", { name: "type", onchange: (e) => { state.type = e.target.value; renderEvents(body, ev); } },
    h("option", { value: "" }, "all types"), ev.types.map((t) => h("option", { value: t }, t)));
  const rankSel = h("select", { name: "rank", onchange: (e) => { state.rank = e.target.value; renderEvents(body, ev); } },
    h("option", { value: "" }, "all ranks"), ev.ranks.map((r) => h("option", { value: String(r) }, `rank ${r}`)));
  typeSel.value = state.type;
  rankSel.value = state.rank;
  const rows = ev.rows.filter((r) => (!state.type || r.type === state.type) && (!state.rank || r.ranks.includes(Number(state.rank))))
    .map((r) => h("tr", { class: `ev-${r.type}`, "data-type": r.type },
      h("td", {}, fmtClock(r.time)), h("td", {}, r.type), h("td", {}, r.ranks.join(", ")),
      h("td", {}, r.step ?? ""), h("td", {}, r.text)));
  body.replaceChildren(h("div", { class: "filters" }, typeSel, rankSel, h("span", { class: "muted" }, `${rows.length} shown of ${ev.total}`)),
    h("div", { class: "scroll tall" }, table(["time", "type", "ranks", "step", "what happened"], rows, { class: "compact events" })));
}

const RENDER = {
  job: (b, d) => renderJob(b, d.job, d.meta),
  heatmap: (b, d) => renderHeatmap(b, d.heatmap),
  links: (b, d) => renderLinks(b, d.links),
  incidents: (b, d) => renderIncidents(b, d.incidents),
  checkpoints: (b, d) => renderCheckpoints(b, d.checkpoints),
  curves: (b, d) => renderCurves(b, d.curves),
  events: (b, d) => renderEvents(b, d.events),
};

// The JSON each panel was last drawn from: a panel whose data did not change is not redrawn, so
// a filter menu being used or a tooltip being read is not swept away by the next poll.
const drawn = {};

function render(d) {
  const health = document.getElementById("health");
  health.textContent = d.job.health;
  health.className = `badge ${d.job.health}`;
  document.getElementById("label").textContent = d.meta.label;
  for (const section of document.querySelectorAll("section[data-panel]")) {
    const name = section.dataset.panel;
    const body = section.querySelector(".body");
    try {
      const key = JSON.stringify(d[name]) + (name === "job" ? JSON.stringify(d.meta) : "");
      if (drawn[name] !== key) {
        RENDER[name](body, d);
        drawn[name] = key;
      }
      section.dataset.version = d.meta.version;
      section.classList.remove("broken");
    } catch (err) {
      drawn[name] = undefined;
      section.classList.add("broken");
      body.replaceChildren(h("p", { class: "muted" }, `cannot draw this panel: ${err}`));
    }
  }
}

async function poll() {
  const conn = document.getElementById("conn");
  try {
    const r = await fetch("/api/summary", { cache: "no-store", credentials: "same-origin" });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const d = await r.json();
    state.data = d;
    render(d);
    window.__ekUpdates += 1;
    conn.textContent = `updated ${fmtClock(d.meta.now)}`;
    conn.className = "conn ok";
  } catch (err) {
    conn.textContent = `disconnected (${err.message}); retrying`;
    conn.className = "conn bad";
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();

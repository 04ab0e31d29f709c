// qscale dashboard: the one renderer of both pages (index.html: the overview; job.html: a job).
// It fetches the coordinator's JSON every 2 s and draws tables and plain SVG charts. Every
// string from the server goes in as text (textContent), never as markup; nothing is loaded
// from outside the coordinator.
"use strict";
(() => {
  const REFRESH_MS = 2000;
  const TIMEOUT_MS = 10000;  // a coordinator that does not answer within this is reported
  const SVG_NS = "http://www.w3.org/2000/svg"; // an XML namespace name: nothing is fetched from it
  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ formatting
  const fmtInt = (n) => (n === null || n === undefined) ? "–" : Number(n).toLocaleString("en-US");
  const fmtAge = (s) => {
    if (s === null || s === undefined) return "–";
    if (s < 1) return (s * 1000).toFixed(0) + " ms";
    if (s < 10) return s.toFixed(1) + " s";
    if (s < 120) return Math.round(s) + " s";
    if (s < 7200) return Math.round(s / 60) + " min";
    return (s / 3600).toFixed(1) + " h";
  };
  const fmtBytes = (b) => !b ? "–" : b >= 2 ** 30 ? (b / 2 ** 30).toFixed(1) + " GiB" : (b / 2 ** 20).toFixed(0) + " MiB";
  const fmtRate = (r) => r >= 100 ? Math.round(r).toLocaleString("en-US") : Number(r).toFixed(1);
  const fmtPct = (p) => (p === null || p === undefined) ? "–" : Number(p).toFixed(1) + "%";
  const clip = (text, n) => text.length > n ? text.slice(0, n - 1) + "…" : text;

  // ------------------------------------------------------------------ DOM helpers
  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = (text === null) ? "–" : String(text);
    return node;
  }
  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }
  function tip(node, text) { // a hover text on an SVG element
    node.appendChild(svg("title", {}, text));
    return node;
  }
  function cell(tr, text, cls) {
    const td = el("td", cls, text === undefined ? null : text);
    tr.appendChild(td);
    return td;
  }
  function emptyRow(cols, text) {
    const tr = document.createElement("tr");
    cell(tr, text, "muted").colSpan = cols;
    return tr;
  }
  function banner(text) {
    const b = $("banner");
    b.textContent = text || "";
    b.classList.toggle("show", !!text);
  }
  function footer(data) {
    $("updated").textContent = "updated " + new Date(data.now * 1000).toLocaleTimeString("en-GB");
    $("version").textContent = data.version;
  }

  // ------------------------------------------------------------------ the overview
  function renderNodes(nodes) {
    const rows = nodes.map((n) => {
      const tr = document.createElement("tr");
      if (n.stale) tr.classList.add("stale");
      if (n.state === "lost") tr.classList.add("lost");
      const id = cell(tr, n.node_id, "mono");
      id.title = [n.name, "qscale " + n.qscale_version, "qiskit " + n.qiskit_version, "aer " + n.aer_version].join(" · ");
      cell(tr, n.hostname);
      cell(tr, n.state, "state-" + n.state);
      cell(tr, n.slots, "num");
      cell(tr, n.running, "num");
      cell(tr, n.cores, "num");
      cell(tr, fmtBytes(n.memory_budget_bytes), "num");
      cell(tr, (n.methods || []).join(", "), "methods");
      cell(tr, n.max_statevector_qubits || "–", "num");
      cell(tr, fmtInt(n.shards_done), "num");
      cell(tr, fmtAge(n.last_heartbeat_age_s), "num hb");
      return tr;
    });
    $("nodes").replaceChildren(...(rows.length ? rows : [emptyRow(11, "no nodes")]));
  }
  function progressCell(tr, progress) {
    const td = el("td", "progress");
    if (progress === null || progress === undefined) {
      td.textContent = "–";
    } else {
      const bar = document.createElement("progress");
      bar.max = 100;
      bar.value = progress;
      td.append(bar, " " + fmtPct(progress));
    }
    tr.appendChild(td);
  }
  function renderJobs(jobs) {
    const rows = jobs.map((j) => {
      const tr = document.createElement("tr");
      const id = cell(tr, j.detail ? undefined : j.job_id, "mono");
      if (j.detail) {
        const a = el("a", "", j.job_id);
        a.href = "jobs/" + encodeURIComponent(j.job_id);
        id.replaceChildren(a);
      }
      cell(tr, j.user || null, "user");
      const state = cell(tr, j.state, "state-" + j.state);
      if (j.priority && j.priority !== "normal") state.title = j.priority + " priority";
      progressCell(tr, j.progress);
      cell(tr, fmtInt(j.shots_done) + " / " + fmtInt(j.shots_total), "num");
      const shards = cell(tr, fmtInt(j.shards_done) + " / " + fmtInt(j.shards_total), "num");
      if (j.shards_running) shards.title = j.shards_running + " running";
      const nodes = cell(tr, j.nodes_used ? j.nodes_used.length : null, "num");
      if (j.nodes_used) nodes.title = j.nodes_used.join("\n");
      const more = j.circuits > 1 && j.name ? " (+" + (j.circuits - 1) + ")" : "";
      cell(tr, j.name ? j.name + more : j.circuits + " circuit(s)", "name");
      cell(tr, fmtAge(j.wall_s), "num");
      if (j.error || !j.pruned) cell(tr, j.error, "err");
      else cell(tr, "results pruned by retention", "muted");
      return tr;
    });
    $("jobs").replaceChildren(...(rows.length ? rows : [emptyRow(10, "no jobs yet")]));
  }
  function renderScope(viewer) {
    // Whose jobs the list holds: a viewer who is not an admin sees their own only.
    const own = viewer && viewer.authenticated && !viewer.admin;
    $("jobs-scope").textContent = own ? "your jobs (user " + viewer.user + ")" : "every user's jobs";
  }
  function renderSpark(series, now) {
    const W = 1000, H = 100, PAD = 4, span = series.history_s;
    const pts = series.points.filter((p) => p[0] >= now - span);
    const peak = pts.reduce((m, p) => Math.max(m, p[1]), 0);
    const top = peak > 0 ? peak * 1.1 : 1;
    const xy = pts.map(([t, r]) => [(t - (now - span)) / span * W, H - PAD - r / top * (H - 2 * PAD)]);
    const str = (p) => p[0].toFixed(1) + "," + p[1].toFixed(1);
    $("spark-line").setAttribute("points", xy.map(str).join(" "));
    $("spark-area").setAttribute("points", xy.length
      ? [[xy[0][0], H], ...xy, [xy[xy.length - 1][0], H]].map(str).join(" ") : "");
    $("spark-max").textContent = pts.length < 2 ? "collecting samples…" : "peak " + fmtRate(peak) + " shots/s";
    $("spark-window").textContent = "last " + Math.round(span / 60) + " minutes";
  }
  function renderOverview(s) {
    const t = s.totals;
    $("t-nodes").textContent = t.nodes_alive + " / " + t.nodes_lost;
    $("t-slots").textContent = t.slots_busy + " / " + t.slots_total;
    $("t-jobs").textContent = t.jobs_running + " / " + t.jobs_queued;
    $("t-rate").textContent = fmtRate(t.shots_per_s);
    $("t-shots").textContent = fmtInt(t.shots_counted);
    renderNodes(s.nodes);
    renderScope(s.viewer);
    renderJobs(s.jobs);
    renderSpark(s.shots_per_s, s.now);
  }

  // ------------------------------------------------------------------ the job page
  const OUTCOMES = ["done", "running", "failed", "refused", "lost", "cancelled", "stale"];

  function renderFacts(j, c) {
    const facts = [
      ["user", j.user || null],
      ["priority", j.priority || "normal"],
      ["circuits", c.count === 1 ? "1" : fmtInt(c.count)],
      ["method", j.method || "automatic"],
      ["seed", j.seed],
      ["shards queued", fmtInt(j.shards_queued)],
      ["nodes used", j.nodes_used.length ? j.nodes_used.join(", ") : "–"],
      ["submitted", new Date(j.created_at * 1000).toLocaleString("en-GB")],
    ];
    if (j.pruned) facts.push(["results", "pruned by retention (the status is kept)"]);
    if (j.error) facts.push(["error", j.error]);
    const items = [];
    for (const [k, v] of facts) {
      items.push(el("dt", "", k));
      items.push(el("dd", k === "error" ? "err" : (k === "nodes used" ? "mono" : ""), v));
    }
    $("j-facts").replaceChildren(...items);
    $("j-bar").value = j.progress;
  }

  function renderNav(c) {
    const nav = $("h-nav");
    if (c.count <= 1) { nav.replaceChildren(); return; }
    const link = (k, text) => {
      if (k < 0 || k >= c.count) return el("span", "muted", text);
      const a = el("a", "", text);
      a.href = "?circuit=" + k;
      return a;
    };
    nav.replaceChildren(link(c.index - 1, "‹ previous"), el("span", "", (c.index + 1) + " of " + fmtInt(c.count)),
                        link(c.index + 1, "next ›"));
  }

  // Horizontal bars: the most frequent outcomes of one circuit; the shots of all the others in
  // one line below (no bar: it would dwarf the rest).
  function renderHistogram(c, estimator) {
    const chart = $("histogram");
    $("h-title").textContent = "circuit " + c.index + (c.name ? " · " + c.name : "") + " · " + fmtInt(c.shots) + " shots"
      + (c.outcomes.length ? " · top " + c.outcomes.length : "");
    renderNav(c);
    const W = 720, ROW = 19, TOP = 4;
    if (!c.outcomes.length) {
      const text = estimator ? "an estimator job: expectation values, no outcomes" : "no shots counted yet";
      chart.setAttribute("viewBox", "0 0 " + W + " 40");
      chart.replaceChildren(svg("text", {x: 8, y: 24, class: "muted"}, text));
      return;
    }
    const pct = (n) => c.shots ? " (" + (100 * n / c.shots).toFixed(n / c.shots < 0.001 ? 3 : 1) + "%)" : "";
    const longest = Math.max(...c.outcomes.map(([bits]) => Math.min(bits.length, 40)));
    const LABEL = Math.max(60, longest * 7 + 14), NUM = 130;
    const plot = W - LABEL - NUM;
    const peak = Math.max(...c.outcomes.map(([, n]) => n));
    const items = [];
    c.outcomes.forEach(([bits, n], i) => {
      const y = TOP + i * ROW;
      items.push(tip(svg("text", {x: LABEL - 8, y: y + 13, "text-anchor": "end", class: "mono"}, clip(bits, 40)), bits));
      const w = Math.max(1, n / peak * plot);
      items.push(tip(svg("rect", {x: LABEL, y: y + 2, width: w.toFixed(1), height: ROW - 4, rx: 2, class: "bar",
                                  "data-outcome": bits, "data-count": n}), bits + ": " + fmtInt(n) + pct(n)));
      items.push(svg("text", {x: LABEL + w + 6, y: y + 13, class: "muted"}, fmtInt(n) + pct(n)));
    });
    let height = TOP * 2 + c.outcomes.length * ROW;
    if (c.other_shots > 0) {
      items.push(svg("text", {x: LABEL, y: height + 12, class: "muted"},
                     "all other outcomes: " + fmtInt(c.other_shots) + " shots" + pct(c.other_shots)));
      height += ROW;
    }
    chart.setAttribute("viewBox", "0 0 " + W + " " + height);
    chart.replaceChildren(...items);
  }

  function niceStep(span, ticks) {
    const raw = span / ticks, mag = 10 ** Math.floor(Math.log10(raw));
    for (const m of [1, 2, 5, 10]) if (m * mag >= raw) return m * mag;
    return 10 * mag;
  }

  // One row per node, a bar per shard attempt from the moment it began to run there to its end
  // (now while it runs), stacked in lanes where attempts overlap (a node with several slots),
  // coloured by outcome; backup copies are outlined. Below the lanes, a thin strip shows the
  // time attempts spent in the node's queue (sent ahead of time, or never run).
  function renderTimeline(tl) {
    const chart = $("timeline");
    const W = 1000, LABEL = 210, RIGHT = 12, LANE = 13, GAP = 3, PAD = 7, WAIT = 4, AXIS = 24;
    const plot = W - LABEL - RIGHT, span = Math.max(tl.t1 - tl.t0, 0.001);
    const x = (t) => LABEL + Math.min(Math.max(t / span, 0), 1) * plot;
    const c = Object.fromEntries(tl.columns.map((name, i) => [name, i]));
    const perNode = tl.nodes.map(() => []);
    for (const row of tl.attempts) perNode[row[c.node]].push(row);
    const order = tl.nodes.map((n, i) => i).sort((a, b) => tl.nodes[a].node_id < tl.nodes[b].node_id ? -1 : 1);

    $("tl-note").textContent = fmtInt(tl.attempts_total) + " attempt(s)" + (tl.attempts_shown < tl.attempts_total
      ? ", the latest " + fmtInt(tl.attempts_shown) + " shown" : "") + " on " + tl.nodes.length + " node(s) over "
      + fmtAge(tl.t1 - tl.t0);
    const legend = OUTCOMES.map((o) => {
      const item = el("span", "");
      item.append(el("span", "sw att-" + o), o === "done" ? "done (counted)" : o);
      return item;
    });
    const extra = [["sw att-backup", "backup copy"], ["sw wait", "waiting in the node's queue"]].map(([cls, text]) => {
      const item = el("span", "");
      item.append(el("span", cls), text);
      return item;
    });
    $("tl-legend").replaceChildren(...legend, ...extra);

    if (!tl.attempts.length) {
      chart.setAttribute("viewBox", "0 0 " + W + " 40");
      chart.replaceChildren(svg("text", {x: 8, y: 24, class: "muted"}, "no shard has been sent to a node yet"));
      return;
    }
    const describe = (r, node, end) => "shard " + r[c.shard] + " on " + node.node_id + ": " + r[c.outcome]
      + (r[c.backup] ? " (backup copy)" : "") + "; sent at " + r[c.sent].toFixed(1) + " s"
      + (r[c.start] === null ? ", never ran" : ", ran " + r[c.start].toFixed(1) + " s → "
         + (r[c.end] === null ? "now" : r[c.end].toFixed(1) + " s") + " (" + fmtAge(end - r[c.start]) + ")");
    const items = [];
    let y = 0;
    for (const i of order) {
      const node = tl.nodes[i];
      const rows = perNode[i].slice().sort((a, b) => (a[c.start] ?? a[c.sent]) - (b[c.start] ?? b[c.sent]));
      const lanes = [];  // end time of the last bar in each lane
      const bars = [], waits = [];
      for (const r of rows) {
        const end = r[c.end] === null ? span : r[c.end];
        const ran = r[c.start] === null ? end : r[c.start];
        if (ran - r[c.sent] > span / plot) waits.push([r, r[c.sent], ran]);  // (wider than a unit)
        if (r[c.start] === null) continue;
        let lane = lanes.findIndex((e) => e <= r[c.start] + 1e-6);
        if (lane < 0) { lane = lanes.length; lanes.push(end); } else { lanes[lane] = end; }
        bars.push([r, end, lane]);
      }
      const laneTop = (k) => y + PAD + k * (LANE + GAP);
      const waitY = laneTop(Math.max(1, lanes.length));
      const height = Math.max(40, waitY - y + (waits.length ? WAIT + PAD : PAD - GAP));
      const counts = {};
      for (const r of rows) {
        const kind = r[c.outcome] === "running" && r[c.start] === null ? "waiting" : r[c.outcome];
        counts[kind] = (counts[kind] || 0) + 1;
      }
      const summary = [...OUTCOMES, "waiting"].filter((o) => counts[o]).map((o) => counts[o] + " " + o).join(" · ");
      const g = svg("g", {class: "node-row", "data-node": node.node_id});
      g.appendChild(tip(svg("text", {x: 4, y: y + PAD + 11, class: "mono"}, clip(node.node_id, 26)),
                        node.node_id + " (" + node.state + ")"));
      g.appendChild(svg("text", {x: 4, y: y + PAD + 26, class: "muted"},
                        clip((node.state !== "alive" ? node.state + " · " : "") + summary, 34)));
      for (const [r, end, lane] of bars) {
        const x0 = x(r[c.start]), x1 = x(end);
        const rect = svg("rect", {x: x0.toFixed(1), y: laneTop(lane), width: Math.max(1.5, x1 - x0).toFixed(1),
                                  height: LANE, rx: 1.5, "data-shard": r[c.shard],
                                  class: "att att-" + r[c.outcome] + (r[c.backup] ? " att-backup" : "")});
        g.appendChild(tip(rect, describe(r, node, end)));
      }
      for (const [r, from, to] of waits) {
        const rect = svg("rect", {x: x(from).toFixed(1), y: waitY, width: Math.max(1, x(to) - x(from)).toFixed(1),
                                  height: WAIT, class: "wait att-" + r[c.outcome]});
        g.appendChild(tip(rect, describe(r, node, r[c.end] === null ? span : r[c.end])));
      }
      items.push(svg("line", {x1: 0, x2: W, y1: y + height, y2: y + height, class: "grid"}));
      items.push(g);
      y += height;
    }
    const [unit, name] = span >= 600 ? [60, " min"] : span >= 1 ? [1, " s"] : [0.001, " ms"];
    const step = niceStep(span / unit, 8) * unit;
    const digits = Math.max(0, -Math.floor(Math.log10(step / unit) + 1e-9));
    const tick = (t) => (t / unit).toFixed(digits) + name;
    for (let k = 0; k * step <= span + 1e-9; k++) {
      const t = k * step;
      items.unshift(svg("line", {x1: x(t), x2: x(t), y1: 0, y2: y, class: "grid"}));
      items.push(svg("text", {x: x(t), y: y + 16, "text-anchor": k ? "middle" : "start", class: "muted"}, tick(t)));
    }
    chart.setAttribute("viewBox", "0 0 " + W + " " + (y + AXIS));
    chart.replaceChildren(...items);
  }

  function renderFailures(failures) {
    const rows = failures.map((f) => {
      const tr = document.createElement("tr");
      cell(tr, f.shard, "num");
      cell(tr, f.node_id, "mono");
      cell(tr, f.outcome, "state-" + (f.outcome === "refused" ? "queued" : "failed"));
      cell(tr, fmtAge(f.at), "num");
      cell(tr, f.error, "err");
      return tr;
    });
    $("failures").replaceChildren(...(rows.length ? rows : [emptyRow(5, "nothing failed")]));
  }

  function renderJob(d) {
    const j = d.job, tl = d.timeline;
    document.title = "qscale · job " + j.job_id;
    $("j-id").textContent = j.job_id;
    const state = $("j-state");
    state.textContent = j.state + (j.final ? "" : " · " + fmtPct(j.progress));
    state.className = "state-" + j.state;
    $("j-shots").textContent = fmtInt(j.shots_done) + " / " + fmtInt(j.shots_total);
    $("j-shards").textContent = fmtInt(j.shards_done) + " / " + fmtInt(j.shards_running) + " / " + fmtInt(j.shards_total);
    const col = tl.columns.indexOf("outcome");
    const notDone = tl.attempts.filter((r) => r[col] !== "done" && r[col] !== "running").length;
    $("j-attempts").textContent = fmtInt(tl.attempts_total) + " / " + fmtInt(notDone);
    $("j-attempts").title = tl.attempts_shown < tl.attempts_total
      ? "not counted: of the latest " + fmtInt(tl.attempts_shown) + " attempts" : "";
    $("j-wall").textContent = fmtAge(j.wall_s);
    renderFacts(j, d.circuit);
    renderHistogram(d.circuit, j.estimator);
    renderTimeline(tl);
    renderFailures(d.failures);
  }

  // ------------------------------------------------------------------ refreshing
  // URLs relative to the page (works behind a path prefix), without any user:password@ of the
  // page's URL: fetch refuses URLs with credentials; the browser resends Basic auth itself.
  function apiUrl() {
    let url;
    if (document.body.dataset.page === "job") {
      const id = decodeURIComponent(location.pathname.split("/").pop() || "");
      url = new URL("../api/jobs/" + encodeURIComponent(id), location.href);
      const circuit = new URLSearchParams(location.search).get("circuit");
      if (circuit && /^[0-9]{1,9}$/.test(circuit)) url.searchParams.set("circuit", circuit);
    } else {
      url = new URL("api/status", location.href);
    }
    url.username = "";
    url.password = "";
    url.hash = "";
    return url;
  }
  const url = apiUrl();
  const render = document.body.dataset.page === "job" ? renderJob : renderOverview;
  let busy = false;
  async function refresh() {
    if (busy) return;
    busy = true;
    try {
      const resp = await fetch(url, {cache: "no-store", credentials: "same-origin",
                                     headers: {"Accept": "application/json"}, signal: AbortSignal.timeout(TIMEOUT_MS)});
      if (resp.status === 401) {
        banner("Not authorised: reload the page and log in with a client token (any user name).");
      } else if (!resp.ok) {
        let detail = "";
        try { detail = (await resp.json()).error || ""; } catch (err) { detail = ""; }
        banner(detail || "The coordinator answered HTTP " + resp.status + "; retrying…");
      } else {
        const data = await resp.json();
        try {
          render(data);
          footer(data);
          banner(null);
          document.body.dataset.live = "1";
        } catch (err) {
          banner("The page could not draw the coordinator's data: " + err);
        }
      }
    } catch (err) {
      banner(err && err.name === "TimeoutError" ? "The coordinator did not answer in time; retrying…"
                                                : "Dashboard unreachable; retrying…");
    } finally {
      busy = false;
    }
  }
  refresh();
  setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
})();

/* gradwatch live page: the run list, one run's charts, several runs compared.
 *
 * Data: GET /api/runs, /api/runs/<id>, /api/runs/<id>/series once; then one
 * EventSource (/api/stream) brings new run rows, layers, metric and scalar buckets and
 * findings as the store is written. Every name shown comes from users' runs and is set
 * with textContent (or drawn on a canvas), never parsed as HTML.
 */
"use strict";

(function () {
  const GW = window.GW;
  const $ = (id) => document.getElementById(id);
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
  const METRIC_LABELS = {
    delta_rms: "delta RMS (dL/d output)",
    grad_norm: "weight-gradient norm",
    saturated_frac: "saturated fraction",
    dead_frac: "dead fraction",
  };
  const FRACTIONS = new Set(["saturated_frac", "dead_frac"]);
  const STEP_INCRS = [1, 2, 5].flatMap((m) => [1, 10, 100, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8].map((p) => m * p)).sort((a, b) => a - b);
  const state = {
    runs: new Map(), // id -> run row
    items: new Map(), // id -> <li>
    since: null,
    current: null,
    compare: new Set(),
    data: new Map(), // id -> GW.RunData, for followed runs only
    picks: new Map(), // run id -> Set of layer ids drawn as lines
    charts: {},
    source: null,
    drawn: new Map(), // chart key -> data version drawn
    seenFindings: new Set(),
  };
  const timings = (window.gwTimings = {});

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  async function getJSON(url) {
    const r = await fetch(url, { cache: "no-store" });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(body.error || r.statusText);
    return body;
  }

  function setConn(kind, text) {
    const c = $("conn");
    c.className = "conn " + kind;
    c.textContent = text;
  }

  // --- the run list -----------------------------------------------------------------------

  function statusText(row) {
    return row.live ? "live" : row.status;
  }

  function fillItem(li, row) {
    li.querySelector(".name").textContent = row.name;
    li.querySelector(".name").title = row.name;
    const badge = li.querySelector(".badge");
    badge.textContent = statusText(row);
    badge.className = "badge " + (row.live ? "live" : String(row.status).replace(/[^a-z]/g, ""));
    li.querySelector(".steps").textContent = row.last_step === null ? "–" : "step " + row.last_step;
    li.querySelector(".rid").textContent = "#" + row.id;
    li.classList.toggle("is-live", !!row.live);
  }

  function runItem(row) {
    const li = el("li", "run-item");
    li.dataset.id = String(row.id);
    const box = el("input");
    box.type = "checkbox";
    box.title = "compare this run";
    box.checked = state.compare.has(row.id);
    box.addEventListener("click", (e) => e.stopPropagation());
    box.addEventListener("change", () => toggleCompare(row.id, box.checked));
    const top = el("div", "line1");
    top.append(el("span", "name"), el("span", "badge"));
    const bottom = el("div", "line2");
    bottom.append(el("span", "rid"), el("span", "steps"));
    const text = el("div", "text");
    text.append(top, bottom);
    li.append(box, text);
    li.addEventListener("click", () => selectRun(row.id));
    fillItem(li, row);
    return li;
  }

  function matchesFilter(row) {
    const q = $("filter").value.trim().toLowerCase();
    return !q || String(row.name).toLowerCase().includes(q) || String(row.id) === q;
  }

  function upsertRun(row) {
    const known = state.runs.has(row.id);
    state.runs.set(row.id, row);
    state.since = state.since === null ? row.updated_at : Math.max(state.since, row.updated_at);
    let li = state.items.get(row.id);
    if (!li) {
      li = runItem(row);
      state.items.set(row.id, li);
      const list = $("runs");
      const after = [...state.items.keys()].filter((id) => id > row.id).length;
      list.insertBefore(li, list.children[after] || null); // newest first
    } else {
      fillItem(li, row);
    }
    li.hidden = !matchesFilter(row);
    li.classList.toggle("selected", row.id === state.current);
    if (row.id === state.current) drawHeader(state.data.get(row.id));
    document.body.dataset.runs = String(state.runs.size);
    if (!known) $("empty").hidden = state.runs.size > 0 || state.current !== null;
    if (!known && state.current === null && row.live) selectRun(row.id); // the first run of a new store
  }

  async function loadRunList() {
    const body = await getJSON("/api/runs");
    $("store").textContent = body.store;
    $("store").title = body.store;
    const list = $("runs");
    const frag = document.createDocumentFragment();
    const rows = body.runs.slice().sort((a, b) => b.id - a.id);
    for (const row of rows) {
      state.runs.set(row.id, row);
      state.since = state.since === null ? row.updated_at : Math.max(state.since, row.updated_at);
      const li = runItem(row);
      state.items.set(row.id, li);
      frag.append(li);
    }
    list.replaceChildren(frag);
    document.body.dataset.runs = String(state.runs.size);
    timings.runsListed = performance.now();
    if (!rows.length) {
      $("empty-store").textContent = body.exists ? "holds no runs yet" : "does not exist yet";
      $("empty-path").textContent = body.store;
    }
    $("empty").hidden = rows.length > 0;
    return rows;
  }

  // --- following runs -----------------------------------------------------------------------

  async function loadRun(id) {
    const [detail, series] = await Promise.all([
      getJSON(`/api/runs/${id}`),
      getJSON(`/api/runs/${id}/series?points=${GW.POINTS}&quick=1`),
    ]);
    const rd = new GW.RunData(id);
    rd.info = detail.run;
    rd.layers = detail.layers;
    rd.findings = detail.findings;
    rd.width = series.width;
    rd.applyMetrics(series.metrics);
    rd.applyScalars(series.scalars);
    if (series.partial) refine(rd);
    return rd;
  }

  /** A long run's first picture holds each bucket's last value only: merge in the exact
   * min/max buckets when the server has read every row. */
  async function refine(rd) {
    rd.partial = true;
    try {
      const series = await getJSON(`/api/runs/${rd.id}/series?width=${rd.width}`);
      rd.applyMetrics(series.metrics);
    } catch (err) {
      showError(err);
    }
    rd.partial = false;
    rd.version++;
    schedule();
  }

  function followed() {
    const ids = [];
    if (state.current !== null) ids.push(state.current);
    for (const id of state.compare) if (!ids.includes(id)) ids.push(id);
    return ids.slice(0, 16);
  }

  let streamTimer = null;
  function openStream() {
    clearTimeout(streamTimer);
    streamTimer = setTimeout(openStreamNow, 30);
  }

  function openStreamNow() {
    if (state.source) state.source.close();
    const params = new URLSearchParams();
    if (state.since !== null) params.set("since", String(state.since));
    for (const id of followed()) {
      const rd = state.data.get(id);
      if (rd) params.append("follow", `${id}:${rd.width}:${rd.afterMetrics}:${rd.afterScalars}`);
    }
    const es = new EventSource("/api/stream?" + params.toString());
    es.onopen = () => setConn("on", "live: updates as they are written");
    es.onerror = () => setConn("off", "reconnecting…");
    const on = (name, fn) =>
      es.addEventListener(name, (e) => {
        const msg = JSON.parse(e.data);
        const rd = msg.run !== undefined ? state.data.get(msg.run) : null;
        fn(msg, rd);
        schedule();
      });
    on("runs", (msg) => msg.runs.forEach(upsertRun));
    on("layers", (msg, rd) => {
      if (!rd) return;
      rd.layers = msg.layers;
      rd.version++;
    });
    on("metrics", (msg, rd) => rd && rd.applyMetrics(msg));
    on("scalars", (msg, rd) => rd && rd.applyScalars(msg));
    on("findings", (msg, rd) => {
      if (!rd) return;
      rd.findings = msg.findings;
      rd.version++;
    });
    state.source = es;
  }

  function forget() {
    const keep = new Set(followed());
    for (const id of [...state.data.keys()]) if (!keep.has(id)) state.data.delete(id);
  }

  function writeHash() {
    const parts = [];
    if (state.current !== null) parts.push("run=" + state.current);
    if (state.compare.size) parts.push("compare=" + [...state.compare].join(","));
    history.replaceState(null, "", parts.length ? "#" + parts.join("&") : location.pathname);
  }

  async function selectRun(id) {
    state.current = id;
    for (const [rid, li] of state.items) li.classList.toggle("selected", rid === id);
    writeHash();
    $("empty").hidden = true;
    $("run").hidden = false;
    $("run").classList.add("loading");
    document.body.dataset.drawn = "";
    forget();
    try {
      if (!state.data.has(id)) {
        const rd = await loadRun(id);
        if (state.current !== id) return; // another run was chosen meanwhile
        state.data.set(id, rd);
      }
      state.drawn.clear();
      openStream();
      draw();
    } catch (err) {
      showError(err);
    } finally {
      $("run").classList.remove("loading");
    }
  }

  async function toggleCompare(id, on) {
    if (on) state.compare.add(id);
    else state.compare.delete(id);
    writeHash();
    forget();
    try {
      await Promise.all(
        followed()
          .filter((rid) => !state.data.has(rid))
          .map(async (rid) => state.data.set(rid, await loadRun(rid))),
      );
    } catch (err) {
      showError(err);
    }
    state.drawn.delete("compare");
    openStream();
    draw();
  }

  function showError(err) {
    const box = $("error");
    box.textContent = String(err && err.message ? err.message : err);
    box.hidden = false;
    setTimeout(() => (box.hidden = true), 6000);
  }

  // --- drawing ------------------------------------------------------------------------------

  let scheduled = false;
  function schedule() {
    if (scheduled) return;
    scheduled = true;
    requestAnimationFrame(() => {
      scheduled = false;
      draw();
    });
  }

  /** Series of [{label, color, steps, ys, min?, max?}] on one step axis (union of steps). */
  function align(lines, log) {
    const xs = [...new Set(lines.flatMap((l) => l.steps))].sort((a, b) => a - b);
    const at = new Map(xs.map((x, i) => [x, i]));
    const clean = (v) => (v === undefined || Number.isNaN(v) || !Number.isFinite(v) || (log && v <= 0) ? null : v);
    const column = (steps, vals) => {
      const out = new Array(xs.length).fill(null);
      steps.forEach((s, i) => (out[at.get(s)] = clean(vals[i])));
      return out;
    };
    const data = [xs];
    for (const l of lines) {
      data.push(column(l.steps, l.ys));
      if (l.min) data.push(column(l.steps, l.max), column(l.steps, l.min));
    }
    return data;
  }

  function chart(key, container, spec, data) {
    const signature = JSON.stringify([spec.labels, spec.log, spec.band, spec.xnames ? spec.xnames.length : 0]);
    const width = Math.max(280, container.clientWidth);
    let c = state.charts[key];
    if (c && c.signature !== signature) {
      c.u.destroy();
      c = null;
    }
    if (!c) {
      container.replaceChildren();
      const series = [{ label: spec.xlabel || "step", value: spec.xvalue }];
      spec.labels.forEach((label, i) => {
        const color = spec.colors ? spec.colors[i] : PALETTE[i % PALETTE.length];
        series.push({ label, stroke: color, width: 1.5, spanGaps: true, points: { show: spec.points || false } });
        if (spec.band && spec.band[i]) {
          series.push({ label: label + " max", stroke: "transparent", class: "band-series", spanGaps: true });
          series.push({ label: label + " min", stroke: "transparent", class: "band-series", spanGaps: true });
        }
      });
      const bands = [];
      let k = 1;
      spec.labels.forEach((_, i) => {
        if (spec.band && spec.band[i]) {
          const color = spec.colors ? spec.colors[i] : PALETTE[i % PALETTE.length];
          bands.push({ series: [k + 1, k + 2], fill: color + "33" });
          k += 3;
        } else k += 1;
      });
      const yfmt = (u, splits) => splits.map((v) => (v === null ? "" : GW.fmt(v)));
      const opts = {
        width,
        height: spec.height || 220,
        series,
        bands,
        scales: { x: { time: false }, y: spec.log ? { distr: 3, log: 10 } : spec.range ? { range: spec.range } : {} },
        axes: [
          spec.xnames
            ? {
                values: (u, splits) => splits.map((v) => (Number.isInteger(v) && spec.xnames[v] !== undefined ? clipName(spec.xnames[v]) : "")),
                incrs: [1, 2, 5, 10, 20, 50],
                space: 60,
              }
            : { space: 70, incrs: STEP_INCRS },
          { values: yfmt, size: 64 },
        ],
        legend: { live: true },
        cursor: { drag: { x: true, y: false } },
      };
      c = state.charts[key] = { u: new uPlot(opts, data, container), signature };
    } else {
      c.u.setData(data);
      if (Math.abs(c.u.width - width) > 4) c.u.setSize({ width, height: spec.height || 220 });
    }
    const xs = data[0];
    container.dataset.points = String(xs.length);
    container.dataset.lastStep = xs.length ? String(xs[xs.length - 1]) : "-1";
    container.classList.toggle("nodata", xs.length === 0);
    return c.u;
  }

  const clipName = (s) => (s.length > 12 ? s.slice(0, 11) + "…" : s);

  function drawHeader(rd) {
    const row = state.runs.get(state.current);
    if (!row) return;
    $("run-name").textContent = row.name;
    const badge = $("run-status");
    badge.textContent = statusText(row);
    badge.className = "badge " + (row.live ? "live" : String(row.status).replace(/[^a-z]/g, ""));
    const parts = [`run #${row.id}`];
    if (row.last_step !== null) parts.push(`step ${row.last_step}`);
    if (rd) parts.push(`${rd.layers.length} layers`, `bucket ${rd.width} step${rd.width > 1 ? "s" : ""}`);
    if (rd && rd.partial) parts.push("reading every row for min–max…");
    parts.push("started " + new Date(row.created_at * 1000).toLocaleString());
    $("run-meta").textContent = parts.join(" · ");
    const error = rd && rd.info && rd.info.error;
    $("run-error").hidden = !error;
    $("run-error").textContent = error || "";
  }

  function scalarLine(rd, name, label, color) {
    const s = rd.scalars.get(name);
    if (!s) return null;
    return { label, color, steps: s.step, ys: s.last, min: rd.width > 1 ? s.min : null, max: s.max };
  }

  function drawLoss(rd) {
    const names = [...rd.scalars.keys()];
    const name = names.includes("loss") ? "loss" : names.find((n) => n !== "wall_time") || "loss";
    $("loss-name").textContent = name;
    const line = scalarLine(rd, name, name, PALETTE[0]);
    const lines = line ? [line] : [];
    chart("loss", $("chart-loss"), { labels: lines.map((l) => l.label), band: lines.map((l) => !!l.min), log: $("loss-log").checked }, align(lines, $("loss-log").checked));
  }

  function drawProfile(rd) {
    const layers = rd.paramLayers();
    const metrics = ["delta_rms", "grad_norm"];
    const latest = metrics.map((m) => new Map(rd.latest(m).map((p) => [p.layer.id, p])));
    const xs = layers.map((_, i) => i);
    const data = [xs, ...latest.map((byId) => layers.map((l) => {
      const p = byId.get(l.id);
      return p && p.value > 0 && Number.isFinite(p.value) ? p.value : null;
    }))];
    const steps = latest.flatMap((byId) => [...byId.values()].map((p) => p.step));
    $("profile-step").textContent = steps.length ? `step ${Math.max(...steps)}` : "";
    const names = layers.map((l) => l.name);
    chart("profile", $("chart-profile"), {
      labels: metrics.map((m) => METRIC_LABELS[m]),
      log: true,
      xnames: names,
      xlabel: "layer",
      xvalue: (u, v) => (v === null || names[v] === undefined ? "" : names[v]),
      points: true,
    }, data);
  }

  /** Rows of the heatmap: one per layer with the metric; columns: the buckets that hold rows. */
  function heatRows(rd, metric) {
    const layers = rd.layers.filter((l) => rd.series(l.id, metric));
    const stepAt = new Map(); // bucket -> its last step over the layers
    for (const l of layers) {
      const s = rd.series(l.id, metric);
      for (let i = 0; i < s.length; i++) stepAt.set(s.b[i], Math.max(stepAt.get(s.b[i]) ?? -1, s.step[i]));
    }
    const buckets = [...stepAt.keys()].sort((a, b) => a - b);
    const col = new Map(buckets.map((b, i) => [b, i]));
    const cols = buckets.length;
    const rows = layers.map((l) => {
      const s = rd.series(l.id, metric);
      const last = new Float64Array(cols).fill(NaN);
      const min = new Float64Array(cols).fill(NaN);
      const max = new Float64Array(cols).fill(NaN);
      for (let i = 0; i < s.length; i++) {
        const c = col.get(s.b[i]);
        last[c] = s.last[i];
        min[c] = s.min[i];
        max[c] = s.max[i];
      }
      return { label: l.name, id: l.id, last, min: rd.width > 1 ? min : null, max: rd.width > 1 ? max : null };
    });
    const steps = buckets.map((b) => stepAt.get(b));
    return { rows, cols, stepOf: (c) => (steps[c] === undefined ? "" : steps[c]) };
  }

  let heatmap = null;
  function drawHeatmap(rd) {
    const metric = $("heat-metric").value;
    const { rows, cols, stepOf } = heatRows(rd, metric);
    if (!heatmap) {
      heatmap = new GW.Heatmap($("heatmap"), (row) => {
        const r = heatmap.spec.rows[row];
        const picks = picksOf(state.data.get(state.current));
        if (picks.has(r.id)) picks.delete(r.id);
        else picks.add(r.id);
        $("line-metric").value = heatmap.spec.metric;
        state.drawn.delete("lines");
        draw();
      });
    }
    heatmap.draw({ rows, cols, log: !FRACTIONS.has(metric), metric, stepOf });
    const host = $("heatmap");
    host.dataset.lastStep = String(rd.afterMetrics);
  }

  function picksOf(rd) {
    if (!state.picks.has(rd.id)) {
      const params = rd.paramLayers();
      const chosen = new Set();
      if (params.length) {
        chosen.add(params[0].id);
        chosen.add(params[Math.floor((params.length - 1) / 2)].id);
        chosen.add(params[params.length - 1].id);
      }
      state.picks.set(rd.id, chosen);
    }
    return state.picks.get(rd.id);
  }

  function drawPicker(rd, metric) {
    const box = $("layer-picks");
    const picks = picksOf(rd);
    const layers = rd.layers.filter((l) => rd.series(l.id, metric));
    const signature = metric + "|" + layers.map((l) => l.id).join(",") + "|" + [...picks].join(",");
    if (box.dataset.signature === signature) return;
    box.dataset.signature = signature;
    box.replaceChildren();
    for (const l of layers) {
      const label = el("label", "pick");
      const cb = el("input");
      cb.type = "checkbox";
      cb.checked = picks.has(l.id);
      cb.addEventListener("change", () => {
        if (cb.checked) picks.add(l.id);
        else picks.delete(l.id);
        state.drawn.delete("lines");
        draw();
      });
      label.append(cb, el("span", null, l.name));
      label.title = `${l.name} (${l.type})`;
      box.append(label);
    }
  }

  function drawLines(rd) {
    const metric = $("line-metric").value;
    drawPicker(rd, metric);
    const picks = picksOf(rd);
    const log = !FRACTIONS.has(metric);
    const lines = rd.layers
      .filter((l) => picks.has(l.id) && rd.series(l.id, metric))
      .map((l, i) => {
        const s = rd.series(l.id, metric);
        return { label: l.name, color: PALETTE[i % PALETTE.length], steps: s.step, ys: s.last, min: rd.width > 1 ? s.min : null, max: s.max };
      });
    chart("lines", $("chart-lines"), {
      labels: lines.map((l) => l.label),
      colors: lines.map((l) => l.color),
      band: lines.map((l) => !!l.min),
      log,
      range: log ? null : [0, 1],
    }, align(lines, log));
  }

  function drawFractions(rd) {
    const acts = rd.activationLayers();
    const metrics = ["saturated_frac", "dead_frac"];
    const lines = [];
    metrics.forEach((m, i) => {
      const sums = new Map();
      for (const l of acts) {
        const s = rd.series(l.id, m);
        if (!s) continue;
        for (let k = 0; k < s.length; k++) {
          if (Number.isNaN(s.last[k])) continue;
          const e = sums.get(s.b[k]) || { step: s.step[k], sum: 0, n: 0 };
          e.sum += s.last[k];
          e.n += 1;
          e.step = Math.max(e.step, s.step[k]);
          sums.set(s.b[k], e);
        }
      }
      if (!sums.size) return;
      const entries = [...sums.values()].sort((a, b) => a.step - b.step);
      lines.push({ label: METRIC_LABELS[m], color: PALETTE[i + 3], steps: entries.map((e) => e.step), ys: entries.map((e) => e.sum / e.n) });
    });
    chart("fractions", $("chart-fractions"), { labels: lines.map((l) => l.label), colors: lines.map((l) => l.color), range: [0, 1] }, align(lines, false));
    // per activation layer at the latest step
    const latest = metrics.map((m) => new Map(rd.latest(m).map((p) => [p.layer.id, p.value])));
    const names = acts.map((l) => l.name);
    const data = [acts.map((_, i) => i), ...latest.map((byId) => acts.map((l) => {
      const v = byId.get(l.id);
      return v === undefined || Number.isNaN(v) ? null : v;
    }))];
    chart("act-profile", $("chart-act-profile"), {
      labels: metrics.map((m) => METRIC_LABELS[m]),
      colors: [PALETTE[3], PALETTE[4]],
      range: [0, 1],
      xnames: names,
      xlabel: "activation",
      xvalue: (u, v) => (v === null || names[v] === undefined ? "" : names[v]),
      points: true,
    }, data);
  }

  function drawFindings(rd) {
    const ul = $("findings");
    ul.replaceChildren();
    $("findings-count").textContent = rd.findings.length ? `(${rd.findings.length})` : "";
    if (!rd.findings.length) {
      ul.append(el("li", "none", "No findings yet. `gradwatch diagnose` and the lab store them; they appear here as they are written."));
      return;
    }
    for (const f of rd.findings) {
      const key = `${rd.id}|${f.kind}|${f.first_step}|${f.last_step}`;
      const li = el("li", "finding sev-" + String(f.severity).replace(/[^a-z]/g, ""));
      if (!state.seenFindings.has(key)) {
        state.seenFindings.add(key);
        li.classList.add("new");
      }
      const head = el("div", "finding-head");
      head.append(el("span", "badge", f.severity), el("strong", null, String(f.kind).replace(/_/g, " ")));
      if (f.first_step !== null) head.append(el("span", "muted", `steps ${f.first_step}–${f.last_step}`));
      li.append(head);
      if (Array.isArray(f.layers) && f.layers.length) {
        const shown = f.layers.slice(0, 8).map(String).join(", ") + (f.layers.length > 8 ? `, … (${f.layers.length})` : "");
        li.append(el("div", "muted", "layers: " + shown));
      }
      if (f.explanation) li.append(el("p", null, f.explanation));
      const fixes = Array.isArray(f.prescriptions) ? f.prescriptions : [];
      if (fixes.length) {
        const ol = el("ol", "fixes");
        for (const p of fixes) {
          const text = typeof p === "object" && p !== null ? p.description || p.name || JSON.stringify(p) : String(p);
          const item = el("li", null, text);
          if (p && p.verified) item.prepend(el("span", "badge finished", "verified"));
          ol.append(item);
        }
        li.append(ol);
      }
      ul.append(li);
    }
  }

  function drawCompare() {
    const ids = [...state.compare].filter((id) => state.data.has(id));
    const section = $("compare");
    section.hidden = state.compare.size < 2;
    if (section.hidden) return;
    const runs = ids.map((id) => state.data.get(id));
    const names = new Set();
    runs.forEach((rd) => rd.scalars.forEach((_, n) => n !== "wall_time" && names.add(n)));
    const select = $("compare-scalar");
    const options = [...names].sort();
    if (select.dataset.options !== options.join("|")) {
      const current = select.value || "loss";
      select.replaceChildren(...options.map((n) => el("option", null, n)));
      select.dataset.options = options.join("|");
      select.value = options.includes(current) ? current : options[0] || "";
    }
    const name = select.value;
    const log = $("compare-log").checked;
    const label = (rd) => {
      const row = state.runs.get(rd.id);
      return `#${rd.id} ${row ? row.name : ""}`;
    };
    const lines = runs
      .map((rd, i) => {
        const s = rd.scalars.get(name);
        return s && { label: label(rd), color: PALETTE[i % PALETTE.length], steps: s.step, ys: s.last };
      })
      .filter(Boolean);
    chart("compare", $("chart-compare"), { labels: lines.map((l) => l.label), colors: lines.map((l) => l.color), log }, align(lines, log));
    // gradient profiles side by side: delta RMS per parameterised layer at the latest step
    const depth = Math.max(0, ...runs.map((rd) => rd.paramLayers().length));
    const data = [[...Array(depth).keys()]];
    for (const rd of runs) {
      const byId = new Map(rd.latest("delta_rms").map((p) => [p.layer.id, p.value]));
      const layers = rd.paramLayers();
      data.push(data[0].map((i) => {
        const v = layers[i] ? byId.get(layers[i].id) : undefined;
        return v > 0 && Number.isFinite(v) ? v : null;
      }));
    }
    chart("compare-profile", $("chart-compare-profile"), {
      labels: runs.map(label),
      colors: runs.map((_, i) => PALETTE[i % PALETTE.length]),
      log: true,
      xlabel: "layer #",
      points: true,
    }, data);
  }

  function draw() {
    const rd = state.current !== null ? state.data.get(state.current) : null;
    if (rd) {
      drawHeader(rd);
      const version = rd.version + "|" + rd.width;
      if (state.drawn.get("run") !== version) {
        state.drawn.set("run", version);
        drawLoss(rd);
        drawProfile(rd);
        drawHeatmap(rd);
        drawLines(rd);
        drawFractions(rd);
        drawFindings(rd);
      }
      if (document.body.dataset.drawn !== String(rd.id)) {
        document.body.dataset.drawn = String(rd.id);
        timings.runDrawn = performance.now();
      }
    }
    const versions = [...state.compare].map((id) => (state.data.get(id) || {}).version).join(",");
    if (state.drawn.get("compare") !== versions + $("compare-scalar").value + $("compare-log").checked) {
      state.drawn.set("compare", versions + $("compare-scalar").value + $("compare-log").checked);
      drawCompare();
    }
  }

  function redrawAll() {
    state.drawn.clear();
    draw();
  }

  // --- start ------------------------------------------------------------------------------------

  function readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    const run = parseInt(params.get("run"), 10);
    const compare = (params.get("compare") || "").split(",").map((s) => parseInt(s, 10)).filter((n) => state.runs.has(n));
    return { run: state.runs.has(run) ? run : null, compare };
  }

  async function start() {
    for (const [m, label] of Object.entries(METRIC_LABELS)) {
      $("heat-metric").append(el("option", null, label));
      $("line-metric").append(el("option", null, label));
      $("heat-metric").lastChild.value = m;
      $("line-metric").lastChild.value = m;
    }
    $("heat-metric").addEventListener("change", redrawAll);
    $("line-metric").addEventListener("change", redrawAll);
    $("loss-log").addEventListener("change", redrawAll);
    $("compare-log").addEventListener("change", redrawAll);
    $("compare-scalar").addEventListener("change", redrawAll);
    $("filter").addEventListener("input", () => {
      for (const [id, li] of state.items) li.hidden = !matchesFilter(state.runs.get(id));
    });
    window.addEventListener("hashchange", () => {
      const wanted = readHash();
      if (wanted.run !== null && wanted.run !== state.current) selectRun(wanted.run);
    });
    let resizeTimer = null;
    new ResizeObserver(() => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(redrawAll, 100);
    }).observe($("main"));
    try {
      const rows = await loadRunList();
      const wanted = readHash();
      for (const id of wanted.compare) {
        state.compare.add(id);
        state.items.get(id).querySelector("input").checked = true;
      }
      const first = wanted.run ?? (rows.find((r) => r.live) || rows[0] || {}).id;
      if (first !== undefined) await selectRun(first);
      else openStream();
      if (state.compare.size) await toggleCompare([...state.compare][0], true);
    } catch (err) {
      showError(err);
      setConn("off", "cannot reach the server");
    }
  }

  document.addEventListener("DOMContentLoaded", start);
})();

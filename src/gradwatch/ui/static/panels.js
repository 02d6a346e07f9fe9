/* gradwatch live page: the panels of a run and the comparison of runs.
 *
 * Each draw* function reads what the page holds (GW.state, filled by app.js) and draws
 * one card: uPlot line charts, the canvas heatmap (heatmap.js), the findings list. Names
 * from users' runs go through textContent, uPlot's labels (textContent too) or canvas
 * text, never through HTML parsing.
 */
"use strict";

(function () {
  const GW = (window.GW = window.GW || {});
  const $ = (id) => document.getElementById(id);
  const state = () => GW.state;
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
  const METRIC_LABELS = {
    delta_rms: "delta RMS (dL/d output)",
    grad_norm: "weight-gradient norm",
    saturated_frac: "saturated fraction",
    dead_frac: "dead fraction",
  };
  const FRACTIONS = new Set(["saturated_frac", "dead_frac"]);
  const STEP_INCRS = [1, 2, 5].flatMap((m) => [1, 10, 100, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8].map((p) => m * p)).sort((a, b) => a - b);

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function statusText(row) {
    return row.live ? "live" : row.status;
  }

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
    let c = state().charts[key];
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
      c = state().charts[key] = { u: new uPlot(opts, data, container), signature };
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
    const row = state().runs.get(state().current);
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
        const picks = picksOf(state().data.get(state().current));
        if (picks.has(r.id)) picks.delete(r.id);
        else picks.add(r.id);
        $("line-metric").value = heatmap.spec.metric;
        GW.redraw();
      });
    }
    heatmap.draw({ rows, cols, log: !FRACTIONS.has(metric), metric, stepOf });
    const host = $("heatmap");
    host.dataset.lastStep = String(rd.afterMetrics);
  }

  function picksOf(rd) {
    if (!state().picks.has(rd.id)) {
      const params = rd.paramLayers();
      const chosen = new Set();
      if (params.length) {
        chosen.add(params[0].id);
        chosen.add(params[Math.floor((params.length - 1) / 2)].id);
        chosen.add(params[params.length - 1].id);
      }
      state().picks.set(rd.id, chosen);
    }
    return state().picks.get(rd.id);
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
        GW.redraw();
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
      if (!state().seenFindings.has(key)) {
        state().seenFindings.add(key);
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
    const ids = [...state().compare].filter((id) => state().data.has(id));
    const section = $("compare");
    section.hidden = state().compare.size < 2;
    if (section.hidden) return;
    const runs = ids.map((id) => state().data.get(id));
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
      const row = state().runs.get(rd.id);
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

  /** Every panel of one run. */
  function drawRun(rd) {
    drawLoss(rd);
    drawProfile(rd);
    drawHeatmap(rd);
    drawLines(rd);
    drawFractions(rd);
    drawFindings(rd);
  }

  Object.assign(GW, { el, statusText, METRIC_LABELS, PALETTE });
  GW.panels = { drawHeader, drawRun, drawCompare };
})();

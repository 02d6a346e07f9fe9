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
  const el = (...args) => GW.el(...args);
  const statusText = (row) => GW.statusText(row);
  const state = (GW.state = {
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
  });
  const timings = (window.gwTimings = {});

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
    top.append(el("span", "name"));
    const bottom = el("div", "line2");
    bottom.append(el("span", "rid"), el("span", "badge"), el("span", "steps"));
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
    if (row.id === state.current) GW.panels.drawHeader(state.data.get(row.id));
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
  function draw() {
    const rd = state.current !== null ? state.data.get(state.current) : null;
    if (rd) {
      GW.panels.drawHeader(rd);
      const version = rd.version + "|" + rd.width;
      if (state.drawn.get("run") !== version) {
        state.drawn.set("run", version);
        GW.panels.drawRun(rd);
      }
      if (document.body.dataset.drawn !== String(rd.id)) {
        document.body.dataset.drawn = String(rd.id);
        timings.runDrawn = performance.now();
      }
    }
    const compare = [...state.compare].map((id) => (state.data.get(id) || {}).version).join(",");
    const key = compare + $("compare-scalar").value + $("compare-log").checked;
    if (state.drawn.get("compare") !== key) {
      state.drawn.set("compare", key);
      GW.panels.drawCompare();
    }
  }

  function redrawAll() {
    state.drawn.clear();
    draw();
  }
  GW.redraw = redrawAll;

  // --- start ------------------------------------------------------------------------------------

  function readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    const run = parseInt(params.get("run"), 10);
    const compare = (params.get("compare") || "").split(",").map((s) => parseInt(s, 10)).filter((n) => state.runs.has(n));
    return { run: state.runs.has(run) ? run : null, compare };
  }

  async function start() {
    for (const [m, label] of Object.entries(GW.METRIC_LABELS)) {
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

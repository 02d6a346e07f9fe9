/* gradwatch live page: bucketed series and what the page holds of a run.
 *
 * The server sends per-layer metrics and scalars in buckets of `width` steps (a power
 * of two, aligned to multiples of it) with the minimum, maximum and last value of each
 * (gradwatch/ui/queries.py). Min, max and "last" (the value at the latest step) merge
 * exactly, so new rows from the stream are merged into the buckets the page has, and
 * when a run outgrows 2 x POINTS buckets, neighbours are merged pairwise (width x 2).
 */
"use strict";

(function () {
  const GW = (window.GW = window.GW || {});
  GW.POINTS = 1000;
  GW.LAYER_METRICS = ["delta_rms", "grad_norm", "saturated_frac", "dead_frac"];

  /** base64 little-endian float64 -> Float64Array. */
  GW.decode = function (b64) {
    if (!b64) return new Float64Array(0);
    const s = atob(b64);
    const bytes = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) bytes[i] = s.charCodeAt(i);
    return new Float64Array(bytes.buffer);
  };

  const lower = (a, b) => (Number.isNaN(a) ? b : Number.isNaN(b) ? a : Math.min(a, b));
  const upper = (a, b) => (Number.isNaN(a) ? b : Number.isNaN(b) ? a : Math.max(a, b));

  /** One metric of one layer (or one scalar): buckets sorted by index. */
  class Series {
    constructor() {
      this.b = [];
      this.step = [];
      this.last = [];
      this.min = [];
      this.max = [];
    }

    get length() {
      return this.b.length;
    }

    /** Merge buckets given by their last step; min/max default to last (width 1). */
    merge(width, steps, last, min, max) {
      for (let i = 0; i < steps.length; i++) {
        this._put(Math.floor(steps[i] / width), steps[i], last[i], min ? min[i] : last[i], max ? max[i] : last[i]);
      }
    }

    _put(b, step, last, min, max) {
      let j = this.b.length - 1;
      if (j < 0 || b > this.b[j]) {
        this.b.push(b);
        this.step.push(step);
        this.last.push(last);
        this.min.push(min);
        this.max.push(max);
        return;
      }
      while (j > 0 && this.b[j] > b) j--; // replays after a reconnect land near the end
      if (this.b[j] !== b) {
        const at = this.b[j] < b ? j + 1 : j;
        this.b.splice(at, 0, b);
        this.step.splice(at, 0, step);
        this.last.splice(at, 0, last);
        this.min.splice(at, 0, min);
        this.max.splice(at, 0, max);
        return;
      }
      this.min[j] = lower(this.min[j], min);
      this.max[j] = upper(this.max[j], max);
      if (step >= this.step[j]) {
        this.step[j] = step;
        this.last[j] = last;
      }
    }

    /** Re-bucket at a wider width (a multiple of the current one). */
    coarsen(width) {
      const old = [this.step, this.last, this.min, this.max];
      this.b = [];
      this.step = [];
      this.last = [];
      this.min = [];
      this.max = [];
      for (let i = 0; i < old[0].length; i++) {
        this._put(Math.floor(old[0][i] / width), old[0][i], old[1][i], old[2][i], old[3][i]);
      }
    }

    lastBucket() {
      return this.b.length ? this.b[this.b.length - 1] : -1;
    }
  }
  GW.Series = Series;

  /** What the page holds of one run: info, layers, bucketed metrics and scalars, findings. */
  class RunData {
    constructor(id) {
      this.id = id;
      this.info = null;
      this.layers = [];
      this.findings = [];
      this.width = 1;
      this.metrics = new Map(); // "layer id|metric" -> Series
      this.scalars = new Map(); // name -> Series
      this.afterMetrics = -1;
      this.afterScalars = -1;
      this.version = 0; // bumped on every change, so drawing can skip what did not change
    }

    series(layerId, metric) {
      return this.metrics.get(layerId + "|" + metric);
    }

    applyMetrics(msg) {
      for (const layer of msg.layers) {
        const steps = GW.decode(layer.steps);
        for (const metric of GW.LAYER_METRICS) {
          const data = layer[metric];
          if (!data) continue;
          const key = layer.id + "|" + metric;
          if (!this.metrics.has(key)) this.metrics.set(key, new Series());
          const d = GW.decode;
          this.metrics.get(key).merge(this.width, steps, d(data.last), data.min && d(data.min), data.max && d(data.max));
        }
      }
      this.afterMetrics = Math.max(this.afterMetrics, msg.upto);
      this._fit();
    }

    applyScalars(msg) {
      for (const sc of msg.scalars) {
        if (!this.scalars.has(sc.name)) this.scalars.set(sc.name, new Series());
        const d = GW.decode;
        this.scalars.get(sc.name).merge(this.width, d(sc.steps), d(sc.last), sc.min && d(sc.min), sc.max && d(sc.max));
      }
      this.afterScalars = Math.max(this.afterScalars, msg.upto);
      this._fit();
    }

    _fit() {
      this.version++;
      let top = -1;
      for (const s of this.metrics.values()) top = Math.max(top, s.lastBucket());
      for (const s of this.scalars.values()) top = Math.max(top, s.lastBucket());
      let width = this.width;
      while (top + 1 > 2 * GW.POINTS) {
        width *= 2;
        top = Math.floor(top / 2); // floor(floor(step / w) / 2) = floor(step / 2w)
      }
      if (width === this.width) return;
      this.width = width;
      for (const s of this.metrics.values()) s.coarsen(width);
      for (const s of this.scalars.values()) s.coarsen(width);
    }

    /** The last step with layer metrics or scalars. */
    lastStep() {
      return Math.max(this.afterMetrics, this.afterScalars);
    }

    /** [{layer, value, step}] of a metric at each layer's latest logged step, forward order. */
    latest(metric) {
      const out = [];
      for (const layer of this.layers) {
        const s = this.series(layer.id, metric);
        if (!s || !s.length) continue;
        out.push({ layer, value: s.last[s.length - 1], step: s.step[s.length - 1] });
      }
      return out;
    }

    paramLayers() {
      return this.layers.filter((l) => l.kind === "param");
    }

    activationLayers() {
      return this.layers.filter((l) => l.kind !== "param");
    }
  }
  GW.RunData = RunData;
})();

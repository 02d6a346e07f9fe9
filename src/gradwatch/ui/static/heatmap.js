/* gradwatch live page: a layer x step heatmap on a canvas.
 *
 * One row per layer (forward order, the input side on top), one column per bucket of
 * steps; the color is the bucket's last value, on a log10 scale for norms and a linear
 * 0..1 scale for fractions. Missing values are light gray, non-finite ones red. All
 * text is drawn on the canvas or set with textContent: layer names are user data.
 */
"use strict";

(function () {
  const GW = (window.GW = window.GW || {});

  // matplotlib's viridis at nine evenly spaced stops
  const STOPS = ["#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80", "#5ec962", "#addc30", "#fde725"];
  const RGB = STOPS.map((h) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)));
  const LUT = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const x = (i / 255) * (RGB.length - 1);
    const k = Math.min(RGB.length - 2, Math.floor(x));
    const t = x - k;
    for (let c = 0; c < 3; c++) LUT[i * 3 + c] = RGB[k][c] * (1 - t) + RGB[k + 1][c] * t;
  }
  const MISSING = [232, 232, 232];
  const NONFINITE = [214, 39, 40];
  const M = { left: 118, right: 78, top: 6, bottom: 30 };

  GW.fmt = function (v) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    if (!Number.isFinite(v)) return v > 0 ? "inf" : "-inf";
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2).replace(/\.?0+e/, "e");
    return String(Number(v.toPrecision(4)));
  };

  const clip = (text, n) => (text.length > n ? text.slice(0, n - 1) + "…" : text);

  class Heatmap {
    /** @param {HTMLElement} el container; @param {(row: number) => void} onPick row clicked */
    constructor(el, onPick) {
      this.el = el;
      this.onPick = onPick;
      this.canvas = document.createElement("canvas");
      this.canvas.className = "heatmap-canvas";
      this.tip = document.createElement("div");
      this.tip.className = "tip";
      this.tip.hidden = true;
      el.append(this.canvas, this.tip);
      this.spec = null;
      this.canvas.addEventListener("mousemove", (e) => this._hover(e));
      this.canvas.addEventListener("mouseleave", () => (this.tip.hidden = true));
      this.canvas.addEventListener("click", (e) => {
        const at = this._at(e);
        if (at && this.onPick) this.onPick(at.row);
      });
    }

    /**
     * spec: {rows: [{label, last: Float64Array(cols), min, max}], cols, stepOf(col) -> step,
     *        log: bool, metric: string}
     */
    draw(spec) {
      this.spec = spec;
      const rows = spec.rows.length;
      const cols = Math.max(1, spec.cols);
      const width = Math.max(320, this.el.clientWidth);
      const rowPx = rows <= 12 ? 18 : rows <= 40 ? 8 : Math.max(3, Math.floor(360 / rows));
      const height = M.top + M.bottom + Math.max(60, rows * rowPx);
      const dpr = window.devicePixelRatio || 1;
      this.canvas.width = Math.round(width * dpr);
      this.canvas.height = Math.round(height * dpr);
      this.canvas.style.width = width + "px";
      this.canvas.style.height = height + "px";
      const ctx = this.canvas.getContext("2d");
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.clearRect(0, 0, width, height);
      this.plot = { x: M.left, y: M.top, w: width - M.left - M.right, h: height - M.top - M.bottom };
      this.canvas.dataset.rows = String(rows);
      this.canvas.dataset.cols = String(spec.cols);
      if (!rows) {
        ctx.fillStyle = "#666";
        ctx.font = "13px system-ui, sans-serif";
        ctx.fillText("no layer has this metric (yet)", M.left, M.top + 30);
        return;
      }
      const tf = spec.log ? (v) => (v > 0 ? Math.log10(v) : NaN) : (v) => v;
      let lo = Infinity;
      let hi = -Infinity;
      for (const r of spec.rows) {
        for (const v of r.last) {
          const t = tf(v);
          if (Number.isFinite(t)) {
            lo = Math.min(lo, t);
            hi = Math.max(hi, t);
          }
        }
      }
      if (!spec.log) {
        lo = Math.min(0, lo);
        hi = Math.max(1, hi);
      }
      if (!Number.isFinite(lo)) [lo, hi] = [0, 1];
      if (hi - lo < 1e-12) [lo, hi] = [lo - 0.5, hi + 0.5];
      this.range = { lo, hi };

      const off = document.createElement("canvas");
      off.width = cols;
      off.height = rows;
      const octx = off.getContext("2d");
      const img = octx.createImageData(cols, rows);
      spec.rows.forEach((r, y) => {
        for (let x = 0; x < cols; x++) {
          const v = r.last[x];
          let rgb;
          if (v === undefined || Number.isNaN(v)) rgb = MISSING;
          else if (!Number.isFinite(v)) rgb = NONFINITE;
          else {
            const t = tf(v);
            const i = Number.isFinite(t) ? Math.round(((t - lo) / (hi - lo)) * 255) : 0;
            const k = Math.max(0, Math.min(255, i)) * 3;
            rgb = [LUT[k], LUT[k + 1], LUT[k + 2]];
          }
          const p = (y * cols + x) * 4;
          img.data[p] = rgb[0];
          img.data[p + 1] = rgb[1];
          img.data[p + 2] = rgb[2];
          img.data[p + 3] = 255;
        }
      });
      octx.putImageData(img, 0, 0);
      const P = this.plot;
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(off, P.x, P.y, P.w, P.h);

      ctx.fillStyle = "#333";
      ctx.font = "11px system-ui, sans-serif";
      ctx.textBaseline = "middle";
      ctx.textAlign = "right";
      const every = Math.max(1, Math.ceil(12 / (P.h / rows)));
      spec.rows.forEach((r, y) => {
        if (y % every === 0 || y === rows - 1) ctx.fillText(clip(r.label, 18), P.x - 6, P.y + (y + 0.5) * (P.h / rows));
      });
      ctx.textAlign = "center";
      ctx.textBaseline = "top";
      const ticks = Math.max(2, Math.min(7, Math.floor(P.w / 110)));
      for (let i = 0; i <= ticks; i++) {
        const col = Math.min(cols - 1, Math.round((i / ticks) * (cols - 1)));
        const x = P.x + ((col + 0.5) / cols) * P.w;
        ctx.fillRect(x, P.y + P.h, 1, 4);
        ctx.fillText(String(spec.stepOf(col)), x, P.y + P.h + 6);
      }
      ctx.textAlign = "left";
      ctx.fillText("step", P.x + P.w + 10, P.y + P.h + 6);
      // color bar
      const bx = P.x + P.w + 12;
      const grad = ctx.createLinearGradient(0, P.y + P.h, 0, P.y);
      STOPS.forEach((c, i) => grad.addColorStop(i / (STOPS.length - 1), c));
      ctx.fillStyle = grad;
      ctx.fillRect(bx, P.y, 12, P.h);
      ctx.fillStyle = "#333";
      ctx.textBaseline = "top";
      const label = (t) => {
        const v = spec.log ? 10 ** t : t;
        return Math.abs(v) < 1e-3 || Math.abs(v) >= 1e4 ? v.toExponential(1) : String(Number(v.toPrecision(2)));
      };
      ctx.fillText(label(hi), bx + 16, P.y);
      ctx.textBaseline = "bottom";
      ctx.fillText(label(lo), bx + 16, P.y + P.h);
    }

    _at(e) {
      if (!this.spec || !this.plot || !this.spec.rows.length) return null;
      const rect = this.canvas.getBoundingClientRect();
      const x = e.clientX - rect.left - this.plot.x;
      const y = e.clientY - rect.top - this.plot.y;
      if (x < 0 || y < 0 || x >= this.plot.w || y >= this.plot.h) return null;
      const col = Math.floor((x / this.plot.w) * Math.max(1, this.spec.cols));
      const row = Math.floor((y / this.plot.h) * this.spec.rows.length);
      return { row, col, x: x + this.plot.x, y: y + this.plot.y };
    }

    _hover(e) {
      const at = this._at(e);
      if (!at) {
        this.tip.hidden = true;
        return;
      }
      const r = this.spec.rows[at.row];
      const v = r.last[at.col];
      let text = `${r.label} · step ${this.spec.stepOf(at.col)} · ${this.spec.metric} ${GW.fmt(v)}`;
      if (r.min && r.max && !Number.isNaN(r.min[at.col])) {
        text += ` (min ${GW.fmt(r.min[at.col])}, max ${GW.fmt(r.max[at.col])})`;
      }
      this.tip.textContent = text + " · click: add to the lines";
      this.tip.hidden = false;
      this.tip.style.left = Math.min(at.x + 12, this.canvas.clientWidth - 260) + "px";
      this.tip.style.top = at.y + 14 + "px";
    }
  }
  GW.Heatmap = Heatmap;
})();

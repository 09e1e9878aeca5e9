// A small SVG line chart for learning curves, written for live data.
//
// Memory is bounded: a series keeps at most `capacity` points; when full it drops every other point
// (the first and the newest always stay), so a curve of any length keeps its shape at a coarser
// step. Drawing is bounded too: each series is reduced to the first, last, lowest and highest point
// of each pixel column (M4), and redraws are coalesced to one per animation frame, however fast
// points arrive.

const SVG = "http://www.w3.org/2000/svg";
export const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f",
  "#7c3aed", "#b45309"];

function el(name, attrs = {}, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.append(node);
  return node;
}

/** Points of one curve, in increasing x, at most `capacity` of them. */
export class Series {
  constructor(label, { color, dashed = false, capacity = 2000, width = 2 } = {}) {
    this.label = label;
    this.color = color;
    this.dashed = dashed;
    this.width = width;
    this.capacity = capacity;
    this.xs = [];
    this.ys = [];
    this.cut = null;  // {x, text}: the curve ends there on purpose (an early-stopped trial)
    this.received = 0;
  }

  push(x, y) {
    if (!Number.isFinite(x) || !Number.isFinite(y)) return;
    this.received += 1;
    const n = this.xs.length;
    if (n && x <= this.xs[n - 1]) {  // a replay from a checkpoint: replace from there on
      let i = n;
      while (i > 0 && this.xs[i - 1] >= x) i -= 1;
      this.xs.length = i;
      this.ys.length = i;
    }
    this.xs.push(x);
    this.ys.push(y);
    if (this.xs.length > this.capacity) this.halve();
  }

  halve() {
    const last = this.xs.length - 1;
    const xs = [], ys = [];
    for (let i = 0; i < last; i += 2) { xs.push(this.xs[i]); ys.push(this.ys[i]); }
    xs.push(this.xs[last]);
    ys.push(this.ys[last]);
    this.xs = xs;
    this.ys = ys;
  }

  get last() { return this.xs.length ? { x: this.xs.at(-1), y: this.ys.at(-1) } : null; }
}

export class LineChart {
  /**
   * `new LineChart(parent, {title, xLabel, yLabel, height})`: a <figure> with an SVG, a legend and a
   * caption that says the latest values in words (screen readers, and the tests).
   */
  constructor(parent, { title, xLabel = "iteration", yLabel = "", height = 220, logY = false, smooth = 0 } = {}) {
    this.title = title;
    this.xLabel = xLabel;
    this.yLabel = yLabel;
    this.height = height;
    this.logY = logY;
    this.smoothing = smooth;  // > 0: an exponential moving average over the raw curve (faint), as TensorBoard
    this.smooth = smooth > 0;
    this.series = new Map();
    this.pending = false;
    this.renders = 0;
    this.figure = document.createElement("figure");
    this.figure.className = "chart";
    this.figure.innerHTML = `<figcaption class="chart-title"></figcaption><div class="chart-body"></div>
      <ul class="legend" aria-hidden="true"></ul><p class="chart-summary visually-hidden" aria-live="off"></p>`;
    this.figure.querySelector(".chart-title").textContent = title;
    if (smooth > 0) {
      const toggle = document.createElement("label");
      toggle.className = "smooth-toggle";
      toggle.innerHTML = `<input type="checkbox" checked> smoothed`;
      toggle.firstChild.addEventListener("change", (e) => { this.smooth = e.target.checked; this.schedule(); });
      this.figure.querySelector(".chart-title").append(" ", toggle);
    }
    this.body = this.figure.querySelector(".chart-body");
    this.svg = el("svg", { role: "img", "aria-label": title, preserveAspectRatio: "none" }, this.body);
    parent.append(this.figure);
    this.observer = new ResizeObserver(() => this.schedule());
    this.observer.observe(this.body);
  }

  add(key, label, options = {}) {
    if (!this.series.has(key)) {
      const color = options.color || PALETTE[this.series.size % PALETTE.length];
      this.series.set(key, new Series(label, { ...options, color }));
    }
    return this.series.get(key);
  }

  push(key, x, y, label = key) {
    (this.series.get(key) || this.add(key, label)).push(x, y);
    this.schedule();
  }

  /** Mark a series as cut at its last point, e.g. "stopped early at 40". */
  cut(key, text) {
    const s = this.series.get(key);
    if (s && s.last) { s.cut = { x: s.last.x, text }; this.schedule(); }
  }

  get storedPoints() { let n = 0; for (const s of this.series.values()) n += s.xs.length; return n; }
  get renderedPoints() { return this.lastRendered || 0; }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => { this.pending = false; this.render(); });
  }

  destroy() { this.observer.disconnect(); this.figure.remove(); }

  render() {
    this.renders += 1;
    const width = Math.max(this.body.clientWidth, 200);
    const height = this.height;
    const pad = { left: 52, right: 12, top: 8, bottom: 30 };
    const w = width - pad.left - pad.right, h = height - pad.top - pad.bottom;
    const svg = this.svg;
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    svg.replaceChildren();

    const visible = [...this.series.values()].filter((s) => s.xs.length);
    const legend = this.figure.querySelector(".legend");
    legend.replaceChildren(...[...this.series.values()].map((s) => {
      const li = document.createElement("li");
      li.innerHTML = `<span class="swatch"></span>`;
      li.firstChild.style.background = s.color;
      if (s.dashed) li.firstChild.classList.add("dashed");
      li.append(s.label + (s.cut ? ` (${s.cut.text})` : ""));
      return li;
    }));
    const summary = visible.map((s) => `${s.label}: ${fmt(s.last.y)} at ${this.xLabel} ${s.last.x}`).join("; ");
    this.figure.querySelector(".chart-summary").textContent = summary || "no data yet";
    svg.setAttribute("aria-label", `${this.title}. ${summary || "No data yet."}`);
    if (!visible.length) {
      el("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty" }, svg).textContent =
        "waiting for data";
      this.lastRendered = 0;
      return;
    }
    const ty = (y) => (this.logY ? Math.log10(Math.max(y, 1e-12)) : y);
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    for (const s of visible) {
      x0 = Math.min(x0, s.xs[0]); x1 = Math.max(x1, s.xs.at(-1));
      for (const y of s.ys) { const v = ty(y); if (v < y0) y0 = v; if (v > y1) y1 = v; }
    }
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
    const margin = (y1 - y0) * 0.05; y0 -= margin; y1 += margin;
    const sx = (x) => pad.left + ((x - x0) / (x1 - x0)) * w;
    const sy = (y) => pad.top + (1 - (ty(y) - y0) / (y1 - y0)) * h;

    // Axes and ticks.
    const axes = el("g", { class: "axes" }, svg);
    for (const t of ticks(y0, y1, 4)) {
      const y = pad.top + (1 - (t - y0) / (y1 - y0)) * h;
      el("line", { x1: pad.left, x2: pad.left + w, y1: y, y2: y, class: "grid" }, axes);
      el("text", { x: pad.left - 6, y: y + 4, "text-anchor": "end" }, axes).textContent =
        this.logY ? fmt(10 ** t) : fmt(t);
    }
    for (const t of ticks(x0, x1, Math.max(2, Math.floor(w / 90)))) {
      const x = sx(t);
      el("line", { x1: x, x2: x, y1: pad.top + h, y2: pad.top + h + 4, class: "tick" }, axes);
      el("text", { x, y: height - 12, "text-anchor": "middle" }, axes).textContent = fmt(t);
    }
    el("rect", { x: pad.left, y: pad.top, width: w, height: h, class: "frame" }, axes);
    el("text", { x: pad.left + w, y: height - 1, "text-anchor": "end", class: "label" }, axes).textContent = this.xLabel;

    // Curves, each reduced to at most 4 points per pixel column.
    let rendered = 0;
    for (const s of visible) {
      const smoothed = this.smooth && s.xs.length > 2;
      const lines = smoothed ? [[s.ys, { opacity: 0.25, "stroke-width": 1 }], [ema(s.ys, this.smoothing), { class: "curve smoothed" }]]
        : [[s.ys, {}]];
      for (const [ys, extra] of lines) {
        const pts = m4(s.xs, ys, sx, sy, Math.ceil(w));
        rendered += pts.length / 2;
        const d = [];
        for (let i = 0; i < pts.length; i += 2) d.push(`${pts[i].toFixed(1)},${pts[i + 1].toFixed(1)}`);
        el("polyline", { points: d.join(" "), fill: "none", stroke: s.color, "stroke-width": s.width,
          "stroke-dasharray": s.dashed ? "5 4" : "none", "stroke-linejoin": "round", class: "curve", ...extra }, svg);
      }
      if (s.xs.length === 1) el("circle", { cx: sx(s.xs[0]), cy: sy(s.ys[0]), r: 3, fill: s.color }, svg);
      if (s.cut) {
        const cx = sx(s.cut.x), cy = sy(s.last.y);
        el("path", { d: `M${cx - 5},${cy - 5}L${cx + 5},${cy + 5}M${cx - 5},${cy + 5}L${cx + 5},${cy - 5}`,
          stroke: s.color, "stroke-width": 2.5, class: "cut" }, svg);
      }
    }
    this.lastRendered = rendered;
  }
}

/** An exponential moving average with TensorBoard's debiasing (weight `w` on the past). */
function ema(ys, w) {
  const out = new Array(ys.length);
  let acc = 0;
  for (let i = 0; i < ys.length; i++) {
    acc = acc * w + (1 - w) * ys[i];
    out[i] = acc / (1 - w ** (i + 1));
  }
  return out;
}

/** The first, lowest, highest and last point of each pixel column, as a flat [x, y, x, y, ...] list. */
function m4(xs, ys, sx, sy, columns) {
  const out = [];
  if (xs.length <= columns * 2) {
    for (let i = 0; i < xs.length; i++) out.push(sx(xs[i]), sy(ys[i]));
    return out;
  }
  let col = null, first, last, lo, hi;
  const flush = () => {
    const idx = [...new Set([first, lo, hi, last])].sort((a, b) => a - b);
    for (const i of idx) out.push(sx(xs[i]), sy(ys[i]));
  };
  for (let i = 0; i < xs.length; i++) {
    const c = Math.floor(sx(xs[i]));
    if (c !== col) {
      if (col !== null) flush();
      col = c; first = lo = hi = last = i;
    } else {
      last = i;
      if (ys[i] < ys[lo]) lo = i;
      if (ys[i] > ys[hi]) hi = i;
    }
  }
  flush();
  return out;
}

function ticks(lo, hi, count) {
  const span = hi - lo;
  const step0 = span / Math.max(count, 1);
  const mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => span / s <= count) || 10 * mag;
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + 1e-9 * step; t += step) out.push(Number(t.toFixed(10)));
  return out;
}

export function fmt(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(2);
  if (Number.isInteger(v)) return String(v);
  return v.toPrecision(a >= 100 ? 5 : 3);
}

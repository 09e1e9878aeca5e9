// The adaptation playground: K examples of a new task, POST /models/{id}/adapt, the adapted predictions.
//
// * sinusoid-like regression (1 input, 1 output): click to place points; the curve before adapting and
//   after each step (one query with every_step: the predictions after 0, 1, ..., steps steps);
// * image classifiers: N classes x K canvases to draw (or upload) the support set, a query canvas, the
//   predicted class with its probabilities and the support loss before and after adapting;
// * 2D navigation policies: click a goal; a few sampled rollouts' paths before and after each update
//   (trajectories), and the average return after 0, 1, ..., steps updates;
// * anything else: the request as JSON.

import { api, ApiError } from "./api.js";
import { fmt, LineChart, PALETTE } from "./chart.js";
import { errorBox, h, state } from "./dom.js";

const SVG = "http://www.w3.org/2000/svg";
function s(name, attrs = {}, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.append(node);
  return node;
}

function describe(err) {
  if (err instanceof ApiError && err.status === 422) return `The server refused the query: ${err.message}`;
  if (err instanceof ApiError && err.status === 429) return `Busy (429): ${err.message}. Try again in a moment.`;
  return `Adaptation failed: ${err.message}`;
}

export function playground(view, model, { signal }) {
  const shape = model.input_shape;
  if (model.kind === "regression" && shape.length === 1 && shape[0] === 1 && model.output_dim === 1) {
    sinusoid(view, model, signal);
  } else if (model.kind === "classification" && shape.length === 3) {
    images(view, model, signal);
  } else if (model.kind === "rl_policy" && model.spec.task.family === "nav2d") {
    navigation(view, model, signal);
  } else {
    generic(view, model, signal);
  }
}

function numberInput(id, label, value, attrs = {}) {
  const input = h("input", { type: "number", id, value, style: "width:6em", ...attrs });
  return [h("label", { for: id }, label), input];
}

// ----------------------------------------------------------------------------------------- sinusoid

function sinusoid(view, model, signal) {
  const W = 640, H = 320, X = [-5, 5], Y = [-6, 6];
  const px = (x) => ((x - X[0]) / (X[1] - X[0])) * W;
  const py = (y) => H - ((y - Y[0]) / (Y[1] - Y[0])) * H;
  const points = [];
  let truth = null;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "plane", id: "sine-plane", role: "img",
    "aria-label": "Support points and the adapted curves; click to add a point" });
  const layers = { grid: s("g", {}, svg), truth: s("g", {}, svg), curves: s("g", {}, svg), points: s("g", {}, svg) };
  s("line", { x1: 0, x2: W, y1: py(0), y2: py(0), class: "axis" }, layers.grid);
  s("line", { x1: px(0), x2: px(0), y1: 0, y2: H, class: "axis" }, layers.grid);
  for (const x of [-4, -2, 2, 4]) s("text", { x: px(x), y: py(0) + 14, "text-anchor": "middle" }, layers.grid).textContent = x;
  for (const y of [-4, -2, 2, 4]) s("text", { x: px(0) + 4, y: py(y) + 4 }, layers.grid).textContent = y;

  const [stepsLabel, steps] = numberInput("sine-steps", "Steps", model.spec.eval?.steps ?? 10, { min: 0, max: 50 });
  const [lrLabel, lr] = numberInput("sine-lr", "Step size", model.spec.inner.lr, { min: 0, step: "any" });
  const [xLabel, xIn] = numberInput("point-x", "x", "0", { step: "any", min: -5, max: 5 });
  const [yLabel, yIn] = numberInput("point-y", "y", "0", { step: "any", min: -6, max: 6 });
  const count = h("span", { id: "point-count", class: "muted" }, "0 points");
  const result = h("div", { id: "sine-result", "aria-live": "polite" });
  const adapt = h("button", { type: "button", id: "adapt" }, "Adapt");

  function drawPoints() {
    layers.points.replaceChildren();
    for (const [x, y] of points) s("circle", { cx: px(x), cy: py(y), r: 5, fill: "#111827", class: "support" }, layers.points);
    count.textContent = `${points.length} point${points.length === 1 ? "" : "s"}`;
    adapt.disabled = points.length === 0;
  }
  function add(x, y) {
    if (!Number.isFinite(x) || !Number.isFinite(y)) return;
    points.push([Math.max(X[0], Math.min(X[1], x)), Math.max(Y[0], Math.min(Y[1], y))]);
    drawPoints();
  }
  svg.addEventListener("click", (event) => {
    const box = svg.getBoundingClientRect();
    const x = X[0] + ((event.clientX - box.left) / box.width) * (X[1] - X[0]);
    const y = Y[1] - ((event.clientY - box.top) / box.height) * (Y[1] - Y[0]);
    add(Number(x.toFixed(3)), Number(y.toFixed(3)));
  });
  function curve(xs, ys, attrs) {
    return s("polyline", { points: xs.map((x, i) => `${px(x).toFixed(1)},${py(Math.max(Y[0] - 2, Math.min(Y[1] + 2, ys[i]))).toFixed(1)}`).join(" "),
      fill: "none", ...attrs }, layers.curves);
  }
  function sample() {
    const k = model.spec.task.shots || 10;
    const amplitude = 0.1 + Math.random() * 4.9, phase = Math.random() * Math.PI;
    truth = { amplitude, phase };
    points.length = 0;
    for (let i = 0; i < k; i++) {
      const x = -5 + Math.random() * 10;
      points.push([Number(x.toFixed(3)), Number((amplitude * Math.sin(x - phase)).toFixed(3))]);
    }
    layers.truth.replaceChildren();
    const xs = Array.from({ length: 201 }, (_, i) => -5 + i * 0.05);
    layers.truth.append(s("polyline", { points: xs.map((x) => `${px(x)},${py(amplitude * Math.sin(x - phase))}`).join(" "),
      fill: "none", stroke: "#16a34a", "stroke-width": 1.5, "stroke-dasharray": "2 4", class: "truth" }));
    layers.curves.replaceChildren();
    result.replaceChildren(h("p", { class: "muted" }, `Sampled ${k} points of ${fmt(amplitude)}·sin(x − ${fmt(phase)}) (dotted green).`));
    drawPoints();
  }

  adapt.addEventListener("click", async () => {
    const n = Math.max(0, Math.min(50, Math.round(Number(steps.value) || 0)));
    const grid = Array.from({ length: 101 }, (_, i) => -5 + i * 0.1);
    const body = { support: { x: points.map(([x]) => [x]), y: points.map(([, y]) => [y]) },
      query: { x: grid.map((x) => [x]) }, steps: n, lr: Number(lr.value) || undefined, every_step: true };
    adapt.disabled = true;
    layers.curves.replaceChildren();
    result.replaceChildren(h("p", { class: "muted" }, "Adapting…"));
    try {
      // One query: the predictions after 0, 1, ..., n steps of the same adaptation.
      const out = await api(`/models/${model.id}/adapt`, { method: "POST", body, signal });
      out.step_predictions.forEach((predictions, k) => {
        const ys = predictions.map((p) => p[0]);
        const final = k === n;
        curve(grid, ys, k === 0 ? { stroke: "#6b7280", "stroke-width": 2, "stroke-dasharray": "6 4", class: "before" }
          : { stroke: PALETTE[0], "stroke-width": final ? 3 : 1.2, opacity: final ? 1 : 0.25 + (0.5 * k) / n,
            class: final ? "after" : "step", "data-step": k });
      });
      const losses = out.step_support_losses.map((v, k) => `${k}: ${fmt(v)}`).join(" · ");
      result.replaceChildren(h("p", { id: "sine-loss" },
        `Support loss ${fmt(out.support_loss_before)} before adapting → ${fmt(out.support_loss_after)} after ${n} step${n === 1 ? "" : "s"} `
        + `of size ${fmt(out.lr)}.`),
      h("p", { class: "muted", id: "sine-step-losses" }, `Support loss after each step: ${losses}.`),
      h("p", { class: "muted" }, "Grey dashed: before adaptation; blue: after each step, darker as it goes; bold: the last."));
    } catch (err) {
      if (err.name !== "AbortError") result.replaceChildren(errorBox(describe(err)));
    } finally {
      adapt.disabled = points.length === 0;
    }
  });

  view.append(
    h("p", { class: "muted" }, "Click the plane to place support points (x in [−5, 5]), or type them, or sample a random sinusoid; then adapt."),
    svg,
    h("div", { class: "row" }, xLabel, xIn, yLabel, yIn,
      h("button", { type: "button", class: "secondary", id: "add-point", onclick: () => add(Number(xIn.value), Number(yIn.value)) }, "Add point"),
      count),
    h("div", { class: "row" },
      h("button", { type: "button", class: "secondary", id: "sample", onclick: sample }, "Sample a sinusoid"),
      h("button", { type: "button", class: "secondary", id: "clear-points", onclick: () => {
        points.length = 0; truth = null; layers.truth.replaceChildren(); layers.curves.replaceChildren(); result.replaceChildren(); drawPoints();
      } }, "Clear"),
      stepsLabel, steps, lrLabel, lr, adapt),
    result);
  drawPoints();
}

// ------------------------------------------------------------------------------------------- images

function drawingCanvas(label, id) {
  const size = 112;
  const canvas = h("canvas", { width: size, height: size, class: "draw", id, "aria-label": `${label}: draw here` });
  const ctx = canvas.getContext("2d");
  const clear = () => { ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, size, size); canvas.dataset.empty = "true"; };
  clear();
  let drawing = null;
  const at = (event) => {
    const box = canvas.getBoundingClientRect();
    return [((event.clientX - box.left) / box.width) * size, ((event.clientY - box.top) / box.height) * size];
  };
  canvas.addEventListener("pointerdown", (event) => {
    canvas.setPointerCapture(event.pointerId);
    drawing = at(event);
    ctx.fillStyle = "#000";
    ctx.beginPath(); ctx.arc(drawing[0], drawing[1], 4, 0, 2 * Math.PI); ctx.fill();
    canvas.dataset.empty = "false";
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    const next = at(event);
    ctx.strokeStyle = "#000"; ctx.lineWidth = 8; ctx.lineCap = "round";
    ctx.beginPath(); ctx.moveTo(...drawing); ctx.lineTo(...next); ctx.stroke();
    drawing = next;
  });
  for (const end of ["pointerup", "pointercancel", "pointerleave"]) canvas.addEventListener(end, () => { drawing = null; });
  const upload = h("input", { type: "file", accept: "image/png,image/jpeg", class: "visually-hidden", id: `${id}-file` });
  upload.addEventListener("change", async () => {
    const file = upload.files[0];
    if (!file) return;
    const bitmap = await createImageBitmap(file);
    clear();
    ctx.drawImage(bitmap, 0, 0, size, size);
    canvas.dataset.empty = "false";
  });
  const cell = h("div", { class: "cell" }, h("span", { class: "muted" }, label), canvas,
    h("div", {}, h("label", { for: `${id}-file`, class: "button secondary", tabindex: "0",
      onkeydown: (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); upload.click(); } } }, "Upload"), upload,
    h("button", { type: "button", class: "link", onclick: clear }, "Clear")));
  return { canvas, cell, png: () => canvas.toDataURL("image/png"), empty: () => canvas.dataset.empty === "true" };
}

function images(view, model, signal) {
  const ways = model.output_dim;
  const shots = model.spec.task.shots || 1;
  const [stepsLabel, steps] = numberInput("image-steps", "Steps", model.spec.eval?.steps ?? 10, { min: 0, max: 100 });
  const support = [];
  const rows = [];
  for (let c = 0; c < ways; c++) {
    const row = h("div", { class: "canvases class-group", role: "group", "aria-label": `Class ${c}` });
    for (let k = 0; k < shots; k++) {
      const cell = drawingCanvas(`class ${c}${shots > 1 ? ` · ${k + 1}` : ""}`, `support-${c}-${k}`);
      support.push({ label: c, ...cell });
      row.append(cell.cell);
    }
    rows.push(row);
  }
  const query = drawingCanvas("query", "query");
  const result = h("div", { id: "image-result", "aria-live": "polite" });
  const adapt = h("button", { type: "button", id: "predict" }, "Adapt and predict");
  adapt.addEventListener("click", async () => {
    const missing = support.filter((c) => c.empty()).length + (query.empty() ? 1 : 0);
    if (missing) {
      result.replaceChildren(errorBox(`Draw or upload every canvas first (${missing} still empty).`));
      return;
    }
    adapt.disabled = true;
    result.replaceChildren(h("p", { class: "muted" }, "Adapting…"));
    try {
      const out = await api(`/models/${model.id}/adapt`, { method: "POST", signal, body: {
        support: { x: support.map((c) => c.png()), y: support.map((c) => c.label) },
        query: { x: [query.png()] }, steps: Math.max(0, Math.round(Number(steps.value) || 0)) } });
      const predicted = out.predictions[0];
      const probs = out.probabilities[0];
      result.replaceChildren(
        h("p", { id: "prediction" }, "Predicted: ", h("strong", {}, `class ${predicted}`),
          ` (${(100 * probs[predicted]).toFixed(1)}%)`),
        h("ul", { class: "bars", id: "probabilities" }, probs.map((p, c) => h("li", { class: c === predicted ? "top" : "" },
          h("span", {}, `class ${c}`), h("span", { class: "bar", style: `width:${Math.max(1, 100 * p)}%` }),
          h("span", { class: "num" }, `${(100 * p).toFixed(1)}%`)))),
        h("p", { id: "image-loss" }, `Support loss ${fmt(out.support_loss_before)} before adapting → `
          + `${fmt(out.support_loss_after)} after ${out.steps} steps of size ${fmt(out.lr)}.`));
    } catch (err) {
      if (err.name !== "AbortError") result.replaceChildren(errorBox(describe(err)));
    } finally {
      adapt.disabled = false;
    }
  });
  view.append(
    h("p", { class: "muted" }, `Draw (or upload) ${shots} example${shots > 1 ? "s" : ""} of each of ${ways} new classes `
      + "— dark ink on white, as Omniglot — and a query; the model adapts to your classes and classifies the query."),
    h("div", { class: "canvases", id: "support" }, rows), h("h3", {}, "Query"), h("div", { class: "canvases" }, query.cell),
    h("div", { class: "row" }, stepsLabel, steps, adapt), result);
}

// --------------------------------------------------------------------------------------- navigation

function navigation(view, model, signal) {
  const W = 320, R = 0.5;
  const p = (v) => ((v + R) / (2 * R)) * W;
  const svg = s("svg", { viewBox: `0 0 ${W} ${W}`, class: "plane", id: "nav-plane", role: "img", style: "max-width:320px",
    "aria-label": "The navigation plane; click to place the goal" });
  // The goals' area, [-0.5, 0.5]^2, is the whole plane: its border, the axes, the start at the centre.
  s("rect", { x: 0.5, y: 0.5, width: W - 1, height: W - 1, fill: "none", class: "axis area" }, svg);
  s("line", { x1: 0, x2: W, y1: W / 2, y2: W / 2, class: "axis" }, svg);
  s("line", { x1: W / 2, x2: W / 2, y1: 0, y2: W, class: "axis" }, svg);
  const paths = s("g", { id: "nav-paths" }, svg);
  s("circle", { cx: W / 2, cy: W / 2, r: 4, fill: "#111827" }, svg);
  const goalMark = s("circle", { r: 7, fill: "#dc2626", "fill-opacity": 0.8, visibility: "hidden", id: "goal" }, svg);
  const [gxLabel, gx] = numberInput("goal-x", "goal x", "0.3", { step: "any", min: -0.5, max: 0.5 });
  const [gyLabel, gy] = numberInput("goal-y", "goal y", "-0.2", { step: "any", min: -0.5, max: 0.5 });
  const [stepsLabel, steps] = numberInput("nav-steps", "Steps", model.spec.inner.steps ?? 1, { min: 0, max: 10 });
  const rollouts = model.spec.task.rollouts ?? 10;
  const [pathsLabel, pathCount] = numberInput("nav-paths-count", "Paths per step", Math.min(3, rollouts),
    { min: 0, max: Math.min(10, rollouts) });
  const legend = h("ul", { class: "legend", id: "nav-legend" });
  function drawPaths(out) {
    paths.replaceChildren();
    legend.replaceChildren();
    if (!out.trajectories) return;
    out.trajectories.forEach((phase, k) => {
      const color = PALETTE[k % PALETTE.length];
      for (const path of phase) {
        s("polyline", { points: path.map(([x, y]) => `${p(x).toFixed(1)},${(W - p(y)).toFixed(1)}`).join(" "),
          fill: "none", stroke: color, "stroke-width": k === out.trajectories.length - 1 ? 2 : 1.2,
          "stroke-opacity": 0.8, class: "trajectory", "data-step": k }, paths);
      }
      legend.append(h("li", {}, h("span", { style: `display:inline-block;width:12px;height:3px;background:${color};`
        + "vertical-align:middle;margin-right:4px" }), k === 0 ? "before adapting" : `after ${k} step${k === 1 ? "" : "s"}`));
    });
    goalMark.setAttribute("cx", p(out.goal[0]));
    goalMark.setAttribute("cy", W - p(out.goal[1]));
  }
  const place = () => {
    paths.replaceChildren();  // the paths were for the previous goal
    legend.replaceChildren();
    goalMark.setAttribute("cx", p(Number(gx.value)));
    goalMark.setAttribute("cy", W - p(Number(gy.value)));
    goalMark.setAttribute("visibility", "visible");
  };
  svg.addEventListener("click", (event) => {
    const box = svg.getBoundingClientRect();
    gx.value = (-R + ((event.clientX - box.left) / box.width) * 2 * R).toFixed(3);
    gy.value = (R - ((event.clientY - box.top) / box.height) * 2 * R).toFixed(3);
    place();
  });
  gx.addEventListener("input", place);
  gy.addEventListener("input", place);
  const result = h("div", { id: "nav-result", "aria-live": "polite" });
  const chartSlot = h("div", {});
  const adapt = h("button", { type: "button", id: "adapt" }, "Adapt to this goal");
  adapt.addEventListener("click", async () => {
    adapt.disabled = true;
    result.replaceChildren(h("p", { class: "muted" }, "Collecting rollouts and adapting…"));
    try {
      const k = Math.max(0, Math.min(10, rollouts, Math.round(Number(pathCount.value) || 0)));
      const out = await api(`/models/${model.id}/adapt`, { method: "POST", signal, body: {
        task: { goal: [Number(gx.value), Number(gy.value)] }, steps: Math.max(0, Math.round(Number(steps.value) || 0)),
        trajectories: k } });
      drawPaths(out);
      chartSlot.replaceChildren();
      const chart = new LineChart(chartSlot, { title: "Average return after each adaptation step", xLabel: "steps" });
      (out.returns || []).forEach((r, k) => chart.push("return", k, r, "average return of the rollouts"));
      signal.addEventListener("abort", () => chart.destroy());
      result.replaceChildren(h("p", { id: "nav-returns" }, `Return ${fmt(out.return_before)} before adapting → `
        + `${fmt(out.return_after)} after ${out.steps} step${out.steps === 1 ? "" : "s"}.`),
      h("p", { class: "muted" }, k ? `The paths: ${k} of the rollouts sampled with the policy before adapting and after `
        + "each step (the Gaussian policy's exploration noise included, not its mean path), one colour per step count."
        : "No paths asked (Paths per step: 0)."));
    } catch (err) {
      if (err.name !== "AbortError") result.replaceChildren(errorBox(describe(err)));
    } finally {
      adapt.disabled = false;
    }
  });
  view.append(h("p", { class: "muted" }, "Click the plane (x and y in [−0.5, 0.5]; the agent starts at the centre) to place a goal."),
    svg, legend, h("div", { class: "row" }, gxLabel, gx, gyLabel, gy, stepsLabel, steps, pathsLabel, pathCount, adapt),
    result, chartSlot);
  place();
}

// ------------------------------------------------------------------------------------------ generic

function generic(view, model, signal) {
  const example = model.kind === "rl_policy" ? { task: {}, steps: 1 }
    : { support: { x: [], y: [] }, query: { x: [] }, steps: model.spec.eval?.steps ?? 10 };
  const editor = h("textarea", { class: "spec", id: "adapt-body", spellcheck: "false" }, JSON.stringify(example, null, 2));
  const result = h("div", { "aria-live": "polite" });
  const send = h("button", { type: "button" }, "Adapt");
  send.addEventListener("click", async () => {
    try {
      const out = await api(`/models/${model.id}/adapt`, { method: "POST", body: JSON.parse(editor.value), signal });
      result.replaceChildren(h("pre", {}, JSON.stringify(out, null, 2)));
    } catch (err) {
      result.replaceChildren(errorBox(err instanceof SyntaxError ? `Not valid JSON: ${err.message}` : describe(err)));
    }
  });
  view.append(state(`No drawing playground for this kind of model (input ${model.input_shape.join("×")}); `
    + "send an adaptation query as JSON instead."),
  h("label", { for: "adapt-body", class: "visually-hidden" }, "Adaptation request (JSON)"), editor,
  h("div", { class: "row" }, send), result);
}

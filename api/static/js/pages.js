// The pages: jobs, a job, sweeps, a sweep, models, a model (with its playground), submit.
// Each is `async (view, {signal, params, query})`; `signal` aborts when the user leaves the page.

import { api, ApiError, download, follow, validationErrors } from "./api.js";
import { fmt, LineChart } from "./chart.js";
import { badge, duration, errorBox, h, short, state, when } from "./dom.js";
import { playground } from "./playground.js";
import { PRESETS } from "./presets.js";

const PAGE_SIZE = 50;
const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
export const live = (window.mamlDashboard = { charts: {}, events: 0 });  // read by the tests and the benchmark

function every(ms, fn, signal) {
  const timer = setInterval(() => { if (!document.hidden) fn(); }, ms);
  signal.addEventListener("abort", () => clearInterval(timer));
}

function pager(total, offset, go) {
  const last = Math.min(offset + PAGE_SIZE, total);
  return h("nav", { class: "pager", "aria-label": "Pages" },
    h("button", { type: "button", class: "secondary", disabled: offset === 0, onclick: () => go(offset - PAGE_SIZE) }, "Previous"),
    h("span", { "aria-live": "polite" }, total ? `${offset + 1}–${last} of ${total}` : ""),
    h("button", { type: "button", class: "secondary", disabled: last >= total, onclick: () => go(offset + PAGE_SIZE) }, "Next"));
}

function setQuery(base, values) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(values)) if (v) q.set(k, v);
  location.hash = q.toString() ? `${base}?${q}` : base;
}

// ---------------------------------------------------------------------------------------------- jobs

export async function jobsPage(view, { signal, query }) {
  document.title = "Jobs · maml-service";
  const status = STATUSES.includes(query.get("status")) ? query.get("status") : "";
  const offset = Math.max(0, Number(query.get("offset")) || 0);
  const select = h("select", { id: "status-filter", onchange: () => setQuery("#/jobs", { status: select.value }) },
    h("option", { value: "" }, "all"), STATUSES.map((s) => h("option", { value: s, selected: s === status }, s)));
  const body = h("div", { id: "jobs" }, state("Loading jobs…"));
  view.append(h("h1", {}, "Jobs"),
    h("div", { class: "row" }, h("label", { for: "status-filter" }, "Status"), select,
      h("a", { class: "button secondary", href: "#/submit" }, "Submit a job")),
    body);

  async function load() {
    const q = new URLSearchParams({ limit: PAGE_SIZE, offset });
    if (status) q.set("status", status);
    const page = await api(`/jobs?${q}`, { signal });
    if (!page.count) {
      body.replaceChildren(status
        ? state(`No ${status} jobs.`)
        : state("No jobs yet. ", h("a", { href: "#/submit" }, "Submit your first job"), "."));
      return;
    }
    const rows = page.data.map((job) => {
      const p = job.progress;
      return h("tr", { dataset: { id: job.id } },
        h("td", {}, h("a", { href: `#/jobs/${job.id}` }, job.name)),
        h("td", { class: "hide-narrow" }, h("code", {}, short(job.id))),
        h("td", {}, badge(job.status)),
        h("td", {}, h("progress", { max: p.total, value: p.iteration, "aria-label": `${job.name} progress` }),
          " ", h("span", { class: "muted" }, `${p.iteration}/${p.total}`)),
        h("td", { class: "num" }, job.status === "running" ? duration(p.eta_s) : "–"),
        h("td", { class: "hide-narrow" }, when(job.created_at)));
    });
    body.replaceChildren(
      h("div", { class: "table-wrap" }, h("table", { id: "jobs-table" },
        h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", { class: "hide-narrow" }, "Id"), h("th", {}, "Status"),
          h("th", {}, "Progress"), h("th", { class: "num" }, "ETA"), h("th", { class: "hide-narrow" }, "Created"))),
        h("tbody", {}, rows))),
      pager(page.count, offset, (o) => setQuery("#/jobs", { status, offset: String(o) })));
  }
  await load();
  performance.mark("jobs-rendered");  // in the DOM; painted at the next frame (benchmarks/dashboard.py)
  requestAnimationFrame(() => setTimeout(() => performance.mark("jobs-painted")));
  every(2000, () => load().catch(() => {}), signal);
}

// The curves of a job: which metric goes to which chart (created when its first metric arrives).
const CHARTS = [
  { id: "loss", smooth: 0.9, title: "Meta loss (query, after adaptation; dashed: before)", series: [
    ["meta/loss", "after adaptation"], ["meta/loss_before", "before adaptation", { dashed: true }]] },
  { id: "accuracy", smooth: 0.9, title: "Meta accuracy (query)", series: [
    ["meta/accuracy", "after adaptation"], ["meta/accuracy_before", "before adaptation", { dashed: true }]] },
  { id: "return", smooth: 0.9, title: "Return (meta-RL)", series: [
    ["rl/return_after", "after adaptation"], ["rl/return_before", "before adaptation", { dashed: true }]] },
  { id: "eval-loss", title: "Meta-test loss (evaluations)", series: [
    ["eval/loss", "after adaptation"], ["eval/loss_before", "before adaptation", { dashed: true }]] },
  { id: "eval-accuracy", title: "Meta-test accuracy (evaluations)", series: [
    ["eval/accuracy", "after adaptation"], ["eval/accuracy_before", "before adaptation", { dashed: true }]] },
  { id: "speed", smooth: 0.9, title: "Iterations per second", series: [["perf/iteration_s", "iterations/s"]],
    map: (v) => (v > 0 ? 1 / v : NaN) },
];

export async function jobPage(view, { signal, params: [id] }) {
  let job = await api(`/jobs/${id}`, { signal });
  document.title = `${job.name} · Jobs · maml-service`;
  const head = h("div", {});
  const errorSlot = h("div", {});
  const stream = h("span", { class: "muted", id: "stream-state" }, "connecting…");
  const charts = h("div", { class: "grid2", id: "charts" });
  const cancel = h("button", { type: "button", class: "danger", id: "cancel" }, "Cancel job");
  cancel.addEventListener("click", async () => {
    if (!confirm(`Cancel job ${job.name}? Its last checkpoint stays usable.`)) return;
    cancel.disabled = true;
    try {
      job = await api(`/jobs/${id}/cancel`, { method: "POST", signal });
      render();
    } catch (err) {
      errorSlot.replaceChildren(errorBox(`Cancel failed: ${err.message}`));
      cancel.disabled = false;
    }
  });
  view.append(h("p", {}, h("a", { href: "#/jobs" }, "← Jobs")), head, errorSlot,
    h("h2", {}, "Learning curves ", stream), charts, h("h2", {}, "Spec"), h("pre", { id: "spec" }, JSON.stringify(job.spec, null, 2)));

  const made = new Map();
  live.charts = {};
  function chartFor(name) {
    const def = CHARTS.find((c) => c.series.some(([key]) => key === name));
    if (!def) return null;
    if (!made.has(def.id)) {
      const chart = new LineChart(charts, { title: def.title, smooth: def.smooth || 0 });
      chart.figure.id = `chart-${def.id}`;
      for (const [key, label, options] of def.series) chart.add(key, label, options);
      // Keep the charts in CHARTS order whatever order their metrics arrive in.
      const order = CHARTS.map((c) => c.id);
      for (const other of order.filter((o) => made.has(o) || o === def.id).map((o) => (o === def.id ? chart : made.get(o)))) {
        charts.append(other.figure);
      }
      made.set(def.id, chart);
      live.charts[def.id] = chart;
      signal.addEventListener("abort", () => chart.destroy());
    }
    return [made.get(def.id), def];
  }

  function render() {
    const p = job.progress;
    const active = job.status === "queued" || job.status === "running";
    cancel.disabled = !active || job.cancel_requested;
    cancel.textContent = job.cancel_requested && active ? "Cancelling…" : "Cancel job";
    head.replaceChildren(
      h("h1", {}, job.name, " ", badge(job.status)),
      h("dl", { class: "facts" },
        h("dt", {}, "Id"), h("dd", {}, h("code", {}, job.id)),
        h("dt", {}, "Progress"), h("dd", { id: "progress" },
          h("progress", { max: p.total, value: p.iteration, "aria-label": "progress" }), ` ${p.iteration} / ${p.total}`,
          job.status === "running" && p.eta_s !== null ? ` · ETA ${duration(p.eta_s)}` : ""),
        h("dt", {}, "Algorithm"), h("dd", {}, `${job.spec.algorithm} · ${job.spec.task.family}`),
        h("dt", {}, "Created"), h("dd", {}, when(job.created_at)),
        job.attempts > 1 ? [h("dt", {}, "Attempts"), h("dd", {}, job.attempts)] : null,
        job.model_id ? [h("dt", {}, "Model"), h("dd", {}, h("a", { href: `#/models/${job.model_id}`, id: "model-link" },
          `${short(job.model_id)} — open it in the playground`))] : null),
      h("div", { class: "row" }, cancel));
    errorSlot.replaceChildren(job.status === "failed" && job.error ? errorBox(`Failed: ${job.error}`) : "");
  }
  render();

  follow(`/jobs/${id}/events`, {
    signal,
    onState: (s) => { stream.textContent = s === "live" ? "live" : "reconnecting…"; },
    onEvent: (name, data) => {
      live.events += 1;
      if (name === "metrics") {
        for (const [key, value] of Object.entries(data.metrics)) {
          const found = chartFor(key);
          if (!found || value === null) continue;
          const [chart, def] = found;
          chart.push(key, data.iteration, def.map ? def.map(value) : value);
        }
      } else if (name === "progress") {
        job = { ...job, progress: data };
        render();
      } else if (name === "status") {
        job = { ...job, ...data };
        render();
      } else if (name === "end") {
        job = data;
        render();
        stream.textContent = `ended: ${job.status}`;
      }
    },
  }).catch((err) => { if (err.name !== "AbortError") stream.textContent = `stream failed: ${err.message}`; });
}

// -------------------------------------------------------------------------------------------- sweeps

export async function sweepsPage(view, { signal, query }) {
  document.title = "Sweeps · maml-service";
  const offset = Math.max(0, Number(query.get("offset")) || 0);
  const body = h("div", { id: "sweeps" }, state("Loading sweeps…"));
  view.append(h("h1", {}, "Sweeps"), body);
  async function load() {
    const page = await api(`/sweeps?limit=${PAGE_SIZE}&offset=${offset}`, { signal });
    if (!page.count) {
      body.replaceChildren(state("No sweeps yet. Submit one with `maml sweep spec.yaml` or POST /api/v1/sweeps."));
      return;
    }
    body.replaceChildren(h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", {}, "Status"), h("th", {}, "Trials"),
        h("th", { class: "num" }, "Best metric"), h("th", { class: "hide-narrow" }, "Created"))),
      h("tbody", {}, page.data.map((s) => h("tr", {},
        h("td", {}, h("a", { href: `#/sweeps/${s.id}` }, s.name)), h("td", {}, badge(s.status)),
        h("td", {}, Object.entries(s.counts).map(([k, n]) => `${n} ${k.replace("_", " ")}`).join(", ") || "–"),
        h("td", { class: "num" }, s.best ? `${fmt(s.best.metric)}` : "–"),
        h("td", { class: "hide-narrow" }, when(s.created_at))))))),
    pager(page.count, offset, (o) => setQuery("#/sweeps", { offset: String(o) })));
  }
  await load();
  every(3000, () => load().catch(() => {}), signal);
}

export async function sweepPage(view, { signal, params: [id] }) {
  let sweep = await api(`/sweeps/${id}`, { signal });
  document.title = `${sweep.name} · Sweeps · maml-service`;
  const head = h("div", {});
  const table = h("div", { class: "table-wrap", id: "trials" });
  const charts = h("div", {});
  view.append(h("p", {}, h("a", { href: "#/sweeps" }, "← Sweeps")), head, h("h2", {}, "Trials"), table,
    h("h2", {}, "Curves"), charts, h("p", { class: "muted" },
      "Each trial's sweep metric at its reports (one per evaluation; a long trial's older reports thinned to 200 "
      + "points); × marks a trial the scheduler stopped early."));
  const chart = new LineChart(charts, { title: `${sweep.spec.metric} by trial (${sweep.spec.mode})` });
  chart.figure.id = "chart-trials";
  live.charts = { trials: chart };
  signal.addEventListener("abort", () => chart.destroy());

  function render() {
    head.replaceChildren(h("h1", {}, sweep.name, " ", badge(sweep.status)),
      h("dl", { class: "facts" },
        h("dt", {}, "Metric"), h("dd", {}, `${sweep.spec.metric} (${sweep.spec.mode})`),
        h("dt", {}, "Best trial"), h("dd", {}, sweep.best ? `${sweep.best.trial_id}: ${fmt(sweep.best.metric)}` : "–"),
        sweep.model_id ? [h("dt", {}, "Model"), h("dd", {}, h("a", { href: `#/models/${sweep.model_id}` }, short(sweep.model_id)))] : null),
      sweep.error ? errorBox(sweep.error) : "");
    const keys = [...new Set(sweep.trials.flatMap((t) => Object.keys(t.config)))];
    table.replaceChildren(sweep.trials.length ? h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "Trial"), keys.map((k) => h("th", {}, k)), h("th", {}, "Status"),
        h("th", { class: "num" }, "Iteration"), h("th", { class: "num" }, "Metric"), h("th", { class: "num" }, "Best"))),
      h("tbody", {}, sweep.trials.map((t) => h("tr", { class: sweep.best?.trial_id === t.trial_id ? "best" : "" },
        h("td", {}, h("code", {}, t.trial_id)), keys.map((k) => h("td", {}, fmt(t.config[k]) === "–" ? String(t.config[k] ?? "–") : fmt(t.config[k]))),
        h("td", {}, badge(t.status), t.error ? h("div", { class: "muted" }, t.error) : ""),
        h("td", { class: "num" }, `${t.iteration}/${t.total_iterations}`),
        h("td", { class: "num" }, fmt(t.metric)), h("td", { class: "num" }, fmt(t.best_metric))))))
      : state("No trials yet."));
    for (const t of sweep.trials) {
      // The stored history first (only its points past what the chart has: each event carries it
      // all), then the latest report, which also replaces the points after a replay from a checkpoint.
      const drawn = chart.series.get(t.trial_id)?.last?.x ?? -Infinity;
      for (const [x, y] of t.history || []) if (x > drawn && y !== null) chart.push(t.trial_id, x, y, t.trial_id);
      if (t.metric !== null && t.iteration > 0) chart.push(t.trial_id, t.iteration, t.metric, t.trial_id);
      if (t.status === "stopped_early") chart.cut(t.trial_id, `stopped early at ${t.iteration}`);
    }
  }
  render();
  follow(`/sweeps/${id}/events`, {
    signal,
    onEvent: (name, data) => {
      live.events += 1;
      if (name === "trials") sweep = { ...sweep, trials: data.trials, counts: data.counts };
      else if (name === "status") sweep = { ...sweep, ...data };
      else if (name === "end") sweep = data;
      render();
    },
  }).catch(() => {});
}

// -------------------------------------------------------------------------------------------- models

const source = (m) => (m.job_id ? h("a", { href: `#/jobs/${m.job_id}` }, `job ${short(m.job_id)}`)
  : m.sweep_id ? h("a", { href: `#/sweeps/${m.sweep_id}` }, `sweep ${short(m.sweep_id)}`) : "–");

function metricText(m, name) {
  const v = m.eval_metrics[`eval/${name}`];
  const ci = m.eval_metrics[`eval/${name}_ci95`];
  if (v === undefined || v === null) return "–";
  return name === "accuracy" ? `${(100 * v).toFixed(1)}%${ci ? ` ± ${(100 * ci).toFixed(1)}` : ""}`
    : `${fmt(v)}${ci ? ` ± ${fmt(ci)}` : ""}`;
}

export async function modelsPage(view, { signal, query }) {
  document.title = "Models · maml-service";
  const offset = Math.max(0, Number(query.get("offset")) || 0);
  const page = await api(`/models?limit=${PAGE_SIZE}&offset=${offset}`, { signal });
  view.append(h("h1", {}, "Models"));
  if (!page.count) {
    view.append(state("No models yet: a job that succeeds registers its model here."));
    return;
  }
  view.append(h("div", { class: "table-wrap" }, h("table", { id: "models-table" },
    h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", {}, "Kind"), h("th", {}, "Source"),
      h("th", { class: "num" }, "Meta-test loss"), h("th", { class: "num" }, "Meta-test accuracy"),
      h("th", { class: "hide-narrow" }, "Created"), h("th", {}, "Weights"))),
    h("tbody", {}, page.data.map((m) => h("tr", { dataset: { id: m.id } },
      h("td", {}, h("a", { href: `#/models/${m.id}` }, m.name)), h("td", {}, m.kind.replace("_", " ")),
      h("td", {}, source(m)), h("td", { class: "num" }, metricText(m, "loss")),
      h("td", { class: "num" }, metricText(m, "accuracy")), h("td", { class: "hide-narrow" }, when(m.created_at)),
      h("td", {}, h("button", { type: "button", class: "link", onclick: () => download(`/models/${m.id}/weights`, `${m.id}.safetensors`) },
        "safetensors"))))))),
  pager(page.count, offset, (o) => setQuery("#/models", { offset: String(o) })));
}

export async function modelPage(view, { signal, params: [id] }) {
  const model = await api(`/models/${id}`, { signal });
  document.title = `${model.name} · Models · maml-service`;
  view.append(h("p", {}, h("a", { href: "#/models" }, "← Models")),
    h("h1", {}, model.name),
    h("dl", { class: "facts" },
      h("dt", {}, "Id"), h("dd", {}, h("code", {}, model.id)),
      h("dt", {}, "Kind"), h("dd", {}, `${model.kind.replace("_", " ")} · ${model.spec.task.family} · input ${model.input_shape.join("×")} · ${model.output_dim} outputs`),
      h("dt", {}, "Source"), h("dd", {}, source(model)),
      h("dt", {}, "Meta-test"), h("dd", {}, `loss ${metricText(model, "loss")}`,
        model.kind === "classification" ? `, accuracy ${metricText(model, "accuracy")}` : ""),
      h("dt", {}, "Weights"), h("dd", {}, h("button", { type: "button", class: "link", id: "download",
        onclick: () => download(`/models/${id}/weights`, `${id}.safetensors`) }, "download safetensors"))),
    h("h2", {}, "Adaptation playground"));
  playground(view, model, { signal });
}

// -------------------------------------------------------------------------------------------- submit

export async function submitPage(view, { signal }) {
  document.title = "Submit · maml-service";
  const editor = h("textarea", { class: "spec", id: "spec-editor", spellcheck: "false", "aria-describedby": "spec-help" });
  const result = h("div", { id: "submit-result", "aria-live": "polite" });
  const use = (name) => {
    editor.value = JSON.stringify(PRESETS[name].spec, null, 2);
    result.replaceChildren();
  };
  const presets = h("div", { class: "row", role: "group", "aria-label": "Presets" }, "Presets:",
    Object.entries(PRESETS).map(([name, p]) => h("button", { type: "button", class: "secondary", dataset: { preset: name },
      onclick: () => use(name) }, p.label)));
  const submit = h("button", { type: "submit", id: "submit" }, "Submit job");
  const form = h("form", { id: "submit-form" }, presets,
    h("p", { id: "spec-help", class: "muted" }, "The job spec as JSON (the same document as `maml submit`'s spec file). ",
      "The server validates it and names every field it refuses."),
    h("label", { for: "spec-editor", class: "visually-hidden" }, "Job spec (JSON)"), editor,
    h("div", { class: "row" }, submit), result);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    let spec;
    try {
      spec = JSON.parse(editor.value);
    } catch (err) {
      result.replaceChildren(errorBox(`Not valid JSON: ${err.message}`));
      return;
    }
    submit.disabled = true;
    try {
      const job = await api("/jobs", { method: "POST", body: spec, signal });
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
      const errors = validationErrors(err.detail);
      result.replaceChildren(err.status === 422 && errors.length
        ? h("div", { class: "error", role: "alert" }, `The server refused the spec (${errors.length} error${errors.length > 1 ? "s" : ""}):`,
          h("ul", { class: "errors" }, errors.map((e) => h("li", {}, h("code", {}, e.field || "spec"), ": ", e.message))))
        : errorBox(`${err.status === 429 || err.status === 403 ? "Over a quota" : "Refused"} (${err.status}): ${err.message}`));
    } finally {
      submit.disabled = false;
    }
  });
  view.append(h("h1", {}, "Submit a job"), form);
  use("sinusoid");
}

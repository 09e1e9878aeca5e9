// Building the DOM without innerHTML for data: names, errors and specs come from users.

/** `h("a", {href: "#/jobs", class: "x", onclick: fn}, "text", child, ...)` */
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (value === true) node.setAttribute(key, "");
    else node.setAttribute(key, value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

export const badge = (status) => h("span", { class: `badge s-${status}`, "data-status": status }, status.replace("_", " "));

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export function when(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

export const short = (id) => (id ? id.slice(0, 8) : "–");

/** The empty, loading and error states, one look each. */
export const state = (text, ...more) => h("div", { class: "state", role: "status" }, text, ...more);
export const errorBox = (text) => h("div", { class: "error", role: "alert" }, text);

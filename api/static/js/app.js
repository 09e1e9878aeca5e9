// The dashboard's shell: sign-in, the hash router, the offline and signed-out states.
// Plain ES modules served by the service itself (api/routes/ui.py); no build step, nothing from a CDN.

import { ApiError, auth, checkKey, onAuthOrNetworkError } from "./api.js";
import { errorBox, h } from "./dom.js";
import * as pages from "./pages.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const banner = document.getElementById("banner");
const signOut = document.getElementById("sign-out");
let current = null;  // the page's AbortController: leaving a page closes its streams and timers

const routes = [
  [/^#\/jobs\/([\w-]+)$/, pages.jobPage],
  [/^#\/jobs$/, pages.jobsPage],
  [/^#\/sweeps\/([\w-]+)$/, pages.sweepPage],
  [/^#\/sweeps$/, pages.sweepsPage],
  [/^#\/models\/([\w-]+)$/, pages.modelPage],
  [/^#\/models$/, pages.modelsPage],
  [/^#\/submit$/, pages.submitPage],
];

function showBanner(text) {
  banner.replaceChildren(text, " ", h("button", { type: "button", class: "link", onclick: () => route() }, "Retry"));
  banner.hidden = false;
}

onAuthOrNetworkError((error) => {
  if (error.rejected) {
    auth.clear();
    signInPage("Your API key was rejected (401): it may have been revoked. Sign in again.");
  } else if (error.unreachable) {
    showBanner("The service is unreachable. Check that it is running; the page retries when you ask.");
  }
});

function signInPage(message) {
  current?.abort();
  current = null;
  nav.hidden = true;
  signOut.hidden = true;
  document.title = "Sign in · maml-service";
  const input = h("input", { type: "password", id: "api-key", name: "api-key", autocomplete: "current-password",
    required: true, placeholder: "the secret of `maml create-key`", "aria-describedby": "key-help" });
  const status = h("div", { id: "signin-status", "aria-live": "assertive" }, message ? errorBox(message) : null);
  const form = h("form", { class: "card signin", id: "signin" },
    h("h1", {}, "Sign in"),
    h("p", { id: "key-help", class: "muted" },
      "Your API key is kept in this tab's session storage only and sent as a bearer token, never in a URL."),
    h("p", {}, h("label", { for: "api-key", style: "display:block" }, "API key"), input),
    h("div", { class: "row" }, h("button", { type: "submit" }, "Sign in")),
    status);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    status.replaceChildren(h("p", { class: "muted" }, "Checking the key…"));
    try {
      await checkKey(key);
    } catch (err) {
      const text = err instanceof ApiError && err.rejected ? `Key rejected: ${err.message}`
        : err instanceof ApiError && err.unreachable ? "The service is unreachable: is it running?"
          : `Sign-in failed: ${err.message}`;
      status.replaceChildren(errorBox(text));
      input.focus();
      return;
    }
    auth.set(key);
    banner.hidden = true;
    if (!location.hash || location.hash === "#/signin") location.hash = "#/jobs";
    else route();
  });
  main.replaceChildren(form);
  input.focus();
}

async function route() {
  banner.hidden = true;
  if (!auth.get()) { signInPage(); return; }
  nav.hidden = false;
  signOut.hidden = false;
  if (!location.hash || location.hash === "#/" || location.hash === "#/signin") { location.replace("#/jobs"); return; }
  const hash = location.hash.split("?")[0];
  for (const a of nav.querySelectorAll("a")) {
    a.toggleAttribute("aria-current", hash.startsWith(a.getAttribute("href")));
    if (a.hasAttribute("aria-current")) a.setAttribute("aria-current", "page");
  }
  current?.abort();
  current = new AbortController();
  const match = routes.map(([re, page]) => [hash.match(re), page]).find(([m]) => m);
  const view = h("div", { id: "view" });
  main.replaceChildren(view);
  if (!match) { view.append(errorBox(`No page at ${hash}.`)); return; }
  const [m, page] = match;
  try {
    await page(view, { signal: current.signal, params: m.slice(1), query: new URLSearchParams(location.hash.split("?")[1] || "") });
  } catch (err) {
    if (err.name === "AbortError") return;
    if (err instanceof ApiError && err.rejected) return;  // the sign-in page is up
    view.replaceChildren(errorBox(err instanceof ApiError && err.unreachable
      ? "The service is unreachable. Check that it is running, then retry."
      : `Could not load this page: ${err.message}`));
  }
}

signOut.addEventListener("click", () => { auth.clear(); location.hash = "#/signin"; signInPage(); });
window.addEventListener("hashchange", route);
route();

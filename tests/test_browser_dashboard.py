"""The dashboard in a real browser: Playwright drives Debian's Chromium (/usr/bin/chromium) against a real
``maml serve`` (uvicorn, embedded Ray, SQLite) in a subprocess. The flows of issue 14: sign in, a rejected key,
an unreachable service, submit a sinusoid job from the form and watch its curve grow, the 422's field messages,
cancel a job, adapt in the sinusoid playground (one every-step query), draw on Omniglot canvases (a model trained
here on the real Omniglot) and get a prediction, click a goal in the nav2d playground and see the paths, a second
tenant who sees none of the first one's things, a phone-width page.

Screenshots of every page go to tests/artifacts/ (git-ignored). Without /usr/bin/chromium every test here is
skipped with a loud reason; CI (.ci/run) installs Debian's chromium first, so there they always run.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cluster import maml_serve_argv, serve

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
ADMIN = "browser-admin-token-8d2e6f1a9c"
pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.data,
              pytest.mark.skipif(not CHROMIUM.exists(), reason=(
                  "NOT RUN: the dashboard's browser tests need Chromium at /usr/bin/chromium "
                  "(`apt-get install -y chromium`; .ci/run installs it)"))]
playwright_api = pytest.importorskip("playwright.sync_api")

SINE_FORM = ('{"name": "ui-sine", "task": {"family": "sinusoid", "shots": 10, "queries": 10}, '
             '"model": {"name": "mlp", "hidden": [40, 40]}, "outer": {"iterations": 5000, "meta_batch_size": 4}, '
             '"eval": {"every": 1000, "tasks": 5, "steps": 5}}')
OMNIGLOT_TINY = {"name": "omni-tiny", "task": {"family": "omniglot", "ways": 5, "shots": 1, "queries": 1},
                 "model": {"name": "conv4", "filters": 8}, "inner": {"steps": 1, "lr": 0.4},
                 "outer": {"iterations": 20, "meta_batch_size": 4}, "eval": {"every": 20, "tasks": 4, "steps": 3}}

NAV2D_TINY = {"name": "nav-tiny", "task": {"family": "nav2d", "rollouts": 4, "horizon": 20}, "model": {"name": "mlp"},
              "inner": {"steps": 1}, "outer": {"iterations": 2, "meta_batch_size": 2},
              "eval": {"every": 2, "tasks": 2, "steps": 1}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, omniglot_root: Path) -> Iterator[str]:
    """``maml serve`` with its embedded Ray cluster, on a fresh data dir, reading the real Omniglot."""
    root = tmp_path_factory.mktemp("dashboard")
    env = {**os.environ, "MAML_ADMIN_TOKEN": ADMIN, "MAML_RAY_NUM_CPUS": "2", "MAML_METRICS_FLUSH_S": "0.2",
           "MAML_DATA_ROOT": str(omniglot_root), "MAML_DATA_ROOTS": str(omniglot_root), "RAY_ADDRESS": ""}
    for name in ("DATABASE_URL", "MAML_DATABASE_URL", "MAML_DATA_DIR"):
        env.pop(name, None)
    with serve(env, root / "server.log", maml_serve_argv(root / "data")) as base:
        yield base


def _key(server: str, tenant: str) -> str:
    r = httpx.post(f"{server}/api/v1/keys", json={"tenant": tenant}, headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 201, r.text
    return r.json()["secret"]


def _api(server: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=f"{server}/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=30)


def _wait(api: httpx.Client, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while (job := api.get(f"/jobs/{job_id}").json())["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    return job


@pytest.fixture(scope="module")
def acme(server: str) -> str:
    return _key(server, "acme")


@pytest.fixture(scope="module")
def models(server: str, acme: str) -> dict[str, str]:
    """A sinusoid model, an Omniglot Conv4 (on the real Omniglot) and a nav2d policy trained by the server."""
    out = {}
    with _api(server, acme) as api:
        sine = api.post("/jobs", json={"name": "sine-model", "outer": {"iterations": 200, "meta_batch_size": 4},
                                       "eval": {"every": 100, "tasks": 5, "steps": 5}})
        assert sine.status_code == 201, sine.text
        omni = api.post("/jobs", json=OMNIGLOT_TINY)
        assert omni.status_code == 201, omni.text
        nav = api.post("/jobs", json=NAV2D_TINY)
        assert nav.status_code == 201, nav.text
        for name, r in (("sine", sine), ("omniglot", omni), ("nav2d", nav)):
            job = _wait(api, r.json()["id"])
            assert job["status"] == "succeeded", job["error"]
            out[name] = job["model_id"]
    return out


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, request: pytest.FixtureRequest):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_default_timeout(30_000)
    yield page
    page.screenshot(path=str(ARTIFACTS / f"last-{request.node.name}.png"), full_page=True)  # as the test left it
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=True)


def until(page, expression: str, timeout: float = 30.0) -> None:
    """Poll ``expression`` in the page until it is truthy (page.evaluate: the page's CSP, which forbids
    eval, would refuse wait_for_function's string predicates)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"still false after {timeout} s: {expression}"
        time.sleep(0.1)


def shows(page, selector: str, text: str, timeout: float = 30.0) -> None:
    """Wait until the element's text contains ``text`` (a page first shows its loading state)."""
    until(page, f"(document.querySelector({json.dumps(selector)})?.innerText || '').includes({json.dumps(text)})",
          timeout)


def sign_in(page, server: str, key: str) -> None:
    page.goto(f"{server}/")
    page.fill("#api-key", key)
    page.click("#signin button[type=submit]")
    page.wait_for_selector("#jobs .state, #jobs-table")


# ------------------------------------------------------------------------------------------- the flows


def test_a_wrong_key_shows_the_error_state_and_no_key_travels_in_a_url(page, server: str) -> None:
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    page.goto(f"{server}/")
    shot(page, "signin")
    page.fill("#api-key", "not-a-key-of-this-service")
    page.click("#signin button[type=submit]")
    error = page.wait_for_selector("#signin-status .error")
    assert "Key rejected" in error.inner_text() and "unknown or revoked" in error.inner_text()
    assert page.evaluate("sessionStorage.getItem('maml.apiKey')") is None
    assert page.is_hidden("#nav")
    shot(page, "signin-rejected")
    assert not any("not-a-key" in url for url in urls), urls


def test_an_unreachable_service_shows_its_state(page, server: str, acme: str) -> None:
    sign_in(page, server, acme)
    page.route("**/api/v1/**", lambda route: route.abort("connectionrefused"))  # the network, not the server
    page.goto(f"{server}/#/models")
    page.wait_for_selector("#banner:not([hidden])")
    assert "unreachable" in page.inner_text("#banner")
    shows(page, "#view", "unreachable")
    shot(page, "unreachable")
    page.unroute("**/api/v1/**")
    page.click("#banner button")  # Retry
    page.wait_for_selector("#models-table, #view .state")


def test_sign_in_submit_from_the_form_and_watch_the_curve_grow(page, server: str) -> None:
    key = _key(server, "submitter")
    sign_in(page, server, key)
    shows(page, "#jobs", "No jobs yet")
    shot(page, "jobs-empty")
    assert page.evaluate("sessionStorage.getItem('maml.apiKey')") == key
    page.click("nav a[href='#/submit']")
    page.wait_for_selector("#spec-editor")
    assert '"family": "sinusoid"' in page.input_value("#spec-editor")  # the paper's preset
    page.click("button[data-preset=omniglot]")
    assert '"ways": 5' in page.input_value("#spec-editor")
    # The schema's messages, by field, from the 422.
    page.fill("#spec-editor", '{"name": "bad", "task": {"family": "sinusoid", "shots": 0}, "outer": {"iterations": 0}}')
    page.click("#submit")
    errors = page.wait_for_selector("#submit-result .error")
    text = errors.inner_text()
    assert "task.sinusoid.shots" in text and "outer.iterations" in text and "greater than or equal to 1" in text
    shot(page, "submit-422")

    page.fill("#spec-editor", SINE_FORM)
    page.click("#submit")
    page.wait_for_url("**/#/jobs/*")
    job_id = page.url.rsplit("/", 1)[1]
    page.wait_for_selector("#chart-loss")
    # The curve grows while the job trains: more points later than at first, fed by the event stream.
    until(page, "window.mamlDashboard.charts.loss && window.mamlDashboard.charts.loss.storedPoints >= 20")
    first = page.evaluate("window.mamlDashboard.charts.loss.series.get('meta/loss').xs.at(-1)")
    assert first < 4000, f"the job was nearly done ({first} of 5000) before its page showed a curve"
    until(page, f"window.mamlDashboard.charts.loss.series.get('meta/loss').xs.at(-1) > {first + 50}")
    shot(page, "job-running")
    page.wait_for_selector(".badge[data-status=succeeded]", timeout=240_000)
    until(page, "window.mamlDashboard.charts.loss.series.get('meta/loss').xs.at(-1) === 5000")
    until(page, "document.getElementById('stream-state').textContent === 'ended: succeeded'")  # the end event
    summary = page.inner_text("#chart-loss .chart-summary")
    assert "after adaptation" in summary and "at iteration 5000" in summary
    assert page.is_visible("#chart-eval-loss") and page.is_visible("#chart-speed")
    assert page.is_disabled("#cancel")
    with _api(server, key) as api:
        assert api.get(f"/jobs/{job_id}").json()["status"] == "succeeded"
    shot(page, "job")
    page.click("nav a[href='#/jobs']")
    page.wait_for_selector(f"#jobs-table tr[data-id='{job_id}'] .badge[data-status=succeeded]")
    page.select_option("#status-filter", "running")
    page.wait_for_selector("#jobs .state")
    shows(page, "#jobs", "No running jobs")
    page.select_option("#status-filter", "succeeded")
    page.wait_for_selector(f"#jobs-table tr[data-id='{job_id}']")


def test_cancel_a_job(page, server: str, acme: str) -> None:
    with _api(server, acme) as api:
        job = api.post("/jobs", json={"name": "long", "outer": {"iterations": 200_000, "meta_batch_size": 4}}).json()
    sign_in(page, server, acme)
    page.goto(f"{server}/#/jobs/{job['id']}")
    page.wait_for_selector(".badge[data-status=running]", timeout=120_000)
    until(page, "window.mamlDashboard.charts.loss && window.mamlDashboard.charts.loss.storedPoints > 0")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#cancel")
    page.wait_for_selector(".badge[data-status=cancelled]", timeout=60_000)
    until(page, "document.getElementById('stream-state').textContent === 'ended: cancelled'")
    shot(page, "job-cancelled")
    with _api(server, acme) as api:
        after = api.get(f"/jobs/{job['id']}").json()
    assert after["status"] == "cancelled" and after["progress"]["iteration"] < 200_000


def test_adapt_in_the_sinusoid_playground(page, server: str, acme: str, models: dict[str, str]) -> None:
    sign_in(page, server, acme)
    page.click("nav a[href='#/models']")
    page.wait_for_selector(f"#models-table tr[data-id='{models['sine']}']")
    shot(page, "models")
    page.click(f"#models-table tr[data-id='{models['sine']}'] a")
    page.wait_for_selector("#sine-plane")
    # Click the plane to place points (on a sine of amplitude 3), then type one with the keyboard.
    box = page.locator("#sine-plane").bounding_box()
    for x in (-4.0, -2.5, -1.0, 0.5, 2.0, 3.5):
        y = 3.0 * math.sin(x)
        page.mouse.click(box["x"] + (x + 5) / 10 * box["width"], box["y"] + (6 - y) / 12 * box["height"])
    page.fill("#point-x", "4.5")
    page.fill("#point-y", "-2.9")
    page.focus("#add-point")
    page.keyboard.press("Enter")
    assert page.inner_text("#point-count") == "7 points"
    assert page.locator("#sine-plane circle.support").count() == 7
    page.fill("#sine-steps", "5")
    adapt_posts: list[dict] = []
    page.on("request", lambda r: adapt_posts.append(r.post_data_json)
            if r.method == "POST" and r.url.endswith(f"/models/{models['sine']}/adapt") else None)
    page.click("#adapt")
    loss = page.wait_for_selector("#sine-loss")
    # One query (every_step) draws the curve before adapting, one per intermediate step, and the last.
    assert len(adapt_posts) == 1 and adapt_posts[0]["every_step"] is True and adapt_posts[0]["steps"] == 5
    assert page.locator("#sine-plane polyline.before").count() == 1
    assert page.locator("#sine-plane polyline.step").count() == 4
    assert [page.locator("#sine-plane polyline.step").nth(i).get_attribute("data-step") for i in range(4)] == [
        "1", "2", "3", "4"]
    assert page.locator("#sine-plane polyline.after").count() == 1
    assert page.inner_text("#sine-step-losses").count(":") == 7  # "...each step:" and steps 0..5
    before, after = [float(v) for v in re.findall(r"loss ([\d.]+) before adapting → ([\d.]+)",
                                                                 loss.inner_text())[0]]
    assert after < before
    shot(page, "playground-sinusoid")


def test_nav2d_playground_draws_the_paths(page, server: str, acme: str, models: dict[str, str]) -> None:
    sign_in(page, server, acme)
    page.goto(f"{server}/#/models/{models['nav2d']}")
    page.wait_for_selector("#nav-plane")
    box = page.locator("#nav-plane").bounding_box()
    page.mouse.click(box["x"] + 0.8 * box["width"], box["y"] + 0.3 * box["height"])  # the goal (0.3, 0.2)
    assert float(page.input_value("#goal-x")) == pytest.approx(0.3, abs=0.01)
    assert float(page.input_value("#goal-y")) == pytest.approx(0.2, abs=0.01)
    page.fill("#nav-steps", "2")
    page.fill("#nav-paths-count", "3")
    page.click("#adapt")
    page.wait_for_selector("#nav-returns")
    # 3 paths for each of the step counts 0, 1, 2, a legend entry per step count, the goal drawn.
    assert page.locator("#nav-plane polyline.trajectory").count() == 9
    assert [page.locator(f"#nav-plane polyline.trajectory[data-step='{k}']").count() for k in range(3)] == [3, 3, 3]
    assert page.locator("#nav-legend li").count() == 3
    colours = {page.locator(f"#nav-plane polyline.trajectory[data-step='{k}']").first.get_attribute("stroke")
               for k in range(3)}
    assert len(colours) == 3
    assert page.locator("#goal").get_attribute("visibility") == "visible"
    assert "none are drawn" not in page.inner_text("#nav-result")
    shot(page, "playground-nav2d")


def _stroke(page, selector: str, points: list[tuple[float, float]]) -> None:
    page.locator(selector).scroll_into_view_if_needed()
    box = page.locator(selector).bounding_box()
    at = [(box["x"] + px * box["width"], box["y"] + py * box["height"]) for px, py in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for x, y in at[1:]:
        page.mouse.move(x, y, steps=6)
    page.mouse.up()


SHAPES = [  # five characters drawn as strokes in the canvas' unit square
    [(0.5, 0.15), (0.5, 0.85)],
    [(0.15, 0.5), (0.85, 0.5)],
    [(0.2, 0.2), (0.8, 0.8)],
    [(0.2, 0.2), (0.8, 0.2), (0.8, 0.8), (0.2, 0.8), (0.2, 0.2)],
    [(0.2, 0.8), (0.5, 0.2), (0.8, 0.8)],
]


def test_draw_on_the_omniglot_canvases_and_get_a_prediction(page, server: str, acme: str,
                                                            models: dict[str, str]) -> None:
    sign_in(page, server, acme)
    page.goto(f"{server}/#/models/{models['omniglot']}")
    page.wait_for_selector("#support-0-0")
    assert page.locator("canvas.draw").count() == 6  # 5 ways x 1 shot, and the query
    page.click("#predict")  # nothing drawn yet: says so, sends nothing
    assert "still empty" in page.wait_for_selector("#image-result .error").inner_text()
    for c, shape in enumerate(SHAPES):
        _stroke(page, f"#support-{c}-0", shape)
    _stroke(page, "#query", SHAPES[3])
    page.click("#predict")
    page.wait_for_selector("#prediction")
    bars = page.locator("#probabilities li")
    assert bars.count() == 5
    percents = [float(t.rstrip("%")) for t in page.locator("#probabilities .num").all_inner_texts()]
    assert abs(sum(percents) - 100) < 1
    predicted = int(page.inner_text("#prediction strong").split()[-1])
    assert percents[predicted] == max(percents)
    before, after = [float(v) for v in re.findall(r"loss ([\d.]+) before adapting → ([\d.]+)",
                                                                 page.inner_text("#image-loss"))[0]]
    assert after < before  # 3 steps on the drawn support set
    shot(page, "playground-omniglot")


def test_a_sweeps_trials_live_with_the_early_stopped_one_cut(page, server: str, acme: str) -> None:
    # One trial at a time: the good learning rate reaches ASHA's rungs first, so the bad one is stopped early.
    sweep = {"name": "lr-sweep", "base": {"outer": {"iterations": 8, "meta_batch_size": 5},
                                          "eval": {"every": 1, "tasks": 20, "steps": 5}, "checkpoint": {"every": 4}},
             "space": {"outer.lr": {"grid": [0.001, 0.1]}}, "metric": "eval/loss", "mode": "min",
             "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2}, "num_samples": 1,
             "max_concurrent_trials": 1}
    with _api(server, acme) as api:
        r = api.post("/sweeps", json=sweep)
        assert r.status_code == 201, r.text
        sweep_id = r.json()["id"]
    sign_in(page, server, acme)
    page.click("nav a[href='#/sweeps']")
    page.click(f"#sweeps a[href='#/sweeps/{sweep_id}']")
    page.wait_for_selector("#trials table tbody tr", timeout=120_000)
    page.wait_for_selector("h1 .badge[data-status=succeeded]", timeout=240_000)
    rows = page.locator("#trials tbody tr")
    assert rows.count() == 2
    best = page.locator("#trials tbody tr.best")
    assert best.count() == 1 and "0.001" in best.inner_text() and "completed" in best.inner_text()
    with _api(server, acme) as api:
        final = api.get(f"/sweeps/{sweep_id}").json()
    assert page.get_attribute("a[href^='#/models/']", "href") == f"#/models/{final['model_id']}"
    stopped = [t for t in final["trials"] if t["status"] == "stopped_early"]
    assert stopped, final["counts"]
    # The chart redraws at the next animation frame after the event that ended the sweep.
    until(page, f"document.querySelectorAll('#chart-trials path.cut').length === {len(stopped)}")
    shows(page, "#chart-trials .legend", f"stopped early at {stopped[0]['iteration']}")
    shot(page, "sweep")

    # Opened again after the end, the chart draws each trial's stored history, not only its last report.
    page.click("nav a[href='#/sweeps']")
    page.click(f"#sweeps a[href='#/sweeps/{sweep_id}']")
    until(page, "window.mamlDashboard.charts.trials && window.mamlDashboard.charts.trials.series.size === 2")
    drawn = page.evaluate("Object.fromEntries([...window.mamlDashboard.charts.trials.series]"
                          ".map(([key, s]) => [key, s.xs.length]))")
    assert drawn == {t["trial_id"]: sum(v is not None for _, v in t["history"]) for t in final["trials"]}
    assert drawn[final["best"]["trial_id"]] == 8  # eval every iteration: one point per report
    until(page, f"document.querySelectorAll('#chart-trials path.cut').length === {len(stopped)}")


def test_a_second_tenant_sees_none_of_the_first_tenants_things(page, server: str, acme: str,
                                                               models: dict[str, str]) -> None:
    with _api(server, acme) as api:
        assert api.get("/jobs").json()["count"] >= 2
    other = _key(server, "other-tenant")
    sign_in(page, server, other)
    shows(page, "#jobs", "No jobs yet")
    assert page.locator("#jobs-table").count() == 0
    page.click("nav a[href='#/models']")
    page.wait_for_selector("#view .state")
    shows(page, "#view", "No models yet")
    page.click("nav a[href='#/sweeps']")
    page.wait_for_selector("#sweeps .state")
    shot(page, "sweeps-empty")
    page.goto(f"{server}/#/models/{models['sine']}")  # another tenant's id: not found, as in the API
    error = page.wait_for_selector("#view .error")
    assert "not found" in error.inner_text().lower()


def test_phone_width_and_keyboard(browser, server: str, acme: str, models: dict[str, str]) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    try:
        page.goto(f"{server}/")
        page.keyboard.press("Tab")  # the skip link, then the key field
        page.focus("#api-key")
        page.keyboard.type(acme)
        page.keyboard.press("Enter")
        page.wait_for_selector("#jobs-table")
        # Nothing wider than the screen but the table's own scroller.
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        shot(page, "jobs-phone")
        page.goto(f"{server}/#/models/{models['sine']}")
        page.wait_for_selector("#sine-plane")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        shot(page, "playground-phone")
    finally:
        context.close()

"""Jobs through the app against a real database (SQLite and PostgreSQL): submit, follow, register, adapt, list, cancel,
refuse bad specs, keep tenants apart, refuse large bodies."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import SMALL_SINE, make_app, make_image_folder, make_settings, submit, wait_for_job
from safetensors.torch import load as load_safetensors

API = "/api/v1"
pytestmark = pytest.mark.usefixtures("database")  # each test on SQLite and on PostgreSQL


def sine_query(amplitude: float = 2.0, phase: float = 0.5, k: int = 10, q: int = 5) -> dict:
    rng = np.random.default_rng(1)
    xs, xq = rng.uniform(-5, 5, size=k), rng.uniform(-5, 5, size=q)
    return {"support": {"x": [[float(x)] for x in xs], "y": [[float(amplitude * math.sin(x - phase))] for x in xs]},
            "query": {"x": [[float(x)] for x in xq]}}


def test_sinusoid_job_trains_registers_and_adapts(client: TestClient, admin_headers, tenant_key) -> None:
    headers = tenant_key("acme")
    job = submit(client, headers)
    assert job["status"] == "queued" and job["tenant"] == "acme"
    assert job["progress"] == {"iteration": 0, "total": 60, "eta_s": None}
    assert job["spec"]["outer"]["iterations"] == 60 and job["spec"]["inner"]["lr"] == 0.01  # defaults filled

    # Live events until the job ends: statuses in order, progress, metric points, then "end".
    events: list[tuple[str, dict]] = []
    with client.stream("GET", f"{API}/jobs/{job['id']}/events", headers=headers) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and name:
                events.append((name, json.loads(line.split(":", 1)[1])))
    statuses = [data["status"] for name, data in events if name == "status"]
    assert statuses[-1] == "succeeded" and statuses.index("succeeded") > 0
    assert events[-1][0] == "end" and events[-1][1]["status"] == "succeeded"
    assert any(name == "progress" for name, _ in events)
    streamed = [data["iteration"] for name, data in events if name == "metrics"]
    assert streamed == list(range(1, 61))

    done = wait_for_job(client, job["id"], headers)
    assert done["status"] == "succeeded", done["error"]
    assert done["progress"]["iteration"] == 60 and done["attempts"] == 1
    assert done["finished_at"] is not None and done["model_id"]
    assert "eval/loss" in done["metrics"]

    series = client.get(f"{API}/jobs/{job['id']}/metrics", headers=headers).json()
    assert series["count"] == 60
    assert [p["iteration"] for p in series["data"]] == list(range(1, 61))
    assert all("meta/loss" in p["metrics"] for p in series["data"])
    evals = [p["iteration"] for p in series["data"] if "eval/loss" in p["metrics"]]
    assert evals == [30, 60]
    later = client.get(f"{API}/jobs/{job['id']}/metrics", params={"since": 50, "limit": 3}, headers=headers).json()
    assert [p["iteration"] for p in later["data"]] == [51, 52, 53] and later["count"] == 10
    beyond = client.get(f"{API}/jobs/{job['id']}/metrics", params={"since": 2**40}, headers=headers)
    assert beyond.status_code == 200 and beyond.json() == {"data": [], "count": 0}  # past a 32-bit column

    model = client.get(f"{API}/models/{done['model_id']}", headers=headers).json()
    assert model["job_id"] == job["id"] and model["tenant"] == "acme" and model["kind"] == "regression"
    assert model["input_shape"] == [1] and model["output_dim"] == 1 and model["iteration"] == 60
    assert "eval/loss" in model["eval_metrics"]
    listed = client.get(f"{API}/models", headers=headers).json()
    assert listed["count"] == 1 and listed["data"][0]["id"] == model["id"]

    weights = client.get(f"{API}/models/{model['id']}/weights", headers=headers)
    assert weights.status_code == 200
    tensors = load_safetensors(weights.content)
    assert tensors["net.0.weight"].shape == (40, 1)

    query = sine_query()
    r = client.post(f"{API}/models/{model['id']}/adapt", json={**query, "return_weights": True}, headers=headers)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["steps"] == 10 and out["lr"] == 0.01  # the model's eval.steps and inner.lr
    assert out["support_loss_after"] < out["support_loss_before"]
    assert len(out["predictions"]) == 5 and all(len(p) == 1 for p in out["predictions"])
    assert out["probabilities"] is None
    adapted = client.get(f"{API}/adapted/{out['adapted_id']}/weights", headers=headers)
    assert adapted.status_code == 200
    assert set(load_safetensors(adapted.content)) == set(tensors)

    # More steps adapt further; explicit steps and lr override the model's.
    r = client.post(f"{API}/models/{model['id']}/adapt", json={**query, "steps": 50, "lr": 0.02}, headers=headers)
    assert r.status_code == 200 and r.json()["steps"] == 50
    assert r.json()["support_loss_after"] < out["support_loss_after"]


def test_queue_list_filters_paging_and_cancel(client: TestClient, tenant_key) -> None:
    headers = tenant_key("acme")
    # One slot: a long job runs, the next ones wait behind it.
    long = submit(client, headers, name="long", outer={"iterations": 1_000_000, "meta_batch_size": 2},
                  eval={"every": 1_000_000, "tasks": 1})
    wait_for_job(client, long["id"], headers, statuses=("running",))
    queued = [submit(client, headers, name=f"q{i}", outer={"iterations": 3, "meta_batch_size": 2},
                     eval={"every": 3, "tasks": 2}) for i in range(4)]

    r = client.post(f"{API}/jobs/{queued[0]['id']}/cancel", headers=headers)
    assert r.status_code == 202 and r.json()["status"] == "cancelled"

    everything = client.get(f"{API}/jobs", headers=headers).json()
    assert everything["count"] == 5
    assert [j["name"] for j in everything["data"]] == ["q3", "q2", "q1", "q0", "long"]  # newest first
    page = client.get(f"{API}/jobs", params={"limit": 2, "offset": 1}, headers=headers).json()
    assert [j["name"] for j in page["data"]] == ["q2", "q1"] and page["count"] == 5
    last = client.get(f"{API}/jobs", params={"limit": 2, "offset": 4}, headers=headers).json()
    assert [j["name"] for j in last["data"]] == ["long"]
    by_status = {s: client.get(f"{API}/jobs", params={"status": s}, headers=headers).json()
                 for s in ("queued", "running", "cancelled")}
    assert by_status["queued"]["count"] == 3
    assert [j["name"] for j in by_status["running"]["data"]] == ["long"]
    assert [j["name"] for j in by_status["cancelled"]["data"]] == ["q0"]
    assert client.get(f"{API}/jobs", params={"status": "nope"}, headers=headers).status_code == 422
    assert client.get(f"{API}/jobs", params={"limit": 0}, headers=headers).status_code == 422

    # A running job stops within 10 s of the cancel (here: within an iteration).
    start = time.monotonic()
    r = client.post(f"{API}/jobs/{long['id']}/cancel", headers=headers)
    assert r.status_code == 202 and r.json()["cancel_requested"] is True
    cancelled = wait_for_job(client, long["id"], headers, timeout=10)
    assert cancelled["status"] == "cancelled" and time.monotonic() - start < 10
    assert cancelled["model_id"] is None and cancelled["finished_at"] is not None

    # The queue moves on; the cancelled queued job never runs.
    for job in queued[1:]:
        assert wait_for_job(client, job["id"], headers)["status"] == "succeeded"
    assert client.get(f"{API}/jobs/{queued[0]['id']}", headers=headers).json()["attempts"] == 0
    r = client.post(f"{API}/jobs/{queued[1]['id']}/cancel", headers=headers)
    assert r.status_code == 409


def _error_locs(response) -> list[list]:
    assert response.status_code == 422, response.text
    return [d["loc"] for d in response.json()["detail"]]


def test_bad_specs_answer_422_naming_the_field(client: TestClient, admin_headers, settings) -> None:
    def post(body: dict):
        return client.post(f"{API}/jobs", json=body, headers=admin_headers)

    assert ["body", "outer", "iterations"] in _error_locs(post({**SMALL_SINE, "outer": {"iterations": 0}}))
    assert ["body", "inner", "step"] in _error_locs(post({**SMALL_SINE, "inner": {"step": 2}}))
    assert any(loc[:2] == ["body", "task"] for loc in _error_locs(post({"task": {"family": "mnist"}})))
    assert ["body", "seed"] in _error_locs(post({**SMALL_SINE, "seed": -1}))
    # Not in the allow-list: refused without importing it.
    assert _error_locs(post({**SMALL_SINE, "model": {"factory": "os:system"}})) == [["body", "model", "factory"]]
    r = post({**SMALL_SINE, "model": {"factory": "user_models:make_model", "kwargs": {"depth": 3}}})
    assert _error_locs(r) == [["body", "model", "kwargs"]]
    # Dataset paths stay inside the data roots, symlinks and '..' included.
    outside = {"family": "image_folder", "path": "/etc", "ways": 2, "shots": 1, "queries": 1}
    assert _error_locs(post({"task": outside, "model": {"name": "conv4"}})) == [["body", "task", "path"]]
    escape = {**outside, "path": "../../.."}
    assert _error_locs(post({"task": escape, "model": {"name": "conv4"}})) == [["body", "task", "path"]]
    link = settings.data_roots[0] / "link"
    link.symlink_to("/etc")
    assert _error_locs(post({"task": {**outside, "path": "link"}, "model": {"name": "conv4"}})) == [
        ["body", "task", "path"]]
    # No default data root in these settings: Omniglot needs a path.
    assert _error_locs(post({"task": {"family": "omniglot"}, "model": {"name": "conv4"}})) == [
        ["body", "task", "path"]]
    # Not JSON at all.
    r = client.post(f"{API}/jobs", content=b"{not json", headers={**admin_headers, "content-type": "application/json"})
    assert r.status_code == 422

    # An allow-listed factory and an in-root path pass.
    ok = post({**SMALL_SINE, "model": {"factory": "user_models:make_model", "kwargs": {"width": 4}},
               "outer": {"iterations": 2, "meta_batch_size": 2}})
    assert ok.status_code == 201, ok.text
    # The dataset is opened at submission: an empty folder or too many ways is refused now, not later.
    (settings.data_roots[0] / "folder").mkdir()
    assert _error_locs(post({"task": {**outside, "path": "folder"}, "model": {"name": "conv4"}})) == [
        ["body", "task", "path"]]
    make_image_folder(settings.data_roots[0] / "folder", classes=10, images=3)
    assert _error_locs(post({"task": {**outside, "path": "folder", "ways": 6}, "model": {"name": "conv4"}})) == [
        ["body", "task", "ways"]]
    assert _error_locs(post({"task": {**outside, "path": "folder", "shots": 2, "queries": 2},
                             "model": {"name": "conv4"}})) == [["body", "task", "shots"]]
    r = post({"task": {**outside, "path": "folder", "image_size": 16}, "model": {"name": "conv4"}})
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["task"]["path"] == str((settings.data_roots[0] / "folder").resolve())


def test_failed_job_keeps_its_cause(client: TestClient, admin_headers, settings) -> None:
    # A model whose outputs turn NaN after 100 forward passes: the job diverges while training.
    job = submit(client, admin_headers, model={"factory": "user_models:make_countdown", "kwargs": {"calls": 100}})
    done = wait_for_job(client, job["id"], admin_headers)
    assert done["status"] == "failed" and done["model_id"] is None
    assert done["error"].startswith("TrainingError: non-finite loss at iteration ")


def test_keys_auth_and_tenant_isolation(client: TestClient, admin_headers, tenant_key) -> None:
    acme, globex = tenant_key("acme"), tenant_key("globex")
    # No key, a wrong key, a malformed header: 401.
    assert client.get(f"{API}/jobs").status_code == 401
    r = client.get(f"{API}/jobs", headers={"Authorization": "Bearer maml_nope"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert client.get(f"{API}/jobs", headers={"Authorization": "Basic abc"}).status_code == 401
    # Tenant keys cannot create keys.
    assert client.post(f"{API}/keys", json={"tenant": "x"}, headers=acme).status_code == 403
    assert client.get(f"{API}/keys", headers=acme).status_code == 403
    r = client.post(f"{API}/keys", json={"tenant": "admin"}, headers=admin_headers)
    assert _error_locs(r) == [["body", "tenant"]]

    job = submit(client, acme, outer={"iterations": 5, "meta_batch_size": 2}, eval={"every": 5, "tasks": 2})
    done = wait_for_job(client, job["id"], acme)
    model_id = done["model_id"]
    adapted = client.post(f"{API}/models/{model_id}/adapt", json={**sine_query(), "return_weights": True},
                          headers=acme).json()["adapted_id"]

    # Another tenant sees none of it: every id answers 404, lists are empty.
    for method, path in [("GET", f"/jobs/{job['id']}"), ("GET", f"/jobs/{job['id']}/metrics"),
                         ("GET", f"/jobs/{job['id']}/events"), ("POST", f"/jobs/{job['id']}/cancel"),
                         ("GET", f"/models/{model_id}"), ("GET", f"/models/{model_id}/weights"),
                         ("GET", f"/adapted/{adapted}"), ("GET", f"/adapted/{adapted}/weights")]:
        assert client.request(method, API + path, headers=globex).status_code == 404, path
    r = client.post(f"{API}/models/{model_id}/adapt", json=sine_query(), headers=globex)
    assert r.status_code == 404
    assert client.get(f"{API}/jobs", headers=globex).json() == {"data": [], "count": 0}
    assert client.get(f"{API}/models", headers=globex).json() == {"data": [], "count": 0}
    # The admin sees every tenant.
    assert client.get(f"{API}/jobs/{job['id']}", headers=admin_headers).status_code == 200

    # Keys: listed without secrets; a revoked key stops working at once.
    keys = client.get(f"{API}/keys", headers=admin_headers).json()
    assert keys["count"] == 2 and all("secret" not in k for k in keys["data"])
    acme_key = next(k for k in keys["data"] if k["tenant"] == "acme")
    assert acme["Authorization"].removeprefix("Bearer ").startswith(acme_key["prefix"])
    assert client.delete(f"{API}/keys/{acme_key['id']}", headers=admin_headers).status_code == 204
    assert client.get(f"{API}/jobs", headers=acme).status_code == 401
    assert client.delete(f"{API}/keys/nope", headers=admin_headers).status_code == 404


def test_bodies_over_the_limit_answer_413(tmp_path, admin_headers) -> None:
    settings = make_settings(tmp_path, max_body_bytes=4096)
    with TestClient(make_app(settings)) as client:
        big = {**SMALL_SINE, "name": "x" * 200, "model": {"name": "mlp", "kwargs": {"pad": "y" * 8000}}}
        r = client.post(f"{API}/jobs", json=big, headers=admin_headers)
        assert r.status_code == 413
        # Chunked (no Content-Length): counted while read.
        payload = json.dumps(big).encode()
        chunks = (payload[i:i + 1000] for i in range(0, len(payload), 1000))
        r = client.post(f"{API}/jobs", content=chunks,
                        headers={**admin_headers, "content-type": "application/json"})
        assert r.status_code == 413
        # Under the limit, chunked: replayed to the app whole.
        small = json.dumps({**SMALL_SINE, "outer": {"iterations": 2, "meta_batch_size": 2}}).encode()
        r = client.post(f"{API}/jobs", content=(small[i:i + 100] for i in range(0, len(small), 100)),
                        headers={**admin_headers, "content-type": "application/json"})
        assert r.status_code == 201, r.text


def test_probes_and_prometheus_metrics(client: TestClient, admin_headers) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": True, "jobs": True}
    job = submit(client, admin_headers, outer={"iterations": 4, "meta_batch_size": 2}, eval={"every": 4, "tasks": 2})
    done = wait_for_job(client, job["id"], admin_headers)
    client.post(f"{API}/models/{done['model_id']}/adapt", json=sine_query(), headers=admin_headers)
    text = client.get("/metrics").text
    assert 'maml_jobs{status="succeeded"} 1.0' in text
    assert "maml_queue_depth 0.0" in text
    assert "maml_job_iterations_total 4.0" in text
    assert "maml_adapt_latency_seconds_count 1.0" in text

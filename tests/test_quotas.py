"""Per-tenant quotas through the app, on SQLite and on PostgreSQL: each quota refuses with its status
(429 with Retry-After, or 403) and a body naming the quota, its limit and the use; other tenants go on;
the admin routes (defaults, overrides, use per tenant); concurrent submissions that never go over;
and the migration that adds the table. Nothing trains: jobs and sweeps are held running or queued."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from fastapi.testclient import TestClient
from helpers import ADMIN_TOKEN, SMALL_SINE, make_app, make_settings, submit, wait_for_job
from sqlalchemy import Engine, inspect, select

from service import quotas
from service.config import Settings
from service.db import Job, TenantQuota, alembic_config, init_db, make_engine, make_session_factory, migrating
from service.errors import NotFound, QuotaExceeded
from service.schemas import QuotaLimits
from workers.run import TrainResult
from workers.sweep_spec import SweepSpec

API = "/api/v1"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
pytestmark = pytest.mark.usefixtures("database")  # each test on SQLite and on PostgreSQL
WEIGHTS_BYTES = 1000  # the size of each fake model's weights file
SWEEP: dict[str, Any] = {
    "name": "lr-sweep",
    "base": {"outer": {"iterations": 8, "meta_batch_size": 2}, "eval": {"every": 4, "tasks": 2}},
    "space": {"inner.lr": {"loguniform": [0.001, 0.5]}},
    "scheduler": {"type": "none"},
    "num_samples": 2,
}


class HeldRunner:
    """The job runner: a job runs until ``release`` is set (or it is stopped), then exports a fake
    model (a weights file of WEIGHTS_BYTES and its model.json). Nothing trains."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def __call__(self, spec: Any, *, run_dir: Path, should_stop: Callable[[], bool], **_: Any) -> TrainResult:
        while not self.release.wait(0.02):
            if should_stop():
                return TrainResult(iteration=0, metrics={}, eval_metrics={}, model_dir=None, cancelled=True)
        export = Path(run_dir) / "export"
        export.mkdir(parents=True, exist_ok=True)
        (export / "model.safetensors").write_bytes(b"\0" * WEIGHTS_BYTES)
        (export / "model.json").write_text(json.dumps({"spec": spec.model_dump(mode="json"), "input_shape": [1],
                                                       "output_dim": 1, "loss": "mse"}))
        return TrainResult(iteration=spec.outer.iterations, metrics={}, eval_metrics={}, model_dir=export)


@pytest.fixture
def held(settings: Settings) -> Iterator[tuple[TestClient, HeldRunner]]:
    """The app with held jobs, and sweeps that run (or wait, queued) until cancelled or stopped."""
    runner = HeldRunner()
    with TestClient(make_app(settings, runner)) as client:
        manager = client.app.state.services.sweeps  # type: ignore[attr-defined]

        def held_sweep(row: Any, cancel: threading.Event) -> tuple[str, dict]:
            while not cancel.wait(0.02):
                if manager.stopping:
                    return "queued", {}
            return "cancelled", {}

        manager.execute = held_sweep
        yield client, runner


@pytest.fixture
def client(held: tuple[TestClient, HeldRunner]) -> TestClient:
    return held[0]


def key_for(client: TestClient, tenant: str) -> dict[str, str]:
    r = client.post(f"{API}/keys", json={"tenant": tenant, "name": "test"}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['secret']}"}


def job(**changes: Any) -> dict[str, Any]:
    return {**SMALL_SINE, **changes}


def workers(n: int, cpus: float = 1.0, gpus: float = 0.0) -> dict[str, Any]:
    return {"resources": {"workers": n, "cpus_per_worker": cpus, "gpus_per_worker": gpus}}


def post_job(client: TestClient, headers: dict[str, str], **changes: Any) -> Any:
    return client.post(f"{API}/jobs", json=job(**changes), headers=headers)


def set_quotas(client: TestClient, tenant: str, **values: int | None) -> dict[str, Any]:
    r = client.patch(f"{API}/quotas/{tenant}", json=values, headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


def use_of(client: TestClient, tenant: str) -> dict[str, Any]:
    r = client.get(f"{API}/quotas/{tenant}", headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()["use"]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def assert_refused(r: Any, status: int, quota: str, limit: float, used: float, requested: float | None,
                   retry_after: str | None = None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert (body["quota"], body["limit"], body["used"], body["requested"]) == (quota, limit, used, requested), body
    assert f"quota '{quota}' exceeded" in body["detail"]
    assert r.headers.get("retry-after") == retry_after


# ------------------------------------------------------------------------------------------ routes


def test_limits_are_the_defaults_until_an_admin_overrides_them(client: TestClient, settings: Settings) -> None:
    defaults = {name: getattr(settings, f"quota_{name}") for name in quotas.NAMES}
    assert defaults == {"jobs": 16, "sweeps": 8, "workers": 64, "cpus": 256, "gpus": 16, "iterations": 1_000_000,
                        "trials": 1000, "models": 1000, "model_bytes": 10 * 1024**3, "adaptations": 8}
    fresh = client.get(f"{API}/quotas/acme", headers=ADMIN).json()
    assert fresh == {"tenant": "acme", "limits": defaults, "overrides": {},
                     "use": {"jobs": 0, "sweeps": 0, "workers": 0, "cpus": 0.0, "gpus": 0.0, "models": 0,
                             "model_bytes": 0, "adaptations": 0}}

    put = client.put(f"{API}/quotas/acme", json={"jobs": 2, "model_bytes": 5 * 2**40}, headers=ADMIN).json()
    assert put["overrides"] == {"jobs": 2, "model_bytes": 5 * 2**40}
    assert put["limits"] == {**defaults, "jobs": 2, "model_bytes": 5 * 2**40}
    patched = set_quotas(client, "acme", sweeps=0, workers=3)
    assert patched["overrides"] == {"jobs": 2, "model_bytes": 5 * 2**40, "sweeps": 0, "workers": 3}
    patched = set_quotas(client, "acme", jobs=None)  # null: back to the default
    assert patched["overrides"] == {"model_bytes": 5 * 2**40, "sweeps": 0, "workers": 3}
    assert patched["limits"]["jobs"] == 16
    # PUT replaces: what it does not give goes back to the default.
    put = client.put(f"{API}/quotas/acme", json={"trials": 7}, headers=ADMIN).json()
    assert put["overrides"] == {"trials": 7} and put["limits"] == {**defaults, "trials": 7}
    assert client.get(f"{API}/quotas/globex", headers=ADMIN).json()["limits"] == defaults  # others: untouched

    assert client.delete(f"{API}/quotas/acme", headers=ADMIN).status_code == 204
    assert client.get(f"{API}/quotas/acme", headers=ADMIN).json()["overrides"] == {}


def test_defaults_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAML_QUOTA_JOBS", "3")
    monkeypatch.setenv("MAML_QUOTA_MODEL_BYTES", str(2**33))
    settings = Settings()
    assert (settings.quota_jobs, settings.quota_model_bytes, settings.quota_sweeps) == (3, 2**33, 8)
    assert set(quotas.defaults(settings)) == set(QuotaLimits.model_fields) == {
        c.name for c in TenantQuota.__table__.columns} - {"tenant", "updated_at"}
    monkeypatch.setenv("MAML_QUOTA_GPUS", "-1")
    with pytest.raises(ValueError, match="quota_gpus"):
        Settings()


def test_the_quota_routes_are_the_admins(client: TestClient) -> None:
    acme = key_for(client, "acme")
    calls = [("GET", "/quotas", None), ("GET", "/quotas/acme", None), ("PUT", "/quotas/acme", {"jobs": 100}),
             ("PATCH", "/quotas/acme", {"jobs": 100}), ("DELETE", "/quotas/acme", None)]
    for method, path, body in calls:
        r = client.request(method, f"{API}{path}", json=body, headers=acme)
        assert r.status_code == 403, (method, path, r.text)
        assert client.request(method, f"{API}{path}", json=body).status_code == 401
    assert client.get(f"{API}/quotas/acme", headers=ADMIN).json()["overrides"] == {}


def test_overrides_are_non_negative_integers_and_a_refusal_names_the_field(client: TestClient) -> None:
    cases = [({"jobs": -1}, "jobs"), ({"cpus": 1.5}, "cpus"), ({"gpus": "many"}, "gpus"),
             ({"model_bytes": 2**63}, "model_bytes"), ({"iterations": 2**31}, "iterations"), ({"bogus": 1}, "bogus")]
    for method in ("PUT", "PATCH"):
        for body, field in cases:
            r = client.request(method, f"{API}/quotas/acme", json=body, headers=ADMIN)
            assert r.status_code == 422, (method, body, r.text)
            assert ["body", field] in [e["loc"] for e in r.json()["detail"]], r.text
    for tenant in ("a b", "-acme", "x" * 65):
        assert client.get(f"{API}/quotas/{tenant}", headers=ADMIN).status_code == 422
    assert client.get(f"{API}/quotas/acme", headers=ADMIN).json()["overrides"] == {}
    assert set_quotas(client, "acme", jobs=0)["limits"]["jobs"] == 0  # zero is a limit: nothing at all


# ---------------------------------------------------------------------------------------- enforcement


def test_concurrent_jobs_answer_429_and_other_tenants_go_on(client: TestClient, settings: Settings) -> None:
    acme, globex = key_for(client, "acme"), key_for(client, "globex")
    set_quotas(client, "acme", jobs=2)
    first, second = (post_job(client, acme).json() for _ in range(2))  # one running, one queued: both count
    assert first["status"] == "queued" and second["status"] == "queued"
    assert_refused(post_job(client, acme), 429, "jobs", limit=2, used=2, requested=1,
                   retry_after=str(settings.quota_retry_after_s))
    assert post_job(client, globex).status_code == 201  # another tenant is not affected
    assert use_of(client, "acme")["jobs"] == 2 and use_of(client, "globex")["jobs"] == 1

    assert client.post(f"{API}/jobs/{second['id']}/cancel", headers=acme).status_code == 202
    assert post_job(client, acme).status_code == 201  # a cancelled job frees its place
    set_quotas(client, "acme", jobs=0)
    assert_refused(post_job(client, acme), 403, "jobs", limit=0, used=2, requested=1)  # never fits: 403
    listed = client.get(f"{API}/jobs", headers=acme).json()
    assert listed["count"] == 3  # the refused ones were not stored


def test_workers_cpus_and_gpus_in_use_are_bounded(client: TestClient) -> None:
    acme, globex = key_for(client, "acme"), key_for(client, "globex")
    set_quotas(client, "acme", workers=4, cpus=5, gpus=1)
    assert post_job(client, acme, **workers(3, cpus=1.5)).status_code == 201
    assert_refused(post_job(client, acme, **workers(2)), 429, "workers", limit=4, used=3, requested=2,
                   retry_after="30")
    assert_refused(post_job(client, acme, **workers(5)), 403, "workers", limit=4, used=3, requested=5)
    assert_refused(post_job(client, acme, **workers(1, cpus=1)), 429, "cpus", limit=5, used=4.5, requested=1.0,
                   retry_after="30")
    assert post_job(client, acme, **workers(1, cpus=0.5, gpus=0.5)).status_code == 201
    assert use_of(client, "acme") | {"model_bytes": None} == {
        "jobs": 2, "sweeps": 0, "workers": 4, "cpus": 5.0, "gpus": 0.5, "models": 2, "model_bytes": None,
        "adaptations": 0}
    set_quotas(client, "acme", workers=100, cpus=100)
    assert_refused(post_job(client, acme, **workers(2, cpus=0.5, gpus=0.5)), 429, "gpus", limit=1, used=0.5,
                   requested=1.0, retry_after="30")
    assert post_job(client, acme, **workers(1, cpus=0.5, gpus=0.5)).status_code == 201
    assert post_job(client, globex, **workers(8, gpus=1)).status_code == 201  # globex has the defaults


def test_iterations_per_job_and_per_trial_answer_403(client: TestClient) -> None:
    acme = key_for(client, "acme")
    set_quotas(client, "acme", iterations=100)
    assert_refused(post_job(client, acme, outer={"iterations": 101}), 403, "iterations", limit=100, used=101,
                   requested=101)
    assert post_job(client, acme, outer={"iterations": 100}).status_code == 201
    sweep = {**SWEEP, "space": {**SWEEP["space"], "outer.iterations": {"choice": [8, 200]}}}
    assert_refused(client.post(f"{API}/sweeps", json=sweep, headers=acme), 403, "iterations", limit=100,
                   used=200, requested=200)


def test_sweeps_trials_and_their_workers_are_bounded(client: TestClient) -> None:
    acme, globex = key_for(client, "acme"), key_for(client, "globex")
    set_quotas(client, "acme", sweeps=1, trials=4, workers=5)
    grid = {**SWEEP, "space": {**SWEEP["space"], "inner.steps": {"grid": [1, 2, 3]}}}  # 2 x 3 = 6 trials
    assert_refused(client.post(f"{API}/sweeps", json=grid, headers=acme), 403, "trials", limit=4, used=6,
                   requested=6)
    # 4 trials, 2 at once, each with up to 2 workers (the space's largest): 4 workers while it runs.
    sweep = {**SWEEP, "num_samples": 4, "max_concurrent_trials": 2,
             "space": {**SWEEP["space"], "resources.workers": {"choice": [1, 2]}}}
    created = client.post(f"{API}/sweeps", json=sweep, headers=acme)
    assert created.status_code == 201, created.text
    assert_refused(client.post(f"{API}/sweeps", json=SWEEP, headers=acme), 429, "sweeps", limit=1, used=1,
                   requested=1, retry_after="30")
    assert_refused(post_job(client, acme, **workers(2)), 429, "workers", limit=5, used=4, requested=2,
                   retry_after="30")
    use = use_of(client, "acme")
    assert (use["sweeps"], use["workers"], use["cpus"], use["models"]) == (1, 4, 4.0, 1)
    assert client.post(f"{API}/sweeps", json=SWEEP, headers=globex).status_code == 201

    client.post(f"{API}/sweeps/{created.json()['id']}/cancel", headers=acme)
    wait_until(lambda: client.get(f"{API}/sweeps/{created.json()['id']}", headers=acme).json()["status"] == "cancelled")
    set_quotas(client, "acme", sweeps=5, trials=None)
    # Without max_concurrent_trials every trial may run at once: 6 > 5 workers would never fit.
    unbounded = {**SWEEP, "num_samples": 6}
    assert_refused(client.post(f"{API}/sweeps", json=unbounded, headers=acme), 403, "workers", limit=5, used=0,
                   requested=6)
    assert client.post(f"{API}/sweeps", json={**unbounded, "num_samples": 5}, headers=acme).status_code == 201


def test_stored_models_and_their_bytes_are_bounded_and_a_finished_job_keeps_its_model(
        held: tuple[TestClient, HeldRunner]) -> None:
    client, runner = held
    acme, globex = key_for(client, "acme"), key_for(client, "globex")
    set_quotas(client, "acme", models=2)
    # Each queued or running job counts as the model it will register.
    ids = [post_job(client, acme).json()["id"] for _ in range(2)]
    assert_refused(post_job(client, acme), 403, "models", limit=2, used=2, requested=1)
    assert_refused(client.post(f"{API}/sweeps", json=SWEEP, headers=acme), 403, "models", limit=2, used=2,
                   requested=1)
    assert post_job(client, globex).status_code == 201
    # Lowered while they run: their models are registered all the same (never lost), and count.
    set_quotas(client, "acme", models=1)
    runner.release.set()
    for job_id in ids:
        assert wait_for_job(client, job_id, acme)["status"] == "succeeded"
    assert client.get(f"{API}/models", headers=acme).json()["count"] == 2
    use = use_of(client, "acme")
    assert use["models"] == 2 and use["model_bytes"] > 2 * WEIGHTS_BYTES  # weights and model.json
    assert_refused(post_job(client, acme), 403, "models", limit=1, used=2, requested=1)

    set_quotas(client, "acme", models=None, model_bytes=use["model_bytes"])
    assert_refused(post_job(client, acme), 403, "model_bytes", limit=use["model_bytes"], used=use["model_bytes"],
                   requested=None)
    set_quotas(client, "acme", model_bytes=use["model_bytes"] + 1)
    assert post_job(client, acme).status_code == 201  # room left: the next model may end over it


def test_use_of_every_tenant(client: TestClient) -> None:
    acme, globex = key_for(client, "acme"), key_for(client, "globex")
    key_for(client, "idle")
    set_quotas(client, "zeta", jobs=1)
    post_job(client, acme, **workers(2, cpus=2))
    post_job(client, globex)
    client.post(f"{API}/sweeps", json={**SWEEP, "max_concurrent_trials": 1}, headers=globex)
    listed = client.get(f"{API}/quotas", headers=ADMIN).json()
    assert listed["count"] == 4
    by_tenant = {row["tenant"]: row for row in listed["data"]}
    assert list(by_tenant) == ["acme", "globex", "idle", "zeta"]
    assert by_tenant["acme"]["use"] | {"model_bytes": 0} == {
        "jobs": 1, "sweeps": 0, "workers": 2, "cpus": 4.0, "gpus": 0.0, "models": 1, "model_bytes": 0,
        "adaptations": 0}
    assert (by_tenant["globex"]["use"]["jobs"], by_tenant["globex"]["use"]["sweeps"],
            by_tenant["globex"]["use"]["workers"], by_tenant["globex"]["use"]["models"]) == (1, 1, 2, 2)
    assert by_tenant["idle"]["use"]["jobs"] == 0 and by_tenant["zeta"]["limits"]["jobs"] == 1
    page = client.get(f"{API}/quotas", params={"limit": 2, "offset": 1}, headers=ADMIN).json()
    assert [row["tenant"] for row in page["data"]] == ["globex", "idle"] and page["count"] == 4


def test_adaptation_queries_in_flight_are_a_fair_share(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tenant with its quota of queries in flight gets 429 with the adaptation Retry-After; another
    tenant's query goes through; a query's count ends with its computation, errors included."""
    acme, globex = key_for(client, "acme"), key_for(client, "globex")
    set_quotas(client, "acme", adaptations=2)
    adapter = client.app.state.services.adapter  # type: ignore[attr-defined]
    release, started = threading.Event(), threading.Semaphore(0)

    async def slow_adapt(*, model_id: str, principal: Any, request: Any, **_: Any) -> Any:
        started.release()
        while not release.is_set():
            await asyncio.sleep(0.01)
        raise NotFound("model", model_id)

    monkeypatch.setattr(adapter, "adapt", slow_adapt)
    query = {"support": {"x": [[0.0]], "y": [[0.0]]}, "query": {"x": [[0.0]]}}
    answers: list[int] = []

    def adapt(headers: dict[str, str]) -> None:
        answers.append(client.post(f"{API}/models/m-1/adapt", json=query, headers=headers).status_code)

    threads = [threading.Thread(target=adapt, args=(acme,)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for _ in threads:
        assert started.acquire(timeout=10)
    r = client.post(f"{API}/models/m-1/adapt", json=query, headers=acme)
    assert_refused(r, 429, "adaptations", limit=2, used=2, requested=1, retry_after="1")  # adapt_retry_after_s
    assert use_of(client, "acme")["adaptations"] == 2
    threads.append(threading.Thread(target=adapt, args=(globex,)))
    threads[-1].start()
    assert started.acquire(timeout=10)  # globex's query is in flight beside acme's two
    release.set()
    for thread in threads:
        thread.join(10)
    assert answers == [404, 404, 404]
    assert use_of(client, "acme")["adaptations"] == 0
    set_quotas(client, "acme", adaptations=0)  # seen at once on this replica
    assert_refused(client.post(f"{API}/models/m-1/adapt", json=query, headers=acme), 403, "adaptations", limit=0,
                   used=0, requested=1)


@pytest.mark.backends("sqlite")  # nothing here depends on the database
def test_a_query_whose_client_leaves_stops_and_gives_its_share_back(tmp_path: Path) -> None:
    """A real adaptation of 100,000 steps whose client disconnects after half a second: it stops
    (the adapter looks every quarter second) and the tenant's count goes back to zero."""
    settings = make_settings(tmp_path, adapt_max_steps=10**7, adapt_max_work=10**13, adapt_timeout_s=600)
    with TestClient(make_app(settings)) as client:
        trained = submit(client, ADMIN, outer={"iterations": 2, "meta_batch_size": 2}, eval={"every": 2, "tasks": 1})
        model_id = wait_for_job(client, trained["id"], ADMIN)["model_id"]
        body = json.dumps({"support": {"x": [[0.1], [0.2]], "y": [[0.5], [0.7]]}, "query": {"x": [[0.3]]},
                           "steps": 100_000}).encode()
        path = f"{API}/models/{model_id}/adapt"
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
                 "headers": [(b"host", b"testserver"), (b"authorization", f"Bearer {ADMIN_TOKEN}".encode()),
                             (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                 "client": ("testclient", 50000), "server": ("testserver", 80)}
        sent: list[dict[str, Any]] = []

        async def leave_after_half_a_second() -> None:
            left_at = time.monotonic() + 0.5
            messages = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive() -> dict[str, Any]:
                if messages:
                    return messages.pop(0)
                while time.monotonic() < left_at:
                    await asyncio.sleep(0.01)  # Request.is_disconnected cancels this wait at once
                return {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            await client.app(scope, receive, send)  # type: ignore[arg-type]

        start = time.perf_counter()
        client.portal.call(leave_after_half_a_second)  # type: ignore[union-attr]
        elapsed = time.perf_counter() - start
        assert sent and sent[0]["status"] == 503, sent  # answered to no one: the client is gone
        assert elapsed < 5, elapsed  # 100,000 steps take about 40 s here
        assert client.app.state.adaptation_shares.in_flight("admin") == 0  # type: ignore[attr-defined]
        assert client.app.state.services.adapter.in_flight == 0  # type: ignore[attr-defined]


def test_concurrent_submissions_never_go_over_the_quota(client: TestClient,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Twelve submissions of one tenant at once, with a quota of 3: exactly 3 are stored. Reading the
    use is slowed down, so that submissions not serialized by the tenant's lock would all read 0."""
    acme = key_for(client, "acme")
    set_quotas(client, "acme", jobs=3)
    read_use = quotas.get_use

    def slow_use(**kwargs: Any) -> Any:
        use = read_use(**kwargs)
        time.sleep(0.1)
        return use

    monkeypatch.setattr(quotas, "get_use", slow_use)
    barrier = threading.Barrier(12)
    statuses: list[int] = []

    def submit() -> None:
        barrier.wait()
        statuses.append(post_job(client, acme).status_code)

    threads = [threading.Thread(target=submit) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(statuses) == [201] * 3 + [429] * 9
    factory = client.app.state.services.session_factory  # type: ignore[attr-defined]
    with factory() as session:
        assert len(session.scalars(select(Job.id).where(Job.tenant == "acme")).all()) == 3


# ---------------------------------------------------------------------------------------- unit level


def test_a_sweeps_demand_is_its_largest_trial_times_the_trials_at_once() -> None:
    sweep = SweepSpec.model_validate({
        **SWEEP, "num_samples": 3, "max_concurrent_trials": 4,
        "base": {**SWEEP["base"], "resources": {"workers": 2, "cpus_per_worker": 1.5}},
        "space": {"inner.steps": {"grid": [1, 2]},
                  "resources": {"choice": [{"workers": 1, "gpus_per_worker": 0.5}, {"workers": 3}]},
                  "outer.iterations": {"randint": [8, 50]}}})
    demand = quotas.sweep_demand(sweep)
    # 6 trials, 4 at once; a trial: at most 3 workers, 1.5 CPUs (the base's) and 0.5 GPUs each.
    assert (demand.trials, demand.workers, demand.cpus, demand.gpus, demand.iterations) == (6, 12, 18.0, 6.0, 50)
    stored = quotas._stored_sweep_demand(sweep.model_dump(mode="json"))
    assert stored == demand


@pytest.mark.backends("sqlite")  # no database here
def test_fractional_cpus_add_up_to_their_limit(settings: Settings) -> None:
    limits = QuotaLimits(**{**quotas.defaults(settings), "cpus": 3})
    use = quotas.QuotaUse(jobs=1, sweeps=0, workers=29, cpus=sum([0.1] * 29), gpus=0.0, models=0, model_bytes=0,
                           adaptations=0)
    quotas._check(limits, use, quotas.Demand(jobs=1, workers=1, cpus=0.1), settings)  # 3.0000000000000013 fits
    with pytest.raises(QuotaExceeded) as refused:
        quotas._check(limits, use, quotas.Demand(jobs=1, workers=1, cpus=0.2), settings)
    assert (refused.value.quota, refused.value.status, refused.value.retry_after) == ("cpus", 429, 30)


# ---------------------------------------------------------------------------------------- migration


@pytest.fixture
def engine(tmp_path: Path, database: str | None) -> Iterator[Engine]:
    engine = make_engine(make_settings(tmp_path))
    yield engine
    engine.dispose()


def test_the_quota_table_migration_upgrades_a_baseline_database_and_downgrades(engine: Engine) -> None:
    with migrating(engine) as connection:
        command.upgrade(alembic_config(connection), "0001_baseline")
    assert "tenant_quotas" not in inspect(engine).get_table_names()
    with engine.begin() as connection:  # a row from before: kept
        connection.exec_driver_sql("INSERT INTO api_keys (id, tenant, name, prefix, hashed_secret, is_admin, "
                                   "created_at) VALUES ('k-1', 'acme', 'k', 'maml_x', 'h', false, "
                                   "'2025-01-01 00:00:00')")
    init_db(engine)  # what a start does: to the newest revision
    assert "tenant_quotas" in inspect(engine).get_table_names()
    with make_session_factory(engine)() as session:
        quotas.set_overrides(session=session, tenant="acme", values={"jobs": 3, "model_bytes": 2**40}, replace=False)
        assert quotas.get_overrides(session=session, tenant="acme") == {"jobs": 3, "model_bytes": 2**40}
        assert quotas.list_tenants(session=session) == (["acme"], 1)
    with migrating(engine) as connection:
        command.downgrade(alembic_config(connection), "0001_baseline")
    assert "tenant_quotas" not in inspect(engine).get_table_names()
    assert "api_keys" in inspect(engine).get_table_names()

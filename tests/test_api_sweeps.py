"""Sweeps through the app against a real database.

Without Ray (on SQLite and on PostgreSQL): bad search spaces and policy refusals answer 422 naming
the field, tenants are kept apart, cancel and events of a queued sweep, and an old ``models`` table
is upgraded. On a local
Ray cluster (``ray``): a 4-trial ASHA sweep where half the trials raise ends with a trial stopped
early and the best model registered and adaptable; a sweep interrupted by a service stop is
resumed by the next start.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import ADMIN_TOKEN, TERMINAL, make_app, make_image_folder, make_settings
from sqlalchemy import create_engine, event, inspect
from test_sweep_ray import ASHA_WITH_BROKEN_TRIALS

from api.main import create_app
from service import runs, sweeps
from service.config import Settings
from service.db import Sweep, _sqlite_pragmas, init_db, make_engine, make_session_factory
from service.schemas import SweepPublic
from workers.sweep_spec import SweepSpec

API = "/api/v1"
TESTS = Path(__file__).parent
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# A valid sweep that the fast tests store without running it.
SWEEP: dict[str, Any] = {
    "name": "lr-sweep",
    "base": {"outer": {"iterations": 8, "meta_batch_size": 2}, "eval": {"every": 4, "tasks": 2}},
    "space": {"inner.lr": {"loguniform": [0.001, 0.5]}, "inner.steps": {"choice": [1, 3]}},
    "scheduler": {"type": "asha", "grace_period": 2},
    "num_samples": 2,
}


def key_for(client: TestClient, tenant: str) -> dict[str, str]:
    r = client.post(f"{API}/keys", json={"tenant": tenant, "name": "test"}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['secret']}"}


def store_sweep(client: TestClient, tenant: str, body: dict[str, Any] = SWEEP) -> str:
    """A queued sweep row, as POST /sweeps stores it, but not handed to the manager (no Ray here)."""
    factory = client.app.state.services.session_factory  # type: ignore[attr-defined]
    with factory() as session:
        return sweeps.create_sweep(session=session, tenant=tenant, spec=SweepSpec.model_validate(body)).id


def with_changes(**changes: Any) -> dict[str, Any]:
    return {**SWEEP, **changes}


# -------------------------------------------------------------------------------- without Ray


@pytest.fixture
def client(tmp_path: Path, database: str | None) -> Iterator[TestClient]:
    # The queue looks for queued runs once a minute, not every 0.25 s: a sweep stored straight into
    # the database stays queued while the test looks at it (under load it was started, and started Ray).
    with TestClient(make_app(make_settings(tmp_path, reconcile_interval_s=60, lease_ttl_s=3600))) as c:
        yield c


def test_bad_sweeps_answer_422_naming_the_field(client: TestClient, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    make_image_folder(tmp_path / "datasets" / "imgs")
    images = {"family": "image_folder", "path": "imgs", "ways": 2, "shots": 1, "queries": 1, "image_size": 16}
    cases: list[tuple[dict[str, Any], str, str]] = [
        # (body, a piece of the error's location, a piece of its message)
        (with_changes(space={}), "space", "must not be empty"),
        (with_changes(space={"inner.nope": {"choice": [1]}}), "space", "space.inner.nope: unknown field"),
        (with_changes(space={"": {"choice": [1]}}), "space", "unknown field"),
        (with_changes(space={"inner.lr": {"uniform": [0.5, 0.1]}}), "space", "space.inner.lr: low 0.5 above high 0.1"),
        (with_changes(space={"inner.lr": {"loguniform": [0, 0.1]}}), "space", "loguniform needs low > 0"),
        (with_changes(space={"inner.steps": {"choice": [1, 0]}}), "space", "space.inner.steps: 0 is refused"),
        (with_changes(space={"inner.lr": {"uniform": [-1.0, 0.1]}}), "space", "space.inner.lr: -1.0 is refused"),
        (with_changes(space={"inner.steps": {"uniform": [1, 3]}}), "space", "use randint"),
        (with_changes(space={"inner.lr": {"choice": [0.1], "grid": [0.2]}}), "space", "give exactly one of"),
        (with_changes(space={"inner.lr": {"between": [0.1, 0.2]}}), "between", "Extra inputs are not permitted"),
        (with_changes(base={"inner": {"steps": 0}}), "base", "greater than or equal to 1"),
        (with_changes(metric="eval/accuracy"), "metric", "is not reported"),
        (with_changes(scheduler={"type": "asha", "grace_period": 8}), "body", "scheduler.grace_period: 8 is not below"),
        (with_changes(num_samples=0), "num_samples", "greater than or equal to 1"),
        (with_changes(colour="blue"), "colour", "Extra inputs are not permitted"),
        # The server's policy, as for jobs: model factories from the allow-list, datasets under the data roots.
        (with_changes(base={"model": {"factory": "os:getcwd"}}), "base.model.factory", "allow"),
        (with_changes(space={"model": {"choice": [{"name": "mlp"}, {"factory": "os:getcwd"}]}}), "space.model",
         '"factory": "os:getcwd"} is refused: model.factory'),
        (with_changes(base={"task": {**images, "path": str(outside)}, "model": {"name": "conv4"}}),
         "base.task.path", "outside the configured data roots"),
        (with_changes(base={"task": images, "model": {"name": "conv4"}},
                      space={"task.path": {"choice": ["imgs", str(outside)]}}), "space.task.path",
         "is refused: task.path: '" + str(outside) + "' is outside the configured data roots"),
    ]
    for body, where, message in cases:
        r = client.post(f"{API}/sweeps", json=body, headers=ADMIN)
        assert r.status_code == 422, (body, r.text)
        detail = r.json()["detail"]
        located = [(".".join(str(p) for p in e["loc"]), e["msg"]) for e in detail]
        assert any(where in loc and message in msg for loc, msg in located), (body, located)
    assert client.get(f"{API}/sweeps", headers=ADMIN).json() == {"data": [], "count": 0}


def test_the_policy_makes_dataset_paths_absolute_in_the_base_and_the_space(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)  # data root: tmp_path/datasets
    make_image_folder(tmp_path / "datasets" / "a")
    make_image_folder(tmp_path / "datasets" / "b")
    sweep = SweepSpec.model_validate({
        "base": {"task": {"family": "image_folder", "path": "a", "ways": 2, "shots": 1, "queries": 1,
                          "image_size": 16}, "model": {"name": "conv4"}, "outer": {"iterations": 4}},
        "space": {"task.path": {"grid": ["a", "b"]}, "inner.lr": {"uniform": [0.01, 0.1]}},
        "scheduler": {"type": "none"}})
    checked = sweeps.check_sweep(sweep, settings)
    root = (tmp_path / "datasets").resolve()
    assert checked.base.task.path == str(root / "a")  # type: ignore[union-attr]
    assert checked.space["task.path"].grid == [str(root / "a"), str(root / "b")]
    assert checked.space["inner.lr"] == sweep.space["inner.lr"] and checked.metric == "eval/accuracy"


def test_tenants_are_kept_apart_and_a_queued_sweep_cancels_at_once(client: TestClient) -> None:
    acme, other = key_for(client, "acme"), key_for(client, "other")
    sweep_id = store_sweep(client, "acme")

    got = client.get(f"{API}/sweeps/{sweep_id}", headers=acme)
    assert got.status_code == 200, got.text
    sweep = got.json()
    assert sweep["status"] == "queued" and sweep["tenant"] == "acme" and sweep["trials"] == []
    assert sweep["best"] is None and sweep["model_id"] is None and sweep["attempts"] == 0
    assert sweep["spec"]["metric"] == "eval/loss" and sweep["spec"]["mode"] == "min"  # resolved defaults
    assert sweep["spec"]["space"]["inner.lr"] == {"loguniform": [0.001, 0.5]}

    # Another tenant's sweep does not exist for them, whatever they try.
    for method, path in [("GET", ""), ("GET", "/events"), ("POST", "/cancel")]:
        r = client.request(method, f"{API}/sweeps/{sweep_id}{path}", headers=other)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["detail"] == f"sweep '{sweep_id}' not found"
    assert client.get(f"{API}/sweeps", headers=other).json() == {"data": [], "count": 0}
    mine = client.get(f"{API}/sweeps", headers=acme).json()
    assert mine["count"] == 1 and mine["data"][0]["id"] == sweep_id
    assert client.get(f"{API}/sweeps", params={"status": "running"}, headers=acme).json()["count"] == 0
    assert client.get(f"{API}/sweeps", headers=ADMIN).json()["count"] == 1  # the admin sees every tenant
    assert client.get(f"{API}/sweeps", params={"status": "nope"}, headers=acme).status_code == 422

    cancelled = client.post(f"{API}/sweeps/{sweep_id}/cancel", headers=acme)
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    assert client.post(f"{API}/sweeps/{sweep_id}/cancel", headers=acme).status_code == 409

    # The event stream of an ended sweep: its trials, its status, then the final sweep.
    with client.stream("GET", f"{API}/sweeps/{sweep_id}/events", headers=acme) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = read_events(r.iter_lines())
    assert [name for name, _ in events] == ["trials", "status", "end"]
    assert events[1][1] == {"status": "cancelled", "error": None, "model_id": None}
    assert events[2][1]["id"] == sweep_id and events[2][1]["status"] == "cancelled"


def stored_before_start(settings: Settings, **values: Any) -> str:
    """A sweep row as a previous process left it (the app is not started yet)."""
    engine = make_engine(settings)
    init_db(engine)
    with make_session_factory(engine)() as session:
        sweep = Sweep(tenant="acme", name="left", spec=SweepSpec.model_validate(SWEEP).model_dump(mode="json"),
                      trials=[], **values)
        session.add(sweep)
        session.commit()
        sweep_id = sweep.id
    engine.dispose()
    return sweep_id


@pytest.mark.usefixtures("database")
def test_a_restart_settles_sweeps_left_running_that_it_cannot_resume(tmp_path: Path) -> None:
    """Left running with a cancel requested: cancelled; started max_sweep_attempts times: failed, saying why.
    (A sweep left running otherwise is resumed: see the Ray tests below.)"""
    settings = make_settings(tmp_path, max_sweep_attempts=2)
    cancelled = stored_before_start(settings, status="running", attempts=1, cancel_requested=True)
    exhausted = stored_before_start(settings, status="running", attempts=2)
    with TestClient(make_app(settings)) as client:
        got = {i: client.get(f"{API}/sweeps/{i}", headers=ADMIN).json() for i in (cancelled, exhausted)}
    assert got[cancelled]["status"] == "cancelled" and got[cancelled]["finished_at"]
    assert got[exhausted]["status"] == "failed"
    assert got[exhausted]["error"].startswith("Interrupted: the service stopped while the sweep was running, 2 times")


def test_an_old_models_table_is_upgraded_for_sweep_models(tmp_path: Path) -> None:
    """A database from before sweeps: models.job_id NOT NULL and no sweep_id; init_db fixes both.
    (SQLite, which rebuilds the table; tests/test_db.py upgrades a whole pre-migration database on both.)"""
    engine = create_engine(f"sqlite:///{tmp_path / 'old.db'}")
    event.listen(engine, "connect", _sqlite_pragmas)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE jobs (id VARCHAR(36) PRIMARY KEY)")
        conn.exec_driver_sql(
            "CREATE TABLE models (id VARCHAR(36) NOT NULL PRIMARY KEY, tenant VARCHAR(64) NOT NULL, "
            "job_id VARCHAR(36) NOT NULL REFERENCES jobs (id), name VARCHAR(200) NOT NULL, spec JSON NOT NULL, "
            "input_shape JSON NOT NULL, output_dim INTEGER NOT NULL, loss VARCHAR(32) NOT NULL, "
            "iteration INTEGER NOT NULL, eval_metrics JSON NOT NULL, path TEXT NOT NULL, created_at DATETIME NOT NULL)")
        conn.exec_driver_sql("CREATE INDEX ix_models_created ON models (created_at, id)")
        conn.exec_driver_sql("INSERT INTO jobs VALUES ('job-1')")
        conn.exec_driver_sql("INSERT INTO models VALUES ('model-1', 'acme', 'job-1', 'sine', '{}', '[1]', 1, 'mse', "
                             "60, '{}', '/models/model-1', '2025-01-01 00:00:00')")
    init_db(engine)
    init_db(engine)  # a second start finds nothing to do
    columns = {c["name"]: c["nullable"] for c in inspect(engine).get_columns("models")}
    assert columns["job_id"] and columns["sweep_id"]
    assert {i["name"] for i in inspect(engine).get_indexes("models")} == {"ix_models_created",
                                                                          "ix_models_tenant_created"}
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT id, job_id, sweep_id FROM models").all() == [("model-1", "job-1", None)]
    engine.dispose()


# ---------------------------------------------------------------------------- on a Ray cluster


def read_events(lines: Iterator[str]) -> list[tuple[str, Any]]:
    events, name = [], None
    for line in lines:
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and name:
            events.append((name, json.loads(line.split(":", 1)[1])))
    return events


def ray_settings(root: Path) -> Settings:
    return make_settings(root, ray_num_cpus=2, metrics_flush_s=0.2, events_poll_s=0.2, stop_timeout_s=60)


def wait_for_sweep(client: TestClient, sweep_id: str, *, until: Any = None, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        sweep = client.get(f"{API}/sweeps/{sweep_id}", headers=ADMIN).json()
        if until(sweep) if until is not None else sweep["status"] in TERMINAL:
            return sweep
        assert time.monotonic() < deadline, f"sweep {sweep_id} still {sweep['status']} after {timeout}s: {sweep}"
        time.sleep(0.2)


@pytest.mark.ray
def test_asha_sweep_stops_early_survives_a_raising_trial_registers_and_adapts_the_best(
        ray_cluster: None, tmp_path: Path) -> None:
    # As in test_sweep_ray: the grid runs good (outer.lr 0.001), broken, bad (outer.lr 0.1), broken; the bad
    # trial starts after a broken one failed, so the good one has reached ASHA's rungs first.
    body = {**ASHA_WITH_BROKEN_TRIALS, "name": "api-sweep"}
    with TestClient(create_app(ray_settings(tmp_path))) as client:
        acme = key_for(client, "acme")
        r = client.post(f"{API}/sweeps", json=body, headers=acme)
        assert r.status_code == 201, r.text
        sweep_id = r.json()["id"]
        assert r.json()["status"] == "queued"

        with client.stream("GET", f"{API}/sweeps/{sweep_id}/events", headers=acme) as stream:
            events = read_events(stream.iter_lines())
        statuses = [data["status"] for name, data in events if name == "status"]
        assert statuses[-1] == "succeeded" and "running" in statuses, statuses
        assert any(t["status"] == "running" for name, data in events if name == "trials" for t in data["trials"])
        assert events[-1][0] == "end"

        sweep = client.get(f"{API}/sweeps/{sweep_id}", headers=acme).json()
        assert sweep == events[-1][1]
        trials = sweep["trials"]
        assert len(trials) == 4 and sweep["counts"].get("failed") == 2, sweep["counts"]
        for trial in trials:
            if trial["config"]["model"].get("factory"):
                assert trial["status"] == "failed"
                assert trial["error"] == "RuntimeError: corrupt shard: labels do not match inputs"
        stopped = [t for t in trials if t["status"] == "stopped_early"]
        assert stopped and all(t["iteration"] < t["total_iterations"] for t in stopped), sweep["counts"]
        best = sweep["best"]
        assert best["status"] == "completed" and best["iteration"] == 8 and math.isfinite(best["metric"])
        assert best["config"] == {"model": {"name": "mlp"}, "outer.lr": 0.001}
        assert "model_dir" not in best  # the server's paths stay on the server

        model = client.get(f"{API}/models/{sweep['model_id']}", headers=acme).json()
        assert model["sweep_id"] == sweep_id and model["job_id"] is None and model["tenant"] == "acme"
        assert model["iteration"] == 8 and model["spec"]["outer"]["lr"] == 0.001
        assert client.get(f"{API}/models/{sweep['model_id']}", headers=key_for(client, "other")).status_code == 404
        xs = [-4.0, -2.0, 0.0, 1.0, 3.0]
        adapted = client.post(f"{API}/models/{model['id']}/adapt", headers=acme, json={
            "support": {"x": [[x] for x in xs], "y": [[2.0 * math.sin(x)] for x in xs]},
            "query": {"x": [[0.5], [2.5]]}})
        assert adapted.status_code == 200, adapted.text
        assert len(adapted.json()["predictions"]) == 2
        listed = client.get(f"{API}/sweeps", params={"status": "succeeded"}, headers=acme).json()
        assert listed["count"] == 1 and listed["data"][0]["model_id"] == model["id"]


@pytest.mark.ray
def test_a_sweep_interrupted_by_a_service_stop_is_resumed_by_the_next_start(ray_cluster: None,
                                                                            tmp_path: Path) -> None:
    body = {
        "name": "restart",
        "base": {"outer": {"iterations": 300, "meta_batch_size": 2},
                 "eval": {"every": 10, "tasks": 2, "steps": 1}, "checkpoint": {"every": 10}},
        "space": {"inner.lr": {"grid": [0.005, 0.01]}},
        "scheduler": {"type": "none"}, "num_samples": 1, "max_concurrent_trials": 1,
    }
    settings = ray_settings(tmp_path)
    with TestClient(create_app(settings)) as client:
        r = client.post(f"{API}/sweeps", json=body, headers=ADMIN)
        assert r.status_code == 201, r.text
        sweep_id = r.json()["id"]
        wait_for_sweep(client, sweep_id, until=lambda s: any(t["iteration"] >= 20 for t in s["trials"])
                       or s["status"] in TERMINAL)
    # The stop interrupted it resumably: queued, not failed, its trials as they were.
    engine = make_engine(settings)
    with make_session_factory(engine)() as session:
        stopped = SweepPublic.from_row(runs.get_run(session=session, table=Sweep, run_id=sweep_id, scope=None))
    engine.dispose()
    assert stopped.status == "queued" and stopped.attempts == 1 and stopped.error is None, stopped
    cut = [t for t in stopped.trials if t.status == "running" and 20 <= t.iteration < t.total_iterations]
    assert len(cut) == 1, stopped
    with TestClient(create_app(settings)) as client:
        done = wait_for_sweep(client, sweep_id)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2 and done["model_id"]
    assert [t["status"] for t in done["trials"]] == ["completed", "completed"], done["counts"]
    assert {t.trial_id for t in stopped.trials} <= {t["trial_id"] for t in done["trials"]}  # resumed, not restarted
    # The cut trial went on from a checkpoint (every 10 iterations, >= 20), not from scratch: 10 was reported once.
    results = settings.storage_path / "sweeps" / sweep_id / "tune" / f"trial_{cut[0].trial_id}" / "result.json"
    iterations = [json.loads(line)["iteration"] for line in results.read_text().splitlines()]
    assert iterations.count(10) == 1 and iterations[-1] == 300, iterations


@pytest.mark.ray
def test_a_sweep_whose_tune_state_cannot_be_restored_is_failed_with_the_reason(ray_cluster: None,
                                                                               tmp_path: Path) -> None:
    settings = ray_settings(tmp_path)
    sweep_id = stored_before_start(settings, status="running", attempts=1)
    tune_dir = settings.storage_path / "sweeps" / sweep_id / "tune"
    tune_dir.mkdir(parents=True)
    (tune_dir / "tuner.pkl").write_bytes(b"not a pickle")  # what a disk error could leave
    with TestClient(create_app(settings)) as client:
        failed = wait_for_sweep(client, sweep_id, timeout=30)
    assert failed["status"] == "failed" and failed["attempts"] == 2, failed
    assert failed["error"].startswith("resuming the sweep failed: "), failed["error"]


@pytest.mark.ray
def test_cancelling_a_running_sweep_ends_its_trials(ray_cluster: None, tmp_path: Path) -> None:
    body = {
        "name": "cancel",
        "base": {"outer": {"iterations": 2000, "meta_batch_size": 2}, "eval": {"every": 10, "tasks": 2, "steps": 1}},
        "space": {"inner.lr": {"grid": [0.005, 0.01]}},
        "scheduler": {"type": "none"}, "num_samples": 1, "max_concurrent_trials": 1,
    }
    with TestClient(create_app(ray_settings(tmp_path))) as client:
        sweep_id = client.post(f"{API}/sweeps", json=body, headers=ADMIN).json()["id"]
        wait_for_sweep(client, sweep_id, until=lambda s: any(t["iteration"] >= 10 for t in s["trials"]))
        r = client.post(f"{API}/sweeps/{sweep_id}/cancel", headers=ADMIN)
        assert r.status_code == 202 and r.json()["cancel_requested"], r.text
        done = wait_for_sweep(client, sweep_id, timeout=30)
    assert done["status"] == "cancelled" and done["model_id"] is None and done["error"] is None, done
    # The running trial ended as cancelled; the second was never started (one trial at a time).
    assert [t["status"] for t in done["trials"]] == ["cancelled"], done["trials"]
    assert 10 <= done["trials"][0]["iteration"] < 2000

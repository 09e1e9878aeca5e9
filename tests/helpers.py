"""Shared helpers of the tests: the admin token, a small sinusoid job, settings on a temporary
data dir with a real database (a SQLite file, or a PostgreSQL database of the test's own), an app
whose jobs train in this process (the real engine, ``workers.run.run_training`` without Ray), and
polling and submission helpers. Fixtures are in ``conftest.py``."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from api.main import create_app
from service.config import Settings
from workers.run import TrainResult, run_training

TESTS = Path(__file__).resolve().parent
ADMIN_TOKEN = "test-admin-token-7f3a9c1e5b2d8f40"
TERMINAL = ("succeeded", "failed", "cancelled")

# A sinusoid job that trains in about a second on one CPU.
SMALL_SINE: dict[str, Any] = {
    "name": "sine",
    "task": {"family": "sinusoid", "shots": 10, "queries": 10},
    "model": {"name": "mlp", "hidden": [40, 40]},
    "outer": {"iterations": 60, "meta_batch_size": 4},
    "eval": {"every": 30, "tasks": 5, "steps": 10},
    "checkpoint": {"every": 20},
}


def in_process_runner(spec, **kwargs) -> TrainResult:
    """The runner contract of ``workers.run.run_training``, trained in this process."""
    return run_training(spec, use_ray=False, **kwargs)


# ------------------------------------------------------------------------------------------ databases

BACKENDS = ("sqlite", "postgresql")
# The server the PostgreSQL variants create their databases on (a role that may CREATE DATABASE).
POSTGRES_URL = os.environ.get("MAML_TEST_POSTGRES_URL") or "postgresql://postgres@127.0.0.1:5432/postgres"
_postgres_error: list[str] = []  # why the server could not be reached, once known (asked once a session)
_database_url: str | None = None  # the database of the test running now (conftest's `database` fixture)


def _admin_conninfo() -> str:
    # psycopg takes a libpq URL: no SQLAlchemy driver suffix.
    return make_url(POSTGRES_URL).set(drivername="postgresql").render_as_string(hide_password=False)


def require_postgres() -> None:
    """Fail (never skip) the test when the PostgreSQL server is not reachable, saying how to start one."""
    if not _postgres_error:
        try:
            with psycopg.connect(_admin_conninfo(), connect_timeout=5):
                _postgres_error.append("")
        except psycopg.Error as exc:
            _postgres_error.append(f"{type(exc).__name__}: {str(exc).strip()}")
    if _postgres_error[0]:
        pytest.fail(
            f"PostgreSQL is not reachable at {make_url(POSTGRES_URL)!r} ({_postgres_error[0]}). The persistence "
            "tests run on SQLite and on PostgreSQL; each PostgreSQL test creates a database of its own there. "
            "Start a server with trust auth for user postgres, e.g. `apt-get install postgresql && "
            "pg_ctlcluster 15 main start` (then in pg_hba.conf: host all all 127.0.0.1/32 trust), or `docker run "
            "-d -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust postgres:15`; or point MAML_TEST_POSTGRES_URL at "
            "one; or run SQLite only with `pytest --db sqlite`.", pytrace=False)


@contextmanager
def fresh_database(backend: str) -> Iterator[str | None]:
    """A database of its own for a test (or a module's fixture), by its SQLAlchemy URL.

    SQLite: None, which is make_settings' default, a file under the test's own data dir. PostgreSQL:
    a new database on the server of ``MAML_TEST_POSTGRES_URL``, dropped afterwards (connections left
    open by the test included), so no test sees another's rows.
    """
    if backend == "sqlite":
        yield None
        return
    require_postgres()
    name = f"maml_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_admin_conninfo(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(POSTGRES_URL).set(drivername="postgresql+psycopg", database=name).render_as_string(
            hide_password=False)
    finally:
        with psycopg.connect(_admin_conninfo(), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def use_database(url: str | None) -> Iterator[None]:
    """make_settings' database while the block runs (None: the SQLite file under its data dir)."""
    global _database_url
    previous, _database_url = _database_url, url
    try:
        yield
    finally:
        _database_url = previous


def make_settings(root: Path, **overrides: Any) -> Settings:
    """Settings on ``root``; the database is the current test's (``use_database``), else SQLite under root."""
    (root / "datasets").mkdir(parents=True, exist_ok=True)
    values: dict[str, Any] = dict(
        data_dir=root / "data", cache_dir=root / "cache", admin_token=ADMIN_TOKEN, data_roots=[root / "datasets"],
        data_root=None, database_url=_database_url,
        model_allowlist=["user_models"], metrics_flush_s=0.05, events_poll_s=0.05, auth_cache_s=0,
        ray_process="api",  # in-process tests: this process joins the session's Ray cluster, if any
    )
    values.update(overrides)
    return Settings(**values)


def make_app(settings: Settings, runner: Callable[..., TrainResult] = in_process_runner) -> FastAPI:
    return create_app(settings, backend=lambda _settings: runner)


def wait_for_job(client: TestClient, job_id: str, headers: dict[str, str], *, statuses: tuple[str, ...] = TERMINAL,
                 until: Callable[[dict], bool] | None = None, timeout: float = 60.0) -> dict:
    """Poll ``GET /jobs/{id}`` until the job has one of ``statuses`` (or ``until(job)`` holds)."""
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(f"/api/v1/jobs/{job_id}", headers=headers)
        assert r.status_code == 200, r.text
        job = r.json()
        if (until(job) if until is not None else job["status"] in statuses):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} at iteration {job['progress']} "
                                 f"after {timeout}s: {job}")
        time.sleep(0.05)


def submit(client: TestClient, headers: dict[str, str], **changes: Any) -> dict:
    """Submit SMALL_SINE with top-level sections replaced by ``changes``; returns the 201 job."""
    body = {**SMALL_SINE, **changes}
    r = client.post("/api/v1/jobs", json=body, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


def train_nav2d(client: TestClient, headers: dict[str, str], *, horizon: int) -> dict:
    """A small nav2d policy (2 iterations, 4 rollouts of ``horizon`` steps) trained through the API:
    the succeeded job."""
    job = submit(client, headers, task={"family": "nav2d", "rollouts": 4, "horizon": horizon},
                 outer={"iterations": 2, "meta_batch_size": 2}, eval={"every": 2, "tasks": 2, "steps": 1},
                 model={"name": "mlp"}, inner={"steps": 1})
    done = wait_for_job(client, job["id"], headers, timeout=120)
    assert done["status"] == "succeeded", done["error"]
    return done


def make_image_folder(root: Path, *, classes: int = 10, images: int = 3) -> Path:
    """A class-folder dataset of tiny random RGB PNGs (10 classes give every split at least 2)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(images):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


# ------------------------------------------------------------------------------------------- job rows


def new_job(factory: Any, **changes: Any) -> str:
    """SMALL_SINE with top-level sections replaced, stored queued for tenant acme; its id."""
    from service.jobs import create_job
    from workers.spec import JobSpec

    with factory() as session:
        return create_job(session=session, tenant="acme", spec=JobSpec.model_validate({**SMALL_SINE, **changes})).id


def wait_for_row(factory: Any, job_id: str, until: Callable[[Any], bool], timeout: float = 120.0) -> Any:
    """The job's row once ``until(row)`` holds, read from the database every 50 ms."""
    from service.db import Job

    deadline = time.monotonic() + timeout
    while True:
        with factory() as session:
            job = session.get(Job, job_id)
            if until(job):
                return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} is {job.status} at iteration {job.iteration} after {timeout}s "
                                 f"({job.error})")
        time.sleep(0.05)

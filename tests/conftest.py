"""Shared fixtures of the API tests: settings on a temporary data dir with a real SQLite file, an app
whose jobs train in this process (the real engine, ``workers.run.Trainer``, without Ray), and
keys: the admin's headers and a factory of tenant keys."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.main import create_app
from service.config import Settings
from workers.run import TrainResult, run_training

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


def make_settings(root: Path, **overrides: Any) -> Settings:
    (root / "datasets").mkdir(parents=True, exist_ok=True)
    values: dict[str, Any] = dict(
        data_dir=root / "data", cache_dir=root / "cache", admin_token=ADMIN_TOKEN, data_roots=[root / "datasets"],
        data_root=None,
        model_allowlist=["user_models"], metrics_flush_s=0.05, events_poll_s=0.05, auth_cache_s=0,
    )
    values.update(overrides)
    return Settings(**values)


def make_app(settings: Settings, runner: Callable[..., TrainResult] = in_process_runner) -> FastAPI:
    return create_app(settings, backend=lambda _settings: runner)


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    """The real Omniglot (marker ``data``): ``MAML_DATA_ROOT``, as ``make test`` and ``.ci/run`` set it.

    Fails rather than skips without it, so a run that was meant to read the real data cannot pass
    without having read it (deselect with ``-m "not data"``).
    """
    value = os.environ.get("MAML_DATA_ROOT")
    if not value:
        pytest.fail("MAML_DATA_ROOT is not set: the tests marked `data` read the real Omniglot from it "
                    "(`make test` sets it to ../shared/data; or deselect them with -m 'not data')", pytrace=False)
    root = Path(value).expanduser()
    for folder in (root, root / "omniglot"):
        if all((folder / name).is_file() for name in ("images_background.zip", "images_evaluation.zip")):
            return folder
    pytest.fail(f"MAML_DATA_ROOT={value}: no images_background.zip and images_evaluation.zip in it or in its "
                "omniglot/ folder", pytrace=False)


@pytest.fixture(scope="session")
def dataset_cache() -> Path:
    """A cache of decoded data shared by test sessions: ``MAML_CACHE_DIR``, else ``~/.cache/maml-service``."""
    return Path(os.environ.get("MAML_CACHE_DIR") or "~/.cache/maml-service").expanduser()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(make_app(settings)) as c:
        yield c


@pytest.fixture
def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def tenant_key(client: TestClient, admin_headers: dict[str, str]) -> Callable[[str], dict[str, str]]:
    """``tenant_key("acme")``: headers with a new key of that tenant."""

    def make(tenant: str) -> dict[str, str]:
        r = client.post("/api/v1/keys", json={"tenant": tenant, "name": "test"}, headers=admin_headers)
        assert r.status_code == 201, r.text
        return {"Authorization": f"Bearer {r.json()['secret']}"}

    return make


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

"""Shared helpers of the tests: the admin token, a small sinusoid job, settings on a temporary
data dir with a real SQLite file, an app whose jobs train in this process (the real engine,
``workers.run.run_training`` without Ray), and polling and submission helpers. Fixtures are in
``conftest.py``."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

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

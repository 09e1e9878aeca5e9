"""Faults of the embedded Ray under a real ``maml serve`` (uvicorn, SQLite, MAML_RAY_PROCESS=child).

``kill -9`` of the embedded raylet, or of its GCS, in the middle of a job: the API process stays
up and keeps answering (it is not a Ray driver; its reconciler child is, and dies with the
cluster); the supervisor restarts the reconciler with a fresh cluster, the job's lease expires,
and a new driver resumes it from its last checkpoint: the job ends ``succeeded`` in a second
attempt, every iteration stored once, one model. The readiness probe shows the outage and the
restart.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cluster import Replicas, descendants

pytestmark = [pytest.mark.e2e, pytest.mark.ray]
TERMINAL = ("succeeded", "failed", "cancelled")
ITERATIONS = 4000  # about 20 s of training here: the fault lands in the middle
JOB = {"name": "faults", "outer": {"iterations": ITERATIONS, "meta_batch_size": 4},
       "eval": {"every": ITERATIONS, "tasks": 5, "steps": 5}, "checkpoint": {"every": 100}}


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Replicas]:
    replicas = Replicas(tmp_path, None, {"RAY_ADDRESS": ""}, MAML_LEASE_TTL_S="4", MAML_RAY_NUM_CPUS="2")
    try:
        replicas.start("a")
        yield replicas
    finally:
        replicas.stop_all()


@pytest.mark.parametrize("victim", ["raylet", "gcs_server"])
def test_the_service_survives_its_embedded_ray_and_resumes_the_job(service: Replicas, victim: str) -> None:
    key = service.tenant_key("a")
    heartbeat = service.root / "data" / "reconciler" / "heartbeat.json"
    with service.client("a", key) as api:
        job_id = api.post("/jobs", json=JOB).json()["id"]
        deadline = time.monotonic() + 120
        while api.get(f"/jobs/{job_id}").json()["progress"]["iteration"] < 250:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        reconciler = json.loads(heartbeat.read_text())["pid"]
        [target] = [pid for pid, name in descendants(reconciler).items() if name == victim]
        os.kill(target, signal.SIGKILL)
        killed = time.monotonic()

        saw_outage = False
        deadline = time.monotonic() + 240
        while (job := api.get(f"/jobs/{job_id}").json())["status"] not in TERMINAL:
            assert time.monotonic() < deadline, job
            ready = httpx.get(f"{service.bases['a']}/readyz", timeout=5)  # the API answers throughout
            saw_outage |= ready.status_code == 503
            time.sleep(0.5)
        recovered_s = time.monotonic() - killed
        series = api.get(f"/jobs/{job_id}/metrics", params={"limit": 10_000}).json()["data"]
        models = api.get("/models").json()["data"]
    ready = httpx.get(f"{service.bases['a']}/readyz", timeout=5)
    assert job["status"] == "succeeded" and job["attempts"] == 2, job
    assert sorted(p["iteration"] for p in series) == list(range(1, ITERATIONS + 1))
    assert [m["id"] for m in models] == [job["model_id"]]
    assert saw_outage and ready.status_code == 200 and ready.json()["restarts"] >= 1, ready.text
    assert json.loads(heartbeat.read_text())["pid"] != reconciler
    assert service.procs["a"].poll() is None
    print(f"{victim} killed: job finished {recovered_s:.1f}s later")

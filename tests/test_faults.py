"""Faults of the embedded Ray under a real ``maml serve`` (uvicorn, SQLite, MAML_RAY_PROCESS=child).

``kill -9`` of the embedded raylet, of its GCS, or of the whole service, in the middle of a job: the API process stays
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
import torch
from cluster import Replicas, descendants
from safetensors.torch import load, load_file

from workers.run import run_training
from workers.spec import JobSpec

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


def test_killing_the_whole_service_resumes_the_job_to_the_weights_of_an_uninterrupted_run(
        service: Replicas, tmp_path: Path) -> None:
    """kill -9 of the API: its reconciler notices its parent is gone, stops the embedded cluster's
    drivers resumably (the job goes back to queued) and exits, leaving nothing running. The next
    start resumes the job from its checkpoint, and it ends with the weights an uninterrupted run of
    the same spec reaches."""
    key = service.tenant_key("a")
    heartbeat = service.root / "data" / "reconciler" / "heartbeat.json"
    spec = {**JOB, "outer": {"iterations": 1500, "meta_batch_size": 4}, "eval": {"every": 1500, "tasks": 5,
                                                                              "steps": 5}}
    with service.client("a", key) as api:
        job = api.post("/jobs", json=spec).json()
        deadline = time.monotonic() + 120
        while api.get(f"/jobs/{job['id']}").json()["progress"]["iteration"] < 250:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    reconciler = json.loads(heartbeat.read_text())["pid"]
    service.kill("a")
    deadline = time.monotonic() + 60
    while (row := service.row("jobs", job["id"]))["status"] != "queued" or Path(f"/proc/{reconciler}").exists():
        assert time.monotonic() < deadline, (row["status"], Path(f"/proc/{reconciler}").exists())
        time.sleep(0.3)
    assert row["lease_owner"] is None and row["iteration"] < 1500

    service.start("b")
    with service.client("b", key) as api:
        deadline = time.monotonic() + 240
        while (done := api.get(f"/jobs/{job['id']}").json())["status"] not in TERMINAL:
            assert time.monotonic() < deadline, done
            time.sleep(0.5)
        series = api.get(f"/jobs/{job['id']}/metrics", params={"limit": 10_000}).json()["data"]
        weights = load(api.get(f"/models/{done['model_id']}/weights").content)
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    assert sorted(p["iteration"] for p in series) == list(range(1, 1501))

    reference = run_training(JobSpec.model_validate(job["spec"]), run_dir=tmp_path / "reference",
                             reporter=lambda *_: None, should_stop=lambda: False, use_ray=False)
    expected = load_file(str(Path(reference.model_dir) / "model.safetensors"))
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.allclose(weights[name], tensor, rtol=1e-5, atol=1e-6), name

"""End to end: uvicorn in a subprocess, an embedded Ray cluster started by the app's lifespan, real
HTTP. Submit a small sinusoid job, follow it to success, adapt the model."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cluster import serve

pytestmark = pytest.mark.e2e
ADMIN = "e2e-admin-token-5c1d9e7a3b"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    env = {**os.environ, "MAML_DATA_DIR": str(tmp_path / "data"), "MAML_ADMIN_TOKEN": ADMIN,
           "MAML_RAY_NUM_CPUS": "2", "MAML_METRICS_FLUSH_S": "0.2", "RAY_ADDRESS": ""}
    env.pop("DATABASE_URL", None)
    with serve(env, tmp_path / "server.log") as base:
        yield base


def test_submit_train_on_ray_and_adapt_over_http(server: str) -> None:
    with httpx.Client(base_url=f"{server}/api/v1", timeout=30,
                      headers={"Authorization": f"Bearer {ADMIN}"}) as admin:
        secret = admin.post("/keys", json={"tenant": "e2e"}).json()["secret"]
    with httpx.Client(base_url=f"{server}/api/v1", timeout=30, headers={"Authorization": f"Bearer {secret}"}) as api:
        spec = {"name": "e2e-sine", "outer": {"iterations": 40, "meta_batch_size": 4},
                "eval": {"every": 20, "tasks": 5, "steps": 10}, "checkpoint": {"every": 10}}
        r = api.post("/jobs", json=spec)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 300
        while (job := api.get(f"/jobs/{job_id}").json())["status"] not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
        assert job["status"] == "succeeded", job["error"]
        assert job["progress"]["iteration"] == 40 and job["model_id"]
        series = api.get(f"/jobs/{job_id}/metrics").json()
        assert [p["iteration"] for p in series["data"]] == list(range(1, 41))

        xs = [-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 4.5]
        body = {"support": {"x": [[x] for x in xs], "y": [[3.0 * math.sin(x - 1.0)] for x in xs]},
                "query": {"x": [[0.5], [1.5]]}}
        r = api.post(f"/models/{job['model_id']}/adapt", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["support_loss_after"] < out["support_loss_before"] and len(out["predictions"]) == 2
        assert 'maml_jobs{status="succeeded"} 1.0' in httpx.get(f"{server}/metrics").text

"""End to end: uvicorn in a subprocess, an embedded Ray cluster started by the app's lifespan, real
HTTP. Submit a small sinusoid job, follow it to success, adapt the model."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]
ADMIN = "e2e-admin-token-5c1d9e7a3b"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path):
    port = _free_port()
    env = {**os.environ, "MAML_DATA_DIR": str(tmp_path / "data"), "MAML_ADMIN_TOKEN": ADMIN,
           "MAML_RAY_NUM_CPUS": "2", "MAML_METRICS_FLUSH_S": "0.2", "RAY_ADDRESS": ""}
    env.pop("DATABASE_URL", None)
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # starting Ray takes a while on a busy machine
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{(tmp_path / 'server.log').read_text()}")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server was not ready in time:\n{(tmp_path / 'server.log').read_text()}")
            time.sleep(0.5)
        yield base
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        # Ray's agents can outlive the server; they are in its process group (its own session).
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()


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

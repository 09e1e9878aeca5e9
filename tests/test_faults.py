"""Faults of the embedded Ray under a real ``maml serve`` (uvicorn, SQLite, MAML_RAY_PROCESS=child).

``kill -9`` of the embedded raylet or of its GCS in the middle of a job: the API process stays up
and keeps answering (it is not a Ray driver; its reconciler child is, and exits with the cluster);
the supervisor restarts the reconciler with a fresh cluster. The job ends ``succeeded``, every
iteration stored once, one model: its driver either finishes it first (it trains a one-worker job
itself and may outlive its raylet for a while), or dies with the cluster, and a new driver resumes
it from its last checkpoint once its lease has expired. The readiness probe shows the outage and
the restart. ``kill -9`` of the whole service, and a full disk during a checkpoint, below.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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

        # Until the job has ended and the service runs on a new cluster, the API answers throughout.
        saw_outage = False
        deadline = time.monotonic() + 240
        while True:
            job = api.get(f"/jobs/{job_id}").json()
            ready = httpx.get(f"{service.bases['a']}/readyz", timeout=5)
            saw_outage |= ready.status_code == 503
            if job["status"] in TERMINAL and ready.status_code == 200 and ready.json()["restarts"] >= 1:
                break
            assert time.monotonic() < deadline, (job, ready.text)
            time.sleep(0.5)
        recovered_s = time.monotonic() - killed
        series = api.get(f"/jobs/{job_id}/metrics", params={"limit": 10_000}).json()["data"]
        models = api.get("/models").json()["data"]
    # The driver (which trains a one-worker job itself) may outlive its raylet long enough to finish
    # (one attempt); otherwise it dies with the cluster and a new driver resumes from the checkpoint.
    assert job["status"] == "succeeded" and job["attempts"] in (1, 2), job
    assert sorted(p["iteration"] for p in series) == list(range(1, ITERATIONS + 1))
    assert [m["id"] for m in models] == [job["model_id"]]
    assert saw_outage and ready.status_code == 200 and ready.json()["restarts"] >= 1, ready.text
    assert json.loads(heartbeat.read_text())["pid"] != reconciler
    assert service.procs["a"].poll() is None
    print(f"{victim} killed: job ended in attempt {job['attempts']}, service on a new cluster {recovered_s:.1f}s later")


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


CHECK_AFTER = """
import os, sys
from workers.checkpoint import latest_checkpoint
ckpt = latest_checkpoint(sys.argv[1])
print("LATEST", ckpt.iteration if ckpt else None, "ENTRIES", sorted(os.listdir(sys.argv[1])))
"""


def test_a_full_disk_during_a_checkpoint_fails_the_job_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    """Checkpoints on a 16 MiB tmpfs (a private mount namespace: `unshare -m`, root only), a model whose
    checkpoint (weights and Adam's state) takes 12.6 MB: the first fits, the second fills the disk.
    The run fails naming the cause, the staging folder is removed, and the first checkpoint loads."""
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a private mount namespace here (unshare -m: {probe.stderr.decode().strip()}); "
                    "this test needs root")
    spec = {"name": "full-disk", "model": {"name": "mlp", "hidden": [1024, 1024]},
            "outer": {"iterations": 60, "meta_batch_size": 2}, "eval": {"every": 60, "tasks": 2, "steps": 1},
            "checkpoint": {"every": 20, "keep": 2}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    mount = tmp_path / "ckpt"
    mount.mkdir()
    script = ('mount -t tmpfs -o size=16m tmpfs "$1" || exit 90; '
              '"$2" -m workers train "$3" --run-dir "$4" --local --checkpoint-dir "$1"; echo "EXIT $?"; '
              '"$2" -c "$5" "$1"')
    done = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", str(mount), sys.executable,
                           str(tmp_path / "spec.json"), str(tmp_path / "run"), CHECK_AFTER],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    out = done.stdout + done.stderr
    assert "EXIT 1" in out, out[-3000:]
    assert "TrainingError: writing the checkpoint of iteration 40" in out and "No space left on device" in out
    assert "LATEST 20 ENTRIES ['iter_00000020']" in out, out[-3000:]

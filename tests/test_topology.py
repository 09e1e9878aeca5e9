"""The production topology on one machine: an external Ray cluster (``ray start --head``, its own
processes), API replicas as separate uvicorn processes joining it with ``MAML_RAY_ADDRESS``, one
PostgreSQL database. Drivers run on the cluster (``MAML_DRIVERS`` defaults to ``ray`` there), so:

* killing (``kill -9``) the replica that accepted a job, and then every replica, does not
  interrupt its training: the iteration counter keeps advancing in the database while no replica
  is alive; a new replica serves its status and events, and the job ends ``succeeded`` with one
  model, in one attempt;
* the same for a sweep;
* a replica started during a job does not train it a second time;
* a cancel through a replica that did not accept the job stops it within 10 s.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cluster import Replicas, ray_processes
from cluster import ray_head as start_ray_head
from helpers import fresh_database

pytestmark = [pytest.mark.e2e, pytest.mark.ray]
TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with start_ray_head(tmp_path_factory.mktemp("ray")) as env:
        yield env


@pytest.fixture
def replicas(ray_head: dict[str, str], tmp_path: Path) -> Iterator[Replicas]:
    with fresh_database("postgresql") as url:
        assert url is not None
        group = Replicas(tmp_path, url, ray_head, MAML_LEASE_TTL_S="4")
        try:
            yield group
        finally:
            group.stop_all()


def wait_until(read: Callable[[], dict[str, Any]], until: Callable[[dict[str, Any]], bool],
               timeout: float = 240.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not until(value := read()):
        assert time.monotonic() < deadline, value
        time.sleep(0.3)
    return value


def events(client: httpx.Client, path: str) -> list[tuple[str, Any]]:
    """The SSE stream of a run, to its ``end`` event."""
    received: list[tuple[str, Any]] = []
    name = ""
    with client.stream("GET", path, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                received.append((name, json.loads(line.split(":", 1)[1])))
                if name == "end":
                    break
    return received


JOB = {"name": "topology", "outer": {"iterations": 1500, "meta_batch_size": 4},
       "eval": {"every": 750, "tasks": 5, "steps": 5}, "checkpoint": {"every": 100}}


def test_killing_every_replica_does_not_interrupt_a_job(replicas: Replicas) -> None:
    replicas.start("a")
    replicas.start("b")
    key = replicas.tenant_key("a")
    with replicas.client("a", key) as a:
        r = a.post("/jobs", json=JOB)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
    with replicas.client("b", key) as b:
        wait_until(lambda: b.get(f"/jobs/{job_id}").json(), lambda j: j["progress"]["iteration"] >= 20)
    # Its lease is held by its driver, a process of the cluster (host:pid:...), not by a replica.
    owner_pid = int(replicas.row("jobs", job_id)["lease_owner"].split(":")[1])
    assert owner_pid not in {proc.pid for proc in replicas.procs.values()}
    replicas.kill("a")  # the replica that accepted it
    replicas.kill("b")
    job = replicas.row("jobs", job_id)
    assert job["status"] == "running", job
    before = job["iteration"]
    later = wait_until(lambda: replicas.row("jobs", job_id), lambda j: j["iteration"] >= before + 50, timeout=60)
    assert later["attempts"] == 1  # still the first driver, alone on the cluster

    replicas.start("c")
    with replicas.client("c", key) as c:
        stream = events(c, f"/jobs/{job_id}/events")
        job = c.get(f"/jobs/{job_id}").json()
        models = c.get("/models").json()
        series = c.get(f"/jobs/{job_id}/metrics", params={"limit": 10_000}).json()["data"]
    assert stream[-1][0] == "end" and stream[-1][1]["status"] == "succeeded"
    assert job["status"] == "succeeded" and job["attempts"] == 1 and job["error"] is None, job
    assert [m["id"] for m in models["data"]] == [job["model_id"]]
    iterations = [p["iteration"] for p in series]
    assert len(iterations) == len(set(iterations)) and iterations[-1] == 1500


def test_killing_the_replica_that_accepted_a_sweep_does_not_interrupt_it(replicas: Replicas) -> None:
    replicas.start("a")
    replicas.start("b")
    key = replicas.tenant_key("a")
    body = {"name": "topology-sweep", "base": {**JOB, "outer": {"iterations": 300, "meta_batch_size": 2},
                                               "eval": {"every": 150, "tasks": 2, "steps": 2}},
            "space": {"inner.lr": {"grid": [0.005, 0.01]}}, "scheduler": {"type": "none"},
            "max_concurrent_trials": 1}
    with replicas.client("a", key) as a:
        r = a.post("/sweeps", json=body)
        assert r.status_code == 201, r.text
        sweep_id = r.json()["id"]
    with replicas.client("b", key) as b:
        wait_until(lambda: b.get(f"/sweeps/{sweep_id}").json(),
                   lambda s: any(t["iteration"] >= 10 for t in s["trials"]) or s["status"] in TERMINAL)
        replicas.kill("a")
        progress = wait_until(lambda: b.get(f"/sweeps/{sweep_id}").json(),
                              lambda s: s["status"] in TERMINAL or sum(t["iteration"] for t in s["trials"]) >= 300)
        assert progress["attempts"] == 1 and progress["status"] != "failed", progress
        stream = events(b, f"/sweeps/{sweep_id}/events")
        sweep = b.get(f"/sweeps/{sweep_id}").json()
        models = b.get("/models").json()
    assert stream[-1][0] == "end"
    assert sweep["status"] == "succeeded" and sweep["attempts"] == 1, sweep
    assert [m["id"] for m in models["data"]] == [sweep["model_id"]]


def test_a_replica_started_during_a_job_does_not_train_it_again_and_a_cancel_through_it_stops_a_job(
        replicas: Replicas) -> None:
    replicas.start("a")
    key = replicas.tenant_key("a")
    with replicas.client("a", key) as a:
        first = a.post("/jobs", json={**JOB, "outer": {"iterations": 600, "meta_batch_size": 4}}).json()["id"]
        wait_until(lambda: a.get(f"/jobs/{first}").json(), lambda j: j["progress"]["iteration"] >= 10)
    replicas.start("b")
    with replicas.client("b", key) as b, replicas.client("a", key) as a:
        done = wait_until(lambda: b.get(f"/jobs/{first}").json(), lambda j: j["status"] in TERMINAL)
        series = b.get(f"/jobs/{first}/metrics", params={"limit": 10_000}).json()["data"]
        models = b.get("/models").json()
        assert done["status"] == "succeeded" and done["attempts"] == 1, done
        iterations = [p["iteration"] for p in series]
        assert sorted(iterations) == list(range(1, 601))  # each once: one driver
        assert [m["id"] for m in models["data"]] == [done["model_id"]]

        second = a.post("/jobs", json={**JOB, "outer": {"iterations": 1_000_000, "meta_batch_size": 4}}).json()["id"]
        wait_until(lambda: a.get(f"/jobs/{second}").json(), lambda j: j["progress"]["iteration"] >= 10)
        start = time.monotonic()
        assert b.post(f"/jobs/{second}/cancel").status_code == 202
        cancelled = wait_until(lambda: a.get(f"/jobs/{second}").json(), lambda j: j["status"] in TERMINAL,
                               timeout=30)
        elapsed = time.monotonic() - start
    assert cancelled["status"] == "cancelled" and elapsed < 10, (cancelled["status"], elapsed)


def test_a_killed_worker_restarts_the_group_from_the_last_checkpoint(replicas: Replicas,
                                                                     ray_head: dict[str, str]) -> None:
    replicas.start("a")
    key = replicas.tenant_key("a")
    with replicas.client("a", key) as a:
        # Two workers (a one-worker job trains in its driver): one of them is killed.
        job = {**JOB, "resources": {"workers": 2, "cpus_per_worker": 0.5}}
        job_id = a.post("/jobs", json=job).json()["id"]
        wait_until(lambda: a.get(f"/jobs/{job_id}").json(), lambda j: j["progress"]["iteration"] >= 150)
        group = set(ray_processes(ray_head, "ShardWorker"))
        assert len(group) == 2, group
        os.kill(min(group), signal.SIGKILL)
        # The driver closes the group and starts a new one from the last checkpoint (unless the job
        # ends first: then its series below shows the replay).
        seen: set[int] = set()

        def look() -> dict[str, Any]:
            seen.update(set(ray_processes(ray_head, "ShardWorker")) - group)
            return a.get(f"/jobs/{job_id}").json()

        job = wait_until(look, lambda j: j["status"] in TERMINAL)
        series = a.get(f"/jobs/{job_id}/metrics", params={"limit": 10_000}).json()["data"]
    assert seen or job["status"] != "succeeded", "no new worker group was seen"
    # The driver restarted its worker group from the checkpoint itself: no second attempt.
    assert job["status"] == "succeeded" and job["attempts"] == 1, job
    assert sorted(p["iteration"] for p in series) == list(range(1, 1501))

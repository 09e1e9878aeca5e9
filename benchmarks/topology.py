"""The production topology on one machine: what moving job drivers onto the Ray cluster costs and buys.

Everything is real: an external Ray cluster (``ray start --head``), API replicas as uvicorn
processes given its address (``MAML_RAY_ADDRESS``), one PostgreSQL database (a fresh one on the
local server, dropped afterwards), the processes of ``tests/cluster.py``. Small sinusoid jobs over
HTTP. With the shipped settings a replica's API process does not join Ray: its reconciler child
(``python -m service.reconciler``, ``MAML_RAY_PROCESS=child``) looks for queued runs every
``MAML_RECONCILE_INTERVAL_S`` and launches a detached driver actor for each (``MAML_DRIVERS=ray``).

1. Submit to first iteration on a warm cluster: ``POST /api/v1/jobs`` to the first
   ``GET /api/v1/jobs/{id}`` (polled every 50 ms) that shows iteration >= 1, with drivers on the
   cluster (the shipped settings) and, as the baseline, the old way: a replica with
   ``MAML_DRIVERS=process`` and ``MAML_RAY_PROCESS=api`` (its API process joins Ray and drives the
   job on a thread of its own), on the same cluster and database. One warm-up job each, then rounds
   that alternate the two. While a ray round runs the baseline replica is paused (SIGSTOP): awake,
   its maintenance would take the queued job itself. Who drove each job is checked from its lease
   (``host:pid:...``). Each job is cancelled once it has iterated, and ended before the next.
2. Killing the replica that accepted a job, then the only other one, as lost pods (``kill -9`` of
   the API's process group and of its reconciler's): the job's iteration is read from the database
   every 100 ms; the longest gap between two increases after each kill against the median gap
   before the first, and the job's attempts.
3. Killing the job's driver (``kill -9`` of the pid in its lease), with the shipped lease
   (``MAML_LEASE_TTL_S`` unset: 20 s) and one replica alive: when a replica requeues the run, when a
   new driver holds the lease, when the iteration counter passes its value before the kill, and
   how many iterations were replayed from the last checkpoint (every 100 iterations).

    .venv/bin/python -m benchmarks.topology [--quick]   # results/topology.{md,json} (topology.quick.* with --quick)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(REPO / "tests"))
from cluster import Replicas, descendants, ray_head, ray_processes  # noqa: E402
from helpers import fresh_database  # noqa: E402

from benchmarks import service as service_benchmark  # noqa: E402

TERMINAL = ("succeeded", "failed", "cancelled")
TARGET_FIRST_ITERATION_S = 5.0  # the bound on submit -> first iteration with drivers on Ray
CHECKPOINT_EVERY = 100
# Long enough never to end here; its metric series keeps every iteration (MAML_MAX_METRIC_POINTS set
# to it: past that many points the stored iteration would move in steps of iterations / points).
ITERATIONS = 1_000_000


def job_spec(name: str, iterations: int) -> dict[str, Any]:
    """A small sinusoid job (the default task and model); evaluation only at its end."""
    return {"name": name, "outer": {"iterations": iterations, "meta_batch_size": 4},
            "eval": {"every": iterations, "tasks": 5, "steps": 5}, "checkpoint": {"every": CHECKPOINT_EVERY}}


def machine_info() -> dict[str, Any]:
    import ray

    return {**service_benchmark.machine_info(), "ray": ray.__version__}


def code_version() -> dict[str, Any]:
    """The commit measured, and the files of the service that differ from it (a shared checkout)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    changed = [line[3:] for line in git("status", "--porcelain", "--", "api", "service", "workers").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted": changed}


def lease_pid(owner: str | None) -> int | None:
    """The pid in a lease owner ``host:pid:uuid``."""
    return int(owner.split(":")[1]) if owner else None


class JobRows:
    """The job's row read straight from the database (one pooled connection, a fresh transaction a read)."""

    def __init__(self, url: str) -> None:
        self.engine: Engine = create_engine(url, pool_size=1, max_overflow=1)

    def __call__(self, job_id: str) -> dict[str, Any]:
        with self.engine.connect() as connection:
            return dict(connection.execute(text(
                "SELECT status, iteration, attempts, lease_owner, lease_expires_at FROM jobs WHERE id = :id"),
                {"id": job_id}).mappings().one())

    def close(self) -> None:
        self.engine.dispose()


class Poller:
    """Reads a job's row every ``period`` seconds on a thread: samples (monotonic time, row)."""

    def __init__(self, rows: JobRows, job_id: str, period: float = 0.1) -> None:
        self.rows, self.job_id, self.period = rows, job_id, period
        self.samples: list[tuple[float, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="topology-poller", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            with contextlib.suppress(Exception):  # a slow or failed read is a missing sample, not an error
                self.samples.append((started, self.rows(self.job_id)))
            self._stop.wait(max(0.0, self.period - (time.monotonic() - started)))

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def wait(self, until: Callable[[dict[str, Any]], bool], timeout: float,
             since: float | None = None) -> tuple[float, dict[str, Any]]:
        """The first sample taken at or after ``since`` (default: now) for which ``until`` holds."""
        since = time.monotonic() if since is None else since
        seen, deadline = 0, time.monotonic() + timeout
        while time.monotonic() < deadline:
            samples = self.samples[seen:]
            seen += len(samples)
            for t, row in samples:
                if t >= since and until(row):
                    return t, row
            time.sleep(self.period / 2)
        raise TimeoutError(f"job {self.job_id}: not reached within {timeout}s; last {self.samples[-1:]}")


def wait_for(read: Callable[[], dict[str, Any]], until: Callable[[dict[str, Any]], bool], *, timeout: float,
             period: float = 0.05) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not until(value := read()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"not reached within {timeout}s: {value}")
        time.sleep(period)
    return value


# ------------------------------------------------------------------------------ 1. first iteration


def first_iteration(group: Replicas, replica: str, key: str, rows: JobRows, name: str) -> dict[str, Any]:
    """POST a job to ``replica``, time it to the first GET showing iteration >= 1, then cancel it and
    wait for it to end (so the next job finds a quiet cluster)."""
    with group.client(replica, key) as client:
        start = time.monotonic()
        r = client.post("/jobs", json=job_spec(name, ITERATIONS))
        posted = time.monotonic() - start
        if r.status_code != 201:
            raise RuntimeError(f"POST /jobs answered {r.status_code}: {r.text}")
        job_id = r.json()["id"]
        claimed: list[float] = []  # when a GET first showed it running: its driver has claimed it

        def seen(job: dict[str, Any]) -> bool:
            if job["status"] != "queued" and not claimed:
                claimed.append(time.monotonic() - start)
            return job["progress"]["iteration"] >= 1

        job = wait_for(lambda: client.get(f"/jobs/{job_id}").json(), seen, timeout=120)
        latency = time.monotonic() - start
        owner = rows(job_id)["lease_owner"]
        client.post(f"/jobs/{job_id}/cancel")
        ended = wait_for(lambda: client.get(f"/jobs/{job_id}").json(), lambda j: j["status"] in TERMINAL,
                         timeout=60, period=0.2)
    return {"job": job_id, "seconds": round(latency, 3), "post_s": round(posted, 3), "claimed_s": round(claimed[0], 3),
            "iteration_seen": job["progress"]["iteration"], "driver_pid": lease_pid(owner),
            "replica_pid": group.procs[replica].pid, "status": ended["status"]}


def bench_first_iteration(group: Replicas, key: str, rows: JobRows, repeats: int) -> dict[str, Any]:
    replicas = {"ray": "api-ray", "process": "api-process"}
    paused = group.procs[replicas["process"]]
    runs: dict[str, list[dict[str, Any]]] = {"ray": [], "process": []}
    warmup: dict[str, dict[str, Any]] = {}
    try:
        for r in range(repeats + 1):  # round 0: the warm-up job of each
            for mode in (("ray", "process") if r % 2 == 0 else ("process", "ray")):
                if mode == "ray":
                    os.kill(paused.pid, signal.SIGSTOP)
                try:
                    run = first_iteration(group, replicas[mode], key, rows, f"first-{mode}-{r}")
                finally:
                    if mode == "ray":
                        os.kill(paused.pid, signal.SIGCONT)
                driven_here = run["driver_pid"] == run["replica_pid"]
                run["driven_by"] = "replica" if driven_here else "cluster"
                if driven_here != (mode == "process"):
                    raise RuntimeError(f"{mode} job {run['job']} was driven by the {run['driven_by']}: {run}")
                print(json.dumps({"drivers": mode, "round": r, **run}), flush=True)
                if r == 0:
                    warmup[mode] = run
                else:
                    runs[mode].append(run)
                time.sleep(1.0)  # the ended driver's clean-up (actor killed, worker group closed)
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    stats = {}
    for mode, series in runs.items():
        seconds = [run["seconds"] for run in series]
        claims = [run["claimed_s"] for run in series]
        stats[mode] = {"median_s": round(statistics.median(seconds), 3), "min_s": min(seconds), "max_s": max(seconds),
                       "all_s": seconds, "warmup_s": warmup[mode]["seconds"],
                       "claimed_median_s": round(statistics.median(claims), 3),
                       "claim_to_first_iteration_median_s": round(statistics.median(
                           [run["seconds"] - run["claimed_s"] for run in series]), 3)}
    stats["ratio_ray_over_process"] = round(stats["ray"]["median_s"] / stats["process"]["median_s"], 2)
    return {"repeats": repeats, "stats": stats, "runs": runs, "warmup": warmup}


# ------------------------------------------------------------------------ 2. killing the replicas


def reconcilers(group: Replicas, replica: str) -> list[int]:
    """The replica's reconciler child (``python -m service.reconciler``, MAML_RAY_PROCESS=child): its
    process group is its own, so killing the replica's group leaves it running."""
    found = []
    for pid in descendants(group.procs[replica].pid):
        with contextlib.suppress(OSError):
            if b"service.reconciler" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
    return found


def kill_pod(group: Replicas, replica: str) -> list[int]:
    """kill -9 of everything a replica's pod holds: the API's process group and its reconciler's."""
    groups = [os.getpgid(pid) for pid in reconcilers(group, replica)]
    group.kill(replica)
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    return groups


def increases(samples: list[tuple[float, dict[str, Any]]]) -> list[float]:
    """The times at which the sampled iteration went up."""
    return [t for (_, a), (t, b) in zip(samples, samples[1:], strict=False) if b["iteration"] > a["iteration"]]


def rate(samples: list[tuple[float, dict[str, Any]]], start: float, end: float) -> float:
    inside = [(t, row["iteration"]) for t, row in samples if start <= t <= end]
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0]) if len(inside) > 1 else 0.0


def bench_replica_kill(group: Replicas, key: str, rows: JobRows, window: float) -> tuple[str, dict[str, Any]]:
    """Submit through ``api-a``, kill it, then kill ``api-b``; the job keeps training. Returns its id
    (still running: section 3 takes it on)."""
    with group.client("api-a", key) as a:
        r = a.post("/jobs", json=job_spec("replica-kill", ITERATIONS))
        job_id = r.json()["id"]
    with Poller(rows, job_id) as poller:
        poller.wait(lambda j: j["iteration"] >= 20, timeout=120)
        before = rows(job_id)
        t0 = time.monotonic()
        time.sleep(window)
        t_kill_a = time.monotonic()
        killed = {"api-a": kill_pod(group, "api-a")}  # the replica that accepted the job
        time.sleep(window)
        t_kill_b = time.monotonic()
        killed["api-b"] = kill_pod(group, "api-b")  # no replica is left
        time.sleep(window)
        t_end = time.monotonic()
        samples = list(poller.samples)
    after = rows(job_id)
    ups = increases(samples)
    gaps_before = [b - a for a, b in zip(ups, ups[1:], strict=False) if t0 <= a and b <= t_kill_a]
    median_before = statistics.median(gaps_before)

    def around(kill: float, end: float) -> dict[str, Any]:
        # The gap that spans the kill (last increase before it to the first after) and every later one.
        last = max((t for t in ups if t <= kill), default=kill)
        later = [t for t in ups if kill < t <= end]
        gaps = [b - a for a, b in zip([last, *later], later, strict=False)]
        longest = max(gaps) if gaps else end - last
        return {"longest_gap_s": round(longest, 3), "ratio_to_median_before": round(longest / median_before, 2),
                "increases": len(later), "iterations_per_s": round(rate(samples, kill, end), 1)}

    result = {
        "window_s": window, "poll_s": poller.period, "samples": len(samples),
        "before": {"median_gap_s": round(median_before, 3), "max_gap_s": round(max(gaps_before), 3),
                   "increases": len(gaps_before) + 1, "iterations_per_s": round(rate(samples, t0, t_kill_a), 1)},
        "after_killing_accepting_replica": around(t_kill_a, t_kill_b),
        "after_killing_last_replica": around(t_kill_b, t_end),
        "attempts_before": before["attempts"], "attempts_after": after["attempts"],
        "same_driver": before["lease_owner"] == after["lease_owner"], "status_after": after["status"],
        "driver_pid": lease_pid(before["lease_owner"]),
        "iterations": [before["iteration"], after["iteration"]],
        "series": [(round(t - t0, 3), row["iteration"]) for t, row in samples],
        "kills_at_s": [round(t_kill_a - t0, 3), round(t_kill_b - t0, 3)],
        "reconciler_groups_killed": killed,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "series"}), flush=True)
    return job_id, result


# -------------------------------------------------------------------------- 3. killing the driver


def checkpoints(root: Path, job_id: str) -> list[int]:
    folder = root / "data" / "storage" / "jobs" / job_id / "checkpoints"
    return sorted(int(p.name.removeprefix("iter_")) for p in folder.glob("iter_*") if p.name[5:].isdigit())


def bench_driver_kill(group: Replicas, head_env: dict[str, str], rows: JobRows, job_id: str,
                      ttl: float) -> dict[str, Any]:
    """kill -9 of the job's driver with ``api-c`` alive; times from the kill."""
    with Poller(rows, job_id) as poller:
        poller.wait(lambda j: j["iteration"] >= 1, timeout=30)
        time.sleep(1.0)
        row = rows(job_id)
        owner, pid = row["lease_owner"], lease_pid(row["lease_owner"])
        if pid is None or pid in {proc.pid for proc in group.procs.values()}:
            raise RuntimeError(f"job {job_id} is driven by a replica ({owner})")
        workers_before = ray_processes(head_env, "ShardWorker")
        expires = row["lease_expires_at"]
        kill_wall = datetime.now(UTC)
        t_kill = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        # The new driver resumes from the newest checkpoint there now (none is written on kill -9, and
        # no new driver starts before the lease expires).
        saved = checkpoints(group.root, job_id)
        lease_left = ((expires if expires.tzinfo else expires.replace(tzinfo=UTC)) - kill_wall).total_seconds()
        t_lease, new = poller.wait(lambda j: j["lease_owner"] not in (None, owner), timeout=ttl * 3, since=t_kill)
        # The requeue leaves the stored iteration as the killed driver last reported it.
        pre_kill = max(r["iteration"] for t, r in poller.samples if t < t_lease)
        t_passed, _ = poller.wait(lambda j: j["lease_owner"] not in (None, owner) and j["iteration"] > pre_kill,
                                  timeout=120, since=t_lease)
        samples = list(poller.samples)
    queued = [t for t, r in samples if t >= t_kill and r["status"] == "queued"]
    t_report, first = next((t, r) for t, r in samples
                           if t >= t_lease and r["lease_owner"] == new["lease_owner"] and r["iteration"] != pre_kill)
    resumed_from = saved[-1] if saved else 0
    result = {
        "lease_ttl_s": ttl, "lease_left_at_kill_s": round(lease_left, 2), "killed_pid": pid,
        "requeued_s": round(queued[0] - t_kill, 2) if queued else None,
        "new_lease_s": round(t_lease - t_kill, 2),
        "first_report_s": round(t_report - t_kill, 2),
        "past_pre_kill_iteration_s": round(t_passed - t_kill, 2),
        "pre_kill_iteration": pre_kill, "resumed_from_checkpoint": resumed_from,
        "first_iteration_reported_after": first["iteration"],
        # At least: the killed driver may have trained past its last flushed report (and past a checkpoint
        # newer than that report, as when the checkpoint is ahead of the stored iteration).
        "iterations_replayed_at_least": max(0, pre_kill - resumed_from), "checkpoints_at_kill": saved,
        "attempts_after": new["attempts"], "new_driver_pid": lease_pid(new["lease_owner"]),
        "shard_workers_before": workers_before, "shard_workers_after": ray_processes(head_env, "ShardWorker"),
        "series": [(round(t - t_kill, 3), r["iteration"], r["status"], lease_pid(r["lease_owner"]))
                   for t, r in samples if t >= t_kill - 2],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "series"}), flush=True)
    return result


# ------------------------------------------------------------------------------------------ report


def write_report(result: dict[str, Any], stem: str) -> None:
    m, s, code = result["machine"], result["settings"], result["code"]
    first, kill, take = result["first_iteration"], result["replica_kill"], result["driver_kill"]
    fs = first["stats"]
    met = "yes" if fs["ray"]["median_s"] <= TARGET_FIRST_ITERATION_S else "**no**"
    worst = "yes" if fs["ray"]["max_s"] <= TARGET_FIRST_ITERATION_S else "**no**"
    lines = [
        "# Production topology (`benchmarks/topology.py`): drivers on the Ray cluster", "",
        f"Run {result['date']} with `python -m benchmarks.topology{' --quick' if result['quick'] else ''}` "
        f"in {result['total_s']:.0f} s.", "",
        f"Machine: {m['cpu']}, {m['cores']} cores (shared with other work: 1-minute load average "
        f"{m['load_avg_at_start'][0]:.1f} at the start, {m['load_avg_at_end'][0]:.1f} at the end), Python "
        f"{m['python']}, torch {m['torch']}, Ray {m['ray']}.", "",
        "Topology, all on this machine: `ray start --head --num-cpus 2` (token auth), API replicas as "
        "`uvicorn --factory api.main:create_app` processes given its address (`MAML_RAY_ADDRESS`), one fresh "
        "PostgreSQL database on the local server; the processes of `tests/cluster.py`. With the shipped "
        "settings a replica's API process does not join Ray: its reconciler child (`python -m "
        "service.reconciler`) requeues runs whose lease expired and launches a detached driver actor for "
        f"each queued run, every {result['maintenance_period_s']:g} s. Jobs: sinusoid, MLP 1-40-40-1, "
        "meta-batch 4, checkpoint every 100 iterations, no evaluation before the end.", "",
        f"Code: commit {code['commit']}" + (f", with uncommitted changes to {', '.join(code['uncommitted'])} "
                                            "(another engineer's work in the same checkout)"
                                            if code["uncommitted"] else "") + ".", "",
        "Settings: " + "; ".join(f"`{k}` {v}" for k, v in s.items()) + ".", "",
        "## Submit to first iteration, warm cluster", "",
        f"`POST /api/v1/jobs` to the first `GET /api/v1/jobs/{{id}}` (every 50 ms) with iteration >= 1; "
        f"{first['repeats']} jobs per mode after one warm-up job each, rounds alternating the two modes; "
        "each job is cancelled once it iterates and ends before the next. Baseline, the old way: a replica with "
        "`MAML_DRIVERS=process` and `MAML_RAY_PROCESS=api` (its API process joins Ray and drives the job on a "
        "thread of its own) on the same cluster and database; it is paused (SIGSTOP) during the ray rounds so "
        "that it cannot claim their queued jobs. Each job's "
        "lease names the process that drove it: every ray job was driven by a cluster process, every "
        "process job by its replica.", "",
        "| drivers | median s | min s | max s | ratio to process | median: submit to claim s | "
        "median: claim to first iteration s | warm-up job s |", "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in ("ray", "process"):
        st = fs[mode]
        ratio = fs["ratio_ray_over_process"] if mode == "ray" else 1.0
        lines.append(f"| `{mode}` | {st['median_s']:.2f} | {st['min_s']:.2f} | {st['max_s']:.2f} | **{ratio:.2f}x** | "
                     f"{st['claimed_median_s']:.2f} | {st['claim_to_first_iteration_median_s']:.2f} | "
                     f"{st['warmup_s']:.2f} |")
    requeued = "not seen" if take["requeued_s"] is None else f"{take['requeued_s']:.2f}"
    lines += ["", f"Target (issue): drivers=ray at most {TARGET_FIRST_ITERATION_S:g} s: median {met}, "
              f"every run {worst}. Every run: ray {fs['ray']['all_s']}, process {fs['process']['all_s']}.", "",
              "Claim: the first GET that no longer shows the job queued (its driver has claimed the row). "
              "With drivers on Ray the replica's reconciler finds the job at its next round (every "
              f"{result['maintenance_period_s']:g} s) and starts the driver actor (a Ray worker process of its "
              "own, which imports the service), which trains a one-worker CPU job itself (it reserved the "
              "worker's CPUs); the baseline replica claims at once and starts the job's worker group (a Ray "
              "actor).", "",
              "## Killing the replica that accepted a job (drivers=ray)", "",
              f"Two replicas; the job is posted to `api-a`; its row is read from the database every "
              f"{kill['poll_s'] * 1000:.0f} ms. After {kill['window_s']:g} s `api-a` is killed as a lost pod "
              f"(`kill -9` of the API's process group and of its reconciler's), {kill['window_s']:g} s later "
              f"`api-b`, the only replica left; then "
              f"{kill['window_s']:g} s with no replica at all. The driver writes its progress every "
              f"`MAML_METRICS_FLUSH_S={s['MAML_METRICS_FLUSH_S']}` s, so the gaps between increases of the "
              "stored iteration are about that long.", "",
              "| window | increases | median gap s | longest gap s | longest / median before | iterations/s |",
              "|---|---:|---:|---:|---:|---:|",
              f"| before the kills | {kill['before']['increases']} | {kill['before']['median_gap_s']:.3f} | "
              f"{kill['before']['max_gap_s']:.3f} | "
              f"{kill['before']['max_gap_s'] / kill['before']['median_gap_s']:.2f}x | "
              f"{kill['before']['iterations_per_s']:.1f} |"]
    for label, key in (("after killing `api-a` (accepted the job)", "after_killing_accepting_replica"),
                       ("after killing `api-b` (no replica left)", "after_killing_last_replica")):
        w = kill[key]
        lines.append(f"| {label} | {w['increases']} | | {w['longest_gap_s']:.3f} | "
                     f"**{w['ratio_to_median_before']:.2f}x** | {w['iterations_per_s']:.1f} |")
    lines += ["", f"Attempts: {kill['attempts_before']} before, {kill['attempts_after']} after; the same driver "
              f"(lease owner) throughout: {'yes' if kill['same_driver'] else '**no**'}; iteration "
              f"{kill['iterations'][0]} -> {kill['iterations'][1]}, status {kill['status_after']}.", "",
              "## Killing the job's driver (drivers=ray, shipped lease)", "",
              f"The same job, with replica `api-c` started after the kills above. `kill -9` of the driver (the pid "
              f"in the job's `lease_owner`; Ray then ends the worker group it owned). Lease `MAML_LEASE_TTL_S` "
              f"unset = {take['lease_ttl_s']:g} s, renewed every {take['lease_ttl_s'] / 4:g} s; the replica's "
              f"reconciler (requeue expired leases, launch drivers) runs every {result['maintenance_period_s']:g} "
              "s. Expected: the lease left at the kill (between three quarters of the TTL and the TTL) + up to "
              "one reconciler round + the driver's start, then the worker group's start and the replay from "
              "the last checkpoint.", "",
              "| event | seconds after the kill |", "|---|---:|",
              f"| the killed driver's lease expires | {take['lease_left_at_kill_s']:.2f} |",
              f"| a replica requeues the job | {requeued} |",
              f"| a new driver holds the lease | {take['new_lease_s']:.2f} |",
              f"| its first progress report | {take['first_report_s']:.2f} |",
              f"| the iteration passes its value before the kill | {take['past_pre_kill_iteration_s']:.2f} |", "",
              f"Takeover (new lease) against the lease TTL: **{take['new_lease_s'] / take['lease_ttl_s']:.2f}x**. "
              f"Stored iteration at the kill {take['pre_kill_iteration']} (the driver's last report; it writes "
              f"every {s['MAML_METRICS_FLUSH_S']} s, so it may have trained a few more), checkpoints on disk "
              f"{take['checkpoints_at_kill']}; the new driver resumed from {take['resumed_from_checkpoint']} "
              f"(its first report: iteration {take['first_iteration_reported_after']}): at least "
              f"{take['iterations_replayed_at_least']} iterations replayed (at most one checkpoint interval, "
              f"{CHECKPOINT_EVERY}). Attempts after: {take['attempts_after']}.", "",
              "Raw numbers (every run, the sampled iteration series): `results/" + stem + ".json`."]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 jobs per mode, shorter windows")
    parser.add_argument("--repeats", type=int, default=None, help="jobs per mode after the warm-up (default 5)")
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 5)
    window = 3.0 if args.quick else 5.0
    stem = "topology.quick" if args.quick else "topology"
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": args.quick,
                              "machine": machine_info(), "code": code_version()}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="maml-topology-") as tmp, ray_head(Path(tmp)) as head_env, \
            fresh_database("postgresql") as url:
        assert url is not None
        root = Path(tmp)
        group = Replicas(root, url, head_env, MAML_MAX_METRIC_POINTS=str(ITERATIONS))
        for name in ("MAML_LEASE_TTL_S", "MAML_DRIVERS", "MAML_RAY_PROCESS", "MAML_RECONCILE_INTERVAL_S",
                     "MAML_MAX_CONCURRENT_JOBS", "MAML_DRIVER_CPUS"):
            group.env.pop(name, None)  # the shipped defaults
        from service.config import Settings

        defaults = {name: field.default for name, field in Settings.model_fields.items()}
        ttl = defaults["lease_ttl_s"]
        result["settings"] = {
            "MAML_LEASE_TTL_S": f"unset ({ttl:g})",
            "MAML_DRIVERS": "unset (ray) / process for the baseline",
            "MAML_RAY_PROCESS": f"unset ({defaults['ray_process']}: a reconciler child joins Ray and launches the "
                                "drivers) / api for the baseline (the API process joins Ray and drives)",
            "MAML_RECONCILE_INTERVAL_S": f"unset ({defaults['reconcile_interval_s']:g})",
            "MAML_DRIVER_CPUS": f"unset ({defaults['driver_cpus']:g})",
            "MAML_METRICS_FLUSH_S": group.env["MAML_METRICS_FLUSH_S"],
            "MAML_EVENTS_POLL_S": group.env["MAML_EVENTS_POLL_S"],
            "MAML_MAX_METRIC_POINTS": ITERATIONS, "MAML_MAX_CONCURRENT_JOBS": "unset (1)", "ray --num-cpus": 2,
            "database": "PostgreSQL (local server)"}
        result["maintenance_period_s"] = min(defaults["reconcile_interval_s"], ttl / 4)
        rows = JobRows(url)
        try:
            group.start("api-ray")
            group.start("api-process", MAML_DRIVERS="process", MAML_RAY_PROCESS="api")  # the old way
            key = group.tenant_key("api-ray")
            result["first_iteration"] = bench_first_iteration(group, key, rows, repeats)
            group.stop("api-process")
            group.stop("api-ray")

            group.start("api-a")
            group.start("api-b")
            job_id, result["replica_kill"] = bench_replica_kill(group, key, rows, window)
            group.start("api-c")
            result["driver_kill"] = bench_driver_kill(group, head_env, rows, job_id, ttl)
            with group.client("api-c", key) as c:
                c.post(f"/jobs/{job_id}/cancel")
                wait_for(lambda: c.get(f"/jobs/{job_id}").json(), lambda j: j["status"] in TERMINAL, timeout=60,
                         period=0.3)
        finally:
            rows.close()
            group.stop_all()
    result["total_s"] = round(time.monotonic() - started, 1)
    result["machine"]["load_avg_at_end"] = list(os.getloadavg())
    fs = result["first_iteration"]["stats"]
    take = result["driver_kill"]
    summary = [
        ("submit -> first iteration, drivers=ray (median s)", fs["ray"]["median_s"], fs["process"]["median_s"],
         fs["ratio_ray_over_process"]),
        ("longest iteration gap after killing the accepting replica (s)",
         result["replica_kill"]["after_killing_accepting_replica"]["longest_gap_s"],
         result["replica_kill"]["before"]["median_gap_s"],
         result["replica_kill"]["after_killing_accepting_replica"]["ratio_to_median_before"]),
        ("longest iteration gap after killing the last replica (s)",
         result["replica_kill"]["after_killing_last_replica"]["longest_gap_s"],
         result["replica_kill"]["before"]["median_gap_s"],
         result["replica_kill"]["after_killing_last_replica"]["ratio_to_median_before"]),
        ("driver killed: new lease after (s)", take["new_lease_s"], take["lease_ttl_s"],
         round(take["new_lease_s"] / take["lease_ttl_s"], 2)),
        ("driver killed: iteration past its pre-kill value after (s)", take["past_pre_kill_iteration_s"],
         take["lease_ttl_s"], round(take["past_pre_kill_iteration_s"] / take["lease_ttl_s"], 2)),
    ]
    print(f"\n{'measure':<64} {'value':>8} {'baseline':>9} {'ratio':>7}")
    for label, value, base, ratio in summary:
        print(f"{label:<64} {value:>8.2f} {base:>9.2f} {ratio:>6.2f}x")
    print("baselines: drivers=process median; median gap before the kills; the lease TTL")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))
    write_report(result, stem)
    print(f"wrote results/{stem}.md and .json", flush=True)


if __name__ == "__main__":
    main()

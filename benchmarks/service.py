"""Service benchmark: adaptation latency over HTTP, and ``GET /jobs`` pages with 10,000 jobs stored.

Everything goes through the real server: uvicorn in a subprocess (``api.main:create_app`` with
``MAML_*`` settings on a temporary data dir) with its embedded Ray cluster, real HTTP from this
process (httpx, keep-alive connections). Run it with

    .venv/bin/python -m benchmarks.service [--quick] [--repeats 2]

1. 10,000 ``succeeded`` job rows are written straight into the server's SQLite file before it
   starts (``service.db`` with the same settings), over two tenants, so the manager leaves them be.
2. ``GET /api/v1/jobs`` pages (limit 100) at offsets 0, 5000 and 9900 as the admin (all 10,000),
   with and without ``status=succeeded``; and at offsets 0 and 4900 as one tenant (5,000 jobs).
3. Two small real jobs are submitted over HTTP and trained on Ray: sinusoid MLP (50 iterations)
   and Omniglot 5-way 1-shot Conv4 (a few iterations). Latency does not depend on how well a
   model is trained, only on its shape.
4. ``POST /api/v1/models/{id}/adapt`` latency with 1 client (sequential) and 16 concurrent clients
   (threads, one connection each): sinusoid K=10, 10 steps, 10 query points; Omniglot 5-way 1-shot,
   10 steps, 5 support PNGs of real drawings, 5 or 75 query PNGs (one or 15 per class).
5. A saturation probe: twice as many clients as the admission limits hold (default 4 running + 16
   queued: 40 clients), to show the 429 + Retry-After behaviour.

Each series runs ``--repeats`` times; the tables give the median over repeats of each statistic,
and the server's CPU time per request (from /proc), which the load of a shared machine does not move.
Latencies are client-side (request sent to body read), so they include HTTP and JSON on both ends.

The server's embedded Ray cluster can be killed from outside (on a shared machine, by another
user's Ray clean-up); the server's Ray driver then ends the API process once it gives up
reconnecting. The benchmark watches the server's GCS, drops a run
during which it vanished and restarts the server; after ``--ray-restarts`` restarts, once the
models are trained, it serves ``--fallback-app`` (the same app without a training backend) instead.
The report says which app served each series.

Results: ``results/service.md`` and ``results/service.json`` (``service-quick.*`` with --quick).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import insert

from api.main import create_app
from service.adaptation import intra_op_threads
from service.config import Settings
from service.db import Job, init_db, make_engine, new_id
from workers.spec import JobSpec

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
ADMIN_TOKEN = "bench-admin-token-4e8b1f0c7a29d6e3"
SEED_TENANTS = ("bench-a", "bench-b")
TARGETS = {"sinusoid_p50_ms": 10.0, "omniglot_p50_ms": 60.0, "jobs_page_p50_ms": 50.0}

# Profiling findings of earlier runs, in RESULTS beside the report, which points to them (not re-measured).
PROFILING = "service-profiling.md"

SINE_JOB: dict[str, Any] = {
    "name": "bench-sine", "task": {"family": "sinusoid", "shots": 10, "queries": 10},
    "model": {"name": "mlp", "hidden": [40, 40]}, "inner": {"steps": 1, "lr": 0.01},
    "outer": {"iterations": 50, "meta_batch_size": 25},
    "eval": {"every": 50, "tasks": 10, "steps": 10}, "checkpoint": {"every": 50},
}
OMNIGLOT_JOB: dict[str, Any] = {
    "name": "bench-omniglot", "task": {"family": "omniglot", "ways": 5, "shots": 1, "queries": 15},
    "model": {"name": "conv4"}, "inner": {"steps": 1, "lr": 0.4},
    "outer": {"iterations": 4, "meta_batch_size": 2},
    "eval": {"every": 4, "tasks": 2, "steps": 10}, "checkpoint": {"every": 4},
}


# ------------------------------------------------------------------------------------------ machine


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads_default": torch.get_num_threads(),
            "platform": platform.platform(), "load_avg_at_start": list(os.getloadavg())}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------- data


def seed_jobs(settings: Settings, n: int) -> None:
    """``n`` succeeded job rows straight into the server's database, newest last, over two tenants."""
    engine = make_engine(settings)
    init_db(engine)
    spec = JobSpec.model_validate({**SINE_JOB, "name": "seeded"}).model_dump(mode="json")
    metrics = {"meta/loss": 0.31, "meta/accuracy": None, "inner/loss_before": 2.9, "inner/loss_after": 0.35,
               "eval/loss_after": 0.4, "perf/tasks_per_s": 950.0}
    start = datetime.now(UTC) - timedelta(seconds=n * 60)
    rows = []
    for i in range(n):
        created = start + timedelta(seconds=60 * i)
        rows.append({"id": new_id(), "tenant": SEED_TENANTS[i % len(SEED_TENANTS)], "name": f"seeded-{i}",
                     "spec": spec, "status": "succeeded", "iteration": 50, "total": 50, "eta_s": None,
                     "metrics": metrics, "error": None, "model_id": None, "attempts": 1,
                     "cancel_requested": False, "created_at": created, "started_at": created + timedelta(seconds=1),
                     "finished_at": created + timedelta(seconds=30)})
    with engine.begin() as connection:
        connection.execute(insert(Job), rows)
    engine.dispose()


def omniglot_folder(data_root: Path | None) -> Path:
    """The folder of the Omniglot zips: ``data_root`` itself or its ``omniglot/`` (as the service looks)."""
    if data_root is None:
        raise SystemExit("the adaptation benchmark trains and queries an Omniglot model: pass --data-root "
                         "(or set MAML_DATA_ROOT) to the folder of the Omniglot zips or its parent")
    for folder in (data_root, data_root / "omniglot"):
        if (folder / "images_evaluation.zip").is_file():
            return folder
    raise SystemExit(f"--data-root {data_root}: no images_evaluation.zip in it or in its omniglot/ folder")


def omniglot_pngs(folder: Path, n_classes: int, per_class: int) -> list[list[str]]:
    """Base64 PNGs of real Omniglot drawings (evaluation alphabets): ``per_class`` of each of
    ``n_classes`` characters, as they are in the zip (105x105)."""
    with zipfile.ZipFile(folder / "images_evaluation.zip") as archive:
        by_char: dict[str, list[str]] = {}
        for info in archive.infolist():
            if info.filename.endswith(".png"):
                by_char.setdefault(info.filename.rsplit("/", 1)[0], []).append(info.filename)
        chars = sorted(by_char)[:: max(1, len(by_char) // n_classes)][:n_classes]
        return [[base64.b64encode(archive.read(name)).decode() for name in sorted(by_char[c])[:per_class]]
                for c in chars]


def sine_body(rng: random.Random) -> dict[str, Any]:
    amplitude, phase = rng.uniform(0.1, 5.0), rng.uniform(0.0, math.pi)
    xs = [rng.uniform(-5.0, 5.0) for _ in range(10)]
    return {"support": {"x": [[x] for x in xs], "y": [[amplitude * math.sin(x - phase)] for x in xs]},
            "query": {"x": [[rng.uniform(-5.0, 5.0)] for _ in range(10)]}, "steps": 10}


def omniglot_body(images: list[list[str]], queries_per_class: int) -> dict[str, Any]:
    # Drawing 0 of each character is its support example; drawings 1.. are the queries.
    support = [drawings[0] for drawings in images]
    query = [drawings[1 + q] for q in range(queries_per_class) for drawings in images]
    return {"support": {"x": support, "y": list(range(len(images)))}, "query": {"x": query}, "steps": 10}


# ------------------------------------------------------------------------------------------- server


class ServerDied(RuntimeError):
    """The server process ended under the benchmark (its embedded Ray cluster was killed)."""


class Server:
    """uvicorn with the app factory, in its own session so that its Ray processes die with it.

    Another process's Ray clean-up can kill this server's embedded cluster, and the Ray driver then
    ends the server process. ``restart`` brings it back on the same data
    dir (jobs, keys and models persist); the benchmark repeats the series that was cut short.
    """

    def __init__(self, data_dir: Path, extra_env: dict[str, str], log_path: Path,
                 app: str = "api.main:create_app", fallback_app: str | None = None, ray_restarts: int = 2) -> None:
        self.data_dir, self.extra_env, self.log_path, self.app = data_dir, extra_env, log_path, app
        # After ``ray_restarts`` restarts, once ``allow_fallback`` is set (the models are trained),
        # restarts serve ``fallback_app`` instead: the same service without a Ray cluster to lose.
        self.fallback_app, self.ray_restarts, self.allow_fallback = fallback_app, ray_restarts, False
        self.history: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.gcs_pid: int | None = None
        self.base = ""
        self.restarts = 0

    def start(self) -> str:
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAML_") and k != "DATABASE_URL"}
        env.update({"MAML_DATA_DIR": str(self.data_dir), "MAML_ADMIN_TOKEN": ADMIN_TOKEN,
                    "MAML_RAY_NUM_CPUS": "2", "RAY_ADDRESS": "", **self.extra_env})
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--factory", self.app, "--host", "127.0.0.1",
                 "--port", str(port), "--log-level", "warning"],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240  # Ray starts in seconds, more on a busy machine
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready in time:\n{self.log_tail()}")
            time.sleep(0.5)
        self.gcs_pid = self._find_gcs()
        print(f"server ready at {self.base} (pid {self.proc.pid}, Ray GCS pid {self.gcs_pid})", flush=True)
        return self.base

    def cpu_seconds(self) -> float:
        """CPU time (user + system, all threads) the server process has used so far; 0 once it ended."""
        if self.proc is None:
            return 0.0
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        """Alive, and so is its Ray GCS. Without its GCS the Ray driver in the server retries (and
        burns CPU, which slows every request) until Ray's GCS reconnect timeout and then ends the
        process, so a run in that window does not count, and the server is restarted at once."""
        if not self.alive():
            return False
        if self.gcs_pid is None:
            return True
        try:
            state = Path(f"/proc/{self.gcs_pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state not in ("Z", "X")

    def _find_gcs(self) -> int | None:
        """The pid of the embedded cluster's GCS: in the server's session (start_new_session)."""
        assert self.proc is not None
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                session = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3])
                if session == self.proc.pid and b"gcs_server" in (entry / "cmdline").read_bytes():
                    return int(entry.name)
            except (OSError, ValueError, IndexError):
                continue
        return None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        with contextlib.suppress(ProcessLookupError):  # Ray's agents are in the server's group
            os.killpg(proc.pid, signal.SIGKILL)

    def restart(self) -> str:
        self.restarts += 1
        state = "its Ray GCS is gone" if self.alive() else "it exited"
        self.history.append(f"{time.strftime('%H:%M:%S')} {self.app}: {state}")
        print(f"restarting the server ({state}; restart {self.restarts}); log tail:\n{self.log_tail(600)}",
              flush=True)
        if (self.allow_fallback and self.fallback_app and self.app != self.fallback_app
                and self.restarts > self.ray_restarts):
            print(f"switching to {self.fallback_app} (no Ray cluster) for the rest of the measurements", flush=True)
            self.app = self.fallback_app
        self.stop()
        return self.start()

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


def with_restarts(server: Server, fn: Callable[[str], Any], *, attempts: int = 4) -> Any:
    """``fn(base)`` on a healthy server; run again on a restarted one if the server (or its Ray
    GCS) died under it."""
    for _ in range(attempts):
        if not server.healthy():
            server.restart()
        try:
            out = fn(server.base)
        except (ServerDied, httpx.TransportError):
            if server.healthy():
                raise
            continue
        if server.healthy():
            return out
    raise ServerDied(f"the server died {attempts} times in a row")


def app_without_ray() -> FastAPI:
    """``api.main.create_app`` (settings from ``MAML_*``) with no training backend: no Ray cluster.

    Adaptation queries and job listings never touch the backend; a job that reached the manager
    would fail. Served after training when the embedded cluster keeps being killed (``--fallback-app``).
    """

    def no_training(settings: Settings) -> Callable[..., Any]:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("this benchmark server has no training backend")

        return refuse

    return create_app(backend=no_training)


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def tenant_key(base: str, tenant: str) -> str:
    r = httpx.post(f"{base}/api/v1/keys", json={"tenant": tenant, "name": "bench"}, headers=bearer(ADMIN_TOKEN),
                   timeout=30)
    r.raise_for_status()
    return r.json()["secret"]


def train(server: Server, secret: str, specs: list[dict[str, Any]], timeout: float = 900) -> dict[str, dict]:
    """Submit the jobs over HTTP and wait for all of them; returns the finished jobs by name.

    A job that fails (its Ray workers were killed) is submitted again; a server that died is
    restarted, and its interrupted jobs resume from their checkpoints.
    """
    ids: dict[str, str] = {}
    done: dict[str, dict] = {}
    start = time.monotonic()
    while len(done) < len(specs):
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"jobs not finished after {timeout}s: {sorted(set(ids) - set(done))}")
        try:
            with httpx.Client(base_url=f"{server.base}/api/v1", headers=bearer(secret), timeout=30) as api:
                for spec in specs:
                    if spec["name"] not in ids:
                        r = api.post("/jobs", json=spec)
                        if r.status_code != 201:
                            raise RuntimeError(f"job {spec['name']} refused: {r.status_code} {r.text}")
                        ids[spec["name"]] = r.json()["id"]
                for name, job_id in list(ids.items()):
                    if name in done:
                        continue
                    job = api.get(f"/jobs/{job_id}").json()
                    if job["status"] == "succeeded":
                        done[name] = job
                        print(f"trained {name}: model {job['model_id']} ({time.monotonic() - start:.0f}s)",
                              flush=True)
                    elif job["status"] in ("failed", "cancelled"):
                        print(f"job {name} {job['status']} ({job['error']}); submitting it again", flush=True)
                        del ids[name]
        except httpx.TransportError:
            if server.healthy():
                raise
        if not server.healthy():
            server.restart()
        time.sleep(0.5)
    return done


# ------------------------------------------------------------------------------------- measurement


def run_load(base: str, path: str, *, headers: dict[str, str], requests: int, clients: int,
             body: bytes | None = None, cpu: Callable[[], float] | None = None) -> dict[str, Any]:
    """``requests`` requests from ``clients`` threads (one keep-alive connection each), back to back.

    GET without ``body``, POST of the pre-encoded JSON ``body`` otherwise. Returns the latencies
    (s) of every request, the status codes, the Retry-After headers of 429s and the wall time.
    """
    per_client = [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    codes: list[Counter[int]] = [Counter() for _ in range(clients)]
    retry_after: Counter[str] = Counter()
    post_headers = {**headers, "Content-Type": "application/json"}
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        with httpx.Client(base_url=base, timeout=120) as http:
            barrier.wait()
            for _ in range(per_client[i]):
                start = time.perf_counter()
                try:
                    r = (http.get(path, headers=headers) if body is None
                         else http.post(path, content=body, headers=post_headers))
                    code = r.status_code
                    if code == 429:
                        retry_after[r.headers.get("retry-after", "missing")] += 1
                except httpx.HTTPError:
                    code = -1
                latencies[i].append(time.perf_counter() - start)
                codes[i][code] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start, cpu_start = time.perf_counter(), cpu() if cpu else 0.0
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    server_cpu = cpu() - cpu_start if cpu else float("nan")
    all_codes: Counter[int] = sum(codes, Counter())
    return {"latencies": [x for xs in latencies for x in xs], "codes": dict(all_codes), "wall_s": wall,
            "server_cpu_s": server_cpu, "retry_after": dict(retry_after)}


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), ``q`` in [0, 100]."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    ms = [x * 1000 for x in run["latencies"]]
    ok = run["codes"].get(200, 0)
    return {"requests": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
            "mean_ms": statistics.fmean(ms), "max_ms": max(ms), "errors": len(ms) - ok,
            "codes": {str(k): v for k, v in sorted(run["codes"].items())},
            "throughput_rps": len(ms) / run["wall_s"], "retry_after": run["retry_after"],
            "server_cpu_ms_per_request": run["server_cpu_s"] * 1000 / len(ms),
            "load_avg_1m": os.getloadavg()[0]}


def measure(name: str, server: Server, path: str, *, repeats: int, warmup: int, **load: Any) -> dict[str, Any]:
    """``repeats`` runs of one series after a warm-up; the median over runs of each statistic.

    A run cut short by the server's death is dropped and run again on a restarted server (after a
    new warm-up); the runs that completed before are kept."""
    clients = load["clients"]
    runs: list[dict[str, Any]] = []
    warm, deaths, app = False, 0, server.app
    while len(runs) < repeats:
        if not server.healthy():
            deaths += 1
            if deaths > 5:
                raise ServerDied(f"{name}: the server died {deaths} times")
            server.restart()
            warm = False
        if server.app != app:  # every run of a series on one app
            runs, app = [], server.app
        # The warm-up fills the model cache and each pool thread's module copy, and opens connections.
        requests = load["requests"] if warm else max(warmup, clients)
        run = run_load(server.base, path, **{**load, "requests": requests}, cpu=server.cpu_seconds)
        if not server.healthy():  # cut short, or measured while the server's Ray driver was retrying
            continue
        if warm:
            runs.append(summarize(run))
        warm = True
    keys = ("p50_ms", "p99_ms", "mean_ms", "max_ms", "throughput_rps", "server_cpu_ms_per_request")
    median = {k: statistics.median(r[k] for r in runs) for k in keys}
    errors = sum(r["errors"] for r in runs)
    per_run = ", ".join(f"{r['p50_ms']:.1f}" for r in runs)
    print(f"{name:<55} p50 {median['p50_ms']:7.1f} ms  p99 {median['p99_ms']:7.1f} ms  "
          f"mean {median['mean_ms']:7.1f} ms  {median['throughput_rps']:6.1f} req/s  "
          f"cpu {median['server_cpu_ms_per_request']:6.1f} ms/req  errors {errors}  "
          f"(p50 per run: {per_run}; load {os.getloadavg()[0]:.1f})", flush=True)
    return {"name": name, "app": app, "clients": clients, "requests_per_run": load["requests"], "repeats": repeats,
            **median, "errors": errors, "runs": runs}


# ------------------------------------------------------------------------------------------- report


def write_report(result: dict[str, Any], stem: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    m, s = result["machine"], result["settings"]
    lines = [
        "# Service benchmark (`benchmarks/service.py`)", "",
        f"Run {result['finished_at']} with `{result['command']}`.", "",
        f"Machine: {m['cpu']}, {m['cores']} cores (shared with other work: load average "
        f"{m['load_avg_at_start'][0]:.1f} at the start), Python {m['python']}, torch {m['torch']} "
        f"(default intra-op threads {m['torch_threads_default']}; the adaptation pool's threads use "
        f"{s['adapt_torch_threads']}, cores // MAML_ADAPT_MAX_CONCURRENCY).", "",
        "Server: `python -m uvicorn --factory api.main:create_app` (one process, SQLite WAL file on a temporary "
        "data dir, embedded Ray with `MAML_RAY_NUM_CPUS=2`); clients are threads of this process, one keep-alive "
        "httpx connection each, requests back to back. Latency is client-side, request to response body. "
        f"Each series runs {s['repeats']} times after a warm-up; the numbers are the median over runs "
        "(every run is in the JSON).", "",
        "Settings: " + ", ".join(f"`{k}={v}`" for k, v in s["server_env"].items()) + ".", "",
        "## Targets", "",
        "| target | measured | met |", "|---|---|---|",
    ]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |")
    if result.get("adapt"):
        lines += ["", "## Adaptation latency (`POST /api/v1/models/{id}/adapt`)", "",
                  "| series | clients | requests/run | p50 ms | p99 ms | mean ms | req/s | server CPU ms/req "
                  "| errors (all runs) | app |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in result["adapt"]:
            app = "stock" if r["app"] == "api.main:create_app" else f"`{r['app']}`"
            lines.append(f"| {r['name']} | {r['clients']} | {r['requests_per_run']} | {r['p50_ms']:.1f} | "
                         f"{r['p99_ms']:.1f} | {r['mean_ms']:.1f} | {r['throughput_rps']:.1f} | "
                         f"{r['server_cpu_ms_per_request']:.1f} | {r['errors']} | {app} |")
        lines += ["", "- app: stock = `api.main:create_app` with its embedded Ray cluster; "
                  "`benchmarks.service:app_without_ray` = the same app with no training backend started.",
                  "- sinusoid: the paper's MLP (1-40-40-1), K=10 support points, 10 query points, 10 SGD "
                  "steps.",
                  "- Omniglot: Conv4 (64 filters), 5-way 1-shot, 10 SGD steps; support = 5 base64 PNGs (105x105 "
                  "drawings of 5 characters of the evaluation alphabets, decoded and resized to 28x28 by the server "
                  "as in training); query = 5 (one per class) or 75 (15 per class, the paper's query set) PNGs.",
                  f"- With 16 clients on {m['cores']} cores the latency is mostly queueing (16 requests share "
                  f"{m['cores']} cores): "
                  "throughput is the number that matters there; the target is zero errors.",
                  "- Server CPU ms/req: CPU time of the server process (all threads, /proc) over the run divided "
                  "by the requests. On a shared machine the wall-clock numbers depend on what else runs; the "
                  "CPU cost does not, and bounds the latency on an idle core from below.", ""]
    sat = result.get("saturation")
    if sat:
        lines += ["## Admission limits (429)", "",
                  f"The server admits `MAML_ADAPT_MAX_CONCURRENCY` + `MAML_ADAPT_QUEUE_LIMIT` = {sat['capacity']} "
                  "queries at once (the 16-client series above ran with these limits). Probe: "
                  f"{sat['clients']} clients, sinusoid, back to back, {sat['requests']} requests: status codes "
                  f"{sat['codes']}, Retry-After headers {sat['retry_after']}, p50 {sat['p50_ms']:.1f} ms.", ""]
    if result.get("jobs"):
        lines += ["## `GET /api/v1/jobs` with 10,000 jobs stored", "",
                  f"{result['jobs']['stored']} `succeeded` rows written into the SQLite file before the server "
                  f"started (half per tenant `{SEED_TENANTS[0]}`, `{SEED_TENANTS[1]}`); pages of `limit=100`, "
                  "1 client, measured before any job was trained.", "",
                  "| caller | filter | offset | count | p50 ms | p99 ms | mean ms | server CPU ms/req | errors |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in result["jobs"]["pages"]:
            lines.append(f"| {r['caller']} | {r['filter'] or '-'} | {r['offset']} | {r['count']} | "
                         f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_ms']:.1f} | "
                         f"{r['server_cpu_ms_per_request']:.1f} | {r['errors']} |")
    notes = [*result.get("notes", []),
             f"Where the time goes (profiles of earlier runs, not re-measured here): [{PROFILING}]({PROFILING})."]
    lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests, one run per series (a smoke test)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each series (medians reported)")
    parser.add_argument("--jobs", type=int, default=10_000, help="job rows stored for the list benchmark")
    parser.add_argument("--app", default="api.main:create_app", help="the app factory uvicorn serves")
    parser.add_argument("--fallback-app", default="benchmarks.service:app_without_ray",
                        help="served after --ray-restarts restarts once the models are trained ('' for none)")
    parser.add_argument("--ray-restarts", type=int, default=2,
                        help="restarts for a lost Ray cluster before the fallback app is served")
    parser.add_argument("--only", choices=("all", "jobs", "adapt"), default="all", help="which part to run")
    parser.add_argument("--adapt-max-concurrency", type=int, default=None,
                        help="MAML_ADAPT_MAX_CONCURRENCY (default: the server's)")
    parser.add_argument("--adapt-queue-limit", type=int, default=None,
                        help="MAML_ADAPT_QUEUE_LIMIT (default: the server's)")
    parser.add_argument("--data-root", type=Path, default=os.environ.get("MAML_DATA_ROOT") or None,
                        help="folder of the Omniglot zips, or its parent; the server's MAML_DATA_ROOT "
                             "(default: $MAML_DATA_ROOT)")
    args = parser.parse_args()
    sequential, concurrent, pages, warmup = (40, 160, 15, 10) if args.quick else (200, 400, 50, 20)
    repeats = 1 if args.quick else args.repeats

    extra_env = {"MAML_METRICS_FLUSH_S": "0.5"}
    if args.adapt_max_concurrency is not None:
        extra_env["MAML_ADAPT_MAX_CONCURRENCY"] = str(args.adapt_max_concurrency)
    if args.adapt_queue_limit is not None:
        extra_env["MAML_ADAPT_QUEUE_LIMIT"] = str(args.adapt_queue_limit)
    omniglot = None
    if args.only in ("all", "adapt"):
        omniglot = omniglot_folder(args.data_root.expanduser().resolve() if args.data_root else None)
    # The server's environment is cleared of MAML_* (see Server.start), so the data root is given again;
    # it is not part of the report's settings (a path of this machine).
    data_env = {"MAML_DATA_ROOT": str(omniglot), "MAML_DATA_ROOTS": str(omniglot)} if omniglot else {}
    defaults = {name: field.default for name, field in Settings.model_fields.items()}  # not the environment
    concurrency = args.adapt_max_concurrency or defaults["adapt_max_concurrency"]
    queue_limit = args.adapt_queue_limit if args.adapt_queue_limit is not None else defaults["adapt_queue_limit"]

    result: dict[str, Any] = {"machine": machine_info(), "app": args.app,
                              "command": " ".join(["python -m benchmarks.service", *sys.argv[1:]]),
                              "notes": []}
    with tempfile.TemporaryDirectory(prefix="maml-bench-service-") as tmp:
        data_dir = Path(tmp) / "data"
        t0 = time.perf_counter()
        seed_jobs(Settings.model_validate({"data_dir": data_dir, "admin_token": ADMIN_TOKEN}), args.jobs)
        print(f"stored {args.jobs} job rows in {time.perf_counter() - t0:.1f}s", flush=True)
        server = Server(data_dir, {**extra_env, **data_env}, Path(tmp) / "server.log", app=args.app,
                        fallback_app=args.fallback_app or None, ray_restarts=args.ray_restarts)
        try:
            base = server.start()
            admin = bearer(ADMIN_TOKEN)
            tenant_a = bearer(tenant_key(base, SEED_TENANTS[0]))
            if args.only in ("all", "jobs"):
                # Exactly the seeded rows: measured before any job is trained.
                result["jobs"] = bench_jobs(server, args.jobs, admin, tenant_a, pages=pages, repeats=repeats)
            if args.only in ("all", "adapt"):
                trainer = tenant_key(base, "bench-train")
                assert omniglot is not None
                result["adapt"], sine_model = bench_adapt(server, trainer, omniglot, sequential=sequential,
                                                          concurrent=concurrent, warmup=warmup, repeats=repeats)
                result["saturation"] = saturation(server, trainer, sine_model, concurrency + queue_limit)
            metrics_text = httpx.get(f"{server.base}/metrics", timeout=10).text
            result["server_metrics"] = [line for line in metrics_text.splitlines()
                                        if line.startswith(("maml_adapt", "maml_jobs"))]
        except BaseException:
            print(f"--- server log (tail) ---\n{server.log_tail()}", file=sys.stderr)
            raise
        finally:
            server.stop()
        result["restarts"] = server.history
        if server.restarts:
            result["notes"].append(
                f"The server was restarted {server.restarts} time(s) during the run because its embedded Ray "
                "cluster was killed from outside (see below); runs during which it vanished were dropped and "
                "run again on the restarted server (same data dir)."
                + (f" After {server.ray_restarts} restarts the series were served by `{server.fallback_app}` "
                   "(the same app without a training backend; the `app` column says which)."
                   if server.app == server.fallback_app else ""))

    result["settings"] = {"adapt_torch_threads": intra_op_threads(concurrency), "repeats": repeats,
                          "sequential_requests": sequential, "concurrent_requests": concurrent,
                          "page_requests": pages, "warmup": warmup,
                          "server_env": {"MAML_RAY_NUM_CPUS": 2, **extra_env,
                                         "MAML_ADAPT_MAX_CONCURRENCY": concurrency,
                                         "MAML_ADAPT_QUEUE_LIMIT": queue_limit}}
    result["targets"] = targets(result)
    result["finished_at"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    result["machine"]["load_avg_at_end"] = list(os.getloadavg())
    stem = "service-quick" if args.quick else "service" if args.only == "all" else f"service-{args.only}"
    write_report(result, stem)
    print(f"wrote {RESULTS / stem}.md and .json")
    for t in result["targets"]:
        print(f"{'met   ' if t['met'] else 'MISSED'} {t['target']}: {t['measured']}")


def bench_jobs(server: Server, stored: int, admin: dict[str, str], tenant: dict[str, str], *, pages: int,
               repeats: int) -> dict[str, Any]:
    """``GET /jobs`` pages of 100: admin (every job) and one tenant (half), with and without a filter."""
    half = stored // len(SEED_TENANTS)
    series = [("admin", admin, status, offset) for status in (None, "succeeded")
              for offset in (0, stored // 2, stored - 100)]
    series += [(f"tenant {SEED_TENANTS[0]}", tenant, status, offset) for status in (None, "succeeded")
               for offset in (0, half - 100)]
    rows = []
    for caller, headers, status, offset in series:
        path = f"/api/v1/jobs?limit=100&offset={offset}" + (f"&status={status}" if status else "")
        page = httpx.get(server.base + path, headers=headers, timeout=30).json()
        if len(page["data"]) != 100:
            raise RuntimeError(f"{path}: {len(page['data'])} jobs on the page, count {page.get('count')}")
        name = f"GET /jobs {caller} offset={offset}" + (f" status={status}" if status else "")
        row = measure(name, server, path, repeats=repeats, warmup=5, headers=headers, requests=pages, clients=1)
        rows.append({"caller": caller, "filter": f"status={status}" if status else None, "offset": offset,
                     "count": page["count"], **row})
    return {"stored": stored, "limit": 100, "pages": rows}


def bench_adapt(server: Server, secret: str, omniglot: Path, *, sequential: int, concurrent: int, warmup: int,
                repeats: int) -> tuple[list[dict[str, Any]], str]:
    """Train the two models over HTTP, then adaptation latency with 1 and 16 clients."""
    trained = train(server, secret, [SINE_JOB, OMNIGLOT_JOB])
    server.allow_fallback = True
    sine_model = trained["bench-sine"]["model_id"]
    omni_model = trained["bench-omniglot"]["model_id"]
    images = omniglot_pngs(omniglot, 5, 16)
    bodies = {
        "sinusoid K=10, 10 steps, 10 queries": (sine_model, sine_body(random.Random(0))),
        "omniglot 5w1s, 10 steps, 5 query PNGs": (omni_model, omniglot_body(images, 1)),
        "omniglot 5w1s, 10 steps, 75 query PNGs": (omni_model, omniglot_body(images, 15)),
    }
    headers = bearer(secret)
    rows = []
    for clients, requests in ((1, sequential), (16, concurrent)):
        for name, (model_id, body) in bodies.items():
            path = f"/api/v1/models/{model_id}/adapt"

            def post(base: str, path: str = path, body: dict[str, Any] = body) -> httpx.Response:
                return httpx.post(base + path, json=body, headers=headers, timeout=120)

            check = with_restarts(server, post)
            if check.status_code != 200:
                raise RuntimeError(f"{name}: {check.status_code} {check.text}")
            encoded = json.dumps(body).encode()
            row = measure(f"{name}, {clients} client{'s' * (clients > 1)}", server, path, repeats=repeats,
                          warmup=warmup, headers=headers, requests=requests, clients=clients, body=encoded)
            rows.append({"series": name, "body_bytes": len(encoded), **row})
    return rows, sine_model


def saturation(server: Server, secret: str, sine_model: str, capacity: int) -> dict[str, Any]:
    """More clients than the admission limits hold (running + queued): the 429 answers."""
    clients = max(32, 2 * capacity)
    body = json.dumps(sine_body(random.Random(1))).encode()
    run = with_restarts(server, lambda base: run_load(base, f"/api/v1/models/{sine_model}/adapt",
                                                     headers=bearer(secret), requests=clients * 10,
                                                     clients=clients, body=body))
    out = {"clients": clients, "capacity": capacity, **summarize(run)}
    print(f"saturation probe, {clients} clients (capacity {capacity}): codes {out['codes']}, "
          f"Retry-After {out['retry_after']}", flush=True)
    return out


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for r in result.get("adapt", []):
        family = r["series"].split()[0]
        if r["clients"] == 1:
            limit = TARGETS[f"{family}_p50_ms"]
            out.append({"target": f"{r['series']}, 1 client: p50 < {limit:.0f} ms",
                        "measured": f"{r['p50_ms']:.1f} ms", "met": r["p50_ms"] < limit})
    for r in result.get("adapt", []):
        if r["clients"] == 16:
            out.append({"target": f"{r['series']}, 16 clients: zero errors (429 included)",
                        "measured": f"{r['errors']} errors / {r['requests_per_run'] * r['repeats']}",
                        "met": r["errors"] == 0})
    if result.get("jobs"):
        pages = result["jobs"]["pages"]
        worst = max(pages, key=lambda r: r["p50_ms"])
        out.append({"target": f"GET /jobs, {result['jobs']['stored']} stored: every page p50 < "
                              f"{TARGETS['jobs_page_p50_ms']:.0f} ms",
                    "measured": f"slowest {worst['p50_ms']:.1f} ms ({worst['name']})",
                    "met": all(r["p50_ms"] < TARGETS["jobs_page_p50_ms"] and r["errors"] == 0 for r in pages)})
    return out


if __name__ == "__main__":
    main()

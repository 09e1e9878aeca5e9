"""Load: 64 concurrent clients for 60 s against a real ``maml serve``, across 4 tenants.

    .venv/bin/python -m benchmarks.load [--quick] [--clients 64] [--seconds 60]

The server is uvicorn with its embedded Ray (through its reconciler child) and SQLite, started by
``tests/cluster.py``. Each tenant first trains one small sinusoid model. Then every client (16 per
tenant, one keep-alive connection each) loops over a mix of requests for its tenant:

* 60% ``POST /models/{id}/adapt`` (K=10, 10 steps, 10 query points),
* 30% ``GET /jobs?limit=20``,
* 10% ``POST /jobs`` (a 20-iteration sinusoid job; it queues behind the others).

Reported: p50 and p99 latency per route (client-side), answers by status (429s are the admission
and quota limits doing their work; any 5xx is a failure), jobs lost (accepted with 201 but not in
the database afterwards), and fairness: each tenant's successful adaptations per second against
the mean (the issue's target: within 20%). Results: ``results/load.md`` and ``results/load.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(REPO / "tests"))
from cluster import Replicas  # noqa: E402

TENANTS = ("t0", "t1", "t2", "t3")
MODEL_JOB = {"name": "load-model", "outer": {"iterations": 20, "meta_batch_size": 4},
             "eval": {"every": 20, "tasks": 2, "steps": 2}}
SMALL_JOB = {"name": "load-job", "outer": {"iterations": 20, "meta_batch_size": 2},
             "eval": {"every": 20, "tasks": 2, "steps": 1}}


def adapt_body(rng: random.Random) -> dict[str, Any]:
    amplitude, phase = rng.uniform(0.1, 5.0), rng.uniform(0, math.pi)
    xs = [rng.uniform(-5, 5) for _ in range(10)]
    return {"support": {"x": [[x] for x in xs], "y": [[amplitude * math.sin(x - phase)] for x in xs]},
            "query": {"x": [[rng.uniform(-5, 5)] for _ in range(10)]}, "steps": 10}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def client_loop(base: str, key: str, tenant: str, model_id: str, until: float, seed: int,
                records: list[tuple[str, str, int, float]], accepted: list[str]) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=f"{base}/api/v1", timeout=60, headers={"Authorization": f"Bearer {key}"}) as api:
        while time.monotonic() < until:
            roll = rng.random()
            start = time.perf_counter()
            try:
                if roll < 0.6:
                    route, r = "adapt", api.post(f"/models/{model_id}/adapt", json=adapt_body(rng))
                elif roll < 0.9:
                    route, r = "list", api.get("/jobs", params={"limit": 20})
                else:
                    route, r = "submit", api.post("/jobs", json=SMALL_JOB)
                    if r.status_code == 201:
                        accepted.append(r.json()["id"])
                status = r.status_code
            except httpx.HTTPError as exc:
                route, status = "error", 0
                print(f"{tenant}: {type(exc).__name__}: {exc}", flush=True)
            records.append((tenant, route, status, time.perf_counter() - start))
            if status == 429:  # honour Retry-After, bounded (a client would)
                time.sleep(min(float(r.headers.get("Retry-After", "1")), 1.0))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--quick", action="store_true", help="16 clients for 15 s")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.seconds = 16, 15.0
    root = Path(tempfile.mkdtemp(prefix="maml-load-"))
    replicas = Replicas(root, None, {"RAY_ADDRESS": ""}, MAML_RAY_NUM_CPUS="2")
    load_start = os.getloadavg()[0]
    try:
        base = replicas.start("a")
        keys = {tenant: replicas.tenant_key("a", tenant) for tenant in TENANTS}
        models: dict[str, str] = {}
        for tenant in TENANTS:
            with replicas.client("a", keys[tenant]) as api:
                job_id = api.post("/jobs", json=MODEL_JOB).json()["id"]
                deadline = time.monotonic() + 300
                while (job := api.get(f"/jobs/{job_id}").json())["status"] not in ("succeeded", "failed"):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the model job of {tenant} did not finish: {job}")
                    time.sleep(0.5)
                models[tenant] = job["model_id"]
        records: list[tuple[str, str, int, float]] = []
        accepted: list[str] = []
        until = time.monotonic() + args.seconds
        threads = [threading.Thread(target=client_loop, args=(base, keys[TENANTS[i % 4]], TENANTS[i % 4],
                                                              models[TENANTS[i % 4]], until, i, records, accepted))
                   for i in range(args.clients)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        engine = create_engine(replicas.database_url)
        with engine.connect() as connection:
            stored = {row[0] for row in connection.execute(text("SELECT id FROM jobs"))}
        engine.dispose()
        alive = replicas.procs["a"].poll() is None
        ready = httpx.get(f"{base}/readyz", timeout=10).json()
    finally:
        replicas.stop_all()
    print(f"server logs under {root}", flush=True)
    lost = [job_id for job_id in accepted if job_id not in stored]
    by_route: dict[str, list[float]] = defaultdict(list)
    statuses: dict[str, Counter[int]] = defaultdict(Counter)
    adapted: Counter[str] = Counter()
    for tenant, route, status, seconds in records:
        by_route[route].append(seconds)
        statuses[route][status] += 1
        if route == "adapt" and status == 200:
            adapted[tenant] += 1
    rates = {tenant: adapted[tenant] / elapsed for tenant in TENANTS}
    mean_rate = statistics.mean(rates.values())
    spread = {tenant: round(rate / mean_rate - 1, 3) if mean_rate else None for tenant, rate in rates.items()}
    server_errors = sum(count for counter in statuses.values() for status, count in counter.items()
                        if status >= 500 or status == 0)
    rows = [{"route": route, "requests": len(times), "p50_ms": round(1000 * percentile(times, 0.5), 1),
             "p99_ms": round(1000 * percentile(times, 0.99), 1),
             "statuses": dict(sorted(statuses[route].items()))} for route, times in sorted(by_route.items())]
    meta = {"date": time.strftime("%Y-%m-%dT%H:%M UTC", time.gmtime()), "cores": os.cpu_count(),
            "machine": platform.machine(), "clients": args.clients, "seconds": args.seconds,
            "load_start": load_start, "load_end": os.getloadavg()[0]}
    result = {"meta": meta, "routes": rows, "server_errors": server_errors, "accepted_jobs": len(accepted),
              "lost_jobs": len(lost), "server_alive": alive, "ray_restarts": ready.get("restarts"),
              "adaptations_per_s": rates, "fairness_vs_mean": spread}
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(exist_ok=True)
    stem = "load-quick" if args.quick else "load"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Load: {args.clients} clients for {args.seconds:.0f} s, 4 tenants", "",
             f"`python -m benchmarks.load{' --quick' if args.quick else ''}` on {meta['date']}: uvicorn with "
             f"its embedded Ray and SQLite, {meta['cores']} cores shared by server and clients; 1-minute load "
             f"average {load_start:.1f} at the start, {meta['load_end']:.1f} at the end.", "",
             "| route | requests | p50 (ms) | p99 (ms) | answers |", "|---|---|---|---|---|"]
    lines += [f"| {r['route']} | {r['requests']} | {r['p50_ms']} | {r['p99_ms']} | "
              + ", ".join(f"{status}: {count}" for status, count in r["statuses"].items()) + " |" for r in rows]
    lines += ["", f"5xx or failed connections: **{server_errors}**; jobs accepted: {len(accepted)}, lost: "
              f"**{len(lost)}**; server alive at the end: {alive}; restarts of its Ray (reconciler): "
              f"{ready.get('restarts')}.", "",
              "Successful adaptations per second by tenant (against their mean): "
              + ", ".join(f"{t}: {rates[t]:.1f} ({100 * spread[t]:+.0f}%)" for t in TENANTS if spread[t] is not None)
              + "."]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

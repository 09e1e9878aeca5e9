"""``make run``: the service end to end on this machine.

Starts the service (embedded Ray, SQLite under ``.data/demo``) with uvicorn, creates a tenant key,
submits the paper's sinusoid MAML job over REST, follows it to the end, then adapts the trained
model over REST to 10 points of a new sinusoid and prints the error before and after adaptation,
beside a baseline trained on the same tasks without meta-learning and adapted the same way.
"""

from __future__ import annotations

import argparse
import logging
import math
import secrets
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn
from rich.console import Console
from rich.table import Table

from cli.app import watch
from cli.client import Client

console = Console()
DEMO_JOB = {
    "name": "sine-demo", "algorithm": "maml",
    "task": {"family": "sinusoid", "shots": 10, "queries": 10},
    "model": {"name": "mlp"},
    "inner": {"steps": 1, "lr": 0.01},
    "outer": {"optimizer": "adam", "lr": 0.001, "meta_batch_size": 25, "iterations": 3000},
    "eval": {"every": 1000, "tasks": 100, "steps": 10},
    "checkpoint": {"every": 500},
    "resources": {"workers": 1},
    "seed": 0,
}


def start_server(data_dir: Path, port: int, admin_token: str) -> tuple[uvicorn.Server, threading.Thread]:
    from api.main import create_app
    from service.config import Settings

    settings = Settings(data_dir=data_dir, admin_token=admin_token)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return server, thread
        except httpx.HTTPError:
            pass
        if not thread.is_alive():
            break
        time.sleep(0.5)
    raise RuntimeError("the service did not become ready within 180 s")


def pretrained_baseline(iterations: int, seed: int = 0) -> torch.nn.Module:
    """The same MLP trained on the same task distribution by plain regression (no meta-learning)."""
    from workers.models import MLP
    from workers.spec import SinusoidTask
    from workers.tasks.sinusoid import SinusoidFamily

    torch.manual_seed(seed)
    model = MLP()
    family = SinusoidFamily(SinusoidTask(shots=10, queries=10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for it in range(iterations):
        tasks = [family.sample(seed, it, i) for i in range(25)]
        x = torch.cat([torch.cat([t.x_support, t.x_query]) for t in tasks])
        y = torch.cat([torch.cat([t.y_support, t.y_query]) for t in tasks])
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def adapted_mse(model: torch.nn.Module, xs, ys, xq, yq, steps: int, lr: float) -> tuple[float, float]:
    from workers.evaluation import adapt
    from workers.inner import Forward, split_state

    params, buffers = split_state(model)
    adapted, _, _ = adapt(model, params, buffers, xs, ys, steps=steps, lr=lr, loss="mse")
    forward = Forward(model, buffers)
    with torch.no_grad():
        before = torch.nn.functional.mse_loss(forward(params, xq), yq).item()
        after = torch.nn.functional.mse_loss(forward(adapted, xq), yq).item()
    return before, after


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m cli.demo")
    parser.add_argument("--data-dir", type=Path, default=Path(".data/demo"))
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--iterations", type=int, default=DEMO_JOB["outer"]["iterations"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    admin = secrets.token_urlsafe(32)
    console.rule("maml-service demo")
    console.print(f"starting the service on http://127.0.0.1:{args.port} (embedded Ray, SQLite in {args.data_dir})")
    from workers.raygroup import ensure_ray

    ensure_ray()  # in the main thread, where Ray can install its signal handlers
    server, thread = start_server(args.data_dir, args.port, admin)
    url = f"http://127.0.0.1:{args.port}"
    try:
        tenant = Client(url, admin).create_key("demo", "make-run")
        client = Client(url, tenant["secret"])
        spec = {**DEMO_JOB, "outer": {**DEMO_JOB["outer"], "iterations": args.iterations}}
        job = client.submit(spec)
        console.print(f"POST /api/v1/jobs -> job {job['id']} ({spec['algorithm']}, sinusoid K=10, "
                      f"{args.iterations} meta-iterations on Ray)")
        job = watch(client, job["id"])
        if job["status"] != "succeeded":
            raise SystemExit(f"the demo job ended {job['status']}: {job.get('error')}")
        ev = job["metrics"]
        console.print(f"job succeeded; meta-test over {int(ev.get('eval/tasks') or 0)} new sinusoids: "
                      f"MSE {ev.get('eval/loss_before', float('nan')):.3f} before, "
                      f"{ev.get('eval/loss', float('nan')):.3f} after 10 steps")

        # New tasks, never seen in training: 10 labelled points each, 100 points to predict.
        rng = np.random.default_rng(2026)
        steps, lr, n_tasks = 10, 0.01, 50
        baseline = pretrained_baseline(args.iterations)
        ours, theirs, latencies = [], [], []
        for _ in range(n_tasks):
            amplitude, phase = rng.uniform(0.1, 5.0), rng.uniform(0, math.pi)
            xs = rng.uniform(-5, 5, size=(10, 1))
            xq = np.linspace(-5, 5, 100).reshape(-1, 1)
            ys, yq = amplitude * np.sin(xs - phase), amplitude * np.sin(xq - phase)
            row = []
            for n in (0, steps):
                started = time.perf_counter()
                answer = client.adapt(job["model_id"], {"support": {"x": xs.tolist(), "y": ys.tolist()},
                                                        "query": {"x": xq.tolist()}, "steps": n, "lr": lr})
                if n:
                    latencies.append(time.perf_counter() - started)
                row.append(float(np.mean((np.array(answer["predictions"]) - yq) ** 2)))
            ours.append(row)
            t = [torch.tensor(a, dtype=torch.float32) for a in (xs, ys, xq, yq)]
            theirs.append(adapted_mse(baseline, *t, steps=steps, lr=lr))

        table = Table(title=f"{n_tasks} new sinusoids: mean MSE on 100 query points each, after adapting "
                            f"to K=10 points with {steps} SGD steps (lr {lr})")
        table.add_column("model")
        table.add_column("before adaptation", justify="right")
        table.add_column(f"after {steps} steps", justify="right")
        mean = np.mean(ours, axis=0)
        base = np.mean(theirs, axis=0)
        table.add_row("MAML, trained by the service, adapted over REST", f"{mean[0]:.3f}", f"{mean[1]:.3f}")
        table.add_row("baseline: same MLP pretrained on all tasks, no meta-learning", f"{base[0]:.3f}",
                      f"{base[1]:.3f}")
        console.print(table)
        console.print(f"adaptation over HTTP: median {1000 * float(np.median(latencies)):.1f} ms a query "
                      f"(model {job['model_id']}; try `maml models --url {url}`)")
    finally:
        server.should_exit = True
        thread.join(timeout=30)


if __name__ == "__main__":
    main()

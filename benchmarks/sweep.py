"""Sweep benchmark: wall time, trials per minute, and the share of a sweep spent starting trials.

An 8-trial sinusoid sweep (inner lr, outer lr, inner steps sampled; seed 0, so every variant runs the
same 8 configurations) on a local 2-CPU Ray cluster, one CPU per trial, so 2 trials at a time:

    .venv/bin/python -m benchmarks.sweep [--iterations 60] [--quick]

Variants, each a whole sweep with no early stopping (the same work, so they compare):

- ``in_process``: the Tune function trainable runs ``Trainer`` in its own actor; a fresh actor per trial.
- ``in_process+reuse``: the same, with Tune's ``reuse_actors``: a finished trial's actor takes the next.
- ``distributed``: the trainable drives one ``ShardWorker`` actor in the trial's placement group,
  as a multi-worker trial would (``workers.raygroup.WorkerGroup``); ``distributed+reuse`` likewise.

and the headline: the same sweep with ASHA and ``run_sweep``'s defaults.

Per trial, on the driver's clock: its *slot start* (the sweep start for the first two trials, else
the end of the trial whose CPU it took), its first report and its end. Start cost = first report -
slot start - the training the trial did before that report (``perf/train_s`` of its first report):
actor creation, imports, building the task family and model, restoring, Tune's scheduling.
The start share is the sum of start costs over the sum of trial durations (slot start to end).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch

from workers.raygroup import ensure_ray
from workers.sweep import run_sweep
from workers.sweep_spec import SweepSpec, TrialInfo

RESULTS = Path(__file__).parent / "results"
CPUS = 2


def sweep_spec(iterations: int, scheduler: str) -> SweepSpec:
    return SweepSpec.model_validate({
        "name": f"bench-{scheduler}",
        "base": {"outer": {"iterations": iterations, "meta_batch_size": 10},
                 "eval": {"every": max(1, iterations // 10), "tasks": 10, "steps": 5},
                 "checkpoint": {"every": max(1, iterations // 2)}},
        "space": {"inner.lr": {"loguniform": [0.001, 0.05]}, "outer.lr": {"loguniform": [1e-4, 1e-2]},
                  "inner.steps": {"randint": [1, 3]}},
        "scheduler": {"type": scheduler, "grace_period": max(1, iterations // 5), "reduction_factor": 2},
        "num_samples": 8, "max_concurrent_trials": CPUS, "seed": 0,
    })


class Clock:
    """Driver-side times of each trial's first report and end, from on_trial_update."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.order: list[str] = []
        self.first: dict[str, float] = {}
        self.end: dict[str, float] = {}

    def __call__(self, trials: list[TrialInfo]) -> None:
        now = time.monotonic() - self.t0
        for t in trials:
            if t.trial_id not in self.order:
                self.order.append(t.trial_id)
            if t.reports and t.trial_id not in self.first:
                self.first[t.trial_id] = now
            if t.status in ("completed", "stopped_early", "failed", "cancelled") and t.trial_id not in self.end:
                self.end[t.trial_id] = now


def first_result(experiment: Path, trial_id: str) -> dict[str, Any]:
    lines = (experiment / f"trial_{trial_id}" / "result.json").read_text().splitlines()
    return json.loads(lines[0]) if lines else {}


def measure(name: str, sweep: SweepSpec, **kwargs: Any) -> dict[str, Any]:
    clock = Clock()
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        result = run_sweep(sweep, storage_dir=Path(tmp), on_trial_update=clock, **kwargs)
        wall = time.monotonic() - clock.t0
        ends = sorted(clock.end[t] for t in clock.order)
        trials: list[dict[str, Any]] = []
        for i, tid in enumerate(clock.order):  # Tune starts trials in creation order as CPUs free up
            info = next(t for t in result.trials if t.trial_id == tid)
            first = first_result(result.experiment_path, tid)
            slot = 0.0 if i < CPUS else ends[i - CPUS]
            train_first = float(first.get("perf/train_s", 0.0))
            trials.append({
                "trial_id": tid, "status": info.status, "iterations": info.iteration,
                "slot_start_s": slot, "first_report_s": clock.first[tid] - slot, "end_s": clock.end[tid] - slot,
                "start_cost_s": clock.first[tid] - slot - train_first,
                "setup_in_trial_s": float(first.get("perf/setup_s", 0.0)),
                "train_s": float(info.metrics.get("perf/train_s", 0.0)),
            })
    total = sum(t["end_s"] for t in trials)
    starts = [t["start_cost_s"] for t in trials]
    row = {
        "variant": name, "wall_s": wall, "trials": len(trials), "trials_per_min": 60 * len(trials) / wall,
        "statuses": result.counts(),
        "start_cost_s_mean": statistics.mean(starts), "start_cost_s_median": statistics.median(starts),
        "start_cost_s_first_two": statistics.mean(starts[:CPUS]),
        "start_cost_s_later": statistics.mean(starts[CPUS:]) if len(starts) > CPUS else None,
        "setup_in_trial_s_mean": statistics.mean(t["setup_in_trial_s"] for t in trials),
        "start_share": sum(starts) / total,
        "train_share_of_cpu": sum(t["train_s"] for t in trials) / (wall * CPUS),
        "per_trial": trials,
    }
    print(json.dumps({k: v for k, v in row.items() if k != "per_trial"}), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=60, help="meta-iterations per trial")
    parser.add_argument("--quick", action="store_true", help="30 iterations per trial")
    args = parser.parse_args()
    if args.quick:
        args.iterations = 30
    start = time.monotonic()
    ensure_ray(num_cpus=CPUS)
    cluster_s = time.monotonic() - start
    load_before = os.getloadavg()
    plain = sweep_spec(args.iterations, "none")
    rows = [
        measure("in_process", plain, launch="in_process", reuse_actors=False),
        measure("in_process+reuse", plain, launch="in_process", reuse_actors=True),
        measure("distributed", plain, launch="distributed", reuse_actors=False),
        measure("distributed+reuse", plain, launch="distributed", reuse_actors=True),
        measure("asha (run_sweep defaults)", sweep_spec(args.iterations, "asha")),
    ]
    info = {"cores": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
            "machine": platform.machine(), "iterations_per_trial": args.iterations, "trials": 8,
            "concurrent_trials": CPUS, "cluster_start_s": round(cluster_s, 1),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    RESULTS.mkdir(exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (RESULTS / f"sweep{suffix}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    lines = [
        f"# Sweep: 8 sinusoid trials of {args.iterations} meta-iterations (meta-batch 10), 2 at a time",
        "",
        f"Machine: {info}",
        "",
        "Start cost per trial = first report - slot start - training before that report (driver clock). "
        "Start share = sum of start costs / sum of trial durations. Train share = training seconds / "
        "(wall x 2 CPUs). Other engineers' jobs shared these 2 cores (load average above): compare rows, "
        "not absolute seconds.",
        "",
        "| variant | wall s | trials/min | statuses | start cost s (mean; first two / later) | setup in trial s |"
        " start share | train share of CPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        later = f"{r['start_cost_s_later']:.2f}" if r["start_cost_s_later"] is not None else "-"
        lines.append(
            f"| {r['variant']} | {r['wall_s']:.1f} | {r['trials_per_min']:.1f} | "
            f"{', '.join(f'{k} {v}' for k, v in sorted(r['statuses'].items()))} | "
            f"{r['start_cost_s_mean']:.2f} ({r['start_cost_s_first_two']:.2f} / {later}) | "
            f"{r['setup_in_trial_s_mean']:.2f} | {100 * r['start_share']:.0f}% | "
            f"{100 * r['train_share_of_cpu']:.0f}% |")
    (RESULTS / f"sweep{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    ray.shutdown()


if __name__ == "__main__":
    main()

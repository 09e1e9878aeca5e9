"""Ray layer benchmark: meta-iterations per second on 1 and 2 workers, Ray overhead, start latency.

Omniglot 5-way 1-shot, 15 queries per class, Conv4 (64 filters), meta-batch 32, first and second
order. Every number here comes from this one run, on this machine:

    .venv/bin/python -m benchmarks.distributed [--iterations 4] [--quick]

- ``local``: the single-process engine (``LocalExecutor``) with 1 torch thread: the baseline.
- ``ray-1``: the same job on one Ray worker (1 thread): the Ray overhead is ray-1 / local - 1.
- ``ray-2``: two Ray workers (1 thread each): the speed-up is ray-1 / ray-2.
Start latency is launch to first completed meta-iteration on an already-running cluster.
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

import ray
import torch

from workers.distributed import RayExecutor, ensure_ray
from workers.spec import JobSpec
from workers.training import LocalExecutor, Trainer

RESULTS = Path(__file__).parent / "results"


def spec_for(algorithm: str, workers: int, batch: int) -> JobSpec:
    return JobSpec.model_validate({
        "name": f"bench-{algorithm}-{workers}", "algorithm": algorithm,
        "task": {"family": "omniglot", "ways": 5, "shots": 1, "queries": 15},
        "model": {"name": "conv4"}, "inner": {"steps": 1, "lr": 0.4},
        "outer": {"meta_batch_size": batch, "iterations": 10_000, "lr": 1e-3},
        "eval": {"every": 10_000, "tasks": 1}, "checkpoint": {"every": 10_000},
        "resources": {"workers": workers, "threads_per_worker": 1},
    })


def time_iterations(trainer: Trainer, iterations: int) -> list[float]:
    trainer.step()  # warm-up: first-touch allocations, lazy imports
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        trainer.step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="meta-batch 4, 2 iterations")
    args = parser.parse_args()
    if args.quick:
        args.iterations, args.batch = 2, 4
    ensure_ray(num_cpus=2)
    rows = []
    for algorithm in ("fomaml", "maml"):
        result = {"algorithm": algorithm}
        with tempfile.TemporaryDirectory() as tmp:
            torch.set_num_threads(1)
            local = Trainer(spec_for(algorithm, 1, args.batch), run_dir=Path(tmp) / "local",
                            executor_factory=lambda s, f, m: LocalExecutor(s, f, m))
            result["local_s"] = statistics.median(time_iterations(local, args.iterations))
            peaks = {}
            for workers in (1, 2):
                spec = spec_for(algorithm, workers, args.batch)
                executors: list[RayExecutor] = []

                def factory(s, f, m, executors=executors):
                    executors.append(RayExecutor(s, data_root=None, cache_dir=None, allowed_modules=None))
                    return executors[-1]

                launch = time.perf_counter()
                trainer = Trainer(spec, run_dir=Path(tmp) / f"ray{workers}", executor_factory=factory)
                trainer.step()
                result[f"start_latency_ray{workers}_s"] = time.perf_counter() - launch
                result[f"ray{workers}_s"] = statistics.median(time_iterations(trainer, args.iterations))
                peaks[workers] = ray.get([w.peak_rss_bytes.remote() for w in executors[0].workers])
                executors[0].close()
            result["peak_rss_per_worker_mib"] = {w: [round(p / 2**20) for p in v] for w, v in peaks.items()}
        result["speedup_1_to_2"] = result["ray1_s"] / result["ray2_s"]
        result["ray_overhead"] = result["ray1_s"] / result["local_s"] - 1
        rows.append(result)
        print(json.dumps(result))
    info = {"cores": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
            "machine": platform.machine(), "iterations_timed": args.iterations, "meta_batch": args.batch}
    RESULTS.mkdir(exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (RESULTS / f"distributed{suffix}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    lines = [
        f"# Ray layer: Omniglot 5-way 1-shot Conv4, meta-batch {args.batch}, s per meta-iteration "
        f"(median of {args.iterations})", "",
        f"Machine: {info}", "",
        "| algorithm | local 1 thread | Ray 1 worker | Ray 2 workers | speed-up 1->2 | Ray overhead |"
        " start latency (1 / 2 workers) | peak RSS per worker MiB (1 / 2 workers) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['algorithm']} | {r['local_s']:.3f} | {r['ray1_s']:.3f} | {r['ray2_s']:.3f} | "
            f"{r['speedup_1_to_2']:.2f}x | {100 * r['ray_overhead']:+.1f}% | "
            f"{r['start_latency_ray1_s']:.1f} s / {r['start_latency_ray2_s']:.1f} s | "
            f"{r['peak_rss_per_worker_mib'][1]} / {r['peak_rss_per_worker_mib'][2]} |")
    (RESULTS / f"distributed{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    ray.shutdown()


if __name__ == "__main__":
    main()

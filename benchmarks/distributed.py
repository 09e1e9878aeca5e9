"""Ray layer benchmark: meta-iterations per second on 1 and 2 workers, Ray overhead, start latency.

Omniglot 5-way 1-shot, 15 queries per class, Conv4 (64 filters), meta-batch 32, first and second
order, through ``Trainer.step`` (the training loop's own path: the batched engine). Every number
here comes from this one run, on this machine:

    .venv/bin/python -m benchmarks.distributed [--iterations 8] [--quick]

- ``local``: the single-process engine (a ``LocalGroup``) with 1 torch thread: the baseline.
- ``ray-1``: the same job on one Ray worker (1 thread): the Ray overhead is ray-1 / local - 1.
- ``ray-2``: two Ray workers (1 thread each): the speed-up is ray-1 / ray-2.

The three run side by side and their timed iterations interleave (local, ray-1, ray-2, local, ...),
so a change of the machine's load moves all three alike; the cluster gets 3 logical CPUs so that
both groups stay up at once (only one of them computes at any time). Start latency is launch to
first completed meta-iteration on an already-running cluster, split into the actors' start (the
processes, imports, the Omniglot cache opened, the model built) and the first iteration.
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

from benchmarks import add_data_arguments
from workers.raygroup import ensure_ray
from workers.run import Trainer
from workers.spec import JobSpec

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=8, help="timed iterations per configuration")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="meta-batch 4, 2 iterations")
    add_data_arguments(parser)
    args = parser.parse_args()
    # Absolute: the Ray workers open the same folders from their own working directories.
    data_root = args.data_root.expanduser().resolve() if args.data_root else None
    cache_dir = Path(args.cache_dir).expanduser().resolve()
    if args.quick:
        args.iterations, args.batch = 2, 4
    ensure_ray(num_cpus=3)
    torch.set_num_threads(1)
    load_start = os.getloadavg()[0]
    rows = []
    for algorithm in ("fomaml", "maml"):
        result: dict = {"algorithm": algorithm}
        with tempfile.TemporaryDirectory() as tmp:
            trainers: dict[str, Trainer] = {
                "local": Trainer(spec_for(algorithm, 1, args.batch), run_dir=Path(tmp) / "local",
                                 data_root=data_root, cache_dir=cache_dir)}
            trainers["local"].step()  # warm-up: first-touch allocations, lazy imports
            for workers in (1, 2):
                spec = spec_for(algorithm, workers, args.batch)
                launch = time.perf_counter()
                trainer = Trainer(spec, run_dir=Path(tmp) / f"ray{workers}", data_root=data_root, cache_dir=cache_dir,
                                  use_ray=True)
                ready = time.perf_counter()
                trainer.step()
                done = time.perf_counter()
                result[f"start_ray{workers}"] = {"total_s": done - launch, "actors_s": ready - launch,
                                                 "first_iteration_s": done - ready}
                trainers[f"ray{workers}"] = trainer
            times: dict[str, list[float]] = {name: [] for name in trainers}
            for _ in range(args.iterations):
                for name, trainer in trainers.items():
                    start = time.perf_counter()
                    trainer.step()
                    times[name].append(time.perf_counter() - start)
            for name, values in times.items():
                result[f"{name}_s"] = statistics.median(values)
                result[f"{name}_all_s"] = [round(v, 3) for v in values]
            groups = {w: trainers[f"ray{w}"].group for w in (1, 2)}
            result["peak_rss_per_worker_mib"] = {
                w: [round(p / 2**20) for p in ray.get([a.peak_rss_bytes.remote() for a in group.workers])]
                for w, group in groups.items()}
            for group in groups.values():
                group.close()
        # Ratios per interleaved round, then their median: robust to a drifting load.
        result["speedup_1_to_2"] = statistics.median(
            a / b for a, b in zip(result["ray1_all_s"], result["ray2_all_s"], strict=True))
        result["ray_overhead"] = statistics.median(
            a / b for a, b in zip(result["ray1_all_s"], result["local_all_s"], strict=True)) - 1
        rows.append(result)
        print(json.dumps(result))
    info = {"cores": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
            "machine": platform.machine(), "iterations_timed": args.iterations, "meta_batch": args.batch,
            "load_avg_start": round(load_start, 2), "load_avg_end": round(os.getloadavg()[0], 2),
            "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    RESULTS.mkdir(exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (RESULTS / f"distributed{suffix}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    lines = [
        f"# Ray layer: Omniglot 5-way 1-shot Conv4, meta-batch {args.batch}, s per meta-iteration "
        f"(median of {args.iterations}, interleaved)", "",
        f"Written by `benchmarks/distributed.py`. Machine: {info}", "",
        "Ratios are the medians of the per-round ratios (one round = one iteration of each configuration).", "",
        "| algorithm | local 1 thread | Ray 1 worker | Ray 2 workers | speed-up 1->2 | Ray overhead |"
        " start latency 1 / 2 workers (actors + first iteration) | peak RSS per worker MiB (1 / 2 workers) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        starts = " / ".join(f"{r[k]['total_s']:.1f} s ({r[k]['actors_s']:.1f} + {r[k]['first_iteration_s']:.1f})"
                            for k in ("start_ray1", "start_ray2"))
        lines.append(
            f"| {r['algorithm']} | {r['local_s']:.3f} | {r['ray1_s']:.3f} | {r['ray2_s']:.3f} | "
            f"{r['speedup_1_to_2']:.2f}x | {100 * r['ray_overhead']:+.1f}% | {starts} | "
            f"{r['peak_rss_per_worker_mib'][1]} / {r['peak_rss_per_worker_mib'][2]} |")
    (RESULTS / f"distributed{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    ray.shutdown()


if __name__ == "__main__":
    main()

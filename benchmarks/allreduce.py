"""Aggregation cost per meta-iteration: the all-reduce between workers against the object-store round.

Two Ray actors (1 CPU each) stand for a 2-worker group whose shards cost nothing, so what is
timed is the aggregation alone, for a model of P float32 parameters and Adam as the meta-optimizer:

- ``object_store`` (the design before the all-reduce): the driver puts the parameters in the object
  store once, each worker reads them and returns its flat gradient sum, the driver averages them and
  takes the Adam step;
- ``allreduce`` (``workers.aggregator.allreduce_mean``): the driver sends the iteration number, the
  workers all-reduce their flat sums over gloo and each takes the same Adam step on its own copy.

Sizes: Conv4 for Omniglot (112K parameters) and 12M (a ResNet-12-sized model, synthetic tensors).
Rounds are interleaved; the ratio is the median object-store round over the median all-reduce
round, both measured in this run.

    python -m benchmarks.allreduce            # writes benchmarks/results/allreduce.{md,json}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import ray
import torch

from workers.aggregator import allreduce_mean
from workers.raygroup import Worker, WorkerGroup, ensure_ray

RESULTS = Path(__file__).parent / "results"
SIZES = {"conv4_omniglot": 112_005, "resnet12_like": 12_000_000}


class Aggregating(Worker):
    """A worker whose shard is a fixed gradient of ``size`` values: only the aggregation costs."""

    def __init__(self, size: int, rank: int, world: int) -> None:
        torch.set_num_threads(1)
        self.rank, self.world = rank, world
        self.param = torch.nn.Parameter(torch.zeros(size))
        self.optimizer = torch.optim.Adam([self.param], lr=1e-3)
        self.grad = torch.full((size,), float(rank + 1))

    def shard_sum(self, params: torch.Tensor) -> torch.Tensor:  # the object-store design's worker side
        return self.grad + 0 * params[:1]

    def step(self) -> int:  # the all-reduce design's worker side
        mean, _, _ = allreduce_mean(self.grad.clone(), {"meta/loss": 1.0}, 1)
        self.param.grad = mean
        self.optimizer.step()
        return 1


def object_store_round(group: WorkerGroup, param: torch.nn.Parameter, optimizer: torch.optim.Optimizer) -> None:
    shared = ray.put(param.detach())
    sums = group.call("shard_sum", shared)
    param.grad = torch.stack(sums).sum(0) / len(sums)
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    ensure_ray(num_cpus=2)
    load_start = os.getloadavg()[0]
    rows = []
    for name, size in SIZES.items():
        # The same actors serve both designs; the process group is only used by the all-reduce.
        group = WorkerGroup(Aggregating, size, world=2, cpus=1, gpus=0, collective=True)
        param = torch.nn.Parameter(torch.zeros(size))
        optimizer = torch.optim.Adam([param], lr=1e-3)
        times: dict[str, list[float]] = {"object_store": [], "allreduce": []}
        try:
            for _ in range(3):  # warm-up: first-touch allocations, gloo's connections
                object_store_round(group, param, optimizer)
                group.call("step")
            for r in range(args.rounds):
                for design in (("object_store", "allreduce") if r % 2 == 0 else ("allreduce", "object_store")):
                    start = time.perf_counter()
                    if design == "object_store":
                        object_store_round(group, param, optimizer)
                    else:
                        group.call("step")
                    times[design].append(time.perf_counter() - start)
        finally:
            group.close()
        row = {"model": name, "parameters": size,
               **{f"{d}_ms": round(1000 * statistics.median(t), 2) for d, t in times.items()},
               **{f"{d}_all_ms": [round(1000 * v, 2) for v in t] for d, t in times.items()}}
        row["ratio"] = round(row["object_store_ms"] / row["allreduce_ms"], 2)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_all_ms")}), flush=True)
    meta = {"date": time.strftime("%Y-%m-%dT%H:%M UTC", time.gmtime()), "machine": platform.processor() or
            platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
            "load_start": load_start, "load_end": os.getloadavg()[0], "rounds": args.rounds}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "allreduce.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["# Aggregation cost per meta-iteration: all-reduce against the object-store round", "",
             f"2 Ray workers x 1 CPU, zero-cost shards, Adam; {args.rounds} interleaved rounds, medians. "
             f"Produced by `python -m benchmarks.allreduce` on {meta['date']}; {meta['cores']} cores, torch "
             f"{meta['torch']}, Ray {meta['ray']}; 1-minute load average {meta['load_start']:.1f} at the start, "
             f"{meta['load_end']:.1f} at the end.", "",
             "| model | parameters | object-store round (ms) | all-reduce (ms) | ratio |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['parameters']:,} | {r['object_store_ms']} | {r['allreduce_ms']} | "
              f"**{r['ratio']}x** |" for r in rows]
    (RESULTS / "allreduce.md").write_text("\n".join(lines) + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()

"""Per-step BatchNorm running statistics (``model.per_step_bn_stats``): what they change at meta-test.

One Conv4 is meta-trained on Omniglot 5-way 1-shot (MAML's row: 1 inner step, alpha 0.4, meta-batch
32, 1 query per class) with the option on, for a budget of CPU seconds of this process. The same
weights are then meta-tested on the same held-out tasks, after 1 adaptation step (training's) and
after 10 (the MAML paper's protocol; the statistics are then those of step 1, the last trained), four ways:

- running statistics, the query batch at once, and item by item (one query image per call);
- batch statistics (the MAML paper's transductive evaluation), the query batch at once, and item
  by item.

With running statistics the two must agree exactly (a prediction depends on its own image and the
support set only); with batch statistics an item alone is normalised by itself.

    .venv/bin/python -m benchmarks.bn_stats [--cpu-seconds 120] [--tasks 200] [--quick]

Results: ``benchmarks/results/bn_stats.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from benchmarks import add_data_arguments
from workers.evaluation import adapt, mean_ci95, predict
from workers.mamlpp import MetaOptions
from workers.run import Trainer
from workers.spec import JobSpec

RESULTS = Path(__file__).parent / "results"
TEST_STEPS = (1, 10)  # training's inner steps, and the MAML paper's meta-test steps for Omniglot


def spec(iterations: int) -> JobSpec:
    return JobSpec.model_validate({
        "name": "bn-stats", "algorithm": "maml",
        "task": {"family": "omniglot", "ways": 5, "shots": 1, "queries": 1, "split": "paper"},
        "model": {"name": "conv4", "per_step_bn_stats": True},
        "inner": {"steps": 1, "lr": 0.4}, "outer": {"meta_batch_size": 32, "lr": 0.001, "iterations": iterations},
        "eval": {"every": 10**6, "tasks": 10, "steps": 10}, "checkpoint": {"every": 10**6}})


def meta_test(trainer: Trainer, tasks: int, steps: int) -> dict[str, dict[str, float]]:
    """Query accuracy on ``tasks`` held-out tasks after ``steps`` steps, each of the four ways."""
    model, family, cfg = trainer.model, trainer.family, trainer.spec
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    ways = {"running": MetaOptions.of(cfg), "batch": MetaOptions(steps=cfg.inner.steps, lr=cfg.inner.lr)}
    correct: dict[str, list[float]] = {f"{w}/{m}": [] for w in ways for m in ("batch", "item")}
    max_item_gap = 0.0
    for index in range(tasks):
        xs, ys, xq, yq = family.sample(cfg.seed, 0, index, "test")
        for way, meta in ways.items():
            adapted, _, _ = adapt(model, params, buffers, xs, ys, steps=steps, lr=cfg.inner.lr,
                                  loss=family.loss, meta=meta)
            together = predict(model, adapted, buffers, xq)
            alone = torch.cat([predict(model, adapted, buffers, xq[i:i + 1]) for i in range(len(xq))])
            if way == "running":
                max_item_gap = max(max_item_gap, (together - alone).abs().max().item())
            correct[f"{way}/batch"].append((together.argmax(-1) == yq).double().mean().item())
            correct[f"{way}/item"].append((alone.argmax(-1) == yq).double().mean().item())
    out: dict[str, dict[str, float]] = {}
    for key, values in correct.items():
        m, ci = mean_ci95(values)
        out[key] = {"accuracy": round(100 * m, 2), "ci95": round(100 * ci, 2)}
    out["running/max_logit_gap_item_vs_batch"] = {"value": max_item_gap}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-seconds", type=float, default=120.0, help="meta-training budget (CPU s)")
    parser.add_argument("--tasks", type=int, default=200, help="held-out tasks at meta-test")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="3 iterations, 5 tasks: a plumbing check")
    add_data_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budget, tasks = (0.0, 5) if args.quick else (args.cpu_seconds, args.tasks)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(spec(3 if args.quick else 100_000), run_dir=Path(tmp), data_root=args.data_root,
                          cache_dir=args.cache_dir.expanduser())
        cpu0, wall0 = time.process_time(), time.perf_counter()
        curve = []
        while trainer.iteration < trainer.spec.outer.iterations:
            m = trainer.step()
            curve.append(round(m.get("meta/accuracy", float("nan")), 3))
            if time.process_time() - cpu0 >= budget and (not args.quick or trainer.iteration >= 3):
                break
        train_cpu, train_wall = time.process_time() - cpu0, time.perf_counter() - wall0
        cpu1 = time.process_time()
        results = {str(steps): meta_test(trainer, tasks, steps) for steps in TEST_STEPS}
        test_cpu = time.process_time() - cpu1
        updates = int(trainer.model.get_buffer("bn_stats.updates"))
    payload = {
        "iterations": trainer.iteration, "running_statistics_updates": updates,
        "train_cpu_s": round(train_cpu, 1), "train_wall_s": round(train_wall, 1), "test_cpu_s": round(test_cpu, 1),
        "test_tasks": tasks, "test_steps": TEST_STEPS, "results": results,
        "train_query_accuracy_last10": curve[-10:],
        "spec": trainer.spec.model_dump(mode="json"),
        "machine": {"cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "threads": args.threads, "load_average_at_start": [round(x, 2) for x in load_start],
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
                    "written_at": datetime.now(UTC).isoformat(timespec="seconds")}}
    suffix = "-quick" if args.quick else ""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"bn_stats{suffix}.json").write_text(json.dumps(payload, indent=1))
    (RESULTS / f"bn_stats{suffix}.md").write_text("\n".join(render(payload)) + "\n")
    print("\n".join(render(payload)))


def render(p: dict) -> list[str]:
    def cell(steps: str, key: str) -> str:
        r = p["results"][steps][key]
        return f"{r['accuracy']:.2f} ± {r['ci95']:.2f}"

    m = p["machine"]
    gap = max(r["running/max_logit_gap_item_vs_batch"]["value"] for r in p["results"].values())
    rows = []
    for steps in p["results"]:
        rows += [f"| {steps} | running statistics of the step (the option) | {cell(steps, 'running/batch')} | "
                 f"{cell(steps, 'running/item')} |",
                 f"| {steps} | batch statistics (MAML's transductive evaluation) | {cell(steps, 'batch/batch')} | "
                 f"{cell(steps, 'batch/item')} |"]
    return [
        "# Per-step BatchNorm running statistics at meta-test (Omniglot 5-way 1-shot)",
        "",
        f"Conv4 meta-trained with `model.per_step_bn_stats` (MAML, 1 inner step, alpha 0.4, meta-batch 32) "
        f"for {p['iterations']} iterations ({p['train_cpu_s']} CPU s, {p['train_wall_s']} s wall, "
        f"{m['threads']} torch thread(s), load average {m['load_average_at_start'][0]} at start, "
        f"{m['load_average_at_end'][0]} at end); running statistics averaged over "
        f"{p['running_statistics_updates']} iterations. Meta-test: the same {p['test_tasks']} held-out tasks "
        f"(paper split), 5 query images per task; accuracy (%) with 95% confidence intervals "
        f"({p['test_cpu_s']} CPU s of meta-test).",
        "",
        "| adaptation steps | normalisation of the query images | whole query batch | one image per call |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Largest difference between a logit predicted alone and in its batch, running statistics: {gap:.2e}.",
        "",
        "Written by `benchmarks/bn_stats.py` at " + m["written_at"] + ".",
    ]


if __name__ == "__main__":
    main()

"""What normalises the query items at meta-test: batch, per-step running or support statistics.

Two Conv4s are meta-trained on Omniglot 5-way 1-shot (MAML's row: 1 inner step, alpha 0.4,
meta-batch 32, 1 query per class), each for the same budget of CPU seconds of this process:

- with ``model.per_step_bn_stats`` (MAML++'s per-step running statistics). Its training is plain
  MAML's (batch statistics in every pass), so the same weights also give MAML's own evaluation;
- with ``model.query_bn: support`` (MetaBN: every query pass, in training too, normalised with the
  support set's statistics).

Then both are meta-tested on the same held-out tasks, after 1 adaptation step (training's) and
after 10 (the MAML paper's protocol), each way the query images can be normalised: the running
statistics of the step, the query batch's own (the MAML paper's transductive evaluation), the
support set's. Each way is measured on the whole query batch at once and on one image per call;
the running and support ways must give the same answer both ways (a prediction depends on its
own image and the support set only), the query batch's own cannot.

    .venv/bin/python -m benchmarks.bn_stats [--cpu-seconds 240] [--tasks 200] [--quick]

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
MODELS = {"running": {"per_step_bn_stats": True}, "support": {"query_bn": "support"}}


def spec(iterations: int, model: dict) -> JobSpec:
    return JobSpec.model_validate({
        "name": "bn-stats", "algorithm": "maml",
        "task": {"family": "omniglot", "ways": 5, "shots": 1, "queries": 1, "split": "paper"},
        "model": {"name": "conv4", **model},
        "inner": {"steps": 1, "lr": 0.4}, "outer": {"meta_batch_size": 32, "lr": 0.001, "iterations": iterations},
        "eval": {"every": 10**6, "tasks": 10, "steps": 10}, "checkpoint": {"every": 10**6}})


def meta_test(trainer: Trainer, ways: dict[str, MetaOptions], tasks: int, steps: int) -> dict[str, dict]:
    """Query accuracy on ``tasks`` held-out tasks after ``steps`` steps, each way of ``ways`` on the
    whole query batch and image by image, and the largest logit gap between the two per way."""
    model, family, cfg = trainer.model, trainer.family, trainer.spec
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    correct: dict[str, list[float]] = {f"{w}/{m}": [] for w in ways for m in ("batch", "item")}
    gaps = dict.fromkeys(ways, 0.0)
    for index in range(tasks):
        xs, ys, xq, yq = family.sample(cfg.seed, 0, index, "test")
        for way, meta in ways.items():
            adapted, _, _ = adapt(model, params, buffers, xs, ys, steps=steps, lr=cfg.inner.lr,
                                  loss=family.loss, meta=meta)
            together = predict(model, adapted, buffers, xq)
            alone = torch.cat([predict(model, adapted, buffers, xq[i:i + 1]) for i in range(len(xq))])
            gaps[way] = max(gaps[way], (together - alone).abs().max().item())
            correct[f"{way}/batch"].append((together.argmax(-1) == yq).double().mean().item())
            correct[f"{way}/item"].append((alone.argmax(-1) == yq).double().mean().item())
    out: dict[str, dict] = {}
    for key, values in correct.items():
        m, ci = mean_ci95(values)
        out[key] = {"accuracy": round(100 * m, 2), "ci95": round(100 * ci, 2)}
    out["max_logit_gap_item_vs_batch"] = gaps
    return out


def train_and_test(name: str, args: argparse.Namespace, budget: float, tasks: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(spec(3 if args.quick else 100_000, MODELS[name]), run_dir=Path(tmp),
                          data_root=args.data_root, cache_dir=args.cache_dir.expanduser())
        cpu0, wall0, load0 = time.process_time(), time.perf_counter(), os.getloadavg()[0]
        while trainer.iteration < trainer.spec.outer.iterations:
            trainer.step()
            if time.process_time() - cpu0 >= budget and (not args.quick or trainer.iteration >= 3):
                break
        train_cpu, train_wall = time.process_time() - cpu0, time.perf_counter() - wall0
        cfg = trainer.spec
        ways = {name: MetaOptions.of(cfg)}
        if name == "running":  # its training is plain MAML's: MAML's transductive evaluation too
            ways["batch"] = MetaOptions(steps=cfg.inner.steps, lr=cfg.inner.lr)
        cpu1 = time.process_time()
        results = {str(steps): meta_test(trainer, ways, tasks, steps) for steps in TEST_STEPS}
        return {"iterations": trainer.iteration, "train_cpu_s": round(train_cpu, 1),
                "train_wall_s": round(train_wall, 1), "test_cpu_s": round(time.process_time() - cpu1, 1),
                "load_average": [round(load0, 2), round(os.getloadavg()[0], 2)], "results": results,
                "spec": cfg.model_dump(mode="json")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-seconds", type=float, default=240.0, help="meta-training budget per model (CPU s)")
    parser.add_argument("--tasks", type=int, default=200, help="held-out tasks at meta-test")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="3 iterations, 5 tasks: a plumbing check")
    add_data_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budget, tasks = (0.0, 5) if args.quick else (args.cpu_seconds, args.tasks)
    payload = {"test_tasks": tasks, "test_steps": list(TEST_STEPS), "budget_cpu_s": budget,
               "models": {name: train_and_test(name, args, budget, tasks) for name in MODELS},
               "machine": {"cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                           "threads": args.threads, "written_at": datetime.now(UTC).isoformat(timespec="seconds")}}
    suffix = "-quick" if args.quick else ""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"bn_stats{suffix}.json").write_text(json.dumps(payload, indent=1))
    (RESULTS / f"bn_stats{suffix}.md").write_text("\n".join(render(payload)) + "\n")
    print("\n".join(render(payload)))


WAYS = {"running": "running statistics of the step (`per_step_bn_stats`)",
        "batch": "the query batch's own (MAML's transductive evaluation)",
        "support": "the support set's (`query_bn: support`)"}


def render(p: dict) -> list[str]:
    lines = [
        "# What normalises the query images at meta-test (Omniglot 5-way 1-shot)",
        "",
        f"Two Conv4s meta-trained (MAML, 1 inner step, alpha 0.4, meta-batch 32, 1 query per class) for "
        f"{p['budget_cpu_s']:g} CPU s each, {p['machine']['threads']} torch thread(s); meta-test on the same "
        f"{p['test_tasks']} held-out tasks (paper split), 5 query images per task; accuracy (%) with 95% "
        "confidence intervals. The `per_step_bn_stats` model trains exactly as plain MAML does, so its "
        "transductive row is MAML's.",
        "",
        "| model | normalisation of the query images | steps | whole query batch | one image per call | "
        "largest logit gap, alone vs in batch |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in p["models"].items():
        for steps, r in run["results"].items():
            for way, gap in r["max_logit_gap_item_vs_batch"].items():
                cell = {m: f"{r[f'{way}/{m}']['accuracy']:.2f} ± {r[f'{way}/{m}']['ci95']:.2f}"
                        for m in ("batch", "item")}
                lines.append(f"| {name} | {WAYS[way]} | {steps} | {cell['batch']} | {cell['item']} | {gap:.1e} |")
    lines.append("")
    for name, run in p["models"].items():
        lines.append(f"- {name}: {run['iterations']} iterations in {run['train_cpu_s']} CPU s ({run['train_wall_s']} s "
                     f"wall), meta-test {run['test_cpu_s']} CPU s, load average {run['load_average'][0]} at the "
                     f"start, {run['load_average'][1]} at the end.")
    lines += ["", f"Written by `benchmarks/bn_stats.py` at {p['machine']['written_at']}."]
    return lines


if __name__ == "__main__":
    main()

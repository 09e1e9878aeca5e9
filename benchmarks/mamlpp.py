"""MAML++ / ANIL / checkpointing: peak memory and seconds per meta-iteration (issue 13).

The problem is the MAML paper's Omniglot 5-way 1-shot training setting (Conv4, 64 filters, 28x28
grey, 15 queries per class) with meta-batch 4, on fixture-shaped synthetic tasks (memory and time
depend on the shapes, not on the pixels; ``benchmarks.speed.make_problem``), float32.

1. Peak memory of second-order MAML: plain 5 inner steps (the engine's default dispatch, the
   batched path, and the per-task autograd loop) against 50 steps with ``inner.checkpoint`` (and
   plain 50 steps, both ways). Each configuration runs in a fresh subprocess; the figure is the
   process's peak resident set (``getrusage`` ``ru_maxrss``), and that peak less the resident set
   once the model and tasks are built (the meta-iteration's own share).
2. Seconds per meta-iteration of ANIL against MAML, 5 inner steps, and of the other options,
   with ratios against plain MAML (the engine's default dispatch) measured in the same run.

    .venv/bin/python -m benchmarks.mamlpp [--quick] [--threads 1]

Results: ``benchmarks/results/mamlpp.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from benchmarks.speed import Setting, make_problem

RESULTS = Path(__file__).parent / "results"
ALPHA = 0.1
# name: (inner steps, how the meta-gradient is computed, options)
CONFIGS: dict[str, tuple[int, str, dict]] = {
    "maml-5": (5, "engine", {}),
    "maml-5-pertask": (5, "pertask", {}),
    "maml-50-checkpoint": (50, "engine", {"checkpoint": True}),
    "maml-50": (50, "engine", {}),
    "maml-50-pertask": (50, "pertask", {}),
    "anil-5": (5, "engine", {"adapt": "head"}),
    "metasgd-5": (5, "engine", {"learn_lr": "per_parameter"}),
    "mamlpp-5": (5, "engine", {"learn_lr": "per_layer_per_step", "per_step_bn": True,
                               "msl_weights": (0.1, 0.1, 0.1, 0.1, 0.6)}),
}
MEMORY = ("maml-5", "maml-5-pertask", "maml-50-checkpoint", "maml-50", "maml-50-pertask")
TIMING = ("maml-5", "maml-5-pertask", "anil-5", "metasgd-5", "mamlpp-5")


def child(name: str, iterations: int, threads: int) -> None:
    """One configuration in this fresh process: ``iterations`` meta-iterations, then a JSON line."""
    from workers.engine import shard_meta_gradient
    from workers.inner import split_state
    from workers.mamlpp import MetaOptions, attach, task_meta_gradient
    from workers.tasks.base import Task

    torch.set_num_threads(threads)
    steps, how, options = CONFIGS[name]
    setting = Setting(inner_steps=steps, alpha=ALPHA, meta_batch=4)
    model, problem = make_problem(setting, torch.float32, setting.meta_batch)
    attach(model, steps=steps, lr=ALPHA, learn_lr=options.get("learn_lr", "none"),
           per_step_bn=options.get("per_step_bn", False))
    params, buffers = split_state(model)
    tasks = [Task(*t) for t in problem]
    meta = MetaOptions(steps=steps, lr=ALPHA, **options) if options else None
    ready = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def iteration() -> None:
        if how == "pertask":  # the general loop's plain schedule: every step's graph kept, per task
            for task in tasks:
                task_meta_gradient(model, params, buffers, task, options=MetaOptions(steps=steps, lr=ALPHA),
                                   loss="cross_entropy", before=False)
        else:
            shard_meta_gradient(model, params, buffers, tasks, algorithm="maml", inner_steps=steps, inner_lr=ALPHA,
                                loss="cross_entropy", before=False, meta=meta)

    seconds = []
    for _ in range(iterations):
        start = time.perf_counter()
        iteration()
        seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"name": name, "ready_kib": ready, "peak_kib": peak, "seconds": seconds}), flush=True)


def measure(name: str, iterations: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.mamlpp", "--child", name, "--iterations", str(iterations),
           "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent.parent, check=False)
    if proc.returncode != 0:
        return {"name": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed iterations (1 warm-up + 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every configuration")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--iterations", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.iterations, args.threads)
        return
    timed = 4 if args.quick else 11  # the first is a warm-up, left out of the median
    load_before = os.getloadavg()
    memory = {name: measure(name, 1, args.threads) for name in MEMORY}
    timing = {name: measure(name, timed, args.threads) for name in TIMING}
    load_after = os.getloadavg()
    results = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "quick": args.quick, "threads": args.threads,
               "cores": os.cpu_count(), "torch": torch.__version__, "load_before": load_before,
               "load_after": load_after, "setting": "Conv4 (64 filters) Omniglot-shaped 5-way 1-shot, 15 queries "
               "per class, meta-batch 4, float32, second order, synthetic pixels", "alpha": ALPHA,
               "memory": memory, "timing": timing}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mamlpp.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "mamlpp.md").write_text(render(results))
    print(render(results))


def _mib(kib: float) -> str:
    return f"{kib / 1024:.0f}"


def render(r: dict) -> str:
    lines = ["# MAML++ / ANIL / inner-loop checkpointing (`benchmarks/mamlpp.py`)", "",
             f"{r['date']}, {'--quick, ' if r['quick'] else ''}{r['cores']} CPU cores shared with other "
             f"engineers' work (load average {r['load_before'][0]:.1f} before, {r['load_after'][0]:.1f} after), "
             f"torch {r['torch']}, {r['threads']} torch thread(s). {r['setting']}; inner lr {r['alpha']}.", "",
             "## Peak memory of one meta-iteration (fresh process per row, ru_maxrss)", "",
             "| configuration | peak RSS (MiB) | peak less RSS before the iteration (MiB) | seconds |",
             "|---|---|---|---|"]
    for name, m in r["memory"].items():
        if "error" in m:
            lines.append(f"| {name} | failed: {m['error']} | | |")
            continue
        lines.append(f"| {name} | {_mib(m['peak_kib'])} | {_mib(m['peak_kib'] - m['ready_kib'])} | "
                     f"{m['seconds'][0]:.2f} |")
    lines += ["", "`maml-5`/`maml-50`: the engine's default dispatch for plain MAML (the batched path: the "
              "shard's inner loops together, query passes through the hand-written kernels); `-pertask`: the "
              "general loop of `workers.mamlpp` keeping every step's graph, task by task; `-checkpoint`: "
              "`inner.checkpoint`, one step's graph at a time.", "",
              "## Seconds per meta-iteration (median after a warm-up)", "",
              "| configuration | median s | runs | ratio to maml-5 |", "|---|---|---|---|"]
    base = r["timing"].get("maml-5", {})
    base_s = statistics.median(base["seconds"][1:]) if "seconds" in base else None
    for name, t in r["timing"].items():
        if "error" in t:
            lines.append(f"| {name} | failed: {t['error']} | | |")
            continue
        s = statistics.median(t["seconds"][1:])
        ratio = f"{s / base_s:.2f}" if base_s else ""
        lines.append(f"| {name} | {s:.3f} | {len(t['seconds']) - 1} | {ratio} |")
    lines += ["", "`anil-5`: `inner.adapt: head` (the body's features once per task and set); `metasgd-5`: "
              "`inner.learn_lr: per_parameter`; `mamlpp-5`: LSLR, per-step BatchNorm and the multi-step loss. "
              "All but `maml-5` take the per-task loop of `workers.mamlpp` (the batched path implements none of "
              "the options).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

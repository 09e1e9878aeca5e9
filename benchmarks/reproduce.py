"""Budgeted reproductions of the published MAML, first-order MAML and Reptile results.

Each row meta-trains with the paper's hyperparameters through the real engine
(``workers.run.Trainer``) until its wall-clock budget runs out, then meta-tests on held-out
tasks (mean and 95% confidence interval over N tasks, 600 in the papers), and writes the table
beside the published numbers with the iterations completed, the seconds spent and a learning curve:

    .venv/bin/python -m benchmarks.reproduce                        # every row, default budgets
    .venv/bin/python -m benchmarks.reproduce --only 'sinusoid-*'     # re-run rows, merge the rest
    .venv/bin/python -m benchmarks.reproduce --quick                 # smoke test, seconds per row
    .venv/bin/python -m benchmarks.reproduce --list                  # row names and settings

Results: ``benchmarks/results/reproduce.{md,json}`` (``reproduce.quick.*`` with ``--quick``).
Rows that are not re-run keep their previous result, so a table can be filled row by row.

A row's budget covers calibration, meta-training and the periodic evaluations; the final
meta-test is timed separately (capped by ``--test-minutes``, which may lower N: the table says so).
Calibration times a few meta-iterations and one evaluation, then sizes the periodic evaluations
to under 10% of the budget and, for Reptile, anneals the outer step size to 0 over the number of
iterations that fit the budget (the paper anneals over its full schedule).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch

from benchmarks import add_data_arguments
from workers.evaluation import meta_test
from workers.mamlpp import MetaOptions
from workers.run import Trainer
from workers.spec import JobSpec
from workers.supervised import torch_dtype
from workers.tasks import build_task_family

logger = logging.getLogger("benchmarks.reproduce")

RESULTS = Path(__file__).parent / "results"
EVAL_FRACTION = 0.08  # periodic evaluations' share of a row's budget (the brief allows < 10%)
CURVE_POINTS = 20  # periodic evaluations per row when they are cheap enough
EVAL_TASKS = (10, 100)  # tasks per periodic evaluation: at least, at most


# ------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Protocol:
    """How a row is meta-tested, where it differs from how it is meta-trained."""

    steps: tuple[int, ...]  # adaptation steps at meta-test; the first is the headline number
    task: dict[str, Any] = field(default_factory=dict)  # task overrides (shots, queries) at test
    batch_size: int | None = None  # Reptile: the inner mini-batch at test ("eval batch")


@dataclass(frozen=True)
class Row:
    name: str  # the key for --only
    title: str
    published: str  # as printed in the paper
    source: str  # where the published number comes from
    metric: Literal["accuracy", "mse"]
    spec: dict[str, Any] | None  # a JobSpec (iterations = the paper's schedule); None: not run here
    protocol: Protocol | None
    kind: Literal["sinusoid", "omniglot", "miniimagenet"]
    notes: str = ""
    not_run: str = ""
    # MAML++ schedules scaled to the iterations that fit the budget: outer field -> fraction of them
    # (e.g. {"msl_anneal_iterations": 0.13}); the cosine schedule then spans those iterations too.
    budget_schedule: dict[str, float] | None = None


def _sinusoid(k: int, published: str) -> Row:
    return Row(
        name=f"sinusoid-k{k}-maml", title=f"Sinusoid {k}-shot, MAML", published=published,
        source="Meta-SGD (Li et al. 2017), Table 1: MAML baseline, MSE after 1 adaptation step",
        metric="mse", kind="sinusoid",
        spec={"name": f"sinusoid-k{k}-maml", "algorithm": "maml",
              # K support and K query points per task: update_batch_size*2 in the MAML reference code.
              "task": {"family": "sinusoid", "shots": k, "queries": k},
              "model": {"name": "mlp", "hidden": [40, 40]},
              "inner": {"steps": 1, "lr": 0.01},
              "outer": {"optimizer": "adam", "lr": 1e-3, "meta_batch_size": 25, "iterations": 70_000}},
        protocol=Protocol(steps=(1, 10)),
        notes="MLP 1-40-40-1 ReLU, meta-batch 25, alpha 0.01, 1 inner step, Adam 1e-3, K query points "
              "(reference code); paper schedule 70k iterations; meta-test: K support + K query points, "
              "1 and 10 steps of alpha 0.01",
    )


def _omniglot_maml(ways: int, shots: int, algorithm: str, published: str) -> Row:
    five = ways == 5
    label = "MAML" if algorithm == "maml" else "first-order MAML"
    source = ("MAML (Finn et al. 2017), Table 1" if algorithm == "maml"
              else "MAML (Finn et al. 2017), Table 1, first-order approx. (also Reptile paper, Table 2)")
    steps, lr, batch = (1, 0.4, 32) if five else (5, 0.1, 16)
    return Row(
        name=f"omniglot-{ways}w{shots}s-{algorithm}", title=f"Omniglot {ways}-way {shots}-shot, {label}",
        published=published, source=source, metric="accuracy", kind="omniglot",
        spec={"name": f"omniglot-{ways}w{shots}s-{algorithm}", "algorithm": algorithm,
              # K queries per class = K shots: update_batch_size*2 in the MAML reference code.
              "task": {"family": "omniglot", "ways": ways, "shots": shots, "queries": shots, "split": "paper"},
              "model": {"name": "conv4"},
              "inner": {"steps": steps, "lr": lr},
              "outer": {"optimizer": "adam", "lr": 1e-3, "meta_batch_size": batch, "iterations": 60_000}},
        protocol=Protocol(steps=(10,)),
        notes=f"Conv4 64 filters + BatchNorm (batch statistics), meta-batch {batch}, {steps} inner "
              f"step(s), alpha {lr}, Adam 1e-3, {shots} query/class; paper schedule 60k iterations "
              "(reference README: 40k); meta-test: 10 steps of alpha, query batch statistics (transductive "
              "BatchNorm, as MAML)",
    )


# Reptile: the commands the supervised-reptile README gives as "the commands used for the paper"
# (non-transductive rows), which are those of the paper's final version, appendix A.
_REPTILE = {
    # (ways, shots): train shots, inner batch, inner iters, Adam lr, meta step, meta batch, iterations,
    #                eval batch, eval iters
    (5, 1): (12, 5, 12, 0.00044, 1.0, 3, 200_000, 5, 86),
    (5, 5): (10, 10, 5, 0.0015, 0.7, 5, 100_000, 6, 100),
    (20, 1): (9, 15, 12, 0.00046, 1.0, 3, 200_000, 10, 97),
    (20, 5): (12, 20, 12, 0.00046, 1.0, 3, 200_000, 10, 97),
}


def _omniglot_reptile(ways: int, shots: int, published: str) -> Row:
    train_shots, inner_batch, inner_iters, lr, meta_step, meta_batch, iterations, eval_batch, eval_iters = (
        _REPTILE[(ways, shots)])
    return Row(
        name=f"omniglot-{ways}w{shots}s-reptile", title=f"Omniglot {ways}-way {shots}-shot, Reptile",
        published=published, source="Reptile (Nichol et al. 2018), Table 2 (in brackets: with transduction)",
        metric="accuracy", kind="omniglot",
        spec={"name": f"omniglot-{ways}w{shots}s-reptile", "algorithm": "reptile",
              # Reptile meta-trains on larger tasks (train shots) than it meta-tests on; the one query
              # per class only feeds the training metrics.
              "task": {"family": "omniglot", "ways": ways, "shots": train_shots, "queries": 1, "split": "paper"},
              "model": {"name": "conv4"},
              "inner": {"steps": inner_iters, "lr": lr, "optimizer": "adam", "batch_size": inner_batch},
              "outer": {"optimizer": "sgd", "lr": meta_step, "meta_batch_size": meta_batch,
                        "iterations": iterations, "anneal": True}},
        # One query per class at test (num_shots + 1 drawings per class in the Reptile code).
        protocol=Protocol(steps=(eval_iters,), task={"shots": shots, "queries": 1}, batch_size=eval_batch),
        notes=f"supervised-reptile README command: train shots {train_shots}, inner Adam (beta1=0) lr {lr}, "
              f"{inner_iters} inner steps of batch {inner_batch}, outer SGD step {meta_step} annealed linearly "
              f"to 0, meta-batch {meta_batch}, paper schedule {iterations // 1000}k iterations; meta-test: "
              f"{eval_iters} Adam steps of batch {eval_batch}, 1 query/class evaluated as one batch, i.e. "
              "transductive BatchNorm: compare with the bracketed number",
    )


def _miniimagenet(shots: int, published: str) -> Row:
    return Row(
        name=f"miniimagenet-5w{shots}s-maml", title=f"MiniImagenet 5-way {shots}-shot, MAML",
        published=published, source="MAML (Finn et al. 2017), Table 2", metric="accuracy",
        kind="miniimagenet", spec=None, protocol=None,
        notes="Conv4 32 filters, meta-batch 4, 5 inner steps, alpha 0.01, 15 queries/class, 60k iterations",
        not_run="not run: data not available here",
    )


ROWS: tuple[Row, ...] = (
    # In priority order: the first rows run first when the total time is limited.
    _sinusoid(5, "1.13 ± 0.18"),
    _sinusoid(10, "0.77 ± 0.11"),
    _sinusoid(20, "0.48 ± 0.08"),
    *(r for ways, shots, maml, fomaml, reptile in (
        (5, 1, "98.7 ± 0.4", "98.3 ± 0.5", "95.39 ± 0.09 (97.68 ± 0.04)"),
        (5, 5, "99.9 ± 0.1", "99.2 ± 0.2", "98.90 ± 0.10 (99.48 ± 0.06)"),
        (20, 1, "95.8 ± 0.3", "89.4 ± 0.5", "88.14 ± 0.15 (89.43 ± 0.14)"),
        (20, 5, "98.9 ± 0.2", "97.9 ± 0.1", "96.65 ± 0.33 (97.12 ± 0.32)"),
    ) for r in (_omniglot_maml(ways, shots, "maml", maml), _omniglot_maml(ways, shots, "fomaml", fomaml),
                _omniglot_reptile(ways, shots, reptile))),
    _miniimagenet(1, "48.70 ± 1.84"),
    _miniimagenet(5, "63.11 ± 0.92"),
)


# ---------------------------------------------------------------------------------------- training


class ProtocolTrainer(Trainer):
    """A Trainer whose evaluations follow the row's meta-test protocol rather than its training setup.

    Reptile meta-trains on 12-shot tasks but is meta-tested on 1-shot ones with its own step count
    and batch; the sinusoid rows report the error after 1 and after 10 steps. Periodic evaluations
    use the ``val`` tasks (the test characters at other task coordinates), the final one ``test``.
    """

    def __init__(self, spec: JobSpec, protocol: Protocol, *, data_root: Path | None, cache_dir: Path | None,
                 **kwargs: Any) -> None:
        super().__init__(spec, data_root=data_root, cache_dir=cache_dir, **kwargs)
        self.protocol = protocol
        if protocol.task:
            test_task = type(spec.task).model_validate({**spec.task.model_dump(), **protocol.task})
            self.test_family = build_task_family(test_task, data_root=data_root, cache_dir=cache_dir,
                                                 dtype=torch_dtype(spec))
        else:
            self.test_family = self.family
        self.eval_seconds = 0.0
        self.clock: Callable[[], float] = time.perf_counter  # what eval_seconds counts

    def evaluate(self, num_tasks: int | None = None, split: Literal["val", "test"] = "val") -> dict[str, float]:
        start = self.clock()
        self.program.sync(self.group)
        params = {k: v.detach() for k, v in self.parameters.items()}
        buffers = {k: v.detach() for k, v in self.model.named_buffers()}
        out: dict[str, float] = {}
        for i, steps in enumerate(self.protocol.steps):
            metrics = meta_test(
                self.model, params, buffers, self.test_family, seed=self.spec.seed,
                num_tasks=num_tasks or self.spec.eval.tasks, steps=steps, lr=self.spec.inner.lr,
                optimizer=self.spec.inner.optimizer,
                batch_size=self.protocol.batch_size or self.spec.inner.batch_size, split=split,
                device=self.program.device,
                # the learned learning rates, per-step BatchNorm and ANIL's head-only loop, as in training
                meta=MetaOptions.of(self.spec) if self.spec.meta_options_used else None)
            # The first step count keeps the engine's keys; the others are namespaced by their count.
            out.update(metrics if i == 0 else {f"eval/steps{steps}/{k[5:]}": v for k, v in metrics.items()})
        self.eval_seconds += self.clock() - start
        return out


@dataclass
class Budget:
    train_s: float  # calibration + meta-training + periodic evaluations
    test_s: float  # cap on the final meta-test
    test_tasks: int  # N requested for the final meta-test
    # The budget's clock: wall-clock seconds, or CPU seconds of this process (all its threads), which
    # a shared machine's other work does not eat into.
    clock: Literal["wall", "cpu"] = "wall"
    deadline: float | None = None  # time.time() at which training stops, whatever is left of the budget

    def now(self) -> float:
        return time.process_time() if self.clock == "cpu" else time.perf_counter()


def _calibrate(trainer: ProtocolTrainer, budget: Budget) -> dict[str, float]:
    """Time an evaluation of the untrained model and a few meta-iterations (which count as training)."""
    probe_tasks = 3
    start = budget.now()
    trainer.evaluate(num_tasks=probe_tasks)
    eval_task_s = (budget.now() - start) / probe_tasks
    times: list[float] = []
    # Two iterations (the first pays for first-touch allocations), one if that one is already dear,
    # more while they cost under 2% of the budget.
    while not times or (len(times) < 2 and times[0] < 0.1 * budget.train_s) or (
            sum(times) < 0.02 * budget.train_s and len(times) < 20):
        t = budget.now()
        trainer.step()
        times.append(budget.now() - t)
    # The first iteration pays for first-touch allocations; the rest are the steady state.
    return {"iteration_s": min(times[1:]) if len(times) > 1 else times[0], "eval_task_s": eval_task_s,
            "iterations": float(len(times))}


def _plan(calibration: dict[str, float], budget: Budget, elapsed: float, paper_iterations: int) -> dict[str, int]:
    """Iterations that fit the budget, and evaluation size and spacing under EVAL_FRACTION of it."""
    remaining = max(budget.train_s - elapsed, 0.0)
    eval_budget = EVAL_FRACTION * budget.train_s
    per_task = calibration["eval_task_s"]
    points = CURVE_POINTS
    tasks = int(eval_budget / (points * per_task))
    if tasks < EVAL_TASKS[0]:  # evaluations are dear: fewer of them, each with enough tasks
        tasks = EVAL_TASKS[0]
        points = max(2, int(eval_budget / (tasks * per_task)))
        if points * tasks * per_task > eval_budget:
            tasks = max(3, int(eval_budget / (points * per_task)))
    tasks = min(tasks, EVAL_TASKS[1])
    fit = int(0.97 * (remaining - points * tasks * per_task) / calibration["iteration_s"])
    planned = max(1, min(paper_iterations, int(calibration["iterations"]) + fit))
    return {"iterations": planned, "eval_tasks": tasks, "eval_every": max(1, planned // points)}


def run_row(row: Row, budget: Budget, *, seed: int, data_root: Path | None = None,
            cache_dir: Path | None = None) -> dict[str, Any]:
    """Meta-train one row within its budget and meta-test it; everything that ran, as a JSON dict."""
    assert row.spec is not None and row.protocol is not None
    spec = JobSpec.model_validate({**row.spec, "seed": seed})
    paper_iterations = spec.outer.iterations
    run_dir = Path(tempfile.mkdtemp(prefix=f"reproduce-{row.name}-"))
    curve: list[dict[str, Any]] = []
    try:
        row_start, wall_start, cpu_start = budget.now(), time.perf_counter(), time.process_time()
        data = {"data_root": data_root, "cache_dir": cache_dir}
        trainer = ProtocolTrainer(spec, row.protocol, run_dir=run_dir / "calibration", **data)
        trainer.clock = budget.now
        setup_s = budget.now() - row_start
        calibration = _calibrate(trainer, budget)
        plan = _plan(calibration, budget, budget.now() - row_start, paper_iterations)
        logger.info("%s: %.3f s/iteration, %.3f s per eval task -> plan %s", row.name,
                    calibration["iteration_s"], calibration["eval_task_s"], plan)
        updates = {"eval": {"every": plan["eval_every"], "tasks": plan["eval_tasks"],
                            "steps": row.protocol.steps[0]},
                   "checkpoint": {"every": 10_000_000, "keep": 1}}
        if spec.outer.anneal or row.budget_schedule:
            # The outer step size anneals (to 0, or by its cosine) over the iterations that fit the
            # budget, and MAML++'s other schedules over their share of them, so a fresh trainer (the
            # calibration iterations are not kept) with those schedules.
            scaled = {k: max(1, round(f * plan["iterations"])) for k, f in (row.budget_schedule or {}).items()}
            spec = JobSpec.model_validate({**spec.model_dump(), **updates, "outer": {
                **spec.outer.model_dump(), "iterations": plan["iterations"], **scaled}})
            trainer = ProtocolTrainer(spec, row.protocol, run_dir=run_dir / "run", **data)
            trainer.clock = budget.now
        else:
            # The calibration iterations are the first iterations of the run; the spec's schedule stays
            # the paper's and the budget stops it.
            spec = JobSpec.model_validate({**spec.model_dump(), **updates})
            trainer.spec.eval = spec.eval
            trainer.spec.checkpoint = spec.checkpoint
        primary = "eval/accuracy" if row.metric == "accuracy" else "eval/loss"
        state = {"last_log": 0.0, "eval_at": budget.now() - row_start, "eval_it": trainer.iteration,
                 "eval_s": 0.0}
        loads: list[float] = []  # 1-minute load average at each log line: the machine is shared

        def reporter(iteration: int, metrics: dict[str, float]) -> None:
            now = budget.now() - row_start
            if "eval/loss" in metrics:
                # Keep evaluations under EVAL_FRACTION of the time when iterations run faster than
                # calibrated (the machine is shared): space them by the rates just measured.
                took = trainer.eval_seconds - state["eval_s"]
                span, its = now - state["eval_at"] - took, iteration - state["eval_it"]
                if its > 0 and span > 0:
                    need = math.ceil(its / span * took * (1 - EVAL_FRACTION) / EVAL_FRACTION)
                    trainer.spec.eval.every = max(plan["eval_every"], need)
                state.update(eval_at=now, eval_it=iteration, eval_s=trainer.eval_seconds)
                curve.append({"iteration": iteration, "wall_s": round(time.perf_counter() - wall_start, 2),
                              "cpu_s": round(time.process_time() - cpu_start, 2), "budget_s": round(now, 2),
                              "load1": round(os.getloadavg()[0], 2), "split": "val",
                              **{k: v for k, v in metrics.items() if k.startswith(("eval/", "meta/"))}})
                logger.info("%s it %d %.0fs: %s %.4f ± %.4f (%d tasks), train meta/loss %.4f", row.name,
                            iteration, now, primary, metrics[primary], metrics[primary + "_ci95"],
                            metrics["eval/tasks"], metrics.get("meta/loss", float("nan")))
            elif now - state["last_log"] >= 30:
                logger.info("%s it %d %.0fs/%.0fs: meta/loss %.4f%s", row.name, iteration, now, budget.train_s,
                            metrics["meta/loss"], f" meta/accuracy {metrics['meta/accuracy']:.3f}"
                            if "meta/accuracy" in metrics else "")
            else:
                return
            state["last_log"] = now
            loads.append(os.getloadavg()[0])

        trainer.reporter = reporter
        trainer.should_stop = lambda: budget.now() - row_start >= budget.train_s or (
            budget.deadline is not None and time.time() >= budget.deadline)
        trainer.eval_seconds = 0.0  # count the periodic evaluations only
        result = trainer.run()
        train_s = budget.now() - row_start
        train_wall_s, train_cpu_s = time.perf_counter() - wall_start, time.process_time() - cpu_start
        eval_s = trainer.eval_seconds
        train_metrics = {k: v for k, v in result.metrics.items() if k.startswith(("meta/", "inner/", "perf/"))}

        # Final meta-test: N tasks, or fewer if N would not fit the test cap. The periodic evaluations
        # time a task better than the calibration's three.
        evaluated = sum(p["eval/tasks"] for p in curve)
        per_task = eval_s / evaluated if evaluated else calibration["eval_task_s"]
        n = min(budget.test_tasks, max(EVAL_TASKS[0], int(budget.test_s / per_task)))
        logger.info("%s: trained %d iterations in %.0fs; meta-testing on %d tasks (~%.0fs)", row.name,
                    trainer.iteration, train_s, n, n * per_task)
        start, test_wall = budget.now(), time.perf_counter()
        final = trainer.evaluate(num_tasks=n, split="test")
        test_s = budget.now() - start
        test_wall_s = time.perf_counter() - test_wall
        curve.append({"iteration": trainer.iteration, "wall_s": round(train_wall_s, 2), "cpu_s": round(train_cpu_s, 2),
                      "budget_s": round(train_s, 2), "split": "test", **final, **train_metrics})
        logger.info("%s: %s %.4f ± %.4f over %d test tasks", row.name, primary, final[primary],
                    final[primary + "_ci95"], n)
        return {
            "status": "ran",
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "spec": spec.model_dump(mode="json"),
            "protocol": {"steps": list(row.protocol.steps), "task": row.protocol.task,
                         "batch_size": row.protocol.batch_size or spec.inner.batch_size,
                         "lr": spec.inner.lr, "optimizer": spec.inner.optimizer},
            "paper_iterations": paper_iterations,
            "iterations": trainer.iteration,
            "stopped_by_budget": result.cancelled,
            "budget_s": budget.train_s,
            "clock": budget.clock,
            "train_wall_s": round(train_s, 2),  # in the budget's clock (wall or CPU seconds)
            "train_wall_clock_s": round(train_wall_s, 2),
            "train_cpu_s": round(train_cpu_s, 2),
            "setup_s": round(setup_s, 2),
            "eval_wall_s": round(eval_s, 2),
            "calibration": calibration,
            "plan": {**plan, "eval_every_last": trainer.spec.eval.every},
            "test": {"tasks": n, "tasks_requested": budget.test_tasks, "split": "test", "wall_s": round(test_s, 2),
                     "wall_clock_s": round(test_wall_s, 2), "metrics": final},
            "train_metrics": train_metrics,
            "load_average": {"mean": round(sum(loads) / len(loads), 2) if loads else None,
                             "max": round(max(loads), 2) if loads else None, "samples": len(loads)},
            "curve": curve,
        }
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


# ----------------------------------------------------------------------------------------- results


def _headline(row: Row, entry: dict[str, Any]) -> str:
    if entry.get("status") != "ran":
        return entry.get("status", "not run yet")
    metrics, n, requested = entry["test"]["metrics"], entry["test"]["tasks"], entry["test"]["tasks_requested"]
    tasks = f"N={n}" if n >= requested else f"N={n}, not {requested}: test cap"
    if row.metric == "accuracy":
        return f"{100 * metrics['eval/accuracy']:.2f} ± {100 * metrics['eval/accuracy_ci95']:.2f} ({tasks})"
    parts = []
    for i, steps in enumerate(entry["protocol"]["steps"]):
        key = "eval/loss" if i == 0 else f"eval/steps{steps}/loss"
        parts.append(f"{steps} step{'s' if steps > 1 else ''}: {metrics[key]:.3f} ± {metrics[key + '_ci95']:.3f}")
    return "; ".join(parts) + f" ({tasks})"


def _curve_text(row: Row, entry: dict[str, Any], limit: int = 8) -> str:
    points = [p for p in entry.get("curve", []) if p["split"] == "val"]
    if len(points) > limit:  # evenly spaced, always with the last
        points = [points[round(i * (len(points) - 1) / (limit - 1))] for i in range(limit)]
    key, scale = ("eval/accuracy", 100) if row.metric == "accuracy" else ("eval/loss", 1)
    return ", ".join(f"{p['iteration']} it/{p['wall_s']:.0f}s: {scale * p[key]:.{1 if scale == 100 else 3}f}"
                     for p in points)


def write_markdown(path: Path, results: dict[str, Any]) -> None:
    rows = results["rows"]
    mode = "--quick smoke test, not results" if results["quick"] else "budgeted runs"
    lines = [
        "# Paper reproductions on this CPU",
        "",
        f"Written by `benchmarks/reproduce.py` ({mode}). "
        "Each row meta-trains with the paper's hyperparameters through `workers.run.Trainer` until "
        "its wall-clock budget runs out, then meta-tests on N held-out tasks (the papers use 600; "
        "fewer where the meta-test cap required it). Ours: mean ± 95% CI over N tasks; accuracy in %, "
        "sinusoid in MSE. The paper schedules (40-200k iterations) are GPU-sized: a budgeted row "
        "stops far earlier, so these are learning-curve points, not the converged numbers.",
        "",
        "| Row | Published | Ours | Iterations (paper) | Train s / budget | Test s | Machine (1-min load avg) "
        "| Finished (UTC) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in ROWS:
        entry = rows.get(row.name, {"status": row.not_run or "not run yet"})
        if entry.get("status") == "ran":
            iters = f"{entry['iterations']} ({entry['paper_iterations'] // 1000}k)"
            if entry["spec"]["outer"]["anneal"]:
                iters += f", annealed over {entry['spec']['outer']['iterations']}"
            host, load = entry.get("host", {}), entry.get("load_average", {})
            machine = (f"{host.get('cpus', '?')} CPU, {host.get('threads', '?')} thread, load "
                       f"{load.get('mean') or host.get('load_start', '?')} (max {load.get('max') or '?'})")
            lines.append(f"| {row.title} | {row.published} | {_headline(row, entry)} | {iters} | "
                         f"{entry['train_wall_s']:.0f} / {entry['budget_s']:.0f} | {entry['test']['wall_s']:.0f} | "
                         f"{machine} | {entry['finished_at'][:16]} |")
        else:
            lines.append(f"| {row.title} | {row.published} | {entry['status']} | | | | | |")
    lines += ["", "## Configurations and sources", ""]
    for row in ROWS:
        lines.append(f"- **{row.name}** ({row.source}): {row.notes}.")
    lines += ["", "## Learning curves (val tasks: iteration / wall-clock seconds: metric)", "",
              "The full curves, with train metrics and the CIs, are in the JSON beside this file.", ""]
    for row in ROWS:
        entry = rows.get(row.name, {})
        if entry.get("status") == "ran":
            plan = entry["plan"]
            lines.append(f"- **{row.name}** ({plan['eval_tasks']} tasks per evaluation, "
                         f"{entry['eval_wall_s']:.0f} s of evaluation): {_curve_text(row, entry)}")
    lines += ["", "## Protocol choices", "", *PROTOCOL_NOTES, "", "## Re-run", "", "```",
              ".venv/bin/python -m benchmarks.reproduce                                  # every row",
              ".venv/bin/python -m benchmarks.reproduce --only 'omniglot-5w1s-*'         # some rows, merged",
              ".venv/bin/python -m benchmarks.reproduce --only omniglot-5w1s-maml --budget-minutes 30",
              "```", ""]
    path.write_text("\n".join(lines))


PROTOCOL_NOTES = [
    "- Queries: the MAML reference code draws K query examples per class for Omniglot (and K query "
    "points for the sinusoid), `DataGenerator(update_batch_size*2, ...)`, in training and at test; "
    "we do the same. (It uses 15 queries only for MiniImagenet training.)",
    "- BatchNorm uses batch statistics in every pass, as in MAML: the query set is normalised as one "
    "batch, i.e. transductively. The Reptile paper's non-transductive numbers normalise each query "
    "with the support set instead, so our Reptile rows compare with its bracketed transductive numbers.",
    "- Reptile hyperparameters are the non-transductive commands of the supervised-reptile README "
    "('the commands used for the paper'), which differ per row from the v1 appendix values "
    "(Adam 1e-3, 5 inner steps of batch 10, 10 train shots, meta-batch 5, 50 test steps); see each row. "
    "Our inner mini-batches cycle one fixed permutation of the task's examples (the reference reshuffles "
    "each pass). The outer step anneals linearly to 0 over the iterations that fit the budget.",
    "- Sinusoid: the published numbers are MAML's results in the Meta-SGD paper, Table 1 (5/10/20 shots; "
    "1.13 ± 0.18 as in the brief, 0.77 and 0.48 as we recall that table). Meta-SGD adapts with one "
    "step, so compare them with our 1-step MSE; we also report 10 steps (the MAML paper's Fig. 2). "
    "Meta-test as in the MAML reference code: 600 tasks of K support and K query points.",
    "- First-order MAML numbers are the MAML paper's 'first order approx.' row (quoted by the Reptile "
    "paper, Table 2) and use MAML's hyperparameters.",
    "- Omniglot split: the MAML paper's (1200 characters meta-train, 423 meta-test, rotations as new "
    "classes). Periodic evaluations use other tasks from the test characters (`val`) than the final one.",
]


def _path(stem: Path, suffix: str) -> Path:
    # Not Path.with_suffix: "reproduce.quick" would lose its ".quick".
    return stem.parent / (stem.name + suffix)


def open_results(out: Path, name: str, quick: bool) -> tuple[Path, dict[str, Any]]:
    """The stem of the results table ``name`` (``name.quick`` for a smoke test) under ``out``, and
    what it holds so far: rows that are not re-run keep their result."""
    stem = out / (f"{name}.quick" if quick else name)
    results = load_results(_path(stem, ".json"))
    results["quick"] = quick
    return stem, results


def load_results(path: Path) -> dict[str, Any]:
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("ignoring unreadable %s: %s", path, exc)
    return {"rows": {}}


def _finite(value: Any) -> Any:
    """NaN (regression has no accuracy) and infinities as null: the JSON stays standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def save_results(stem: Path, results: dict[str, Any]) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    for row in ROWS:  # not-run rows are listed too, so the JSON has the whole table
        if row.not_run:
            results["rows"][row.name] = {"status": row.not_run, "notes": row.notes}
    results["rows"] = {r.name: results["rows"][r.name] for r in ROWS if r.name in results["rows"]}
    json_path = _path(stem, ".json")
    tmp = _path(stem, ".json.tmp")
    tmp.write_text(json.dumps(_finite(results), indent=1))
    os.replace(tmp, json_path)
    write_markdown(_path(stem, ".md"), results)


# --------------------------------------------------------------------------------------------- CLI


def select(patterns: list[str] | None) -> list[Row]:
    if not patterns:
        return list(ROWS)
    chosen = [r for r in ROWS if any(fnmatch.fnmatchcase(r.name, p) for p in patterns)]
    unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(r.name, p) for r in ROWS)]
    if unknown:
        raise SystemExit(f"--only: no row matches {unknown}; rows: {', '.join(r.name for r in ROWS)}")
    return chosen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="rows to run (names or shell patterns, e.g. 'sinusoid-*'); the others keep "
                             "their previous results")
    parser.add_argument("--budget-minutes", type=float,
                        help="training budget of every selected row (overrides the two below)")
    parser.add_argument("--omniglot-minutes", type=float, default=10.0, help="training budget per Omniglot row")
    parser.add_argument("--sinusoid-minutes", type=float, default=3.0, help="training budget per sinusoid row")
    parser.add_argument("--total-minutes", type=float,
                        help="start no row whose budget would end past this (rows run in priority order)")
    parser.add_argument("--test-tasks", type=int, default=600, help="N: held-out tasks in the final meta-test")
    parser.add_argument("--test-minutes", type=float, default=5.0,
                        help="cap on each row's final meta-test (lowers N when needed; the table says so)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (this machine is shared)")
    parser.add_argument("--seed", type=int, default=0)
    add_data_arguments(parser)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: seconds per row, 20 test tasks; writes reproduce.quick.*")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    parser.add_argument("--render", action="store_true", help="rewrite the markdown from the JSON, run nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    rows = select(args.only)
    if args.list:
        for row in rows:
            print(f"{row.name:28s} {row.published:30s} {row.not_run or row.notes}")  # noqa: T201
        return
    torch.set_num_threads(args.threads)
    stem, results = open_results(args.out, "reproduce", args.quick)
    if args.render:
        save_results(stem, results)
        return

    start = time.perf_counter()
    for row in rows:
        if row.spec is None:
            logger.info("%s: %s", row.name, row.not_run)
            continue
        minutes = args.budget_minutes or (args.sinusoid_minutes if row.kind == "sinusoid" else args.omniglot_minutes)
        budget = Budget(train_s=60 * minutes, test_s=60 * args.test_minutes, test_tasks=args.test_tasks)
        if args.quick:
            budget = Budget(train_s=4.0 if row.kind == "sinusoid" else 8.0, test_s=10.0,
                            test_tasks=min(args.test_tasks, 20))
        elapsed_min = (time.perf_counter() - start) / 60
        if args.total_minutes is not None and elapsed_min + budget.train_s / 60 > args.total_minutes:
            logger.info("%s: skipped, the total budget of %.0f min would be exceeded", row.name, args.total_minutes)
            continue
        logger.info("%s: %s, budget %.0fs", row.name, row.title, budget.train_s)
        load_start = round(os.getloadavg()[0], 2)
        entry = run_row(row, budget, seed=args.seed, data_root=args.data_root,
                        cache_dir=Path(args.cache_dir).expanduser())
        entry["host"] = {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                         "python": platform.python_version(), "machine": platform.machine(),
                         "load_start": load_start, "load_end": round(os.getloadavg()[0], 2)}
        entry["published"] = row.published
        entry["source"] = row.source
        entry["notes"] = row.notes
        results = load_results(_path(stem, ".json"))  # merge with rows another run may have written
        results["quick"] = args.quick
        results["rows"][row.name] = entry
        results["protocol_notes"] = PROTOCOL_NOTES
        save_results(stem, results)
        logger.info("%s: written to %s.{md,json}", row.name, stem)
    save_results(stem, results)


if __name__ == "__main__":
    main()

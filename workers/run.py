"""Run a job: the one training loop, and ``run_training``, which restarts it when a worker dies.

``Trainer`` owns what every kind of job shares: resume from the last checkpoint, the iteration
loop, cancellation, evaluation cadence, reports, checkpoints and the export. What one
meta-iteration *is* comes from a program: ``workers.supervised.SupervisedProgram`` (meta-gradients
of task shards, averaged by the aggregator) or ``workers.rl.program.RLProgram`` (rollouts, then
TRPO or Adam). Either computes on a worker group (``workers.raygroup``): in this process, or on
``resources.workers`` Ray actors.

Example::

    result = run_training(spec, run_dir=Path("runs/sine"), reporter=print_report, should_stop=lambda: False)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workers.checkpoint import Checkpoint, Location, latest_checkpoint, save_checkpoint, save_export
from workers.errors import NonFiniteLossError, TrainingError, WorkerError, WorkerLost
from workers.raygroup import LocalGroup, WorkerGroup, ensure_ray
from workers.spec import JobSpec

logger = logging.getLogger(__name__)
Reporter = Callable[[int, dict[str, float]], None]
# The pre-adaptation query metrics (meta/loss_before, meta/accuracy_before) cost one more forward
# pass of every query set: they are computed on every BEFORE_EVERY-th iteration and at evaluations.
BEFORE_EVERY = 10
# TRPO keeps no optimizer state; this is what a checkpoint records for it.
_NO_OPTIMIZER_STATE: dict[str, Any] = {"state": {}, "param_groups": []}


@dataclass
class TrainResult:
    iteration: int
    metrics: dict[str, float]
    eval_metrics: dict[str, float]
    model_dir: Path | None
    cancelled: bool = False
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)


def make_program(spec: JobSpec, **build: Any) -> Any:
    """The program of a spec: meta-RL for the RL task families, supervised otherwise."""
    if spec.is_rl:
        from workers.rl.program import RLProgram

        return RLProgram(spec)
    from workers.supervised import SupervisedProgram

    return SupervisedProgram(spec, **build)


class Trainer:
    """Meta-train a spec to completion, resuming from ``run_dir/checkpoints`` when one is there.

    ``use_ray`` runs the program's workers as ``resources.workers`` Ray actors (placed within
    ``start_timeout_s``), else one worker in this process. ``checkpoint_dir`` puts the checkpoints
    elsewhere: a path or a URI such as ``s3://bucket/job``; the model is still exported under
    ``run_dir``. ``reporter(iteration, metrics)`` receives a flat dict with namespaced keys every
    ``report_every`` iterations and after every evaluation; ``should_stop()`` is polled every
    iteration (cancellation), after which a checkpoint is written and the result is marked cancelled.
    """

    def __init__(self, spec: JobSpec, *, run_dir: Path, data_root: Path | None = None, cache_dir: Path | None = None,
                 reporter: Reporter | None = None, should_stop: Callable[[], bool] | None = None,
                 allowed_modules: Iterable[str] | None = None, report_every: int = 1,
                 device: torch.device | None = None, checkpoint_dir: Location | None = None, use_ray: bool = False,
                 start_timeout_s: float = 600.0) -> None:
        self.spec = spec
        self.run_dir = Path(run_dir)
        self.checkpoint_dir: Location = checkpoint_dir or self.run_dir / "checkpoints"
        self.reporter = reporter or log_reporter(spec)
        self.should_stop = should_stop or (lambda: False)
        self.report_every = report_every
        self.program = make_program(spec, data_root=data_root, cache_dir=cache_dir, allowed_modules=allowed_modules,
                                    device=device)
        # The model (a policy for meta-RL), its meta-optimizer (None for TRPO) and its task family.
        self.model, self.optimizer, self.family = self.program.module, self.program.optimizer, self.program.family
        self.parameters = dict(self.model.named_parameters())
        self.iteration = 0
        self.last_metrics: dict[str, float] = {}
        self.eval_metrics: dict[str, float] = {}
        self._resume()
        if use_ray:
            res = spec.resources
            self.group: LocalGroup | WorkerGroup = WorkerGroup(
                self.program.worker_cls, spec, world=res.workers, cpus=res.cpus_per_worker, gpus=res.gpus_per_worker,
                start_timeout_s=start_timeout_s, should_stop=self.should_stop, collective=self.program.collective,
                **self.program.worker_context)
        else:
            self.group = LocalGroup(self.program.local_worker())
        if self.group.workers:  # (none when a cancel ended the wait for the cluster)
            self.program.attach(self.group)

    def _resume(self) -> None:
        ckpt = latest_checkpoint(self.checkpoint_dir)
        if ckpt is None:
            return
        device = next(iter(self.parameters.values())).device
        self.model.load_state_dict({k: v.to(device) for k, v in ckpt.model.items()}, strict=True)
        if self.optimizer is not None and ckpt.optimizer["param_groups"]:
            self.optimizer.load_state_dict(ckpt.optimizer)
        self.program.resume(ckpt.iteration)
        if ckpt.rng_state is not None:
            torch.set_rng_state(ckpt.rng_state)
        self.iteration = ckpt.iteration
        self.last_metrics = dict(ckpt.metrics)
        logger.info("resumed %s from %s at iteration %d", self.spec.name, ckpt.path, ckpt.iteration)

    def checkpoint(self) -> Path | str:
        self.program.sync(self.group)
        optimizer = self.optimizer
        try:
            return save_checkpoint(self.checkpoint_dir, Checkpoint(
                iteration=self.iteration,
                model=self.model.state_dict(),
                optimizer=optimizer.state_dict() if optimizer is not None else _NO_OPTIMIZER_STATE,
                spec=self.spec.model_dump(mode="json"),
                rng_state=torch.get_rng_state(),
                metrics=self.last_metrics,
            ), keep=self.spec.checkpoint.keep)
        except OSError as exc:  # a full disk, a lost mount: the job fails with it; the last checkpoint stays
            raise TrainingError(f"writing the checkpoint of iteration {self.iteration} to {self.checkpoint_dir} "
                                f"failed: {exc}", self.iteration) from exc

    def evaluate(self) -> dict[str, float]:
        self.program.sync(self.group)
        return self.program.evaluate()

    def _evaluates(self, iteration: int) -> bool:
        return iteration % self.spec.eval.every == 0 or iteration == self.spec.outer.iterations

    def step(self) -> dict[str, float]:
        """One meta-iteration of the program, its failures typed with the iteration. Its metrics."""
        it = self.iteration
        start = time.perf_counter()
        before = (it + 1) % BEFORE_EVERY == 0 or self._evaluates(it + 1)
        try:
            metrics, count = self.program.step(self.group, it, before=before)
        except NonFiniteLossError as exc:
            raise TrainingError(f"{self.program.diverged} at iteration {it}: {exc}", it) from exc
        except WorkerLost:
            raise  # run_training restarts the worker group from the last checkpoint
        except WorkerError as exc:
            raise TrainingError(f"worker error at iteration {it}: {exc}", it) from exc
        self.iteration += 1
        elapsed = time.perf_counter() - start
        metrics.update({"perf/iteration_s": elapsed, "perf/tasks_per_s": count / elapsed})
        return metrics

    def run(self) -> TrainResult:
        total = self.spec.outer.iterations
        history: list[tuple[int, dict[str, float]]] = []
        try:
            while self.iteration < total:
                if self.should_stop():
                    self.checkpoint()
                    return TrainResult(self.iteration, self.last_metrics, self.eval_metrics, None, True, history)
                metrics = self.step()
                it = self.iteration
                if self._evaluates(it):
                    self.eval_metrics = self.evaluate()
                    metrics = {**metrics, **self.eval_metrics}
                self.last_metrics = metrics
                if it % self.report_every == 0 or self._evaluates(it):
                    self.reporter(it, metrics)
                    history.append((it, metrics))
                if it % self.spec.checkpoint.every == 0 or it == total:
                    self.checkpoint()
        finally:
            self.group.close()
        if not self.eval_metrics:
            self.eval_metrics = self.evaluate()
        model_dir = self.export(self.run_dir / "model")
        return TrainResult(self.iteration, self.last_metrics, self.eval_metrics, model_dir, False, history)

    def export(self, directory: Path) -> Path:
        """The trained model: ``model.safetensors`` plus ``model.json`` (spec, shapes, metrics)."""
        self.program.sync(self.group)
        return save_export(directory, self.model.state_dict(), {
            "spec": self.spec.model_dump(mode="json"),
            "iteration": self.iteration,
            **self.program.export_info(),
            "eval_metrics": self.eval_metrics,
        })


def log_reporter(spec: JobSpec) -> Reporter:
    """Default reporter: a progress line at most every 5 s (and at evaluations) on the logger."""
    state = {"last": 0.0, "start": time.monotonic()}
    total = spec.outer.iterations

    def report(iteration: int, metrics: dict[str, float]) -> None:
        now = time.monotonic()
        evaluated = any(k.startswith("eval/") for k in metrics)
        if now - state["last"] < 5 and not evaluated and iteration != total:
            return
        state["last"] = now
        eta = (total - iteration) * (now - state["start"]) / max(iteration, 1)
        shown = {k: round(v, 4) for k, v in metrics.items()
                 if k.startswith(("meta/loss", "meta/acc", "rl/return", "rl/kl", "eval/"))}
        logger.info("%s %d/%d (eta %.0fs) %s", spec.name, iteration, total, eta, shown)

    return report


def run_training(spec: JobSpec, *, run_dir: Path, reporter: Reporter, should_stop: Callable[[], bool],
                 data_root: Path | None = None, cache_dir: Path | None = None,
                 allowed_modules: Iterable[str] | None = None, report_every: int = 1, max_restarts: int = 3,
                 on_start: Callable[[Trainer], None] | None = None, checkpoint_dir: Location | None = None,
                 worker_start_timeout_s: float = 600.0, use_ray: bool = True,
                 device: torch.device | None = None) -> TrainResult:
    """Run a job to its end, resuming from its checkpoints when there are some.

    With ``use_ray`` the workers are Ray actors (a local cluster starts if none is connected).
    When a worker dies, the group is closed and a new one resumes from the last checkpoint, at
    most ``max_restarts`` times. ``on_start(trainer)`` is told each new trainer (and through it the
    group's worker processes). A group the cluster cannot place within ``worker_start_timeout_s``
    fails the job (``WorkerError`` naming the resources).
    """
    if use_ray:
        ensure_ray()
    restarts = 0
    while True:
        start = time.perf_counter()
        trainer = Trainer(spec, run_dir=run_dir, data_root=data_root, cache_dir=cache_dir, reporter=reporter,
                          should_stop=should_stop, allowed_modules=allowed_modules, report_every=report_every,
                          checkpoint_dir=checkpoint_dir, use_ray=use_ray, start_timeout_s=worker_start_timeout_s,
                          device=device)
        logger.info("%s: %d worker(s) ready in %.1fs at iteration %d", spec.name, len(trainer.group.workers),
                    time.perf_counter() - start, trainer.iteration)
        if on_start is not None:
            on_start(trainer)
        try:
            return trainer.run()
        except WorkerLost as exc:
            restarts += 1
            if restarts > max_restarts:
                raise WorkerError(f"worker group lost {restarts} times; last: {exc}") from exc
            logger.warning("%s: %s; restarting the worker group from the last checkpoint (%d/%d)",
                           spec.name, exc, restarts, max_restarts)

"""The trial of a sweep: one configuration of the search space, trained to its end inside Ray Tune.

Tune runs :func:`run_trial` (a *function trainable*) per configuration. A one-worker trial trains
in the trial's own actor ("in_process"); a trial whose spec asks for several workers drives a
worker group placed in the trial's placement group ("distributed"). A trial's start is dominated
by starting a Python process that imports torch and builds the trainer, which the distributed
launch pays twice (the trial actor and its shard actor), so ``launch="auto"`` runs one-worker
trials in process, and Tune's ``reuse_actors`` hands a finished trial's warm actor to the next.

Each trial reports at every evaluation (``eval.every`` meta-iterations) with a Tune checkpoint
holding its training checkpoint; the final report also holds the exported model
(``model/model.safetensors`` + ``model/model.json``). Schedulers compare trials on the
meta-iteration (``iteration``), so ``grace_period`` is in meta-iterations.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from workers.run import Trainer, run_training
from workers.spec import JobSpec
from workers.supervised import device_for
from workers.sweep_spec import apply_config

logger = logging.getLogger(__name__)


class _TuneReporter:
    """The trainer's reporter inside a trial: ``tune.report`` at every evaluation, with a Tune
    checkpoint when ``checkpoint.every`` iterations have passed since the last one, and always at
    the end (that one also holds the exported model)."""

    def __init__(self, spec: JobSpec, run_dir: Path, entered: float) -> None:
        self.spec, self.run_dir, self.entered = spec, run_dir, entered
        self.trainer: Trainer | None = None
        self.setup_s = 0.0
        self.train_s = 0.0
        self.since = time.perf_counter()
        self.checkpointed = 0  # iteration of the last Tune checkpoint

    def ready(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.checkpointed = trainer.iteration
        self.setup_s = time.perf_counter() - self.entered
        self.since = time.perf_counter()

    def __call__(self, iteration: int, metrics: dict[str, float]) -> None:
        from ray import tune

        if self.trainer is None:
            raise RuntimeError("the reporter was called before its trainer was ready")
        self.train_s += time.perf_counter() - self.since
        result = {**metrics, "iteration": iteration, "perf/setup_s": self.setup_s, "perf/train_s": self.train_s}
        final = iteration >= self.spec.outer.iterations
        if not final and iteration - self.checkpointed < self.spec.checkpoint.every:
            tune.report(result)
        else:
            saved = Path(self.trainer.checkpoint())
            out = self.run_dir / f"report-{iteration:08d}"
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(saved, out / "checkpoints" / saved.name)
            if final:
                # A scheduler's STOP at max_t may end the trial before Trainer.run's own export.
                self.trainer.export(out / "model")
            # Tune copies the folder to the sweep's storage before this returns; it then blocks until
            # the driver asks for the next result (and ends this thread if the trial was stopped).
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(str(out)))
            shutil.rmtree(out, ignore_errors=True)
            self.checkpointed = iteration
        self.since = time.perf_counter()


def run_trial(config: dict[str, Any], *, base: dict[str, Any], launch: str, scratch_dir: str, data_root: str | None,
              cache_dir: str | None, allowed_modules: list[str] | None, max_restarts: int = 3) -> None:
    """The function trainable: one configuration, trained to its end (or until Tune stops it)."""
    from ray import tune

    entered = time.perf_counter()
    spec = apply_config(JobSpec.model_validate(base), config)
    torch.set_num_threads(spec.resources.threads_per_worker)
    # The trainer's own folder is scratch, outside Tune's trial folder (Tune syncs that one while the
    # trainer rotates checkpoints in it); Tune's checkpoints are what a resume starts from.
    run_dir = Path(scratch_dir) / tune.get_context().get_trial_id()
    shutil.rmtree(run_dir, ignore_errors=True)  # leftovers of a crash are not what Tune resumes from
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            shutil.copytree(Path(folder) / "checkpoints", run_dir / "checkpoints")
    # Distributed: the workers are actors in this trial's placement group (Tune captures child
    # actors). In process: the trial's own actor computes, on its GPU if it was given one.
    distributed = launch_for(spec, launch) == "distributed"
    reporter = _TuneReporter(spec, run_dir, entered)
    # Only evaluations report (every report must carry the sweep metric); the last iteration always evaluates.
    run_training(spec, run_dir=run_dir, reporter=reporter, should_stop=lambda: False,
                 data_root=Path(data_root) if data_root else None, cache_dir=Path(cache_dir) if cache_dir else None,
                 allowed_modules=allowed_modules, report_every=spec.outer.iterations + 1, max_restarts=max_restarts,
                 on_start=reporter.ready, use_ray=distributed, device=None if distributed else device_for(spec))
    shutil.rmtree(run_dir, ignore_errors=True)  # the model and checkpoints now live in Tune's checkpoints


def launch_for(spec: JobSpec, launch: str) -> str:
    if launch == "auto":
        return "in_process" if spec.resources.workers == 1 else "distributed"
    return launch


def trial_resources(base: dict[str, Any], launch: str) -> Callable[[dict[str, Any]], Any]:
    def request(config: dict[str, Any]) -> Any:
        from ray.tune import PlacementGroupFactory

        spec = apply_config(JobSpec.model_validate(base), config)
        res = spec.resources
        bundle = {"CPU": res.cpus_per_worker, "GPU": res.gpus_per_worker}
        if launch_for(spec, launch) == "in_process":
            return PlacementGroupFactory([bundle])
        # An empty head bundle for the trial's driver thread, one bundle per shard actor.
        return PlacementGroupFactory([{}] + [bundle] * res.workers)

    return request


"""TensorBoard and MLflow: where teams already follow their runs.

A sink that mirrors what a job (or a sweep trial) reports into the trackers the settings name:

* ``MAML_TENSORBOARD_DIR``: TensorBoard event files, one run per job (``<dir>/<tenant>/job-<id>``)
  and per sweep trial (``<dir>/<tenant>/sweep-<id>/<trial id>``), written by ``tensorboardX``;
* ``MLFLOW_TRACKING_URI`` (mlflow's own variable, read by ``service.config``): one MLflow run per job
  and per trial in the experiment ``maml-service/<tenant>``, with the spec as params, the metrics per
  iteration, and the registered model's files as artefacts (``model/``). A resumed job continues its
  MLflow run (found by its ``maml.job_id`` tag).

Tracking never fails a job: every call to a tracker is guarded, its first failure is logged as a
warning and that tracker is then left alone for the rest of the run (a dead tracking server would
otherwise cost every flush its timeout). With neither setting, :func:`open_run` returns None and
nothing here is imported.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from service.config import Settings

logger = logging.getLogger(__name__)
EXPERIMENT_PREFIX = "maml-service"
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")  # path parts
_METRIC = re.compile(r"[^A-Za-z0-9_.\- /]")  # what MLflow accepts in a metric name
_MLFLOW_BATCH = 1000  # MLflow's log_batch takes at most 1000 metrics per call
_MLFLOW_PARAMS = 100  # ... and 100 params


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"outer": {"lr": 0.001}}`` -> ``{"outer.lr": 0.001}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for name, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[name] = number
    return out


class RunTracker:
    """One job's (or one trial's) TensorBoard writer and MLflow run; each guarded on its own."""

    def __init__(self, *, settings: Settings, run_key: str, tenant: str, name: str, spec: Mapping[str, Any],
                 tags: Mapping[str, str], tb_path: Path | None) -> None:
        self.run_key, self.label = run_key, f"{tags.get('maml.kind', 'run')} {run_key}"
        self.writer: Any = None
        self.mlflow: Any = None  # (client, run id) while the run is open
        self.mlflow_run: Any = None  # (client, run id), kept after close: a sweep registers a finished trial
        if tb_path is not None:
            self._guard("TensorBoard", self._open_tensorboard, tb_path, name, spec)
        if settings.mlflow_tracking_uri:
            self._guard("MLflow", self._open_mlflow, settings.mlflow_tracking_uri, tenant, name, spec, tags)

    # -- opening ---------------------------------------------------------------------------------

    def _open_tensorboard(self, path: Path, name: str, spec: Mapping[str, Any]) -> None:
        from tensorboardX import SummaryWriter

        path.mkdir(parents=True, exist_ok=True)
        resumed = any(path.glob("events.out.tfevents.*"))
        # A file of its own per attempt, named after the last: tensorboardX names files by the second and
        # the host, so a resumed job's writer would otherwise replace its first attempt's file.
        self.writer = SummaryWriter(logdir=str(path), flush_secs=5, filename_suffix=f".{time.time_ns()}")
        if not resumed:
            rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in flatten(spec).items())
            self.writer.add_text("spec", f"**{name}**\n\n| field | value |\n|---|---|\n{rows}", 0)

    def _open_mlflow(self, uri: str, tenant: str, name: str, spec: Mapping[str, Any],
                     tags: Mapping[str, str]) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        experiment_name = f"{EXPERIMENT_PREFIX}/{tenant}"
        experiment = client.get_experiment_by_name(experiment_name)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else client.create_experiment(experiment_name))
        key_tag = next(k for k in ("maml.job_id", "maml.trial_id") if k in tags)
        found = client.search_runs([experiment_id], filter_string=f"tags.`{key_tag}` = '{tags[key_tag]}'",
                                   max_results=1)
        if found:  # a resumed job (or a restarted sweep's trial) continues its run
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            self.mlflow = self.mlflow_run = (client, run_id)
            return
        run = client.create_run(experiment_id, run_name=name, tags=dict(tags))
        params = [Param(k, str(v)[:6000]) for k, v in flatten(spec).items()]
        for start in range(0, len(params), _MLFLOW_PARAMS):
            client.log_batch(run.info.run_id, params=params[start:start + _MLFLOW_PARAMS])
        client.log_batch(run.info.run_id, tags=[RunTag("mlflow.note.content", f"maml-service {self.label}")])
        self.mlflow = self.mlflow_run = (client, run.info.run_id)

    # -- logging ---------------------------------------------------------------------------------

    def _guard(self, which: str, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:
            logger.warning("%s: %s tracking failed, left off for the rest of this run: %s: %s", self.label, which,
                           type(exc).__name__, exc)
            if which == "TensorBoard":
                self.writer = None
            else:
                self.mlflow = self.mlflow_run = None

    def log(self, points: Iterable[tuple[int, Mapping[str, Any]]]) -> None:
        """Metric points ``(iteration, {name: value})``; non-finite values are skipped."""
        points = [(int(iteration), _finite(metrics)) for iteration, metrics in points]
        if not points:
            return
        if self.writer is not None:
            self._guard("TensorBoard", self._log_tensorboard, points)
        if self.mlflow is not None:
            self._guard("MLflow", self._log_mlflow, points)

    def _log_tensorboard(self, points: list[tuple[int, dict[str, float]]]) -> None:
        for iteration, metrics in points:
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, iteration)

    def _log_mlflow(self, points: list[tuple[int, dict[str, float]]]) -> None:
        from mlflow.entities import Metric

        client, run_id = self.mlflow
        now = int(time.time() * 1000)
        metrics = [Metric(_METRIC.sub("_", name), value, now, iteration)
                   for iteration, values in points for name, value in values.items()]
        for start in range(0, len(metrics), _MLFLOW_BATCH):
            client.log_batch(run_id, metrics=metrics[start:start + _MLFLOW_BATCH])

    def log_model(self, model_dir: Path, model_id: str) -> None:
        """The registered model's files as the MLflow run's ``model/`` artefacts, and its id as a tag."""
        if self.mlflow_run is not None:
            self._guard("MLflow", self._log_model, Path(model_dir), model_id)
        if self.writer is not None:
            self._guard("TensorBoard", self.writer.add_text, "model_id", model_id, 0)

    def _log_model(self, model_dir: Path, model_id: str) -> None:
        client, run_id = self.mlflow_run
        client.log_artifacts(run_id, str(model_dir), "model")
        client.set_tag(run_id, "maml.model_id", model_id)

    def close(self, status: str) -> None:
        """End the run: ``status`` is the job's (succeeded, failed, cancelled; queued: interrupted)."""
        if self.writer is not None:
            self._guard("TensorBoard", self.writer.close)
            self.writer = None
        if self.mlflow is not None:
            client, run_id = self.mlflow
            mlflow_status = {"succeeded": "FINISHED", "completed": "FINISHED", "failed": "FAILED",
                             "cancelled": "KILLED", "stopped_early": "KILLED"}.get(status)
            if mlflow_status is not None:  # an interrupted run stays RUNNING: its next attempt continues it
                self._guard("MLflow", client.set_terminated, run_id, mlflow_status)
            self.mlflow = None


def enabled(settings: Settings) -> bool:
    return settings.tensorboard_dir is not None or bool(settings.mlflow_tracking_uri)


def _safe(part: str) -> str:
    return _SAFE.sub("_", part) or "_"


def open_job(settings: Settings, *, job_id: str, tenant: str, name: str, spec: Mapping[str, Any]) -> RunTracker | None:
    """The tracker of one job, or None when no tracker is configured."""
    if not enabled(settings):
        return None
    tb = settings.tensorboard_dir / _safe(tenant) / f"job-{job_id}" if settings.tensorboard_dir else None
    return RunTracker(settings=settings, run_key=job_id, tenant=tenant, name=name, spec=spec, tb_path=tb,
                      tags={"maml.kind": "job", "maml.job_id": job_id, "maml.tenant": tenant})


class SweepTracker:
    """A sweep's trials, one :class:`RunTracker` each, fed from the trial snapshots the sweep manager
    receives (a trial reports at every evaluation)."""

    _ENDED = ("completed", "stopped_early", "failed", "cancelled")

    def __init__(self, settings: Settings, *, sweep_id: str, tenant: str, name: str,
                 base: Mapping[str, Any]) -> None:
        self.settings, self.sweep_id, self.tenant, self.name, self.base = settings, sweep_id, tenant, name, base
        self.trials: dict[str, RunTracker] = {}
        self.logged: dict[str, int] = {}  # trial id -> last iteration logged
        self.closed: set[str] = set()

    def update(self, trials: Iterable[Any]) -> None:
        """``trials``: ``workers.sweep_spec.TrialInfo`` (trial_id, status, config, iteration, metrics)."""
        for trial in trials:
            if trial.trial_id in self.closed:
                continue
            tracker = self.trials.get(trial.trial_id)
            if tracker is None and trial.iteration > 0:
                tracker = self.trials[trial.trial_id] = self._open(trial)
            if tracker is None:
                continue
            if trial.iteration > self.logged.get(trial.trial_id, 0) and trial.metrics:
                tracker.log([(trial.iteration, trial.metrics)])
                self.logged[trial.trial_id] = trial.iteration
            if trial.status in self._ENDED:
                tracker.close(trial.status)
                self.closed.add(trial.trial_id)

    def _open(self, trial: Any) -> RunTracker:
        settings = self.settings
        tb = (settings.tensorboard_dir / _safe(self.tenant) / f"sweep-{self.sweep_id}" / _safe(trial.trial_id)
              if settings.tensorboard_dir else None)
        spec = {"sweep": self.name, **{f"config.{k}": v for k, v in trial.config.items()}, "base": self.base}
        return RunTracker(settings=settings, run_key=trial.trial_id, tenant=self.tenant,
                          name=f"{self.name}/{trial.trial_id}", spec=spec, tb_path=tb,
                          tags={"maml.kind": "trial", "maml.sweep_id": self.sweep_id,
                                "maml.trial_id": f"{self.sweep_id}/{trial.trial_id}", "maml.tenant": self.tenant})

    def log_model(self, trial_id: str | None, model_dir: Path, model_id: str) -> None:
        tracker = self.trials.get(trial_id or "")
        if tracker is not None:
            tracker.log_model(model_dir, model_id)

    def close(self, status: str) -> None:
        for trial_id, tracker in self.trials.items():
            if trial_id not in self.closed:
                tracker.close(status)
                self.closed.add(trial_id)


def open_sweep(settings: Settings, *, sweep_id: str, tenant: str, name: str,
               base: Mapping[str, Any]) -> SweepTracker | None:
    return SweepTracker(settings, sweep_id=sweep_id, tenant=tenant, name=name, base=base) if enabled(settings) else None

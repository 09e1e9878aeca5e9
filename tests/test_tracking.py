"""TensorBoard and MLflow tracking (service/tracking.py): a real job through the in-process app writes
TensorBoard event files, read back with tensorboard's EventAccumulator, and a real MLflow file store,
read back with MlflowClient; a sweep's trials the same way; a broken tracker never fails a job; and through
a real ``maml serve``, whose jobs are driven by actors on its embedded Ray cluster (the settings travel
with them)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import httpx
import pytest
from cluster import maml_serve_argv, serve
from fastapi.testclient import TestClient
from helpers import SMALL_SINE, make_app, make_settings, submit, wait_for_job
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from service import tracking
from workers.sweep_spec import TrialInfo

ITERATIONS = SMALL_SINE["outer"]["iterations"]


@pytest.fixture(autouse=True)
def _file_store(monkeypatch: pytest.MonkeyPatch) -> None:
    # MLflow 3 keeps its file store in maintenance mode, refused unless this (mlflow's own) variable is set.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def _events(folder: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    return accumulator


def test_a_job_writes_tensorboard_events_and_an_mlflow_run(tmp_path: Path) -> None:
    uri = f"file:{tmp_path / 'mlruns'}"
    settings = make_settings(tmp_path / "svc", tensorboard_dir=tmp_path / "tb", mlflow_tracking_uri=uri)
    with TestClient(make_app(settings)) as client:
        admin = {"Authorization": "Bearer test-admin-token-7f3a9c1e5b2d8f40"}
        secret = client.post("/api/v1/keys", json={"tenant": "acme"}, headers=admin).json()["secret"]
        headers = {"Authorization": f"Bearer {secret}"}
        job = submit(client, headers)
        done = wait_for_job(client, job["id"], headers, timeout=120)
        assert done["status"] == "succeeded", done["error"]
        stored = client.get(f"/api/v1/jobs/{job['id']}/metrics", headers=headers).json()["data"]

    # TensorBoard: one run per job, every stored point of every metric, evaluations at their iterations.
    runs = [p for p in (tmp_path / "tb" / "acme").iterdir()]
    assert [p.name for p in runs] == [f"job-{job['id']}"]
    events = _events(runs[0])
    scalars = events.Tags()["scalars"]
    assert "meta/loss" in scalars and "eval/loss" in scalars
    steps = [e.step for e in events.Scalars("meta/loss")]
    assert steps == [p["iteration"] for p in stored if p["metrics"].get("meta/loss") is not None]
    assert steps == list(range(1, ITERATIONS + 1))
    by_step = {e.step: e.value for e in events.Scalars("meta/loss")}
    for point in stored:
        assert by_step[point["iteration"]] == pytest.approx(point["metrics"]["meta/loss"], rel=1e-6)
    assert [e.step for e in events.Scalars("eval/loss")] == [30, 60]
    assert {"spec/text_summary", "model_id/text_summary"} <= set(events.Tags()["tensors"])

    # MLflow: the experiment of the tenant, one finished run, params from the spec, metrics per iteration,
    # the registered model's files as artefacts.
    mlflow = MlflowClient(tracking_uri=uri)
    experiment = mlflow.get_experiment_by_name("maml-service/acme")
    assert experiment is not None
    [run] = mlflow.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "sine"
    assert run.data.tags["maml.job_id"] == job["id"] and run.data.tags["maml.model_id"] == done["model_id"]
    params = run.data.params
    assert params["outer.iterations"] == str(ITERATIONS) and params["task.family"] == "sinusoid"
    assert params["outer.meta_batch_size"] == "4" and params["algorithm"] == "maml"
    history = mlflow.get_metric_history(run.info.run_id, "meta/loss")
    assert sorted(m.step for m in history) == list(range(1, ITERATIONS + 1))
    assert sorted(m.step for m in mlflow.get_metric_history(run.info.run_id, "eval/loss")) == [30, 60]
    artefacts = {f.path for f in mlflow.list_artifacts(run.info.run_id, "model")}
    assert artefacts == {"model/model.safetensors", "model/model.json"}
    local = Path(mlflow.download_artifacts(run.info.run_id, "model/model.safetensors", str(tmp_path / "dl")))
    registered = Path(settings.storage_path / "models" / done["model_id"] / "model.safetensors")
    assert local.read_bytes() == registered.read_bytes()


def test_a_broken_tracker_is_a_warning_and_the_job_succeeds(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the trackers expect folders")
    settings = make_settings(tmp_path / "svc", tensorboard_dir=blocker / "tb", mlflow_tracking_uri=f"file:{blocker}")
    caplog.set_level(logging.WARNING, logger="service.tracking")
    with TestClient(make_app(settings)) as client:
        admin = {"Authorization": "Bearer test-admin-token-7f3a9c1e5b2d8f40"}
        secret = client.post("/api/v1/keys", json={"tenant": "acme"}, headers=admin).json()["secret"]
        headers = {"Authorization": f"Bearer {secret}"}
        job = submit(client, headers)
        done = wait_for_job(client, job["id"], headers, timeout=120)
    assert done["status"] == "succeeded", done["error"]
    assert done["progress"]["iteration"] == ITERATIONS and done["model_id"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "service.tracking"]
    assert any("TensorBoard tracking failed" in w for w in warnings), warnings
    assert any("MLflow tracking failed" in w for w in warnings), warnings


def _trial(trial_id: str, status: str, iteration: int, loss: float) -> TrialInfo:
    return TrialInfo(trial_id=trial_id, status=status, config={"inner.lr": 0.01 if trial_id == "a" else 0.1},
                     iteration=iteration, total_iterations=40, reports=iteration // 10, metric=loss,
                     best_metric=loss, metrics={"eval/loss": loss, "meta/loss": loss * 2})


def test_sweep_trials_are_runs_of_their_own(tmp_path: Path) -> None:
    uri = f"file:{tmp_path / 'mlruns'}"
    settings = make_settings(tmp_path / "svc", tensorboard_dir=tmp_path / "tb", mlflow_tracking_uri=uri)
    sweep = tracking.open_sweep(settings, sweep_id="s1", tenant="acme", name="lr", base={"outer": {"iterations": 40}})
    assert sweep is not None
    # Snapshots as the sweep manager receives them: trial b is stopped early by the scheduler at 20.
    sweep.update([_trial("a", "pending", 0, 0.0), _trial("b", "pending", 0, 0.0)])
    sweep.update([_trial("a", "running", 10, 3.0), _trial("b", "running", 10, 4.0)])
    sweep.update([_trial("a", "running", 10, 3.0), _trial("b", "running", 20, 3.5)])  # a unchanged: not re-logged
    sweep.update([_trial("a", "running", 20, 2.0), _trial("b", "stopped_early", 20, 3.5)])
    sweep.update([_trial("a", "completed", 40, 1.0), _trial("b", "stopped_early", 20, 3.5)])
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.json").write_text("{}")
    sweep.log_model("a", model_dir, "m1")
    sweep.close("succeeded")

    for trial, steps in (("a", [10, 20, 40]), ("b", [10, 20])):
        events = _events(tmp_path / "tb" / "acme" / "sweep-s1" / trial)
        assert [e.step for e in events.Scalars("eval/loss")] == steps
    mlflow = MlflowClient(tracking_uri=uri)
    experiment = mlflow.get_experiment_by_name("maml-service/acme")
    runs = {r.data.tags["maml.trial_id"]: r for r in mlflow.search_runs([experiment.experiment_id])}
    assert set(runs) == {"s1/a", "s1/b"}
    assert runs["s1/a"].info.status == "FINISHED" and runs["s1/b"].info.status == "KILLED"
    assert runs["s1/a"].data.params["config.inner.lr"] == "0.01"
    assert [m.step for m in mlflow.get_metric_history(runs["s1/b"].info.run_id, "eval/loss")] == [10, 20]
    assert runs["s1/a"].data.tags["maml.model_id"] == "m1"
    assert [f.path for f in mlflow.list_artifacts(runs["s1/a"].info.run_id, "model")] == ["model/model.json"]


@pytest.mark.e2e
def test_through_maml_serve_and_its_ray_drivers(tmp_path: Path) -> None:
    admin = "tracking-admin-token-3e8c5a"
    uri = f"file:{tmp_path / 'mlruns'}"
    env = {**os.environ, "MAML_ADMIN_TOKEN": admin, "MAML_RAY_NUM_CPUS": "2", "MAML_METRICS_FLUSH_S": "0.2",
           "RAY_ADDRESS": "", "MAML_TENSORBOARD_DIR": str(tmp_path / "tb"), "MLFLOW_TRACKING_URI": uri}
    for name in ("DATABASE_URL", "MAML_DATABASE_URL", "MAML_DATA_DIR"):
        env.pop(name, None)
    with serve(env, tmp_path / "server.log", maml_serve_argv(tmp_path / "data")) as base:
        secret = httpx.post(f"{base}/api/v1/keys", json={"tenant": "acme"},
                            headers={"Authorization": f"Bearer {admin}"}).json()["secret"]
        with httpx.Client(base_url=f"{base}/api/v1", headers={"Authorization": f"Bearer {secret}"}) as api:
            job = api.post("/jobs", json=SMALL_SINE).json()
            deadline = time.monotonic() + 300
            while (done := api.get(f"/jobs/{job['id']}").json())["status"] not in ("succeeded", "failed", "cancelled"):
                assert time.monotonic() < deadline, done
                time.sleep(0.5)
        assert done["status"] == "succeeded", done["error"]
    events = _events(tmp_path / "tb" / "acme" / f"job-{job['id']}")
    assert [e.step for e in events.Scalars("meta/loss")] == list(range(1, ITERATIONS + 1))
    mlflow = MlflowClient(tracking_uri=uri)
    [run] = mlflow.search_runs([mlflow.get_experiment_by_name("maml-service/acme").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["maml.model_id"] == done["model_id"]
    assert sorted(m.step for m in mlflow.get_metric_history(run.info.run_id, "eval/loss")) == [30, 60]


def test_a_resumed_job_continues_its_mlflow_run(tmp_path: Path) -> None:
    uri = f"file:{tmp_path / 'mlruns'}"
    settings = make_settings(tmp_path / "svc", tensorboard_dir=tmp_path / "tb", mlflow_tracking_uri=uri)
    spec = {"name": "sine", "outer": {"iterations": 4}}
    first = tracking.open_job(settings, job_id="j1", tenant="acme", name="sine", spec=spec)
    first.log([(1, {"meta/loss": 2.0}), (2, {"meta/loss": 1.5, "meta/accuracy": float("nan")})])
    first.close("queued")  # interrupted by a restart: the run stays open for the next attempt
    second = tracking.open_job(settings, job_id="j1", tenant="acme", name="sine", spec=spec)
    second.log([(3, {"meta/loss": 1.0}), (4, {"meta/loss": 0.5})])
    second.close("succeeded")
    mlflow = MlflowClient(tracking_uri=uri)
    [run] = mlflow.search_runs([mlflow.get_experiment_by_name("maml-service/acme").experiment_id])
    assert run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in sorted(mlflow.get_metric_history(run.info.run_id, "meta/loss"),
                                              key=lambda m: m.step)] == [(1, 2.0), (2, 1.5), (3, 1.0), (4, 0.5)]
    assert mlflow.get_metric_history(run.info.run_id, "meta/accuracy") == []  # NaN is skipped
    events = _events(tmp_path / "tb" / "acme" / "job-j1")  # two writers, one run
    assert [e.step for e in events.Scalars("meta/loss")] == [1, 2, 3, 4]

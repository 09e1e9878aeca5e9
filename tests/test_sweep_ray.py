"""A sweep on a real local Ray cluster: ASHA stops a trial early, a raising trial fails alone, the best
trial's exported model is in the result, and every trial's resources come back."""

import json
import os
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray
TESTS = Path(__file__).parent


# An ASHA sweep of four trials: good (outer.lr 0.001), broken (a model that raises), bad (outer.lr
# 0.1), broken; also run through the API by test_api_sweeps.
ASHA_WITH_BROKEN_TRIALS = {
    "base": {"outer": {"iterations": 8, "meta_batch_size": 5}, "eval": {"every": 1, "tasks": 20, "steps": 5},
             "checkpoint": {"every": 4}},
    "space": {
        "model": {"grid": [{"name": "mlp"}, {"factory": "user_models:make_broken", "kwargs": {"mode": "raise"}}]},
        "outer.lr": {"grid": [0.001, 0.1]},
    },
    "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
    "num_samples": 1,
    "max_concurrent_trials": 2,
}


def test_asha_sweep_stops_early_survives_a_failing_trial_and_exports_the_best(ray_cluster, tmp_path: Path) -> None:
    from workers.sweep import run_sweep
    from workers.sweep_spec import SweepSpec

    # Grid order is deterministic (the first path, "model", varies fastest): good (outer.lr 0.001),
    # broken, bad (outer.lr 0.1: eval/loss 7.3 against 6.05 at iteration 1, same seed), broken. The
    # bad trial starts after the broken one fails, so the good one has reached ASHA's rungs first.
    sweep = SweepSpec.model_validate({**ASHA_WITH_BROKEN_TRIALS, "name": "test-sweep"})
    updates: list = []
    start = time.monotonic()
    result = run_sweep(sweep, storage_dir=tmp_path / "sweep", allowed_modules=["user_models"],
                       on_trial_update=updates.append)
    assert time.monotonic() - start < 60

    by_status: dict[str, list] = {}
    for trial in result.trials:
        by_status.setdefault(trial.status, []).append(trial)
    assert len(result.trials) == 4, result.counts()
    assert len(by_status.get("failed", [])) == 2, result.counts()
    for failed in by_status["failed"]:
        assert failed.config["model"]["factory"] == "user_models:make_broken"
        assert failed.error == "RuntimeError: corrupt shard: labels do not match inputs"
        assert failed.model_dir is None
    stopped = by_status.get("stopped_early", [])
    assert stopped, f"no trial was stopped early: {result.counts()}"
    assert all(t.iteration < t.total_iterations for t in stopped)

    best = result.best
    assert best is not None and best.status == "completed" and best.iteration == 8
    assert best.config == {"model": {"name": "mlp"}, "outer.lr": 0.001}
    assert best.metric == min(t.metric for t in result.trials if t.status == "completed")
    assert best.best_metric is not None and best.best_metric <= best.metric
    assert result.best_model_dir is not None and str(result.best_model_dir) == best.model_dir
    assert (result.best_model_dir / "model.safetensors").is_file()
    # Each trial that reported keeps its curve: one point per report (eval every iteration), ending at its last.
    assert [x for x, _ in best.history] == list(range(1, 9)) and best.history[-1][1] == best.metric
    assert all(len(t.history) == t.reports and t.history[-1] == (t.iteration, t.metric) for t in stopped)
    info = json.loads((result.best_model_dir / "model.json").read_text())
    assert info["iteration"] == 8 and info["spec"]["outer"]["lr"] == 0.001 and "eval/loss" in info["eval_metrics"]

    # Progress reached the listener, ending in the final state.
    assert updates and updates[-1] == result.trials
    assert any(t.status == "running" for trials in updates for t in trials)
    assert not result.cancelled

    # Stopped, failed and finished trials all gave their CPUs back.
    deadline = time.monotonic() + 10
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2


CHILD = """
import json, os, sys
from pathlib import Path
from workers.raygroup import ensure_ray
from workers.sweep import run_sweep
from workers.sweep_spec import SweepSpec

ensure_ray(num_cpus=2)
root = Path(sys.argv[1])
def update(trials):
    tmp = root / "progress.tmp"
    tmp.write_text(json.dumps([t.model_dump(mode="json") for t in trials]))
    os.replace(tmp, root / "progress.json")
run_sweep(SweepSpec.model_validate_json(sys.argv[2]), storage_dir=root / "sweep", on_trial_update=update)
"""


@pytest.mark.e2e
def test_sweep_killed_with_its_service_resumes_from_tune_state(ray_cluster, tmp_path: Path) -> None:
    """A service crash: the process running the sweep (and its Ray ray_cluster) is SIGKILLed after one
    trial finished and another checkpointed; ``resume=True`` keeps the finished trial and continues
    the other from its checkpoint."""
    import signal
    import subprocess
    import sys

    from workers.sweep import run_sweep
    from workers.sweep_spec import SweepSpec

    sweep = SweepSpec.model_validate({
        "name": "resume",
        "base": {"outer": {"iterations": 120, "meta_batch_size": 10},
                 "eval": {"every": 10, "tasks": 5, "steps": 1}, "checkpoint": {"every": 20}},
        "space": {"inner.lr": {"grid": [0.005, 0.01]}},
        "scheduler": {"type": "none"}, "num_samples": 1, "max_concurrent_trials": 1,
    })
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own ray_cluster, as a service has
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), env.get("PYTHONPATH", "")])
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), sweep.model_dump_json()], env=env,
                             cwd=TESTS.parent, start_new_session=True)
    progress, before = tmp_path / "progress.json", []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.1)
            before = json.loads(progress.read_text()) if progress.exists() else []
            statuses = [(t["status"], t["iteration"]) for t in before]
            if ("completed", 120) in statuses and any(s == "running" and i >= 40 for s, i in statuses):
                break
        else:
            pytest.fail(f"the sweep did not reach the kill point: {before}")
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    done_before = next(t for t in before if t["status"] == "completed")
    cut = next(t for t in before if t["status"] == "running")

    result = run_sweep(sweep, storage_dir=tmp_path / "sweep", resume=True)
    trials = {t.trial_id: t for t in result.trials}
    assert set(trials) == {done_before["trial_id"], cut["trial_id"]}
    assert all(t.status == "completed" and t.iteration == 120 for t in trials.values()), result.counts()
    assert trials[done_before["trial_id"]].model_dir == done_before["model_dir"]  # kept, not rerun
    # The cut trial went on from its last checkpoint (>= 20), not from scratch: iteration 10 was reported once.
    lines = (result.experiment_path / f"trial_{cut['trial_id']}" / "result.json").read_text().splitlines()
    iterations = [json.loads(line)["iteration"] for line in lines]
    assert iterations.count(10) == 1 and iterations[-1] == 120
    # Both trials' histories survive the restart: the kept one's is read back from Tune's result file.
    assert all([x for x, _ in t.history] == list(range(10, 121, 10)) for t in trials.values())
    assert result.best is not None and result.best_model_dir is not None

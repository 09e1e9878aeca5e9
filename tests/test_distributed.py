"""Meta-training on a real local Ray cluster: equivalence, fault tolerance, cancellation, errors."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from workers.checkpoint import latest_checkpoint, list_checkpoints
from workers.errors import TrainingError
from workers.spec import JobSpec

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray
TESTS = Path(__file__).parent


def _spec(**overrides) -> JobSpec:
    base = {"name": "t", "outer": {"iterations": 10, "meta_batch_size": 10},
            "eval": {"every": 1000, "tasks": 5, "steps": 1}, "checkpoint": {"every": 5}}
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return JobSpec.model_validate(base)


def _run(spec: JobSpec, run_dir: Path, **kw):
    from workers.run import run_training

    kw.setdefault("reporter", lambda i, m: None)
    kw.setdefault("should_stop", lambda: False)
    return run_training(spec, run_dir=run_dir, allowed_modules=["user_models"], **kw)


def test_one_and_two_workers_give_the_same_parameters(ray_cluster, tmp_path: Path) -> None:
    """1 and 2 Ray workers (the all-reduce aggregator, every worker stepping its own copy) and the
    in-process engine (the driver aggregating) end at the same parameters."""
    results = {}
    for name, workers, use_ray in [("local", 1, False), ("ray1", 1, True), ("ray2", 2, True)]:
        spec = _spec(resources={"workers": workers})
        result = _run(spec, tmp_path / name, use_ray=use_ray)
        assert result.iteration == 10
        results[name] = load_file(str(result.model_dir / "model.safetensors"))
    for other in ("ray1", "ray2"):
        for name, p1 in results["local"].items():
            rel = (p1 - results[other][name]).norm() / p1.norm()
            assert rel < 1e-5, f"{other} {name}: relative difference {rel:.2e}"


def test_killed_worker_restarts_group_and_resumes_from_checkpoint(ray_cluster, tmp_path: Path) -> None:
    spec = _spec(outer={"iterations": 400, "meta_batch_size": 10}, checkpoint={"every": 20},
                 resources={"workers": 2})
    groups: list[list[int]] = []
    out: dict = {}
    def start(t) -> None:
        groups.append(t.group.pids)

    def train() -> None:
        try:
            out["result"] = _run(spec, tmp_path, on_start=start)
        except BaseException as exc:  # shown by the assertion below, not lost in the thread
            out["error"] = exc

    thread = threading.Thread(target=train)
    thread.start()
    deadline = time.monotonic() + 120
    while not list_checkpoints(tmp_path / "checkpoints") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert groups, "no worker group started"
    os.kill(groups[0][1], signal.SIGKILL)
    thread.join(timeout=300)
    assert "result" in out, f"training did not end within 300 s after the kill: {out.get('error')!r}"
    result = out["result"]
    assert result.iteration == 400 and not result.cancelled
    assert len(groups) == 2, "the worker group was not restarted"
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    assert ckpt is not None and ckpt.iteration == 400
    assert all(torch.isfinite(v).all() for v in ckpt.model.values())


def test_cancel_stops_within_ten_seconds_and_keeps_a_usable_checkpoint(ray_cluster, tmp_path: Path) -> None:
    spec = _spec(outer={"iterations": 100_000, "meta_batch_size": 10}, checkpoint={"every": 50})
    stop = threading.Event()
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", _run(spec, tmp_path, should_stop=stop.is_set)))
    thread.start()
    time.sleep(8)
    cancelled_at = time.monotonic()
    stop.set()
    thread.join(timeout=30)
    assert time.monotonic() - cancelled_at < 10
    result = out["r"]
    assert result.cancelled and 0 < result.iteration < 100_000
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    assert ckpt is not None and ckpt.iteration == result.iteration
    # usable: resuming continues from it
    longer = spec.model_copy(update={"outer": spec.outer.model_copy(update={"iterations": result.iteration + 3})})
    resumed = _run(longer, tmp_path)
    assert resumed.iteration == result.iteration + 3


@pytest.mark.parametrize(("mode", "message"), [("nan", "non-finite loss at iteration 0"),
                                                ("raise", "RuntimeError: corrupt shard")])
def test_worker_failure_surfaces_with_its_cause(ray_cluster, tmp_path: Path, mode: str, message: str) -> None:
    spec = _spec(model={"name": None, "factory": "user_models:make_broken", "kwargs": {"mode": mode}},
                 resources={"workers": 2})
    started = time.monotonic()
    with pytest.raises(TrainingError, match=message) as info:
        _run(spec, tmp_path)
    assert info.value.iteration == 0
    assert time.monotonic() - started < 60


def test_relaunching_a_killed_launcher_resumes_from_the_last_checkpoint(ray_cluster, tmp_path: Path) -> None:
    spec = _spec(outer={"iterations": 600, "meta_batch_size": 10}, checkpoint={"every": 20})
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.model_dump_json())
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "workers", "train", str(spec_file), "--run-dir", str(run_dir)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    # The launcher joins this test's cluster, as a launcher on a real cluster would.
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = list_checkpoints(run_dir / "checkpoints")
        if done and int(done[-1].name.split("_")[1]) >= 40:
            break
        time.sleep(0.1)
    first.kill()
    first.wait()
    killed_at = latest_checkpoint(run_dir / "checkpoints").iteration
    assert 0 < killed_at < 600
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["iteration"] == 600
    assert f"at iteration {killed_at}" in second.stderr


def test_a_group_the_cluster_cannot_place_fails_naming_the_resources(ray_cluster, tmp_path: Path) -> None:
    from workers.errors import WorkerError

    spec = _spec(resources={"workers": 1, "gpus_per_worker": 1})  # this cluster has no GPU
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"did not start in 2 s.*1 GPU; the Ray cluster has 2 CPU, 0 GPU"):
        _run(spec, tmp_path / "gpu", worker_start_timeout_s=2)
    assert time.monotonic() - start < 30
    # A cancel while the group waits ends the job as cancelled, without a wait for the timeout.
    result = _run(spec, tmp_path / "gpu-cancel", worker_start_timeout_s=600, should_stop=lambda: True)
    assert result.cancelled and result.iteration == 0
    assert ray.available_resources().get("CPU") == 2  # nothing left holding the cluster

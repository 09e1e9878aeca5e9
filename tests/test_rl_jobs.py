"""RL task families through the job spec: defaults, validation, and a run through run_training on Ray."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from workers.spec import JobSpec


def test_rl_spec_takes_the_papers_defaults_and_stores_them() -> None:
    spec = JobSpec.model_validate({"task": {"family": "nav2d"}})
    assert (spec.outer.optimizer, spec.outer.meta_batch_size, spec.inner.lr) == ("trpo", 20, 0.1)
    assert spec.model.hidden == [100, 100] and spec.eval.steps == 3
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec
    cheetah = JobSpec.model_validate({"task": {"family": "halfcheetah_vel"}, "inner": {"lr": 0.05}})
    assert cheetah.outer.meta_batch_size == 40 and cheetah.inner.lr == 0.05
    assert spec.task.episode_length == 100 and cheetah.task.episode_length == 200
    assert JobSpec.model_validate({"task": {"family": "nav2d", "horizon": 50}}).task.episode_length == 50


@pytest.mark.parametrize(("body", "field"), [
    ({"outer": {"optimizer": "trpo"}}, "outer.optimizer"),
    ({"task": {"family": "nav2d"}, "algorithm": "reptile"}, "algorithm"),
    ({"task": {"family": "nav2d"}, "model": {"name": "conv4"}}, "model.name"),
    ({"task": {"family": "nav2d", "horizon": 5000}}, "horizon"),
    ({"task": {"family": "nav2d", "rollouts": 0}}, "rollouts"),
    ({"task": {"family": "halfcheetah_dir", "reward": "distance"}}, "reward"),
    ({"task": {"family": "walker"}}, "task"),
    ({"task": {"family": "nav2d"}, "inner": {"steps": 11}}, "inner.steps"),
    ({"task": {"family": "nav2d"}, "eval": {"steps": 11}}, "eval.steps"),
    ({"task": {"family": "nav2d"}, "eval": {"tasks": 1001}}, "eval.tasks"),
])
def test_bad_rl_specs_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(body)
    assert field in str(info.value)


@pytest.mark.ray
def test_rl_job_runs_through_run_training_on_ray(ray_cluster, tmp_path: Path) -> None:
    from workers.run import run_training

    spec = JobSpec.model_validate({
        "name": "nav", "task": {"family": "nav2d", "rollouts": 4, "horizon": 20},
        "outer": {"iterations": 2, "meta_batch_size": 2}, "eval": {"every": 2, "tasks": 2, "steps": 1},
        "checkpoint": {"every": 1},
    })
    seen: list[int] = []
    result = run_training(spec, run_dir=tmp_path, reporter=lambda i, m: seen.append(i), should_stop=lambda: False)
    assert result.iteration == 2 and seen[-1] == 2
    assert (result.model_dir / "model.safetensors").is_file()


@pytest.mark.ray
def test_an_rl_group_the_cluster_cannot_place_fails_naming_the_resources(ray_cluster, tmp_path: Path) -> None:
    """The rollout workers start through the same worker group as supervised shards: GPUs the cluster
    lacks end the job after the start-up timeout, and a cancel ends the wait."""
    import time

    import ray

    from workers.errors import WorkerError
    from workers.run import run_training

    spec = JobSpec.model_validate({"task": {"family": "nav2d", "rollouts": 2, "horizon": 5},
                                   "outer": {"iterations": 2, "meta_batch_size": 2},
                                   "resources": {"workers": 1, "gpus_per_worker": 1}})
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"did not start in 2 s.*1 worker\(s\) x 1 CPU, 1 GPU; the Ray cluster has"):
        run_training(spec, run_dir=tmp_path / "gpu", reporter=lambda i, m: None, should_stop=lambda: False,
                     worker_start_timeout_s=2)
    assert time.monotonic() - start < 60
    result = run_training(spec, run_dir=tmp_path / "cancel", reporter=lambda i, m: None, should_stop=lambda: True)
    assert result.cancelled and result.iteration == 0
    assert ray.available_resources().get("CPU") == ray.cluster_resources().get("CPU")  # nothing left holding it

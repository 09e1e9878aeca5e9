"""RL task families through the job spec: defaults, validation, and a run through run_training on Ray."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from workers.rl.config import from_job_spec
from workers.spec import JobSpec


def test_rl_spec_takes_the_papers_defaults_and_stores_them() -> None:
    spec = JobSpec.model_validate({"task": {"family": "nav2d"}})
    assert (spec.outer.optimizer, spec.outer.meta_batch_size, spec.inner.lr) == ("trpo", 20, 0.1)
    assert spec.model.hidden == [100, 100] and spec.eval.steps == 3
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec
    cheetah = JobSpec.model_validate({"task": {"family": "halfcheetah_vel"}, "inner": {"lr": 0.05}})
    assert cheetah.outer.meta_batch_size == 40 and cheetah.inner.lr == 0.05
    config = from_job_spec(JobSpec.model_validate({"task": {"family": "nav2d", "horizon": 50},
                                                   "algorithm": "fomaml", "outer": {"optimizer": "adam"}}))
    assert config.first_order and config.outer_optimizer == "adam" and config.episode_length == 50


@pytest.mark.parametrize(("body", "field"), [
    ({"outer": {"optimizer": "trpo"}}, "outer.optimizer"),
    ({"task": {"family": "nav2d"}, "algorithm": "reptile"}, "algorithm"),
    ({"task": {"family": "nav2d"}, "model": {"name": "conv4"}}, "model.name"),
    ({"task": {"family": "nav2d", "horizon": 5000}}, "horizon"),
    ({"task": {"family": "nav2d", "rollouts": 0}}, "rollouts"),
    ({"task": {"family": "halfcheetah_dir", "reward": "distance"}}, "reward"),
    ({"task": {"family": "walker"}}, "task"),
])
def test_bad_rl_specs_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(body)
    assert field in str(info.value)


@pytest.mark.ray
def test_rl_job_runs_through_run_training_on_ray(tmp_path: Path) -> None:
    from workers.distributed import run_training

    spec = JobSpec.model_validate({
        "name": "nav", "task": {"family": "nav2d", "rollouts": 4, "horizon": 20},
        "outer": {"iterations": 2, "meta_batch_size": 2}, "eval": {"every": 2, "tasks": 2, "steps": 1},
        "checkpoint": {"every": 1},
    })
    seen: list[int] = []
    result = run_training(spec, run_dir=tmp_path, reporter=lambda i, m: seen.append(i), should_stop=lambda: False)
    assert result.iteration == 2 and seen[-1] == 2
    assert (result.model_dir / "model.safetensors").is_file()

"""Sweep specifications: a bad search space is refused naming its field; apply_config sets field paths."""

import pytest
from pydantic import ValidationError

from workers.spec import JobSpec
from workers.sweep_spec import SweepSpec, apply_config, sweep_metrics, trial_count

BASE = {"outer": {"iterations": 50}}


def _errors(payload: dict) -> str:
    with pytest.raises(ValidationError) as info:
        SweepSpec.model_validate({"base": BASE, **payload})
    return "\n".join(f"{'.'.join(map(str, e['loc']))} | {e['msg']}" for e in info.value.errors())


@pytest.mark.parametrize(("space", "expected"), [
    ({}, "space: must not be empty"),
    ({"inner.lrr": {"uniform": [0.1, 0.2]}}, "space.inner.lrr: unknown field"),
    ({"inner": {"uniform": [0.1, 0.2]}, "inner.lr.x": {"choice": [1]}}, "space.inner.lr.x: unknown field"),
    ({"inner.lr": {"loguniform": [0.5, 0.1]}}, "space.inner.lr: low 0.5 above high 0.1"),
    ({"inner.lr": {"loguniform": [0.0, 0.1]}}, "space.inner.lr: loguniform needs low > 0"),
    ({"inner.steps": {"choice": [0, 1]}},
     "space.inner.steps: 0 is refused: inner.steps: Input should be greater than or equal to 1"),
    ({"inner.steps": {"grid": [1, 500]}}, "space.inner.steps: 500 is refused: inner.steps: Input should be less"),
    ({"inner.lr": {"uniform": [0.1, 200]}}, "space.inner.lr: 200.0 is refused: inner.lr"),
    ({"inner.steps": {"randint": [1.5, 3]}}, "space.inner.steps: randint bounds must be integers"),
    ({"inner.steps": {"uniform": [1, 3]}}, "space.inner.steps: uniform samples floats but the field takes integers"),
    ({"inner.optimizer": {"choice": ["sgd", "lbfgs"]}}, 'space.inner.optimizer: "lbfgs" is refused'),
    # The spec's own cross-field rules apply too: conv4 on sinusoid is refused by JobSpec.
    ({"model.name": {"choice": ["conv4"]}}, "space.model.name: \"conv4\" is refused: spec: model.name: conv4 needs"),
    ({"inner": {"grid": [{"steps": 2}, {"stepz": 1}]}}, "space.inner: {\"stepz\": 1} is refused: inner.stepz"),
    ({"model": {"grid": [{"name": "mlp"}]}, "model.hidden": {"choice": [[8]]}},
     "space.model.hidden: overlaps space.model"),
])
def test_bad_space_is_refused_naming_the_field(space: dict, expected: str) -> None:
    errors = _errors({"space": space})
    assert expected in errors
    assert errors.startswith("space")  # the location names the space, not the model as a whole


def test_a_domain_needs_exactly_one_kind() -> None:
    errors = _errors({"space": {"inner.lr": {"uniform": [0.1, 0.2], "choice": [0.1]}}})
    assert "space.inner.lr | Value error, give exactly one of" in errors
    assert "space.inner.lr.grid" in _errors({"space": {"inner.lr": {"grid": []}}})


def test_metric_mode_and_scheduler_are_checked() -> None:
    space = {"inner.lr": {"loguniform": [0.001, 0.1]}}
    assert "metric | Value error, metric: 'eval/accuracy' is not reported" in _errors(
        {"space": space, "metric": "eval/accuracy"})
    assert "scheduler.grace_period: 50 is not below outer.iterations (50)" in _errors(
        {"space": space, "scheduler": {"grace_period": 50}})
    assert "scheduler.type" in _errors({"space": space, "scheduler": {"type": "pbt"}})
    assert "num_samples" in _errors({"space": space, "num_samples": 0})
    assert "nam" in _errors({"space": space, "nam": "x"})  # extra keys are refused

    sweep = SweepSpec.model_validate({"base": BASE, "space": space})
    assert (sweep.metric, sweep.mode) == ("eval/loss", "min")
    sweep = SweepSpec.model_validate({"base": BASE, "space": space, "metric": "meta/loss"})
    assert sweep.mode == "min"
    image = {"task": {"family": "image_folder", "path": "/data"}, "model": {"name": "conv4"}}
    sweep = SweepSpec.model_validate({"base": image, "space": space})
    assert (sweep.metric, sweep.mode) == ("eval/accuracy", "max")
    assert "eval/accuracy" in sweep_metrics(sweep.base) and "eval/accuracy" not in sweep_metrics(JobSpec())
    # Meta-RL reports returns at evaluations: the default is the return after the evaluation's steps.
    nav = {"task": {"family": "nav2d"}, "eval": {"steps": 2}}
    sweep = SweepSpec.model_validate({"base": nav, "space": space})
    assert (sweep.metric, sweep.mode) == ("eval/return_step_2", "max")
    assert "eval/loss" not in sweep_metrics(sweep.base) and "eval/return_step_0" in sweep_metrics(sweep.base)


def test_valid_sweep_round_trips_and_counts_trials() -> None:
    sweep = SweepSpec.model_validate({
        "base": BASE,
        "space": {"inner.lr": {"loguniform": [0.001, 0.5]}, "inner.steps": {"randint": [1, 5]},
                  "outer.lr": {"grid": [0.001, 0.01]}, "model": {"grid": [{"name": "mlp", "hidden": [8]},
                                                                          {"name": "mlp"}, {"name": "mlp"}]},
                  "task.shots": {"choice": [5, 10]}},
        "num_samples": 2,
    })
    assert trial_count(sweep) == 2 * 2 * 3
    dumped = sweep.model_dump(mode="json")
    assert dumped["space"]["inner.lr"] == {"loguniform": [0.001, 0.5]}  # no null keys
    assert SweepSpec.model_validate(dumped) == sweep
    assert SweepSpec.model_validate_json(sweep.model_dump_json()) == sweep


def test_apply_config_sets_nested_paths_and_revalidates() -> None:
    base = JobSpec.model_validate(BASE)
    spec = apply_config(base, {"inner.lr": 0.3, "inner.steps": 3, "model": {"name": "mlp", "hidden": [8]},
                               "model.kwargs.width": 4})
    assert (spec.inner.lr, spec.inner.steps, spec.model.hidden, spec.model.kwargs) == (0.3, 3, [8], {"width": 4})
    assert spec.outer.iterations == 50 and base.inner.lr == 0.01  # the base is untouched
    np = pytest.importorskip("numpy")
    assert apply_config(base, {"inner.steps": np.int64(2)}).inner.steps == 2  # Tune samples numpy scalars
    with pytest.raises(ValidationError) as info:
        apply_config(base, {"inner.steps": 0})
    assert info.value.errors()[0]["loc"] == ("inner", "steps")
    with pytest.raises(ValidationError):
        apply_config(base, {"inner.optimizer": "adam"})  # adam is reptile-only: the cross-field rule holds


def test_specs_import_without_torch_or_ray() -> None:
    """The control plane validates jobs and sweeps without loading the machinery."""
    import subprocess
    import sys

    code = "import sys, workers.spec, workers.sweep_spec; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out

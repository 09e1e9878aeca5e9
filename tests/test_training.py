"""The single-process training loop: exact resume, determinism, failures, evaluation."""

from pathlib import Path

import pytest
import torch

from workers.checkpoint import latest_checkpoint, list_checkpoints
from workers.errors import TrainingError
from workers.evaluation import mean_ci95
from workers.run import BEFORE_EVERY, Trainer
from workers.spec import JobSpec
from workers.tasks.sinusoid import SinusoidFamily


def _spec(**overrides) -> JobSpec:
    base = {"name": "t", "dtype": "float64", "outer": {"iterations": 12, "meta_batch_size": 4},
            "eval": {"every": 6, "tasks": 4, "steps": 2}, "checkpoint": {"every": 3, "keep": 2}}
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return JobSpec.model_validate(base)


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile"])
def test_resume_is_exact(tmp_path: Path, algorithm: str) -> None:
    inner = {"optimizer": "adam", "lr": 0.01} if algorithm == "reptile" else {}
    spec = _spec(algorithm=algorithm, inner=inner, outer={"anneal": algorithm == "reptile"})
    straight = Trainer(spec, run_dir=tmp_path / "a")
    straight.run()

    stops = iter([False] * 7 + [True])
    first = Trainer(spec, run_dir=tmp_path / "b", should_stop=lambda: next(stops))
    result = first.run()
    assert result.cancelled and result.iteration == 7
    resumed = Trainer(spec, run_dir=tmp_path / "b")
    assert resumed.iteration == 7
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(first.optimizer.param_groups[0]["lr"])
    resumed.run()
    for k, v in _params(straight).items():
        assert torch.equal(v, _params(resumed)[k]), k


def test_same_seed_same_run_and_tasks_are_pure(tmp_path: Path) -> None:
    a = Trainer(_spec(), run_dir=tmp_path / "a")
    b = Trainer(_spec(), run_dir=tmp_path / "b")
    ra, rb = a.run(), b.run()
    strip = [[{k: v for k, v in m.items() if not k.startswith(("perf/",))} for _, m in r.history] for r in (ra, rb)]
    assert strip[0] == strip[1]
    for k, v in _params(a).items():
        assert torch.equal(v, _params(b)[k])
    family = SinusoidFamily(_spec().task)
    t1, t2 = family.sample(3, 5, 7), family.sample(3, 5, 7)
    assert all(torch.equal(x, y) for x, y in zip(t1, t2, strict=True))
    assert not torch.equal(family.sample(3, 5, 8).y_support, t1.y_support)
    assert not torch.equal(family.sample(3, 5, 7, "test").y_support, t1.y_support)


def test_checkpoints_rotate_and_hold_everything(tmp_path: Path) -> None:
    Trainer(_spec(), run_dir=tmp_path).run()
    done = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in done] == ["iter_00000009", "iter_00000012"]
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    assert ckpt.iteration == 12 and ckpt.spec["name"] == "t"
    assert ckpt.optimizer["state"] and ckpt.rng_state is not None
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_torn_checkpoint_is_skipped(tmp_path: Path) -> None:
    Trainer(_spec(), run_dir=tmp_path).run()
    newest = list_checkpoints(tmp_path / "checkpoints")[-1]
    (newest / "model.safetensors").write_bytes(b"garbage")
    assert latest_checkpoint(tmp_path / "checkpoints").iteration == 9


def test_non_finite_loss_stops_naming_the_iteration_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    # Per iteration: 4 tasks x (1 inner step + query after) = 8 forward passes (the pre-adaptation
    # query pass runs on every 10th iteration and at evaluations only), so the model's outputs turn
    # NaN during iteration 4 (0-based), after 4 good iterations.
    spec = _spec(model={"factory": "user_models:make_countdown", "kwargs": {"calls": 32}},
                 inner={"steps": 1}, checkpoint={"every": 1, "keep": 3})
    with pytest.raises(TrainingError, match=r"non-finite loss at iteration 4") as info:
        Trainer(spec, run_dir=tmp_path, allowed_modules=["user_models"]).run()
    assert info.value.iteration == 4
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    assert ckpt.iteration == 4
    assert all(torch.isfinite(v).all() for v in ckpt.model.values())


def test_reports_namespaced_metrics_and_evaluation(tmp_path: Path) -> None:
    seen: list[tuple[int, dict]] = []
    Trainer(_spec(), run_dir=tmp_path, reporter=lambda i, m: seen.append((i, m))).run()
    assert [i for i, _ in seen] == list(range(1, 13))
    first = seen[0][1]
    for key in ("meta/loss", "inner/loss_before", "perf/tasks_per_s", "meta/lr"):
        assert key in first
    evals = [i for i, m in seen if "eval/loss" in m]
    assert evals == [6, 12]
    # The pre-adaptation query metrics cost a forward pass of every query set: every BEFORE_EVERY-th
    # iteration and at evaluations only.
    assert BEFORE_EVERY == 10
    assert [i for i, m in seen if "meta/loss_before" in m] == [6, 10, 12]


def test_sinusoid_meta_training_learns_to_adapt(tmp_path: Path) -> None:
    """A short run already adapts better than the initialisation (the loop optimises the right thing)."""
    spec = JobSpec.model_validate({"outer": {"iterations": 300, "meta_batch_size": 10},
                                   "eval": {"every": 300, "tasks": 50, "steps": 10}})
    trainer = Trainer(spec, run_dir=tmp_path)
    before = trainer.evaluate()
    after = trainer.run().eval_metrics
    assert after["eval/loss"] < 0.8 * before["eval/loss"]
    assert after["eval/loss"] < after["eval/loss_before"]


def test_mean_ci95() -> None:
    m, h = mean_ci95([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and h == pytest.approx(1.96 * (5 / 3 / 4) ** 0.5)

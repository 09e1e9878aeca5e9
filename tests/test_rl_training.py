"""The RL meta-training loop: it learns to adapt, resumes exactly, cancels, fails on divergence
naming the iteration with the last good checkpoint kept, exports a policy that adapts, and samples
the same rollouts on Ray workers as in process."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from workers.checkpoint import latest_checkpoint
from workers.errors import TrainingError
from workers.rl import adapt_exported, adapt_policy, build_family, load_policy
from workers.run import Trainer, run_training
from workers.spec import JobSpec


def rl_spec(*, hidden=(8,), meta_batch_size=3, rollouts=3, horizon=10, iterations=3, eval_tasks=2, eval_steps=1,
            checkpoint_every=1, **top) -> JobSpec:
    """A small nav2d job; ``top`` replaces or merges top-level sections (``inner={"steps": 2}``)."""
    body = {"name": "nav", "task": {"family": "nav2d", "rollouts": rollouts, "horizon": horizon},
            "model": {"name": "mlp", "hidden": list(hidden)},
            "outer": {"iterations": iterations, "meta_batch_size": meta_batch_size},
            "eval": {"every": 1000, "tasks": eval_tasks, "steps": eval_steps},
            "checkpoint": {"every": checkpoint_every}}
    for key, value in top.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    return JobSpec.model_validate(body)


def test_meta_training_learns_to_adapt(tmp_path: Path) -> None:
    """Before training one policy-gradient step does not help on held-out goals; after 8 MAML-TRPO
    iterations the adapted policy beats the unadapted one and the initial policy's adapted return."""
    torch.set_num_threads(1)
    spec = rl_spec(hidden=(32, 32), meta_batch_size=10, rollouts=10, horizon=50, iterations=8, eval_tasks=20,
                   checkpoint_every=1000)
    trainer = Trainer(spec, run_dir=tmp_path)
    before = trainer.evaluate()
    history = []
    result = Trainer(spec, run_dir=tmp_path, reporter=lambda it, m: history.append(m)).run()
    after = result.eval_metrics
    gain = after["eval/return_step_1"] - after["eval/return_step_0"]
    sem = math.hypot(after["eval/return_step_1_sem"], after["eval/return_step_0_sem"])
    assert gain > max(3.0, 2 * sem), (before, after)
    assert after["eval/return_step_1"] > before["eval/return_step_1"] + 10, (before, after)
    assert before["eval/return_step_1"] - before["eval/return_step_0"] < 3.0  # no free gain at init
    assert all(m["rl/kl"] <= spec.outer.max_kl for m in history)
    expected = {"rl/return_before", "rl/return_after", "rl/kl", "rl/surrogate_improvement", "perf/env_steps_per_s"}
    assert expected <= set(history[0])

    # The exported policy adapts through the service's entry point.
    loaded, policy, params = load_policy(result.model_dir)
    assert loaded == spec
    family = build_family(loaded)
    goals = np.random.default_rng(0).uniform(-0.5, 0.5, size=(10, 2))
    results = [adapt_policy(policy, params, family, g, spec=loaded, seed=i) for i, g in enumerate(goals)]
    assert np.mean([r.return_after - r.return_before for r in results]) > 0
    again = adapt_exported(result.model_dir, goals[0], seed=0)
    assert again.returns == results[0].returns and len(again.returns) == 2
    with pytest.raises(ValueError, match=r"task\.goal"):
        adapt_policy(policy, params, family, [0.9, 0.0], spec=loaded)
    with pytest.raises(ValueError, match=r"rollouts"):
        adapt_policy(policy, params, family, [0.1, 0.0], spec=loaded, rollouts=10_000)


def test_resume_is_exact_and_cancellation_checkpoints(tmp_path: Path) -> None:
    spec = rl_spec()
    straight = Trainer(spec, run_dir=tmp_path / "a").run()
    calls = {"n": 0}

    def stop_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    cancelled = Trainer(spec, run_dir=tmp_path / "b", should_stop=stop_after_two).run()
    assert cancelled.cancelled and cancelled.iteration == 2
    ckpt = latest_checkpoint(tmp_path / "b" / "checkpoints")
    assert ckpt.iteration == 2 and ckpt.optimizer == {"state": {}, "param_groups": []}  # TRPO: no state
    resumed = Trainer(spec, run_dir=tmp_path / "b").run()
    assert resumed.iteration == 3 and not resumed.cancelled
    a = load_file(str(straight.model_dir / "model.safetensors"))
    b = load_file(str(resumed.model_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_divergence_fails_naming_the_iteration_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    trainer = Trainer(rl_spec(iterations=5), run_dir=tmp_path)
    trainer.step()
    trainer.step()
    trainer.checkpoint()
    with torch.no_grad():
        trainer.parameters["mean_net.2.weight"].fill_(float("nan"))  # the policy has diverged
    with pytest.raises(TrainingError, match=r"policy diverged at iteration 2: non-finite log-probabilities") as info:
        trainer.run()
    assert info.value.iteration == 2
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    assert ckpt.iteration == 2 and all(torch.isfinite(v).all() for v in ckpt.model.values())


def pretrained(spec: JobSpec) -> JobSpec:
    """The paper's 'pretrained' baseline: joint training without adaptation (0 inner steps, which the
    job API refuses, so built past validation)."""
    return spec.model_copy(update={"inner": spec.inner.model_copy(update={"steps": 0})})


@pytest.mark.parametrize("overrides", [{"algorithm": "fomaml"}, {"outer": {"optimizer": "adam", "lr": 0.01}},
                                       {"inner": {"steps": 2}}, "pretrained"])
def test_variants_train(tmp_path: Path, overrides: dict | str) -> None:
    spec = pretrained(rl_spec(iterations=2)) if overrides == "pretrained" else rl_spec(iterations=2, **overrides)
    result = run_training(spec, run_dir=tmp_path, reporter=lambda it, m: None, should_stop=lambda: False,
                          use_ray=False)
    assert result.iteration == 2 and all(math.isfinite(v) for v in result.metrics.values())
    if overrides == "pretrained":
        assert result.metrics["rl/return_before"] == result.metrics["rl/return_after"]


@pytest.mark.ray
def test_ray_rollout_workers_match_the_in_process_sampler(ray_cluster, tmp_path: Path) -> None:
    params = {}
    for workers, use_ray in [(1, False), (2, True)]:
        spec = rl_spec(iterations=2, resources={"workers": workers})
        result = run_training(spec, run_dir=tmp_path / str(workers), reporter=lambda it, m: None,
                              should_stop=lambda: False, use_ray=use_ray)
        params[workers] = load_file(str(result.model_dir / "model.safetensors"))
    for k, v in params[1].items():
        assert torch.allclose(v, params[2][k], atol=1e-5), k

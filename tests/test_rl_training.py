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
from workers.rl import RLConfig, RLTrainer, adapt_exported, adapt_policy, load_policy, run_rl_training
from workers.rl.trainer import build_family

TINY = dict(hidden=[8], meta_batch_size=3, rollouts=3, horizon=10, iterations=3, eval_every=1000, eval_tasks=2,
            eval_steps=1, checkpoint_every=1)


def test_meta_training_learns_to_adapt(tmp_path: Path) -> None:
    """Before training one policy-gradient step does not help on held-out goals; after 8 MAML-TRPO
    iterations the adapted policy beats the unadapted one and the initial policy's adapted return."""
    torch.set_num_threads(1)
    cfg = RLConfig(hidden=[32, 32], meta_batch_size=10, rollouts=10, horizon=50, iterations=8, eval_every=1000,
                   eval_tasks=20, eval_steps=1, checkpoint_every=1000)
    trainer = RLTrainer(cfg, run_dir=tmp_path)
    before = trainer.evaluate()
    history = []
    result = RLTrainer(cfg, run_dir=tmp_path, reporter=lambda it, m: history.append(m)).run()
    after = result.eval_metrics
    gain = after["eval/return_step_1"] - after["eval/return_step_0"]
    sem = math.hypot(after["eval/return_step_1_sem"], after["eval/return_step_0_sem"])
    assert gain > max(3.0, 2 * sem), (before, after)
    assert after["eval/return_step_1"] > before["eval/return_step_1"] + 10, (before, after)
    assert before["eval/return_step_1"] - before["eval/return_step_0"] < 3.0  # no free gain at init
    assert all(m["rl/kl"] <= cfg.max_kl for m in history)
    expected = {"rl/return_before", "rl/return_after", "rl/kl", "rl/surrogate_improvement", "perf/env_steps_per_s"}
    assert expected <= set(history[0])

    # The exported policy adapts through the service's entry point.
    config, policy, params = load_policy(result.model_dir)
    family = build_family(config)
    goals = np.random.default_rng(0).uniform(-0.5, 0.5, size=(10, 2))
    results = [adapt_policy(policy, params, family, g, config=config, seed=i) for i, g in enumerate(goals)]
    assert np.mean([r.return_after - r.return_before for r in results]) > 0
    again = adapt_exported(result.model_dir, goals[0], seed=0)
    assert again.returns == results[0].returns and len(again.returns) == 2
    with pytest.raises(ValueError, match=r"task\.goal"):
        adapt_policy(policy, params, family, [0.9, 0.0], config=config)
    with pytest.raises(ValueError, match=r"rollouts"):
        adapt_policy(policy, params, family, [0.1, 0.0], config=config, rollouts=10_000)


def test_resume_is_exact_and_cancellation_checkpoints(tmp_path: Path) -> None:
    cfg = RLConfig(**TINY)
    straight = RLTrainer(cfg, run_dir=tmp_path / "a").run()
    calls = {"n": 0}

    def stop_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    cancelled = RLTrainer(cfg, run_dir=tmp_path / "b", should_stop=stop_after_two).run()
    assert cancelled.cancelled and cancelled.iteration == 2
    ckpt = latest_checkpoint(tmp_path / "b" / "checkpoints")
    assert ckpt.iteration == 2 and ckpt.optimizer == {"state": {}, "param_groups": []}  # TRPO: no state
    resumed = RLTrainer(cfg, run_dir=tmp_path / "b").run()
    assert resumed.iteration == 3 and not resumed.cancelled
    a = load_file(str(straight.model_dir / "model.safetensors"))
    b = load_file(str(resumed.model_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_divergence_fails_naming_the_iteration_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    trainer = RLTrainer(RLConfig(**{**TINY, "iterations": 5}), run_dir=tmp_path)
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


@pytest.mark.parametrize("overrides", [{"first_order": True}, {"outer_optimizer": "adam", "outer_lr": 0.01},
                                       {"inner_steps": 0}, {"inner_steps": 2}])
def test_variants_train(tmp_path: Path, overrides: dict) -> None:
    result = run_rl_training(RLConfig(**{**TINY, "iterations": 2, **overrides}), run_dir=tmp_path,
                             reporter=lambda it, m: None, should_stop=lambda: False, use_ray=False)
    assert result.iteration == 2 and all(math.isfinite(v) for v in result.metrics.values())
    if overrides.get("inner_steps") == 0:
        assert result.metrics["rl/return_before"] == result.metrics["rl/return_after"]


@pytest.mark.ray
def test_ray_rollout_workers_match_the_in_process_sampler(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    import ray

    from workers.distributed import ensure_ray

    ensure_ray(num_cpus=2)
    try:
        params = {}
        for workers, use_ray in [(1, False), (2, True)]:
            cfg = RLConfig(**{**TINY, "iterations": 2, "workers": workers})
            result = run_rl_training(cfg, run_dir=tmp_path / str(workers), reporter=lambda it, m: None,
                                     should_stop=lambda: False, use_ray=use_ray)
            params[workers] = load_file(str(result.model_dir / "model.safetensors"))
        for k, v in params[1].items():
            assert torch.allclose(v, params[2][k], atol=1e-5), k
    finally:
        ray.shutdown()

"""The RL meta-training loop: rollouts fanned out to samplers, the TRPO meta-update in the driver.

Where rollouts are sampled is a *sampler*: ``LocalSampler`` in this process, ``RaySampler`` on
``RolloutWorker`` actors, each sampling its round-robin share of the meta-batch's tasks
(vectorised over its tasks x rollouts environments) and returning every task's pre- and
post-adaptation rollouts. Every task's rollouts are a pure function of (config, parameters,
iteration, task index), so 1 or n workers give the same run. The driver owns the parameters, the
meta-update (TRPO needs the whole meta-batch for its conjugate gradient and line search), held-out
evaluation, checkpoints (``workers.checkpoint``) and metrics.

Example::

    result = run_rl_training(RLConfig(iterations=100), run_dir=Path("runs/nav"),
                             reporter=lambda it, m: None, should_stop=lambda: False, use_ray=False)
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from workers.aggregator import apply_meta_update
from workers.checkpoint import Checkpoint, Location, latest_checkpoint, save_checkpoint, save_export
from workers.errors import NonFiniteLossError, TrainingError, WorkerError, WorkerLost
from workers.inner import Params
from workers.rl.algorithms import (
    MetaObjective,
    TaskRollouts,
    meta_gradients,
    rollout_metrics,
    sample_adaptation,
    trpo_meta_step,
)
from workers.rl.config import RLConfig
from workers.rl.envs import EnvFamily, build_env_family, sample_tasks
from workers.rl.policy import GaussianMLPPolicy
from workers.tasks.base import Split, shard_indices
from workers.training import Reporter, TrainResult

logger = logging.getLogger(__name__)

# TRPO keeps no optimizer state; this is what the checkpoint records for it.
EMPTY_OPTIMIZER_STATE: dict[str, Any] = {"state": {}, "param_groups": []}


def torch_dtype(config: RLConfig) -> torch.dtype:
    return torch.float64 if config.dtype == "float64" else torch.float32


def build_family(config: RLConfig) -> EnvFamily:
    return build_env_family(config.family, reward=config.reward)


def build_policy(config: RLConfig, family: EnvFamily) -> GaussianMLPPolicy:
    """The freshly initialised policy of a config (initialisation seeded by ``config.seed``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        policy = GaussianMLPPolicy(family.obs_dim, family.act_dim, config.hidden, config.init_log_std)
    return policy.to(torch_dtype(config))


def sample_tasks_rollouts(config: RLConfig, family: EnvFamily, policy: GaussianMLPPolicy, params: Params,
                          iteration: int, indices: range | list[int], *, split: Split = "train",
                          steps: int | None = None) -> list[TaskRollouts]:
    """The rollouts of the tasks at (seed, split, iteration, i) for i in ``indices``."""
    tasks, rngs = sample_tasks(family, config.seed, split, iteration, indices)
    return sample_adaptation(
        policy, params, family, tasks, rngs, rollouts=config.rollouts,
        steps=config.inner_steps if steps is None else steps, lr=config.inner_lr, horizon=config.episode_length,
        gamma=config.gamma, baseline_reg=config.baseline_reg, normalize_advantages=config.normalize_advantages,
        indices=list(indices))


class Sampler(Protocol):
    def sample(self, params: Params, iteration: int) -> list[TaskRollouts]: ...
    def close(self) -> None: ...


class LocalSampler:
    """Samples the whole meta-batch in this process."""

    def __init__(self, config: RLConfig, family: EnvFamily, policy: GaussianMLPPolicy) -> None:
        self.config, self.family, self.policy = config, family, policy

    def sample(self, params: Params, iteration: int) -> list[TaskRollouts]:
        return sample_tasks_rollouts(self.config, self.family, self.policy, params, iteration,
                                     range(self.config.tasks_per_batch))

    def close(self) -> None:
        pass


class RolloutWorker:
    """One rollout worker: builds the environment family and the policy once, then samples its
    share (task indices ``rank::world``) of every meta-batch. A plain class, made remote only where
    the driver creates it."""

    def __init__(self, config_json: dict[str, Any], rank: int, world: int, *, threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.config = RLConfig.model_validate(config_json)
        self.rank, self.world = rank, world
        self.family = build_family(self.config)
        self.policy = build_policy(self.config, self.family)

    def pid(self) -> int:
        return os.getpid()

    def sample(self, params: Params, iteration: int) -> list[TaskRollouts]:
        indices = shard_indices(self.config.tasks_per_batch, self.rank, self.world)
        return sample_tasks_rollouts(self.config, self.family, self.policy, params, iteration, indices)


class RaySampler:
    """Fans each meta-batch's sampling out to ``config.workers`` RolloutWorker actors."""

    def __init__(self, config: RLConfig) -> None:
        import ray

        from workers.distributed import ensure_ray

        ensure_ray()
        remote = ray.remote(RolloutWorker)
        self.workers: list = []
        try:
            for rank in range(config.workers):
                self.workers.append(remote.options(num_cpus=config.cpus_per_worker, max_restarts=0).remote(
                    config.model_dump(mode="json"), rank, config.workers, threads=config.threads_per_worker))
            self.pids = self._get([w.pid.remote() for w in self.workers])
        except BaseException:
            self.close()  # never leave half a worker group holding the cluster's resources
            raise

    @staticmethod
    def _get(refs: list) -> list:
        # The supervised executor's mapping of Ray failures to WorkerLost / WorkerError /
        # NonFiniteLossError, so both trainers see the same typed errors.
        from workers.distributed import gather

        return gather(refs)

    def sample(self, params: Params, iteration: int) -> list[TaskRollouts]:
        import ray

        ref = ray.put({k: v.detach().cpu() for k, v in params.items()})
        shards = self._get([w.sample.remote(ref, iteration) for w in self.workers])
        return sorted((r for shard in shards for r in shard), key=lambda r: r.index)

    def close(self) -> None:
        import ray

        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # already dead
                pass
        self.workers = []


def evaluate_adaptation(config: RLConfig, family: EnvFamily, policy: GaussianMLPPolicy, params: Params, *,
                        num_tasks: int, steps: int, iteration: int = 0) -> dict[str, float]:
    """Average return on ``num_tasks`` held-out tasks (the test split) after 0..steps
    policy-gradient steps with the inner learning rate: ``eval/return_step_k``."""
    rollouts = sample_tasks_rollouts(config, family, policy, params, iteration, range(num_tasks), split="test",
                                     steps=steps)
    per_step = np.array([r.returns for r in rollouts])  # (tasks, steps + 1)
    metrics = {f"eval/return_step_{k}": float(per_step[:, k].mean()) for k in range(steps + 1)}
    metrics.update({f"eval/return_step_{k}_sem": float(per_step[:, k].std(ddof=1) / np.sqrt(len(rollouts)))
                    for k in range(steps + 1)} if len(rollouts) > 1 else {})
    return metrics


class RLTrainer:
    """Meta-train an RL config to completion, resuming from ``run_dir/checkpoints`` if one is there.

    ``reporter(iteration, metrics)`` gets a flat namespaced dict every ``report_every`` iterations
    and at evaluations; ``should_stop()`` is polled every iteration (cancellation: a checkpoint is
    written and the result is marked cancelled). A policy that diverges (non-finite
    log-probabilities or parameters) raises ``TrainingError`` naming the iteration; the last good
    checkpoint stays on disk.
    """

    def __init__(self, config: RLConfig, *, run_dir: Path, reporter: Reporter | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 sampler_factory: Callable[[RLConfig, EnvFamily, GaussianMLPPolicy], Sampler] | None = None,
                 report_every: int = 1, checkpoint_dir: Location | None = None) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.checkpoint_dir: Location = checkpoint_dir or self.run_dir / "checkpoints"
        self.reporter = reporter or log_reporter(config)
        self.should_stop = should_stop or (lambda: False)
        self.report_every = report_every
        self.family = build_family(config)
        self.policy = build_policy(config, self.family)
        self.parameters = dict(self.policy.named_parameters())
        self.optimizer = (torch.optim.Adam(self.parameters.values(), lr=config.outer_lr)
                          if config.outer_optimizer == "adam" else None)
        self.iteration = 0
        self.last_metrics: dict[str, float] = {}
        self.eval_metrics: dict[str, float] = {}
        self._resume()
        factory = sampler_factory or LocalSampler
        self.sampler = factory(config, self.family, self.policy)
        logger.info("%s: config %s", config.name, config.model_dump(mode="json"))

    def params(self) -> Params:
        return {k: v.detach() for k, v in self.parameters.items()}

    def _resume(self) -> None:
        ckpt = latest_checkpoint(self.checkpoint_dir)
        if ckpt is None:
            return
        self.policy.load_state_dict(ckpt.model, strict=True)
        if self.optimizer is not None and ckpt.optimizer["param_groups"]:
            self.optimizer.load_state_dict(ckpt.optimizer)
        if ckpt.rng_state is not None:
            torch.set_rng_state(ckpt.rng_state)
        self.iteration = ckpt.iteration
        self.last_metrics = dict(ckpt.metrics)
        logger.info("resumed %s from %s at iteration %d", self.config.name, ckpt.path, ckpt.iteration)

    def checkpoint(self) -> Path | str:
        return save_checkpoint(self.checkpoint_dir, Checkpoint(
            iteration=self.iteration,
            model=self.policy.state_dict(),
            optimizer=self.optimizer.state_dict() if self.optimizer is not None else EMPTY_OPTIMIZER_STATE,
            spec=self.config.model_dump(mode="json"),
            rng_state=torch.get_rng_state(),
            metrics=self.last_metrics,
        ), keep=self.config.checkpoint_keep)

    def evaluate(self) -> dict[str, float]:
        return evaluate_adaptation(self.config, self.family, self.policy, self.params(),
                                   num_tasks=self.config.eval_tasks, steps=self.config.eval_steps)

    def _update(self, rollouts: list[TaskRollouts]) -> dict[str, float]:
        cfg = self.config
        params = self.params()
        if cfg.outer_optimizer == "trpo":
            new, metrics = trpo_meta_step(
                self.policy, params, rollouts, inner_lr=cfg.inner_lr, first_order=cfg.first_order,
                max_kl=cfg.max_kl, cg_iters=cfg.cg_iters, cg_damping=cfg.cg_damping,
                backtrack_ratio=cfg.backtrack_ratio, max_backtracks=cfg.max_backtracks)
            if not all(torch.isfinite(v).all() for v in new.values()):
                raise NonFiniteLossError("non-finite parameters after the TRPO step")
            with torch.no_grad():
                for n, p in self.parameters.items():
                    p.copy_(new[n])
            return metrics
        assert self.optimizer is not None
        objective = MetaObjective(self.policy, params, rollouts, inner_lr=cfg.inner_lr, first_order=cfg.first_order)
        _, grads, kl, metrics = meta_gradients(self.policy, params, objective)
        if not all(torch.isfinite(g).all() for g in grads.values()):
            raise NonFiniteLossError("non-finite meta-gradient")
        apply_meta_update(self.parameters, self.optimizer, {n: -g for n, g in grads.items()})  # ascend
        surrogate, kl_after = objective.evaluate(self.params())
        metrics.update({"rl/kl": kl_after, "rl/surrogate_improvement": surrogate - metrics["rl/surrogate_before"]})
        return metrics

    def step(self) -> dict[str, float]:
        """One meta-iteration: sample (fanned out), TRPO meta-update. Returns its metrics."""
        it = self.iteration
        start = time.perf_counter()
        try:
            rollouts = self.sampler.sample(self.params(), it)
            sample_s = time.perf_counter() - start
            metrics = rollout_metrics(rollouts)
            metrics.update(self._update(rollouts))
        except NonFiniteLossError as exc:
            raise TrainingError(f"policy diverged at iteration {it}: {exc}", it) from exc
        except WorkerLost:
            raise  # the caller may restart the worker group from the last checkpoint
        except WorkerError as exc:
            raise TrainingError(f"rollout worker error at iteration {it}: {exc}", it) from exc
        self.iteration += 1
        elapsed = time.perf_counter() - start
        env_steps = sum(r.env_steps for r in rollouts)
        metrics.update({
            "perf/env_steps_per_s": env_steps / max(sample_s, 1e-9),
            "perf/env_steps": float(env_steps),
            "perf/sample_s": sample_s,
            "perf/update_s": elapsed - sample_s,
            "perf/iteration_s": elapsed,
        })
        return metrics

    def run(self) -> TrainResult:
        cfg = self.config
        history: list[tuple[int, dict[str, float]]] = []
        try:
            while self.iteration < cfg.iterations:
                if self.should_stop():
                    self.checkpoint()
                    return TrainResult(self.iteration, self.last_metrics, self.eval_metrics, None, True, history)
                metrics = self.step()
                self.last_metrics = metrics
                it = self.iteration
                if it % cfg.eval_every == 0 or it == cfg.iterations:
                    self.eval_metrics = self.evaluate()
                    metrics = {**metrics, **self.eval_metrics}
                    self.last_metrics = metrics
                if it % self.report_every == 0 or it % cfg.eval_every == 0 or it == cfg.iterations:
                    self.reporter(it, metrics)
                    history.append((it, metrics))
                if it % cfg.checkpoint_every == 0 or it == cfg.iterations:
                    self.checkpoint()
        finally:
            self.sampler.close()
        if not self.eval_metrics:
            self.eval_metrics = self.evaluate()
        model_dir = self.export(self.run_dir / "model")
        return TrainResult(self.iteration, self.last_metrics, self.eval_metrics, model_dir, False, history)

    def export(self, directory: Path) -> Path:
        """The trained policy: ``model.safetensors`` plus ``model.json`` (config, shapes, metrics)."""
        return save_export(directory, self.policy.state_dict(), {
            "kind": "rl_policy",
            "config": self.config.model_dump(mode="json"),
            "iteration": self.iteration,
            "obs_dim": self.family.obs_dim,
            "act_dim": self.family.act_dim,
            "task_dim": self.family.task_dim,
            "hidden": list(self.config.hidden),
            "eval_metrics": self.eval_metrics,
        })


def log_reporter(config: RLConfig) -> Reporter:
    """Default reporter: a progress line at most every 5 s (and at evaluations) on the logger."""
    state = {"last": 0.0}

    def report(iteration: int, metrics: dict[str, float]) -> None:
        now = time.monotonic()
        evaluated = any(k.startswith("eval/") for k in metrics)
        if now - state["last"] < 5 and not evaluated and iteration != config.iterations:
            return
        state["last"] = now
        shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(("rl/return", "rl/kl", "eval/return"))}
        logger.info("%s %d/%d %s", config.name, iteration, config.iterations, shown)

    return report


def run_rl_training(config: RLConfig, *, run_dir: Path, reporter: Reporter, should_stop: Callable[[], bool],
                    use_ray: bool = True, report_every: int = 1, max_restarts: int = 3,
                    checkpoint_dir: Location | None = None) -> TrainResult:
    """Run an RL job to its end, resuming from ``run_dir/checkpoints`` when a checkpoint is there.

    With ``use_ray`` the rollouts run on ``config.workers`` Ray actors (a local cluster is started
    if none is connected); when a worker dies, the group is restarted from the last checkpoint, at
    most ``max_restarts`` times. Raises ``TrainingError`` (with ``.iteration``) if the policy
    diverges.
    """
    restarts = 0
    while True:
        samplers: list[Sampler] = []

        def factory(cfg: RLConfig, family: EnvFamily, policy: GaussianMLPPolicy,
                    samplers: list[Sampler] = samplers) -> Sampler:
            sampler: Sampler = RaySampler(cfg) if use_ray else LocalSampler(cfg, family, policy)
            samplers.append(sampler)
            return sampler

        trainer = RLTrainer(config, run_dir=run_dir, reporter=reporter, should_stop=should_stop,
                            sampler_factory=factory, report_every=report_every, checkpoint_dir=checkpoint_dir)
        try:
            return trainer.run()
        except WorkerLost as exc:
            restarts += 1
            if restarts > max_restarts:
                raise WorkerError(f"rollout workers lost {restarts} times; last: {exc}") from exc
            logger.warning("%s: %s; restarting the rollout workers from the last checkpoint (%d/%d)",
                           config.name, exc, restarts, max_restarts)
        finally:
            for s in samplers:
                s.close()

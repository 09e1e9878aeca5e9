"""Meta-RL as a program of the training loop: rollouts on the worker group, the meta-update in the driver.

Each ``RolloutWorker`` samples its round-robin share (task indices ``rank::world``) of the
meta-batch's tasks, vectorised over its tasks x rollouts environments, and returns every task's
pre- and post-adaptation rollouts. Every task's rollouts are a pure function of (spec,
parameters, iteration, task index), so 1 or n workers give the same run. The driver owns the
meta-update (TRPO needs the whole meta-batch for its conjugate gradient and line search, or Adam
on the surrogate's meta-gradient) and the held-out evaluation. Every setting comes from the
``JobSpec``: ``task`` (family, rollouts K, horizon, reward, gamma), ``inner`` (steps, alpha),
``outer`` (TRPO's KL bound and line search, or Adam's lr), ``model.hidden`` (the policy).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from workers.aggregator import apply_meta_update
from workers.errors import NonFiniteLossError
from workers.inner import Params
from workers.raygroup import Worker
from workers.rl.algorithms import (
    MetaObjective,
    TaskRollouts,
    meta_gradients,
    rollout_metrics,
    sample_adaptation,
    trpo_meta_step,
)
from workers.rl.envs import EnvFamily, build_env_family, sample_tasks
from workers.rl.policy import GaussianMLPPolicy
from workers.spec import JobSpec, RLTask
from workers.tasks.base import Split, shard_indices

# Fixed by the method (the paper's and rllab's values); not part of a job's spec.
INIT_LOG_STD = 0.0  # initial log standard deviation of the actions
BASELINE_REG = 1e-5  # ridge coefficient of the linear feature baseline
NORMALIZE_ADVANTAGES = True  # centre and scale advantages per task and batch (rllab)


def rl_task(spec: JobSpec) -> RLTask:
    if not isinstance(spec.task, RLTask):
        raise TypeError(f"task.family: '{spec.task.family}' is not an RL task family")
    return spec.task


def build_family(spec: JobSpec) -> EnvFamily:
    task = rl_task(spec)
    return build_env_family(task.family, reward=task.reward)


def build_policy(spec: JobSpec, family: EnvFamily) -> GaussianMLPPolicy:
    """The freshly initialised policy of a spec (initialisation seeded by ``spec.seed``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        policy = GaussianMLPPolicy(family.obs_dim, family.act_dim, spec.model.hidden, INIT_LOG_STD)
    return policy.to(torch.float64 if spec.dtype == "float64" else torch.float32)


def sample_tasks_rollouts(spec: JobSpec, family: EnvFamily, policy: GaussianMLPPolicy, params: Params,
                          iteration: int, indices: range | list[int], *, split: Split = "train",
                          steps: int | None = None, rollouts: int | None = None, lr: float | None = None,
                          horizon: int | None = None) -> list[TaskRollouts]:
    """The rollouts of the tasks at (seed, split, iteration, i) for i in ``indices``; the counts
    default to the spec's."""
    task = rl_task(spec)
    tasks, rngs = sample_tasks(family, spec.seed, split, iteration, indices)
    return sample_adaptation(
        policy, params, family, tasks, rngs, rollouts=rollouts or task.rollouts,
        steps=spec.inner.steps if steps is None else steps, lr=lr or spec.inner.lr,
        horizon=horizon or task.episode_length, gamma=task.gamma, baseline_reg=BASELINE_REG,
        normalize_advantages=NORMALIZE_ADVANTAGES, indices=list(indices))


def evaluate_adaptation(spec: JobSpec, family: EnvFamily, policy: GaussianMLPPolicy, params: Params, *,
                        num_tasks: int, steps: int, iteration: int = 0) -> dict[str, float]:
    """Average return on ``num_tasks`` held-out tasks (the test split) after 0..steps
    policy-gradient steps with the inner learning rate: ``eval/return_step_k``."""
    rollouts = sample_tasks_rollouts(spec, family, policy, params, iteration, range(num_tasks), split="test",
                                     steps=steps)
    per_step = np.array([r.returns for r in rollouts])  # (tasks, steps + 1)
    metrics = {f"eval/return_step_{k}": float(per_step[:, k].mean()) for k in range(steps + 1)}
    metrics.update({f"eval/return_step_{k}_sem": float(per_step[:, k].std(ddof=1) / np.sqrt(len(rollouts)))
                    for k in range(steps + 1)} if len(rollouts) > 1 else {})
    return metrics


class RolloutWorker(Worker):
    """One rollout worker: builds the environment family and the policy once, then samples its
    share (task indices ``rank::world``) of every meta-batch."""

    def __init__(self, spec: JobSpec, rank: int, world: int, *, threads: int | None = None,
                 built: tuple[EnvFamily, GaussianMLPPolicy] | None = None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.spec = spec
        self.rank, self.world = rank, world
        if built is None:
            family = build_family(self.spec)
            built = family, build_policy(self.spec, family)
        self.family, self.policy = built

    def sample(self, params: Params, iteration: int) -> list[TaskRollouts]:
        indices = shard_indices(self.spec.outer.meta_batch_size, self.rank, self.world)
        return sample_tasks_rollouts(self.spec, self.family, self.policy, params, iteration, indices)


class RLProgram:
    """What the training loop runs for an RL spec: the policy, the meta-update (TRPO, or Adam),
    one meta-iteration over the worker group, the held-out evaluation and the export."""

    worker_cls = RolloutWorker
    diverged = "policy diverged"  # how the loop names a NonFiniteLossError
    collective = False  # TRPO needs the whole meta-batch's rollouts in one place: the driver

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.family = build_family(spec)
        self.module = build_policy(spec, self.family)
        self.parameters = dict(self.module.named_parameters())
        self.optimizer = (torch.optim.Adam(self.parameters.values(), lr=spec.outer.lr)
                          if spec.outer.optimizer == "adam" else None)
        self.worker_context = {"threads": spec.resources.threads_per_worker}

    def local_worker(self) -> RolloutWorker:
        return RolloutWorker(self.spec, 0, 1, built=(self.family, self.module))

    def params(self) -> Params:
        return {k: v.detach() for k, v in self.parameters.items()}

    def resume(self, iteration: int) -> None:
        pass  # no schedule: the optimizer state (Adam's) is all there is

    def attach(self, group: Any) -> None:
        pass  # the workers only sample, with the parameters of each iteration

    def sync(self, group: Any) -> None:
        pass  # the driver holds the parameters

    def step(self, group: Any, iteration: int, *, before: bool) -> tuple[dict[str, float], int]:
        """Sample (fanned out), then the meta-update. Its metrics and the tasks it saw."""
        start = time.perf_counter()
        shards = group.call("sample", group.share({k: v.cpu() for k, v in self.params().items()}), iteration)
        rollouts = sorted((r for shard in shards for r in shard), key=lambda r: r.index)
        sample_s = time.perf_counter() - start
        metrics = rollout_metrics(rollouts)
        metrics.update(self._update(rollouts))
        env_steps = sum(r.env_steps for r in rollouts)
        metrics.update({"perf/env_steps_per_s": env_steps / max(sample_s, 1e-9), "perf/env_steps": float(env_steps),
                        "perf/sample_s": sample_s, "perf/update_s": time.perf_counter() - start - sample_s})
        return metrics, len(rollouts)

    def _update(self, rollouts: list[TaskRollouts]) -> dict[str, float]:
        spec, params = self.spec, self.params()
        first_order = spec.algorithm == "fomaml"
        if self.optimizer is None:  # TRPO
            outer = spec.outer
            new, metrics = trpo_meta_step(
                self.module, params, rollouts, inner_lr=spec.inner.lr, first_order=first_order,
                max_kl=outer.max_kl, cg_iters=outer.cg_iters, cg_damping=outer.cg_damping,
                backtrack_ratio=outer.backtrack_ratio, max_backtracks=outer.max_backtracks)
            if not all(torch.isfinite(v).all() for v in new.values()):
                raise NonFiniteLossError("non-finite parameters after the TRPO step")
            with torch.no_grad():
                for n, p in self.parameters.items():
                    p.copy_(new[n])
            return metrics
        objective = MetaObjective(self.module, params, rollouts, inner_lr=spec.inner.lr, first_order=first_order)
        _, grads, _, metrics = meta_gradients(self.module, params, objective)
        if not all(torch.isfinite(g).all() for g in grads.values()):
            raise NonFiniteLossError("non-finite meta-gradient")
        apply_meta_update(self.parameters, self.optimizer, {n: -g for n, g in grads.items()})  # ascend
        surrogate, kl_after = objective.evaluate(self.params())
        metrics.update({"rl/kl": kl_after, "rl/surrogate_improvement": surrogate - metrics["rl/surrogate_before"]})
        return metrics

    def evaluate(self) -> dict[str, float]:
        return evaluate_adaptation(self.spec, self.family, self.module, self.params(),
                                   num_tasks=self.spec.eval.tasks, steps=self.spec.eval.steps)

    def export_info(self) -> dict[str, Any]:
        family = self.family
        return {"kind": "rl_policy", "obs_dim": family.obs_dim, "act_dim": family.act_dim,
                "task_dim": family.task_dim, "hidden": list(self.spec.model.hidden),
                # what the registry reads of every model
                "input_shape": [family.obs_dim], "output_dim": family.act_dim, "loss": "policy_gradient"}

"""Adapting a trained policy to one new task: what ``POST /models/{id}/adapt`` runs for RL models.

Collects K rollouts of the task with the trained policy, takes ``steps`` policy-gradient steps
(fresh rollouts before each), and reports the average return before and after. For nav2d it can
also answer the paths of the first few sampled rollouts of each phase (``trajectories``): the
rollouts the adaptation itself collected, with the policy's exploration noise, not the mean path.

Example::

    spec, policy, params = load_policy(Path("runs/nav/model"))
    result = adapt_policy(policy, params, build_family(spec), [0.3, -0.2], spec=spec, seed=1)
    result.return_before, result.return_after
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from workers.errors import SpecError
from workers.evaluation import MAX_ANSWER_NUMBERS
from workers.inner import Params
from workers.rl.algorithms import sample_adaptation
from workers.rl.envs import EnvFamily
from workers.rl.policy import GaussianMLPPolicy
from workers.rl.program import BASELINE_REG, NORMALIZE_ADVANTAGES, build_family, build_policy, rl_task
from workers.spec import RL_MAX_HORIZON, RL_MAX_ROLLOUTS, RL_MAX_STEPS, JobSpec
from workers.tasks.base import task_rng


@dataclass
class AdaptResult:
    return_before: float
    return_after: float
    returns: list[float] = field(default_factory=list)  # after 0, 1, ..., steps updates
    env_steps: int = 0
    # With trajectories=k (nav2d): per phase 0..steps, k rollouts, each [[x, y], ...] from the start.
    trajectories: list[list[list[list[float]]]] | None = None


def load_policy(model_dir: Path) -> tuple[JobSpec, GaussianMLPPolicy, Params]:
    """An exported RL policy (``model.safetensors`` + ``model.json``): its spec, module and params."""
    info = json.loads((Path(model_dir) / "model.json").read_text())
    if info.get("kind") != "rl_policy":
        raise ValueError(f"{model_dir}: not an RL policy export")
    spec = JobSpec.model_validate(info["spec"])
    family = build_family(spec)
    policy = build_policy(spec, family)
    policy.load_state_dict(load_file(str(Path(model_dir) / "model.safetensors")), strict=True)
    return spec, policy, {n: p.detach() for n, p in policy.named_parameters()}


def adapt_policy(policy: GaussianMLPPolicy, params: Params, family: EnvFamily, task: object, *,
                 spec: JobSpec, rollouts: int | None = None, steps: int | None = None, lr: float | None = None,
                 horizon: int | None = None, seed: int = 0, trajectories: int = 0) -> AdaptResult:
    """Adapt to ``task`` (a goal (x, y) for nav2d, a velocity or a direction for half-cheetah).

    ``rollouts``, ``steps``, ``lr`` and ``horizon`` default to the training spec's. Raises
    SpecError naming the field for a task outside its space or a count over the limits.
    ``trajectories`` (nav2d): also the positions of the first that many rollouts of each phase.
    """
    value = family.validate_task(task)
    trained = rl_task(spec)
    rollouts = trained.rollouts if rollouts is None else rollouts
    steps = max(spec.inner.steps, 1) if steps is None else steps
    lr = spec.inner.lr if lr is None else lr
    horizon = trained.episode_length if horizon is None else horizon
    if not 1 <= rollouts <= RL_MAX_ROLLOUTS:
        raise SpecError("rollouts", f"{rollouts} is outside 1..{RL_MAX_ROLLOUTS}")
    if not 1 <= horizon <= RL_MAX_HORIZON:
        raise SpecError("horizon", f"{horizon} is outside 1..{RL_MAX_HORIZON}")
    if not 0 <= steps <= RL_MAX_STEPS:
        raise SpecError("steps", f"{steps} is outside 0..{RL_MAX_STEPS}")
    if not (lr > 0 and np.isfinite(lr)):
        raise SpecError("lr", f"{lr} must be a positive number")
    if trajectories:
        if family.name != "nav2d":
            raise SpecError("trajectories", f"only nav2d policies answer trajectories, not {family.name}")
        if not 0 <= trajectories <= rollouts:
            raise SpecError("trajectories", f"{trajectories} is outside 0..{rollouts} (the rollouts per step)")
        numbers = (steps + 1) * trajectories * (horizon + 1) * 2
        if numbers > MAX_ANSWER_NUMBERS:
            raise SpecError("trajectories", f"{steps + 1} step counts x {trajectories} rollouts x {horizon + 1} "
                            f"positions x 2 is {numbers} numbers, over the limit of {MAX_ANSWER_NUMBERS}; "
                            "ask fewer trajectories, steps or a shorter horizon")
    with torch.no_grad():
        params = {n: p.detach().clone() for n, p in params.items()}
    [out] = sample_adaptation(policy, params, family, value[None, :], [task_rng(seed, "test", 0, 0)],
                              rollouts=rollouts, steps=steps, lr=lr, horizon=horizon, gamma=trained.gamma,
                              baseline_reg=BASELINE_REG, normalize_advantages=NORMALIZE_ADVANTAGES)
    paths = None
    if trajectories:
        paths = [positions(family, value, batch.actions[:trajectories], batch.mask[:trajectories], horizon)
                 for batch in [*out.pre, out.post]]
    return AdaptResult(out.returns[0], out.returns[-1], list(out.returns), out.env_steps, paths)


def positions(family: EnvFamily, task: np.ndarray, actions: torch.Tensor, mask: torch.Tensor,
              horizon: int) -> list[list[list[float]]]:
    """The positions of rollouts that took ``actions`` (k, T, act_dim) on ``task``, ``mask`` (k, T)
    1 on the steps that happened: each [[x, y] at the start, after step 1, ...] to its end.

    Replayed in the task's own environment (nav2d is deterministic: no reset noise), so a path is
    exactly the one the sampler saw, the last position included (the sampler records only the
    observations before each action).
    """
    k = actions.shape[0]
    env = family.make_env(np.repeat(task[None, :], k, axis=0), np.zeros(k, dtype=np.int64), horizon)
    pos = env.reset()  # (k, 2)
    paths = [[[float(v) for v in pos[j]]] for j in range(k)]
    for t in range(actions.shape[1]):
        live = mask[:, t].numpy() > 0
        if not live.any():
            break
        pos, _, _ = env.step(actions[:, t].numpy())
        for j in np.flatnonzero(live):
            paths[j].append([float(v) for v in pos[j]])
    return paths


def adapt_exported(model_dir: Path, task: object, *, rollouts: int | None = None, steps: int | None = None,
                   lr: float | None = None, horizon: int | None = None, seed: int = 0,
                   trajectories: int = 0) -> AdaptResult:
    """``load_policy`` then ``adapt_policy``: one call for ``POST /models/{id}/adapt``."""
    spec, policy, params = load_policy(model_dir)
    return adapt_policy(policy, params, build_family(spec), task, spec=spec, rollouts=rollouts, steps=steps,
                        lr=lr, horizon=horizon, seed=seed, trajectories=trajectories)

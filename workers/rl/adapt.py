"""Adapting a trained policy to one new task: what ``POST /models/{id}/adapt`` runs for RL models.

Collects K rollouts of the task with the trained policy, takes ``steps`` policy-gradient steps
(fresh rollouts before each), and reports the average return before and after.

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
                 horizon: int | None = None, seed: int = 0) -> AdaptResult:
    """Adapt to ``task`` (a goal (x, y) for nav2d, a velocity or a direction for half-cheetah).

    ``rollouts``, ``steps``, ``lr`` and ``horizon`` default to the training spec's. Raises
    SpecError naming the field for a task outside its space or a count over the limits.
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
    with torch.no_grad():
        params = {n: p.detach().clone() for n, p in params.items()}
    [out] = sample_adaptation(policy, params, family, value[None, :], [task_rng(seed, "test", 0, 0)],
                              rollouts=rollouts, steps=steps, lr=lr, horizon=horizon, gamma=trained.gamma,
                              baseline_reg=BASELINE_REG, normalize_advantages=NORMALIZE_ADVANTAGES)
    return AdaptResult(out.returns[0], out.returns[-1], list(out.returns), out.env_steps)


def adapt_exported(model_dir: Path, task: object, *, rollouts: int | None = None, steps: int | None = None,
                   lr: float | None = None, horizon: int | None = None, seed: int = 0) -> AdaptResult:
    """``load_policy`` then ``adapt_policy``: one call for ``POST /models/{id}/adapt``."""
    spec, policy, params = load_policy(model_dir)
    return adapt_policy(policy, params, build_family(spec), task, spec=spec, rollouts=rollouts, steps=steps,
                        lr=lr, horizon=horizon, seed=seed)

"""MAML for reinforcement learning: a REINFORCE inner loop and a TRPO meta-update.

Finn, Abbeel and Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks",
ICML 2017, section 5.3; TRPO: Schulman et al., ICML 2015. For each task i of a meta-batch:

1. sample K rollouts with theta, fit a linear feature baseline, and take ``steps`` policy-gradient
   steps, theta'_i = theta + alpha * grad_theta (1/T) sum_t log pi_theta(a_t|s_t) A_t
   (fresh rollouts before every further step);
2. sample K rollouts with theta'_i;
3. the meta-objective is TRPO's surrogate on those post-adaptation rollouts,
   S(theta) = mean_i E[pi_{theta'_i(theta)}(a|s) / pi_{theta'_i(theta_old)}(a|s) A'],
   under KL(pi_{theta'_i(theta_old)} || pi_{theta'_i(theta)}) <= delta (0.01). Its gradient and the
   Fisher-vector products (Hessian-vector products of the KL) both differentiate through the inner
   step with autograd (``create_graph``); ``first_order=True`` treats the inner gradient as a
   constant (first-order MAML): the same code with the inner step's graph dropped.

``steps=0`` is joint training without adaptation (the paper's "pretrained" baseline).

Example::

    rollouts = sample_adaptation(policy, params, family, tasks, rngs, rollouts=20, steps=1, lr=0.1,
                                 horizon=100)
    new_params, metrics = trpo_meta_step(policy, params, rollouts, inner_lr=0.1, max_kl=0.01)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from workers.aggregator import GradientSum, flatten, mean, unflatten
from workers.errors import NonFiniteLossError
from workers.inner import Params
from workers.rl.envs import EnvFamily
from workers.rl.policy import batched_mean, distribution, gaussian_kl, gaussian_log_prob


class NonFiniteLogProbError(NonFiniteLossError):
    """The policy produced NaN or infinite log-probabilities (or action means): it diverged."""


# ----------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class Batch:
    """K rollouts of one task, padded to the horizon T; ``mask`` is 1 on steps that happened."""

    obs: torch.Tensor  # (K, T, obs_dim)
    actions: torch.Tensor  # (K, T, act_dim), the sampled (unclipped) actions
    rewards: torch.Tensor  # (K, T), 0 after the end of an episode
    mask: torch.Tensor  # (K, T)
    advantages: torch.Tensor | None = None  # (K, T), filled by ``process``

    def mean_return(self) -> float:
        """Average undiscounted return per rollout (the paper's "average return")."""
        return self.rewards.sum(1).mean().item()

    def env_steps(self) -> int:
        return int(self.mask.sum().item())


@dataclass
class TaskRollouts:
    """What a rollout worker returns for one task: ``pre[k]`` were sampled before inner step k,
    ``post`` with the adapted policy (for ``steps=0``, ``pre`` is empty)."""

    index: int
    task: np.ndarray
    pre: list[Batch]
    post: Batch
    env_steps: int = 0
    returns: list[float] = field(default_factory=list)  # mean return after 0, 1, ..., steps updates


def stack_params(per_task: Sequence[Params]) -> Params:
    return {n: torch.stack([p[n] for p in per_task]) for n in per_task[0]}


def collect(policy: nn.Module, per_task: Sequence[Params], family: EnvFamily, tasks: np.ndarray, *,
            rollouts: int, horizon: int, noise: torch.Tensor, reset_seeds: np.ndarray) -> list[Batch]:
    """Roll out task i's policy ``per_task[i]`` K times on task i, all tasks vectorised together.

    ``noise`` (M, K, T, act_dim) is the standard normal noise of the actions, a = mean + std * noise:
    given it (and ``reset_seeds`` (M, K)), the rollouts are a deterministic function of the params.
    """
    m, k, t_max = len(tasks), rollouts, horizon
    stacked = stack_params(per_task)
    dtype = stacked["log_std"].dtype
    env = family.make_env(np.repeat(tasks, k, axis=0), reset_seeds.reshape(-1), horizon)
    obs_dim, act_dim = env.obs_dim, env.act_dim
    obs_buf = torch.zeros(m, k, t_max, obs_dim, dtype=dtype)
    act_buf = torch.zeros(m, k, t_max, act_dim, dtype=dtype)
    rew_buf = torch.zeros(m, k, t_max, dtype=dtype)
    mask_buf = torch.zeros(m, k, t_max, dtype=dtype)
    std = torch.exp(stacked["log_std"])[:, None, :]  # (M, 1, act_dim)
    alive = np.ones(m * k, dtype=bool)
    obs = torch.as_tensor(env.reset(), dtype=dtype).view(m, k, obs_dim)
    with torch.no_grad():
        for t in range(t_max):
            act_mean = batched_mean(policy, stacked, obs)  # (M, K, act_dim)
            if not (torch.isfinite(act_mean).all() and torch.isfinite(std).all()):
                raise NonFiniteLogProbError(f"non-finite log-probabilities: the action mean or std is not finite "
                                            f"at rollout step {t}")
            actions = act_mean + std * noise[:, :, t]
            next_obs, rewards, dones = env.step(actions.reshape(m * k, act_dim).numpy())
            live = torch.as_tensor(alive, dtype=dtype).view(m, k)
            obs_buf[:, :, t] = obs
            act_buf[:, :, t] = actions
            rew_buf[:, :, t] = torch.as_tensor(rewards, dtype=dtype).view(m, k) * live
            mask_buf[:, :, t] = live
            alive &= ~dones
            if not alive.any():
                break
            obs = torch.as_tensor(next_obs, dtype=dtype).view(m, k, obs_dim)
    return [Batch(obs_buf[i], act_buf[i], rew_buf[i], mask_buf[i]) for i in range(m)]


# ----------------------------------------------------------------------------------------------
# Returns, baseline, advantages


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """R_t = sum_{u >= t} gamma^(u - t) r_u within each rollout: (K, T) -> (K, T)."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] * mask[:, t] + gamma * running
        out[:, t] = running
    return out * mask


def baseline_features(obs: torch.Tensor) -> torch.Tensor:
    """rllab's LinearFeatureBaseline features [o, o^2, t/100, (t/100)^2, (t/100)^3, 1]: (K, T, F)."""
    k, t_max, _ = obs.shape
    o = obs.clamp(-10, 10)
    t = (torch.arange(t_max, dtype=obs.dtype) / 100.0).view(1, t_max, 1).expand(k, t_max, 1)
    return torch.cat([o, o * o, t, t ** 2, t ** 3, torch.ones_like(t)], dim=-1)


def linear_baseline(obs: torch.Tensor, mask: torch.Tensor, returns: torch.Tensor,
                    reg: float = 1e-5) -> torch.Tensor:
    """Ridge least squares of the returns on the features, fitted on this batch: values (K, T).

    Solved in float64; the ridge is raised tenfold (up to 5 times) if the solution is not finite,
    as rllab does.
    """
    feats = baseline_features(obs).double() * mask.double().unsqueeze(-1)  # padded rows are zero
    f = feats.reshape(-1, feats.shape[-1])
    y = (returns * mask).double().reshape(-1, 1)
    gram, rhs = f.T @ f, f.T @ y
    eye = torch.eye(f.shape[1], dtype=torch.float64)
    coeffs = torch.zeros_like(rhs)
    for _ in range(5):
        coeffs = torch.linalg.lstsq(gram + reg * eye, rhs).solution
        if torch.isfinite(coeffs).all():
            break
        reg *= 10
    return (feats @ coeffs).squeeze(-1).to(obs.dtype) * mask


def process(batch: Batch, *, gamma: float = 0.99, baseline_reg: float = 1e-5, use_baseline: bool = True,
            normalize: bool = True) -> Batch:
    """Fill ``batch.advantages``: discounted return minus the linear baseline (GAE with lambda=1),
    optionally normalised to zero mean and unit variance over the batch's steps (rllab's
    ``center_adv``)."""
    returns = discounted_returns(batch.rewards, batch.mask, gamma)
    adv = returns - linear_baseline(batch.obs, batch.mask, returns, baseline_reg) if use_baseline else returns
    if normalize:
        mu = masked_mean(adv, batch.mask)
        std = masked_mean((adv - mu) ** 2, batch.mask).sqrt()
        adv = (adv - mu) / (std + 1e-8)
    batch.advantages = adv * batch.mask
    return batch


# ----------------------------------------------------------------------------------------------
# The inner loop: REINFORCE steps


def log_probs(policy: nn.Module, params: Params, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log pi(a|s) (K, T), mean (K, T, act_dim), log_std (act_dim,)); raises on non-finite values."""
    act_mean, log_std = distribution(policy, params, batch.obs)
    logp = gaussian_log_prob(act_mean, log_std, batch.actions)
    if not torch.isfinite(logp).all():
        raise NonFiniteLogProbError("non-finite log-probabilities")
    return logp, act_mean, log_std


def reinforce_loss(policy: nn.Module, params: Params, batch: Batch) -> torch.Tensor:
    """-(1/steps) sum log pi(a_t|s_t) A_t: its negative gradient is the policy-gradient estimate."""
    if batch.advantages is None:
        raise ValueError("batch has no advantages: call process() first")
    logp, _, _ = log_probs(policy, params, batch)
    return -masked_mean(logp * batch.advantages, batch.mask)


def adapt(policy: nn.Module, params: Params, batches: Sequence[Batch], lr: float, *,
          create_graph: bool) -> Params:
    """One policy-gradient step per batch: theta <- theta - lr * grad reinforce_loss.

    ``create_graph=True`` keeps the result differentiable in ``params`` through the gradient
    (second-order MAML). Otherwise the inner gradient is a constant and d theta'/d theta = I
    (first-order MAML); ``params`` must still require grad so the step can be computed.
    """
    for batch in batches:
        loss = reinforce_loss(policy, params, batch)
        grads = torch.autograd.grad(loss, tuple(params.values()), create_graph=create_graph)
        params = {n: p - lr * g for (n, p), g in zip(params.items(), grads, strict=True)}
    return params


def _detached_leaves(params: Params) -> Params:
    return {n: p.detach().requires_grad_() for n, p in params.items()}


def sample_adaptation(policy: nn.Module, params: Params, family: EnvFamily, tasks: np.ndarray,
                      rngs: Sequence[np.random.Generator], *, rollouts: int, steps: int, lr: float, horizon: int,
                      gamma: float = 0.99, baseline_reg: float = 1e-5, normalize_advantages: bool = True,
                      indices: Sequence[int] | None = None) -> list[TaskRollouts]:
    """Sample, adapt ``steps`` times, sample again, for M tasks at once (what a rollout worker does).

    ``rngs[i]`` (task i's generator) seeds its action noise and environment resets, so the result
    is a pure function of (params, tasks, rngs) whichever worker computes it.
    """
    m = len(tasks)
    dtype = params["log_std"].dtype
    act_dim = params["log_std"].shape[0]
    # (M, steps + 1, 2): per task and phase, a seed for the action noise and one for the resets.
    phase_seeds = np.stack([r.integers(0, 2**62, size=(steps + 1, 2)) for r in rngs]) if m else np.zeros((0, 0, 2))
    current = [{n: p.detach() for n, p in params.items()} for _ in range(m)]
    pre: list[list[Batch]] = [[] for _ in range(m)]
    returns: list[list[float]] = [[] for _ in range(m)]
    env_steps = [0] * m
    post: list[Batch] = []
    for k in range(steps + 1):
        noise = torch.stack([
            torch.randn(rollouts, horizon, act_dim, dtype=dtype,
                        generator=torch.Generator().manual_seed(int(phase_seeds[i, k, 0])))
            for i in range(m)])  # (M, K, T, act_dim)
        reset_seeds = np.stack([np.random.default_rng(int(phase_seeds[i, k, 1])).integers(0, 2**31, size=rollouts)
                                for i in range(m)])  # (M, K)
        batches = collect(policy, current, family, tasks, rollouts=rollouts, horizon=horizon, noise=noise,
                          reset_seeds=reset_seeds)
        for i, b in enumerate(batches):
            process(b, gamma=gamma, baseline_reg=baseline_reg, normalize=normalize_advantages)
            returns[i].append(b.mean_return())
            env_steps[i] += b.env_steps()
        if k == steps:
            post = batches
            break
        with torch.enable_grad():
            for i, b in enumerate(batches):
                pre[i].append(b)
                new = adapt(policy, _detached_leaves(current[i]), [b], lr, create_graph=False)
                current[i] = {n: p.detach() for n, p in new.items()}
    idx = list(indices) if indices is not None else list(range(m))
    return [TaskRollouts(idx[i], tasks[i], pre[i], post[i], env_steps[i], returns[i]) for i in range(m)]


# ----------------------------------------------------------------------------------------------
# The meta-objective and TRPO


class MetaObjective:
    """S(theta) and KL(theta) of one meta-batch of fixed rollouts (see the module docstring).

    The old policies pi_{theta'_i(theta_old)} are computed once, at construction, from ``params``.
    """

    def __init__(self, policy: nn.Module, params: Params, rollouts: Sequence[TaskRollouts], *, inner_lr: float,
                 first_order: bool = False) -> None:
        self.policy, self.rollouts, self.inner_lr, self.first_order = policy, list(rollouts), inner_lr, first_order
        self.old: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        with torch.enable_grad():
            for r in self.rollouts:
                adapted = adapt(policy, _detached_leaves(params), r.pre, inner_lr, create_graph=False)
                logp, act_mean, log_std = log_probs(policy, adapted, r.post)
                self.old.append((logp.detach(), act_mean.detach(), log_std.detach()))

    def task_terms(self, params: Params, i: int, *, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(surrogate_i, KL_i) as functions of ``params`` (keep them differentiable: pass leaves
        that require grad, ``create_graph`` for second order)."""
        r = self.rollouts[i]
        adapted = adapt(self.policy, params, r.pre, self.inner_lr, create_graph=create_graph)
        logp, act_mean, log_std = log_probs(self.policy, adapted, r.post)
        old_logp, old_mean, old_log_std = self.old[i]
        if r.post.advantages is None:
            raise ValueError("post-adaptation batch has no advantages: call process() first")
        ratio = torch.exp(logp - old_logp)  # (K, T): 1 at theta_old
        surrogate = masked_mean(ratio * r.post.advantages, r.post.mask)
        kl = masked_mean(gaussian_kl(old_mean, old_log_std, act_mean, log_std), r.post.mask)
        return surrogate, kl

    def evaluate(self, params: Params) -> tuple[float, float]:
        """(mean surrogate, mean KL) at ``params`` without keeping a graph."""
        surr = kl = 0.0
        with torch.enable_grad():
            for i in range(len(self.rollouts)):
                s, d = self.task_terms(_detached_leaves(params), i, create_graph=False)
                surr, kl = surr + s.item(), kl + d.item()
        n = max(len(self.rollouts), 1)
        return surr / n, kl / n


def conjugate_gradient(avp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int = 10,
                       residual_tol: float = 1e-10) -> torch.Tensor:
    """Approximately solve A x = b for symmetric positive-definite A given x -> A x."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rdotr = r @ r
    for _ in range(iters):
        if rdotr <= residual_tol:
            break
        z = avp(p)
        alpha = rdotr / (p @ z)
        x += alpha * p
        r -= alpha * z
        new_rdotr = r @ r
        p = r + (new_rdotr / rdotr) * p
        rdotr = new_rdotr
    return x


@dataclass
class LineSearchResult:
    x: torch.Tensor
    surrogate: float
    kl: float
    backtracks: int
    accepted: bool


def backtracking_line_search(evaluate: Callable[[torch.Tensor], tuple[float, float]], x0: torch.Tensor,
                             full_step: torch.Tensor, surrogate_before: float, *, max_kl: float,
                             backtrack_ratio: float = 0.8, max_backtracks: int = 15) -> LineSearchResult:
    """Shrink ``full_step`` by ``backtrack_ratio`` until the surrogate improves *and* the KL is
    within ``max_kl``; if no step does, stay at ``x0`` (rejected)."""
    surr, kl = surrogate_before, 0.0
    for j in range(max_backtracks):
        x = x0 + backtrack_ratio ** j * full_step
        surr, kl = evaluate(x)
        if math.isfinite(surr) and math.isfinite(kl) and surr > surrogate_before and kl <= max_kl:
            return LineSearchResult(x, surr, kl, j, True)
    return LineSearchResult(x0.clone(), surrogate_before, 0.0, max_backtracks, False)


def trpo_update(x0: torch.Tensor, grad: torch.Tensor, fvp: Callable[[torch.Tensor], torch.Tensor],
                evaluate: Callable[[torch.Tensor], tuple[float, float]], surrogate_before: float, *,
                max_kl: float = 0.01, cg_iters: int = 10, backtrack_ratio: float = 0.8,
                max_backtracks: int = 15) -> tuple[LineSearchResult, dict[str, float]]:
    """One TRPO step maximising the surrogate: x = F^-1 g by conjugate gradient, scaled so that the
    quadratic KL model 0.5 s^T F s equals ``max_kl``, then the backtracking line search."""
    direction = conjugate_gradient(fvp, grad, cg_iters)
    shs = (direction @ fvp(direction)).item()
    info = {"rl/grad_norm": grad.norm().item(), "rl/cg_residual": (fvp(direction) - grad).norm().item()}
    if not math.isfinite(shs) or shs <= 0:
        return LineSearchResult(x0.clone(), surrogate_before, 0.0, 0, False), info
    full_step = math.sqrt(2 * max_kl / shs) * direction
    result = backtracking_line_search(evaluate, x0, full_step, surrogate_before, max_kl=max_kl,
                                      backtrack_ratio=backtrack_ratio, max_backtracks=max_backtracks)
    return result, info


def meta_gradients(policy: nn.Module, params: Params, objective: MetaObjective
                   ) -> tuple[Params, Params, torch.Tensor, dict[str, float]]:
    """Per-task meta-gradients of the surrogate, combined by the aggregator.

    Returns (leaves, mean gradient, mean KL with its graph kept for Fisher-vector products, metrics).
    """
    theta = _detached_leaves(params)
    total = GradientSum()
    kl_sum: torch.Tensor | float = 0.0
    for i in range(len(objective.rollouts)):
        surrogate, kl = objective.task_terms(theta, i, create_graph=not objective.first_order)
        task_grads = torch.autograd.grad(surrogate, tuple(theta.values()), retain_graph=True)
        total.add(dict(zip(theta.keys(), task_grads, strict=True)), {"rl/surrogate_before": surrogate.item()})
        kl_sum = kl_sum + kl
    grads, metrics, count = mean([total])
    return theta, grads, torch.as_tensor(kl_sum) / count, metrics


def trpo_meta_step(policy: nn.Module, params: Params, rollouts: Sequence[TaskRollouts], *, inner_lr: float,
                   first_order: bool = False, max_kl: float = 0.01, cg_iters: int = 10, cg_damping: float = 1e-5,
                   backtrack_ratio: float = 0.8, max_backtracks: int = 15) -> tuple[Params, dict[str, float]]:
    """The MAML-TRPO meta-update of ``params`` on one meta-batch of rollouts."""
    objective = MetaObjective(policy, params, rollouts, inner_lr=inner_lr, first_order=first_order)
    theta, grads, kl, metrics = meta_gradients(policy, params, objective)
    names = list(theta.keys())
    g = flatten(grads, names)
    # Fisher-vector products: Hessian-vector products of the mean KL, through the inner step.
    grad_kl = torch.autograd.grad(kl, tuple(theta.values()), create_graph=True)
    flat_grad_kl = torch.cat([x.reshape(-1) for x in grad_kl])

    def fvp(v: torch.Tensor) -> torch.Tensor:
        hv = torch.autograd.grad(flat_grad_kl @ v, tuple(theta.values()), retain_graph=True)
        return torch.cat([x.reshape(-1) for x in hv]) + cg_damping * v

    x0 = flatten({n: p.detach() for n, p in params.items()}, names)

    def evaluate(x: torch.Tensor) -> tuple[float, float]:
        return objective.evaluate(unflatten(x, params))

    surrogate_before, _ = evaluate(x0)
    result, info = trpo_update(x0, g, fvp, evaluate, surrogate_before, max_kl=max_kl, cg_iters=cg_iters,
                               backtrack_ratio=backtrack_ratio, max_backtracks=max_backtracks)
    new_params = {n: v.clone() for n, v in unflatten(result.x, params).items()}
    metrics.update(info)
    metrics.update({
        "rl/kl": result.kl,
        "rl/surrogate_improvement": result.surrogate - surrogate_before,
        "rl/line_search_backtracks": float(result.backtracks),
        "rl/step_accepted": float(result.accepted),
    })
    return new_params, metrics


def rollout_metrics(rollouts: Sequence[TaskRollouts]) -> dict[str, float]:
    """rl/return_before (before any update) and rl/return_after (after the last) over the tasks."""
    before = float(np.mean([r.returns[0] for r in rollouts]))
    after = float(np.mean([r.returns[-1] for r in rollouts]))
    return {"rl/return_before": before, "rl/return_after": after, "rl/adaptation_gain": after - before}

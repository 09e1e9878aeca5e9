"""The RL engine's maths in float64: the policy-gradient estimator against a closed form, conjugate
gradient, the TRPO line search's KL bound, and the meta-gradient and Fisher-vector products
through the inner REINFORCE step against central finite differences."""

import math

import numpy as np
import pytest
import torch

from workers.rl.algorithms import (
    Batch,
    MetaObjective,
    backtracking_line_search,
    collect,
    conjugate_gradient,
    discounted_returns,
    linear_baseline,
    process,
    reinforce_loss,
    sample_adaptation,
    trpo_update,
)
from workers.rl.envs import Nav2DFamily, sample_tasks
from workers.rl.policy import GaussianMLPPolicy, gaussian_kl, gaussian_log_prob

DT = torch.float64


class _BanditEnv:
    """One step, observation 0, reward -(a - c)^2."""

    obs_dim = act_dim = 1

    def __init__(self, c: np.ndarray) -> None:
        self.c, self.num_envs = c, len(c)

    def reset(self) -> np.ndarray:
        return np.zeros((self.num_envs, 1))

    def step(self, actions: np.ndarray):
        return np.zeros((self.num_envs, 1)), -(actions[:, 0] - self.c) ** 2, np.ones(self.num_envs, dtype=bool)


class _Bandit:
    obs_dim = act_dim = task_dim = 1

    def make_env(self, tasks, seeds, horizon):
        return _BanditEnv(tasks[:, 0])


@pytest.mark.parametrize("use_baseline", [False, True])
def test_policy_gradient_matches_the_closed_form_gaussian_bandit(use_baseline: bool) -> None:
    """a ~ N(mu, sigma^2), r = -(a - c)^2: E[r] = -((mu - c)^2 + sigma^2), so
    dE/dmu = -2 (mu - c) and dE/dlog(sigma) = -2 sigma^2. The estimator runs through the real
    sampler, returns, baseline and REINFORCE loss; its error must be within 4 standard errors."""
    mu, sigma, c, n = 0.3, 0.5, 1.0, 200_000
    policy = GaussianMLPPolicy(1, 1, hidden=()).to(DT)
    params = {"mean_net.0.weight": torch.zeros(1, 1, dtype=DT), "mean_net.0.bias": torch.tensor([mu], dtype=DT),
              "log_std": torch.tensor([math.log(sigma)], dtype=DT)}
    noise = torch.randn(1, n, 1, 1, dtype=DT, generator=torch.Generator().manual_seed(0))
    [batch] = collect(policy, [params], _Bandit(), np.array([[c]]), rollouts=n, horizon=1, noise=noise,
                      reset_seeds=np.zeros((1, n), dtype=np.int64))
    process(batch, gamma=0.99, use_baseline=use_baseline, normalize=False)
    theta = {k: v.clone().requires_grad_() for k, v in params.items()}
    grads = torch.autograd.grad(-reinforce_loss(policy, theta, batch), tuple(theta.values()))
    estimate = {k: g for k, g in zip(theta, grads, strict=True)}

    exact_mu, exact_log_std = -2 * (mu - c), -2 * sigma ** 2
    a, adv = batch.actions[:, 0, 0], batch.advantages[:, 0]
    per_sample_mu = (a - mu) / sigma ** 2 * adv  # score function times advantage, per sample
    per_sample_ls = ((a - mu) ** 2 / sigma ** 2 - 1) * adv
    for est, exact, per in [(estimate["mean_net.0.bias"][0], exact_mu, per_sample_mu),
                            (estimate["log_std"][0], exact_log_std, per_sample_ls)]:
        assert torch.allclose(est, per.mean(), rtol=1e-9)  # the loss's gradient is the sample mean
        se = per.std() / math.sqrt(n)
        assert abs(est.item() - exact) < 4 * se.item(), (est.item(), exact, se.item())
    assert estimate["mean_net.0.weight"].abs().max() == 0  # the observation is always 0


def test_discounted_returns_and_linear_baseline() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=DT)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=DT)
    ret = discounted_returns(rewards, mask, 0.5)
    assert torch.allclose(ret[0], torch.tensor([1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0, 0.0], dtype=DT))
    assert torch.allclose(ret[1], torch.tensor([1.875, 1.75, 1.5, 1.0], dtype=DT))
    # Returns that are an exact linear function of the features are fitted exactly.
    gen = torch.Generator().manual_seed(0)
    obs = torch.randn(5, 7, 2, dtype=DT, generator=gen)
    t = torch.arange(7, dtype=DT) / 100
    target = 2 * obs[..., 0] - obs[..., 1] ** 2 + 3 * t - 1.5
    fitted = linear_baseline(obs, torch.ones(5, 7, dtype=DT), target, reg=1e-12)
    assert torch.allclose(fitted, target, atol=1e-6)


def test_conjugate_gradient_solves_a_random_spd_system() -> None:
    gen = torch.Generator().manual_seed(1)
    n = 30
    q = torch.randn(n, n, dtype=DT, generator=gen)
    a = q @ q.T + 0.5 * torch.eye(n, dtype=DT)
    b = torch.randn(n, dtype=DT, generator=gen)
    x = conjugate_gradient(lambda v: a @ v, b, iters=3 * n, residual_tol=1e-24)
    assert torch.linalg.norm(a @ x - b) < 1e-8 * torch.linalg.norm(b)
    # Well conditioned (eigenvalues in [1, 2]): the paper's 10 iterations are enough.
    u, _ = torch.linalg.qr(q)
    a2 = u @ torch.diag(torch.linspace(1, 2, n, dtype=DT)) @ u.T
    x2 = conjugate_gradient(lambda v: a2 @ v, b, iters=10)
    assert torch.linalg.norm(a2 @ x2 - b) < 1e-6 * torch.linalg.norm(b)


def test_line_search_respects_the_kl_bound_when_the_full_step_violates_it() -> None:
    """Surrogate g.x, KL 0.5 x^T F x + 50 |x|^4: the quadratic model puts the full step exactly on
    the bound, so the quartic term pushes its true KL over it; the search must backtrack."""
    gen = torch.Generator().manual_seed(2)
    n, max_kl = 6, 0.01
    q = torch.randn(n, n, dtype=DT, generator=gen)
    fisher = q @ q.T + torch.eye(n, dtype=DT)
    g = torch.randn(n, dtype=DT, generator=gen)
    x0 = torch.zeros(n, dtype=DT)

    def evaluate(x: torch.Tensor) -> tuple[float, float]:
        return (g @ x).item(), (0.5 * x @ fisher @ x + 50 * (x @ x) ** 2).item()

    result, _ = trpo_update(x0, g, lambda v: fisher @ v, evaluate, 0.0, max_kl=max_kl, cg_iters=n)
    full_step = torch.linalg.solve(fisher, g)
    full_step *= math.sqrt(2 * max_kl / (full_step @ fisher @ full_step))
    assert evaluate(x0 + full_step)[1] > max_kl  # the case is real
    assert result.accepted and result.backtracks >= 1
    assert result.kl <= max_kl and evaluate(result.x)[1] <= max_kl
    assert result.surrogate > 0
    # A direction that never improves the surrogate is rejected: the parameters stay put.
    rejected = backtracking_line_search(lambda x: (-(g @ x).item(), 0.0), x0, full_step, 0.0, max_kl=max_kl)
    assert not rejected.accepted and torch.equal(rejected.x, x0)


def _tiny_rollouts(steps: int):
    """Two nav2d tasks, 4 rollouts of 8 steps, a 2-6-2 policy: real, seeded, then frozen data."""
    family = Nav2DFamily()
    torch.manual_seed(3)
    policy = GaussianMLPPolicy(2, 2, hidden=(6,), init_log_std=-0.5).to(DT)
    with torch.no_grad():
        policy.mean_net[-1].weight.normal_(0, 0.5)  # a non-trivial mean so every term matters
    params = {n: p.detach() for n, p in policy.named_parameters()}
    tasks, rngs = sample_tasks(family, 0, "train", 0, range(2))
    rollouts = sample_adaptation(policy, params, family, tasks, rngs, rollouts=4, steps=steps, lr=0.3, horizon=8)
    return policy, params, rollouts


def _flat(xs) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in xs])


@pytest.mark.parametrize("steps", [1, 2])
def test_second_order_meta_gradient_matches_finite_differences(steps: int) -> None:
    policy, params, rollouts = _tiny_rollouts(steps)
    objective = MetaObjective(policy, params, rollouts, inner_lr=0.3)
    theta = {n: p.clone().requires_grad_() for n, p in params.items()}
    surrogate = sum(objective.task_terms(theta, i, create_graph=True)[0] for i in range(2)) / 2
    analytic = _flat(torch.autograd.grad(surrogate, tuple(theta.values())))

    x0 = _flat(params.values())
    eps = 1e-6

    def at(x: torch.Tensor) -> dict[str, torch.Tensor]:
        out, offset = {}, 0
        for n, p in params.items():
            out[n] = x[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        return out

    numeric = torch.zeros_like(x0)
    for j in range(len(x0)):
        e = torch.zeros_like(x0)
        e[j] = eps
        numeric[j] = (objective.evaluate(at(x0 + e))[0] - objective.evaluate(at(x0 - e))[0]) / (2 * eps)
    assert torch.allclose(analytic, numeric, rtol=1e-5, atol=1e-8), (analytic - numeric).abs().max()

    # First order drops the inner step's Jacobian: a different number, the gradient at theta'.
    fo = MetaObjective(policy, params, rollouts, inner_lr=0.3, first_order=True)
    theta = {n: p.clone().requires_grad_() for n, p in params.items()}
    first = _flat(torch.autograd.grad(sum(fo.task_terms(theta, i, create_graph=False)[0] for i in range(2)) / 2,
                                      tuple(theta.values())))
    assert not torch.allclose(first, analytic, rtol=1e-3)


def test_fisher_vector_product_through_the_inner_step_matches_finite_differences() -> None:
    """H v of the mean KL at theta_old (double backward through the inner step) against the
    central difference of its gradient along v."""
    policy, params, rollouts = _tiny_rollouts(1)
    objective = MetaObjective(policy, params, rollouts, inner_lr=0.3)

    def grad_kl(x: dict[str, torch.Tensor], create_graph: bool):
        kl = sum(objective.task_terms(x, i, create_graph=True)[1] for i in range(2)) / 2
        return torch.autograd.grad(kl, tuple(x.values()), create_graph=create_graph)

    theta = {n: p.clone().requires_grad_() for n, p in params.items()}
    g = _flat(grad_kl(theta, True))
    assert g.abs().max() < 1e-10  # the KL is minimal (zero) at the old policy
    v = torch.randn(g.numel(), dtype=DT, generator=torch.Generator().manual_seed(4))
    hv = _flat(torch.autograd.grad(g @ v, tuple(theta.values())))

    eps = 1e-5
    offsets = [p.numel() for p in params.values()]
    dv = dict(zip(params, torch.split(v, offsets), strict=True))
    plus = {n: (p + eps * dv[n].view_as(p)).requires_grad_() for n, p in params.items()}
    minus = {n: (p - eps * dv[n].view_as(p)).requires_grad_() for n, p in params.items()}
    numeric = (_flat(grad_kl(plus, False)) - _flat(grad_kl(minus, False))) / (2 * eps)
    assert torch.allclose(hv, numeric, rtol=1e-5, atol=1e-9)
    assert v @ hv > 0  # positive semi-definite along v


def test_gaussian_log_prob_and_kl_against_torch_distributions() -> None:
    gen = torch.Generator().manual_seed(5)
    m0, m1, a = (torch.randn(4, 3, dtype=DT, generator=gen) for _ in range(3))
    s0, s1 = (torch.randn(3, dtype=DT, generator=gen) * 0.3 for _ in range(2))
    d0 = torch.distributions.Normal(m0, s0.exp())
    d1 = torch.distributions.Normal(m1, s1.exp())
    assert torch.allclose(gaussian_log_prob(m0, s0, a), d0.log_prob(a).sum(-1))
    assert torch.allclose(gaussian_kl(m0, s0, m1, s1), torch.distributions.kl_divergence(d0, d1).sum(-1))


def test_batch_mean_return_counts_only_real_steps() -> None:
    b = Batch(torch.zeros(2, 3, 2), torch.zeros(2, 3, 2), torch.tensor([[-1.0, -1.0, 0.0], [-2.0, 0.0, 0.0]]),
              torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert b.mean_return() == -2.0 and b.env_steps() == 3

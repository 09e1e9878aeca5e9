"""A Gaussian MLP policy, used functionally so the inner loop can differentiate through it.

The paper's policy (Finn et al., 2017, section 5.3): two hidden layers of 100 ReLU units giving
the action mean, and a state-independent log standard deviation per action dimension. Parameters
travel as ``dict[name, Tensor]`` (like ``workers.inner``); ``distribution(policy, params, obs)``
runs the network with ``torch.func.functional_call`` and never touches the module's own tensors.

Example::

    policy = GaussianMLPPolicy(obs_dim=2, act_dim=2)
    params = {n: p.detach() for n, p in policy.named_parameters()}
    mean, log_std = distribution(policy, params, obs)          # (..., act_dim), (act_dim,)
    logp = gaussian_log_prob(mean, log_std, actions)           # (...,)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

from workers.inner import Params


class GaussianMLPPolicy(nn.Module):
    """obs (..., obs_dim) -> action mean (..., act_dim); ``log_std`` (act_dim,) is a parameter."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (100, 100),
                 init_log_std: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = obs_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        out = nn.Linear(width, act_dim)
        # A near-zero initial mean: the first policy is the exploration noise, not a random drift.
        with torch.no_grad():
            out.weight.mul_(0.01)
            out.bias.zero_()
        layers.append(out)
        self.mean_net = nn.Sequential(*layers)
        self.log_std = nn.Parameter(torch.full((act_dim,), float(init_log_std)))
        self.obs_dim, self.act_dim, self.hidden = obs_dim, act_dim, list(hidden)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.mean_net(obs)


def distribution(policy: nn.Module, params: Params, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (..., act_dim), log_std (act_dim,)) of the policy with ``params`` at ``obs``."""
    return functional_call(policy, params, (obs,)), params["log_std"]


def batched_mean(policy: nn.Module, stacked: Params, obs: torch.Tensor) -> torch.Tensor:
    """Each task its own parameters: ``stacked`` has a leading task dim M; obs (M, N, obs_dim)."""
    return vmap(lambda p, o: functional_call(policy, p, (o,)))(stacked, obs)  # (M, N, act_dim)


def gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log N(actions; mean, diag(exp(log_std))^2), summed over the action dim: (...,)."""
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def gaussian_kl(mean0: torch.Tensor, log_std0: torch.Tensor, mean1: torch.Tensor,
                log_std1: torch.Tensor) -> torch.Tensor:
    """KL(N0 || N1) for diagonal Gaussians, summed over the action dim: (...,)."""
    var0, var1 = torch.exp(2 * log_std0), torch.exp(2 * log_std1)
    return (log_std1 - log_std0 + (var0 + (mean0 - mean1).pow(2)) / (2 * var1) - 0.5).sum(-1)

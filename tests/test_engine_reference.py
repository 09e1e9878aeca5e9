"""The engine's maths against independent references, in float64.

References: the closed form of MAML for linear least squares, an explicit Hessian, central finite
differences, and plain ``torch.optim`` loops for first-order MAML and Reptile.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workers import meta_gradient
from workers.aggregator import mean
from workers.engine import shard_meta_gradient
from workers.inner import split_state
from workers.models import build_model
from workers.spec import ModelSpec
from workers.tasks.base import Task

DT = torch.float64


pytestmark = pytest.mark.usefixtures("float64_default")


def _regression_task(gen: torch.Generator, d: int = 3, n: int = 6) -> Task:
    xs, xq = torch.randn(n, d, generator=gen, dtype=DT), torch.randn(n + 2, d, generator=gen, dtype=DT)
    w = torch.randn(d, 1, generator=gen, dtype=DT)
    return Task(xs, xs @ w + 0.1, xq, xq @ w + 0.1)


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads.values()])


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_maml_linear_regression_closed_form(steps: int) -> None:
    """f(x) = x w, squared loss: g = prod_i (I - alpha H_A) grad L_B(w_k), H_A = 2/n X^T X constant."""
    gen = torch.Generator().manual_seed(steps)
    model = nn.Linear(3, 1, bias=False).to(DT)
    task = _regression_task(gen)
    alpha = 0.05
    grads, _ = meta_gradient(model, [task], algorithm="maml", inner_steps=steps, inner_lr=alpha, loss="mse")

    X, y, Xq, yq = task
    w = model.weight.detach().T.clone()  # (3, 1)
    n, nq = X.shape[0], Xq.shape[0]
    H = 2.0 / n * X.T @ X
    for _ in range(steps):
        w = w - alpha * (2.0 / n) * X.T @ (X @ w - y)
    grad_b = (2.0 / nq) * Xq.T @ (Xq @ w - yq)
    expected = torch.linalg.matrix_power(torch.eye(3, dtype=DT) - alpha * H, steps) @ grad_b
    torch.testing.assert_close(grads["weight"], expected.T, rtol=1e-12, atol=1e-12)


def _mlp_with_bn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.Tanh(),
                         nn.Linear(5, 3)).to(DT)


def _classification_task(gen: torch.Generator) -> Task:
    return Task(torch.randn(6, 2, generator=gen, dtype=DT), torch.tensor([0, 1, 2, 0, 1, 2]),
                torch.randn(9, 2, generator=gen, dtype=DT), torch.tensor([0, 1, 2] * 3))


def _objective(model: nn.Module, flat: torch.Tensor, task: Task, steps: int, alpha: float) -> torch.Tensor:
    """L_query(adapt(theta)) written from scratch with a parameter vector: the reference function."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]

    def unpack(v: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            out[n] = v[i:i + s.numel()].view(s)
            i += s.numel()
        return out

    def f(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, unpack(v), (x,))

    v = flat
    for _ in range(steps):
        g = torch.autograd.grad(F.cross_entropy(f(v, task.x_support), task.y_support), v, create_graph=True)[0]
        v = v - alpha * g
    return F.cross_entropy(f(v, task.x_query), task.y_query)


@pytest.mark.parametrize("steps", [1, 2])
def test_maml_matches_finite_differences_with_batchnorm(steps: int) -> None:
    model = _mlp_with_bn()
    task = _classification_task(torch.Generator().manual_seed(1))
    alpha = 0.3
    grads, _ = meta_gradient(model, [task], algorithm="maml", inner_steps=steps, inner_lr=alpha,
                             loss="cross_entropy")
    g = _flat(grads)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    eps = 1e-6
    fd = torch.empty_like(theta)
    with torch.enable_grad():
        for i in range(theta.numel()):
            e = torch.zeros_like(theta)
            e[i] = eps
            plus = _objective(model, (theta + e).requires_grad_(), task, steps, alpha).item()
            minus = _objective(model, (theta - e).requires_grad_(), task, steps, alpha).item()
            fd[i] = (plus - minus) / (2 * eps)
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-8)


def test_maml_one_step_matches_explicit_hessian() -> None:
    """g = (I - alpha H_A(theta)) grad L_B(theta'), with H_A built entry by entry."""
    model = _mlp_with_bn()
    task = _classification_task(torch.Generator().manual_seed(2))
    alpha = 0.3
    grads, _ = meta_gradient(model, [task], algorithm="maml", inner_steps=1, inner_lr=alpha, loss="cross_entropy")
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def support_loss(v: torch.Tensor) -> torch.Tensor:
        return _objective(model, v, Task(task.x_support, task.y_support, task.x_support, task.y_support), 0, 0.0)

    H = torch.autograd.functional.hessian(support_loss, theta)
    grad_a = torch.autograd.functional.jacobian(support_loss, theta)
    adapted = theta - alpha * grad_a

    def query_loss(v: torch.Tensor) -> torch.Tensor:
        return _objective(model, v, Task(task.x_query, task.y_query, task.x_query, task.y_query), 0, 0.0)

    grad_b = torch.autograd.functional.jacobian(query_loss, adapted)
    expected = (torch.eye(theta.numel(), dtype=DT) - alpha * H) @ grad_b
    torch.testing.assert_close(_flat(grads), expected, rtol=1e-10, atol=1e-12)


def test_first_order_maml_is_query_gradient_at_adapted_parameters() -> None:
    model = _mlp_with_bn()
    task = _classification_task(torch.Generator().manual_seed(3))
    grads, _ = meta_gradient(model, [task], algorithm="fomaml", inner_steps=3, inner_lr=0.2, loss="cross_entropy")

    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.2)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(ref(task.x_support), task.y_support).backward()
        opt.step()
    ref.zero_grad()
    F.cross_entropy(ref(task.x_query), task.y_query).backward()
    expected = {n: p.grad for n, p in ref.named_parameters()}
    for n in expected:
        torch.testing.assert_close(grads[n], expected[n], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_reptile_direction_is_phi_minus_adapted(optimizer: str) -> None:
    model = _mlp_with_bn()
    task = _classification_task(torch.Generator().manual_seed(4))
    lr = 0.05
    grads, _ = meta_gradient(model, [task], algorithm="reptile", inner_steps=4, inner_lr=lr, loss="cross_entropy",
                             inner_optimizer=optimizer)
    ref = copy.deepcopy(model)
    opt = (torch.optim.Adam(ref.parameters(), lr=lr, betas=(0.0, 0.999), eps=1e-8) if optimizer == "adam"
           else torch.optim.SGD(ref.parameters(), lr=lr))
    for _ in range(4):
        opt.zero_grad()
        F.cross_entropy(ref(task.x_support), task.y_support).backward()
        opt.step()
    for (n, p0), p1 in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(grads[n], p0.detach() - p1.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile"])
def test_shards_average_to_the_whole_batch(algorithm: str) -> None:
    model = _mlp_with_bn()
    gen = torch.Generator().manual_seed(5)
    tasks = [_classification_task(gen) for _ in range(7)]
    whole, whole_metrics = meta_gradient(model, tasks, algorithm=algorithm, inner_steps=2, inner_lr=0.1,
                                         loss="cross_entropy")
    params, buffers = split_state(model)
    kw = dict(algorithm=algorithm, inner_steps=2, inner_lr=0.1, loss="cross_entropy")
    shards = [shard_meta_gradient(model, params, buffers, tasks[s::3], **kw) for s in range(3)]
    split, split_metrics, count = mean(shards)
    assert count == 7
    for n in whole:
        torch.testing.assert_close(split[n], whole[n], rtol=0, atol=1e-10)
    for k in whole_metrics:
        assert split_metrics[k] == pytest.approx(whole_metrics[k], abs=1e-10)


def test_user_factory_module_with_buffers_is_untouched_and_deterministic() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(factory="user_models:make_model", kwargs={"width": 6}),
                        input_shape=(1,), output_dim=1, allowed_modules=["user_models"]).to(DT)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(6)
    tasks = [Task(torch.randn(5, 1, generator=gen), torch.randn(5, 1, generator=gen),
                  torch.randn(5, 1, generator=gen), torch.randn(5, 1, generator=gen)) for _ in range(3)]
    g1, m1 = meta_gradient(model, tasks, algorithm="maml", inner_steps=2, inner_lr=0.01, loss="mse")
    g2, m2 = meta_gradient(model, tasks, algorithm="maml", inner_steps=2, inner_lr=0.01, loss="mse")
    assert set(g1) == {n for n, _ in model.named_parameters()}
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} was modified by the engine"
    for n in g1:
        assert torch.equal(g1[n], g2[n])
    assert m1 == m2


def test_factory_outside_allow_list_is_refused() -> None:
    from workers.errors import ModelError
    with pytest.raises(ModelError, match="model.factory.*allow-list"):
        build_model(ModelSpec(factory="os.path:join"), input_shape=(1,), output_dim=1, allowed_modules=["mymodels"])


def test_unknown_algorithm_is_named() -> None:
    with pytest.raises(ValueError, match="algorithm: unknown algorithm 'mamll'"):
        meta_gradient(_mlp_with_bn(), [_classification_task(torch.Generator())], algorithm="mamll")

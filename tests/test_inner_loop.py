"""The shared inner loop (``workers.inner``) and the optional pre-adaptation pass, in float64.

One step rule serves every path: ``adapt_steps`` against plain ``torch.optim`` loops (SGD, Adam
with beta1 = 0, mini-batches), ``workers.evaluation.adapt`` against the same, and ``before=False``
against ``before=True`` on every path of the engine (the gradients must be bit-for-bit the same;
only the ``meta/*_before`` metrics go).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workers import meta_gradient
from workers.errors import NonFiniteLossError
from workers.evaluation import adapt
from workers.fast import maml_shard
from workers.inner import ADAM_BETAS, ADAM_EPS, Forward, InnerOptimizer, adapt_steps, minibatches, split_state
from workers.models import Conv4
from workers.tasks.base import Task

DT = torch.float64
BEFORE_KEYS = {"meta/loss_before", "meta/accuracy_before"}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.Tanh(),
                         nn.Linear(5, 3)).to(DT)


def _task(gen: torch.Generator, n: int = 6) -> Task:
    return Task(torch.randn(n, 2, generator=gen, dtype=DT), torch.arange(n) % 3,
                torch.randn(9, 2, generator=gen, dtype=DT), torch.arange(9) % 3)


def _torch_optim_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, optimizer: str, lr: float, steps: int,
                      batch_size: int | None) -> dict[str, torch.Tensor]:
    ref = copy.deepcopy(model)
    opt = (torch.optim.Adam(ref.parameters(), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS) if optimizer == "adam"
           else torch.optim.SGD(ref.parameters(), lr=lr))
    for idx in minibatches(x.shape[0], batch_size, steps):
        xb, yb = (x, y) if idx is None else (x[idx], y[idx])
        opt.zero_grad()
        F.cross_entropy(ref(xb), yb).backward()
        opt.step()
    return {n: p.detach() for n, p in ref.named_parameters()}


def test_minibatches_cycle_through_one_permutation() -> None:
    assert minibatches(5, None, 3) == [None] * 3
    assert minibatches(5, 9, 2) == [None] * 2
    batches = minibatches(5, 2, 5)  # 10 indices: every support example exactly twice
    assert all(b is not None and b.numel() == 2 for b in batches)
    assert torch.cat(batches).bincount(minlength=5).tolist() == [2] * 5  # type: ignore[arg-type]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("batch_size", [None, 4])
def test_adapt_steps_and_evaluation_adapt_match_torch_optim(optimizer: str, batch_size: int | None) -> None:
    model = _mlp()
    task = _task(torch.Generator().manual_seed(1))
    expected = _torch_optim_loop(model, task.x_support, task.y_support, optimizer=optimizer, lr=0.05, steps=5,
                                 batch_size=batch_size)
    params, buffers = split_state(model)
    got, before = adapt_steps(Forward(model, buffers), params, task.x_support, task.y_support, F.cross_entropy,
                              steps=5, optimizer=InnerOptimizer(optimizer, 0.05), batch_size=batch_size)
    adapted, loss_before, loss_after = adapt(model, params, buffers, task.x_support, task.y_support, steps=5,
                                             lr=0.05, loss="cross_entropy", optimizer=optimizer,
                                             batch_size=batch_size)
    for n in expected:
        torch.testing.assert_close(got[n].detach(), expected[n], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(adapted[n], expected[n], rtol=1e-12, atol=1e-14)
    full = F.cross_entropy(model(task.x_support), task.y_support).item()
    assert loss_before == pytest.approx(full, abs=1e-14)  # on all of x, mini-batches or not
    if batch_size is None:
        assert before == pytest.approx(full, abs=1e-14)
    assert loss_after < loss_before


def test_second_order_steps_stay_differentiable() -> None:
    model = _mlp()
    task = _task(torch.Generator().manual_seed(2))
    params, buffers = split_state(model)
    theta = {n: p.clone().requires_grad_() for n, p in params.items()}
    adapted, _ = adapt_steps(Forward(model, buffers), theta, task.x_support, task.y_support, F.cross_entropy,
                             steps=2, optimizer=InnerOptimizer("sgd", 0.3), create_graph=True)
    assert all(p.grad_fn is not None for p in adapted.values())
    first, _ = adapt_steps(Forward(model, buffers), theta, task.x_support, task.y_support, F.cross_entropy,
                           steps=2, optimizer=InnerOptimizer("sgd", 0.3))
    assert all(p.is_leaf and p.requires_grad for p in first.values())
    for n in adapted:
        assert torch.equal(adapted[n].detach(), first[n].detach())


def test_non_finite_inner_loss_is_named() -> None:
    model = _mlp()
    task = _task(torch.Generator().manual_seed(3))
    bad = Task(task.x_support.clone().fill_(float("nan")), *task[1:])
    for algorithm in ("maml", "reptile"):
        with pytest.raises(NonFiniteLossError, match="inner loss is nan at inner step 0"):
            meta_gradient(model, [bad], algorithm=algorithm, inner_steps=1, inner_lr=0.1)
    with pytest.raises(ValueError, match="optimizer: unknown inner optimizer 'rmsprop'"):
        InnerOptimizer("rmsprop", 0.1)  # type: ignore[arg-type]


def _conv4() -> nn.Module:
    torch.manual_seed(0)
    model = Conv4(1, 3, 6, 16).to(DT)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.normal_(0.0, 1.0)  # scales of both signs
    return model


def _image_tasks(count: int) -> list[Task]:
    gen = torch.Generator().manual_seed(4)
    return [Task(torch.randn(3, 1, 16, 16, generator=gen, dtype=DT), torch.arange(3),
                 torch.randn(6, 1, 16, 16, generator=gen, dtype=DT), torch.arange(3).repeat(2)) for _ in range(count)]


def _assert_before_only_drops_metrics(with_before: tuple, without: tuple) -> None:
    (g1, m1), (g2, m2) = with_before, without
    assert list(g1) == list(g2)
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n
    assert BEFORE_KEYS & set(m1) and not BEFORE_KEYS & set(m2)
    assert set(m1) - set(m2) == BEFORE_KEYS & set(m1)
    assert "inner/loss_before" in m2
    for k in m2:
        assert m1[k] == m2[k], k


@pytest.mark.parametrize("model_name", ["mlp", "conv4", "user"])
@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile"])
def test_before_false_drops_only_the_pre_adaptation_metrics(model_name: str, algorithm: str) -> None:
    """The public API on the batched path (mlp), the fused kernels (conv4) and the per-task loop (user)."""
    if model_name == "user":
        from user_models import make_model

        torch.manual_seed(0)
        model = make_model(width=4).to(DT)
        gen = torch.Generator().manual_seed(5)
        tasks = [Task(*(torch.randn(5, 1, generator=gen, dtype=DT) for _ in range(4))) for _ in range(2)]
        loss = "mse"
    else:
        model = _mlp() if model_name == "mlp" else _conv4()
        gen = torch.Generator().manual_seed(6)
        tasks = [_task(gen) for _ in range(3)] if model_name == "mlp" else _image_tasks(3)
        loss = "cross_entropy"
    kw = dict(algorithm=algorithm, inner_steps=2, inner_lr=0.1, loss=loss)
    with_before = meta_gradient(model, tasks, **kw)
    without = meta_gradient(model, tasks, before=False, **kw)
    _assert_before_only_drops_metrics(with_before, without)
    if loss == "mse":
        assert "meta/loss_before" in with_before[1] and "meta/accuracy_before" not in with_before[1]


@pytest.mark.parametrize("query", ["folded", "fused"])
@pytest.mark.parametrize("first_order", [False, True])
def test_before_false_on_both_batched_query_paths(query: str, first_order: bool) -> None:
    model = _conv4()
    params, buffers = split_state(model)
    tasks = _image_tasks(3)
    kw = dict(inner_steps=1, inner_lr=0.4, loss="cross_entropy", first_order=first_order, query=query)
    a = maml_shard(model, params, buffers, tasks, **kw)
    b = maml_shard(model, params, buffers, tasks, before=False, **kw)
    assert a is not None and b is not None and a.count == b.count == 3
    _assert_before_only_drops_metrics((a.grads, a.metrics), (b.grads, b.metrics))


@pytest.mark.parametrize("first_order", [False, True])
def test_before_false_on_the_per_task_paths(first_order: bool) -> None:
    """``task_meta_gradient``: MAML through the fused kernels (Conv4) and through autograd (the MLP)."""
    from workers.engine import task_meta_gradient

    for model, task in ((_conv4(), _image_tasks(1)[0]), (_mlp(), _task(torch.Generator().manual_seed(7)))):
        params, buffers = split_state(model)
        kw = dict(algorithm="fomaml" if first_order else "maml", inner_steps=2, inner_lr=0.2, loss="cross_entropy")
        _assert_before_only_drops_metrics(task_meta_gradient(model, params, buffers, task, **kw),
                                          task_meta_gradient(model, params, buffers, task, before=False, **kw))


def test_query_passes_on_task_threads_match_one_thread_and_restore_the_setting() -> None:
    """The fused query passes of a shard run one task per thread (``workers.fast.batched.each_task``)."""
    model = _conv4()
    params, buffers = split_state(model)
    tasks = _image_tasks(3)
    kw = dict(inner_steps=1, inner_lr=0.4, loss="cross_entropy", query="fused")
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        spread = maml_shard(model, params, buffers, tasks, **kw)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        single = maml_shard(model, params, buffers, tasks, **kw)
    finally:
        torch.set_num_threads(previous)
    assert spread is not None and single is not None
    for n in single.grads:
        torch.testing.assert_close(spread.grads[n], single.grads[n], rtol=0, atol=1e-12)

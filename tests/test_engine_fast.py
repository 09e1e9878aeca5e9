"""The fast MAML paths against the per-task autograd loop, in float64.

``workers.fast`` computes the same meta-gradients as ``workers.maml.maml_task_autograd`` with a
different schedule (tasks batched into grouped convolutions; hand-written query kernels on CPU;
BatchNorm/ReLU/max-pool reordered). Each test runs both and asks for agreement to 1e-10: second
and first order, one and two inner steps, BatchNorm with scales of both signs.
"""

import pytest
import torch
from torch import nn

from workers import meta_gradient
from workers.aggregator import GradientSum, mean
from workers.engine import shard_meta_gradient as engine_shard
from workers.errors import NonFiniteLossError
from workers.fast import fused_net, maml_shard, shard_meta_gradient
from workers.fast.plan import plan_of
from workers.inner import split_state
from workers.maml import maml_task, maml_task_autograd
from workers.models import MLP, Conv4
from workers.tasks.base import Task

DT = torch.float64
TOL = dict(rtol=0, atol=1e-10)


def _randomise_batchnorm(model: nn.Module) -> nn.Module:
    """BatchNorm scales of both signs (a trained network's are not all 1), shifts away from 0."""
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=m.weight.dtype))
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype))
    return model


def _conv4(in_channels: int = 1, ways: int = 3, filters: int = 6, image: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return _randomise_batchnorm(Conv4(in_channels, ways, filters, image).to(DT))


def _image_tasks(count: int, ways: int = 3, shots: int = 1, queries: int = 2, channels: int = 1,
                 image: int = 16, seed: int = 1) -> list[Task]:
    gen = torch.Generator().manual_seed(seed)

    def draw(n: int) -> torch.Tensor:
        return torch.randn(n, channels, image, image, generator=gen, dtype=DT)

    return [Task(draw(ways * shots), torch.arange(ways).repeat(shots), draw(ways * queries),
                 torch.arange(ways).repeat(queries)) for _ in range(count)]


def _per_task(model: nn.Module, tasks: list[Task], **kw) -> GradientSum:
    params, buffers = split_state(model)
    total = GradientSum()
    for t in tasks:
        total.add(*maml_task_autograd(model, params, buffers, t, **kw))
    return total


def _assert_same(got: GradientSum, ref: GradientSum) -> None:
    assert got.count == ref.count
    assert list(got.grads) == list(ref.grads)
    for n in ref.grads:
        torch.testing.assert_close(got.grads[n], ref.grads[n], **TOL, msg=n)
    assert set(got.metrics) == set(ref.metrics)
    for k in ref.metrics:
        assert got.metrics[k] == pytest.approx(ref.metrics[k], abs=1e-10), k


@pytest.mark.parametrize("query", ["folded", "fused"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
def test_batched_conv4_equals_per_task_loop(query: str, first_order: bool, steps: int) -> None:
    model = _conv4()
    tasks = _image_tasks(4)
    kw = dict(inner_steps=steps, inner_lr=0.4, loss="cross_entropy", first_order=first_order)
    params, buffers = split_state(model)
    got = maml_shard(model, params, buffers, tasks, query=query, **kw)
    assert got is not None
    _assert_same(got, _per_task(model, tasks, **kw))


@pytest.mark.parametrize("first_order", [False, True])
def test_per_task_fused_path_equals_autograd(first_order: bool) -> None:
    """maml_task itself takes the fused kernels on CPU for a Conv4."""
    model = _conv4()
    assert fused_net(model, torch.device("cpu")) is not None
    params, buffers = split_state(model)
    kw = dict(inner_steps=2, inner_lr=0.3, loss="cross_entropy", first_order=first_order)
    for task in _image_tasks(2):
        got = GradientSum()
        got.add(*maml_task(model, params, buffers, task, **kw))
        _assert_same(got, _per_task(model, [task], **kw))


@pytest.mark.parametrize("shape", [
    dict(channels=1, image=21, filters=5),  # odd sides: 21 -> 10 -> 5 -> 2 -> 1, max-pool drops a row
    dict(channels=3, image=16, filters=4),  # 27 input taps: the first conv still runs as patches
    dict(channels=4, image=16, filters=4),  # 36 taps: the first conv runs through conv2d
])
@pytest.mark.parametrize("query", ["folded", "fused"])
def test_batched_shapes(shape: dict, query: str) -> None:
    model = _conv4(shape["channels"], 3, shape["filters"], shape["image"])
    tasks = _image_tasks(3, shots=2, channels=shape["channels"], image=shape["image"])
    kw = dict(inner_steps=2, inner_lr=0.2, loss="cross_entropy", first_order=False)
    params, buffers = split_state(model)
    _assert_same(maml_shard(model, params, buffers, tasks, query=query, **kw), _per_task(model, tasks, **kw))


def test_ties_from_constant_backgrounds() -> None:
    """Omniglot-like images (a constant background, a few strokes) make exact max-pool ties."""
    model = _conv4()
    gen = torch.Generator().manual_seed(7)
    tasks = []
    for t in _image_tasks(3):
        xs, ys, xq, yq = t
        def strokes(x: torch.Tensor) -> torch.Tensor:  # 1 on the background, 0 on 10% of the pixels
            return (torch.rand(x.shape, generator=gen, dtype=DT) >= 0.1).to(DT)

        tasks.append(Task(strokes(xs), ys, strokes(xq), yq))
    kw = dict(inner_steps=1, inner_lr=0.4, loss="cross_entropy", first_order=False)
    params, buffers = split_state(model)
    ref = _per_task(model, tasks, **kw)
    for query in ("folded", "fused"):
        _assert_same(maml_shard(model, params, buffers, tasks, query=query, **kw), ref)


@pytest.mark.parametrize("first_order", [False, True])
def test_batched_mlp_with_batchnorm_and_tanh(first_order: bool) -> None:
    """The reference tests' model (Linear, BatchNorm1d, Tanh, Linear), tasks folded into columns."""
    torch.manual_seed(0)
    model = _randomise_batchnorm(nn.Sequential(nn.Linear(2, 5), nn.BatchNorm1d(5, track_running_stats=False),
                                               nn.Tanh(), nn.Linear(5, 3)).to(DT))
    gen = torch.Generator().manual_seed(1)
    tasks = [Task(torch.randn(6, 2, generator=gen, dtype=DT), torch.tensor([0, 1, 2, 0, 1, 2]),
                  torch.randn(9, 2, generator=gen, dtype=DT), torch.tensor([0, 1, 2] * 3)) for _ in range(5)]
    kw = dict(inner_steps=2, inner_lr=0.3, loss="cross_entropy", first_order=first_order)
    params, buffers = split_state(model)
    _assert_same(maml_shard(model, params, buffers, tasks, **kw), _per_task(model, tasks, **kw))


def test_batched_sinusoid_mlp_mse() -> None:
    torch.manual_seed(0)
    model = MLP(1, (16, 16), 1).to(DT)
    gen = torch.Generator().manual_seed(2)
    tasks = [Task(*(torch.randn(n, 1, generator=gen, dtype=DT) for n in (10, 10, 12, 12))) for _ in range(6)]
    kw = dict(inner_steps=3, inner_lr=0.01, loss="mse", first_order=False)
    params, buffers = split_state(model)
    _assert_same(maml_shard(model, params, buffers, tasks, **kw), _per_task(model, tasks, **kw))


def test_shard_function_matches_engine_and_public_api() -> None:
    model = _conv4()
    tasks = _image_tasks(5)
    params, buffers = split_state(model)
    kw = dict(algorithm="maml", inner_steps=1, inner_lr=0.4, loss="cross_entropy")
    fast = shard_meta_gradient(model, params, buffers, tasks, **kw, inner_optimizer="sgd", inner_batch_size=None)
    slow = engine_shard(model, params, buffers, tasks, **kw)
    _assert_same(fast, slow)
    grads, metrics = meta_gradient(model, [tuple(t) for t in tasks], **kw)
    fast_grads, fast_metrics, _ = mean([fast])
    for n in grads:
        torch.testing.assert_close(fast_grads[n], grads[n], **TOL)
    assert fast_metrics == pytest.approx(metrics, abs=1e-10)


def test_fast_paths_decline_what_they_do_not_know() -> None:
    from user_models import make_model

    user = make_model(width=4).to(DT)  # custom forward: no plan
    assert plan_of(user) is None
    params, buffers = split_state(user)
    reg = [Task(*(torch.randn(5, 1, dtype=DT) for _ in range(4)))]
    assert maml_shard(user, params, buffers, reg, inner_steps=1, inner_lr=0.1, loss="mse") is None

    model = _conv4()
    params, buffers = split_state(model)
    tasks = _image_tasks(2)
    odd = tasks[:1] + _image_tasks(1, queries=3)  # tasks of different shapes
    assert maml_shard(model, params, buffers, odd, inner_steps=1, inner_lr=0.1, loss="cross_entropy") is None
    assert shard_meta_gradient(model, params, buffers, tasks, algorithm="reptile", inner_steps=1, inner_lr=0.1,
                               loss="cross_entropy") is None

    hooked = _conv4()
    hooked.features[0].register_forward_hook(lambda *_: None)
    assert plan_of(hooked) is None
    running = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).eval()  # running statistics
    assert plan_of(running) is None
    assert plan_of(nn.Sequential(nn.Linear(2, 3), nn.Dropout(), nn.Linear(3, 2))) is None
    shared = nn.Linear(3, 3)
    assert plan_of(nn.Sequential(shared, nn.ReLU(), shared)) is None  # one module used twice


def test_non_finite_loss_is_named() -> None:
    model = _conv4()
    params, buffers = split_state(model)
    tasks = _image_tasks(2)
    bad = Task(tasks[1].x_support.clone().fill_(float("nan")), *tasks[1][1:])
    for query in ("folded", "fused"):
        with pytest.raises(NonFiniteLossError, match="task 1"):
            maml_shard(model, params, buffers, [tasks[0], bad], inner_steps=1, inner_lr=0.1,
                       loss="cross_entropy", query=query)


@pytest.mark.parametrize("shape", [dict(), dict(channels=3, image=20, ways=5, shots=2)])
def test_adaptation_with_fused_kernels_equals_autograd(shape: dict) -> None:
    """``workers.evaluation.adapt`` (service queries, meta-test) takes the hand-written kernels."""
    from workers.evaluation import adapt

    ways = shape.get("ways", 3)
    model = _conv4(in_channels=shape.get("channels", 1), ways=ways, image=shape.get("image", 16))
    params, buffers = split_state(model)
    task = _image_tasks(1, **shape)[0]
    kw = dict(steps=5, lr=0.3, loss="cross_entropy")
    fast, fast_before, fast_after = adapt(model, params, buffers, task.x_support, task.y_support, **kw)
    slow, slow_before, slow_after = adapt(model, params, buffers, task.x_support, task.y_support, fast=False, **kw)
    assert fused_net(model, torch.device("cpu")) is not None
    assert fast.keys() == slow.keys()
    for name in slow:
        torch.testing.assert_close(fast[name], slow[name], **TOL, msg=name)
    assert fast_before == pytest.approx(slow_before, abs=1e-12) and fast_after == pytest.approx(slow_after, abs=1e-12)
    assert fast_after < fast_before
    # The query predictions of the adapted model (batch statistics of the query), and one query alone.
    from workers.evaluation import predict
    from workers.inner import Forward

    for xq in (task.x_query, task.x_query[:1]):
        torch.testing.assert_close(predict(model, fast, buffers, xq), Forward(model, buffers)(slow, xq).detach(), **TOL)


def test_adaptation_of_other_models_keeps_autograd() -> None:
    from workers.evaluation import adapt

    torch.manual_seed(0)
    model = MLP(1, (8, 8), 1).to(DT)
    params, buffers = split_state(model)
    x = torch.linspace(-1, 1, 10, dtype=DT).view(-1, 1)
    adapted, before, after = adapt(model, params, buffers, x, x.sin(), steps=3, lr=0.1, loss="mse")
    assert fused_net(model, torch.device("cpu")) is None and after < before

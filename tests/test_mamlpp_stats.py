"""MAML++ per-step BatchNorm running statistics (``model.per_step_bn_stats``), in float64 against
references written here: a plain SGD inner loop whose BatchNorm inputs are captured by hooks and
reduced by hand, the averaging rule spelled out, and the normalisation written out layer by layer."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_mamlpp import bn_net
from torch import nn
from torch.func import functional_call

from workers.errors import ModelError
from workers.evaluation import adapt, meta_test, predict
from workers.inner import split_state
from workers.mamlpp import (
    BN_STATS_MOMENTUM,
    STATS_PREFIX,
    MetaOptions,
    attach,
    stats_buffers,
    task_meta_gradient,
    update_running_stats,
)
from workers.models import Conv4
from workers.spec import JobSpec
from workers.tasks.base import Task

DT = torch.float64
STEPS, ALPHA = 3, 0.3


pytestmark = pytest.mark.usefixtures("float64_default")


def _task(seed: int = 0) -> Task:
    gen = torch.Generator().manual_seed(seed)
    return Task(torch.randn(6, 2, generator=gen) * 2 + 1, torch.tensor([0, 1, 2, 0, 1, 2]),
                torch.randn(9, 2, generator=gen) * 2 + 1, torch.tensor([0, 1, 2] * 3))


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel (dim 1): the mean and the unbiased variance, by hand."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    mean = flat.sum(1) / flat.shape[1]
    return mean, ((flat - mean[:, None]) ** 2).sum(1) / (flat.shape[1] - 1)


def _reference_stats(net: nn.Module, task: Task, *, steps: int, lr: float, query_rows: set[int],
                     adapt_only: set[str] | None = None, layers: tuple[str, ...] = ("1",)) -> dict[str, torch.Tensor]:
    """Plain SGD on the support set with batch statistics; the input of each BatchNorm layer in the
    support pass at each step s < steps (row s) and in the query pass after s steps for s in
    ``query_rows`` (row s), each row the mean of its passes."""
    captured: dict[str, torch.Tensor] = {}
    handles = [net.get_submodule(layer).register_forward_pre_hook(
        lambda _m, args, layer=layer: captured.__setitem__(layer, args[0].detach())) for layer in layers]
    rows: dict[str, dict[int, list]] = {layer: {r: [] for r in range(steps + 1)} for layer in layers}
    fast = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}

    def forward(x: torch.Tensor, row: int | None) -> torch.Tensor:
        captured.clear()
        out = functional_call(net, fast, (x,))
        if row is not None:
            for layer in layers:
                rows[layer][row].append(_moments(captured[layer]))
        return out

    try:
        for s in range(steps + 1):
            if s in query_rows:
                forward(task.x_query, s)
            if s == steps:
                break
            loss = F.cross_entropy(forward(task.x_support, s), task.y_support)
            grads = torch.autograd.grad(loss, tuple(fast.values()))
            fast = {n: (p - lr * g if adapt_only is None or n in adapt_only else p).detach().requires_grad_()
                    for (n, p), g in zip(fast.items(), grads, strict=True)}
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for layer, by_row in rows.items():
        for i, kind in enumerate(("mean", "var")):
            out[f"{STATS_PREFIX}.{layer}.{kind}"] = torch.stack([torch.stack([mv[i] for mv in by_row[r]]).mean(0)
                                                                 for r in by_row])
    return out


@pytest.mark.parametrize("options, query_rows, adapt_only", [
    (dict(), {STEPS}, None),
    (dict(checkpoint=True), {STEPS}, None),
    (dict(msl_weights=(0.2, 0.3, 0.5)), {1, 2, 3}, None),
    (dict(checkpoint=True, msl_weights=(0.2, 0.0, 0.8)), {1, 3}, None),
    (dict(learn_lr="per_layer_per_step"), {STEPS}, None),
    (dict(adapt="head"), {STEPS}, {"3.weight", "3.bias"}),
    (dict(adapt="head", msl_weights=(0.2, 0.3, 0.5)), {1, 2, 3}, {"3.weight", "3.bias"}),
], ids=["plain", "checkpointed", "msl", "checkpointed-msl", "lslr", "anil", "anil-msl"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_each_task_reports_the_batch_statistics_of_every_step(options: dict, query_rows: set[int],
                                                             adapt_only: set[str] | None, first_order: bool) -> None:
    task = _task()
    reference = _reference_stats(bn_net(), task, steps=STEPS, lr=ALPHA, query_rows=query_rows, adapt_only=adapt_only)
    model = attach(bn_net(), steps=STEPS, lr=ALPHA, bn_stats=True, learn_lr=options.get("learn_lr", "none"),
                   adapt=options.get("adapt", "all"))
    params, buffers = split_state(model)
    meta = MetaOptions(steps=STEPS, lr=ALPHA, bn_stats=True, **options)
    grads, _ = task_meta_gradient(model, params, buffers, task, options=meta, loss="cross_entropy",
                                  first_order=first_order)
    assert {k for k in grads if k.startswith(STATS_PREFIX)} == set(reference)
    for k, v in reference.items():
        assert grads[k].shape == (STEPS + 1, 5)
        torch.testing.assert_close(grads[k], v, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("msl", [None, (0.2, 0.3, 0.5)], ids=["last", "msl"])
def test_anil_on_conv4_reports_the_statistics_of_its_once_computed_features(msl) -> None:
    """ANIL on Conv4 runs the body once per input (its features are kept for every step): each
    step's statistics are still reported, those of that one pass."""
    def conv4() -> nn.Module:
        torch.manual_seed(0)
        return Conv4(1, 3, 4, 16).to(DT)

    gen = torch.Generator().manual_seed(4)
    task = Task(torch.randn(3, 1, 16, 16, generator=gen), torch.arange(3), torch.randn(6, 1, 16, 16, generator=gen),
                torch.arange(3).repeat(2))
    layers = tuple(f"features.{i}.1" for i in range(4))
    reference = _reference_stats(conv4(), task, steps=STEPS, lr=ALPHA, query_rows={1, 2, 3} if msl else {STEPS},
                                 adapt_only={"head.weight", "head.bias"}, layers=layers)
    model = attach(conv4(), steps=STEPS, lr=ALPHA, bn_stats=True, adapt="head")
    for before in (True, False):  # the pre-adaptation metric pass fills the feature cache, unrecorded
        grads, _ = task_meta_gradient(model, *split_state(model), task, loss="cross_entropy", before=before,
                                      options=MetaOptions(steps=STEPS, lr=ALPHA, bn_stats=True, adapt="head",
                                                          msl_weights=msl))
        assert {k for k in grads if k.startswith(STATS_PREFIX)} == set(reference)
        for k, v in reference.items():
            torch.testing.assert_close(grads[k], v, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("options", [dict(), dict(checkpoint=True, msl_weights=(0.2, 0.3, 0.5)),
                                     dict(adapt="head"), dict(learn_lr="per_parameter")])
def test_recording_leaves_the_meta_gradient_unchanged(options: dict) -> None:
    """Meta-training normalises with batch statistics either way: the same gradients, bit for bit."""
    task = _task(3)
    plain = attach(bn_net(), steps=STEPS, lr=ALPHA, learn_lr=options.get("learn_lr", "none"),
                   adapt=options.get("adapt", "all"))
    with_stats = attach(bn_net(), steps=STEPS, lr=ALPHA, bn_stats=True, learn_lr=options.get("learn_lr", "none"),
                        adapt=options.get("adapt", "all"))
    expected, m1 = task_meta_gradient(plain, *split_state(plain), task, loss="cross_entropy",
                                      options=MetaOptions(steps=STEPS, lr=ALPHA, **options))
    got, m2 = task_meta_gradient(with_stats, *split_state(with_stats), task, loss="cross_entropy",
                                 options=MetaOptions(steps=STEPS, lr=ALPHA, bn_stats=True, **options))
    assert m1 == m2
    for k, g in expected.items():
        assert torch.equal(got[k], g), k


def test_running_statistics_average_then_decay() -> None:
    """A cumulative average over the first 1 / momentum iterations, then an exponential one."""
    model = attach(bn_net(), steps=2, lr=ALPHA, bn_stats=True)
    name = f"{STATS_PREFIX}.1.mean"
    assert set(stats_buffers(model)) == {name, f"{STATS_PREFIX}.1.var"}
    torch.testing.assert_close(model.get_buffer(name), torch.zeros(3, 5))
    torch.testing.assert_close(model.get_buffer(f"{STATS_PREFIX}.1.var"), torch.ones(3, 5))
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(3, 5, generator=gen) for _ in range(14)]
    warm = round(1 / BN_STATS_MOMENTUM)
    expected = torch.zeros(3, 5)
    for i, b in enumerate(batches):
        update_running_stats(model, {name: b, f"{STATS_PREFIX}.1.var": b.abs()})
        if i < warm:
            expected = torch.stack(batches[:i + 1]).mean(0)
        else:
            expected = (1 - BN_STATS_MOMENTUM) * expected + BN_STATS_MOMENTUM * b
        torch.testing.assert_close(model.get_buffer(name), expected, rtol=1e-12, atol=1e-14)
    assert int(model.get_buffer(f"{STATS_PREFIX}.updates")) == len(batches)


def _written_out(theta: dict[str, torch.Tensor], mean: torch.Tensor, var: torch.Tensor, x: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """_net's forward with the given normalisation statistics, by hand."""
    h = x @ theta["0.weight"].T + theta["0.bias"]
    h = (h - mean) / torch.sqrt(var + eps) * theta["1.weight"] + theta["1.bias"]
    return torch.tanh(h) @ theta["3.weight"].T + theta["3.bias"]


@pytest.mark.parametrize("steps", [0, 2, 5])
def test_predictions_use_their_steps_running_statistics_item_by_item(steps: int) -> None:
    """After k adaptation steps (with batch statistics on the support set, as in training), each
    query item is normalised with row min(k, S): alone or in a batch, the same output."""
    trained = 3
    model = attach(bn_net(), steps=trained, lr=ALPHA, bn_stats=True)
    gen = torch.Generator().manual_seed(2)
    model.get_buffer(f"{STATS_PREFIX}.1.mean").copy_(torch.randn(trained + 1, 5, generator=gen))
    model.get_buffer(f"{STATS_PREFIX}.1.var").copy_(torch.rand(trained + 1, 5, generator=gen) + 0.5)
    params, buffers = split_state(model)
    task = _task(1)
    meta = MetaOptions(steps=trained, lr=ALPHA, bn_stats=True)
    adapted, _, _ = adapt(model, params, buffers, task.x_support, task.y_support, steps=steps, lr=ALPHA,
                          loss="cross_entropy", meta=meta)
    # The same steps without the option (batch statistics throughout): the same weights.
    plain = bn_net()
    reference, _, _ = adapt(plain, *split_state(plain), task.x_support, task.y_support, steps=steps, lr=ALPHA,
                            loss="cross_entropy", fast=False)
    for k, v in reference.items():
        torch.testing.assert_close(adapted[k], v, rtol=1e-12, atol=1e-14)
    row = min(steps, trained)
    expected = _written_out(reference, buffers[f"{STATS_PREFIX}.1.mean"][row], buffers[f"{STATS_PREFIX}.1.var"][row],
                            task.x_query, model[1].eps)
    together = predict(model, adapted, buffers, task.x_query)
    torch.testing.assert_close(together, expected, rtol=1e-12, atol=1e-13)
    alone = torch.cat([predict(model, adapted, buffers, task.x_query[i:i + 1]) for i in range(len(task.x_query))])
    torch.testing.assert_close(alone, together, rtol=1e-12, atol=1e-13)
    # With batch statistics (the option off), an item's output depends on the rest of the batch.
    transductive = predict(plain, reference, {}, task.x_query)
    assert not torch.allclose(transductive[:1], predict(plain, reference, {}, task.x_query[:2])[:1])


def test_meta_test_normalises_before_and_after_with_the_running_statistics() -> None:
    """On a Conv4 (BatchNorm2d), the evaluation uses step 0's statistics before adapting and step
    k's after: shifting every row's mean shifts both losses; a row the steps do not reach does not."""
    from workers.tasks.base import TaskFamily

    class Family(TaskFamily):
        loss, input_shape, output_dim = "cross_entropy", (1, 16, 16), 3

        def sample(self, seed, iteration, index, split):
            gen = torch.Generator().manual_seed(index)
            return Task(torch.randn(3, 1, 16, 16, generator=gen), torch.arange(3),
                        torch.randn(6, 1, 16, 16, generator=gen), torch.arange(3).repeat(2))

    torch.manual_seed(0)
    model = attach(Conv4(1, 3, 4, 16).to(DT), steps=1, lr=0.1, bn_stats=True)
    meta = MetaOptions(steps=1, lr=0.1, bn_stats=True)

    def run(model: nn.Module) -> dict[str, float]:
        params, buffers = split_state(model)
        return meta_test(model, params, buffers, Family(), seed=0, num_tasks=2, steps=2, lr=0.1, meta=meta)

    base = run(model)
    for row, changes in [(0, ("eval/loss_before",)), (1, ("eval/loss",))]:
        shifted = copy.deepcopy(model)
        shifted.get_buffer(f"{STATS_PREFIX}.features.0.1.mean")[row] += 0.5
        out = run(shifted)
        for key in ("eval/loss_before", "eval/loss"):
            assert (out[key] != base[key]) == (key in changes), (row, key)


def test_models_without_batchnorm_or_with_other_layers_are_refused() -> None:
    with pytest.raises(ModelError) as err:
        attach(nn.Sequential(nn.Linear(2, 2)), steps=1, lr=0.1, bn_stats=True)
    assert err.value.field == "model.per_step_bn_stats"

    class Custom(nn.BatchNorm1d):
        pass

    with pytest.raises(ModelError, match="Custom"):
        attach(nn.Sequential(nn.Linear(2, 2), Custom(2)), steps=1, lr=0.1, bn_stats=True)
    for body in ({"model": {"name": "mlp", "per_step_bn_stats": True}},
                 {"algorithm": "reptile", "model": {"name": "conv4", "per_step_bn_stats": True},
                  "task": {"family": "omniglot"}}):
        with pytest.raises(ValueError, match="model.per_step_bn_stats"):
            JobSpec.model_validate(body)


def test_the_statistics_travel_with_the_weights() -> None:
    """They are buffers of the model: in its state dict (checkpoints, the export, the weights
    endpoint), loaded back by a model built from the same spec."""
    model = attach(bn_net(), steps=2, lr=ALPHA, bn_stats=True)
    update_running_stats(model, {f"{STATS_PREFIX}.1.mean": torch.full((3, 5), 2.0),
                                 f"{STATS_PREFIX}.1.var": torch.full((3, 5), 3.0)})
    state = model.state_dict()
    assert {f"{STATS_PREFIX}.1.mean", f"{STATS_PREFIX}.1.var", f"{STATS_PREFIX}.updates"} <= set(state)
    assert not any(k.endswith(("step_mean", "step_var")) for k in state)
    again = attach(bn_net(), steps=2, lr=ALPHA, bn_stats=True)
    again.load_state_dict(state, strict=True)
    assert torch.equal(again.get_buffer(f"{STATS_PREFIX}.1.var"), torch.full((3, 5), 3.0))


# ------------------------------------------------------------------ support-normalised query passes


def _written_out_support_objective(theta: dict[str, torch.Tensor], task: Task, *, steps: int, lr: float,
                                   weights: tuple[float, ...], first_order: bool, eps: float) -> torch.Tensor:
    """bn_net's meta-objective with every query pass normalised by the support set's batch statistics
    at the same parameters (mean, biased variance), written out by hand."""
    xs, ys, xq, yq = task

    def pre(p, x):
        return x @ p["0.weight"].T + p["0.bias"]

    def rest(p, h, mean, var):
        z = (h - mean) / torch.sqrt(var + eps) * p["1.weight"] + p["1.bias"]
        return torch.tanh(z) @ p["3.weight"].T + p["3.bias"]

    def support_pass(p):
        h = pre(p, xs)
        mean = h.mean(0)
        var = ((h - mean) ** 2).mean(0)
        return rest(p, h, mean, var), mean, var

    fast, total = dict(theta), torch.zeros(())
    for s in range(steps):
        out, _, _ = support_pass(fast)
        grads = torch.autograd.grad(F.cross_entropy(out, ys), tuple(fast.values()), create_graph=not first_order)
        fast = {n: p - lr * g for (n, p), g in zip(fast.items(), grads, strict=True)}
        if weights[s]:
            _, mean, var = support_pass(fast)
            total = total + weights[s] * F.cross_entropy(rest(fast, pre(fast, xq), mean, var), yq)
    return total


@pytest.mark.parametrize("options, first_order", [
    (dict(), False), (dict(), True), (dict(checkpoint=True), False), (dict(msl_weights=(0.2, 0.3, 0.5)), False),
    (dict(msl_weights=(0.2, 0.3, 0.5)), True), (dict(checkpoint=True, msl_weights=(0.2, 0.0, 0.8)), False),
], ids=["second", "first", "checkpointed", "msl-second", "msl-first", "checkpointed-msl"])
def test_support_normalised_queries_meta_gradient_matches_the_written_out_objective(options: dict,
                                                                                   first_order: bool) -> None:
    """The meta-gradient flows through the support statistics that normalise each query pass."""
    task = _task(6)
    model = attach(bn_net(), steps=STEPS, lr=ALPHA, query_bn="support")
    params, buffers = split_state(model)
    meta = MetaOptions(steps=STEPS, lr=ALPHA, query_bn="support", **options)
    grads, metrics = task_meta_gradient(model, params, buffers, task, options=meta, loss="cross_entropy",
                                        first_order=first_order)
    theta = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    objective = _written_out_support_objective(theta, task, steps=STEPS, lr=ALPHA, weights=meta.weights(),
                                               first_order=first_order, eps=model[1].eps)
    expected = dict(zip(theta, torch.autograd.grad(objective, tuple(theta.values())), strict=True))
    assert set(grads) == set(expected)
    for k, g in expected.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-10, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")
    # ... and the statistics are the point: with the query batch's own, the gradient differs.
    plain, _ = task_meta_gradient(model, params, buffers, task, loss="cross_entropy", first_order=first_order,
                                  options=MetaOptions(steps=STEPS, lr=ALPHA, **options))
    assert not torch.allclose(plain["0.weight"], grads["0.weight"])


@pytest.mark.parametrize("steps", [0, 2])
def test_support_normalised_predictions_are_per_item(steps: int) -> None:
    model = attach(bn_net(), steps=STEPS, lr=ALPHA, query_bn="support")
    params, buffers = split_state(model)
    task = _task(7)
    adapted, _, _ = adapt(model, params, buffers, task.x_support, task.y_support, steps=steps, lr=ALPHA,
                          loss="cross_entropy", meta=MetaOptions(steps=STEPS, lr=ALPHA, query_bn="support"))
    h = task.x_support @ adapted["0.weight"].T + adapted["0.bias"]
    mean, var = h.mean(0), h.var(0, unbiased=False)
    expected = _written_out(adapted, mean, var, task.x_query, model[1].eps)
    together = predict(model, adapted, buffers, task.x_query)
    torch.testing.assert_close(together, expected, rtol=1e-12, atol=1e-13)
    alone = torch.cat([predict(model, adapted, buffers, task.x_query[i:i + 1]) for i in range(len(task.x_query))])
    torch.testing.assert_close(alone, together, rtol=1e-12, atol=1e-13)


def test_anil_on_conv4_normalises_its_once_computed_query_features_by_the_support() -> None:
    """Conv4 takes ANIL's features-once path; the same network inside an nn.Sequential takes the
    general one: the same meta-gradient."""
    torch.manual_seed(0)
    conv4 = Conv4(1, 3, 4, 16).to(DT)
    wrapped = nn.Sequential(copy.deepcopy(conv4))
    gen = torch.Generator().manual_seed(8)
    task = Task(torch.randn(3, 1, 16, 16, generator=gen), torch.arange(3), torch.randn(6, 1, 16, 16, generator=gen),
                torch.arange(3).repeat(2))
    meta = MetaOptions(steps=2, lr=ALPHA, query_bn="support", adapt="head", msl_weights=(0.4, 0.6))
    results = []
    for model in (conv4, wrapped):
        attach(model, steps=2, lr=ALPHA, query_bn="support", adapt="head")
        grads, metrics = task_meta_gradient(model, *split_state(model), task, options=meta, loss="cross_entropy")
        results.append((grads, metrics))
    (cached, m1), (general, m2) = results
    assert m1 == pytest.approx(m2, rel=1e-12)
    for k, g in cached.items():
        torch.testing.assert_close(general[f"0.{k}"], g, rtol=1e-10, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")


def test_support_normalised_queries_are_refused_where_meaningless() -> None:
    for body, match in (({"model": {"name": "mlp", "query_bn": "support"}}, "model.query_bn"),
                        ({"model": {"name": "conv4", "query_bn": "support", "per_step_bn_stats": True},
                          "task": {"family": "omniglot"}}, "model.query_bn"),
                        ({"algorithm": "reptile", "model": {"name": "conv4", "query_bn": "support"},
                          "task": {"family": "omniglot"}}, "model.query_bn")):
        with pytest.raises(ValueError, match=match):
            JobSpec.model_validate(body)
    with pytest.raises(ModelError) as err:
        attach(nn.Sequential(nn.Linear(2, 2)), steps=1, lr=0.1, query_bn="support")
    assert err.value.field == "model.query_bn"

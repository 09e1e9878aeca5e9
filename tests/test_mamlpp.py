"""MAML++, Meta-SGD, ANIL and checkpointed inner loops (workers.mamlpp) against independent
references in float64: plain autograd loops written here from scratch, central finite differences,
and hand-written forward passes with explicit BatchNorm weights per step."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from workers.errors import ModelError
from workers.evaluation import adapt
from workers.inner import split_state
from workers.maml import maml_task_autograd
from workers.mamlpp import (
    BN_PREFIX,
    LR_PREFIX,
    MetaOptions,
    _checkpointed,
    _unrolled,
    attach,
    lr_factor,
    msl_weights,
    schedule,
    task_meta_gradient,
)
from workers.models import MLP, Conv4
from workers.run import Trainer
from workers.spec import JobSpec
from workers.supervised import ShardWorker
from workers.tasks.base import Task

DT = torch.float64


pytestmark = pytest.mark.usefixtures("float64_default")


def bn_net() -> nn.Module:
    """Linear, BatchNorm (batch statistics), tanh, Linear: 2 -> 5 -> 3, seeded, float64."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.Tanh(),
                         nn.Linear(5, 3)).to(DT)


def _task(seed: int = 0) -> Task:
    gen = torch.Generator().manual_seed(seed)
    return Task(torch.randn(6, 2, generator=gen, dtype=DT), torch.tensor([0, 1, 2, 0, 1, 2]),
                torch.randn(9, 2, generator=gen, dtype=DT), torch.tensor([0, 1, 2] * 3))


def _perturb(model: nn.Module, seed: int = 1, scale: float = 0.3) -> None:
    """Move every parameter (learned pieces included) off its initial value: no test passes by symmetry."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=DT) * scale
            p.add_(noise.abs() * 0.05 if name.startswith(LR_PREFIX) else noise)


def _reference(model: nn.Module, theta: dict[str, torch.Tensor], task: Task, *, steps: int,
               lrs, weights, adapted: list[str], bn_rows=None, first_order: bool = False) -> torch.Tensor:
    """sum_s w_s L_query(theta_s), by plain autograd: ``lrs(name, s)`` the step's learning rate,
    ``bn_rows(s)`` the BatchNorm parameters to use after s steps (or None)."""
    fast = {n: theta[n] for n in adapted}
    total = torch.zeros((), dtype=DT)

    def forward(p, s, x):
        full = {k: v for k, v in theta.items() if not k.startswith((LR_PREFIX, BN_PREFIX))}
        full.update(p)
        if bn_rows is not None:
            full.update(bn_rows(s))
        return functional_call(model, full, (x,))

    for s in range(steps):
        loss = F.cross_entropy(forward(fast, s, task.x_support), task.y_support)
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
        fast = {n: p - lrs(n, s) * g for (n, p), g in zip(fast.items(), grads, strict=True)}
        if weights[s]:
            total = total + weights[s] * F.cross_entropy(forward(fast, s + 1, task.x_query), task.y_query)
    return total


# ------------------------------------------------------------------------------- multi-step loss


def test_msl_weights_follow_maml_plus_plus() -> None:
    assert msl_weights(4, 0, 10) == pytest.approx((0.25,) * 4)
    w = msl_weights(4, 5, 10)
    assert w[:3] == pytest.approx((0.25 - 5 / 40,) * 3) and w[3] == pytest.approx(0.25 + 15 / 40)
    assert sum(w) == pytest.approx(1.0)
    late = msl_weights(4, 99, 100)  # past the floor: non-final 0.03 / S, the final 1 - 3 (0.03 / S)
    assert late[:3] == pytest.approx((0.03 / 4,) * 3) and late[3] == pytest.approx(1 - 3 * 0.03 / 4)
    assert msl_weights(4, 10, 10) is None  # from then on the last step's loss only


@pytest.mark.parametrize("checkpoint", [False, True])
def test_multi_step_loss_equals_weighted_sum_of_step_losses(checkpoint: bool) -> None:
    model = bn_net()
    params, buffers = split_state(model)
    task, steps, alpha = _task(), 3, 0.3
    weights = (0.2, 0.3, 0.5)
    options = MetaOptions(steps=steps, lr=alpha, msl_weights=weights, checkpoint=checkpoint)
    grads, metrics = task_meta_gradient(model, params, buffers, task, options=options, loss="cross_entropy")

    theta = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    total = _reference(model, theta, task, steps=steps, lrs=lambda n, s: alpha, weights=weights,
                       adapted=list(theta))
    expected = torch.autograd.grad(total, list(theta.values()))
    for (n, g), e in zip(grads.items(), expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-11, atol=1e-12, msg=n)
    # Without the multi-step loss the general loop is plain MAML: the existing per-task loop agrees.
    grads_last, _ = task_meta_gradient(model, params, buffers, task, loss="cross_entropy",
                                       options=MetaOptions(steps=steps, lr=alpha, checkpoint=checkpoint))
    plain, plain_metrics = maml_task_autograd(model, params, buffers, task, inner_steps=steps, inner_lr=alpha,
                                              loss="cross_entropy")
    for n in plain:
        torch.testing.assert_close(grads_last[n], plain[n], rtol=1e-11, atol=1e-12)
    assert metrics["meta/loss"] == pytest.approx(plain_metrics["meta/loss"], rel=1e-12)
    assert metrics["inner/loss_before"] == pytest.approx(plain_metrics["inner/loss_before"], rel=1e-12)


def test_public_meta_gradient_takes_the_options() -> None:
    from workers import meta_gradient

    model = attach(bn_net(), steps=2, lr=0.2, learn_lr="per_parameter")
    params, buffers = split_state(model)
    tasks = [_task(7), _task(8)]
    grads, metrics = meta_gradient(model, [tuple(t) for t in tasks], algorithm="maml", inner_steps=2, inner_lr=0.2,
                                   loss="cross_entropy", meta=MetaOptions(steps=2, lr=0.2, learn_lr="per_parameter"))
    each = [task_meta_gradient(model, params, buffers, t, options=MetaOptions(steps=2, lr=0.2,
                                                                             learn_lr="per_parameter"),
                               loss="cross_entropy")[0] for t in tasks]
    assert set(grads) == set(params)
    for n in params:
        torch.testing.assert_close(grads[n], (each[0][n] + each[1][n]) / 2, rtol=1e-12, atol=1e-14)


def test_first_order_general_loop_equals_fomaml() -> None:
    model = bn_net()
    params, buffers = split_state(model)
    task = _task(3)
    ours, _ = task_meta_gradient(model, params, buffers, task, options=MetaOptions(steps=2, lr=0.2, checkpoint=True),
                                 loss="cross_entropy", first_order=True)
    plain, _ = maml_task_autograd(model, params, buffers, task, inner_steps=2, inner_lr=0.2, loss="cross_entropy",
                                  first_order=True)
    for n in plain:
        torch.testing.assert_close(ours[n], plain[n], rtol=1e-12, atol=1e-13)


# ------------------------------------------------------------------------------- learned learning rates


def _objective(model: nn.Module, theta: dict[str, torch.Tensor], task: Task, steps: int, kind: str) -> torch.Tensor:
    def lrs(n, s):
        lr = theta[f"{LR_PREFIX}.{n}"]
        return lr[s] if kind == "per_layer_per_step" else lr

    adapted = [n for n in theta if not n.startswith(LR_PREFIX)]
    return _reference(model, theta, task, steps=steps, lrs=lrs, weights=(0.0,) * (steps - 1) + (1.0,),
                      adapted=adapted)


@pytest.mark.parametrize("kind", ["per_layer_per_step", "per_parameter"])
@pytest.mark.parametrize("first_order", [False, True])
def test_learned_lr_gradients_match_finite_differences(kind: str, first_order: bool) -> None:
    model = attach(bn_net(), steps=2, lr=0.2, learn_lr=kind)
    _perturb(model)
    params, buffers = split_state(model)
    lr_names = [n for n in params if n.startswith(LR_PREFIX)]
    assert len(lr_names) == 6  # one per parameter tensor of the model
    if kind == "per_layer_per_step":
        assert all(params[n].shape == (2,) for n in lr_names)
    else:
        assert all(params[n].shape == params[n[len(LR_PREFIX) + 1:]].shape for n in lr_names)
    task = _task(1)
    grads, _ = task_meta_gradient(model, params, buffers, task, loss="cross_entropy", first_order=first_order,
                                  options=MetaOptions(steps=2, lr=0.2, learn_lr=kind))
    if first_order:  # the reference: the inner gradients as constants
        theta = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
        adapted = [n for n in theta if not n.startswith(LR_PREFIX)]
        total = _reference(model, theta, task, steps=2, weights=(0.0, 1.0), adapted=adapted, first_order=True,
                           lrs=lambda n, s: (theta[f"{LR_PREFIX}.{n}"][s] if kind == "per_layer_per_step"
                                             else theta[f"{LR_PREFIX}.{n}"]))
        for n, e in zip(theta, torch.autograd.grad(total, list(theta.values())), strict=True):
            torch.testing.assert_close(grads[n], e, rtol=1e-11, atol=1e-12, msg=n)
        return
    gen = torch.Generator().manual_seed(0)
    eps = 1e-6
    checked = 0
    for name in lr_names + ["0.weight", "1.bias"]:
        flat = params[name].reshape(-1)
        for i in torch.randperm(flat.numel(), generator=gen)[:3].tolist():
            values = []
            for sign in (1, -1):
                theta = {n: p.detach().clone() for n, p in params.items()}
                theta[name].view(-1)[i] += sign * eps
                values.append(_objective(model, {n: p.requires_grad_() for n, p in theta.items()}, task, 2,
                                         kind).item())
            fd = (values[0] - values[1]) / (2 * eps)
            analytic = grads[name].reshape(-1)[i].item()
            assert analytic == pytest.approx(fd, rel=1e-6, abs=1e-9), (name, i)
            checked += 1
    assert checked >= 18


# ------------------------------------------------------------------------------- ANIL


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("features_once", [False, True])
def test_anil_equals_maml_with_body_inner_updates_masked(first_order: bool, features_once: bool) -> None:
    torch.manual_seed(0)
    # MLP: the body's features computed once per task (the fast ANIL); Sequential: full forwards.
    model = (MLP(2, (5, 4), 3) if features_once else bn_net()).to(DT)
    head = ("net.4." if features_once else "3.")
    params, buffers = split_state(model)
    task = _task(2)
    grads, metrics = task_meta_gradient(model, params, buffers, task, loss="cross_entropy", first_order=first_order,
                                        options=MetaOptions(steps=3, lr=0.4, adapt="head"))

    # Reference: plain MAML whose inner step zeroes the body's gradients.
    theta = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    fast = dict(theta)
    for _ in range(3):
        loss = F.cross_entropy(functional_call(model, fast, (task.x_support,)), task.y_support)
        g = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
        g = [gi if n.startswith(head) else torch.zeros_like(gi) for n, gi in zip(fast, g, strict=True)]
        fast = {n: p - 0.4 * gi for (n, p), gi in zip(fast.items(), g, strict=True)}
    out = functional_call(model, fast, (task.x_query,))
    expected = torch.autograd.grad(F.cross_entropy(out, task.y_query), list(theta.values()))
    for n, e in zip(theta, expected, strict=True):
        torch.testing.assert_close(grads[n], e, rtol=1e-11, atol=1e-12, msg=n)
    assert any(float(grads[n].abs().sum()) > 0 for n in theta if not n.startswith(head))  # the body learns
    assert metrics["meta/loss"] == pytest.approx(F.cross_entropy(out, task.y_query).item(), rel=1e-12)


# ------------------------------------------------------------------------------- checkpointing


def _tiny_conv4() -> nn.Module:
    torch.manual_seed(0)
    return Conv4(1, 3, filters=3, image_size=16).to(DT)


def _image_task(seed: int) -> Task:
    gen = torch.Generator().manual_seed(seed)
    return Task(torch.randn(3, 1, 16, 16, generator=gen, dtype=DT), torch.tensor([0, 1, 2]),
                torch.randn(6, 1, 16, 16, generator=gen, dtype=DT), torch.tensor([0, 1, 2, 0, 1, 2]))


@pytest.mark.parametrize("steps, options", [
    (6, dict()),
    (10, dict()),  # segments of ceil(sqrt(10)) = 4 steps: kept 0, 4, 8, 10; the rest recomputed
    (6, dict(learn_lr="per_layer_per_step", per_step_bn=True, msl_weights=(0.1, 0.1, 0.1, 0.1, 0.1, 0.5))),
    (6, dict(learn_lr="per_parameter")),
])
def test_checkpointed_gradients_equal_plain_second_order(steps: int, options: dict) -> None:
    model = attach(_tiny_conv4(), steps=steps, lr=0.1, learn_lr=options.get("learn_lr", "none"),
                   per_step_bn=options.get("per_step_bn", False))
    _perturb(model, scale=0.1)
    params, buffers = split_state(model)
    task = _image_task(0)
    plain = MetaOptions(steps=steps, lr=0.1, **options)
    ours, m1 = task_meta_gradient(model, params, buffers, task, options=MetaOptions(**{**plain.__dict__,
                                  "checkpoint": True}), loss="cross_entropy")
    ref, m2 = task_meta_gradient(model, params, buffers, task, options=plain, loss="cross_entropy")
    assert set(ours) == set(params)
    for n in params:
        torch.testing.assert_close(ours[n], ref[n], rtol=0, atol=1e-10, msg=n)
    assert m1 == pytest.approx(m2, rel=1e-12)
    if not options:  # and both equal the existing second-order MAML
        base, _ = maml_task_autograd(model, params, buffers, task, inner_steps=steps, inner_lr=0.1,
                                     loss="cross_entropy")
        for n in params:
            torch.testing.assert_close(ours[n], base[n], rtol=0, atol=1e-10, msg=n)


def test_checkpointed_schedule_keeps_one_step_graph() -> None:
    """The checkpointed forward keeps parameters, not graphs: nothing of step s is alive at step s + 1."""
    from workers.mamlpp import Unroll

    model = _tiny_conv4()
    params, buffers = split_state(model)
    unroll = Unroll(model, params, buffers, MetaOptions(steps=3, lr=0.1, checkpoint=True), "cross_entropy")
    grads, *_ = _checkpointed(unroll, _image_task(1), False)
    unroll2 = Unroll(model, params, buffers, MetaOptions(steps=3, lr=0.1), "cross_entropy")
    ref, *_ = _unrolled(unroll2, _image_task(1), False)
    for n in params:
        torch.testing.assert_close(grads[n], ref[n], rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------- per-step BatchNorm


def test_per_step_batchnorm_uses_each_steps_weights() -> None:
    """Explicit reference: y = W2 tanh(BN_s(W1 x + b1)) + b2, with BN_s's weight and bias those of
    step s (the model's own at s = 0, row s - 1 of bn_step after), not adapted by the inner loop."""
    steps, alpha = 3, 0.3
    model = attach(bn_net(), steps=steps, lr=alpha, learn_lr="per_layer_per_step", per_step_bn=True)
    _perturb(model, seed=4)
    params, buffers = split_state(model)
    assert params[f"{BN_PREFIX}.1.weight"].shape == (steps, 5)
    assert set(n for n in params if n.startswith(LR_PREFIX)) == {f"{LR_PREFIX}.{n}" for n in
                                                                 ("0.weight", "0.bias", "3.weight", "3.bias")}
    task = _task(5)
    grads, _ = task_meta_gradient(model, params, buffers, task, loss="cross_entropy",
                                  options=MetaOptions(steps=steps, lr=alpha, learn_lr="per_layer_per_step",
                                                      per_step_bn=True, msl_weights=(0.2, 0.3, 0.5)))
    theta = {n: p.detach().clone().requires_grad_() for n, p in params.items()}

    def net(p, s, x):
        gamma = theta["1.weight"] if s == 0 else theta[f"{BN_PREFIX}.1.weight"][s - 1]
        beta = theta["1.bias"] if s == 0 else theta[f"{BN_PREFIX}.1.bias"][s - 1]
        h = x @ p["0.weight"].T + p["0.bias"]
        mu, var = h.mean(0), h.var(0, unbiased=False)
        h = (h - mu) / torch.sqrt(var + 1e-5) * gamma + beta
        return torch.tanh(h) @ p["3.weight"].T + p["3.bias"]

    fast = {n: theta[n] for n in ("0.weight", "0.bias", "3.weight", "3.bias")}
    total = torch.zeros((), dtype=DT)
    for s, w in zip(range(steps), (0.2, 0.3, 0.5), strict=True):
        loss = F.cross_entropy(net(fast, s, task.x_support), task.y_support)
        g = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
        fast = {n: p - theta[f"{LR_PREFIX}.{n}"][s] * gi for (n, p), gi in zip(fast.items(), g, strict=True)}
        total = total + w * F.cross_entropy(net(fast, s + 1, task.x_query), task.y_query)
    expected = torch.autograd.grad(total, list(theta.values()))
    for n, e in zip(theta, expected, strict=True):
        torch.testing.assert_close(grads[n], e, rtol=1e-11, atol=1e-12, msg=n)
    assert float(grads[f"{BN_PREFIX}.1.weight"][steps - 1].abs().sum()) > 0  # the last row is used

    # Adaptation uses the same rows, and hands back the BatchNorm weights of the last step.
    meta = MetaOptions(steps=steps, lr=alpha, learn_lr="per_layer_per_step", per_step_bn=True)
    adapted, before, after = adapt(model, params, buffers, task.x_support, task.y_support, steps=2, lr=alpha,
                                   loss="cross_entropy", meta=meta)
    torch.testing.assert_close(adapted["1.weight"], params[f"{BN_PREFIX}.1.weight"][1])
    torch.testing.assert_close(functional_call(model, adapted, (task.x_query,)),
                               net({n: v for n, v in adapted.items()}, 2, task.x_query).detach())
    assert before == pytest.approx(F.cross_entropy(net(fast_initial(theta), 0, task.x_support),
                                                   task.y_support).item(), rel=1e-12)
    assert after < before


def fast_initial(theta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: theta[n].detach() for n in ("0.weight", "0.bias", "3.weight", "3.bias")}


def test_per_step_bn_needs_batchnorm() -> None:
    with pytest.raises(ModelError) as err:
        attach(MLP(1, (4,), 1), steps=2, lr=0.1, per_step_bn=True)
    assert err.value.field == "model.per_step_bn"


# ------------------------------------------------------------------------------- schedules and specs


def _spec(**overrides) -> JobSpec:
    base = {"name": "t", "dtype": "float64", "outer": {"iterations": 6, "meta_batch_size": 4},
            "eval": {"every": 6, "tasks": 2, "steps": 2}, "checkpoint": {"every": 3, "keep": 2},
            "inner": {"steps": 2, "lr": 0.05}}
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return JobSpec.model_validate(base)


def test_derivative_order_annealing_switches_at_the_iteration() -> None:
    spec = _spec(outer={"first_order_iterations": 3})
    assert [schedule(spec, it)[0] for it in range(5)] == ["fomaml"] * 3 + ["maml"] * 2
    assert schedule(_spec(), 0) == ("maml", None)


def test_derivative_order_annealing_in_training(tmp_path: Path) -> None:
    """Annealed for 2 iterations: the first 2 are FOMAML's, the third is not."""
    def run(name, iterations, **spec):
        outer = {"iterations": iterations, **spec.pop("outer", {})}
        t = Trainer(_spec(**spec, outer=outer), run_dir=tmp_path / name)
        t.run()
        return {k: v.detach().clone() for k, v in t.model.state_dict().items()}

    annealed2 = run("a2", 2, outer={"first_order_iterations": 2})
    fo2 = run("f2", 2, algorithm="fomaml")
    so2 = run("s2", 2)
    for k in fo2:
        torch.testing.assert_close(annealed2[k], fo2[k], rtol=1e-10, atol=1e-12)
    assert any(not torch.allclose(annealed2[k], so2[k]) for k in so2)
    annealed3, fo3 = run("a3", 3, outer={"first_order_iterations": 2}), run("f3", 3, algorithm="fomaml")
    assert any(not torch.allclose(annealed3[k], fo3[k], rtol=1e-8) for k in fo3)


def test_cosine_meta_learning_rate(tmp_path: Path) -> None:
    assert lr_factor("cosine", 0, 10, 0.1, 0.01) == pytest.approx(1.0)
    assert lr_factor("cosine", 5, 10, 0.1, 0.01) == pytest.approx((0.1 + 1.0) / 2)
    assert lr_factor("cosine", 10, 10, 0.1, 0.01) == pytest.approx(0.1)
    spec = _spec(outer={"lr_schedule": "cosine", "lr": 0.01, "lr_min": 0.001})
    result = Trainer(spec, run_dir=tmp_path / "c").run()
    seen = [m["meta/lr"] for _, m in result.history]
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=0.01)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6, eta_min=0.001)
    expected = []
    for _ in range(6):
        opt.step()
        ref.step()
        expected.append(opt.param_groups[0]["lr"])
    assert seen == pytest.approx(expected, rel=1e-12)
    # The older outer.anneal is the linear schedule, as before.
    assert _spec(outer={"anneal": True}).meta_lr_schedule == "linear"


@pytest.mark.parametrize("body, field", [
    ({"algorithm": "reptile", "inner": {"learn_lr": "per_parameter"}}, "inner.learn_lr"),
    ({"algorithm": "reptile", "inner": {"adapt": "head"}}, "inner.adapt"),
    ({"model": {"name": "mlp", "per_step_bn": True}}, "model.per_step_bn"),
    ({"algorithm": "fomaml", "inner": {"checkpoint": True}}, "inner.checkpoint"),
    ({"inner": {"checkpoint": True, "adapt": "head"}}, "inner.checkpoint"),
    ({"algorithm": "fomaml", "outer": {"first_order_iterations": 5}}, "outer.first_order_iterations"),
    ({"outer": {"anneal": True, "lr_schedule": "cosine"}}, "outer.lr_schedule"),
    ({"outer": {"lr_min": 0.0001}}, "outer.lr_min"),
    ({"task": {"family": "nav2d"}, "outer": {"multi_step_loss": True}}, "outer.multi_step_loss"),
])
def test_meaningless_combinations_are_refused_naming_the_field(body: dict, field: str) -> None:
    with pytest.raises(ValueError) as err:
        JobSpec.model_validate(body)
    assert field in str(err.value)


def test_old_specs_validate_and_keep_their_behaviour() -> None:
    old = {"name": "old", "algorithm": "maml", "inner": {"steps": 1, "lr": 0.01, "optimizer": "sgd"},
           "outer": {"optimizer": "adam", "lr": 0.001, "meta_batch_size": 25, "iterations": 10, "anneal": False},
           "model": {"name": "mlp", "hidden": [40, 40]}}
    spec = JobSpec.model_validate(old)
    assert not spec.meta_options_used and spec.meta_lr_schedule == "constant"
    assert schedule(spec, 0) == ("maml", None)
    family_model = attach(MLP(), steps=1, lr=0.01)  # no option: no extra parameter
    assert [n for n, _ in family_model.named_parameters()] == [n for n, _ in MLP().named_parameters()]


def test_sweeps_can_vary_each_option() -> None:
    from pydantic import ValidationError

    from workers.sweep_spec import SweepSpec, apply_config

    space = {"inner.learn_lr": {"grid": ["none", "per_layer_per_step", "per_parameter"]},
             "inner.adapt": {"grid": ["all", "head"]}, "outer.multi_step_loss": {"grid": [False, True]},
             "outer.first_order_iterations": {"grid": [0, 2]},
             "outer.lr_schedule": {"grid": ["constant", "cosine"]}, "inner.checkpoint": {"grid": [False, True]}}
    body = {"name": "ablation", "base": {"model": {"name": "mlp"}, "outer": {"iterations": 5}}, "space": space,
            "metric": "eval/loss", "mode": "min"}
    sweep = SweepSpec.model_validate(body)
    trial = apply_config(sweep.base, {"inner.learn_lr": "per_parameter", "inner.adapt": "head",
                                      "outer.lr_schedule": "cosine"})
    assert (trial.inner.learn_lr, trial.inner.adapt, trial.meta_lr_schedule) == ("per_parameter", "head", "cosine")
    with pytest.raises(ValidationError, match="inner.learn_lr"):  # a value no trial could run is refused
        SweepSpec.model_validate({**body, "base": {**body["base"], "algorithm": "reptile"},
                                  "space": {"inner.learn_lr": space["inner.learn_lr"]}})
    # The BatchNorm options, on a model with BatchNorm.
    bn_space = {"model.per_step_bn": {"grid": [False, True]}, "model.per_step_bn_stats": {"grid": [False, True]}}
    bn_sweep = SweepSpec.model_validate({**body, "base": {"model": {"name": "conv4"}, "task": {"family": "omniglot"}},
                                         "space": bn_space})
    trial = apply_config(bn_sweep.base, {"model.per_step_bn": True, "model.per_step_bn_stats": True})
    assert trial.model.per_step_bn and trial.model.per_step_bn_stats and trial.meta_options_used
    with pytest.raises(ValidationError, match="model.per_step_bn_stats"):  # the mlp has no BatchNorm
        SweepSpec.model_validate({**body, "space": {"model.per_step_bn_stats": bn_space["model.per_step_bn_stats"]}})


# ------------------------------------------------------------------------------- training, shards, resume


MAMLPP = {"inner": {"steps": 2, "lr": 0.05, "learn_lr": "per_layer_per_step", "checkpoint": True},
          "outer": {"multi_step_loss": True, "msl_anneal_iterations": 4, "first_order_iterations": 2,
                    "lr_schedule": "cosine", "iterations": 6, "meta_batch_size": 4},
          "model": {"factory": "user_models:make_model", "kwargs": {"width": 6}, "per_step_bn": True,
                    "per_step_bn_stats": True}}
ANIL = {"inner": {"steps": 2, "lr": 0.05, "adapt": "head"}, "outer": {"iterations": 6, "meta_batch_size": 4}}
METASGD = {"inner": {"steps": 2, "lr": 0.05, "learn_lr": "per_parameter"}, "outer": {"iterations": 6,
                                                                                      "meta_batch_size": 4}}


@pytest.mark.parametrize("overrides", [MAMLPP, ANIL, METASGD], ids=["mamlpp", "anil", "metasgd"])
def test_shards_sum_to_the_whole_meta_batch(overrides: dict) -> None:
    """One worker's meta-gradient equals the sum of three workers' shards (each a pure function)."""
    spec = _spec(**overrides)
    one = ShardWorker(spec, 0, 1, allowed_modules=["user_models"])
    state = split_state(one.model)
    if "user_models" in str(overrides):
        assert any(n.startswith(BN_PREFIX) for n in state[0])
    for iteration in (0, 3):  # first order and MSL-weighted, then second order
        whole, _, count = one.compute(state, iteration)
        parts = [ShardWorker(spec, r, 3, allowed_modules=["user_models"]).compute(state, iteration) for r in range(3)]
        assert count == sum(p[2] for p in parts) == 4
        torch.testing.assert_close(whole, sum(p[0] for p in parts), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("overrides", [MAMLPP, METASGD], ids=["mamlpp", "metasgd"])
def test_resume_with_learned_pieces_is_exact(tmp_path: Path, overrides: dict) -> None:
    spec = _spec(**overrides)
    straight = Trainer(spec, run_dir=tmp_path / "a", allowed_modules=["user_models"])
    result = straight.run()
    stops = iter([False] * 4 + [True])
    first = Trainer(spec, run_dir=tmp_path / "b", should_stop=lambda: next(stops), allowed_modules=["user_models"])
    assert first.run().iteration == 4
    resumed = Trainer(spec, run_dir=tmp_path / "b", allowed_modules=["user_models"])
    assert resumed.iteration == 4
    resumed.run()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert any(k.startswith(LR_PREFIX) for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lrs = {k: v for k, v in a.items() if k.startswith(LR_PREFIX)}
    assert any(not torch.allclose(v, torch.full_like(v, 0.05)) for v in lrs.values())  # they were learned
    if spec.model.per_step_bn_stats:  # averaged over every iteration, the resumed run's too
        assert int(a["bn_stats.updates"]) == spec.outer.iterations
        assert not torch.allclose(a["bn_stats.bn.mean"], torch.zeros_like(a["bn_stats.bn.mean"]))
    from safetensors.torch import load_file

    exported = load_file(str(result.model_dir / "model.safetensors"))
    assert set(exported) == set(a)
    assert math.isfinite(result.eval_metrics["eval/loss"])

"""MAML and first-order MAML for a whole shard of tasks at once: the batched-tasks path.

The maths is that of ``workers.maml.maml_task``, task by task; only the schedule differs:

* Inner loop, all tasks together: per-task parameter copies ``(B, *shape)``, tasks folded into
  channels (``workers.fast.folded``), ordinary autograd with ``create_graph`` for second order.
  The support sets are small (5 images for 5-way 1-shot), so one pass for the shard instead of
  one per task removes most of the per-op overhead there.
* Query pass, one of two ways (``query=``):
  - ``"folded"``: the same folded network on the query sets, autograd through everything. One
    kernel launch per layer for the whole shard: the path for GPUs, where per-task loops are
    launch-bound.
  - ``"fused"``: per task, the hand-written forward and backward of ``workers.fast.fused``
    (conv/BatchNorm/ReLU/max-pool blocks and a linear head only), whole tasks spread over the
    intra-op threads (``each_task``). The gradient at each task's
    adapted parameters is then pushed back through the inner loop by autograd:
    ``autograd.grad(adapted, theta, grad_outputs=query_grads)`` = sum_b (I - alpha H_b) g_b for one
    step. Fastest on CPU, where large query activations make memory passes the cost.
  ``"auto"`` takes ``"folded"`` on CUDA and ``"fused"`` on CPU when the model has that form.

``maml_shard`` returns ``None`` when no batched path applies (a model whose ``forward`` the plan
does not know, tasks of different shapes): the caller then runs the per-task loop, which works
for any ``nn.Module``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, TypeVar

import torch
from torch import nn

import workers.fast.folded as folded
import workers.fast.fused as fused
from workers.aggregator import GradientSum
from workers.fast.plan import Plan, plan_of
from workers.inner import InnerOptimizer, Params, check_finite
from workers.tasks.base import LossName, Task

QueryPath = Literal["auto", "fused", "folded"]
T = TypeVar("T")
METRIC_ORDER = ("inner/loss_before", "meta/loss_before", "meta/loss", "meta/accuracy_before", "meta/accuracy")


def _stack(tasks: Sequence[Task]) -> Task | None:
    """The tasks as one Task of ``(B, ...)`` tensors, or None if their shapes or dtypes differ."""
    first = tasks[0]
    for t in tasks[1:]:
        for a, b in zip(t, first, strict=True):
            if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
                return None
    return Task(*(torch.stack(list(parts)) for parts in zip(*tasks, strict=True)))


def _targets_fit(plan: Plan, task: Task, loss: LossName) -> bool:
    """Per-task targets of the shape the model's output takes, as the folded losses assume."""
    out = plan.out_features
    if out is None:
        return False
    for x, y in ((task.x_support, task.y_support), (task.x_query, task.y_query)):
        n = x.shape[1]
        if loss == "cross_entropy":
            if y.shape != (x.shape[0], n) or y.dtype != torch.int64:
                return False
        elif y.shape != (x.shape[0], n, out):
            return False
    return True


def fused_net(model: nn.Module, device: torch.device) -> fused.FusedNet | None:
    """The hand-written CPU query path for ``model``, if its form allows one."""
    if device.type != "cpu":
        return None
    plan = plan_of(model)
    return None if plan is None else fused.FusedNet.of(plan)


def each_task(fn: Callable[[int], T], count: int) -> list[T]:
    """``[fn(b) for b in range(count)]``, the tasks spread over the intra-op threads.

    The per-task query passes are many small and medium operations, which split poorly across
    threads (their per-task weights differ, so they cannot be merged into larger ones). Whole tasks
    on ``torch.get_num_threads()`` threads, each running its operations on one thread, keep every
    core busy instead (and each task's result does not depend on which thread computed it).
    """
    threads = torch.get_num_threads()
    if min(threads, count) <= 1:
        return [fn(b) for b in range(count)]
    try:
        with ThreadPoolExecutor(min(threads, count), initializer=torch.set_num_threads, initargs=(1,)) as pool:
            return list(pool.map(fn, range(count)))
    finally:
        # The setting is per thread for OpenMP, but process-wide for some BLAS builds: restore it.
        torch.set_num_threads(threads)


def maml_shard(
    model: nn.Module,
    params: Params,
    buffers: Params,
    tasks: Sequence[Task],
    *,
    inner_steps: int,
    inner_lr: float,
    loss: LossName,
    first_order: bool = False,
    query: QueryPath = "auto",
    before: bool = True,
) -> GradientSum | None:
    """The summed meta-gradients and metrics of ``tasks`` (a ``GradientSum`` of ``len(tasks)`` tasks).

    Equal, up to floating-point summation order, to adding ``maml_task`` of every task. ``buffers``
    are not read: the plans accepted here hold none but BatchNorm running statistics, which
    batch-statistics BatchNorm does not use. Returns None when no batched path applies.
    ``before=False`` skips the query pass at the meta-parameters (no ``meta/*_before`` metrics).
    """
    del buffers
    plan = plan_of(model)
    if plan is None or not tasks or inner_steps < 1:
        return None
    batch = _stack(tasks)
    if batch is None or not _targets_fit(plan, batch, loss):
        return None
    device = batch.x_query.device
    net = fused.FusedNet.of(plan)
    if query not in ("auto", "fused", "folded"):
        raise ValueError(f"query: unknown path '{query}' (expected auto, fused or folded)")
    if query == "auto":
        query = "fused" if device.type == "cpu" and net is not None else "folded"
    if query == "fused" and net is None:
        raise ValueError("query: the fused path needs [conv, BatchNorm, ReLU, 2x2 max-pool] blocks and a linear head")
    B = len(tasks)
    classification = loss == "cross_entropy"

    theta = {n: params[n].detach().requires_grad_() for n in plan.param_names}
    qnet = net if query == "fused" else None  # the hand-written query kernels, if they run
    # each task's query inputs as the first block takes them: prepared once when both query passes run
    xq: list[fused.Prepared] | None = None
    sums: dict[str, torch.Tensor] = {}
    if before:
        with torch.no_grad():  # the "before" metrics, at the meta-parameters
            if qnet is not None:
                def run_before(b: int) -> tuple[fused.Prepared, tuple]:
                    x = fused.prepare(qnet, theta, batch.x_query[b])
                    return x, fused.run(qnet, theta, x, batch.y_query[b], loss, grad=False)

                pairs = each_task(run_before, B)
                xq, runs_before = [x for x, _ in pairs], [r for _, r in pairs]
                sums["meta/loss_before"] = torch.stack([v for v, _, _ in runs_before])
                if classification:
                    sums["meta/accuracy_before"] = torch.stack([a for _, a, _ in runs_before if a is not None])
            else:
                out = folded.forward(plan, folded.expand_params(theta, B), batch.x_query)
                sums["meta/loss_before"] = folded.task_losses(out, batch.y_query, loss)
                if classification:
                    sums["meta/accuracy_before"] = folded.task_accuracies(out, batch.y_query)

    # Inner loop, every task at once: (B, *shape) parameters, starting from theta for all; the
    # step rule is the per-task loop's (workers.inner.InnerOptimizer), on (B,) losses.
    opt = InnerOptimizer("sgd", inner_lr)
    state = opt.init(theta)
    adapted = folded.expand_params(theta, B)
    for _ in range(inner_steps):
        losses = folded.task_losses(folded.forward(plan, adapted, batch.x_support), batch.y_support, loss)
        # (a bias that BatchNorm cancels may be unused: its gradient is zero)
        grads = torch.autograd.grad(losses.sum(), tuple(adapted.values()), create_graph=not first_order,
                                    allow_unused=True, materialize_grads=True)
        with torch.set_grad_enabled(not first_order):
            adapted, state = opt.step(state, adapted, grads, losses)
        if first_order:
            adapted = {n: p.requires_grad_() for n, p in adapted.items()}
    assert state.loss_before is not None
    sums["inner/loss_before"] = state.loss_before

    if qnet is not None:
        ends = {n: v.detach() for n, v in adapted.items()}  # (B, *shape), outside the inner loop's graph

        def run_after(b: int) -> tuple:
            p = {n: v[b] for n, v in ends.items()}
            x = xq[b] if xq is not None else fused.prepare(qnet, p, batch.x_query[b])
            return fused.run(qnet, p, x, batch.y_query[b], loss, grad=True)

        runs = each_task(run_after, B)
        del xq
        q_loss = torch.stack([v for v, _, _ in runs])
        check_finite(q_loss, "query loss", "after adaptation")
        q_acc = torch.stack([a for _, a, _ in runs if a is not None]) if classification else None
        q_grads = {n: torch.stack([g[n] for _, _, g in runs if g is not None]) for n in plan.param_names}
        del runs
        if first_order:
            meta = [q_grads[n].sum(0) for n in plan.param_names]
        else:  # sum_b (d adapted_b / d theta)^T q_grads_b, through the inner loop's graph
            meta = list(torch.autograd.grad(tuple(adapted.values()), tuple(theta.values()),
                                            tuple(q_grads[n] for n in adapted)))
    else:
        out = folded.forward(plan, adapted, batch.x_query)
        q_loss_t = folded.task_losses(out, batch.y_query, loss)
        q_loss = q_loss_t.detach()
        check_finite(q_loss, "query loss", "after adaptation")
        q_acc = folded.task_accuracies(out.detach(), batch.y_query) if classification else None
        if first_order:
            meta = [g.sum(0) for g in torch.autograd.grad(q_loss_t.sum(), tuple(adapted.values()),
                                                          allow_unused=True, materialize_grads=True)]
        else:
            meta = list(torch.autograd.grad(q_loss_t.sum(), tuple(theta.values()), allow_unused=True,
                                            materialize_grads=True))

    total = GradientSum()
    total.grads = {n: g.detach() for n, g in zip(plan.param_names, meta, strict=True)}
    sums["meta/loss"] = q_loss
    if classification:
        sums["meta/accuracy"] = q_acc  # type: ignore[assignment]
    sums = {k: sums[k] for k in METRIC_ORDER if k in sums}  # the per-task loop's order
    # float64 sums of the per-task float values, as GradientSum.add would accumulate them
    total.metrics = {k: float(v.detach().double().sum()) for k, v in sums.items()}
    total.count = B
    return total

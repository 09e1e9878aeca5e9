"""MAML++, Meta-SGD and ANIL: the options of the general per-task MAML inner loop.

* MAML++ (Antoniou, Edwards and Storkey, "How to train your MAML", ICLR 2019), each technique an
  option of its own: the multi-step loss (the query loss after every inner step, weighted by an
  importance vector annealed towards the last step, ``msl_weights``), per-layer per-step learned
  inner learning rates (LSLR), per-step BatchNorm weights and biases, derivative-order annealing
  (``schedule``: first order for the first iterations) and cosine annealing of the meta learning
  rate (``lr_factor``).
* Meta-SGD (Li, Zhou, Chen and Li, 2017): a learned inner learning rate per weight.
* ANIL (Raghu, Raghu, Bengio and Vinyals, ICLR 2020): the inner loop adapts the head (the last
  ``nn.Linear``) only; the body is meta-learned but frozen inside the loop. On Conv4 and the MLP
  the body's features are computed once per task and set, not at every step.
* Gradient checkpointing through the inner loop (``checkpoint``): the forward pass keeps only the
  adapted parameters of every sqrt(S)-th step; the backward pass recomputes one step at a time and
  pushes the gradient through it (a vector-Jacobian product), so memory holds one step's graph, not all.

The learned pieces are parameters of the model itself, under two prefixes, so that the
meta-optimizer, the all-reduce, checkpoints, the export and ``GET /models/{id}/weights`` see them
like any weight (``attach``):

    inner_lr.<parameter name>   LSLR: (steps,); Meta-SGD: the parameter's shape. Start at inner.lr.
    bn_step.<BatchNorm parameter name>   (steps, channels): the BatchNorm weight or bias used after
                                s >= 1 inner steps (row s - 1); the model's own BatchNorm weights
                                are those of step 0. Not adapted in the inner loop (as in MAML++).

Per-step BatchNorm running statistics (``per_step_bn_stats``) are buffers, not parameters:

    bn_stats.<BatchNorm module name>.mean, .var   (steps + 1, channels): row s, the running mean and
                                (unbiased) variance of the layer's input in the forward passes after
                                s inner steps (the support passes for s < steps, the query passes
                                where the objective has them), over the meta-training tasks.
    bn_stats.updates            how many meta-iterations they average.

Meta-training normalises with batch statistics, as MAML++'s code does in every pass; each task
reports its batch statistics beside its meta-gradient (``task_meta_gradient``), the aggregator
averages them over the meta-batch like a gradient (so one worker or several give the same), and
``update_running_stats`` folds the mean into the buffers: a cumulative average for the first
1 / ``BN_STATS_MOMENTUM`` iterations, an exponential one after. Adaptation steps on the support
set with batch statistics, as in training; the adapted parameters it returns carry the running
statistics of their step (``<module>.step_mean``, ``.step_var``), with which the model's
BatchNorm layers normalise instead: a query item's prediction then depends on its own input and
the support set only, not on the other query items.

Support-normalised queries (``query_bn="support"``, MetaBN in Bronskill et al., "TaskNorm", ICML
2020) make the same promise without running statistics, and keep training and testing alike: every
query pass after s steps, in meta-training as at prediction, is normalised with the batch
statistics of the support set's pass at the same parameters (one more support pass per query
pass; in meta-training the meta-gradient flows through those statistics too).

At evaluation, steps beyond the trained ``steps`` reuse the last step's learning rates and
BatchNorm weights.

Example::

    options = MetaOptions(steps=5, lr=0.4, learn_lr="per_layer_per_step", msl_weights=msl_weights(5, 0, 100))
    grads, metrics = task_meta_gradient(model, params, buffers, task, options=options,
                                        loss="cross_entropy", first_order=False)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from workers.errors import ModelError, Stopped
from workers.inner import Forward, Params, accuracy, check_finite, loss_function
from workers.models import MLP, Conv4
from workers.tasks.base import LossName, Task

LR_PREFIX = "inner_lr"
BN_PREFIX = "bn_step"
STATS_PREFIX = "bn_stats"
BN_STATS_MOMENTUM = 0.1  # the running statistics' weight of each new meta-iteration (torch's default)
LearnLR = Literal["none", "per_layer_per_step", "per_parameter"]
QueryBN = Literal["batch", "support"]
Adapt = Literal["all", "head"]
MSL_MIN_WEIGHT = 0.03  # MAML++: the non-final steps' weights decay to 0.03 / steps


@dataclass(frozen=True)
class MetaOptions:
    """The inner-loop options of a spec (``MetaOptions.of(spec)``), and this iteration's loss weights."""

    steps: int  # S: the training inner steps; the learned pieces have one entry per step
    lr: float  # the fixed inner learning rate (learn_lr "none"), the learned ones' initial value
    learn_lr: LearnLR = "none"
    adapt: Adapt = "all"
    per_step_bn: bool = False
    bn_stats: bool = False  # per-step BatchNorm running statistics
    query_bn: QueryBN = "batch"  # what normalises the query passes: their own batch, or the support set's
    checkpoint: bool = False
    msl_weights: tuple[float, ...] | None = None  # the query loss weights after steps 1..S; None: the last only

    @classmethod
    def of(cls, spec, iteration: int | None = None) -> MetaOptions:
        """A spec's options; with ``iteration``, the multi-step loss weights of that iteration."""
        weights = None
        if spec.outer.multi_step_loss and iteration is not None:
            weights = msl_weights(spec.inner.steps, iteration, spec.outer.msl_anneal_iterations)
        return cls(steps=spec.inner.steps, lr=spec.inner.lr, learn_lr=spec.inner.learn_lr, adapt=spec.inner.adapt,
                   per_step_bn=spec.model.per_step_bn, bn_stats=spec.model.per_step_bn_stats,
                   query_bn=spec.model.query_bn, checkpoint=spec.inner.checkpoint, msl_weights=weights)

    @property
    def general(self) -> bool:
        """Whether these options need this module's loop (else plain MAML, and its fast paths)."""
        return (self.learned_inner or self.checkpoint or self.msl_weights is not None)

    @property
    def learned_inner(self) -> bool:
        """Whether adaptation itself differs from plain SGD on every parameter (evaluation, the service)."""
        return (self.learn_lr != "none" or self.adapt != "all" or self.per_step_bn or self.bn_stats
                or self.query_bn != "batch")

    def weights(self) -> tuple[float, ...]:
        """The query loss weight after each of the S steps."""
        if self.msl_weights is None:
            return (0.0,) * (self.steps - 1) + (1.0,)
        if len(self.msl_weights) != self.steps:
            raise ValueError(f"msl_weights: {len(self.msl_weights)} weights for {self.steps} steps")
        return self.msl_weights


def msl_weights(steps: int, iteration: int, anneal_iterations: int) -> tuple[float, ...] | None:
    """MAML++'s per-step loss importance vector at ``iteration`` (its code's, with iterations for epochs).

    Uniform (1 / S) at iteration 0; each non-final weight decays by ``iteration / (S * N)`` down to
    0.03 / S, the final weight grows by ``(S - 1)`` times that, up to 1 - (S - 1) 0.03 / S. From
    iteration N on: None (the last step's loss only), as MAML++ stops the multi-step loss there.
    """
    if iteration >= anneal_iterations:
        return None
    decay = 1.0 / steps / anneal_iterations
    floor = MSL_MIN_WEIGHT / steps
    w = [max(1.0 / steps - iteration * decay, floor) for _ in range(steps - 1)]
    w.append(min(1.0 / steps + iteration * (steps - 1) * decay, 1.0 - (steps - 1) * floor))
    return tuple(w)


def lr_factor(schedule: str, iteration: int, total: int, lr: float, lr_min: float = 0.0) -> float:
    """The meta learning rate at ``iteration`` (0-based) over ``lr``: constant, linear to 0, cosine to lr_min."""
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, 1.0 - iteration / total)
    if schedule == "cosine":  # torch's CosineAnnealingLR with T_max = total, eta_min = lr_min
        ratio = lr_min / lr
        return ratio + (1.0 - ratio) * (1.0 + math.cos(math.pi * min(iteration, total) / total)) / 2.0
    raise ValueError(f"outer.lr_schedule: unknown schedule '{schedule}'")


def schedule(spec, iteration: int) -> tuple[str, MetaOptions | None]:
    """The algorithm and options of meta-iteration ``iteration``: derivative-order annealing
    (first order before ``outer.first_order_iterations``) and the multi-step loss weights."""
    algorithm = spec.algorithm
    if algorithm == "maml" and iteration < spec.outer.first_order_iterations:
        algorithm = "fomaml"
    options = MetaOptions.of(spec, iteration) if spec.meta_options_used else None
    return algorithm, options


# ------------------------------------------------------------------------------------- model state


def batchnorm_modules(model: nn.Module) -> list[str]:
    """The names of every BatchNorm layer (affine or not), in ``named_modules`` order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def is_learned(name: str) -> bool:
    """Whether a parameter name is one of the learned inner-loop pieces (not a weight of the model)."""
    return name.startswith((LR_PREFIX + ".", BN_PREFIX + "."))


def head_module(model: nn.Module) -> tuple[str, nn.Linear]:
    """ANIL's head: the last ``nn.Linear`` of the model (its name and module)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not is_learned(n + ".")]
    if not linears:
        raise ModelError("inner.adapt", "'head' needs a model with an nn.Linear layer (its last is the head)")
    return linears[-1]


def batchnorm_names(model: nn.Module) -> list[str]:
    """The weight and bias names of every affine BatchNorm layer, in ``named_parameters`` order."""
    names = []
    for n, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            names += [f"{n}.weight", f"{n}.bias"]
    return names


def adapted_names(model: nn.Module, adapt: Adapt, per_step_bn: bool) -> list[str]:
    """The parameters the inner loop adapts, in ``named_parameters`` order."""
    names = [n for n, _ in model.named_parameters() if not is_learned(n)]
    if adapt == "head":
        head, module = head_module(model)
        own = {f"{head}.{k}" if head else k for k, _ in module.named_parameters(recurse=False)}
        return [n for n in names if n in own]
    if per_step_bn:
        frozen = set(batchnorm_names(model))
        names = [n for n in names if n not in frozen]
    return names


def _put(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Register ``value`` under the dotted ``name`` below ``root`` (plain modules in between): a
    parameter, or a buffer if it is a plain tensor."""
    *path, leaf = name.split(".")
    node = root
    for part in path:
        child = node._modules.get(part)
        if child is None:
            child = nn.Module()
            node.add_module(part, child)
        node = child
    if isinstance(value, nn.Parameter):
        node.register_parameter(leaf, value)
    else:
        node.register_buffer(leaf, value)


def attach(model: nn.Module, *, steps: int, lr: float, learn_lr: LearnLR = "none", adapt: Adapt = "all",
           per_step_bn: bool = False, bn_stats: bool = False, query_bn: QueryBN = "batch") -> nn.Module:
    """Add the learned inner-loop pieces to ``model`` as parameters, and the per-step running
    statistics as buffers (see the module's docstring); ``model`` itself, unchanged when no option
    asks for any. With ``bn_stats`` or a support-normalised query its BatchNorm layers become
    ``StepBatchNorm`` layers (the same parameters, buffers and names)."""
    base = dict(model.named_parameters())
    if bn_stats:
        _attach_stats(model, steps)
    elif query_bn == "support":
        _step_layers(model, "model.query_bn")
    if per_step_bn:
        bn = batchnorm_names(model)
        if not bn:
            raise ModelError("model.per_step_bn", "the model has no BatchNorm layer with weights")
        holder = _holder(model, BN_PREFIX)
        for n in bn:
            # (steps, channels): row s - 1 is used after s inner steps; the model's own is step 0's
            _put(holder, n, nn.Parameter(base[n].detach().unsqueeze(0).repeat(steps, 1).clone()))
    if learn_lr != "none":
        holder = _holder(model, LR_PREFIX)
        for n in adapted_names(model, adapt, per_step_bn):
            shape = (steps,) if learn_lr == "per_layer_per_step" else tuple(base[n].shape)
            _put(holder, n, nn.Parameter(torch.full(shape, float(lr), dtype=base[n].dtype, device=base[n].device)))
    elif adapt == "head":
        head_module(model)  # a model without a head is refused now, not at the first iteration
    return model


def attach_for(model: nn.Module, spec) -> nn.Module:
    """``attach`` with a job spec's options."""
    return attach(model, steps=spec.inner.steps, lr=spec.inner.lr, learn_lr=spec.inner.learn_lr,
                  adapt=spec.inner.adapt, per_step_bn=spec.model.per_step_bn, bn_stats=spec.model.per_step_bn_stats,
                  query_bn=spec.model.query_bn)


class LearnedPieces(nn.Module):
    """The holder of the learned pieces below a model (``model.inner_lr``, ``model.bn_step``).

    Its forward is the identity: an ``nn.Sequential`` model runs every child in order, this one
    included, and must compute what it computed without it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _holder(model: nn.Module, prefix: str) -> nn.Module:
    if hasattr(model, prefix):
        raise ModelError("model.factory", f"the model already has an attribute '{prefix}', which the learned "
                         "inner-loop pieces need")
    holder = LearnedPieces()
    model.add_module(prefix, holder)
    return holder


# ------------------------------------------------------------------------------- running statistics


@dataclass
class _Recorder:
    """The batch statistics of one task's forward passes: (row, input, layer) -> (mean, var), the
    first pass of each kept (a recomputed pass, checkpointing's, sees the same)."""

    seen: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def add(self, row: int, source: int, layer: str, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.seen.setdefault((row, source, layer), (mean, var))

    def result(self, layers: list[str], rows: int) -> Params:
        """Per layer, ``(rows, channels)`` means and variances: each row the mean over its passes."""
        out: Params = {}
        for layer in layers:
            for i, kind in enumerate(("mean", "var")):
                per_row = []
                for row in range(rows):
                    values = [v[i] for (r, _, name), v in self.seen.items() if r == row and name == layer]
                    if not values:
                        raise RuntimeError(f"model.per_step_bn_stats: no forward pass of '{layer}' after {row} "
                                           "inner steps")
                    per_row.append(torch.stack(values).mean(0))
                out[f"{STATS_PREFIX}.{layer}.{kind}"] = torch.stack(per_row)
        return out


# Set while one of the inner loop's forward passes runs: (recorder, row, id of the input batch).
_RECORDING: ContextVar[tuple[_Recorder, int, int] | None] = ContextVar("maml_bn_recording", default=None)
# Set while a support pass runs for its statistics: layer -> (mean, biased variance), with their graph.
_CAPTURE: ContextVar[dict[str, tuple[torch.Tensor, torch.Tensor]] | None] = ContextVar("maml_bn_capture",
                                                                                      default=None)


class StepBatchNorm:
    """What a BatchNorm layer of a model with per-step running statistics adds to its class.

    Given ``step_mean`` and ``step_var`` (buffers that are None in the module itself: a forward pass
    passes them, ``torch.func.functional_call`` swaps them in), it normalises with them,
    differentiably in them too. Otherwise it is the layer it was, and records its input's batch
    statistics while an inner loop records or captures them.
    """

    stats_key: str
    step_mean: torch.Tensor | None
    step_var: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [d for d in range(x.dim()) if d != 1]
        if self.step_mean is not None and self.step_var is not None:
            shape = [1, -1] + [1] * (x.dim() - 2)
            out = (x - self.step_mean.view(shape)) * torch.rsqrt(self.step_var.view(shape) + self.eps)  # type: ignore[attr-defined]
            if self.weight is not None:  # type: ignore[attr-defined]
                out = out * self.weight.view(shape) + self.bias.view(shape)  # type: ignore[attr-defined]
            return out
        capture = _CAPTURE.get()
        if capture is not None:
            var, mean = torch.var_mean(x, dim=dims, correction=0)  # what the pass normalises with
            capture[self.stats_key] = (mean, var)
        recording = _RECORDING.get()
        if recording is not None:
            recorder, row, source = recording
            with torch.no_grad():
                var, mean = torch.var_mean(x, dim=dims, correction=1)
            recorder.add(row, source, self.stats_key, mean, var)
        return super().forward(x)  # type: ignore[misc]


class StepBatchNorm1d(StepBatchNorm, nn.BatchNorm1d):
    pass


class StepBatchNorm2d(StepBatchNorm, nn.BatchNorm2d):
    pass


class StepBatchNorm3d(StepBatchNorm, nn.BatchNorm3d):
    pass


_STEP_CLASSES = {nn.BatchNorm1d: StepBatchNorm1d, nn.BatchNorm2d: StepBatchNorm2d, nn.BatchNorm3d: StepBatchNorm3d}


def _step_layers(model: nn.Module, field: str) -> list[tuple[str, nn.Module]]:
    """Make every BatchNorm layer of ``model`` a ``StepBatchNorm`` layer; their names and modules."""
    layers = [(name, model.get_submodule(name)) for name in batchnorm_modules(model)]
    if not layers:
        raise ModelError(field, "the model has no BatchNorm layer")
    for name, module in layers:
        cls = _STEP_CLASSES.get(type(module))
        if cls is None:
            raise ModelError(field, f"layer '{name}' is a {type(module).__name__}; per-step statistics take "
                             "nn.BatchNorm1d, 2d or 3d")
        module.__class__ = cls
        module.stats_key = name
        module.register_buffer("step_mean", None)
        module.register_buffer("step_var", None)
    return layers


def _attach_stats(model: nn.Module, steps: int) -> None:
    layers = _step_layers(model, "model.per_step_bn_stats")
    holder = _holder(model, STATS_PREFIX)
    for name, module in layers:
        like = next(module.parameters(), None)
        kind = dict(dtype=like.dtype, device=like.device) if like is not None else {}
        _put(holder, f"{name}.mean", torch.zeros(steps + 1, module.num_features, **kind))
        _put(holder, f"{name}.var", torch.ones(steps + 1, module.num_features, **kind))
    holder.register_buffer("updates", torch.zeros((), dtype=torch.long))


def stats_buffers(model: nn.Module) -> Params:
    """The running statistics that meta-iterations average (``bn_stats.<layer>.mean``, ``.var``):
    empty without per-step BatchNorm statistics."""
    return {n: b for n, b in model.named_buffers()
            if n.startswith(STATS_PREFIX + ".") and n.endswith((".mean", ".var"))}


def update_running_stats(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> None:
    """Fold one meta-iteration's mean batch statistics (the aggregated ``bn_stats.*`` entries of the
    task results) into the model's running statistics; a no-op without them."""
    running = stats_buffers(model)
    if not running:
        return
    updates = model.get_buffer(f"{STATS_PREFIX}.updates")
    weight = max(BN_STATS_MOMENTUM, 1.0 / (int(updates) + 1))
    with torch.no_grad():
        for n, b in running.items():
            b.mul_(1.0 - weight).add_(batch[n].to(dtype=b.dtype, device=b.device), alpha=weight)
        updates.add_(1)


def step_statistics(buffers: Params, layers: list[str], step: int, steps: int) -> Params:
    """The running statistics of the forward pass after ``step`` inner steps, as ``StepBatchNorm``
    takes them (``<layer>.step_mean``, ``.step_var``); steps past the trained ones reuse the last row."""
    row = min(step, steps)
    out: Params = {}
    for layer in layers:
        out[f"{layer}.step_mean"] = buffers[f"{STATS_PREFIX}.{layer}.mean"][row]
        out[f"{layer}.step_var"] = buffers[f"{STATS_PREFIX}.{layer}.var"][row]
    return out


# ------------------------------------------------------------------------------------- the inner loop


class _Features(Exception):
    """Raised by a pre-hook on the head to hand back its input (the body's features) and stop."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value


class Unroll:
    """One task's inner loop under ``options``: the forward pass after ``s`` steps, one step, the losses.

    ``theta`` holds every parameter (the model's and the learned pieces), as leaves that require
    grad when ``track`` (meta-training) and detached otherwise (adaptation at evaluation). With
    per-step BatchNorm statistics, a tracking loop records every forward pass's batch statistics
    (``stats()``); passes with ``record=False`` (metrics only) are left out. With support-normalised
    queries, ``support`` (the task's support inputs) must be set: every other input is normalised
    with their statistics.
    """

    def __init__(self, model: nn.Module, params: Params, buffers: Params, options: MetaOptions, loss: LossName,
                 *, track: bool = True) -> None:
        self.options = options
        self.loss_fn = loss_function(loss)
        self.theta = {n: (p.detach().requires_grad_() if track else p.detach()) for n, p in params.items()}
        self.model_names = [n for n in params if not is_learned(n)]
        self.names = adapted_names(model, options.adapt, options.per_step_bn)
        self.bn = batchnorm_names(model) if options.per_step_bn else []
        self.stats_layers = batchnorm_modules(model) if options.bn_stats else []
        self.recorder = _Recorder() if options.bn_stats and track else None
        self.support: torch.Tensor | None = None
        self.buffers = buffers
        self.forward = Forward(model, buffers)
        self.head: tuple[str, nn.Linear] | None = None
        # ANIL on a model whose output is its head's (Conv4, the MLP): the body runs once per input
        # and BatchNorm set, not once per step. Off when checkpointing (it would keep the graph).
        if options.adapt == "head" and type(model) in (Conv4, MLP) and not options.checkpoint:
            self.head = head_module(model)
        # (input, step key) -> the body's features and the batch statistics of their pass
        self._features: dict[tuple[int, int], tuple[torch.Tensor, _Recorder]] = {}

    def lr(self, name: str, step: int) -> torch.Tensor | float:
        """The learning rate of ``name`` at inner step ``step`` (0-based)."""
        kind = self.options.learn_lr
        if kind == "none":
            return self.options.lr
        lr = self.theta[f"{LR_PREFIX}.{name}"]
        return lr[min(step, self.options.steps - 1)] if kind == "per_layer_per_step" else lr

    def full(self, fast: Params, step: int) -> Params:
        """The model's parameters for the forward pass after ``step`` inner steps."""
        p = {n: self.theta[n] for n in self.model_names}
        p.update(fast)
        if self.bn and step > 0:
            row = min(step, self.options.steps) - 1
            for n in self.bn:
                p[n] = self.theta[f"{BN_PREFIX}.{n}"][row]
        return p

    def statistics(self, fast: Params, step: int) -> Params:
        """What normalises a query pass after ``step`` steps (``StepBatchNorm``'s ``step_mean`` and
        ``step_var``): the running statistics of the step, the support set's at ``fast``, or nothing
        (the pass's own batch statistics)."""
        if self.options.bn_stats:
            return step_statistics(self.buffers, self.stats_layers, step, self.options.steps)
        if self.options.query_bn != "support":
            return {}
        assert self.support is not None, "query_bn 'support': set Unroll.support first"
        captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        token = _CAPTURE.set(captured)
        try:
            self.forward(self.full(fast, step), self.support)
        finally:
            _CAPTURE.reset(token)
        out: Params = {}
        for layer, (mean, var) in captured.items():
            out[f"{layer}.step_mean"], out[f"{layer}.step_var"] = mean, var
        return out

    def _normalised_by_support(self, x: torch.Tensor) -> bool:
        return self.options.query_bn == "support" and x is not self.support

    def stats(self) -> Params:
        """The batch statistics this task's recorded passes saw, per layer ``(steps + 1, channels)``."""
        assert self.recorder is not None
        return self.recorder.result(self.stats_layers, self.options.steps + 1)

    @contextlib.contextmanager
    def _recording(self, recorder: _Recorder | None, step: int, x: torch.Tensor) -> Iterator[None]:
        if recorder is None:
            yield
            return
        token = _RECORDING.set((recorder, min(step, self.options.steps), id(x)))
        try:
            yield
        finally:
            _RECORDING.reset(token)

    def output(self, fast: Params, step: int, x: torch.Tensor, *, record: bool = True) -> torch.Tensor:
        recorder = self.recorder if record else None
        if self.head is None:
            extra = self.statistics(fast, step) if self._normalised_by_support(x) else {}
            with self._recording(recorder, step, x):
                return self.forward({**self.full(fast, step), **extra}, x)
        key = (id(x), min(step, self.options.steps) if self.bn else 0)
        cached = self._features.get(key)
        if cached is None:
            seen = _Recorder()
            with self._recording(seen if self.recorder is not None else None, 0, x):
                body = self._body(fast, step, x)
            cached = self._features[key] = (body, seen)
        features, seen = cached
        if recorder is not None:  # the body's pass at this step is the cached one: its statistics too
            for (_, source, layer), (mean, var) in seen.seen.items():
                recorder.add(min(step, self.options.steps), source, layer, mean, var)
        name, module = self.head
        prefix = f"{name}." if name else ""
        bias = fast.get(prefix + "bias") if module.bias is not None else None
        return F.linear(features, fast[prefix + "weight"], bias)

    def _body(self, fast: Params, step: int, x: torch.Tensor) -> torch.Tensor:
        assert self.head is not None
        extra = self.statistics(fast, step) if self._normalised_by_support(x) else {}

        def capture(_module: nn.Module, args: tuple) -> None:
            raise _Features(args[0])

        handle = self.head[1].register_forward_pre_hook(capture)
        try:
            self.forward({**self.full(fast, step), **extra}, x)
        except _Features as found:
            return found.value
        finally:
            handle.remove()
        raise RuntimeError("inner.adapt: the model's forward never reached its head")

    def loss(self, fast: Params, step: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.output(fast, step, x)
        return self.loss_fn(out, y), out

    def step(self, fast: Params, step: int, x: torch.Tensor, y: torch.Tensor, *,
             create_graph: bool) -> tuple[Params, torch.Tensor]:
        """One SGD step with this step's learning rates. Without ``create_graph`` the gradients are
        constants (first order), but the update stays differentiable in the learning rates."""
        loss, _ = self.loss(fast, step, x, y)
        check_finite(loss.detach(), "inner loss", f"at inner step {step}")
        grads = torch.autograd.grad(loss, tuple(fast.values()), create_graph=create_graph)
        return {n: p - self.lr(n, step) * g for (n, p), g in zip(fast.items(), grads, strict=True)}, loss

    def initial(self) -> Params:
        return {n: self.theta[n] for n in self.names}


def task_meta_gradient(
    model: nn.Module,
    params: Params,
    buffers: Params,
    task: Task,
    *,
    options: MetaOptions,
    loss: LossName,
    first_order: bool = False,
    before: bool = True,
) -> tuple[Params, dict[str, float]]:
    """One task's meta-gradient with respect to every parameter in ``params`` (the learned pieces
    included), and its metrics (those of ``workers.maml.maml_task``). With per-step BatchNorm
    statistics, the result also holds this task's batch statistics under the names of the running
    ones (``bn_stats.<layer>.mean``, ``.var``; ``update_running_stats`` takes their mean).

    The meta-objective is ``sum_s w_s L_query(theta_s)`` over the steps s = 1..S (``options.weights()``:
    the last step's loss only unless the multi-step loss is on). ``first_order`` treats the inner
    gradients as constants (first-order MAML; the learning rates still get their gradient).
    """
    unroll = Unroll(model, params, buffers, options, loss)
    unroll.support = task.x_support
    classification = loss == "cross_entropy"
    metrics: dict[str, float] = {}
    if before:  # a metric, not a pass of the objective: its batch statistics are not recorded
        with torch.no_grad():
            out0 = unroll.output(unroll.initial(), 0, task.x_query, record=False) if unroll.head is None else None
        if out0 is None:  # ANIL: the query features are computed once, with their graph, and kept
            out0 = unroll.output(unroll.initial(), 0, task.x_query, record=False).detach()
        metrics["meta/loss_before"] = unroll.loss_fn(out0, task.y_query).item()
        if classification:
            metrics["meta/accuracy_before"] = accuracy(out0, task.y_query)
    run = _checkpointed if options.checkpoint else _unrolled
    grads, support_before, final_loss, final_out = run(unroll, task, first_order)
    check_finite(final_loss.detach(), "query loss", "after adaptation")
    metrics["inner/loss_before"] = support_before
    metrics["meta/loss"] = final_loss.item()
    if classification:
        metrics["meta/accuracy"] = accuracy(final_out, task.y_query)
    if unroll.recorder is not None:
        grads.update(unroll.stats())  # averaged over the meta-batch like the gradients
    return grads, metrics


def _zeros_for_none(grads: tuple, like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, like, strict=True)]


def _unrolled(unroll: Unroll, task: Task, first_order: bool):
    """Every step's graph kept, one backward pass: the reference schedule."""
    weights = unroll.options.weights()
    fast = unroll.initial()
    total: torch.Tensor | float = 0.0
    support_before = math.nan
    for s in range(unroll.options.steps):
        fast, support = unroll.step(fast, s, task.x_support, task.y_support, create_graph=not first_order)
        if s == 0:
            support_before = support.item()
        if weights[s] != 0.0:
            query, out = unroll.loss(fast, s + 1, task.x_query, task.y_query)
            total = total + weights[s] * query
    theta = list(unroll.theta.values())
    assert isinstance(total, torch.Tensor)
    grads = torch.autograd.grad(total, theta, allow_unused=True)
    return (dict(zip(unroll.theta, _zeros_for_none(grads, theta), strict=True)), support_before,
            query.detach(), out.detach())


def _checkpointed(unroll: Unroll, task: Task, first_order: bool):
    """The same gradient with one step's graph at a time.

    The forward pass keeps the adapted parameters only every ``k = ceil(sqrt(S))`` steps (no graph);
    the backward pass recomputes one segment of ``k`` states at a time from its first, then, step by
    step from the last, recomputes step s with its graph and pushes the gradient at theta_{s+1}
    back to theta_s (plus the learning rates', the frozen parameters' and step s's query loss
    contributions). Memory: one step's graph, the query pass, about 2 sqrt(S) parameter copies.
    """
    steps, weights = unroll.options.steps, unroll.options.weights()
    xs, ys, xq, yq = task
    every = max(1, math.ceil(math.sqrt(steps)))
    support_before = math.nan

    def advance(state: Params, s: int) -> tuple[Params, torch.Tensor]:
        leaf = {n: p.detach().requires_grad_() for n, p in state.items()}
        new, support = unroll.step(leaf, s, xs, ys, create_graph=False)
        return {n: p.detach() for n, p in new.items()}, support.detach()

    state = {n: p.detach() for n, p in unroll.initial().items()}
    kept = {0: state}  # theta_s for s a multiple of ``every``, and theta_S
    for s in range(steps):
        state, support = advance(state, s)
        if s == 0:
            support_before = support.item()
        if (s + 1) % every == 0 or s + 1 == steps:
            kept[s + 1] = state
    segment: dict[int, Params] = {}

    def at(s: int) -> Params:
        """theta_s: kept, or recomputed with the rest of its segment from the segment's first."""
        if s in kept:
            return kept[s]
        if s not in segment:
            segment.clear()
            first = s - s % every
            state = kept[first]
            for t in range(first, s):
                state, _ = advance(state, t)
                segment[t + 1] = state
        return segment[s]

    theta_names, theta = list(unroll.theta), list(unroll.theta.values())
    total = {n: torch.zeros_like(p) for n, p in unroll.theta.items()}
    grad_fast: list[torch.Tensor] = []
    final_loss = final_out = None
    for s in range(steps, -1, -1):
        fast = {n: p.detach().requires_grad_() for n, p in at(s).items()}
        outputs: list[torch.Tensor] = []
        grad_outputs: list[torch.Tensor] = []
        if s < steps:  # the step from theta_s to theta_{s+1}, recomputed with its graph
            new, _ = unroll.step(fast, s, xs, ys, create_graph=not first_order)
            outputs += list(new.values())
            grad_outputs += grad_fast
        if s >= 1 and weights[s - 1] != 0.0:
            query, out = unroll.loss(fast, s, xq, yq)
            if s == steps:
                final_loss, final_out = query.detach(), out.detach()
            outputs.append(weights[s - 1] * query)
            grad_outputs.append(torch.ones_like(query))
        wrt = [*fast.values(), *theta]
        grads = _zeros_for_none(torch.autograd.grad(outputs, wrt, grad_outputs, allow_unused=True), wrt)
        grad_fast = grads[:len(fast)]
        for n, g in zip(theta_names, grads[len(fast):], strict=True):
            total[n] += g
        del outputs, grad_outputs, grads
    for n, g in zip(kept[0], grad_fast, strict=True):  # theta_0 is the meta-parameters themselves
        total[n] += g
    assert final_loss is not None and final_out is not None
    return total, support_before, final_loss, final_out


# ------------------------------------------------------------------------------------- adaptation


def adapt(model: nn.Module, params: Params, buffers: Params, x: torch.Tensor, y: torch.Tensor, *, steps: int,
          options: MetaOptions, loss: LossName, should_stop: Callable[[], bool] | None = None,
          on_step: Callable[[int, Params, float], None] | None = None) -> tuple[Params, float, float]:
    """``steps`` steps of the learned inner loop on (x, y): the adapted model parameters (for the
    query pass after ``steps`` steps: the BatchNorm weights of that step and, where the options
    say so, the statistics that normalise it (the step's running ones, or the support set's)
    included, the learned pieces left out), and the loss on (x, y) before and after (with batch
    statistics, as the steps take it). ``on_step(k, params_k, loss_k)``, if given, sees the same for
    k = 0, 1, ..., ``steps`` (one more forward per step, for the loss)."""
    options = replace(options, checkpoint=False, msl_weights=None)
    unroll = Unroll(model, params, buffers, options, loss, track=False)
    unroll.support = x
    fast = unroll.initial()

    def for_queries(fast: Params, step: int) -> Params:
        with torch.no_grad():
            return {n: p.detach() for n, p in {**unroll.full(fast, step), **unroll.statistics(fast, step)}.items()}

    with torch.no_grad():
        before = unroll.loss(fast, 0, x, y)[0].item()
    for s in range(steps):
        if on_step is not None:
            with torch.no_grad():
                value = before if s == 0 else unroll.loss(fast, s, x, y)[0].item()
                on_step(s, for_queries(fast, s), value)
        if s and should_stop is not None and should_stop():
            raise Stopped(s)
        leaf = {n: p.detach().requires_grad_() for n, p in fast.items()}
        new, _ = unroll.step(leaf, s, x, y, create_graph=False)
        fast = {n: p.detach() for n, p in new.items()}
    with torch.no_grad():
        after = unroll.loss(fast, steps, x, y)[0].item() if steps else before
    adapted = for_queries(fast, steps)
    if on_step is not None:
        on_step(steps, adapted, after)
    return adapted, before, after

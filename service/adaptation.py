"""Adaptation queries: "here are K labelled examples of my new task: adapt and predict".

A query is validated against the model (input shape, label range, finite values, sizes), adapted
with ``workers.evaluation.adapt`` -- the meta-test procedure of training, with the model's own
``eval.steps`` and ``inner.lr`` unless the query overrides them -- and answered with predictions
for the query inputs and the support loss before and after adaptation. With ``every_step``, also the
predictions and the support loss after 0, 1, ..., steps steps, observed in the same loop (``on_step``);
an RL policy answers its returns per step, and for nav2d ``trajectories`` sampled paths per step.

Image models take base64 PNG or JPEG strings, preprocessed by the task family's own function, so
an uploaded image becomes exactly the tensor training would have made of it.

The work runs on a pool of ``adapt_max_concurrency`` threads, off the event loop. At most
``adapt_queue_limit`` more queries wait; beyond that the answer is 429 with Retry-After. Loaded
models are cached, least recently used evicted, within ``model_cache_bytes`` of tensors.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import io
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from prometheus_client import Gauge
from safetensors.torch import load_file, save_file
from sqlalchemy.orm import Session, sessionmaker
from torch import nn

from service import registry
from service.config import Settings
from service.db import Model, new_id
from service.errors import Conflict, InvalidInput, NotFound, Saturated, Unavailable
from service.fairpool import FairPool
from service.keys import Principal
from service.metrics import ServiceMetrics
from service.schemas import AdaptRequest, AdaptResponse
from workers.errors import ModelError, NonFiniteLossError, SpecError, Stopped
from workers.evaluation import MAX_ANSWER_NUMBERS, adapt, predict
from workers.inner import Params
from workers.mamlpp import MetaOptions, attach_for
from workers.models import build_model
from workers.spec import JobSpec
from workers.supervised import torch_dtype

logger = logging.getLogger(__name__)
_IMAGE_FORMATS = ("PNG", "JPEG")
DISCONNECT_POLL_S = 0.25  # how often a running query looks whether its client is still there
PURGE_EVERY_S = 60.0  # at most this often, storing adapted weights deletes the expired ones


class ClientGone(Unavailable):
    """The client of an adaptation query disconnected: the query was stopped (nobody reads this answer)."""

    def __init__(self) -> None:
        super().__init__("the client disconnected; the adaptation was stopped")


@dataclass
class LoadedModel:
    """A registry model ready to adapt: module, parameters and buffers, and what its inputs look like."""

    id: str
    tenant: str
    spec: JobSpec
    module: nn.Module
    params: Params
    buffers: Params
    input_shape: tuple[int, ...]
    output_dim: int
    loss: str
    dtype: torch.dtype
    # Bytes of params and buffers (tensor_bytes): what the model costs the cache. Not counted: the
    # module copy each pool thread that adapts it keeps (module_for_thread), tensors included.
    nbytes: int
    _local: threading.local = field(default_factory=threading.local, repr=False)

    @property
    def classification(self) -> bool:
        return self.loss == "cross_entropy"

    @property
    def images(self) -> bool:
        return self.spec.task.family in ("omniglot", "image_folder")

    def module_for_thread(self) -> nn.Module:
        # torch.func.functional_call swaps a module's tensors while it runs, so two threads must not
        # share one module: each pool thread gets its own copy (the parameters are passed in anyway).
        module = getattr(self._local, "module", None)
        if module is None:
            module = self._local.module = copy.deepcopy(self.module)
        return module


@dataclass
class LoadedPolicy:
    """A registry RL policy ready to adapt: its training config, module and parameters."""

    id: str
    tenant: str
    spec: JobSpec
    path: Path


_RL_TASK_KEYS = {"nav2d": "goal", "halfcheetah_vel": "velocity", "halfcheetah_dir": "direction"}


def tensor_bytes(*groups: Params) -> int:
    """Bytes held by the tensors of ``groups`` (parameters, buffers), each storage counted once.

    ``params`` and ``buffers`` are detached views of the module's own tensors, so this is what the
    loaded model holds, not twice it. Tied weights share a storage and count once.
    """
    storages: dict[tuple[torch.device, int], int] = {}
    for group in groups:
        for t in group.values():
            storage = t.untyped_storage()
            storages[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def load_model(row: Model, *, allowed_modules: list[str] | None) -> LoadedModel | LoadedPolicy:
    spec = JobSpec.model_validate(row.spec)
    if spec.is_rl:
        return LoadedPolicy(id=row.id, tenant=row.tenant, spec=spec, path=registry.weights_path(row).parent)
    dtype = torch_dtype(spec)
    try:
        module = build_model(spec.model, input_shape=tuple(row.input_shape), output_dim=row.output_dim,
                             allowed_modules=allowed_modules)
        attach_for(module, spec)  # the learned inner-loop pieces (learning rates, per-step BatchNorm), if any
    except ModelError as exc:
        raise Conflict(f"model '{row.id}' cannot be loaded: {exc}") from exc
    module.load_state_dict(load_file(str(registry.weights_path(row))), strict=True)
    module.to(dtype)
    params = {n: p.detach() for n, p in module.named_parameters()}
    buffers = {n: b.detach() for n, b in module.named_buffers()}
    return LoadedModel(id=row.id, tenant=row.tenant, spec=spec, module=module, params=params, buffers=buffers,
                       input_shape=tuple(row.input_shape), output_dim=row.output_dim, loss=row.loss, dtype=dtype,
                       nbytes=tensor_bytes(params, buffers))


# --------------------------------------------------------------------------------------- validation


def _numeric(items: list[Any], name: str, shape: tuple[int, ...], kinds: str = "iuf") -> np.ndarray:
    """``items`` as an array of shape (n, *shape), or InvalidInput naming the first bad item."""
    arr: np.ndarray | None
    try:
        arr = np.asarray(items)
    except ValueError:  # ragged
        arr = None
    if arr is not None and arr.dtype.kind in kinds:
        if arr.shape == (len(items), *shape):
            return arr
        if shape == (1,) and arr.shape == (len(items),):  # scalars for one-value items: [0.3] or 0.3
            return arr.reshape(-1, 1)
    for i, item in enumerate(items):
        _item(item, f"{name}[{i}]", shape, kinds)
    raise InvalidInput(name, f"expected a list of arrays of shape {list(shape)}")


def _item(item: Any, where: str, shape: tuple[int, ...], kinds: str = "iuf") -> np.ndarray:
    """One item as an array of ``shape`` of finite numbers, or InvalidInput naming it."""
    try:
        one = np.asarray(item)
    except ValueError:
        raise InvalidInput(where, f"expected an array of shape {list(shape)} of numbers") from None
    if one.dtype.kind not in kinds or isinstance(item, bool):
        raise InvalidInput(where, f"expected numbers (an array of shape {list(shape)}), got {_kind(item)}")
    if one.shape != shape and not (shape == (1,) and one.shape == ()):
        raise InvalidInput(where, f"shape {list(one.shape)} does not match the model's input shape {list(shape)}")
    if one.dtype.kind == "f" and not np.isfinite(one).all():
        raise InvalidInput(where, "values must be finite (no NaN or infinity)")
    return one.reshape(shape)


def _kind(item: Any) -> str:
    return "a string" if isinstance(item, str) else "a boolean" if isinstance(item, bool) else type(item).__name__


def _check_finite(arr: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
    if bad.any():
        raise InvalidInput(f"{name}[{int(np.argmax(bad))}]", "values must be finite (no NaN or infinity)")


def decode_image(text: str, name: str, max_pixels: int) -> Image.Image:
    """A base64 PNG or JPEG (a ``data:`` URL is fine) as a freshly opened PIL image.

    Not loaded yet: the task family's preprocessing decodes it, as in training (a JPEG is decoded
    at a reduced scale only when it is freshly opened).
    """
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        raw = base64.b64decode(text, validate=True)
        img = Image.open(io.BytesIO(raw), formats=_IMAGE_FORMATS)  # no other decoder ever sees the bytes
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError, SyntaxError):
        raise InvalidInput(name, "expected a base64-encoded PNG or JPEG image") from None
    if img.format not in _IMAGE_FORMATS:
        raise InvalidInput(name, f"image format {img.format} is not supported (PNG or JPEG)")
    if img.width * img.height > max_pixels:
        raise InvalidInput(name, f"image of {img.width}x{img.height} pixels is over the limit of {max_pixels}")
    return img


def _preprocess(img: Image.Image, spec: JobSpec, dtype: torch.dtype) -> torch.Tensor:
    """The task family's own preprocessing: the tensor training made of such an image."""
    task = spec.task
    if task.family == "omniglot":
        from workers.tasks.omniglot import preprocess_image

        return preprocess_image(img, task.image_size, dtype)
    if task.family == "image_folder":
        from workers.tasks.image_folder import preprocess_image as preprocess_folder_image

        return preprocess_folder_image(img, task.image_size, task.channels, dtype)
    raise ValueError(f"the {task.family} family takes no images")


class PixelBudget:
    """The pixels the images of one query may still decode, before any is decoded."""

    def __init__(self, limit: int) -> None:
        self.limit, self.left = limit, limit

    def take(self, img: Image.Image, where: str) -> None:
        self.left -= img.width * img.height
        if self.left < 0:
            raise InvalidInput(where, f"the query's images add up to more than {self.limit} pixels "
                               "(MAML_ADAPT_MAX_REQUEST_PIXELS)")


def inputs_tensor(items: list[Any], name: str, model: LoadedModel, max_pixels: int,
                  budget: PixelBudget | None = None) -> torch.Tensor:
    """Query or support inputs as one (n, *input_shape) tensor; images are decoded within ``budget``."""
    if not items:
        return torch.empty((0, *model.input_shape), dtype=model.dtype)
    if model.images and any(isinstance(item, str) for item in items):
        tensors = []
        for i, item in enumerate(items):
            where = f"{name}[{i}]"
            if isinstance(item, str):
                img = decode_image(item, where, max_pixels)
                if budget is not None:
                    budget.take(img, where)
                try:
                    t = _preprocess(img, model.spec, model.dtype)
                except Exception as exc:  # whatever a malformed file makes a decoder raise: the input's fault
                    reason = f"the image data is truncated or corrupt ({type(exc).__name__})"
                    raise InvalidInput(where, reason) from None
                if tuple(t.shape) != model.input_shape:
                    raise InvalidInput(where, f"preprocessed to {list(t.shape)}, the model takes "
                                       f"{list(model.input_shape)}")
            else:
                t = torch.as_tensor(_item(item, where, model.input_shape), dtype=model.dtype)
            tensors.append(t)
        return torch.stack(tensors)
    arr = _numeric(items, name, model.input_shape)
    _check_finite(arr, name)
    return torch.as_tensor(arr, dtype=model.dtype)


def targets_tensor(items: list[Any], name: str, model: LoadedModel) -> torch.Tensor:
    if model.classification:
        if any(isinstance(v, bool) for v in items):
            i = next(i for i, v in enumerate(items) if isinstance(v, bool))
            raise InvalidInput(f"{name}[{i}]", "expected an integer label, got a boolean")
        arr = _numeric(items, name, (), kinds="iu")
        bad = (arr < 0) | (arr >= model.output_dim)
        if bad.any():
            i = int(np.argmax(bad))
            raise InvalidInput(f"{name}[{i}]", f"label {int(arr[i])} is outside 0..{model.output_dim - 1}")
        return torch.as_tensor(arr, dtype=torch.int64)
    arr = _numeric(items, name, (model.output_dim,))
    _check_finite(arr, name)
    return torch.as_tensor(arr, dtype=model.dtype)


# ------------------------------------------------------------------------------------------ service


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def intra_op_threads(max_concurrency: int) -> int:
    """torch threads per adaptation query: the cores shared by the queries that run at once."""
    return max(1, _cores() // max_concurrency)


# The adaptation threads' nice value: computing, they yield the CPU to the event loop, so that a
# flood of slow queries does not slow every other request down (list, status, events).
ADAPT_THREAD_NICE = 10


def _adaptation_thread(threads: int) -> None:
    torch.set_num_threads(threads)
    try:  # Linux: a thread's own priority (lowering it needs no privilege)
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), ADAPT_THREAD_NICE)
    except (AttributeError, OSError):
        pass


class Adapter:
    """Adaptation queries over the registry, with an LRU cache of loaded models (bounded in bytes) and
    bounded concurrency."""

    def __init__(self, *, settings: Settings, session_factory: sessionmaker[Session],
                 metrics: ServiceMetrics | None = None) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.metrics = metrics or ServiceMetrics()
        # Size torch's thread team so that the pool's queries together use the cores once. By default
        # every calling thread gets a team of one thread per core, so concurrent queries run more
        # threads than there are cores, and those spin at each barrier while another team holds the
        # core: more server CPU per query for no lower latency (benchmarks/service.py measures it).
        # The count is process-wide in torch; the service process computes nothing else with torch
        # (training runs in Ray workers, which set their own). Not more threads for a query that runs
        # alone either: once another thread of the process has run a multi-thread team (the job
        # thread's evaluations do), or when consecutive queries land on different pool threads,
        # libgomp's idle teams compete and a multi-thread query is slower than a one-thread one.
        threads = intra_op_threads(settings.adapt_max_concurrency)
        concurrency = settings.adapt_max_concurrency
        per_tenant = settings.adapt_max_running_per_tenant or max(1, concurrency - 1)
        self._pool = FairPool(workers=concurrency, max_per_tenant=per_tenant, thread_name_prefix="maml-adapt",
                              initializer=_adaptation_thread, initargs=(threads,))
        # Least recently used first; _cached_bytes is the sum of their nbytes (both under _cache_lock).
        self._cache: OrderedDict[str, LoadedModel] = OrderedDict()
        self._cached_bytes = 0
        self._cache_lock = threading.Lock()
        self._last_purge = float("-inf")
        Gauge("maml_adapt_model_cache_bytes", "Bytes of the models cached for adaptation (parameters and buffers)",
              registry=self.metrics.registry).set_function(lambda: self._cached_bytes)
        self._in_flight = 0
        self._admission = threading.Lock()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def cached_bytes(self) -> int:
        """The bytes of the cached models' tensors, at most ``model_cache_bytes``."""
        return self._cached_bytes

    @property
    def capacity(self) -> int:
        return self.settings.adapt_max_concurrency + self.settings.adapt_queue_limit

    def close(self) -> None:
        self._pool.shutdown()

    def _release(self, _future: Future[Any] | None = None) -> None:
        with self._admission:
            self._in_flight -= 1

    async def adapt(self, *, model_id: str, principal: Principal, request: AdaptRequest,
                    is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> AdaptResponse:
        """Adapt on the pool; Saturated (429) at once when ``capacity`` queries are already in flight.

        With ``is_disconnected`` (the request's), a query whose client has gone stops at its next step.
        """
        with self._admission:
            if self._in_flight >= self.capacity:
                self.metrics.adapt_rejected.inc()
                raise Saturated(f"{self._in_flight} adaptation queries in flight; retry later",
                                retry_after=self.settings.adapt_retry_after_s)
            self._in_flight += 1
        start = time.perf_counter()
        stop = threading.Event()
        try:
            future = self._pool.submit(principal.tenant, self.adapt_sync, model_id=model_id, principal=principal,
                                       request=request, stop=stop)
        except RuntimeError:  # the pool is shut down: the service is stopping
            self._release()
            raise
        # Released when the computation ends, not when the client leaves: the slot is busy until then.
        future.add_done_callback(self._release)
        result = asyncio.wrap_future(future)
        try:
            while is_disconnected is not None and not result.done():
                await asyncio.wait({result}, timeout=DISCONNECT_POLL_S)
                if not result.done() and await is_disconnected():
                    stop.set()  # the computation ends at its next step (ClientGone)
                    logger.info("adaptation of model %s: the client left; stopping", model_id)
                    break
            return await result
        finally:
            self.metrics.adapt_latency.observe(time.perf_counter() - start)

    def model(self, model_id: str, scope: str | None) -> LoadedModel | LoadedPolicy:
        """The loaded model (cached, least recently used evicted), or NotFound for another tenant.

        RL policies are not cached: they hold no tensors here (``adapt_exported`` reads the weights
        at each query), so a bound in bytes would not bound them, and loading one is a database row.
        """
        with self._cache_lock:
            cached = self._cache.get(model_id)
            if cached is not None:
                self._cache.move_to_end(model_id)
        if cached is not None:
            if scope is not None and cached.tenant != scope:
                raise NotFound("model", model_id)  # the same answer as the database path gives
            return cached
        with self.session_factory() as session:
            row = registry.get_model(session=session, model_id=model_id, scope=scope)
        loaded = load_model(row, allowed_modules=self.settings.model_allowlist)
        if isinstance(loaded, LoadedModel):
            self._remember(loaded)
        return loaded

    def _remember(self, model: LoadedModel) -> None:
        """Cache ``model`` as the most recently used, evicting the least recently used ones until the
        cached models' bytes are within ``model_cache_bytes``; a model larger than that alone is not cached."""
        limit = self.settings.model_cache_bytes
        if model.nbytes > limit:
            logger.warning("model %s holds %d bytes of tensors, more than the adaptation cache's %d "
                           "(MAML_MODEL_CACHE_BYTES): served without caching, so each query loads it again",
                           model.id, model.nbytes, limit)
            return
        with self._cache_lock:
            previous = self._cache.pop(model.id, None)  # another thread loaded it meanwhile
            if previous is not None:
                self._cached_bytes -= previous.nbytes
            self._cache[model.id] = model
            self._cached_bytes += model.nbytes
            while self._cached_bytes > limit:  # never evicts `model` itself: it fits alone
                evicted_id, evicted = self._cache.popitem(last=False)
                self._cached_bytes -= evicted.nbytes
                logger.debug("adaptation cache: evicted model %s (%d bytes)", evicted_id, evicted.nbytes)

    def adapt_sync(self, *, model_id: str, principal: Principal, request: AdaptRequest,
                   stop: threading.Event | None = None) -> AdaptResponse:
        settings = self.settings
        model = self.model(model_id, principal.scope)
        if isinstance(model, LoadedPolicy):
            return self._adapt_policy(model, request)
        spec = model.spec
        support, query = request.support, request.query
        if support is None:
            raise InvalidInput("support", "required: the K labelled examples to adapt to")
        if request.task is not None:
            raise InvalidInput("task", "only RL policies take a task; this model adapts to a support set")
        if len(support.x) > settings.adapt_max_support:
            raise InvalidInput("support.x", f"{len(support.x)} items; at most {settings.adapt_max_support}")
        if len(query.x) > settings.adapt_max_query:
            raise InvalidInput("query.x", f"{len(query.x)} items; at most {settings.adapt_max_query}")
        if len(support.y) != len(support.x):
            raise InvalidInput("support.y", f"{len(support.y)} targets for {len(support.x)} inputs")
        steps = spec.eval.steps if request.steps is None else request.steps
        if steps > settings.adapt_max_steps:
            raise InvalidInput("steps", f"{steps} steps; at most {settings.adapt_max_steps}")
        if request.lr is not None and spec.inner.learn_lr != "none":
            raise InvalidInput("lr", f"this model adapts with its learned inner learning rates "
                               f"(inner.learn_lr '{spec.inner.learn_lr}'); leave lr out")
        lr = spec.inner.lr if request.lr is None else request.lr
        meta = replace(MetaOptions.of(spec), lr=lr) if spec.meta_options_used else None
        if steps * len(support.x) > settings.adapt_max_work:
            raise InvalidInput("steps", f"{steps} steps x {len(support.x)} support items is over the limit of "
                               f"{settings.adapt_max_work} (MAML_ADAPT_MAX_WORK)")
        if request.trajectories:
            raise InvalidInput("trajectories", "only nav2d policies answer trajectories")
        if request.every_step:
            per_item = 1 if model.classification else model.output_dim
            numbers = (steps + 1) * len(query.x) * per_item
            if numbers > MAX_ANSWER_NUMBERS:
                raise InvalidInput("every_step", f"{steps + 1} step counts x {len(query.x)} query items x {per_item} "
                                   f"outputs is {numbers} numbers, over the limit of {MAX_ANSWER_NUMBERS}; ask fewer "
                                   "steps or query items")
            # Each step also predicts the query items: they count against the work limit as support items do.
            work = steps * len(support.x) + (steps + 1) * len(query.x)
            if work > settings.adapt_max_work:
                raise InvalidInput("every_step", f"{steps} steps x {len(support.x)} support items + {steps + 1} x "
                                   f"{len(query.x)} query items is over the limit of {settings.adapt_max_work} "
                                   "(MAML_ADAPT_MAX_WORK)")
        max_pixels, budget = settings.adapt_max_image_pixels, PixelBudget(settings.adapt_max_request_pixels)
        xs = inputs_tensor(support.x, "support.x", model, max_pixels, budget)  # (K, *input_shape)
        ys = targets_tensor(support.y, "support.y", model)  # (K, output_dim) or (K,)
        xq = inputs_tensor(query.x, "query.x", model, max_pixels, budget)  # (Q, *input_shape)

        module = model.module_for_thread()
        deadline = time.monotonic() + settings.adapt_timeout_s
        step_outputs: list[torch.Tensor] = []  # with every_step: (Q, output_dim) after 0, 1, ..., steps steps
        step_losses: list[float] = []

        def on_step(k: int, params: Params, loss: float) -> None:
            step_losses.append(loss)
            if len(xq):
                step_outputs.append(predict(module, params, model.buffers, xq))

        try:
            adapted, before, after = adapt(module, model.params, model.buffers, xs, ys, steps=steps, lr=lr,
                                           loss=model.loss, optimizer=spec.inner.optimizer,  # type: ignore[arg-type]
                                           batch_size=spec.inner.batch_size, meta=meta, should_stop=lambda: (
                                               time.monotonic() > deadline or (stop is not None and stop.is_set())),
                                           on_step=on_step if request.every_step else None)
        except NonFiniteLossError as exc:
            raise InvalidInput("lr", f"adaptation diverged ({exc}); use a smaller lr or fewer steps") from None
        except Stopped as exc:
            if stop is not None and stop.is_set():
                raise ClientGone() from None
            raise InvalidInput("steps", f"the adaptation was still running after {settings.adapt_timeout_s:g}s "
                               f"(MAML_ADAPT_TIMEOUT_S), at step {exc.step} of {steps}; ask fewer steps or "
                               "items") from None
        out = predict(module, adapted, model.buffers, xq) if len(xq) else None  # (Q, output_dim)
        if not (np.isfinite(before) and np.isfinite(after)) or (out is not None and not torch.isfinite(out).all()):
            raise InvalidInput("lr", "adaptation diverged (non-finite loss or predictions); use a smaller lr")

        probabilities = None
        if model.classification:
            predictions: list[Any] = [] if out is None else out.argmax(dim=-1).tolist()
            probabilities = [] if out is None else torch.softmax(out.double(), dim=-1).tolist()
        else:
            predictions = [] if out is None else out.double().tolist()
        step_predictions: list[Any] | None = None
        if request.every_step:
            if not (np.isfinite(step_losses).all() and all(torch.isfinite(o).all() for o in step_outputs)):
                raise InvalidInput("lr", "adaptation diverged (non-finite loss or predictions); use a smaller lr")
            if not len(xq):
                step_predictions = [[] for _ in step_losses]
            elif model.classification:
                step_predictions = [o.argmax(dim=-1).tolist() for o in step_outputs]
            else:
                step_predictions = [o.double().tolist() for o in step_outputs]

        adapted_id = self._store(model, principal, adapted, steps, lr) if request.return_weights else None
        return AdaptResponse(model_id=model.id, kind="classification" if model.classification else "regression",
                             predictions=predictions, probabilities=probabilities, support_loss_before=before,
                             support_loss_after=after, steps=steps, lr=lr, adapted_id=adapted_id,
                             step_predictions=step_predictions,
                             step_support_losses=step_losses if request.every_step else None)

    def _adapt_policy(self, model: LoadedPolicy, request: AdaptRequest) -> AdaptResponse:
        """RL: collect K rollouts of the requested task on the server, adapt, report the returns."""
        from workers.rl.adapt import adapt_exported

        family = model.spec.task.family
        key = _RL_TASK_KEYS[family]
        if request.support is not None or request.query.x:
            raise InvalidInput("support", f"an RL policy adapts to a task: give {{'task': {{'{key}': ...}}}}")
        if request.task is None or set(request.task) != {key}:
            raise InvalidInput("task", f"{family} policies take {{'{key}': ...}}")
        if request.return_weights:
            raise InvalidInput("return_weights", "not available for RL policies")
        if request.every_step:
            raise InvalidInput("every_step", "RL policies answer the return after every step already (returns); "
                               "for the paths ask trajectories")
        try:
            result = adapt_exported(model.path, request.task[key], rollouts=request.rollouts, steps=request.steps,
                                    lr=request.lr, horizon=request.horizon, trajectories=request.trajectories)
        except SpecError as exc:  # a task outside its space, a count over the limits
            raise InvalidInput(exc.field, exc.detail) from None
        if not all(np.isfinite(r) for r in result.returns):
            raise InvalidInput("lr", "adaptation diverged (non-finite returns); use a smaller lr")
        rl = model.spec.inner
        return AdaptResponse(model_id=model.id, kind="rl_policy", return_before=result.return_before,
                             return_after=result.return_after, returns=result.returns,
                             steps=len(result.returns) - 1, lr=request.lr or rl.lr, trajectories=result.trajectories,
                             goal=[float(v) for v in request.task[key]] if result.trajectories else None)

    def _store(self, model: LoadedModel, principal: Principal, adapted: Params, steps: int, lr: float) -> str:
        adapted_id = new_id()
        folder = registry.adapted_dir(self.settings.storage_path)
        folder.mkdir(parents=True, exist_ok=True)
        path: Path = folder / f"{adapted_id}.safetensors"
        tensors = {**{k: v.detach().cpu().contiguous() for k, v in model.buffers.items()},
                   **{k: v.detach().cpu().contiguous() for k, v in adapted.items()}}
        tmp = path.with_name(f".tmp-{path.name}")
        save_file(tensors, str(tmp))
        tmp.rename(path)
        with self.session_factory() as session:
            row = registry.get_model(session=session, model_id=model.id, scope=None)
            registry.add_adapted(session=session, adapted_id=adapted_id, model=row, tenant=principal.tenant,
                                 steps=steps, lr=lr, path=path)
            now = time.monotonic()
            if now - self._last_purge > PURGE_EVERY_S:  # the expired ones go as new ones come
                self._last_purge = now
                purged = registry.purge_adapted(session=session, ttl_s=self.settings.adapted_weights_ttl_s)
                if purged:
                    logger.info("adapted weights: %d expired ones deleted (MAML_ADAPTED_WEIGHTS_TTL_S)", purged)
        return adapted_id

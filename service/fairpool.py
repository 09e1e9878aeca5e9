"""A thread pool that shares its threads fairly between tenants.

``ThreadPoolExecutor`` runs its queue first come, first served: a tenant that sends many slow
queries at once holds every thread, and another tenant's query waits behind all of them.
:class:`FairPool` keeps one queue per tenant and, whenever a thread is free, starts the oldest
query of the tenant that has the fewest running; and no tenant runs more than ``max_per_tenant`` at
once, so with ``max_per_tenant < workers`` a thread is always left for somebody else.

>>> pool = FairPool(workers=4, max_per_tenant=3)
>>> future = pool.submit("acme", fn, *args, **kwargs)   # a concurrent.futures.Future
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class _Item:
    __slots__ = ("fn", "args", "kwargs", "future", "order")

    def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict, order: int) -> None:
        self.fn, self.args, self.kwargs, self.order = fn, args, kwargs, order
        self.future: Future[Any] = Future()


class FairPool:
    def __init__(self, *, workers: int, max_per_tenant: int, thread_name_prefix: str = "",
                 initializer: Callable[..., Any] | None = None, initargs: tuple = ()) -> None:
        if workers < 1 or max_per_tenant < 1:
            raise ValueError(f"workers ({workers}) and max_per_tenant ({max_per_tenant}) must be at least 1")
        self.workers = workers
        self.max_per_tenant = min(max_per_tenant, workers)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=thread_name_prefix,
                                        initializer=initializer, initargs=initargs)
        self._lock = threading.Lock()
        self._waiting: dict[str, deque[_Item]] = {}
        self._running: Counter[str] = Counter()
        self._order = itertools.count()
        self._closed = False

    def running(self) -> dict[str, int]:
        with self._lock:
            return dict(+self._running)

    def waiting(self) -> dict[str, int]:
        with self._lock:
            return {tenant: len(queue) for tenant, queue in self._waiting.items() if queue}

    def submit(self, tenant: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Queue ``fn(*args, **kwargs)`` for ``tenant``; RuntimeError once the pool is shut down."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the pool is shut down")
            item = _Item(fn, args, kwargs, next(self._order))
            self._waiting.setdefault(tenant, deque()).append(item)
            started = self._start_locked()
        self._launch(started)
        return item.future

    def shutdown(self) -> None:
        """Fail every query not started yet (RuntimeError); those running finish."""
        with self._lock:
            self._closed = True
            dropped = [item for queue in self._waiting.values() for item in queue]
            self._waiting.clear()
        for item in dropped:
            item.future.set_exception(RuntimeError("the pool is shut down"))
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _start_locked(self) -> list[tuple[str, _Item]]:
        """Take the queries to start now (under the lock): while a thread is free, the oldest query of
        a tenant with the fewest running and fewer than ``max_per_tenant``."""
        started = []
        busy = sum(self._running.values())
        while busy < self.workers:
            ready = [(self._running[t], q[0].order, t) for t, q in self._waiting.items()
                     if q and self._running[t] < self.max_per_tenant]
            if not ready:
                break
            tenant = min(ready)[2]
            started.append((tenant, self._waiting[tenant].popleft()))
            if not self._waiting[tenant]:
                del self._waiting[tenant]
            self._running[tenant] += 1
            busy += 1
        return started

    def _launch(self, started: list[tuple[str, _Item]]) -> None:
        for tenant, item in started:
            try:
                inner = self._pool.submit(item.fn, *item.args, **item.kwargs)
            except RuntimeError as exc:  # shut down meanwhile
                self._finished(tenant)
                item.future.set_exception(exc)
                continue
            inner.add_done_callback(lambda done, tenant=tenant, item=item: self._done(tenant, item, done))

    def _finished(self, tenant: str) -> None:
        with self._lock:
            self._running[tenant] -= 1
            if self._running[tenant] <= 0:
                del self._running[tenant]
            started = [] if self._closed else self._start_locked()
        self._launch(started)

    def _done(self, tenant: str, item: _Item, done: Future[Any]) -> None:
        # The thread is free before the caller hears the result, so a caller that submits again at
        # once finds it free.
        self._finished(tenant)
        if done.cancelled():
            item.future.cancel()
        elif (exc := done.exception()) is not None:
            item.future.set_exception(exc)
        else:
            item.future.set_result(done.result())

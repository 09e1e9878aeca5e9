"""service.fairpool.FairPool: one tenant's many slow queries cannot hold every thread, and a freed
thread goes to the tenant with the fewest running, before an older query of a busier tenant."""

from __future__ import annotations

import threading
import time

import pytest

from service.fairpool import FairPool


class Gate:
    """Tasks that record when they start and wait until released."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.release: dict[str, threading.Event] = {}
        self.lock = threading.Lock()

    def task(self, name: str) -> str:
        with self.lock:
            self.started.append(name)
            event = self.release.setdefault(name, threading.Event())
        assert event.wait(30), f"{name} was never released"
        return name

    def open(self, name: str) -> None:
        with self.lock:
            self.release.setdefault(name, threading.Event()).set()

    def wait_started(self, count: int) -> list[str]:
        deadline = time.monotonic() + 10
        while len(self.started) < count:
            assert time.monotonic() < deadline, self.started
            time.sleep(0.01)
        time.sleep(0.05)  # nothing else starts meanwhile
        return list(self.started)


def test_a_busy_tenant_leaves_a_thread_for_another() -> None:
    gate, pool = Gate(), FairPool(workers=2, max_per_tenant=1)
    try:
        heavy = [pool.submit("mallory", gate.task, f"m{i}") for i in range(6)]
        assert gate.wait_started(1) == ["m0"]  # one thread of two: the other stays free
        light = pool.submit("alice", gate.task, "a0")
        assert gate.wait_started(2) == ["m0", "a0"]
        gate.open("a0")
        assert light.result(10) == "a0"
        assert pool.running() == {"mallory": 1} and pool.waiting() == {"mallory": 5}
        for i in range(6):
            gate.open(f"m{i}")
        assert [f.result(10) for f in heavy] == [f"m{i}" for i in range(6)]
    finally:
        for name in list(gate.release):
            gate.open(name)
        pool.shutdown()


def test_a_freed_thread_goes_to_the_tenant_with_the_fewest_running() -> None:
    gate, pool = Gate(), FairPool(workers=2, max_per_tenant=2)
    try:
        for i in range(4):
            pool.submit("mallory", gate.task, f"m{i}")
        assert gate.wait_started(2) == ["m0", "m1"]
        pool.submit("alice", gate.task, "a0")  # queued after m2 and m3
        assert gate.wait_started(2) == ["m0", "m1"]
        gate.open("m0")
        # FIFO would start m2; alice has none running against mallory's one.
        assert gate.wait_started(3) == ["m0", "m1", "a0"]
        gate.open("m1")
        assert gate.wait_started(4)[-1] == "m2"
    finally:
        for name in [f"m{i}" for i in range(4)] + ["a0"]:
            gate.open(name)
        pool.shutdown()


def test_results_errors_and_shutdown() -> None:
    gate, pool = Gate(), FairPool(workers=1, max_per_tenant=1)
    assert pool.submit("t", lambda x, *, y: x + y, 2, y=3).result(10) == 5

    def fail() -> None:
        raise ValueError("bad query")

    with pytest.raises(ValueError, match="bad query"):
        pool.submit("t", fail).result(10)
    running = pool.submit("t", gate.task, "r")
    waiting = pool.submit("u", gate.task, "w")
    gate.wait_started(1)
    pool.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        waiting.result(10)
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit("t", gate.task, "late")
    gate.open("r")
    assert running.result(10) == "r"
    assert pool.running() == {}

"""Prometheus metrics of one service instance, on its own registry (several apps can live in a process)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)


class _LiveGauges(Collector):
    """Gauges read at scrape time: jobs by status (from the database) and the queue depth."""

    def __init__(self, jobs_by_status: Callable[[], dict[str, int]], queue_depth: Callable[[], int],
                 adapt_in_flight: Callable[[], int]) -> None:
        self.jobs_by_status, self.queue_depth, self.adapt_in_flight = jobs_by_status, queue_depth, adapt_in_flight

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("maml_jobs", "Jobs by status", labels=["status"])
        try:
            for status, count in self.jobs_by_status().items():
                jobs.add_metric([status], count)
        except Exception:  # a scrape must not fail because the database is busy
            logger.exception("could not count jobs for /metrics")
        yield jobs
        yield GaugeMetricFamily("maml_queue_depth", "Jobs waiting for a training slot", value=self.queue_depth())
        yield GaugeMetricFamily("maml_adapt_in_flight", "Adaptation queries running or waiting",
                                value=self.adapt_in_flight())


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.iterations = Counter("maml_job_iterations", "Meta-iterations reported by running jobs",
                                  registry=self.registry)
        self.jobs_finished = Counter("maml_jobs_finished", "Jobs that ended, by final status", ["status"],
                                     registry=self.registry)
        self.adapt_latency = Histogram(
            "maml_adapt_latency_seconds", "Adaptation query latency (validation, adaptation, prediction)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry)
        self.adapt_rejected = Counter("maml_adapt_rejected", "Adaptation queries refused as saturated (429)",
                                      registry=self.registry)

    def watch(self, *, jobs_by_status: Callable[[], dict[str, int]], queue_depth: Callable[[], int],
              adapt_in_flight: Callable[[], int]) -> None:
        self.registry.register(_LiveGauges(jobs_by_status, queue_depth, adapt_in_flight))

    def render(self) -> bytes:
        return generate_latest(self.registry)

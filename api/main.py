"""The application factory.

``create_app(settings)`` builds the FastAPI app; its lifespan opens the database, starts the
training backend (an embedded or remote Ray cluster by default), the job manager (which recovers
interrupted jobs), the sweep manager (which resumes interrupted sweeps; sweeps always run on Ray
Tune, started on first use) and the adaptation pool, and stops them in reverse order.

Run it with ``uvicorn --factory api.main:create_app`` (settings from ``MAML_*`` variables).
The ``backend`` hook starts the compute backend and returns the job runner; tests pass one that
trains in-process, so they need no Ray cluster.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from api.deps import Services
from api.errors import install_error_handlers
from api.middleware import BodySizeLimit
from api.routes import api_router, health, ui
from api.validation import install_validation_handler
from service import jobs
from service.adaptation import Adapter
from service.config import Settings, get_settings
from service.db import init_db, make_engine, make_session_factory
from service.events import StreamSlots
from service.keys import Authenticator
from service.manager import JobManager, RunFn, SweepManager, default_run_fn
from service.metrics import ServiceMetrics
from service.supervisor import RayChild

logger = logging.getLogger(__name__)
API_PREFIX = "/api/v1"
Backend = Callable[[Settings], RunFn]


def ray_backend(settings: Settings) -> RunFn:
    """Connect to Ray (or start an embedded local cluster) and train jobs on it."""
    from workers.raygroup import ensure_ray

    if settings.ray_process == "api":  # otherwise only the supervised reconciler joins Ray
        ensure_ray(settings.ray_address, num_cpus=settings.ray_num_cpus)
    return default_run_fn(settings)


def create_app(settings: Settings | None = None, *, backend: Backend = ray_backend) -> FastAPI:
    """The service app; ``settings`` default to :func:`service.config.get_settings` (the environment)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.prepare()
        settings.warn_insecure()
        engine = make_engine(settings)
        init_db(engine)
        session_factory = make_session_factory(engine)
        metrics = ServiceMetrics()
        run_fn = await run_in_threadpool(backend, settings)  # starting Ray takes seconds: off the loop
        manager = JobManager(settings=settings, session_factory=session_factory, run_fn=run_fn, metrics=metrics)
        adapter = Adapter(settings=settings, session_factory=session_factory, metrics=metrics)
        sweep_manager = SweepManager(settings=settings, session_factory=session_factory)

        def jobs_by_status() -> dict[str, int]:
            with session_factory() as session:
                return jobs.count_by_status(session=session)

        metrics.watch(jobs_by_status=jobs_by_status, queue_depth=lambda: manager.queue_depth,
                      adapt_in_flight=lambda: adapter.in_flight)
        await run_in_threadpool(manager.start)
        await run_in_threadpool(sweep_manager.start)
        ray_child = RayChild(settings) if manager.passive else None
        if ray_child is not None:
            ray_child.start()
        app.state.services = Services(engine=engine, session_factory=session_factory, manager=manager,
                                      adapter=adapter, sweeps=sweep_manager,
                                      authenticator=Authenticator(settings, session_factory), metrics=metrics,
                                      ray_child=ray_child, streams=StreamSlots(settings.max_streams_per_tenant,
                                                                                settings.adapt_retry_after_s))
        logger.info("maml-service ready: data in %s, database %s", settings.data_dir,
                    engine.url.render_as_string(hide_password=True))
        try:
            yield
        finally:
            app.state.services = None
            if ray_child is not None:
                await run_in_threadpool(ray_child.stop, settings.stop_timeout_s)
            await run_in_threadpool(sweep_manager.stop)
            await run_in_threadpool(manager.stop)
            adapter.close()
            engine.dispose()

    app = FastAPI(
        title="maml-service",
        version="0.1.0",
        description="Meta-training jobs (MAML, first-order MAML, Reptile) on Ray, hyperparameter sweeps on Ray "
        "Tune, a model registry, and adaptation queries. Authenticate with `Authorization: Bearer <key>`.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.services = None
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    install_error_handlers(app)
    install_validation_handler(app)
    app.include_router(health.router)
    app.include_router(api_router, prefix=API_PREFIX)
    app.include_router(ui.router)  # the dashboard at /
    return app

"""A fuzz of the OpenAPI schema (schemathesis): valid and invalid requests to every operation, with the
admin key; the service never answers 5xx."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from fastapi.testclient import TestClient
from helpers import ADMIN_TOKEN, fresh_database, in_process_runner, make_app, make_settings, submit, wait_for_job
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from starlette.types import Receive, Scope, Send

from workers.errors import TrainingError


def fuzz_runner(spec, **kwargs):
    """Fuzzed jobs are not trained (a 10-million-iteration spec is valid): they fail at once. The
    fixture's own job, named SEED_JOB, trains, so that real job and model ids can be fuzzed too."""
    if spec.name != SEED_JOB:
        raise TrainingError("not trained in the fuzz test", 0)
    return in_process_runner(spec, **kwargs)


HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SEED_JOB = "fuzz-seed"


class WithoutLifespan:
    """The app for schemathesis, whose lifespan the fixture's TestClient already runs."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, db_backend: str) -> Iterator[tuple[schemathesis.BaseSchema, dict[str, str]]]:
    """The schema of a running app (on one backend), and ids of a real job and model in it."""
    with fresh_database(db_backend) as url:
        settings = make_settings(tmp_path_factory.mktemp("fuzz"), database_url=url, max_body_bytes=64 * 1024,
                                 adapt_max_steps=50)
        yield from _fuzzed(settings)


def _fuzzed(settings) -> Iterator[tuple[schemathesis.BaseSchema, dict[str, str]]]:
    app = make_app(settings, fuzz_runner)
    with TestClient(app) as client:
        # A valid generated sweep would start Ray Tune inside the fuzz; sweeps stay queued instead
        # (their runs are tested in test_api_sweeps.py).
        app.state.services.sweeps.stop()
        job = submit(client, HEADERS, name=SEED_JOB, outer={"iterations": 2, "meta_batch_size": 2},
                     eval={"every": 2, "tasks": 1})
        model_id = wait_for_job(client, job["id"], HEADERS)["model_id"]
        yield schemathesis.openapi.from_asgi("/openapi.json", WithoutLifespan(app)), {
            "job_id": job["id"], "model_id": model_id}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
@pytest.mark.parametrize("ids", ["random", "real"])
def test_no_server_errors(fuzzed, mode, ids) -> None:
    # schemathesis' own pytest plugin does not run under this pytest yet: hypothesis drives it directly.
    schema, real_ids = fuzzed
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:
        names = {p.name for p in operation.path_parameters}
        fixed = {name: real_ids[name] for name in names & set(real_ids)} if ids == "real" else {}
        if ids == "real" and not fixed:
            continue

        @given(case=operation.as_strategy(generation_mode=mode, path_parameters=fixed or None))
        @settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def no_5xx(case) -> None:
            response = case.call(headers={**(case.headers or {}), **HEADERS}, timeout=30)
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:500]}")

        try:
            no_5xx()
        except Unsatisfiable:  # nothing to make invalid in this operation (GET /healthz)
            assert mode is GenerationMode.NEGATIVE

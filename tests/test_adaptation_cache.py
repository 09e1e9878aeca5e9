"""The adaptation service's model cache: bounded in bytes of tensors, least recently used evicted, a
model larger than the bound served without being cached. Real registry models (tiny sinusoid MLPs
and a user model with buffers), loaded and adapted in this process on a SQLite file."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from helpers import ADMIN_TOKEN, make_app, make_settings
from safetensors.torch import load_file

from service import jobs, registry
from service.adaptation import Adapter, LoadedModel, tensor_bytes
from service.db import init_db, make_engine, make_session_factory
from service.keys import Principal
from service.schemas import AdaptRequest
from workers.checkpoint import save_export
from workers.models import build_model
from workers.spec import JobSpec

ADMIN = Principal(tenant="admin", key_id=None, is_admin=True)
QUERY = {"support": {"x": [[0.1], [0.2]], "y": [[0.5], [0.7]]}, "query": {"x": [[0.3]]}}


def mlp_bytes(hidden: int, itemsize: int = 4) -> int:
    """An MLP 1 -> hidden -> 1: weights and biases, (hidden + hidden) + (hidden + 1) numbers."""
    return (3 * hidden + 1) * itemsize


def register(settings, session_factory, hidden: int = 0, *, dtype: str = "float32",
             model: dict[str, Any] | None = None) -> str:
    """A sinusoid model in the registry, exported untrained as a job would export it."""
    spec = JobSpec.model_validate({"name": f"mlp{hidden}", "task": {"family": "sinusoid"}, "dtype": dtype,
                                   "model": model or {"name": "mlp", "hidden": [hidden]}})
    module = build_model(spec.model, input_shape=(1,), output_dim=1, allowed_modules=settings.model_allowlist)
    with session_factory() as session:
        job = jobs.create_job(session=session, tenant="admin", spec=spec)
        export = save_export(settings.storage_path / "jobs" / job.id / "model", module.state_dict(), {
            "spec": spec.model_dump(mode="json"), "input_shape": [1], "output_dim": 1, "loss": "mse"})
        row = registry.register_model(session=session, job=job, export_dir=export, storage=settings.storage_path)
        jobs.finish_job(session=session, job_id=job.id, status="succeeded", model_id=row.id)
        return row.id


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    """Settings and a session factory on a SQLite file of the test's own."""
    settings = make_settings(tmp_path)
    settings.prepare()
    engine = make_engine(settings)
    init_db(engine)
    yield settings, make_session_factory(engine)
    engine.dispose()


def adapter_for(service, limit: int) -> Adapter:
    settings, session_factory = service
    return Adapter(settings=settings.model_copy(update={"model_cache_bytes": limit}), session_factory=session_factory)


def cached(adapter: Adapter) -> list[str]:
    return list(adapter._cache)  # least recently used first


def test_size_is_the_bytes_of_the_parameters_and_buffers(service) -> None:
    settings, session_factory = service
    adapter = adapter_for(service, 10**9)
    for hidden, dtype, itemsize in ((5, "float32", 4), (5, "float64", 8), (64, "float32", 4)):
        loaded = adapter.model(register(settings, session_factory, hidden, dtype=dtype), None)
        assert isinstance(loaded, LoadedModel) and loaded.nbytes == mlp_bytes(hidden, itemsize)
    # A user model with buffers of two dtypes: a 0-d scale, BatchNorm's running statistics (float32)
    # and its num_batches_tracked (int64), against the tensors of the file the registry holds.
    model_id = register(settings, session_factory, model={"factory": "user_models:make_model", "kwargs": {"width": 6}})
    loaded = adapter.model(model_id, None)
    assert isinstance(loaded, LoadedModel) and set(loaded.buffers) == {
        "scale", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    with session_factory() as session:
        weights = registry.weights_path(registry.get_model(session=session, model_id=model_id, scope=None))
    on_disk = load_file(str(weights))
    assert set(on_disk) == set(loaded.params) | set(loaded.buffers)
    expected = sum(t.numel() * t.element_size() for t in on_disk.values())
    # fc1 (6+6), bn (6+6), fc2 (6+1) float32 parameters; scale, 2 x 6 statistics float32; 1 int64
    assert loaded.nbytes == expected == (6 + 6 + 6 + 6 + 6 + 1) * 4 + (1 + 6 + 6) * 4 + 8
    assert adapter.cached_bytes == sum(m.nbytes for m in adapter._cache.values())
    # Tied weights (two names, one storage) count once.
    shared = torch.zeros(3, 4, dtype=torch.float64)
    assert tensor_bytes({"a": shared, "b": shared.t()}, {"c": torch.zeros(2, dtype=torch.int8)}) == 3 * 4 * 8 + 2


def test_least_recently_used_models_are_evicted_by_bytes(service) -> None:
    settings, session_factory = service
    small_a, small_b, medium, large = (register(settings, session_factory, h) for h in (10, 10, 40, 100))
    sizes = {small_a: mlp_bytes(10), small_b: mlp_bytes(10), medium: mlp_bytes(40), large: mlp_bytes(100)}
    limit = mlp_bytes(100) + mlp_bytes(10)  # 1328: large and one small one, or medium and both small
    adapter = adapter_for(service, limit)

    for model_id in (small_a, small_b, medium):
        adapter.model(model_id, None)
    assert cached(adapter) == [small_a, small_b, medium]
    assert adapter.cached_bytes == sizes[small_a] + sizes[small_b] + sizes[medium] <= limit
    adapter.model(small_a, None)  # a hit: now the most recently used
    assert cached(adapter) == [small_b, medium, small_a]
    # The large one needs room: medium and small_b go (least recent first), small_a stays.
    adapter.model(large, None)
    assert cached(adapter) == [small_a, large]
    assert adapter.cached_bytes == sizes[small_a] + sizes[large] == limit
    # Reloading medium evicts only as much as it must: small_a, the least recently used, then large.
    adapter.model(medium, None)
    assert cached(adapter) == [medium]
    assert adapter.cached_bytes == sizes[medium]
    adapter.model(small_b, None)
    adapter.model(small_a, None)
    assert cached(adapter) == [medium, small_b, small_a]
    # A hit is the very object cached: nothing is loaded again.
    assert adapter.model(small_b, None) is adapter.model(small_b, None)


def test_a_model_larger_than_the_bound_answers_and_is_not_cached(service, caplog) -> None:
    settings, session_factory = service
    small, huge = register(settings, session_factory, 4), register(settings, session_factory, 200)
    adapter = adapter_for(service, mlp_bytes(50))
    adapter.model(small, None)
    with caplog.at_level(logging.WARNING, logger="service.adaptation"):
        for _ in range(2):  # loaded afresh each time: served, never cached
            answer = adapter.adapt_sync(model_id=huge, principal=ADMIN, request=AdaptRequest.model_validate(QUERY))
            assert len(answer.predictions) == 1 and answer.support_loss_after < answer.support_loss_before
            assert cached(adapter) == [small] and adapter.cached_bytes == mlp_bytes(4)
    warnings = [r.getMessage() for r in caplog.records if huge in r.getMessage()]
    assert len(warnings) == 2 and f"holds {mlp_bytes(200)} bytes" in warnings[0]
    assert "served without caching" in warnings[0]
    assert adapter.model(huge, None) is not adapter.model(huge, None)
    adapter.close()


def test_another_tenants_cached_model_is_not_found(service) -> None:
    settings, session_factory = service
    model_id = register(settings, session_factory, 4)
    adapter = adapter_for(service, 10**6)
    adapter.model(model_id, None)
    from service.errors import NotFound

    with pytest.raises(NotFound):
        adapter.model(model_id, "other")
    assert adapter.model(model_id, "admin").id == model_id


def test_model_cache_bytes_is_a_setting_and_a_gauge(tmp_path: Path, monkeypatch) -> None:
    from service.config import Settings

    assert Settings().model_cache_bytes == 512 * 1024 * 1024
    monkeypatch.setenv("MAML_MODEL_CACHE_BYTES", "1000")
    assert Settings().model_cache_bytes == 1000
    for bad in ("0", "-1"):
        monkeypatch.setenv("MAML_MODEL_CACHE_BYTES", bad)
        with pytest.raises(ValueError, match="model_cache_bytes"):
            Settings()
    monkeypatch.delenv("MAML_MODEL_CACHE_BYTES")

    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    settings = make_settings(tmp_path, model_cache_bytes=mlp_bytes(50))
    with TestClient(make_app(settings)) as client:
        services = client.app.state.services
        small, huge = register(settings, services.session_factory, 8), register(settings, services.session_factory, 60)
        for model_id in (small, huge):
            r = client.post(f"/api/v1/models/{model_id}/adapt", json=QUERY, headers=headers)
            assert r.status_code == 200, r.text
        assert f"maml_adapt_model_cache_bytes {float(mlp_bytes(8))}" in client.get("/metrics").text

"""Settings: MAML_ environment variables, DATABASE_URL, lists, and secrets refused outside development."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.config import Settings


def test_environment_variables(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("MAML_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MAML_MODEL_ALLOWLIST", "mypkg.models, other")
    monkeypatch.setenv("MAML_DATA_ROOTS", f"{tmp_path}/a,{tmp_path}/b")
    monkeypatch.setenv("MAML_MAX_CONCURRENT_JOBS", "3")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("MAML_DATABASE_URL", raising=False)
    s = Settings()
    assert s.model_allowlist == ["mypkg.models", "other"]
    assert [str(p) for p in s.data_roots] == [f"{tmp_path}/a", f"{tmp_path}/b"]
    assert s.max_concurrent_jobs == 3
    assert s.sqlalchemy_url == f"sqlite:///{tmp_path.resolve()}/maml.db"
    assert s.storage_path == tmp_path / "storage"
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://u:p@db/maml")
    assert Settings().sqlalchemy_url == "postgresql+psycopg://u:p@db/maml"
    monkeypatch.setenv("MAML_MODEL_ALLOWLIST", '["a.b"]')
    assert Settings().model_allowlist == ["a.b"]


def test_production_refuses_missing_or_weak_admin_tokens(monkeypatch) -> None:
    monkeypatch.delenv("MAML_ADMIN_TOKEN", raising=False)
    with pytest.raises(ValidationError, match="admin_token"):
        Settings(env="production")
    for weak in ("changeme", "short-secret", "password"):
        with pytest.raises(ValidationError, match="admin_token"):
            Settings(env="production", admin_token=weak)
    assert Settings(env="production", admin_token="f" * 8 + "0123456789abcdef").env == "production"
    assert Settings(env="development", admin_token="changeme").admin_token is not None  # a warning only
    with pytest.raises(ValidationError, match="max_concurrent_jobs"):
        Settings(max_concurrent_jobs=0)


def test_drivers_in_the_api_process_mean_the_api_process_joins_ray(monkeypatch) -> None:
    monkeypatch.delenv("MAML_RAY_PROCESS", raising=False)
    assert (Settings().ray_process, Settings().driver_placement) == ("child", "ray")
    monkeypatch.setenv("MAML_DRIVERS", "process")
    assert (Settings().ray_process, Settings().driver_placement) == ("api", "process")
    monkeypatch.setenv("MAML_RAY_PROCESS", "child")  # asked for both: which process joins Ray?
    with pytest.raises(ValidationError, match="ray_process: 'child' needs the drivers on Ray"):
        Settings()

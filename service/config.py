"""Service settings: one ``BaseSettings`` class, read from ``MAML_*`` environment variables.

Read it through :func:`get_settings` (cached), or build ``Settings(...)`` explicitly and hand it to
``api.main.create_app`` (tests do). The database and the storage default to places under
``data_dir``, so one ``MAML_DATA_DIR`` moves a deployment; the dataset cache is shared by default.
This is the one place that reads the environment: the service hands ``data_root`` and ``cache_path``
to the workers explicitly, and the engine has no defaults of its own.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

logger = logging.getLogger(__name__)

# Secrets that appear in docs and templates: refused outside development.
_WEAK_SECRETS = {"changeme", "changethis", "admin", "secret", "password", "token", "test", "maml", "default"}
_MIN_SECRET_LENGTH = 16


def _split_list(value: object) -> object:
    """``a,b,c`` (or a JSON list) from the environment as a list; empty string as an empty list."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Settings of the service; each field is ``MAML_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="MAML_", extra="ignore", populate_by_name=True,
                                      validate_default=True)

    env: Literal["development", "production"] = Field(
        "development", description="production refuses a missing or weak admin token")
    data_dir: Path = Field(Path(".data"), description="root of the database file, storage and cache")
    database_url: str | None = Field(
        None, validation_alias=AliasChoices("MAML_DATABASE_URL", "DATABASE_URL", "database_url"),
        description="SQLAlchemy URL (postgresql+psycopg://...); default: SQLite file data_dir/maml.db")
    storage_dir: Path | None = Field(None, description="weights, checkpoints, runs; default data_dir/storage")
    worker_start_timeout_s: float = Field(
        600.0, gt=0, description="how long a job's Ray workers may wait for the cluster's CPUs and GPUs (an "
        "autoscaler may add nodes) before the job fails naming what it asked for")
    checkpoint_uri: str | None = Field(
        None, description="where job checkpoints go instead of the storage path: a URI that pyarrow.fs opens "
        "(s3://bucket/prefix, gs://..., hdfs://...); jobs use <uri>/jobs/<job id>/checkpoints")
    cache_dir: Path = Field(
        Path("~/.cache/maml-service"),
        description="decoded dataset caches (Omniglot), shared by runs; the service passes it to its workers")
    data_root: Path | None = Field(
        None, description="default dataset folder (Omniglot without task.path; the folder or its omniglot/ "
        "holds the zips); always allowed as a data root. Unset: Omniglot jobs must give task.path")
    data_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="folders a job's task.path may point into (comma-separated in the environment)")
    admin_token: SecretStr | None = Field(
        None, description="the admin bearer key (creates tenant keys); at least 16 characters in production")
    model_allowlist: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="module prefixes a model.factory may come from (comma-separated); empty: none")
    ray_address: str | None = Field(
        None, validation_alias=AliasChoices("MAML_RAY_ADDRESS", "RAY_ADDRESS", "ray_address"),
        description="Ray cluster to join (or RAY_ADDRESS); default: an embedded local one")
    ray_num_cpus: int | None = Field(None, ge=1, description="CPUs of the embedded Ray cluster (default: all)")
    drivers: Literal["process", "ray"] | None = Field(
        None, description="where jobs and sweeps are driven: 'ray', a detached actor per run on the Ray cluster "
        "(stopping or killing a replica interrupts no training), or 'process', threads of this process; "
        "default: 'ray' with MAML_RAY_ADDRESS or MAML_RAY_PROCESS=child, else 'process'")
    ray_process: Literal["child", "api"] = Field(
        "child", description="which process joins Ray: 'child', a reconciler the API supervises and restarts (the "
        "API process cannot die with a raylet; drivers run on Ray), or 'api', the API process itself (the only choice, "
        "and the default, with MAML_DRIVERS=process)")
    reconcile_interval_s: float = Field(
        0.25, gt=0, le=60, description="how often queued runs are looked for and runs whose driver died are requeued")
    driver_cpus: float = Field(
        0.25, ge=0, le=64, description="CPUs each driver actor reserves on Ray; above 0, no driver is placed on "
        "a node that offers none (the head, the API replicas' nodes)")
    max_concurrent_jobs: int = Field(1, ge=1, le=256, description="jobs trained at the same time")
    max_job_attempts: int = Field(
        3, ge=1, le=100, description="starts of one job (restarts included) before it is marked failed")
    max_concurrent_sweeps: int = Field(
        1, ge=1, le=64, description="sweeps run at the same time (their trials share the Ray cluster)")
    lease_ttl_s: float = Field(
        20.0, ge=1, le=3600, description="a replica's lease on a run it drives, renewed every quarter of it; "
        "after a replica dies, another takes its runs over within this time")
    max_sweep_attempts: int = Field(
        3, ge=1, le=100, description="starts of one sweep (resumes after restarts included) before it is failed")
    report_every: int = Field(1, ge=1, description="iterations between progress reports from the trainer")
    metrics_flush_s: float = Field(
        0.5, ge=0, le=60, description="at most this often a running job's metrics are written to the database")
    stop_timeout_s: float = Field(30.0, ge=0, description="on shutdown, wait this long for running jobs")
    max_streams_per_tenant: int = Field(
        16, ge=1, le=10_000, description="event streams (SSE) one tenant may hold open on one replica; more: 429")
    events_poll_s: float = Field(0.25, gt=0, le=10, description="how often the SSE stream looks for news")
    adapt_max_concurrency: int = Field(4, ge=1, le=256, description="adaptation queries computed at once")
    adapt_queue_limit: int = Field(
        16, ge=0, le=10_000, description="adaptation queries waiting beyond those; more answer 429")
    adapt_max_running_per_tenant: int | None = Field(
        None, ge=1, le=256, description="adaptation queries of one tenant computed at once (default: "
        "MAML_ADAPT_MAX_CONCURRENCY - 1, at least 1): a slot stays free for the other tenants, whose queries "
        "start first when a slot frees (the tenant with the fewest running goes next)")
    adapt_retry_after_s: int = Field(1, ge=1, le=3600, description="Retry-After of a 429 answer")
    adapt_max_support: int = Field(1000, ge=1, description="most support items in one adaptation query")
    adapt_max_query: int = Field(1000, ge=1, description="most query items in one adaptation query")
    adapt_max_steps: int = Field(1000, ge=0, description="most adaptation steps in one query")
    adapt_max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="largest uploaded image (width x height) before decoding")
    adapt_max_request_pixels: int = Field(
        32 * 1024 * 1024, ge=1, description="pixels of all the images of one adaptation query together")
    adapt_max_work: int = Field(
        100_000, ge=1, description="most adaptation steps x support items in one query (steps over the whole "
        "support set: their cost grows with both)")
    adapt_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="an adaptation query still adapting after this long stops (422 naming steps)")
    model_cache_bytes: int = Field(
        512 * 1024 * 1024, gt=0, description="bytes of loaded models (their parameters and buffers) kept in "
        "memory for adaptation, least recently used evicted; a larger model is served without being cached")
    adapted_weights_ttl_s: float = Field(
        86_400.0, gt=0, description="adapted weights stored with return_weights are kept this long, then deleted")
    max_metric_points: int = Field(
        10_000, ge=10, description="past this many points a job's metric series keeps every k-th iteration "
        "(k = iterations / this), every evaluation and the last iteration")
    max_model_parameters: int = Field(
        50_000_000, ge=1, description="most parameters a job's model may have (counted from the spec at "
        "submission, without building it); more answers 422 naming model")
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="larger request bodies answer 413")
    auth_cache_s: float = Field(5.0, ge=0, description="seconds a verified API key is remembered")
    tensorboard_dir: Path | None = Field(
        None, description="write TensorBoard event files here: one run per job (<dir>/<tenant>/job-<id>) and per "
        "sweep trial (<dir>/<tenant>/sweep-<id>/<trial>); unset: none (service.tracking)")
    mlflow_tracking_uri: str | None = Field(
        None, validation_alias=AliasChoices("MAML_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI", "mlflow_tracking_uri"),
        description="also log jobs and trials to MLflow (mlflow's own MLFLOW_TRACKING_URI): params from the spec, "
        "metrics per iteration, the registered model as an artefact; unset: no MLflow")
    # Per-tenant quotas (service.quotas): the defaults; an admin overrides them per tenant (PUT /quotas/{tenant}).
    quota_jobs: int = Field(16, ge=0, le=2**31 - 1, description="per tenant: jobs queued or running at once (429)")
    quota_sweeps: int = Field(8, ge=0, le=2**31 - 1, description="per tenant: sweeps queued or running at once (429)")
    quota_workers: int = Field(
        64, ge=0, le=2**31 - 1, description="per tenant: Ray workers of its queued and running jobs, and of its "
        "sweeps' concurrent trials (max_concurrent_trials x workers per trial) (429)")
    quota_cpus: int = Field(256, ge=0, le=2**31 - 1, description="per tenant: CPUs of those workers (429)")
    quota_gpus: int = Field(16, ge=0, le=2**31 - 1, description="per tenant: GPUs of those workers (429)")
    quota_iterations: int = Field(
        1_000_000, ge=0, le=2**31 - 1, description="per job, and per trial of a sweep: outer.iterations (403)")
    quota_trials: int = Field(1000, ge=0, le=2**31 - 1, description="per sweep: num_samples x grid points (403)")
    quota_models: int = Field(
        1000, ge=0, le=2**31 - 1, description="per tenant: stored models, counting one for each queued or running "
        "job and sweep (each registers one when it succeeds) (403 at submission)")
    quota_model_bytes: int = Field(
        10 * 1024**3, ge=0, le=2**62, description="per tenant: bytes of stored model files; a submission is refused "
        "once they reach it (403)")
    quota_adaptations: int = Field(
        8, ge=0, le=2**31 - 1, description="per tenant and API replica: adaptation queries in flight (429)")
    quota_retry_after_s: int = Field(
        30, ge=1, le=3600, description="Retry-After of a 429 for a jobs, sweeps, workers, CPUs or GPUs quota")
    quota_cache_s: float = Field(
        5.0, ge=0, le=3600, description="seconds a replica remembers a tenant's adaptations quota (an admin's "
        "change reaches the other replicas within this time)")

    @field_validator("data_roots", "model_allowlist", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("data_root", "cache_dir", "tensorboard_dir", mode="after")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        # Handed to Ray workers, whose working directory is not this process's.
        return value.expanduser().absolute() if value is not None else None

    @model_validator(mode="after")
    def _ray_process(self) -> Settings:
        # Runs driven in this process (MAML_DRIVERS=process) join Ray from this process: it is then
        # the API process that joins Ray, whatever the default says.
        if self.drivers == "process" and self.ray_process == "child":
            if "ray_process" in self.model_fields_set:
                raise ValueError("ray_process: 'child' needs the drivers on Ray; with MAML_DRIVERS=process the "
                                 "API process drives the runs and joins Ray itself (set MAML_RAY_PROCESS=api)")
            self.ray_process = "api"
        return self

    @model_validator(mode="after")
    def _secure(self) -> Settings:
        token = self.admin_token.get_secret_value() if self.admin_token is not None else None
        weak = token is not None and (len(token) < _MIN_SECRET_LENGTH or token.lower() in _WEAK_SECRETS)
        if self.env != "development":
            if token is None:
                raise ValueError("admin_token: MAML_ADMIN_TOKEN must be set outside development")
            if weak:
                raise ValueError(f"admin_token: refused outside development: use at least "
                                 f"{_MIN_SECRET_LENGTH} random characters (e.g. `openssl rand -hex 32`)")
        return self

    def warn_insecure(self) -> None:
        """Log what is acceptable in development only (called once at start-up)."""
        if self.admin_token is None:
            logger.warning("MAML_ADMIN_TOKEN is not set: no admin key, so no tenant key can be created")
        elif len(self.admin_token.get_secret_value()) < _MIN_SECRET_LENGTH:
            logger.warning("MAML_ADMIN_TOKEN is weak; it would be refused with MAML_ENV=production")

    @field_validator("checkpoint_uri")
    @classmethod
    def _checkpoint_uri(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        scheme, sep, rest = value.partition("://")
        if not sep or not scheme.isidentifier() or not rest.strip("/?"):
            raise ValueError(f"{value!r} is not a URI such as s3://bucket/prefix (a local folder: use storage_dir)")
        return value

    # -- derived paths ---------------------------------------------------------------------------

    @property
    def driver_placement(self) -> Literal["process", "ray"]:
        return self.drivers or ("ray" if self.ray_address or self.ray_process == "child" else "process")

    @property
    def storage_path(self) -> Path:
        return (self.storage_dir or self.data_dir / "storage").expanduser()

    def job_checkpoint_dir(self, job_id: str) -> str | Path:
        """Where a job's checkpoints live: under ``checkpoint_uri`` when set, else the storage path."""
        from workers.checkpoint import join

        return join(self.checkpoint_uri or self.storage_path, "jobs", job_id, "checkpoints")

    @property
    def cache_path(self) -> Path:
        return self.cache_dir.expanduser()

    @property
    def sqlalchemy_url(self) -> str:
        """``database_url`` with PostgreSQL on psycopg 3 (``postgres://`` and ``postgresql://`` name no
        driver, and SQLAlchemy's default for them is psycopg2); the SQLite file under data_dir if unset."""
        if not self.database_url:
            return f"sqlite:///{(self.data_dir.expanduser() / 'maml.db').resolve()}"
        scheme, sep, rest = self.database_url.partition("://")
        if sep and scheme in ("postgres", "postgresql"):
            return f"postgresql+psycopg://{rest}"
        return self.database_url

    @property
    def allowed_data_roots(self) -> list[Path]:
        """The resolved dataset roots: ``data_roots`` plus ``data_root`` (a default is always allowed)."""
        roots = [*self.data_roots, *([self.data_root] if self.data_root is not None else [])]
        unique: list[Path] = []
        for root in roots:
            resolved = root.expanduser().resolve()
            if resolved not in unique:
                unique.append(resolved)
        return unique

    def prepare(self) -> None:
        """Create the directories the service writes to."""
        for path in (self.data_dir.expanduser(), self.storage_path, self.cache_path):
            path.mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    """The process's settings, from the environment, read once."""
    return Settings()

"""The model registry: trained models (and adapted weights) on the storage path, indexed in the database.

Layout under ``storage``::

    models/<model_id>/model.safetensors, model.json     (as exported by workers.run.Trainer)
    adapted/<adapted_id>.safetensors                     (return_weights of an adaptation query)
"""

from __future__ import annotations

import json
import logging
import shutil
from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db import AdaptedWeights, Job, Model, new_id, utcnow
from service.errors import NotFound
from service.schemas import finite_metrics

logger = logging.getLogger(__name__)
WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "model.json"


def models_dir(storage: Path) -> Path:
    return storage / "models"


def adapted_dir(storage: Path) -> Path:
    return storage / "adapted"


def register_model(*, session: Session, job: Job, export_dir: Path, storage: Path) -> Model:
    """Register the model a job exported (the caller commits); see :func:`register_export`."""
    return register_export(session=session, tenant=job.tenant, name=job.name, export_dir=export_dir,
                           storage=storage, job_id=job.id, default_iteration=job.total)


def register_export(*, session: Session, tenant: str, name: str, export_dir: Path, storage: Path,
                    job_id: str | None = None, sweep_id: str | None = None, default_iteration: int = 0) -> Model:
    """Copy an exported model into the registry and add its row (the caller commits).

    Its source is a job (``job_id``) or a sweep (``sweep_id``, for its best trial). Copied, not
    moved: the run folder stays whole, so a crash before the commit re-registers the same export
    on the next start.
    """
    if (job_id is None) == (sweep_id is None):
        raise ValueError("give exactly one source: job_id or sweep_id")
    info = json.loads((export_dir / INFO_FILE).read_text())
    model_id = new_id()
    target = models_dir(storage) / model_id
    tmp = target.with_name(f".tmp-{model_id}")
    shutil.copytree(export_dir, tmp)
    tmp.rename(target)  # atomic: a model folder is whole or absent
    model = Model(id=model_id, tenant=tenant, job_id=job_id, sweep_id=sweep_id, name=name, spec=info["spec"],
                  input_shape=[int(d) for d in info["input_shape"]], output_dim=int(info["output_dim"]),
                  loss=info["loss"], iteration=int(info.get("iteration", default_iteration)),
                  eval_metrics=finite_metrics(info.get("eval_metrics") or {}), path=str(target))
    session.add(model)
    session.flush()
    return model


def get_model(*, session: Session, model_id: str, scope: str | None) -> Model:
    model = session.get(Model, model_id)
    if model is None or (scope is not None and model.tenant != scope):
        raise NotFound("model", model_id)
    return model


def list_models(*, session: Session, scope: str | None, limit: int = 100, offset: int = 0) -> tuple[list[Model], int]:
    query, counted = select(Model), select(func.count()).select_from(Model)
    if scope is not None:
        query, counted = query.where(Model.tenant == scope), counted.where(Model.tenant == scope)
    count = session.scalar(counted) or 0
    rows = session.scalars(query.order_by(Model.created_at.desc(), Model.id.desc()).limit(limit).offset(offset))
    return list(rows.all()), count


def weights_path(model: Model) -> Path:
    path = Path(model.path) / WEIGHTS_FILE
    if not path.is_file():
        raise NotFound("model weights", model.id)
    return path


def add_adapted(*, session: Session, adapted_id: str, model: Model, tenant: str, steps: int, lr: float,
                path: Path) -> AdaptedWeights:
    row = AdaptedWeights(id=adapted_id, model_id=model.id, tenant=tenant, steps=steps, lr=lr, path=str(path))
    session.add(row)
    session.commit()
    return row


def get_adapted(*, session: Session, adapted_id: str, scope: str | None,
                ttl_s: float | None = None) -> AdaptedWeights:
    """Adapted weights of the caller's tenant; NotFound once older than ``ttl_s`` (even before the purge)."""
    row = session.get(AdaptedWeights, adapted_id)
    if row is None or (scope is not None and row.tenant != scope) or not Path(row.path).is_file():
        raise NotFound("adapted weights", adapted_id)
    if ttl_s is not None and row.created_at < utcnow() - timedelta(seconds=ttl_s):
        raise NotFound("adapted weights", adapted_id)
    return row


def purge_adapted(*, session: Session, ttl_s: float, limit: int = 1000) -> int:
    """Delete up to ``limit`` adapted weights older than ``ttl_s``, files then rows; how many."""
    cutoff = utcnow() - timedelta(seconds=ttl_s)
    rows = session.scalars(select(AdaptedWeights).where(AdaptedWeights.created_at < cutoff).limit(limit)).all()
    for row in rows:
        Path(row.path).unlink(missing_ok=True)
        session.delete(row)
    session.commit()
    return len(rows)

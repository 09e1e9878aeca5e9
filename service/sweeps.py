"""Sweeps: the submission policy and data access.

A sweep is a ``workers.sweep_spec.SweepSpec`` (a base job, a search space, a scheduler);
``service.manager.SweepManager`` runs it on Ray Tune. What sweeps share with jobs (get, list,
cancel, claim, finish, recover) is in :mod:`service.runs`; here is what only sweeps have: the
policy over the search space, their creation and their trial snapshot. Data access functions are
keyword-only and take the session.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from service import jobs
from service.config import Settings
from service.db import Sweep
from service.errors import InvalidInput
from service.runs import MAX_ERROR_CHARS
from service.schemas import finite_metrics
from workers.sweep_spec import SweepSpec, TrialInfo, apply_config

if TYPE_CHECKING:
    from workers.sweep import SweepResult

# Space paths whose values the server's policy looks at (model factories, dataset paths).
_POLICY_SECTIONS = ("model", "task")


# ------------------------------------------------------------------------------------------ policy


def check_sweep(sweep: SweepSpec, settings: Settings) -> SweepSpec:
    """Apply the job policy (:func:`service.jobs.check_spec`) to the base and to every value the
    space can give a ``model``/``task`` field; returns the sweep with dataset paths made absolute.

    Raises InvalidInput naming the field: ``base.model.factory``, or ``space.model`` with the value
    and the policy's reason.
    """
    try:
        base = jobs.check_spec(sweep.base, settings)
    except InvalidInput as exc:
        raise InvalidInput(f"base.{exc.field}", exc.reason) from exc
    space: dict[str, Any] = {}
    for path, domain in sweep.space.items():
        space[path] = domain.model_dump()
        if path.split(".")[0] not in _POLICY_SECTIONS:
            continue
        checked = [_checked_value(base, path, value, settings) for value in domain.value]
        if domain.kind in ("choice", "grid"):
            space[path] = {domain.kind: checked}
    data = sweep.model_dump(mode="json")
    data.update(base=base.model_dump(mode="json"), space=space)
    return SweepSpec.model_validate(data)


def _checked_value(base: Any, path: str, value: Any, settings: Settings) -> Any:
    """``value`` at ``path`` after the policy: as given, but a dataset path made absolute (the
    SweepSpec already checked that the value makes a valid spec)."""
    try:
        checked = jobs.check_spec(apply_config(base, {path: value}), settings)
    except InvalidInput as exc:
        raise InvalidInput(f"space.{path}",
                           f"{json.dumps(value, default=str)} is refused: {exc.field}: {exc.reason}") from exc
    resolved = getattr(checked.task, "path", None)
    if path == "task.path":
        return resolved
    if path == "task" and isinstance(value, dict) and value.get("path") is not None:
        return {**value, "path": resolved}
    return value


# ------------------------------------------------------------------------------------- data access


def create_sweep(*, session: Session, tenant: str, spec: SweepSpec) -> Sweep:
    sweep = Sweep(tenant=tenant, name=spec.name, spec=spec.model_dump(mode="json"), status="queued", trials=[],
                  attempts=0, cancel_requested=False)
    session.add(sweep)
    session.commit()
    return sweep


def trial_rows(trials: list[TrialInfo]) -> list[dict[str, Any]]:
    """Trials as stored: JSON, with non-finite metrics (also in the history) as null."""
    rows = []
    for trial in trials:
        row = trial.model_dump(mode="json")
        row["metrics"] = finite_metrics(trial.metrics)
        row["history"] = [[iteration, finite_metrics({"v": value})["v"]] for iteration, value in trial.history]
        rows.append(row)
    return rows


def record_trials(*, session: Session, sweep_id: str, trials: list[dict[str, Any]]) -> None:
    session.execute(update(Sweep).where(Sweep.id == sweep_id).values(trials=trials))
    session.commit()


def no_best(result: SweepResult) -> str:
    """Why a sweep that ended without a completed trial failed: its trials by status, and their errors."""
    summary = ", ".join(f"{n} {status}" for status, n in result.counts().items()) or "no trials"
    errors = sorted({t.error for t in result.trials if t.error})
    text = f"no trial completed ({summary})"
    if errors:
        text += "; errors: " + "; ".join(errors[:3])
    return text[:MAX_ERROR_CHARS]

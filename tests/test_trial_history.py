"""A sweep trial's metric history, without Ray: it grows with Tune's reports, stays bounded with its
newest point kept, is stored as JSON (non-finite values as null) and served by the API; a row stored
before the history existed still loads."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fastapi.testclient import TestClient
from helpers import ADMIN_TOKEN, make_app, make_settings

from service import sweeps
from workers import sweep as sweep_mod
from workers.sweep import HISTORY_POINTS, _Hooks, _on_event, add_point
from workers.sweep_spec import SweepSpec, TrialInfo

API = "/api/v1"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SPEC = SweepSpec.model_validate({
    "name": "hist", "base": {"outer": {"iterations": 8}}, "space": {"outer.lr": {"grid": [0.001, 0.1]}},
    "metric": "eval/loss", "mode": "min"})


def test_the_history_is_bounded_at_200_points_keeping_its_shape_and_newest() -> None:
    history: list[tuple[int, float | None]] = []
    for i in range(1, HISTORY_POINTS + 1):
        add_point(history, i, float(i))
    assert len(history) == HISTORY_POINTS == 200
    add_point(history, 201, 201.0)  # full: every other point, and the newest
    assert len(history) == 101 and history[0] == (1, 1.0) and history[1] == (3, 3.0) and history[-1] == (201, 201.0)
    for i in range(202, 5000):
        add_point(history, i, float(i))
        assert len(history) <= HISTORY_POINTS and history[-1] == (i, float(i))
    xs = [x for x, _ in history]
    assert xs == sorted(xs) and xs[0] == 1  # the start and the end survive
    # A trial restarted from a checkpoint reports again from there: those points are replaced.
    replay: list[tuple[int, float | None]] = [(1, 1.0), (2, 2.0), (3, 3.0)]
    add_point(replay, 2, 0.5)
    assert replay == [(1, 1.0), (2, 0.5)]


class _Trial(SimpleNamespace):
    """What ``_trial_info`` reads of a Tune trial."""


def _trial(trial_id: str) -> _Trial:
    return _Trial(trial_id=trial_id, config={"outer.lr": 0.001}, status="RUNNING", checkpoint=None,
                  metric_analysis={}, run_metadata=SimpleNamespace(last_result={}, last_result_time=0.0))


def _report(key: str, trials: list, trial: _Trial, iteration: int, loss: float) -> None:
    """As Tune does: ``on_trial_result`` before the result is applied, then the end of its step."""
    result = {"iteration": iteration, "training_iteration": iteration, "eval/loss": loss}
    _on_event(key, "result", trials, trial, result)
    trial.run_metadata.last_result, trial.run_metadata.last_result_time = result, float(iteration)
    _on_event(key, "step", trials, None)


def test_the_history_grows_with_reports_and_is_published_with_each_snapshot(tmp_path: Path) -> None:
    published: list[list[TrialInfo]] = []
    hooks = _Hooks(sweep=SPEC, path=tmp_path, on_trial_update=published.append, should_stop=None,
                   should_interrupt=None)
    key = "test-trial-history"
    sweep_mod._LIVE[key] = hooks
    try:
        a, b = _trial("a"), _trial("b")
        trials = [a, b]
        _on_event(key, "start", trials, a)
        _report(key, trials, a, 1, 2.0)
        _report(key, trials, a, 2, 1.5)
        # Two results of one trial before one step: both are kept.
        _on_event(key, "result", trials, a, {"iteration": 3, "eval/loss": 1.2})
        _report(key, trials, a, 4, float("nan"))
        _report(key, trials, b, 1, 3.0)
    finally:
        del sweep_mod._LIVE[key]
    last = {t.trial_id: t for t in published[-1]}
    assert last["a"].history == [(1, 2.0), (2, 1.5), (3, 1.2), (4, None)]
    assert last["a"].metric is None and last["a"].iteration == 4
    assert last["b"].history == [(1, 3.0)]
    assert [len(t.history) for t in (s[0] for s in published)] == [1, 2, 4, 4]  # it grows with the reports


def test_stored_rows_carry_the_history_as_json_and_old_rows_still_load() -> None:
    trial = TrialInfo(trial_id="a", status="completed", config={}, iteration=3, total_iterations=3, reports=3,
                      metric=0.5, history=[(1, 2.0), (2, math.inf), (3, 0.5)])
    row = sweeps.trial_rows([trial])[0]
    assert row["history"] == [[1, 2.0], [2, None], [3, 0.5]]
    assert TrialInfo.model_validate(json.loads(json.dumps(row, allow_nan=False))).history == [(1, 2.0), (2, None),
                                                                                               (3, 0.5)]
    old = {k: v for k, v in row.items() if k != "history"}
    assert TrialInfo.model_validate(old).history == []


def test_the_api_serves_each_trials_history_and_an_old_row_without_one(tmp_path: Path) -> None:
    trials = [TrialInfo(trial_id=f"t{i}", status="running", config={"outer.lr": 0.001}, iteration=2,
                        total_iterations=8, reports=2, metric=1.0, history=[(1, 2.0), (2, 1.0)]) for i in range(2)]
    rows: list[dict[str, Any]] = sweeps.trial_rows(trials)
    del rows[1]["history"]  # stored before the history existed
    with TestClient(make_app(make_settings(tmp_path, reconcile_interval_s=60, lease_ttl_s=3600))) as client:
        factory = client.app.state.services.session_factory  # type: ignore[attr-defined]
        with factory() as session:
            sweep_id = sweeps.create_sweep(session=session, tenant="acme", spec=SPEC).id
            sweeps.record_trials(session=session, sweep_id=sweep_id, trials=rows)
        got = client.get(f"{API}/sweeps/{sweep_id}", headers=ADMIN)
        assert got.status_code == 200, got.text
    served = {t["trial_id"]: t for t in got.json()["trials"]}
    assert served["t0"]["history"] == [[1, 2.0], [2, 1.0]]
    assert served["t1"]["history"] == []

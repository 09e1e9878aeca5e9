"""The ``maml`` CLI against a real HTTP server (uvicorn in a thread; jobs train in-process)."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml
from helpers import ADMIN_TOKEN, make_app, make_settings
from typer.testing import CliRunner

from cli.app import app

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("database")  # each test on SQLite and on PostgreSQL


class _Tail(logging.Handler):
    """The last records logged while the server starts: what a failed start shows."""

    def __init__(self, size: int = 50) -> None:
        super().__init__(logging.DEBUG)
        self.lines: deque[str] = deque(maxlen=size)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # uvicorn's start-up lines (info) go to the log tail a failed start shows; requests are not logged.
    # Runs this module stores straight into the database stay as stored: the queues look for such rows
    # at their start and then only every minute (the submitted ones start at once).
    settings = make_settings(tmp_path, reconcile_interval_s=60, lease_ttl_s=3600)
    srv = uvicorn.Server(uvicorn.Config(make_app(settings), host="127.0.0.1", port=port,
                                        log_level="info", access_log=False))
    tail = _Tail()
    loggers = [logging.getLogger(), logging.getLogger("uvicorn")]  # uvicorn's own does not propagate
    for logger in loggers:
        logger.addHandler(tail)
    crashed: list[BaseException] = []

    def serve() -> None:
        try:
            srv.run()
        except BaseException as exc:  # uvicorn exits with SystemExit when it cannot start
            crashed.append(exc)
            raise

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline, last = time.monotonic() + 30, "no answer"
    try:
        while True:
            try:
                response = httpx.get(f"{url}/readyz", timeout=1)
                if response.status_code == 200:
                    break
                last = f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            if not thread.is_alive() or time.monotonic() > deadline:
                srv.should_exit = True
                thread.join(10)
                why = f"the server thread ended ({crashed[0]!r})" if crashed else "no 200 within 30 s"
                pytest.fail(f"{url}/readyz never answered ({why}; last: {last}); server log tail:\n"
                            + ("\n".join(tail.lines) or "(nothing logged)"), pytrace=False)
            time.sleep(0.1)
    finally:
        for logger in loggers:
            logger.removeHandler(tail)
    yield url
    srv.should_exit = True
    thread.join(10)


def _cli(*args: str, url: str, key: str) -> str:
    result = runner.invoke(app, [*args, "--url", url, "--key", key], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_cli_submit_watch_models_adapt(server: str, tmp_path: Path) -> None:
    out = _cli("create-key", "cli-tenant", url=server, key=ADMIN_TOKEN)
    secret = out.strip().split()[-1]
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "cli-sine", "outer": {"iterations": 30, "meta_batch_size": 4},
                                    "eval": {"every": 15, "tasks": 5, "steps": 5}}))
    out = _cli("submit", str(spec), "--watch", url=server, key=secret)
    assert "succeeded" in out
    job_id = out.split("submitted job ")[1].split()[0]
    assert job_id in _cli("jobs", url=server, key=secret)
    status = json.loads(_cli("status", job_id, url=server, key=secret))
    assert status["status"] == "succeeded" and status["progress"]["iteration"] == 30
    lines = _cli("metrics", job_id, url=server, key=secret).strip().splitlines()
    assert json.loads(lines[-1])["iteration"] == 30
    assert status["model_id"] in _cli("models", url=server, key=secret)

    support = tmp_path / "support.json"
    support.write_text(json.dumps({"x": [[0.1], [1.0], [2.0]], "y": [[0.5], [0.9], [0.2]]}))
    query = tmp_path / "query.json"
    query.write_text(json.dumps({"x": [[0.5], [1.5]]}))
    answer = json.loads(_cli("adapt", status["model_id"], "--support", str(support), "--query", str(query),
                             "--steps", "5", url=server, key=secret))
    assert len(answer["predictions"]) == 2
    assert answer["support_loss_after"] < answer["support_loss_before"]


def test_cli_reports_the_field_of_a_bad_spec(server: str, tmp_path: Path) -> None:
    spec = tmp_path / "bad.json"
    spec.write_text(json.dumps({"inner": {"steps": 0}}))
    result = runner.invoke(app, ["submit", str(spec), "--url", server, "--key", ADMIN_TOKEN])
    assert result.exit_code == 1
    assert "inner.steps" in result.output
    result = runner.invoke(app, ["status", "no-such-job", "--url", server, "--key", ADMIN_TOKEN])
    assert result.exit_code == 1 and "404" in result.output


def test_cli_sweeps_list_watch_and_a_bad_space(server: str, tmp_path: Path) -> None:
    """Without Ray: a bad space is refused naming the field; a stored sweep is listed, and watching a
    cancelled one draws its table to the end. (A sweep that runs: tests/test_api_sweeps.py.)"""
    from cli.app import trials_table, watch_sweep
    from cli.client import Client
    from service import sweeps as sweep_data
    from service.db import make_engine, make_session_factory
    from workers.sweep_spec import SweepSpec

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": {"outer": {"iterations": 10}},
                                   "space": {"inner.lr": {"uniform": [0.5, 0.1]}}}))
    result = runner.invoke(app, ["sweep", str(bad), "--url", server, "--key", ADMIN_TOKEN])
    assert result.exit_code == 1 and "space.inner.lr: low 0.5 above high 0.1" in result.output

    engine = make_engine(make_settings(tmp_path))  # the server's database
    with make_session_factory(engine)() as session:
        spec = SweepSpec.model_validate({"name": "cs", "base": {"outer": {"iterations": 10}},
                                         "space": {"inner.lr": {"grid": [0.01, 0.1]}}})
        sweep_id = sweep_data.create_sweep(session=session, tenant="admin", spec=spec).id
    engine.dispose()
    out = _cli("sweeps", url=server, key=ADMIN_TOKEN)
    assert sweep_id in out and " cs " in out and "queued" in out

    client = Client(server, ADMIN_TOKEN)
    sweep = client.cancel_sweep(sweep_id)
    final = watch_sweep(client, sweep)
    client.close()
    assert final["status"] == "cancelled"
    # The live table, with trials as the events carry them.
    trial = {"trial_id": "t1", "status": "stopped_early", "config": {"inner.lr": 0.01}, "iteration": 4,
             "total_iterations": 10, "metric": 0.5, "best_metric": 0.25, "error": None}
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(trials_table({**final, "best": None}, [trial]))
    text = console.export_text()
    assert "t1" in text and "inner.lr=0.01" in text and "stopped_early" in text and "4/10" in text
    assert "eval/loss" in text and "0.25" in text


def test_cli_quotas_list_show_set_reset(server: str) -> None:
    _cli("create-key", "quota-tenant", url=server, key=ADMIN_TOKEN)
    out = _cli("quotas", "set", "quota-tenant", "jobs=3", "model_bytes=2000000", url=server, key=ADMIN_TOKEN)
    assert "tenant quota-tenant" in out
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:5]]
            for line in out.splitlines() if line.count("│") >= 5}
    assert rows["jobs"] == ["3", "0", "override"] and rows["model_bytes"] == ["2,000,000", "0", "override"], rows
    assert rows["cpus"][2] == "default" and rows["iterations"][1] == "-", rows
    out = _cli("quotas", "list", url=server, key=ADMIN_TOKEN)
    assert "quota-tenant" in out and "0/3*" in out
    out = _cli("quotas", "set", "quota-tenant", "jobs=default", url=server, key=ADMIN_TOKEN)
    assert "override" in out and "jobs" in out  # model_bytes is still an override; jobs is not
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") >= 5}
    assert "default" in rows["jobs"] and "override" in rows["model_bytes"]
    _cli("quotas", "reset", "quota-tenant", url=server, key=ADMIN_TOKEN)
    assert "override" not in _cli("quotas", "show", "quota-tenant", url=server, key=ADMIN_TOKEN)
    # A bad value names the quota; a tenant's key is not an admin's.
    result = runner.invoke(app, ["quotas", "set", "quota-tenant", "jobs=-1", "--url", server, "--key", ADMIN_TOKEN])
    assert result.exit_code == 1 and "jobs" in result.output, result.output
    result = runner.invoke(app, ["quotas", "set", "quota-tenant", "jobs=many", "--url", server, "--key", ADMIN_TOKEN])
    assert result.exit_code == 2 and "not an integer" in result.output, result.output
    secret = _cli("create-key", "quota-tenant", url=server, key=ADMIN_TOKEN).strip().split()[-1]
    result = runner.invoke(app, ["quotas", "list", "--url", server, "--key", secret])
    assert result.exit_code == 1 and "HTTP 403" in result.output, result.output

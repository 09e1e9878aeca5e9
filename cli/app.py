"""``maml``: the command line of the service (typer).

The URL and API key come from ``--url``/``--key`` or ``MAML_URL``/``MAML_API_KEY``.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cli.client import ApiError, Client

app = typer.Typer(help="maml-service: meta-training jobs, sweeps, models and adaptation over REST.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
console = Console()
Url = Annotated[str, typer.Option("--url", envvar="MAML_URL", help="the service's base URL")]
Key = Annotated[str | None, typer.Option("--key", envvar="MAML_API_KEY", help="API key (bearer token)")]
DEFAULT_URL = "http://127.0.0.1:8000"


def _client(url: str, key: str | None) -> Client:
    return Client(url, key)


def _fail(exc: Exception) -> None:
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(1)


def _read(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc}") from exc
    return yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)


@app.command()
def serve(host: str = "127.0.0.1", port: int = 8000,
          data_dir: Annotated[Path | None, typer.Option(help="database, storage and cache folder")] = None) -> None:
    """Run the service: REST API, job manager and an embedded Ray cluster (or MAML_RAY_ADDRESS)."""
    import logging

    import uvicorn

    from api.main import create_app
    from service.config import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings(data_dir=data_dir) if data_dir else Settings()
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")


def watch(client: Client, job_id: str) -> dict[str, Any]:
    """Follow a job's events with a progress bar; returns the final job."""
    final: dict[str, Any] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console) as bar:
        task = bar.add_task(job_id[:8], total=None, info="")
        for event, data in client.events(job_id):
            if event == "progress":
                bar.update(task, completed=data["iteration"], total=data["total"])
            elif event == "metrics":
                m = data["metrics"]
                shown = {k: m[k] for k in ("meta/loss", "meta/accuracy", "eval/loss", "eval/accuracy")
                         if m.get(k) is not None}
                bar.update(task, info="  ".join(f"{k}={v:.4g}" for k, v in shown.items()))
            elif event == "status":
                bar.update(task, description=f"{job_id[:8]} {data['status']}")
            elif event == "end":
                final = data
    return final


@app.command()
def submit(spec: Path, watch_: Annotated[bool, typer.Option("--watch", help="follow to the end")] = False,
           url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Submit a job spec (YAML or JSON)."""
    client = _client(url, key)
    try:
        job = client.submit(_read(spec))
        console.print(f"submitted job [bold]{job['id']}[/bold] ({job['status']})")
        if watch_:
            job = watch(client, job["id"])
            console.print(f"job {job['id']}: [bold]{job['status']}[/bold]"
                          + (f" model {job['model_id']}" if job.get("model_id") else "")
                          + (f" error: {job['error']}" if job.get("error") else ""))
            if job["status"] != "succeeded":
                raise typer.Exit(1)
    except ApiError as exc:
        _fail(exc)


@app.command()
def jobs(status: str | None = None, limit: int = 50, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """List jobs, newest first."""
    try:
        page = _client(url, key).jobs(status=status, limit=limit)
    except ApiError as exc:
        _fail(exc)
    table = Table(title=f"{page['count']} jobs")
    table.add_column("id", no_wrap=True, min_width=36)  # whole ids: they are what the other commands take
    for column in ("name", "status", "progress", "model"):
        table.add_column(column)
    for j in page["data"]:
        p = j["progress"]
        table.add_row(j["id"], j["name"], j["status"], f"{p['iteration']}/{p['total']}", j.get("model_id") or "")
    console.print(table)


@app.command()
def status(job_id: str, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """A job's status, progress, latest metrics and error."""
    try:
        console.print_json(json.dumps(_client(url, key).job(job_id)))
    except ApiError as exc:
        _fail(exc)


@app.command()
def metrics(job_id: str, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """A job's metric series as JSON lines."""
    try:
        for point in _client(url, key).metrics(job_id)["data"]:
            sys.stdout.write(json.dumps(point) + "\n")
    except ApiError as exc:
        _fail(exc)


@app.command()
def cancel(job_id: str, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Cancel a queued or running job."""
    try:
        job = _client(url, key).cancel(job_id)
        console.print(f"job {job_id}: cancel requested ({job['status']})")
    except ApiError as exc:
        _fail(exc)


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) else ""


def _config(config: dict[str, Any]) -> str:
    return "  ".join(f"{k}={_number(v) or json.dumps(v, separators=(',', ':'))}" for k, v in config.items())


def trials_table(sweep: dict[str, Any], trials: list[dict[str, Any]]) -> Table:
    """A sweep's trials: id, config, status, iteration, the sweep metric (last and best)."""
    metric = sweep["spec"].get("metric") or "metric"
    counts = Counter(t["status"] for t in trials)
    summary = ", ".join(f"{n} {status}" for status, n in counts.items())
    table = Table(title=f"sweep {sweep['id']} ({sweep['name']}): {sweep['status']}"
                        + (f" - {summary}" if summary else ""))
    table.add_column("trial", no_wrap=True)
    table.add_column("config", overflow="fold")
    table.add_column("status", overflow="fold")
    for column in ("iteration", metric, "best"):
        table.add_column(column, no_wrap=True)
    best = (sweep.get("best") or {}).get("trial_id")
    for t in trials:
        trial_id = f"[bold]{t['trial_id']}[/bold] *" if t["trial_id"] == best else t["trial_id"]
        status = t["status"] + (f" ({t['error']})" if t.get("error") else "")
        table.add_row(trial_id, _config(t["config"]), status, f"{t['iteration']}/{t['total_iterations']}",
                      _number(t.get("metric")), _number(t.get("best_metric")))
    return table


def watch_sweep(client: Client, sweep: dict[str, Any]) -> dict[str, Any]:
    """Follow a sweep's events with a live table of its trials; returns the final sweep."""
    final: dict[str, Any] = {}
    current = dict(sweep)
    with Live(trials_table(current, current.get("trials", [])), console=console, refresh_per_second=4) as live:
        for event, data in client.sweep_events(sweep["id"]):
            if event == "trials":
                current["trials"] = data["trials"]
            elif event == "status":
                current.update(status=data["status"], error=data["error"], model_id=data["model_id"])
            elif event == "end":
                final = current = data
            live.update(trials_table(current, current.get("trials", [])))
    return final


@app.command("sweep")
def sweep_(spec: Path, watch_: Annotated[bool, typer.Option("--watch", help="follow to the end")] = False,
           url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Submit a sweep spec (YAML or JSON): base, space, metric, mode, scheduler, num_samples."""
    client = _client(url, key)
    try:
        sweep = client.submit_sweep(_read(spec))
        console.print(f"submitted sweep [bold]{sweep['id']}[/bold] ({sweep['status']})")
        if watch_:
            sweep = watch_sweep(client, sweep)
            best = sweep.get("best") or {}
            console.print(f"sweep {sweep['id']}: [bold]{sweep['status']}[/bold]"
                          + (f" best trial {best['trial_id']} ({_config(best['config'])})" if best else "")
                          + (f" model {sweep['model_id']}" if sweep.get("model_id") else "")
                          + (f" error: {sweep['error']}" if sweep.get("error") else ""))
            if sweep["status"] != "succeeded":
                raise typer.Exit(1)
    except ApiError as exc:
        _fail(exc)


@app.command()
def sweeps(status: str | None = None, limit: int = 50, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """List sweeps, newest first."""
    try:
        page = _client(url, key).sweeps(status=status, limit=limit)
    except ApiError as exc:
        _fail(exc)
    table = Table(title=f"{page['count']} sweeps")
    table.add_column("id", no_wrap=True, min_width=36)
    for column in ("name", "status", "trials", "best", "model"):
        table.add_column(column)
    for s in page["data"]:
        counts = "  ".join(f"{n} {status}" for status, n in s["counts"].items())
        best = s.get("best") or {}
        table.add_row(s["id"], s["name"], s["status"], counts,
                      f"{best['trial_id']} {_number(best.get('metric'))}" if best else "", s.get("model_id") or "")
    console.print(table)


@app.command()
def models(url: Url = DEFAULT_URL, key: Key = None) -> None:
    """List registered models."""
    try:
        page = _client(url, key).models()
    except ApiError as exc:
        _fail(exc)
    table = Table(title=f"{page['count']} models")
    table.add_column("id", no_wrap=True, min_width=36)
    for column in ("name", "kind", "input", "source", "meta-test"):
        table.add_column(column)
    for m in page["data"]:
        ev = m["eval_metrics"]
        score = ev.get("eval/accuracy") if m["kind"] == "classification" else ev.get("eval/loss")
        source = f"job {m['job_id']}" if m.get("job_id") else f"sweep {m.get('sweep_id')}"
        table.add_row(m["id"], m["name"], m["kind"], str(m["input_shape"]), source,
                      f"{score:.4g}" if score is not None else "")
    console.print(table)


@app.command()
def adapt(model_id: str,
          support: Annotated[Path, typer.Option(help='JSON/YAML file {"x": [...], "y": [...]}')],
          query: Annotated[Path | None, typer.Option(help='JSON/YAML file {"x": [...]}')] = None,
          steps: int | None = None, lr: float | None = None, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Adapt a model to K labelled examples and predict the query inputs."""
    body: dict[str, Any] = {"support": _read(support), "query": _read(query) if query else {"x": []}}
    if steps is not None:
        body["steps"] = steps
    if lr is not None:
        body["lr"] = lr
    try:
        console.print_json(json.dumps(_client(url, key).adapt(model_id, body)))
    except ApiError as exc:
        _fail(exc)


@app.command("create-key")
def create_key(tenant: str, name: str = "key", url: Url = DEFAULT_URL, key: Key = None) -> None:
    """(admin) Create a tenant's API key; the secret is shown once."""
    try:
        created = _client(url, key).create_key(tenant, name)
    except ApiError as exc:
        _fail(exc)
    console.print(f"key {created['id']} for tenant {created['tenant']}: [bold]{created['secret']}[/bold]")


quotas_app = typer.Typer(help="(admin) Per-tenant quotas: what each tenant may hold, and holds now.",
                         no_args_is_help=True)
app.add_typer(quotas_app, name="quotas")
# The quotas that a tenant holds some of at a time (the others are limits per run: no use).
HELD = ("jobs", "sweeps", "workers", "cpus", "gpus", "models", "model_bytes", "adaptations")


def _amount(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def _bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _held(quota: dict[str, Any], name: str) -> str:
    used, limit = quota["use"][name], quota["limits"][name]
    mark = "*" if name in quota["overrides"] else ""
    if name == "model_bytes":
        return f"{_bytes(used)}/{_bytes(limit)}{mark}"
    return f"{_amount(used)}/{_amount(limit)}{mark}"


@quotas_app.command("list")
def quotas_list(limit: int = 100, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Every tenant's use against its quotas (used/limit; * marks an override; `show` has them all)."""
    try:
        page = _client(url, key).quotas(limit=limit)
    except ApiError as exc:
        _fail(exc)
    table = Table(title=f"{page['count']} tenants")
    table.add_column("tenant", no_wrap=True)
    for name in HELD:
        table.add_column(name.replace("_", " "), overflow="fold")
    for quota in page["data"]:
        table.add_row(quota["tenant"], *(_held(quota, name) for name in HELD))
    console.print(table)


def _show(quota: dict[str, Any]) -> None:
    table = Table("quota", "limit", "in use", "set by", title=f"tenant {quota['tenant']}")
    for name, limit in quota["limits"].items():
        used = quota["use"].get(name)
        table.add_row(name, _amount(limit), "-" if used is None else _amount(used),
                      "override" if name in quota["overrides"] else "default")
    console.print(table)


@quotas_app.command("show")
def quotas_show(tenant: str, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """A tenant's quotas in force and what it holds now."""
    try:
        _show(_client(url, key).quota(tenant))
    except ApiError as exc:
        _fail(exc)


@quotas_app.command("set")
def quotas_set(tenant: str,
               values: Annotated[list[str], typer.Argument(help="NAME=N, or NAME=default (e.g. jobs=4 cpus=16)")],
               url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Change some of a tenant's quotas; the others stay as they are."""
    changes: dict[str, int | None] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise typer.BadParameter(f"{item!r}: expected NAME=N or NAME=default")
        if value == "default":
            changes[name] = None
        else:
            try:
                changes[name] = int(value)
            except ValueError:
                raise typer.BadParameter(f"{item!r}: {value!r} is not an integer (or 'default')") from None
    try:
        _show(_client(url, key).update_quota(tenant, changes))
    except ApiError as exc:
        _fail(exc)


@quotas_app.command("reset")
def quotas_reset(tenant: str, url: Url = DEFAULT_URL, key: Key = None) -> None:
    """Every quota of a tenant back to its default."""
    client = _client(url, key)
    try:
        client.reset_quota(tenant)
        _show(client.quota(tenant))
    except ApiError as exc:
        _fail(exc)


if __name__ == "__main__":
    app()

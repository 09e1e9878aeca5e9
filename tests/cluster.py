"""The service as real local processes, for the end-to-end tests and ``benchmarks/topology.py``: one
server with its embedded Ray (``serve``), or the production topology, an external Ray cluster
(``ray start --head``) and API replicas (uvicorn processes) joining it, on one database and one
data folder. Each runs in a process group of its own, so ``kill -9`` takes it and everything it
started, as a lost pod would."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"
ADMIN = "topology-admin-token-8f2a61c0"


class ClusterError(RuntimeError):
    """A process of the topology did not start (its log attached)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def uvicorn_argv(port: int) -> list[str]:
    """The API app factory under uvicorn, as the container runs it."""
    return [sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app", "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "warning"]


def maml_serve_argv(data_dir: Path) -> Callable[[int], list[str]]:
    """``maml serve`` (the console script of this environment) on a data folder, as a user runs it."""
    return lambda port: [str(Path(sys.executable).parent / "maml"), "serve", "--port", str(port),
                         "--data-dir", str(data_dir)]


def start_server(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """A server process in a session of its own (its Ray processes join its group), logging to ``log_path``."""
    with log_path.open("w") as log:
        return subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_ready(proc: subprocess.Popen, base: str, log_path: Path, *, timeout: float = 180) -> None:
    """Until ``{base}/readyz`` answers 200 (starting Ray takes a while on a busy machine);
    ``ClusterError`` with the server's log if it exits or is not ready in time."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ClusterError(f"the server exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise ClusterError(f"the server was not ready in {timeout:g} s:\n{log_path.read_text()}")
        time.sleep(0.3)


def stop_server(proc: subprocess.Popen, *, wait_s: float = 60) -> None:
    """SIGINT (a graceful shutdown), then kill -9 of what is left of its group: Ray's agents can
    outlive the server."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        pass
    kill_group(proc)
    proc.wait(10)


@contextmanager
def serve(env: dict[str, str], log_path: Path, argv: Callable[[int], list[str]] = uvicorn_argv) -> Iterator[str]:
    """One server (its embedded Ray unless ``env`` names a cluster) on a free port: its base URL
    once it is ready; stopped on exit. ``env`` is the whole environment of the process."""
    port = free_port()
    proc = start_server(argv(port), env, log_path)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(proc, base, log_path)
        yield base
    finally:
        stop_server(proc)


@contextmanager
def ray_head(log_dir: Path, *, num_cpus: int = 2) -> Iterator[dict[str, str]]:
    """``ray start --head`` with token auth; yields the environment a replica joins it with
    (``MAML_RAY_ADDRESS``, ``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN``)."""
    root = Path("/tmp") / f"maml-ray-{secrets.token_hex(3)}"  # Ray's socket paths must stay short
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    port = free_port()
    log_path = log_dir / "ray-head.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(RAY), "start", "--head", "--block", "--num-cpus", str(num_cpus), "--port", str(port),
             "--node-ip-address", "127.0.0.1", "--include-dashboard", "false", "--disable-usage-stats",
             "--temp-dir", str(root)],
            env={**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log_path.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ClusterError(f"ray start failed:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield {**env, "MAML_RAY_ADDRESS": f"127.0.0.1:{port}"}
    finally:
        kill_group(proc)  # GCS, raylet and every worker: one process group (ray start --block doesn't
        proc.wait(30)     # answer SIGTERM quickly, and nothing of it needs to outlive its user)
        shutil.rmtree(root, ignore_errors=True)
        # `ray start` records its address for later `ray.init()` calls; nothing else here should join it.
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and str(port) in current.read_text():
            current.unlink()


def ray_processes(head_env: dict[str, str], name: str) -> list[int]:
    """The pids of the cluster's processes titled ``ray::<name>`` (e.g. ``RunDriver.drive``,
    ``ShardWorker``), found by their environment's Ray token: this cluster's, no other's."""
    token = f"RAY_AUTH_TOKEN={head_env['RAY_AUTH_TOKEN']}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if title.startswith(f"ray::{name}") and token in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # ended meanwhile
            continue
    return found


def descendants(pid: int) -> dict[int, str]:
    """The processes below ``pid`` (children, theirs, ...) by pid, with the name of their executable."""
    parents: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
            parents[int(entry.name)] = (int(rest[1]), name)
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, name) in parents.items():
            if ppid == parent and child not in found:
                found[child] = name
                frontier.append(child)
    return found


class Replicas:
    """API replicas (uvicorn processes) on one database (SQLite under ``root`` without a URL), data
    folder and Ray cluster (their embedded ones without ``MAML_RAY_ADDRESS`` in ``ray_env``)."""

    def __init__(self, root: Path, database_url: str | None, ray_env: dict[str, str], **settings: str) -> None:
        self.root = root
        self.database_url = database_url or f"sqlite:///{root / 'data' / 'maml.db'}"
        self.env = {**os.environ, **ray_env, "MAML_DATA_DIR": str(root / "data"), "MAML_ADMIN_TOKEN": ADMIN,
                    "MAML_METRICS_FLUSH_S": "0.2", "MAML_EVENTS_POLL_S": "0.2", **settings}
        self.env.pop("DATABASE_URL", None)
        self.env.pop("MAML_DATABASE_URL", None)
        if database_url is not None:
            self.env["MAML_DATABASE_URL"] = database_url
        self.procs: dict[str, subprocess.Popen] = {}
        self.bases: dict[str, str] = {}

    def start(self, name: str, **settings: str) -> str:
        port = free_port()
        log_path = self.root / f"{name}.log"
        self.procs[name] = start_server(uvicorn_argv(port), {**self.env, **settings}, log_path)
        self.bases[name] = base = f"http://127.0.0.1:{port}"
        wait_ready(self.procs[name], base, log_path)
        return base

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()

    def kill(self, name: str) -> None:
        """kill -9, as a crashed pod or a lost node."""
        proc = self.procs.pop(name)
        kill_group(proc)
        proc.wait(30)

    def stop(self, name: str) -> None:
        stop_server(self.procs.pop(name), wait_s=30)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def client(self, name: str, key: str) -> httpx.Client:
        return httpx.Client(base_url=f"{self.bases[name]}/api/v1", timeout=30,
                            headers={"Authorization": f"Bearer {key}"})

    def tenant_key(self, name: str, tenant: str = "acme") -> str:
        with self.client(name, ADMIN) as admin:
            r = admin.post("/keys", json={"tenant": tenant})
            if r.status_code != 201:
                raise ClusterError(f"creating a key answered {r.status_code}: {r.text}")
            return r.json()["secret"]

    def row(self, table: str, run_id: str) -> dict[str, Any]:
        """The run's row, read from the database itself (no replica needed)."""
        engine = create_engine(self.database_url)
        try:
            with engine.connect() as connection:
                return dict(connection.execute(text(f"SELECT * FROM {table} WHERE id = :id"),
                                               {"id": run_id}).mappings().one())
        finally:
            engine.dispose()

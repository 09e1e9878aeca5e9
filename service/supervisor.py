"""The API's side of Ray: the reconciler (:mod:`service.reconciler`) as a supervised child process.

With ``MAML_RAY_PROCESS=child`` (the default) the API process never joins Ray, so it cannot die
with a raylet. :class:`RayChild` starts ``python -m service.reconciler`` in a process group of its
own (the embedded Ray cluster it starts is in that group too), restarts it whenever it ends (a
dead raylet or GCS ends it), with a back-off, and tells ``/readyz`` whether it is alive and its
Ray cluster answers. Jobs whose drivers died with a cluster are requeued when their lease expires
(``MAML_LEASE_TTL_S``) and resume from their last checkpoint on the new one.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from service.config import Settings

logger = logging.getLogger(__name__)
STALE_S = 10.0  # a heartbeat older than this: the reconciler is stuck
MAX_BACKOFF_S = 30.0


def settings_json(settings: Settings) -> str:
    """The settings as the child reads them back, secrets in clear (the file is the owner's only)."""
    data: dict[str, Any] = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        data[name] = value
    return json.dumps(data, default=str)


class RayChild:
    """``python -m service.reconciler``, kept running while the API runs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        folder = settings.data_dir / "reconciler"
        folder.mkdir(parents=True, exist_ok=True)
        self.settings_file, self.heartbeat, self.log_path = (folder / "settings.json", folder / "heartbeat.json",
                                                             folder / "reconciler.log")
        self.settings_file.touch(mode=0o600)
        os.chmod(self.settings_file, 0o600)
        self.settings_file.write_text(settings_json(settings))
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._spawn()
        self._thread = threading.Thread(target=self._watch, name="maml-ray-child", daemon=True)
        self._thread.start()

    def _spawn(self) -> None:
        self.heartbeat.unlink(missing_ok=True)
        with self.log_path.open("ab") as log, self._lock:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.reconciler", "--settings", str(self.settings_file),
                 "--heartbeat", str(self.heartbeat)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=Path(__file__).resolve().parents[1])
        logger.info("reconciler started (pid %d); its log: %s", self.proc.pid, self.log_path)

    def _watch(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            assert self.proc is not None
            code = self.proc.wait()
            self._kill_group()  # what it left of its embedded cluster
            if self._stopping.is_set():
                return
            started = time.monotonic()
            self.restarts += 1
            logger.error("the reconciler (Ray) ended with %s; restarting it in %.0fs (restart %d). Its log: %s",
                         code, backoff, self.restarts, self.log_path)
            if self._stopping.wait(backoff):
                return
            self._spawn()
            # Back off while it keeps dying at once; a run of a minute resets it.
            backoff = min(MAX_BACKOFF_S, backoff * 2) if time.monotonic() - started < 60 else 1.0

    def _kill_group(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Alive, with a fresh heartbeat from a Ray cluster that answers."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return False, {"reconciler": "not running", "restarts": self.restarts}
        try:
            beat = json.loads(self.heartbeat.read_text())
        except (OSError, ValueError):
            return False, {"reconciler": "starting", "restarts": self.restarts}
        age = time.time() - beat["time"]
        ok = age < STALE_S and bool(beat.get("ray"))
        return ok, {"reconciler": "ok" if age < STALE_S else f"silent for {age:.0f}s", "ray": beat.get("ray"),
                    "ray_cpus": beat.get("ray_cpus"), "restarts": self.restarts}

    def stop(self, timeout: float) -> None:
        """SIGTERM (its queues stop, drivers on the embedded cluster requeue their runs), then SIGKILL."""
        self._stopping.set()
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("the reconciler did not stop within %.0fs; killed", timeout)
        self._kill_group()
        proc.wait(10)

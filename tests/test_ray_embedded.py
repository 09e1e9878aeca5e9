"""The embedded Ray cluster outlives the thread that started it (issue 12's raylet deaths).

Ray starts a local cluster's GCS, raylet and agents with ``PR_SET_PDEATHSIG = SIGKILL``, and
Linux sends that signal when the *thread* that started them ends. A service that started its
embedded cluster from a job's or a request's thread lost the whole cluster, silently (no line in
any Ray log), when that thread ended; its own Ray driver then gave up on the GCS 60 s later and
took the process down ("Failed to connect to GCS within 60 seconds"). ``ensure_ray`` starts the
cluster from a thread that lives as long as the process. Each case runs in a process of its own.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import os, sys, threading, time
import ray
from workers.raygroup import ensure_ray

start = {"ensure_ray": lambda: ensure_ray(num_cpus=1),
         "ray.init": lambda: ray.init(address="local", num_cpus=1, include_dashboard=False)}[sys.argv[1]]
thread = threading.Thread(target=start)
thread.start()
thread.join()
time.sleep(4)  # the thread that started the cluster is gone

@ray.remote(num_cpus=0, max_retries=0)
def pid():
    return os.getpid()

try:
    print("task ran in", ray.get(pid.remote(), timeout=20), flush=True)
except Exception as exc:
    print("cluster gone:", type(exc).__name__, exc, flush=True)
    os._exit(3)
os._exit(0)  # not ray.shutdown(): its wait for a dead cluster is not what is under test
"""


@pytest.mark.parametrize(("start", "survives"), [("ensure_ray", True), ("ray.init", False)])
def test_the_cluster_outlives_the_thread_that_started_it(start: str, survives: bool, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, start], cwd=REPO, capture_output=True, text=True,
                          timeout=240, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(REPO),
                                            "RAY_USAGE_STATS_ENABLED": "0"})
    # ray.init called directly from the thread: the mechanism itself, so that this test can fail.
    assert (proc.returncode == 0) == survives, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert ("task ran in" in proc.stdout) == survives, proc.stdout

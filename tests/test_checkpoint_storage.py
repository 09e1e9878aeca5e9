"""Checkpoints on a storage URI: a real S3 endpoint (moto's server, over HTTP) through pyarrow.fs."""

import logging
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import torch
from fastapi.testclient import TestClient
from helpers import make_app, make_settings, submit, wait_for_job
from moto.server import ThreadedMotoServer
from pydantic import ValidationError

from service.config import Settings
from workers.checkpoint import (
    Checkpoint,
    CheckpointStorageError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from workers.run import Trainer
from workers.spec import JobSpec

BUCKET = "maml-checkpoints"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, object]]:
    """``(uri options, boto3 client)`` of a fresh S3 server on a free port, with one bucket."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
    mp = pytest.MonkeyPatch()
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        mp.setenv(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield f"endpoint_override={host}:{port}&scheme=http&region=us-east-1", client
    finally:
        server.stop()
        mp.undo()


def _uri(s3: tuple[str, object], prefix: str) -> str:
    return f"s3://{BUCKET}/{prefix}?{s3[0]}"


def _keys(s3: tuple[str, object], prefix: str) -> list[str]:
    listing = s3[1].list_objects_v2(Bucket=BUCKET, Prefix=prefix)  # type: ignore[attr-defined]
    # Without the folder markers ("prefix/") that pyarrow leaves so that a parent stays listed.
    return sorted(o["Key"] for o in listing.get("Contents", []) if not o["Key"].endswith("/"))


def _ckpt(iteration: int) -> Checkpoint:
    gen = torch.Generator().manual_seed(iteration)
    weight = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    optimizer = {"state": {0: {"step": torch.tensor(float(iteration)), "exp_avg": weight * 2}},
                 "param_groups": [{"lr": 1e-3, "params": [0]}]}
    return Checkpoint(iteration=iteration, model={"w": weight}, optimizer=optimizer, spec={"name": "s"},
                      rng_state=torch.get_rng_state(), metrics={"meta/loss": 0.5})


def _spec() -> JobSpec:
    return JobSpec.model_validate({"name": "t", "dtype": "float64", "outer": {"iterations": 12, "meta_batch_size": 4},
                                   "eval": {"every": 6, "tasks": 4, "steps": 2},
                                   "checkpoint": {"every": 3, "keep": 2}})


def test_save_list_load_and_rotate_on_s3(s3: tuple[str, object]) -> None:
    uri = _uri(s3, "unit/rotate")
    for it in (3, 6, 9):
        save_checkpoint(uri, _ckpt(it), keep=2)
    assert [str(p).split("?")[0] for p in list_checkpoints(uri)] == [
        f"s3://{BUCKET}/unit/rotate/iter_00000006", f"s3://{BUCKET}/unit/rotate/iter_00000009"]
    assert _keys(s3, "unit/rotate/") == [f"unit/rotate/iter_0000000{i}/{f}" for i in (6, 9)
                                         for f in ("model.safetensors", "optimizer.safetensors", "state.json")]
    ckpt = latest_checkpoint(uri)
    want = _ckpt(9)
    assert ckpt is not None and ckpt.iteration == 9 and ckpt.metrics == {"meta/loss": 0.5}
    assert torch.equal(ckpt.model["w"], want.model["w"]) and ckpt.model["w"].dtype == torch.float64
    assert torch.equal(ckpt.optimizer["state"][0]["exp_avg"], want.optimizer["state"][0]["exp_avg"])
    assert torch.equal(ckpt.rng_state, want.rng_state)
    assert torch.equal(load_checkpoint(ckpt.path).model["w"], want.model["w"])  # its path reads back


def test_a_checkpoint_without_its_commit_mark_is_ignored_then_removed(s3: tuple[str, object]) -> None:
    uri = _uri(s3, "unit/torn")
    save_checkpoint(uri, _ckpt(3))
    # A writer that died after the tensors and before state.json (the commit mark).
    s3[1].put_object(Bucket=BUCKET, Key="unit/torn/iter_00000006/model.safetensors", Body=b"partial")  # type: ignore[attr-defined]
    assert latest_checkpoint(uri).iteration == 3
    save_checkpoint(uri, _ckpt(9))
    assert not any("iter_00000006" in k for k in _keys(s3, "unit/torn/"))


def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous(s3: tuple[str, object]) -> None:
    uri = _uri(s3, "unit/corrupt")
    save_checkpoint(uri, _ckpt(3))
    save_checkpoint(uri, _ckpt(6))
    s3[1].put_object(Bucket=BUCKET, Key="unit/corrupt/iter_00000006/model.safetensors", Body=b"garbage")  # type: ignore[attr-defined]
    assert latest_checkpoint(uri).iteration == 3


def test_training_resumes_exactly_from_s3(s3: tuple[str, object], tmp_path: Path) -> None:
    uri = _uri(s3, "train/job-1")
    straight = Trainer(_spec(), run_dir=tmp_path / "a")
    straight.run()
    stops = iter([False] * 7 + [True])
    first = Trainer(_spec(), run_dir=tmp_path / "b", checkpoint_dir=uri, should_stop=lambda: next(stops))
    assert first.run().cancelled
    assert not (tmp_path / "b" / "checkpoints").exists()  # nothing local: the bucket holds them
    resumed = Trainer(_spec(), run_dir=tmp_path / "b", checkpoint_dir=uri)
    assert resumed.iteration == 7
    resumed.run()
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert [str(p).split("?")[0].rsplit("/", 1)[1] for p in list_checkpoints(uri)] == [
        "iter_00000009", "iter_00000012"]


def test_bad_locations_name_the_location() -> None:
    with pytest.raises(CheckpointStorageError, match="nosuch://bucket/x"):
        latest_checkpoint("nosuch://bucket/x")
    with pytest.raises(ValidationError, match="checkpoint_uri"):
        Settings(checkpoint_uri="just-a-folder")


def test_file_uri_is_a_local_directory(tmp_path: Path) -> None:
    save_checkpoint(f"file://{tmp_path}/ck", _ckpt(3))
    assert list_checkpoints(tmp_path / "ck") == [tmp_path / "ck" / "iter_00000003"]


def test_service_jobs_checkpoint_to_the_configured_uri(s3: tuple[str, object], tmp_path: Path) -> None:
    settings = make_settings(tmp_path, checkpoint_uri=_uri(s3, "service"))
    headers = {"Authorization": f"Bearer {settings.admin_token.get_secret_value()}"}
    with TestClient(make_app(settings)) as client:
        job = submit(client, headers, outer={"iterations": 6, "meta_batch_size": 2},
                     checkpoint={"every": 2, "keep": 2})
        done = wait_for_job(client, job["id"], headers)
    assert done["status"] == "succeeded", done
    prefix = f"service/jobs/{job['id']}/checkpoints/"
    assert {k.split("/")[-2] for k in _keys(s3, prefix)} == {"iter_00000004", "iter_00000006"}
    assert not (settings.storage_path / "jobs" / job["id"] / "checkpoints").exists()
    assert latest_checkpoint(settings.job_checkpoint_dir(job["id"])).iteration == 6


def test_rl_training_checkpoints_and_resumes_on_s3(s3: tuple[str, object], tmp_path: Path) -> None:
    from workers.run import Trainer
    from workers.spec import JobSpec

    spec = JobSpec.model_validate({"task": {"family": "nav2d", "rollouts": 2, "horizon": 5},
                                   "model": {"name": "mlp", "hidden": [8]},
                                   "outer": {"iterations": 3, "meta_batch_size": 2},
                                   "eval": {"every": 1000, "tasks": 2, "steps": 1}, "checkpoint": {"every": 1}})
    uri = _uri(s3, "rl/job-1")
    calls = {"n": 0}

    def stop_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    assert Trainer(spec, run_dir=tmp_path, checkpoint_dir=uri, should_stop=stop_after_two).run().cancelled
    assert latest_checkpoint(uri).iteration == 2
    resumed = Trainer(spec, run_dir=tmp_path, checkpoint_dir=uri)
    assert resumed.iteration == 2 and resumed.run().iteration == 3


def test_saving_the_same_iteration_again_keeps_a_readable_checkpoint(s3: tuple[str, object]) -> None:
    uri = _uri(s3, "unit/again")
    save_checkpoint(uri, _ckpt(3), keep=1)
    again = _ckpt(3)
    again.metrics = {"meta/loss": 0.25}
    save_checkpoint(uri, again, keep=1)
    assert latest_checkpoint(uri).metrics == {"meta/loss": 0.25}
    assert len(_keys(s3, "unit/again/")) == 3

"""Adaptation queries: validation (shapes, labels, finiteness, sizes) answers 422 naming the item,
image models take base64 PNG/JPEG preprocessed as in training, and saturation answers 429."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from helpers import fresh_database, make_app, make_settings, submit, train_nav2d, wait_for_job
from PIL import Image

from service import jobs, registry
from workers.run import Trainer
from workers.spec import JobSpec
from workers.tasks.omniglot import preprocess_image

API = "/api/v1"
pytestmark = pytest.mark.usefixtures("database")  # each test on SQLite and on PostgreSQL
OMNIGLOT_SPEC = {"name": "omni", "task": {"family": "omniglot", "ways": 5, "shots": 1, "queries": 1,
                                          "image_size": 28, "path": "/unused"},
                 "model": {"name": "conv4", "filters": 8}, "eval": {"steps": 3}, "inner": {"lr": 0.4}}


class _ImageFamily:
    """What an Omniglot export records: (1, 28, 28) inputs, 5 classes."""

    loss, input_shape, output_dim = "cross_entropy", (1, 28, 28), 5


def register_classifier(client: TestClient, tenant: str = "admin") -> str:
    """An Omniglot Conv4 in the registry (untrained: exported as Trainer.export writes it)."""
    spec = JobSpec.model_validate(OMNIGLOT_SPEC)
    services = client.app.state.services
    settings = client.app.state.settings
    run_dir = settings.storage_path / "jobs" / "omni"
    # Trainer.export writes the registry's format; an instance without __init__ skips loading Omniglot.
    from workers.models import build_model
    from workers.supervised import SupervisedProgram

    trainer = Trainer.__new__(Trainer)
    trainer.program = SupervisedProgram.__new__(SupervisedProgram)
    trainer.program.family, trainer.program.stale = _ImageFamily(), False
    trainer.spec, trainer.iteration, trainer.eval_metrics, trainer.group = spec, 0, {}, None
    trainer.model = build_model(spec.model, input_shape=(1, 28, 28), output_dim=5)
    export = trainer.export(run_dir / "model")
    with services.session_factory() as session:
        job = jobs.create_job(session=session, tenant=tenant, spec=spec)
        model = registry.register_model(session=session, job=job, export_dir=export, storage=settings.storage_path)
        jobs.finish_job(session=session, job_id=job.id, status="succeeded", model_id=model.id)
        return model.id


def png(array: np.ndarray, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, db_backend: str) -> Iterator[tuple[TestClient, str, dict]]:
    """One app with a trained sinusoid model, shared by the module's tests (of one backend)."""
    root: Path = tmp_path_factory.mktemp("adapt")
    with fresh_database(db_backend) as url:
        settings = make_settings(root, database_url=url, adapt_max_support=50, adapt_max_query=20,
                                 adapt_max_steps=100)
        yield from _trained(settings)


def _trained(settings) -> Iterator[tuple[TestClient, str, dict]]:
    headers = {"Authorization": "Bearer " + settings.admin_token.get_secret_value()}
    with TestClient(make_app(settings)) as client:
        job = submit(client, headers, outer={"iterations": 10, "meta_batch_size": 2}, eval={"every": 10, "tasks": 2})
        model_id = wait_for_job(client, job["id"], headers)["model_id"]
        yield client, model_id, headers


def adapt(client: TestClient, model_id: str, headers: dict, **body):
    body.setdefault("support", {"x": [[0.1], [0.2]], "y": [[0.5], [0.7]]})
    body.setdefault("query", {"x": [[0.3]]})
    return client.post(f"{API}/models/{model_id}/adapt", json=body, headers=headers)


def loc_of(response) -> list:
    assert response.status_code == 422, response.text
    return response.json()["detail"][0]["loc"]


def test_regression_inputs_are_validated(trained) -> None:
    client, model_id, headers = trained
    assert adapt(client, model_id, headers).status_code == 200
    # Scalars are fine for one-value inputs and targets.
    assert adapt(client, model_id, headers, support={"x": [0.1, 0.2], "y": [0.5, 0.7]}).status_code == 200

    bad_shape = {"x": [[0.1], [0.2, 0.3], [0.4]], "y": [[1.0]] * 3}
    assert loc_of(adapt(client, model_id, headers, support=bad_shape)) == ["body", "support", "x", 1]
    not_numbers = {"x": [[0.1], ["a"]], "y": [[1.0], [2.0]]}
    assert loc_of(adapt(client, model_id, headers, support=not_numbers)) == ["body", "support", "x", 1]
    assert loc_of(adapt(client, model_id, headers, support={"x": [[0.1], [0.2]], "y": [[1.0]]})) == [
        "body", "support", "y"]
    assert loc_of(adapt(client, model_id, headers, support={"x": [[0.1]], "y": [[1.0, 2.0]]})) == [
        "body", "support", "y", 0]
    assert loc_of(adapt(client, model_id, headers, query={"x": [[0.1], [[0.2]]]})) == ["body", "query", "x", 1]
    assert loc_of(adapt(client, model_id, headers, support={"x": [], "y": []}))[:3] == ["body", "support", "x"]
    # Non-finite values (Python's JSON reads NaN and 1e999 -> inf): 422 naming the item.
    raw = b'{"support": {"x": [[0.1], [NaN]], "y": [[1.0], [2.0]]}, "query": {"x": [[0.3]]}}'
    r = client.post(f"{API}/models/{model_id}/adapt", content=raw,
                    headers={**headers, "content-type": "application/json"})
    assert loc_of(r) == ["body", "support", "x", 1]
    raw = b'{"support": {"x": [[0.1], [0.2]], "y": [[1.0], [1e999]]}, "query": {"x": [[0.3]]}}'
    r = client.post(f"{API}/models/{model_id}/adapt", content=raw,
                    headers={**headers, "content-type": "application/json"})
    assert loc_of(r) == ["body", "support", "y", 1]
    # Limits from the settings, and the schema's own bounds.
    many = {"x": [[0.1]] * 51, "y": [[0.1]] * 51}
    assert loc_of(adapt(client, model_id, headers, support=many)) == ["body", "support", "x"]
    assert loc_of(adapt(client, model_id, headers, query={"x": [[0.1]] * 21})) == ["body", "query", "x"]
    assert loc_of(adapt(client, model_id, headers, steps=101)) == ["body", "steps"]
    assert loc_of(adapt(client, model_id, headers, lr=0)) == ["body", "lr"]
    assert loc_of(adapt(client, model_id, headers, extra=1)) == ["body", "extra"]
    # A learning rate that diverges is the request's fault too.
    big = {"x": [[4.0], [5.0]], "y": [[1e30], [-1e30]]}
    assert loc_of(adapt(client, model_id, headers, support=big, lr=100, steps=20)) == ["body", "lr"]
    assert adapt(client, "no-such-model", headers).status_code == 404


def test_image_model_takes_base64_images_and_checks_labels(trained) -> None:
    client, _, headers = trained
    model_id = register_classifier(client)
    info = client.get(f"{API}/models/{model_id}", headers=headers).json()
    assert info["kind"] == "classification" and info["input_shape"] == [1, 28, 28]

    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 255, size=(60, 60)) for _ in range(5)]
    support = {"x": [png(p) for p in pictures], "y": [0, 1, 2, 3, 4]}
    # A query item may be an image (JPEG too, and a data URL) or the preprocessed array itself.
    array = preprocess_image(Image.fromarray(pictures[0].astype(np.uint8)), 28).tolist()
    query = {"x": [png(pictures[0], "JPEG"), "data:image/png;base64," + png(pictures[1]), array]}
    r = adapt(client, model_id, headers, support=support, query=query)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["kind"] == "classification" and out["steps"] == 3 and out["lr"] == 0.4
    assert len(out["predictions"]) == 3 and all(0 <= p < 5 for p in out["predictions"])
    assert all(abs(sum(p) - 1) < 1e-6 and len(p) == 5 for p in out["probabilities"])
    assert out["support_loss_after"] < out["support_loss_before"]

    def bad(**changes) -> list:
        return loc_of(adapt(client, model_id, headers, **{"support": support, "query": query, **changes}))

    assert bad(support={**support, "y": [0, 1, 2, 3, 5]}) == ["body", "support", "y", 4]
    assert bad(support={**support, "y": [0, 1, -1, 3, 4]}) == ["body", "support", "y", 2]
    assert bad(support={**support, "y": [0, 1, 2, 3, 1.5]}) == ["body", "support", "y", 4]
    assert bad(support={**support, "y": [0, True, 2, 3, 4]}) == ["body", "support", "y", 1]
    assert bad(support={**support, "x": [*support["x"][:4], "not base64!"]}) == ["body", "support", "x", 4]
    gif = io.BytesIO()
    Image.new("L", (28, 28)).save(gif, format="GIF")
    assert bad(query={"x": [base64.b64encode(gif.getvalue()).decode()]}) == ["body", "query", "x", 0]
    assert bad(query={"x": [[[0.0] * 28] * 27]}) == ["body", "query", "x", 0]
    nan_image = [[[float("nan")] * 28] * 28]
    raw = json.dumps({"support": support, "query": {"x": [png(pictures[0]), nan_image]}})  # NaN tokens
    r = client.post(f"{API}/models/{model_id}/adapt", content=raw,
                    headers={**headers, "content-type": "application/json"})
    assert loc_of(r) == ["body", "query", "x", 1]


def test_image_preprocessing_matches_training(trained) -> None:
    """The service feeds an uploaded PNG to the model exactly as training feeds that drawing: the
    wiring (through ``preprocess_image``) and the values against an independent reference (PIL's
    Lanczos resize of the grey drawing, inverted so that ink is 1.0)."""
    client, _, _ = trained
    from service.adaptation import inputs_tensor

    model = client.app.state.services.adapter.model(register_classifier(client), None)
    picture = np.random.default_rng(1).integers(0, 255, size=(105, 105)).astype(np.uint8)
    tensor = inputs_tensor([png(picture)], "x", model, max_pixels=10**6)
    assert torch.equal(tensor[0], preprocess_image(Image.fromarray(picture), 28))
    resized = np.asarray(Image.fromarray(picture, mode="L").resize((28, 28), Image.Resampling.LANCZOS), np.float64)
    assert tensor.shape == (1, 1, 28, 28)
    assert np.allclose(tensor[0, 0].double().numpy(), (255.0 - resized) / 255.0, atol=1e-6)


def test_saturated_adaptation_answers_429_with_retry_after(tmp_path) -> None:
    settings = make_settings(tmp_path, adapt_max_concurrency=1, adapt_queue_limit=0, adapt_retry_after_s=3,
                             adapt_max_steps=1_000_000)
    headers = {"Authorization": "Bearer " + settings.admin_token.get_secret_value()}
    with TestClient(make_app(settings)) as client:
        job = submit(client, headers, outer={"iterations": 2, "meta_batch_size": 2}, eval={"every": 2, "tasks": 1})
        model_id = wait_for_job(client, job["id"], headers)["model_id"]
        adapter = client.app.state.services.adapter
        slow: dict = {}
        # A query long enough to hold the only slot while the next one arrives.
        thread = threading.Thread(target=lambda: slow.setdefault("r", adapt(client, model_id, headers, steps=10_000)))
        thread.start()
        deadline = time.monotonic() + 10
        while adapter.in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        r = adapt(client, model_id, headers)
        assert r.status_code == 429 and r.headers["retry-after"] == "3"
        thread.join(60)
        assert slow["r"].status_code == 200
        assert adapt(client, model_id, headers).status_code == 200  # the slot is free again
        assert "maml_adapt_rejected_total 1.0" in client.get("/metrics").text


def test_image_folder_job_trains_and_adapts_on_uploaded_images(tmp_path) -> None:
    """A real image-folder job (10 class folders of RGB pictures under a data root), then adaptation
    on uploaded JPEGs, which become exactly the tensors training makes of the same files."""
    settings = make_settings(tmp_path)
    headers = {"Authorization": "Bearer " + settings.admin_token.get_secret_value()}
    rng = np.random.default_rng(0)
    folder = settings.data_roots[0] / "pictures"
    files = []
    for c in range(10):
        (folder / f"class{c}").mkdir(parents=True)
        for k in range(2):
            path = folder / f"class{c}" / f"{k}.jpg"
            Image.fromarray(rng.integers(0, 255, size=(120, 90, 3)).astype(np.uint8)).save(path, quality=90)
            files.append(path)
    with TestClient(make_app(settings)) as client:
        job = submit(client, headers,
                     task={"family": "image_folder", "path": "pictures", "ways": 2, "shots": 1, "queries": 1,
                           "image_size": 16, "channels": 3},
                     model={"name": "conv4", "filters": 4}, inner={"steps": 1, "lr": 0.1},
                     outer={"iterations": 3, "meta_batch_size": 2}, eval={"every": 3, "tasks": 2, "steps": 2})
        done = wait_for_job(client, job["id"], headers)
        assert done["status"] == "succeeded", done["error"]
        model = client.get(f"{API}/models/{done['model_id']}", headers=headers).json()
        assert model["input_shape"] == [3, 16, 16] and model["kind"] == "classification"

        uploads = [base64.b64encode(f.read_bytes()).decode() for f in files[:4]]
        r = adapt(client, model["id"], headers, support={"x": uploads[:2], "y": [0, 1]}, query={"x": uploads[2:]})
        assert r.status_code == 200, r.text
        assert len(r.json()["probabilities"]) == 2 and r.json()["steps"] == 2

        from service.adaptation import inputs_tensor
        from workers.tasks.image_folder import preprocess_image as folder_preprocess

        loaded = client.app.state.services.adapter.model(model["id"], None)
        served = inputs_tensor(uploads[:1], "x", loaded, max_pixels=10**6)[0]
        with Image.open(files[0]) as img:
            assert torch.equal(served, folder_preprocess(img, 16, 3))  # the wiring: training's preprocessing
            # the values, independently: PIL's resize of the RGB image, channels first, in [0, 1]
            reference = np.asarray(img.convert("RGB").resize((16, 16), Image.Resampling.LANCZOS), np.float64)
        assert np.allclose(served.double().numpy(), reference.transpose(2, 0, 1) / 255.0, atol=1e-6)
        truncated = base64.b64encode(files[0].read_bytes()[:200]).decode()
        assert loc_of(adapt(client, model["id"], headers, support={"x": [truncated, uploads[1]], "y": [0, 1]},
                            query={"x": []})) == ["body", "support", "x", 0]


def test_rl_policy_trains_registers_and_adapts_to_a_goal(client: TestClient, admin_headers) -> None:
    """A nav2d job through the API; the registered policy adapts to a new goal on the server."""
    done = train_nav2d(client, admin_headers, horizon=20)
    model = client.get(f"/api/v1/models/{done['model_id']}", headers=admin_headers).json()
    assert model["kind"] == "rl_policy" and model["input_shape"] == [2]
    url = f"/api/v1/models/{done['model_id']}/adapt"
    r = client.post(url, json={"task": {"goal": [0.3, -0.2]}, "steps": 2, "rollouts": 4}, headers=admin_headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["kind"] == "rl_policy" and len(body["returns"]) == 3
    assert body["return_before"] == body["returns"][0] and body["return_after"] == body["returns"][-1]
    # A goal outside the task space, a wrong task key, a supervised body, too many rollouts: 422 naming it.
    for bad, field in [({"task": {"goal": [0.9, 0.0]}}, "task.goal"), ({"task": {"velocity": 1.0}}, "task"),
                       ({"support": {"x": [[0.0]], "y": [[0.0]]}}, "support"),
                       ({"task": {"goal": [0.1, 0.1]}, "rollouts": 500}, "rollouts"),
                       ({"task": {"goal": [0.1, 0.1]}, "horizon": 5000}, "horizon")]:
        r = client.post(url, json=bad, headers=admin_headers)
        assert r.status_code == 422, (bad, r.text)
        assert field in [".".join(map(str, e["loc"][1:])) for e in r.json()["detail"]], (bad, r.text)

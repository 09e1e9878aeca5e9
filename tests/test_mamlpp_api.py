"""A model trained with learned inner-loop pieces (MAML++ LSLR, per-step BatchNorm) through the
service: ``GET /models/{id}/weights`` carries them, and ``POST /models/{id}/adapt`` adapts with
them, exactly as ``workers.evaluation.adapt`` does in process."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from helpers import make_app, make_settings, submit, wait_for_job
from safetensors.torch import load

from workers.evaluation import adapt, predict
from workers.mamlpp import BN_PREFIX, LR_PREFIX, MetaOptions, attach_for
from workers.models import build_model
from workers.spec import JobSpec

API = "/api/v1"
# The service's persistence is not what is tested here: SQLite only.
pytestmark = [pytest.mark.usefixtures("database"), pytest.mark.backends("sqlite")]

SPEC = {"model": {"factory": "user_models:make_model", "kwargs": {"width": 6}, "per_step_bn": True,
                  "per_step_bn_stats": True},
        "inner": {"steps": 2, "lr": 0.05, "learn_lr": "per_layer_per_step"},
        "outer": {"iterations": 8, "meta_batch_size": 2, "multi_step_loss": True, "msl_anneal_iterations": 4,
                  "lr": 0.01},
        "eval": {"every": 8, "tasks": 2, "steps": 3}}


def test_adaptation_uses_the_learned_pieces(tmp_path) -> None:
    settings = make_settings(tmp_path, adapt_max_steps=20)
    headers = {"Authorization": "Bearer " + settings.admin_token.get_secret_value()}
    with TestClient(make_app(settings)) as client:
        job = submit(client, headers, **SPEC)
        done = wait_for_job(client, job["id"], headers, timeout=120)
        assert done["status"] == "succeeded", done
        model_id = done["model_id"]

        r = client.get(f"{API}/models/{model_id}/weights", headers=headers)
        assert r.status_code == 200
        weights = load(r.content)
        lrs = {k: v for k, v in weights.items() if k.startswith(LR_PREFIX + ".")}
        bns = {k: v for k, v in weights.items() if k.startswith(BN_PREFIX + ".")}
        assert set(lrs) == {f"{LR_PREFIX}.{n}" for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")}
        assert set(bns) == {f"{BN_PREFIX}.bn.weight", f"{BN_PREFIX}.bn.bias"}
        assert all(v.shape == (2,) for v in lrs.values()) and bns[f"{BN_PREFIX}.bn.weight"].shape == (2, 6)
        assert any(not torch.allclose(v, torch.full_like(v, 0.05)) for v in lrs.values())  # meta-learned
        # per-step running statistics: steps + 1 rows for the BatchNorm layer, averaged over 8 iterations
        assert weights["bn_stats.bn.mean"].shape == weights["bn_stats.bn.var"].shape == (3, 6)
        assert int(weights["bn_stats.updates"]) == 8

        support = {"x": [[-2.0], [-1.0], [0.0], [1.0], [2.5]], "y": [[0.3], [-0.4], [0.1], [0.9], [-1.2]]}
        query = {"x": [[0.5], [-1.5], [3.0]]}
        r = client.post(f"{API}/models/{model_id}/adapt", json={"support": support, "query": query},
                        headers=headers)
        assert r.status_code == 200, r.text
        answer = r.json()

        # In process: the registered weights, workers.evaluation.adapt with the model's learned pieces.
        spec = JobSpec.model_validate(done["spec"])
        module = attach_for(build_model(spec.model, input_shape=(1,), output_dim=1,
                                        allowed_modules=["user_models"]), spec)
        module.load_state_dict(weights, strict=True)
        params = {n: p.detach() for n, p in module.named_parameters()}
        buffers = {n: b.detach() for n, b in module.named_buffers()}
        xs, ys, xq = (torch.tensor(v) for v in (support["x"], support["y"], query["x"]))
        adapted, before, after = adapt(module, params, buffers, xs, ys, steps=spec.eval.steps, lr=spec.inner.lr,
                                       loss="mse", meta=MetaOptions.of(spec))
        expected = predict(module, adapted, buffers, xq)
        assert answer["steps"] == 3
        assert answer["support_loss_before"] == pytest.approx(before, rel=1e-6)
        assert answer["support_loss_after"] == pytest.approx(after, rel=1e-6)
        torch.testing.assert_close(torch.tensor(answer["predictions"], dtype=torch.float32), expected,
                                   rtol=1e-5, atol=1e-6)
        # Normalised with the running statistics, one query item alone gets the answer it got in the batch.
        r = client.post(f"{API}/models/{model_id}/adapt", json={"support": support, "query": {"x": query["x"][1:2]}},
                        headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0] == pytest.approx(answer["predictions"][1], rel=1e-5)
        # ... which is not what the plain inner loop (the fixed inner.lr on every weight) gives.
        plain, _, _ = adapt(module, params, buffers, xs, ys, steps=spec.eval.steps, lr=spec.inner.lr, loss="mse")
        assert not torch.allclose(predict(module, plain, buffers, xq), expected, rtol=1e-4)

        r = client.post(f"{API}/models/{model_id}/adapt", json={"support": support, "query": query, "lr": 0.1},
                        headers=headers)
        assert r.status_code == 422 and "learned" in r.text


def test_support_normalised_model_answers_each_query_item_alone_as_in_its_batch(tmp_path) -> None:
    """``model.query_bn: support`` through the service: the returned weights carry the support set's
    statistics, and a query item's prediction does not depend on the others."""
    settings = make_settings(tmp_path, adapt_max_steps=20)
    headers = {"Authorization": "Bearer " + settings.admin_token.get_secret_value()}
    spec = {"model": {"factory": "user_models:make_model", "kwargs": {"width": 6}, "query_bn": "support"},
            "inner": {"steps": 2, "lr": 0.05}, "outer": {"iterations": 4, "meta_batch_size": 2, "lr": 0.01},
            "eval": {"every": 4, "tasks": 2, "steps": 2}}
    support = {"x": [[-2.0], [-1.0], [0.0], [1.0], [2.5]], "y": [[0.3], [-0.4], [0.1], [0.9], [-1.2]]}
    query = {"x": [[0.5], [-1.5], [3.0]]}
    with TestClient(make_app(settings)) as client:
        done = wait_for_job(client, submit(client, headers, **spec)["id"], headers, timeout=120)
        assert done["status"] == "succeeded", done
        url = f"{API}/models/{done['model_id']}/adapt"
        r = client.post(url, json={"support": support, "query": query, "return_weights": True}, headers=headers)
        assert r.status_code == 200, r.text
        together = r.json()
        for i, x in enumerate(query["x"]):
            alone = client.post(url, json={"support": support, "query": {"x": [x]}}, headers=headers)
            assert alone.status_code == 200, alone.text
            assert alone.json()["predictions"][0] == pytest.approx(together["predictions"][i], rel=1e-5)
        r = client.get(f"{API}/adapted/{together['adapted_id']}/weights", headers=headers)
        assert r.status_code == 200, r.text
        adapted = load(r.content)
        assert adapted["bn.step_mean"].shape == adapted["bn.step_var"].shape == (6,)

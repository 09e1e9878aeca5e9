"""Model sizing at submission counts the learned inner-loop pieces (issue 13).

``service.jobs.check_spec`` sizes a job's model on the meta device for quotas and
``MAML_MAX_MODEL_PARAMETERS``. Meta-SGD adds a learning rate per weight, LSLR one per tensor and
step, per-step BatchNorm a row per step: the count must include them, and it must equal the model
that training builds (``workers.supervised.build``), so the two cannot drift. Integer counts only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import make_settings

from service.errors import InvalidInput
from service.jobs import check_spec
from workers.spec import JobSpec
from workers.supervised import build

# tests/user_models.py: Linear(1, 8) -> BatchNorm1d(8) -> Linear(8, 1)
FC1, BN, FC2 = 8 + 8, 8 + 8, 8 + 1
BASE = FC1 + BN + FC2  # 41 parameters in 6 tensors, 2 of them BatchNorm's


def spec(**options: Any) -> JobSpec:
    inner = {"steps": 3, "lr": 0.1, **options.pop("inner", {})}
    return JobSpec.model_validate({"name": "size", "model": {"factory": "user_models:make_model",
                                                             **options.pop("model", {})},
                                   "inner": inner, **options})


CASES = {
    "plain MAML": (spec(), BASE),
    "Meta-SGD: a rate per weight": (spec(inner={"learn_lr": "per_parameter"}), 2 * BASE),
    "LSLR: a rate per tensor and step": (spec(inner={"learn_lr": "per_layer_per_step"}), BASE + 6 * 3),
    # BatchNorm: a (steps, 8) row per weight and bias; LSLR on the 4 tensors the loop adapts.
    "MAML++: per-step BatchNorm and LSLR": (spec(model={"per_step_bn": True}, inner={"learn_lr": "per_layer_per_step"}),
                                           BASE + 2 * 3 * 8 + 4 * 3),
    "ANIL with Meta-SGD: rates for the head only": (spec(inner={"adapt": "head", "learn_lr": "per_parameter"}),
                                                    BASE + FC2),
}


def counted(job: JobSpec, tmp_path: Path, limit: int) -> int | None:
    """The count check_spec refuses ``job`` with under ``limit``; None when it accepts it."""
    try:
        check_spec(job, make_settings(tmp_path, max_model_parameters=limit))
    except InvalidInput as exc:
        assert exc.field == "model" and "MAML_MAX_MODEL_PARAMETERS" in exc.reason, exc.reason
        return int(exc.reason.split(" parameters")[0].replace(",", ""))
    return None


@pytest.mark.parametrize("case", list(CASES))
def test_the_count_includes_the_learned_pieces_and_equals_the_trained_model(case: str, tmp_path: Path) -> None:
    job, expected = CASES[case]
    assert counted(job, tmp_path, limit=1) == expected  # refused: the message gives the count
    assert counted(job, tmp_path, limit=expected) is None  # exactly at the limit: accepted
    _, model = build(job, allowed_modules=["user_models"])
    assert sum(p.numel() for p in model.parameters()) == expected


def test_a_meta_sgd_model_over_the_limit_is_refused_where_plain_maml_fits(tmp_path: Path) -> None:
    limit = BASE + 10
    assert counted(spec(), tmp_path, limit) is None
    assert counted(spec(inner={"learn_lr": "per_parameter"}), tmp_path, limit) == 2 * BASE

"""The configuration of an RL meta-training job (to be mapped from ``JobSpec`` by the job API).

Defaults are the paper's 2D-navigation settings (Finn et al., 2017, section 5.3 and appendix):
20 rollouts per task, meta-batch 20, inner learning rate 0.1, one inner step, TRPO with KL bound
0.01, discount 0.99. Fields left ``None`` take the family's default (horizon 100 and meta-batch 20
for nav2d; 200 and 40 for half-cheetah).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from workers.rl.envs import FamilyName
from workers.spec import JobSpec, RLTask

# The configured limits a request is checked against (422 naming the field when exceeded).
MAX_HORIZON = 1000
MAX_ROLLOUTS = 200


class RLConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("rl-job", min_length=1, max_length=200, description="a human-readable name")
    family: FamilyName = Field("nav2d", description="environment family: nav2d, halfcheetah_vel, halfcheetah_dir")
    reward: Literal["squared", "distance"] = Field(
        "squared", description="nav2d reward: minus the squared distance (the paper's text) or minus the "
        "distance (the authors' rllab code)")
    horizon: int | None = Field(None, ge=1, le=MAX_HORIZON, description="episode length (default: the family's)")
    rollouts: int = Field(20, ge=1, le=MAX_ROLLOUTS, description="K: rollouts per task for each adaptation step "
                          "and for the post-adaptation (meta) batch")
    meta_batch_size: int | None = Field(None, ge=1, le=1000, description="tasks per meta-iteration "
                                        "(default: 20 for nav2d, 40 for half-cheetah)")
    hidden: list[int] = Field(default_factory=lambda: [100, 100], max_length=8,
                              description="policy hidden layer widths (ReLU)")
    init_log_std: float = Field(0.0, ge=-10, le=5, description="initial log standard deviation of the actions")

    inner_steps: int = Field(1, ge=0, le=10, description="policy-gradient adaptation steps "
                             "(0: joint training without adaptation, the 'pretrained' baseline)")
    inner_lr: float = Field(0.1, gt=0, le=100, description="alpha: inner learning rate")
    first_order: bool = Field(False, description="first-order MAML: do not differentiate through the inner step")
    gamma: float = Field(0.99, gt=0, le=1, description="discount factor")
    baseline_reg: float = Field(1e-5, gt=0, le=1, description="ridge coefficient of the linear feature baseline")
    normalize_advantages: bool = Field(True, description="centre and scale advantages per task and batch (rllab)")

    outer_optimizer: Literal["trpo", "adam"] = Field("trpo", description="meta-optimizer: TRPO (the paper) "
                                                     "or Adam on the surrogate's meta-gradient")
    outer_lr: float = Field(1e-3, gt=0, le=10, description="Adam's learning rate (unused by TRPO)")
    max_kl: float = Field(0.01, gt=0, le=10, description="TRPO: KL bound between old and new adapted policies")
    cg_iters: int = Field(10, ge=1, le=100, description="TRPO: conjugate gradient iterations")
    cg_damping: float = Field(1e-5, ge=0, le=10, description="TRPO: damping added to the Fisher-vector product")
    backtrack_ratio: float = Field(0.8, gt=0, lt=1, description="TRPO: line search shrink factor")
    max_backtracks: int = Field(15, ge=1, le=100, description="TRPO: line search steps before rejecting")

    iterations: int = Field(100, ge=1, le=1_000_000, description="meta-iterations")
    eval_every: int = Field(50, ge=1, le=1_000_000, description="evaluate on held-out tasks every this many "
                            "iterations")
    eval_tasks: int = Field(40, ge=1, le=1000, description="held-out tasks per evaluation")
    eval_steps: int = Field(3, ge=0, le=10, description="adaptation steps at evaluation")
    checkpoint_every: int = Field(10, ge=1, le=1_000_000, description="checkpoint every this many iterations")
    checkpoint_keep: int = Field(2, ge=1, le=100, description="checkpoints kept")
    workers: int = Field(1, ge=1, le=1024, description="Ray rollout workers sharing the meta-batch's tasks")
    cpus_per_worker: float = Field(1.0, gt=0, le=256, description="CPUs reserved per rollout worker")
    threads_per_worker: int = Field(1, ge=1, le=256, description="torch threads per rollout worker")
    seed: int = Field(0, ge=0, le=2**62, description="seeds tasks, rollouts and initialisation")
    dtype: Literal["float32", "float64"] = Field("float32", description="policy and rollout precision")

    @model_validator(mode="after")
    def _defaults(self) -> RLConfig:
        if any(h < 1 or h > 4096 for h in self.hidden):
            raise ValueError("hidden: widths must be within 1..4096")
        if self.family != "nav2d" and self.reward != "squared":
            raise ValueError("reward: only nav2d has a reward variant")
        if self.horizon is None:
            self.horizon = 100 if self.family == "nav2d" else 200
        if self.meta_batch_size is None:
            self.meta_batch_size = 20 if self.family == "nav2d" else 40
        return self

    @property
    def episode_length(self) -> int:
        """The horizon, resolved (the validator fills ``horizon``; this also narrows the type)."""
        return self.horizon if self.horizon is not None else (100 if self.family == "nav2d" else 200)

    @property
    def tasks_per_batch(self) -> int:
        """The meta-batch size, resolved."""
        if self.meta_batch_size is not None:
            return self.meta_batch_size
        return 20 if self.family == "nav2d" else 40


def from_job_spec(spec: JobSpec) -> RLConfig:
    """The RL configuration of a job spec whose task family is an RL one (the job API's entry)."""
    task = spec.task
    if not isinstance(task, RLTask):
        raise ValueError(f"task.family: '{task.family}' is not an RL task family")
    res, outer = spec.resources, spec.outer
    return RLConfig(
        name=spec.name, family=task.family, reward=task.reward, horizon=task.horizon, rollouts=task.rollouts,
        gamma=task.gamma, meta_batch_size=outer.meta_batch_size, hidden=list(spec.model.hidden),
        inner_steps=spec.inner.steps, inner_lr=spec.inner.lr, first_order=spec.algorithm == "fomaml",
        outer_optimizer="adam" if outer.optimizer == "adam" else "trpo", outer_lr=outer.lr, max_kl=outer.max_kl,
        cg_iters=outer.cg_iters, cg_damping=outer.cg_damping, backtrack_ratio=outer.backtrack_ratio,
        max_backtracks=outer.max_backtracks, iterations=outer.iterations, eval_every=spec.eval.every,
        eval_tasks=spec.eval.tasks, eval_steps=spec.eval.steps, checkpoint_every=spec.checkpoint.every,
        checkpoint_keep=spec.checkpoint.keep, workers=res.workers, cpus_per_worker=res.cpus_per_worker,
        threads_per_worker=res.threads_per_worker, seed=spec.seed, dtype=spec.dtype,
    )


def describe_export(model_dir: Path, spec: JobSpec) -> None:
    """Add to an exported policy what the model registry reads of every model (spec, shapes, loss)."""
    info_path = Path(model_dir) / "model.json"
    info = json.loads(info_path.read_text())
    info.update(spec=spec.model_dump(mode="json"), input_shape=[info["obs_dim"]], output_dim=info["act_dim"],
                loss="policy_gradient")
    info_path.write_text(json.dumps(info, indent=2))

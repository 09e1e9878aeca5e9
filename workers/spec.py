"""Job specification: the single source of truth for the API, the CLI, the workers and Tune.

Every field has a description and a constraint; the defaults are those of the MAML paper
(Finn et al., 2017) for the sinusoid regression problem.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Algorithm = Literal["maml", "fomaml", "reptile"]
# Names are stored in text columns, and PostgreSQL's text cannot hold a NUL character.
NAME_PATTERN = r"^[^\x00]+$"


class _Spec(BaseModel):
    # Unknown keys are refused, so a typo ("inner.step") is a 422 naming the field, not a silent default.
    # Every number of a spec is finite: JSON parsers accept Infinity and NaN, training and the SSE stream do not.
    model_config = ConfigDict(extra="forbid", frozen=False, allow_inf_nan=False)


class SinusoidTask(_Spec):
    family: Literal["sinusoid"] = Field("sinusoid", description="y = A sin(x - phase), the paper's regression")
    shots: int = Field(10, ge=1, le=1000, description="K: support points per task")
    queries: int = Field(10, ge=1, le=1000, description="query points per task (the meta-objective)")
    amplitude: tuple[float, float] = Field((0.1, 5.0), description="range of the amplitude A")
    phase: tuple[float, float] = Field((0.0, 3.141592653589793), description="range of the phase")
    x_range: tuple[float, float] = Field((-5.0, 5.0), description="range of the inputs x")

    @model_validator(mode="after")
    def _ranges(self) -> SinusoidTask:
        for name in ("amplitude", "phase", "x_range"):
            low, high = getattr(self, name)
            if not low < high:
                raise ValueError(f"{name}: low ({low}) must be below high ({high})")
        return self


class OmniglotTask(_Spec):
    family: Literal["omniglot"] = Field(description="N-way K-shot characters from Omniglot")
    ways: int = Field(5, ge=2, le=1000, description="N: classes per task")
    shots: int = Field(1, ge=1, le=19, description="K: support images per class")
    queries: int = Field(15, ge=1, le=19, description="query images per class")
    split: Literal["paper", "official"] = Field(
        "paper",
        description="paper: 1200 characters to meta-train, the other 423 to meta-test, each rotated "
        "by 0/90/180/270 degrees as new classes; official: background vs evaluation alphabets",
    )
    image_size: int = Field(28, ge=8, le=105, description="side of the square grey input, in pixels")
    path: str | None = Field(None, description="folder holding images_background.zip and "
                             "images_evaluation.zip (default: the configured data root)")

    @model_validator(mode="after")
    def _drawings(self) -> OmniglotTask:
        if self.shots + self.queries > 20:
            raise ValueError(
                f"shots + queries = {self.shots + self.queries}: Omniglot has only 20 drawings per character"
            )
        return self


class ImageFolderTask(_Spec):
    family: Literal["image_folder"] = Field(description="N-way K-shot from a folder of class folders, "
                                            "or the MiniImagenet split format")
    path: str = Field(min_length=1, description="root: class sub-folders, or images/ plus train/val/test.csv")
    ways: int = Field(5, ge=2, le=1000, description="N: classes per task")
    shots: int = Field(1, ge=1, le=1000, description="K: support images per class")
    queries: int = Field(15, ge=1, le=1000, description="query images per class")
    image_size: int = Field(84, ge=8, le=512, description="side of the square RGB input, in pixels")
    channels: Literal[1, 3] = Field(3, description="1 for grey, 3 for RGB")


# Meta-RL: the paper's per-family defaults, the one table of them (Finn et al., 2017, section 5.3).
RL_FAMILY_DEFAULTS: dict[str, dict[str, int]] = {
    "nav2d": {"horizon": 100, "meta_batch_size": 20},
    "halfcheetah_vel": {"horizon": 200, "meta_batch_size": 40},
    "halfcheetah_dir": {"horizon": 200, "meta_batch_size": 40},
}
RL_FAMILIES = tuple(RL_FAMILY_DEFAULTS)
RL_MAX_STEPS = 10  # policy-gradient steps (inner and at evaluation): each needs fresh rollouts
RL_MAX_EVAL_TASKS = 1000
RL_MAX_ROLLOUTS = 200
RL_MAX_HORIZON = 1000


class RLTask(_Spec):
    family: Literal["nav2d", "halfcheetah_vel", "halfcheetah_dir"] = Field(
        description="meta-RL: nav2d (2D point navigation to a goal in [-0.5, 0.5]^2), halfcheetah_vel "
        "(target velocity in [0, 2]) or halfcheetah_dir (forward/backward), the latter two on MuJoCo")
    rollouts: int = Field(20, ge=1, le=RL_MAX_ROLLOUTS, description="K: rollouts per task for each adaptation step")
    horizon: int | None = Field(None, ge=1, le=RL_MAX_HORIZON, description="episode length (default: 100 for nav2d, "
                                "200 for half-cheetah)")
    reward: Literal["squared", "distance"] = Field(
        "squared", description="nav2d reward: minus the squared distance to the goal (the paper's text) or "
        "minus the distance (the authors' code)")
    gamma: float = Field(0.99, gt=0, le=1, description="discount factor")

    @model_validator(mode="after")
    def _reward(self) -> RLTask:
        if self.family != "nav2d" and self.reward != "squared":
            raise ValueError("reward: only nav2d has a reward variant")
        return self

    @property
    def episode_length(self) -> int:
        """The horizon, or the family's default."""
        return self.horizon if self.horizon is not None else RL_FAMILY_DEFAULTS[self.family]["horizon"]


TaskSpec = Annotated[SinusoidTask | OmniglotTask | ImageFolderTask | RLTask, Field(discriminator="family")]


class ModelSpec(_Spec):
    name: Literal["mlp", "conv4"] | None = Field(
        None, description="a built-in model: mlp (the paper's 1-40-40-1 ReLU MLP) or conv4")
    hidden: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=lambda: [40, 40], max_length=16,
        description="mlp: hidden layer widths (default 40-40; 100-100 for an RL policy)")
    filters: int | None = Field(
        None, ge=1, le=512, description="conv4: filters per layer (default 64 for grey, 32 for RGB)")
    factory: str | None = Field(
        None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="a user model as 'package.module:factory' (module must be allow-listed)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the factory")
    per_step_bn: bool = Field(
        False, description="MAML++: per inner step BatchNorm weights and biases, meta-learned (not adapted in "
        "the inner loop); needs a model with BatchNorm (conv4)")
    per_step_bn_stats: bool = Field(
        False, description="MAML++: per inner step BatchNorm running statistics, accumulated over meta-training "
        "(all-reduced like the gradients); adaptation and evaluation normalise each prediction with those of "
        "its step, so a query item's output does not depend on the other query items; needs BatchNorm")
    query_bn: Literal["batch", "support"] = Field(
        "batch", description="what normalises the BatchNorm layers in the query passes, in meta-training and at "
        "prediction: 'batch', the query batch's own statistics (the MAML paper's transductive setting); "
        "'support', the support set's statistics at the same parameters (MetaBN, Bronskill et al. 2020), so "
        "that a query item's output does not depend on the other query items; needs BatchNorm")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.name is None) == (self.factory is None):
            raise ValueError("give exactly one of 'name' (mlp, conv4) or 'factory' ('package.module:fn')")
        return self


class InnerSpec(_Spec):
    steps: int = Field(1, ge=1, le=200, description="inner gradient steps on the support set")
    lr: float = Field(0.01, gt=0, le=100, description="alpha: inner learning rate")
    optimizer: Literal["sgd", "adam"] = Field(
        "sgd", description="inner optimizer; adam only with reptile (as in the Reptile paper)")
    batch_size: int | None = Field(
        None, ge=1, le=100_000, description="reptile: inner mini-batch size (default: the whole support set)")
    learn_lr: Literal["none", "per_layer_per_step", "per_parameter"] = Field(
        "none", description="learned inner learning rates, meta-learned with the initialisation (starting at "
        "inner.lr): per_layer_per_step (MAML++ LSLR: one per parameter tensor and step) or per_parameter "
        "(Meta-SGD: one per weight); none: the fixed inner.lr")
    adapt: Literal["all", "head"] = Field(
        "all", description="what the inner loop adapts: all parameters, or the head only (ANIL: the last "
        "linear layer; the body is meta-learned but frozen inside the inner loop)")
    checkpoint: bool = Field(
        False, description="second-order MAML: recompute each inner step in the backward pass instead of "
        "storing its graph (memory of one step instead of all of them, about twice the compute)")


class OuterSpec(_Spec):
    optimizer: Literal["adam", "sgd", "trpo"] = Field(
        "adam", description="meta-optimizer; trpo (RL task families only, their default)")
    lr: float = Field(0.001, gt=0, le=100, description="meta learning rate (reptile: outer step size)")
    meta_batch_size: int = Field(25, ge=1, le=10_000, description="tasks per meta-iteration")
    iterations: int = Field(2000, ge=1, le=10_000_000, description="meta-iterations")
    anneal: bool = Field(False, description="anneal the meta learning rate linearly to 0 (Reptile); the same "
                         "as lr_schedule 'linear'")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="meta learning rate schedule over the iterations: constant, linear to 0, or "
        "cosine to lr_min (MAML++)")
    lr_min: float = Field(0.0, ge=0, le=100, description="cosine: the meta learning rate at the last iteration")
    multi_step_loss: bool = Field(
        False, description="MAML++ multi-step loss: the query loss after every inner step, its weights annealed "
        "towards the last step over msl_anneal_iterations, then the last step's loss only")
    msl_anneal_iterations: int = Field(
        1000, ge=1, le=10_000_000, description="multi-step loss: iterations over which the weights of the "
        "non-final steps decay (to 0.03 / steps); from then on only the last step's loss")
    first_order_iterations: int = Field(
        0, ge=0, le=10_000_000, description="MAML++ derivative-order annealing: first order for the first this "
        "many iterations, then second order (algorithm maml only)")
    max_kl: float = Field(0.01, gt=0, le=10, description="trpo: KL bound between old and new adapted policies")
    cg_iters: int = Field(10, ge=1, le=100, description="trpo: conjugate gradient iterations")
    cg_damping: float = Field(1e-5, ge=0, le=10, description="trpo: damping of the Fisher-vector product")
    backtrack_ratio: float = Field(0.8, gt=0, lt=1, description="trpo: line search shrink factor")
    max_backtracks: int = Field(15, ge=1, le=100, description="trpo: line search steps before rejecting")


class EvalSpec(_Spec):
    every: int = Field(500, ge=1, le=10_000_000, description="evaluate every this many iterations")
    tasks: int = Field(100, ge=1, le=100_000, description="held-out tasks per evaluation")
    steps: int = Field(10, ge=0, le=1000, description="adaptation steps at meta-test time")


class ResourcesSpec(_Spec):
    workers: int = Field(1, ge=1, le=1024, description="Ray workers that share the meta-batch")
    cpus_per_worker: float = Field(1.0, gt=0, le=256, description="CPUs reserved per worker")
    gpus_per_worker: float = Field(0.0, ge=0, le=16, description="GPUs per worker (0: CPU only)")
    threads_per_worker: int = Field(1, ge=1, le=256, description="torch threads per worker")


class CheckpointSpec(_Spec):
    every: int = Field(100, ge=1, le=10_000_000, description="checkpoint every this many iterations")
    keep: int = Field(2, ge=1, le=100, description="checkpoints kept (oldest removed first)")


class JobSpec(_Spec):
    """A meta-training job. ``JobSpec.model_validate(json)`` is the only way specs enter the system."""

    name: str = Field("job", min_length=1, max_length=200, pattern=NAME_PATTERN, description="a human-readable name")
    algorithm: Algorithm = Field("maml", description="maml (second order), fomaml or reptile")
    task: TaskSpec = Field(default_factory=SinusoidTask, description="the task family and its shape")
    model: ModelSpec = Field(default_factory=lambda: ModelSpec(name="mlp"), description="the model")
    inner: InnerSpec = Field(default_factory=InnerSpec, description="the inner (adaptation) loop")
    outer: OuterSpec = Field(default_factory=OuterSpec, description="the outer (meta) loop")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="meta-test evaluation")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Ray resources")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="checkpointing")
    seed: int = Field(0, ge=0, le=2**62, description="seeds task sampling and initialisation")
    dtype: Literal["float32", "float64"] = Field("float32", description="parameter and data precision")

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if self.task.family in RL_FAMILIES:
            self._resolve_rl_defaults()
        elif self.outer.optimizer == "trpo":
            raise ValueError(f"outer.optimizer: trpo is only for RL task families ({', '.join(RL_FAMILIES)})")
        if self.inner.optimizer == "adam" and self.algorithm != "reptile":
            raise ValueError("inner.optimizer: adam is only supported with algorithm 'reptile'")
        if self.inner.batch_size is not None and self.algorithm != "reptile":
            raise ValueError("inner.batch_size: only used by algorithm 'reptile'")
        if self.model.name == "conv4" and self.task.family == "sinusoid":
            raise ValueError("model.name: conv4 needs an image task family, not sinusoid")
        if self.model.name == "mlp" and self.task.family != "sinusoid" and not self.model.hidden:
            raise ValueError("model.hidden: must not be empty")
        self._meta_options()
        return self

    def _meta_options(self) -> None:
        """The MAML++ / Meta-SGD / ANIL options: refuse what would be silently ignored or meaningless."""
        inner, outer = self.inner, self.outer
        if outer.anneal and outer.lr_schedule not in ("constant", "linear"):
            raise ValueError(f"outer.lr_schedule: '{outer.lr_schedule}' contradicts outer.anneal (linear); "
                             "give one of them")
        if outer.lr_min > 0 and self.meta_lr_schedule != "cosine":
            raise ValueError("outer.lr_min: only used by lr_schedule 'cosine'")
        if outer.lr_min > outer.lr:
            raise ValueError(f"outer.lr_min: {outer.lr_min} is above outer.lr ({outer.lr})")
        gradient_based = ("maml", "fomaml")
        options = [("inner.learn_lr", inner.learn_lr != "none"), ("inner.adapt", inner.adapt != "all"),
                   ("inner.checkpoint", inner.checkpoint), ("outer.multi_step_loss", outer.multi_step_loss),
                   ("outer.first_order_iterations", outer.first_order_iterations > 0),
                   ("model.per_step_bn", self.model.per_step_bn),
                   ("model.per_step_bn_stats", self.model.per_step_bn_stats),
                   ("model.query_bn", self.model.query_bn != "batch")]
        for field, used in options:
            if used and self.algorithm not in gradient_based:
                raise ValueError(f"{field}: only with algorithm 'maml' or 'fomaml' (Reptile takes no "
                                 "meta-gradient through its inner loop)")
            if used and self.task.family in RL_FAMILIES:
                raise ValueError(f"{field}: not supported for RL task families")
        if self.task.family in RL_FAMILIES and self.meta_lr_schedule == "cosine":
            raise ValueError("outer.lr_schedule: cosine is not supported for RL task families")
        if outer.first_order_iterations > 0 and self.algorithm != "maml":
            raise ValueError("outer.first_order_iterations: only with algorithm 'maml' (fomaml is first order "
                             "throughout)")
        if inner.checkpoint and self.algorithm != "maml":
            raise ValueError("inner.checkpoint: only with algorithm 'maml' (first order keeps no graph of the "
                             "inner loop to save)")
        if inner.checkpoint and inner.adapt == "head":
            raise ValueError("inner.checkpoint: not with inner.adapt 'head' (ANIL's inner graph is the head's, "
                             "already small)")
        if self.model.per_step_bn_stats and self.model.query_bn != "batch":
            raise ValueError("model.query_bn: 'support' normalises the query passes with the support set's "
                             "statistics and per_step_bn_stats with running ones; choose one")
        for field, used in (("per_step_bn", self.model.per_step_bn),
                            ("per_step_bn_stats", self.model.per_step_bn_stats),
                            ("query_bn", self.model.query_bn != "batch")):
            if used and self.model.name == "mlp":
                raise ValueError(f"model.{field}: the mlp has no BatchNorm (use conv4, or a factory model with "
                                 "BatchNorm layers)")

    @property
    def meta_lr_schedule(self) -> Literal["constant", "linear", "cosine"]:
        """The meta learning rate schedule: ``outer.anneal`` is the older spelling of 'linear'."""
        return "linear" if self.outer.anneal else self.outer.lr_schedule

    @property
    def meta_options_used(self) -> bool:
        """Whether any MAML++ / Meta-SGD / ANIL option is on (the general per-task inner loop)."""
        inner, outer = self.inner, self.outer
        return (inner.learn_lr != "none" or inner.adapt != "all" or inner.checkpoint or outer.multi_step_loss
                or outer.first_order_iterations > 0 or self.model.per_step_bn or self.model.per_step_bn_stats
                or self.model.query_bn != "batch")

    def _resolve_rl_defaults(self) -> None:
        """RL takes the paper's own defaults where the spec left a field out (written into the spec,
        so a stored spec reads back the same): TRPO, alpha = 0.1, meta-batch 20 (nav2d) or 40
        (half-cheetah), a 100-100 policy, 3 adaptation steps at evaluation on 40 goals."""
        if self.algorithm == "reptile":
            raise ValueError("algorithm: reptile is not supported for RL task families (use maml or fomaml)")
        if self.model.name != "mlp":
            raise ValueError("model.name: RL task families use the Gaussian MLP policy: {'name': 'mlp'}")
        if self.outer.optimizer == "sgd":
            raise ValueError("outer.optimizer: RL task families take trpo or adam")
        if self.inner.steps > RL_MAX_STEPS:
            raise ValueError(f"inner.steps: at most {RL_MAX_STEPS} policy-gradient steps for RL task families")
        family = RL_FAMILY_DEFAULTS[self.task.family]
        defaults: list[tuple[_Spec, dict[str, Any]]] = [
            (self.outer, {"optimizer": "trpo", "meta_batch_size": family["meta_batch_size"]}),
            (self.inner, {"lr": 0.1}),
            (self.model, {"hidden": [100, 100]}),
            (self.eval, {"steps": 3, "tasks": 40, "every": 50}),
        ]
        for section, values in defaults:
            for field, value in values.items():
                if field not in section.model_fields_set:
                    setattr(section, field, value)
        if self.eval.steps > RL_MAX_STEPS:
            raise ValueError(f"eval.steps: at most {RL_MAX_STEPS} adaptation steps for RL task families")
        if self.eval.tasks > RL_MAX_EVAL_TASKS:
            raise ValueError(f"eval.tasks: at most {RL_MAX_EVAL_TASKS} goals for RL task families")

    @property
    def is_classification(self) -> bool:
        return self.task.family not in ("sinusoid", *RL_FAMILIES)

    @property
    def is_rl(self) -> bool:
        return self.task.family in RL_FAMILIES

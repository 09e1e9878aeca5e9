"""MAML-RL benchmark: the shape of the paper's 2D navigation result, and rollout throughput.

Finn et al. (2017), figure 5 (left): average return on new goals after 0..3 policy-gradient steps
for the MAML policy, a policy pretrained on all tasks jointly, and a random initialisation; MAML
must beat both after one step. Every number here comes from this one run, on this machine:

    .venv/bin/python -m benchmarks.rl_nav2d [--iterations 30] [--quick] [--no-cheetah]

- MAML: second-order MAML, TRPO meta-update (KL 0.01), the paper's settings: 20 goals per
  meta-batch, K = 20 rollouts of 100 steps, one inner step with alpha = 0.1, 2x100 ReLU policy.
- Pretrained: the same trainer without adaptation (``inner_steps=0``), TRPO on random goals, for
  the same number of iterations and the same environment steps (40 rollouts per goal, since MAML
  samples 20 before and 20 after adapting).
- Random: the seeded initial policy.
Evaluation: 40 held-out goals (the test split), K = 20 rollouts per step, the same action noise
for every policy (common random numbers). MAML adapts with its training alpha (0.1); the baselines
are given the best alpha of {0.05, 0.1, 0.2, 0.5} for each step count, chosen on these same goals
(a choice in their favour), and are also shown at MAML's alpha; MAML minus baseline is also given
paired over goals.
Throughput: environment steps per second sampling one meta-batch (pre- and post-adaptation
rollouts) in process, on 1 and on 2 Ray rollout workers (``ray.init(num_cpus=2)``), 1 torch thread
each. With gymnasium + mujoco installed, half-cheetah throughput and one MAML iteration's time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

from workers.raygroup import LocalGroup, WorkerGroup, ensure_ray
from workers.rl.program import RolloutWorker, build_family, build_policy, sample_tasks_rollouts
from workers.run import Trainer
from workers.spec import JobSpec

RESULTS = Path(__file__).parent / "results"
ALPHAS = (0.05, 0.1, 0.2, 0.5)


def rl_spec(name: str = "maml", *, family: str = "nav2d", rollouts: int = 20, iterations: int = 1,
            meta_batch_size: int | None = None, eval_tasks: int = 40, inner_steps: int = 1) -> JobSpec:
    """A meta-RL job with the paper's defaults. ``inner_steps=0`` is the 'pretrained' baseline
    (joint training without adaptation): the job API refuses 0 steps, so it is set past validation."""
    spec = JobSpec.model_validate({
        "name": name, "task": {"family": family, "rollouts": rollouts},
        "outer": {"iterations": iterations, **({"meta_batch_size": meta_batch_size} if meta_batch_size else {})},
        "eval": {"every": 10**6, "tasks": eval_tasks, "steps": 3}, "checkpoint": {"every": 10**6}})
    if inner_steps != spec.inner.steps:
        spec = spec.model_copy(update={"inner": spec.inner.model_copy(update={"steps": inner_steps})})
    return spec


def train(cfg: JobSpec, run_dir: Path) -> tuple[Trainer, list[dict], float]:
    curve: list[dict] = []

    def report(it: int, m: dict[str, float]) -> None:
        curve.append({"iteration": it, **{k: round(v, 4) for k, v in m.items()
                                          if k.startswith(("rl/", "perf/iteration_s", "perf/env_steps_per_s"))}})
        if it % 5 == 0:
            print(f"{cfg.name} {it}: before {m['rl/return_before']:.2f} after {m['rl/return_after']:.2f} "
                  f"({m['perf/iteration_s']:.1f} s/it)", flush=True)

    trainer = Trainer(cfg, run_dir=run_dir, reporter=report)
    start = time.perf_counter()
    trainer.run()
    return trainer, curve, time.perf_counter() - start


def evaluate(cfg: JobSpec, trainer_or_none: Trainer | None, alphas: tuple[float, ...], steps: int,
             tasks: int) -> dict[str, np.ndarray]:
    """{alpha: per-goal average returns (goals, steps + 1)} on the held-out goals (test split)."""
    family = build_family(cfg)
    policy = build_policy(cfg, family) if trainer_or_none is None else trainer_or_none.model
    params = {n: p.detach() for n, p in policy.named_parameters()}
    out = {}
    for alpha in alphas:
        rollouts = sample_tasks_rollouts(cfg, family, policy, params, 0, range(tasks), split="test", steps=steps,
                                         lr=alpha)
        out[str(alpha)] = np.array([r.returns for r in rollouts])
    return out


def throughput(cfg: JobSpec, rounds: int) -> dict[str, float]:
    """Environment steps per second sampling one meta-batch: in process, Ray 1 and 2 workers."""
    params = {n: p.detach() for n, p in build_policy(cfg, build_family(cfg)).named_parameters()}
    result = {}
    groups = [("local", lambda: LocalGroup(RolloutWorker(cfg, 0, 1)))]
    groups += [(f"ray{w}", lambda w=w: WorkerGroup(RolloutWorker, cfg, world=w, cpus=1, gpus=0, threads=1))
               for w in (1, 2)]
    for name, make in groups:
        group = make()
        try:
            group.call("sample", group.share(params), 0)  # warm-up
            rates = []
            for r in range(rounds):
                start = time.perf_counter()
                shards = group.call("sample", group.share(params), r + 1)
                rates.append(sum(x.env_steps for shard in shards for x in shard) / (time.perf_counter() - start))
            result[name] = statistics.median(rates)
        finally:
            group.close()
    return result


def cheetah(quick: bool) -> dict:
    try:
        import gymnasium
        import mujoco
    except ImportError as exc:
        return {"status": f"not run: {exc}"}
    out: dict = {"gymnasium": gymnasium.__version__, "mujoco": mujoco.__version__}
    cfg = rl_spec(family="halfcheetah_vel", meta_batch_size=4)
    out["throughput_meta_batch_4"] = throughput(cfg, 1 if quick else 2)
    if not quick:
        full = rl_spec(family="halfcheetah_vel")
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(full, run_dir=Path(tmp))
            m = trainer.step()
        out["full_iteration"] = {k: round(v, 3) for k, v in m.items() if k.startswith(("perf/", "rl/return"))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="2 iterations, 5 eval goals: a plumbing check")
    parser.add_argument("--no-cheetah", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    eval_tasks = 5 if args.quick else 40
    iterations = 2 if args.quick else args.iterations
    started = time.perf_counter()
    maml_cfg = rl_spec("maml", iterations=iterations, eval_tasks=eval_tasks)
    pre_cfg = rl_spec("pretrained", inner_steps=0, rollouts=40, iterations=iterations, eval_tasks=eval_tasks)
    with tempfile.TemporaryDirectory() as tmp:
        maml, maml_curve, maml_s = train(maml_cfg, Path(tmp) / "maml")
        pre, pre_curve, pre_s = train(pre_cfg, Path(tmp) / "pre")
        evals = {
            "maml": evaluate(maml_cfg, maml, (maml_cfg.inner.lr,), 3, eval_tasks),
            "pretrained": evaluate(maml_cfg, pre, ALPHAS, 3, eval_tasks),
            "random": evaluate(maml_cfg, None, ALPHAS, 3, eval_tasks),
        }
    table: dict[str, list[dict]] = {}
    for name, by_alpha in evals.items():
        row = []
        for k in range(4):
            # Step 0 does not depend on alpha; later steps take the baseline's best alpha.
            alpha = max(by_alpha, key=lambda a: by_alpha[a][:, k].mean())
            per_goal = by_alpha[alpha][:, k]
            row.append({"return": float(per_goal.mean()), "sem": float(per_goal.std(ddof=1) / np.sqrt(len(per_goal))),
                        "alpha": float(alpha)})
        table[name] = row
    # Paired over goals (every policy sees the same goals and action noise): MAML minus baseline.
    paired = {}
    for base in ("pretrained", "random"):
        for k in range(1, 4):
            diff = evals["maml"][str(maml_cfg.inner.lr)][:, k] - evals[base][str(table[base][k]["alpha"])][:, k]
            paired[f"{base}/step_{k}"] = {"mean": float(diff.mean()),
                                          "sem": float(diff.std(ddof=1) / np.sqrt(len(diff))),
                                          "maml_better_goals": int((diff > 0).sum()), "goals": len(diff)}
    train_s = time.perf_counter() - started
    ensure_ray(num_cpus=2)
    tput = throughput(maml_cfg.model_copy(update={"iterations": 1}), 2 if args.quick else 3)
    cheetah_out = {"status": "skipped (--no-cheetah)"} if args.no_cheetah else cheetah(args.quick)
    ray.shutdown()
    info = {"cores": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
            "machine": platform.machine(), "torch_threads": 1, "load_average_at_end": os.getloadavg()}
    wall = time.perf_counter() - started
    maml_wins = all(table["maml"][1]["return"] > table[b][1]["return"] for b in ("pretrained", "random"))
    payload = {
        "machine": info, "iterations": iterations, "eval_goals": eval_tasks,
        "wall_s": {"maml_train": maml_s, "pretrained_train": pre_s, "total": wall},
        "returns": table, "maml_beats_both_after_one_step": maml_wins,
        "paired_maml_minus_baseline": paired,
        "per_goal_returns": {n: {a: v.round(4).tolist() for a, v in e.items()} for n, e in evals.items()},
        "curves": {"maml": maml_curve, "pretrained": pre_curve},
        "throughput_env_steps_per_s": tput, "halfcheetah": cheetah_out,
        "configs": {"maml": maml_cfg.model_dump(mode="json"), "pretrained": pre_cfg.model_dump(mode="json")},
    }
    RESULTS.mkdir(exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (RESULTS / f"rl_nav2d{suffix}.json").write_text(json.dumps(payload, indent=2))

    def cell(c: dict) -> str:
        return f"{c['return']:.2f} ± {c['sem']:.2f}"

    lines = [
        f"# MAML-RL, 2D navigation: average return on {eval_tasks} held-out goals after k policy-gradient steps",
        "",
        f"Reward: minus the squared distance to the goal, horizon 100. {iterations} meta-iterations each "
        f"(MAML {maml_s / 60:.1f} min, pretrained {pre_s / 60:.1f} min), 1 torch thread; "
        f"total wall time {wall / 60:.1f} min (training and evaluation {train_s / 60:.1f} min). "
        "± is the standard error over goals. Baselines adapt with their best alpha per column "
        f"(in brackets, from {list(ALPHAS)}); MAML with its training alpha 0.1.",
        "",
        f"Machine: {info}",
        "",
        "| policy | 0 steps | 1 step | 2 steps | 3 steps |",
        "|---|---|---|---|---|",
    ]
    for name in ("maml", "pretrained", "random"):
        cells = [cell(c) + (f" [{c['alpha']}]" if name != "maml" and k > 0 else "") for k, c in enumerate(table[name])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name in ("pretrained", "random"):  # at MAML's alpha, as the paper compares them
        same = evals[name][str(maml_cfg.inner.lr)]
        cells = [f"{same[:, k].mean():.2f} ± {same[:, k].std(ddof=1) / np.sqrt(len(same)):.2f}" for k in range(4)]
        lines.append(f"| {name}, alpha {maml_cfg.inner.lr} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"MAML beats both baselines after one step: **{maml_wins}**.",
        "",
        "Paired over the same goals and action noise, MAML minus baseline (baseline at its best alpha):",
        "",
        "| baseline | steps | difference ± s.e. | goals where MAML is better |",
        "|---|---|---|---|",
    ]
    lines += [f"| {key.split('/')[0]} | {key.split('_')[-1]} | {v['mean']:+.2f} ± {v['sem']:.2f} | "
              f"{v['maml_better_goals']}/{v['goals']} |" for key, v in paired.items()]
    lines += [
        "",
        "## Rollout throughput (nav2d meta-batch: 20 goals x 20 rollouts x 100 steps, before and after adapting)",
        "",
        "| sampler | env steps / s |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:,.0f} |" for k, v in tput.items()]
    lines += ["", "## Half-cheetah (MuJoCo through gymnasium)", "", "```", json.dumps(cheetah_out, indent=2), "```"]
    (RESULTS / f"rl_nav2d{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

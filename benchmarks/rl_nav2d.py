"""MAML-RL benchmark: the shape of the paper's 2D navigation and half-cheetah velocity results.

Finn et al. (2017), figure 5: average return on new goals after 0..3 policy-gradient steps for the
MAML policy, a policy pretrained on all tasks jointly, and a random initialisation; MAML must beat
both after one step. Every number here comes from this one run, on this machine:

    .venv/bin/python -m benchmarks.rl_nav2d [--family nav2d|halfcheetah_vel] [--cpu-minutes 30] [--quick]

- MAML: second-order MAML, TRPO meta-update (KL 0.01), the paper's settings: nav2d 20 goals per
  meta-batch, K = 20 rollouts of 100 steps; half-cheetah velocity (``--family halfcheetah_vel``,
  results in ``rl_cheetah.*``) 40 goal velocities per meta-batch, K = 20 rollouts of 200 steps
  (``--meta-batch-size`` to fit a budget); one inner step with alpha = 0.1, 2x100 ReLU policy.
- Pretrained: the same trainer without adaptation (``inner_steps=0``), TRPO on random goals, with
  the same environment steps per iteration (40 rollouts per goal, since MAML samples 20 before and
  20 after adapting), for a number of iterations or a CPU budget.
- Random: the seeded initial policy.
Evaluation: 40 held-out goals (the test split; ``--eval-goals``), K = 20 rollouts per step, the same
action noise for every policy (common random numbers). MAML adapts with its training alpha (0.1); the baselines
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
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import ray
import torch

from workers.raygroup import LocalGroup, WorkerGroup, ensure_ray
from workers.rl.program import RolloutWorker, build_family, build_policy, sample_tasks_rollouts
from workers.run import Trainer
from workers.spec import RL_FAMILY_DEFAULTS, JobSpec

RESULTS = Path(__file__).parent / "results"
ALPHAS = (0.05, 0.1, 0.2, 0.5)
# Per family: the results' file stem, the report's title and the words for a task's goal (one, several).
FAMILIES = {"nav2d": {"stem": "rl_nav2d", "title": "2D navigation", "goal": "goal", "goals": "goals"},
            "halfcheetah_vel": {
                "stem": "rl_cheetah", "title": "half-cheetah velocity",
                "goal": "goal velocity", "goals": "goal velocities",
                "paper": "Finn et al. (2017), figure 5 (half-cheetah, goal velocity): "
                         "the MAML policy's return jumps after one policy-gradient step and stays well above the "
                         "pretrained and random policies at 1-3 steps. The paper gives these numbers only in the "
                         "figure (no table), so none are quoted here; every number below was measured in this run."}}
REWARDS = {
    "distance": "minus the distance to the goal (the authors' code)",
    "squared": "minus the squared distance to the goal (the paper's text)",
    "halfcheetah_vel": "per step, minus |v - v_goal| (forward velocity against the goal velocity, uniform in "
                       "[0, 2]) minus 0.05 |a|^2 (rllab's half_cheetah_env_rand.py), summed over the episode "
                       "(0 would be perfect tracking at no control cost)"}


def rl_spec(name: str = "maml", *, family: str = "nav2d", rollouts: int = 20, iterations: int = 1,
            meta_batch_size: int | None = None, eval_tasks: int = 40, inner_steps: int = 1,
            reward: str = "squared") -> JobSpec:
    """A meta-RL job with the paper's defaults. ``inner_steps=0`` is the 'pretrained' baseline
    (joint training without adaptation): the job API refuses 0 steps, so it is set past validation."""
    spec = JobSpec.model_validate({
        "name": name, "task": {"family": family, "rollouts": rollouts,
                               **({"reward": reward} if family == "nav2d" else {})},
        "outer": {"iterations": iterations, **({"meta_batch_size": meta_batch_size} if meta_batch_size else {})},
        "eval": {"every": 10**6, "tasks": eval_tasks, "steps": 3}, "checkpoint": {"every": 10**6}})
    if inner_steps != spec.inner.steps:
        spec = spec.model_copy(update={"inner": spec.inner.model_copy(update={"steps": inner_steps})})
    return spec


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


def machine_info(load_start: tuple[float, ...]) -> dict:
    return {"cores": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "torch_threads": 1,
            "load_average_at_start": [round(x, 2) for x in load_start],
            "load_average_now": [round(x, 2) for x in os.getloadavg()],
            "written_at": datetime.now(UTC).isoformat(timespec="seconds")}


def render(p: dict) -> list[str]:
    """The markdown report of a finished run."""
    fam, task = FAMILIES[p["family"]], p["configs"]["maml"]["task"]
    goal, goals = fam["goal"], fam["goals"]

    def cell(c: dict) -> str:
        return f"{c['return']:.2f} ± {c['sem']:.2f}"

    def diff(v: dict) -> str:
        return f"{v['mean']:+.2f} ± {v['sem']:.2f} ({v['better_goals']}/{v['goals']} {goals})"

    m, pre, info = p["maml"]["spent"], p["pretrained"]["spent"], p["machine"]
    loads = [pt["load1"] for pt in p["maml"]["curve"]]
    head = p["result"]["maml_minus_pretrained_step1_same_alpha"]
    horizon = task["horizon"] or RL_FAMILY_DEFAULTS[p["family"]]["horizon"]
    paper = [f"Paper: {fam['paper']}", ""] if "paper" in fam else []
    lines = [
        f"# MAML-RL, {fam['title']}: MAML against a pretrained policy on {p['eval_goals']} held-out {goals}",
        "",
        f"Reward: {REWARDS[p['reward'] or p['family']]}; horizon {horizon}; "
        f"{p['configs']['maml']['outer']['meta_batch_size']} {goals} per meta-batch, {task['rollouts']} rollouts "
        f"per {goal}, one inner step of alpha 0.1, 2x100 ReLU Gaussian policy, second-order MAML with a TRPO "
        "meta-update (KL 0.01), 1 torch thread.",
        "",
        *paper,
        f"- **MAML**: budget {p['cpu_budget_s'] / 60:.0f} CPU minutes of meta-training (this process's "
        f"CPU time, evaluations not counted); used {m['train_cpu_s'] / 60:.1f} CPU min, "
        f"{m['iterations']} iterations, {m['wall_s'] / 60:.1f} wall min, stopped by: {m['stopped_by']}; "
        f"periodic paired evaluations {m['eval_cpu_s'] / 60:.1f} CPU min.",
        f"- **Pretrained**: the same trainer without adaptation (TRPO on random {goals}, 40 rollouts per "
        f"{goal}: MAML's environment steps per iteration), {pre['iterations']} iterations, "
        f"{pre['train_cpu_s'] / 60:.1f} CPU min, {pre['wall_s'] / 60:.1f} wall min, stopped by: "
        f"{pre['stopped_by']}; evaluating it and the random policy at every alpha: "
        f"{p['baseline_eval_cpu_s'] / 60:.1f} CPU min.",
        f"- Machine: {info['cores']} cores shared with other engineers' work; 1-minute load average "
        f"during MAML's training {min(loads, default=0):.1f}-{max(loads, default=0):.1f} "
        f"(mean {sum(loads) / max(len(loads), 1):.1f}); torch {info['torch']}, Python {info['python']}. "
        f"Whole run: {p['total']['cpu_s'] / 60:.1f} CPU min, {p['total']['wall_s'] / 60:.1f} wall min.",
        "",
        f"**Result: MAML minus pretrained after one step, both with alpha 0.1, paired over the same "
        f"{head['goals']} {goals} and action noise: {head['mean']:+.2f} ± {head['sem']:.2f} (s.e.), MAML better "
        f"on {head['better_goals']}/{head['goals']} {goals}; more than two standard errors: "
        f"{p['result']['more_than_two_se']}.**",
        "",
        "Average return after k policy-gradient steps (± s.e. over goals). Best alpha: each baseline's best "
        f"of {list(ALPHAS)} per column, chosen on these same {goals} (in its favour); MAML always alpha 0.1.",
        "",
        "| policy | 0 steps | 1 step | 2 steps | 3 steps |",
        "|---|---|---|---|---|",
    ]
    for name in ("maml", "pretrained", "random"):
        by_alpha = p["per_goal_returns"][name]
        if name != "maml":
            cells = [cell(c) + (f" [{c['alpha']}]" if k > 0 else "") for k, c in enumerate(p["returns"][name])]
            lines.append(f"| {name}, best alpha | " + " | ".join(cells) + " |")
        same = np.array(by_alpha["0.1"])
        cells = [f"{same[:, k].mean():.2f} ± {same[:, k].std(ddof=1) / np.sqrt(len(same)):.2f}" for k in range(4)]
        lines.append(f"| {name}, alpha 0.1 | " + " | ".join(cells) + " |")
    lines += ["", f"MAML minus baseline, paired over {goals}:", "",
              "| baseline | alpha | 1 step | 2 steps | 3 steps |", "|---|---|---|---|---|"]
    for base in ("pretrained", "random"):
        for how in ("same_alpha", "best_alpha"):
            d = p["paired_maml_minus_baseline"]
            lines.append(f"| {base} | {how.replace('_', ' ')} | "
                         + " | ".join(diff(d[f"{base}/{how}/step_{k}"]) for k in range(1, 4)) + " |")
    # A baseline that gets worse with every step is best left unadapted: MAML after k steps against it.
    maml, pre0 = np.array(p["per_goal_returns"]["maml"]["0.1"]), np.array(p["per_goal_returns"]["pretrained"]["0.1"])
    lines.append("| pretrained | not adapted (0 steps) | "
                 + " | ".join(diff(paired(maml[:, k], pre0[:, 0])) for k in range(1, 4)) + " |")
    lines += ["", "## Learning curve: MAML after one step minus pretrained after one step (alpha 0.1; and the "
              "pretrained's best alpha), against MAML's meta-training CPU time", "",
              "| iteration | train CPU min | wall min | load | MAML 1 step | vs pretrained, same alpha | "
              "vs pretrained, best alpha |", "|---|---|---|---|---|---|---|"]
    for pt in p["maml"]["curve"]:
        if "eval/maml_step1" in pt:
            lines.append(f"| {pt['iteration']} | {pt['train_cpu_s'] / 60:.1f} | {pt['wall_s'] / 60:.1f} | "
                         f"{pt['load1']:.1f} | {pt['eval/maml_step1']:.2f} | "
                         f"{diff(pt['eval/vs_pretrained_same_alpha'])} | {diff(pt['eval/vs_pretrained_best_alpha'])} |")
    if "throughput_env_steps_per_s" in p:
        lines += ["", "## Rollout throughput (env steps / s, one meta-batch)", "",
                  *(f"- {k}: {v:,.0f}" for k, v in p["throughput_env_steps_per_s"].items())]
    if "halfcheetah" in p:
        lines += ["", "## Half-cheetah (MuJoCo through gymnasium)", "", "```",
                  json.dumps(p["halfcheetah"], indent=2), "```"]
    return lines


def cpu_s() -> float:
    """CPU seconds of this process, all its threads (the budget's clock), plus finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """a - b per goal: mean, standard error, goals where a is better."""
    d = a - b
    return {"mean": float(d.mean()), "sem": float(d.std(ddof=1) / np.sqrt(len(d))),
            "better_goals": int((d > 0).sum()), "goals": len(d)}


def train_budgeted(cfg: JobSpec, run_dir: Path, *, cpu_budget_s: float, deadline: float | None,
                   eval_every: int = 0, on_eval: Callable[[Trainer, list[dict]], dict] | None = None,
                   label: str = "") -> tuple[Trainer, list[dict], dict]:
    """Meta-train ``cfg`` until ``cfg.outer.iterations``, the CPU budget (this process's CPU seconds)
    or the wall-clock ``deadline`` (time.time()), whichever comes first; ``on_eval(trainer)`` every
    ``eval_every`` iterations, given the curve so far, returns entries for this iteration's curve
    point; its CPU time is not charged to the budget."""
    trainer = Trainer(cfg, run_dir=run_dir)
    curve: list[dict] = []
    cpu0, wall0, eval_cpu = cpu_s(), time.perf_counter(), 0.0
    stop = "iterations"
    while trainer.iteration < cfg.outer.iterations:
        used = cpu_s() - cpu0 - eval_cpu
        if used >= cpu_budget_s:
            stop = "cpu budget"
            break
        if deadline is not None and time.time() >= deadline:
            stop = "wall-clock deadline"
            break
        m = trainer.step()
        it = trainer.iteration
        point = {"iteration": it, "train_cpu_s": round(cpu_s() - cpu0 - eval_cpu, 2),
                 "wall_s": round(time.perf_counter() - wall0, 2), "load1": round(os.getloadavg()[0], 2),
                 **{k: round(v, 4) for k, v in m.items() if k.startswith(("rl/return", "rl/kl", "perf/iteration_s"))}}
        if eval_every and on_eval is not None and it % eval_every == 0:
            c = cpu_s()
            trainer.program.sync(trainer.group)
            point.update(on_eval(trainer, curve))
            eval_cpu += cpu_s() - c
        curve.append(point)
        if it % 5 == 0 or any(k.startswith("eval/") for k in point):
            print(f"{label} {it}: {json.dumps(point)}", flush=True)
    trainer.program.sync(trainer.group)
    trainer.group.close()
    spent = {"train_cpu_s": round(cpu_s() - cpu0 - eval_cpu, 1), "eval_cpu_s": round(eval_cpu, 1),
             "wall_s": round(time.perf_counter() - wall0, 1), "iterations": trainer.iteration, "stopped_by": stop}
    return trainer, curve, spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=tuple(FAMILIES), default="nav2d",
                        help="nav2d (results rl_nav2d.*) or halfcheetah_vel (results rl_cheetah.*)")
    parser.add_argument("--cpu-minutes", type=float, default=30.0,
                        help="MAML's meta-training budget in CPU minutes of this process (evaluations excluded)")
    parser.add_argument("--max-iterations", type=int, default=1000, help="MAML: stop here if the budget lasts")
    parser.add_argument("--pretrained-iterations", type=int, default=100,
                        help="the pretrained baseline's iterations (40 rollouts per goal: MAML's env steps)")
    parser.add_argument("--pretrained-cpu-minutes", type=float,
                        help="the pretrained baseline's budget in CPU minutes, if any (stops at whichever comes first)")
    parser.add_argument("--meta-batch-size", type=int,
                        help="goals per meta-batch, MAML and pretrained (default: the family's, nav2d 20, cheetah 40)")
    parser.add_argument("--eval-goals", type=int, help="held-out goals of the evaluations (default 40; 5 with --quick)")
    parser.add_argument("--reward", choices=("squared", "distance"), default="distance",
                        help="nav2d only: distance: the authors' code; squared: the paper's text")
    parser.add_argument("--eval-every", type=int, default=20, help="MAML iterations between paired evaluations")
    parser.add_argument("--deadline", help="wall-clock UTC time HH:MM after which training stops (partial curve)")
    parser.add_argument("--quick", action="store_true", help="3 iterations, 5 eval goals: a plumbing check")
    parser.add_argument("--throughput", action="store_true", help="also measure rollout throughput (Ray)")
    parser.add_argument("--cheetah", action="store_true", help="also half-cheetah throughput and one iteration")
    args = parser.parse_args()
    torch.set_num_threads(1)
    deadline = None
    if args.deadline:
        hh, mm = (int(x) for x in args.deadline.split(":"))
        now = datetime.now(UTC)
        deadline = now.replace(hour=hh, minute=mm, second=0, microsecond=0).timestamp()
    eval_tasks = args.eval_goals or (5 if args.quick else 40)
    maml_its = 3 if args.quick else args.max_iterations
    pre_its = 3 if args.quick else args.pretrained_iterations
    budget_s = 60 * args.cpu_minutes
    started, cpu_started = time.perf_counter(), cpu_s()
    load_start = os.getloadavg()
    reward = args.reward if args.family == "nav2d" else None  # the half-cheetah's reward is fixed
    common = {"family": args.family, "meta_batch_size": args.meta_batch_size, "eval_tasks": eval_tasks,
              "reward": args.reward}
    maml_cfg = rl_spec("maml", iterations=maml_its, **common)
    pre_cfg = rl_spec("pretrained", inner_steps=0, rollouts=40, iterations=pre_its, **common)
    stem = FAMILIES[args.family]["stem"] + ("-quick" if args.quick else "")
    RESULTS.mkdir(exist_ok=True)
    payload: dict = {"status": "running", "settings": vars(args), "family": args.family, "reward": reward,
                     "eval_goals": eval_tasks,
                     "configs": {"maml": maml_cfg.model_dump(mode="json"),
                                 "pretrained": pre_cfg.model_dump(mode="json")}}

    def save() -> None:
        payload["machine"] = machine_info(load_start)
        (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        # 1. The pretrained baseline (joint training on random goals, no adaptation), then its returns
        #    on the held-out goals after 0..3 steps, at every alpha: the fixed reference of the curve.
        pre, pre_curve, pre_spent = train_budgeted(pre_cfg, Path(tmp) / "pre",
                                                   cpu_budget_s=60 * (args.pretrained_cpu_minutes or float("inf")),
                                                   deadline=deadline, label="pretrained")
        c = cpu_s()
        evals = {"pretrained": evaluate(maml_cfg, pre, ALPHAS, 3, eval_tasks),
                 "random": evaluate(maml_cfg, None, ALPHAS, 3, eval_tasks)}
        payload["baseline_eval_cpu_s"] = round(cpu_s() - c, 1)
        payload["pretrained"] = {"spent": pre_spent, "curve": pre_curve}
        save()
        same = evals["pretrained"][str(maml_cfg.inner.lr)]
        best1 = max(ALPHAS, key=lambda a: evals["pretrained"][str(a)][:, 1].mean())
        best = evals["pretrained"][str(best1)]

        def on_eval(trainer: Trainer, curve: list[dict]) -> dict:
            # MAML after 0 and 1 steps on the same held-out goals with the same action noise, paired.
            r = evaluate(maml_cfg, trainer, (maml_cfg.inner.lr,), 1, eval_tasks)[str(maml_cfg.inner.lr)]
            out = {"eval/maml_step1": round(float(r[:, 1].mean()), 3),
                   "eval/vs_pretrained_same_alpha": paired(r[:, 1], same[:, 1]),
                   "eval/vs_pretrained_best_alpha": paired(r[:, 1], best[:, 1])}
            payload["maml"] = {"curve": [*curve, {"iteration": trainer.iteration, **out}], "status": "running"}
            save()  # a partial curve survives a stop
            return out

        # 2. MAML within its CPU budget, with a paired evaluation every eval_every iterations.
        maml, maml_curve, maml_spent = train_budgeted(
            maml_cfg, Path(tmp) / "maml", cpu_budget_s=budget_s, deadline=deadline, eval_every=args.eval_every,
            on_eval=on_eval, label="maml")
        evals["maml"] = evaluate(maml_cfg, maml, (maml_cfg.inner.lr,), 3, eval_tasks)
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
    lr = str(maml_cfg.inner.lr)
    diffs = {}
    for base in ("pretrained", "random"):
        for k in range(1, 4):
            diffs[f"{base}/same_alpha/step_{k}"] = paired(evals["maml"][lr][:, k], evals[base][lr][:, k])
            diffs[f"{base}/best_alpha/step_{k}"] = paired(
                evals["maml"][lr][:, k], evals[base][str(table[base][k]["alpha"])][:, k])
    headline = diffs["pretrained/same_alpha/step_1"]
    payload.update({
        "status": "done", "cpu_budget_s": budget_s,
        "maml": {"spent": maml_spent, "curve": maml_curve},
        "returns": table, "paired_maml_minus_baseline": diffs,
        "result": {"maml_minus_pretrained_step1_same_alpha": headline,
                   "more_than_two_se": headline["mean"] > 2 * headline["sem"]},
        "per_goal_returns": {n: {a: v.round(4).tolist() for a, v in e.items()} for n, e in evals.items()},
        "total": {"cpu_s": round(cpu_s() - cpu_started, 1), "wall_s": round(time.perf_counter() - started, 1)},
    })
    if args.throughput or args.cheetah:
        ensure_ray(num_cpus=2)
        if args.throughput:
            payload["throughput_env_steps_per_s"] = throughput(maml_cfg, 2 if args.quick else 3)
        if args.cheetah:
            payload["halfcheetah"] = cheetah(args.quick)
        ray.shutdown()
    save()
    lines = render(payload)
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

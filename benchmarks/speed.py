"""Seconds per MAML meta-iteration: this engine against `higher` and a plain autograd loop.

Conv4 on Omniglot-sized inputs, 5-way 1-shot, 15 queries per class, 1 inner SGD step with
alpha 0.4, meta-batch 32 (the MAML paper's setting), second-order and first-order MAML:

    .venv/bin/python -m benchmarks.speed            # the full run (several minutes)
    .venv/bin/python -m benchmarks.speed --quick    # a smoke test: meta-batch 4, two rounds
    .venv/bin/python -m benchmarks.speed --threads 1   # one thread per candidate (robust to a busy machine)

Results: ``benchmarks/results/speed.{md,json}`` (``speed.quick.*`` with ``--quick``,
``speed.threads1.*`` with ``--threads 1``).

Candidates (each one iteration = the mean meta-gradient of the meta-batch, plus metrics):

* ``ours``: ``workers.meta_gradient(..., before=False)``, what the training loop runs on an
  iteration that does not report the pre-adaptation metrics: the engine's shard function, which
  takes the batched path of ``workers.fast`` for this model (inner loops of all tasks at once,
  then the hand-written CPU query kernels).
* ``ours-before``: the same with ``before=True``, as on iterations that report
  ``meta/loss_before`` and ``meta/accuracy_before`` (one more forward pass of every query set).
* ``higher``: ``higher.innerloop_ctx`` with an SGD inner optimiser, ``copy_initial_weights=False``,
  ``track_higher_grads`` on for second order and off for first order.
* ``autograd``: a per-task ``torch.autograd.grad`` loop over ``torch.func.functional_call``.

The anchors compute what ``ours`` does (the meta-gradient; the support loss before adapting; the
query loss and accuracy after adapting), without the pre-adaptation pass; the speed-up of each of
our rows is against the fastest anchor.

Method. The machine is shared, so the candidates are interleaved: each runs in its own
long-lived worker process (so that its peak resident memory, ``ru_maxrss``, is its own), and every
round asks each worker for one meta-iteration, in a rotating order. The table gives the median
over rounds; the ratio is the median of the per-round ratios (ours / fastest anchor in that round).
Every candidate uses ``torch.set_num_threads(THREADS)``. Inputs are synthetic (uniform noise,
28 x 28): the data does not change the cost. Gradient agreement is measured separately, on a
smaller meta-batch, against the plain autograd loop in float64.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

RESULTS = Path(__file__).parent / "results"
THREADS = 2  # torch threads, the same for every candidate (--threads to change)


@dataclass(frozen=True)
class Setting:
    """The benchmark problem (the MAML paper's Omniglot 5-way 1-shot training setting)."""

    ways: int = 5
    shots: int = 1  # support images per class
    queries: int = 15  # query images per class
    image: int = 28  # side of the grey input
    filters: int = 64  # Conv4 width
    inner_steps: int = 1
    alpha: float = 0.4  # inner learning rate
    meta_batch: int = 32  # tasks per meta-iteration


Grads = dict[str, torch.Tensor]
Metrics = dict[str, float]
Candidate = Callable[[nn.Module, list, Setting, bool], tuple[Grads, Metrics]]
ANCHORS = ("higher", "autograd")
OURS = ("ours", "ours-before")
CANDIDATES = OURS + ANCHORS


# ----------------------------------------------------------------------------------- the problem


def make_problem(setting: Setting, dtype: torch.dtype, tasks: int, seed: int = 0) -> tuple[nn.Module, list]:
    """Conv4 with BatchNorm's affine parameters randomised (not 1 and 0), and synthetic tasks."""
    from workers.models import Conv4

    torch.manual_seed(seed)
    model = Conv4(1, setting.ways, setting.filters, setting.image).double()
    with torch.no_grad():  # a trained-looking network: BatchNorm scales of both signs
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.5)
                m.bias.normal_(0.0, 0.5)
    gen = torch.Generator().manual_seed(seed + 1)
    labels_s = torch.arange(setting.ways).repeat(setting.shots)
    labels_q = torch.arange(setting.ways).repeat(setting.queries)
    side = (1, setting.image, setting.image)
    # drawn in float64 and rounded, so that float32 and float64 runs see the same problem
    problem = [(torch.rand(len(labels_s), *side, generator=gen, dtype=torch.float64).to(dtype), labels_s,
                torch.rand(len(labels_q), *side, generator=gen, dtype=torch.float64).to(dtype), labels_q)
               for _ in range(tasks)]
    return model.to(dtype), problem


def _accuracy(out: torch.Tensor, y: torch.Tensor) -> float:
    return (out.argmax(-1) == y).float().mean().item()


def _mean(total: Grads, metrics: Metrics, count: int) -> tuple[Grads, Metrics]:
    return {n: g / count for n, g in total.items()}, {k: v / count for k, v in metrics.items()}


# ---------------------------------------------------------------------------------- candidates


def run_ours(model: nn.Module, tasks: list, s: Setting, first_order: bool,
             before: bool = False) -> tuple[Grads, Metrics]:
    from workers import meta_gradient

    return meta_gradient(model, tasks, algorithm="fomaml" if first_order else "maml", inner_steps=s.inner_steps,
                         inner_lr=s.alpha, loss="cross_entropy", before=before)


def run_autograd(model: nn.Module, tasks: list, s: Setting, first_order: bool,
                 before: bool = False) -> tuple[Grads, Metrics]:
    """The plain loop: functional parameters, autograd.grad, create_graph for second order."""
    params = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    metrics: Metrics = {}

    def log(key: str, value: float) -> None:
        metrics[key] = metrics.get(key, 0.0) + value

    for xs, ys, xq, yq in tasks:
        if before:
            with torch.no_grad():
                out = functional_call(model, params, (xq,))
                log("meta/loss_before", F.cross_entropy(out, yq).item())
                log("meta/accuracy_before", _accuracy(out, yq))
        adapted = params
        for step in range(s.inner_steps):
            loss = F.cross_entropy(functional_call(model, adapted, (xs,)), ys)
            if step == 0:
                log("inner/loss_before", loss.item())
            grads = torch.autograd.grad(loss, tuple(adapted.values()), create_graph=not first_order)
            adapted = {n: p - s.alpha * g for (n, p), g in zip(adapted.items(), grads, strict=True)}
            if first_order:
                adapted = {n: p.detach().requires_grad_() for n, p in adapted.items()}
        out = functional_call(model, adapted, (xq,))
        loss = F.cross_entropy(out, yq)
        log("meta/loss", loss.item())
        log("meta/accuracy", _accuracy(out, yq))
        meta = torch.autograd.grad(loss, tuple((adapted if first_order else params).values()))
        for n, g in zip(params, meta, strict=True):
            total[n] += g
    return _mean(total, metrics, len(tasks))


def run_higher(model: nn.Module, tasks: list, s: Setting, first_order: bool,
               before: bool = False) -> tuple[Grads, Metrics]:
    """higher's unrolled SGD; the meta-gradient reaches the model's own parameters."""
    import higher

    inner_opt = torch.optim.SGD(model.parameters(), lr=s.alpha)
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    metrics: Metrics = {}

    def log(key: str, value: float) -> None:
        metrics[key] = metrics.get(key, 0.0) + value

    for xs, ys, xq, yq in tasks:
        if before:
            with torch.no_grad():
                out = model(xq)
                log("meta/loss_before", F.cross_entropy(out, yq).item())
                log("meta/accuracy_before", _accuracy(out, yq))
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False,
                                  track_higher_grads=not first_order) as (fmodel, diffopt):
            for step in range(s.inner_steps):
                loss = F.cross_entropy(fmodel(xs), ys)
                if step == 0:
                    log("inner/loss_before", loss.item())
                diffopt.step(loss)
            out = fmodel(xq)
            loss = F.cross_entropy(out, yq)
            log("meta/loss", loss.item())
            log("meta/accuracy", _accuracy(out, yq))
            meta = torch.autograd.grad(loss, list(fmodel.parameters()) if first_order else params)
        for acc, g in zip(total, meta, strict=True):
            acc += g
    names = [n for n, _ in model.named_parameters()]
    return _mean(dict(zip(names, total, strict=True)), metrics, len(tasks))


RUNNERS: dict[str, Candidate] = {
    "ours": run_ours,
    "ours-before": lambda m, t, s, fo: run_ours(m, t, s, fo, before=True),
    "higher": run_higher,
    "autograd": run_autograd,
}


# ------------------------------------------------------------------------------------ workers


def worker(name: str, first_order: bool, setting: Setting, threads: int) -> None:
    """One candidate in its own process: one meta-iteration per "run" line on stdin."""
    torch.set_num_threads(threads)
    model, tasks = make_problem(setting, torch.float32, setting.meta_batch)
    model.train()
    run = RUNNERS[name]
    print(f"ready {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        wall, cpu = time.perf_counter(), time.process_time()
        run(model, tasks, setting, first_order)
        print(f"time {time.perf_counter() - wall} {time.process_time() - cpu}", flush=True)
    print(f"peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", flush=True)


class Worker:
    def __init__(self, name: str, first_order: bool, setting: Setting, threads: int) -> None:
        self.name = name
        cmd = [sys.executable, "-m", "benchmarks.speed", "--worker", name, "--meta-batch", str(setting.meta_batch),
               "--threads", str(threads)]
        if first_order:
            cmd.append("--first-order")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=Path(__file__).parent.parent)
        self.ready_kib = int(self._expect("ready")[0])

    def _expect(self, word: str) -> list[str]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if not line or line[0] != word:
            raise RuntimeError(f"worker {self.name}: expected '{word}', got {line!r}")
        return line[1:]

    def run(self) -> tuple[float, float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        wall, cpu = self._expect("time")
        return float(wall), float(cpu)

    def close(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        peak = int(self._expect("peak")[0])
        self.proc.wait()
        return peak


def time_candidates(setting: Setting, first_order: bool, rounds: int, names: tuple[str, ...],
                    threads: int = THREADS) -> dict:
    """Interleaved timings: {name: {"wall": [...], "cpu": [...], "peak_mib": ..., ...}}."""
    workers = [Worker(n, first_order, setting, threads) for n in names]
    out: dict = {w.name: {"wall": [], "cpu": [], "ready_mib": w.ready_kib / 1024} for w in workers}
    try:
        for w in workers:  # warm-up (first-call allocations, oneDNN primitive creation)
            w.run()
        for r in range(rounds):
            order = workers[r % len(workers):] + workers[: r % len(workers)]
            for w in order:
                time.sleep(0.2)  # let the previous worker's threads go idle
                wall, cpu = w.run()
                out[w.name]["wall"].append(wall)
                out[w.name]["cpu"].append(cpu)
            print(f"  round {r + 1}/{rounds}: " + ", ".join(
                f"{w.name} {out[w.name]['wall'][-1]:.2f}s" for w in workers), flush=True)
    finally:
        for w in workers:
            out[w.name]["peak_mib"] = w.close() / 1024
    return out


# ------------------------------------------------------------------------- gradient agreement


def agreement(setting: Setting, tasks: int, threads: int = THREADS) -> dict:
    """Max |g - ref| / max |ref| and ||g - ref|| / ||ref|| per candidate, float32 and float64,
    against the plain autograd loop in float64 (same model, same tasks)."""
    torch.set_num_threads(threads)
    out: dict = {}
    for first_order in (False, True):
        order = "first" if first_order else "second"
        model64, tasks64 = make_problem(setting, torch.float64, tasks)
        ref, ref_metrics = run_autograd(model64, tasks64, setting, first_order, before=True)
        model32, tasks32 = make_problem(setting, torch.float32, tasks)
        ref32, ref32_metrics = run_autograd(model32, tasks32, setting, first_order, before=True)

        def compare(grads: Grads, metrics: Metrics, ref: Grads, ref_metrics: Metrics) -> dict:
            a = torch.cat([grads[n].reshape(-1) for n in ref]).double()
            b = torch.cat([g.reshape(-1) for g in ref.values()]).double()
            return {"max_rel": float((a - b).abs().max() / b.abs().max()), "norm_rel": float((a - b).norm() / b.norm()),
                    "metrics_max_abs": max(abs(metrics[k] - ref_metrics[k]) for k in metrics)}

        for name in ("ours", "ours-before", "higher", "autograd"):
            row = out.setdefault(order, {}).setdefault(name, {})
            grads, metrics = RUNNERS[name](model32, tasks32, setting, first_order)
            row["float32"] = compare(grads, metrics, ref, ref_metrics)
            row["float32_vs_autograd_float32"] = compare(grads, metrics, ref32, ref32_metrics)
            grads, metrics = RUNNERS[name](model64, tasks64, setting, first_order)
            row["float64"] = compare(grads, metrics, ref, ref_metrics)
    return out


# -------------------------------------------------------------------------------- reporting


def machine_info(threads: int) -> dict:
    model_name = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import version

    return {"cpu": model_name, "cores": os.cpu_count(), "torch": torch.__version__, "threads": threads,
            "higher": version("higher"), "python": platform.python_version(),
            "mkldnn": torch.backends.mkldnn.is_available()}


def summarise(timings: dict) -> dict:
    """Medians per candidate, and ours / fastest anchor per round (median over rounds)."""
    rows = {}
    for name, t in timings.items():
        rows[name] = {"median_s": statistics.median(t["wall"]), "min_s": min(t["wall"]),
                      "median_cpu_s": statistics.median(t["cpu"]), "peak_mib": t["peak_mib"],
                      "rounds": len(t["wall"])}
    anchors = [n for n in timings if n in ANCHORS]
    rounds = len(next(iter(timings.values()))["wall"])
    for name in (n for n in timings if n in OURS):
        if not anchors:
            continue
        for clock, suffix in (("wall", ""), ("cpu", "_cpu")):
            per_round = [min(timings[a][clock][r] for a in anchors) / timings[name][clock][r] for r in range(rounds)]
            rows[name]["speedup_vs_fastest_anchor" + suffix] = statistics.median(per_round)
            rows[name]["speedup_vs_fastest_anchor" + suffix + "_range"] = (min(per_round), max(per_round))
    return rows


def write(results: dict, stem: str, quick: bool) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2))
    s, m = results["setting"], results["machine"]
    lines = [
        "# MAML meta-iteration speed: this engine, `higher`, a plain autograd loop",
        "",
        f"Conv4 ({s['filters']} filters), {s['ways']}-way {s['shots']}-shot, {s['queries']} queries per class, "
        f"{s['image']}x{s['image']} synthetic inputs, {s['inner_steps']} inner step, alpha {s['alpha']}, "
        f"meta-batch {s['meta_batch']}, float32. Produced by `python -m benchmarks.speed"
        f"{results['args']}` on {results['date'][:16]} UTC.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} (mkldnn {m['mkldnn']}), higher {m['higher']}, "
        f"Python {m['python']}; every candidate with `torch.set_num_threads({m['threads']})`. The machine is "
        f"shared: 1-minute load average {results['load'][0]:.1f} at the start, {results['load'][1]:.1f} at the end. "
        f"Candidates interleaved, one meta-iteration each per round, rotating order; each in its own process.",
        "",
        "Candidates: `ours` is `workers.meta_gradient(..., before=False)`, what training runs on iterations "
        "that do not report the pre-adaptation metrics (the batched path of `workers.fast`: inner loops of all "
        "tasks at once, then the hand-written CPU query kernels of `workers.fast.fused`); `ours-before` is the "
        "same with `before=True` (one more forward pass of every query set, for `meta/loss_before` and "
        "`meta/accuracy_before`); `higher` is `higher.innerloop_ctx` (SGD, `copy_initial_weights=False`, "
        "`track_higher_grads` per order); `autograd` is a per-task `torch.autograd.grad` loop over "
        "`torch.func.functional_call`. The anchors compute what `ours` does (meta-gradient; support loss before "
        "adapting; query loss and accuracy after adapting), without the pre-adaptation pass.",
        "",
    ]
    for order in ("second", "first"):
        rows = results["timing"][order]
        lines += [f"## {order.capitalize()}-order MAML", "",
                  "| candidate | median s/iter | min s/iter | CPU s/iter | peak RSS (MiB) | "
                  "speed-up vs fastest anchor (CPU time) |",
                  "|---|---|---|---|---|---|"]
        for name, r in rows.items():
            def ratio(key: str, row: dict = r) -> str:
                if key not in row:
                    return ""
                lo, hi = row[key + "_range"]
                return f"**{row[key]:.2f}x** ({lo:.2f}-{hi:.2f}; CPU {row[key + '_cpu']:.2f}x)"
            lines.append(f"| {name} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['median_cpu_s']:.3f} | "
                         f"{r['peak_mib']:.0f} | {ratio('speedup_vs_fastest_anchor')} |")
        lines += ["", f"{rows[next(iter(rows))]['rounds']} rounds. Speed-up: per round, the fastest anchor's "
                  "wall time over ours; the median over rounds (range in brackets), and the same with process CPU "
                  "time (less sensitive to other processes on the machine).", ""]
    agree = results["agreement"]
    lines += ["## Gradient agreement", "",
              f"Mean meta-gradient over {results['agreement_tasks']} tasks, against the plain autograd loop in "
              "float64 on the same model and tasks: max |g - ref| / max |ref| (and ||g - ref|| / ||ref||). "
              "The float32 column is each candidate's float32 error (the same for all: float32 itself, "
              "including ReLU and max-pool decisions that flip near ties); the next column compares with the "
              "plain loop in float32.", "",
              "| order | candidate | float32 | float64 | float32 vs the float32 autograd loop | "
              "metrics, max abs diff (float64) |", "|---|---|---|---|---|---|"]
    for order, cands in agree.items():
        for name, d in cands.items():
            f32, f64, same = d["float32"], d["float64"], d["float32_vs_autograd_float32"]
            lines.append(f"| {order} | {name} | {f32['max_rel']:.1e} ({f32['norm_rel']:.1e}) | "
                         f"{f64['max_rel']:.1e} ({f64['norm_rel']:.1e}) | "
                         f"{same['max_rel']:.1e} ({same['norm_rel']:.1e}) | {f64['metrics_max_abs']:.1e} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="meta-batch 4, 2 rounds: a smoke test")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 9, quick 2)")
    parser.add_argument("--meta-batch", type=int, default=None, help="tasks per meta-iteration (default 32)")
    parser.add_argument("--only", nargs="*", default=None, help="candidates to time (default: all)")
    parser.add_argument("--agreement-tasks", type=int, default=None, help="tasks for the gradient check (4)")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help=f"torch threads for every candidate (default {THREADS}, this machine's cores)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--first-order", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    batch = args.meta_batch or (4 if args.quick else 32)
    setting = Setting(meta_batch=batch)
    if args.worker:
        worker(args.worker, args.first_order, setting, args.threads)
        return
    rounds = args.rounds or (2 if args.quick else 9)
    names = tuple(args.only or CANDIDATES)
    load_start = os.getloadavg()[0]
    timing = {}
    for first_order in (False, True):
        order = "first" if first_order else "second"
        print(f"{order}-order MAML, meta-batch {batch}, {rounds} rounds", flush=True)
        timing[order] = summarise(time_candidates(setting, first_order, rounds, names, args.threads))
    agreement_tasks = args.agreement_tasks or (2 if args.quick else 4)
    print(f"gradient agreement on {agreement_tasks} tasks", flush=True)
    results = {"date": datetime.now(UTC).isoformat(), "args": "".join(f" {a}" for a in sys.argv[1:]),
               "setting": asdict(setting),
               "machine": machine_info(args.threads), "load": (load_start, os.getloadavg()[0]), "timing": timing,
               "agreement": agreement(setting, agreement_tasks, args.threads), "agreement_tasks": agreement_tasks}
    stem = "speed" + (".quick" if args.quick else "") + (f".threads{args.threads}" if args.threads != THREADS else "")
    write(results, stem, args.quick)
    print((RESULTS / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()

"""Throughput of K seeds trained as one batched network against K sequential lab runs.

The lab trains every configuration at several seeds. ``gradwatch.lab.vectorized.run_group``
trains K seeds of one MLP configuration at once (one process, stacked parameters, batched
layers) and stores exactly what K ``run_task`` calls store. This measures what that buys:

- **runs**: one round is K ``run_task`` calls one after another (what one lab worker does
  without vectorizing) and one ``run_group`` of the same K tasks, each into a fresh store,
  in an order that alternates from round to round. Both include everything a lab run does:
  the data split, the model, watched training, the scalars, and ``diagnose`` of each run.
  ``--training-only`` leaves out the per-run diagnosis (the same ``diagnose`` call of a few
  tenths of a second per run in both variants, which batching cannot share) to show what
  the batched training itself buys.
  Reported: the median over rounds of (sequential seconds / vectorized seconds), its min
  and max, and the median seconds of each; the same ratio of the process's CPU seconds
  too, which a loaded machine disturbs less than wall time (the process works alone in
  both variants: one torch thread, and the store's writer thread). The seconds spent in
  ``diagnose`` are timed inside each variant, and the ratio without them is reported from
  the same rounds (``ratio_without_diagnosis``).
- **steps** (``--steps N``, 0 to skip): the bare training step of the same K models, no
  telemetry: K eager steps one after another; ``torch.func.vmap`` over
  ``torch.func.functional_call`` of the stacked parameters (then one backward and one
  optimizer step on the stacked leaves); and the batched step ``run_group`` uses. Median
  milliseconds per step of all K seeds, for each configuration; the reason the batched
  layers are used, not vmap, and the bound on the whole run's ratio: the runs' remaining
  seconds (data, model, recording, evaluation, store) are reported as ``other_s`` beside
  ``training_steps_s`` (steps per run x median step) and ``diagnose_s``.
- **lab** (``--lab``): ``run_lab`` of a preset (default ``seed``) on the local process pool,
  ``vectorize=False`` then ``vectorize=True``, once each: the whole lab's seconds.

The load average before and after each round is kept: the machine may be shared, and a
ratio taken while other jobs run is noisy (both variants are slowed, not equally).

    python bench/vectorized.py [--configs depth/sigmoid-d10-default,...] [--seeds 5] [--repeats 5]
                               [--threads 1] [--steps 200] [--training-only] [--lab]
                               [--lab-preset seed] [--workers 2]

Writes bench/results/vectorized.json (vectorized-training-only.json with --training-only) and
prints the ratios.
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
from typing import Any

import torch

from gradwatch.lab import tasks
from gradwatch.lab.models import build_model
from gradwatch.lab.presets import GridEntry, get_preset
from gradwatch.lab.runner import RunTask, run_lab, run_task
from gradwatch.lab.tasks import make_optimizer, task_dataset
from gradwatch.lab.vectorized import SeedGroup, StackedMLP, run_group, seed_losses

RESULTS = Path(__file__).parent / "results" / "vectorized.json"
RESULTS_TRAINING = Path(__file__).parent / "results" / "vectorized-training-only.json"


def _entry(preset: str, key: str) -> GridEntry:
    spec = get_preset(preset)
    for entry in spec.grid:
        if entry.config_key == key:
            return entry
    raise SystemExit(f"no configuration {key!r} in preset {preset!r}; known: "
                     + ", ".join(e.config_key for e in spec.grid))


def _load() -> float:
    return os.getloadavg()[0]


class _DiagnoseTimer:
    """``tasks.diagnoser`` replaced: the same ``diagnose``, its seconds added up."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.enabled = True

    def __call__(self):  # what tasks.diagnoser returns: the diagnose function, or None
        return self._timed if self.enabled else None

    def _timed(self, *args: Any, **kwargs: Any) -> Any:
        from gradwatch.diagnose import diagnose

        start = time.perf_counter()
        try:
            return diagnose(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


_TIMER = _DiagnoseTimer()


def _time_sequential(entry: GridEntry, seeds: int, store: Path) -> tuple[float, float, float]:
    """Wall, CPU and diagnose seconds of ``seeds`` run_task calls one after another."""
    _TIMER.seconds = 0.0
    wall, cpu = time.perf_counter(), time.process_time()
    for seed in range(seeds):
        result = run_task(RunTask("bench", entry, seed, "digits", str(store)))
        if result.status != "finished":
            raise RuntimeError(f"sequential run failed: {result.error}")
    return time.perf_counter() - wall, time.process_time() - cpu, _TIMER.seconds


def _time_vectorized(entry: GridEntry, seeds: int, store: Path) -> tuple[float, float, float]:
    """Wall, CPU and diagnose seconds of one run_group of the same tasks."""
    _TIMER.seconds = 0.0
    wall, cpu = time.perf_counter(), time.process_time()
    tasks = tuple(RunTask("bench", entry, s, "digits", str(store)) for s in range(seeds))
    result = run_group(SeedGroup(tasks))
    if result.status != "finished":
        raise RuntimeError(f"vectorized group failed: {result.error}")
    return time.perf_counter() - wall, time.process_time() - cpu, _TIMER.seconds


def bench_runs(entry: GridEntry, seeds: int, repeats: int) -> dict[str, Any]:
    """Rounds of K sequential runs against one vectorized group (after one warm-up of each)."""
    rounds = []
    with tempfile.TemporaryDirectory(prefix="gradwatch-bench-") as tmp:
        _time_sequential(entry, 1, Path(tmp) / "warm.db")  # imports, the data split's cache
        _time_vectorized(entry, 2, Path(tmp) / "warm.db")
        for r in range(repeats):
            before = _load()
            order = ("sequential", "vectorized") if r % 2 == 0 else ("vectorized", "sequential")
            seconds, cpu, diagnosis = {}, {}, {}
            for variant in order:
                store = Path(tmp) / f"{variant}-{r}.db"
                timer = _time_sequential if variant == "sequential" else _time_vectorized
                seconds[variant], cpu[variant], diagnosis[variant] = timer(entry, seeds, store)
            training = {v: seconds[v] - diagnosis[v] for v in seconds}
            rounds.append({**seconds, "sequential_cpu": cpu["sequential"],
                           "vectorized_cpu": cpu["vectorized"],
                           "sequential_diagnose": diagnosis["sequential"],
                           "vectorized_diagnose": diagnosis["vectorized"],
                           "ratio": seconds["sequential"] / seconds["vectorized"],
                           "cpu_ratio": cpu["sequential"] / cpu["vectorized"],
                           "ratio_without_diagnosis": training["sequential"] / training["vectorized"],
                           "load_before": before, "load_after": _load()})
            print(f"  round {r + 1}: sequential {seconds['sequential']:.2f} s "
                  f"({cpu['sequential']:.2f} s CPU, diagnose {diagnosis['sequential']:.2f} s), "
                  f"vectorized {seconds['vectorized']:.2f} s ({cpu['vectorized']:.2f} s CPU, diagnose "
                  f"{diagnosis['vectorized']:.2f} s), ratio {rounds[-1]['ratio']:.2f} "
                  f"(CPU {rounds[-1]['cpu_ratio']:.2f}, without diagnosis "
                  f"{rounds[-1]['ratio_without_diagnosis']:.2f}; load {before:.1f} -> "
                  f"{rounds[-1]['load_after']:.1f})", flush=True)
    ratios = [r["ratio"] for r in rounds]
    return {
        "median_ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios),
        "median_cpu_ratio": statistics.median(r["cpu_ratio"] for r in rounds),
        "median_ratio_without_diagnosis": statistics.median(r["ratio_without_diagnosis"] for r in rounds),
        "median_sequential_s": statistics.median(r["sequential"] for r in rounds),
        "median_vectorized_s": statistics.median(r["vectorized"] for r in rounds),
        "median_sequential_diagnose_s": statistics.median(r["sequential_diagnose"] for r in rounds),
        "median_vectorized_diagnose_s": statistics.median(r["vectorized_diagnose"] for r in rounds),
        "rounds": rounds,
    }


def _steps_per_run(entry: GridEntry) -> int:
    """Optimizer steps of one run: epochs x batches of the digits training split."""
    n = len(task_dataset("digits", 0, None).x_train)
    return entry.train.epochs * -(-n // entry.train.batch_size)


def breakdown(runs: dict[str, Any], steps: dict[str, float], entry: GridEntry) -> dict[str, Any]:
    """What the median run of each variant spends its seconds on.

    ``training_steps_s``: the bare steps (the steps benchmark's median step times the
    steps of the K runs); ``diagnose_s``: timed inside the runs; ``other_s``: the rest
    (data split, models, the recorded telemetry, per-epoch evaluation, store rows).
    """
    n = _steps_per_run(entry)
    out: dict[str, Any] = {"steps_per_run": n}
    for variant, key in (("sequential", "eager_one_by_one_ms"), ("vectorized", "batched_ms")):
        step_ms = steps[key]
        total = runs[f"median_{variant}_s"]
        diagnosis = runs[f"median_{variant}_diagnose_s"]
        training = n * step_ms / 1e3
        out[variant] = {"total_s": total, "training_steps_s": training, "diagnose_s": diagnosis,
                        "other_s": total - training - diagnosis}
    return out


def bench_steps(entry: GridEntry, seeds: int, steps: int) -> dict[str, float]:
    """Median ms of one training step of all K seeds: eager one by one, vmap, batched."""
    from torch.func import functional_call, stack_module_state, vmap

    data = task_dataset("digits", 0, None)
    x = data.x_train[: entry.train.batch_size].expand(seeds, -1, -1).contiguous()
    y = data.y_train[: entry.train.batch_size].expand(seeds, -1).contiguous()
    models = [build_model(entry.model, data.input_shape, data.n_classes, seed=s) for s in range(seeds)]
    optimizers = [make_optimizer(entry.train, m.parameters()) for m in models]

    def eager() -> None:
        for k, (model, optimizer) in enumerate(zip(models, optimizers, strict=True)):
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x[k]), y[k]).backward()
            optimizer.step()

    params, buffers = stack_module_state(models)
    base = models[0]
    vmap_optimizer = make_optimizer(entry.train, list(params.values()))

    def one(p: dict, b: dict, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(base, (p, b), (xb,)), yb)

    batched_loss = vmap(one)

    def vmapped() -> None:
        vmap_optimizer.zero_grad(set_to_none=True)
        batched_loss(params, buffers, x, y).sum().backward()
        vmap_optimizer.step()

    net = StackedMLP([build_model(entry.model, data.input_shape, data.n_classes, seed=s)
                       for s in range(seeds)])
    net_optimizer = net.optimizer(entry.train)

    def batched() -> None:
        net.zero_grad()
        seed_losses(net.forward(x, training=True), y).sum().backward()
        net_optimizer.step()

    out = {}
    for name, step in (("eager_one_by_one_ms", eager), ("vmap_functional_call_ms", vmapped),
                       ("batched_ms", batched)):
        for _ in range(10):
            step()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        out[name] = statistics.median(times)
    out["vmap_speedup"] = out["eager_one_by_one_ms"] / out["vmap_functional_call_ms"]
    out["batched_speedup"] = out["eager_one_by_one_ms"] / out["batched_ms"]
    return out


def bench_lab(preset: str, workers: int) -> dict[str, Any]:
    """The whole preset on the local process pool, without and with vectorizing."""
    out: dict[str, Any] = {"preset": preset, "workers": workers}
    with tempfile.TemporaryDirectory(prefix="gradwatch-bench-lab-") as tmp:
        for vectorize in (False, True):
            before = _load()
            start = time.perf_counter()
            result = run_lab(preset, out=Path(tmp) / str(vectorize), workers=workers, vectorize=vectorize)
            key = "vectorized" if vectorize else "sequential"
            out[f"{key}_s"] = time.perf_counter() - start
            out[f"{key}_load"] = [before, _load()]
            out[f"{key}_claims_held"] = sum(v.held for _, v in result.claims)
            print(f"  lab {key}: {out[f'{key}_s']:.1f} s, {out[f'{key}_claims_held']} of "
                  f"{len(result.claims)} claims held (load {before:.1f} -> {_load():.1f})", flush=True)
    out["ratio"] = out["sequential_s"] / out["vectorized_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--configs", default="depth/sigmoid-d10-default",
                        help="comma-separated config keys of the preset (each also gets --steps)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a lab worker uses 1)")
    parser.add_argument("--steps", type=int, default=200, help="timed steps of the step comparison (0: skip)")
    parser.add_argument("--lab", action="store_true", help="also time the whole preset both ways")
    parser.add_argument("--lab-preset", default="seed")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--training-only", action="store_true",
                        help="leave out the per-run diagnosis in both variants (not with --lab)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _TIMER.enabled = not args.training_only  # off: run_task's and run_group's _diagnose store no findings
    tasks.diagnoser = _TIMER  # the diagnosis after each run (lab.tasks.diagnose_run)
    report: dict[str, Any] = {
        "preset": args.preset, "seeds": args.seeds, "threads": args.threads, "repeats": args.repeats,
        "training_only": args.training_only,
        "torch": torch.__version__, "machine": platform.platform(), "cpus": os.cpu_count(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"), "configs": [],
    }
    keys = [k.strip() for k in args.configs.split(",") if k.strip()]
    for key in keys:
        entry = _entry(args.preset, key)
        print(f"{args.seeds} seeds of {args.preset}/{key} ({entry.label}; {entry.train.epochs} epochs, "
              f"batch {entry.train.batch_size}, every {entry.train.every}), {args.threads} thread(s)",
              flush=True)
        runs = bench_runs(entry, args.seeds, args.repeats)
        result: dict[str, Any] = {"config": key, "label": entry.label, "runs": runs}
        print(f"runs: vectorized / sequential throughput {runs['median_ratio']:.2f}x (median of "
              f"{args.repeats}; min {runs['min_ratio']:.2f}, max {runs['max_ratio']:.2f}; CPU time "
              f"{runs['median_cpu_ratio']:.2f}x; without diagnosis "
              f"{runs['median_ratio_without_diagnosis']:.2f}x); "
              f"{runs['median_sequential_s']:.2f} s -> {runs['median_vectorized_s']:.2f} s", flush=True)
        if args.steps:
            steps = result["steps"] = bench_steps(entry, args.seeds, args.steps)
            print(f"steps (ms for all {args.seeds} seeds): eager one by one "
                  f"{steps['eager_one_by_one_ms']:.2f}, vmap(functional_call) "
                  f"{steps['vmap_functional_call_ms']:.2f} ({steps['vmap_speedup']:.2f}x), batched "
                  f"{steps['batched_ms']:.2f} ({steps['batched_speedup']:.2f}x)", flush=True)
            parts = result["breakdown"] = breakdown(runs, steps, entry)
            for variant in ("sequential", "vectorized"):
                b = parts[variant]
                print(f"  {variant}: {b['total_s']:.2f} s = training steps {b['training_steps_s']:.2f} + "
                      f"diagnose {b['diagnose_s']:.2f} + other {b['other_s']:.2f} (data, models, telemetry, "
                      f"evaluation, store)", flush=True)
        report["configs"].append(result)
    if args.lab:
        lab = report["lab"] = bench_lab(args.lab_preset, args.workers)
        print(f"lab {args.lab_preset} on {args.workers} workers: {lab['sequential_s']:.1f} s -> "
              f"{lab['vectorized_s']:.1f} s ({lab['ratio']:.2f}x)", flush=True)
    path = RESULTS_TRAINING if args.training_only else RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

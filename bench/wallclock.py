"""Wall-clock seconds of the user-facing jobs whose tests check only what they produce.

The tests assert sizes, counts and outputs; how long a job takes depends on the machine and its
load, so it is measured here and kept in bench/results/wallclock.json beside the date, the
commit and the load average, with the budget each job is meant to stay within:

- ``report``: ``gradwatch.report.report`` of a store of 50 runs x 20 layers x 1,000 steps
  (the store as tests/test_report.py builds it; budget 30 s);
- ``prescribe``: ``prescribe`` on the 20-layer sigmoid MLP on digits, 200 steps, 2 workers
  (as tests/test_prescribe.py runs it; budget 60 s);
- ``shapeset``: ``make_shapeset(3000, seed=7)`` (budget 5 s);
- ``mnist1d``: ``load_dataset("mnist1d")`` at its default size into an empty cache, then the
  same call again, from the cache (budget 30 s; the cached load must be the faster).

    python bench/wallclock.py [--jobs report,prescribe,shapeset,mnist1d] [--out DIR]

Prints a markdown table; writes DIR/wallclock.json (default bench/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
BUDGETS_S = {"report": 30.0, "prescribe": 60.0, "shapeset": 5.0, "mnist1d": 30.0}


def _big_store(path: Path, runs: int = 50, layers: int = 20, steps: int = 1000) -> None:
    """50 runs x 20 layers (10 Linear + 10 Sigmoid) x 1,000 steps, written directly."""
    from gradwatch.store import RunStore

    rng = np.random.default_rng(0)
    store = RunStore(path)
    step = np.arange(steps)
    for r in range(runs):
        config = {
            "lab": {"config_key": f"cfg{r % 10}", "label": f"config {r % 10}", "seed": r // 10},
            "model": {
                "kind": "mlp",
                "depth": layers // 2 - 1,
                "init": "scaled",
                "activation": "sigmoid",
                "sigma_w2": 1.0 + r % 10 / 5,
                "sigma_b2": 0.0,
            },
        }
        run_id = store.create_run(f"run {r}", config)
        store.add_layers(
            run_id,
            [
                (
                    i,
                    f"net.{i}",
                    "Linear" if i % 2 == 0 else "Sigmoid",
                    "param" if i % 2 == 0 else "activation",
                    None if i % 2 == 0 else "sigmoid",
                )
                for i in range(layers)
            ],
        )
        decay = 0.2 + 0.08 * (r % 10)
        rows = []
        for lid in range(layers):
            noise = rng.lognormal(0, 0.1, steps)
            if lid % 2 == 0:
                delta = decay ** ((layers - lid) / 2) * noise
                values = np.column_stack(
                    [delta * 3, 5 + step * 1e-4, delta * 1e-2, delta] + [np.full(steps, np.nan)] * 6
                )
            else:
                frac = np.clip(rng.uniform(0, 1) + step * 1e-4, 0, 1)
                values = np.column_stack(
                    [np.full(steps, np.nan)] * 6 + [frac, 1 - frac, np.zeros(steps), 0.2 * noise]
                )
            rows += [(int(s), lid, v) for s, v in zip(step, values.tolist(), strict=True)]
        store.add_layer_metrics(run_id, rows)
        loss = 2.3 * np.exp(-step / (300 + 100 * r)) + 0.05 * rng.random(steps)
        store.add_scalars(run_id, [(int(s), "loss", float(v)) for s, v in zip(step, loss, strict=True)])
        store.finish_run(run_id)
    store.close()


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_report(tmp: Path) -> dict:
    from gradwatch import report as rp

    _big_store(tmp / "big.db")
    seconds = _timed(lambda: rp.report(tmp / "big.db", out=tmp / "big.html"))
    return {"seconds": seconds, "html_mb": (tmp / "big.html").stat().st_size / 1e6}


def time_prescribe(tmp: Path) -> dict:
    from gradwatch.lab import ModelConfig, build_model, load_dataset
    from gradwatch.prescribe import prescribe

    def sigmoid20():
        return build_model(ModelConfig(depth=20, activation="sigmoid"), 64, 10)

    data = load_dataset("digits")
    return {"seconds": _timed(lambda: prescribe(sigmoid20, data, steps=200, workers=2, progress=False))}


def time_shapeset(tmp: Path) -> dict:
    from gradwatch.lab.shapeset import make_shapeset

    return {"seconds": _timed(lambda: make_shapeset(3000, seed=7))}


def time_mnist1d(tmp: Path) -> dict:
    from gradwatch.lab.data import load_dataset

    generate = _timed(lambda: load_dataset("mnist1d", cache_dir=tmp))
    cached = _timed(lambda: load_dataset("mnist1d", cache_dir=tmp))
    return {"seconds": generate, "cached_seconds": cached}


JOBS = {
    "report": time_report,
    "prescribe": time_prescribe,
    "shapeset": time_shapeset,
    "mnist1d": time_mnist1d,
}


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default=",".join(JOBS), help="comma-separated, of: " + ", ".join(JOBS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    names = [n.strip() for n in args.jobs.split(",") if n.strip()]
    unknown = [n for n in names if n not in JOBS]
    if unknown:
        parser.error(f"unknown job(s) {unknown}; expected some of {list(JOBS)}")
    torch.set_num_threads(1)
    results = {}
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"gradwatch-wallclock-{name}-") as tmp:
            results[name] = {**JOBS[name](Path(tmp)), "budget_seconds": BUDGETS_S[name]}
    print("| job | seconds | budget | more |\n|---|---|---|---|")
    for name, r in results.items():
        more = ", ".join(f"{k} {v:.2f}" for k, v in r.items() if k not in ("seconds", "budget_seconds"))
        print(f"| {name} | {r['seconds']:.2f} | {r['budget_seconds']:.0f} | {more} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "wallclock.json").write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "commit": _commit(),
                "machine": platform.platform(),
                "cpus": os.cpu_count(),
                "load_average": list(os.getloadavg()),
                "torch": torch.__version__,
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()

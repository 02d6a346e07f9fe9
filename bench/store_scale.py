"""Scale of the run store: 1,000 runs x 50 layers x 1,000 logged steps, its size on disk and the
time of ``RunStore.metrics(run)`` for one run (target: <= 200 ms).

The store is made by ``RunStore`` itself (schema, runs, layers), then filled with the layer
rows and scalars a watched 25-layer tanh MLP writes (every column of ``LAYER_METRICS`` that
such a layer produces, NULL where it produces none, as the Watcher writes them): one template
run with ``executemany`` and the others by ``INSERT ... SELECT`` with per-run factors. The
store's own queued writer is timed on one run beside it (``public writer``): at its rate the
50 million rows would take far longer, which is why the bulk path exists; it writes the same
table layout.

Reading goes through the public API only: ``RunStore(path).metrics(run)`` on runs spread over
the store, each **cold** (a fresh ``RunStore`` whose SQLite cache is empty, after the file's
pages were dropped from the OS page cache with ``posix_fadvise(DONTNEED)``, so they come from
the disk) and then **warm** (the median of ``--repeats`` more calls). Also timed:
``metrics(run, layers=[one layer])`` and ``runs()`` (the list of 1,000 runs).

    python bench/store_scale.py [--runs 1000] [--layers 50] [--steps 1000] [--repeats 5]
                                [--path /tmp/gradwatch-bench/store-scale.db] [--keep]

Writes bench/results/store-scale.json and prints a markdown table. The store (~4 GB) is
deleted afterwards unless ``--keep``; a kept, complete one is reused by the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from gradwatch.store import LAYER_METRICS, RunStore

RESULTS = Path(__file__).parent / "results"
BUDGET_S = 0.2
SAMPLE_RUNS = 7


def _layers(n: int) -> list[tuple[int, str, str, str, str | None]]:
    """``(layer_id, name, type, kind, activation)`` of an MLP: Linear, Tanh, Linear, Tanh, ..."""
    return [
        (i, f"net.{i}", "Linear", "param", None)
        if i % 2 == 0
        else (i, f"net.{i}", "Tanh", "activation", "tanh")
        for i in range(n)
    ]


def _template(run_id: int, layers: int, steps: int, rng: np.random.Generator) -> list[tuple]:
    """Layer rows of one run: delta RMS decaying toward the input, saturation creeping up."""
    step = np.arange(steps)
    rows: list[tuple] = []
    for lid in range(layers):
        noise = rng.lognormal(0, 0.15, steps)
        cols: dict[str, np.ndarray] = {}
        if lid % 2 == 0:
            delta = 0.6 ** ((layers - lid) / 2) * noise
            cols = {
                "grad_norm": delta * 3,
                "weight_norm": 5 + step * 1e-4,
                "update_ratio": delta * 1e-2,
                "delta_rms": delta,
                "output_mean": noise - 1,
                "output_std": noise,
                "grad_norm_max": delta * 3.4,
                "grad_norm_min": delta * 2.6,
            }
        else:
            sat = np.clip(0.05 + lid / layers * 0.5 + step / steps * 0.2 + rng.normal(0, 0.02, steps), 0, 1)
            cols = {
                "saturated_frac": sat,
                "green_frac": 1 - sat,
                "dead_frac": np.zeros(steps),
                "mean_derivative": 1 - sat,
                "input_q15": -1 - 2 * sat,
                "input_q50": noise - 1,
                "input_q85": 1 + 2 * sat,
            }
        table = [cols[m].tolist() if m in cols else [None] * steps for m in LAYER_METRICS]
        rows += [(run_id, s, lid, *values, 0) for s, values in enumerate(zip(*table, strict=True))]
    return rows


def _scalars(run_id: int, steps: int, rng: np.random.Generator) -> list[tuple]:
    step = np.arange(steps)
    t0 = time.time() - steps
    series = {
        "loss": 2.3 * np.exp(-step / 400) + 0.3 + 0.05 * rng.random(steps),
        "total_grad_norm": 1 + 0.1 * rng.random(steps),
        "nonfinite_grads": np.zeros(steps),
        "lr": np.full(steps, 0.01),
        "wall_time": t0 + step.astype(float),
    }
    return [
        (run_id, int(s), name, float(v))
        for name, vals in series.items()
        for s, v in zip(step, vals, strict=True)
    ]


def build(path: Path, runs: int, layers: int, steps: int) -> dict:
    """Write the store at ``path`` unless a complete one is there; returns what it took."""
    if path.exists():
        with sqlite3.connect(path) as conn:
            done = conn.execute("SELECT value FROM meta WHERE key = 'bench_complete'").fetchone()
        if done:
            return {"build_s": 0.0, "cached": True}
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
    start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    with RunStore(path) as store:
        ids = []
        for r in range(runs):
            rid = store.create_run(
                f"tanh-{layers // 2}x run {r:04d}", {"depth": layers // 2, "lr": 0.01, "seed": r}
            )
            store.add_layers(rid, _layers(layers))
            ids.append(rid)
        store.flush()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    rng = np.random.default_rng(0)
    cols = ", ".join(LAYER_METRICS)
    marks = ", ".join("?" * (len(LAYER_METRICS) + 4))
    conn.execute("BEGIN")
    conn.executemany(
        f"INSERT INTO layer_metrics(run_id, step, layer_id, {cols}, flags) VALUES ({marks})",
        _template(ids[0], layers, steps, rng),
    )
    conn.executemany(
        "INSERT INTO scalars(run_id, step, name, value) VALUES (?, ?, ?, ?)", _scalars(ids[0], steps, rng)
    )
    conn.execute("COMMIT")
    scaled = ", ".join(
        f"{m} * ?" if m in ("grad_norm", "delta_rms", "update_ratio", "grad_norm_max", "grad_norm_min") else m
        for m in LAYER_METRICS
    )
    n_scaled = scaled.count("?")
    for k, rid in enumerate(ids[1:], 1):
        if k % 25 == 1:
            conn.execute("BEGIN")
        factor = float(0.5 + (k % 10) / 5)
        conn.execute(
            f"INSERT INTO layer_metrics(run_id, step, layer_id, {cols}, flags) "
            f"SELECT ?, step, layer_id, {scaled}, flags FROM layer_metrics WHERE run_id = ?",
            (rid, *[factor] * n_scaled, ids[0]),
        )
        conn.execute(
            "INSERT INTO scalars(run_id, step, name, value) "
            "SELECT ?, step, name, CASE name WHEN 'loss' THEN value * ? ELSE value END "
            "FROM scalars WHERE run_id = ?",
            (rid, 0.8 + (k % 5) / 10, ids[0]),
        )
        if k % 25 == 0 or k == len(ids) - 1:
            conn.execute("COMMIT")
            if k % 100 == 0 or k == len(ids) - 1:
                print(f"  {k + 1}/{len(ids)} runs written, {time.perf_counter() - start:.0f} s", flush=True)
    now = time.time()
    conn.execute("UPDATE runs SET status = 'finished', finished_at = ?, updated_at = ?", (now, now))
    conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('bench_complete', '1')")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return {"build_s": time.perf_counter() - start, "cached": False}


def public_writer_rate(layers: int, steps: int) -> dict:
    """Rows per second of ``RunStore.add_layer_metrics`` + ``flush`` (the Watcher's path), one run."""
    rng = np.random.default_rng(1)
    template = _template(1, layers, steps, rng)
    by_step: dict[int, list[tuple[int, int, list]]] = {}
    for row in template:
        by_step.setdefault(row[1], []).append((row[1], row[2], list(row[3:-1])))
    with (
        tempfile.TemporaryDirectory(prefix="gradwatch-store-scale-") as d,
        RunStore(Path(d) / "w.db") as store,
    ):
        rid = store.create_run("writer", {})
        store.add_layers(rid, _layers(layers))
        store.flush()
        start = time.perf_counter()
        for s in range(steps):
            store.add_layer_metrics(rid, by_step[s])
        store.flush()
        seconds = time.perf_counter() - start
    return {"rows": len(template), "seconds": seconds, "rows_per_s": len(template) / seconds}


def _drop_os_cache(path: Path) -> None:
    """Ask the kernel to forget the cached pages of the store's files (this file only; no privilege)."""
    for suffix in ("", "-wal"):
        p = Path(str(path) + suffix)
        if not p.exists() or not hasattr(os, "posix_fadvise"):
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def measure_reads(path: Path, layers: int, steps: int, repeats: int) -> dict:
    """``RunStore.metrics(run)`` cold and warm on runs spread over the store."""
    with RunStore(path, create=False) as store:
        t_runs_cold, runs = _timed(store.runs)
        t_runs_warm = statistics.median(_timed(store.runs)[0] for _ in range(repeats))
    ids = runs["id"].tolist()
    sample = sorted({ids[int(i)] for i in np.linspace(0, len(ids) - 1, SAMPLE_RUNS)})
    per_run = []
    for rid in sample:
        _drop_os_cache(path)
        with RunStore(path, create=False) as store:
            cold, df = _timed(store.metrics, rid)
            if len(df) != layers * steps:
                raise SystemExit(f"run {rid}: metrics() returned {len(df)} rows; expected {layers * steps}")
            warm = [_timed(store.metrics, rid)[0] for _ in range(repeats)]
            cpu = []
            for _ in range(repeats):  # what the read costs, apart from waiting for a shared CPU
                t0 = time.process_time()
                store.metrics(rid)
                cpu.append(time.process_time() - t0)
            one = statistics.median(_timed(store.metrics, rid, layers=["net.0"])[0] for _ in range(repeats))
            by_name = statistics.median(
                _timed(store.metrics, f"tanh-{layers // 2}x run {rid - 1:04d}")[0] for _ in range(repeats)
            )
        per_run.append(
            {
                "run": rid,
                "rows": len(df),
                "cold_s": cold,
                "warm_median_s": statistics.median(warm),
                "warm_max_s": max(warm),
                "warm_cpu_s": statistics.median(cpu),
                "one_layer_warm_s": one,
                "by_name_warm_s": by_name,
            }
        )
        print(
            f"  run {rid}: cold {cold * 1e3:.0f} ms, warm {statistics.median(warm) * 1e3:.0f} ms", flush=True
        )
    return {
        "runs_list_cold_s": t_runs_cold,
        "runs_list_warm_s": t_runs_warm,
        "runs": per_run,
        "cold_median_s": statistics.median(r["cold_s"] for r in per_run),
        "cold_max_s": max(r["cold_s"] for r in per_run),
        "warm_median_s": statistics.median(r["warm_median_s"] for r in per_run),
        "warm_max_s": max(r["warm_max_s"] for r in per_run),
        "warm_cpu_median_s": statistics.median(r["warm_cpu_s"] for r in per_run),
        "one_layer_warm_median_s": statistics.median(r["one_layer_warm_s"] for r in per_run),
        "by_name_warm_median_s": statistics.median(r["by_name_warm_s"] for r in per_run),
    }


def _table(result: dict) -> None:
    s, r, w = result["store"], result["read"], result["public_writer"]
    print(
        f"\n{s['runs']:,} runs x {s['layers']} layers x {s['steps']:,} steps: "
        f"{s['layer_rows'] / 1e6:.0f}M layer rows, "
        f"{s['scalar_rows'] / 1e6:.0f}M scalar rows, {s['bytes'] / 1e9:.2f} GB on disk "
        f"({s['bytes'] / s['layer_rows']:.0f} bytes per layer row)\n"
    )
    print("| what | measured | target |")
    print("|---|---|---|")
    ms = lambda x: f"{x * 1e3:.0f} ms"  # noqa: E731
    print(
        f"| `metrics(run)`, cold (fresh store, file out of the OS cache), median / max of "
        f"{len(r['runs'])} runs | "
        f"{ms(r['cold_median_s'])} / {ms(r['cold_max_s'])} | {ms(BUDGET_S)} |"
    )
    print(
        f"| `metrics(run)`, warm, median / max | {ms(r['warm_median_s'])} / {ms(r['warm_max_s'])} | "
        f"{ms(BUDGET_S)} |"
    )
    print(
        f"| `metrics(run)`, warm, CPU time of this process, median | {ms(r['warm_cpu_median_s'])} | "
        f"{ms(BUDGET_S)} |"
    )
    print(f"| `metrics(run, layers=[one])`, warm median | {ms(r['one_layer_warm_median_s'])} | - |")
    print(f"| `metrics(run name)`, warm median | {ms(r['by_name_warm_median_s'])} | - |")
    print(
        f"| `runs()` ({s['runs']:,} runs), cold / warm | {ms(r['runs_list_cold_s'])} / "
        f"{ms(r['runs_list_warm_s'])} | - |"
    )
    if not s["cached"]:
        print(f"| building the store (bulk SQL) | {s['build_s']:.0f} s | - |")
    print(
        f"| public writer (`add_layer_metrics` + `flush`) | {w['rows_per_s']:,.0f} rows/s "
        f"(the store: {s['layer_rows'] / w['rows_per_s'] / 3600:.1f} h) | - |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=50)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5, help="warm calls per run")
    parser.add_argument("--path", type=Path, default=Path("/tmp/gradwatch-bench/store-scale.db"))
    parser.add_argument("--keep", action="store_true", help="keep the store for the next run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory of the JSON results")
    args = parser.parse_args()
    if args.layers % 2:
        raise SystemExit(f"--layers {args.layers}: use an even count (Linear and Tanh alternate)")

    path = args.path.with_name(f"{args.path.stem}-{args.runs}x{args.layers}x{args.steps}{args.path.suffix}")
    print(f"store {path}")
    try:
        built = build(path, args.runs, args.layers, args.steps)
        print("  cached" if built["cached"] else f"  built in {built['build_s']:.0f} s", flush=True)
        size = sum(Path(str(path) + s).stat().st_size for s in ("", "-wal") if Path(str(path) + s).exists())
        print("public writer ...", flush=True)
        writer = public_writer_rate(args.layers, args.steps)
        print("reading ...", flush=True)
        read = measure_reads(path, args.layers, args.steps, args.repeats)
    finally:
        if not args.keep:
            for suffix in ("", "-wal", "-shm"):
                Path(str(path) + suffix).unlink(missing_ok=True)
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "load_average": list(os.getloadavg()),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "budget_s": BUDGET_S,
        "store": {
            "runs": args.runs,
            "layers": args.layers,
            "steps": args.steps,
            "layer_rows": args.runs * args.layers * args.steps,
            "scalar_rows": args.runs * args.steps * 5,
            "bytes": size,
            **built,
        },
        "public_writer": writer,
        "read": read,
        "ok": read["cold_max_s"] <= BUDGET_S and read["warm_max_s"] <= BUDGET_S,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "store-scale.json").write_text(json.dumps(result, indent=2) + "\n")
    _table(result)
    print(f"\nwrote {args.out / 'store-scale.json'}" + ("" if args.keep else f"; deleted {path}"))


if __name__ == "__main__":
    main()

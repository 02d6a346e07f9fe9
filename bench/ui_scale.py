"""The live page over a big store: how long the run list and a run's charts take.

Builds (once, cached) a store of RUNS runs x LAYERS layers x STEPS logged steps (the
issue's 1,000 x 50 x 1,000: 50 million layer rows, ~3.5 GB) and a store of one long
run (50 layers x 100,000 steps, 5 million rows), serves each with
``gradwatch.ui.serve_in_background`` and measures:

- the HTTP API: ``/api/runs`` (the list), ``/api/runs/<id>`` + ``/series`` (a run's
  charts' data), cold (first request after the server started) and warm (median);
- the page in headless Chromium, when selenium and Debian's chromium are there: from
  navigation start to the run list drawn, and to every chart of the run drawn
  (``window.gwTimings``), for a few runs, each a fresh page load; and a click on
  another run until its charts are drawn.

Runs are created through ``RunStore.create_run``/``add_layers``; the rows are written
with ``executemany`` for one template run and copied to the others by
``INSERT ... SELECT`` with per-run factors (the store's own queued writer would take
most of an hour for 50 million rows). A few runs stay ``running`` under this process's
pid, so the page shows them live.

    python bench/ui_scale.py [--runs 1000] [--layers 50] [--steps 1000] [--long-steps 100000]
                             [--cache /tmp/gradwatch-bench] [--no-browser]

Writes bench/results/ui-scale.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import time
import urllib.request
from pathlib import Path

import numpy as np

from gradwatch.store import LAYER_METRICS, RunStore
from gradwatch.ui import serve_in_background

RESULTS = Path(__file__).parent / "results"
LIST_BUDGET_S = 1.0
RUN_BUDGET_S = 2.0
LIVE_RUNS = 3


def _layers(n: int) -> list[tuple[int, str, str, str, str | None]]:
    return [
        (i, f"net.{i}", "Linear", "param", None)
        if i % 2 == 0
        else (i, f"net.{i}", "Sigmoid", "activation", "sigmoid")
        for i in range(n)
    ]


def _template_rows(run_id: int, layers: int, steps: int, rng: np.random.Generator) -> list[tuple]:
    """A sigmoid stack's telemetry: delta RMS decaying toward the input, saturation creeping up."""
    step = np.arange(steps)
    rows = []
    nan = [None] * 6
    for lid in range(layers):
        noise = rng.lognormal(0, 0.15, steps)
        if lid % 2 == 0:
            delta = 0.25 ** ((layers - lid) / 4) * noise
            cols = np.column_stack([delta * 3, 5 + step * 1e-4, delta * 1e-2, delta, noise - 1, noise])
            rows += [
                (run_id, int(s), lid, *v, *[None] * 4, 0) for s, v in zip(step, cols.tolist(), strict=True)
            ]
        else:
            sat = np.clip(0.05 + lid / layers * 0.5 + step / steps * 0.2 + rng.normal(0, 0.02, steps), 0, 1)
            cols = np.column_stack([sat, 1 - sat, np.clip(sat - 0.4, 0, 1), 0.25 * (1 - sat)])
            rows += [(run_id, int(s), lid, *nan, *v, 0) for s, v in zip(step, cols.tolist(), strict=True)]
    return rows


def build(path: Path, runs: int, layers: int, steps: int) -> float:
    """Write the store at ``path`` unless a complete one is there; returns seconds spent."""
    if path.exists():
        with sqlite3.connect(path) as conn:
            done = conn.execute("SELECT value FROM meta WHERE key = 'bench_complete'").fetchone()
        if done:
            return 0.0
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
    start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    store = RunStore(path)
    ids = []
    for r in range(runs):
        config = {
            "model": {"depth": layers // 2, "activation": "sigmoid"},
            "lr": 0.01 * (1 + r % 7),
            "seed": r,
        }
        rid = store.create_run(f"sigmoid-{layers // 2}x run {r:04d}", config)
        store.add_layers(rid, _layers(layers))
        ids.append(rid)
    store.flush()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    rng = np.random.default_rng(0)
    written = LAYER_METRICS[:10]  # the template's rows give the first ten metrics; the rest stay NULL
    cols = ", ".join(written)
    marks = ", ".join("?" * (len(written) + 4))
    template = min(steps, 1000)
    conn.execute("BEGIN")
    conn.executemany(
        f"INSERT INTO layer_metrics(run_id, step, layer_id, {cols}, flags) VALUES ({marks})",
        _template_rows(ids[0], layers, template, rng),
    )
    step = np.arange(template)
    loss = 2.3 * np.exp(-step / 400) + 0.3 + 0.05 * rng.random(template)
    t0 = time.time() - steps
    conn.executemany(
        "INSERT INTO scalars(run_id, step, name, value) VALUES (?, ?, ?, ?)",
        [(ids[0], int(s), "loss", float(v)) for s, v in zip(step, loss, strict=True)]
        + [(ids[0], int(s), "wall_time", t0 + float(s)) for s in step],
    )
    have = template
    while have < steps:  # a long run: copies of the first steps, drifting slowly
        n = min(have, steps - have)
        drift = float(1 + have / steps)
        conn.execute(
            f"INSERT INTO layer_metrics(run_id, step, layer_id, {cols}, flags) "
            f"SELECT run_id, step + ?, layer_id, "
            + ", ".join(f"{m} * ?" if m == "delta_rms" else m for m in LAYER_METRICS)
            + ", flags FROM layer_metrics WHERE run_id = ? AND step < ?",
            (have, drift, ids[0], n),
        )
        conn.execute(
            "INSERT INTO scalars(run_id, step, name, value) SELECT run_id, step + ?, name, "
            "CASE name WHEN 'loss' THEN value / ? ELSE value + ? END "
            "FROM scalars WHERE run_id = ? AND step < ?",
            (have, drift, have, ids[0], n),
        )
        have += n
    conn.execute("COMMIT")
    scaled = ", ".join(
        f"{m} * ?" if m in ("grad_norm", "delta_rms", "update_ratio") else m for m in LAYER_METRICS
    )
    for k, rid in enumerate(ids[1:], 1):
        if k % 25 == 1:
            conn.execute("BEGIN")
        factor = float(0.5 + (k % 10) / 5)
        conn.execute(
            f"INSERT INTO layer_metrics(run_id, step, layer_id, {cols}, flags) "
            f"SELECT ?, step, layer_id, {scaled}, flags FROM layer_metrics WHERE run_id = ?",
            (rid, factor, factor, factor, ids[0]),
        )
        conn.execute(
            "INSERT INTO scalars(run_id, step, name, value) "
            "SELECT ?, step, name, CASE name WHEN 'loss' THEN value * ? ELSE value END "
            "FROM scalars WHERE run_id = ?",
            (rid, 0.8 + (k % 5) / 10, ids[0]),
        )
        if k % 25 == 0 or k == len(ids) - 1:
            conn.execute("COMMIT")
            print(f"  {k + 1}/{len(ids)} runs written, {time.perf_counter() - start:.0f} s", flush=True)
    now = time.time()
    conn.execute("UPDATE runs SET updated_at = ?", (now,))
    conn.execute(
        "UPDATE runs SET status = 'finished', finished_at = ? WHERE id NOT IN (SELECT id FROM runs "
        "ORDER BY id DESC LIMIT ?)",
        (now, LIVE_RUNS),
    )
    conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('bench_complete', '1')")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    store.close()
    return time.perf_counter() - start


def _claim_live(path: Path) -> None:
    """The last runs are "running" under this process, so the page marks them live."""
    with sqlite3.connect(path) as conn:
        conn.execute(
            "UPDATE runs SET pid = ? WHERE status = 'running'",
            (os.getpid(),),
        )


def _get(url: str) -> tuple[float, int]:
    start = time.perf_counter()
    with urllib.request.urlopen(url) as r:
        body = r.read()
    return time.perf_counter() - start, len(body)


def measure_http(url: str, run_ids: list[int], repeat: int = 5) -> dict:
    cold_list, size = _get(url + "api/runs")
    warm_list = [_get(url + "api/runs")[0] for _ in range(repeat)]
    runs = []
    for rid in run_ids:
        t_detail, _ = _get(f"{url}api/runs/{rid}")
        t_series, n = _get(f"{url}api/runs/{rid}/series")
        t_quick, _ = _get(f"{url}api/runs/{rid}/series?quick=1")
        runs.append(
            {"run": rid, "detail_s": t_detail, "series_s": t_series, "quick_s": t_quick, "series_bytes": n}
        )
    return {
        "list_cold_s": cold_list,
        "list_warm_median_s": statistics.median(warm_list),
        "list_bytes": size,
        "runs": runs,
        "run_max_s": max(r["detail_s"] + r["series_s"] for r in runs),
    }


def _browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        return None
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--window-size=1400,1800",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(driver))


def _wait(browser, script: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = browser.execute_script(script)
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(script)


def measure_browser(url: str, run_ids: list[int], shot: Path | None) -> dict | None:
    try:
        browser = _browser(Path("/tmp/gradwatch-bench-chromium"))
    except Exception as err:  # noqa: BLE001 - the browser part is optional
        print(f"  browser skipped: {err}")
        return None
    if browser is None:
        print("  browser skipped: no chromium/chromedriver")
        return None
    out = {"loads": [], "clicks": []}
    try:
        browser.get(url + "static/app.css")  # warm the browser process itself
        for rid in run_ids:
            browser.get("about:blank")  # a fresh page load each time, not a hash change
            browser.get(f"{url}#run={rid}")
            _wait(browser, f"return document.body.dataset.drawn === '{rid}'")
            t = browser.execute_script("return window.gwTimings")
            out["loads"].append(
                {"run": rid, "list_s": t["runsListed"] / 1e3, "charts_s": t["runDrawn"] / 1e3}
            )
        for rid in run_ids[:3]:
            browser.execute_script("document.body.dataset.drawn = ''")
            start = time.perf_counter()
            browser.execute_script(f"document.querySelector('.run-item[data-id=\"{rid}\"]').click()")
            _wait(browser, f"return document.body.dataset.drawn === '{rid}'")
            out["clicks"].append({"run": rid, "charts_s": time.perf_counter() - start})
        if shot is not None:
            time.sleep(0.5)
            browser.save_screenshot(str(shot))
        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        out["console_errors"] = len(severe)
    finally:
        browser.quit()
    out["list_max_s"] = max(x["list_s"] for x in out["loads"])
    out["charts_max_s"] = max(x["charts_s"] for x in out["loads"])
    out["click_max_s"] = max(x["charts_s"] for x in out["clicks"])
    return out


def measure(path: Path, run_ids: list[int], browser: bool, shot: Path | None) -> dict:
    _claim_live(path)
    server = serve_in_background(path, port=0)
    try:
        result = {"http": measure_http(server.url, run_ids)}
        if browser:
            result["browser"] = measure_browser(server.url, run_ids, shot)
    finally:
        server.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=50)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--long-steps", type=int, default=100_000, help="steps of the one long run (0: skip)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/gradwatch-bench"))
    parser.add_argument("--no-browser", dest="browser", action="store_false")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)

    big = args.cache / f"ui-{args.runs}x{args.layers}x{args.steps}.db"
    print(f"store {big}")
    built = build(big, args.runs, args.layers, args.steps)
    print(f"  built in {built:.0f} s" if built else "  cached")
    with sqlite3.connect(big) as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM runs ORDER BY id")]
    sample = sorted({ids[0], ids[len(ids) // 3], ids[len(ids) // 2], ids[-LIVE_RUNS - 1], ids[-1]})
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "store": {
            "runs": args.runs,
            "layers": args.layers,
            "steps": args.steps,
            "layer_rows": args.runs * args.layers * args.steps,
            "bytes": big.stat().st_size,
            "build_s": built,
        },
        "big": measure(big, sample, args.browser, RESULTS / "ui-scale.png"),
    }
    if args.long_steps:
        long = args.cache / f"ui-1x{args.layers}x{args.long_steps}.db"
        print(f"store {long}")
        built = build(long, 1, args.layers, args.long_steps)
        print(f"  built in {built:.0f} s" if built else "  cached")
        result["long"] = {
            "steps": args.long_steps,
            "layer_rows": args.layers * args.long_steps,
            "build_s": built,
            **measure(long, [1], args.browser, None),
        }
    (RESULTS / "ui-scale.json").write_text(json.dumps(result, indent=2) + "\n")
    _table(result)


def _table(result: dict) -> None:
    s = result["store"]
    big = result["big"]
    print(
        f"\n{s['runs']} runs x {s['layers']} layers x {s['steps']} steps ({s['layer_rows'] / 1e6:.0f}M rows, "
        f"{s['bytes'] / 1e9:.1f} GB)\n"
    )
    print("| what | measured | budget |")
    print("|---|---|---|")
    h = big["http"]
    size = f"{h['list_bytes'] / 1e3:.0f} kB"
    print(f"| GET /api/runs, cold | {h['list_cold_s']:.3f} s ({size}) | {LIST_BUDGET_S} s |")
    print(f"| GET /api/runs, warm median | {h['list_warm_median_s']:.3f} s | {LIST_BUDGET_S} s |")
    print(
        f"| a run's detail + series, worst of {len(h['runs'])} | {h['run_max_s']:.3f} s | {RUN_BUDGET_S} s |"
    )
    b = big.get("browser")
    if b:
        print(
            f"| page: run list drawn, worst of {len(b['loads'])} loads | {b['list_max_s']:.3f} s | "
            f"{LIST_BUDGET_S} s |"
        )
        print(f"| page: every chart of the run drawn, worst | {b['charts_max_s']:.3f} s | {RUN_BUDGET_S} s |")
        print(f"| page: click another run until drawn, worst | {b['click_max_s']:.3f} s | {RUN_BUDGET_S} s |")
        print(f"| console errors | {b['console_errors']} | 0 |")
    if "long" in result:
        lg = result["long"]
        print(
            f"| one run of {lg['layer_rows'] / 1e6:.0f}M rows ({lg['steps']} steps): detail + exact series | "
            f"{lg['http']['run_max_s']:.3f} s ({lg['http']['runs'][0]['series_bytes'] / 1e6:.1f} MB) | - |"
        )
        print(
            f"| same, first picture (?quick=1: values at bucket ends) | "
            f"{lg['http']['runs'][0]['quick_s']:.3f} s | - |"
        )
        if lg.get("browser"):
            print(f"| same, page drawn (first picture) | {lg['browser']['charts_max_s']:.3f} s | - |")


if __name__ == "__main__":
    main()

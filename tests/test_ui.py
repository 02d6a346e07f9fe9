"""The live page: read-only queries and downsampling against pandas, the HTTP API through
Starlette's TestClient, the event stream over a real socket, the CLI, and the page in
headless Chromium while a training process writes to the store.
"""

from __future__ import annotations

import base64
import http.client
import io
import math
import queue
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from conftest import chrome as _chrome
from typer.testing import CliRunner

from gradwatch.cli import app
from gradwatch.store import RunStore
from gradwatch.store_reader import StoreReader

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from starlette.testclient import TestClient  # noqa: E402

from gradwatch.ui import queries, serve_in_background  # noqa: E402
from gradwatch.ui.app import create_app  # noqa: E402
from gradwatch.ui.live import Follow, Follower  # noqa: E402

XSS = "<img src=x onerror=alert(1)>"
TRAVERSALS = [
    "/../../etc/passwd",
    "/static/../../../../../etc/passwd",
    "/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/static/..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/static//etc/passwd",
    "/static/../app.py",
    "/static/%2e%2e/app.py",
    "/api/../../etc/passwd",
]


def _decode(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype="<f8")


def _write_run(
    store: RunStore, name: str, steps: int = 40, layers: int = 6, every: int = 1, layer_names=None
):
    """A run written through the store's API: Linear/Sigmoid pairs, delta decaying with depth."""
    rid = store.create_run(name, {"lr": 0.1})
    names = layer_names or [f"net.{i}" for i in range(layers)]
    store.add_layers(
        rid,
        [
            (i, names[i], "Linear", "param", None)
            if i % 2 == 0
            else (i, names[i], "Sigmoid", "activation", "sigmoid")
            for i in range(layers)
        ],
    )
    rng = np.random.default_rng(rid)
    rows, scalars = [], []
    for step in range(0, steps, every):
        for lid in range(layers):
            noise = float(rng.lognormal(0, 0.3))
            if lid % 2 == 0:
                delta = 0.25 ** ((layers - lid) / 2) * noise
                values = [delta * 3, 5.0, 1e-3, delta, 0.0, 1.0] + [None] * 4
            else:
                sat = min(1.0, 0.1 * lid * noise)
                values = [None] * 6 + [sat, 1 - sat, 0.0 if step < steps // 2 else 0.25, 0.2]
            rows.append((step, lid, values))
    for step in range(steps):
        scalars += [(step, "loss", 2.0 * math.exp(-step / 20) + 0.1 * float(rng.random())), (step, "lr", 0.1)]
    store.add_layer_metrics(rid, rows)
    store.add_scalars(rid, scalars)
    store.flush()
    return rid


@pytest.fixture
def ui_store(tmp_path):
    path = tmp_path / "runs.db"
    store = RunStore(path)
    plain = _write_run(store, "sigmoid run", steps=40, every=2)
    xss = _write_run(store, XSS, steps=10, layer_names=[XSS, "b", "c", "d", "e", "f"])
    store.add_findings(
        plain,
        [
            {
                "kind": "vanishing_gradients",
                "severity": "critical",
                "first_step": 0,
                "last_step": 38,
                "layers": ["net.0"],
                "evidence": {"ratio": float("nan"), "worst": float("inf")},
                "explanation": XSS,
                "prescriptions": [{"name": "relu_he", "description": "swap to ReLU", "verified": True}],
            }
        ],
    )
    store.finish_run(plain)
    store.finish_run(xss)
    store.close()
    return path, plain, xss


@pytest.fixture
def client(ui_store):
    path, _, _ = ui_store
    with TestClient(create_app(path), base_url="http://127.0.0.1:8765") as c:
        yield c


# --- queries and downsampling ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("last_step", "points", "width"),
    [
        pytest.param(None, 1000, 1, id="empty"),
        pytest.param(999, 1000, 1, id="fits"),
        pytest.param(1000, 1000, 2, id="one-over"),
        pytest.param(99_999, 1000, 128, id="100k"),
    ],
)
def test_bucket_width_is_the_smallest_power_of_two_that_fits(last_step, points, width):
    assert queries.bucket_width(last_step, points) == width
    if last_step is not None:
        assert (last_step + 1) / width <= points


@pytest.mark.parametrize(
    "width", [pytest.param(1, id="raw"), pytest.param(4, id="w4"), pytest.param(16, id="w16")]
)
def test_buckets_match_pandas_min_max_last(ui_store, width):
    path, plain, _ = ui_store
    conn = StoreReader(path)
    got = queries.layer_buckets(conn, plain, width=width)
    with RunStore(path, create=False) as store:
        ref = store.metrics(plain)
        ref_scalars = store.scalars(plain)
    assert got["upto"] == ref["step"].max() == 38
    assert [e["id"] for e in got["layers"]] == sorted(ref["layer_id"].unique())
    for entry in got["layers"]:
        rows = ref[ref["layer_id"] == entry["id"]].assign(b=lambda d: d["step"] // width)
        groups = rows.groupby("b")
        np.testing.assert_array_equal(_decode(entry["steps"]), groups["step"].max().to_numpy())
        metrics = ("delta_rms", "grad_norm") if entry["id"] % 2 == 0 else ("saturated_frac", "dead_frac")
        assert set(entry) == {"id", "steps", *metrics}  # metrics a layer never has are left out
        for m in metrics:
            np.testing.assert_allclose(_decode(entry[m]["last"]), groups[m].last().to_numpy())
            if width == 1:
                assert "min" not in entry[m]
            else:
                np.testing.assert_allclose(_decode(entry[m]["min"]), groups[m].min().to_numpy())
                np.testing.assert_allclose(_decode(entry[m]["max"]), groups[m].max().to_numpy())
    scalars = queries.scalar_buckets(conn, plain, ["loss"], width=width)["scalars"][0]
    loss = ref_scalars.assign(b=lambda d: d["step"] // width).groupby("b")["loss"]
    np.testing.assert_allclose(_decode(scalars["last"]), loss.last().to_numpy())
    if width > 1:
        np.testing.assert_allclose(_decode(scalars["max"]), loss.max().to_numpy())


def _merge_pairs(entry: dict, metric: str, width: int) -> dict[int, tuple[float, float, float, float]]:
    """What the page does when a run outgrows its buckets: merge neighbours (width x 2)."""
    out: dict[int, tuple[float, float, float, float]] = {}
    steps = _decode(entry["steps"])
    m = entry[metric]
    for s, lo, hi, last in zip(steps, _decode(m["min"]), _decode(m["max"]), _decode(m["last"]), strict=True):
        b = int(s) // (2 * width)
        if b in out:
            s0, lo0, hi0, last0 = out[b]
            out[b] = (max(s, s0), min(lo, lo0), max(hi, hi0), last if s > s0 else last0)
        else:
            out[b] = (s, lo, hi, last)
    return out


def test_merging_buckets_is_exact_so_the_page_can_halve_its_resolution(ui_store):
    path, plain, _ = ui_store
    conn = StoreReader(path)
    fine = {e["id"]: e for e in queries.layer_buckets(conn, plain, width=4)["layers"]}
    coarse = {e["id"]: e for e in queries.layer_buckets(conn, plain, width=8)["layers"]}
    for lid in (0, 1):
        metric = "delta_rms" if lid == 0 else "saturated_frac"
        merged = _merge_pairs(fine[lid], metric, 4)
        np.testing.assert_array_equal(sorted(s for s, *_ in merged.values()), _decode(coarse[lid]["steps"]))
        for i, key in enumerate(["min", "max", "last"], 1):
            np.testing.assert_allclose(
                [v[i] for _, v in sorted(merged.items())], _decode(coarse[lid][metric][key])
            )
    # rows after a cursor come in the buckets they belong to: steps 16..23 hold 20 and 22 after 19
    after = {e["id"]: e for e in queries.layer_buckets(conn, plain, width=8, after=19)["layers"]}
    assert _decode(after[0]["steps"]).tolist() == [22, 30, 38]
    samples = {e["id"]: e for e in queries.layer_samples(conn, plain, width=8)["layers"]}
    np.testing.assert_array_equal(_decode(samples[0]["steps"]), _decode(coarse[0]["steps"]))
    np.testing.assert_allclose(
        _decode(samples[0]["delta_rms"]["last"]), _decode(coarse[0]["delta_rms"]["last"])
    )
    assert conn.estimated_rows(plain, 6) == 20 * 6


def test_a_long_run_is_sampled_first_then_exact_and_kept_up_to_date(ui_store, monkeypatch):
    import gradwatch.ui.app as ui_app

    path, plain, _ = ui_store
    monkeypatch.setattr(ui_app, "_QUICK_ROWS", 10)  # every run is "long"
    conn = StoreReader(path)
    # what the cache does: buckets read up to some step, merged with the buckets after it
    raw = conn.bucket_table(plain, queries.PAGE_METRICS, width=1)[0]
    early = queries.merge_tables(raw[raw[:, 1] <= 12], raw[:0], 8)
    late = conn.bucket_table(plain, queries.PAGE_METRICS, width=8, after=12)[0]
    whole = conn.bucket_table(plain, queries.PAGE_METRICS, width=8)[0]
    np.testing.assert_array_equal(queries.merge_tables(early, late, 8), whole)
    with TestClient(ui_app.create_app(path), base_url="http://127.0.0.1") as c:
        quick = c.get(f"/api/runs/{plain}/series?points=10&quick=1").json()
        assert quick["partial"] is True and "min" not in quick["metrics"]["layers"][0]["delta_rms"]
        for _ in range(2):  # the second time from the cache, extended by the new rows
            exact = c.get(f"/api/runs/{plain}/series?width=4").json()["metrics"]
            assert exact == queries.layer_buckets(StoreReader(path), plain, width=4)
            with RunStore(path) as store:
                store.add_layer_metrics(plain, [(41, lid, [0.5] * 10) for lid in range(6)])
        assert exact["upto"] == 41


def test_the_connection_is_read_only_and_the_store_file_is_untouched(ui_store, client):
    path, plain, _ = ui_store
    before = (path.stat().st_mtime_ns, path.stat().st_size)
    with StoreReader(path) as reader:
        assert reader.read_only  # opened mode=ro, query_only on: SQLite refuses any write through it
    for url in ("/api/runs", f"/api/runs/{plain}", f"/api/runs/{plain}/series?width=4"):
        assert client.get(url).status_code == 200
    assert (path.stat().st_mtime_ns, path.stat().st_size) == before
    with RunStore(path, create=False) as store:
        assert len(store.runs()) == 2


# --- the HTTP API -----------------------------------------------------------------------------------


def test_run_list_detail_and_series(client, ui_store):
    _, plain, xss = ui_store
    r = client.get("/api/runs")
    assert r.status_code == 200 and "default-src 'none'" in r.headers["content-security-policy"]
    runs = {row["id"]: row for row in r.json()["runs"]}
    assert runs[xss]["name"] == XSS  # verbatim: escaping is the page's job (textContent)
    assert runs[plain]["status"] == "finished" and runs[plain]["live"] is False
    assert runs[plain]["last_step"] == 39

    r = client.get(f"/api/runs/{plain}")
    assert "NaN" not in r.text and "Infinity" not in r.text  # strict JSON for the browser
    detail = r.json()
    assert [layer["name"] for layer in detail["layers"]][:2] == ["net.0", "net.1"]
    assert detail["scalars"] == ["loss", "lr"]
    finding = detail["findings"][0]
    assert finding["evidence"] == {"ratio": None, "worst": "inf"}
    assert finding["prescriptions"][0]["description"] == "swap to ReLU"

    series = client.get(f"/api/runs/{plain}/series?points=10").json()
    assert series["width"] == 4 and series["partial"] is False
    assert len(series["metrics"]["layers"]) == 6
    assert {s["name"] for s in series["scalars"]["scalars"]} == {"loss", "lr"}


@pytest.mark.parametrize(
    ("url", "status"),
    [
        pytest.param("/api/runs/999", 404, id="unknown-run"),
        pytest.param("/api/runs/999/series", 404, id="unknown-run-series"),
        pytest.param("/api/runs/abc", 404, id="not-an-id"),
        pytest.param("/api/runs/-1", 404, id="negative-id"),
        pytest.param("/nothing/here", 404, id="unknown-path"),
        pytest.param("/static/nope.js", 404, id="unknown-static"),
        pytest.param("/api/runs/1/series?metrics=bogus", 400, id="bad-metric"),
        pytest.param("/api/runs/1/series?points=1", 400, id="bad-points"),
        pytest.param("/api/runs/1/series?width=3", 400, id="bad-width"),
        pytest.param("/api/stream?follow=1:x", 400, id="bad-follow"),
        pytest.param("/api/stream?since=nan", 400, id="bad-since"),
    ],
)
def test_bad_requests_are_clean_json_errors(client, url, status):
    r = client.get(url)
    assert r.status_code == status
    assert "error" in r.json() and "Traceback" not in r.text


def test_nothing_writes_and_hosts_must_be_local(client, ui_store):
    for method in ("post", "put", "delete", "patch"):
        assert getattr(client, method)("/api/runs").status_code == 405
    assert client.get("/api/runs", headers={"host": "evil.example"}).status_code == 400


def test_a_missing_store_is_an_empty_list_not_an_error(tmp_path):
    with TestClient(create_app(tmp_path / "later.db"), base_url="http://127.0.0.1") as c:
        body = c.get("/api/runs").json()
        assert body["exists"] is False and body["runs"] == []
        assert c.get("/api/runs/1").status_code == 404
        assert "gradwatch live" in c.get("/").text
    sqlite3.connect(tmp_path / "later.db").close()  # created, no tables yet: still "no runs"
    assert Follower(tmp_path / "later.db", []).poll() == []
    with TestClient(create_app(tmp_path / "later.db"), base_url="http://127.0.0.1") as c:
        assert c.get("/api/runs").json() == {"store": str(tmp_path / "later.db"), "exists": True, "runs": []}
    (tmp_path / "junk.db").write_text("not a database " * 100)
    with TestClient(create_app(tmp_path / "junk.db"), base_url="http://127.0.0.1") as c:
        r = c.get("/api/runs")
        assert r.status_code == 503 and "file is not a database" in r.json()["error"]


# --- following a store as it is written ------------------------------------------------------------


def test_follower_sends_only_what_is_new(tmp_path):
    path = tmp_path / "runs.db"
    store = RunStore(path)
    rid = _write_run(store, "growing", steps=10)
    follower = Follower(path, [Follow.parse(f"{rid}:1:9:9")], since=0.0)
    first = dict(follower.poll())
    assert first["runs"]["runs"][0]["live"] is True  # ours: running, this pid
    assert len(first["layers"]["layers"]) == 6 and "metrics" not in first
    assert follower.poll() == []  # nothing committed since

    store.add_layer_metrics(rid, [(10, lid, [0.5] * 10) for lid in range(6)])
    store.add_scalars(rid, [(10, "loss", 0.3)])
    store.flush()
    events = dict(follower.poll())
    assert _decode(events["metrics"]["layers"][0]["steps"]).tolist() == [10.0]
    assert _decode(events["scalars"]["scalars"][0]["steps"]).tolist() == [10.0]
    assert events["runs"]["runs"][0]["last_step"] == 10

    store.add_findings(rid, [{"kind": "dead_units", "severity": "warning"}])
    events = dict(follower.poll())
    assert [f["kind"] for f in events["findings"]["findings"]] == ["dead_units"]
    store.close()

    # a run whose process died without finishing it: interrupted, seen on the liveness timer
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE runs SET pid = ? WHERE id = ?", (int(dead.stdout), rid))
    follower._liveness_at = 0.0
    events = dict(follower.poll())
    assert events["runs"]["runs"][0]["status"] == "interrupted"
    follower.close()


def _raw_get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", path)  # sent as written: no client-side normalisation of ".."
    r = conn.getresponse()
    return r.status, r.read()


@pytest.mark.integration
def test_real_server_streams_rows_and_serves_only_its_static_files(ui_store):
    path, plain, _ = ui_store
    with serve_in_background(path, port=0) as server:
        assert server.url.startswith("http://127.0.0.1:") and server.running
        status, body = _raw_get(server.port, "/")
        assert status == 200 and b"/static/uPlot.iife.min.js" in body
        for asset in ("app.js", "series.js", "heatmap.js", "app.css", "uPlot.iife.min.js", "uPlot.min.css"):
            assert _raw_get(server.port, f"/static/{asset}")[0] == 200, asset
        for bad in TRAVERSALS:
            status, body = _raw_get(server.port, bad)
            assert status == 404, bad
            assert b"root:" not in body and b"Traceback" not in body and b"import" not in body

        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        conn.request("GET", f"/api/stream?since={time.time()}&follow={plain}:1:39:39")
        stream = conn.getresponse()
        assert stream.getheader("content-type").startswith("text/event-stream")
        with RunStore(path) as store:
            store.add_scalars(plain, [(40, "loss", 0.01)])
            store.flush()
            written = time.monotonic()
        seen = b""
        while b"event: scalars" not in seen:
            seen += stream.fp.readline()
            assert time.monotonic() - written < 2.0, seen
        conn.close()
    assert not server.running
    server.stop()  # idempotent

    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    first = serve_in_background(path, port=port)
    try:  # a script that trains several runs keeps one page
        assert serve_in_background(path, port=port) is first
    finally:
        first.stop()


# --- the command line ---------------------------------------------------------------------------------


def test_cli_serves_locally_and_warns_for_other_hosts(monkeypatch, ui_store):
    from gradwatch.ui import server as server_module

    served = []
    monkeypatch.setattr(server_module.UIServer, "run", lambda self: served.append(self.url))
    runner = CliRunner()
    path, _, _ = ui_store
    result = runner.invoke(app, ["ui", "--store", str(path), "--port", "0"])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output and served[0].startswith("http://127.0.0.1:")
    result = runner.invoke(app, ["ui", "--store", str(path), "--port", "0", "--host", "0.0.0.0"])
    assert result.exit_code == 0 and "warning: serving on 0.0.0.0" in result.output

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["ui", "--store", str(path), "--port", str(port)])
    assert result.exit_code == 1 and f"cannot serve on 127.0.0.1:{port}" in result.output
    assert "Traceback" not in result.output


# --- the page in a browser while a model trains --------------------------------------------------------

TRAINER = textwrap.dedent(
    """
    import sys, time, torch
    from torch import nn
    import gradwatch
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(16, 16), nn.Sigmoid())], nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    watcher = gradwatch.watch(model, opt, every=1, store=sys.argv[1], run_name="live training")
    for step in range(400):
        x, y = torch.randn(32, 16), torch.randint(0, 3, (32,))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        watcher.log(loss=loss)
        watcher.flush()
        print(watcher.run_id, step, time.time(), flush=True)
        time.sleep(0.3)
    """
)


def _until(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@pytest.mark.integration
def test_page_follows_a_training_process_live(ui_store, tmp_path):
    from matplotlib.image import imread
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    path, plain, xss = ui_store
    lines: queue.Queue = queue.Queue()
    trainer = subprocess.Popen(
        [sys.executable, "-c", TRAINER, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    threading.Thread(target=lambda: [lines.put(line.split()) for line in trainer.stdout], daemon=True).start()
    server = serve_in_background(path, port=0)
    browser = _chrome(tmp_path)
    try:
        first = lines.get(timeout=40)  # the trainer imports torch and writes its first step
        live = int(first[0])
        browser.get(f"{server.url}#run={live}")
        _until(
            lambda: browser.execute_script("return document.body.dataset.drawn") == str(live), 10, "charts"
        )
        item = browser.find_element(By.CSS_SELECTOR, f'.run-item[data-id="{live}"]')
        assert (
            "is-live" in item.get_attribute("class")
            and item.find_element(By.CLASS_NAME, "badge").text == "live"
        )
        assert browser.find_element(By.ID, "run-status").text == "live"

        def drawn(chart: str) -> int:
            return int(browser.find_element(By.ID, chart).get_attribute("data-last-step") or -1)

        for _ in range(2):  # each write reaches the charts within 2 s
            while not lines.empty():
                lines.get_nowait()
            _, step, written = lines.get(timeout=10)
            _until(lambda s=int(step): drawn("chart-loss") >= s and drawn("heatmap") >= s, 5, f"step {step}")
            assert time.time() - float(written) <= 2.0
        points = int(browser.find_element(By.ID, "chart-lines").get_attribute("data-points"))
        assert points >= 3
        legend = (
            "return document.querySelectorAll('#chart-lines .u-legend .u-series:not(.band-series)').length"
        )
        lines_before = browser.execute_script(legend)
        browser.find_element(By.CSS_SELECTOR, "#layer-picks input:not(:checked)").click()  # one more layer
        _until(lambda: browser.execute_script(legend) == lines_before + 1, 3, "a chosen layer's line")

        png = browser.get_screenshot_as_png()
        (tmp_path / "live.png").write_bytes(png)
        pixels = imread(io.BytesIO(png))[..., :3]
        assert pixels.var() > 0.005 and (pixels.min(axis=2) < 0.8).mean() > 0.02  # not blank

        # the hostile name renders as text: in the list, the header and the layer pickers
        browser.get(f"{server.url}#run={xss}")
        _until(
            lambda: browser.execute_script("return document.body.dataset.drawn") == str(xss), 10, "xss run"
        )
        assert browser.find_element(By.ID, "run-name").text == XSS
        names = [
            e.get_attribute("textContent") for e in browser.find_elements(By.CSS_SELECTOR, ".run-item .name")
        ]
        assert XSS in names
        assert XSS in browser.find_element(By.ID, "layer-picks").get_attribute("textContent")
        assert browser.execute_script("return document.querySelectorAll('img').length") == 0
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert  # noqa: B018 - reading it raises when no alert is open

        # two runs on one chart
        for rid in (plain, live):
            browser.find_element(By.CSS_SELECTOR, f'.run-item[data-id="{rid}"] input').click()
        _until(lambda: browser.find_element(By.ID, "compare").is_displayed(), 5, "comparison")
        _until(
            lambda: int(browser.find_element(By.ID, "chart-compare").get_attribute("data-points") or 0) >= 40,
            5,
            "both runs' loss",
        )
        legend = browser.find_element(By.ID, "chart-compare").text
        assert "sigmoid run" in legend and "live training" in legend

        trainer.kill()  # a crashed training: the page marks the run interrupted
        trainer.wait()  # (reaped: a zombie still answers kill(pid, 0))
        _until(lambda: item.find_element(By.CLASS_NAME, "badge").text == "interrupted", 6, "interrupted")

        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
    finally:
        browser.quit()
        server.stop()
        trainer.kill()
        trainer.wait()


def test_watch_ui_true_serves_the_run(tmp_path):
    import urllib.request

    import torch
    from torch import nn

    import gradwatch

    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    with gradwatch.watch(model, store=tmp_path / "ui.db", every=1, ui=0) as w:
        model(torch.randn(3, 4)).sum().backward()
        w.flush()
        assert w.ui is not None and w.ui.running
        with urllib.request.urlopen(f"{w.ui.url.rstrip('/')}/api/runs/{w.run_id}", timeout=10) as response:
            assert response.status == 200
    w.ui.stop()

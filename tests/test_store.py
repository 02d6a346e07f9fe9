import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from gradwatch import RunStore, open_store
from gradwatch.errors import RunNotFoundError, StoreError
from gradwatch.store import LAYER_METRICS, SCHEMA_VERSION, STORE_ENV


def test_wal_mode_and_schema_version(store_path):
    with RunStore(store_path):
        pass
    conn = sqlite3.connect(store_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(
        SCHEMA_VERSION
    )
    conn.close()


def test_default_path_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(STORE_ENV, str(tmp_path / "env.db"))
    with RunStore() as s:
        assert s.path == tmp_path / "env.db"
    monkeypatch.delenv(STORE_ENV)
    monkeypatch.chdir(tmp_path)
    with RunStore() as s:
        assert s.path.resolve() == (tmp_path / "gradwatch-runs" / "gradwatch.db").resolve()
    with RunStore(tmp_path / "gradwatch-runs") as s:  # a directory means the file inside
        assert s.path.name == "gradwatch.db"


def test_roundtrip_metrics_scalars_nan_inf(store):
    run = store.create_run("r", {"lr": 0.1})
    store.add_layers(run, [(0, "fc1", "Linear", "param", None), (1, "act", "Tanh", "activation", "tanh")])
    values = [float(i) for i in range(len(LAYER_METRICS))]
    values[0] = math.nan
    values[1] = math.inf
    store.add_layer_metrics(run, [(0, 0, values), (0, 1, [None] * len(LAYER_METRICS))])
    store.add_scalars(run, [(0, "loss", 1.5), (1, "loss", math.nan), (1, "lr", 0.1)])
    store.flush()
    m = store.metrics(run)
    assert list(m.layer) == ["fc1", "act"]
    assert math.isnan(m.grad_norm[0]) and m.nonfinite[0]
    assert m.weight_norm[0] == math.inf
    assert m.delta_rms[0] == LAYER_METRICS.index("delta_rms")
    assert not m.nonfinite[1] and m[list(LAYER_METRICS)].iloc[1].isna().all()
    s = store.scalars(run)
    assert list(s.step) == [0, 1] and s.loss[0] == 1.5 and math.isnan(s.loss[1])
    assert store.run("r")["config"] == {"lr": 0.1}
    assert list(store.metrics(run, layers=["act"]).layer) == ["act"]


def test_scalars_equal_the_pandas_pivot_of_the_rows(store):
    """The wide scalars table: steps ascending, names sorted, NaN where a name has no value."""
    import pandas as pd

    run = store.create_run("r")
    other = store.create_run("other")
    rows = [(7, "zeta", 1.0), (3, "loss", 2.5), (7, "loss", None), (12, "alpha", -math.inf),
            (0, "loss", 0.25), (3, "alpha", 4.0)]
    store.add_scalars(run, rows)
    store.add_scalars(other, [(5, "loss", 9.0)])
    store.flush()
    expected = (pd.DataFrame(rows, columns=["step", "name", "value"]).astype({"value": "float64"})
                .pivot(index="step", columns="name", values="value").reset_index())
    expected.columns.name = None
    pd.testing.assert_frame_equal(store.scalars(run), expected)
    assert list(store.scalars(run).columns) == ["step", "alpha", "loss", "zeta"]
    losses = expected[["step", "loss"]].iloc[[0, 1, 2]].reset_index(drop=True)  # step 12 has no loss
    pd.testing.assert_frame_equal(store.scalars(run, names=["loss"]), losses)
    assert store.scalars(run, names=["missing"]).columns.tolist() == ["step"]


def test_weight_array_stores_what_weight_samples_store(store):
    import numpy as np

    a, b = store.create_run("a"), store.create_run("b")
    store.add_layers(a, [(0, "fc1", "Linear", "param", None), (2, "fc2", "Linear", "param", None)])
    store.add_layers(b, [(0, "fc1", "Linear", "param", None), (2, "fc2", "Linear", "param", None)])
    lids, where, values = [0, 0, 2], [5, 9, 1], [0.5, math.nan, -2.25]
    store.add_weight_samples(a, [(4, lid, idx, v) for lid, idx, v in zip(lids, where, values, strict=True)])
    store.add_weight_array(b, 4, np.array(lids), np.array(where), np.array(values, dtype=np.float32))
    store.flush()
    assert store.weight_samples(a).equals(store.weight_samples(b))
    assert math.isnan(store.weight_samples(b)["value"].iloc[1])  # NULL, read back as NaN
    with pytest.raises(StoreError, match="3 layer ids, 2 indices and 3 values of tracked weights"):
        store.add_weight_array(b, 5, lids, where[:2], np.array(values))


def test_query_errors(store):
    run = store.create_run("r")
    with pytest.raises(RunNotFoundError, match=r"no run 42 in .*latest runs: 1 \(r\)"):
        store.metrics(42)
    with pytest.raises(RunNotFoundError, match="no run 'nope'"):
        store.scalars("nope")
    with pytest.raises(StoreError, match=r"unknown metric\(s\) \['speed'\]; known: grad_norm"):
        store.metrics(run, metrics=["speed"])
    with pytest.raises(StoreError, match=r"layer\(s\) \['fc9'\] not in run"):
        store.metrics(run, layers=["fc9"])


def test_open_missing_store_for_reading(tmp_path):
    with pytest.raises(StoreError, match="no run store at .*run a watched training first"):
        open_store(tmp_path / "missing.db")


def test_newer_schema_refused(store_path):
    with RunStore(store_path):
        pass
    conn = sqlite3.connect(store_path)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="schema version 99, newer than"):
        RunStore(store_path)


WRITER = textwrap.dedent(
    """
    import sys
    from gradwatch import RunStore
    path, name, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = RunStore(path)
    run = store.create_run(name)
    store.add_layers(run, [(i, f"l{i}", "Linear", "param", None) for i in range(10)])
    for step in range(steps):
        store.add_layer_metrics(run, [(step, i, [float(step)] * 10) for i in range(10)])
        store.add_scalars(run, [(step, "loss", float(step))])
    store.finish_run(run)
    store.close()
    """
)


@pytest.mark.integration
def test_several_processes_write_one_store_without_losing_rows(store_path, tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    procs = [
        subprocess.Popen([sys.executable, str(script), str(store_path), f"w{i}", "300"]) for i in range(4)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    with open_store(store_path) as s:
        runs = s.runs()
        assert sorted(runs.name) == ["w0", "w1", "w2", "w3"]
        assert (runs.status == "finished").all()
        for run_id in runs.id:
            assert len(s.metrics(run_id)) == 3000
            assert len(s.scalars(run_id)) == 300


KILLED = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    import gradwatch
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gradwatch.watch(model, opt, every=1, store=sys.argv[1], run_name="doomed")
    step = 0
    while True:
        opt.zero_grad()
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        opt.step()
        w.log(loss=loss)
        step += 1
        if step == 20:
            w.flush()
            print("flushed", flush=True)
    """
)


@pytest.mark.integration
def test_sigkill_mid_run_leaves_a_readable_store(store_path, tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    proc = subprocess.Popen([sys.executable, str(script), str(store_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "flushed"
    time.sleep(0.5)  # let it write a few more batches, then kill it hard mid-run
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    with open_store(store_path) as s:
        run = s.run("doomed")
        assert run["status"] == "interrupted"  # marked running, but its process is gone
        scalars = s.scalars(run["id"])
        assert set(range(20)) <= set(scalars.step)  # everything flushed before the kill
        metrics = s.metrics(run["id"])
        assert set(range(20)) <= set(metrics.step)
    conn = sqlite3.connect(store_path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


def test_findings_roundtrip(store):
    run = store.create_run("r")
    store.add_findings(
        run,
        [
            {
                "kind": "vanishing",
                "severity": "error",
                "first_step": 0,
                "last_step": 9,
                "layers": ["fc1"],
                "evidence": {"ratio": 1e-9},
                "explanation": "the product of derivatives",
                "prescriptions": [{"fix": "relu"}],
            }
        ],
    )
    f = store.findings(run)
    assert f.kind.tolist() == ["vanishing"] and f.evidence[0] == {"ratio": 1e-9} and f.layers[0] == ["fc1"]
    store.add_findings(run, [])  # replaces by default
    assert store.findings(run).empty


def test_write_queue_is_bounded(store):
    run = store.create_run("r")
    for step in range(3 * store.max_pending_writes):
        store.add_scalars(run, [(step, "loss", 1.0)])
        assert store.pending_writes() <= store.max_pending_writes
    store.flush()
    assert len(store.scalars(run)) == 3 * store.max_pending_writes


def test_version_1_store_migrates(store_path):
    with RunStore(store_path):
        pass
    conn = sqlite3.connect(store_path)
    conn.execute("DROP TABLE weight_samples")
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with RunStore(store_path) as s:
        run = s.create_run("old")
        assert s.weight_samples(run).empty
    conn = sqlite3.connect(store_path)
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(
        SCHEMA_VERSION
    )
    conn.close()


def test_version_2_store_gains_the_v3_metric_columns(store_path):
    with RunStore(store_path) as s:
        s.create_run("v2")
    conn = sqlite3.connect(store_path)
    for metric in ("grad_norm_max", "grad_norm_min", "input_q15", "input_q50", "input_q85"):
        conn.execute(f"ALTER TABLE layer_metrics DROP COLUMN {metric}")
    conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with RunStore(store_path) as s:
        run = s.create_run("v3")
        s.add_layers(run, [(0, "fc", "Linear", "param", None)])
        values = [None] * len(LAYER_METRICS)
        values[LAYER_METRICS.index("grad_norm_max")] = 2.5
        s.add_layer_metrics(run, [(0, 0, values)])
        s.flush()
        assert s.metrics(run)["grad_norm_max"].tolist() == [2.5]
    conn = sqlite3.connect(store_path)
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(
        SCHEMA_VERSION
    )
    conn.close()


def test_version_3_store_keeps_its_weight_samples_rekeyed_by_step(store_path):
    with RunStore(store_path) as s:
        run = s.create_run("v3")
        s.add_layers(run, [(0, "fc", "Linear", "param", None), (1, "out", "Linear", "param", None)])
        rows = [
            (step, lid, idx, step + lid / 10 + idx / 100)
            for step in range(3)
            for lid in (0, 1)
            for idx in (4, 9)
        ]
        s.add_weight_samples(run, rows)
        s.flush()
        before = s.weight_samples(run)
    conn = sqlite3.connect(store_path)  # what a v3 store looked like: keyed by element, then step
    conn.executescript(
        "DROP TABLE weight_samples;"
        "CREATE TABLE weight_samples (run_id INTEGER NOT NULL, step INTEGER NOT NULL, layer_id INTEGER "
        "NOT NULL, idx INTEGER NOT NULL, value REAL, PRIMARY KEY (run_id, layer_id, idx, step)) "
        "WITHOUT ROWID;"
        "UPDATE meta SET value = '3' WHERE key = 'schema_version';"
    )
    conn.executemany(
        "INSERT INTO weight_samples VALUES (?, ?, ?, ?, ?)",
        [(run, st, lid, idx, v) for st, lid, idx, v in rows],
    )
    conn.commit()
    conn.close()
    with RunStore(store_path) as s:
        after = s.weight_samples(run)
        s.add_weight_samples(run, [(3, 0, 4, 7.5)])
        s.flush()
        assert len(s.weight_samples(run)) == len(rows) + 1
    assert len(before) == len(rows) == 12
    assert after.equals(before)
    conn = sqlite3.connect(store_path)
    key = sorted((r[5], r[1]) for r in conn.execute("PRAGMA table_info(weight_samples)") if r[5])
    assert [name for _, name in key] == ["run_id", "step", "layer_id", "idx"]
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "4"
    conn.close()


def test_opening_retries_when_another_process_is_switching_the_file_to_wal(store_path, monkeypatch):
    # Two processes opening a fresh store race for the exclusive lock that the switch to WAL
    # takes; SQLite answers the loser "database is locked" at once, without a busy wait (seen
    # in CI as a writer that died on open). The open must retry, not fail.
    import gradwatch.store as store_module

    failures = {"left": 2}

    class Contended(sqlite3.Connection):
        def execute(self, sql, *args):
            if "journal_mode" in sql and failures["left"]:
                failures["left"] -= 1
                raise sqlite3.OperationalError("database is locked")
            return super().execute(sql, *args)

    def connect(path):
        return sqlite3.connect(path, isolation_level=None, check_same_thread=False, factory=Contended)

    monkeypatch.setattr(store_module, "_connect", connect)
    s = RunStore(store_path)
    assert failures["left"] == 0
    s.create_run("after-contention")
    assert s.runs().name.tolist() == ["after-contention"]
    s.close()


def test_writes_arriving_together_commit_as_one_transaction(store, monkeypatch):
    # At every=1 a commit per step wrote each tracked weight's end page to the WAL at every
    # step; the writer now gathers what arrives within 0.2 s into one transaction.
    import gradwatch.store as store_module

    commits = []
    commit = store_module._Writer._commit

    def counted(conn, work):
        commits.append(len(work))
        return commit(conn, work)

    monkeypatch.setattr(store_module._Writer, "_commit", staticmethod(counted))
    run = store.create_run("batched")
    for step in range(10):
        store.add_scalars(run, [(step, "loss", float(step))])
        time.sleep(0.005)  # steps 5 ms apart: 50 ms in all, inside one 0.2 s gathering
    store.flush()
    assert len(store.scalars(run)) == 10
    assert 1 <= len(commits) <= 3, commits  # one per step (10) before
    assert sum(commits) == 20  # each add_scalars queues its rows and the run's updated_at


# --- copying a run ------------------------------------------------------------------------------


def _watched_run(path):
    """A real watched run (layers, metrics with a non-finite value, scalars, tracked weights, findings)."""
    import torch
    from torch import nn

    import gradwatch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with RunStore(path) as store:
        with gradwatch.watch(model, opt, every=2, store=store, run_name="src", warn=False) as w:
            for _ in range(6):
                opt.zero_grad()
                model(torch.randn(16, 4)).pow(2).mean().backward()
                opt.step()
                w.log(loss=1.0, spike=math.inf)
        gradwatch.diagnose(w.run_id, store=store)
        return w.run_id


def _everything(store, run_id):
    """Every row a run has, table by table, as comparable plain values (ids and clocks aside)."""
    info = store.run(run_id)
    return {
        "run": {k: info[k] for k in ("name", "config", "status", "error", "created_at", "finished_at",
                                     "pid", "host")},
        "layers": store.layers(run_id).to_dict("records"),
        "metrics": store.metrics(run_id).fillna(-1.0).to_dict("records"),
        "scalars": store.scalars(run_id).fillna(-1.0).to_dict("records"),
        "weights": store.weight_samples(run_id).to_dict("records"),
        "findings": store.findings(run_id).drop(columns=["created_at"]).to_dict("records"),
    }


def test_copy_run_keeps_every_row_of_every_table(tmp_path):
    run_id = _watched_run(tmp_path / "a.db")
    with RunStore(tmp_path / "a.db") as src, RunStore(tmp_path / "b.db") as dst:
        dst.create_run("already there")  # the copy gets a new id
        assert set(src.run_tables()) == {"layers", "layer_metrics", "scalars", "weight_samples", "findings"}
        new_id = src.copy_run(run_id, dst)
        assert new_id != run_id
        want, got = _everything(src, run_id), _everything(dst, new_id)
        assert len(want["weights"]) == 3 * 2 * 8 and want["findings"] and want["metrics"]
        assert math.isinf(src.scalars(run_id)["spike"].iloc[0])  # non-finite values stay as recorded
        assert got == want
        # every table with a run_id column holds as many rows of the copy as of the original
        counts = src.row_counts(run_id)
        assert dst.row_counts(new_id) == counts and min(counts.values()) > 0


def test_copy_run_into_a_path_and_its_errors(tmp_path):
    run_id = _watched_run(tmp_path / "a.db")
    with RunStore(tmp_path / "a.db") as src:
        new_id = src.copy_run("src", tmp_path / "new" / "c.db")  # by name, into a store it creates
        with RunStore(tmp_path / "new" / "c.db", create=False) as dst:
            assert _everything(dst, new_id) == _everything(src, run_id)
        with pytest.raises(StoreError, match="is the store the run is in"):
            src.copy_run(run_id, src)
        with pytest.raises(RunNotFoundError):
            src.copy_run(999, tmp_path / "d.db")
    assert src.closed


def test_ray_packs_and_unpacks_a_run_with_every_table(tmp_path):
    from gradwatch.integrations.ray import dump_run, load_run

    run_id = _watched_run(tmp_path / "worker.db")
    packed = dump_run(tmp_path / "worker.db", run_id)
    assert isinstance(packed, bytes)
    with RunStore(tmp_path / "driver.db") as driver, RunStore(tmp_path / "worker.db") as worker:
        new_id = load_run(driver, packed)
        assert _everything(driver, new_id) == _everything(worker, run_id)
        assert len(driver.weight_samples(new_id)) == 48

"""The lab runner: the recorded contract, resume, Ctrl-C, the backend boundary, the CLI."""

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from gradwatch.cli import app
from gradwatch.lab.models import ModelConfig
from gradwatch.lab.presets import Claim, Preset, TrainSettings, Verdict, grid_entry
from gradwatch.lab.runner import InProcessBackend, LabInterrupted, RunEvent, run_lab, run_task
from gradwatch.store import RunStore

runner = CliRunner()
TRAIN = TrainSettings(epochs=2, every=5, lr=3e-3)


def _acc_claim(summaries, store):
    s = summaries["t/relu-he"]
    return Verdict(s.test_acc_mean > 0.5, f"relu+he {s.test_acc_mean:.2f}")


TINY = Preset(
    "tiny", "two small configurations",
    (grid_entry("t", "sigmoid-d2", ModelConfig(depth=2, width=16, activation="sigmoid"), TRAIN),
     grid_entry("t", "relu-he", ModelConfig(depth=2, width=16, activation="relu", init="he"), TRAIN)),
    (Claim("relu+he learns", _acc_claim),
     Claim("needs a config the grid lacks", lambda s, st: Verdict(True, str(s["t/absent"])))),
    seeds=2,
)


class SpyBackend(InProcessBackend):
    """Records what it was asked to run: the backend boundary seen from outside."""

    def __init__(self):
        super().__init__()
        self.asked = []

    def run(self, tasks, notify):
        self.asked.append([(t.entry.config_key, t.seed, t.entry.train.epochs) for t in tasks])
        super().run(tasks, notify)


@pytest.fixture(scope="module")
def tiny_lab(tmp_path_factory):
    """The tiny preset on the real process pool, two workers."""
    out = tmp_path_factory.mktemp("lab")
    events: list[RunEvent] = []
    return run_lab(TINY, out=out, workers=2, notify=events.append), events


@pytest.mark.integration
def test_runs_follow_the_lab_contract(tiny_lab):
    result, events = tiny_lab
    assert result.ran == 4 and result.resumed == 0 and not result.failed
    assert {e.kind for e in events} == {"start", "epoch", "end"}
    assert sum(e.kind == "end" for e in events) == 4
    lab = json.loads((result.out / "lab.json").read_text())
    assert lab["preset"] == "tiny" and lab["dataset"] == "digits" and lab["seeds"] == 2 and lab["epochs"] == 2
    assert lab["store"] == "gradwatch.db"
    with RunStore(result.out / lab["store"]) as store:
        runs = store.runs()
        assert list(runs["status"]) == ["finished"] * 4
        for entry in lab["configs"]:
            assert set(entry) == {"config_key", "section", "label", "run_ids", "test_acc_mean",
                                  "test_acc_std", "delta_ratio_mean", "delta_ratio_std", "main_finding"}
            accs, ratios = [], []
            for seed, run_id in enumerate(entry["run_ids"]):
                config = store.run(run_id)["config"]
                assert config["lab"] == {"preset": "tiny", "section": "t", "label": entry["label"],
                                         "config_key": entry["config_key"], "seed": seed}
                assert config["model"] == ModelConfig.from_dict(config["model"]).to_dict()
                assert config["train"] == TRAIN.to_dict() and config["dataset"] == "digits"
                assert config["gradwatch"]["every"] == 5
                scalars = store.scalars(run_id)
                assert scalars["loss"].notna().all() and len(scalars) == 2 * 23  # 1437 / 64 -> 23 steps
                ends = scalars.dropna(subset=["epoch"])
                assert list(ends["epoch"]) == [1, 2] and list(ends["step"]) == [22, 45]
                assert ends[["train_loss", "test_loss", "test_acc"]].notna().all().all()
                accs.append(ends["test_acc"].iloc[-1])
                m = store.metrics(run_id)
                # docs/lab-contract.md: first over last weight layer (the head counted), first logged step
                weights = m[(m["step"] == 0) & (m["kind"] == "param") & ~m["type"].str.contains("Norm")]
                weights = weights.sort_values("layer_id")["delta_rms"]
                ratios.append(weights.iloc[0] / weights.iloc[-1])
            assert entry["test_acc_mean"] == pytest.approx(np.mean(accs))
            assert entry["test_acc_std"] == pytest.approx(np.std(accs, ddof=1))
            assert entry["delta_ratio_mean"] == pytest.approx(np.mean(ratios))
    claims = {c["claim"]: c for c in lab["claims"]}
    assert claims["relu+he learns"]["held"]
    absent = claims["needs a config the grid lacks"]
    assert not absent["held"] and "t/absent" in absent["evidence"]


@pytest.mark.integration
def test_resume_skips_finished_runs(tiny_lab):
    result, _ = tiny_lab
    before = {c.config_key: c.run_ids for c in result.summaries}
    spy = SpyBackend()
    again = run_lab(TINY, out=result.out, backend=spy)
    assert spy.asked == [[]] and again.ran == 0 and again.resumed == 4
    assert {c.config_key: c.run_ids for c in again.summaries} == before
    more = run_lab(TINY, out=result.out, seeds=3, backend=spy)  # only seed 2 is new
    assert spy.asked[-1] == [("t/sigmoid-d2", 2, 2), ("t/relu-he", 2, 2)] and more.resumed == 4
    longer = run_lab(TINY, out=result.out, seeds=1, epochs=1, backend=spy)  # other epochs: not the same run
    assert spy.asked[-1] == [("t/sigmoid-d2", 0, 1), ("t/relu-he", 0, 1)] and longer.resumed == 0
    with RunStore(result.store) as store:
        assert len(store.runs()) == 4 + 2 + 2


def test_a_failing_run_is_reported_and_the_grid_goes_on(tmp_path):
    bad = grid_entry("t", "bad", ModelConfig(depth=2), TRAIN)
    task_store = tmp_path / "x.db"
    from gradwatch.lab.runner import RunTask

    result = run_task(RunTask("p", bad, 0, str(tmp_path / "missing.npz"), str(task_store)))
    assert result.status == "failed" and "DataError" in result.error and result.run_id is None


# --- Ctrl-C ---------------------------------------------------------------------------------

_SIGINT_GRID = {
    "name": "sigint", "seeds": 1, "train": {"epochs": 3, "every": 10},
    "grid": [{"name": f"tanh-{i}", "model": {"depth": 12, "activation": "tanh"}} for i in range(8)],
}


def _finished(db) -> int:
    if not os.path.exists(db):
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM runs WHERE status = 'finished'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@pytest.mark.integration
def test_ctrl_c_stops_cleanly_and_keeps_finished_runs(tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps(_SIGINT_GRID))
    out = tmp_path / "lab"
    cmd = [sys.executable, "-c", "from gradwatch.cli import app; app()", "lab", "--preset", str(grid),
           "--out", str(out), "--workers", "1"]
    # The lab gets Ctrl-C's default handling whatever this process inherited: a shell starts a
    # background job (`make test &`) with SIGINT ignored, and an ignored signal stays ignored
    # across exec (a CI run started that way saw the lab finish all 8 runs, rc 0).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 120
        while _finished(out / "gradwatch.db") < 1 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (stdout, stderr)
    assert "stopped:" in stderr and "run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    assert not (out / "lab.json").exists()
    with RunStore(out / "gradwatch.db") as store:
        runs = store.runs()
        finished = runs[runs["status"] == "finished"]
        assert 1 <= len(finished) < 8
        assert "running" not in set(runs["status"])  # the run in flight stopped at an epoch: failed
        for run_id in finished["id"]:
            assert store.scalars(run_id)["test_acc"].dropna().size == _SIGINT_GRID["train"]["epochs"]
    spy = SpyBackend()
    resumed = run_lab(str(grid), out=out, backend=spy, epochs=None)
    assert len(spy.asked[0]) == 8 - len(finished) and resumed.resumed == len(finished)


def test_interrupt_in_process_raises_lab_interrupted(tmp_path):
    class Interrupting(InProcessBackend):
        def run(self, tasks, notify):
            super().run(tasks[:1], notify)
            raise KeyboardInterrupt

    with pytest.raises(LabInterrupted, match=r"stopped: 1 of 4 runs are finished and kept in .*gradwatch.db"):
        run_lab(TINY, out=tmp_path, backend=Interrupting())


# --- the CLI --------------------------------------------------------------------------------


def test_cli_lists_presets():
    result = runner.invoke(app, ["lab", "--list"], env={"COLUMNS": "160"})
    assert result.exit_code == 0 and "seed" in result.output and "depth sweep" in result.output


def _grid_file(tmp_path, model):
    path = tmp_path / "g.json"
    path.write_text(json.dumps({"grid": [{"name": "x", "model": model}]}))
    return str(path)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--preset", "nope"], "unknown preset 'nope'; valid: seed", id="preset"),
        pytest.param(["--seeds", "0"], "seeds=0; expected an integer >= 1", id="seeds"),
        pytest.param(["--epochs", "0"], "epochs=0; expected an integer >= 1", id="epochs"),
        pytest.param(["--workers", "0"], "workers=0; expected an integer >= 1", id="workers"),
        pytest.param(["--dataset", "{tmp}/none.npz"], "data file '{tmp}/none.npz' not found",
                     id="missing-data"),
        pytest.param(["--dataset", "{tmp}/junk.npz"], "cannot read", id="unreadable-data"),
        pytest.param(["--preset", "@activation"], "unknown activation 'swishy'", id="activation"),
        pytest.param(["--preset", "@init"], "init='lecun' is not a known initialisation", id="init"),
        pytest.param(["--preset", "@depth"], "depth=0; expected an integer >= 1", id="depth"),
        pytest.param(["--preset", "@width"], "width=0; expected an integer >= 1", id="width"),
    ],
)
def test_cli_bad_input_fails_before_training(tmp_path, argv, message):
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    bad = {"@activation": {"activation": "swishy"}, "@init": {"init": "lecun"}, "@depth": {"depth": 0},
           "@width": {"depth": 2, "width": 0}}
    argv = [_grid_file(tmp_path, bad[a]) if a in bad else a.format(tmp=tmp_path) for a in argv]
    result = runner.invoke(app, ["lab", *argv, "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert message.format(tmp=tmp_path) in result.output.replace("\n", " ")
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "gradwatch.db").exists()


@pytest.mark.integration
def test_cli_end_to_end(tmp_path):
    grid = tmp_path / "g.json"
    grid.write_text(json.dumps({"name": "mini", "grid": [
        {"name": "sigmoid-d8", "model": {"depth": 8, "width": 16, "activation": "sigmoid"}},
        {"name": "relu-he-d8", "model": {"depth": 8, "width": 16, "activation": "relu", "init": "he"}}]}))
    out = tmp_path / "lab"
    argv = ["lab", "--preset", str(grid), "--seeds", "1", "--epochs", "2", "--workers", "1",
            "--out", str(out)]
    result = runner.invoke(app, argv, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = result.output
    assert "sigmoid depth 8 width 16, default init" in text and "relu depth 8 width 16, he init" in text
    assert "claims" not in text and "2 runs in" in text
    assert f"lab summary: {out / 'lab.json'}" in text
    lab = json.loads((out / "lab.json").read_text())
    sigmoid = lab["configs"][0]
    assert sigmoid["delta_ratio_mean"] < 1e-3 and "vanishing" in sigmoid["main_finding"]
    assert math.isfinite(lab["configs"][1]["test_acc_mean"])
    assert f"report: {out / 'report.html'}" in text and (out / "report.html").stat().st_size > 10_000

"""lab.vectorized: K seeds trained as one batched network store what K sequential runs store."""

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from gradwatch.cli import app
from gradwatch.errors import ConfigError
from gradwatch.lab.models import ModelConfig
from gradwatch.lab.presets import Preset, TrainSettings, grid_entry
from gradwatch.lab.runner import InProcessBackend, RunEvent, RunResult, RunTask, run_lab, run_task
from gradwatch.lab.vectorized import GroupResult, SeedGroup, group_seeds, plan_runs, run_group
from gradwatch.store import LAYER_METRICS, RunStore

# Digits' training split has 1437 examples: 6 steps an epoch at batch 256, the last one of 157.
ADAM = TrainSettings(optimizer="adam", lr=1e-2, epochs=2, batch_size=256, every=2)
SGD = TrainSettings(optimizer="sgd", lr=0.05, momentum=0.9, epochs=2, batch_size=256, every=2)
RTOL, ATOL = 1e-5, 1e-9


def _entry(model: ModelConfig, train: TrainSettings = ADAM, name: str = "x"):
    return grid_entry("t", name, model, train)


def _tasks(entry, seeds, store, dataset="digits"):
    return [RunTask("p", entry, s, dataset, str(store)) for s in seeds]


def _close(a: np.ndarray, b: np.ndarray, what: str) -> None:
    np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL, equal_nan=True, err_msg=what)


def _assert_same_run(seq: RunStore, seq_id: int, vec: RunStore, vec_id: int) -> None:
    """Everything a lab run stores, compared: the report, claims and resume read only these."""
    a, b = seq.run(seq_id), vec.run(vec_id)
    assert (a["name"], a["status"]) == (b["name"], b["status"]) and a["status"] == "finished"
    config = json.loads(json.dumps(b["config"]))
    assert config["gradwatch"].pop("vectorized") is True
    assert "vectorized" not in a["config"]["gradwatch"] and config == a["config"]
    pd.testing.assert_frame_equal(seq.layers(seq_id), vec.layers(vec_id))

    ma, mb = seq.metrics(seq_id), vec.metrics(vec_id)
    assert ma[["step", "layer_id", "nonfinite"]].equals(mb[["step", "layer_id", "nonfinite"]])
    for metric in LAYER_METRICS:
        _close(ma[metric].to_numpy(), mb[metric].to_numpy(), metric)

    sa, sb = seq.scalars(seq_id), vec.scalars(vec_id)
    assert list(sa.columns) == list(sb.columns) and sa["step"].equals(sb["step"])
    assert sa["wall_time"].notna().equals(sb["wall_time"].notna())  # a clock: its steps, not its values
    for name in sa.columns.drop(["step", "wall_time"]):
        _close(sa[name].to_numpy(), sb[name].to_numpy(), name)

    wa, wb = seq.weight_samples(seq_id), vec.weight_samples(vec_id)
    assert len(wa) > 0 and wa[["step", "layer_id", "index"]].equals(wb[["step", "layer_id", "index"]])
    _close(wa["value"].to_numpy(), wb["value"].to_numpy(), "tracked weights")

    fa, fb = seq.findings(seq_id), vec.findings(vec_id)
    assert list(zip(fa["kind"], fa["severity"], fa["layers"], strict=True)) == \
        list(zip(fb["kind"], fb["severity"], fb["layers"], strict=True))


@pytest.mark.parametrize(
    ("model", "train"),
    [
        # a large init drives the sigmoids into their flat tails: saturated fractions well above 0
        pytest.param(ModelConfig(depth=3, width=16, activation="sigmoid", init="scaled", sigma_w2=16.0,
                                 sigma_b2=0.5), ADAM, id="sigmoid-saturating-adam"),
        pytest.param(ModelConfig(depth=3, width=16, activation="tanh", batch_norm=True, residual=True),
                     SGD, id="tanh-batchnorm-residual-sgd"),
    ],
)
def test_vectorized_runs_store_what_sequential_runs_store(tmp_path, model, train):
    entry = _entry(model, train)
    sequential = [run_task(t) for t in _tasks(entry, [0, 1], tmp_path / "seq.db")]
    group = run_group(SeedGroup(tuple(_tasks(entry, [0, 1], tmp_path / "vec.db"))))
    assert [r.status for r in sequential] == ["finished"] * 2, [r.error for r in sequential]
    assert group.status == "finished" and [r.status for r in group.runs] == ["finished"] * 2, group.error
    assert [r.task.seed for r in group.runs] == [0, 1]
    with RunStore(tmp_path / "seq.db") as seq, RunStore(tmp_path / "vec.db") as vec:
        for s, v in zip(sequential, group.runs, strict=True):
            _assert_same_run(seq, s.run_id, vec, v.run_id)
            assert v.test_acc == pytest.approx(s.test_acc, rel=RTOL)
        m = vec.metrics(group.runs[0].run_id)
        assert m["step"].unique().tolist() == [0, 2, 4, 6, 8, 10]  # both epochs, the short last batch
        if model.activation == "sigmoid":
            assert m["saturated_frac"].max() > 0.2  # the comparison covered real saturation
        else:
            assert set(m["type"]) >= {"Linear", "BatchNorm1d", "Tanh"}
        # the seeds differ (own split, weights and batch order): not one run written twice
        other = vec.scalars(group.runs[1].run_id)
        assert not np.allclose(vec.scalars(group.runs[0].run_id)["loss"], other["loss"])
    assert group.test_acc == pytest.approx(np.mean([s.test_acc for s in sequential]), rel=RTOL)


# --- grouping ---------------------------------------------------------------------------------


MLP_A = _entry(ModelConfig(depth=2, width=8, activation="relu"), name="a")
MLP_B = _entry(ModelConfig(depth=2, width=8, activation="tanh"), name="b")
CNN = _entry(ModelConfig(kind="cnn", depth=1, width=4), name="cnn")


def test_group_seeds_groups_mlp_seeds_and_leaves_the_rest(tmp_path):
    tasks = [*_tasks(MLP_A, [0, 1, 2], tmp_path / "s.db"), *_tasks(CNN, [0, 1], tmp_path / "s.db"),
             *_tasks(MLP_B, [0], tmp_path / "s.db"), *_tasks(MLP_A, [3], tmp_path / "other.db")]
    plan = group_seeds(tasks)
    kinds = [(type(item).__name__, members) for item, members in zip(plan.items, plan.members, strict=True)]
    assert kinds == [("SeedGroup", (0, 1, 2)), ("RunTask", (3,)), ("RunTask", (4,)), ("RunTask", (5,)),
                     ("RunTask", (6,))]
    assert plan.items[0].seeds == (0, 1, 2) and plan.items[0].run_name == "p/t/a/seeds0,1,2"
    assert list(plan.fallbacks) == ["t/cnn"] and "one seed at a time" in plan.fallbacks["t/cnn"]
    off = group_seeds(tasks, vectorize=False)
    assert off.items == tasks and off.members == [(i,) for i in range(len(tasks))]


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        pytest.param(lambda s: _tasks(MLP_A, [0], s), "at least 2 tasks; got 1", id="one"),
        pytest.param(lambda s: _tasks(MLP_A, [0], s) + _tasks(MLP_B, [1], s), "differ only by seed",
                     id="mixed"),
        pytest.param(lambda s: _tasks(MLP_A, [1, 1], s), r"distinct; got \[1, 1\]", id="same-seed"),
        pytest.param(lambda s: _tasks(CNN, [0, 1], s), "cnn configuration runs one seed at a time",
                     id="cnn"),
    ],
)
def test_a_seed_group_says_what_is_wrong(tmp_path, tasks, message):
    with pytest.raises(ConfigError, match=message):
        SeedGroup(tuple(tasks(tmp_path / "s.db")))


def test_group_events_become_events_of_its_runs(tmp_path):
    tasks = [*_tasks(CNN, [0], tmp_path / "s.db"), *_tasks(MLP_A, [0, 1], tmp_path / "s.db")]
    plan = group_seeds(tasks)
    group = plan.items[1]
    start = RunEvent(1, "start", group.run_name, 0, 2)
    assert plan.expand(start) == [start]
    assert plan.expand(RunEvent(1, "epoch", group.run_name, 1, 2, 0.5))[0].index == 1
    assert plan.expand(RunEvent(0, "end", "x"))[0].index == 0
    runs = (RunResult(tasks[1], "finished", 7, 0.5), RunResult(tasks[2], "finished", 8, 0.7))
    ends = plan.expand(RunEvent(1, "end", group.run_name, result=GroupResult(group, "finished", runs=runs)))
    assert [(e.index, e.kind, e.name, e.result) for e in ends] == [
        (1, "end", tasks[1].run_name, runs[0]), (2, "end", tasks[2].run_name, runs[1])]
    died = plan.expand(RunEvent(1, "end", group.run_name, result=RunResult(group, "failed", error="Broken")))
    assert [(e.index, e.result.task, e.result.status, e.result.error) for e in died] == [
        (1, tasks[1], "failed", "Broken"), (2, tasks[2], "failed", "Broken")]


class _RemoteBackend:
    """A backend that is neither local one (Ray's place)."""

    workers = 1

    def run(self, tasks, notify):  # pragma: no cover - never reached
        raise AssertionError


def test_plan_runs_groups_where_it_helps(tmp_path):
    tasks = _tasks(MLP_A, [0, 1], tmp_path / "s.db")
    assert isinstance(plan_runs(tasks, vectorize=None, backend=None).items[0], SeedGroup)  # the pool
    assert plan_runs(tasks, vectorize=None, backend=InProcessBackend()).items == tasks
    assert isinstance(plan_runs(tasks, vectorize=True, backend=InProcessBackend()).items[0], SeedGroup)
    assert plan_runs(tasks, vectorize=None, backend=_RemoteBackend()).items == tasks
    with pytest.raises(ConfigError, match="vectorize=True needs the local backend; _RemoteBackend"):
        plan_runs(tasks, vectorize=True, backend=_RemoteBackend())
    with pytest.raises(ConfigError, match="vectorize='yes'; expected True, False or None"):
        plan_runs(tasks, vectorize="yes", backend=None)


# --- stopping and failing ------------------------------------------------------------------------


def test_a_stopped_group_marks_every_run_for_a_resume(tmp_path):
    train = TrainSettings(epochs=3, batch_size=512, every=2)
    group = SeedGroup(tuple(_tasks(_entry(MLP_A.model, train), [0, 1], tmp_path / "s.db")))
    epochs: list[tuple[int, float]] = []
    result = run_group(group, lambda e, acc: epochs.append((e, acc)), should_stop=lambda: len(epochs) >= 1)
    assert result.status == "stopped" and [r.status for r in result.runs] == ["stopped"] * 2
    assert [e for e, _ in epochs] == [1] and 0 <= epochs[0][1] <= 1
    with RunStore(tmp_path / "s.db") as store:
        runs = store.runs()
        assert list(runs["status"]) == ["failed"] * 2  # not finished: a resume runs them again
        assert all("stopped by the user" in e for e in runs["error"])
        assert store.scalars(int(runs["id"][0]))["test_acc"].dropna().size == 1
    assert run_group(group, should_stop=lambda: True).status == "stopped"


def test_a_failing_group_reports_every_run_and_never_raises(tmp_path):
    group = SeedGroup(tuple(_tasks(MLP_A, [0, 1], tmp_path / "s.db", dataset=str(tmp_path / "no.npz"))))
    result = run_task(group)  # the runner hands a group to run_group
    assert isinstance(result, GroupResult) and result.status == "failed" and "DataError" in result.error
    assert [(r.status, r.run_id) for r in result.runs] == [("failed", None)] * 2
    assert all("DataError" in r.error for r in result.runs)


# --- the lab ----------------------------------------------------------------------------------------


def test_run_lab_vectorizes_mlp_seeds_and_resumes_them(tmp_path):
    train = TrainSettings(epochs=1, batch_size=256, every=2)
    grid = (_entry(MLP_A.model, train, "a"), _entry(CNN.model, train, "cnn"))
    preset = Preset("vec", "an MLP and a CNN", grid, seeds=2)
    events: list[RunEvent] = []
    result = run_lab(preset, out=tmp_path, backend=InProcessBackend(), vectorize=True, notify=events.append)
    assert result.ran == 4 and not result.failed
    assert sorted(e.index for e in events if e.kind == "end") == [0, 1, 2, 3]
    assert [e.name for e in events if e.kind == "start"] == ["vec/t/a/seeds0,1", "vec/t/cnn/seed0",
                                                              "vec/t/cnn/seed1"]
    with RunStore(result.store) as store:
        runs = store.runs()
        flags = {(c["lab"]["config_key"], c["lab"]["seed"]): c["gradwatch"].get("vectorized", False)
                 for c in runs["config"]}
    assert flags == {("t/a", 0): True, ("t/a", 1): True, ("t/cnn", 0): False, ("t/cnn", 1): False}
    summary = {s.config_key: s for s in result.summaries}
    assert summary["t/a"].seeds == (0, 1) and all(0 <= a <= 1 for a in summary["t/a"].test_acc)
    again = run_lab(preset, out=tmp_path, backend=InProcessBackend(), vectorize=True)
    assert again.ran == 0 and again.resumed == 4  # the resume cannot tell vectorized runs apart
    assert [s.run_ids for s in again.summaries] == [s.run_ids for s in result.summaries]


def _mini_grid(tmp_path) -> str:
    grid = tmp_path / "g.json"
    grid.write_text(json.dumps({"name": "mini", "train": {"epochs": 1, "batch_size": 256, "every": 2},
                                "grid": [{"name": "tanh", "model": {"depth": 2, "width": 8,
                                                                     "activation": "tanh"}}]}))
    return str(grid)


@pytest.mark.integration
def test_cli_vectorizes_the_seeds_by_default(tmp_path):
    out = tmp_path / "lab"
    argv = ["lab", "--preset", _mini_grid(tmp_path), "--seeds", "2", "--workers", "1", "--out", str(out)]
    result = CliRunner().invoke(app, argv, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    with RunStore(out / "gradwatch.db") as store:
        runs = store.runs()
    assert list(runs["status"]) == ["finished"] * 2
    assert [c["gradwatch"].get("vectorized") for c in runs["config"]] == [True, True]


def test_cli_vectorize_with_ray_says_what_to_do(tmp_path):
    pytest.importorskip("ray")
    argv = ["lab", "--preset", _mini_grid(tmp_path), "--seeds", "2", "--backend", "ray", "--vectorize",
            "--out", str(tmp_path / "lab")]
    result = CliRunner().invoke(app, argv, env={"COLUMNS": "200"})
    assert result.exit_code == 1 and "Traceback" not in result.output
    text = result.output.replace("\n", " ")
    assert "vectorize=True needs the local backend; RayBackend runs one seed per task" in text
    assert "--no-vectorize" in text


# --- the stacked network's flat parameters ----------------------------------------------------------


def test_stacked_parameters_and_gradients_live_in_one_flat_tensor():
    """The optimizer steps ``net.flat``: every leaf's values and gradient must be views of it."""
    import torch

    from gradwatch.lab.models import build_model
    from gradwatch.lab.vectorized import StackedMLP, seed_losses

    config = ModelConfig(depth=3, width=16, activation="tanh", batch_norm=True)
    models = [build_model(config, (64,), 10, seed=s) for s in range(3)]
    net = StackedMLP(models)
    for name, leaf in net.params.items():  # the seeds' own values, stacked
        torch.testing.assert_close(leaf.detach(), torch.stack([dict(m.named_parameters())[name].detach()
                                                               for m in models]), rtol=0, atol=0)
    storage = net.flat.untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == storage for p in net.parameters())
    x, y = torch.randn(3, 32, 64), torch.randint(0, 10, (3, 32))
    optimizer = net.optimizer(ADAM)
    for _ in range(2):  # the second backward adds into the .grad views the first one filled
        net.zero_grad()
        seed_losses(net.forward(x, training=True), y).sum().backward()
        grads = [p.grad for p in net.parameters()]
        flat_grad = net.flat_grad.untyped_storage().data_ptr()
        assert all(g.untyped_storage().data_ptr() == flat_grad for g in grads)
        assert net.flat.grad is net.flat_grad and float(net.flat_grad.abs().sum()) > 0
        expected = torch.stack([torch.linalg.vector_norm(g.reshape(3, -1), dim=1) for g in grads], 1)
        torch.testing.assert_close(net.row_norms(net.flat_grad), expected, rtol=1e-6, atol=0)
        before = [p.detach().clone() for p in net.parameters()]
        optimizer.step()
        assert all(not torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True))
    net.zero_grad()
    assert all(float(p.grad.abs().sum()) == 0 for p in net.parameters())

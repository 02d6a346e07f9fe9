import torch
from conftest import mlp, train_steps
from torch import nn
from typer.testing import CliRunner

import gradwatch
from gradwatch.cli import app

runner = CliRunner()


def make_runs(path):
    torch.manual_seed(0)
    deep = mlp(depth=12, width=16, activation=nn.Sigmoid)
    opt = torch.optim.SGD(deep.parameters(), lr=0.1)
    with gradwatch.watch(deep, opt, every=1, store=path, run_name="<b>deep</b>") as w:
        train_steps(deep, opt, w, steps=2)
    return w.run_id


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"gradwatch {gradwatch.__version__}"


def test_help_everywhere():
    for args in (["--help"], ["runs", "--help"], ["show", "--help"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and "Usage" in result.output


def test_runs_and_show(store_path):
    run_id = make_runs(store_path)
    result = runner.invoke(app, ["runs", "--store", str(store_path)], env={"COLUMNS": "150"})
    assert result.exit_code == 0, result.output
    assert "<b>deep</b>" in result.output and "finished" in result.output

    result = runner.invoke(app, ["show", str(run_id), "--store", str(store_path)], env={"COLUMNS": "150"})
    assert result.exit_code == 0, result.output
    assert "step 1" in result.output and "hidden" not in result.output
    assert "receive a gradient over 1000x weaker than the last layer's" in result.output
    # by name too, and a chosen step
    result = runner.invoke(
        app, ["show", "<b>deep</b>", "--step", "0", "--store", str(store_path)], env={"COLUMNS": "150"}
    )
    assert result.exit_code == 0 and "step 0" in result.output


def test_cli_errors_are_one_line_without_traceback(store_path, tmp_path):
    make_runs(store_path)
    cases = [
        (["show", "77", "--store", str(store_path)], "no run '77'"),
        (["show", "1", "--step", "9", "--store", str(store_path)], "has no logged step 9"),
        (["runs", "--store", str(tmp_path / "none.db")], "no run store at"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 1
        assert message in result.output.replace("\n", " ")
        assert "Traceback" not in result.output


def test_empty_store(tmp_path):
    gradwatch.RunStore(tmp_path / "empty.db").close()
    result = runner.invoke(app, ["runs", "--store", str(tmp_path / "empty.db")])
    assert result.exit_code == 1 and "holds no runs yet" in result.output

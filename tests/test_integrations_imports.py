"""The core package imports no framework; each integration names its extra when one is missing."""

import importlib
import subprocess
import sys

import pytest

# (not pyarrow: pandas 3 imports it by itself whenever it is installed)
FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "accelerate", "tensorboard", "ray")


def test_core_and_cli_import_no_framework():
    code = (
        "import sys, gradwatch, gradwatch.cli, gradwatch.integrations.ddp, gradwatch.integrations.export, "
        "gradwatch.integrations.ray\n"
        f"print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("module", "hidden", "extra"),
    [pytest.param("gradwatch.integrations.lightning", ("lightning", "lightning.pytorch", "pytorch_lightning"),
                  "lightning", id="lightning"),
     pytest.param("gradwatch.integrations.transformers", ("transformers",), "hf", id="hf")],
)
def test_a_missing_framework_names_its_extra(monkeypatch, module, hidden, extra):
    for name in hidden:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=rf"pip install 'gradwatch\[{extra}\]'"):
        importlib.import_module(module)


@pytest.mark.parametrize(("fmt", "hidden", "extra"), [
    ("tensorboard", "torch.utils.tensorboard", "tensorboard"),
    ("parquet", "pyarrow", "parquet"),
])
def test_export_without_its_package_names_the_extra(monkeypatch, tmp_path, fmt, hidden, extra):
    import torch
    from conftest import mlp, train_steps

    from gradwatch import watch
    from gradwatch.errors import GradwatchError
    from gradwatch.integrations.export import export_run

    model = mlp(depth=2, width=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, optimizer, every=1, store=tmp_path / "runs.db") as watcher:
        train_steps(model, optimizer, watcher, steps=1)
    monkeypatch.setitem(sys.modules, hidden, None)
    with pytest.raises(GradwatchError, match=rf"pip install 'gradwatch\[{extra}\]'"):
        export_run(tmp_path / "runs.db", watcher.run_id, fmt, tmp_path / "out")


def test_ray_backend_without_ray_names_the_extra(monkeypatch):
    from gradwatch.errors import GradwatchError
    from gradwatch.integrations.ray import cli_backend

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(GradwatchError, match=r"pip install 'gradwatch\[ray\]'"):
        cli_backend("ray", None, None)

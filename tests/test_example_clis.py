"""User errors in the study CLIs (examples/*.py) are one stderr line and a non-zero exit."""
import importlib.util
import os

import pytest
import torch

from pyattn.models.cli import run_cli

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def _example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}",
                                                  os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BAD_FLAGS = [
    ("gcn", ["--epochs", "-3"]), ("gcn", ["--seeds", "0"]), ("gcn", ["--device", "nonsense"]),
    ("rotation", ["--batch-size", "0"]), ("rotation", ["--lr", "-1"]),
    ("rotation", ["--epochs", "-1"]), ("cnn_padding", ["--patience", "-1"]),
    ("cnn_padding", ["--repeats", "0"]), ("cnn_padding", ["--device", "nonsense"]),
]
if not torch.cuda.is_available():
    BAD_FLAGS += [(name, ["--device", "cuda"]) for name in ("gcn", "rotation", "cnn_padding")]


@pytest.mark.parametrize("name, argv", BAD_FLAGS, ids=[f"{n} {' '.join(a)}" for n, a in BAD_FLAGS])
def test_bad_flag_is_one_line_and_exit_2(name, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _example(name).main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: argument" in err, err


@pytest.mark.parametrize("name, argv, missing", [
    ("gcn", ["--data-dir", "/nonexistent", "--seeds", "1", "--epochs", "1"], "ind.cora.x"),
    ("rotation", ["--dataset", "cifar10", "--data-dir", "/nonexistent"], "data_batch_1"),
])
def test_missing_data_is_one_line_and_exit_1(name, argv, missing, capsys):
    assert run_cli(_example(name).main, argv, prog=name) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and missing in err and "Traceback" not in err, err

"""The reproduction report end to end (tiny setting) and the rotation study."""
import os
import pickle

import numpy as np
import pytest
import torch

from pyattn import reproduce
from pyattn.studies import rotation

from conftest import DATA_DIR as DATA, requires_data


@requires_data("text", "grimms_fairy_tales.txt")
@requires_data("planetoid", "ind.cora.x")
def test_report_tiny_end_to_end_on_the_shipped_data(tmp_path):
    path = reproduce.main(["--setting", "tiny", "--out", str(tmp_path)])
    report = open(path).read()
    for heading in ("## Q1.1", "## Q1.2", "## Q2 ", "## Q2.1 / Q2.9", "## Q3", "## Machine"):
        assert heading in report, heading
    for figure in ("q11_samples.png", "q12_rotation.png", "q29_attention.png"):
        assert os.path.getsize(tmp_path / figure) > 1000
    assert "[2, 4, 5]" in report  # the nodes that change most under L X
    assert "_Skipped" not in report
    assert "grimms_fairy_tales.txt" in report and "Node classification on cora" in report


def test_defaults_are_the_shipped_data():
    args = reproduce.build_parser().parse_args([])
    assert args.text == os.path.join(DATA, "text", "grimms_fairy_tales.txt")
    assert args.planetoid_dir == os.path.join(DATA, "planetoid")
    assert args.sections is None


def test_quick_setting_is_the_documented_q11_setting():
    quick = reproduce.SETTINGS["quick"]
    assert (quick.padding_repeats, quick.padding_epochs, quick.padding_batch) == (
        1, {"Net1": 10, "Net2": 2}, 50)
    full = reproduce.SETTINGS["full"]
    assert (full.padding_repeats, full.padding_epochs, full.padding_batch) == (
        10, {"Net1": 50, "Net2": 50}, 200)


def test_missing_text_skips_the_gpt_section(tmp_path):
    report = reproduce.Report(str(tmp_path))
    reproduce._section(report, "Q2 GPT", reproduce.q2_gpt, reproduce.SETTINGS["tiny"],
                       torch.device("cpu"), str(tmp_path / "none.txt"))
    assert "_Skipped: no training text" in report.parts[0]


def test_rotate_is_exact_for_right_angles():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    torch.testing.assert_close(rotation.rotate(x, 90.0, "nearest"), torch.rot90(x, 1, (2, 3)))
    torch.testing.assert_close(rotation.rotate(x, 360.0), x, atol=1e-4, rtol=0)
    per_image = rotation.rotate(x.expand(2, 1, 4, 4), torch.tensor([0.0, 180.0]), "nearest")
    torch.testing.assert_close(per_image[1, 0], x[0, 0].flip(0, 1))


def test_rotation_net_shapes_and_digits():
    data = rotation.load_digits_32()
    assert data.train[0].shape[1:] == (3, 32, 32) and len(data.test[1]) == 360
    assert rotation.RotationNet("circular")(data.test[0][:5]).shape == (5, 10)


def test_cifar_loader_reads_batches_and_refuses_other_pickles(tmp_path):
    batch = {b"data": np.random.randint(0, 255, (4, 3072), dtype=np.uint8),
             b"labels": [0, 1, 2, 3]}
    for name in rotation.CIFAR_TRAIN + [rotation.CIFAR_TEST]:
        with open(tmp_path / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    data = rotation.load_cifar10(str(tmp_path))
    assert data.train[0].shape == (20, 3, 32, 32) and data.test[1].tolist() == [0, 1, 2, 3]
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": os.system}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        rotation.load_cifar10(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing"):
        rotation.load_cifar10(str(tmp_path / "nowhere"))

"""The padding study (seed Q1.1) matches the original assignment: nets, data, training rule."""
import hashlib

import numpy as np
import pytest
import torch
import torch.nn as nn

from pyattn.studies import cnn_padding as study


def digest(array) -> str:
    """First 16 hex digits of the sha256 of the array as uint8, C order."""
    data = np.ascontiguousarray(np.asarray(array).astype(np.uint8))
    return hashlib.sha256(data.tobytes()).hexdigest()[:16]


def test_strides_and_final_feature_map():
    assert study.STRIDES == (1, 2, 2, 2)
    assert [study.feature_size(p) for p in (0, 1, 2)] == [2, 4, 6]
    x = torch.zeros(1, 3, 32, 32)
    for conv_type, (padding, _) in study.CONV_TYPES.items():
        net = study.PaddingNet("Net1", conv_type, nn.Conv2d)
        convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
        assert [c.stride for c in convs] == [(1, 1), (2, 2), (2, 2), (2, 2)]
        assert [c.padding for c in convs] == [(padding, padding)] * 4
        size = study.feature_size(padding)
        assert net.features(x).shape == (1, 64, size, size), conv_type


# Checksums of the original assignment's data sets (its own code, numpy legacy generator).
ORIGINAL_SETS = {
    "train images": ((2000, 3, 32, 32), "68e32fb16b97d49e"),
    "train labels": ((2000,), "632a36a6a467c7f0"),
    "test images": ((1000, 3, 32, 32), "5f45700c79f04439"),
    "test labels": ((1000,), "a397a563ae79e726"),
    "unshifted test images": ((1000, 3, 32, 32), "72be4b6a571a1652"),
}


def test_original_protocol_reproduces_the_originals_data_exactly():
    data = study.make_datasets("original")
    boxes, labels = study.make_boxes(1000)
    ours = {
        "train images": data.train[0], "train labels": data.train[1],
        "test images": data.test[0], "test labels": data.test[1],
        "unshifted test images": study.render(boxes, labels),
    }
    for name, (shape, expected) in ORIGINAL_SETS.items():
        assert tuple(ours[name].shape) == shape, name
        assert digest(ours[name]) == expected, name
    assert data.train[0].dtype == torch.float32 and data.train[1].dtype == torch.int64
    # validation = the first 1000 training images; test = those draws shifted
    torch.testing.assert_close(data.val[0], data.train[0][:1000], rtol=0, atol=0)
    assert digest(data.val[0]) == ORIGINAL_SETS["unshifted test images"][1]


def test_box_draws_follow_the_original_rule():
    boxes, labels = study.make_boxes(500)
    rows, cols = boxes[..., 0], boxes[..., 1]
    bands = np.array(study.BANDS)[labels][:, None]
    assert ((rows - bands >= -4) & (rows - bands < 4)).all()
    assert ((cols[:, 0] >= 0) & (cols[:, 0] < 10)).all()
    assert (cols[:, 1] - cols[:, 0] >= study.MIN_GAP).all() and (cols[:, 1] < 28).all()
    assert (labels == np.arange(500) % 2).all()


@pytest.mark.parametrize("name, wrong", [("JITTER", 5), ("FIRST_COLUMNS", 9), ("MIN_GAP", 4)])
def test_the_checksum_catches_a_wrong_draw(monkeypatch, name, wrong):
    monkeypatch.setattr(study, name, wrong)
    boxes, labels = study.make_boxes(2000)
    assert digest(study.render(boxes, labels)) != ORIGINAL_SETS["train images"][1]


def test_fresh_protocol_draws_independent_val_and_test():
    data = study.make_datasets("fresh", 40, 20, 20)
    assert not torch.equal(data.val[0], data.train[0][:20])
    with pytest.raises(ValueError, match="val protocol"):
        study.make_datasets("other")


@pytest.mark.parametrize("net", study.NETS)
@pytest.mark.parametrize("conv_type", ["valid", "sconv", "reflect"])
def test_a_seed_gives_the_originals_initial_weights(net, conv_type):
    """Rebuilt independently in the original's creation order: conv1..conv4,
    Linear(64, 2), then (Net2) Linear(64*s*s, 64)."""
    padding, mode = study.CONV_TYPES[conv_type]
    size = study.feature_size(padding)
    torch.manual_seed(3)
    expected = [nn.Conv2d(i, o, 3, stride=s, padding=padding, padding_mode=mode, bias=False)
                for i, o, s in ((3, 32, 1), (32, 32, 2), (32, 64, 2), (64, 64, 2))]
    expected.append(nn.Linear(64, 2))
    if net == "Net2":
        expected.append(nn.Linear(64 * size * size, 64))
    expected = [p for m in expected for p in m.parameters()]
    torch.manual_seed(3)
    ours = study.PaddingNet(net, conv_type)
    ours = ([p for m in ours.features if isinstance(m, nn.Conv2d) for p in m.parameters()]
            + list(ours.classifier.parameters())
            + (list(ours.hidden.parameters()) if net == "Net2" else []))
    assert len(ours) == len(expected) == len(list(study.PaddingNet(net, conv_type).parameters()))
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_net2_has_no_nonlinearity_between_its_linear_layers():
    net = study.PaddingNet("Net2", "valid", nn.Conv2d)
    x = torch.randn(3, 3, 32, 32)
    features = net.features(x).flatten(1)
    torch.testing.assert_close(net(x), net.classifier(net.hidden(features)))


def scripted_training(monkeypatch, val_losses, epochs=50):
    """Run train_one on a tiny set with validation (loss, accuracy) scripted per epoch."""
    calls = []

    def fake_evaluate(model, data, batch_size, device):
        if data is tiny.test:
            return 0.0, -1.0
        epoch = len(calls)
        calls.append(epoch)
        return val_losses[epoch], 100.0 + epoch  # the accuracy names its epoch

    tiny = study.make_datasets("original", 2, 2, 2)
    monkeypatch.setattr(study, "evaluate", fake_evaluate)
    config = study.TrainConfig(epochs=epochs, batch_size=2)
    return study.train_one("Net1", "valid", tiny, 0, config, torch.device("cpu"), "torch")


def test_training_stops_on_the_ninth_consecutive_epoch_without_a_lower_val_loss(monkeypatch):
    # epochs 1-3 improve (3 ties with a later value, ties are misses), then 9 misses
    losses = [1.0, 0.5, 0.4] + [0.4, 0.6, 0.45, 0.4, 0.9, 0.41, 0.5, 0.7, 0.4] + [0.1] * 10
    result = scripted_training(monkeypatch, losses)
    assert result.epochs == 12 and result.best_epoch == 3
    assert result.val_accuracy == 100.0 + 11  # the last epoch's, as the original reports


def test_an_improvement_resets_the_count(monkeypatch):
    losses = [1.0] + [2.0] * 8 + [0.5] + [2.0] * 9 + [0.1] * 10
    result = scripted_training(monkeypatch, losses)
    assert (result.epochs, result.best_epoch) == (19, 10)
    result = scripted_training(monkeypatch, [1.0 - 0.01 * i for i in range(60)], epochs=5)
    assert (result.epochs, result.best_epoch, result.val_accuracy) == (5, 5, 104.0)


def test_val_loss_is_the_originals_sum_of_batch_means_over_images():
    net = study.PaddingNet("Net1", "valid", nn.Conv2d)
    data = study.make_datasets("original", 8, 8, 8).val
    loss, accuracy = study.evaluate(net, data, 4, torch.device("cpu"))
    with torch.no_grad():
        batch_means = [nn.functional.cross_entropy(net(data[0][i:i + 4]), data[1][i:i + 4])
                       for i in (0, 4)]
    assert loss == pytest.approx(sum(m.item() for m in batch_means) / 8, rel=1e-6)
    assert accuracy in {12.5 * k for k in range(9)}


def test_population_std_and_cell_time():
    runs = [study.RunResult(100.0, t, 5, 3, 2.0) for t in (0.0, 10.0)]
    row = study.StudyRow("Net1", "valid", runs)
    assert row.stats() == (100.0, 0.0, 5.0, 5.0)
    assert row.seconds == 4.0
    assert "5.00 ± 5.00" in study.markdown_table([row])

"""Seed Q1.1: how padding and pooling decide whether a CNN generalises to shifted objects.

The data follow the original protocol: 3x32x32 images holding two 4x4 unit
boxes, red (channel 0) and green (channel 1). Class 0: red left of green, near
row 7; class 1: green left of red, near row 23. The test set holds the same
draws with class-0 boxes moved down 16 rows and class-1 boxes up 16 rows, so a
net must recognise the left/right order wherever it appears.

Nets: four bias-free 3x3 convs 3->32, 32->32, 32->64, 64->64 (stride 2), ReLU
after each, then Net1 = global max pool + Linear(64, 2), or Net2 = flatten +
Linear(64*s*s, 64) + Linear(64, 2). The conv type sets padding size and mode.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pyattn.nn import PaddedConv2d

IMAGE_SIZE = 32
BOX = 4
BANDS = (7, 23)             # the row each class's boxes sit near
JITTER = (IMAGE_SIZE - BOX) // 6  # rows drawn from randint(-4, 4), half-open as numpy's
TEST_SHIFT = 16
MIN_GAP = 5

# padding size and padding mode of each conv type of the seed
CONV_TYPES = {
    "valid": (0, "zeros"),
    "replicate": (2, "replicate"),
    "reflect": (2, "reflect"),
    "circular": (2, "circular"),
    "sconv": (1, "zeros"),
    "fconv": (2, "zeros"),
}
NETS = ("Net1", "Net2")

# The seed's reported (val mean, val std, test mean, test std), in percent.
SEED_RESULTS = {
    "Net1": {"valid": (100.0, 0.0, 0.09, 0.1136), "replicate": (98.31, 0.4784, 93.80, 2.1629),
             "reflect": (100.0, 0.0, 0.0, 0.0), "circular": (99.64, 0.2939, 82.61, 2.7504),
             "sconv": (98.89, 0.2119, 6.37, 0.2326), "fconv": (88.07, 1.1984, 88.85, 0.6249)},
    "Net2": {name: (100.0, 0.0, 0.0, 0.0) for name in CONV_TYPES},
}


def make_boxes(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Box positions of `count` samples: (count, 2, 2) [box, (row, col)] and labels.

    Box 0 is the left one. Samples alternate class 0, 1, 0, ...; one
    ``np.random.RandomState(seed)`` draws, per sample: first row, first column
    in [0, 10), then second (row, column in [first, 28)) until the columns
    differ by at least 5.
    """
    rng = np.random.RandomState(seed)
    boxes = np.zeros((count, 2, 2), dtype=np.int64)
    labels = np.arange(count) % 2
    for i, label in enumerate(labels):
        band = BANDS[label]
        row1 = band + rng.randint(-JITTER, JITTER)
        col1 = rng.randint(0, 10)
        while True:
            row2 = band + rng.randint(-JITTER, JITTER)
            col2 = rng.randint(col1, IMAGE_SIZE - BOX)
            if abs(col2 - col1) >= MIN_GAP:
                break
        boxes[i] = [[row1, col1], [row2, col2]]
    return boxes, labels


def render(boxes: np.ndarray, labels: np.ndarray, shift_rows: bool = False) -> torch.Tensor:
    """Images (N, 3, 32, 32): left box red for class 0, green for class 1.

    ``shift_rows`` moves class-0 boxes down and class-1 boxes up by 16 rows (test set).
    """
    images = torch.zeros(len(labels), 3, IMAGE_SIZE, IMAGE_SIZE)
    for i, label in enumerate(labels):
        left, right = (0, 1) if label == 0 else (1, 0)  # channel of the left / right box
        shift = (TEST_SHIFT if label == 0 else -TEST_SHIFT) if shift_rows else 0
        for channel, (row, col) in zip((left, right), boxes[i]):
            images[i, channel, row + shift:row + shift + BOX, col:col + BOX] = 1.0
    return images


@dataclasses.dataclass
class Datasets:
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    protocol: str

    def note(self) -> str:
        if self.protocol == "original":
            n_val = len(self.val[1])
            return ("val protocol 'original': as in the seed, every set reseeds the generator "
                    f"with 42, so the validation images are the first {n_val} training images "
                    "and the test images are those same draws shifted")
        return "val protocol 'fresh': validation and test are independent draws (seeds 43, 44)"


def make_datasets(protocol: str = "original", n_train: int = 2000, n_val: int = 1000,
                  n_test: int = 1000) -> Datasets:
    """Train / val / test sets of the seed (``original``) or independent ones (``fresh``)."""
    if protocol not in ("original", "fresh"):
        raise ValueError(f"val protocol must be 'original' or 'fresh', got {protocol!r}")
    seeds = (42, 42, 42) if protocol == "original" else (42, 43, 44)
    sets = []
    for (count, seed, shifted) in zip((n_train, n_val, n_test), seeds, (False, False, True)):
        boxes, labels = make_boxes(count, seed)
        sets.append((render(boxes, labels, shifted), torch.from_numpy(labels)))
    return Datasets(*sets, protocol=protocol)


ConvFactory = Callable[..., nn.Module]


def conv_factory(impl: str) -> ConvFactory:
    if impl == "pyattn":
        return PaddedConv2d
    if impl == "torch":
        return nn.Conv2d
    raise ValueError(f"impl must be 'pyattn' or 'torch', got {impl!r}")


def feature_size(padding: int) -> int:
    """Spatial size s after the four convs (three stride 1, one stride 2)."""
    size = IMAGE_SIZE
    for stride in (1, 1, 1, 2):
        size = (size + 2 * padding - 3) // stride + 1
    return size


class PaddingNet(nn.Module):
    """The seed's Net1 (``pool=True``: global max pool) or Net2 (flatten)."""

    def __init__(self, net: str, conv_type: str, conv: ConvFactory = PaddedConv2d):
        super().__init__()
        if net not in NETS:
            raise ValueError(f"net must be one of {NETS}, got {net!r}")
        if conv_type not in CONV_TYPES:
            raise ValueError(f"conv type must be one of {tuple(CONV_TYPES)}, got {conv_type!r}")
        padding, mode = CONV_TYPES[conv_type]
        layers = []
        for c_in, c_out, stride in ((3, 32, 1), (32, 32, 1), (32, 64, 1), (64, 64, 2)):
            layers += [conv(c_in, c_out, 3, stride=stride, padding=padding, bias=False,
                            padding_mode=mode), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        if net == "Net1":
            self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, 2))
        else:
            size = feature_size(padding)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * size * size, 64),
                                      nn.Linear(64, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 50
    patience: int = 8
    batch_size: int = 200
    lr: float = 1.0
    rho: float = 0.9
    eps: float = 1e-6
    weight_decay: float = 5e-5


@torch.no_grad()
def evaluate(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], batch_size: int,
             device: torch.device) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in percent)."""
    model.eval()
    images, labels = data
    loss = correct = 0.0
    for start in range(0, len(labels), batch_size):
        x = images[start:start + batch_size].to(device)
        y = labels[start:start + batch_size].to(device)
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    return loss / len(labels), 100.0 * correct / len(labels)


@dataclasses.dataclass
class RunResult:
    val_accuracy: float    # last trained epoch's, as the seed reports it
    test_accuracy: float   # of the checkpoint with the best validation loss
    epochs: int
    best_epoch: int


def train_one(net: str, conv_type: str, data: Datasets, seed: int, config: TrainConfig,
              device: torch.device, impl: str = "pyattn",
              on_epoch: Optional[Callable[[int, float, float], None]] = None) -> RunResult:
    """Train one net as the seed does: Adadelta, no shuffling, early stopping on val loss."""
    torch.manual_seed(seed)
    model = PaddingNet(net, conv_type, conv_factory(impl)).to(device)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=config.lr, rho=config.rho,
                                     eps=config.eps, weight_decay=config.weight_decay)
    images, labels = data.train
    best_loss, best_state, best_epoch, stale = float("inf"), None, 0, 0
    val_accuracy, epoch = 0.0, 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        for start in range(0, len(labels), config.batch_size):
            x = images[start:start + config.batch_size].to(device)
            y = labels[start:start + config.batch_size].to(device)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        val_loss, val_accuracy = evaluate(model, data.val, config.batch_size, device)
        if on_epoch is not None:
            on_epoch(epoch, val_loss, val_accuracy)
        if val_loss < best_loss:
            best_loss, best_epoch, stale = val_loss, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= config.patience:
                break
    model.load_state_dict(best_state)
    _, test_accuracy = evaluate(model, data.test, config.batch_size, device)
    return RunResult(val_accuracy, test_accuracy, epoch, best_epoch)


@dataclasses.dataclass
class StudyRow:
    net: str
    conv_type: str
    runs: list[RunResult]

    def stats(self) -> tuple[float, float, float, float]:
        """(val mean, val std, test mean, test std), population std as the seed."""
        val = np.array([r.val_accuracy for r in self.runs])
        test = np.array([r.test_accuracy for r in self.runs])
        return float(val.mean()), float(val.std()), float(test.mean()), float(test.std())


def run_study(configs: Iterable[tuple[str, str]], repeats: int, config: TrainConfig,
              device: torch.device, impl: str = "pyattn", protocol: str = "original",
              progress: bool = True) -> tuple[list[StudyRow], Datasets]:
    """Train every (net, conv type) `repeats` times (repeat r: weights seeded r)."""
    from tqdm.auto import tqdm

    configs = list(configs)
    data = make_datasets(protocol)
    rows = []
    bar = tqdm(total=len(configs) * repeats, desc="cnn padding", unit="run", disable=not progress)
    for net, conv_type in configs:
        runs = []
        for repeat in range(repeats):
            bar.set_postfix_str(f"{net} {conv_type} repeat {repeat}")

            def show(epoch, loss, acc):
                bar.set_postfix_str(f"{net} {conv_type} r{repeat} ep{epoch} val {acc:.1f}%")

            runs.append(train_one(net, conv_type, data, repeat, config, device, impl, show))
            bar.update()
        rows.append(StudyRow(net, conv_type, runs))
    bar.close()
    return rows, data


def format_row(row: StudyRow) -> str:
    """One conv type's block in the seed's printed format."""
    val = {i: round(r.val_accuracy, 2) for i, r in enumerate(row.runs)}
    test = {i: round(r.test_accuracy, 2) for i, r in enumerate(row.runs)}
    val_mean, val_std, test_mean, test_std = row.stats()
    return "\n".join([
        "*******************************************",
        f" Type of convolution :  {row.conv_type}",
        f" Type of network :  {row.net}",
        "*******************************************",
        f"Results for validation dataset {val}",
        f"mean: {val_mean:.4f} std: {val_std:.4f} for validation",
        f"Results for test dataset {test}",
        f"mean: {test_mean:.4f} std: {test_std:.4f} for test",
    ])


def markdown_table(rows: list[StudyRow], with_seed: bool = True) -> str:
    """The seed's table, per net, with the seed's numbers beside ours."""
    header = "| net | convolution type | val mean | val std | test mean | test std |"
    rule = "| --- | --- | --- | --- | --- | --- |"
    if with_seed:
        header += " seed val mean | seed test mean (std) |"
        rule += " --- | --- |"
    lines = [header, rule]
    for row in rows:
        vm, vs, tm, ts = row.stats()
        line = f"| {row.net} | {row.conv_type} | {vm:.2f} | {vs:.2f} | {tm:.2f} | {ts:.2f} |"
        if with_seed:
            svm, _, stm, sts = SEED_RESULTS[row.net][row.conv_type]
            line += f" {svm:.2f} | {stm:.2f} ({sts:.2f}) |"
        lines.append(line)
    return "\n".join(lines)

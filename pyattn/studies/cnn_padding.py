"""Seed Q1.1: how padding and pooling decide whether a CNN generalises to shifted objects.

The data follow the original assignment exactly (pinned by checksums in
tests/test_cnn_padding.py): 3x32x32 images holding two 4x4 unit boxes, red
(channel 0) and green (channel 1). Class 0: red left of green, near row 7;
class 1: green left of red, near row 23. The test set holds the same draws with
class-0 boxes moved down 16 rows and class-1 boxes up 16 rows, so a net must
recognise the left/right order wherever it appears.

Nets: four bias-free 3x3 convs 3->32 (stride 1), 32->32, 32->64, 64->64
(stride 2 each), ReLU after each, then Net1 = global max pool + Linear(64, 2),
or Net2 = flatten + Linear(64*s*s, 64) + Linear(64, 2) (no ReLU between), with
s = 2 / 4 / 6 for padding 0 / 1 / 2. The conv type sets padding size and mode.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Callable, Iterable, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pyattn.nn import PaddedConv2d

IMAGE_SIZE = 32
BOX = 4
SPAN = IMAGE_SIZE - BOX     # 28: the last column a box may start at (exclusive)
BANDS = (7, 23)             # the row each class's boxes sit near
# The original draws rows from randint(-28/6, 28/6); numpy truncates the float
# bounds to randint(-4, 4), i.e. -4..3.
JITTER = SPAN // 6
FIRST_COLUMNS = SPAN // 2 - BOX  # 10: the first box's column is randint(0, 10)
TEST_SHIFT = 16
MIN_GAP = 5
DATA_SEED = 42
STRIDES = (1, 2, 2, 2)
CHANNELS = (3, 32, 32, 64, 64)

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


def make_boxes(count: int, seed: int = DATA_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Box positions of `count` samples: (count, 2, 2) [box, (row, col)] and labels (count,).

    Box 0 is the left one. Samples alternate class 0, 1, 0, ...; one
    ``np.random.RandomState(seed)`` draws, per sample and in this order (as the
    original): first column in [0, 10), first row band + [-4, 4), second column
    in [first, 28), second row band + [-4, 4), the last two redrawn together
    until the columns differ by at least 5.
    """
    rng = np.random.RandomState(seed)
    boxes = np.zeros((count, 2, 2), dtype=np.int64)
    labels = np.arange(count) % 2
    for i, label in enumerate(labels):
        band = BANDS[label]
        col1 = rng.randint(0, FIRST_COLUMNS)
        row1 = band + rng.randint(-JITTER, JITTER)
        col2 = rng.randint(col1, SPAN)
        row2 = band + rng.randint(-JITTER, JITTER)
        while abs(col1 - col2) < MIN_GAP:
            col2 = rng.randint(col1, SPAN)
            row2 = band + rng.randint(-JITTER, JITTER)
        boxes[i] = [[row1, col1], [row2, col2]]
    return boxes, labels


def render(boxes: np.ndarray, labels: np.ndarray, shift_rows: bool = False) -> torch.Tensor:
    """Float32 images (N, 3, 32, 32): left box red for class 0, green for class 1.

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
    train: tuple[torch.Tensor, torch.Tensor]   # (images float32, labels int64)
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]    # shifted boxes
    protocol: str

    def note(self) -> str:
        if self.protocol == "original":
            n_val = len(self.val[1])
            return ("val protocol 'original': as in the seed, every set reseeds numpy's generator "
                    f"with 42, so the validation images are the first {n_val} training images "
                    "and the test images are those same draws shifted")
        return "val protocol 'fresh': validation and test are independent draws (seeds 43, 44)"


VAL_PROTOCOLS = ("original", "fresh")


def make_datasets(protocol: str = "original", n_train: int = 2000, n_val: int = 1000,
                  n_test: int = 1000) -> Datasets:
    """Train / val / test sets.

    ``original`` (the seed's): every set is drawn by ``make_boxes(count, 42)``,
    so val is the first ``n_val`` training images and test the first
    ``n_test`` ones shifted. ``fresh`` (ours, for an honest validation score):
    val and test are drawn with seeds 43 and 44.
    """
    if protocol not in VAL_PROTOCOLS:
        raise ValueError(f"val protocol must be one of {VAL_PROTOCOLS}, got {protocol!r}")
    seeds = (DATA_SEED,) * 3 if protocol == "original" else (DATA_SEED, 43, 44)
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
    """Spatial size s of the final feature map: 3x3 convs with strides (1, 2, 2, 2) on 32x32.

    size -> (size + 2 * padding - 3) // stride + 1 per conv: 2 / 4 / 6 for padding 0 / 1 / 2.
    """
    size = IMAGE_SIZE
    for stride in STRIDES:
        size = (size + 2 * padding - 3) // stride + 1
    return size


class PaddingNet(nn.Module):
    """The seed's Net1 (global max pool) or Net2 (flatten), on one conv type.

    Modules are created in the original's order -- conv1..conv4, the 64 -> 2
    classifier, then (Net2 only) the 64*s*s -> 64 hidden layer -- so that
    ``torch.manual_seed(r)`` before construction gives the original's initial
    weights for repeat r.
    """

    def __init__(self, net: str, conv_type: str, conv: ConvFactory = PaddedConv2d):
        super().__init__()
        if net not in NETS:
            raise ValueError(f"net must be one of {NETS}, got {net!r}")
        if conv_type not in CONV_TYPES:
            raise ValueError(f"conv type must be one of {tuple(CONV_TYPES)}, got {conv_type!r}")
        padding, mode = CONV_TYPES[conv_type]
        layers = []
        for c_in, c_out, stride in zip(CHANNELS[:-1], CHANNELS[1:], STRIDES):
            layers += [conv(c_in, c_out, 3, stride=stride, padding=padding, bias=False,
                            padding_mode=mode), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(CHANNELS[-1], 2)
        self.pool = net == "Net1"
        if not self.pool:
            size = feature_size(padding)
            self.hidden = nn.Linear(CHANNELS[-1] * size * size, CHANNELS[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if self.pool:
            x = F.adaptive_max_pool2d(x, 1).flatten(1)
        else:
            x = self.hidden(x.flatten(1))
        return self.classifier(x)


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 50
    patience: int = 8
    batch_size: int = 200
    lr: float = 1.0
    rho: float = 0.9
    eps: float = 1e-6
    weight_decay: float = 5e-5


class EarlyStopping:
    """The original's rule. ``best`` starts at 50.0; an epoch whose val loss is
    below ``best`` is an improvement (checkpoint, count reset); otherwise the
    count of misses rises up to ``patience``, and a miss with the count already
    at ``patience`` stops training: the (patience + 1)-th consecutive miss."""

    def __init__(self, patience: int, initial_best: float = 50.0):
        self.patience, self.best, self.misses = patience, initial_best, 0

    def update(self, val_loss: float) -> tuple[bool, bool]:
        """(improved, stop) after an epoch with ``val_loss``."""
        if val_loss < self.best:
            self.best, self.misses = val_loss, 0
            return True, False
        if self.misses < self.patience:
            self.misses += 1
            return False, False
        return False, True


@torch.no_grad()
def evaluate(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], batch_size: int,
             device: torch.device) -> tuple[float, float]:
    """(loss, accuracy in percent), the loss as the original computes it.

    loss = (sum over batches of the batch-mean cross-entropy) / number of
    images: the mean cross-entropy divided by the batch size when batches are
    equal, so it orders epochs as the mean does.
    """
    model.eval()
    images, labels = data
    loss = correct = 0.0
    for start in range(0, len(labels), batch_size):
        x = images[start:start + batch_size].to(device)
        y = labels[start:start + batch_size].to(device)
        logits = model(x)
        loss += F.cross_entropy(logits, y).item()
        correct += (logits.argmax(1) == y).sum().item()
    return loss / len(labels), 100.0 * correct / len(labels)


@dataclasses.dataclass
class RunResult:
    val_accuracy: float    # of the last epoch trained, as the seed reports it
    test_accuracy: float   # of the checkpoint with the best validation loss
    epochs: int
    best_epoch: int
    seconds: float = 0.0   # wall time of training and testing
    cpu_seconds: float = 0.0   # CPU time of this process over the same span (all threads)


def train_one(net: str, conv_type: str, data: Datasets, seed: int, config: TrainConfig,
              device: torch.device, impl: str = "pyattn",
              on_epoch: Optional[Callable[[int, float, float], None]] = None) -> RunResult:
    """Train one net as the original: ``torch.manual_seed(seed)``, then the net;
    Adadelta; batches in order (no shuffling); validation after every epoch;
    early stopping (:class:`EarlyStopping`); test on the best-val-loss checkpoint."""
    start_time, start_cpu = time.perf_counter(), time.process_time()
    torch.manual_seed(seed)
    model = PaddingNet(net, conv_type, conv_factory(impl)).to(device)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=config.lr, rho=config.rho,
                                     eps=config.eps, weight_decay=config.weight_decay)
    images, labels = data.train
    stopping = EarlyStopping(config.patience)
    best_state, best_epoch, val_accuracy, epoch = None, 0, 0.0, 0
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
        improved, stop = stopping.update(val_loss)
        if improved:
            best_state, best_epoch = copy.deepcopy(model.state_dict()), epoch
        if stop:
            break
    if best_state is None:
        raise RuntimeError(f"{net} {conv_type} seed {seed}: no epoch reached a validation "
                           f"loss below {stopping.best} (diverged?)")
    model.load_state_dict(best_state)
    _, test_accuracy = evaluate(model, data.test, config.batch_size, device)
    return RunResult(val_accuracy, test_accuracy, epoch, best_epoch,
                     time.perf_counter() - start_time, time.process_time() - start_cpu)


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

    @property
    def seconds(self) -> float:
        """Wall time of the whole cell (all repeats)."""
        return sum(r.seconds for r in self.runs)


# One config for every net, or one per net name (e.g. fewer epochs for Net2).
Configs = Union[TrainConfig, dict]


def run_study(configs: Iterable[tuple[str, str]], repeats: int, config: Configs,
              device: torch.device, impl: str = "pyattn", protocol: str = "original",
              progress: bool = True, data: Optional[Datasets] = None, first_seed: int = 0
              ) -> tuple[list[StudyRow], Datasets]:
    """Train every (net, conv type) `repeats` times (repeat r: weights seeded first_seed + r).

    ``config`` is a :class:`TrainConfig` or a dict net name -> TrainConfig;
    ``data`` defaults to ``make_datasets(protocol)``.
    """
    from tqdm.auto import tqdm

    configs = list(configs)
    data = data if data is not None else make_datasets(protocol)
    rows = []
    bar = tqdm(total=len(configs) * repeats, desc="cnn padding", unit="run", disable=not progress)
    for net, conv_type in configs:
        net_config = config[net] if isinstance(config, dict) else config
        runs = []
        for repeat in range(repeats):
            bar.set_postfix_str(f"{net} {conv_type} repeat {repeat}")

            def show(epoch, loss, acc):
                bar.set_postfix_str(f"{net} {conv_type} r{repeat} ep{epoch} val {acc:.1f}%")

            runs.append(train_one(net, conv_type, data, first_seed + repeat, net_config, device,
                                  impl, show))
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
        f"epochs run {[r.epochs for r in row.runs]}, best epochs "
        f"{[r.best_epoch for r in row.runs]}, wall time {row.seconds:.1f} s",
    ])


def markdown_table(rows: list[StudyRow], with_seed: bool = True) -> str:
    """One line per (net, conv type): val and test mean ± std (%), epochs run,
    wall time of the cell; with the seed's numbers beside ours."""
    header = "| net | convolution type | val | test | epochs run | wall time |"
    rule = "| --- | --- | --- | --- | --- | --- |"
    if with_seed:
        header += " seed val | seed test |"
        rule += " --- | --- |"
    lines = [header, rule]
    for row in rows:
        vm, vs, tm, ts = row.stats()
        epochs = "/".join(str(r.epochs) for r in row.runs)
        line = (f"| {row.net} | {row.conv_type} | {vm:.2f} ± {vs:.2f} | {tm:.2f} ± {ts:.2f} "
                f"| {epochs} | {row.seconds:.0f} s |")
        if with_seed:
            svm, svs, stm, sts = SEED_RESULTS[row.net][row.conv_type]
            line += f" {svm:.2f} ± {svs:.2f} | {stm:.2f} ± {sts:.2f} |"
        lines.append(line)
    return "\n".join(lines)

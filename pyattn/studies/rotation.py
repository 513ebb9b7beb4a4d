"""Seed Q1.2: are CNNs rotation invariant? Train a small CNN on upright images
and with random rotations, then test both on the test set rotated by 0..360°.

Rotation is an affine grid sample about the image centre with zero fill
(nearest or bilinear), in torch, on any device. Data: CIFAR-10 from the
standard python batches, or (built in) scikit-learn's 8x8 digits resized to
32x32, so the study runs with no files in a few minutes on two CPU cores.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import pickle
import tarfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pyattn.datasets import NUMPY_RECONSTRUCT, download
from pyattn.nn import PaddedConv2d

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = "test_batch"


def rotate(images: torch.Tensor, degrees: torch.Tensor | float, mode: str = "bilinear") -> torch.Tensor:
    """Rotate (N, C, H, W) images counter-clockwise (as displayed, like
    torch.rot90) by `degrees` (a float or one per image) about the centre;
    pixels from outside the image are zero."""
    n = images.shape[0]
    angle = torch.as_tensor(degrees, dtype=torch.float32, device=images.device)
    angle = angle.expand(n) * (math.pi / 180.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(cos)
    # grid_sample maps each output pixel (x right, y down) to the input pixel it
    # reads; this map turns the picture counter-clockwise as displayed (torch.rot90)
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid.to(images.dtype), mode=mode, padding_mode="zeros",
                         align_corners=False)


class RotationNet(nn.Module):
    """conv 3->32, 32->64, 64->64 (3x3, padding 1), each ReLU + 2x2 max pool,
    then Linear(64*4*4, 64), ReLU, Linear(64, 10); convs are PaddedConv2d."""

    def __init__(self, padding_mode: str = "zeros", classes: int = 10):
        super().__init__()
        layers = []
        for c_in, c_out in ((3, 32), (32, 64), (64, 64)):
            layers += [PaddedConv2d(c_in, c_out, 3, padding=1, padding_mode=padding_mode),
                       nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.ReLU(),
                                  nn.Linear(64, classes))

    def forward(self, x):
        return self.head(self.features(x))


@dataclasses.dataclass
class ImageData:
    name: str
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]


class _CifarUnpickler(pickle.Unpickler):
    """Only what CIFAR-10 batches hold: numpy arrays in a dict of lists."""

    def find_class(self, module, name):
        import codecs

        allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                   # bytes in protocol-2 pickles written by Python 3 (text -> bytes only)
                   ("_codecs", "encode"): codecs.encode,
                   ("numpy.core.multiarray", "_reconstruct"): NUMPY_RECONSTRUCT,
                   ("numpy._core.multiarray", "_reconstruct"): NUMPY_RECONSTRUCT}
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: not in a "
                                         "CIFAR-10 batch")
        return allowed[(module, name)]


def _load_cifar_batch(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    with open(path, "rb") as f:
        batch = _CifarUnpickler(f, encoding="bytes").load()
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return torch.from_numpy(data.astype(np.float32) / 255.0), torch.tensor(batch[b"labels"])


def download_cifar10(root: str) -> None:
    """Download CIFAR-10's python batches into `root`, checking the archive's MD5
    (a failed or corrupt download leaves no archive behind: :func:`pyattn.datasets.download`)."""
    os.makedirs(root, exist_ok=True)
    archive = os.path.join(root, "cifar-10-python.tar.gz")
    if not os.path.exists(archive):
        download(CIFAR_URL, archive, md5=CIFAR_MD5)
    with open(archive, "rb") as f:
        digest = hashlib.md5(f.read()).hexdigest()
    if digest != CIFAR_MD5:
        raise ValueError(f"{archive}: MD5 {digest} != {CIFAR_MD5}; delete it and retry")
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = os.path.basename(member.name)
            if name in CIFAR_TRAIN + [CIFAR_TEST] and member.isfile():
                with open(os.path.join(root, name), "wb") as out:
                    out.write(tar.extractfile(member).read())


def load_cifar10(root: str, download: bool = False) -> ImageData:
    """CIFAR-10 from `root` holding data_batch_1..5 and test_batch (python batches)."""
    paths = [os.path.join(root, n) for n in CIFAR_TRAIN + [CIFAR_TEST]]
    if download and not all(os.path.exists(p) for p in paths):
        download_cifar10(root)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"CIFAR-10: missing {', '.join(missing)} (the python version's "
                                "batches; pass --download to fetch them)")
    train = [_load_cifar_batch(p) for p in paths[:5]]
    test = _load_cifar_batch(paths[5])
    return ImageData("cifar10", (torch.cat([t[0] for t in train]), torch.cat([t[1] for t in train])),
                     test)


def load_digits_32(test_fraction: float = 0.2) -> ImageData:
    """scikit-learn's 8x8 digits (1797 images, shipped with the package), resized
    to 32x32 and repeated over 3 channels; a fixed 80 / 20 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    images = images.expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    cut = int(len(labels) * (1 - test_fraction))
    return ImageData("digits", (images[order[:cut]], labels[order[:cut]]),
                     (images[order[cut:]], labels[order[cut:]]))


@dataclasses.dataclass
class RotationConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    interpolation: str = "bilinear"
    angles: tuple = tuple(range(0, 361, 30))


def train_model(data: ImageData, augment: bool, config: RotationConfig, device,
                padding_mode: str = "zeros", seed: int = 0, progress=None) -> RotationNet:
    """Adam on the training set; with `augment`, each image is rotated by a random
    angle in [0, 360) every time it is seen."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = RotationNet(padding_mode).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    images, labels = data.train
    for _ in range(config.epochs):
        model.train()
        order = torch.randperm(len(labels), generator=gen)
        for start in range(0, len(labels), config.batch_size):
            idx = order[start:start + config.batch_size]
            x, y = images[idx].to(device), labels[idx].to(device)
            if augment:
                x = rotate(x, torch.rand(len(idx), generator=gen).to(device) * 360.0,
                           config.interpolation)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        if progress is not None:
            progress()
    return model


@torch.no_grad()
def accuracy_by_angle(model: nn.Module, data: ImageData, config: RotationConfig,
                      device) -> list[float]:
    """Test accuracy (percent) at each angle of config.angles."""
    model.eval()
    images, labels = data.test
    result = []
    for angle in config.angles:
        correct = 0
        for start in range(0, len(labels), 256):
            x = rotate(images[start:start + 256].to(device), float(angle), config.interpolation)
            correct += (model(x).argmax(1).cpu() == labels[start:start + 256]).sum().item()
        result.append(100.0 * correct / len(labels))
    return result


def run_study(data: ImageData, config: RotationConfig, device, padding_modes=("zeros",),
              progress: bool = True) -> dict:
    """{padding_mode: {'upright': [acc per angle], 'rotated': [...]}}."""
    from tqdm.auto import tqdm

    bar = tqdm(total=2 * len(padding_modes) * config.epochs, desc="rotation study",
               unit="epoch", disable=not progress)
    results = {}
    for mode in padding_modes:
        results[mode] = {}
        for name, augment in (("upright", False), ("rotated", True)):
            bar.set_postfix_str(f"{mode} {name}")
            model = train_model(data, augment, config, device, mode, progress=bar.update)
            results[mode][name] = accuracy_by_angle(model, data, config, device)
    bar.close()
    return results


def plot(results: dict, config: RotationConfig, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, curves in results.items():
        suffix = "" if len(results) == 1 else f" ({mode})"
        ax.plot(config.angles, curves["upright"], "o-", label=f"trained upright{suffix}")
        ax.plot(config.angles, curves["rotated"], "s--", label=f"trained with rotations{suffix}")
    ax.set_xlabel("test rotation (degrees)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks(list(config.angles))
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: dict, config: RotationConfig) -> str:
    header = "| padding | training | " + " | ".join(f"{a}°" for a in config.angles) + " |"
    lines = [header, "|" + " --- |" * (len(config.angles) + 2)]
    for mode, curves in results.items():
        for name in ("upright", "rotated"):
            lines.append(f"| {mode} | {name} | " + " | ".join(f"{a:.1f}" for a in curves[name]) + " |")
    return "\n".join(lines)

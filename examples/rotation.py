"""Seed Q1.2: accuracy of a CNN against the rotation of its test images, trained
upright and with random rotations (one plot, a CSV, a table).

    python examples/rotation.py                                   # built-in digits
    python examples/rotation.py --dataset cifar10 --data-dir data/cifar-10-batches-py --download
    python examples/rotation.py --padding-mode zeros reflect circular replicate
"""
import argparse
import csv
import os
import sys

import torch

from pyattn.models.cli import OneLineParser, positive_float, positive_int, run_cli, torch_device
from pyattn.studies import rotation


def main(argv=None):
    p = OneLineParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["digits", "cifar10"], default="digits")
    p.add_argument("--data-dir", help="CIFAR-10 python batches directory")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 (MD5-checked)")
    p.add_argument("--epochs", type=positive_int, default=10)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--interpolation", choices=["bilinear", "nearest"], default="bilinear")
    p.add_argument("--padding-mode", nargs="+", default=["zeros"],
                   choices=["zeros", "reflect", "replicate", "circular"],
                   help="repeat the study per padding mode")
    p.add_argument("--out", default="runs/rotation", help="folder for the PNG and CSV")
    p.add_argument("--device", type=torch_device,
                   default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.dataset == "cifar10":
        if not args.data_dir:
            p.error("--data-dir is needed for cifar10")
        data = rotation.load_cifar10(args.data_dir, args.download)
    else:
        data = rotation.load_digits_32()
    config = rotation.RotationConfig(args.epochs, args.batch_size, args.lr, args.interpolation)
    results = rotation.run_study(data, config, args.device, args.padding_mode)
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "rotation_accuracy.png")
    rotation.plot(results, config, png, f"{data.name}: accuracy vs test rotation")
    with open(os.path.join(args.out, "rotation_accuracy.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["padding_mode", "training", *config.angles])
        for mode, curves in results.items():
            for name, accs in curves.items():
                writer.writerow([mode, name, *[f"{a:.2f}" for a in accs]])
    print(rotation.table(results, config))
    print(f"\nwrote {png} and rotation_accuracy.csv")
    return results


if __name__ == "__main__":
    sys.exit(run_cli(main))

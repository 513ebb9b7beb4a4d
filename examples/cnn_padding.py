"""Seed Q1.1 b, d: Net1 / Net2 x six conv types on the shifted-boxes task.

    python examples/cnn_padding.py --net Net1 --conv-type circular
    python examples/cnn_padding.py --all --repeats 10 --epochs 50   # the seed's full run

Defaults are the original assignment's: at most 50 epochs, early stop on the
9th consecutive epoch without a lower validation loss (--patience 8), batch
200, Adadelta lr 1.0, data of the 'original' protocol. Prints the seed's
per-setting blocks, then a markdown table with the wall time of each cell.
With --csv, one row per run (wall and CPU time included) is written after each cell,
so a long run leaves its finished cells behind.
"""
import argparse
import csv
import os
import sys
import time

import torch

from pyattn.models.cli import (OneLineParser, nonnegative_int, positive_int, run_cli,
                              torch_device)
from pyattn.studies import cnn_padding as study


def main(argv=None):
    parser = OneLineParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", nargs="+", choices=study.NETS, default=["Net1"])
    parser.add_argument("--conv-type", nargs="+", choices=list(study.CONV_TYPES),
                        default=["fconv"])
    parser.add_argument("--all", action="store_true", help="both nets x all six conv types")
    parser.add_argument("--repeats", type=positive_int, default=10,
                        help="runs per setting; run r seeds the weights with first-seed + r")
    parser.add_argument("--first-seed", type=nonnegative_int, default=0)
    parser.add_argument("--epochs", type=positive_int, default=50, help="max epochs per run")
    parser.add_argument("--patience", type=nonnegative_int, default=8,
                        help="early stop after this many epochs without a better val loss")
    parser.add_argument("--batch-size", type=positive_int, default=200)
    parser.add_argument("--impl", choices=["pyattn", "torch"], default="pyattn",
                        help="convs from pyattn.nn.PaddedConv2d or torch.nn.Conv2d")
    parser.add_argument("--val-protocol", choices=["original", "fresh"], default="original")
    parser.add_argument("--device", type=torch_device,
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--csv", help="also write one row per run to this CSV file")
    args = parser.parse_args(argv)
    configs = ([(net, conv) for net in study.NETS for conv in study.CONV_TYPES] if args.all
               else [(net, conv) for net in args.net for conv in args.conv_type])
    config = study.TrainConfig(epochs=args.epochs, patience=args.patience,
                               batch_size=args.batch_size)
    device = args.device
    start = time.time()
    data = study.make_datasets(args.val_protocol)
    rows = []
    for cell in configs:  # one cell at a time, so the CSV grows as cells finish
        cell_rows, _ = study.run_study([cell], args.repeats, config, device, args.impl,
                                       data=data, first_seed=args.first_seed)
        rows += cell_rows
        print(study.format_row(cell_rows[0]) + "\n", flush=True)
        if args.csv:
            write_csv(args.csv, rows, args.first_seed)
    print(f"Note: {data.note()}.\n")
    print(study.markdown_table(rows))
    print(f"\n{len(configs)} settings x {args.repeats} repeats, at most {args.epochs} epochs, "
          f"batch {args.batch_size}, impl {args.impl}, device {args.device}, "
          f"{torch.get_num_threads()} threads: {time.time() - start:.0f} s")


def write_csv(path, rows, seed):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["net", "conv_type", "seed", "val_accuracy", "test_accuracy",
                         "epochs", "best_epoch", "seconds", "cpu_seconds"])
        for row in rows:
            for r, run in enumerate(row.runs):
                writer.writerow([row.net, row.conv_type, seed + r, run.val_accuracy,
                                 run.test_accuracy, run.epochs, run.best_epoch,
                                 f"{run.seconds:.2f}", f"{run.cpu_seconds:.2f}"])


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""Seed Q1.1 b, d: Net1 / Net2 x six conv types on the shifted-boxes task.

    python examples/cnn_padding.py --net Net1 --conv-type circular
    python examples/cnn_padding.py --all --repeats 10 --epochs 50   # the seed's full run
"""
import argparse
import csv
import os
import time

import torch

from pyattn.studies import cnn_padding as study


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", choices=study.NETS, default="Net1")
    parser.add_argument("--conv-type", choices=list(study.CONV_TYPES), default="fconv")
    parser.add_argument("--all", action="store_true", help="both nets x all six conv types")
    parser.add_argument("--repeats", type=int, default=10, help="runs per setting (seed r)")
    parser.add_argument("--epochs", type=int, default=50, help="max epochs per run")
    parser.add_argument("--patience", type=int, default=8,
                        help="early stop after this many epochs without a better val loss")
    parser.add_argument("--impl", choices=["pyattn", "torch"], default="pyattn",
                        help="convs from pyattn.nn.PaddedConv2d or torch.nn.Conv2d")
    parser.add_argument("--val-protocol", choices=["original", "fresh"], default="original")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--csv", help="also write one row per run to this CSV file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.epochs < 1:
        parser.error("--repeats and --epochs must be >= 1")

    configs = ([(net, conv) for net in study.NETS for conv in study.CONV_TYPES] if args.all
               else [(args.net, args.conv_type)])
    config = study.TrainConfig(epochs=args.epochs, patience=args.patience)
    start = time.time()
    rows, data = study.run_study(configs, args.repeats, config, torch.device(args.device),
                                 args.impl, args.val_protocol)
    print(f"\nNote: {data.note()}.")
    for row in rows:
        print(study.format_row(row) + "\n")
    print(study.markdown_table(rows))
    print(f"\n{len(configs)} settings x {args.repeats} repeats, at most {args.epochs} epochs, "
          f"impl {args.impl}, device {args.device}: {time.time() - start:.0f} s")
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["net", "conv_type", "repeat", "val_accuracy", "test_accuracy",
                             "epochs", "best_epoch"])
            for row in rows:
                for r, run in enumerate(row.runs):
                    writer.writerow([row.net, row.conv_type, r, run.val_accuracy,
                                     run.test_accuracy, run.epochs, run.best_epoch])


if __name__ == "__main__":
    main()

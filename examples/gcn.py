"""Seed Q3: GraphConv (eq. 6) or GCN node classification, mean ± std over seeds.

    python examples/gcn.py                       # GCN on Cora, from the shipped data/planetoid
    python examples/gcn.py --dataset karate      # the built-in karate club
    python examples/gcn.py --dataset citeseer --data-dir /elsewhere/planetoid --model graphconv
"""
import argparse
import sys

import torch

from pyattn.models.cli import OneLineParser, positive_int, run_cli, torch_device
from pyattn.studies import gcn


def main(argv=None):
    parser = OneLineParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["cora", "citeseer", "karate"], default="cora")
    parser.add_argument("--data-dir", default=gcn.SHIPPED_PLANETOID,
                        help="directory of the Planetoid ind.<name>.* files "
                             "(default: the repository's data/planetoid)")
    parser.add_argument("--model", choices=gcn.MODELS, default="gcn")
    parser.add_argument("--seeds", type=positive_int, default=10)
    parser.add_argument("--epochs", type=positive_int, default=200)
    parser.add_argument("--device", type=torch_device,
                        default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    config = gcn.GCNConfig(hidden=16 if args.model == "gcn" else 64, epochs=args.epochs)
    accuracies = gcn.run(args.dataset, args.model, args.seeds, args.device,
                         args.data_dir, config)
    print(f"{args.model} on {args.dataset}, {args.seeds} seeds: "
          + ", ".join(f"{a:.1f}" for a in accuracies))
    print(gcn.summary(accuracies))
    return accuracies


if __name__ == "__main__":
    sys.exit(run_cli(main))

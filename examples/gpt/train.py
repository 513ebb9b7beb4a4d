"""Train a character-level GPT (seed Q2). See --help.

    python examples/gpt/train.py --model-type gpt-micro --max-steps 2000 --out-dir runs/grimm
    torchrun --nproc_per_node 2 examples/gpt/train.py --device cpu   # DDP (gloo)

The text defaults to the shipped data/text/grimms_fairy_tales.txt (--text overrides).
User errors print one line and exit with status 1 (bad flags: 2).
"""
import sys

from pyattn.models.trainer import cli_main

if __name__ == "__main__":
    sys.exit(cli_main())

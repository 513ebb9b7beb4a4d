"""Sample from a trained char-level GPT (seed Q2.8 output format). See --help.

    python examples/gpt/generate.py --checkpoint runs/grimm/ckpt.pt \
        --prompt "Once upon a time" --temperature 0.8 --top-p 0.9

User errors print one line and exit with status 1 (bad flags: 2).
"""
import sys

from pyattn.models.generation import cli_main

if __name__ == "__main__":
    sys.exit(cli_main())

"""Sample from a trained char-level GPT (seed Q2.8 output format). See --help.

    python examples/gpt/generate.py --checkpoint runs/grimm/ckpt.pt \
        --prompt "Once upon a time" --temperature 0.8 --top-p 0.9
"""
from pyattn.models.generation import main

if __name__ == "__main__":
    main()

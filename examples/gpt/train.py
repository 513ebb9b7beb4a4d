"""Train a character-level GPT (seed Q2). See --help.

    python examples/gpt/train.py --text ../shared/data/text/grimms_fairy_tales.txt \
        --model-type gpt-micro --max-steps 2000 --out-dir runs/grimm
    torchrun --nproc_per_node 2 examples/gpt/train.py --text ... --device cpu   # DDP (gloo)
"""
from pyattn.models.trainer import main

if __name__ == "__main__":
    main()

"""Training of the char-level GPT (``examples/gpt/train.py`` is this module's CLI).

Random ``block_size`` windows of the first 90% of the text, AdamW (decay on
matmul weights only), linear warmup then cosine decay, gradient clipping 1.0,
bf16 autocast on GPU. Checkpoints are written atomically and hold the model
config, tokenizer, optimizer, step and RNG states, so ``--resume`` continues
exactly where a run stopped. Runs unchanged under ``torchrun`` with
DistributedDataParallel: every rank draws the same global batch and trains
on its slice of it.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import math
import os
import re
import time
from typing import Optional

import torch
import torch.distributed as dist

from pyattn.models.checkpoint import (WRITE_PAUSE_ENV, CheckpointError,  # noqa: F401 (API)
                                      load_checkpoint, model_from_checkpoint, save_atomic)
from pyattn.models.cli import (DistributedRunError, OneLineParser, UsageError,
                               dropout_probability, nonnegative_float, nonnegative_int,
                               one_line, positive_float, positive_int, run_cli, torch_device,
                               unit_fraction)
from pyattn.models.gpt import ATTENTION, GPT, PRESETS, GPTConfig
from pyattn.models.text import DEFAULT_TEXT, CharTokenizer, load_text, random_blocks, split

def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="Train a character-level GPT (seed Q2).")
    p.add_argument("--text", default=DEFAULT_TEXT,
                   help="UTF-8 training text (default: the shipped Grimms' Fairy Tales, "
                   "%(default)s)")
    p.add_argument("--keep-boilerplate", action="store_true",
                   help="keep a Project Gutenberg header and licence (stripped by default)")
    p.add_argument("--model-type", default="gpt-micro", choices=sorted(PRESETS))
    p.add_argument("--out-dir", default="runs/gpt", help="checkpoint OUT/ckpt.pt, log, plot")
    p.add_argument("--block-size", type=positive_int, default=128)
    p.add_argument("--batch-size", type=positive_int, default=64, help="global batch (all ranks)")
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--min-lr-ratio", type=unit_fraction, default=0.1, help="final lr / lr")
    p.add_argument("--warmup-steps", type=nonnegative_int, default=100)
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.1)
    p.add_argument("--dropout", type=dropout_probability, default=0.1)
    p.add_argument("--max-steps", type=positive_int, default=2000)
    p.add_argument("--epochs", type=positive_float, help="train this many passes over the "
                   "training tokens instead of --max-steps")
    p.add_argument("--attn", default="pyattn", choices=ATTENTION)
    p.add_argument("--abs-emb", action="store_true",
                   help="learned absolute position embeddings instead of RoPE")
    p.add_argument("--eval-interval", type=positive_int, default=200,
                   help="validation loss every N steps (and at the last)")
    p.add_argument("--eval-iters", type=positive_int, default=20, help="val batches per evaluation")
    p.add_argument("--checkpoint-interval", type=positive_int, default=200,
                   help="write OUT/ckpt.pt every N steps (and at the last)")
    p.add_argument("--sample-interval", type=nonnegative_int, default=500,
                   help="print a sample every N steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device", type=torch_device,
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dist-timeout", type=positive_float, default=300.0,
                   help="seconds a distributed run waits for a peer before it fails")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def lr_at(step: int, args) -> float:
    """Linear warmup to args.lr, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    floor = args.lr * args.min_lr_ratio
    return floor + 0.5 * (args.lr - floor) * (1 + math.cos(math.pi * progress))


def _rng_state(data_gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "data": data_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, data_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    data_gen.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def estimate_val_loss(model, val, args, device, autocast) -> float:
    """Mean loss over eval_iters val batches, the same batches at every evaluation."""
    gen = torch.Generator().manual_seed(args.seed + 2)
    model.eval()
    losses = []
    for _ in range(args.eval_iters):
        x, y = random_blocks(val, args.block_size, args.batch_size, gen)
        with autocast():
            losses.append(model(x.to(device), y.to(device))[1].item())
    model.train()
    return sum(losses) / len(losses)


def plot_losses(log_path: str, png_path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, train, val_steps, val = [], [], [], []
    with open(log_path) as f:
        for row in csv.DictReader(f):
            steps.append(int(row["step"]))
            train.append(float(row["train_loss"]))
            if row["val_loss"]:
                val_steps.append(int(row["step"]))
                val.append(float(row["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, train, label="train", alpha=0.7)
    ax.plot(val_steps, val, "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / char)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def _init_distributed(args) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; joins the process group under
    torchrun (WORLD_SIZE > 1) with a timeout, so a lost peer ends the run."""
    device = torch.device(args.device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=args.dist_timeout))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


LOG_COLUMNS = ["step", "train_loss", "val_loss", "lr", "tokens_per_s"]


def _start_log(log_path: str, resumed_step: Optional[int]) -> None:
    """A fresh log, or on resume the old one cut back to the checkpoint's step (rows a
    killed run wrote after its last checkpoint, a torn last row included, are redone)."""
    rows = []
    if resumed_step is not None and os.path.exists(log_path):
        with open(log_path, newline="") as f:
            for row in csv.DictReader(f):
                if None in row.values() or not row["step"].isdigit():
                    break  # a row torn by a kill
                if int(row["step"]) <= resumed_step:
                    rows.append(row)
    tmp = f"{log_path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, log_path)


def _check_lengths(train_ids, val_ids, block_size: int) -> None:
    for name, ids in (("training", train_ids), ("validation", val_ids)):
        if len(ids) <= block_size:
            raise UsageError(f"the {name} split has {len(ids)} characters, too few for "
                             f"--block-size {block_size}: use a longer --text or a smaller "
                             "--block-size")


# Words in the errors gloo / NCCL / the TCP store raise when a peer dies or hangs
# (as plain RuntimeError from DDP's backward hooks, or as torch.distributed.DistError).
LOST_PEER = re.compile(r"gloo|nccl|connection|timed out|timeout|broken pipe", re.IGNORECASE)


def train(args, stop_after: Optional[int] = None) -> dict:
    """Train; returns {'step', 'val_loss', 'tokens_per_s', 'out_dir'}. ``stop_after``
    ends the run after that step as if it were interrupted (tests of --resume).
    A distributed run whose peer dies, or hangs for ``--dist-timeout`` seconds,
    raises :class:`DistributedRunError` instead of waiting forever."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    lost_peer = False
    try:
        rank, world, device = _init_distributed(args)
        return _train(args, rank, world, device, stop_after)
    except (dist.DistError, RuntimeError) as error:
        if world <= 1 or not (isinstance(error, dist.DistError) or LOST_PEER.search(str(error))):
            raise
        lost_peer = True
        raise DistributedRunError(
            f"rank {os.environ.get('RANK', '?')} of {world}: a peer process died or did not "
            f"answer within --dist-timeout {args.dist_timeout:g} s "
            f"({type(error).__name__}: {one_line(error)[:200]})") from error
    finally:  # no teardown with a lost peer: it can block on the peer (run_cli exits)
        if world > 1 and dist.is_initialized() and not lost_peer:
            dist.destroy_process_group()


def _train(args, rank: int, world: int, device: torch.device,
           stop_after: Optional[int]) -> dict:
    from tqdm.auto import tqdm

    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} must be divisible by the "
                         f"{world} processes")
    main_process = rank == 0

    text = load_text(args.text, strip_boilerplate=not args.keep_boilerplate)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if args.resume and not os.path.exists(ckpt_path):
        raise UsageError(f"--resume: no checkpoint {ckpt_path!r} to continue from (run "
                         "without --resume to start)")
    ckpt = load_checkpoint(ckpt_path) if args.resume else None
    tokenizer = CharTokenizer(ckpt["chars"]) if ckpt else CharTokenizer.from_text(text)
    train_ids, val_ids = split(torch.tensor(tokenizer.encode(text), dtype=torch.long))
    if args.epochs is not None:
        args.max_steps = max(1, int(args.epochs * len(train_ids) / (args.batch_size * args.block_size)))

    torch.manual_seed(args.seed)
    if ckpt:  # the architecture (block size included) is the checkpoint's
        model, _ = model_from_checkpoint(ckpt, attn=args.attn)
        config = model.config
        args.block_size = config.block_size
    else:
        config = GPTConfig.preset(args.model_type, vocab_size=tokenizer.vocab_size,
                                  block_size=args.block_size, dropout=args.dropout,
                                  rope=not args.abs_emb, attn=args.attn)
        model = GPT(config)
    _check_lengths(train_ids, val_ids, args.block_size)
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.optimizer_groups(args.weight_decay), lr=args.lr,
                                  betas=(0.9, 0.95))
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    start = 0
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        _set_rng_state(ckpt["rng"], data_gen)
        start = ckpt["step"]
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        net = torch.compile(net)
    autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if device.type == "cuda" \
        else (lambda: torch.autocast("cpu", enabled=False))

    os.makedirs(args.out_dir, exist_ok=True)
    log_path = os.path.join(args.out_dir, "log.csv")
    if main_process:
        _start_log(log_path, start if ckpt else None)
        print(f"{args.model_type}: {model.num_parameters() / 1e6:.2f}M parameters, "
              f"vocab {tokenizer.vocab_size}, attn {args.attn}, "
              f"{'absolute positions' if args.abs_emb else 'RoPE'}, device {device}, "
              f"{world} process(es); steps {start + 1}..{args.max_steps}", flush=True)

    per_rank = args.batch_size // world
    bar = tqdm(range(start + 1, args.max_steps + 1), disable=args.no_progress or not main_process,
               desc="train", unit="step")
    val_loss, tokens_per_s, step = float("nan"), 0.0, start
    for step in bar:
        t0 = time.perf_counter()
        lr = lr_at(step - 1, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = random_blocks(train_ids, args.block_size, args.batch_size, data_gen)
        x, y = (t[rank * per_rank:(rank + 1) * per_rank].to(device) for t in (x, y))
        with autocast():
            _, loss = net(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        train_loss = loss.item()
        tokens_per_s = args.batch_size * args.block_size / (time.perf_counter() - t0)
        bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
        last = step == args.max_steps
        row_val = ""
        if step % args.eval_interval == 0 or last:
            val_loss = estimate_val_loss(model, val_ids, args, device, autocast)
            row_val = repr(val_loss)
            if main_process:
                bar.write(f"step {step}: train {train_loss:.4f}, val {val_loss:.4f}")
        if main_process:
            # the row goes first: a checkpoint at step s always has its rows up to s
            with open(log_path, "a", newline="") as f:
                csv.writer(f).writerow([step, repr(train_loss), row_val, f"{lr:.6g}",
                                        f"{tokens_per_s:.1f}"])
            if step % args.checkpoint_interval == 0 or last:
                save_atomic({"config": dataclasses.asdict(config), "chars": tokenizer.chars,
                             "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "step": step, "rng": _rng_state(data_gen),
                             "args": {k: v for k, v in vars(args).items()
                                      if isinstance(v, (int, float, str, bool, type(None)))}},
                            ckpt_path)
            if args.sample_interval and step % args.sample_interval == 0:
                model.eval()  # no dropout, and no draw from the training RNG
                sample = model.generate(
                    torch.tensor([tokenizer.encode(text[0])], device=device), 200,
                    temperature=0.8, generator=torch.Generator(device).manual_seed(step))
                model.train()
                bar.write("-" * 80 + "\n" + tokenizer.decode(sample[0].tolist()))
        if stop_after is not None and step >= stop_after:
            break
    bar.close()
    if main_process:
        plot_losses(log_path, os.path.join(args.out_dir, "loss.png"))
    return {"step": step, "val_loss": val_loss, "tokens_per_s": tokens_per_s,
            "out_dir": args.out_dir}


def main(argv=None) -> dict:
    """The training CLI's work; user errors raise (see :func:`cli_main`)."""
    return train(build_parser().parse_args(argv))


def cli_main(argv=None) -> int:
    """``examples/gpt/train.py``: exit status 0, or 1 with one stderr line for a user error."""
    return run_cli(main, argv)

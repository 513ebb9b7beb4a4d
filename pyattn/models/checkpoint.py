"""Checkpoints of the char-level GPT trainer: atomic writes, safe and checked loads.

A checkpoint is a dict with the model config, tokenizer characters, model and
optimizer states, step, RNG states and the run's flags. It is written to a
temporary file, fsynced and renamed over the old one, so a run killed at any
moment leaves a loadable checkpoint; it is read with
``torch.load(weights_only=True)``, so no code runs from the file.
"""
from __future__ import annotations

import io
import os
import time
from typing import Optional

import torch

from pyattn.models.cli import UsageError, one_line
from pyattn.models.gpt import GPT, GPTConfig
from pyattn.models.text import CharTokenizer

CHECKPOINT_KEYS = {"config", "chars", "model", "optimizer", "step", "rng", "args"}

# Fault-injection hook for the kill tests: pause this many seconds half-way
# through writing a checkpoint, so a SIGKILL can land inside the write.
WRITE_PAUSE_ENV = "PYATTN_CHECKPOINT_WRITE_PAUSE"


class _PausingWriter(io.FileIO):
    """A file that sleeps once, half-way through its first write, for the
    fault-injection tests: the file on disk is then a prefix of a checkpoint,
    however torch.save splits its writes (it may write everything at once)."""

    def __init__(self, path: str, pause: float):
        super().__init__(path, "wb")
        self.pause = pause

    def write(self, data) -> int:
        if not self.pause:
            return super().write(data)
        view = memoryview(data).cast("B")
        half = len(view) // 2
        written = super().write(view[:half])
        self.flush()
        time.sleep(self.pause)
        self.pause = 0.0
        return written + super().write(view[written:])


def save_atomic(obj, path: str) -> None:
    """torch.save to ``path + '.tmp'``, fsync, then rename over ``path``: a reader (or
    a run killed at any moment) sees the old checkpoint or the new one, never a torn file."""
    tmp = f"{path}.tmp"
    pause = float(os.environ.get(WRITE_PAUSE_ENV, 0))
    with _PausingWriter(tmp, pause) if pause else open(tmp, "wb") as f:
        torch.save(obj, f)
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


class CheckpointError(UsageError):
    """A file that is not a readable checkpoint of this trainer."""


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """A checkpoint written by this trainer (``torch.load(weights_only=True)``: no code
    runs from the file); FileNotFoundError or :class:`CheckpointError` otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for torn or foreign files
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path!r} is not a readable pyattn GPT checkpoint (truncated "
                              f"or corrupt?): {type(error).__name__}: {reason}") from None
    if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= set(ckpt):
        raise CheckpointError(f"{path!r} is not a pyattn GPT checkpoint (expected keys "
                              f"{sorted(CHECKPOINT_KEYS)})")
    return ckpt


def model_from_checkpoint(ckpt: dict, device="cpu", attn: Optional[str] = None):
    """(model, tokenizer) from a checkpoint; ``attn`` overrides the kernel choice."""
    config = dict(ckpt["config"])
    if attn is not None:
        config["attn"] = attn
    try:
        model = GPT(GPTConfig(**config))
        model.load_state_dict(ckpt["model"])
        tokenizer = CharTokenizer(ckpt["chars"])
    except (TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"the checkpoint's model does not load: "
                              f"{type(error).__name__}: {one_line(error)[:300]}") from None
    return model.to(device), tokenizer

"""Character-level text data: tokenizer, loading, train/val split, batches."""
from __future__ import annotations

import os

import torch

from pyattn.models.cli import UsageError

# The training text shipped in the repository (data/README.md gives its source and
# licence); PYATTN_DATA_DIR points elsewhere, as for the tests.
DATA_DIR = os.environ.get("PYATTN_DATA_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "data"))
DEFAULT_TEXT = os.path.join(DATA_DIR, "text", "grimms_fairy_tales.txt")


class CharTokenizer:
    """Characters of a text <-> ids, in sorted order (saved with the model)."""

    def __init__(self, chars):
        self.chars = list(chars)
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("CharTokenizer: characters must be distinct")
        self.index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of ``text``; :class:`UsageError` naming any character
        outside the vocabulary."""
        unknown = sorted({c for c in text if c not in self.index})
        if unknown:
            shown = ", ".join(repr(c) for c in unknown[:10])
            raise UsageError(f"text has {len(unknown)} character(s) outside the vocabulary: "
                             f"{shown}")
        return [self.index[c] for c in text]

    def encode_prompt(self, prompt: str) -> list[int]:
        """:meth:`encode` for a generation prompt, which must not be empty."""
        if not prompt:
            raise UsageError("the prompt is empty: give at least one character to continue "
                             "from (generation has nothing to condition on otherwise)")
        try:
            return self.encode(prompt)
        except UsageError as error:
            raise UsageError(f"prompt {prompt[:40]!r}: {error}; the model knows only the "
                             f"{self.vocab_size} characters of its training text") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


GUTENBERG_START = "*** START OF TH"
GUTENBERG_END = "*** END OF TH"


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg e-book: the lines between its '*** START OF
    THIS/THE PROJECT GUTENBERG EBOOK' and '*** END OF ...' markers (the licence
    after the end would otherwise fill a third of a last-10% validation split).
    Text without the markers is returned unchanged."""
    start, end = text.find(GUTENBERG_START), text.find(GUTENBERG_END)
    if start < 0 or end < start:
        return text
    body_start = text.find("\n", start) + 1
    return text[body_start:end].strip("\n") + "\n"


def load_text(path: str, strip_boilerplate: bool = True) -> str:
    """UTF-8 text of `path` (a byte-order mark dropped; a Project Gutenberg
    header and licence removed unless ``strip_boilerplate=False``), with clear errors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file not found: {path!r} (pass --text PATH to a UTF-8 "
                                "text file, e.g. Grimms' Fairy Tales from Project Gutenberg)")
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as error:
        raise UsageError(f"text file {path!r} is not UTF-8 text ({error})") from None
    if strip_boilerplate:
        text = strip_gutenberg(text)
    if len(text) < 2:
        raise UsageError(f"text file {path!r} is too short to train on ({len(text)} characters)")
    return text


def split(ids: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """The first (1 - val_fraction) for training, the last val_fraction for validation."""
    cut = int(len(ids) * (1 - val_fraction))
    return ids[:cut], ids[cut:]


def random_blocks(data: torch.Tensor, block_size: int, batch_size: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (batch, block): random windows, targets shifted by one."""
    if len(data) <= block_size:
        raise UsageError(f"data of {len(data)} tokens is too short for block_size {block_size}")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    windows = torch.stack([data[s:s + block_size + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]

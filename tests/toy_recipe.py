"""A text recipe written outside the package, in this one file (as a user adds one: docs/finetuning.md,
"A text recipe of your own"): hashed words, each word of a text adding one to the column its
crc32 picks, a recipe with nothing to train and a vocabulary of any word."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from scbch_dist.data.format import text_words
from scbch_dist.models.recipes import ReplayedText, TextOptions, TextRecipe, register_text_recipe

WIDTH = 64


class HashedWords:
    """(n,) str -> (n, WIDTH) float32 word counts by column crc32(word) % WIDTH."""

    dim = WIDTH

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), WIDTH), np.float32)
        for i, text in enumerate(texts):
            for word in text_words(text):
                out[i, zlib.crc32(word.encode()) % WIDTH] += 1
        return out


def make(options: TextOptions) -> tuple[HashedWords, dict]:
    return HashedWords(), {"encoder": "hashed-words", "dim": WIDTH, "hash": "crc32"}


def replay(source: dict, root: Path, clip) -> ReplayedText:
    return ReplayedText(HashedWords().encode)  # any word hashes to a column


register_text_recipe(TextRecipe("hashed-words", make, replay, replayable=lambda record, root: True))

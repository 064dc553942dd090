"""Tokenizers of the text encoders: texts -> (token ids, attention mask), each (n, T) int64.

Random encoders get a word-level tokenizer over the dataset's training vocabulary (vocab.json);
pretrained ones the tokenizer of their local model directory (never the hub). The loader workers
call them (data.transforms.BatchTransform), after the shuffle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from scbch_dist.data.format import read_vocab, text_words
from scbch_dist.models.backbones import text_source
from scbch_dist.models.clip import clip_source, import_open_clip, open_clip_config


class Tokenizer(Protocol):
    vocab_size: int

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]: ...


PAD, UNK, CLS = 0, 1, 2
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]")


class WordTokenizer:
    """Word-level tokenizer over the most frequent words of the training texts (vocab.json),
    for randomly initialised text encoders: [CLS] w1 w2 ... padded with [PAD]; unknown words [UNK].
    Uses the same word rule as bag-of-words features (format.text_words)."""

    def __init__(self, words: list[str], max_length: int, vocab_size: int):
        kept = words[: max(vocab_size - len(SPECIAL_TOKENS), 0)]
        self.index = {w: i + len(SPECIAL_TOKENS) for i, w in enumerate(kept)}
        self.vocab_size = len(kept) + len(SPECIAL_TOKENS)
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full((len(texts), self.max_length), PAD, dtype=np.int64)
        for row, text in enumerate(texts):
            tokens = [CLS] + [self.index.get(w, UNK) for w in text_words(text)]
            tokens = tokens[: self.max_length]
            ids[row, : len(tokens)] = tokens
        return ids, (ids != PAD).astype(np.int64)


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local model directory (never from the hub)."""

    def __init__(self, directory: str | Path, max_length: int):
        # Fork-safety: workers fork after the tokenizer may have used its thread pool.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        self.vocab_size = len(self.tokenizer)
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="np")
        return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


class OpenClipTokenizer:
    """open_clip's tokenizer of a model: texts -> (ids, mask) (n, context_length) int64; the mask
    marks real tokens (ids != 0), which the text tower does not need but the pipeline carries."""

    def __init__(self, source):
        open_clip = import_open_clip()
        open_clip_config(source)  # refuses a tokenizer from the hub
        self.tokenizer = open_clip.get_tokenizer(source.name)
        self.vocab_size = int(getattr(self.tokenizer, "vocab_size", 49408))

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = self.tokenizer(list(texts)).numpy().astype(np.int64)
        return ids, (ids != 0).astype(np.int64)


def clip_tokenizer(clip_cfg) -> Tokenizer:
    """The tokenizer of the CLIP model ``model.clip`` names, at the model's context length."""
    source = clip_source(clip_cfg)
    if source.library == "open_clip":
        return OpenClipTokenizer(source)
    config = json.loads((source.directory / "config.json").read_text())
    length = config.get("text_config", {}).get("max_position_embeddings", 77)
    return HFTokenizer(source.directory, length)


def make_tokenizer(model_cfg, root: str | Path) -> Tokenizer:
    """The tokenizer that matches ``model.text``: a CLIP model's own (model.clip), the model
    directory's own for pretrained encoders, a word-level one over the dataset's training
    vocabulary for random ones."""
    text_cfg = model_cfg.text
    if text_cfg.kind == "clip":
        return clip_tokenizer(model_cfg.clip)
    directory, _ = text_source(text_cfg)
    if directory is None:
        words, _ = read_vocab(root)
        return WordTokenizer(words, text_cfg.max_length, text_cfg.vocab_size)
    return HFTokenizer(directory, text_cfg.max_length)

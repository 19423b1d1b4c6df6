"""The trained model's data: its prose tokenizer, the corpus as token streams, and the training
batches (windows of prose with copying practice mixed in; the pure copying warm-up)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sglang_tokendance.models.train_config import TrainConfig


def train_prose_tokenizer(out_dir: Path, texts: Sequence[str], vocab_size: int) -> None:
    """Train the project's byte-level BPE on ``texts`` and save it into ``out_dir``.

    Same settings, special tokens and chat template as
    :func:`sglang_tokendance.models.tokenizer.train_tokenizer`, which trains on the GA corpus
    only; this one takes the corpus as an argument (and leaves ``build``'s tokenizer untouched).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from sglang_tokendance.models.tokenizer import (
        BOS,
        CHAT_TEMPLATE,
        EOS,
        IM_END,
        IM_START,
        PAD,
        SPECIAL_TOKENS,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def lines() -> Iterator[str]:
        for text in texts:
            yield from text.splitlines(keepends=True)

    tok.train_from_iterator(lines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1 << 20
    fast.save_pretrained(str(out_dir))


def encode_stream(tokenizer: Any, texts: Sequence[str]) -> np.ndarray:
    """Token ids of ``texts`` concatenated, each document followed by EOS (int32 array)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return np.asarray(ids, dtype=np.int32)


def load_streams(tokenizer: Any, install: bool = True) -> dict[str, np.ndarray]:
    """The corpus's train and val splits as token streams (``{"train": ..., "val": ...}``)."""
    from sglang_tokendance.models.corpus_prose import load_corpus

    corpus = load_corpus(install=install)
    return {k: encode_stream(tokenizer, [d.text for d in v]) for k, v in corpus.items()}


def copy_batch(cfg: TrainConfig, rng: np.random.Generator, vocab: int) -> np.ndarray:
    """A ``(copy_batch_size, copy_seq_len + 1)`` batch of pure copying practice (warm-up).

    Each row is ``L`` random token ids (``L`` uniform in 8..copy_seq_len/2, ids in
    256..vocab-1) repeated to the end of the row: only copying from context predicts the
    repeats, and periods vary so no fixed-offset shortcut does.
    """
    n = cfg.copy_seq_len + 1
    rows = []
    for length in rng.integers(8, cfg.copy_seq_len // 2 + 1, size=cfg.copy_batch_size):
        seg = rng.integers(256, vocab, size=int(length))
        rows.append(np.tile(seg, n // int(length) + 1)[:n])
    return np.stack(rows).astype(np.int64)


def sample_batch(
    stream: np.ndarray,
    cfg: TrainConfig,
    rng: np.random.Generator,
    repeat_frac: float,
    vocab: int,
) -> np.ndarray:
    """A ``(batch, seq_len + 1)`` batch of windows of ``stream`` at random offsets.

    A share ``repeat_frac`` of rows (on average) is copying practice: a window of text of ``H``
    tokens (``H`` uniform in 0..seq_len/2), then ``L`` random token ids (``L`` uniform in
    8..64, ids uniform in 256..vocab-1: no bytes, no specials) repeated until the row is full.
    Only copying from context predicts the repeats.
    """
    n = cfg.seq_len + 1
    starts = rng.integers(0, len(stream) - n, size=cfg.batch_size)
    rows = [stream[s : s + n] for s in starts]
    if repeat_frac > 0:
        repeat = rng.random(cfg.batch_size) < repeat_frac
        lengths = rng.integers(8, 65, size=cfg.batch_size)
        heads = rng.integers(0, n // 2 + 1, size=cfg.batch_size)
        for i in np.flatnonzero(repeat):
            length = int(lengths[i])
            seg = rng.integers(256, vocab, size=length).astype(stream.dtype)
            reps = n // length + 1
            rows[i] = np.concatenate([rows[i][: int(heads[i])], *([seg] * reps)])[:n]
    return np.stack(rows)

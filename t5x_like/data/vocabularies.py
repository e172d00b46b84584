"""Vocabularies by name, and where the shipped corpus lives.

Both vocabularies follow T5: pad=0, eos=1, unk=2, no bos, and 100 sentinel ids
(`<extra_id_0>` = vocab_size - 1, `<extra_id_1>` = vocab_size - 2, ...) at the end.
"""

from __future__ import annotations

import functools
import pathlib

import seqio

CORPUS_DIR = pathlib.Path(__file__).resolve().parent / "corpus"
# One paragraph (a speech, a stanza, a sonnet) per line, gzip'd; built by
# scripts/build_corpus_and_vocab.py. Validation = Macbeth and Julius Caesar.
SHAKESPEARE_TRAIN_PATTERN = str(CORPUS_DIR / "train-*-of-*.txt.gz")
SHAKESPEARE_VALIDATION_PATTERN = str(CORPUS_DIR / "validation.txt.gz")
SHAKESPEARE_SPM_PATH = str(CORPUS_DIR / "spm_shakespeare.model")

NUM_EXTRA_IDS = 100
PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
# 8000 SentencePiece pieces + 100 sentinels; a model's embedding table needs at
# least this many rows (T5 pads such sizes up to a multiple of 128: 8192).
SHAKESPEARE_SPM_VOCAB_SIZE = 8100
# 3 specials + 256 bytes + 100 sentinels.
BYTE_VOCAB_SIZE = 359


@functools.cache
def _shakespeare_spm() -> seqio.Vocabulary:
    return seqio.SentencePieceVocabulary(SHAKESPEARE_SPM_PATH, extra_ids=NUM_EXTRA_IDS)


@functools.cache
def _byte() -> seqio.Vocabulary:
    return seqio.ByteVocabulary(extra_ids=NUM_EXTRA_IDS)


_VOCABULARIES = {
    "shakespeare_spm": _shakespeare_spm,
    "byte": _byte,
}


def vocabulary_names() -> tuple[str, ...]:
    """The names `get_vocabulary` accepts."""
    return tuple(_VOCABULARIES)


def get_vocabulary(name: str = "shakespeare_spm") -> seqio.Vocabulary:
    """Returns a shared vocabulary instance by name.

    Args:
      name: "shakespeare_spm" (the shipped 8000-piece unigram SentencePiece model
        plus 100 sentinels, 8100 ids) or "byte" (seqio's ByteVocabulary with 100
        sentinels, 359 ids; needs no file at all).

    Raises:
      ValueError: for any other name, listing the known ones.
    """
    try:
        factory = _VOCABULARIES[name]
    except KeyError:
        raise ValueError(
            f"unknown vocabulary {name!r}; known vocabularies: {', '.join(_VOCABULARIES)}"
        ) from None
    return factory()

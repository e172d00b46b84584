"""Vocabularies by name, where the shipped corpus lives, and Hugging Face tokenizers.

Every named vocabulary follows T5: pad=0, eos=1, unk=2, no bos, and 100 sentinel ids
(`<extra_id_0>` = vocab_size - 1, `<extra_id_1>` = vocab_size - 2, ...) at the end.

"t5_c4_spm" is T5's own SentencePiece model, trained on C4 (32,000 pieces + 100
sentinels = 32,100 ids; T5 models embed 32,128 rows), which the C4 tasks use. It lives on
GCS (`C4_T5_SPM_PATH`); set the environment variable `T5X_LIKE_C4_SPM_PATH` to a copy
elsewhere (a local file, another bucket) before `t5x_like.data` is imported. Nothing is
read until the vocabulary first encodes or decodes, so configs, models and compilation
can be built on machines that cannot reach the file.

`hf_vocabulary(directory)` is the vocabulary of a converted Hugging Face model: its
SentencePiece model (spiece.model / tokenizer.model) as a seqio.SentencePieceVocabulary,
or else its tokenizer.json through the HF `tokenizers` library (`HfTokenizerVocabulary`).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np
import seqio
import tensorflow as tf

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

# T5's C4 SentencePiece model as T5X reads it (t5x/examples/t5/t5_1_1/base.gin): the
# "100extra" file holds the 100 sentinels as its last pieces, so seqio adds none.
C4_T5_SPM_PATH = "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model"
C4_T5_SPM_PATH_ENV = "T5X_LIKE_C4_SPM_PATH"
C4_T5_VOCAB_SIZE = 32100  # 32,000 pieces + 100 sentinels; T5 pads to 32,128 rows


def c4_t5_spm_path() -> str:
    """Where "t5_c4_spm" is read from: $T5X_LIKE_C4_SPM_PATH, else `C4_T5_SPM_PATH`."""
    return os.environ.get(C4_T5_SPM_PATH_ENV) or C4_T5_SPM_PATH


class T5SentencePieceVocabulary(seqio.SentencePieceVocabulary):
    """A T5 SentencePiece vocabulary with `num_sentinels` sentinels at the end, whichever
    form its file takes.

    T5X's file (cc_all.32000.100extra) already ends with `<extra_id_99>` ...
    `<extra_id_0>`; T5's cc_all.32000 and Hugging Face's spiece.model have no sentinels
    and get them appended, as `seqio.SentencePieceVocabulary(extra_ids=100)` does. Both
    give the same ids. Which form a file has is seen when it is first loaded.

    `extra_ids` is `num_sentinels` in both cases (the span-corruption and masked-LM
    preprocessors read their sentinels from it). With `vocab_size` given, the size is
    known without reading the file (a model checks its embedding rows against it before
    any data is read), and checked when the file is loaded.
    """

    def __init__(self, sentencepiece_model_file: str, *, num_sentinels: int = NUM_EXTRA_IDS,
                 vocab_size: int | None = None):
        super().__init__(sentencepiece_model_file, extra_ids=0)
        self._num_sentinels = num_sentinels
        self._declared_vocab_size = vocab_size

    @property
    def extra_ids(self) -> int:
        return self._num_sentinels

    @property
    def vocab_size(self) -> int:
        if self._model is None and self._declared_vocab_size is not None:
            return self._declared_vocab_size
        return super().vocab_size

    def _model_context(self):
        if self._model is not None:
            return self._model
        path, n = self.sentencepiece_model_file, self._num_sentinels
        plain = seqio.SentencePieceVocabulary(path)
        tokenizer = plain.tokenizer  # reads the file
        size = tokenizer.GetPieceSize()
        # Sentinel pieces may carry SentencePiece's word-start mark (U+2581), as seqio's do.
        built_in = size > n and all(
            tokenizer.id_to_piece(size - 1 - i).lstrip("\u2581") == f"<extra_id_{i}>"
            for i in (0, n - 1))
        source = plain if built_in else seqio.SentencePieceVocabulary(path, extra_ids=n)
        context = source._model_context()
        loaded = context.tokenizer.GetPieceSize()
        if self._declared_vocab_size is not None and loaded != self._declared_vocab_size:
            raise ValueError(
                f"SentencePiece model {path} gives {loaded} ids with its {n} sentinels, not "
                f"the {self._declared_vocab_size} expected; point ${C4_T5_SPM_PATH_ENV} at "
                "T5's cc_all.32000 model (with or without the .100extra sentinels)")
        self._model = context
        return context

    def __str__(self) -> str:  # seqio's reads the file for an md5
        return (f"T5SentencePieceVocabulary(file={self.sentencepiece_model_file}, "
                f"sentinels={self._num_sentinels})")

    __repr__ = __str__


@functools.cache
def _shakespeare_spm() -> seqio.Vocabulary:
    return seqio.SentencePieceVocabulary(SHAKESPEARE_SPM_PATH, extra_ids=NUM_EXTRA_IDS)


@functools.cache
def _byte() -> seqio.Vocabulary:
    return seqio.ByteVocabulary(extra_ids=NUM_EXTRA_IDS)


@functools.cache
def _t5_spm(path: str) -> seqio.Vocabulary:
    # The size of the published file is known; a replacement file is read to learn its own.
    size = C4_T5_VOCAB_SIZE if path == C4_T5_SPM_PATH else None
    return T5SentencePieceVocabulary(path, vocab_size=size)


def _t5_c4_spm() -> seqio.Vocabulary:
    return _t5_spm(c4_t5_spm_path())


_VOCABULARIES = {
    "shakespeare_spm": _shakespeare_spm,
    "byte": _byte,
    "t5_c4_spm": _t5_c4_spm,
}


def vocabulary_names() -> tuple[str, ...]:
    """The names `get_vocabulary` accepts."""
    return tuple(_VOCABULARIES)


def get_vocabulary(name: str = "shakespeare_spm") -> seqio.Vocabulary:
    """Returns a shared vocabulary instance by name.

    Args:
      name: "shakespeare_spm" (the shipped 8000-piece unigram SentencePiece model
        plus 100 sentinels, 8100 ids), "byte" (seqio's ByteVocabulary with 100
        sentinels, 359 ids; needs no file at all) or "t5_c4_spm" (T5's C4
        SentencePiece model, 32,100 ids, read lazily from `c4_t5_spm_path()`).

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


# --- Hugging Face tokenizers -------------------------------------------------------------

SENTENCEPIECE_FILES = ("spiece.model", "tokenizer.model")
TOKENIZER_JSON = "tokenizer.json"


class HfTokenizerVocabulary(seqio.Vocabulary):
    """A seqio vocabulary over a Hugging Face `tokenizer.json` (BPE, WordPiece, ...).

    Encoding adds no special tokens (seqio appends EOS itself); decoding drops them.
    Ids are the tokenizer's own, so id 0 is whatever token it is (seqio treats 0 as
    padding, as every model of this framework does).
    """

    def __init__(self, path: str | pathlib.Path, *, eos_id: int | None = None,
                 unk_id: int | None = None, extra_ids: int = 0):
        import tokenizers  # the HF tokenizers library (installed with transformers)

        self.path = str(path)
        self._tokenizer = tokenizers.Tokenizer.from_file(self.path)
        self._eos_id = eos_id
        self._unk_id = unk_id
        super().__init__(extra_ids=extra_ids)

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def unk_id(self) -> int | None:
        return self._unk_id

    @property
    def _base_vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def _encode(self, s: str) -> Sequence[int]:
        return self._tokenizer.encode(s, add_special_tokens=False).ids

    def _decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        def encode(text):
            return np.asarray(self._encode(text.numpy().decode("utf-8")), np.int32)

        ids = tf.py_function(encode, [s], tf.int32)
        ids.set_shape([None])
        return ids

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        def decode(batch):
            arr = batch.numpy()
            rows = arr.reshape(-1, arr.shape[-1]) if arr.ndim else arr.reshape(1, 1)
            texts = [self._decode([i for i in row if i != self.pad_id]) for row in rows]
            return np.asarray(texts, object).reshape(arr.shape[:-1])

        out = tf.py_function(decode, [ids], tf.string)
        out.set_shape(ids.shape[:-1])
        return out

    def __eq__(self, other) -> bool:
        return (isinstance(other, HfTokenizerVocabulary) and self.path == other.path
                and self.eos_id == other.eos_id and self.extra_ids == other.extra_ids)

    def __hash__(self) -> int:
        return hash((self.path, self.eos_id, self.extra_ids))


def hf_tokenizer_file(directory: str | pathlib.Path) -> pathlib.Path | None:
    """The file `hf_vocabulary` would read in `directory` (None: no usable tokenizer)."""
    directory = pathlib.Path(directory)
    for name in (*SENTENCEPIECE_FILES, TOKENIZER_JSON):
        if (directory / name).is_file():
            return directory / name
    return None


@functools.cache
def hf_vocabulary(directory: str, extra_ids: int = 0, eos_id: int | None = None
                  ) -> seqio.Vocabulary:
    """The vocabulary of a Hugging Face model directory (see the module docstring).

    Args:
      directory: holds spiece.model / tokenizer.model (preferred) or tokenizer.json.
      extra_ids: sentinel ids appended after the tokenizer's own (T5: 100).
      eos_id: EOS for a tokenizer.json (default: its tokenizer_config.json eos_token).

    Raises:
      FileNotFoundError: when the directory has none of those files.
    """
    path = hf_tokenizer_file(directory)
    if path is None:
        raise FileNotFoundError(
            f"no tokenizer in {directory}: expected one of "
            f"{[*SENTENCEPIECE_FILES, TOKENIZER_JSON]}; set the model's vocabulary to a "
            f"named one instead, e.g. get_vocabulary({vocabulary_names()[0]!r})")
    if path.name in SENTENCEPIECE_FILES:
        return seqio.SentencePieceVocabulary(str(path), extra_ids=extra_ids)
    if eos_id is None:
        eos_id = _special_token_id(path, "eos_token")
    return HfTokenizerVocabulary(path, eos_id=eos_id, extra_ids=extra_ids,
                                 unk_id=_special_token_id(path, "unk_token"))


def _special_token_id(tokenizer_json: pathlib.Path, key: str) -> int | None:
    """The id of tokenizer_config.json's `key` token (e.g. eos_token), if any."""
    config = tokenizer_json.parent / "tokenizer_config.json"
    if not config.is_file():
        return None
    token = json.loads(config.read_text()).get(key)
    if isinstance(token, dict):
        token = token.get("content")
    if not token:
        return None
    import tokenizers

    return tokenizers.Tokenizer.from_file(str(tokenizer_json)).token_to_id(token)

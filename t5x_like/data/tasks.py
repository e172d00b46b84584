"""seqio Task registrations (run on `import t5x_like.data`; safe to run again).

Registered here (vocabulary: the shipped SentencePiece model, 8100 ids, for the
shakespeare_* tasks unless noted; T5's C4 SentencePiece model "t5_c4_spm", 32,100 ids,
for every c4_* task):

  encoder-decoder, T5 span corruption: "inputs", "targets" (EOS appended to both)
    shakespeare_span_corruption       shipped corpus
    shakespeare_span_corruption_byte  shipped corpus, ByteVocabulary (359 ids, no file)
    c4_span_corruption                TFDS c4/en:3.1.0
    c4_v220_span_corruption           TFDS c4/en:2.2.0 (the T5 paper's version)
  decoder-only, next-token LM: "targets" (seqio.LMFeatureConverter)
    shakespeare_lm, shakespeare_lm_byte (ByteVocabulary), c4_lm
  decoder-only, prefix LM: "inputs" (prefix), "targets" (seqio.PrefixLMFeatureConverter)
    shakespeare_prefix_lm, c4_prefix_lm
  encoder-only, BERT masked LM: aligned "inputs", "targets" (MaskedLMFeatureConverter)
    shakespeare_mlm, shakespeare_mlm_wwm (whole words), c4_mlm
  encoder-only, classification: "inputs", scalar "label" (ClassificationFeatureConverter)
    shakespeare_play_classification   which of 6 plays a speech comes from

Splits "train" and "validation" everywhere. The C4 tasks read TFDS data already
prepared under the TFDS data dir (`TFDS_DATA_DIR` or ~/tensorflow_datasets) and never
try to download or build it (C4 takes an Apache Beam job). Their vocabulary is read from
GCS (or $T5X_LIKE_C4_SPM_PATH, see `vocabularies`) only when the first text is tokenized.
"""

from __future__ import annotations

import functools
import gzip
import re
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import seqio
import tensorflow as tf

from t5x_like.data import metrics, preprocessors, vocabularies

SHAKESPEARE_SPAN_CORRUPTION = "shakespeare_span_corruption"
SHAKESPEARE_SPAN_CORRUPTION_BYTE = "shakespeare_span_corruption_byte"
C4_SPAN_CORRUPTION = "c4_span_corruption"
C4_V220_SPAN_CORRUPTION = "c4_v220_span_corruption"

# Paragraphs per split of the shipped corpus (checked by tests/test_tasks.py).
SHAKESPEARE_NUM_EXAMPLES = {"train": 30769, "validation": 1508}


def span_corruption_output_features(vocabulary: seqio.Vocabulary,
                                    ) -> dict[str, seqio.Feature]:
    """The "inputs"/"targets" features of a span-corruption task, T5's defaults."""
    return {
        "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=False),
        "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
    }


def read_gzip_text_lines(path: tf.Tensor) -> tf.data.Dataset:
    """`FileDataSource` reader: the lines of one gzip'd text file."""
    return tf.data.TextLineDataset(path, compression_type="GZIP")


def shakespeare_source() -> seqio.DataSource:
    """The shipped corpus: one paragraph per line, 8 train shards + validation."""
    return seqio.FileDataSource(
        read_file_fn=read_gzip_text_lines,
        split_to_filepattern={
            "train": vocabularies.SHAKESPEARE_TRAIN_PATTERN,
            "validation": vocabularies.SHAKESPEARE_VALIDATION_PATTERN,
        },
        num_input_examples=SHAKESPEARE_NUM_EXAMPLES,
    )


class TfdsSource(seqio.TfdsDataSource):
    """A `seqio.TfdsDataSource` whose size is None, not a KeyError, when unknown.

    TFDS knows split sizes only once a dataset is prepared; under
    `tfds.testing.mock_data` (no metadata files) it never does, and seqio asks for
    the size on every `get_dataset` (to decide on in-memory caching). None is what
    the DataSource API returns for "size not known".
    """

    def num_input_examples(self, split: str) -> int | None:
        try:
            return super().num_input_examples(split)
        except KeyError:
            return None


def c4_source(version: str = "3.1.0") -> seqio.DataSource:
    """TFDS C4 (English); read only, so missing data fails fast instead of building."""
    return TfdsSource(tfds_name=f"c4/en:{version}", splits=("train", "validation"),
                      read_only=True)


def register_span_corruption_task(
    name: str,
    source: seqio.DataSource,
    vocabulary: seqio.Vocabulary,
    *,
    text_key: str | None = "text",
    metric_fns: Sequence[Callable[..., dict[str, float]]] = (),
) -> seqio.Task:
    """Registers (or re-registers) a span-corruption task over a text source.

    Args:
      name: the task name; an existing task of that name is replaced, so running
        the registrations twice (e.g. `importlib.reload`) is harmless.
      source: a seqio DataSource of dicts with the text under `text_key`, or of
        plain text lines when `text_key` is None.
      vocabulary: tokenizes and gives the sentinels (its last ids).
      text_key: the source feature holding the text, or None for text lines.
      metric_fns: seqio predict metric fns for evaluation.
    """
    if text_key is None:
        to_targets = preprocessors.text_line_to_feature
    else:
        def to_targets(dataset: tf.data.Dataset) -> tf.data.Dataset:
            return preprocessors.rekey(dataset, {"targets": text_key})

    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=[
            to_targets,
            seqio.preprocessors.tokenize,
            # Everything after this runs after `repeat`, so each epoch gets fresh
            # chunks and noise masks (and a cache, if one is built, stays reusable).
            seqio.CacheDatasetPlaceholder(),
            preprocessors.span_corruption,
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=span_corruption_output_features(vocabulary),
        metric_fns=list(metric_fns),
    )


def register_tasks() -> None:
    """Registers every task of this module (idempotent)."""
    spm = vocabularies.get_vocabulary("shakespeare_spm")
    register_span_corruption_task(
        SHAKESPEARE_SPAN_CORRUPTION, shakespeare_source(), spm, text_key=None,
        metric_fns=metrics.SPAN_CORRUPTION_METRICS)
    register_span_corruption_task(
        SHAKESPEARE_SPAN_CORRUPTION_BYTE, shakespeare_source(),
        vocabularies.get_vocabulary("byte"), text_key=None,
        metric_fns=metrics.SPAN_CORRUPTION_METRICS)
    # As in T5, no metric fns for C4: its validation split is too large to decode.
    t5_spm = vocabularies.get_vocabulary("t5_c4_spm")
    register_span_corruption_task(C4_SPAN_CORRUPTION, c4_source("3.1.0"), t5_spm)
    register_span_corruption_task(C4_V220_SPAN_CORRUPTION, c4_source("2.2.0"), t5_spm)

    register_lm_and_mlm_tasks()


# ------------------------------------------------- decoder-only and encoder-only tasks

SHAKESPEARE_LM = "shakespeare_lm"
SHAKESPEARE_LM_BYTE = "shakespeare_lm_byte"
C4_LM = "c4_lm"
SHAKESPEARE_PREFIX_LM = "shakespeare_prefix_lm"
C4_PREFIX_LM = "c4_prefix_lm"
SHAKESPEARE_MLM = "shakespeare_mlm"
SHAKESPEARE_MLM_WWM = "shakespeare_mlm_wwm"
C4_MLM = "c4_mlm"
SHAKESPEARE_PLAY_CLASSIFICATION = "shakespeare_play_classification"


def lm_output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    """Next-token LM: "targets" only; EOS ends each text (in its last chunk)."""
    return {"targets": seqio.Feature(vocabulary=vocabulary, add_eos=True)}


def prefix_lm_output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    """Prefix LM: the prefix ("inputs", no EOS) and its continuation ("targets")."""
    return {
        "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=False),
        "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
    }


def mlm_output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    """Masked LM: aligned "inputs" ([CLS] ... [SEP]) and "targets" (0 = no loss)."""
    return {
        "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=False),
        "targets": seqio.Feature(vocabulary=vocabulary, add_eos=False),
    }


def _text_to_targets(text_key: str | None) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
    if text_key is None:
        return preprocessors.text_line_to_feature
    return functools.partial(preprocessors.rekey, key_map={"targets": text_key})


def _add_task(name: str, **kwargs) -> seqio.Task:
    """Registers `name`, replacing a task of that name (so reloading is harmless)."""
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(name, **kwargs)


def register_lm_task(name: str, source: seqio.DataSource, vocabulary: seqio.Vocabulary,
                     *, text_key: str | None = "text") -> seqio.Task:
    """Next-token LM over a text source (`preprocessors.lm_chunks`; no text is lost).

    Args:
      name: the task name (replaced if registered).
      source: dicts with the text under `text_key`, or text lines if it is None.
      vocabulary: tokenizes the text.
      text_key: the source feature holding the text, or None for text lines.
    """
    return _add_task(
        name, source=source,
        preprocessors=[_text_to_targets(text_key), seqio.preprocessors.tokenize,
                       seqio.CacheDatasetPlaceholder(), preprocessors.lm_chunks],
        output_features=lm_output_features(vocabulary))


def register_prefix_lm_task(name: str, source: seqio.DataSource,
                            vocabulary: seqio.Vocabulary, *,
                            text_key: str | None = "text") -> seqio.Task:
    """Prefix LM over a text source (`preprocessors.prefix_lm`); arguments as
    `register_lm_task`."""
    return _add_task(
        name, source=source,
        preprocessors=[_text_to_targets(text_key), seqio.preprocessors.tokenize,
                       seqio.CacheDatasetPlaceholder(), preprocessors.prefix_lm],
        output_features=prefix_lm_output_features(vocabulary))


def register_mlm_task(name: str, source: seqio.DataSource, vocabulary: seqio.Vocabulary,
                      *, text_key: str | None = "text", whole_word: bool = False,
                      noise_density: float = 0.15) -> seqio.Task:
    """BERT masked LM over a text source (`preprocessors.mlm`).

    Args:
      name, source, vocabulary, text_key: as `register_lm_task`.
      whole_word: select whole SentencePiece words.
      noise_density: fraction of ordinary tokens selected for prediction.
    """
    mlm = functools.partial(preprocessors.mlm, whole_word=whole_word,
                            noise_density=noise_density)
    return _add_task(
        name, source=source,
        preprocessors=[_text_to_targets(text_key), seqio.preprocessors.tokenize,
                       seqio.CacheDatasetPlaceholder(), mlm],
        output_features=mlm_output_features(vocabulary))


# ------------------------------------------------- play classification (shipped corpus)

# Where each work lies in the corpus files (rebuilt by scripts/build_play_classification.py).
PLAYS_INDEX_PATH = vocabularies.CORPUS_DIR / "plays.tsv"
# Label i is play i: four tragedies, a comedy and a romance (516 to 1,225 paragraphs
# each), all from the LM train split, so that a model pretrained on that split has seen
# every class's text alike.
PLAY_CLASSIFICATION_LABELS = ("hamlet", "lear", "midsummer_nights_dream", "othello",
                              "romeo_and_juliet", "tempest")
# Speeches shorter than this carry no sign of their play ("Ay, my lord.").
PLAY_CLASSIFICATION_MIN_WORDS = 4
# A text is in validation iff crc32(text) % 5 == 0 (about 20%); equal texts always land
# in the same split.
PLAY_CLASSIFICATION_VALIDATION_MODULUS = 5
# Examples per split (checked by tests/test_classification_task.py).
PLAY_CLASSIFICATION_NUM_EXAMPLES = {"train": 3956, "validation": 1005}

# A speaker label: 'Ham. ', '1 Citizen. ', 'LADY MACBETH. ', 'DUKE and SENATORS. ',
# 'FERDINAND, MIRANDA. ' or, in the Midsummer Night's Dream text, a bare 'THESEUS '
# before a capitalised word or a quotation.
_LABEL_WITH_STOP = re.compile(
    r"^((?:\d+ )?[A-Z][A-Za-z'\-]*(?:,? (?:[A-Z][A-Za-z'\-]*|and|of|the|de|to))*)\. *(?=\S)")
_LABEL_IN_CAPITALS = re.compile(
    r"^((?:\d+ )?[A-Z][A-Z'\-]+(?:,? [A-Z][A-Z'\-]+)*) +(?=[A-Z'\"])")
_MAX_LABEL_WORDS = 4


def strip_speaker_label(paragraph: str) -> str:
    """The speech without its leading speaker label ('Ham. To be' -> 'To be').

    A heuristic for this corpus, whose plays write labels differently ('Ham.',
    'HAMLET.', 'THESEUS'): left in, the label style alone would give the play away.
    Paragraphs without a label (a speech continued after a stage direction) are
    returned unchanged.
    """
    for pattern in (_LABEL_WITH_STOP, _LABEL_IN_CAPITALS):
        m = pattern.match(paragraph)
        if m and len(m.group(1).split()) <= _MAX_LABEL_WORDS:
            return paragraph[m.end():]
    return paragraph


@functools.cache
def _play_index() -> dict[str, tuple[str, int, int, int]]:
    """work -> (corpus file, first line, number of lines, crc32)."""
    rows = PLAYS_INDEX_PATH.read_text(encoding="utf-8").splitlines()[1:]
    index = {}
    for row in rows:
        work, file, first, num, crc = row.split("\t")
        index[work] = (file, int(first), int(num), int(crc))
    return index


@functools.cache
def _corpus_lines(file: str) -> tuple[str, ...]:
    with gzip.open(vocabularies.CORPUS_DIR / file, "rt", encoding="utf-8") as f:
        return tuple(f.read().splitlines())


def work_paragraphs(work: str) -> list[str]:
    """The paragraphs of one shipped work, in order (e.g. 'hamlet').

    Raises:
      ValueError: for an unknown work (listing the known ones), or when the corpus
        no longer matches the index (rebuild it with
        scripts/build_play_classification.py).
    """
    index = _play_index()
    if work not in index:
        raise ValueError(f"no work {work!r} in {PLAYS_INDEX_PATH.name}; works: "
                         f"{', '.join(sorted(index))}")
    file, first, num, crc = index[work]
    paras = list(_corpus_lines(file)[first:first + num])
    if len(paras) != num or zlib.crc32("\n".join(paras).encode("utf-8")) != crc:
        raise ValueError(
            f"{file} lines {first}..{first + num} no longer hold {work!r} as "
            f"{PLAYS_INDEX_PATH.name} says; rebuild the index with "
            "scripts/build_play_classification.py")
    return paras


def play_classification_split(text: str) -> str:
    """"train" or "validation": the fixed rule crc32(text) % 5 == 0 -> validation."""
    crc = zlib.crc32(text.encode("utf-8"))
    return "validation" if crc % PLAY_CLASSIFICATION_VALIDATION_MODULUS == 0 else "train"


@functools.cache
def play_classification_examples(split: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(texts, labels) of one split of `shakespeare_play_classification`.

    Speeches of the `PLAY_CLASSIFICATION_LABELS` plays, speaker labels stripped,
    of at least `PLAY_CLASSIFICATION_MIN_WORDS` words; a text found in two plays is
    dropped (its label is ambiguous) and repeats within a play are kept once. Ordered
    by a hash of the text, so that plays are interleaved: an unshuffled eval of the
    first N examples sees every class.
    """
    if split not in ("train", "validation"):
        raise ValueError(f"split {split!r} is not 'train' or 'validation'")
    plays_of: dict[str, set[int]] = {}
    ordered: list[tuple[str, int]] = []
    for label, work in enumerate(PLAY_CLASSIFICATION_LABELS):
        for para in work_paragraphs(work):
            text = strip_speaker_label(para)
            if len(text.split()) < PLAY_CLASSIFICATION_MIN_WORDS:
                continue
            if text not in plays_of:
                plays_of[text] = set()
                ordered.append((text, label))
            plays_of[text].add(label)
    kept = [(t, y) for t, y in ordered
            if len(plays_of[t]) == 1 and play_classification_split(t) == split]
    kept.sort(key=lambda ty: zlib.crc32(b"order:" + ty[0].encode("utf-8")))
    return tuple(t for t, _ in kept), tuple(y for _, y in kept)


def _play_classification_dataset(split: str, shuffle_files: bool = False,
                                 seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # one in-memory "file"; the Task's buffer shuffles it all
    texts, labels = play_classification_examples(split)
    return tf.data.Dataset.from_tensor_slices(
        {"text": np.array(texts, dtype=object), "label": np.array(labels, np.int32)})


def play_classification_output_features(vocabulary: seqio.Vocabulary,
                                        ) -> dict[str, seqio.Feature]:
    """"inputs" ([CLS] tokens EOS) and "label", an int32 scalar (rank 0) class id.

    seqio has no integer-feature type; a `PassThroughVocabulary` of the number of
    classes with rank=0 and add_eos=False passes the id through `tokenize` unchanged
    and satisfies the Task's dtype and rank checks.
    """
    return {
        "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True),
        "label": seqio.Feature(
            vocabulary=seqio.PassThroughVocabulary(size=len(PLAY_CLASSIFICATION_LABELS)),
            add_eos=False, dtype=tf.int32, rank=0),
    }


def num_play_classes() -> int:
    """Classes of `shakespeare_play_classification` (for a classifier head's size)."""
    return len(PLAY_CLASSIFICATION_LABELS)


def play_classification_metric(targets: Sequence[int], predictions: Sequence[int],
                               ) -> dict[str, float]:
    """seqio-style metric fn: accuracy and per-play counts and accuracies."""
    return metrics.classification_accuracy(targets, predictions,
                                           label_names=PLAY_CLASSIFICATION_LABELS)


def register_play_classification_task(
        name: str = SHAKESPEARE_PLAY_CLASSIFICATION,
        vocabulary: seqio.Vocabulary | None = None) -> seqio.Task:
    """Which play a speech comes from (6 classes, `PLAY_CLASSIFICATION_LABELS`).

    The examples are built at load time from the shipped corpus and its work index
    (`play_classification_examples`). No metric fns are attached: seqio's Evaluator
    reads a "targets" sequence; score predictions with `play_classification_metric`.
    """
    vocabulary = vocabulary or vocabularies.get_vocabulary("shakespeare_spm")
    source = seqio.FunctionDataSource(
        dataset_fn=_play_classification_dataset, splits=("train", "validation"),
        num_input_examples=PLAY_CLASSIFICATION_NUM_EXAMPLES)
    return _add_task(
        name, source=source,
        preprocessors=[
            functools.partial(preprocessors.rekey,
                              key_map={"inputs": "text", "label": "label"}),
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),
            preprocessors.prepend_cls,
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=play_classification_output_features(vocabulary),
        # More than a split holds: the source is in play order, so a smaller
        # buffer would give batches of one play.
        shuffle_buffer_size=16384)


def register_lm_and_mlm_tasks() -> None:
    """Registers the decoder-only and encoder-only tasks of this module (idempotent)."""
    spm = vocabularies.get_vocabulary("shakespeare_spm")
    t5_spm = vocabularies.get_vocabulary("t5_c4_spm")
    register_lm_task(SHAKESPEARE_LM, shakespeare_source(), spm, text_key=None)
    register_lm_task(SHAKESPEARE_LM_BYTE, shakespeare_source(),
                     vocabularies.get_vocabulary("byte"), text_key=None)
    register_lm_task(C4_LM, c4_source("3.1.0"), t5_spm)
    register_prefix_lm_task(SHAKESPEARE_PREFIX_LM, shakespeare_source(), spm, text_key=None)
    register_prefix_lm_task(C4_PREFIX_LM, c4_source("3.1.0"), t5_spm)
    register_mlm_task(SHAKESPEARE_MLM, shakespeare_source(), spm, text_key=None)
    register_mlm_task(SHAKESPEARE_MLM_WWM, shakespeare_source(), spm, text_key=None,
                      whole_word=True)
    register_mlm_task(C4_MLM, c4_source("3.1.0"), t5_spm)
    register_play_classification_task(SHAKESPEARE_PLAY_CLASSIFICATION, spm)


register_tasks()

"""seqio Task registrations (run on `import t5x_like.data`; safe to run again).

Registered here:

  shakespeare_span_corruption       shipped corpus, shipped SentencePiece vocab (8100 ids)
  shakespeare_span_corruption_byte  shipped corpus, ByteVocabulary (359 ids, no file)
  c4_span_corruption                TFDS c4/en:3.1.0, shipped SentencePiece vocab
  c4_v220_span_corruption           TFDS c4/en:2.2.0 (the T5 paper's version), same

All are T5's span corruption with features "inputs" and "targets" (EOS appended to
both); splits "train" and "validation". The C4 tasks read TFDS data already prepared
under the TFDS data dir (`TFDS_DATA_DIR` or ~/tensorflow_datasets) and never try to
download or build it (C4 takes an Apache Beam job).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
    register_span_corruption_task(C4_SPAN_CORRUPTION, c4_source("3.1.0"), spm)
    register_span_corruption_task(C4_V220_SPAN_CORRUPTION, c4_source("2.2.0"), spm)


register_tasks()

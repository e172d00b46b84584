"""Decoder-only tasks: next-token LM (shakespeare_lm, _byte, c4_lm) and prefix LM
(shakespeare_prefix_lm, c4_prefix_lm), checked through the registered tasks against
the corpus text tokenized directly."""

import gzip
import itertools

import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds

from t5x_like import data
from t5x_like.data import vocabularies

EOS = 1


def _validation_paragraphs() -> list[str]:
    with gzip.open(vocabularies.SHAKESPEARE_VALIDATION_PATTERN, "rt", encoding="utf-8") as f:
        return f.read().splitlines()


@pytest.fixture(scope="module")
def spm_stream() -> list[list[int]]:
    """Each validation paragraph tokenized by the vocabulary itself, EOS appended."""
    vocab = data.get_vocabulary("shakespeare_spm")
    return [[*vocab.encode(p), EOS] for p in _validation_paragraphs()]


def _flat(lists) -> list[int]:
    return list(itertools.chain.from_iterable(lists))


def _examples(name, lengths, seed=0, split="validation"):
    ds = seqio.get_mixture_or_task(name).get_dataset(lengths, split=split, shuffle=False,
                                                     seed=seed)
    return list(ds.as_numpy_iterator())


def test_lm_tasks_are_registered_with_targets_only():
    for name in ("shakespeare_lm", "shakespeare_lm_byte", "c4_lm"):
        task = seqio.get_mixture_or_task(name)
        assert set(task.output_features) == {"targets"}
        assert task.output_features["targets"].add_eos
        assert task.splits == ("train", "validation")
    assert seqio.get_mixture_or_task("shakespeare_lm_byte").output_features[
        "targets"].vocabulary.vocab_size == 359


def test_lm_chunks_cover_every_paragraph_token(spm_stream):
    length = 24
    chunks = [ex["targets"].tolist() for ex in _examples("shakespeare_lm", {"targets": length})]
    # Concatenated, the chunks are exactly the tokenized split: nothing truncated away.
    assert _flat(chunks) == _flat(spm_stream)
    # Long paragraphs are cut into full-length chunks; EOS only at a paragraph's end.
    assert all(1 <= len(c) <= length for c in chunks)
    for c in chunks:
        assert EOS not in c[:-1]
        assert len(c) == length or c[-1] == EOS
    assert sum(c[-1] == EOS for c in chunks) == len(spm_stream)
    assert len(chunks) == sum(-(-len(p) // length) for p in spm_stream)  # ceil per paragraph
    assert max(len(p) for p in spm_stream) > 4 * length  # the split did cut long speeches


def test_lm_byte_task_decodes_to_the_text():
    paragraphs = _validation_paragraphs()
    vocab = data.get_vocabulary("byte")
    chunks = [ex["targets"].tolist()
              for ex in seqio.get_mixture_or_task("shakespeare_lm_byte").get_dataset(
                  {"targets": 64}, split="validation", shuffle=False).take(40)
              .as_numpy_iterator()]
    stream = _flat(chunks)
    first = stream[: stream.index(EOS)]
    assert vocab.decode(first) == paragraphs[0]
    assert len(first) == len(paragraphs[0].encode("utf-8"))


def test_lm_packs_every_token_with_the_lm_feature_converter(spm_stream):
    ds = data.get_dataset("shakespeare_lm", {"targets": 64}, split="validation", batch_size=8,
                          shuffle=False, feature_converter=seqio.LMFeatureConverter(pack=True),
                          drop_remainder=False)
    batches = list(ds.as_numpy_iterator())
    assert set(batches[0]) == {"decoder_target_tokens", "decoder_input_tokens",
                               "decoder_loss_weights", "decoder_segment_ids",
                               "decoder_positions"}
    weights = sum(int(b["decoder_loss_weights"].sum()) for b in batches)
    assert weights == sum(len(p) for p in spm_stream)
    rows = sum(len(b["decoder_loss_weights"]) for b in batches)
    assert weights / (rows * 64) > 0.75  # seqio's greedy packer fills ~80% here


def test_prefix_lm_splits_each_piece_into_nonempty_prefix_and_continuation(spm_stream):
    lengths = {"inputs": 16, "targets": 16}
    examples = _examples("shakespeare_prefix_lm", lengths, seed=0)
    stream = []
    for ex in examples:
        inputs, targets = ex["inputs"].tolist(), ex["targets"].tolist()
        assert 1 <= len(inputs) <= 16 and 1 <= len(targets) <= 16
        assert EOS not in inputs  # the EOS of a paragraph always ends a continuation
        assert EOS not in targets[:-1]
        stream += inputs + targets
    # inputs + targets, example after example, is exactly the tokenized split.
    assert stream == _flat(spm_stream)
    # The split point k of a piece of n tokens is uniform in [1, n - 1] (T5's prefix
    # LM): mean n / 2, variance ((n - 1)^2 - 1) / 12; the sum of the deviations must
    # lie within 5 standard deviations. Pieces of the longest length, 17 = 16 + 1, use
    # every split point.
    k = np.array([len(ex["inputs"]) for ex in examples])
    n = k + np.array([len(ex["targets"]) for ex in examples])
    assert abs((k - n / 2).sum()) < 5 * np.sqrt((((n - 1) ** 2 - 1) / 12).sum())
    assert (n == 17).sum() > 500
    assert set(k[n == 17]) == set(range(1, 17))


def test_prefix_lm_is_deterministic_per_seed():
    def split_points(seed):
        ds = seqio.get_mixture_or_task("shakespeare_prefix_lm").get_dataset(
            {"inputs": 16, "targets": 16}, split="validation", shuffle=False, seed=seed)
        return [len(ex["inputs"]) for ex in ds.take(50).as_numpy_iterator()]

    assert split_points(1) == split_points(1)
    assert split_points(1) != split_points(2)


def test_prefix_lm_with_the_prefix_lm_feature_converter():
    ds = data.get_dataset("shakespeare_prefix_lm", {"inputs": 32, "targets": 32},
                          split="validation", batch_size=2, shuffle=False,
                          feature_converter=seqio.PrefixLMFeatureConverter(pack=True))
    batch = next(ds.as_numpy_iterator())
    assert batch["decoder_target_tokens"].shape == (2, 64)
    # Loss on the continuation only, the prefix fully visible: per packed example the
    # two masks meet at one position, where the prefix's last token predicts the first
    # continuation token (seqio's convention).
    weights, causal = batch["decoder_loss_weights"], batch["decoder_causal_attention"]
    segments = [len(set(row[row > 0])) for row in batch["decoder_segment_ids"]]
    np.testing.assert_array_equal((weights * causal).sum(1), segments)
    assert weights.sum() > sum(segments)


@pytest.mark.parametrize("name,lengths", [("c4_lm", {"targets": 16}),
                                          ("c4_prefix_lm", {"inputs": 8, "targets": 8})])
def test_c4_lm_tasks_read_tfds_mock_data(name, lengths):
    with tfds.testing.mock_data(num_examples=5):
        examples = _examples(name, lengths)
    assert examples
    eos = 0
    for ex in examples:
        for key, length in lengths.items():
            assert 1 <= len(ex[key]) <= length
        eos += int((ex["targets"] == EOS).sum())
    assert eos == 5  # one EOS per document

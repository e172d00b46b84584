"""shakespeare_play_classification: the work index, labels, disjoint splits, the
ClassificationFeatureConverter and the accuracy metric."""

import collections
import gzip
import zlib

import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5x_like import data
from t5x_like.data import metrics, tasks, vocabularies
from t5x_like.data.feature_converters import ClassificationFeatureConverter

NAME = "shakespeare_play_classification"
CLS, EOS = 8098, 1
# Famous lines, each from one play: an independent check of the labels.
QUOTES = {
    "hamlet": "To be, or not to be",
    "lear": "Blow, winds, and crack your cheeks",
    "midsummer_nights_dream": "The course of true love never did run smooth",
    "othello": "Put out the light, and then put out the light",
    "romeo_and_juliet": "wherefore art thou Romeo",
    "tempest": "such stuff As dreams are made on",
}


@pytest.fixture(scope="module")
def splits():
    return {s: tasks.play_classification_examples(s) for s in ("train", "validation")}


def test_work_index_covers_the_corpus_exactly():
    rows = [r.split("\t") for r in tasks.PLAYS_INDEX_PATH.read_text().splitlines()[1:]]
    assert len(rows) == 42
    by_file = collections.defaultdict(list)
    for _work, file, first, num, _ in rows:
        by_file[file].append((int(first), int(num)))
    for file, ranges in by_file.items():
        with gzip.open(vocabularies.CORPUS_DIR / file, "rt", encoding="utf-8") as f:
            n_lines = len(f.read().splitlines())
        ranges.sort()
        ends = [0] + [a + n for a, n in ranges]
        assert [a for a, _ in ranges] == ends[:-1] and ends[-1] == n_lines, file
    assert sum(int(r[3]) for r in rows) == sum(tasks.SHAKESPEARE_NUM_EXAMPLES.values())
    for work, *_ in rows:
        tasks.work_paragraphs(work)  # every range matches its checksum
    assert tasks.work_paragraphs("hamlet")[0] == "Ber. Who's there?"
    assert tasks.work_paragraphs("macbeth")[0].startswith("FIRST WITCH. When shall we three")
    with pytest.raises(ValueError, match=r"no work 'hamlett' in plays\.tsv"):
        tasks.work_paragraphs("hamlett")


def test_speaker_labels_are_stripped():
    strip = tasks.strip_speaker_label
    assert strip("Ham. To be, or not to be") == "To be, or not to be"
    assert strip("LADY MACBETH. Out, damned spot!") == "Out, damned spot!"
    assert strip("THESEUS Now, fair Hippolyta") == "Now, fair Hippolyta"
    assert strip("1 Citizen. Clubs, bills, and partisans!") == "Clubs, bills, and partisans!"
    assert strip("DUKE and SENATORS. Dead?") == "Dead?"
    for speech in ("O Romeo, Romeo! wherefore art thou Romeo?", "How now, Ophelia!",
                   "Come hither, boy. If ever thou shalt love"):
        assert strip(speech) == speech


def test_sizes_labels_and_class_counts(splits):
    counts = {}
    for split, (texts, labels) in splits.items():
        assert len(texts) == len(labels) == tasks.PLAY_CLASSIFICATION_NUM_EXAMPLES[split]
        counts[split] = collections.Counter(tasks.PLAY_CLASSIFICATION_LABELS[y] for y in labels)
        assert all(len(t.split()) >= tasks.PLAY_CLASSIFICATION_MIN_WORDS for t in texts)
    print("class counts:", counts)
    assert set(counts["train"]) == set(counts["validation"]) == set(
        tasks.PLAY_CLASSIFICATION_LABELS)
    assert tasks.num_play_classes() == 6
    assert min(counts["train"].values()) > 300 and min(counts["validation"].values()) > 80
    # Labels: each famous line is found, once, under its own play.
    found = {}
    for texts, labels in splits.values():
        for text, label in zip(texts, labels):
            for play, quote in QUOTES.items():
                if quote in text:
                    assert play not in found, quote
                    found[play] = tasks.PLAY_CLASSIFICATION_LABELS[label]
    assert found == {play: play for play in QUOTES}


def test_splits_are_disjoint_by_the_fixed_rule(splits):
    train, validation = (set(splits[s][0]) for s in ("train", "validation"))
    assert not train & validation
    assert len(train) == len(splits["train"][0])  # no repeats within a split either
    for split, (texts, _) in splits.items():
        assert all((zlib.crc32(t.encode()) % 5 == 0) == (split == "validation") for t in texts)
    assert 0.15 < len(validation) / (len(train) + len(validation)) < 0.25


def test_task_yields_cls_tokens_eos_and_a_scalar_label(splits):
    task = seqio.get_mixture_or_task(NAME)
    assert task.output_features["label"].rank == 0
    vocab = data.get_vocabulary()
    texts, labels = splits["validation"]
    examples = list(task.get_dataset({"inputs": 64}, split="validation", shuffle=False)
                    .take(200).as_numpy_iterator())
    for ex, text, label in zip(examples, texts, labels):
        assert ex["label"].shape == () and ex["label"].dtype == np.int32
        assert ex["label"] == label
        inputs = ex["inputs"].tolist()
        assert inputs[0] == CLS and inputs[-1] == EOS and len(inputs) <= 64
        tokens = vocab.encode(text)
        assert inputs[1:-1] == tokens[:62]  # long speeches are cut, EOS kept


def test_get_dataset_with_the_classification_feature_converter():
    ds = data.get_dataset(NAME, {"inputs": 48}, split="train", batch_size=64, seed=0,
                          feature_converter=ClassificationFeatureConverter())
    batch = next(ds.as_numpy_iterator())
    assert batch["encoder_input_tokens"].shape == (64, 48)
    assert batch["classification_labels"].shape == (64,)
    assert (batch["encoder_input_tokens"][:, 0] == CLS).all()
    # The whole split is shuffled (the source is in play order): a batch mixes plays.
    assert len(set(batch["classification_labels"].tolist())) >= 4
    with pytest.raises(ValueError, match="ClassificationFeatureConverter cannot pack"):
        data.get_dataset(NAME, {"inputs": 48}, use_packing=True,
                         feature_converter_cls=ClassificationFeatureConverter)


def _hand_dataset(label_shape=()):
    return tf.data.Dataset.from_generator(
        lambda: iter([{"inputs": [CLS, 5, 6, EOS], "label": np.full(label_shape, 2, np.int32)},
                      {"inputs": [CLS, 7, 8, 9, EOS],
                       "label": np.full(label_shape, 0, np.int32)}]),
        output_signature={"inputs": tf.TensorSpec([None], tf.int32),
                          "label": tf.TensorSpec(label_shape, tf.int32)})


def test_classification_feature_converter_on_a_hand_example():
    converter = ClassificationFeatureConverter()
    rows = list(converter(_hand_dataset(), {"inputs": 6}).as_numpy_iterator())
    np.testing.assert_array_equal(rows[0]["encoder_input_tokens"], [CLS, 5, 6, EOS, 0, 0])
    assert rows[0]["classification_labels"] == 2
    np.testing.assert_array_equal(rows[1]["encoder_input_tokens"], [CLS, 7, 8, 9, EOS, 0])
    assert rows[1]["classification_labels"] == 0
    assert rows[0]["classification_labels"].shape == ()
    assert set(rows[0]) == {"encoder_input_tokens", "classification_labels"}
    assert converter.get_model_feature_lengths({"inputs": 6}) == {"encoder_input_tokens": 6}
    with pytest.raises(ValueError, match=r"takes task_feature_lengths \{'inputs': L\} only"):
        converter(_hand_dataset(), {"inputs": 6, "label": 1})
    with pytest.raises(ValueError, match="incorrect rank for feature 'label'"):
        converter(_hand_dataset(label_shape=(1,)), {"inputs": 6})
    # seqio's rule: inputs longer than the length are an error (the Task trims them).
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="has length not less than or equal to the expected length of 4"):
        list(converter(_hand_dataset(), {"inputs": 4}))


def test_classification_accuracy_metric():
    out = metrics.classification_accuracy([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2],
                                          label_names=("a", "b", "c", "d"))
    assert out == {
        "accuracy": pytest.approx(400 / 6), "num_examples": 6.0,
        "count/a": 2.0, "accuracy/a": 50.0, "count/b": 1.0, "accuracy/b": 100.0,
        "count/c": 3.0, "accuracy/c": pytest.approx(200 / 3),
        "count/d": 0.0, "accuracy/d": 0.0,
    }
    assert metrics.classification_accuracy([3, 1], [3, 3]) == {
        "accuracy": 50.0, "num_examples": 2.0, "count/1": 1.0, "accuracy/1": 0.0,
        "count/3": 1.0, "accuracy/3": 100.0}
    play = tasks.play_classification_metric([0, 5], [0, 4])
    assert play["accuracy"] == 50.0 and play["count/tempest"] == 1.0
    with pytest.raises(ValueError, match=r"target class 6 is not in \[0, 6\)"):
        tasks.play_classification_metric([6], [0])

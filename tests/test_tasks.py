"""seqio tasks, vocabularies, the shipped corpus, get_dataset, packing and metrics."""

import gzip
import importlib
import pathlib

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from t5x_like import data
from t5x_like.data import metrics, tasks, vocabularies

LENGTHS = {"inputs": 128, "targets": 32}  # random_spans_helper(128) == (141, 29)
ENC_DEC_PACKED = {
    "encoder_input_tokens", "encoder_segment_ids", "encoder_positions",
    "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
    "decoder_segment_ids", "decoder_positions",
}


@pytest.fixture
def temp_task_name():
    """A task name that is unregistered again after the test."""
    name = "test_tmp_span_corruption"
    yield name
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)


# ------------------------------------------------------------------- vocabularies


def test_vocabularies_follow_t5_ids():
    spm = data.get_vocabulary("shakespeare_spm")
    byte = data.get_vocabulary("byte")
    assert spm.vocab_size == vocabularies.SHAKESPEARE_SPM_VOCAB_SIZE == 8100
    assert byte.vocab_size == vocabularies.BYTE_VOCAB_SIZE == 359
    for v in (spm, byte):
        assert (v.pad_id, v.eos_id, v.unk_id) == (0, 1, 2)
        assert v.extra_ids == 100
    assert spm.decode([8099]) == "<extra_id_0>" and spm.decode([8000]) == "<extra_id_99>"
    assert data.get_vocabulary() is spm  # shared instance


def test_vocabulary_round_trips_english():
    spm = data.get_vocabulary()
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind"
    ids = spm.encode(text)
    assert spm.decode(ids) == text
    assert len(ids) < 1.5 * len(text.split())  # common words are single pieces
    assert spm.decode(spm.encode("café")) == "café"  # byte fallback, no unk


def test_unknown_vocabulary_lists_known_ones():
    with pytest.raises(ValueError, match="unknown vocabulary 'gpt2'; known vocabularies: "
                                         "shakespeare_spm, byte"):
        data.get_vocabulary("gpt2")


# ------------------------------------------------------------------ shipped corpus


def test_corpus_files_match_declared_sizes():
    counts = {}
    for split, pattern in [("train", vocabularies.SHAKESPEARE_TRAIN_PATTERN),
                           ("validation", vocabularies.SHAKESPEARE_VALIDATION_PATTERN)]:
        files = tf.io.gfile.glob(pattern)
        assert files, pattern
        counts[split] = 0
        for f in files:
            with gzip.open(f, "rt") as lines:
                counts[split] += sum(1 for _ in lines)
    assert counts == tasks.SHAKESPEARE_NUM_EXAMPLES
    assert 0.03 < counts["validation"] / sum(counts.values()) < 0.06


# ----------------------------------------------------------------------- the tasks


def test_tasks_are_registered_and_reregistering_is_harmless():
    names = set(seqio.TaskRegistry.names())
    assert {"shakespeare_span_corruption", "shakespeare_span_corruption_byte",
            "c4_span_corruption", "c4_v220_span_corruption"} <= names
    # Reloading re-executes the module in place, giving every function a new identity.
    # Put the original namespace back afterwards: gin's dynamic registration (e.g.
    # `@tasks.num_play_classes()` in a quickstart gin file parsed by another test in
    # this worker) refuses a second, different function under the same name.
    namespace = dict(vars(tasks))
    try:
        importlib.reload(tasks)  # runs every registration a second time
        assert seqio.get_mixture_or_task("shakespeare_span_corruption").splits == (
            "train", "validation")
    finally:
        vars(tasks).clear()
        vars(tasks).update(namespace)


@pytest.mark.parametrize("name,vocab", [("shakespeare_span_corruption", "shakespeare_spm"),
                                        ("shakespeare_span_corruption_byte", "byte")])
def test_shakespeare_task_yields_span_corrupted_english(name, vocab):
    task = seqio.get_mixture_or_task(name)
    v = data.get_vocabulary(vocab)
    examples = list(task.get_dataset(LENGTHS, split="validation", shuffle=False, seed=0)
                    .take(4).as_numpy_iterator())
    for ex in examples:
        assert {"inputs", "targets"} <= set(ex)
        # Concatenated paragraphs fill the inputs exactly: 141 raw tokens ->
        # 120 kept + 7 sentinels + EOS = 128; targets 21 noise + 7 sentinels + EOS.
        assert len(ex["inputs"]) == 128 and len(ex["targets"]) == 29
        assert ex["inputs"][-1] == ex["targets"][-1] == 1
        assert ex["targets"][0] == v.vocab_size - 1
        assert v.vocab_size - 1 in ex["inputs"]
    text = " ".join(v.decode(ex["inputs"].tolist()) for ex in examples)
    words = text.lower().split()
    assert {"the", "and"} <= set(words), text


def test_get_dataset_packs_enc_dec_features():
    ds = data.get_dataset("shakespeare_span_corruption", LENGTHS, split="validation",
                          batch_size=2, shuffle=True, seed=0, use_packing=True)
    batch = next(ds.as_numpy_iterator())
    assert set(batch) == ENC_DEC_PACKED
    for k, v in batch.items():
        assert v.shape == (2, 128 if k.startswith("encoder") else 32), k
    # Span-corrupted inputs are always full, so each row holds one example.
    np.testing.assert_array_equal(batch["encoder_positions"][0], np.arange(128))


def test_enc_dec_packing_segment_ids_and_positions():
    # Short real lines, so that several pack into one row.
    vocab = data.get_vocabulary()
    lines = ["Ber. Who's there?", "Fran. Nay, answer me: stand, and unfold yourself.",
             "Ber. Long live the king!", "Fran. Bernardo?", "Ber. He."]
    toks = [[*vocab.encode(s), 1] for s in lines]
    ds = tf.data.Dataset.from_generator(
        lambda: ({"inputs": t, "targets": [*t[::-1][1:], 1]} for t in toks),
        output_signature={"inputs": tf.TensorSpec([None], tf.int32),
                          "targets": tf.TensorSpec([None], tf.int32)})
    packed = seqio.EncDecFeatureConverter(pack=True)(ds, {"inputs": 64, "targets": 64})
    row = next(packed.as_numpy_iterator())
    assert set(row) == ENC_DEC_PACKED
    seg, pos = row["encoder_segment_ids"], row["encoder_positions"]
    lengths = [len(t) for t in toks]
    expected_seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
    expected_pos = np.concatenate([np.arange(n) for n in lengths])
    n = len(expected_seg)
    np.testing.assert_array_equal(seg[:n], expected_seg)
    np.testing.assert_array_equal(pos[:n], expected_pos)
    assert not seg[n:].any() and not row["encoder_input_tokens"][n:].any()
    np.testing.assert_array_equal(row["encoder_input_tokens"][:n], np.concatenate(toks))
    # Decoder inputs are the targets shifted right within each segment: 0 opens each.
    dseg = row["decoder_segment_ids"]
    starts = np.flatnonzero(np.diff(np.concatenate([[0], dseg])) != 0)
    starts = starts[dseg[starts] > 0]
    assert (row["decoder_input_tokens"][starts] == 0).all()
    assert (row["decoder_positions"][starts] == 0).all()
    np.testing.assert_array_equal(row["decoder_loss_weights"], (dseg > 0).astype(int))


def test_get_dataset_is_deterministic_and_sharded():
    def first(**kw):
        ds = data.get_dataset("shakespeare_span_corruption", LENGTHS, split="validation",
                              batch_size=2, use_packing=False, check_nonempty=False, **kw)
        return next(ds.as_numpy_iterator())["encoder_input_tokens"]

    np.testing.assert_array_equal(first(seed=1), first(seed=1))
    assert not np.array_equal(first(seed=1), first(seed=2))
    shard0 = first(shuffle=False, num_shards=2, shard_id=0)
    shard1 = first(shuffle=False, num_shards=2, shard_id=1)
    assert not np.array_equal(shard0, shard1)


def test_c4_task_reads_tfds_mock_data():
    with tfds.testing.mock_data(num_examples=6):
        ds = data.get_dataset("c4_span_corruption", {"inputs": 64, "targets": 14},
                              split="validation", batch_size=2, shuffle=False,
                              use_packing=False)
        batch = next(ds.as_numpy_iterator())
    assert batch["encoder_input_tokens"].shape == (2, 64)
    assert batch["decoder_target_tokens"].shape == (2, 14)
    assert batch["decoder_target_tokens"][0, 0] == 8099


# ------------------------------------------------------------------------- errors


def test_task_without_examples_raises_a_clear_error(tmp_path, temp_task_name):
    empty = tmp_path / "empty.txt.gz"
    with gzip.open(empty, "wt"):
        pass
    source = seqio.FileDataSource(read_file_fn=tasks.read_gzip_text_lines,
                                  split_to_filepattern={"train": str(empty)})
    data.register_span_corruption_task(temp_task_name, source, data.get_vocabulary(),
                                       text_key=None)
    with pytest.raises(ValueError, match=f"task '{temp_task_name}' yields no examples "
                                         "for split 'train'.*check the files"):
        data.get_dataset(temp_task_name, LENGTHS, split="train", batch_size=2)


def test_missing_tfds_data_raises_a_clear_error(tmp_path, temp_task_name):
    source = tasks.TfdsSource(tfds_name="c4/en:3.1.0", tfds_data_dir=str(tmp_path),
                              splits=("train",), read_only=True)
    data.register_span_corruption_task(temp_task_name, source, data.get_vocabulary())
    with pytest.raises(ValueError, match=r"could not read split 'train'.*check that the "
                                         r"TFDS dataset 'c4/en:3\.1\.0' is prepared under"):
        data.get_dataset(temp_task_name, LENGTHS, split="train", batch_size=2)


def test_unknown_task_and_split_errors():
    with pytest.raises(ValueError, match="no seqio task or mixture is registered as "
                                         "'shakespeare_span_corruptoin'; did you mean "
                                         "'shakespeare_span_corruption'"):
        data.get_dataset("shakespeare_span_corruptoin", LENGTHS)
    with pytest.raises(ValueError, match="has no split 'test'; its splits: train, "
                                         "validation"):
        data.get_dataset("shakespeare_span_corruption", LENGTHS, split="test")


def test_task_and_model_vocabularies_must_agree(tmp_path):
    spm = data.get_vocabulary("shakespeare_spm")
    same_file = seqio.SentencePieceVocabulary(spm.sentencepiece_model_file, spm.extra_ids)
    data.check_vocabularies("shakespeare_lm", spm, spm)
    data.check_vocabularies("shakespeare_lm", same_file, same_file)  # equal, not identical
    # A converted checkpoint's copy of the same model, without sentinels (HF tokenizers).
    copy = tmp_path / "tokenizer.model"
    copy.write_bytes(pathlib.Path(spm.sentencepiece_model_file).read_bytes())
    hf_like = seqio.SentencePieceVocabulary(str(copy), extra_ids=0)
    data.check_vocabularies("shakespeare_lm", hf_like, hf_like)
    # Other pieces: a SentencePiece model trained here on a few lines.
    import sentencepiece

    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"line {i} of some other text, word{i % 7}" for i in range(200)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(tmp_path / "other"), vocab_size=40,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    other = seqio.SentencePieceVocabulary(str(tmp_path / "other.model"))
    with pytest.raises(ValueError, match=r"'shakespeare_lm' tokenises 'targets' with "
                                         r"SentencePieceVocabulary\('.*spm_shakespeare"
                                         r"\.model', 8100 ids\) but the model uses "
                                         r"SentencePieceVocabulary\('.*other\.model', 40 ids"):
        data.check_vocabularies("shakespeare_lm", other, other)
    data.check_vocabularies("shakespeare_lm_byte", data.get_vocabulary("byte"),
                            seqio.ByteVocabulary(extra_ids=100))
    with pytest.raises(ValueError, match=r"'shakespeare_lm_byte' tokenises 'targets' with "
                                         r"ByteVocabulary\(359 ids\) but the model uses "
                                         r"SentencePieceVocabulary\('.*', 8100 ids\); give "
                                         r"the model the task's vocabulary \(the "
                                         r"VOCABULARY_NAME macro"):
        data.check_vocabularies("shakespeare_lm_byte", spm, spm)
    with pytest.raises(ValueError, match="no seqio task or mixture is registered as 'nope'"):
        data.check_vocabularies("nope", spm, spm)


def test_training_on_a_task_of_another_vocabulary_fails_before_building(tmp_path):
    from t5x_like import main

    with pytest.raises(ValueError, match="'shakespeare_lm_byte' tokenises 'targets' with "
                                         "ByteVocabulary"):
        main.main(["--gin_file=experiments/quickstart_llama.gin",
                   f"--gin.MODEL_DIR='{tmp_path}'",
                   "--gin.MIXTURE_OR_TASK_NAME='shakespeare_lm_byte'"])
    assert not (tmp_path / "checkpoints").exists()


# ------------------------------------------------------------------------ metrics


def test_span_corruption_metrics():
    targets = ["<extra_id_0> a b<extra_id_1> c", "<extra_id_0> d", "x y z"]
    predictions = ["<extra_id_0> a b <extra_id_1> e", "<extra_id_0> d ", "x y"]
    assert metrics.sequence_accuracy(targets, predictions) == {
        "sequence_accuracy": pytest.approx(100 / 3)}
    # tokens: [<0> a b<1> c] vs [<0> a b <1> e]: 2 of 5; [<0> d]: 2 of 2; [x y z]: 2 of 3
    assert metrics.token_accuracy(targets, predictions) == {
        "token_accuracy": pytest.approx(100 * 6 / 10)}
    # spans: [a b, c] vs [a b, e]; [d] vs [d]; [x y z] vs [x y] -> 2 of 4
    assert metrics.span_accuracy(targets, predictions) == {"span_accuracy": 50.0}
    assert metrics.token_accuracy([[5, 6, 7]], [np.array([5, 6])]) == {
        "token_accuracy": pytest.approx(200 / 3)}
    with pytest.raises(ValueError, match="got 1 targets but 2 predictions"):
        metrics.sequence_accuracy(["a"], ["a", "b"])

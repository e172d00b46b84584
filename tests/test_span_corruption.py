"""T5 span corruption (t5x_like.data.preprocessors): lengths, mask statistics,
sentinels, exact reconstruction and determinism."""

import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5x_like.data import preprocessors as prep
from t5x_like.data import vocabularies

VOCAB = vocabularies.get_vocabulary("shakespeare_spm")  # 8100 ids, sentinels 8000..8099
V = VOCAB.vocab_size
FEATURES = {
    "inputs": seqio.Feature(VOCAB, add_eos=True, required=False),
    "targets": seqio.Feature(VOCAB, add_eos=True),
}


def _seeds(i: int) -> tf.Tensor:
    return tf.constant([[i, 7], [i, 11]], tf.int32)  # [2, 2]: two stateless seeds


def _spans(mask: np.ndarray) -> list[int]:
    """Lengths of the runs of True in a boolean mask."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))  # starts and ends alternate
    return list(edges[1::2] - edges[0::2])


def _reconstruct(inputs: np.ndarray, targets: np.ndarray) -> list[int]:
    """Undoes span corruption: each sentinel in inputs -> its span from targets."""
    span_of, current = {}, None
    for t in targets:
        if t >= V - vocabularies.NUM_EXTRA_IDS:
            current = int(t)
            span_of[current] = []
        else:
            span_of[current].append(int(t))
    out = []
    for t in inputs:
        out.extend(span_of[int(t)] if t >= V - vocabularies.NUM_EXTRA_IDS else [int(t)])
    return out


def test_random_spans_helper_gives_t5_paper_lengths():
    assert prep.random_spans_helper(512) == (568, 114)
    assert prep.random_spans_helper(inputs_length=512, noise_density=0.15,
                                    mean_noise_span_length=3.0,
                                    extra_tokens_per_span_inputs=1,
                                    extra_tokens_per_span_targets=1) == (568, 114)


@pytest.mark.parametrize("inputs_length", [32, 64, 128, 256, 1024])
def test_random_spans_helper_is_the_largest_raw_length_that_fits(inputs_length):
    def corrupted_inputs_length(tokens_length):
        noise = round(tokens_length * 0.15)
        return tokens_length - noise + round(noise / 3.0) + 1  # + sentinels + EOS

    tokens_length, _ = prep.random_spans_helper(inputs_length)
    assert corrupted_inputs_length(tokens_length) <= inputs_length
    assert corrupted_inputs_length(tokens_length + 1) > inputs_length


def test_noise_mask_statistics_match_density_and_mean_span_length():
    # 200 masks of the T5 raw length 568. The counts per mask are fixed by rounding
    # (round(568 * 0.15) = 85 noise tokens in round(85 / 3) = 28 spans), so the
    # density can miss 0.15 only by rounding, 0.5 / 568 < 0.001 (tolerance 0.002),
    # and the mean span length by the rounding of the span count, at most
    # 3 * 0.5 / 28 = 0.054 (tolerance 0.1). Placement is random: we also check that
    # span lengths vary and noise is spread evenly over the two halves (observed
    # share ~0.50; tolerance 0.05, many standard deviations for ~5600 spans).
    masks = np.stack([prep.random_spans_noise_mask(568, 0.15, _seeds(i)).numpy()
                      for i in range(200)])
    spans = [s for m in masks for s in _spans(m)]
    assert masks.shape == (200, 568)
    assert abs(masks.mean() - 0.15) < 0.002
    assert abs(np.mean(spans) - 3.0) < 0.1
    assert min(spans) == 1 and max(spans) >= 8 and len(set(spans)) >= 6
    assert abs(masks[:, :284].sum() / masks.sum() - 0.5) < 0.05
    # Spans alternate starting with non-noise, so every mask ends in noise.
    assert not masks[:, 0].any() and masks[:, -1].all()


@pytest.mark.parametrize("density,mean_span", [(0.3, 5.0), (0.05, 1.0), (0.5, 8.0)])
def test_noise_mask_respects_custom_density_and_span_length(density, mean_span):
    length = 1000
    masks = [prep.random_spans_noise_mask(length, density, _seeds(i),
                                          mean_noise_span_length=mean_span).numpy()
             for i in range(20)]
    spans = [s for m in masks for s in _spans(m)]
    num_spans = round(round(length * density) / mean_span)
    # Same rounding bounds as above, for these counts.
    assert abs(np.mean(masks) - density) < 0.001
    assert abs(np.mean(spans) - mean_span) <= mean_span * 0.5 / num_spans + 1e-6
    if mean_span == 1.0:
        assert set(spans) == {1}


def test_noise_mask_edge_cases():
    assert not prep.random_spans_noise_mask(50, 0.0, _seeds(0)).numpy().any()
    # One token: never all noise (length is raised to 2 internally, then cut back).
    assert prep.random_spans_noise_mask(1, 0.15, _seeds(0)).numpy().tolist() == [False]
    rolled = [prep.random_spans_noise_mask(20, 0.15, _seeds(i), random_roll=True).numpy()
              for i in range(30)]
    assert all(m.sum() == 3 for m in rolled)
    assert not all(m[-1] for m in rolled)  # rolling moves the span off the end


def test_sentinels_are_placed_in_descending_order_and_reconstruct_exactly():
    rng = np.random.default_rng(0)
    for i in range(50):
        tokens = tf.constant(rng.integers(3, 8000, size=568), tf.int32)
        mask = prep.random_spans_noise_mask(568, 0.15, _seeds(i))
        inputs = prep.noise_span_to_unique_sentinel(tokens, mask, VOCAB).numpy()
        targets = prep.nonnoise_span_to_unique_sentinel(tokens, mask, VOCAB).numpy()
        num_spans = len(_spans(mask.numpy()))

        in_sentinels = inputs[inputs >= 8000]
        np.testing.assert_array_equal(in_sentinels, V - 1 - np.arange(num_spans))
        # Each inputs sentinel sits where its noise span started: after the tokens
        # kept so far and the sentinels of the spans before it.
        m = mask.numpy()
        starts = np.flatnonzero(m & ~np.concatenate([[False], m[:-1]]))
        assert starts[0] > 0  # the first span never starts at 0
        kept_before = np.cumsum(~m)[starts - 1]
        np.testing.assert_array_equal(np.flatnonzero(inputs >= 8000),
                                      kept_before + np.arange(num_spans))
        assert targets[0] == V - 1  # targets open with the first sentinel
        np.testing.assert_array_equal(targets[targets >= 8000], in_sentinels)
        assert len(inputs) == 568 - 85 + 28 and len(targets) == 85 + 28
        assert _reconstruct(inputs, targets) == tokens.numpy().tolist()


def _corrupt(docs, seed, sequence_length=None, **kwargs):
    """Runs span_corruption + EOS over token docs; returns the examples as numpy."""
    sequence_length = sequence_length or {"inputs": 512, "targets": 114}
    ds = tf.data.Dataset.from_generator(
        lambda: ({"targets": d} for d in docs),
        output_signature={"targets": tf.TensorSpec([None], tf.int32)})
    with seqio.map_seed_manager(seed):  # what seqio.Task.get_dataset(seed=) does
        ds = prep.span_corruption(ds, sequence_length, FEATURES, **kwargs)
    ds = seqio.preprocessors.append_eos_after_trim(ds, FEATURES, sequence_length)
    return list(ds.as_numpy_iterator())


def _docs(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 8000, size=rng.integers(5, 400)).astype(np.int32)
            for _ in range(n)]


def test_span_corruption_pipeline_lengths_and_lossless_reconstruction():
    docs = _docs()
    examples = _corrupt(docs, seed=3)
    # Documents are concatenated, cut into 568-token pieces, then corrupted.
    assert len(examples) == -(-sum(len(d) for d in docs) // 568)
    for ex in examples[:-1]:
        assert len(ex["inputs"]) == 512 and len(ex["targets"]) == 114
    for ex in examples:
        assert ex["inputs"][-1] == VOCAB.eos_id and ex["targets"][-1] == VOCAB.eos_id
        assert ex["targets"][0] == V - 1
    rebuilt = [t for ex in examples
               for t in _reconstruct(ex["inputs"][:-1], ex["targets"][:-1])]
    assert rebuilt == np.concatenate(docs).tolist()


def test_span_corruption_respects_custom_density_and_span_length():
    docs = _docs(60, seed=1)
    lengths = {"inputs": 256, "targets": 128}
    tokens_length, targets_length = prep.random_spans_helper(
        256, noise_density=0.3, mean_noise_span_length=5.0)
    examples = _corrupt(docs, seed=0, sequence_length=lengths,
                        noise_density=0.3, mean_noise_span_length=5.0)
    full = examples[:-1]
    assert all(len(ex["targets"]) == targets_length for ex in full)
    noise = [len(ex["targets"]) - 1 - np.sum(ex["targets"] >= 8000) for ex in full]
    spans = [np.sum(ex["targets"] >= 8000) for ex in full]
    assert abs(np.sum(noise) / (tokens_length * len(full)) - 0.3) < 0.002
    assert abs(np.sum(noise) / np.sum(spans) - 5.0) < 0.2


def test_span_corruption_is_deterministic_given_the_seed():
    docs = _docs(10)
    a, b, c = _corrupt(docs, seed=5), _corrupt(docs, seed=5), _corrupt(docs, seed=6)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["targets"], y["targets"])
    assert any(not np.array_equal(x["inputs"], z["inputs"]) for x, z in zip(a, c, strict=True))


def test_split_tokens_and_select_random_chunk():
    ds = tf.data.Dataset.from_tensors({"targets": tf.range(1, 24)})
    with seqio.map_seed_manager(0):
        pieces = list(prep.split_tokens(ds, max_tokens_per_segment=10).as_numpy_iterator())
        chunks = list(prep.select_random_chunk(ds, FEATURES, max_length=10)
                      .as_numpy_iterator())
    assert [p["targets"].tolist() for p in pieces] == [
        list(range(1, 11)), list(range(11, 21)), [21, 22, 23]]
    # A chunk is one of the aligned pieces above.
    assert chunks[0]["targets"].tolist() in [p["targets"].tolist() for p in pieces]


def test_span_corruption_rejects_short_targets_and_too_many_spans():
    ds = tf.data.Dataset.from_tensors({"targets": tf.range(3, 100)})
    with pytest.raises(ValueError, match=r"targets of 114 tokens.*set the targets length "
                                         r"to 114"):
        prep.span_corruption(ds, {"inputs": 512, "targets": 100}, FEATURES)
    # 4096 inputs -> ~150 spans, more than the 100 sentinel ids.
    with pytest.raises(ValueError, match="only 100 sentinel ids"):
        prep.span_corruption(ds, {"inputs": 4096, "targets": 1024}, FEATURES)

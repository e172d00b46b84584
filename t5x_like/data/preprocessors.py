"""seqio preprocessors: text to features, T5's span corruption, next-token and prefix
LM, BERT's masked LM, and [CLS] for classification.

Span corruption (Raffel et al. 2019, section 3.1.4) follows T5's recipe
(`t5/data/preprocessors.py`), written here so that the project does not depend on the
`t5` package:

    select_random_chunk -> reduce_concat_tokens -> split_tokens -> denoise

Each raw segment of `tokens_length` tokens (568 for 512 inputs) gets a random noise
mask of ~15% of its tokens in spans of mean length 3; the inputs keep the non-noise
tokens with one sentinel per noise span, the targets hold the noise spans each led by
the same sentinel. Sentinels count down from the end of the vocabulary: the first span
of an example is `vocab_size - 1` (`<extra_id_0>`), the next `vocab_size - 2`, ...

Randomness comes only from stateless TF ops seeded by `seqio.map_over_dataset`, so a
pipeline built with a given seqio seed is reproducible, example for example. The
seeds are split exactly as T5 splits them.

The other objectives (sections below): `lm_chunks` (decoder-only next-token LM, every
token kept), `prefix_lm` (a text split at a random point into inputs and targets) and
`mlm` (BERT's 15% selection with 80/10/10 corruption, optionally of whole words).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import seqio
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE
Features = dict[str, tf.Tensor]
# (tokens [N], noise_mask [N] bool, vocabulary, seeds) -> tokens [M]
SpanFn = Callable[..., tf.Tensor]


# ----------------------------------------------------------------- text to features


def text_line_to_feature(dataset: tf.data.Dataset, feature_key: str = "targets",
                         ) -> tf.data.Dataset:
    """Turns a dataset of text lines (scalar tf.string) into `{feature_key: line}`."""
    return dataset.map(lambda line: {feature_key: line}, num_parallel_calls=AUTOTUNE)


def rekey(dataset: tf.data.Dataset, key_map: Mapping[str, str | None]) -> tf.data.Dataset:
    """Keeps only the features named in `key_map`, renamed `new: old`.

    A new key mapped to None (or "") becomes an empty string, as in T5.
    """
    def _rekey(x: Features) -> Features:
        return {new: x[old] if old else tf.constant("") for new, old in key_map.items()}

    return dataset.map(_rekey, num_parallel_calls=AUTOTUNE)


# ------------------------------------------------------------------- lengths (static)


def random_spans_helper(inputs_length: int = 512, noise_density: float = 0.15,
                        mean_noise_span_length: float = 3.0,
                        extra_tokens_per_span_inputs: int = 1,
                        extra_tokens_per_span_targets: int = 1) -> tuple[int, int]:
    """Raw length and targets length that make span-corrupted inputs exactly fit.

    Each noise span costs `extra_tokens_per_span_inputs` sentinels in the inputs and
    `extra_tokens_per_span_targets` in the targets; both get one EOS. Returns the
    largest raw `tokens_length` whose corrupted inputs fit in `inputs_length`, and
    the targets length it then produces (568 and 114 for 512, as in the T5 paper).
    """
    def lengths_after_noise(tokens_length: int) -> tuple[int, int]:
        num_noise = round(tokens_length * noise_density)
        num_spans = round(num_noise / mean_noise_span_length)
        inputs = tokens_length - num_noise + num_spans * extra_tokens_per_span_inputs + 1
        targets = num_noise + num_spans * extra_tokens_per_span_targets + 1
        return inputs, targets

    tokens_length = inputs_length - 1
    while lengths_after_noise(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = lengths_after_noise(tokens_length)
    # T5's tweak for prefix-LM-like densities: make targets no longer than inputs,
    # which are more likely to have been set to a round number.
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


# ---------------------------------------------------------------------- noise masks


def _random_segmentation(num_items: tf.Tensor, num_segments: tf.Tensor,
                         seed: tf.Tensor) -> tf.Tensor:
    """Random lengths [num_segments] of non-empty segments that sum to num_items.

    All such segmentations are equally likely: choose which num_segments - 1 of the
    num_items - 1 gaps between items start a new segment.
    """
    is_boundary = tf.cast(tf.range(num_items - 1) < num_segments - 1, tf.int32)
    is_boundary = seqio.stateless_shuffle(is_boundary, seed)
    first_in_segment = tf.pad(is_boundary, [[1, 0]])  # item 0 opens segment 0
    segment_id = tf.cumsum(first_in_segment)  # [num_items]
    return tf.math.segment_sum(tf.ones_like(segment_id), segment_id)


def random_spans_noise_mask(length: int | tf.Tensor, noise_density: float,
                            seeds: Sequence[tf.Tensor] | tf.Tensor,
                            mean_noise_span_length: float = 3.0,
                            random_roll: bool = False) -> tf.Tensor:
    """Boolean noise mask [length] made of random spans, T5's span-corruption mask.

    The counts are fixed, only their placement is random:
        num_noise_tokens = round(length * noise_density)
        num_noise_spans = round(num_noise_tokens / mean_noise_span_length)
    Non-noise and noise spans alternate, starting with non-noise (so the mask ends
    in noise); among masks with these counts every one is equally likely.

    Args:
      length: number of tokens (int or scalar int32 tensor).
      noise_density: fraction of tokens to mask.
      seeds: two stateless seeds, shape [2, 2] (noise and non-noise segmentation).
      mean_noise_span_length: mean length of a noise span.
      random_roll: roll the mask by a random offset so that a sequence too short
        for more than one span is not always masked at its end.
    """
    if noise_density == 0.0:
        return tf.zeros([length], tf.bool)
    orig_length = length
    length = tf.maximum(length, 2)  # so that both counts below can be positive
    num_noise = tf.cast(tf.round(tf.cast(length, tf.float32) * noise_density), tf.int32)
    num_noise = tf.clip_by_value(num_noise, 1, length - 1)
    num_spans = tf.cast(
        tf.round(tf.cast(num_noise, tf.float32) / mean_noise_span_length), tf.int32)
    num_spans = tf.maximum(num_spans, 1)

    noise_lengths = _random_segmentation(num_noise, num_spans, seeds[0])
    nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, seeds[1])
    # [num_spans, 2] -> [2 * num_spans]: nonnoise_0, noise_0, nonnoise_1, noise_1, ...
    span_lengths = tf.reshape(tf.stack([nonnoise_lengths, noise_lengths], axis=1), [-1])
    span_starts = tf.cumsum(span_lengths)[:-1]
    starts_here = tf.math.unsorted_segment_sum(tf.ones_like(span_starts), span_starts,
                                               length)
    span_index = tf.cumsum(starts_here)  # [length]; odd spans are noise
    mask = tf.equal(span_index % 2, 1)[:orig_length]

    if random_roll:
        # A third seed derived from the two (as T5 does), so the segmentation is kept.
        roll_seed = (seeds[0][0] + seeds[1][1], seeds[0][1] - seeds[1][0])
        offset = tf.random.stateless_uniform([], seed=roll_seed, minval=0,
                                             maxval=length, dtype=tf.int32)
        mask = tf.roll(mask, shift=offset, axis=0)
    return mask


# ----------------------------------------------------------- inputs / targets makers


def noise_span_to_unique_sentinel(tokens: tf.Tensor, noise_mask: tf.Tensor,
                                  vocabulary: seqio.Vocabulary,
                                  seeds: object = None) -> tf.Tensor:
    """Replaces each noise span with one sentinel; the k-th gets vocab_size - 1 - k.

    `seeds` is unused; it keeps the signature of the other denoise functions.
    """
    del seeds
    prev_is_noise = tf.pad(noise_mask[:-1], [[1, 0]])
    first_noise = tf.logical_and(noise_mask, tf.logical_not(prev_is_noise))
    later_noise = tf.logical_and(noise_mask, prev_is_noise)
    sentinel = (tf.cast(vocabulary.vocab_size, tokens.dtype)
                - tf.cumsum(tf.cast(first_noise, tokens.dtype)))
    tokens = tf.where(first_noise, sentinel, tokens)
    return tf.boolean_mask(tokens, tf.logical_not(later_noise))


def nonnoise_span_to_unique_sentinel(tokens: tf.Tensor, noise_mask: tf.Tensor,
                                     vocabulary: seqio.Vocabulary,
                                     seeds: object = None) -> tf.Tensor:
    """The targets of span corruption: each non-noise span becomes one sentinel."""
    return noise_span_to_unique_sentinel(tokens, tf.logical_not(noise_mask), vocabulary,
                                         seeds)


def drop_noise_tokens(tokens: tf.Tensor, noise_mask: tf.Tensor,
                      vocabulary: seqio.Vocabulary, seeds: object = None) -> tf.Tensor:
    """Keeps only the non-noise tokens (no sentinel)."""
    del vocabulary, seeds
    return tf.boolean_mask(tokens, tf.logical_not(noise_mask))


def drop_nonnoise_tokens(tokens: tf.Tensor, noise_mask: tf.Tensor,
                         vocabulary: seqio.Vocabulary, seeds: object = None) -> tf.Tensor:
    """Keeps only the noise tokens (no sentinel)."""
    del vocabulary, seeds
    return tf.boolean_mask(tokens, noise_mask)


# ------------------------------------------------------------ dataset-level helpers


def select_random_chunk(dataset: tf.data.Dataset,
                        output_features: Mapping[str, seqio.Feature],
                        max_length: int | None = None,
                        feature_key: str = "targets",
                        sequence_length: Mapping[str, int] | None = None,
                        uniform_random_start: bool = False,
                        min_length: int | None = None,
                        **unused_kwargs) -> tf.data.Dataset:
    """Keeps one random chunk of at most `max_length` tokens of each example.

    Empty examples are dropped and only `feature_key` is kept. Without
    `uniform_random_start` the chunk is one of the aligned pieces
    [0, L), [L, 2L), ... so that every token is equally likely to be kept.
    `max_length` defaults to `sequence_length[feature_key]`, less one for EOS.
    """
    if max_length is None and sequence_length is not None:
        max_length = sequence_length[feature_key]
        if output_features[feature_key].add_eos:
            max_length -= 1  # room for the EOS appended later
    if max_length is None:
        raise ValueError("select_random_chunk needs max_length or sequence_length")

    @seqio.map_over_dataset(num_seeds=1)
    def _chunk(x: Features, seed: tf.Tensor) -> Features:
        seeds = tf.unstack(tf.random.experimental.stateless_split(seed))
        tokens = x[feature_key]
        n_tokens = tf.shape(tokens)[0]
        if min_length is not None:
            length = tf.random.stateless_uniform([], minval=min_length, maxval=max_length,
                                                 dtype=tf.int32, seed=seeds[0])
        else:
            length = tf.constant(max_length, tf.int32)
        if uniform_random_start:
            start = tf.random.stateless_uniform([], minval=1 - length, maxval=n_tokens,
                                                dtype=tf.int32, seed=seeds[1])
            end = tf.minimum(start + length, n_tokens)
            start = tf.maximum(start, 0)
        else:
            num_chunks = (n_tokens + length - 1) // length  # ceil
            start = length * tf.random.stateless_uniform([], maxval=num_chunks,
                                                         dtype=tf.int32, seed=seeds[1])
            end = tf.minimum(start + length, n_tokens)
        return {feature_key: tokens[start:end]}

    dataset = dataset.filter(lambda x: tf.size(x[feature_key]) > 0)
    return _chunk(dataset)


def reduce_concat_tokens(dataset: tf.data.Dataset, feature_key: str = "targets",
                         batch_size: int = 128, **unused_kwargs) -> tf.data.Dataset:
    """Concatenates the tokens of each run of `batch_size` examples into one.

    Followed by `split_tokens`, this gives examples of exactly the wanted length
    (no padding) out of many short documents. Token id 0 (padding) is dropped.
    """
    dataset = dataset.map(lambda x: {feature_key: x[feature_key]},
                          num_parallel_calls=AUTOTUNE)
    dataset = dataset.padded_batch(batch_size, padded_shapes={feature_key: [-1]})

    def _flatten(x: Features) -> Features:
        tokens = tf.reshape(x[feature_key], [-1])  # [batch * longest]
        return {feature_key: tf.boolean_mask(tokens, tf.not_equal(tokens, 0))}

    return dataset.map(_flatten, num_parallel_calls=AUTOTUNE)


def split_tokens(dataset: tf.data.Dataset, max_tokens_per_segment: int,
                 min_tokens_per_segment: int | None = None,
                 feature_key: str = "targets", **unused_kwargs) -> tf.data.Dataset:
    """Splits each example into consecutive segments of `max_tokens_per_segment`.

    Only the last segment of an example may be shorter. With
    `min_tokens_per_segment`, each example's segment length is drawn log-uniformly
    from [min, max) instead.
    """
    @seqio.map_over_dataset(num_seeds=1)
    def _split(x: Features, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        tokens = x[feature_key]
        n_tokens = tf.shape(tokens)[0]
        if min_tokens_per_segment is None:
            length = tf.constant(max_tokens_per_segment, tf.int32)
        else:
            log_length = tf.random.stateless_uniform(
                [], minval=math.log(min_tokens_per_segment),
                maxval=math.log(max_tokens_per_segment), seed=seed)
            length = tf.cast(tf.exp(log_length), tf.int32)
        num_segments = (n_tokens + length - 1) // length  # ceil
        padding = num_segments * length - n_tokens
        padded = tf.pad(tokens, [[0, padding]])
        segments = tf.reshape(padded, [num_segments, length])  # [num_segments, length]
        segment_lengths = tf.concat(
            [tf.fill([num_segments - 1], length), [length - padding]], axis=0)
        return segments, segment_lengths

    dataset = dataset.filter(lambda x: tf.size(x[feature_key]) > 0)
    dataset = _split(dataset).unbatch()
    return dataset.map(lambda segment, n: {feature_key: segment[:n]},
                       num_parallel_calls=AUTOTUNE)


def split_tokens_to_inputs_length(dataset: tf.data.Dataset,
                                  sequence_length: Mapping[str, int],
                                  output_features: Mapping[str, seqio.Feature],
                                  **kwargs) -> tf.data.Dataset:
    """`split_tokens` into pieces of the inputs length (less one for EOS)."""
    max_tokens = sequence_length["inputs"]
    if output_features["inputs"].add_eos:
        max_tokens -= 1
    return split_tokens(dataset, max_tokens_per_segment=max_tokens, **kwargs)


def denoise(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature],
            noise_density: float, noise_mask_fn: Callable[..., tf.Tensor],
            inputs_fn: SpanFn, targets_fn: SpanFn | None = None,
            input_feature_key: str = "inputs", **unused_kwargs) -> tf.data.Dataset:
    """Makes (noisy inputs, targets) from the tokens in "targets".

    `noise_mask_fn(length, noise_density, seeds=[2 seeds])` picks the noise;
    `inputs_fn` / `targets_fn(tokens, noise_mask, vocabulary, seeds=[2 seeds])`
    render it (targets default to the clean tokens). The example's one seqio seed
    is split into six as in T5: two each for the mask, the inputs and the targets.
    """
    vocabulary = output_features["targets"].vocabulary
    if (input_feature_key in output_features
            and output_features[input_feature_key].vocabulary != vocabulary):
        raise ValueError(
            "denoise builds the inputs from the tokenized targets, so "
            f"'{input_feature_key}' and 'targets' must share one vocabulary")

    @seqio.map_over_dataset(num_seeds=1)
    def _denoise(x: Features, seed: tf.Tensor) -> Features:
        seeds = tf.random.experimental.stateless_split(seed, 6)  # [6, 2]
        tokens = x["targets"]
        noise_mask = noise_mask_fn(tf.size(tokens), noise_density, seeds=seeds[0:2])
        inputs = inputs_fn(tokens, noise_mask, vocabulary, seeds=seeds[2:4])
        targets = (targets_fn(tokens, noise_mask, vocabulary, seeds=seeds[4:6])
                   if targets_fn else tokens)
        return {input_feature_key: inputs, "targets": targets}

    return _denoise(dataset)


# ------------------------------------------------------------------ span corruption


def _check_sentinels(vocabulary: seqio.Vocabulary, tokens_length: int,
                     noise_density: float, mean_noise_span_length: float) -> None:
    extra_ids = getattr(vocabulary, "extra_ids", None)
    if not extra_ids:
        return
    num_noise = round(tokens_length * noise_density)
    num_spans = max(round(num_noise / mean_noise_span_length), 1)
    if num_spans > extra_ids:
        raise ValueError(
            f"span corruption of {tokens_length} raw tokens makes {num_spans} noise "
            f"spans but the vocabulary has only {extra_ids} sentinel ids; shorten the "
            "inputs, raise mean_noise_span_length, or use a vocabulary with more "
            "extra_ids")


def span_corruption(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                    output_features: Mapping[str, seqio.Feature],
                    mean_noise_span_length: float = 3.0, noise_density: float = 0.15,
                    input_feature_key: str = "inputs",
                    merge_examples_to_reduce_padding: bool = True,
                    reserved_for_packing: int | None = None) -> tf.data.Dataset:
    """T5's span-corruption objective as a seqio preprocessor (after tokenize).

    Reads tokens from "targets" and writes `input_feature_key` and "targets"
    without EOS (follow with `seqio.preprocessors.append_eos_after_trim`).

    Args:
      dataset: examples with tokenized "targets".
      sequence_length: must hold `input_feature_key` and "targets"; the targets
        length must be at least `random_spans_helper(...)[1]` (114 for 512).
      output_features: the task's features (the targets vocabulary gives sentinels).
      mean_noise_span_length: mean number of tokens per noise span.
      noise_density: fraction of the raw tokens that are noise.
      input_feature_key: where the corrupted sequence goes.
      merge_examples_to_reduce_padding: concatenate 128 documents at a time before
        splitting, so that nearly every example is full length.
      reserved_for_packing: leave this many input positions free for packing.
    """
    inputs_length = sequence_length[input_feature_key]
    if reserved_for_packing:
        inputs_length -= reserved_for_packing
    tokens_length, targets_length = random_spans_helper(
        inputs_length=inputs_length, noise_density=noise_density,
        mean_noise_span_length=mean_noise_span_length)
    if sequence_length["targets"] < targets_length:
        raise ValueError(
            f"span corruption of {inputs_length} input tokens (noise_density="
            f"{noise_density}, mean_noise_span_length={mean_noise_span_length}) makes "
            f"targets of {targets_length} tokens, but the targets length is "
            f"{sequence_length['targets']}; set the targets length to {targets_length}")
    _check_sentinels(output_features["targets"].vocabulary, tokens_length,
                     noise_density, mean_noise_span_length)

    dataset = select_random_chunk(dataset, output_features, max_length=65536,
                                  feature_key="targets")
    if merge_examples_to_reduce_padding:
        dataset = reduce_concat_tokens(dataset, feature_key="targets", batch_size=128)
    dataset = split_tokens(dataset, max_tokens_per_segment=tokens_length,
                           feature_key="targets")
    return denoise(
        dataset, output_features,
        noise_density=noise_density,
        noise_mask_fn=functools.partial(random_spans_noise_mask,
                                        mean_noise_span_length=mean_noise_span_length),
        inputs_fn=noise_span_to_unique_sentinel,
        targets_fn=nonnoise_span_to_unique_sentinel,
        input_feature_key=input_feature_key)


# ------------------------------------------------------------ language modelling


def split_tokens_evenly(dataset: tf.data.Dataset, max_tokens_per_segment: int,
                        feature_key: str = "targets") -> tf.data.Dataset:
    """Splits each example into the fewest segments of at most `max_tokens_per_segment`,
    their lengths differing by at most one (so no tiny last segment).

    [a b c d e f g] with 3 -> [a b c], [d e], [f g]. Empty examples are dropped.
    """
    def _split(x: Features) -> tuple[tf.Tensor, tf.Tensor]:
        tokens = x[feature_key]
        n_tokens = tf.shape(tokens)[0]
        num_segments = (n_tokens + max_tokens_per_segment - 1) // max_tokens_per_segment
        row_splits = tf.range(num_segments + 1) * n_tokens // num_segments  # [k + 1]
        segments = tf.RaggedTensor.from_row_splits(tokens, row_splits)
        return segments.to_tensor(), segments.row_lengths()  # [k, longest], [k]

    dataset = dataset.filter(lambda x: tf.size(x[feature_key]) > 0)
    dataset = dataset.map(_split, num_parallel_calls=AUTOTUNE).unbatch()
    return dataset.map(lambda segment, n: {feature_key: segment[:n]},
                       num_parallel_calls=AUTOTUNE)


def _append_eos_to_text(dataset: tf.data.Dataset, feature_key: str,
                        output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
    """Appends EOS to each whole tokenized text if the feature asks for one."""
    feature = output_features[feature_key]
    if not feature.add_eos:
        return dataset
    eos = tf.constant([feature.vocabulary.eos_id], tf.int32)

    def _append(x: Features) -> Features:
        return {**x, feature_key: tf.concat([tf.cast(x[feature_key], tf.int32), eos], 0)}

    return dataset.map(_append, num_parallel_calls=AUTOTUNE)


def lm_chunks(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
              output_features: Mapping[str, seqio.Feature],
              feature_key: str = "targets") -> tf.data.Dataset:
    """Next-token LM examples: each text, EOS appended, cut into chunks of the length.

    Nothing is truncated away: a text of n tokens (+ EOS) becomes ceil((n + 1) / L)
    consecutive chunks, all of exactly L = `sequence_length[feature_key]` tokens but
    the last, so concatenating a text's chunks gives back its tokens and one EOS. The
    EOS marks the real end of a text only; a chunk cut from the middle of a text
    does not end in EOS (T5's `split_tokens_to_targets_length` + `append_eos` would
    put a false end of text into every chunk). Run after `tokenize`, instead of
    `append_eos_after_trim`; meant for `seqio.LMFeatureConverter(pack=True)`.
    """
    dataset = _append_eos_to_text(dataset, feature_key, output_features)
    return split_tokens(dataset, max_tokens_per_segment=sequence_length[feature_key],
                        feature_key=feature_key)


def prefix_lm(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
              output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
    """T5's prefix-LM objective: a piece of text split at a random point.

    Each text (tokens in "targets", EOS appended when the targets feature has
    `add_eos`) is cut into the fewest pieces of at most min(inputs, targets length)
    + 1 tokens, of near-equal length (`split_tokens_evenly`). Each piece of n >= 2
    tokens is split after a prefix of k tokens, k uniform in [1, n - 1] (T5's
    `random_prefix_noise_mask` at noise density 0.5): "inputs" = the prefix,
    "targets" = the continuation, both non-empty; inputs + targets == the piece, and
    the EOS, only at the real end of a text, is always in the targets. A text of a
    single token (+ no EOS) cannot be split and is dropped.

    Deterministic for a seqio seed (stateless ops under `seqio.map_over_dataset`).
    Run after `tokenize`; the features need no EOS appended afterwards. Meant for
    `seqio.PrefixLMFeatureConverter`.
    """
    piece_length = min(sequence_length["inputs"], sequence_length["targets"]) + 1
    if piece_length < 3:
        raise ValueError(f"prefix_lm needs inputs and targets lengths >= 2, got "
                         f"{dict(sequence_length)}")
    dataset = _append_eos_to_text(dataset, "targets", output_features)
    dataset = split_tokens_evenly(dataset, piece_length, feature_key="targets")
    dataset = dataset.filter(lambda x: tf.size(x["targets"]) >= 2)

    @seqio.map_over_dataset(num_seeds=1)
    def _split(x: Features, seed: tf.Tensor) -> Features:
        tokens = x["targets"]
        n = tf.shape(tokens)[0]
        k = tf.random.stateless_uniform([], minval=1, maxval=n, dtype=tf.int32, seed=seed)
        return {"inputs": tokens[:k], "targets": tokens[k:]}

    return _split(dataset)


# ------------------------------------------------------------ BERT masked LM


class MlmIds(NamedTuple):
    """The special ids of masked LM in a T5-style vocabulary (see `mlm_special_ids`).

    [SEP] is the vocabulary's EOS. Ordinary ids are first_ordinary_id..last_ordinary_id,
    both included: only those are ever selected for prediction or drawn as random
    replacements.
    """

    cls_id: int
    mask_id: int
    first_ordinary_id: int
    last_ordinary_id: int


def mlm_special_ids(vocabulary: seqio.Vocabulary) -> MlmIds:
    """[CLS], [MASK] and the ordinary-id range of a T5-style vocabulary.

    T5 vocabularies (pad=0, eos=1, unk=2, sentinels at the end) have no [MASK] or
    [CLS]; their first two sentinels stand in: [MASK] = `<extra_id_0>` =
    vocab_size - 1 and [CLS] = `<extra_id_1>` = vocab_size - 2 (8099 and 8098 in the
    shipped vocabulary, 358 and 357 in ByteVocabulary(extra_ids=100)). Ordinary ids
    are those after pad/eos/unk and before the sentinels: 3..7999 (SentencePiece
    pieces, byte fallback included) and 3..258 (the 256 bytes).

    Raises:
      ValueError: for a vocabulary with fewer than two extra ids.
    """
    extra_ids = getattr(vocabulary, "extra_ids", 0) or 0
    if extra_ids < 2:
        raise ValueError(
            f"masked LM takes [MASK] and [CLS] from the last two sentinel ids, but the "
            f"vocabulary {vocabulary} has {extra_ids} extra ids; build it with "
            "extra_ids >= 2 (the shipped ones have 100)")
    size = vocabulary.vocab_size
    specials = [i for i in (vocabulary.pad_id, vocabulary.eos_id, vocabulary.unk_id)
                if i is not None]
    return MlmIds(cls_id=size - 2, mask_id=size - 1, first_ordinary_id=max(specials) + 1,
                  last_ordinary_id=size - extra_ids - 1)


def word_start_table(vocabulary: seqio.Vocabulary) -> np.ndarray:
    """[vocab_size] bool: does the id begin a word (a SentencePiece piece with '▁')?

    Pieces that are not ordinary (pad, eos, unk, sentinels) count as word starts;
    masked LM never selects them anyway.

    Raises:
      ValueError: for a vocabulary that is not SentencePiece (bytes have no word
        marks; whole-word masking needs one).
    """
    if not isinstance(vocabulary, seqio.SentencePieceVocabulary):
        raise ValueError(
            f"whole-word masking finds words by SentencePiece's '▁' mark, but the "
            f"vocabulary is {type(vocabulary).__name__}; use a SentencePieceVocabulary "
            "or whole_word=False")
    sp = vocabulary.tokenizer
    starts = np.ones([vocabulary.vocab_size], bool)
    ids = mlm_special_ids(vocabulary)
    for i in range(ids.first_ordinary_id, ids.last_ordinary_id + 1):
        starts[i] = sp.id_to_piece(i).startswith("▁")
    return starts


def _greedy_group_selection(group_lengths: tf.Tensor, budget: tf.Tensor) -> tf.Tensor:
    """BERT's rule over groups in (already random) order: take a group if it still
    fits in the budget, skip it otherwise. [G] lengths -> [G] bool taken."""
    counts = tf.scan(lambda count, n: tf.where(count + n <= budget, count + n, count),
                     group_lengths, initializer=tf.constant(0, tf.int32))
    previous = tf.concat([[0], counts[:-1]], 0)
    return counts > previous


def mlm_mask_tokens(tokens: tf.Tensor, seeds: tf.Tensor, ids: MlmIds,
                    noise_density: float = 0.15, mask_rate: float = 0.8,
                    random_rate: float = 0.1,
                    word_starts: np.ndarray | tf.Tensor | None = None,
                    ) -> tuple[tf.Tensor, tf.Tensor]:
    """BERT's masking of one token sequence: (corrupted [n], targets [n]).

    Selection, as BERT's reference (`create_pretraining_data.py`), is a fixed count
    per sequence, not an independent draw per token: budget = max(1, round(m *
    noise_density)) (Python's round, half to even) of the m ordinary tokens (ids
    outside [first_ordinary_id, last_ordinary_id] are never selected), chosen
    uniformly at random. BERT counts [CLS] and [SEP] in m and caps the count at
    max_predictions_per_seq; here only selectable tokens count and there is no cap.

    With `word_starts` (whole-word masking) the candidates are words (a word-start
    piece and the pieces after it) visited in random order; a word is taken if it
    still fits in the budget and skipped otherwise, so all pieces of a word are
    selected or none, and the count may fall short of the budget.

    Each selected token, independently: with probability `mask_rate` becomes
    `mask_id`, with `random_rate` a uniformly drawn ordinary id (which may by chance
    be the original), otherwise stays unchanged. Targets hold the original token at
    selected positions and 0 elsewhere.

    Args:
      tokens: [n] int32 token ids (no [CLS]/[SEP]).
      seeds: [3, 2] stateless seeds (selection, 80/10/10 draw, random ids).
      ids: from `mlm_special_ids`.
      noise_density: fraction of ordinary tokens to select.
      mask_rate, random_rate: BERT's 80% / 10% split of the selected tokens.
      word_starts: [vocab_size] bool from `word_start_table`, for whole words.
    """
    tokens = tf.cast(tokens, tf.int32)
    n = tf.size(tokens)
    candidate = tf.logical_and(tokens >= ids.first_ordinary_id,
                               tokens <= ids.last_ordinary_id)  # [n]
    num_candidates = tf.reduce_sum(tf.cast(candidate, tf.int32))
    # float64 and round-half-to-even: the same count as Python's round(m * density).
    budget = tf.cast(tf.round(tf.cast(num_candidates, tf.float64) * noise_density), tf.int32)
    budget = tf.minimum(tf.maximum(budget, 1), num_candidates)
    scores = tf.random.stateless_uniform([n], seed=seeds[0])

    if word_starts is None:
        # The `budget` candidates with the smallest random scores.
        scores = tf.where(candidate, scores, 2.0)
        order = tf.argsort(scores, stable=True)  # [n]
        rank = tf.scatter_nd(order[:, None], tf.range(n), [n])
        selected = tf.logical_and(rank < budget, candidate)
    else:
        prev_candidate = tf.pad(candidate[:-1], [[1, 0]])
        # A non-candidate token is a group of its own, and ends the word before it.
        starts = tf.logical_or(
            tf.gather(tf.convert_to_tensor(word_starts, tf.bool), tokens),
            tf.logical_or(tf.logical_not(candidate), tf.logical_not(prev_candidate)))
        group = tf.cumsum(tf.cast(starts, tf.int32)) - 1  # [n], in [0, n)
        group_length = tf.math.unsorted_segment_sum(tf.ones([n], tf.int32), group, n)
        group_ok = tf.math.unsorted_segment_min(tf.cast(candidate, tf.int32), group, n)
        group_length = group_length * tf.cast(group_ok > 0, tf.int32)  # [n] groups
        group_scores = tf.where(group_length > 0, scores, 2.0)
        order = tf.argsort(group_scores, stable=True)
        taken_in_order = _greedy_group_selection(tf.gather(group_length, order), budget)
        taken = tf.scatter_nd(order[:, None], taken_in_order, [n])
        selected = tf.gather(taken, group)

    draw = tf.random.stateless_uniform([n], seed=seeds[1])
    random_ids = tf.random.stateless_uniform(
        [n], minval=ids.first_ordinary_id, maxval=ids.last_ordinary_id + 1,
        dtype=tf.int32, seed=seeds[2])
    replacement = tf.where(draw < mask_rate, ids.mask_id,
                           tf.where(draw < mask_rate + random_rate, random_ids, tokens))
    corrupted = tf.where(selected, replacement, tokens)
    targets = tf.where(selected, tokens, 0)
    return corrupted, targets


def mlm(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
        output_features: Mapping[str, seqio.Feature], noise_density: float = 0.15,
        mask_rate: float = 0.8, random_rate: float = 0.1,
        whole_word: bool = False) -> tf.data.Dataset:
    """BERT's masked-LM objective as a seqio preprocessor (after `tokenize`).

    Each text (tokens in "targets") is cut into chunks of L - 2 tokens (L = the
    inputs length; nothing is dropped), and each chunk becomes

        inputs  = [CLS] corrupted chunk [SEP]
        targets = 0     original token at selected positions, 0 elsewhere   0

    with [SEP] = EOS and the selection and 80/10/10 corruption of
    `mlm_mask_tokens` (ids from `mlm_special_ids`). "inputs" and "targets" are
    aligned, of equal length; the loss weight is just targets > 0. The features
    must not have `add_eos` (the [SEP] is already there). Deterministic for a seqio
    seed. Meant for `MaskedLMFeatureConverter`.

    Args:
      dataset: examples with tokenized "targets".
      sequence_length: "inputs" (and "targets", if given, equal to it).
      output_features: the task's features (the "targets" vocabulary gives the ids).
      noise_density: fraction of ordinary tokens selected (BERT: 0.15).
      mask_rate, random_rate: of the selected, the share masked / replaced by a
        random ordinary id; the rest stays unchanged (BERT: 0.8 / 0.1).
      whole_word: select whole SentencePiece words (pieces from one '▁' to the next).
    """
    length = sequence_length["inputs"]
    if sequence_length.get("targets", length) != length:
        raise ValueError(f"masked LM inputs and targets are aligned; give them one length, "
                         f"got {dict(sequence_length)}")
    if length < 3:
        raise ValueError(f"masked LM needs an inputs length >= 3 ([CLS] token [SEP]), "
                         f"got {length}")
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density={noise_density} must be in (0, 1); BERT uses 0.15")
    if mask_rate < 0 or random_rate < 0 or mask_rate + random_rate > 1:
        raise ValueError(f"mask_rate={mask_rate} and random_rate={random_rate} must be >= 0 "
                         "with a sum <= 1; BERT uses 0.8 and 0.1")
    for key in ("inputs", "targets"):
        if key in output_features and output_features[key].add_eos:
            raise ValueError(f"masked LM writes its own [SEP] (EOS); declare the '{key}' "
                             "feature with add_eos=False")
    vocabulary = output_features["targets"].vocabulary
    ids = mlm_special_ids(vocabulary)
    word_starts = word_start_table(vocabulary) if whole_word else None
    sep = tf.constant([vocabulary.eos_id], tf.int32)
    cls = tf.constant([ids.cls_id], tf.int32)
    zero = tf.zeros([1], tf.int32)

    @seqio.map_over_dataset(num_seeds=1)
    def _mask(x: Features, seed: tf.Tensor) -> Features:
        seeds = tf.random.experimental.stateless_split(seed, 3)  # [3, 2]
        corrupted, targets = mlm_mask_tokens(
            x["targets"], seeds, ids, noise_density=noise_density, mask_rate=mask_rate,
            random_rate=random_rate, word_starts=word_starts)
        return {"inputs": tf.concat([cls, corrupted, sep], 0),
                "targets": tf.concat([zero, targets, zero], 0)}

    dataset = split_tokens(dataset, max_tokens_per_segment=length - 2, feature_key="targets")
    return _mask(dataset)


# ------------------------------------------------------------ classification


def prepend_cls(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature],
                feature_key: str = "inputs") -> tf.data.Dataset:
    """Puts [CLS] (`mlm_special_ids(vocabulary).cls_id`) before the tokens of
    `feature_key`, as BERT's classification inputs begin."""
    cls = tf.constant([mlm_special_ids(output_features[feature_key].vocabulary).cls_id],
                      tf.int32)

    def _prepend(x: Features) -> Features:
        return {**x, feature_key: tf.concat([cls, tf.cast(x[feature_key], tf.int32)], 0)}

    return dataset.map(_prepend, num_parallel_calls=AUTOTUNE)

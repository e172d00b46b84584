"""seqio feature converters for encoder-only models: masked LM and classification.

Decoder-only tasks need none of their own: next-token LM tasks use
`seqio.LMFeatureConverter` and prefix-LM tasks `seqio.PrefixLMFeatureConverter`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import seqio
import tensorflow as tf

_Spec = seqio.FeatureConverter.FeatureSpec


class MaskedLMFeatureConverter(seqio.FeatureConverter):
    """BERT masked LM: aligned "inputs"/"targets" -> encoder features.

    The task's "targets" hold the original token at every position selected for
    prediction and 0 elsewhere (see `preprocessors.mlm`), so the loss weight is
    simply targets > 0: it covers all selected positions, whether masked, randomly
    replaced or left unchanged. seqio's own `EncoderFeatureConverter` instead weights
    only the positions whose input is the mask id, i.e. about 80% of the selected
    ones, and so never trains on BERT's 10% random and 10% unchanged tokens.

    Packing: seqio's packer takes each example's length as its number of non-zero
    tokens, which the zeros inside "targets" would cut short; the targets are
    therefore packed shifted by one (0 -> 1) and shifted back after.

    Example (packed), mask id 9, [CLS] 8, [SEP] 1; the second example's 3 was
    replaced by the random token 5:

        ds = [{"inputs": [8, 9, 9, 3, 4, 1], "targets": [0, 7, 4, 0, 0, 0]},
              {"inputs": [8, 5, 9, 1],       "targets": [0, 3, 6, 0]}]
        task_feature_lengths = {"inputs": 11, "targets": 11}

        {"encoder_input_tokens":  [8, 9, 9, 3, 4, 1, 8, 5, 9, 1, 0],
         "encoder_target_tokens": [0, 7, 4, 0, 0, 0, 0, 3, 6, 0, 0],
         "encoder_loss_weights":  [0, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0],
         "encoder_segment_ids":   [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0],
         "encoder_positions":     [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0]}

    Without packing the last two features are absent and each example is padded.
    Model feature lengths are those of `seqio.EncoderFeatureConverter`: all equal to
    the inputs length.
    """

    TASK_FEATURES: ClassVar[Mapping[str, _Spec]] = {
        "inputs": _Spec(dtype=tf.int32), "targets": _Spec(dtype=tf.int32)}
    MODEL_FEATURES: ClassVar[Mapping[str, _Spec]] = {
        "encoder_input_tokens": _Spec(dtype=tf.int32),
        "encoder_target_tokens": _Spec(dtype=tf.int32),
        "encoder_loss_weights": _Spec(dtype=tf.int32),
    }
    PACKING_FEATURE_DTYPES: ClassVar[Mapping[str, tf.DType]] = {
        "encoder_segment_ids": tf.int32, "encoder_positions": tf.int32}

    def _convert_features(self, ds: tf.data.Dataset,
                          task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        length = task_feature_lengths["inputs"]
        if task_feature_lengths["targets"] != length:
            raise ValueError(
                f"masked LM inputs and targets are aligned, so their lengths must be equal; "
                f"got {dict(task_feature_lengths)}")

        def _aligned(x):
            tf.debugging.assert_equal(
                tf.shape(x["inputs"]), tf.shape(x["targets"]),
                message="masked LM 'inputs' and 'targets' must have the same length")
            # +1 so that no real position of the targets is 0 while packing.
            return {"inputs": x["inputs"], "targets": x["targets"] + 1 if self.pack
                    else x["targets"]}

        ds = ds.map(_aligned, num_parallel_calls=tf.data.AUTOTUNE)
        ds = self._pack_or_pad(ds, {"inputs": length, "targets": length})

        def _convert(x):
            targets = tf.maximum(x["targets"] - 1, 0) if self.pack else x["targets"]
            out = {
                "encoder_input_tokens": x["inputs"],
                "encoder_target_tokens": targets,
                "encoder_loss_weights": tf.cast(targets > 0, tf.int32),
            }
            if self.pack:
                out["encoder_segment_ids"] = x["inputs_segment_ids"]
                out["encoder_positions"] = x["inputs_positions"]
            return out

        return ds.map(_convert, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]
                                  ) -> dict[str, int]:
        """Every model feature has the inputs length."""
        return {k: task_feature_lengths["inputs"]
                for k in (*self.MODEL_FEATURES, *(self.PACKING_FEATURE_DTYPES
                                                   if self.pack else ()))}


class ClassificationFeatureConverter(seqio.FeatureConverter):
    """Sequence classification: "inputs" [L] and a scalar "label" -> encoder features.

        ds = [{"inputs": [8098, 5, 6, 1], "label": 2}]
        task_feature_lengths = {"inputs": 6}

        {"encoder_input_tokens": [8098, 5, 6, 1, 0, 0], "classification_labels": 2}

    "label" is an int32 scalar (rank 0), so it has no length: `task_feature_lengths`
    is just {"inputs": L} and the model feature lengths are
    {"encoder_input_tokens": L} ("classification_labels" is a scalar per example,
    [batch] once batched). seqio's `FeatureConverter.__call__` demands a length for
    every feature, so this class runs the same checks itself, less that one. No
    packing: one label per row.
    """

    TASK_FEATURES: ClassVar[Mapping[str, _Spec]] = {
        "inputs": _Spec(dtype=tf.int32), "label": _Spec(dtype=tf.int32, rank=0)}
    MODEL_FEATURES: ClassVar[Mapping[str, _Spec]] = {
        "encoder_input_tokens": _Spec(dtype=tf.int32),
        "classification_labels": _Spec(dtype=tf.int32, rank=0),
    }
    PACKING_FEATURE_DTYPES: ClassVar[Mapping[str, tf.DType]] = {}

    def __init__(self, pack: bool = False, **kwargs):
        if pack:
            raise ValueError(
                "ClassificationFeatureConverter cannot pack: each row has one label for one "
                "sequence; use pack=False (use_packing=False)")
        super().__init__(pack=False, **kwargs)

    def __call__(self, ds: tf.data.Dataset,
                 task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        """Checks the task features, pads "inputs" and renames; see the class docstring."""
        if set(task_feature_lengths) != {"inputs"}:
            raise ValueError(
                f"ClassificationFeatureConverter takes task_feature_lengths {{'inputs': L}} "
                f"only (the label is a scalar), got {dict(task_feature_lengths)}")
        ds = self._validate_dataset(ds, self.TASK_FEATURES, task_feature_lengths,
                                    strict=False, error_label="input_validation")
        ds = self._convert_features(ds, task_feature_lengths)
        model_lengths = self.get_model_feature_lengths(task_feature_lengths)
        ds = self._validate_dataset(ds, self.MODEL_FEATURES, model_lengths, strict=True,
                                    error_label="output_validation")
        if set(ds.element_spec) != set(self.MODEL_FEATURES):  # guards subclasses
            raise ValueError(f"converted features {sorted(ds.element_spec)} are not "
                             f"{sorted(self.MODEL_FEATURES)}")
        return ds

    def _convert_features(self, ds: tf.data.Dataset,
                          task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        ds = ds.map(lambda x: {"inputs": x["inputs"], "label": x["label"]},
                    num_parallel_calls=tf.data.AUTOTUNE)
        ds = self._pack_or_pad(ds, {"inputs": task_feature_lengths["inputs"]})
        return ds.map(lambda x: {"encoder_input_tokens": x["inputs"],
                                 "classification_labels": x["label"]},
                      num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]
                                  ) -> dict[str, int]:
        """{"encoder_input_tokens": inputs length}; the scalar label has no length."""
        return {"encoder_input_tokens": task_feature_lengths["inputs"]}

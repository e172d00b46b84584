"""Data: vocabularies, T5 preprocessors, seqio tasks and the batched input pipeline.

Importing this package registers the seqio tasks of `tasks.py`: span corruption
(shakespeare_span_corruption, shakespeare_span_corruption_byte, c4_span_corruption,
c4_v220_span_corruption), next-token LM (shakespeare_lm, shakespeare_lm_byte, c4_lm),
prefix LM (shakespeare_prefix_lm, c4_prefix_lm), BERT masked LM (shakespeare_mlm,
shakespeare_mlm_wwm, c4_mlm) and shakespeare_play_classification. Feature converters
for the encoder-only ones are in `feature_converters.py`.
"""

from t5x_like.data import feature_converters, metrics, preprocessors, tasks, vocabularies
from t5x_like.data.dataset import (
    check_registered,
    check_vocabularies,
    get_dataset,
    registered_names,
)
from t5x_like.data.feature_converters import (
    ClassificationFeatureConverter,
    MaskedLMFeatureConverter,
)
from t5x_like.data.preprocessors import (
    MlmIds,
    lm_chunks,
    mlm,
    mlm_special_ids,
    prefix_lm,
    random_spans_helper,
    span_corruption,
)
from t5x_like.data.tasks import (
    C4_LM,
    C4_MLM,
    C4_PREFIX_LM,
    C4_SPAN_CORRUPTION,
    C4_V220_SPAN_CORRUPTION,
    PLAY_CLASSIFICATION_LABELS,
    SHAKESPEARE_LM,
    SHAKESPEARE_LM_BYTE,
    SHAKESPEARE_MLM,
    SHAKESPEARE_MLM_WWM,
    SHAKESPEARE_PLAY_CLASSIFICATION,
    SHAKESPEARE_PREFIX_LM,
    SHAKESPEARE_SPAN_CORRUPTION,
    SHAKESPEARE_SPAN_CORRUPTION_BYTE,
    play_classification_metric,
    register_lm_task,
    register_mlm_task,
    register_prefix_lm_task,
    register_span_corruption_task,
    span_corruption_output_features,
)
from t5x_like.data.vocabularies import get_vocabulary

__all__ = [
    "C4_LM",
    "C4_MLM",
    "C4_PREFIX_LM",
    "C4_SPAN_CORRUPTION",
    "C4_V220_SPAN_CORRUPTION",
    "PLAY_CLASSIFICATION_LABELS",
    "SHAKESPEARE_LM",
    "SHAKESPEARE_LM_BYTE",
    "SHAKESPEARE_MLM",
    "SHAKESPEARE_MLM_WWM",
    "SHAKESPEARE_PLAY_CLASSIFICATION",
    "SHAKESPEARE_PREFIX_LM",
    "SHAKESPEARE_SPAN_CORRUPTION",
    "SHAKESPEARE_SPAN_CORRUPTION_BYTE",
    "ClassificationFeatureConverter",
    "MaskedLMFeatureConverter",
    "MlmIds",
    "check_registered",
    "check_vocabularies",
    "feature_converters",
    "get_dataset",
    "get_vocabulary",
    "lm_chunks",
    "metrics",
    "mlm",
    "mlm_special_ids",
    "play_classification_metric",
    "prefix_lm",
    "preprocessors",
    "random_spans_helper",
    "register_lm_task",
    "register_mlm_task",
    "register_prefix_lm_task",
    "register_span_corruption_task",
    "registered_names",
    "span_corruption",
    "span_corruption_output_features",
    "tasks",
    "vocabularies",
]

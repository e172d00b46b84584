"""Data: vocabularies, T5 preprocessors, seqio tasks and the batched input pipeline.

Importing this package registers the seqio tasks of `tasks.py`
(shakespeare_span_corruption, shakespeare_span_corruption_byte, c4_span_corruption,
c4_v220_span_corruption).
"""

from t5x_like.data import metrics, preprocessors, tasks, vocabularies
from t5x_like.data.dataset import check_registered, get_dataset, registered_names
from t5x_like.data.preprocessors import random_spans_helper, span_corruption
from t5x_like.data.tasks import (
    C4_SPAN_CORRUPTION,
    C4_V220_SPAN_CORRUPTION,
    SHAKESPEARE_SPAN_CORRUPTION,
    SHAKESPEARE_SPAN_CORRUPTION_BYTE,
    register_span_corruption_task,
    span_corruption_output_features,
)
from t5x_like.data.vocabularies import get_vocabulary

__all__ = [
    "C4_SPAN_CORRUPTION",
    "C4_V220_SPAN_CORRUPTION",
    "SHAKESPEARE_SPAN_CORRUPTION",
    "SHAKESPEARE_SPAN_CORRUPTION_BYTE",
    "check_registered",
    "get_dataset",
    "get_vocabulary",
    "metrics",
    "preprocessors",
    "random_spans_helper",
    "register_span_corruption_task",
    "registered_names",
    "span_corruption",
    "span_corruption_output_features",
    "tasks",
    "vocabularies",
]

"""`--run_mode=eval`: seqio metrics of a task over a checkpoint.

seqio's Evaluator owns the task's eval split, its postprocessing and metric functions;
this module supplies the model side: batched `predict_fn` (KV-cached decoding) and
`score_fn` (target log-likelihood) over the enumerated eval dataset.
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import seqio
import tensorflow as tf
from jax.sharding import NamedSharding, PartitionSpec

from partitioning import mesh as mesh_lib
from t5x_like import infer, input_pipeline, model_api
from t5x_like.runtime import Runtime


def _batched(ds: tf.data.Dataset, batch_size: int):
    """(indices, features) numpy batches; the last one is padded with zero rows."""
    for index, features in ds.batch(batch_size).as_numpy_iterator():
        features = {k: np.asarray(v, np.int32) for k, v in features.items()}
        yield index, input_pipeline.pad_rows(features, batch_size), len(index)


def make_model_fns(
    runtime: Runtime, params: Any, batch_size: int, decode: infer.DecodeConfig
) -> tuple[Callable, Callable]:
    partitioner = runtime.partitioner
    partitioner.check_batch_size(batch_size)
    score = jax.jit(
        lambda p, b: runtime.model.score_batch(runtime.net.merge(p), b),
        out_shardings=NamedSharding(partitioner.mesh, PartitionSpec()),
    )

    def predict_fn(ds, model_feature_shapes=None):
        del model_feature_shapes
        out = []
        for i, (index, features, n) in enumerate(_batched(ds, batch_size)):
            tokens = infer.predict(runtime, params, partitioner.make_global_batch(features), decode,
                                   batch_index=i)
            out.extend((int(i), tokens[j].tolist()) for j, i in enumerate(index[:n]))
        return out

    def score_fn(ds, model_feature_shapes=None):
        del model_feature_shapes
        out = []
        for index, features, n in _batched(ds, batch_size):
            with partitioner.activate():
                scores = score(params, partitioner.make_global_batch(features))
            scores = np.asarray(jax.device_get(scores))
            out.extend((int(i), float(scores[j])) for j, i in enumerate(index[:n]))
        return out

    return predict_fn, score_fn


def evaluate(
    *,
    model,
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    checkpoint_path: str,
    output_dir: str,
    split: str = "validation",
    batch_size: int = 8,
    num_examples: int | None = None,
    decode: infer.DecodeConfig = infer.DecodeConfig(),
    mesh_config: mesh_lib.MeshConfig | None = None,
    partitioning_rules: str = "dp",
) -> dict[str, dict[str, float]]:
    """Computes every metric the task defines; writes `output_dir/eval_metrics.json`."""
    infer.single_host_only("--run_mode=eval")
    decode.check_run("--run_mode=eval")
    input_pipeline.check_vocabularies(model, mixture_or_task_name)
    runtime = Runtime.build(model, mesh_config=mesh_config, rules=partitioning_rules)
    params = runtime.restore_params(checkpoint_path)
    if isinstance(model, model_api.SequenceClassificationModel):
        results = {mixture_or_task_name: _classification_metrics(
            runtime, params, mixture_or_task_name, task_feature_lengths, split, batch_size,
            num_examples)}
        return _write(results, output_dir)
    evaluator = seqio.Evaluator(
        mixture_or_task_name=mixture_or_task_name,
        feature_converter=model.feature_converter(pack=False),
        eval_split=split,
        sequence_length=dict(task_feature_lengths),
        num_examples=num_examples,
        use_memory_cache=True,
        async_compute_metrics=False,
    )
    if not evaluator.eval_tasks:
        raise ValueError(
            f"{mixture_or_task_name!r} has no task with metric functions for split {split!r}; "
            "register metric_fns on the task or pick another split"
        )
    predict_fn, score_fn = make_model_fns(runtime, params, batch_size, decode)
    metrics_future, _ = evaluator.evaluate(
        compute_metrics=jax.process_index() == 0, predict_fn=predict_fn, score_fn=score_fn
    )
    results = metrics_future.result() if metrics_future is not None else {}
    results = {
        task: {name: float(getattr(v, "value", v)) for name, v in m.items()}
        for task, m in (results or {}).items()
    }
    return _write(results, output_dir)


def _write(results: dict[str, dict[str, float]], output_dir: str) -> dict[str, dict[str, float]]:
    if jax.process_index() == 0:
        path = pathlib.Path(output_dir) / "eval_metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
        logging.info("eval metrics: %s", results)
        print(json.dumps(results, indent=2))
    return results


def _classification_metrics(
    runtime: Runtime, params: Any, task_name: str, task_feature_lengths: Mapping[str, int],
    split: str, batch_size: int, num_examples: int | None,
) -> dict[str, float]:
    """Predicted vs true labels over the split (seqio's Evaluator needs a "targets"
    sequence, which a classification task does not have). Uses the task's own predict
    metric fns when it registers any, else accuracy with per-class counts."""
    from t5x_like.data import metrics  # the data package imports tensorflow

    cfg = input_pipeline.DatasetConfig(task_name, dict(task_feature_lengths), split=split,
                                       batch_size=batch_size, shuffle=False, use_packing=False)
    labels, predictions = [], []
    batches = input_pipeline.iter_eval_batches(
        cfg, runtime.model.feature_converter(pack=False), runtime.partitioner, num_batches=None)
    for index, (batch, num_real) in enumerate(batches):
        predicted = infer.predict(runtime, params, batch, batch_index=index)
        host = jax.device_get(batch["classification_labels"])
        labels.extend(int(x) for x in np.asarray(host)[:num_real])
        predictions.extend(int(x) for x in np.asarray(predicted)[:num_real])
        if num_examples is not None and len(labels) >= num_examples:
            labels, predictions = labels[:num_examples], predictions[:num_examples]
            break
    task = seqio.get_mixture_or_task(task_name)
    metric_fns = getattr(task, "predict_metric_fns", None) or [metrics.classification_accuracy]
    out: dict[str, float] = {}
    for fn in metric_fns:
        out.update({k: float(v) for k, v in fn(labels, predictions).items()})
    return out

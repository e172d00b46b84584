"""`--run_mode=infer`: decode a task split with a checkpoint and write JSONL predictions."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import seqio
from jax.sharding import NamedSharding, PartitionSpec

from partitioning import mesh as mesh_lib
from t5x_like import input_pipeline
from t5x_like.runtime import Runtime


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How predictions are decoded (temperature 0 = greedy)."""

    max_decode_length: int | None = None
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    # Decoder-only next-token tasks: continue the first `prompt_length` target tokens
    # (0 = unconditional). Prefix-LM / seq2seq batches always prompt with their inputs.
    prompt_length: int = 0


def decode_text(vocab: seqio.Vocabulary, ids: Sequence[int] | np.ndarray) -> str:
    """Token ids -> text, cut at the first EOS and without padding."""
    ids = [int(i) for i in np.asarray(ids)]
    if vocab.eos_id in ids:
        ids = ids[: ids.index(vocab.eos_id)]
    return vocab.decode([i for i in ids if i != 0])


@functools.lru_cache(maxsize=8)
def _jitted_predict(runtime: Runtime, cfg: DecodeConfig):
    def predict(params, batch, rng):
        network = runtime.net.merge(params)
        extra = {"prompt_length": cfg.prompt_length} if cfg.prompt_length else {}
        return runtime.model.predict_batch(
            network, batch, rng=rng, max_decode_length=cfg.max_decode_length,
            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, **extra,
        )

    replicated = NamedSharding(runtime.partitioner.mesh, PartitionSpec())
    return jax.jit(predict, out_shardings=replicated)


def predict(
    runtime: Runtime, params: Any, batch, cfg: DecodeConfig = DecodeConfig(), batch_index: int = 0
) -> np.ndarray:
    """Decoded tokens [B, L] for a global batch (host numpy).

    Batch `i` samples with `fold_in(key(seed), i)`, so batches do not share random streams.
    """
    fn = _jitted_predict(runtime, cfg)
    rng = jax.random.fold_in(jax.random.key(cfg.seed), batch_index)
    with runtime.partitioner.activate():
        tokens = fn(params, batch, rng)
    return np.asarray(jax.device_get(tokens))


def single_host_only(what: str) -> None:
    if jax.process_count() > 1:
        raise NotImplementedError(
            f"{what} runs on one host for now (process_count={jax.process_count()}); "
            "run it on a single host with the same mesh shape"
        )


def infer(
    *,
    model,
    dataset_cfg: input_pipeline.DatasetConfig,
    checkpoint_path: str,
    output_dir: str,
    decode: DecodeConfig = DecodeConfig(),
    mesh_config: mesh_lib.MeshConfig | None = None,
    partitioning_rules: str = "dp",
    max_batches: int | None = None,
) -> pathlib.Path:
    """Writes `output_dir/<task>-<split>.jsonl`: one {input, prediction, target} per example."""
    single_host_only("--run_mode=infer")
    runtime = Runtime.build(model, mesh_config=mesh_config, rules=partitioning_rules)
    params = runtime.restore_params(checkpoint_path)
    cfg = dataclasses.replace(dataset_cfg, use_packing=False, shuffle=False)
    batches = input_pipeline.iter_eval_batches(
        cfg, model.feature_converter(pack=False), runtime.partitioner, num_batches=max_batches
    )
    out_path = pathlib.Path(output_dir) / f"{cfg.mixture_or_task_name}-{cfg.split}.jsonl"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(out_path, "w", encoding="utf-8") as f:
        for index, (batch, num_real) in enumerate(batches):
            tokens = predict(runtime, params, batch, decode, batch_index=index)
            host = jax.device_get(batch)
            for i in range(num_real):
                inputs, targets = model.example_text_ids(host, i, decode.prompt_length)
                record = {
                    "input": decode_text(model.input_vocabulary, inputs),
                    "prediction": model.prediction_text(tokens[i]),
                    "target": decode_text(model.output_vocabulary, targets),
                }
                f.write(json.dumps(record) + "\n")
                count += 1
    logging.info("wrote %d predictions to %s", count, out_path)
    print(f"wrote {count} predictions to {out_path}")
    return out_path

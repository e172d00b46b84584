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

METHODS = ("sample", "beam", "best_of_n", "speculative")
QUANTIZE_MODES = (None, "int8", "int4")


# Hashed by identity: jitted functions are cached per DecodeConfig.
@dataclasses.dataclass(frozen=True, eq=False)
class Drafter:
    """The small model of speculative decoding: a Model API (same family and vocabulary
    as the target, e.g. `@drafter/model_api.DecoderOnlyModel()` with scoped gin
    bindings, see experiments/speculative_infer.gin) and its checkpoint."""

    model: Any
    checkpoint_path: str


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How predictions are decoded; every field is a gin knob of `--run_mode=infer`.

    method: 'sample' (temperature 0 = greedy), 'beam' (T5X beam search: beam_size,
      alpha, stop_tokens), 'best_of_n' (num_candidates samples, the best by model
      log-prob, per token with length_normalize) or 'speculative' (`drafter` proposes
      `gamma` tokens per target call; temperature / top_k / top_p only; greedy output
      equals the target's).
    Sampling knobs (as vLLM / HF): temperature, top_k (0 = off), top_p (1 = off), min_p
      (0 = off), repetition_penalty (1 = off, counts the prompt), presence_penalty and
      frequency_penalty (0 = off), stop_tokens (ids that end a sequence besides EOS),
      num_samples (draws per example with 'sample'; infer then writes a list), seed.
    quantize: None, 'int8' (per-channel) or 'int4' (groups of quantize_group_size) weights
      for the target, applied to the restored checkpoint (`quantization.quantize_runtime`).
    """

    max_decode_length: int | None = None
    method: str = "sample"
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_tokens: tuple[int, ...] = ()
    num_samples: int = 1
    seed: int = 0
    beam_size: int = 4
    alpha: float = 0.6
    num_candidates: int = 4
    length_normalize: bool = False
    gamma: int = 4
    drafter: Drafter | None = None
    quantize: str | None = None
    quantize_group_size: int = 128
    # Decoder-only next-token tasks: continue the first `prompt_length` target tokens
    # (0 = unconditional). Prefix-LM / seq2seq batches always prompt with their inputs.
    prompt_length: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"DecodeConfig.method={self.method!r} is not one of {METHODS}")
        if self.method == "speculative" and self.drafter is None:
            raise ValueError("DecodeConfig.method='speculative' needs drafter=@infer.Drafter() "
                             "(a model and its checkpoint_path); see "
                             "experiments/speculative_infer.gin")
        if self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"DecodeConfig.quantize={self.quantize!r} is not one of "
                             f"{QUANTIZE_MODES}")
        if self.num_samples < 1 or (self.num_samples > 1 and self.method != "sample"):
            raise ValueError(f"num_samples={self.num_samples} must be >= 1, and > 1 only with "
                             "method='sample' (best_of_n takes num_candidates)")
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))
        # A knob the method does not use is an error, never silently dropped.
        unused = {"beam": _SAMPLING_KNOBS[:-1], "speculative": _SAMPLING_KNOBS[3:]}.get(
            self.method, ())
        unused = [k for k in unused if getattr(self, k) != _DEFAULTS[k]]
        if unused:
            raise ValueError(f"method={self.method!r} does not use {unused}; leave them at "
                             "their defaults or pick method='sample' / 'best_of_n'")
        if self.temperature == 0 and (self.method == "best_of_n" or self.num_samples > 1):
            raise ValueError(f"method={self.method!r} with num_samples={self.num_samples} / "
                             "num_candidates draws several samples per example, but "
                             "temperature=0 makes them all the greedy sequence; set "
                             "temperature > 0 (e.g. --gin.TEMPERATURE=0.8)")

    def check_run(self, what: str) -> None:
        """Eval and the training sample hook decode one row per example with the weights
        they are given: `num_samples` > 1 and `quantize` belong to --run_mode=infer."""
        if self.num_samples > 1 or self.quantize:
            raise ValueError(f"{what} takes num_samples=1 and quantize=None (got "
                             f"num_samples={self.num_samples}, quantize={self.quantize!r}); "
                             "sample several per example or quantize with --run_mode=infer")

    def decode_kwargs(self) -> dict[str, Any]:
        """The `predict_batch` keyword arguments of this config's method."""
        kw: dict[str, Any] = {"max_decode_length": self.max_decode_length,
                              "temperature": self.temperature, "method": self.method}
        if self.prompt_length:
            kw["prompt_length"] = self.prompt_length
        sampling = {"top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p,
                    "repetition_penalty": self.repetition_penalty,
                    "presence_penalty": self.presence_penalty,
                    "frequency_penalty": self.frequency_penalty,
                    "stop_tokens": self.stop_tokens}
        if self.method == "sample":
            kw.update(sampling, num_samples=self.num_samples)
        elif self.method == "beam":
            kw.update(beam_size=self.beam_size, alpha=self.alpha, stop_tokens=self.stop_tokens)
            del kw["temperature"]
        elif self.method == "best_of_n":
            kw.update(sampling, num_candidates=self.num_candidates,
                      length_normalize=self.length_normalize)
        else:
            kw.update(top_k=self.top_k, top_p=self.top_p, gamma=self.gamma)
        return kw


_SAMPLING_KNOBS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                   "presence_penalty", "frequency_penalty", "stop_tokens")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DecodeConfig)}


def decode_text(vocab: seqio.Vocabulary, ids: Sequence[int] | np.ndarray) -> str:
    """Token ids -> text, cut at the first EOS and without padding."""
    ids = [int(i) for i in np.asarray(ids)]
    if vocab.eos_id in ids:
        ids = ids[: ids.index(vocab.eos_id)]
    return vocab.decode([i for i in ids if i != 0])


@functools.lru_cache(maxsize=8)
def _jitted_predict(runtime: Runtime, cfg: DecodeConfig, drafter: Runtime | None):
    def predict(params, drafter_params, batch, rng):
        network = runtime.net.merge(params)
        extra = {} if drafter is None else {"drafter": drafter.net.merge(drafter_params)}
        return runtime.model.predict_batch(network, batch, rng=rng, **cfg.decode_kwargs(),
                                           **extra)

    replicated = NamedSharding(runtime.partitioner.mesh, PartitionSpec())
    return jax.jit(predict, out_shardings=replicated)


@functools.lru_cache(maxsize=4)
def load_drafter(runtime: Runtime, cfg: DecodeConfig) -> tuple[Runtime | None, Any]:
    """(The drafter's runtime, its parameters) for method='speculative', else (None, None).

    The drafter gets a data-parallel mesh over the target's devices (its parameters are
    small: replicated). Cached per (runtime, config): restored once per run.
    """
    if cfg.drafter is None or cfg.method != "speculative":
        return None, None
    drafter = Runtime.build(cfg.drafter.model, mesh_config=None,
                            devices=runtime.partitioner.mesh.devices.reshape(-1).tolist())
    return drafter, drafter.restore_params(cfg.drafter.checkpoint_path)


def predict(
    runtime: Runtime, params: Any, batch, cfg: DecodeConfig = DecodeConfig(), batch_index: int = 0,
    drafter: tuple[Runtime | None, Any] = (None, None),
) -> np.ndarray:
    """Decoded tokens [B, L] (or [B * num_samples, L]) for a global batch (host numpy).

    Batch `i` samples with `fold_in(key(seed), i)`, so batches do not share random streams.
    `drafter`: `load_drafter`'s result, for method='speculative'.
    """
    drafter_runtime, drafter_params = drafter
    if drafter_runtime is None:
        drafter_runtime, drafter_params = load_drafter(runtime, cfg)
    fn = _jitted_predict(runtime, cfg, drafter_runtime)
    rng = jax.random.fold_in(jax.random.key(cfg.seed), batch_index)
    with runtime.partitioner.activate():
        tokens = fn(params, drafter_params, batch, rng)
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
    input_pipeline.check_vocabularies(model, dataset_cfg.mixture_or_task_name)
    runtime = Runtime.build(model, mesh_config=mesh_config, rules=partitioning_rules)
    params = runtime.restore_params(checkpoint_path)
    if decode.quantize:
        from t5x_like import quantization

        runtime, params = quantization.quantize_runtime(
            runtime, params, decode.quantize, group_size=decode.quantize_group_size)
    drafter = load_drafter(runtime, decode)
    cfg = dataclasses.replace(dataset_cfg, use_packing=False, shuffle=False)
    batches = input_pipeline.iter_eval_batches(
        cfg, model.feature_converter(pack=False), runtime.partitioner, num_batches=max_batches
    )
    out_path = pathlib.Path(output_dir) / f"{cfg.mixture_or_task_name}-{cfg.split}.jsonl"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    count, n = 0, decode.num_samples
    with open(out_path, "w", encoding="utf-8") as f:
        for index, (batch, num_real) in enumerate(batches):
            tokens = predict(runtime, params, batch, decode, batch_index=index, drafter=drafter)
            host = jax.device_get(batch)
            for i in range(num_real):
                inputs, targets = model.example_text_ids(host, i, decode.prompt_length)
                record = {"input": decode_text(model.input_vocabulary, inputs)}
                if n == 1:
                    record["prediction"] = model.prediction_text(tokens[i])
                else:  # row i's samples are rows i*n .. i*n+n-1
                    record["predictions"] = [model.prediction_text(t)
                                             for t in tokens[i * n:(i + 1) * n]]
                record["target"] = decode_text(model.output_vocabulary, targets)
                f.write(json.dumps(record) + "\n")
                count += 1
    logging.info("wrote %d predictions to %s", count, out_path)
    print(f"wrote {count} predictions to {out_path}")
    return out_path

"""The training loop: build, restore or init, step, log, evaluate, checkpoint.

`train()` reads top to bottom in named stages. Periodic work (logging, evaluation,
checkpointing, sample decoding) is done by hooks called after each step, each with its
own cadence, so the loop itself stays a handful of lines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pathlib
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from partitioning import mesh as mesh_lib
from t5x_like import checkpoints, input_pipeline
from t5x_like.metrics_writer import MetricsWriter
from t5x_like.optimizers import OptimizerDef
from t5x_like.runtime import Runtime
from t5x_like.trainer import Trainer, TrainState


@dataclasses.dataclass
class LoopContext:
    """What hooks can see: the pieces of the run and the current state."""

    runtime: Runtime
    trainer: Trainer
    writer: MetricsWriter
    checkpointer: checkpoints.Checkpointer
    data: input_pipeline.TrainIterator
    model_dir: pathlib.Path
    total_steps: int
    state: TrainState | None = None


class Hook:
    """Periodic work after a step; runs when `step % every == 0` or at the last step."""

    every: int = 0

    def due(self, step: int, ctx: LoopContext) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == ctx.total_steps)

    def __call__(self, step: int, metrics: Any, ctx: LoopContext) -> None:
        raise NotImplementedError


class LogHook(Hook):
    """Console / TensorBoard / metrics.jsonl, with tokens/s and step time.

    The first step of every (resumed) run is logged too, so the starting loss is on record.
    """

    def __init__(self, every: int):
        self.every = every
        self._last_time = time.perf_counter()
        self._last_step: int | None = None
        self._tokens_per_step: int | None = None

    def due(self, step, ctx):
        return self._last_step is None or super().due(step, ctx)

    def __call__(self, step, metrics, ctx):
        values = jax.device_get(metrics)  # the only host sync on the hot path
        now = time.perf_counter()
        if self._last_step is not None and step > self._last_step:
            step_time = (now - self._last_time) / (step - self._last_step)
            values["step_time"] = step_time
            if self._tokens_per_step:
                values["tokens_per_sec"] = self._tokens_per_step / step_time
        self._last_time, self._last_step = now, step
        ctx.writer.write(step, values)

    def set_tokens_per_step(self, n: int) -> None:
        self._tokens_per_step = n

    def restart_clock(self) -> None:
        self._last_time = time.perf_counter()


class CheckpointHook(Hook):
    """Async Orbax save on the checkpointer's cadence (and at the last step)."""

    def due(self, step, ctx):
        return ctx.checkpointer.should_save(step) or step == ctx.total_steps

    def __call__(self, step, metrics, ctx):
        ctx.checkpointer.save(step, ctx.state, ctx.data.state())


class EvalHook(Hook):
    """Teacher-forced loss / accuracy over a fixed set of validation batches."""

    def __init__(self, every: int, cfg: input_pipeline.DatasetConfig, num_batches: int):
        self.every, self.cfg, self.num_batches = every, cfg, num_batches
        self._batches = None

    def __call__(self, step, metrics, ctx):
        if self._batches is None:  # built lazily, once
            self._batches = input_pipeline.eval_batches(
                self.cfg, ctx.runtime.model.feature_converter(self.cfg.use_packing),
                ctx.runtime.partitioner, num_batches=self.num_batches,
            )
        sums = None
        for batch, _ in self._batches:  # padding rows have zero loss weight
            out = ctx.trainer.run_eval_step(ctx.state.params, batch)
            sums = out if sums is None else jax.tree.map(np.add, sums, out)
        sums = jax.device_get(sums)
        ctx.writer.write(step, ctx.runtime.model.metrics_from_sums(sums), prefix="eval")


class SampleHook(Hook):
    """Decodes a few validation examples and prints input / prediction / target."""

    def __init__(self, every: int, cfg: input_pipeline.DatasetConfig, num_examples: int = 3,
                 decode=None):
        self.every, self.cfg, self.num_examples = every, cfg, num_examples
        self.decode = decode  # an infer.DecodeConfig; None: greedy
        if decode is not None:
            decode.check_run("the training sample hook (sample_decode)")
        self._batch = None

    def __call__(self, step, metrics, ctx):
        from t5x_like import infer  # local: infer imports this module's siblings

        model = ctx.runtime.model
        if self._batch is None:
            self._batch = input_pipeline.eval_batches(
                dataclasses.replace(self.cfg, use_packing=False),
                model.feature_converter(pack=False), ctx.runtime.partitioner, num_batches=1,
            )[0][0]
        decode = self.decode or infer.DecodeConfig()
        tokens = infer.predict(ctx.runtime, ctx.state.params, self._batch, decode)
        if jax.process_index() != 0:
            return
        batch = jax.device_get(self._batch)
        for i in range(min(self.num_examples, tokens.shape[0])):
            inputs, targets = model.example_text_ids(batch, i, decode.prompt_length)
            print(f"--- sample {i} at step {step}")
            print("input:     ", infer.decode_text(model.input_vocabulary, inputs))
            print("prediction:", model.prediction_text(tokens[i]))
            print("target:    ", infer.decode_text(model.output_vocabulary, targets))


class _Preemption:
    """SIGTERM (preemption notice) -> finish the step, save, exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            del frame
            logging.warning("signal %d received: saving a checkpoint and stopping", signum)
            self.requested = True

        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread (e.g. inside some notebooks): no handler
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def stop_now(self) -> bool:
        """Whether to stop after this step; on several hosts, all agree (any host's signal
        stops every host at the same step, or the others would hang in the next collective)."""
        if jax.process_count() == 1:
            return self.requested
        flags = multihost_utils.process_allgather(np.int32(self.requested))
        return bool(np.max(flags))


def _warn_about_data_position(cfg: input_pipeline.DatasetConfig, data_state: dict) -> None:
    saved_batch = data_state.get("batch_size", cfg.batch_size)
    if saved_batch != cfg.batch_size:
        logging.warning(
            "batch size changed since the checkpoint (%d -> %d): resuming skips %d batches of "
            "the new size, so the examples seen will not line up with the earlier run",
            saved_batch, cfg.batch_size, data_state.get("position", 0))
    if cfg.seed is None:
        logging.warning("train_dataset_cfg.seed is None: the data order is not reproducible and "
                        "a resumed run will not see the batches the interrupted one would have")


def _restore_or_init(
    checkpointer: checkpoints.Checkpointer, runtime: Runtime, trainer: Trainer, seed: int,
    init_checkpoint: str | None = None, upcycle: bool = False,
) -> tuple[TrainState, dict]:
    latest = checkpointer.latest_step()
    if latest is None and init_checkpoint:
        logging.info("no checkpoint in %s: fine-tuning from %s", checkpointer.directory,
                     init_checkpoint)
        params = runtime.init_params_from(init_checkpoint, seed, upcycle=upcycle)
        return trainer.init_state(params), {"position": 0}
    if latest is None:
        logging.info("no checkpoint in %s: initialising from seed %d", checkpointer.directory, seed)
        return trainer.init_state(runtime.init_params(seed)), {"position": 0}
    logging.info("resuming from step %d in %s", latest, checkpointer.directory)
    state, data_state = checkpointer.restore(latest, trainer.abstract_state())
    return state, data_state


def train(
    *,
    model,
    train_dataset_cfg: input_pipeline.DatasetConfig,
    optimizer: OptimizerDef,
    model_dir: str,
    total_steps: int,
    mesh_config: mesh_lib.MeshConfig | None = None,
    partitioning_rules: str = "dp",
    num_microbatches: int = 1,
    seed: int = 0,
    init_checkpoint: str | None = None,
    upcycle: bool = False,
    log_every: int = 10,
    checkpoint_every: int = 100,
    keep_checkpoints: int | None = 3,
    async_checkpointing: bool = True,
    eval_dataset_cfg: input_pipeline.DatasetConfig | None = None,
    eval_every: int = 0,
    eval_batches: int = 8,
    sample_every: int = 0,
    num_samples: int = 3,
    sample_decode=None,
    extra_hooks: Sequence[Hook] = (),
    stop_after_steps: int | None = None,
    on_ready: Callable[[LoopContext], None] | None = None,
) -> TrainState:
    """Trains `model` for `total_steps` steps (resuming from MODEL_DIR if it has checkpoints).

    `init_checkpoint` (fine-tuning): when MODEL_DIR has no checkpoint yet, start from
    the parameters of that checkpoint (a step or checkpoints directory) instead of a
    fresh initialisation; parameters it lacks (a new head) are initialised from `seed`,
    and the optimizer state and step start fresh. `upcycle=True`: `init_checkpoint` is a
    dense model and this one its MoE version (sparse upcycling, see `models.moe.upcycle`).
    `sample_decode` (an `infer.DecodeConfig`) sets how samples are decoded, e.g. a
    decoder-only LM continuing the first `prompt_length` tokens; default greedy.
    `stop_after_steps` stops early (after that step is saved) without changing the
    schedule: the way tests simulate an interrupted run.
    Returns the final TrainState.
    """
    # 0. Configuration checks that need nothing built, so a bad config fails in seconds.
    if (eval_every or sample_every) and eval_dataset_cfg is None:
        raise ValueError(
            f"eval_every={eval_every} / sample_every={sample_every} need eval_dataset_cfg; "
            "bind train.eval_dataset_cfg or set both to 0"
        )
    if sample_every and jax.process_count() > 1:
        raise NotImplementedError("sample_every > 0 is single-host for now; set it to 0")
    input_pipeline.check_vocabularies(model, train_dataset_cfg.mixture_or_task_name)
    if eval_dataset_cfg is not None and (eval_every or sample_every):
        input_pipeline.check_vocabularies(model, eval_dataset_cfg.mixture_or_task_name)

    # 1. Runtime: mesh, partitioner, abstract network; then the jitted steps.
    runtime = Runtime.build(model, mesh_config=mesh_config, rules=partitioning_rules)
    runtime.partitioner.check_batch_size(train_dataset_cfg.batch_size)
    if eval_dataset_cfg is not None and (eval_every or sample_every):
        runtime.partitioner.check_batch_size(eval_dataset_cfg.batch_size)
    trainer = Trainer(runtime, optimizer, num_microbatches=num_microbatches, seed=seed)
    model_dir_path = pathlib.Path(model_dir)
    model_dir_path.mkdir(parents=True, exist_ok=True)
    runtime.write_model_info(model_dir_path)

    with contextlib.ExitStack() as cleanup:  # closes writers / checkpointer on any exit
        # 2. State: resume from the latest complete checkpoint, or initialise sharded.
        checkpointer = checkpoints.Checkpointer(
            model_dir_path / "checkpoints",
            save_interval_steps=checkpoint_every,
            max_to_keep=keep_checkpoints,
            async_save=async_checkpointing,
        )
        cleanup.callback(checkpointer.close)  # waits for pending async saves
        state, data_state = _restore_or_init(checkpointer, runtime, trainer, seed,
                                             init_checkpoint, upcycle)
        start_step = int(jax.device_get(state.step))
        _warn_about_data_position(train_dataset_cfg, data_state)

        # 3. Data, positioned where the checkpoint left off.
        data = input_pipeline.TrainIterator(
            train_dataset_cfg,
            model.feature_converter(train_dataset_cfg.use_packing),
            runtime.partitioner,
            start_position=int(data_state.get("position", 0)),
        )

        # 4. Hooks.
        writer = MetricsWriter(model_dir_path, total_steps=total_steps)
        cleanup.callback(writer.close)
        log_hook = LogHook(log_every)
        log_hook.set_tokens_per_step(
            train_dataset_cfg.batch_size
            * model.tokens_per_example(train_dataset_cfg.task_feature_lengths)
        )
        hooks: list[Hook] = [CheckpointHook()]
        if eval_every:
            hooks.append(EvalHook(eval_every, eval_dataset_cfg, eval_batches))
        if sample_every:
            hooks.append(SampleHook(sample_every, eval_dataset_cfg, num_samples, sample_decode))
        hooks.extend(extra_hooks)
        ctx = LoopContext(runtime, trainer, writer, checkpointer, data, model_dir_path,
                          total_steps, state)
        if on_ready is not None:
            on_ready(ctx)

        # 5. The loop.
        last = total_steps if stop_after_steps is None else min(total_steps, stop_after_steps)
        with _Preemption() as preemption:
            for step in range(start_step + 1, last + 1):
                ctx.state, metrics = trainer.run_train_step(ctx.state, next(data))
                if log_hook.due(step, ctx):
                    log_hook(step, metrics, ctx)
                ran_other = False
                for hook in hooks:
                    if hook.due(step, ctx):
                        hook(step, metrics, ctx)
                        ran_other = True
                if ran_other:  # eval / save time is not training time
                    log_hook.restart_clock()
                if preemption.stop_now():
                    break
        # Stopped early (preemption, stop_after_steps): make sure the last step is saved.
        final = int(jax.device_get(ctx.state.step))
        if final > start_step and not checkpointer.has_step(final):
            checkpointer.save(final, ctx.state, data.state())
        # 6. Flush: the ExitStack waits for async saves and closes the writers.
    return ctx.state


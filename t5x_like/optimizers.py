"""Optax optimizers and learning-rate schedules, built from plain keyword arguments.

Gin binds these functions from the outside (no gin import here), e.g.

    train.optimizer = @optimizers.build_optimizer()
    optimizers.build_optimizer.base = @optimizers.adafactor()
    optimizers.build_optimizer.grad_clip_norm = None
    optimizers.adafactor.learning_rate = @optimizers.warmup_rsqrt()
    optimizers.warmup_rsqrt.warmup_steps = 10000

Every optimizer builder returns an `OptimizerDef`: the optax transformation (`.tx`) and the
learning-rate schedule it uses (`.schedule`), so the trainer can log the learning rate
without digging into optimizer state (`schedule(step)` is the rate used by the update
whose 0-based index is `step`, i.e. optax's update count before that update).

Schedules map a step (int or int array) to a float32 learning rate and are plain
callables, so they also work as `optax.Schedule`s.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any
Schedule = Callable[[Any], jax.Array]
MaskFn = Callable[[PyTree], PyTree]


# --- schedules ---------------------------------------------------------------------------


def constant(value: float = 1e-3) -> Schedule:
    """lr(step) = value."""
    return optax.constant_schedule(value)


def warmup_rsqrt(
    base_learning_rate: float = 1.0, warmup_steps: int = 10_000, linear_warmup: bool = False
) -> Schedule:
    """T5's inverse-square-root schedule: lr(step) = base / sqrt(max(step, warmup_steps)).

    With T5X's defaults (base 1.0, warmup 10000) the rate is a constant 0.01 for the first
    10k steps and then decays as 1/sqrt(step); "warmup" is a plateau, not a ramp. The
    plateau (peak) value is `base_learning_rate / sqrt(warmup_steps)`. With
    `linear_warmup=True` the rate is additionally multiplied by min(1, step / warmup_steps)
    (T5X's `linear_warmup` factor), which ramps from 0 up to that peak.
    """
    if warmup_steps < 1:
        raise ValueError(
            f"warmup_steps={warmup_steps} must be >= 1: the rsqrt schedule divides by "
            "sqrt(max(step, warmup_steps)); T5X uses 10000"
        )

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        lr = base_learning_rate / jnp.sqrt(jnp.maximum(step, float(warmup_steps)))
        if linear_warmup:
            lr = lr * jnp.minimum(1.0, step / warmup_steps)
        return lr

    return schedule


def _check_warmup_total(warmup_steps: int, total_steps: int) -> None:
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, "
            f"total_steps={total_steps}; set total_steps to the number of training steps"
        )


def warmup_cosine(
    peak_value: float = 1e-3,
    warmup_steps: int = 1_000,
    total_steps: int = 100_000,
    end_value: float = 0.0,
    init_value: float = 0.0,
) -> Schedule:
    """Linear warmup from `init_value` to `peak_value` over `warmup_steps`, then a cosine
    decay reaching `end_value` at `total_steps` (and staying there):

        step < w:      init + (peak - init) * step / w
        w <= step < T: end + (peak - end) * (1 + cos(pi * (step - w) / (T - w))) / 2
        step >= T:     end
    """
    _check_warmup_total(warmup_steps, total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=init_value,
        peak_value=peak_value,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,  # optax counts the warmup inside decay_steps
        end_value=end_value,
    )


def warmup_linear(
    peak_value: float = 1e-3,
    warmup_steps: int = 1_000,
    total_steps: int = 100_000,
    end_value: float = 0.0,
    init_value: float = 0.0,
) -> Schedule:
    """Linear warmup from `init_value` to `peak_value` over `warmup_steps`, then linear
    decay reaching `end_value` at `total_steps` (and staying there)."""
    _check_warmup_total(warmup_steps, total_steps)
    return optax.join_schedules(
        [
            optax.linear_schedule(init_value, peak_value, warmup_steps),
            optax.linear_schedule(peak_value, end_value, total_steps - warmup_steps),
        ],
        boundaries=[warmup_steps],
    )


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "constant": constant,
    "rsqrt": warmup_rsqrt,
    "warmup_rsqrt": warmup_rsqrt,
    "cosine": warmup_cosine,
    "warmup_cosine": warmup_cosine,
    "linear": warmup_linear,
    "warmup_linear": warmup_linear,
}


def make_schedule(name: str, **kwargs: Any) -> Schedule:
    """Builds a schedule by name (see `SCHEDULES`) with that builder's keyword args."""
    if name not in SCHEDULES:
        raise ValueError(
            f"unknown learning-rate schedule {name!r}; known: {', '.join(sorted(SCHEDULES))}"
        )
    return SCHEDULES[name](**kwargs)


# --- optimizers --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimizerDef:
    """An optax transformation together with the learning-rate schedule it applies.

    `tx.init(params)` / `tx.update(grads, state, params)` as usual; `schedule(step)` gives
    the learning rate of update number `step` for logging.
    """

    tx: optax.GradientTransformation
    schedule: Schedule


def _as_schedule(learning_rate: float | Schedule) -> Schedule:
    return learning_rate if callable(learning_rate) else constant(float(learning_rate))


def decay_mask_ndim_at_least_2(params: PyTree) -> PyTree:
    """True for parameters with >= 2 dims (matrices, embeddings, conv kernels); False for
    vectors and scalars (norm scales, biases), which are conventionally not decayed."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def adafactor(
    learning_rate: float | Schedule | None = None,
    decay_rate: float = 0.8,
    decay_offset: int = 0,
    clipping_threshold: float | None = 1.0,
    multiply_by_parameter_scale: bool = True,
    factored: bool = True,
    min_dim_size_to_factor: int = 128,
    momentum: float | None = None,
    weight_decay_rate: float | None = None,
    weight_decay_mask: MaskFn | None = decay_mask_ndim_at_least_2,
    eps: float = 1e-30,
) -> OptimizerDef:
    """Adafactor (`optax.adafactor`), T5X's default optimizer.

    `learning_rate=None` means T5X's default schedule, `warmup_rsqrt(1.0, 10000)`.
    `decay_rate` is the exponent of the second-moment decay 1 - (step + 1)^-decay_rate;
    `clipping_threshold` clips each update's RMS (not the gradient's global norm);
    `multiply_by_parameter_scale` scales updates by the parameter's RMS (relative step).
    `weight_decay_rate` is decoupled and *not* multiplied by the learning rate (optax and
    T5X semantics): each step subtracts weight_decay_rate * param on the masked params.

    Note: the factored second-moment statistics (`v_row`, `v_col`) have the parameter
    tree's structure but reduced shapes; a factored parameter's `v` is shape (1,).
    """
    schedule = _as_schedule(learning_rate if learning_rate is not None else warmup_rsqrt())
    tx = optax.adafactor(
        learning_rate=schedule,
        min_dim_size_to_factor=min_dim_size_to_factor,
        decay_rate=decay_rate,
        decay_offset=decay_offset,
        multiply_by_parameter_scale=multiply_by_parameter_scale,
        clipping_threshold=clipping_threshold,
        momentum=momentum,
        weight_decay_rate=weight_decay_rate,
        eps=eps,
        factored=factored,
        weight_decay_mask=weight_decay_mask,
    )
    return OptimizerDef(tx=tx, schedule=schedule)


def adamw(
    learning_rate: float | Schedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask: MaskFn | None = decay_mask_ndim_at_least_2,
) -> OptimizerDef:
    """AdamW (`optax.adamw`): update = -lr * (m_hat / (sqrt(v_hat) + eps) + wd * param).

    The weight decay is multiplied by the learning rate (optax / PyTorch AdamW). By
    default it skips 1-D and scalar parameters (norms, biases); pass
    `weight_decay_mask=None` to decay everything, or any callable params -> bool tree.
    """
    schedule = _as_schedule(learning_rate)
    tx = optax.adamw(
        learning_rate=schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
        mask=weight_decay_mask,
    )
    return OptimizerDef(tx=tx, schedule=schedule)


def sgd(
    learning_rate: float | Schedule = 1e-2, momentum: float | None = None, nesterov: bool = False
) -> OptimizerDef:
    """Plain SGD, optionally with (Nesterov) momentum (`optax.sgd`)."""
    schedule = _as_schedule(learning_rate)
    return OptimizerDef(
        tx=optax.sgd(schedule, momentum=momentum, nesterov=nesterov), schedule=schedule
    )


def build_optimizer(
    base: OptimizerDef | optax.GradientTransformation,
    grad_clip_norm: float | None = 1.0,
    schedule: Schedule | None = None,
) -> OptimizerDef:
    """Adds global-norm gradient clipping in front of `base` (None disables it).

    `base` is normally an `OptimizerDef` from `adafactor` / `adamw` / `sgd`. A bare optax
    transformation is accepted too, together with the `schedule` it uses (needed so the
    trainer can log the learning rate).
    """
    if isinstance(base, OptimizerDef):
        if schedule is not None:
            raise ValueError(
                "build_optimizer: `base` is an OptimizerDef that already carries its "
                "schedule; pass the schedule to the optimizer builder instead"
            )
        tx, schedule = base.tx, base.schedule
    else:
        if schedule is None:
            raise ValueError(
                "build_optimizer: a bare optax transformation needs `schedule=` (the "
                "learning rate it uses) so the trainer can log it; or build `base` with "
                "optimizers.adafactor / adamw / sgd"
            )
        tx = base
    if grad_clip_norm is not None:
        if not (grad_clip_norm > 0 and math.isfinite(grad_clip_norm)):
            raise ValueError(
                f"grad_clip_norm={grad_clip_norm} must be a positive number, or None to "
                "disable gradient clipping"
            )
        tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
    return OptimizerDef(tx=tx, schedule=schedule)

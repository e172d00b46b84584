"""What every family's frozen config dataclass shares.

`NetworkConfig` is the frozen base dataclass of every family config. Its own fields (the
attention kernel and its tile sizes) are keyword-only, so they come after the family's
fields and never shift positional arguments. `_check_common()` turns gin-given values
into hashable, printable ones (lists -> tuples, dtype objects -> names) and runs the
checks every family needs, each error naming the value and the fix; the derived sizes
are properties. A family's `__post_init__` calls it, then checks its own fields.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from models import attention, layers


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    """Base of a frozen config dataclass with the usual transformer fields.

    attention_impl: the kernel of every attention layer, one of
    `attention.IMPLEMENTATIONS`. 'xla' (default) is the naive einsum with dense
    [B, 1, T, S] masks and biases; any other value makes the teacher-forced passes
    describe masks structurally (`attention.AttentionSpec`) and compute the T5 relative
    bias per tile, so that 'blockwise' keeps memory linear in the sequence length.
    'blockwise' and the fused kernels do not drop attention weights: a training step
    with dropout_rate > 0 raises (use 'xla', or 'auto' which falls back to it).
    attention_block_q / attention_block_k: the tiles of 'blockwise' (and Pallas).
    """

    attention_impl: str = dataclasses.field(default="xla", kw_only=True)
    attention_block_q: int = dataclasses.field(default=attention.DEFAULT_BLOCK_Q,
                                               kw_only=True)
    attention_block_k: int = dataclasses.field(default=attention.DEFAULT_BLOCK_K,
                                               kw_only=True)

    # Fields that must be positive Python ints (the family's sizes).
    POSITIVE_INT_FIELDS: ClassVar[tuple[str, ...]] = ()
    # Shown when mlp_activations is empty.
    ACTIVATIONS_EXAMPLE: ClassVar[str] = "('gelu', 'linear')"

    def _check_common(self) -> None:
        object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
        for field in ("dtype", "param_dtype"):
            value = getattr(self, field)
            try:
                name = jnp.dtype(value).name
            except TypeError:
                raise ValueError(f"{field}={value!r} is not a dtype; use e.g. 'bfloat16'") from None
            if not jnp.issubdtype(name, jnp.floating):
                raise ValueError(f"{field}={value!r} must be a float dtype, e.g. 'float32'")
            object.__setattr__(self, field, name)

        for field in self.POSITIVE_INT_FIELDS:
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field}={value!r} must be a positive integer")
        num_kv_heads = getattr(self, "num_kv_heads", None)
        if num_kv_heads is not None and (num_kv_heads < 1 or self.num_heads % num_kv_heads):
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads="
                f"{num_kv_heads}; use a divisor of num_heads or None"
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate={self.dropout_rate} must be in [0, 1)")
        if not self.mlp_activations:
            raise ValueError(f"mlp_activations is empty; use e.g. {self.ACTIVATIONS_EXAMPLE}")
        unknown = [a for a in self.mlp_activations if a not in layers.ACTIVATIONS]
        if unknown:
            raise ValueError(
                f"mlp_activations {self.mlp_activations} has unknown {unknown}; "
                f"use names from {sorted(layers.ACTIVATIONS)}"
            )
        moe = getattr(self, "moe", None)
        if moe is not None and type(moe).__name__ != "MoeConfig":
            raise ValueError(f"moe={moe!r} must be a models.moe.MoeConfig (gin: "
                             "@moe.MoeConfig()) or None (dense)")
        if self.layer_norm_epsilon <= 0:
            raise ValueError(f"layer_norm_epsilon={self.layer_norm_epsilon} must be > 0")
        attention.check_implementation(self.attention_impl, "attention_impl")
        for field in ("attention_block_q", "attention_block_k"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field}={value!r} must be a positive integer, e.g. 256")

    @property
    def attention_kwargs(self) -> dict:
        """`implementation`, `block_q`, `block_k` for every `layers.MultiHeadAttention`."""
        return {"implementation": self.attention_impl, "block_q": self.attention_block_q,
                "block_k": self.attention_block_k}

    @property
    def structural_masks(self) -> bool:
        """Whether the teacher-forced passes give attention an `AttentionSpec` and a
        bias_fn instead of dense [B, 1, T, S] masks and [1, N, T, S] biases."""
        return self.attention_impl != "xla"

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads K."""
        return getattr(self, "num_kv_heads", None) or self.num_heads

    @property
    def attention_dim(self) -> int:
        """N * H, the width of the concatenated heads."""
        return self.num_heads * self.head_dim

    @property
    def activation_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def parameter_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

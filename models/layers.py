"""Shared Flax NNX layers for every model family (T5, GPT-2, Llama, BERT, MoE).

Families compose these layers and never copy them: a family that needs another detail
adds an argument here. Parameters are created in `param_dtype` (float32 by default) and
cast to the activation `dtype` (e.g. bfloat16) at use; norms and attention logits are
computed in float32 whatever the activation dtype.

Einsum / shape letters used in comments and signatures:

    B batch              T query length        S key length        L cache length
    N heads              K kv heads            G = N // K query heads per kv head
    H head dim           D model (embed) dim   F mlp (hidden) dim
    E experts            V vocab

Every parameter carries logical axis names (its `out_sharding` metadata, set by
`nnx.with_partitioning`): embed, mlp, heads, kv, vocab, relpos_buckets (and, for later
families, kv_heads, expert, expert_mlp, layers). `partitioning.rules` maps them onto the
mesh; an unmapped name is replicated. Parameters are never sharded eagerly when created
(the names are logical, not mesh axes): the partitioner shards them.

Dropout modules hold no RNG state, so `nnx.state(model)` holds only `nnx.Param`s. Pass
`rngs=nnx.Rngs(dropout=key)` together with `deterministic=False` at call time; every
dropout call draws a fresh key from that stream.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from models import attention as attention_lib
from models.attention import NEG_INF as NEG_INF  # re-exported: the naive path's mask value
from models.attention import AttentionSpec as AttentionSpec
from models.attention import dot_product_attention as dot_product_attention
from partitioning import rules

Array = jax.Array
DType = Any  # a jnp dtype or its name, e.g. jnp.bfloat16 or "bfloat16"
Initializer = jax.nn.initializers.Initializer
Axes = Sequence[str | None]

# T5X's initialisers. Kernels are initialised on their 2-D (fan_in, fan_out) view, see
# `DenseGeneral`, so fan_in of the query kernel [D, N, H] is D.
default_kernel_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
default_attention_kernel_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal")
default_embed_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
default_relpos_init = jax.nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


def partitioned(init: Initializer, names: Axes) -> Initializer:
    """`init` whose Variable carries the logical axis `names` (one per parameter dim).

    Eager sharding is off because the names are logical: the partitioner maps them to
    mesh axes with `partitioning.rules` and shards the whole state at once.
    """
    return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def _as_tuple(x: int | Sequence[int]) -> tuple[int, ...]:
    return tuple(x) if isinstance(x, Sequence) else (x,)


def _constrain(x: Array, names: Axes) -> Array:
    return rules.with_logical_constraint(x, names)


def dropout_rngs(rngs: nnx.Rngs | Array | None, deterministic: bool,
                 dropout_rate: float) -> nnx.Rngs | None:
    """A network's call-time `rngs` argument as `nnx.Rngs` (a bare key is the dropout
    stream); an error if dropout is on (`deterministic=False`, rate > 0) without one."""
    if isinstance(rngs, jax.Array):
        rngs = nnx.Rngs(dropout=rngs)
    if not deterministic and dropout_rate > 0 and rngs is None:
        raise ValueError(
            f"deterministic=False with dropout_rate={dropout_rate} needs "
            "rngs=nnx.Rngs(dropout=key)"
        )
    return rngs


# --- activations ----------------------------------------------------------------------

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "linear": lambda x: x,
    # T5X's / HF's T5 v1.1 "gelu" is the tanh approximation (HF calls it gelu_new).
    "gelu": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_exact": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    """The activation function called `name` (a key of `ACTIVATIONS`)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; use one of {sorted(ACTIVATIONS)}"
        ) from None


# --- linear layers ----------------------------------------------------------------------


class DenseGeneral(nnx.Module):
    """A linear map over arbitrary input axes to arbitrary output feature axes.

    The kernel has shape `in_features + out_features` (e.g. [D, N, H] for a query
    projection, [N, H, D] for the attention output) and logical axes `kernel_axes`.
    Every projection of every family goes through this class, so LoRA and quantisation
    wrap one place. `kernel_init` is called on the 2-D view (prod(in), prod(out)) and
    reshaped, so fan-in based initialisers see the true fan-in (T5X does the same).
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        out_features: int | Sequence[int],
        *,
        kernel_axes: Axes,
        axis: int | Sequence[int] = -1,
        use_bias: bool = False,
        bias_axes: Axes | None = None,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = jax.nn.initializers.zeros,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        precision: jax.lax.PrecisionLike = None,
        rngs: nnx.Rngs,
    ):
        self.in_features = _as_tuple(in_features)
        self.out_features = _as_tuple(out_features)
        self.axis = _as_tuple(axis)
        if len(self.axis) != len(self.in_features):
            raise ValueError(
                f"axis {self.axis} and in_features {self.in_features} must have the same length"
            )
        kernel_shape = self.in_features + self.out_features
        if len(kernel_axes) != len(kernel_shape):
            raise ValueError(
                f"kernel_axes {tuple(kernel_axes)} must name every dim of kernel {kernel_shape}"
            )
        flat_shape = (math.prod(self.in_features), math.prod(self.out_features))

        def init_2d(key, shape, dtype):
            return kernel_init(key, flat_shape, dtype).reshape(shape)

        self.kernel = nnx.Param(
            partitioned(init_2d, kernel_axes)(rngs.params(), kernel_shape, param_dtype)
        )
        if use_bias:
            if bias_axes is None:
                bias_axes = tuple(kernel_axes)[len(self.in_features):]
            self.bias = nnx.Param(
                partitioned(bias_init, bias_axes)(rngs.params(), self.out_features, param_dtype)
            )
        else:
            self.bias = nnx.data(None)
        self.dtype = jnp.dtype(dtype)
        self.precision = precision

    def __call__(self, inputs: Array) -> Array:
        """[..., *in_features (at `axis`)...] -> [..., *out_features]."""
        axis = tuple(a % inputs.ndim for a in self.axis)
        got = tuple(inputs.shape[a] for a in axis)
        if got != self.in_features:
            raise ValueError(
                f"input dims {got} at axes {axis} of {inputs.shape} do not match "
                f"in_features {self.in_features}"
            )
        kernel = self.kernel[...].astype(self.dtype)
        inputs = inputs.astype(self.dtype)
        n_in = len(axis)
        if axis == tuple(range(inputs.ndim - n_in, inputs.ndim)):
            # Trailing axes (every projection today): one plain 2-D matmul. XLA's CPU
            # backend runs a [M, K] @ [K, N] dot and its weight gradient on a fast path,
            # where a multi-axis dot_general costs transposing copies (benchmarks/README).
            batch_shape = inputs.shape[:-n_in]
            flat_in = math.prod(self.in_features)
            out = jnp.dot(
                inputs.reshape(-1, flat_in),  # [M, prod(in)]
                kernel.reshape(flat_in, -1),  # [prod(in), prod(out)]
                precision=self.precision,
            ).reshape(*batch_shape, *self.out_features)
        else:
            contract = ((axis, tuple(range(n_in))), ((), ()))
            out = jax.lax.dot_general(inputs, kernel, contract, precision=self.precision)
        if self.bias is not None:
            out = out + self.bias[...].astype(self.dtype)
        return out


class Embed(nnx.Module):
    """Token embedding table [V, D] with `attend()` for tied output logits."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        embedding_init: Initializer = default_embed_init,
        dtype: DType = jnp.float32,
        attend_dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        axes: Axes = ("vocab", "embed"),
        rngs: nnx.Rngs,
    ):
        self.num_embeddings = num_embeddings
        self.features = features
        # `axes`: e.g. ('length', 'embed') for a learned position table.
        self.embedding = nnx.Param(
            partitioned(embedding_init, axes)(
                rngs.params(), (num_embeddings, features), param_dtype
            )
        )
        self.dtype = jnp.dtype(dtype)
        self.attend_dtype = jnp.dtype(attend_dtype)

    def __call__(self, ids: Array) -> Array:
        """ids [...] integer -> [..., D]. Ids outside [0, V) give NaN rows (loudly wrong)."""
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"token ids must be integers, got {ids.dtype}")
        table = self.embedding[...].astype(self.dtype)
        return jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan)

    def attend(self, query: Array) -> Array:
        """query [..., D] -> logits [..., V] against every embedding row."""
        table = self.embedding[...].astype(self.attend_dtype)
        return jnp.einsum("...d,vd->...v", query.astype(self.attend_dtype), table)


# --- norms ------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    """T5's layer norm: x / sqrt(mean(x^2) + eps) * scale; no mean subtraction, no bias.

    Computed in float32 whatever the input dtype; the result is cast to `dtype`.
    """

    def __init__(
        self,
        features: int,
        *,
        epsilon: float = 1e-6,
        scale_init: Initializer = jax.nn.initializers.ones,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.scale = nnx.Param(
            partitioned(scale_init, ("embed",))(rngs.params(), (features,), param_dtype)
        )
        self.epsilon = epsilon
        self.dtype = jnp.dtype(dtype)

    def __call__(self, x: Array) -> Array:
        """[..., D] -> [..., D]."""
        x = x.astype(jnp.float32)
        mean2 = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        y = x * jax.lax.rsqrt(mean2 + self.epsilon)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nnx.Module):
    """Standard layer norm (mean subtraction, optional bias), computed in float32."""

    def __init__(
        self,
        features: int,
        *,
        epsilon: float = 1e-5,
        use_bias: bool = True,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.scale = nnx.Param(
            partitioned(jax.nn.initializers.ones, ("embed",))(
                rngs.params(), (features,), param_dtype
            )
        )
        if use_bias:
            self.bias = nnx.Param(
                partitioned(jax.nn.initializers.zeros, ("embed",))(
                    rngs.params(), (features,), param_dtype
                )
            )
        else:
            self.bias = nnx.data(None)
        self.epsilon = epsilon
        self.dtype = jnp.dtype(dtype)

    def __call__(self, x: Array) -> Array:
        """[..., D] -> [..., D]."""
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon) * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


# --- positions --------------------------------------------------------------------------


def relative_position_bucket(
    relative_position: Array,
    *,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> Array:
    """T5's bucket of `relative_position` = key position - query position (int32).

    Half of the buckets (of each direction when bidirectional) hold exact distances
    0..max_exact-1; the rest grow logarithmically up to `max_distance`, beyond which all
    distances share the last bucket. Causal (bidirectional=False) maps keys after the
    query (positive offsets) to bucket 0; they are masked anyway.
    """
    n = -jnp.asarray(relative_position, jnp.int32)  # distance looking back
    ret = jnp.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        ret = ret + (n < 0).astype(jnp.int32) * num_buckets  # keys after the query
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # eps as in T5X: keeps log() finite at n = 0 (that branch is not selected anyway).
    val_if_large = max_exact + (
        jnp.log(n.astype(jnp.float32) / max_exact + np.finfo(np.float32).eps)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).astype(jnp.int32)
    val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
    return ret + jnp.where(is_small, n, val_if_large)


@struct.dataclass
class Rope:
    """Rotary position embedding (RoPE) tables for one call: cos, sin [B|1, T, 1, H/2].

    Llama's / Hugging Face's convention ("rotate_half"): the head dim is split into two
    halves (x1, x2) that rotate as pairs (x1[i], x2[i]) by angle position * theta^(-2i/H).
    Built once per forward pass (`Rope.at`) and shared by every layer; the rotation runs
    in float32 whatever the activation dtype.
    """

    cos: Array
    sin: Array

    @classmethod
    def at(cls, positions: Array, head_dim: int, theta: float = 10000.0) -> Rope:
        """Tables for integer `positions` [T] (shared by the batch) or [B, T]."""
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        exponents = np.arange(0, head_dim, 2, dtype=np.float32) / head_dim
        inv_freq = jnp.asarray(1.0 / (theta**exponents), jnp.float32)  # [H/2]
        angles = jnp.asarray(positions, jnp.int32).astype(jnp.float32)[..., None] * inv_freq
        angles = angles.reshape(-1 if angles.ndim == 3 else 1, *angles.shape[-2:])
        angles = angles[:, :, None, :]  # [B|1, T, H/2] -> [B|1, T, 1, H/2]
        return cls(cos=jnp.cos(angles), sin=jnp.sin(angles))

    def __call__(self, x: Array) -> Array:
        """Rotates x [B, T, N, H] (queries or keys) -> same shape and dtype."""
        half = x.shape[-1] // 2
        x32 = x.astype(jnp.float32)
        x1, x2 = x32[..., :half], x32[..., half:]
        out = jnp.concatenate(
            [x1 * self.cos - x2 * self.sin, x2 * self.cos + x1 * self.sin], axis=-1)
        return out.astype(x.dtype)


def apply_rope(x: Array, positions: Array, theta: float = 10000.0) -> Array:
    """RoPE of x [B, T, N, H] at integer positions [B, T] (or [T]) -> same shape and dtype.

    Equal to Hugging Face Llama's `apply_rotary_pos_emb`: x * cos + rotate_half(x) * sin
    with cos / sin of the angles repeated over both halves of the head dim.
    """
    return Rope.at(positions, x.shape[-1], theta)(x)


class RelativePositionBiases(nnx.Module):
    """T5 relative position attention bias: one learned scalar per (head, bucket).

    Takes explicit query and key positions, so the same module serves full sequences,
    packed sequences (positions reset per segment) and KV-cached decoding (query
    positions index + t against cache slots 0..L-1).
    """

    def __init__(
        self,
        num_heads: int,
        *,
        num_buckets: int = 32,
        max_distance: int = 128,
        bidirectional: bool = True,
        embedding_init: Initializer = default_relpos_init,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.rel_embedding = nnx.Param(
            partitioned(embedding_init, ("heads", "relpos_buckets"))(
                rngs.params(), (num_heads, num_buckets), param_dtype
            )
        )

    def __call__(self, query_positions: Array, key_positions: Array) -> Array:
        """positions [T] or [B, T] and [S] or [B, S] -> float32 bias [B or 1, N, T, S]."""
        rel = key_positions[..., None, :] - query_positions[..., :, None]  # [(B,) T, S]
        buckets = relative_position_bucket(
            rel,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        table = self.rel_embedding[...].astype(jnp.float32)  # [N, buckets]
        bias = jnp.take(table, buckets, axis=1)  # [N, (B,) T, S]
        if bias.ndim == 3:
            return bias[None]  # [1, N, T, S]
        return jnp.moveaxis(bias, 0, 1)  # [B, N, T, S]


# --- masks ------------------------------------------------------------------------------


def make_attention_mask(
    query_input: Array,
    key_input: Array,
    pairwise_fn: Callable[[Array, Array], Array] = jnp.logical_and,
) -> Array:
    """[B, T] and [B, S] -> bool mask [B, 1, T, S] = pairwise_fn(query, key).

    E.g. padding: `make_attention_mask(q_tokens > 0, k_tokens > 0)`.
    """
    mask = pairwise_fn(query_input[..., :, None], key_input[..., None, :])  # [B, T, S]
    return mask[..., None, :, :].astype(jnp.bool_)  # [B, 1, T, S]


def make_causal_mask(x: Array) -> Array:
    """[B, T] (values unused) -> bool [B, 1, T, T]: query t sees keys 0..t of its row."""
    idx = jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape)
    return make_attention_mask(idx, idx, jnp.greater_equal)


def make_segment_mask(query_segment_ids: Array, key_segment_ids: Array) -> Array:
    """Packing: [B, T], [B, S] -> bool [B, 1, T, S], true within the same segment."""
    return make_attention_mask(query_segment_ids, key_segment_ids, jnp.equal)


def make_cache_mask(index: Array, query_length: int, cache_length: int) -> Array:
    """KV-cached self-attention: bool [B, 1, T, L].

    The T new queries of example b sit at cache slots index[b] + t; each sees the slots
    written so far up to itself, so later (future or stale) slots are masked.
    """
    query_slots = index[:, None] + jnp.arange(query_length, dtype=jnp.int32)  # [B, T]
    key_slots = jnp.arange(cache_length, dtype=jnp.int32)[None, :]  # [1, L]
    return (key_slots[:, None, :] <= query_slots[:, :, None])[:, None]  # [B, 1, T, L]


def make_sliding_window_mask(query_index: Array, key_index: Array, window: int) -> Array:
    """Local attention: bool [B|1, 1, T, S], true where |query - key| < window.

    `query_index` [B, T] or [T] and `key_index` [B, S] or [S] are token indices in the
    row (cache slots when decoding). Under a causal mask a query then sees the last
    `window` tokens, itself included (Mistral's / Hugging Face's sliding window).
    """
    q = jnp.asarray(query_index, jnp.int32)
    k = jnp.asarray(key_index, jnp.int32)
    distance = q[..., :, None] - k[..., None, :]  # [(B,) T, S]
    mask = jnp.abs(distance) < window
    return mask.reshape(-1 if mask.ndim == 3 else 1, 1, *mask.shape[-2:])  # [B|1, 1, T, S]


def combine_masks(*masks: Array | None) -> Array | None:
    """Logical AND of the given masks (None entries ignored); None if none given."""
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    out = masks[0].astype(jnp.bool_)
    for m in masks[1:]:
        out = jnp.logical_and(out, m)
    return out


# --- attention --------------------------------------------------------------------------


@struct.dataclass
class KVCache:
    """Keys and values of one attention layer: k, v [B, L, K, H].

    A plain pytree with batch-major leaves: beam search reorders it with `take`;
    positions >= the owner's index are never attended, so rolling back is just moving
    that index.
    """

    k: Array
    v: Array

    @classmethod
    def zeros(cls, batch: int, length: int, num_kv_heads: int, head_dim: int,
              dtype: DType = jnp.float32) -> KVCache:
        """An empty cache of `length` slots."""
        shape = (batch, length, num_kv_heads, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @property
    def length(self) -> int:
        return self.k.shape[1]

    def write(self, k_new: Array, v_new: Array, index: Array) -> KVCache:
        """Writes k/v_new [B, T, K, H] at slots index[b]..index[b]+T-1 of each example.

        Slots past the end are dropped (never wrap or clamp onto earlier tokens).
        """
        batch, t = k_new.shape[:2]
        rows = jnp.arange(batch)[:, None]  # [B, 1]
        cols = index[:, None] + jnp.arange(t, dtype=index.dtype)  # [B, T]
        k = self.k.at[rows, cols].set(k_new.astype(self.k.dtype), mode="drop")
        v = self.v.at[rows, cols].set(v_new.astype(self.v.dtype), mode="drop")
        return KVCache(k=k, v=v)

    def take(self, indices: Array) -> KVCache:
        """Selects / reorders examples along the batch axis (beam search)."""
        return KVCache(k=self.k[indices], v=self.v[indices])


class MultiHeadAttention(nnx.Module):
    """Multi-head attention: self, causal, cross; MHA / GQA / MQA; optional KV cache.

    Params: query [D, N, H], key and value [Dkv, K, H], out [N, H, D].
    `scale_in_query_init=True` is T5's scheme: no 1/sqrt(H) on the logits, folded into
    the query kernel init instead (stddev (D*H)^-0.5 under the default init); otherwise
    the logits are scaled by 1/sqrt(H) (GPT, Llama, BERT). `out_kernel_init` (default:
    `kernel_init`) lets GPT-2 scale down the residual output projection. `qkv_bias`
    (default: `use_bias`) gives only the query / key / value projections biases (Qwen2).

    `rope` (a `Rope`, self-attention only) rotates queries and keys right after their
    projections, so a KV cache holds rotated keys (Llama).

    `implementation` picks the attention kernel (`attention.IMPLEMENTATIONS`; 'xla', the
    default, is the naive `dot_product_attention`). Every call takes a dense bool `mask`
    or a structural one (an `AttentionSpec`), and a dense `bias` and / or a `bias_fn`
    (e.g. `RelativePositionBiases`, at the spec's positions): 'blockwise' evaluates the
    structural ones per [block_q, block_k] tile, the others materialise them as needed.
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        head_dim: int,
        *,
        num_kv_heads: int | None = None,
        kv_features: int | None = None,
        out_features: int | None = None,
        dropout_rate: float = 0.0,
        use_bias: bool = False,
        qkv_bias: bool | None = None,
        scale_in_query_init: bool = False,
        kernel_init: Initializer = default_attention_kernel_init,
        out_kernel_init: Initializer | None = None,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        implementation: str = "xla",
        block_q: int = attention_lib.DEFAULT_BLOCK_Q,
        block_k: int = attention_lib.DEFAULT_BLOCK_K,
        rngs: nnx.Rngs,
    ):
        attention_lib.check_implementation(implementation)
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}"
            )
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.implementation = implementation
        self.block_q, self.block_k = block_q, block_k
        self.scale = 1.0 if scale_in_query_init else head_dim**-0.5
        query_init = kernel_init
        if scale_in_query_init:
            def query_init(key, shape, dtype):
                return kernel_init(key, shape, dtype) / math.sqrt(head_dim)

        # Fewer kv heads than heads may not divide the model mesh axis: give them their
        # own logical name (replicated unless the rules map 'kv_heads').
        kv_heads_axis = "heads" if num_kv_heads == num_heads else "kv_heads"
        self.kv_axes = ("batch", "length", kv_heads_axis, "kv")
        dense = functools.partial(
            DenseGeneral, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        kv_features = kv_features or in_features
        qkv_bias = use_bias if qkv_bias is None else qkv_bias
        self.query = dense(in_features, (num_heads, head_dim), kernel_init=query_init,
                           kernel_axes=("embed", "heads", "kv"), use_bias=qkv_bias)
        self.key = dense(kv_features, (num_kv_heads, head_dim), kernel_init=kernel_init,
                         kernel_axes=("embed", kv_heads_axis, "kv"), use_bias=qkv_bias)
        self.value = dense(kv_features, (num_kv_heads, head_dim), kernel_init=kernel_init,
                           kernel_axes=("embed", kv_heads_axis, "kv"), use_bias=qkv_bias)
        self.out = dense((num_heads, head_dim), out_features or in_features, axis=(-2, -1),
                         kernel_init=out_kernel_init or kernel_init,
                         kernel_axes=("heads", "kv", "embed"))
        # Broadcast over queries (dim -2 of [B, K, G, T, S]) as T5X does.
        self.dropout = nnx.Dropout(dropout_rate, broadcast_dims=(-2,))

    def project_kv(self, inputs_kv: Array, *, rope: Rope | None = None) -> KVCache:
        """[B, S, Dkv] -> keys and values [B, S, K, H] (e.g. cross-attention, once).

        `rope`: rotates the keys at the positions of `inputs_kv`.
        """
        k = self.key(inputs_kv)
        if rope is not None:
            k = rope(k)
        k = _constrain(k, self.kv_axes)
        v = _constrain(self.value(inputs_kv), self.kv_axes)
        return KVCache(k=k, v=v)

    def attend(
        self,
        inputs_q: Array,
        kv: KVCache,
        *,
        mask: Array | AttentionSpec | None = None,
        bias: Array | None = None,
        bias_fn: attention_lib.BiasFn | None = None,
        rope: Rope | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> Array:
        """Queries from inputs_q [B, T, D] attend to given keys/values [B, S, K, H].

        mask: bool [B|1, N|1, T, S] or an `AttentionSpec`; bias: [B|1, N|1, T, S];
        bias_fn(query_positions, key_positions) -> [B|1, N, T, S] at the spec's
        positions (see `attention.blockwise_attention`); rope: rotates the queries at the
        positions of `inputs_q`. Returns [B, T, D].
        """
        q = self.query(inputs_q)
        if rope is not None:
            q = rope(q)
        q = _constrain(q, ("batch", "length", "heads", "kv"))
        spec = mask if isinstance(mask, AttentionSpec) else None
        dropout = None
        if not deterministic and self.dropout.rate > 0:
            dropout = lambda w: self.dropout(w, deterministic=False, rngs=rngs)
        x = attention_lib.attention(
            q,
            kv.k.astype(q.dtype),
            kv.v.astype(q.dtype),
            mask=None if spec is not None else mask,
            bias=bias,
            spec=spec,
            bias_fn=bias_fn,
            scale=self.scale,
            dropout=dropout,
            implementation=self.implementation,
            block_q=self.block_q,
            block_k=self.block_k,
        )
        x = _constrain(x, ("batch", "length", "heads", "kv"))
        return _constrain(self.out(x), ("batch", "length", "embed"))

    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array | None = None,
        *,
        mask: Array | AttentionSpec | None = None,
        bias: Array | None = None,
        bias_fn: attention_lib.BiasFn | None = None,
        rope: Rope | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> Array:
        """Self-attention (inputs_kv None) or cross-attention: [B, T, D] -> [B, T, D].

        `rope` (self-attention only) rotates queries and keys at the same positions;
        mask / bias / bias_fn as in `attend`.
        """
        if rope is not None and inputs_kv is not None:
            raise ValueError("rope applies to self-attention only (queries and keys share "
                             "positions); pass inputs_kv=None")
        kv = self.project_kv(inputs_q if inputs_kv is None else inputs_kv, rope=rope)
        return self.attend(inputs_q, kv, mask=mask, bias=bias, bias_fn=bias_fn, rope=rope,
                           deterministic=deterministic, rngs=rngs)

    def cached_self_attention(
        self,
        inputs: Array,
        cache: KVCache,
        index: Array,
        *,
        mask: Array | AttentionSpec | None = None,
        bias: Array | None = None,
        bias_fn: attention_lib.BiasFn | None = None,
        rope: Rope | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> tuple[Array, KVCache]:
        """Writes the K/V of T new tokens [B, T, D] at index[b].. and attends over the cache.

        `mask` [B, 1, T, L] must hide slots after each query (see `make_cache_mask`; as
        an `AttentionSpec`: causal with query_index [B, T] = index[b] + t and key_index
        the slots). `rope`: tables at the new tokens' positions (index[b] + t); the cache
        stores rotated keys. Returns ([B, T, D], the updated cache).
        """
        new = self.project_kv(inputs, rope=rope)
        cache = cache.write(new.k, new.v, index)
        out = self.attend(inputs, cache, mask=mask, bias=bias, bias_fn=bias_fn, rope=rope,
                          deterministic=deterministic, rngs=rngs)
        return out, cache


# --- MLP --------------------------------------------------------------------------------


class MlpBlock(nnx.Module):
    """Feed-forward block; several activations are multiplied together (gated MLP).

    ('relu',): relu(x Wi) Wo (T5 1.0, BERT-like); ('gelu', 'linear'): gated GELU of T5
    v1.1; ('silu', 'linear'): SwiGLU of Llama. Kernels: wi (or wi_0, wi_1, ...) [D, F],
    wo [F, D] (initialised with `out_kernel_init` if given, e.g. GPT-2's scaled init).
    Dropout acts on the hidden activations, broadcast over length as in T5X.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        activations: Sequence[str] = ("relu",),
        out_features: int | None = None,
        dropout_rate: float = 0.0,
        use_bias: bool = False,
        kernel_init: Initializer = default_kernel_init,
        out_kernel_init: Initializer | None = None,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.activations = tuple(activations)
        if not self.activations:
            raise ValueError("MlpBlock needs at least one activation, e.g. ('relu',)")
        for name in self.activations:
            get_activation(name)  # fail early on unknown names
        dense = functools.partial(
            DenseGeneral, use_bias=use_bias, kernel_init=kernel_init, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs,
        )
        for name in self.input_names:
            setattr(self, name, dense(in_features, hidden_features,
                                      kernel_axes=("embed", "mlp")))
        self.wo = dense(hidden_features, out_features or in_features,
                        kernel_axes=("mlp", "embed"), kernel_init=out_kernel_init or kernel_init)
        self.dropout = nnx.Dropout(dropout_rate, broadcast_dims=(-2,))

    @property
    def input_names(self) -> tuple[str, ...]:
        """Attribute names of the input projections, T5X's: 'wi' or 'wi_0', 'wi_1', ..."""
        if len(self.activations) == 1:
            return ("wi",)
        return tuple(f"wi_{i}" for i in range(len(self.activations)))

    def __call__(
        self, x: Array, *, token_mask: Array | None = None, deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> Array:
        """[..., D] -> [..., D]. `token_mask` is ignored (every token is treated alike); it
        is accepted so that a `moe.MoeBlock` can stand in for this block."""
        del token_mask
        h = None
        for name, act in zip(self.input_names, self.activations):
            y = get_activation(act)(getattr(self, name)(x))  # [..., F]
            h = y if h is None else h * y
        h = self.dropout(h, deterministic=deterministic, rngs=rngs)
        if h.ndim == 3:
            h = _constrain(h, ("batch", "length", "mlp"))
        return self.wo(h)

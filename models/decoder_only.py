"""Decoder-only language models (GPT-2, Llama, Mistral-style), Flax NNX: tokens -> logits.

One network for both lines, chosen by `DecoderOnlyConfig` fields:

    GPT-2: LayerNorm, learned positions, biases on every projection, GELU (tanh) MLP,
           tied output logits (no scaling).
    Llama: RMSNorm, RoPE, SwiGLU MLP, grouped-query attention, untied logits, no biases.
           `sliding_window` gives Mistral's local attention.

Pre-norm blocks: x + attention(norm(x)), x + mlp(norm(x)), a final norm, then logits.
Attention is `layers.MultiHeadAttention` (logits scaled by 1/sqrt(head_dim)), with RoPE
applied to queries and keys through its `rope` hook. One boolean mask [B|1, 1, T, S] and
one set of RoPE tables are built per call and shared by every layer; with
`attention_impl` other than 'xla' they describe the mask as an `AttentionSpec` instead
(the same rules, per token), which 'blockwise' evaluates per tile.

Masks (query q may attend key k, both token indices in the row / cache slots):
    causal       k <= q
    prefix LM    or (prefix_mask[q] and prefix_mask[k])   (T5X `decoder_causal_attention`)
    packing      and segment_ids[q] == segment_ids[k]
    window       and |q - k| < sliding_window
`positions` (reset per packed segment) only feed RoPE or the learned position table.

Decoding: `init_cache` gives an empty `DecoderOnlyCache`; `decode(tokens, cache=c)` feeds
T >= 1 tokens per row at slots index[b]..index[b]+T-1 (rows may be at different indices)
and returns the cache with index + T. Slots at or past a row's index are never attended
before they are written again, so a padded prefill followed by `rewind(lengths)` is safe.

Initialisation (GPT-2's, also used by Hugging Face Llama): every kernel and embedding
N(0, 0.02), the residual output projections (attention out, MLP wo) N(0, 0.02/sqrt(2L)).
Shape letters are those of `models/layers.py`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from models import configs, layers
from models import moe as moe_lib
from partitioning import rules

Array = jax.Array

POSITION_EMBEDDINGS = ("rope", "learned", "none")
NORMS = ("rmsnorm", "layernorm")
INIT_STDDEV = 0.02


@dataclasses.dataclass(frozen=True)
class DecoderOnlyConfig(configs.NetworkConfig):
    """Every size and variant of the decoder-only family. Defaults: a small Llama-style net."""

    vocab_size: int = 32000
    emb_dim: int = 512
    num_heads: int = 8
    head_dim: int = 64
    mlp_dim: int = 1536
    num_layers: int = 4
    num_kv_heads: int | None = None  # None: MHA; 1: MQA; a divisor of num_heads: GQA
    mlp_activations: tuple[str, ...] = ("silu", "linear")  # SwiGLU; GPT-2: ("gelu",)
    position_embedding: str = "rope"  # "rope" | "learned" (GPT-2) | "none"
    max_length: int = 2048  # rows of the learned table; longest sequence / cache allowed
    rope_theta: float = 10000.0
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm" (GPT-2, with a bias when use_bias)
    layer_norm_epsilon: float = 1e-6
    use_bias: bool = False  # GPT-2: biases on every projection and LayerNorm
    qkv_bias: bool | None = None  # None: as use_bias; True: query/key/value biases (Qwen2)
    tie_embeddings: bool = False  # GPT-2: logits = embedding.attend(x), no scaling
    sliding_window: int | None = None  # query sees the last `sliding_window` tokens
    moe: moe_lib.MoeConfig | None = None  # sparse MoE feed-forward layers (Mixtral)
    dropout_rate: float = 0.0
    dtype: str = "float32"  # activations, e.g. "bfloat16"
    param_dtype: str = "float32"

    POSITIVE_INT_FIELDS = ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim",
                           "num_layers", "max_length")
    ACTIVATIONS_EXAMPLE = "('silu', 'linear') or ('gelu',)"

    def __post_init__(self):
        self._check_common()
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"position_embedding={self.position_embedding!r} is not known; use one of "
                f"{POSITION_EMBEDDINGS}"
            )
        if self.position_embedding == "rope" and self.head_dim % 2:
            raise ValueError(
                f"head_dim={self.head_dim} must be even for position_embedding='rope' "
                "(RoPE rotates pairs of dims)"
            )
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta={self.rope_theta} must be > 0, e.g. 10000.0")
        if self.moe is not None:
            self.moe.check_causal("DecoderOnlyConfig.moe")
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r} is not known; use one of {NORMS}")
        if self.sliding_window is not None and (
            not isinstance(self.sliding_window, int) or self.sliding_window < 1
        ):
            raise ValueError(
                f"sliding_window={self.sliding_window!r} must be a positive integer or None "
                "(full causal attention)"
            )


_GPT2 = DecoderOnlyConfig(
    vocab_size=50257, head_dim=64, mlp_activations=("gelu",), position_embedding="learned",
    max_length=1024, norm="layernorm", layer_norm_epsilon=1e-5, use_bias=True,
    tie_embeddings=True, dtype="bfloat16",
)
_LLAMA = DecoderOnlyConfig(layer_norm_epsilon=1e-5, dtype="bfloat16")

# Published shapes (parameter counts in tests/test_decoder_only.py and the gin headers),
# plus this project's own CPU-sized "tiny" ones (8192 rows hold the shipped 8100-id vocab).
PRESETS: dict[str, DecoderOnlyConfig] = {
    "gpt2_tiny": dataclasses.replace(
        _GPT2, vocab_size=8192, emb_dim=256, num_heads=4, mlp_dim=1024, num_layers=4,
        max_length=512, dtype="float32"),
    "gpt2_small": dataclasses.replace(
        _GPT2, emb_dim=768, num_heads=12, mlp_dim=3072, num_layers=12),
    "gpt2_medium": dataclasses.replace(
        _GPT2, emb_dim=1024, num_heads=16, mlp_dim=4096, num_layers=24),
    "gpt2_large": dataclasses.replace(
        _GPT2, emb_dim=1280, num_heads=20, mlp_dim=5120, num_layers=36),
    "gpt2_xl": dataclasses.replace(
        _GPT2, emb_dim=1600, num_heads=25, mlp_dim=6400, num_layers=48),
    "llama_tiny": dataclasses.replace(
        _LLAMA, vocab_size=8192, emb_dim=256, num_heads=4, num_kv_heads=2, head_dim=64,
        mlp_dim=768, num_layers=4, max_length=512, dtype="float32"),
    # Llama 3.2 1B's shape (its "llama3" RoPE frequency scaling is not implemented).
    "llama_1b": dataclasses.replace(
        _LLAMA, vocab_size=128256, emb_dim=2048, num_heads=32, num_kv_heads=8, head_dim=64,
        mlp_dim=8192, num_layers=16, max_length=131072, rope_theta=500000.0,
        tie_embeddings=True),
    # This project's own CPU-sized Mixtral: llama_tiny with 8 experts of half its MLP,
    # top-2, so the active parameters per token equal llama_tiny's (+ the routers).
    "mixtral_tiny": dataclasses.replace(
        _LLAMA, vocab_size=8192, emb_dim=256, num_heads=4, num_kv_heads=2, head_dim=64,
        mlp_dim=384, num_layers=4, max_length=512, dtype="float32",
        moe=moe_lib.MoeConfig(num_experts=8, num_experts_per_token=2, dispatch="dropless",
                              load_balance_loss_weight=1e-2, router_z_loss_weight=1e-3)),
    # Mixtral 8x7B's shape: 46,702,792,704 parameters, 12,879,925,248 active per token.
    "mixtral_8x7b": dataclasses.replace(
        _LLAMA, vocab_size=32000, emb_dim=4096, num_heads=32, num_kv_heads=8, head_dim=128,
        mlp_dim=14336, num_layers=32, max_length=32768, rope_theta=1e6,
        # Per-layer load-balancing weight = the released config's router_aux_loss_coef
        # 0.02 * k / layers: HF pools one loss over all layers, worth k when uniform.
        moe=moe_lib.MoeConfig(num_experts=8, num_experts_per_token=2, dispatch="dropless",
                              load_balance_loss_weight=1.25e-3, router_z_loss_weight=0.0)),
    "llama_7b": dataclasses.replace(
        _LLAMA, vocab_size=32000, emb_dim=4096, num_heads=32, head_dim=128, mlp_dim=11008,
        num_layers=32, max_length=4096),
}


def preset(name: str, **overrides) -> DecoderOnlyConfig:
    """The preset `name` (a key of `PRESETS`) with `overrides`, e.g. vocab_size=8192."""
    if name not in PRESETS:
        raise ValueError(f"unknown decoder-only preset {name!r}; use one of {list(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


@struct.dataclass
class DecoderOnlyCache:
    """Decoding state: an explicit pytree whose every leaf is batch-major.

    layers: per layer, K/V [B, L, K, H] of the tokens fed so far (keys after RoPE).
    index: [B] int32, the number of tokens fed so far (= next write slot) per example.
    """

    layers: tuple[layers.KVCache, ...]
    index: Array

    @property
    def max_length(self) -> int:
        return self.layers[0].length

    def take(self, indices: Array) -> DecoderOnlyCache:
        """Selects / reorders examples along the batch (beam search, best-of-N copies)."""
        return jax.tree.map(lambda x: x[indices], self)

    def rewind(self, index: Array) -> DecoderOnlyCache:
        """Rolls back to `index` [B] (speculative decoding, or a padded prefill's true
        lengths): later slots are masked and overwritten by the next `decode`."""
        return self.replace(index=jnp.broadcast_to(jnp.asarray(index, jnp.int32),
                                                   self.index.shape))


def attention_mask(
    query_index: Array, key_index: Array, *, query_prefix: Array | None = None,
    key_prefix: Array | None = None, query_segments: Array | None = None,
    key_segments: Array | None = None, sliding_window: int | None = None,
) -> Array:
    """The decoder's self-attention mask, bool [B|1, 1, T, S] (see the module docstring).

    query_index [B|1, T] and key_index [B|1, S]: token indices in the row (cache slots
    when decoding); prefixes (bool) and segments [B, T] / [B, S] are optional.
    """
    mask = key_index[:, None, :] <= query_index[:, :, None]  # [B|1, T, S]
    if query_prefix is not None:
        mask = mask | (query_prefix[:, :, None] & key_prefix[:, None, :])
    if query_segments is not None:
        mask = mask & (query_segments[:, :, None] == key_segments[:, None, :])
    mask = mask[:, None]  # [B|1, 1, T, S]
    if sliding_window is not None:
        mask = mask & layers.make_sliding_window_mask(query_index, key_index, sliding_window)
    return mask


def _dense_kwargs(config: DecoderOnlyConfig) -> dict:
    return {"dtype": config.activation_dtype, "param_dtype": config.parameter_dtype}


def _init(config: DecoderOnlyConfig, residual: bool = False) -> layers.Initializer:
    std = INIT_STDDEV / math.sqrt(2 * config.num_layers) if residual else INIT_STDDEV
    return jax.nn.initializers.normal(stddev=std)


def _norm(config: DecoderOnlyConfig, rngs: nnx.Rngs) -> layers.RMSNorm | layers.LayerNorm:
    if config.norm == "layernorm":
        return layers.LayerNorm(config.emb_dim, epsilon=config.layer_norm_epsilon,
                                use_bias=config.use_bias, rngs=rngs, **_dense_kwargs(config))
    return layers.RMSNorm(config.emb_dim, epsilon=config.layer_norm_epsilon, rngs=rngs,
                          **_dense_kwargs(config))


def _dropout(config: DecoderOnlyConfig) -> nnx.Dropout:
    # T5X shares one mask across the length axis of [B, L, D] activations.
    return nnx.Dropout(config.dropout_rate, broadcast_dims=(-2,))


def _constrain(x: Array) -> Array:
    return rules.with_logical_constraint(x, ("batch", "length", "embed"))


class DecoderLayer(nnx.Module):
    """Pre-norm causal self-attention block and MLP block."""

    def __init__(self, config: DecoderOnlyConfig, index: int, *, rngs: nnx.Rngs):
        self.pre_self_attention_layer_norm = _norm(config, rngs)
        self.self_attention = layers.MultiHeadAttention(
            config.emb_dim, config.num_heads, config.head_dim,
            num_kv_heads=config.num_kv_heads, dropout_rate=config.dropout_rate,
            use_bias=config.use_bias, qkv_bias=config.qkv_bias, kernel_init=_init(config),
            out_kernel_init=_init(config, residual=True), rngs=rngs, **_dense_kwargs(config),
            **config.attention_kwargs,
        )
        self.pre_mlp_layer_norm = _norm(config, rngs)
        self.mlp = moe_lib.feed_forward(
            config.moe, index, f"layers_{index}", config.emb_dim, config.mlp_dim, causal=True,
            activations=config.mlp_activations, dropout_rate=config.dropout_rate,
            use_bias=config.use_bias, kernel_init=_init(config),
            out_kernel_init=_init(config, residual=True), rngs=rngs, **_dense_kwargs(config),
        )
        self.dropout = _dropout(config)

    def __call__(
        self, x: Array, *, mask: Array | layers.AttentionSpec | None,
        rope: layers.Rope | None, cache: layers.KVCache | None, cache_index: Array | None,
        deterministic: bool, rngs: nnx.Rngs | None, token_mask: Array | None = None,
    ) -> tuple[Array, layers.KVCache | None]:
        """[B, T, D] -> ([B, T, D], the updated cache or None). mask: dense, or an
        `AttentionSpec` (attention_impl other than 'xla'). token_mask [B, T]: real
        tokens (an MoE block routes padding nowhere)."""
        kw = {"deterministic": deterministic, "rngs": rngs}
        h = self.pre_self_attention_layer_norm(x)
        if cache is None:
            y = self.self_attention(h, mask=mask, rope=rope, **kw)
        else:
            y, cache = self.self_attention.cached_self_attention(
                h, cache, cache_index, mask=mask, rope=rope, **kw)
        x = _constrain(x + self.dropout(y, **kw))
        y = self.mlp(self.pre_mlp_layer_norm(x), token_mask=token_mask, **kw)
        return _constrain(x + self.dropout(y, **kw)), cache


class DecoderOnly(nnx.Module):
    """Decoder-only LM: tokens [B, T] -> float32 next-token logits [B, T, V].

    No token id is special: padding is a segment id of 0 (or simply never attended,
    being after the real tokens under the causal mask).
    """

    def __init__(self, config: DecoderOnlyConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.token_embedder = layers.Embed(
            config.vocab_size, config.emb_dim, embedding_init=_init(config),
            dtype=config.activation_dtype, attend_dtype=jnp.float32,
            param_dtype=config.parameter_dtype, rngs=rngs,
        )
        if config.position_embedding == "learned":
            self.position_embedder = layers.Embed(
                config.max_length, config.emb_dim, embedding_init=_init(config),
                axes=("length", "embed"), dtype=config.activation_dtype,
                param_dtype=config.parameter_dtype, rngs=rngs,
            )
        else:
            self.position_embedder = nnx.data(None)
        self.input_dropout = _dropout(config)
        self.layers = nnx.List([DecoderLayer(config, i, rngs=rngs)
                                for i in range(config.num_layers)])
        self.decoder_norm = _norm(config, rngs)
        self.output_dropout = _dropout(config)
        if config.tie_embeddings:
            self.logits_dense = nnx.data(None)
        else:
            # float32 logits for a stable softmax, as T5X.
            self.logits_dense = layers.DenseGeneral(
                config.emb_dim, config.vocab_size, kernel_axes=("embed", "vocab"),
                kernel_init=_init(config), dtype=jnp.float32,
                param_dtype=config.parameter_dtype, rngs=rngs,
            )

    def _stack(
        self, tokens: Array, positions: Array, mask: Array | layers.AttentionSpec,
        caches: tuple | None,
        cache_index: Array | None, deterministic: bool, rngs: nnx.Rngs | None,
        token_mask: Array | None = None,
    ) -> tuple[Array, tuple[layers.KVCache, ...] | None]:
        """Embeds tokens at positions [T] or [B, T], runs every layer, final norm."""
        cfg = self.config
        kw = {"deterministic": deterministic, "rngs": rngs}
        x = self.token_embedder(tokens)  # [B, T, D]
        if self.position_embedder is not None:
            x = x + self.position_embedder(positions)  # [T or B, T, D]
        rope = None
        if cfg.position_embedding == "rope":
            rope = layers.Rope.at(positions, cfg.head_dim, cfg.rope_theta)  # once per call
        x = _constrain(self.input_dropout(x, **kw))
        new_caches = []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, mask=mask, rope=rope, cache=None if caches is None else caches[i],
                         cache_index=cache_index, token_mask=token_mask, **kw)
            new_caches.append(c)
        x = _constrain(self.output_dropout(self.decoder_norm(x), **kw))
        return x, (None if caches is None else tuple(new_caches))

    def features(
        self, tokens: Array, *, positions: Array | None = None,
        segment_ids: Array | None = None, prefix_mask: Array | None = None,
        token_mask: Array | None = None,
        deterministic: bool = True, rngs: nnx.Rngs | Array | None = None,
    ) -> Array:
        """Tokens [B, T] -> final-normed hidden states [B, T, D] (activation dtype).

        positions [B, T]: reset per packed segment (default 0..T-1); segment_ids [B, T]:
        packing (block-diagonal attention); prefix_mask [B, T]: 1 on the prefix of a
        prefix LM, which attends bidirectionally within itself. token_mask [B, T]: real
        tokens, for MoE routing (default: segment_ids > 0 if given, else every token).
        """
        cfg = self.config
        rngs = layers.dropout_rngs(rngs, deterministic, cfg.dropout_rate)
        t = tokens.shape[1]
        if t > cfg.max_length:
            raise ValueError(f"sequence length {t} exceeds max_length={cfg.max_length}; "
                             f"raise max_length or shorten the inputs")
        index = jnp.arange(t, dtype=jnp.int32)[None]  # [1, T]
        prefix = None if prefix_mask is None else jnp.asarray(prefix_mask).astype(jnp.bool_)
        if cfg.structural_masks:  # the same mask, per token (default indices 0..T-1)
            mask = layers.AttentionSpec(
                causal=True, sliding_window=cfg.sliding_window, query_prefix=prefix,
                key_prefix=prefix, query_segment_ids=segment_ids, key_segment_ids=segment_ids)
        else:
            mask = attention_mask(index, index, query_prefix=prefix, key_prefix=prefix,
                                  query_segments=segment_ids, key_segments=segment_ids,
                                  sliding_window=cfg.sliding_window)  # [B|1, 1, T, T]
        positions = index[0] if positions is None else positions.astype(jnp.int32)
        if token_mask is None and segment_ids is not None:
            token_mask = segment_ids > 0
        x, _ = self._stack(tokens, positions, mask, None, None, deterministic, rngs,
                           token_mask)
        return x

    def logits(self, hidden: Array) -> Array:
        """Hidden states [B, T, D] -> float32 logits [B, T, V] (tied or untied)."""
        if self.logits_dense is None:
            logits = self.token_embedder.attend(hidden)
        else:
            logits = self.logits_dense(hidden)
        return rules.with_logical_constraint(logits.astype(jnp.float32),
                                             ("batch", "length", "vocab"))

    def __call__(
        self, tokens: Array, *, positions: Array | None = None,
        segment_ids: Array | None = None, prefix_mask: Array | None = None,
        token_mask: Array | None = None,
        deterministic: bool = True, rngs: nnx.Rngs | Array | None = None,
    ) -> Array:
        """Teacher-forced logits [B, T, V] (float32); arguments as `features`."""
        return self.logits(self.features(
            tokens, positions=positions, segment_ids=segment_ids, prefix_mask=prefix_mask,
            token_mask=token_mask, deterministic=deterministic, rngs=rngs))

    def init_cache(self, batch_size: int, max_length: int) -> DecoderOnlyCache:
        """An empty cache of `max_length` slots per layer (activation dtype), index 0."""
        cfg = self.config
        if max_length > cfg.max_length:
            raise ValueError(f"cache max_length {max_length} exceeds the config's "
                             f"max_length={cfg.max_length}; raise it or decode less")
        # One buffer per layer (not one shared): a cache passed to a jit is donatable.
        return DecoderOnlyCache(layers=tuple(
            layers.KVCache.zeros(batch_size, max_length, cfg.kv_heads, cfg.head_dim,
                                 cfg.activation_dtype) for _ in self.layers),
                                index=jnp.zeros((batch_size,), jnp.int32))

    def decode(
        self, tokens: Array, *, cache: DecoderOnlyCache, prefix_mask: Array | None = None,
        token_mask: Array | None = None,
        deterministic: bool = True, rngs: nnx.Rngs | Array | None = None,
    ) -> tuple[Array, DecoderOnlyCache]:
        """Feeds T >= 1 tokens [B, T] per row -> (float32 logits [B, T, V], cache with index + T).

        Token t of row b sits at slot and position index[b] + t and attends to every slot
        up to itself (within `sliding_window`). `prefix_mask` [B, T] (a prefill) lets the
        new prefix tokens attend to each other bidirectionally; earlier slots stay causal.
        `token_mask` [B, T]: real tokens of a ragged prefill (MoE routing skips the rest).
        """
        cfg = self.config
        rngs = layers.dropout_rngs(rngs, deterministic, cfg.dropout_rate)
        t, length = tokens.shape[1], cache.max_length
        query_index = cache.index[:, None] + jnp.arange(t, dtype=jnp.int32)  # [B, T]
        key_index = jnp.arange(length, dtype=jnp.int32)[None]  # [1, L]
        query_prefix = key_prefix = None
        if prefix_mask is not None:
            query_prefix = jnp.asarray(prefix_mask).astype(jnp.bool_)  # [B, T]
            new = key_index - cache.index[:, None]  # [B, L]: slot's offset in this call
            in_call = (new >= 0) & (new < t)
            key_prefix = in_call & jnp.take_along_axis(
                query_prefix, jnp.clip(new, 0, t - 1), axis=1)  # [B, L]
        if cfg.structural_masks:
            mask = layers.AttentionSpec(
                causal=True, sliding_window=cfg.sliding_window, query_index=query_index,
                key_index=key_index, query_prefix=query_prefix, key_prefix=key_prefix)
        else:
            mask = attention_mask(query_index, key_index, query_prefix=query_prefix,
                                  key_prefix=key_prefix, sliding_window=cfg.sliding_window)
        x, caches = self._stack(tokens, query_index, mask, cache.layers, cache.index,
                                deterministic, rngs, token_mask)
        return self.logits(x), DecoderOnlyCache(layers=caches, index=cache.index + t)

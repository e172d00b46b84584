"""T5 v1.1 encoder-decoder network (tokens -> logits), Flax NNX.

Pre-norm RMSNorm blocks; one relative position bias per stack (bidirectional in the
encoder, causal in the decoder) shared by all of its layers; gated-GELU MLP; no biases;
dropout on embeddings and after every attention / MLP block; untied output logits in
v1.1 (tied logits are scaled by 1/sqrt(emb_dim) as in T5).

Packing: segment ids make every attention block-diagonal; positions (reset per segment)
feed the relative bias. With `attention_impl` other than 'xla' the masks are
`AttentionSpec`s and the relative bias is a `bias_fn` evaluated per tile, never a
[B, N, T, S] array in 'blockwise'. Decoding: `init_cache` projects the encoder output into every
layer's cross-attention K/V once; `decode(..., cache=c)` then feeds T >= 1 new tokens per
call. Shape letters are those of `models/layers.py`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct

from models import configs, layers
from models import moe as moe_lib
from partitioning import rules

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class T5Config(configs.NetworkConfig):
    """Every size of the T5 encoder-decoder. Defaults are T5 v1.1 small."""

    vocab_size: int = 32128
    emb_dim: int = 512
    num_heads: int = 6
    head_dim: int = 64
    mlp_dim: int = 1024
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    num_kv_heads: int | None = None  # None: as many as num_heads (T5 is plain MHA)
    dropout_rate: float = 0.0
    mlp_activations: tuple[str, ...] = ("gelu", "linear")  # gated GELU of v1.1
    logits_via_embedding: bool = False  # True: tied output layer (T5 1.0)
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    moe: moe_lib.MoeConfig | None = None  # sparse MoE layers in encoder and decoder (Switch)
    dtype: str = "float32"  # activations, e.g. "bfloat16"
    param_dtype: str = "float32"

    POSITIVE_INT_FIELDS = ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim",
                           "num_encoder_layers", "num_decoder_layers")

    def __post_init__(self):
        self._check_common()
        if self.moe is not None:
            self.moe.check_causal("T5Config.moe (the decoder is causal)")
        buckets = self.relative_attention_num_buckets
        if buckets < 4 or buckets % 2:
            raise ValueError(
                f"relative_attention_num_buckets={buckets} must be an even number >= 4"
            )
        if self.relative_attention_max_distance <= buckets // 2:
            raise ValueError(
                f"relative_attention_max_distance={self.relative_attention_max_distance} "
                f"must exceed relative_attention_num_buckets // 2 = {buckets // 2} "
                "(the exact buckets); T5 uses 32 buckets and max distance 128"
            )


# Published T5 v1.1 sizes (google/t5-v1_1-*), plus this project's own CPU-sized "tiny".
PRESETS: dict[str, T5Config] = {
    # This project's own size (not a released checkpoint): trains on 2 CPU cores in minutes.
    "tiny": T5Config(emb_dim=128, num_heads=4, head_dim=32, mlp_dim=384,
                     num_encoder_layers=2, num_decoder_layers=2),
    "small": T5Config(emb_dim=512, num_heads=6, head_dim=64, mlp_dim=1024,
                      num_encoder_layers=8, num_decoder_layers=8, dtype="bfloat16"),
    "base": T5Config(emb_dim=768, num_heads=12, head_dim=64, mlp_dim=2048,
                     num_encoder_layers=12, num_decoder_layers=12, dtype="bfloat16"),
    "large": T5Config(emb_dim=1024, num_heads=16, head_dim=64, mlp_dim=2816,
                      num_encoder_layers=24, num_decoder_layers=24, dtype="bfloat16"),
    "xl": T5Config(emb_dim=2048, num_heads=32, head_dim=64, mlp_dim=5120,
                   num_encoder_layers=24, num_decoder_layers=24, dtype="bfloat16"),
    "xxl": T5Config(emb_dim=4096, num_heads=64, head_dim=64, mlp_dim=10240,
                    num_encoder_layers=24, num_decoder_layers=24, dtype="bfloat16"),
}


# Switch Transformers (Fedus et al. 2022): T5 with every other feed-forward layer a
# top-1 MoE. switch_base_8 is google/switch-base-8's shape (T5 1.0 base: ReLU, tied
# logits, mlp 3072): 619,339,008 parameters, as HF SwitchTransformersForConditionalGeneration.
_SWITCH_MOE = moe_lib.MoeConfig(
    num_experts=8, num_experts_per_token=1, renormalize=False, capacity_factor=1.25,
    eval_capacity_factor=2.0, layer_interval=2, jitter_noise=0.01,
    load_balance_loss_weight=1e-2, router_z_loss_weight=1e-3)
SWITCH_PRESETS: dict[str, T5Config] = {
    # This project's own size: T5 tiny with 8 experts in layer 1 of each stack.
    "switch_tiny": dataclasses.replace(PRESETS["tiny"], moe=_SWITCH_MOE),
    "switch_base_8": T5Config(emb_dim=768, num_heads=12, head_dim=64, mlp_dim=3072,
                              num_encoder_layers=12, num_decoder_layers=12,
                              mlp_activations=("relu",), logits_via_embedding=True,
                              moe=_SWITCH_MOE, dtype="bfloat16"),
}


def switch(name: str, **overrides) -> T5Config:
    """The Switch preset `name` (a key of `SWITCH_PRESETS`) with `overrides`."""
    if name not in SWITCH_PRESETS:
        raise ValueError(f"unknown Switch preset {name!r}; use one of {list(SWITCH_PRESETS)}")
    return dataclasses.replace(SWITCH_PRESETS[name], **overrides)


def t5_1_1(size: str, **overrides) -> T5Config:
    """The T5 v1.1 preset `size` (tiny, small, base, large, xl, xxl) with `overrides`."""
    if size not in PRESETS:
        raise ValueError(f"unknown T5 v1.1 size {size!r}; use one of {list(PRESETS)}")
    return dataclasses.replace(PRESETS[size], **overrides)


@struct.dataclass
class DecoderCache:
    """Decoding state: an explicit pytree whose every leaf is batch-major.

    self_attention: per decoder layer, K/V [B, L, K, H] of the tokens fed so far.
    cross_attention: per decoder layer, K/V [B, S, K, H] of the encoder output.
    encoder_mask: [B, S] bool, the encoder positions the decoder may attend to.
    index: [B] int32, the number of tokens fed so far (= next write slot) per example.
    """

    self_attention: tuple[layers.KVCache, ...]
    cross_attention: tuple[layers.KVCache, ...]
    encoder_mask: Array
    index: Array

    @property
    def max_length(self) -> int:
        return self.self_attention[0].length

    def take(self, indices: Array) -> DecoderCache:
        """Selects / reorders examples along the batch (beam search, best-of-N copies)."""
        return jax.tree.map(lambda x: x[indices], self)

    def rewind(self, index: Array) -> DecoderCache:
        """Rolls back to `index` [B] (speculative decoding): later slots are masked and
        overwritten by the next `decode`."""
        return self.replace(index=jnp.broadcast_to(jnp.asarray(index, jnp.int32),
                                                   self.index.shape))


def _dense_kwargs(config: T5Config) -> dict:
    return {"dtype": config.activation_dtype, "param_dtype": config.parameter_dtype}


def _attention(config: T5Config, rngs: nnx.Rngs) -> layers.MultiHeadAttention:
    return layers.MultiHeadAttention(
        config.emb_dim, config.num_heads, config.head_dim,
        num_kv_heads=config.num_kv_heads, dropout_rate=config.dropout_rate,
        scale_in_query_init=True, rngs=rngs, **_dense_kwargs(config),
        **config.attention_kwargs,
    )


def _norm(config: T5Config, rngs: nnx.Rngs) -> layers.RMSNorm:
    return layers.RMSNorm(config.emb_dim, epsilon=config.layer_norm_epsilon, rngs=rngs,
                          **_dense_kwargs(config))


def _mlp(config: T5Config, index: int, name: str, rngs: nnx.Rngs,
         causal: bool = False) -> layers.MlpBlock | moe_lib.MoeBlock:
    return moe_lib.feed_forward(
        config.moe, index, name, config.emb_dim, config.mlp_dim, causal=causal,
        activations=config.mlp_activations, dropout_rate=config.dropout_rate, rngs=rngs,
        **_dense_kwargs(config),
    )


def _dropout(config: T5Config, broadcast_length: bool = True) -> nnx.Dropout:
    # T5X shares one mask across the length axis of [B, L, D] activations.
    return nnx.Dropout(config.dropout_rate, broadcast_dims=(-2,) if broadcast_length else ())


def _relpos(config: T5Config, bidirectional: bool, rngs: nnx.Rngs) -> layers.RelativePositionBiases:
    return layers.RelativePositionBiases(
        config.num_heads, num_buckets=config.relative_attention_num_buckets,
        max_distance=config.relative_attention_max_distance, bidirectional=bidirectional,
        param_dtype=config.parameter_dtype, rngs=rngs,
    )


def _constrain(x: Array) -> Array:
    return rules.with_logical_constraint(x, ("batch", "length", "embed"))


class EncoderLayer(nnx.Module):
    """Pre-norm self-attention block and MLP block."""

    def __init__(self, config: T5Config, index: int, *, rngs: nnx.Rngs):
        self.pre_attention_layer_norm = _norm(config, rngs)
        self.attention = _attention(config, rngs)
        self.pre_mlp_layer_norm = _norm(config, rngs)
        self.mlp = _mlp(config, index, f"encoder/layers_{index}", rngs)
        self.dropout = _dropout(config)

    def __call__(self, x: Array, *, mask: Array | layers.AttentionSpec | None,
                 bias: Array | None, deterministic: bool, rngs: nnx.Rngs | None,
                 token_mask: Array | None = None,
                 bias_fn: layers.attention_lib.BiasFn | None = None) -> Array:
        """[B, S, D] -> [B, S, D]; token_mask [B, S]: real tokens (for MoE routing);
        the relative bias is given dense (`bias`) or per tile (`bias_fn`)."""
        kw = {"deterministic": deterministic, "rngs": rngs}
        y = self.attention(self.pre_attention_layer_norm(x), mask=mask, bias=bias,
                           bias_fn=bias_fn, **kw)
        x = _constrain(x + self.dropout(y, **kw))
        y = self.mlp(self.pre_mlp_layer_norm(x), token_mask=token_mask, **kw)
        return _constrain(x + self.dropout(y, **kw))


class DecoderLayer(nnx.Module):
    """Pre-norm causal self-attention, cross-attention and MLP blocks."""

    def __init__(self, config: T5Config, index: int, *, rngs: nnx.Rngs):
        self.pre_self_attention_layer_norm = _norm(config, rngs)
        self.self_attention = _attention(config, rngs)
        self.pre_cross_attention_layer_norm = _norm(config, rngs)
        self.encoder_decoder_attention = _attention(config, rngs)
        self.pre_mlp_layer_norm = _norm(config, rngs)
        self.mlp = _mlp(config, index, f"decoder/layers_{index}", rngs, causal=True)
        self.dropout = _dropout(config)

    def __call__(
        self, x: Array, cross_kv: layers.KVCache, *,
        self_mask: Array | layers.AttentionSpec | None,
        cross_mask: Array | layers.AttentionSpec | None, bias: Array | None,
        self_cache: layers.KVCache | None, cache_index: Array | None, deterministic: bool,
        rngs: nnx.Rngs | None, token_mask: Array | None = None,
        bias_fn: layers.attention_lib.BiasFn | None = None,
    ) -> tuple[Array, layers.KVCache | None]:
        """[B, T, D] -> ([B, T, D], updated self-attention cache or None)."""
        kw = {"deterministic": deterministic, "rngs": rngs}
        h = self.pre_self_attention_layer_norm(x)
        if self_cache is None:
            y = self.self_attention(h, mask=self_mask, bias=bias, bias_fn=bias_fn, **kw)
        else:
            y, self_cache = self.self_attention.cached_self_attention(
                h, self_cache, cache_index, mask=self_mask, bias=bias, bias_fn=bias_fn, **kw)
        x = _constrain(x + self.dropout(y, **kw))
        h = self.pre_cross_attention_layer_norm(x)
        y = self.encoder_decoder_attention.attend(h, cross_kv, mask=cross_mask, **kw)
        x = _constrain(x + self.dropout(y, **kw))
        y = self.mlp(self.pre_mlp_layer_norm(x), token_mask=token_mask, **kw)
        return _constrain(x + self.dropout(y, **kw)), self_cache


class Encoder(nnx.Module):
    """Embedded inputs [B, S, D] -> encoded [B, S, D]."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.relpos_bias = _relpos(config, bidirectional=True, rngs=rngs)
        self.input_dropout = _dropout(config)
        self.layers = nnx.List([EncoderLayer(config, i, rngs=rngs)
                                for i in range(config.num_encoder_layers)])
        self.encoder_norm = _norm(config, rngs)
        self.output_dropout = _dropout(config, broadcast_length=False)

    def __call__(self, x: Array, *, mask: Array | layers.AttentionSpec | None,
                 positions: Array, deterministic: bool, rngs: nnx.Rngs | None,
                 token_mask: Array | None = None) -> Array:
        kw = {"deterministic": deterministic, "rngs": rngs}
        bias, bias_fn = _relative_bias(self.relpos_bias, mask, positions, positions)
        if isinstance(mask, layers.AttentionSpec):
            mask = mask.replace(query_positions=positions, key_positions=positions)
        x = _constrain(self.input_dropout(x, **kw))
        for layer in self.layers:
            x = layer(x, mask=mask, bias=bias, bias_fn=bias_fn, token_mask=token_mask, **kw)
        return _constrain(self.output_dropout(self.encoder_norm(x), **kw))


class Decoder(nnx.Module):
    """Embedded targets [B, T, D] and cross K/V -> final hidden states [B, T, D]."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.relpos_bias = _relpos(config, bidirectional=False, rngs=rngs)
        self.input_dropout = _dropout(config)
        self.layers = nnx.List([DecoderLayer(config, i, rngs=rngs)
                                for i in range(config.num_decoder_layers)])
        self.decoder_norm = _norm(config, rngs)
        self.output_dropout = _dropout(config)

    def __call__(
        self, y: Array, cross_kv: tuple[layers.KVCache, ...], *, self_mask: Array | None,
        cross_mask: Array | None, query_positions: Array, key_positions: Array,
        self_cache: tuple[layers.KVCache, ...] | None, cache_index: Array | None,
        deterministic: bool, rngs: nnx.Rngs | None, token_mask: Array | None = None,
    ) -> tuple[Array, tuple[layers.KVCache, ...] | None]:
        kw = {"deterministic": deterministic, "rngs": rngs}
        bias, bias_fn = _relative_bias(self.relpos_bias, self_mask, query_positions,
                                       key_positions)
        if isinstance(self_mask, layers.AttentionSpec):
            self_mask = self_mask.replace(query_positions=query_positions,
                                          key_positions=key_positions)
        y = _constrain(self.input_dropout(y, **kw))
        new_cache = []
        for i, layer in enumerate(self.layers):
            y, c = layer(y, cross_kv[i], self_mask=self_mask, cross_mask=cross_mask,
                         bias=bias, bias_fn=bias_fn,
                         self_cache=None if self_cache is None else self_cache[i],
                         cache_index=cache_index, token_mask=token_mask, **kw)
            new_cache.append(c)
        y = _constrain(self.output_dropout(self.decoder_norm(y), **kw))
        return y, (None if self_cache is None else tuple(new_cache))


def _relative_bias(
    relpos: layers.RelativePositionBiases, mask: Array | layers.AttentionSpec | None,
    query_positions: Array, key_positions: Array,
) -> tuple[Array | None, layers.RelativePositionBiases | None]:
    """(bias, bias_fn) of one stack: the dense [B|1, N, T, S] bias, computed once and
    shared by every layer; or, with a structural mask, the module itself as bias_fn."""
    if isinstance(mask, layers.AttentionSpec):
        return None, relpos
    return relpos(query_positions, key_positions), None


def _teacher_forced_masks(
    config: T5Config, encoder_input_tokens: Array, decoder_input_tokens: Array,
    encoder_segment_ids: Array | None, decoder_segment_ids: Array | None,
) -> tuple[Array | layers.AttentionSpec, Array | layers.AttentionSpec]:
    """The decoder's (self, cross) attention masks over all T tokens: causal and
    encoder-padding, packed when segment ids are given; dense [B, 1, T, T] / [B, 1, T, S]
    masks, or `AttentionSpec`s with `config.structural_masks`."""
    if config.structural_masks:
        self_mask = layers.AttentionSpec(
            causal=True, query_segment_ids=decoder_segment_ids,
            key_segment_ids=decoder_segment_ids)
        cross_mask = layers.AttentionSpec(
            key_valid=encoder_input_tokens > 0, query_segment_ids=decoder_segment_ids,
            key_segment_ids=encoder_segment_ids)
        return self_mask, cross_mask
    self_mask = layers.make_causal_mask(decoder_input_tokens)  # [B, 1, T, T]
    cross_mask = layers.make_attention_mask(  # [B, 1, T, S]
        jnp.ones_like(decoder_input_tokens, jnp.bool_), encoder_input_tokens > 0)
    if decoder_segment_ids is not None:
        self_mask = layers.combine_masks(self_mask, layers.make_segment_mask(
            decoder_segment_ids, decoder_segment_ids))
        cross_mask = layers.combine_masks(cross_mask, layers.make_segment_mask(
            decoder_segment_ids, encoder_segment_ids))
    return self_mask, cross_mask


def _default_positions(tokens: Array) -> Array:
    return jnp.arange(tokens.shape[-1], dtype=jnp.int32)  # [T], shared by the batch


def _as_rngs(rngs: nnx.Rngs | Array | None, deterministic: bool,
             config: T5Config) -> nnx.Rngs | None:
    if isinstance(rngs, jax.Array):  # a bare key: the dropout stream
        rngs = nnx.Rngs(dropout=rngs)
    if not deterministic and config.dropout_rate > 0 and rngs is None:
        raise ValueError(
            f"deterministic=False with dropout_rate={config.dropout_rate} needs "
            "rngs=nnx.Rngs(dropout=key)"
        )
    return rngs


class EncoderDecoder(nnx.Module):
    """T5 encoder-decoder: (encoder tokens [B, S], decoder tokens [B, T]) -> logits [B, T, V].

    Token id 0 is padding in the encoder input (masked as a key). Decoder inputs start
    with 0 (T5's BOS); padding there only affects padded positions, hidden by causality.
    """

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        self.token_embedder = layers.Embed(
            config.vocab_size, config.emb_dim,
            embedding_init=jax.nn.initializers.normal(stddev=1.0),  # T5X's choice
            dtype=config.activation_dtype, attend_dtype=jnp.float32,
            param_dtype=config.parameter_dtype, rngs=rngs,
        )
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)
        if config.logits_via_embedding:
            self.logits_dense = nnx.data(None)
        else:
            # float32 logits for a stable softmax, as T5X.
            self.logits_dense = layers.DenseGeneral(
                config.emb_dim, config.vocab_size, kernel_axes=("embed", "vocab"),
                dtype=jnp.float32, param_dtype=config.parameter_dtype, rngs=rngs,
            )

    def encode(
        self, encoder_input_tokens: Array, *, encoder_segment_ids: Array | None = None,
        encoder_positions: Array | None = None, deterministic: bool = True,
        rngs: nnx.Rngs | Array | None = None,
    ) -> Array:
        """Encoder tokens [B, S] -> encoded [B, S, D] (activation dtype)."""
        rngs = _as_rngs(rngs, deterministic, self.config)
        valid = encoder_input_tokens > 0
        if self.config.structural_masks:
            mask = layers.AttentionSpec(
                query_valid=valid, key_valid=valid, query_segment_ids=encoder_segment_ids,
                key_segment_ids=encoder_segment_ids)
        else:
            mask = layers.make_attention_mask(valid, valid)  # [B, 1, S, S]
            if encoder_segment_ids is not None:
                mask = layers.combine_masks(
                    mask, layers.make_segment_mask(encoder_segment_ids, encoder_segment_ids))
        if encoder_positions is None:
            encoder_positions = _default_positions(encoder_input_tokens)
        x = self.token_embedder(encoder_input_tokens)
        return self.encoder(x, mask=mask, positions=encoder_positions,
                            deterministic=deterministic, rngs=rngs, token_mask=valid)

    def _logits(self, y: Array) -> Array:
        if self.logits_dense is None:
            logits = self.token_embedder.attend(y) / jnp.sqrt(jnp.float32(y.shape[-1]))
        else:
            logits = self.logits_dense(y)
        return rules.with_logical_constraint(logits.astype(jnp.float32),
                                             ("batch", "length", "vocab"))

    def decode(
        self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array, *,
        encoder_segment_ids: Array | None = None, decoder_segment_ids: Array | None = None,
        decoder_positions: Array | None = None, deterministic: bool = True,
        rngs: nnx.Rngs | Array | None = None, cache: DecoderCache | None = None,
        decoder_token_mask: Array | None = None,
    ) -> tuple[Array, DecoderCache | None]:
        """Decoder tokens [B, T] -> (float32 logits [B, T, V], new cache or None).

        Without `cache`: teacher-forced pass over all T tokens (causal, packed when
        segment ids are given). With `cache` (from `init_cache`): the T >= 1 tokens are
        fed at slots index..index+T-1 of each example, attend causally to every token fed
        so far, and the returned cache has index + T; `encoded` and
        `encoder_input_tokens` are then unused (the cache holds their K/V and mask).
        `decoder_token_mask` [B, T]: real decoder tokens, for MoE routing (default:
        decoder_segment_ids > 0 if given, else every token; token 0 is T5's BOS).
        """
        rngs = _as_rngs(rngs, deterministic, self.config)
        if (encoder_segment_ids is None) != (decoder_segment_ids is None):
            raise ValueError("pass both encoder_segment_ids and decoder_segment_ids or neither")
        y = self.token_embedder(decoder_input_tokens)
        kw = {"deterministic": deterministic, "rngs": rngs}
        if cache is None:
            self_mask, cross_mask = _teacher_forced_masks(
                self.config, encoder_input_tokens, decoder_input_tokens, encoder_segment_ids,
                decoder_segment_ids)
            if decoder_positions is None:
                decoder_positions = _default_positions(decoder_input_tokens)
            if decoder_token_mask is None and decoder_segment_ids is not None:
                decoder_token_mask = decoder_segment_ids > 0
            cross_kv = tuple(layer.encoder_decoder_attention.project_kv(encoded)
                             for layer in self.decoder.layers)
            y, _ = self.decoder(y, cross_kv, self_mask=self_mask, cross_mask=cross_mask,
                                query_positions=decoder_positions,
                                key_positions=decoder_positions, self_cache=None,
                                cache_index=None, token_mask=decoder_token_mask, **kw)
            return self._logits(y), None

        if decoder_segment_ids is not None or decoder_positions is not None:
            raise ValueError("cached decoding takes no segment ids or positions: the cache "
                             "index gives each token's position")
        t = decoder_input_tokens.shape[1]
        query_positions = cache.index[:, None] + jnp.arange(t, dtype=jnp.int32)  # [B, T]
        key_positions = jnp.arange(cache.max_length, dtype=jnp.int32)  # [L]
        if self.config.structural_masks:  # the cache mask: slot <= the query's slot
            self_mask = layers.AttentionSpec(causal=True, query_index=query_positions,
                                             key_index=key_positions[None])
            cross_mask = layers.AttentionSpec(key_valid=cache.encoder_mask)
        else:
            self_mask = layers.make_cache_mask(cache.index, t, cache.max_length)  # [B, 1, T, L]
            cross_mask = cache.encoder_mask[:, None, None, :]  # [B, S] -> [B, 1, 1, S]
        y, self_cache = self.decoder(
            y, cache.cross_attention, self_mask=self_mask, cross_mask=cross_mask,
            query_positions=query_positions, key_positions=key_positions,
            self_cache=cache.self_attention, cache_index=cache.index,
            token_mask=decoder_token_mask, **kw)
        new_cache = cache.replace(self_attention=self_cache, index=cache.index + t)
        return self._logits(y), new_cache

    def __call__(
        self, encoder_input_tokens: Array, decoder_input_tokens: Array, *,
        encoder_segment_ids: Array | None = None, decoder_segment_ids: Array | None = None,
        encoder_positions: Array | None = None, decoder_positions: Array | None = None,
        decoder_token_mask: Array | None = None,
        deterministic: bool = True, rngs: nnx.Rngs | Array | None = None,
    ) -> Array:
        """Teacher-forced logits [B, T, V] (float32); `decoder_token_mask` as in `decode`."""
        rngs = _as_rngs(rngs, deterministic, self.config)
        encoded = self.encode(encoder_input_tokens, encoder_segment_ids=encoder_segment_ids,
                              encoder_positions=encoder_positions,
                              deterministic=deterministic, rngs=rngs)
        logits, _ = self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                                encoder_segment_ids=encoder_segment_ids,
                                decoder_segment_ids=decoder_segment_ids,
                                decoder_positions=decoder_positions,
                                decoder_token_mask=decoder_token_mask,
                                deterministic=deterministic, rngs=rngs)
        return logits

    def init_cache(
        self, encoded: Array, encoder_input_tokens: Array, max_decode_length: int, *,
        encoder_segment_ids: Array | None = None,
    ) -> DecoderCache:
        """An empty decoding cache of `max_decode_length` slots for `encoded` [B, S, D].

        Cross-attention K/V are computed here, once. Segment ids (if any) only restrict
        which encoder positions are visible (nonzero segments).
        """
        cfg = self.config
        batch = encoder_input_tokens.shape[0]
        encoder_mask = encoder_input_tokens > 0  # [B, S]
        if encoder_segment_ids is not None:
            encoder_mask = jnp.logical_and(encoder_mask, encoder_segment_ids > 0)
        # One buffer per layer (not one shared): a cache passed to a jit is donatable.
        return DecoderCache(
            self_attention=tuple(
                layers.KVCache.zeros(batch, max_decode_length, cfg.kv_heads, cfg.head_dim,
                                     cfg.activation_dtype) for _ in self.decoder.layers),
            cross_attention=tuple(layer.encoder_decoder_attention.project_kv(encoded)
                                  for layer in self.decoder.layers),
            encoder_mask=encoder_mask,
            index=jnp.zeros((batch,), jnp.int32),
        )

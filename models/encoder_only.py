"""BERT encoder-only network (tokens -> hidden states, MLM logits, class logits), Flax NNX.

Post-LayerNorm blocks as in BERT: embeddings = LN(token + learned position + token type),
then per layer x = LN(x + Attn(x)), x = LN(x + MLP(x)); biases everywhere, logits scaled
by 1/sqrt(head_dim), erf GELU. Two optional heads: the masked-LM head (dense, activation,
LayerNorm, logits through the token embedding plus a vocab bias) and the sequence
classifier (BERT's pooler, dense + tanh on position 0, then a linear layer).

Padding: token id 0 is padding and is masked as a key only, as in BERT (a padding query
still attends to the real keys; its output is ignored by every loss). Packing: segment
ids [B, T] (0 = padding) make attention block-diagonal and positions restart per
segment. Shape letters are those of `models/layers.py`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from models import configs, layers
from models import moe as moe_lib
from partitioning import rules

Array = jax.Array

# BERT's initializer_range: every kernel and table ~ truncated normal with this stddev.
INIT_STDDEV = 0.02
_init = jax.nn.initializers.truncated_normal(stddev=INIT_STDDEV)


@dataclasses.dataclass(frozen=True)
class EncoderOnlyConfig(configs.NetworkConfig):
    """Every size of the BERT encoder. Defaults are BERT-base (uncased vocabulary)."""

    vocab_size: int = 30522
    emb_dim: int = 768
    num_heads: int = 12
    head_dim: int = 64
    mlp_dim: int = 3072
    num_layers: int = 12
    max_length: int = 512  # rows of the learned position table
    type_vocab_size: int = 2  # token types (segment A / B); 0: no token-type table
    mlp_activations: tuple[str, ...] = ("gelu_exact",)  # BERT's erf GELU
    layer_norm_epsilon: float = 1e-12
    dropout_rate: float = 0.1  # hidden and attention-probability dropout
    num_classes: int = 0  # > 0: pooler + classifier of that many classes
    mlm_head: bool = True  # masked-LM head with the output tied to the token embedding
    moe: moe_lib.MoeConfig | None = None  # sparse MoE layers (expert choice allowed here)
    dtype: str = "float32"  # activations, e.g. "bfloat16"
    param_dtype: str = "float32"

    POSITIVE_INT_FIELDS = ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim",
                           "num_layers", "max_length")
    ACTIVATIONS_EXAMPLE = "('gelu_exact',)"

    def __post_init__(self):
        self._check_common()
        for field in ("type_vocab_size", "num_classes"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{field}={value!r} must be an integer >= 0 (0 disables it)")
        if not isinstance(self.mlm_head, bool):
            raise ValueError(f"mlm_head={self.mlm_head!r} must be True or False")


# Published BERT sizes (google-research/bert), plus this project's CPU-sized "bert_tiny"
# (the shape of Google's BERT-Tiny, L=2 H=128 A=2, over the shipped 8,192-row vocabulary).
PRESETS: dict[str, EncoderOnlyConfig] = {
    "bert_tiny": EncoderOnlyConfig(vocab_size=8192, emb_dim=128, num_heads=2, head_dim=64,
                                   mlp_dim=512, num_layers=2),
    "bert_base": EncoderOnlyConfig(emb_dim=768, num_heads=12, head_dim=64, mlp_dim=3072,
                                   num_layers=12, dtype="bfloat16"),
    "bert_large": EncoderOnlyConfig(emb_dim=1024, num_heads=16, head_dim=64, mlp_dim=4096,
                                    num_layers=24, dtype="bfloat16"),
}


def preset(name: str, **overrides) -> EncoderOnlyConfig:
    """The BERT preset `name` (bert_tiny, bert_base, bert_large) with `overrides`."""
    if name not in PRESETS:
        raise ValueError(f"unknown BERT preset {name!r}; use one of {list(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def _dtypes(config: EncoderOnlyConfig) -> dict:
    return {"dtype": config.activation_dtype, "param_dtype": config.parameter_dtype}


def _norm(config: EncoderOnlyConfig, rngs: nnx.Rngs) -> layers.LayerNorm:
    return layers.LayerNorm(config.emb_dim, epsilon=config.layer_norm_epsilon, use_bias=True,
                            rngs=rngs, **_dtypes(config))


def _dropout(config: EncoderOnlyConfig) -> nnx.Dropout:
    # BERT drops elements independently (T5X shares a mask over the length axis).
    return nnx.Dropout(config.dropout_rate)


def _constrain(x: Array) -> Array:
    return rules.with_logical_constraint(x, ("batch", "length", "embed"))


class Embeddings(nnx.Module):
    """tokens [B, T] -> LN(token + position + token type), then dropout: [B, T, D]."""

    def __init__(self, config: EncoderOnlyConfig, *, rngs: nnx.Rngs):
        table = functools.partial(layers.Embed, embedding_init=_init, rngs=rngs,
                                  dtype=config.activation_dtype,
                                  param_dtype=config.parameter_dtype)
        # Rows 'vocab' (split over the model axis under TP); `attend` (the tied MLM
        # output) is float32.
        self.token_embedder = table(config.vocab_size, config.emb_dim, attend_dtype=jnp.float32)
        # Short tables, replicated along their rows ('length' maps to no mesh axis).
        self.position_embedder = table(config.max_length, config.emb_dim,
                                       axes=("length", "embed"))
        if config.type_vocab_size:
            self.token_type_embedder = table(config.type_vocab_size, config.emb_dim,
                                             axes=(None, "embed"))
        else:
            self.token_type_embedder = nnx.data(None)
        self.layer_norm = _norm(config, rngs)
        self.dropout = _dropout(config)

    def __call__(self, tokens: Array, *, token_type_ids: Array | None, positions: Array,
                 deterministic: bool, rngs: nnx.Rngs | None) -> Array:
        x = self.token_embedder(tokens) + self.position_embedder(positions)  # [B, T, D]
        if self.token_type_embedder is not None:
            if token_type_ids is None:  # every token is type 0: one row, broadcast
                token_type_ids = jnp.zeros((1, 1), jnp.int32)
            x = x + self.token_type_embedder(token_type_ids)
        x = self.layer_norm(x)
        return _constrain(self.dropout(x, deterministic=deterministic, rngs=rngs))


class EncoderLayer(nnx.Module):
    """Post-LN block: x = LN(x + Attn(x)); x = LN(x + MLP(x))."""

    def __init__(self, config: EncoderOnlyConfig, index: int, *, rngs: nnx.Rngs):
        self.attention = layers.MultiHeadAttention(
            config.emb_dim, config.num_heads, config.head_dim,
            dropout_rate=config.dropout_rate, use_bias=True, scale_in_query_init=False,
            kernel_init=_init, rngs=rngs, **_dtypes(config), **config.attention_kwargs,
        )
        self.post_attention_layer_norm = _norm(config, rngs)
        # BERT has no dropout inside the MLP; it drops the block's output (self.dropout).
        self.mlp = moe_lib.feed_forward(
            config.moe, index, f"layers_{index}", config.emb_dim, config.mlp_dim,
            activations=config.mlp_activations, dropout_rate=0.0, use_bias=True,
            kernel_init=_init, rngs=rngs, **_dtypes(config),
        )
        self.post_mlp_layer_norm = _norm(config, rngs)
        self.dropout = _dropout(config)

    def __call__(self, x: Array, *, mask: Array | layers.AttentionSpec | None,
                 deterministic: bool, rngs: nnx.Rngs | None,
                 token_mask: Array | None = None) -> Array:
        """[B, T, D] -> [B, T, D]; token_mask [B, T]: real tokens (for MoE routing)."""
        kw = {"deterministic": deterministic, "rngs": rngs}
        y = self.attention(x, mask=mask, **kw)
        x = _constrain(self.post_attention_layer_norm(x + self.dropout(y, **kw)))
        y = self.mlp(x, token_mask=token_mask, **kw)
        return _constrain(self.post_mlp_layer_norm(x + self.dropout(y, **kw)))


class MlmHead(nnx.Module):
    """hidden [B, T, D] -> LN(act(hidden W + b)) E^T + vocab bias: float32 [B, T, V].

    The output projection is the token embedding E (tied, as in BERT); only the vocab
    bias is the head's own. The activation is the first of `mlp_activations`.
    """

    def __init__(self, config: EncoderOnlyConfig, *, rngs: nnx.Rngs):
        # ('embed', 'mlp'): a [D, D] kernel cannot name 'embed' twice (one mesh axis
        # cannot shard both dims); its output is sharded like an MLP hidden under TP.
        self.dense = layers.DenseGeneral(
            config.emb_dim, config.emb_dim, kernel_axes=("embed", "mlp"), use_bias=True,
            kernel_init=_init, rngs=rngs, **_dtypes(config),
        )
        self.activation = config.mlp_activations[0]
        self.layer_norm = _norm(config, rngs)
        self.bias = nnx.Param(
            layers.partitioned(jax.nn.initializers.zeros, ("vocab",))(
                rngs.params(), (config.vocab_size,), config.parameter_dtype)
        )

    def __call__(self, hidden: Array, embedder: layers.Embed) -> Array:
        h = rules.with_logical_constraint(self.dense(hidden), ("batch", "length", "mlp"))
        h = _constrain(self.layer_norm(layers.get_activation(self.activation)(h)))
        logits = embedder.attend(h) + self.bias[...].astype(jnp.float32)  # [B, T, V]
        return rules.with_logical_constraint(logits, ("batch", "length", "vocab"))


class ClassifierHead(nnx.Module):
    """BERT's pooler (dense + tanh on position 0), dropout, linear: float32 [B, C]."""

    def __init__(self, config: EncoderOnlyConfig, *, rngs: nnx.Rngs):
        self.pooler = layers.DenseGeneral(
            config.emb_dim, config.emb_dim, kernel_axes=("embed", "mlp"), use_bias=True,
            kernel_init=_init, rngs=rngs, **_dtypes(config),
        )
        self.dropout = _dropout(config)
        # float32 logits for a stable softmax; the class dim is tiny: replicated.
        self.classifier = layers.DenseGeneral(
            config.emb_dim, config.num_classes, kernel_axes=("mlp", None), use_bias=True,
            kernel_init=_init, dtype=jnp.float32, param_dtype=config.parameter_dtype,
            rngs=rngs,
        )

    def __call__(self, hidden: Array, *, deterministic: bool,
                 rngs: nnx.Rngs | None) -> Array:
        pooled = jnp.tanh(self.pooler(hidden[:, 0]))  # [B, D], the [CLS] slot
        pooled = rules.with_logical_constraint(pooled, ("batch", "mlp"))
        pooled = self.dropout(pooled, deterministic=deterministic, rngs=rngs)
        return rules.with_logical_constraint(self.classifier(pooled), ("batch", None))


class EncoderOnly(nnx.Module):
    """BERT: tokens [B, T] -> hidden [B, T, D] (`encode`) and its heads.

    `__call__` gives MLM logits; `classification_logits(encode(...))` the class logits
    (examples unpacked, the [CLS] token at position 0 of each row).
    """

    def __init__(self, config: EncoderOnlyConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = Embeddings(config, rngs=rngs)
        self.layers = nnx.List([EncoderLayer(config, i, rngs=rngs)
                                for i in range(config.num_layers)])
        self.mlm = MlmHead(config, rngs=rngs) if config.mlm_head else nnx.data(None)
        self.classifier_head = (ClassifierHead(config, rngs=rngs) if config.num_classes
                                else nnx.data(None))

    def encode(
        self, tokens: Array, *, token_type_ids: Array | None = None,
        segment_ids: Array | None = None, positions: Array | None = None,
        deterministic: bool = True, rngs: nnx.Rngs | Array | None = None,
    ) -> Array:
        """tokens [B, T] (0 = padding) -> hidden states [B, T, D] (activation dtype).

        token_type_ids [B, T] (default all 0); segment_ids [B, T] for packed rows (0 =
        padding; attention stays within a segment); positions [B, T] (default 0..T-1;
        restart them per segment when packing).
        """
        cfg = self.config
        rngs = layers.dropout_rngs(rngs, deterministic, cfg.dropout_rate)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length]; got shape {tokens.shape}")
        if token_type_ids is not None and not cfg.type_vocab_size:
            raise ValueError("token_type_ids given but type_vocab_size=0 (no token-type "
                             "table); drop them or set type_vocab_size > 0")
        if positions is None:
            if tokens.shape[1] > cfg.max_length:
                raise ValueError(
                    f"sequence length {tokens.shape[1]} exceeds max_length={cfg.max_length} "
                    "(rows of the learned position table); truncate the inputs to "
                    f"{cfg.max_length} or build the network with a larger max_length"
                )
            positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)  # [T], shared
        # Padding is masked as a key only (BERT); padding queries are never read.
        if cfg.structural_masks:
            mask = layers.AttentionSpec(key_valid=tokens > 0, query_segment_ids=segment_ids,
                                        key_segment_ids=segment_ids)
        else:
            mask = (tokens > 0)[:, None, None, :]  # [B, 1, 1, S]
            if segment_ids is not None:
                mask = layers.combine_masks(mask, layers.make_segment_mask(segment_ids,
                                                                           segment_ids))
        kw = {"deterministic": deterministic, "rngs": rngs}
        x = self.embeddings(tokens, token_type_ids=token_type_ids, positions=positions, **kw)
        for layer in self.layers:
            x = layer(x, mask=mask, token_mask=tokens > 0, **kw)
        return x

    def _require_mlm_head(self) -> None:
        if self.mlm is None:
            raise ValueError("this network has no MLM head (mlm_head=False); build it with "
                             "mlm_head=True to get MLM logits")

    def mlm_logits(self, hidden: Array) -> Array:
        """hidden [B, T, D] -> masked-LM logits, float32 [B, T, V]."""
        self._require_mlm_head()
        return self.mlm(hidden, self.embeddings.token_embedder)

    def classification_logits(self, hidden: Array, *, deterministic: bool = True,
                              rngs: nnx.Rngs | Array | None = None) -> Array:
        """hidden [B, T, D] -> class logits, float32 [B, num_classes], from position 0.

        Rows must be unpacked examples whose first token is the [CLS] slot.
        """
        if self.classifier_head is None:
            raise ValueError("this network has no classifier (num_classes=0); build it with "
                             "num_classes > 0 to get classification logits")
        rngs = layers.dropout_rngs(rngs, deterministic, self.config.dropout_rate)
        return self.classifier_head(hidden, deterministic=deterministic, rngs=rngs)

    def __call__(
        self, tokens: Array, *, token_type_ids: Array | None = None,
        segment_ids: Array | None = None, positions: Array | None = None,
        deterministic: bool = True, rngs: nnx.Rngs | Array | None = None,
    ) -> Array:
        """tokens [B, T] -> masked-LM logits, float32 [B, T, V] (see `encode`)."""
        self._require_mlm_head()  # before any work
        hidden = self.encode(tokens, token_type_ids=token_type_ids, segment_ids=segment_ids,
                             positions=positions, deterministic=deterministic, rngs=rngs)
        return self.mlm_logits(hidden)

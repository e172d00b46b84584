"""Model APIs: the bridge between a network (`models/`) and the runtime.

A network maps tokens to logits. A Model adds what training, evaluation and inference
need around it: the feature converter, the loss, scoring and decoding. Model methods
take the network (an NNX module) as their first argument, so the trainer can merge
parameters into it inside a jitted function and a frozen second network (reference,
teacher, drafter) can be passed the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import seqio
from flax import nnx

from models import encoder_decoder
from t5x_like import decoding, losses

Batch = Mapping[str, jax.Array]

# 'NUM_REAL_TARGET_TOKENS' divides the summed loss by the number of target tokens with
# non-zero weight in the whole global batch (exact under gradient accumulation); a float
# divides by that constant (T5X's pretraining choice, e.g. 233472 = 2048 * 114).
LossNormalizingFactor = float | str | None


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """How token losses become the scalar that is differentiated."""

    z_loss: float = 1e-4
    label_smoothing: float = 0.0
    loss_normalizing_factor: LossNormalizingFactor = "NUM_REAL_TARGET_TOKENS"

    def __post_init__(self):
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={self.label_smoothing} must be in [0, 1)")
        lnf = self.loss_normalizing_factor
        if isinstance(lnf, str) and lnf != "NUM_REAL_TARGET_TOKENS":
            raise ValueError(
                f"loss_normalizing_factor={lnf!r} is not known; use 'NUM_REAL_TARGET_TOKENS', "
                "a positive number, or None (sum)"
            )
        if isinstance(lnf, (int, float)) and lnf <= 0:
            raise ValueError(f"loss_normalizing_factor={lnf} must be positive")

    def denominator(self, num_tokens: jax.Array) -> jax.Array:
        """What the summed loss of a global batch is divided by."""
        lnf = self.loss_normalizing_factor
        if lnf is None:
            return jnp.ones((), jnp.float32)
        if isinstance(lnf, str):
            return jnp.maximum(num_tokens.astype(jnp.float32), 1.0)
        return jnp.asarray(lnf, jnp.float32)


class EncoderDecoderModel:
    """T5-style encoder-decoder: loss, score and predict around `models.EncoderDecoder`."""

    FEATURE_CONVERTER_CLS: type[seqio.FeatureConverter] = seqio.EncDecFeatureConverter

    def __init__(
        self,
        config: encoder_decoder.T5Config,
        vocabulary: seqio.Vocabulary,
        *,
        loss: LossConfig = LossConfig(),
        input_vocabulary: seqio.Vocabulary | None = None,
    ):
        if vocabulary.vocab_size > config.vocab_size:
            raise ValueError(
                f"vocabulary has {vocabulary.vocab_size} ids but the network embeds only "
                f"{config.vocab_size}; set NUM_EMBEDDINGS >= {vocabulary.vocab_size}"
            )
        self.config = config
        self.output_vocabulary = vocabulary
        self.input_vocabulary = input_vocabulary or vocabulary
        self.loss = loss

    # --- building ---------------------------------------------------------------------

    def make_network(self, rngs: nnx.Rngs) -> encoder_decoder.EncoderDecoder:
        """A freshly initialised network."""
        return encoder_decoder.EncoderDecoder(self.config, rngs=rngs)

    def feature_converter(self, pack: bool = True) -> seqio.FeatureConverter:
        return self.FEATURE_CONVERTER_CLS(pack=pack)

    def model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
        return dict(self.FEATURE_CONVERTER_CLS(pack=False).get_model_feature_lengths(
            task_feature_lengths))

    # --- training ---------------------------------------------------------------------

    def _logits(self, network, batch: Batch, *, deterministic: bool, rngs=None) -> jax.Array:
        return network(
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            encoder_segment_ids=batch.get("encoder_segment_ids"),
            decoder_segment_ids=batch.get("decoder_segment_ids"),
            encoder_positions=batch.get("encoder_positions"),
            decoder_positions=batch.get("decoder_positions"),
            deterministic=deterministic,
            rngs=rngs,
        )

    def loss_sums(
        self, network, batch: Batch, *, rngs: nnx.Rngs | None = None, deterministic: bool = False
    ) -> dict[str, jax.Array]:
        """Summed (not yet normalised) loss terms and counts of one (micro)batch.

        Sums, not means, so that microbatches add up to exactly the full batch; the
        trainer divides by `LossConfig.denominator` of the global token count.
        """
        logits = self._logits(network, batch, deterministic=deterministic, rngs=rngs)
        targets = batch["decoder_target_tokens"]
        weights = batch.get("decoder_loss_weights")
        if weights is None:
            weights = (targets > 0).astype(jnp.float32)
        weights = weights.astype(jnp.float32)
        token_loss, token_z = losses.cross_entropy_with_z_loss(
            logits, targets, z_loss=self.loss.z_loss, label_smoothing=self.loss.label_smoothing
        )
        # "The target has the largest logit", without argmax: XLA's CPU backend does not
        # vectorise argmax (5-6% of the quickstart step). Exact ties count as correct.
        target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        correct = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
        return {
            "loss_sum": jnp.sum(token_loss * weights),
            "z_loss_sum": jnp.sum(token_z * weights),
            "correct_sum": jnp.sum(correct * weights),
            "num_tokens": jnp.sum(weights),
        }

    def metrics_from_sums(self, sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Loss terms from summed ones: `loss` and `z_loss` are divided by the loss
        normalising factor (per token for 'NUM_REAL_TARGET_TOKENS'); `cross_entropy` and
        `accuracy` are always per real target token."""
        denom = self.loss.denominator(sums["num_tokens"])
        tokens = jnp.maximum(sums["num_tokens"], 1.0)
        return {
            "loss": sums["loss_sum"] / denom,
            "z_loss": sums["z_loss_sum"] / denom,
            "cross_entropy": (sums["loss_sum"] - sums["z_loss_sum"]) / tokens,
            "accuracy": sums["correct_sum"] / tokens,
            "num_tokens": sums["num_tokens"],
        }

    # --- scoring ----------------------------------------------------------------------

    def score_batch(self, network, batch: Batch) -> jax.Array:
        """Log-likelihood of each example's targets: [B] (sum over its weighted tokens)."""
        logits = self._logits(network, batch, deterministic=True).astype(jnp.float32)
        targets = batch["decoder_target_tokens"]
        weights = batch.get("decoder_loss_weights", (targets > 0)).astype(jnp.float32)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        token_ll = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(token_ll * weights, axis=-1)

    # --- decoding ---------------------------------------------------------------------

    def make_step_fn(
        self, network, encoded: jax.Array, encoder_input_tokens: jax.Array
    ) -> Callable[[jax.Array, Any], tuple[jax.Array, Any]]:
        """(tokens [B, t], cache) -> (last logits [B, V], cache) for `t5x_like.decoding`.

        The encoder runs once; every decoding method (sampling, beam search, a drafter's
        proposals) then only calls the cached decoder through this function.
        """

        def step_fn(tokens, cache):
            logits, cache = network.decode(
                encoded, encoder_input_tokens, tokens, cache=cache, deterministic=True
            )
            return logits[:, -1, :].astype(jnp.float32), cache

        return step_fn

    def predict_batch(
        self,
        network,
        batch: Batch,
        *,
        rng: jax.Array | None = None,
        max_decode_length: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        return_scores: bool = False,
    ):
        """Decodes targets for `batch["encoder_input_tokens"]` with the KV cache.

        temperature 0 is greedy; otherwise temperature / top-k / top-p sampling.
        Returns tokens [B, max_decode_length] (0 after EOS), and their log-probs if asked.
        """
        inputs = batch["encoder_input_tokens"]
        if max_decode_length is None:
            max_decode_length = batch["decoder_input_tokens"].shape[1]
        encoded = network.encode(inputs, deterministic=True)
        cache = network.init_cache(encoded, inputs, max_decode_length)

        step_fn = self.make_step_fn(network, encoded, inputs)
        first = jnp.zeros((inputs.shape[0],), jnp.int32)  # T5's decoder starts from pad (0).
        out = decoding.sample(
            step_fn,
            first,
            cache,
            max_decode_steps=max_decode_length,
            rng=rng if rng is not None else jax.random.key(0),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_id=self.output_vocabulary.eos_id,
        )
        if return_scores:
            return out.tokens, out.log_probs
        return out.tokens

"""Model APIs: the bridge between a network (`models/`) and the runtime.

A network maps tokens to logits. A Model adds what training, evaluation and inference
need around it: the feature converter, the loss, scoring and decoding. Model methods
take the network (an NNX module) as their first argument, so the trainer can merge
parameters into it inside a jitted function and a frozen second network (reference,
teacher, drafter) can be passed the same way.

  EncoderDecoderModel          T5: span corruption / seq2seq (seqio EncDec features)
  DecoderOnlyModel             GPT / Llama: next token, prefix LM (seqio LM / PrefixLM)
  EncoderOnlyModel             BERT masked LM (MaskedLMFeatureConverter)
  SequenceClassificationModel  BERT + classifier head (ClassificationFeatureConverter)

All share `BaseModel`: the same loss sums, metrics and interface, so the trainer, the
eval and infer runs and every hook work with any of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import seqio
from flax import nnx

from models import decoder_only, encoder_decoder, encoder_only, moe
from t5x_like import decoding, losses, speculative

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


def _token_accuracy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """1.0 where the target has the largest logit (exact ties count as correct).

    No argmax: XLA's CPU backend does not vectorise it (5-6% of the quickstart step).
    """
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)


def _check_vocab(config, vocabulary: seqio.Vocabulary, what: str = "NUM_EMBEDDINGS") -> None:
    if vocabulary.vocab_size > config.vocab_size:
        raise ValueError(
            f"vocabulary has {vocabulary.vocab_size} ids but the network embeds only "
            f"{config.vocab_size}; set {what} >= {vocabulary.vocab_size}"
        )


class BaseModel:
    """What every family shares: feature converter plumbing, loss sums and metrics.

    A subclass names its network class, its feature converter and its target / weight
    features, and implements `_logits`; `loss_sums`, `metrics_from_sums` and
    `score_batch` then work unchanged (sums over the weighted targets, so microbatches
    add up exactly and the trainer normalises once per global batch).
    """

    NETWORK_CLS: type[nnx.Module]
    FEATURE_CONVERTER_CLS: type[seqio.FeatureConverter]
    TARGET_FEATURE: str
    WEIGHT_FEATURE: str

    def __init__(
        self,
        config,
        vocabulary: seqio.Vocabulary,
        *,
        loss: LossConfig = LossConfig(),
        input_vocabulary: seqio.Vocabulary | None = None,
    ):
        _check_vocab(config, vocabulary)
        self.config = config
        self.output_vocabulary = vocabulary
        self.input_vocabulary = input_vocabulary or vocabulary
        self.loss = loss

    # --- building ---------------------------------------------------------------------

    def make_network(self, rngs: nnx.Rngs) -> nnx.Module:
        """A freshly initialised network."""
        return self.NETWORK_CLS(self.config, rngs=rngs)

    def feature_converter(self, pack: bool = True) -> seqio.FeatureConverter:
        return self.FEATURE_CONVERTER_CLS(pack=pack)

    def model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
        return dict(self.feature_converter(pack=False).get_model_feature_lengths(
            task_feature_lengths))

    def tokens_per_example(self, task_feature_lengths: Mapping[str, int]) -> int:
        """Token positions the network processes per example (throughput accounting)."""
        lengths = self.model_feature_lengths(task_feature_lengths)
        return sum(v for k, v in lengths.items() if k.endswith("input_tokens"))

    # --- training ---------------------------------------------------------------------

    def _logits(self, network, batch: Batch, *, deterministic: bool, rngs=None) -> jax.Array:
        raise NotImplementedError

    def _targets_and_weights(self, batch: Batch) -> tuple[jax.Array, jax.Array]:
        targets = batch[self.TARGET_FEATURE]
        weights = batch.get(self.WEIGHT_FEATURE)
        if weights is None:
            weights = targets > 0
        return targets, weights.astype(jnp.float32)

    def loss_sums(
        self, network, batch: Batch, *, rngs: nnx.Rngs | None = None, deterministic: bool = False
    ) -> dict[str, jax.Array]:
        """Summed (not yet normalised) loss terms and counts of one (micro)batch.

        Sums, not means, so that microbatches add up to exactly the full batch; the
        trainer divides by `LossConfig.denominator` of the global token count. With MoE
        layers, `loss_sum` includes their weighted auxiliary losses (`moe_aux_loss_sum`)
        and 'moe/<layer>/...' sums carry each layer's statistics (`models.moe`).
        """
        with moe.collect() as moe_stats:
            logits = self._logits(network, batch, deterministic=deterministic, rngs=rngs)
        targets, weights = self._targets_and_weights(batch)
        token_loss, token_z = losses.cross_entropy_with_z_loss(
            logits, targets, z_loss=self.loss.z_loss, label_smoothing=self.loss.label_smoothing
        )
        sums = {
            "loss_sum": jnp.sum(token_loss * weights),
            "z_loss_sum": jnp.sum(token_z * weights),
            "correct_sum": jnp.sum(_token_accuracy(logits, targets) * weights),
            "num_tokens": jnp.sum(weights),
        }
        if moe_stats.layers:
            # MoE auxiliary losses (already weighted, summed over layers) count once per
            # target token, so they average over microbatches like the cross entropy.
            aux = sum(s["aux_loss"] for s in moe_stats.layers.values())
            sums["moe_aux_loss_sum"] = aux * sums["num_tokens"]
            sums["loss_sum"] = sums["loss_sum"] + sums["moe_aux_loss_sum"]
            sums.update(moe.stats_sums(moe_stats))
        return sums

    def metrics_from_sums(self, sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Loss terms from summed ones: `loss` and `z_loss` are divided by the loss
        normalising factor (per token for 'NUM_REAL_TARGET_TOKENS'); `cross_entropy` and
        `accuracy` are always per real target token."""
        denom = self.loss.denominator(sums["num_tokens"])
        tokens = jnp.maximum(sums["num_tokens"], 1.0)
        aux = sums.get("moe_aux_loss_sum", 0.0)
        metrics = {
            "loss": sums["loss_sum"] / denom,
            "z_loss": sums["z_loss_sum"] / denom,
            "cross_entropy": (sums["loss_sum"] - sums["z_loss_sum"] - aux) / tokens,
            "accuracy": sums["correct_sum"] / tokens,
            "num_tokens": sums["num_tokens"],
        }
        if "moe_aux_loss_sum" in sums:
            metrics["moe_aux_loss"] = aux / denom
            metrics.update(moe.metrics_from_stats_sums(sums))
        return metrics

    # --- scoring ----------------------------------------------------------------------

    def score_batch(self, network, batch: Batch) -> jax.Array:
        """Log-likelihood of each example's targets: [B] (sum over its weighted tokens)."""
        logits = self._logits(network, batch, deterministic=True).astype(jnp.float32)
        targets, weights = self._targets_and_weights(batch)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        token_ll = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        return jnp.sum((token_ll * weights).reshape(token_ll.shape[0], -1), axis=-1)

    # --- decoding ---------------------------------------------------------------------

    def _decode(self, step_fn, first_tokens, cache, *, rng, max_decode_length: int,
                return_scores: bool, initial_logits=None, context_tokens=None,
                method: str = "sample", beam_size: int = 4, alpha: float = 0.6,
                num_candidates: int = 4, length_normalize: bool = False, **sampling):
        """Runs the decoder `method` over `step_fn` with this model's EOS.

        method 'sample' (`decoding.sample`: greedy at temperature 0, sampling knobs in
        `sampling`; `num_samples=N` gives [B * N, S], row b's draws at b*N..b*N+N-1),
        'beam' (`decoding.beam_search`: the best beam; its score is log-prob / brevity
        penalty; `stop_tokens` end beams like EOS) or 'best_of_n' (`decoding.best_of_n`
        over `num_candidates` samples; its score is the model log-prob, per token with
        `length_normalize`). Returns tokens [B, S] (and the scores [B] if asked).
        """
        eos_id = self.output_vocabulary.eos_id
        rng = rng if rng is not None else jax.random.key(0)
        if method == "sample":
            out = decoding.sample(step_fn, first_tokens, cache, max_decode_steps=max_decode_length,
                                  rng=rng, eos_id=eos_id, initial_logits=initial_logits,
                                  context_tokens=context_tokens, **sampling)
            tokens, scores = out.tokens, out.log_probs
        elif method == "beam":
            stop_tokens = sampling.pop("stop_tokens", ())
            if sampling.pop("temperature", 0.0) != 0.0 or sampling:
                raise ValueError(f"method='beam' takes beam_size, alpha and stop_tokens, not "
                                 f"{sorted(sampling) or ['temperature']} (beam search is "
                                 "deterministic and returns one sequence per example)")
            out = decoding.beam_search(step_fn, first_tokens, cache, beam_size=beam_size,
                                       max_decode_steps=max_decode_length, alpha=alpha,
                                       eos_id=eos_id, initial_logits=initial_logits,
                                       stop_tokens=stop_tokens)
            tokens, scores = out.tokens[:, 0], out.scores[:, 0]
        elif method == "best_of_n":
            sampling.pop("num_samples", None)
            out = decoding.best_of_n(step_fn, first_tokens, cache, n=num_candidates, rng=rng,
                                     max_decode_steps=max_decode_length,
                                     length_normalize=length_normalize, eos_id=eos_id,
                                     initial_logits=initial_logits,
                                     context_tokens=context_tokens, **sampling)
            tokens = out.tokens
            scores = jnp.take_along_axis(out.scores, out.best_index[:, None], axis=1)[:, 0]
        else:
            raise ValueError(f"unknown decoding method {method!r}; use 'sample', 'beam', "
                             "'best_of_n' or 'speculative'")
        return (tokens, scores) if return_scores else tokens

    @staticmethod
    def _speculative_result(out, return_scores: bool):
        if return_scores:
            raise ValueError("method='speculative' returns tokens only (no scores); score "
                             "them with score_batch")
        return out.tokens

    @staticmethod
    def _check_drafter(drafter, network_cls) -> None:
        if drafter is None:
            raise ValueError("method='speculative' needs drafter=<a smaller network of the "
                             "same family and vocabulary> (infer.DecodeConfig.drafter)")
        if not isinstance(drafter, network_cls):
            raise TypeError(f"the drafter must be a {network_cls.__name__} like the target; "
                            f"got {type(drafter).__name__}")

    # --- what a prediction shows ------------------------------------------------------

    def example_text_ids(self, batch: Mapping[str, np.ndarray], i: int, prompt_length: int = 0
                         ) -> tuple[np.ndarray, np.ndarray]:
        """(input ids, target ids) of row `i` of a host batch, for samples and infer.

        `prompt_length`: the decoder-only `predict_batch` argument of the same name (the
        leading target tokens shown to the model count as input)."""
        raise NotImplementedError

    def prediction_text(self, prediction: np.ndarray) -> str:
        """One row of `predict_batch`'s output as text."""
        ids = [int(i) for i in np.asarray(prediction).reshape(-1)]
        vocab = self.output_vocabulary
        if vocab.eos_id in ids:
            ids = ids[: ids.index(vocab.eos_id)]
        return vocab.decode([i for i in ids if i != 0])


class EncoderDecoderModel(BaseModel):
    """T5-style encoder-decoder: loss, score and predict around `models.EncoderDecoder`."""

    NETWORK_CLS = encoder_decoder.EncoderDecoder
    FEATURE_CONVERTER_CLS = seqio.EncDecFeatureConverter
    TARGET_FEATURE = "decoder_target_tokens"
    WEIGHT_FEATURE = "decoder_loss_weights"

    def __init__(
        self,
        config: encoder_decoder.T5Config,
        vocabulary: seqio.Vocabulary,
        *,
        loss: LossConfig = LossConfig(),
        input_vocabulary: seqio.Vocabulary | None = None,
    ):
        super().__init__(config, vocabulary, loss=loss, input_vocabulary=input_vocabulary)

    def _logits(self, network, batch: Batch, *, deterministic: bool, rngs=None) -> jax.Array:
        return network(
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            encoder_segment_ids=batch.get("encoder_segment_ids"),
            decoder_segment_ids=batch.get("decoder_segment_ids"),
            encoder_positions=batch.get("encoder_positions"),
            decoder_positions=batch.get("decoder_positions"),
            # A decoder position is real exactly when its target is (MoE routing).
            decoder_token_mask=batch["decoder_target_tokens"] > 0,
            deterministic=deterministic,
            rngs=rngs,
        )

    def example_text_ids(self, batch, i, prompt_length=0):
        return batch["encoder_input_tokens"][i], batch["decoder_target_tokens"][i]

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
        return_scores: bool = False,
        method: str = "sample",
        drafter=None,
        gamma: int = 4,
        **decode_kwargs,
    ):
        """Decodes targets for `batch["encoder_input_tokens"]` with the KV cache.

        `method`: 'sample' (temperature 0 = greedy; top_k, top_p, min_p, penalties,
        stop_tokens, num_samples in `decode_kwargs`), 'beam' (beam_size, alpha), 'best_of_n'
        (num_candidates, length_normalize, sampling knobs) or 'speculative' (`drafter`: a
        smaller `EncoderDecoder` on the same vocabulary proposes `gamma` tokens per target
        call; greedy output equals the target's). See `BaseModel._decode`.
        Returns tokens [B, max_decode_length] (0 after EOS), and their scores if asked.
        """
        inputs = batch["encoder_input_tokens"]
        if max_decode_length is None:
            max_decode_length = batch["decoder_input_tokens"].shape[1]
        if method == "speculative":
            self._check_drafter(drafter, encoder_decoder.EncoderDecoder)
            out = speculative.speculative_encoder_decoder(
                network, drafter, inputs, max_decode_steps=max_decode_length, gamma=gamma,
                rng=rng if rng is not None else jax.random.key(0), temperature=temperature,
                top_k=decode_kwargs.pop("top_k", 0), top_p=decode_kwargs.pop("top_p", 1.0),
                eos_id=self.output_vocabulary.eos_id)
            _no_other_knobs(decode_kwargs)
            return self._speculative_result(out, return_scores)
        encoded = network.encode(inputs, deterministic=True)
        cache = network.init_cache(encoded, inputs, max_decode_length)

        step_fn = self.make_step_fn(network, encoded, inputs)
        first = jnp.zeros((inputs.shape[0],), jnp.int32)  # T5's decoder starts from pad (0).
        return self._decode(step_fn, first, cache, rng=rng, max_decode_length=max_decode_length,
                            temperature=temperature, return_scores=return_scores,
                            method=method, **decode_kwargs)


class DecoderOnlyModel(BaseModel):
    """GPT / Llama-style decoder-only LM around `models.DecoderOnly`.

    Next-token tasks (features "targets") use seqio's LMFeatureConverter; tasks with
    "inputs" and "targets" (prefix LM, or any seq2seq task as a decoder-only problem) use
    the PrefixLMFeatureConverter, which concatenates them and takes the loss on the
    targets only. With `inputs_bidirectional_attention` the inputs part attends
    bidirectionally (T5's prefix LM; the converter's `decoder_causal_attention`),
    otherwise the whole sequence is causal.
    """

    NETWORK_CLS = decoder_only.DecoderOnly
    FEATURE_CONVERTER_CLS = seqio.LMFeatureConverter
    TARGET_FEATURE = "decoder_target_tokens"
    WEIGHT_FEATURE = "decoder_loss_weights"

    def __init__(
        self,
        config: decoder_only.DecoderOnlyConfig,
        vocabulary: seqio.Vocabulary,
        *,
        loss: LossConfig = LossConfig(),
        feature_converter_cls: type[seqio.FeatureConverter] | None = None,
        inputs_bidirectional_attention: bool = False,
    ):
        super().__init__(config, vocabulary, loss=loss)
        if feature_converter_cls is not None:
            self.FEATURE_CONVERTER_CLS = feature_converter_cls
        if inputs_bidirectional_attention and not issubclass(
            self.FEATURE_CONVERTER_CLS, seqio.PrefixLMFeatureConverter
        ):
            raise ValueError(
                "inputs_bidirectional_attention=True needs the inputs/targets split of "
                "seqio.PrefixLMFeatureConverter; set feature_converter_cls = "
                f"@seqio.PrefixLMFeatureConverter (got {self.FEATURE_CONVERTER_CLS.__name__})"
            )
        self.inputs_bidirectional_attention = inputs_bidirectional_attention

    def _prefix_mask(self, batch: Batch) -> jax.Array | None:
        if not self.inputs_bidirectional_attention:
            return None
        return batch.get("decoder_causal_attention")

    def _logits(self, network, batch: Batch, *, deterministic: bool, rngs=None) -> jax.Array:
        return network(
            batch["decoder_input_tokens"],
            positions=batch.get("decoder_positions"),
            segment_ids=batch.get("decoder_segment_ids"),
            prefix_mask=self._prefix_mask(batch),
            # An input position is real exactly when its target is (MoE routing).
            token_mask=batch["decoder_target_tokens"] > 0,
            deterministic=deterministic,
            rngs=rngs,
        )

    def example_text_ids(self, batch, i, prompt_length=0):
        targets = np.asarray(batch["decoder_target_tokens"][i])
        if "decoder_causal_attention" in batch:
            # The converter marks BOS + inputs: one more position than there are inputs.
            n = max(int(np.sum(batch["decoder_causal_attention"][i])) - 1, 0)
        else:
            n = prompt_length
        return targets[:n], targets[n:]

    # --- decoding ---------------------------------------------------------------------

    def make_step_fn(self, network) -> Callable[[jax.Array, Any], tuple[jax.Array, Any]]:
        """(tokens [B, t], cache) -> (last logits [B, V], cache) for `t5x_like.decoding`."""

        def step_fn(tokens, cache):
            logits, cache = network.decode(tokens, cache=cache, deterministic=True)
            return logits[:, -1, :].astype(jnp.float32), cache

        return step_fn

    def prefill(
        self, network, prompt: jax.Array, prompt_lengths: jax.Array, max_length: int,
        prefix_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, Any]:
        """Runs the prompts [B, P] (padded on the right, BOS first) through the network in
        one pass and returns (logits [B, V] of each row's last prompt token, a cache of
        `max_length` slots positioned after the prompt).

        Rows may have different lengths: each row's cache index is its own length, and
        the K/V written for its padding are masked, then overwritten by the next tokens.
        """
        batch = prompt.shape[0]
        cache = network.init_cache(batch, max_length)
        real = jnp.arange(prompt.shape[1])[None] < prompt_lengths[:, None]
        logits, cache = network.decode(prompt, cache=cache, prefix_mask=prefix_mask,
                                       token_mask=real, deterministic=True)
        last = jnp.take_along_axis(
            logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0].astype(jnp.float32)
        return last, cache.rewind(prompt_lengths)

    def predict_batch(
        self,
        network,
        batch: Batch,
        *,
        rng: jax.Array | None = None,
        max_decode_length: int | None = None,
        temperature: float = 0.0,
        prompt_length: int = 0,
        return_scores: bool = False,
        method: str = "sample",
        drafter=None,
        gamma: int = 4,
        **decode_kwargs,
    ):
        """Continues each row's prompt with the KV cache.

        The prompt is BOS plus the inputs (prefix-LM / seq2seq batches, from
        `decoder_causal_attention`) or, for next-token batches, BOS plus the first
        `prompt_length` target tokens (0: unconditional samples). `method` and
        `decode_kwargs` as `EncoderDecoderModel.predict_batch`; the repetition penalty
        counts the prompt. 'speculative' needs causal prompts (not a bidirectional prefix
        LM). Returns the generated tokens [B, max_decode_length] (0 after EOS), and their
        scores if asked.
        """
        dec_inputs = batch["decoder_input_tokens"]
        b, length = dec_inputs.shape
        if "decoder_causal_attention" in batch:
            prompt_lengths = jnp.maximum(jnp.sum(batch["decoder_causal_attention"], -1), 1)
        else:
            prompt_lengths = jnp.minimum(
                jnp.full((b,), 1 + prompt_length, jnp.int32),
                jnp.maximum(jnp.sum(dec_inputs != 0, -1) + 1, 1))
        prompt_lengths = prompt_lengths.astype(jnp.int32)
        positions = jnp.arange(length, dtype=jnp.int32)[None, :]
        in_prompt = positions < prompt_lengths[:, None]
        # Zero what follows the prompt: the model must not see the targets.
        prompt = jnp.where(in_prompt, dec_inputs, 0)
        if max_decode_length is None:
            max_decode_length = length
        if method == "speculative":
            self._check_drafter(drafter, decoder_only.DecoderOnly)
            if self.inputs_bidirectional_attention:
                raise ValueError("method='speculative' prefills causally; a prefix LM's "
                                 "bidirectional prompt is not supported (use 'sample')")
            out = speculative.speculative_decoder_only(
                network, drafter, prompt, prompt_lengths, max_decode_steps=max_decode_length,
                gamma=gamma, rng=rng if rng is not None else jax.random.key(0),
                temperature=temperature, top_k=decode_kwargs.pop("top_k", 0),
                top_p=decode_kwargs.pop("top_p", 1.0), eos_id=self.output_vocabulary.eos_id)
            _no_other_knobs(decode_kwargs)
            return self._speculative_result(out, return_scores)
        prefix_mask = in_prompt if self.inputs_bidirectional_attention else None
        initial_logits, cache = self.prefill(
            network, prompt, prompt_lengths, length + max_decode_length, prefix_mask)
        return self._decode(
            self.make_step_fn(network),
            jnp.zeros((b,), jnp.int32),  # unused: step 0 samples from initial_logits
            cache, rng=rng, max_decode_length=max_decode_length, temperature=temperature,
            return_scores=return_scores, initial_logits=initial_logits,
            context_tokens=prompt, method=method, **decode_kwargs)


def _argmax_only(model: str, decode_kwargs: Mapping[str, Any]) -> None:
    """Encoder-only models predict by one argmax: only the default decoding applies."""
    if decode_kwargs.get("method", "sample") != "sample" or decode_kwargs.get(
            "num_samples", 1) != 1:
        raise ValueError(f"{model} predicts by an argmax over its logits; method="
                         f"{decode_kwargs.get('method')!r} / num_samples="
                         f"{decode_kwargs.get('num_samples')} apply to decoders only")


def _no_other_knobs(decode_kwargs: Mapping[str, Any]) -> None:
    """Speculative decoding takes temperature / top-k / top-p only."""
    if decode_kwargs:
        raise ValueError(f"method='speculative' does not take {sorted(decode_kwargs)}; it "
                         "samples with temperature, top_k and top_p only")


def _feature_converters():
    from t5x_like.data import feature_converters  # the data package imports tensorflow

    return feature_converters


class EncoderOnlyModel(BaseModel):
    """BERT-style masked LM around `models.EncoderOnly`.

    Loss on every selected position (mask, random and unchanged tokens alike), as BERT;
    the MaskedLMFeatureConverter marks them with `encoder_loss_weights`.
    """

    NETWORK_CLS = encoder_only.EncoderOnly
    TARGET_FEATURE = "encoder_target_tokens"
    WEIGHT_FEATURE = "encoder_loss_weights"

    def __init__(
        self,
        config: encoder_only.EncoderOnlyConfig,
        vocabulary: seqio.Vocabulary,
        *,
        loss: LossConfig = LossConfig(),
    ):
        super().__init__(config, vocabulary, loss=loss)

    @property
    def FEATURE_CONVERTER_CLS(self):
        return _feature_converters().MaskedLMFeatureConverter

    def _hidden(self, network, batch: Batch, *, deterministic: bool, rngs=None) -> jax.Array:
        return network.encode(
            batch["encoder_input_tokens"],
            token_type_ids=batch.get("encoder_token_type_ids"),
            segment_ids=batch.get("encoder_segment_ids"),
            positions=batch.get("encoder_positions"),
            deterministic=deterministic,
            rngs=rngs,
        )

    def _logits(self, network, batch: Batch, *, deterministic: bool, rngs=None) -> jax.Array:
        hidden = self._hidden(network, batch, deterministic=deterministic, rngs=rngs)
        return network.mlm_logits(hidden)

    def example_text_ids(self, batch, i, prompt_length=0):
        return batch["encoder_input_tokens"][i], batch["encoder_target_tokens"][i]

    def predict_batch(self, network, batch: Batch, *, rng=None, return_scores: bool = False,
                      **unused_decode_kwargs):
        """The most likely original token at every selected position ([B, L], 0 elsewhere).

        Positions come from `encoder_loss_weights` when present (eval batches), else from
        every non-padding position.
        """
        del rng
        _argmax_only(type(self).__name__, unused_decode_kwargs)
        logits = self._logits(network, batch, deterministic=True)
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        weights = batch.get("encoder_loss_weights", batch["encoder_input_tokens"] > 0)
        tokens = jnp.where(weights > 0, tokens, 0)
        if return_scores:
            log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            lp = jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]
            return tokens, jnp.sum(jnp.where(weights > 0, lp, 0.0), axis=-1)
        return tokens


class SequenceClassificationModel(EncoderOnlyModel):
    """BERT with a classifier on the pooled first position (the [CLS] slot).

    Features from the ClassificationFeatureConverter: `encoder_input_tokens` [B, L] and
    `classification_labels` [B]. A row is real when its first token is not padding (eval
    batches are padded with all-zero rows). `num_tokens` in the sums counts examples.
    """

    TARGET_FEATURE = "classification_labels"

    def __init__(
        self,
        config: encoder_only.EncoderOnlyConfig,
        vocabulary: seqio.Vocabulary,
        *,
        loss: LossConfig = LossConfig(z_loss=0.0),
    ):
        if config.num_classes < 1:
            raise ValueError(
                f"num_classes={config.num_classes}: a classifier needs num_classes >= 1; "
                "set NUM_CLASSES in the model gin"
            )
        super().__init__(config, vocabulary, loss=loss)

    @property
    def FEATURE_CONVERTER_CLS(self):
        return _feature_converters().ClassificationFeatureConverter

    def feature_converter(self, pack: bool = False) -> seqio.FeatureConverter:
        if pack:
            raise ValueError("classification examples are not packed; set USE_PACKING = False")
        return self.FEATURE_CONVERTER_CLS(pack=False)

    def _logits(self, network, batch: Batch, *, deterministic: bool, rngs=None) -> jax.Array:
        hidden = self._hidden(network, batch, deterministic=deterministic, rngs=rngs)
        return network.classification_logits(  # [B, C]
            hidden, deterministic=deterministic, rngs=rngs)

    def _targets_and_weights(self, batch: Batch) -> tuple[jax.Array, jax.Array]:
        labels = batch[self.TARGET_FEATURE].astype(jnp.int32)
        real = (batch["encoder_input_tokens"][:, 0] != 0).astype(jnp.float32)
        return labels, real

    def example_text_ids(self, batch, i, prompt_length=0):
        return batch["encoder_input_tokens"][i], np.asarray([batch[self.TARGET_FEATURE][i]])

    def predict_batch(self, network, batch: Batch, *, rng=None, return_scores: bool = False,
                      **unused_decode_kwargs):
        """The most likely class of every row: [B] int32 (and its log-prob if asked)."""
        del rng
        _argmax_only(type(self).__name__, unused_decode_kwargs)
        logits = self._logits(network, batch, deterministic=True).astype(jnp.float32)
        labels = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if return_scores:
            return labels, jnp.max(jax.nn.log_softmax(logits, axis=-1), axis=-1)
        return labels

    def prediction_text(self, prediction: np.ndarray) -> str:
        return str(int(np.asarray(prediction).reshape(-1)[0]))

"""EncoderDecoderModel: loss terms, score, and KV-cached decoding against the plain
forward pass."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from models import encoder_decoder
from t5x_like import model_api
from t5x_like.data import vocabularies

VOCAB = vocabularies.get_vocabulary("byte")
CONFIG = encoder_decoder.t5_1_1("tiny", vocab_size=384)


@pytest.fixture(scope="module")
def model_and_net():
    model = model_api.EncoderDecoderModel(CONFIG, VOCAB)
    return model, model.make_network(nnx.Rngs(0))


def _batch(seed=0, b=4, s=16, t=8):
    rng = np.random.default_rng(seed)
    enc = rng.integers(3, 350, (b, s)).astype(np.int32)
    enc[:, -3:] = 0  # encoder padding
    tgt = rng.integers(3, 350, (b, t)).astype(np.int32)
    tgt[0, -2:] = 0  # a shorter target
    dec_in = np.concatenate([np.zeros((b, 1), np.int32), tgt[:, :-1]], axis=1)
    return dict(encoder_input_tokens=enc, decoder_input_tokens=dec_in,
                decoder_target_tokens=tgt, decoder_loss_weights=(tgt > 0).astype(np.int32))


def test_loss_sums_match_optax_cross_entropy(model_and_net):
    model, net = model_and_net
    batch = _batch()
    sums = model.loss_sums(net, batch, deterministic=True)
    logits = net(batch["encoder_input_tokens"], batch["decoder_input_tokens"])
    w = batch["decoder_loss_weights"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["decoder_target_tokens"])
    log_z = jax.nn.logsumexp(logits, axis=-1)
    np.testing.assert_allclose(sums["loss_sum"], np.sum((ce + 1e-4 * log_z**2) * w), rtol=1e-5)
    np.testing.assert_allclose(sums["z_loss_sum"], np.sum(1e-4 * log_z**2 * w), rtol=1e-5)
    assert sums["num_tokens"] == w.sum()
    metrics = model.metrics_from_sums(sums)
    np.testing.assert_allclose(metrics["loss"], sums["loss_sum"] / w.sum(), rtol=1e-6)
    # The score is the negative summed cross entropy of each example (no z-loss).
    scores = model.score_batch(net, batch)
    np.testing.assert_allclose(scores, -np.sum(ce * w, axis=1), rtol=1e-5, atol=1e-5)


def test_constant_loss_normalizing_factor(model_and_net):
    _, net = model_and_net
    model = model_api.EncoderDecoderModel(
        CONFIG, VOCAB, loss=model_api.LossConfig(loss_normalizing_factor=233472.0))
    sums = model.loss_sums(net, _batch(), deterministic=True)
    np.testing.assert_allclose(model.metrics_from_sums(sums)["loss"],
                               sums["loss_sum"] / 233472.0, rtol=1e-6)
    with pytest.raises(ValueError, match="loss_normalizing_factor='TOKENS' is not known"):
        model_api.LossConfig(loss_normalizing_factor="TOKENS")


def _greedy_by_full_forward(net, inputs, steps):
    """Reference: re-run the whole decoder on the growing prefix, take the argmax."""
    b = inputs.shape[0]
    dec = np.zeros((b, steps), np.int32)
    out = np.zeros((b, steps), np.int32)
    for i in range(steps):
        logits = net(inputs, jnp.asarray(dec))
        out[:, i] = np.argmax(np.asarray(logits[:, i]), axis=-1)
        if i + 1 < steps:
            dec[:, i + 1] = out[:, i]
    return out


def test_cached_greedy_decoding_equals_full_forward_argmax(model_and_net):
    model, net = model_and_net
    inputs = jnp.asarray(_batch()["encoder_input_tokens"])
    tokens = jax.jit(lambda i: model.predict_batch(net, {"encoder_input_tokens": i},
                                                   max_decode_length=10))(inputs)
    ref = _greedy_by_full_forward(net, inputs, 10)
    tokens = np.asarray(tokens)
    for row, ref_row in zip(tokens, ref):
        eos = np.flatnonzero(ref_row == VOCAB.eos_id)
        n = eos[0] + 1 if eos.size else len(ref_row)
        np.testing.assert_array_equal(row[:n], ref_row[:n])
        assert np.all(row[n:] == 0)  # padding after EOS


def test_top_k_one_sampling_equals_greedy(model_and_net):
    model, net = model_and_net
    batch = {"encoder_input_tokens": jnp.asarray(_batch(1)["encoder_input_tokens"])}
    greedy = model.predict_batch(net, batch, max_decode_length=8)
    sampled = model.predict_batch(net, batch, max_decode_length=8, temperature=0.7, top_k=1,
                                  rng=jax.random.key(3))
    np.testing.assert_array_equal(greedy, sampled)


def test_vocabulary_larger_than_embedding_is_rejected():
    with pytest.raises(ValueError, match="vocabulary has 8100 ids but the network embeds only 384"):
        model_api.EncoderDecoderModel(CONFIG, vocabularies.get_vocabulary("shakespeare_spm"))


def test_bf16_activations_train_step_is_finite():
    model = model_api.EncoderDecoderModel(dataclasses.replace(CONFIG, dtype="bfloat16"), VOCAB)
    net = model.make_network(nnx.Rngs(0))
    graphdef, params = nnx.split(net, nnx.Param)

    def loss(p):
        sums = model.loss_sums(nnx.merge(graphdef, p), _batch(), deterministic=True)
        return sums["loss_sum"] / sums["num_tokens"]

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(value) and 5.0 < value < 7.5  # about ln(384) = 5.95 at init
    leaves = jax.tree.leaves(grads)
    assert all(g.dtype == jnp.float32 for g in leaves)  # parameters stay float32
    assert all(np.all(np.isfinite(g)) for g in leaves)

"""Decoding methods through the model API and `--run_mode=infer`'s DecodeConfig.

Beam search, best-of-N, speculative decoding and the sampling knobs as `predict_batch`
runs them for both autoregressive families, against independent references: greedy
decoding, and the teacher-forced log-likelihood of the returned tokens (`score_batch`).
The decoders themselves are tested in test_decoding.py, test_beam_search.py and
test_speculative.py; here the model plumbing (prefill, caches, EOS, drafter) is.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_families import BERT, LLAMA, VOCAB
from test_model_api import CONFIG as T5
from test_model_api import _batch as _t5_batch

from models import decoder_only, encoder_decoder
from t5x_like import decoding, infer, model_api
from t5x_like.runtime import Runtime

STEPS = 6


def _lm_batch(b=3, length=12, seed=0):
    rng = np.random.default_rng(seed)
    tgt = rng.integers(3, 350, (b, length)).astype(np.int32)
    dec_in = np.concatenate([np.zeros((b, 1), np.int32), tgt[:, :-1]], axis=1)
    return {"decoder_input_tokens": jnp.asarray(dec_in),
            "decoder_target_tokens": jnp.asarray(tgt),
            "decoder_loss_weights": jnp.ones((b, length), jnp.int32)}


@pytest.fixture(scope="module")
def llama():
    model = model_api.DecoderOnlyModel(LLAMA, VOCAB)
    drafter_cfg = dataclasses.replace(LLAMA, num_layers=1, emb_dim=32, mlp_dim=64)
    return model, model.make_network(nnx.Rngs(0)), decoder_only.DecoderOnly(
        drafter_cfg, rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def t5():
    model = model_api.EncoderDecoderModel(T5, VOCAB)
    drafter_cfg = dataclasses.replace(T5, num_encoder_layers=1, num_decoder_layers=1)
    return model, model.make_network(nnx.Rngs(0)), encoder_decoder.EncoderDecoder(
        drafter_cfg, rngs=nnx.Rngs(1))


def _setup(family, request):
    model, net, drafter = request.getfixturevalue(family)
    if family == "llama":
        return model, net, drafter, _lm_batch(), {"prompt_length": 4}
    batch = {k: jnp.asarray(v) for k, v in _t5_batch().items()}
    return model, net, drafter, batch, {}


def _predict(model, net, batch, extra, **kw):
    fn = jax.jit(lambda net, batch: model.predict_batch(net, batch, max_decode_length=STEPS,
                                                         **extra, **kw))
    return jax.tree.map(np.asarray, fn(net, batch))


def _t5_score(model, net, batch, tokens):
    """Teacher-forced log-likelihood of `tokens` [B, S] (0 after EOS) as T5 targets."""
    dec_in = np.concatenate([np.zeros((tokens.shape[0], 1), np.int32), tokens[:, :-1]], 1)
    scored = dict(batch, decoder_input_tokens=jnp.asarray(dec_in),
                  decoder_target_tokens=jnp.asarray(tokens),
                  decoder_loss_weights=jnp.asarray(tokens > 0, jnp.int32))
    return np.asarray(jax.jit(model.score_batch)(net, scored))


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_beam_of_one_speculative_and_top_k_one_all_equal_greedy(family, request):
    model, net, drafter, batch, extra = _setup(family, request)
    greedy = _predict(model, net, batch, extra)
    assert greedy.shape == (3 if family == "llama" else 4, STEPS)
    np.testing.assert_array_equal(
        _predict(model, net, batch, extra, method="beam", beam_size=1, alpha=0.0), greedy)
    np.testing.assert_array_equal(
        _predict(model, net, batch, extra, temperature=0.7, top_k=1, rng=jax.random.key(3)),
        greedy)
    np.testing.assert_array_equal(
        _predict(model, net, batch, extra, method="speculative", drafter=drafter, gamma=3),
        greedy)


def test_beam_and_best_of_n_scores_are_the_model_log_probs_of_their_tokens(t5):
    model, net, _ = t5
    batch = {k: jnp.asarray(v) for k, v in _t5_batch().items()}
    tokens, scores = _predict(model, net, batch, {}, method="beam", beam_size=3, alpha=0.6,
                              return_scores=True)
    lengths = np.where((tokens == 1).any(1), np.argmax(tokens == 1, 1) + 1, STEPS)
    want = _t5_score(model, net, batch, tokens) / np.asarray(
        decoding.brevity_penalty(0.6, lengths))
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)
    # A wider beam never finds a worse best sequence than greedy under the same score.
    greedy = _predict(model, net, batch, {})
    assert np.all(scores >= _t5_score(model, net, batch, greedy) / np.asarray(
        decoding.brevity_penalty(0.6, STEPS)) - 1e-5)

    tokens, scores = _predict(model, net, batch, {}, method="best_of_n", num_candidates=4,
                              temperature=1.0, rng=jax.random.key(0), return_scores=True)
    np.testing.assert_allclose(scores, _t5_score(model, net, batch, tokens), rtol=1e-5,
                               atol=1e-5)


def test_num_samples_lays_out_each_rows_draws_together(llama):
    model, net, _ = llama
    batch = _lm_batch()
    out = _predict(model, net, batch, {"prompt_length": 4}, temperature=1.0, num_samples=2,
                   rng=jax.random.key(0))
    assert out.shape == (6, STEPS)
    # Row b's two draws continue row b's prompt: with top-k 1 both are its greedy tokens.
    greedy = _predict(model, net, batch, {"prompt_length": 4})
    top1 = _predict(model, net, batch, {"prompt_length": 4}, temperature=1.0, top_k=1,
                    num_samples=2, rng=jax.random.key(0))
    np.testing.assert_array_equal(top1, np.repeat(greedy, 2, axis=0))


def test_speculative_rejects_what_it_cannot_do(llama):
    model, net, drafter = llama
    with pytest.raises(ValueError, match="needs drafter="):
        model.predict_batch(net, _lm_batch(), method="speculative")
    with pytest.raises(ValueError, match="does not take"):
        model.predict_batch(net, _lm_batch(), method="speculative", drafter=drafter,
                            min_p=0.1)
    with pytest.raises(ValueError, match="unknown decoding method 'nucleus'"):
        model.predict_batch(net, _lm_batch(), method="nucleus")
    with pytest.raises(ValueError,
                       match="method='beam' takes beam_size, alpha and stop_tokens, not"):
        model.predict_batch(net, _lm_batch(), method="beam", top_p=0.5)
    bert = model_api.EncoderOnlyModel(BERT, VOCAB)
    with pytest.raises(ValueError, match="predicts by an argmax"):
        bert.predict_batch(None, {}, method="beam")


def test_decode_config_validates_and_maps_its_knobs():
    with pytest.raises(ValueError, match=r"method='greedy'.*not one of"):
        infer.DecodeConfig(method="greedy")
    with pytest.raises(ValueError, match="needs drafter="):
        infer.DecodeConfig(method="speculative")
    with pytest.raises(ValueError, match="quantize='int2'"):
        infer.DecodeConfig(quantize="int2")
    with pytest.raises(ValueError, match="num_samples=3"):
        infer.DecodeConfig(method="beam", num_samples=3)
    # A knob the method does not use is an error, not silently dropped.
    with pytest.raises(ValueError, match=r"method='beam' does not use \['top_k'\]"):
        infer.DecodeConfig(method="beam", top_k=5, stop_tokens=(3,))
    with pytest.raises(ValueError, match=r"method='speculative' does not use \['min_p'\]"):
        infer.DecodeConfig(method="speculative", min_p=0.1, drafter=infer.Drafter(None, "x"))
    with pytest.raises(ValueError, match="temperature=0 makes them all the greedy sequence"):
        infer.DecodeConfig(method="best_of_n")
    with pytest.raises(ValueError, match="quantize with --run_mode=infer"):
        infer.DecodeConfig(quantize="int8").check_run("--run_mode=eval")
    kw = infer.DecodeConfig(method="beam", beam_size=2, stop_tokens=[5]).decode_kwargs()
    assert kw["beam_size"] == 2 and "top_k" not in kw and "temperature" not in kw
    assert kw["stop_tokens"] == (5,)
    kw = infer.DecodeConfig(min_p=0.1, stop_tokens=[7]).decode_kwargs()
    assert kw["min_p"] == 0.1 and kw["stop_tokens"] == (7,) and kw["method"] == "sample"


def test_infer_predict_runs_every_method_on_a_runtime(t5, tmp_path):
    """`infer.predict` (what --run_mode=infer and the sample hook call): beam search and
    speculative decoding with a drafter restored from its own checkpoint."""
    from t5x_like import checkpoints

    model, _, drafter_net = t5
    runtime = Runtime.build(model, devices=jax.devices()[:1])
    params = runtime.init_params(0)
    drafter_model = model_api.EncoderDecoderModel(drafter_net.config, VOCAB)
    drafter_runtime = Runtime.build(drafter_model, devices=jax.devices()[:1])
    checkpoints.save_params(tmp_path / "drafter", drafter_runtime.init_params(1))
    batch = {k: jnp.asarray(v) for k, v in _t5_batch().items()}
    greedy = infer.predict(runtime, params, batch, infer.DecodeConfig(max_decode_length=STEPS))
    spec = infer.predict(runtime, params, batch, infer.DecodeConfig(
        max_decode_length=STEPS, method="speculative", gamma=2,
        drafter=infer.Drafter(drafter_model, str(tmp_path / "drafter"))))
    np.testing.assert_array_equal(spec, greedy)
    beam = infer.predict(runtime, params, batch, infer.DecodeConfig(
        max_decode_length=STEPS, method="beam", beam_size=1, alpha=0.0))
    np.testing.assert_array_equal(beam, greedy)

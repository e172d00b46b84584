"""Decoder-only and encoder-only families through the model API and the trainer.

The model API against the networks themselves (loss sums from the logits; KV-cached
prefill + decoding against greedy decoding by repeated full forward passes) and sharded
training on 8 simulated devices against one device, for each family.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
from flax import nnx
from test_trainer import _run

from models import decoder_only, encoder_only
from partitioning import mesh as mesh_lib
from t5x_like import losses, model_api
from t5x_like.data import vocabularies

VOCAB = vocabularies.get_vocabulary("byte")  # 359 ids
LLAMA = decoder_only.DecoderOnlyConfig(
    vocab_size=384, emb_dim=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
    num_layers=2, max_length=128)
GPT2 = dataclasses.replace(
    LLAMA, num_kv_heads=None, mlp_activations=("gelu",), position_embedding="learned",
    norm="layernorm", layer_norm_epsilon=1e-5, use_bias=True, tie_embeddings=True)
BERT = encoder_only.EncoderOnlyConfig(
    vocab_size=384, emb_dim=64, num_heads=4, head_dim=16, mlp_dim=128, num_layers=2,
    max_length=64, dropout_rate=0.0)
NO_Z = model_api.LossConfig(z_loss=0.0)


def _lm_batches(seed=0, n=3, batch=16, length=24, prefix=False):
    """Packed next-token (or prefix-LM) batches: two segments per row, padding at the end."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        seg = np.zeros((batch, length), np.int32)
        pos = np.zeros((batch, length), np.int32)
        causal = np.zeros((batch, length), np.int32)
        for b in range(batch):
            a = rng.integers(4, length // 2)
            c = rng.integers(a + 3, length)
            seg[b, :a], seg[b, a:c] = 1, 2
            pos[b, :a], pos[b, a:c] = np.arange(a), np.arange(c - a)
            causal[b, : rng.integers(1, a)] = 1
            causal[b, a: a + rng.integers(1, c - a)] = 1
        tgt = rng.integers(3, 350, (batch, length)).astype(np.int32) * (seg > 0)
        dec_in = np.where(pos == 0, 0, np.roll(tgt, 1, axis=1)) * (seg > 0)
        weights = (seg > 0) & ((causal == 0) if prefix else True)
        b = dict(decoder_input_tokens=dec_in.astype(np.int32), decoder_target_tokens=tgt,
                 decoder_segment_ids=seg, decoder_positions=pos,
                 decoder_loss_weights=weights.astype(np.int32))
        if prefix:
            b["decoder_causal_attention"] = causal
        out.append(b)
    return out


def _mlm_batches(seed=0, n=3, batch=16, length=24):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        seg = (np.arange(length)[None] < rng.integers(8, length, (batch, 1))).astype(np.int32)
        tokens = rng.integers(3, 350, (batch, length)).astype(np.int32) * seg
        selected = (rng.random((batch, length)) < 0.3) & (seg > 0)
        inputs = np.where(selected, 358, tokens).astype(np.int32)
        out.append(dict(encoder_input_tokens=inputs,
                        encoder_target_tokens=np.where(selected, tokens, 0).astype(np.int32),
                        encoder_loss_weights=selected.astype(np.int32),
                        encoder_segment_ids=seg,
                        encoder_positions=(np.arange(length)[None] * seg).astype(np.int32)))
    return out


def _cls_batches(seed=0, n=3, batch=16, length=16, classes=3):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        lens = rng.integers(3, length, (batch, 1))
        tokens = rng.integers(3, 350, (batch, length)) * (np.arange(length)[None] < lens)
        out.append(dict(encoder_input_tokens=tokens.astype(np.int32),
                        classification_labels=rng.integers(0, classes, batch).astype(np.int32)))
    return out


def _network(model):
    return model.make_network(nnx.Rngs(0))


# --- model API vs the network ----------------------------------------------------------


@pytest.mark.parametrize("prefix", [False, True])
def test_decoder_only_loss_sums_equal_the_weighted_cross_entropy(prefix):
    model = model_api.DecoderOnlyModel(
        LLAMA, VOCAB, loss=NO_Z, inputs_bidirectional_attention=prefix,
        feature_converter_cls=seqio.PrefixLMFeatureConverter if prefix else None)
    net = _network(model)
    batch = {k: jnp.asarray(v) for k, v in _lm_batches(prefix=prefix, n=1)[0].items()}
    sums = model.loss_sums(net, batch, deterministic=True)
    logits = net(batch["decoder_input_tokens"], positions=batch["decoder_positions"],
                 segment_ids=batch["decoder_segment_ids"],
                 prefix_mask=batch.get("decoder_causal_attention"))
    ce, _ = losses.cross_entropy_with_z_loss(logits, batch["decoder_target_tokens"])
    w = batch["decoder_loss_weights"]
    np.testing.assert_allclose(sums["loss_sum"], jnp.sum(ce * w), rtol=1e-6)
    assert float(sums["num_tokens"]) == float(jnp.sum(w))
    if prefix:  # bidirectional inputs really change the loss
        causal = model_api.DecoderOnlyModel(LLAMA, VOCAB, loss=NO_Z)
        other = causal.loss_sums(net, batch, deterministic=True)["loss_sum"]
        assert abs(float(other) - float(sums["loss_sum"])) > 1e-3


def _naive_greedy(net, prompt, steps, prefix_len=None):
    """Greedy decoding by a full uncached forward pass per token (the reference)."""
    seq = list(prompt)
    out = []
    for _ in range(steps):
        tokens = jnp.asarray([seq], jnp.int32)
        mask = None
        if prefix_len is not None:
            mask = (jnp.arange(len(seq)) < prefix_len)[None].astype(jnp.int32)
        nxt = int(jnp.argmax(net(tokens, prefix_mask=mask)[0, -1]))
        out.append(nxt)
        if nxt == 1:
            break
        seq.append(nxt)
    return out


@pytest.mark.parametrize("config", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_decoder_only_predict_continues_prompts_of_different_lengths(config):
    model = model_api.DecoderOnlyModel(config, VOCAB)
    net = _network(model)
    batch = _lm_batches(n=1, batch=3, length=12)[0]
    prompt_length, steps = 4, 6
    tokens = model.predict_batch(net, {k: jnp.asarray(v) for k, v in batch.items()
                                       if not k.startswith("decoder_segment")
                                       and k != "decoder_positions"},
                                 max_decode_length=steps, prompt_length=prompt_length)
    for row in range(3):
        real = batch["decoder_input_tokens"][row]
        n_real = int(np.sum(real != 0)) + 1
        prompt = real[: min(1 + prompt_length, n_real)]
        expected = _naive_greedy(net, prompt.tolist(), steps)
        got = [int(t) for t in tokens[row][: len(expected)]]
        assert got == expected, (row, got, expected)


def test_prefix_lm_predict_attends_bidirectionally_over_the_prompt():
    model = model_api.DecoderOnlyModel(
        LLAMA, VOCAB, inputs_bidirectional_attention=True,
        feature_converter_cls=seqio.PrefixLMFeatureConverter)
    net = _network(model)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 350, n).tolist() for n in (3, 6, 4)]
    length, steps = 10, 5
    dec_in = np.zeros((3, length), np.int32)
    causal = np.zeros((3, length), np.int32)
    for r, p in enumerate(prompts):
        dec_in[r, 1: 1 + len(p)] = p
        dec_in[r, 1 + len(p):] = rng.integers(3, 350, length - 1 - len(p))  # targets
        causal[r, : 1 + len(p)] = 1
    batch = dict(decoder_input_tokens=jnp.asarray(dec_in),
                 decoder_causal_attention=jnp.asarray(causal))
    tokens = model.predict_batch(net, batch, max_decode_length=steps)
    for r, p in enumerate(prompts):
        expected = _naive_greedy(net, [0, *p], steps, prefix_len=1 + len(p))
        assert [int(t) for t in tokens[r][: len(expected)]] == expected


def test_inputs_bidirectional_attention_needs_the_prefix_lm_converter():
    with pytest.raises(ValueError, match="PrefixLMFeatureConverter"):
        model_api.DecoderOnlyModel(LLAMA, VOCAB, inputs_bidirectional_attention=True)


def test_masked_lm_loss_counts_only_selected_positions():
    model = model_api.EncoderOnlyModel(BERT, VOCAB, loss=NO_Z)
    net = _network(model)
    batch = {k: jnp.asarray(v) for k, v in _mlm_batches(n=1)[0].items()}
    sums = model.loss_sums(net, batch, deterministic=True)
    hidden = net.encode(batch["encoder_input_tokens"], segment_ids=batch["encoder_segment_ids"],
                        positions=batch["encoder_positions"])
    ce, _ = losses.cross_entropy_with_z_loss(net.mlm_logits(hidden),
                                             batch["encoder_target_tokens"])
    w = batch["encoder_loss_weights"]
    np.testing.assert_allclose(sums["loss_sum"], jnp.sum(ce * w), rtol=1e-6)
    assert float(sums["num_tokens"]) == float(jnp.sum(w)) > 0
    predicted = model.predict_batch(net, batch)
    assert np.all(np.asarray(predicted)[np.asarray(w) == 0] == 0)


def test_classification_loss_ignores_padded_rows():
    config = dataclasses.replace(BERT, num_classes=3)
    model = model_api.SequenceClassificationModel(config, VOCAB)
    net = _network(model)
    batch = {k: jnp.asarray(v) for k, v in _cls_batches(n=1, batch=4)[0].items()}
    padded = {k: jnp.concatenate([v, jnp.zeros_like(v[:2])]) for k, v in batch.items()}
    sums = model.loss_sums(net, padded, deterministic=True)
    logits = net.classification_logits(net.encode(batch["encoder_input_tokens"]))
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["classification_labels"][:, None],
                              axis=-1)
    np.testing.assert_allclose(sums["loss_sum"], jnp.sum(ce), rtol=1e-5)
    assert float(sums["num_tokens"]) == 4.0
    np.testing.assert_array_equal(model.predict_batch(net, batch), jnp.argmax(logits, -1))
    with pytest.raises(ValueError, match="num_classes"):
        model_api.SequenceClassificationModel(BERT, VOCAB)


# --- sharded training == single device -------------------------------------------------

FAMILIES = {
    "llama_prefix_lm": (lambda: model_api.DecoderOnlyModel(
        LLAMA, VOCAB, inputs_bidirectional_attention=True,
        feature_converter_cls=seqio.PrefixLMFeatureConverter),
        lambda: _lm_batches(prefix=True)),
    "gpt2_lm": (lambda: model_api.DecoderOnlyModel(GPT2, VOCAB), _lm_batches),
    "bert_mlm": (lambda: model_api.EncoderOnlyModel(BERT, VOCAB), _mlm_batches),
    "bert_classifier": (lambda: model_api.SequenceClassificationModel(
        dataclasses.replace(BERT, num_classes=3), VOCAB), _cls_batches),
}
MESHES = {"fsdp_tp": mesh_lib.MeshConfig(data=1, fsdp=4, model=2),
          "dp_tp": mesh_lib.MeshConfig(data=2, model=4)}


@pytest.mark.parametrize("rules", sorted(MESHES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sharded_training_matches_single_device(family, rules):
    make_model, make_batches = FAMILIES[family]
    batches = make_batches()
    ref_losses, ref_params, _, _ = _run(mesh_lib.MeshConfig(data=1), "dp",
                                        devices=jax.devices()[:1], model=make_model(),
                                        batches=batches)
    losses_, params, state, runtime = _run(MESHES[rules], rules, model=make_model(),
                                           batches=batches)
    np.testing.assert_allclose(losses_, ref_losses, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 params, ref_params)
    init = jax.device_get(runtime.init_params(seed=0))  # training really moved the weights
    assert max(float(np.max(np.abs(a - b))) for a, b in
               zip(jax.tree.leaves(params), jax.tree.leaves(init))) > 1e-2
    flat, shardings = jax.tree.leaves(state.params), jax.tree.leaves(runtime.param_shardings)
    assert all(a.sharding == s for a, s in zip(flat, shardings))
    assert any(len(s.spec) and any(e is not None for e in s.spec) for s in shardings)


# --- fine-tuning start: a pretrained encoder, a fresh head -----------------------------


def test_init_params_from_a_pretrained_checkpoint_keeps_the_encoder_and_adds_a_head(tmp_path):
    from t5x_like import checkpoints
    from t5x_like.runtime import Runtime

    mesh = mesh_lib.MeshConfig(data=1)
    devices = jax.devices()[:1]
    mlm = Runtime.build(model_api.EncoderOnlyModel(BERT, VOCAB), mesh_config=mesh,
                        devices=devices)
    pretrained = mlm.init_params(seed=7)
    ckpt = checkpoints.Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(5, {"params": pretrained, "step": jnp.int32(5)}, {"position": 0})
    ckpt.close()

    head_config = dataclasses.replace(BERT, num_classes=3, mlm_head=False)
    classifier = Runtime.build(model_api.SequenceClassificationModel(head_config, VOCAB),
                               mesh_config=mesh, devices=devices)
    params = jax.device_get(classifier.init_params_from(tmp_path / "ckpt", seed=1))
    fresh = jax.device_get(classifier.init_params(seed=1))
    pretrained = jax.device_get(pretrained)
    assert "mlm" not in params and "classifier_head" in params
    jax.tree.map(np.testing.assert_array_equal, params["layers"], pretrained["layers"])
    jax.tree.map(np.testing.assert_array_equal, params["embeddings"], pretrained["embeddings"])
    jax.tree.map(np.testing.assert_array_equal, params["classifier_head"],
                 fresh["classifier_head"])
    assert not np.array_equal(params["embeddings"]["token_embedder"]["embedding"],
                              fresh["embeddings"]["token_embedder"]["embedding"])

    wider = Runtime.build(model_api.SequenceClassificationModel(
        dataclasses.replace(head_config, emb_dim=32, head_dim=8), VOCAB),
        mesh_config=mesh, devices=devices)
    with pytest.raises(checkpoints.CheckpointError, match=r"parameter .* has shape .*expects"):
        wider.init_params_from(tmp_path / "ckpt")

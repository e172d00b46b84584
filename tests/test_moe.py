"""Sparse Mixture-of-Experts (models/moe.py) against independent references.

The block against the dense MLP (one expert) and against every expert's output weighted
by hand (top-k = E); capacity dispatch against a loop implementation of GShard's slot
assignment; the auxiliary losses against their formulas on hand-made routers; expert
choice; the aux loss inside the training loss; sharded (expert-parallel) training
against one device for the capacity and dropless paths in all three families; cached
decoding against full forward passes; sparse upcycling against the dense model; the
presets against published / HF parameter counts.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_families import BERT, LLAMA, VOCAB, _lm_batches, _mlm_batches, _naive_greedy
from test_trainer import _batches as _t5_batches
from test_trainer import _run

from models import decoder_only, encoder_decoder, encoder_only, layers, moe
from partitioning import mesh as mesh_lib
from t5x_like import model_api

D, F = 16, 32


def _x(b=2, t=7, seed=1):
    return jax.random.normal(jax.random.key(seed), (b, t, D))


def _block(activations=("silu", "linear"), use_bias=False, seed=0, **kw):
    return moe.MoeBlock(moe.MoeConfig(**kw), D, F, name="l", activations=activations,
                        use_bias=use_bias, rngs=nnx.Rngs(seed))


def _expert_mlp(block, e, x):
    """Expert e of `block` as a plain function (the reference)."""
    ex = block.experts
    h = None
    for name, act in zip(ex.input_names, ex.activations):
        w = getattr(ex, name)
        y = x @ w.kernel[...][e] + (0 if w.bias is None else w.bias[...][e])
        y = layers.get_activation(act)(y)
        h = y if h is None else h * y
    return h @ ex.wo.kernel[...][e] + (0 if ex.wo.bias is None else ex.wo.bias[...][e])


# --- the block against references -------------------------------------------------------


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_one_expert_with_room_for_every_token_is_the_dense_mlp(dispatch):
    block = _block(num_experts=1, num_experts_per_token=1, renormalize=False,
                   dispatch=dispatch, min_capacity=64)
    mlp = layers.MlpBlock(D, F, activations=("silu", "linear"), rngs=nnx.Rngs(5))
    for name in ("wi_0", "wi_1", "wo"):
        getattr(mlp, name).kernel.set_value(getattr(block.experts, name).kernel[...][0])
    x = _x()
    # One expert: the router probability is exactly 1.
    np.testing.assert_allclose(block(x), mlp(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_top_k_of_all_experts_is_the_probability_weighted_sum(dispatch, renormalize):
    block = _block(activations=("gelu",), use_bias=True, num_experts=4,
                   num_experts_per_token=4, renormalize=renormalize, dispatch=dispatch,
                   min_capacity=64)
    block.experts.wi.bias.set_value(jax.random.normal(jax.random.key(3), (4, F)))
    block.experts.wo.bias.set_value(jax.random.normal(jax.random.key(4), (4, D)))
    x = _x()
    probs = jax.nn.softmax(x @ block.router.kernel[...], axis=-1)
    expected = sum(probs[..., e:e + 1] * _expert_mlp(block, e, x) for e in range(4))
    np.testing.assert_allclose(block(x), expected, atol=1e-5, rtol=0)


def test_grouped_matmul_equals_ragged_dot_with_gradients():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(300, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(5, 8, 6)), jnp.float32)
    # Empty groups, one group, and 65 rows past sum(group_sizes) (they come out 0).
    for sizes in ([0, 140, 3, 0, 150], [300, 0, 0, 0, 0], [10, 20, 0, 5, 200]):
        gs = jnp.asarray(sizes, jnp.int32)
        for block in (4, 128):
            got = moe._blocked_matmul(x, w, gs, block=block)
            np.testing.assert_allclose(got, jax.lax.ragged_dot(x, w, gs), atol=1e-5, rtol=1e-5)
        def loss(fn, x, w, gs=gs):
            return jnp.sum(jnp.sin(fn(x, w, gs)))
        want = jax.grad(lambda x, w: loss(jax.lax.ragged_dot, x, w), argnums=(0, 1))(x, w)
        got = jax.grad(lambda x, w: loss(moe.grouped_matmul, x, w), argnums=(0, 1))(x, w)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def _gshard_reference(ids, weights, mask, num_experts, capacity):
    """Slot assignment by a plain loop: choice-major, then token order, per group."""
    g, s, k = ids.shape
    dispatch = np.zeros((g, s, num_experts, capacity))
    combine = np.zeros((g, s, num_experts, capacity))
    kept = np.zeros((g, s, k), bool)
    for gi in range(g):
        fill = [0] * num_experts
        for c in range(k):
            for si in range(s):
                if not mask[gi, si]:
                    continue
                e = ids[gi, si, c]
                if fill[e] < capacity:
                    dispatch[gi, si, e, fill[e]] = 1
                    combine[gi, si, e, fill[e]] = weights[gi, si, c]
                    kept[gi, si, c] = True
                    fill[e] += 1
    return dispatch, combine, kept


def test_capacity_dispatch_matches_a_loop_and_respects_capacity_exactly():
    rng = np.random.default_rng(0)
    g, s, k, e, cap = 3, 11, 2, 4, 3
    logits = rng.normal(size=(g, s, e)) * 2
    weights, ids = moe.top_k_routing(jax.nn.softmax(jnp.asarray(logits)), k, True)
    mask = (rng.random((g, s)) < 0.85).astype(np.float32)
    dispatch, combine, kept = moe.capacity_dispatch(ids, weights, jnp.asarray(mask), e, cap)
    ref = _gshard_reference(np.asarray(ids), np.asarray(weights), mask, e, cap)
    np.testing.assert_array_equal(dispatch, ref[0])
    np.testing.assert_allclose(combine, ref[1], rtol=1e-6)
    np.testing.assert_array_equal(kept, ref[2])
    # Every slot holds at most one token; no expert takes more than `cap` per group, and
    # some are full here (the test exercises overflow).
    assert np.max(np.sum(np.asarray(dispatch), axis=1)) == 1
    per_expert = np.sum(np.asarray(dispatch), axis=(1, 3))
    assert per_expert.max() == cap and not np.all(np.asarray(kept)[mask > 0])
    # A kept choice reaches exactly its chosen expert, nowhere else.
    for gi, si, c in zip(*np.nonzero(np.asarray(kept))):
        assert np.asarray(dispatch)[gi, si, int(ids[gi, si, c])].sum() == 1
    assert np.sum(dispatch) == np.sum(kept)


def test_overflowing_tokens_get_zero_and_pass_through_the_residual():
    block = _block(num_experts=2, num_experts_per_token=1, renormalize=False,
                   capacity_factor=0.25, min_capacity=1)
    x = _x(b=1, t=8)
    with moe.collect() as stats:
        y = block(x, deterministic=False)
    weights, ids = moe.top_k_routing(jax.nn.softmax(x @ block.router.kernel[...]), 1, False)
    ids = np.asarray(ids[0, :, 0])
    # Capacity 1 per expert (ceil(8 * 0.25 / 2) = 1): the first token routed to each
    # expert is served, every later one gets exactly 0 (the residual carries it).
    first = {e: int(np.argmax(ids == e)) for e in set(ids.tolist())}
    for t in range(8):
        if t in first.values():
            e = ids[t]
            np.testing.assert_allclose(y[0, t], weights[0, t, 0] * _expert_mlp(block, e, x[0, t]),
                                       atol=1e-5)
        else:
            assert np.all(np.asarray(y[0, t]) == 0.0)
    dropped = 1 - len(first) / 8
    np.testing.assert_allclose(stats.layers["l"]["dropped_fraction"], dropped, rtol=1e-6)
    # In a decoder layer, a dropped token leaves the MoE block with the attention
    # block's output unchanged (the residual carries it).
    cfg = dataclasses.replace(LLAMA, num_layers=1, moe=moe.MoeConfig(
        num_experts=2, num_experts_per_token=1, renormalize=False, capacity_factor=0.25,
        min_capacity=1))
    layer = decoder_only.DecoderLayer(cfg, 0, rngs=nnx.Rngs(0))
    h = jax.random.normal(jax.random.key(2), (1, 8, cfg.emb_dim))
    mask = layers.make_causal_mask(jnp.zeros((1, 8)))
    rope = layers.Rope.at(jnp.arange(8), cfg.head_dim)
    after_attention = h + layer.self_attention(layer.pre_self_attention_layer_norm(h),
                                               mask=mask, rope=rope)
    out, _ = layer(h, mask=mask, rope=rope, cache=None, cache_index=None,
                   deterministic=False, rngs=None)
    ffn = layer.mlp(layer.pre_mlp_layer_norm(after_attention), deterministic=False)
    dropped_rows = np.all(np.asarray(ffn[0]) == 0.0, axis=-1)
    assert 0 < dropped_rows.sum() < 8
    np.testing.assert_allclose(out[0][dropped_rows], after_attention[0][dropped_rows],
                               atol=1e-6, rtol=0)
    assert not np.allclose(out[0][~dropped_rows], after_attention[0][~dropped_rows])


def test_load_balance_and_z_loss_formulas_on_a_hand_made_router():
    # 4 tokens, 2 experts, top-1: tokens 0-2 pick expert 0, token 3 picks expert 1.
    probs = jnp.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    assignments = jax.nn.one_hot(jnp.argmax(probs, -1), 2)
    mask = jnp.ones(4)
    # f = (3/4, 1/4); P = (2.6/4, 1.4/4); loss = 2 * (3/4 * 0.65 + 1/4 * 0.35) = 1.15.
    np.testing.assert_allclose(moe.load_balance_loss(probs, assignments, mask), 1.15,
                               rtol=1e-6)
    # A padding token is left out of both f and P.
    padded = jnp.concatenate([probs, jnp.array([[1.0, 0.0]])])
    np.testing.assert_allclose(
        moe.load_balance_loss(padded, jax.nn.one_hot(jnp.argmax(padded, -1), 2),
                              jnp.array([1, 1, 1, 1, 0.0])), 1.15, rtol=1e-6)
    # Uniform router probabilities: the minimum, 1.0, whatever the assignments.
    uniform = jnp.full((6, 4), 0.25)
    for assign in (jax.nn.one_hot(jnp.arange(6) % 4, 4), jax.nn.one_hot(jnp.zeros(6, int), 4)):
        np.testing.assert_allclose(moe.load_balance_loss(uniform, assign, jnp.ones(6)), 1.0,
                                   rtol=1e-6)
    logits = jnp.array([[1.0, 2.0], [0.0, -1.0]])
    z = np.log(np.exp([1.0, 0.0]) + np.exp([2.0, -1.0]))
    np.testing.assert_allclose(moe.router_z_loss(logits, jnp.ones(2)), np.mean(z**2), rtol=1e-6)


def test_block_records_its_statistics_and_weighted_aux_loss():
    block = _block(num_experts=4, num_experts_per_token=2, load_balance_loss_weight=0.1,
                   router_z_loss_weight=0.01)
    block.router.kernel.set_value(jnp.zeros((D, 4)))  # uniform routing
    x = _x()
    token_mask = jnp.arange(7)[None].repeat(2, 0) < jnp.array([[7], [4]])
    with moe.collect() as stats:
        block(x, token_mask=token_mask)
    s = stats.layers["l"]
    np.testing.assert_allclose(s["load_balance_loss"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(s["router_z_loss"], np.log(4.0) ** 2, rtol=1e-6)
    np.testing.assert_allclose(s["aux_loss"], 0.1 * 1.0 + 0.01 * np.log(4.0) ** 2, rtol=1e-6)
    np.testing.assert_allclose(s["router_entropy"], np.log(4.0), rtol=1e-6)
    assert float(s["tokens"]) == 11.0
    np.testing.assert_allclose(np.sum(s["expert_load"]), 1.0, rtol=1e-6)
    # No collector outside `collect()`: nothing recorded, nothing leaks.
    block(x)


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_shared_experts_add_a_dense_mlp_seen_by_every_token(dispatch, scale):
    # routed_scaling_factor multiplies the routed experts' sum only (DeepSeek-V2/V3).
    block = _block(num_experts=4, num_experts_per_token=2, dispatch=dispatch,
                   num_shared_experts=2, routed_scaling_factor=scale)
    routed = _block(num_experts=4, num_experts_per_token=2, dispatch=dispatch)
    for name in ("router", "experts"):
        nnx.update(getattr(routed, name), nnx.state(getattr(block, name)))
    x = _x()
    assert block.shared.wo.kernel.shape == (2 * F, D)
    # The routed part's rounding error grows with the factor; 1e-6 at factor 1, as before.
    np.testing.assert_allclose(block(x), scale * routed(x) + block.shared(x),
                               atol=1e-6 * scale, rtol=0)


def test_expert_choice_gives_each_expert_its_capacity_of_real_tokens():
    block = _block(activations=("gelu",), num_experts=4, routing="expert_choice",
                   capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=1)
    x = _x(b=2, t=8)
    token_mask = jnp.arange(8)[None].repeat(2, 0) < jnp.array([[8], [5]])
    with moe.collect() as stats:
        y = block(x, token_mask=token_mask)
    probs = np.asarray(jax.nn.softmax(x @ block.router.kernel[...], axis=-1))
    cap = 2  # ceil(8 * 1.0 / 4)
    expected = np.zeros((2, 8, D))
    for b in range(2):
        for e in range(4):
            real = np.nonzero(np.asarray(token_mask[b]))[0]
            top = real[np.argsort(-probs[b, real, e], kind="stable")[:cap]]
            for t in top:
                expected[b, t] += probs[b, t, e] * np.asarray(_expert_mlp(block, e, x[b, t]))
    np.testing.assert_allclose(y, expected, atol=1e-5)
    np.testing.assert_allclose(stats.layers["l"]["expert_load"], 0.25, rtol=1e-6)
    with pytest.raises(ValueError, match=r"expert_choice.*causal decoder"):
        dataclasses.replace(LLAMA, moe=moe.MoeConfig(routing="expert_choice"))


def test_jitter_noise_acts_in_training_only():
    block = _block(num_experts=4, num_experts_per_token=2, jitter_noise=0.5)
    x = _x()
    np.testing.assert_array_equal(block(x), block(x, deterministic=True))
    noisy = block(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
    assert not np.allclose(noisy, block(x))
    with pytest.raises(ValueError, match="jitter_noise > 0 needs rngs"):
        block(x, deterministic=False)


def test_config_errors_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match="num_experts_per_token=3 exceeds num_experts=2"):
        moe.MoeConfig(num_experts=2, num_experts_per_token=3)
    with pytest.raises(ValueError, match="renormalize=False"):
        moe.MoeConfig(num_experts_per_token=1)
    with pytest.raises(ValueError, match="dispatch='capacity'"):
        moe.MoeConfig(routing="expert_choice", dispatch="dropless")
    with pytest.raises(ValueError, match="routing='top2'"):
        moe.MoeConfig(routing="top2")
    with pytest.raises(ValueError, match=r"routed_scaling_factor=0\.0 must be > 0"):
        moe.MoeConfig(routed_scaling_factor=0.0)
    with pytest.raises(ValueError, match=r"moe=\{.*must be a models\.moe\.MoeConfig"):
        dataclasses.replace(LLAMA, moe={"num_experts": 8})
    # A group size that does not divide the batch's tokens (a decoding step) falls back
    # to one group per sequence.
    grouped = _block(num_experts=4, group_size=5, capacity_factor=1.0, min_capacity=1)
    per_sequence = _block(num_experts=4, capacity_factor=1.0, min_capacity=1)
    np.testing.assert_array_equal(grouped(_x(b=2, t=7)), per_sequence(_x(b=2, t=7)))


# --- inside the model: the loss, decoding, upcycling -----------------------------------

MOE_LLAMA = dataclasses.replace(LLAMA, moe=moe.MoeConfig(
    num_experts=4, num_experts_per_token=2, dispatch="dropless",
    load_balance_loss_weight=0.1, router_z_loss_weight=0.01))


def test_aux_losses_are_added_to_the_training_loss_and_logged():
    model = model_api.DecoderOnlyModel(MOE_LLAMA, VOCAB, loss=model_api.LossConfig(z_loss=0))
    net = model.make_network(nnx.Rngs(0))
    batch = {k: jnp.asarray(v) for k, v in _lm_batches(n=1)[0].items()}
    sums = model.loss_sums(net, batch, deterministic=True)
    with moe.collect() as stats:
        logits = net(batch["decoder_input_tokens"], positions=batch["decoder_positions"],
                     segment_ids=batch["decoder_segment_ids"])
    w = batch["decoder_loss_weights"]
    ce = -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits),
                                      batch["decoder_target_tokens"][..., None], -1)[..., 0] * w)
    aux = sum(0.1 * s["load_balance_loss"] + 0.01 * s["router_z_loss"]
              for s in stats.layers.values())
    assert sorted(stats.layers) == ["layers_0", "layers_1"]
    np.testing.assert_allclose(sums["loss_sum"], ce + aux * jnp.sum(w), rtol=1e-5)
    metrics = model.metrics_from_sums(sums)
    np.testing.assert_allclose(metrics["moe_aux_loss"], aux, rtol=1e-5)
    np.testing.assert_allclose(metrics["cross_entropy"], ce / jnp.sum(w), rtol=1e-5)
    for layer in ("layers_0", "layers_1"):
        loads = [float(metrics[f"moe/{layer}/expert_load/{e}"]) for e in range(4)]
        np.testing.assert_allclose(sum(loads), 1.0, rtol=1e-5)
        for key in ("load_balance_loss", "router_z_loss", "dropped_fraction",
                    "router_entropy"):
            assert f"moe/{layer}/{key}" in metrics
    # The router is trained by the loss (its gradient is not zero).
    grads = nnx.grad(lambda n: model.loss_sums(n, batch, deterministic=True)["loss_sum"])(net)
    assert float(jnp.max(jnp.abs(grads["layers"][0]["mlp"]["router"]["kernel"][...]))) > 0


@pytest.mark.parametrize("routing", ["dropless", "capacity_groups"])
def test_cached_decoding_with_moe_layers_equals_full_forward_passes(routing):
    config = MOE_LLAMA
    if routing == "capacity_groups":  # room for every token at eval; groups of 4 tokens
        config = dataclasses.replace(LLAMA, moe=moe.MoeConfig(
            num_experts=4, num_experts_per_token=2, dispatch="capacity",
            eval_capacity_factor=4.0, group_size=4))
    model = model_api.DecoderOnlyModel(config, VOCAB)
    net = model.make_network(nnx.Rngs(0))
    batch = _lm_batches(n=1, batch=2, length=12)[0]
    steps = 5
    tokens = model.predict_batch(net, {k: jnp.asarray(v) for k, v in batch.items()
                                       if k in ("decoder_input_tokens", "decoder_target_tokens")},
                                 max_decode_length=steps, prompt_length=4)
    for row in range(2):
        real = batch["decoder_input_tokens"][row]
        prompt = real[: min(5, int(np.sum(real != 0)) + 1)]
        expected = _naive_greedy(net, prompt.tolist(), steps)
        assert [int(t) for t in tokens[row][: len(expected)]] == expected


def test_capacity_routing_in_a_decoder_never_looks_ahead():
    # Top-2 with tight capacity drops choices; slots are given token by token in causal
    # stacks, so no earlier output depends on a later token (GShard's choice-major order
    # would let a later top-1 take an earlier top-2's slot).
    config = dataclasses.replace(LLAMA, moe=moe.MoeConfig(
        num_experts=4, num_experts_per_token=2, dispatch="capacity", capacity_factor=1.0,
        min_capacity=1))
    net = decoder_only.DecoderOnly(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    a = rng.integers(3, 350, (2, 16))
    b = a.copy()
    b[:, 8:] = rng.integers(3, 350, (2, 8))
    with moe.collect() as stats:
        la = net(jnp.asarray(a), deterministic=False)
    assert float(stats.layers["layers_0"]["dropped_fraction"]) > 0  # capacity binds
    lb = net(jnp.asarray(b), deterministic=False)
    np.testing.assert_array_equal(la[:, :8], lb[:, :8])
    slots = moe.capacity_dispatch(jnp.array([[[0, 1], [1, 0]]]), jnp.ones((1, 2, 2)),
                                  jnp.ones((1, 2)), 2, 1, priority="token")[2]
    np.testing.assert_array_equal(slots, [[[True, True], [False, False]]])


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_padding_is_routed_nowhere_with_or_without_segment_ids(dispatch):
    config = dataclasses.replace(LLAMA, moe=moe.MoeConfig(
        num_experts=4, num_experts_per_token=2, dispatch=dispatch, capacity_factor=1.0,
        min_capacity=1))
    model = model_api.DecoderOnlyModel(config, VOCAB)
    net = model.make_network(nnx.Rngs(0))
    rng = np.random.default_rng(0)
    lengths = np.array([[5], [9]])
    real = np.arange(12)[None] < lengths
    tgt = (rng.integers(3, 350, (2, 12)) * real).astype(np.int32)
    unpacked = {"decoder_input_tokens": np.roll(tgt, 1, axis=1) * real,
                "decoder_target_tokens": tgt, "decoder_loss_weights": real.astype(np.int32)}
    packed = dict(unpacked, decoder_segment_ids=real.astype(np.int32),
                  decoder_positions=(np.arange(12)[None] * real).astype(np.int32))
    sums_u = model.loss_sums(net, {k: jnp.asarray(v) for k, v in unpacked.items()},
                             deterministic=False)
    sums_p = model.loss_sums(net, {k: jnp.asarray(v) for k, v in packed.items()},
                             deterministic=False)
    assert float(sums_u["moe/layers_0/tokens"]) == 14.0
    for key in sums_p:
        np.testing.assert_allclose(sums_u[key], sums_p[key], rtol=1e-5, atol=1e-6,
                                   err_msg=key)


def test_upcycled_moe_computes_the_dense_model(tmp_path):
    from t5x_like import checkpoints
    from t5x_like.runtime import Runtime

    dense_model = model_api.DecoderOnlyModel(LLAMA, VOCAB)
    moe_cfg = dataclasses.replace(LLAMA, moe=moe.MoeConfig(
        num_experts=4, num_experts_per_token=2, dispatch="dropless", layer_interval=2))
    mesh, devices = mesh_lib.MeshConfig(data=1), jax.devices()[:1]
    dense = Runtime.build(dense_model, mesh_config=mesh, devices=devices)
    params = dense.init_params(seed=3)
    ckpt = checkpoints.Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, {"params": params}, {"position": 0})
    ckpt.close()
    sparse = Runtime.build(model_api.DecoderOnlyModel(moe_cfg, VOCAB), mesh_config=mesh,
                           devices=devices)
    up = sparse.init_params_from(tmp_path / "ckpt", seed=0, upcycle=True)
    layer1 = up["layers"][1]["mlp"]
    for name in ("wi_0", "wi_1", "wo"):
        np.testing.assert_array_equal(
            layer1["experts"][name]["kernel"],
            np.broadcast_to(params["layers"][1]["mlp"][name]["kernel"],
                            layer1["experts"][name]["kernel"].shape))
    fresh = sparse.init_params(seed=0)
    np.testing.assert_array_equal(layer1["router"]["kernel"],
                                  fresh["layers"][1]["mlp"]["router"]["kernel"])
    # Identical experts with weights that sum to 1: the MoE computes the dense network.
    tokens = jnp.asarray(_lm_batches(n=1, batch=2)[0]["decoder_input_tokens"])
    dense_logits = dense.net.merge(params)(tokens)
    sparse_logits = sparse.net.merge(up)(tokens)
    np.testing.assert_allclose(sparse_logits, dense_logits, atol=1e-5, rtol=0)
    # The layer-1 MLP really is an MoE block (not the dense one restored by name).
    assert isinstance(sparse.net.merge(up).layers[1].mlp, moe.MoeBlock)


# --- expert parallelism: sharded == one device -------------------------------------------

T5_SWITCH = dataclasses.replace(
    encoder_decoder.t5_1_1("tiny", vocab_size=384, dropout_rate=0.0),
    moe=moe.MoeConfig(num_experts=4, num_experts_per_token=1, renormalize=False,
                      capacity_factor=1.0, min_capacity=1, layer_interval=2))
BERT_EC = dataclasses.replace(BERT, moe=moe.MoeConfig(
    num_experts=4, routing="expert_choice", capacity_factor=1.0, min_capacity=1))


def _moe_llama(dispatch):
    return dataclasses.replace(LLAMA, moe=moe.MoeConfig(
        num_experts=4, num_experts_per_token=2, dispatch=dispatch, capacity_factor=1.0,
        min_capacity=1))


CASES = {
    # (model, batches, mesh, rules)
    "llama_capacity_ep4_dp2": (lambda: model_api.DecoderOnlyModel(_moe_llama("capacity"), VOCAB),
                               _lm_batches, mesh_lib.MeshConfig(data=2, expert=4), "dp"),
    "llama_dropless_ep4_dp2": (lambda: model_api.DecoderOnlyModel(_moe_llama("dropless"), VOCAB),
                               _lm_batches, mesh_lib.MeshConfig(data=2, expert=4), "dp"),
    "llama_dropless_ep2_fsdp2_tp2": (
        lambda: model_api.DecoderOnlyModel(_moe_llama("dropless"), VOCAB), _lm_batches,
        mesh_lib.MeshConfig(data=1, fsdp=2, expert=2, model=2), "fsdp_tp"),
    "switch_t5_capacity_ep2_fsdp2_tp2": (
        lambda: model_api.EncoderDecoderModel(T5_SWITCH, VOCAB), _t5_batches,
        mesh_lib.MeshConfig(data=1, fsdp=2, expert=2, model=2), "fsdp_tp"),
    "bert_expert_choice_ep4_dp2": (lambda: model_api.EncoderOnlyModel(BERT_EC, VOCAB),
                                   _mlm_batches, mesh_lib.MeshConfig(data=2, expert=4), "dp"),
}


# Cases whose model and batches equal another's share its reference run.
REFERENCE = {"llama_dropless_ep2_fsdp2_tp2": "llama_dropless_ep4_dp2"}


@functools.cache
def _one_device(case):
    """The single-device reference (cached: cases that differ only in mesh share it)."""
    make_model, make_batches, _, _ = CASES[case]
    return _run(mesh_lib.MeshConfig(data=1), "dp", devices=jax.devices()[:1],
                model=make_model(), batches=make_batches())[:2]


@pytest.mark.parametrize("case", sorted(CASES))
def test_expert_parallel_training_matches_one_device(case):
    make_model, make_batches, mesh, rules = CASES[case]
    batches = make_batches()
    ref_losses, ref_params = _one_device(REFERENCE.get(case, case))
    losses, params, state, runtime = _run(mesh, rules, model=make_model(), batches=batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 params, ref_params)
    init = jax.device_get(runtime.init_params(seed=0))  # training really moved the weights
    assert max(float(np.max(np.abs(a - b))) for a, b in
               zip(jax.tree.leaves(params), jax.tree.leaves(init))) > 1e-3
    # Expert kernels live split over the expert axis: each device holds E / ep experts.
    paths = jax.tree_util.tree_leaves_with_path(state.params)
    experts = [a for p, a in paths if "experts" in jax.tree_util.keystr(p)]
    assert experts
    ep = dict(runtime.partitioner.mesh.shape)["expert"]
    for a in experts:
        assert a.sharding.spec[0] == "expert"
        assert a.addressable_shards[0].data.shape[0] * ep == a.shape[0]


@pytest.mark.parametrize("mesh,batch", [
    (mesh_lib.MeshConfig(data=8), 8),             # dropless: shard_map without an expert axis
    (mesh_lib.MeshConfig(data=2, expert=4), 2),   # a batch the mesh does not divide
    (mesh_lib.MeshConfig(data=2, expert=4), 16),
])
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_block_under_a_mesh_equals_the_unsharded_block(dispatch, mesh, batch):
    from partitioning.partitioner import Partitioner

    block = _block(num_experts=4, num_experts_per_token=2, dispatch=dispatch,
                   capacity_factor=1.0, min_capacity=1)
    x = _x(b=batch, t=6)
    token_mask = jnp.arange(6)[None].repeat(batch, 0) < 5
    graphdef, params = nnx.split(block)

    def loss(params, x):
        y = nnx.merge(graphdef, params)(x, token_mask=token_mask, deterministic=False)
        return jnp.sum(jnp.sin(y)), y

    want_grads, want = jax.grad(loss, has_aux=True)(params, x)
    partitioner = Partitioner(mesh_lib.make_mesh(mesh), "dp")
    with partitioner.activate():
        got_grads, got = jax.jit(jax.grad(loss, has_aux=True))(params, x)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4),
                 got_grads, want_grads)


def test_expert_axis_must_divide_the_expert_count():
    model = model_api.DecoderOnlyModel(dataclasses.replace(LLAMA, moe=moe.MoeConfig(
        num_experts=6, dispatch="dropless")), VOCAB)
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by the mesh's "
                                         "expert axis \\(4\\)"):
        _run(mesh_lib.MeshConfig(data=2, expert=4), "dp", model=model,
             batches=_lm_batches(n=1))


# --- presets -----------------------------------------------------------------------------


def _count(network) -> int:
    return sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(network, nnx.Param)))


def test_mixtral_8x7b_shape_has_mixtrals_total_and_active_parameters():
    net = nnx.eval_shape(lambda: decoder_only.DecoderOnly(
        decoder_only.PRESETS["mixtral_8x7b"], rngs=nnx.Rngs(0)))
    assert _count(net) == 46_702_792_704  # = HF MixtralForCausalLM(MixtralConfig())
    # Active: all but 6 of 8 experts (3 * 4096 * 14336 each) in each of the 32 layers.
    assert moe.active_parameter_count(net) == 46_702_792_704 - 32 * 6 * 3 * 4096 * 14336
    assert moe.active_parameter_count(net) == 12_879_925_248


def test_tiny_presets_have_the_dense_models_active_parameters():
    tiny = nnx.eval_shape(lambda: decoder_only.DecoderOnly(
        decoder_only.PRESETS["mixtral_tiny"], rngs=nnx.Rngs(0)))
    dense = nnx.eval_shape(lambda: decoder_only.DecoderOnly(
        decoder_only.PRESETS["llama_tiny"], rngs=nnx.Rngs(0)))
    routers = 4 * 256 * 8
    assert moe.active_parameter_count(tiny) == _count(dense) + routers == 7_350_528
    assert _count(tiny) == 14_428_416
    switch = nnx.eval_shape(lambda: encoder_decoder.EncoderDecoder(
        encoder_decoder.SWITCH_PRESETS["switch_tiny"], rngs=nnx.Rngs(0)))
    assert _count(switch) == 11_276_032
    bert = nnx.eval_shape(lambda: encoder_only.EncoderOnly(BERT_EC, rngs=nnx.Rngs(0)))
    assert any(isinstance(m, moe.MoeBlock) for _, m in nnx.iter_graph(bert))


def test_switch_base_8_has_the_hf_parameter_count():
    net = nnx.eval_shape(lambda: encoder_decoder.EncoderDecoder(
        encoder_decoder.SWITCH_PRESETS["switch_base_8"], rngs=nnx.Rngs(0)))
    assert _count(net) == 619_339_008
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.SwitchTransformersConfig(
        d_ff=3072, encoder_sparse_step=2, decoder_sparse_step=2, num_sparse_encoder_layers=6,
        num_sparse_decoder_layers=6)
    with torch.device("meta"):
        hf = transformers.SwitchTransformersForConditionalGeneration(hf_config)
    assert sum(p.numel() for p in hf.parameters()) == _count(net)


@pytest.mark.parametrize("name,expected", [
    ("mixtral_tiny", lambda: decoder_only.PRESETS["mixtral_tiny"]),
    ("mixtral_8x7b", lambda: decoder_only.PRESETS["mixtral_8x7b"]),
    ("switch_tiny", lambda: encoder_decoder.SWITCH_PRESETS["switch_tiny"]),
    ("switch_base_8", lambda: encoder_decoder.SWITCH_PRESETS["switch_base_8"]),
])
def test_gin_presets_equal_python_presets(name, expected):
    import pathlib

    import gin
    path = pathlib.Path(__file__).parents[1] / "gin" / "models" / f"{name}.gin"
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings([str(path)], None, finalize_config=False)
        assert gin.query_parameter("%NETWORK_CONFIG").scoped_configurable_fn() == expected()
    finally:
        gin.clear_config()


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_top_k_gradients_equal_a_per_token_reference(dispatch):
    """Gradients wrt the input, the router and every expert kernel of top-2 of 4 (room
    for every token) equal those of a plain per-token gather implementation."""
    block = _block(num_experts=4, num_experts_per_token=2, renormalize=True,
                   dispatch=dispatch, min_capacity=64)
    x = _x()
    cot = jax.random.normal(jax.random.key(9), x.shape)
    graphdef, params = nnx.split(block, nnx.Param)

    def reference(p, x):
        b = nnx.merge(graphdef, p)
        probs = jax.nn.softmax(x @ b.router.kernel[...], axis=-1)  # [B, T, E]
        top, ids = jax.lax.top_k(probs, 2)
        top = top / jnp.sum(top, axis=-1, keepdims=True)
        ex = b.experts
        wi0, wi1, wo = (ex.wi_0.kernel[...][ids], ex.wi_1.kernel[...][ids],
                        ex.wo.kernel[...][ids])  # [B, T, k, ...]
        h = jax.nn.silu(jnp.einsum("btd,btkdf->btkf", x, wi0)) * jnp.einsum(
            "btd,btkdf->btkf", x, wi1)
        return jnp.einsum("btk,btkf,btkfd->btd", top, h, wo)

    def loss(fn, p, x):
        return jnp.sum(fn(p, x) * cot)

    def layer(p, x):
        return nnx.merge(graphdef, p)(x)

    want = jax.grad(lambda p, x: loss(reference, p, x), argnums=(0, 1))(params, x)
    got = jax.grad(lambda p, x: loss(layer, p, x), argnums=(0, 1))(params, x)
    np.testing.assert_allclose(got[1], want[1], atol=1e-5)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5), got[0], want[0])
    assert float(jnp.max(jnp.abs(want[0]["router"]["kernel"][...]))) > 1e-3

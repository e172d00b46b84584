"""The jitted train step: sharded vs single device under every rules preset, gradient
accumulation vs one big batch, sharded initialisation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import encoder_decoder
from partitioning import mesh as mesh_lib
from t5x_like import model_api, optimizers
from t5x_like.data import vocabularies
from t5x_like.runtime import Runtime
from t5x_like.trainer import Trainer

VOCAB = vocabularies.get_vocabulary("byte")  # 359 ids, no file needed
CONFIG = encoder_decoder.t5_1_1("tiny", vocab_size=384, dropout_rate=0.0)
STEPS = 3
BATCH = 16


def _model(dropout=0.0):
    import dataclasses

    return model_api.EncoderDecoderModel(dataclasses.replace(CONFIG, dropout_rate=dropout), VOCAB)


def _batches(seed=0, n=STEPS, batch=BATCH, s=24, t=12):
    """Synthetic packed batches: two segments per row, padding at the end."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        def packed(length):
            seg = np.zeros((batch, length), np.int32)
            pos = np.zeros((batch, length), np.int32)
            for b in range(batch):
                a = rng.integers(3, length // 2)
                c = rng.integers(a + 2, length)
                seg[b, :a], seg[b, a:c] = 1, 2
                pos[b, :a], pos[b, a:c] = np.arange(a), np.arange(c - a)
            return seg, pos
        es, ep = packed(s)
        ds, dp = packed(t)
        enc = rng.integers(3, 350, (batch, s)).astype(np.int32) * (es > 0)
        tgt = rng.integers(3, 350, (batch, t)).astype(np.int32) * (ds > 0)
        dec_in = np.where(dp == 0, 0, np.roll(tgt, 1, axis=1)) * (ds > 0)
        out.append(dict(
            encoder_input_tokens=enc, encoder_segment_ids=es, encoder_positions=ep,
            decoder_input_tokens=dec_in.astype(np.int32), decoder_target_tokens=tgt,
            decoder_segment_ids=ds, decoder_positions=dp,
            decoder_loss_weights=(ds > 0).astype(np.int32),
        ))
    return out


def _optimizer():
    # SGD with momentum: its update is linear in the gradients, so a sharded run may differ
    # from the single-device one only by float reduction order (~1e-7). Adam's m / sqrt(v)
    # turns that into ~1e-5 on the rare entries whose gradients nearly cancel across
    # steps, which would test Adam's conditioning rather than the sharding.
    return optimizers.build_optimizer(optimizers.sgd(learning_rate=0.5, momentum=0.9),
                                      grad_clip_norm=1.0)


def _run(mesh_config, rules, *, devices=None, num_microbatches=1, model=None, batches=None):
    runtime = Runtime.build(model or _model(), mesh_config=mesh_config, rules=rules,
                            devices=devices)
    trainer = Trainer(runtime, _optimizer(), num_microbatches=num_microbatches, seed=0)
    state = trainer.init_state(runtime.init_params(seed=0))
    losses = []
    for batch in batches or _batches():
        state, metrics = trainer.run_train_step(
            state, runtime.partitioner.make_global_batch(batch))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), state, runtime


@functools.cache
def _single_device():
    return _run(mesh_lib.MeshConfig(data=1), "dp", devices=jax.devices()[:1])


PRESETS = {
    "dp": mesh_lib.MeshConfig(data=8),
    "fsdp": mesh_lib.MeshConfig(data=1, fsdp=8),
    "tp": mesh_lib.MeshConfig(data=2, model=4),
    "dp_tp": mesh_lib.MeshConfig(data=2, model=4),
    "fsdp_tp": mesh_lib.MeshConfig(data=1, fsdp=4, model=2),
}


@pytest.mark.parametrize("rules", sorted(PRESETS))
def test_sharded_training_matches_single_device(rules):
    ref_losses, ref_params, _, _ = _single_device()
    losses, params, state, runtime = _run(PRESETS[rules], rules)
    assert len(jax.devices()) == 8
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 params, ref_params)
    # Training really moved the weights (the comparison is not between two untouched inits).
    init = jax.device_get(runtime.init_params(seed=0))
    moved = max(float(np.max(np.abs(a - b))) for a, b in
                zip(jax.tree.leaves(params), jax.tree.leaves(init)))
    assert moved > 1e-2
    # Every parameter lives where its logical axes say.
    flat = jax.tree.leaves(state.params)
    shardings = jax.tree.leaves(runtime.param_shardings)
    assert all(a.sharding == s for a, s in zip(flat, shardings))


def test_fsdp_holds_one_eighth_of_large_parameters_per_device():
    _, _, state, _ = _run(PRESETS["fsdp"], "fsdp", batches=_batches(n=1))
    big = [a for a in jax.tree.leaves(state.params) if a.size >= 128 * 128]
    assert big
    for a in big:
        shard = a.addressable_shards[0].data
        assert shard.size * 8 == a.size, (a.shape, shard.shape)
    # The momentum buffers follow their parameters.
    mu = [a for a in jax.tree.leaves(state.opt_state) if hasattr(a, "size") and a.size >= 128 * 128]
    assert mu and all(a.addressable_shards[0].data.size * 8 == a.size for a in mu)


def test_gradient_accumulation_equals_one_big_batch():
    mesh = mesh_lib.MeshConfig(data=2)
    devices = jax.devices()[:2]
    ref_losses, ref_params, _, _ = _run(mesh, "dp", devices=devices)
    losses, params, _, _ = _run(mesh, "dp", devices=devices, num_microbatches=4)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 params, ref_params)


def test_dropout_changes_the_loss_and_is_reproducible():
    runtime = Runtime.build(_model(0.3), mesh_config=mesh_lib.MeshConfig(data=1),
                            devices=jax.devices()[:1])
    trainer = Trainer(runtime, _optimizer(), seed=0)
    batches = [runtime.partitioner.make_global_batch(b) for b in _batches()]

    def losses():
        state = trainer.init_state(runtime.init_params(seed=0))
        out = []
        for batch in batches:
            state, metrics = trainer.run_train_step(state, batch)
            out.append(float(metrics["loss"]))
        return out

    with_dropout = losses()
    assert with_dropout == losses()  # the dropout key is derived from (seed, step)
    without_dropout = _single_device()[0]  # same init, batches and mesh, dropout 0
    assert with_dropout[0] != pytest.approx(without_dropout[0], rel=1e-4)


def test_batch_not_divisible_by_data_axes_is_rejected():
    runtime = Runtime.build(_model(), mesh_config=mesh_lib.MeshConfig(data=4, fsdp=2),
                            rules="fsdp")
    with pytest.raises(ValueError, match=r"batch size 12 is not divisible by .* 8.*BATCH_SIZE=16"):
        runtime.partitioner.check_batch_size(12)


def test_microbatches_must_divide_the_batch():
    runtime = Runtime.build(_model(), mesh_config=mesh_lib.MeshConfig(data=1),
                            devices=jax.devices()[:1])
    trainer = Trainer(runtime, _optimizer(), num_microbatches=3)
    state = trainer.init_state(runtime.init_params())
    batch = runtime.partitioner.make_global_batch(_batches(n=1)[0])
    with pytest.raises(ValueError, match="batch size 16 is not divisible by num_microbatches=3"):
        trainer.run_train_step(state, batch)
    assert jnp.ndim(state.step) == 0

"""T5 v1.1 encoder-decoder: published sizes, cached decoding, packing, masks, dropout, gin.

Networks run under `nnx.jit` (eager op-by-op execution compiles every op and is slower on
2 cores); variants of the test network share its weights instead of re-initialising.
"""

import dataclasses
import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding

from models import encoder_decoder as ed
from partitioning import rules

REPO = pathlib.Path(__file__).resolve().parent.parent
LOGICAL_NAMES = {"batch", "length", "embed", "mlp", "heads", "kv", "kv_heads", "vocab",
                 "expert", "expert_mlp", "layers", "relpos_buckets"}

# A very small fp32 T5 v1.1 (gated GELU, untied logits) that runs eagerly in seconds.
SMALL_TEST = ed.T5Config(vocab_size=64, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=48,
                         num_encoder_layers=2, num_decoder_layers=2)


def _close(got, want, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=rtol, atol=atol)


def _variables(module):
    return jax.tree.leaves(nnx.state(module), is_leaf=lambda v: isinstance(v, nnx.Variable))


@functools.partial(nnx.jit, static_argnames=("deterministic",))
def _forward(net, enc, dec, enc_seg=None, dec_seg=None, enc_pos=None, dec_pos=None,
             deterministic=True, rngs=None):
    return net(enc, dec, encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg,
               encoder_positions=enc_pos, decoder_positions=dec_pos,
               deterministic=deterministic, rngs=rngs)


@functools.partial(nnx.jit, static_argnames=("max_decode_length",))
def _encode_and_init_cache(net, enc, max_decode_length):
    encoded = net.encode(enc)
    return encoded, net.init_cache(encoded, enc, max_decode_length)


@nnx.jit
def _decode(net, encoded, enc, tokens, cache):
    return net.decode(encoded, enc, tokens, cache=cache)


def _variant(model, **overrides):
    """The test network with other config values and the same weights (no new init)."""
    net = nnx.eval_shape(
        lambda: ed.EncoderDecoder(dataclasses.replace(model.config, **overrides), rngs=nnx.Rngs(0)))
    params = nnx.state(model)
    if net.logits_dense is None:
        params = nnx.state(model, nnx.Not(nnx.PathContains("logits_dense")))
    nnx.update(net, params)
    return net


@pytest.fixture(scope="module")
def model():
    return ed.EncoderDecoder(SMALL_TEST, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.RandomState(0)
    enc = rng.randint(1, 64, (2, 7))
    enc[1, 5:] = 0  # padding in the second example
    dec = rng.randint(1, 64, (2, 6))
    dec[:, 0] = 0  # T5 decoders start from token 0
    return jnp.asarray(enc, jnp.int32), jnp.asarray(dec, jnp.int32)


@pytest.fixture(scope="module")
def full_logits(model, batch):
    return np.asarray(_forward(model, *batch))


# --- published sizes --------------------------------------------------------------------

# Parameter counts of the released google/t5-v1_1-* checkpoints. With V = 32128 rows,
# D = d_model, N = heads, H = d_kv = 64, F = d_ff, and L layers in each stack:
#   embedding V*D + untied lm_head D*V
#   + encoder L * (4*D*N*H attention + 3*D*F gated MLP + 2*D norms) + D final norm
#   + decoder L * (8*D*N*H self + cross attention + 3*D*F + 3*D) + D final norm
#   + 2 * 32*N relative position biases (one table per stack).
PUBLISHED = {  # name: (d_model, heads, d_ff, layers, parameters)
    "small": (512, 6, 1024, 8, 76_961_152),
    "base": (768, 12, 2048, 12, 247_577_856),
    "large": (1024, 16, 2816, 24, 783_150_080),
    "xl": (2048, 32, 5120, 24, 2_849_757_184),
    "xxl": (4096, 64, 10240, 24, 11_135_332_352),
}


def _t5_v1_1_count(d, n, f, num_layers, v=32128, h=64, buckets=32):
    encoder = num_layers * (4 * d * n * h + 3 * d * f + 2 * d) + d + buckets * n
    decoder = num_layers * (8 * d * n * h + 3 * d * f + 3 * d) + d + buckets * n
    return 2 * v * d + encoder + decoder


@pytest.mark.parametrize("size", list(PUBLISHED))
def test_presets_have_published_parameter_counts(size):
    d, n, f, num_layers, published = PUBLISHED[size]
    assert _t5_v1_1_count(d, n, f, num_layers) == published
    cfg = ed.PRESETS[size]
    sizes = (cfg.emb_dim, cfg.num_heads, cfg.mlp_dim, cfg.num_encoder_layers)
    assert sizes == (d, n, f, num_layers)
    abstract = nnx.eval_shape(lambda: ed.EncoderDecoder(cfg, rngs=nnx.Rngs(0)))
    assert sum(math.prod(v.shape) for v in _variables(abstract)) == published


def test_presets_accept_overrides():
    cfg = ed.t5_1_1("base", vocab_size=100, dropout_rate=0.1)
    assert (cfg.emb_dim, cfg.vocab_size, cfg.dropout_rate) == (768, 100, 0.1)
    with pytest.raises(ValueError, match=r"unknown T5 v1\.1 size 'huge'"):
        ed.t5_1_1("huge")


@pytest.mark.parametrize("size", list(ed.PRESETS))
def test_gin_presets_equal_python_presets(size):
    gin = pytest.importorskip("gin")
    path = REPO / "gin" / "models" / f"t5_1_1_{size}.gin"
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings([str(path)], None, finalize_config=False)
        cfg = gin.query_parameter("%NETWORK_CONFIG").scoped_configurable_fn()
        assert cfg == ed.PRESETS[size]
        gin.clear_config()
        gin.parse_config_files_and_bindings([str(path)], ["NUM_EMBEDDINGS = 100"],
                                            finalize_config=False)
        cfg = gin.query_parameter("%NETWORK_CONFIG").scoped_configurable_fn()
        assert cfg == ed.t5_1_1(size, vocab_size=100)
    finally:
        gin.clear_config()


# --- state and metadata -----------------------------------------------------------------


def test_state_is_only_params_with_logical_axes(model):
    variables = _variables(model)
    assert variables and all(type(v) is nnx.Param for v in variables)
    assert not jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param)))
    for v in variables:
        names = v.get_metadata()["out_sharding"]
        assert len(names) == v[...].ndim and set(names) <= LOGICAL_NAMES, names
        assert v[...].dtype == jnp.float32


def test_tied_logits_use_the_embedding_scaled_by_sqrt_dim(model, batch):
    tied = _variant(model, logits_via_embedding=True)
    assert tied.logits_dense is None
    untied = _variant(model)
    table = untied.token_embedder.embedding[...]
    untied.logits_dense.kernel[...] = table.T / np.sqrt(SMALL_TEST.emb_dim)
    _close(_forward(tied, *batch), _forward(untied, *batch))


# --- masks, packing, cached decoding ----------------------------------------------------


def test_causal_mask_prevents_future_leakage(model, batch, full_logits):
    enc, dec = batch
    changed = np.asarray(_forward(model, enc, dec.at[:, 4].set(dec[:, 4] % 63 + 1)))
    np.testing.assert_array_equal(changed[:, :4], full_logits[:, :4])
    assert not np.allclose(changed[:, 4:], full_logits[:, 4:])


def test_encoder_padding_is_masked(model, batch, full_logits):
    enc, dec = batch
    # Truncating example 1's encoder padding (ids 0) must not change its logits.
    alone = np.asarray(_forward(model, enc[1:, :5], dec[1:]))
    _close(alone[0], full_logits[1])


def test_packed_batch_equals_each_sequence_alone(model):
    rng = np.random.RandomState(1)
    enc_a, dec_a = rng.randint(1, 64, 5), np.r_[0, rng.randint(1, 64, 3)]
    enc_b, dec_b = rng.randint(1, 64, 3), np.r_[0, rng.randint(1, 64, 2)]

    def pack(a, b, length):
        tokens = np.zeros(length, np.int32)
        tokens[: len(a) + len(b)] = np.r_[a, b]
        seg = np.zeros(length, np.int32)
        seg[: len(a)], seg[len(a): len(a) + len(b)] = 1, 2
        pos = np.zeros(length, np.int32)
        pos[: len(a)], pos[len(a): len(a) + len(b)] = np.arange(len(a)), np.arange(len(b))
        return (jnp.asarray(x[None]) for x in (tokens, seg, pos))

    enc, enc_seg, enc_pos = pack(enc_a, enc_b, 10)
    dec, dec_seg, dec_pos = pack(dec_a, dec_b, 9)
    packed = np.asarray(_forward(model, enc, dec, enc_seg, dec_seg, enc_pos, dec_pos))[0]
    # Each sequence alone, in one unpacked batch (trailing padding only; one compile).
    alone_enc = np.zeros((2, 10), np.int32)
    alone_enc[0, :5], alone_enc[1, :3] = enc_a, enc_b
    alone_dec = np.zeros((2, 9), np.int32)
    alone_dec[0, :4], alone_dec[1, :3] = dec_a, dec_b
    alone = np.asarray(_forward(model, jnp.asarray(alone_enc), jnp.asarray(alone_dec)))
    _close(packed[:4], alone[0, :4])
    _close(packed[4:7], alone[1, :3])


@pytest.mark.parametrize("chunks", [[1] * 6, [3, 1, 2]], ids=["token_by_token", "chunks_3_1_2"])
def test_cached_decoding_matches_full_forward(model, batch, full_logits, chunks):
    enc, dec = batch
    encoded, cache = _encode_and_init_cache(model, enc, 8)
    assert cache.max_length == 8 and cache.index.dtype == jnp.int32
    assert len(cache.self_attention) == len(cache.cross_attention) == 2
    assert cache.self_attention[0].k.shape == (2, 8, 4, 8)  # [B, L, K, H]
    assert cache.cross_attention[0].k.shape == (2, 7, 4, 8)  # [B, S, K, H]
    outs, start = [], 0
    for size in chunks:
        logits, cache = _decode(model, encoded, enc, dec[:, start:start + size], cache)
        assert logits.shape == (2, size, 64) and logits.dtype == jnp.float32
        outs.append(np.asarray(logits))
        start += size
    np.testing.assert_array_equal(np.asarray(cache.index), [6, 6])
    _close(np.concatenate(outs, axis=1), full_logits)


def test_cache_reorder_rewind_and_per_example_index(model, batch, full_logits):
    enc, dec = batch
    encoded, cache = _encode_and_init_cache(model, enc, 8)
    _, cache = _decode(model, encoded, enc, dec[:, :5], cache)
    # Speculative-decoding rollback to different points per example: example 0 re-feeds
    # token 2, example 1 token 4; stale slots beyond must be ignored.
    cache = cache.rewind(jnp.array([2, 4]))
    tokens = jnp.stack([dec[0, 2:3], dec[1, 4:5]])
    logits, cache = _decode(model, encoded, enc, tokens, cache)
    _close(np.asarray(logits[0, 0]), full_logits[0, 2])
    _close(np.asarray(logits[1, 0]), full_logits[1, 4])
    np.testing.assert_array_equal(np.asarray(cache.index), [3, 5])
    # Beam-search reordering: swap the examples, then each continues its own sequence.
    swapped = cache.take(jnp.array([1, 0]))
    logits, _ = _decode(model, encoded, enc, jnp.stack([dec[1, 5:6], dec[0, 3:4]]), swapped)
    _close(np.asarray(logits[0, 0]), full_logits[1, 5])
    _close(np.asarray(logits[1, 0]), full_logits[0, 3])


def test_cached_decode_step_jits_with_cache_as_pytree(model, batch, full_logits):
    enc, dec = batch
    graphdef, state = nnx.split(model)

    encoded, cache = _encode_and_init_cache(model, enc, 6)

    @jax.jit
    def step(state, cache, tokens):
        net = nnx.merge(graphdef, state)
        return net.decode(encoded, enc, tokens, cache=cache)

    for t in range(2):
        logits, new_cache = step(state, cache, dec[:, t:t + 1])
        assert jax.tree.structure(new_cache) == jax.tree.structure(cache)
        cache = new_cache
        _close(logits[:, 0], full_logits[:, t])


def test_cached_decoding_rejects_packing_inputs(model, batch):
    enc, dec = batch
    _, cache = _encode_and_init_cache(model, enc, 6)
    with pytest.raises(ValueError, match="cached decoding takes no segment ids or positions"):
        model.decode(None, enc, dec[:, :1], cache=cache, decoder_positions=jnp.zeros((2, 1)))


# --- dropout, dtypes, sharding ----------------------------------------------------------


def test_dropout_only_when_not_deterministic_and_reproducible(model, batch, full_logits):
    net = _variant(model, dropout_rate=0.3)
    enc, dec = batch
    _close(_forward(net, enc, dec), full_logits, rtol=1e-6, atol=1e-6)

    def train(seed):
        return np.asarray(_forward(net, enc, dec, deterministic=False,
                                   rngs=nnx.Rngs(dropout=seed)))

    a, b, c = train(1), train(1), train(2)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, full_logits)
    with pytest.raises(ValueError, match=r"deterministic=False with dropout_rate=0.3 needs rngs"):
        net(enc, dec, deterministic=False)


def test_bfloat16_activations_with_float32_params(model, batch):
    net = _variant(model, dtype="bfloat16")
    enc, dec = batch
    encoded, cache = _encode_and_init_cache(net, enc, 6)
    assert encoded.dtype == jnp.bfloat16 and cache.self_attention[0].k.dtype == jnp.bfloat16
    assert all(v[...].dtype == jnp.float32 for v in _variables(net))
    logits, _ = _decode(net, encoded, enc, dec, cache)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_sharded_forward_matches_single_device(model, batch, full_logits):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    tp_rules = [("batch", "data"), ("heads", "model"), ("mlp", "model"), ("vocab", "model"),
                ("embed", None), ("kv", None), ("length", None)]
    graphdef, state = nnx.split(model)
    specs = nnx.get_partition_spec(state)
    shardings = jax.tree.map(
        lambda p: NamedSharding(mesh, rules.logical_to_mesh_spec(tuple(p), tp_rules)),
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    state = jax.device_put(state, shardings)
    enc, dec = (jnp.tile(x, (2, 1)) for x in batch)  # batch 4 over 'data'

    @jax.jit
    def forward(state, enc, dec):
        with rules.activate(mesh, tp_rules):
            return nnx.merge(graphdef, state)(enc, dec)

    with jax.set_mesh(mesh):
        logits = forward(state, enc, dec)
    _close(np.asarray(logits), np.tile(full_logits, (2, 1, 1)))


# --- config validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_heads": 6, "num_kv_heads": 4},
         r"num_heads=6 is not a multiple of num_kv_heads=4; use a divisor of num_heads"),
        ({"dropout_rate": 1.0}, r"dropout_rate=1.0 must be in \[0, 1\)"),
        ({"mlp_activations": ("gelu", "swishy")}, r"has unknown \['swishy'\]; use names from"),
        ({"mlp_activations": ()}, r"mlp_activations is empty"),
        ({"emb_dim": 0}, r"emb_dim=0 must be a positive integer"),
        ({"relative_attention_num_buckets": 31},
         r"relative_attention_num_buckets=31 must be an even number >= 4"),
        ({"relative_attention_max_distance": 16},
         r"relative_attention_max_distance=16 must exceed .* // 2 = 16"),
        ({"dtype": "int32"}, r"dtype='int32' must be a float dtype"),
        ({"dtype": "bf17"}, r"dtype='bf17' is not a dtype"),
    ],
)
def test_config_rejects_impossible_settings(overrides, message):
    with pytest.raises(ValueError, match=message):
        ed.T5Config(**overrides)


def test_config_normalises_gin_values_and_derives_sizes():
    cfg = ed.T5Config(mlp_activations=["gelu", "linear"], dtype=jnp.bfloat16, num_kv_heads=2)
    assert cfg.mlp_activations == ("gelu", "linear") and cfg.dtype == "bfloat16"
    assert cfg.activation_dtype == jnp.bfloat16 and cfg.kv_heads == 2
    assert cfg.attention_dim == 6 * 64
    hash(cfg)  # usable as static jit argument / graphdef metadata

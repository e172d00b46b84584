"""Decoder-only family (GPT-2, Llama): sizes, masks, packing, cached decoding, gin presets.

The reference for the masks is a float64 numpy forward pass written from the model
definitions (`_reference_logits`) that takes a hand-built [B, T, T] mask. Weights are
drawn at unit scale (`_random_net`): at the real init (stddev 0.02) attention is
nearly uniform and a wrong mask or position would hardly change the logits.
Networks run under `nnx.jit`; variants share the test network's weights.
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
from jax.sharding import PartitionSpec as P

from models import decoder_only as do
from partitioning import MeshConfig, Partitioner, make_mesh, rules

REPO = pathlib.Path(__file__).resolve().parent.parent
V = 64

# Llama-style (RoPE, SwiGLU, GQA 4 heads / 2 kv heads, RMSNorm, untied) and GPT-2-style
# (learned positions, GELU, biases, LayerNorm, tied) test networks.
LLAMA = do.DecoderOnlyConfig(vocab_size=V, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=48,
                             num_layers=2, num_kv_heads=2, max_length=32)
GPT2 = dataclasses.replace(LLAMA, num_kv_heads=None, mlp_activations=("gelu",),
                           position_embedding="learned", norm="layernorm",
                           layer_norm_epsilon=1e-5, use_bias=True, tie_embeddings=True)


def _close(got, want, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=rtol, atol=atol)


def _variables(module):
    return jax.tree.leaves(nnx.state(module), is_leaf=lambda v: isinstance(v, nnx.Variable))


def _random_net(cfg, seed):
    """A network with unit-scale random weights: norm scales in [0.5, 1.5], kernels
    N(0, 1/shape[0]), biases N(0, 0.1^2), embeddings N(0, 1). Built abstract, then filled."""
    net = nnx.eval_shape(lambda: do.DecoderOnly(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.RandomState(seed)
    state = nnx.state(net, nnx.Param)

    def draw(path, x):
        name = path[-1].key
        if name == "scale":
            return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
        std = {"bias": 0.1, "embedding": 1.0}.get(name, x.shape[0] ** -0.5)
        return jnp.asarray(rng.normal(0, std, x.shape), x.dtype)

    new = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, new)
    nnx.update(net, state)
    return net


def _variant(net, **overrides):
    """The network with other config values and the same weights (no new init)."""
    cfg = dataclasses.replace(net.config, **overrides)
    other = nnx.eval_shape(lambda: do.DecoderOnly(cfg, rngs=nnx.Rngs(0)))
    nnx.update(other, nnx.state(net))
    return other


@functools.partial(nnx.jit, static_argnames=("deterministic",))
def _forward(net, tokens, positions=None, segment_ids=None, prefix_mask=None,
             deterministic=True, rngs=None):
    return net(tokens, positions=positions, segment_ids=segment_ids, prefix_mask=prefix_mask,
               deterministic=deterministic, rngs=rngs)


@nnx.jit
def _decode(net, tokens, cache, prefix_mask=None):
    return net.decode(tokens, cache=cache, prefix_mask=prefix_mask)


@functools.partial(nnx.jit, static_argnames=("batch", "length"))
def _init_cache(net, batch, length):
    return net.init_cache(batch, length)


@pytest.fixture(scope="module")
def llama():
    return _random_net(LLAMA, seed=1)


@pytest.fixture(scope="module")
def gpt2():
    return _random_net(GPT2, seed=2)


@pytest.fixture(scope="module")
def nets(llama, gpt2):
    """Name -> network; 'window' is the Llama net with a sliding window of 3."""
    return {"llama": llama, "gpt2": gpt2, "window": _variant(llama, sliding_window=3)}


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.RandomState(0).randint(0, V, (2, 12)), jnp.int32)


# --- numpy reference --------------------------------------------------------------------

_NP_ACT = {
    "gelu": lambda a: 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3))),
    "silu": lambda a: a / (1 + np.exp(-a)),
    "linear": lambda a: a,
}


def _p(var):
    return np.asarray(var[...], np.float64)


def _np_norm(norm, cfg, x):
    if cfg.norm == "rmsnorm":
        return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + cfg.layer_norm_epsilon) * _p(
            norm.scale)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + cfg.layer_norm_epsilon) * _p(norm.scale)
    return y + _p(norm.bias) if cfg.use_bias else y


def _np_rope(x, positions, theta):
    half = x.shape[-1] // 2
    z = x[..., :half] + 1j * x[..., half:]
    angle = positions[..., None, None] * theta ** (-2.0 * np.arange(half) / x.shape[-1])
    z = z * np.exp(1j * angle)
    return np.concatenate([z.real, z.imag], -1)


def _np_dense(dense, x, n_in=1):
    y = np.tensordot(x, _p(dense.kernel), axes=n_in)
    return y + _p(dense.bias) if dense.bias is not None else y


def _reference_logits(net, tokens, allowed, positions=None):
    """float64 forward pass; allowed [B, T, T] bool (query, key); positions [B, T]."""
    cfg = net.config
    tokens = np.asarray(tokens)
    b, t = tokens.shape
    positions = np.tile(np.arange(t), (b, 1)) if positions is None else np.asarray(positions)
    x = _p(net.token_embedder.embedding)[tokens]
    if cfg.position_embedding == "learned":
        x = x + _p(net.position_embedder.embedding)[positions]
    for layer in net.layers:
        attn = layer.self_attention
        h = _np_norm(layer.pre_self_attention_layer_norm, cfg, x)
        q, k, v = (_np_dense(d, h) for d in (attn.query, attn.key, attn.value))
        if cfg.position_embedding == "rope":
            q, k = _np_rope(q, positions, cfg.rope_theta), _np_rope(k, positions, cfg.rope_theta)
        group = cfg.num_heads // cfg.kv_heads
        k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
        logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(cfg.head_dim)
        logits = np.where(allowed[:, None], logits, -np.inf)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w = w / w.sum(-1, keepdims=True)
        x = x + _np_dense(attn.out, np.einsum("bnts,bsnh->btnh", w, v), n_in=2)
        h = _np_norm(layer.pre_mlp_layer_norm, cfg, x)
        mlp = layer.mlp
        hidden = np.prod([_NP_ACT[a](_np_dense(getattr(mlp, name), h))
                          for name, a in zip(mlp.input_names, mlp.activations)], axis=0)
        x = x + _np_dense(mlp.wo, hidden)
    x = _np_norm(net.decoder_norm, cfg, x)
    if cfg.tie_embeddings:
        return x @ _p(net.token_embedder.embedding).T
    return _np_dense(net.logits_dense, x)


def _hand_mask(t, prefix=None, segments=None, window=None):
    """allowed[b, q, k] written out pair by pair from the rules in the module docstring."""
    b = 1 if prefix is None and segments is None else len(prefix if segments is None
                                                          else segments)
    allowed = np.zeros((b, t, t), bool)
    for r in range(b):
        for q in range(t):
            for k in range(t):
                ok = k <= q or (prefix is not None and prefix[r][q] and prefix[r][k])
                if segments is not None:
                    ok = ok and segments[r][q] == segments[r][k]
                if window is not None:
                    ok = ok and abs(q - k) < window
                allowed[r, q, k] = ok
    return allowed


# --- published sizes --------------------------------------------------------------------

# With V vocab rows, D = emb_dim, F = mlp_dim, L layers, P positions, N*H = D for GPT-2:
#   GPT-2: V*D + P*D + L * (4*D*D + 4*D attention + 2*D*F + F + D MLP + 4*D norms) + 2*D
#   Llama: V*D (+ D*V untied) + L * (D*N*H*2 + D*K*H*2 + 3*D*F + 2*D) + D
PUBLISHED = {  # preset: parameters (openai-community/gpt2*, meta-llama shapes)
    "gpt2_small": 124_439_808,
    "gpt2_medium": 354_823_168,
    "gpt2_large": 774_030_080,
    "gpt2_xl": 1_557_611_200,
    "llama_1b": 1_235_814_400,  # Llama 3.2 1B (tied); HF LlamaForCausalLM on meta agrees
    "llama_7b": 6_738_415_616,  # Llama 2 7B
}


def _formula_count(cfg: do.DecoderOnlyConfig) -> int:
    d, f, nh, kh = cfg.emb_dim, cfg.mlp_dim, cfg.attention_dim, cfg.kv_heads * cfg.head_dim
    bias = cfg.use_bias
    attention = 2 * d * nh + 2 * d * kh + bias * (nh + 2 * kh + d)
    mlp = len(cfg.mlp_activations) * (d * f + bias * f) + f * d + bias * d
    norm = d * (2 if cfg.norm == "layernorm" and bias else 1)
    count = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    count += cfg.max_length * d if cfg.position_embedding == "learned" else 0
    for i in range(cfg.num_layers):
        sparse = cfg.moe is not None and cfg.moe.is_sparse(i)
        # An MoE layer: E expert MLPs and a [D, E] router.
        ffn = cfg.moe.num_experts * (mlp + d) if sparse else mlp
        count += attention + ffn + 2 * norm
    return count + norm


@pytest.mark.parametrize("name", list(do.PRESETS))
def test_presets_have_published_parameter_counts(name):
    cfg = do.PRESETS[name]
    abstract = nnx.eval_shape(lambda: do.DecoderOnly(cfg, rngs=nnx.Rngs(0)))
    count = sum(math.prod(v.shape) for v in _variables(abstract))
    assert count == _formula_count(cfg)
    if name in PUBLISHED:
        assert count == PUBLISHED[name]


def test_preset_overrides_and_unknown_names():
    cfg = do.preset("gpt2_small", vocab_size=100, dropout_rate=0.1)
    assert (cfg.emb_dim, cfg.vocab_size, cfg.dropout_rate) == (768, 100, 0.1)
    with pytest.raises(ValueError, match=r"unknown decoder-only preset 'gpt5'; use one of "
                                         r"\['gpt2_tiny', 'gpt2_small'"):
        do.preset("gpt5")


@pytest.mark.parametrize("name", list(do.PRESETS))
def test_gin_presets_equal_python_presets(name, clean_gin):
    import gin

    path = REPO / "gin" / "models" / f"{name}.gin"
    gin.parse_config_files_and_bindings([str(path)], None, finalize_config=False)
    assert gin.query_parameter("%NETWORK_CONFIG").scoped_configurable_fn() == do.PRESETS[name]
    gin.clear_config()
    gin.parse_config_files_and_bindings([str(path)], ["NUM_EMBEDDINGS = 100"],
                                        finalize_config=False)
    cfg = gin.query_parameter("%NETWORK_CONFIG").scoped_configurable_fn()
    assert cfg == do.preset(name, vocab_size=100)
    header = path.read_text().splitlines()[0]
    if name in PUBLISHED:
        assert f"{PUBLISHED[name]:,}" in header, header


# --- config validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_heads": 6, "num_kv_heads": 4},
         r"num_heads=6 is not a multiple of num_kv_heads=4; use a divisor of num_heads"),
        ({"num_kv_heads": 0}, r"num_kv_heads=0; use a divisor"),
        ({"dropout_rate": 1.0}, r"dropout_rate=1.0 must be in \[0, 1\)"),
        ({"mlp_activations": ("silu", "swishy")}, r"has unknown \['swishy'\]; use names from"),
        ({"mlp_activations": ()}, r"mlp_activations is empty"),
        ({"num_layers": 0}, r"num_layers=0 must be a positive integer"),
        ({"max_length": -1}, r"max_length=-1 must be a positive integer"),
        ({"position_embedding": "alibi"},
         r"position_embedding='alibi' is not known; use one of \('rope', 'learned', 'none'\)"),
        ({"head_dim": 7}, r"head_dim=7 must be even for position_embedding='rope'"),
        ({"rope_theta": 0.0}, r"rope_theta=0.0 must be > 0"),
        ({"norm": "batchnorm"}, r"norm='batchnorm' is not known; use one of"),
        ({"layer_norm_epsilon": 0.0}, r"layer_norm_epsilon=0.0 must be > 0"),
        ({"sliding_window": 0}, r"sliding_window=0 must be a positive integer or None"),
        ({"dtype": "int32"}, r"dtype='int32' must be a float dtype"),
        ({"param_dtype": "bf17"}, r"param_dtype='bf17' is not a dtype"),
    ],
)
def test_config_rejects_impossible_settings(overrides, message):
    with pytest.raises(ValueError, match=message):
        do.DecoderOnlyConfig(**overrides)


def test_config_normalises_gin_values_and_derives_sizes():
    cfg = do.DecoderOnlyConfig(mlp_activations=["gelu"], dtype=jnp.bfloat16, num_kv_heads=2,
                               head_dim=7, position_embedding="none")
    assert cfg.mlp_activations == ("gelu",) and cfg.dtype == "bfloat16"
    assert cfg.activation_dtype == jnp.bfloat16 and cfg.parameter_dtype == jnp.float32
    assert (cfg.kv_heads, cfg.attention_dim) == (2, 8 * 7)
    assert do.DecoderOnlyConfig().kv_heads == 8
    hash(cfg)  # usable as static jit argument / graphdef metadata


def test_lengths_beyond_max_length_are_refused(llama):
    with pytest.raises(ValueError, match="sequence length 33 exceeds max_length=32"):
        llama(jnp.zeros((1, 33), jnp.int32))
    with pytest.raises(ValueError, match="cache max_length 40 exceeds the config's max_length=32"):
        llama.init_cache(1, 40)


# --- state, logits, partitioning --------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_state_is_only_params_with_logical_axes(nets, name):
    net = nets[name]
    variables = _variables(net)
    assert variables and all(type(v) is nnx.Param for v in variables)
    for v in variables:
        names = v.get_metadata()["out_sharding"]
        assert len(names) == v[...].ndim and set(names) <= set(rules.LOGICAL_AXES), names
    if name == "gpt2":
        assert net.position_embedder.embedding.get_metadata()["out_sharding"] == (
            "length", "embed")
        assert net.logits_dense is None and net.layers[0].self_attention.query.bias is not None
    else:
        assert net.layers[0].self_attention.key.kernel[...].shape == (32, 2, 8)
        assert net.position_embedder is None and net.logits_dense is not None


@pytest.mark.parametrize("preset", list(rules.PRESETS))
def test_every_rules_preset_shards_both_variants(preset):
    mesh = {"dp": {"data": -1}, "fsdp": {"data": 1, "fsdp": -1},
            "tp": {"data": 1, "model": -1}, "dp_tp": {"data": -1, "model": 2},
            "fsdp_tp": {"data": 1, "fsdp": -1, "model": 2}}[preset]
    partitioner = Partitioner(make_mesh(MeshConfig(**mesh)), preset)
    assert rules.mesh_axes_for("length", partitioner.rules, set()) == ()  # never sharded
    for cfg in (GPT2, LLAMA):
        with partitioner.activate():
            abstract = nnx.eval_shape(lambda cfg=cfg: do.DecoderOnly(cfg, rngs=nnx.Rngs(0)))
        shardings = partitioner.param_shardings(nnx.state(abstract, nnx.Param))
        if cfg is GPT2:
            table = shardings["position_embedder"]["embedding"].spec
            assert table == P(None, "fsdp" if "fsdp" in preset else None)


@nnx.jit
def _features_and_logits(net, tokens):
    hidden = net.features(tokens)
    return hidden, net.logits(hidden)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_features_then_logits_equal_call(nets, tokens, name):
    net = nets[name]
    hidden, logits = _features_and_logits(net, tokens)
    assert hidden.shape == (2, 12, 32) and logits.shape == (2, 12, V)
    assert logits.dtype == jnp.float32
    _close(logits, _forward(net, tokens))
    if name == "gpt2":  # tied: the hidden states against the embedding table, not scaled
        table = np.asarray(net.token_embedder.embedding[...], np.float64)
        _close(logits, np.asarray(hidden, np.float64) @ table.T)
    else:
        _close(logits, np.asarray(hidden, np.float64) @ _p(net.logits_dense.kernel))


# --- masks against the numpy reference ------------------------------------------------

PREFIX = [[1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]
SEGMENTS = [[1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2]]


@pytest.mark.parametrize("case", ["causal", "prefix", "window", "prefix_window",
                                  "packed_prefix"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_masks_match_hand_built_reference(nets, tokens, name, case):
    net, window, prefix, segments = nets[name], None, None, None
    if "window" in case:
        window = 3
        net = _variant(net, sliding_window=window)
    if "prefix" in case:
        prefix = PREFIX
    if "packed" in case:
        segments = SEGMENTS
        if name == "gpt2":  # segments 1 2 with a trailing pad / segments 1 2
            prefix = [[1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0]]
    as_jnp = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
    got = _forward(net, tokens, segment_ids=as_jnp(segments), prefix_mask=as_jnp(prefix))
    allowed = np.broadcast_to(_hand_mask(12, prefix, segments, window), (2, 12, 12))
    _close(got, _reference_logits(net, tokens, allowed))


def test_causal_mask_prevents_future_leakage(nets, tokens):
    for net in nets.values():
        full = np.asarray(_forward(net, tokens))
        changed = np.asarray(_forward(net, tokens.at[:, 5].set((tokens[:, 5] + 1) % V)))
        np.testing.assert_array_equal(changed[:, :5], full[:, :5])
        assert not np.allclose(changed[:, 5:], full[:, 5:])


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_packed_row_equals_separate_sequences(nets, name):
    net = nets[name]
    rng = np.random.RandomState(3)
    a, b = rng.randint(0, V, 5), rng.randint(0, V, 4)
    packed = np.zeros((1, 12), np.int32)
    packed[0, :9] = np.r_[a, b]
    segments = np.array([[1] * 5 + [2] * 4 + [0] * 3], np.int32)
    positions = np.array([[*range(5), *range(4), 0, 0, 0]], np.int32)
    got = np.asarray(_forward(net, jnp.asarray(packed), jnp.asarray(positions),
                              jnp.asarray(segments)))[0]
    alone = np.zeros((2, 12), np.int32)  # each alone, right-padded: one compile
    alone[0, :5], alone[1, :4] = a, b
    want = np.asarray(_forward(net, jnp.asarray(alone)))
    _close(got[:5], want[0, :5])
    _close(got[5:9], want[1, :4])


@pytest.mark.parametrize("num_kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_grouped_query_attention_equals_mha_with_repeated_kv_heads(llama, tokens, num_kv_heads):
    gqa = llama if num_kv_heads == LLAMA.num_kv_heads else _random_net(
        dataclasses.replace(LLAMA, num_kv_heads=num_kv_heads), seed=4)
    mha = nnx.eval_shape(lambda: do.DecoderOnly(dataclasses.replace(LLAMA, num_kv_heads=None),
                                                rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(gqa, nnx.Param))
    group = LLAMA.num_heads // num_kv_heads
    for layer in params["layers"].values():
        for name in ("key", "value"):  # [D, K, H]: query head n reads kv head n // group
            layer["self_attention"][name]["kernel"] = jnp.repeat(
                layer["self_attention"][name]["kernel"], group, axis=1)
    state = nnx.state(mha, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(mha, state)
    assert mha.layers[0].self_attention.key.kernel[...].shape == (32, 4, 8)
    _close(_forward(gqa, tokens), _forward(mha, tokens))


# --- cached decoding --------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [[1] * 12, [3, 1, 4, 2, 2]], ids=["token_by_token",
                                                                     "chunks_3_1_4_2_2"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "window"])
def test_cached_decoding_matches_full_forward(nets, tokens, name, chunks):
    net = nets[name]
    full = np.asarray(_forward(net, tokens))
    cache = _init_cache(net, 2, 16)
    assert cache.max_length == 16 and cache.index.dtype == jnp.int32
    assert len(cache.layers) == 2 and cache.layers[0].k.shape == (2, 16, net.config.kv_heads, 8)
    outs, start = [], 0
    for size in chunks:
        logits, cache = _decode(net, tokens[:, start:start + size], cache)
        assert logits.shape == (2, size, V) and logits.dtype == jnp.float32
        outs.append(np.asarray(logits))
        start += size
    np.testing.assert_array_equal(np.asarray(cache.index), [12, 12])
    _close(np.concatenate(outs, axis=1), full)


@pytest.mark.parametrize("name", ["llama", "gpt2", "window"])
def test_ragged_prefill_then_per_row_steps(nets, tokens, name):
    """Prompts of lengths 4 and 2 in one padded prefill (garbage after the short one),
    rewind to the lengths, then each row continues its own sequence from its own index.
    (Shapes as in the tests above, so the compiled functions are reused.)"""
    net = nets[name]
    seqs = np.asarray(tokens)
    full = np.asarray(_forward(net, tokens))
    lengths = np.array([4, 2])
    prompts = seqs[:, :4].copy()
    prompts[1, 2:] = (prompts[1, 2:] + 7) % V  # garbage past row 1's prompt
    cache = _init_cache(net, 2, 16)
    logits, cache = _decode(net, jnp.asarray(prompts), cache)
    for r, n in enumerate(lengths):
        _close(np.asarray(logits)[r, :n], full[r, :n])
    cache = cache.rewind(jnp.asarray(lengths))
    pos = lengths.copy()
    for size in (1, 2, 1, 2):
        chunk = np.stack([seqs[r, p:p + size] for r, p in enumerate(pos)])
        logits, cache = _decode(net, jnp.asarray(chunk), cache)
        for r, p in enumerate(pos):
            _close(np.asarray(logits)[r], full[r, p:p + size])
        pos += size
    np.testing.assert_array_equal(np.asarray(cache.index), pos)
    # Beam-search reordering: after swapping the rows each continues its own sequence.
    order = [1, 0]
    swapped = cache.take(jnp.array(order))
    chunk = np.stack([seqs[r, pos[r]:pos[r] + 1] for r in order])
    logits, _ = _decode(net, jnp.asarray(chunk), swapped)
    for i, r in enumerate(order):
        _close(np.asarray(logits)[i, 0], full[r, pos[r]])


@pytest.mark.parametrize("name", ["llama", "gpt2", "window"])
def test_prefix_prefill_then_steps_matches_prefix_lm_forward(nets, tokens, name):
    net = nets[name]
    prefix = jnp.asarray(PREFIX, jnp.int32)  # row 0: prefix 4; row 1: prefix 2
    full = np.asarray(_forward(net, tokens, prefix_mask=prefix))
    assert not np.allclose(full[:, :3], np.asarray(_forward(net, tokens))[:, :3])
    cache = _init_cache(net, 2, 16)
    # Prefill 4 tokens: row 1's tokens 2, 3 are past its prefix (causal among themselves).
    logits, cache = _decode(net, tokens[:, :4], cache, prefix[:, :4])
    outs = [np.asarray(logits)]
    for t in range(4, 12):
        logits, cache = _decode(net, tokens[:, t:t + 1], cache)
        outs.append(np.asarray(logits))
    _close(np.concatenate(outs, axis=1), full)


# --- dropout, dtypes, sharding ----------------------------------------------------------


def test_dropout_only_when_not_deterministic_and_reproducible(llama, tokens):
    net = _variant(llama, dropout_rate=0.3)
    full = np.asarray(_forward(llama, tokens))
    _close(_forward(net, tokens), full, rtol=1e-6, atol=1e-6)

    def train(seed):
        return np.asarray(_forward(net, tokens, deterministic=False, rngs=nnx.Rngs(dropout=seed)))

    a, b, c = train(1), train(1), train(2)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, full)
    with pytest.raises(ValueError, match=r"deterministic=False with dropout_rate=0.3 needs rngs"):
        net(tokens, deterministic=False)


def test_bfloat16_activations_with_float32_params(llama, tokens):
    net = _variant(llama, dtype="bfloat16")
    cache = _init_cache(net, 2, 16)
    assert cache.layers[0].k.dtype == jnp.bfloat16
    logits, cache = _decode(net, tokens, cache)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    assert all(v[...].dtype == jnp.float32 for v in _variables(net))
    # bf16 is an approximation of the float32 network: close, not equal.
    full = np.asarray(_forward(llama, tokens))
    assert np.abs(np.asarray(logits) - full).max() < 0.1 * np.abs(full).max()


def test_sharded_forward_matches_single_device(llama, tokens):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    tp_rules = rules.get_rules("dp_tp")
    graphdef, state = nnx.split(llama)
    specs = nnx.get_partition_spec(state)
    shardings = jax.tree.map(
        lambda p: NamedSharding(mesh, rules.logical_to_mesh_spec(tuple(p), tp_rules)),
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    state = jax.device_put(state, shardings)
    batch = jnp.tile(tokens, (2, 1))  # batch 4 over 'data'

    @jax.jit
    def forward(state, tokens):
        with rules.activate(mesh, tp_rules):
            return nnx.merge(graphdef, state)(tokens)

    with jax.set_mesh(mesh):
        logits = forward(state, batch)
    _close(np.asarray(logits), np.tile(np.asarray(_forward(llama, tokens)), (2, 1, 1)))

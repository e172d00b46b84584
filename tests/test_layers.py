"""The shared layer library (models/layers.py) against formulas and naive numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import layers


def _rand(seed, *shape):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def _close(got, want, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=rtol, atol=atol)


# --- relative position buckets ------------------------------------------------------------


def _bucket_reference(rel, bidirectional, num_buckets=32, max_distance=128):
    """T5's formula for one relative position (key - query), in plain Python."""
    n = -rel
    ret = 0
    if bidirectional:
        num_buckets //= 2
        ret += num_buckets if n < 0 else 0
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    large = max_exact + int(
        math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    )
    return ret + min(large, num_buckets - 1)


@pytest.mark.parametrize(
    "rel, bidirectional, expected",
    [
        # bidirectional: 16 buckets per direction, exact below 8, log up to 128.
        (0, True, 0), (-1, True, 1), (-7, True, 7), (-8, True, 8), (-16, True, 10),
        (-127, True, 15), (-128, True, 15), (-1000, True, 15),
        (1, True, 17), (8, True, 24), (1000, True, 31),
        # causal: 32 buckets looking back, exact below 16; keys after the query -> 0.
        (5, False, 0), (0, False, 0), (-1, False, 1), (-15, False, 15), (-16, False, 16),
        (-32, False, 21), (-127, False, 31), (-128, False, 31), (-5000, False, 31),
    ],
)
def test_relative_position_bucket_hand_computed(rel, bidirectional, expected):
    got = layers.relative_position_bucket(jnp.array([rel]), bidirectional=bidirectional)
    assert int(got[0]) == expected
    assert _bucket_reference(rel, bidirectional) == expected


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_bucket_matches_formula_everywhere(bidirectional):
    rel = np.arange(-300, 301)
    got = np.asarray(layers.relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional))
    want = np.array([_bucket_reference(int(r), bidirectional) for r in rel])
    np.testing.assert_array_equal(got, want)


def test_relative_position_biases_use_explicit_positions():
    mod = layers.RelativePositionBiases(3, bidirectional=False, rngs=nnx.Rngs(0))
    table = np.asarray(mod.rel_embedding[...])
    # Shared positions -> [1, N, T, S].
    bias = np.asarray(mod(jnp.arange(4), jnp.arange(4)))
    assert bias.shape == (1, 3, 4, 4)
    for i in range(4):
        for j in range(4):
            b = _bucket_reference(j - i, False)
            np.testing.assert_array_equal(bias[0, :, i, j], table[:, b])
    # Per-example query positions (a KV cache at different indices) -> [B, N, T, L].
    q = jnp.array([[2], [5]])
    bias = np.asarray(mod(q, jnp.arange(8)))
    assert bias.shape == (2, 3, 1, 8)
    np.testing.assert_array_equal(bias[1, :, 0, 1], table[:, _bucket_reference(1 - 5, False)])
    np.testing.assert_array_equal(bias[0, :, 0, 1], table[:, _bucket_reference(1 - 2, False)])


# --- rotary position embedding ----------------------------------------------------------


def _rope_reference(x, positions, theta):
    """RoPE from its definition: dims (i, i + H/2) form the complex number z_i, which is
    rotated by exp(1j * position * theta^(-2i/H)). x [B, T, N, H], positions [B, T]."""
    half = x.shape[-1] // 2
    z = x[..., :half].astype(np.float64) + 1j * x[..., half:].astype(np.float64)
    freq = theta ** (-2.0 * np.arange(half) / x.shape[-1])  # [H/2]
    angle = positions[..., None, None].astype(np.float64) * freq  # [B, T, 1, H/2]
    z = z * np.exp(1j * angle)
    return np.concatenate([z.real, z.imag], axis=-1)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_matches_rotation_formula(theta):
    x = _rand(0, 2, 5, 3, 8)
    positions = np.array([[0, 1, 2, 3, 4], [7, 0, 1, 300, 2047]], np.int32)
    got = layers.apply_rope(jnp.asarray(x), jnp.asarray(positions), theta)
    assert got.shape == x.shape and got.dtype == jnp.float32
    _close(got, _rope_reference(x, positions, theta), rtol=1e-4, atol=1e-4)
    # Position 0 is the identity; a rotation keeps each pair's norm.
    np.testing.assert_allclose(np.asarray(got)[0, 0], x[0, 0], rtol=1e-6)
    pair_norm = lambda a: np.hypot(a[..., :4], a[..., 4:])
    _close(pair_norm(np.asarray(got)), pair_norm(x))
    # Positions shared by the batch ([T]) broadcast like [B, T].
    shared = layers.apply_rope(jnp.asarray(x), jnp.arange(5), theta)
    _close(shared, _rope_reference(x, np.tile(np.arange(5), (2, 1)), theta), atol=1e-4)


def test_rope_is_relative_and_keeps_the_dtype():
    # q.k after RoPE depends only on the distance between the two positions.
    q, k = _rand(1, 1, 1, 1, 16), _rand(2, 1, 1, 1, 16)

    def score(pq, pk):
        rq = layers.apply_rope(jnp.asarray(q), jnp.array([[pq]]))
        rk = layers.apply_rope(jnp.asarray(k), jnp.array([[pk]]))
        return float(jnp.sum(rq * rk))

    assert score(3, 1) == pytest.approx(score(12, 10), abs=1e-4)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)
    x = jnp.asarray(_rand(3, 1, 2, 1, 8)).astype(jnp.bfloat16)
    assert layers.apply_rope(x, jnp.arange(2)).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="RoPE needs an even head_dim, got 7"):
        layers.Rope.at(jnp.arange(2), 7)


def test_attention_rope_hook_rotates_queries_and_keys():
    d, n, kh, h, t = 16, 4, 2, 8, 5
    attn = layers.MultiHeadAttention(d, n, h, num_kv_heads=kh, rngs=nnx.Rngs(0))
    x = _rand(1, 2, t, d)
    positions = np.array([[0, 1, 2, 3, 4], [3, 4, 0, 1, 2]], np.int32)
    mask = layers.make_causal_mask(jnp.zeros((2, t)))
    rope = layers.Rope.at(jnp.asarray(positions), h)
    got = attn(jnp.asarray(x), mask=mask, rope=rope)
    kernel = {name: np.asarray(getattr(attn, name).kernel[...])
              for name in ("query", "key", "value", "out")}
    q = _rope_reference(np.einsum("btd,dnh->btnh", x, kernel["query"]), positions, 1e4)
    k = _rope_reference(np.einsum("bsd,dnh->bsnh", x, kernel["key"]), positions, 1e4)
    v = np.einsum("bsd,dnh->bsnh", x, kernel["value"])
    ctx = _attention_reference(q, k, v, np.asarray(mask), None, h**-0.5)
    _close(got, np.einsum("btnh,nhd->btd", ctx, kernel["out"]), atol=1e-5)
    # Without rope the module is unchanged (T5's numerics).
    plain = _attention_reference(np.einsum("btd,dnh->btnh", x, kernel["query"]),
                                 np.einsum("bsd,dnh->bsnh", x, kernel["key"]), v,
                                 np.asarray(mask), None, h**-0.5)
    _close(attn(jnp.asarray(x), mask=mask), np.einsum("btnh,nhd->btd", plain, kernel["out"]))
    with pytest.raises(ValueError, match="rope applies to self-attention only"):
        attn(jnp.asarray(x), jnp.asarray(x), rope=rope)


# --- norms ------------------------------------------------------------------------------


def test_rms_norm_matches_formula():
    norm = layers.RMSNorm(16, rngs=nnx.Rngs(0))
    norm.scale[...] = jnp.asarray(_rand(1, 16))
    x = _rand(2, 2, 3, 16) * 5
    want = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6) * np.asarray(norm.scale[...])
    _close(np.asarray(norm(jnp.asarray(x))), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        np.asarray(layers.RMSNorm(4, rngs=nnx.Rngs(0)).scale[...]), np.ones(4)
    )


def test_rms_norm_computes_in_float32_and_returns_activation_dtype():
    norm = layers.RMSNorm(8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jnp.asarray(_rand(3, 4, 8) * 100).astype(jnp.bfloat16)
    y = norm(x)
    assert y.dtype == jnp.bfloat16 and norm.scale[...].dtype == jnp.float32
    x32 = np.asarray(x.astype(jnp.float32))
    want = x32 / np.sqrt(np.mean(x32**2, -1, keepdims=True) + 1e-6)
    _close(np.asarray(y.astype(jnp.float32)), want, rtol=1e-2)


def test_layer_norm_matches_formula():
    norm = layers.LayerNorm(16, rngs=nnx.Rngs(0))
    norm.scale[...] = jnp.asarray(_rand(1, 16))
    norm.bias[...] = jnp.asarray(_rand(2, 16))
    x = _rand(3, 5, 16) + 3
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    scale, bias = np.asarray(norm.scale[...]), np.asarray(norm.bias[...])
    want = (x - mean) / np.sqrt(var + 1e-5) * scale + bias
    _close(np.asarray(norm(jnp.asarray(x))), want)


# --- DenseGeneral -----------------------------------------------------------------------


def test_dense_general_shapes_axes_and_values():
    q = layers.DenseGeneral(16, (4, 8), kernel_axes=("embed", "heads", "kv"), rngs=nnx.Rngs(0))
    assert q.kernel[...].shape == (16, 4, 8)
    assert q.kernel.get_metadata()["out_sharding"] == ("embed", "heads", "kv")
    x = _rand(1, 2, 3, 16)
    y = q(jnp.asarray(x))
    assert y.shape == (2, 3, 4, 8)
    _close(y, np.einsum("btd,dnh->btnh", x, np.asarray(q.kernel[...])))

    out = layers.DenseGeneral((4, 8), 16, axis=(-2, -1), kernel_axes=("heads", "kv", "embed"),
                              use_bias=True, rngs=nnx.Rngs(1))
    assert out.bias.get_metadata()["out_sharding"] == ("embed",)
    z = out(y)
    assert z.shape == (2, 3, 16)
    want = np.einsum("btnh,nhd->btd", np.asarray(y), np.asarray(out.kernel[...]))
    _close(z, want + np.asarray(out.bias[...]))


def test_dense_general_rejects_bad_axes_and_inputs():
    with pytest.raises(ValueError, match=r"kernel_axes \('embed',\) must name every dim"):
        layers.DenseGeneral(4, 8, kernel_axes=("embed",), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"axis .* and in_features .* same length"):
        layers.DenseGeneral((2, 4), 8, kernel_axes=("a", "b", "c"), rngs=nnx.Rngs(0))
    dense = layers.DenseGeneral(4, 8, kernel_axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"input dims \(5,\) .* do not match in_features \(4,\)"):
        dense(jnp.ones((2, 5)))


def test_dense_general_init_uses_two_dim_fan_in():
    # Output projection [N, H, D]: fan-in is N * H = 256, not H.
    dense = layers.DenseGeneral((8, 32), 512, axis=(-2, -1), kernel_axes=("heads", "kv", "embed"),
                                kernel_init=layers.default_attention_kernel_init, rngs=nnx.Rngs(0))
    assert np.std(np.asarray(dense.kernel[...])) == pytest.approx(256**-0.5, rel=0.03)


def test_t5_query_init_folds_in_the_logit_scale():
    d, n, h = 256, 8, 64
    t5 = layers.MultiHeadAttention(d, n, h, scale_in_query_init=True, rngs=nnx.Rngs(0))
    assert t5.scale == 1.0
    assert np.std(np.asarray(t5.query.kernel[...])) == pytest.approx((d * h) ** -0.5, rel=0.03)
    assert np.std(np.asarray(t5.key.kernel[...])) == pytest.approx(d**-0.5, rel=0.03)
    assert np.std(np.asarray(t5.out.kernel[...])) == pytest.approx((n * h) ** -0.5, rel=0.03)
    gpt = layers.MultiHeadAttention(d, n, h, rngs=nnx.Rngs(0))
    assert gpt.scale == pytest.approx(h**-0.5)
    assert np.std(np.asarray(gpt.query.kernel[...])) == pytest.approx(d**-0.5, rel=0.03)


# --- embeddings -------------------------------------------------------------------------


def test_embed_lookup_and_attend():
    emb = layers.Embed(10, 6, rngs=nnx.Rngs(0))
    table = np.asarray(emb.embedding[...])
    assert emb.embedding.get_metadata()["out_sharding"] == ("vocab", "embed")
    ids = jnp.array([[1, 2, 9], [0, 0, 3]])
    np.testing.assert_array_equal(np.asarray(emb(ids)), table[np.asarray(ids)])
    q = _rand(1, 2, 6)
    _close(emb.attend(jnp.asarray(q)), q @ table.T)
    with pytest.raises(ValueError, match="token ids must be integers"):
        emb(jnp.ones((2, 3)))
    assert np.isnan(np.asarray(emb(jnp.array([10])))).all()  # out of range is loud


# --- masks ------------------------------------------------------------------------------


def test_mask_helpers():
    causal = np.asarray(layers.make_causal_mask(jnp.zeros((2, 3))))
    assert causal.shape == (2, 1, 3, 3) and causal.dtype == np.bool_
    np.testing.assert_array_equal(causal[0, 0], np.tril(np.ones((3, 3), bool)))

    seg = jnp.array([[1, 1, 2, 0]])
    m = np.asarray(layers.make_segment_mask(seg, seg))[0, 0]
    np.testing.assert_array_equal(m[0], [True, True, False, False])
    np.testing.assert_array_equal(m[2], [False, False, True, False])

    query, key = jnp.array([[1, 1]]), jnp.array([[5, 0, 2]])
    pad = np.asarray(layers.make_attention_mask(query > 0, key > 0))
    np.testing.assert_array_equal(pad[0, 0], [[True, False, True]] * 2)

    assert layers.combine_masks(None, None) is None
    both = layers.combine_masks(jnp.array([True, True]), None, jnp.array([True, False]))
    np.testing.assert_array_equal(np.asarray(both), [True, False])

    window = np.asarray(layers.make_sliding_window_mask(jnp.arange(5), jnp.arange(5), 2))
    assert window.shape == (1, 1, 5, 5)
    np.testing.assert_array_equal(window[0, 0], np.abs(np.subtract.outer(range(5), range(5))) < 2)
    ragged = np.asarray(layers.make_sliding_window_mask(jnp.array([[4], [1]]), jnp.arange(6), 3))
    assert ragged.shape == (2, 1, 1, 6)
    np.testing.assert_array_equal(ragged[:, 0, 0], [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])

    cache = np.asarray(layers.make_cache_mask(jnp.array([0, 2]), 2, 5))
    assert cache.shape == (2, 1, 2, 5)
    np.testing.assert_array_equal(cache[0, 0], [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(cache[1, 0], [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])


# --- attention --------------------------------------------------------------------------


def _attention_reference(q, k, v, mask, bias, scale):
    """Naive numpy attention; repeats kv heads for GQA."""
    n, kh = q.shape[2], k.shape[2]
    k = np.repeat(k, n // kh, axis=2)
    v = np.repeat(v, n // kh, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = np.where(mask, logits, -1e10)
    logits = logits - logits.max(-1, keepdims=True)
    w = np.exp(logits)
    w = w / w.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", w, v)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_dot_product_attention_matches_numpy(num_kv_heads):
    b, t, s, n, h = 2, 3, 5, 4, 8
    q, k, v = _rand(0, b, t, n, h), _rand(1, b, s, num_kv_heads, h), _rand(2, b, s, num_kv_heads, h)
    bias = _rand(3, 1, n, t, s)
    mask = np.random.RandomState(4).rand(b, 1, t, s) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    got = layers.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                       mask=jnp.asarray(mask), bias=jnp.asarray(bias), scale=0.5)
    assert got.shape == (b, t, n, h)
    want = _attention_reference(q, k, v, mask, bias, 0.5)
    _close(np.asarray(got), want)


def test_multi_head_attention_module_matches_numpy_with_gqa():
    d, n, kh, h = 16, 4, 2, 8
    attn = layers.MultiHeadAttention(d, n, h, num_kv_heads=kh, rngs=nnx.Rngs(0))
    assert attn.query.kernel[...].shape == (d, n, h)
    assert attn.key.kernel[...].shape == (d, kh, h)
    assert attn.key.kernel.get_metadata()["out_sharding"] == ("embed", "kv_heads", "kv")
    assert attn.out.kernel[...].shape == (n, h, d)
    x, y = _rand(1, 2, 3, d), _rand(2, 2, 5, d)
    got = attn(jnp.asarray(x), jnp.asarray(y))  # cross-attention
    assert got.shape == (2, 3, d)
    kernel = {name: np.asarray(getattr(attn, name).kernel[...])
              for name in ("query", "key", "value", "out")}
    q = np.einsum("btd,dnh->btnh", x, kernel["query"])
    k = np.einsum("bsd,dnh->bsnh", y, kernel["key"])
    v = np.einsum("bsd,dnh->bsnh", y, kernel["value"])
    ctx = _attention_reference(q, k, v, None, None, h**-0.5)
    want = np.einsum("btnh,nhd->btd", ctx, kernel["out"])
    _close(np.asarray(got), want)


def test_attention_rejects_heads_not_multiple_of_kv_heads():
    with pytest.raises(ValueError, match="num_heads 4 is not a multiple of num_kv_heads 3"):
        layers.MultiHeadAttention(8, 4, 2, num_kv_heads=3, rngs=nnx.Rngs(0))


def test_cached_self_attention_matches_causal_full_pass():
    d, n, kh, h, t = 16, 4, 2, 8, 5
    attn = layers.MultiHeadAttention(d, n, h, num_kv_heads=kh, rngs=nnx.Rngs(0))
    x = jnp.asarray(_rand(1, 2, t, d))
    full = attn(x, mask=layers.make_causal_mask(x[..., 0]))
    cache = layers.KVCache.zeros(2, 8, kh, h)
    index = jnp.zeros((2,), jnp.int32)
    outs = []
    for chunk in [(0, 2), (2, 3), (3, 5)]:  # chunks of 2, 1 and 2 tokens
        piece = x[:, chunk[0]:chunk[1]]
        mask = layers.make_cache_mask(index, piece.shape[1], cache.length)
        out, cache = attn.cached_self_attention(piece, cache, index, mask=mask)
        outs.append(out)
        index = index + piece.shape[1]
    _close(jnp.concatenate(outs, 1), full)


def test_kv_cache_write_per_example_index_and_drop_past_end():
    cache = layers.KVCache.zeros(2, 4, 1, 1)
    new = jnp.arange(1, 7, dtype=jnp.float32).reshape(2, 3, 1, 1)  # [B=2, T=3, K=1, H=1]
    out = cache.write(new, new, jnp.array([0, 2]))
    np.testing.assert_array_equal(np.asarray(out.k[..., 0, 0]), [[1, 2, 3, 0], [0, 0, 4, 5]])
    swapped = out.take(jnp.array([1, 0]))
    np.testing.assert_array_equal(np.asarray(swapped.v[0, :, 0, 0]), [0, 0, 4, 5])


# --- MLP and dropout --------------------------------------------------------------------


def test_gated_mlp_matches_numpy():
    mlp = layers.MlpBlock(8, 12, activations=("gelu", "linear"), rngs=nnx.Rngs(0))
    assert mlp.wi_0.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")
    assert mlp.wo.kernel.get_metadata()["out_sharding"] == ("mlp", "embed")
    x = _rand(1, 2, 3, 8)
    w0, w1, wo = (np.asarray(m.kernel[...]) for m in (mlp.wi_0, mlp.wi_1, mlp.wo))
    a = x @ w0
    gelu = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))
    want = (gelu * (x @ w1)) @ wo
    _close(np.asarray(mlp(jnp.asarray(x))), want)

    plain = layers.MlpBlock(8, 12, activations=("relu",), rngs=nnx.Rngs(0))
    assert hasattr(plain, "wi") and not hasattr(plain, "wi_0")
    with pytest.raises(ValueError, match="unknown activation 'geluu'"):
        layers.MlpBlock(8, 12, activations=("geluu",), rngs=nnx.Rngs(0))


def test_dropout_holds_no_rng_state_and_takes_rngs_at_call():
    mlp = layers.MlpBlock(8, 64, dropout_rate=0.5, rngs=nnx.Rngs(0))
    variables = jax.tree.leaves(nnx.state(mlp), is_leaf=lambda v: isinstance(v, nnx.Variable))
    assert variables and all(type(v) is nnx.Param for v in variables)
    x = jnp.asarray(_rand(1, 2, 3, 8))
    np.testing.assert_array_equal(np.asarray(mlp(x)), np.asarray(mlp(x, deterministic=True)))
    a = mlp(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
    b = mlp(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
    c = mlp(x, deterministic=False, rngs=nnx.Rngs(dropout=2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    assert not np.allclose(np.asarray(a), np.asarray(mlp(x)))

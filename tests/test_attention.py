"""Blockwise (flash) attention, the attention dispatcher, and the families' attention_impl.

References: the naive `layers.dot_product_attention` (checked against numpy in
test_layers.py) on masks built here in numpy from the rules, never from `AttentionSpec`;
each family's own dense path (attention_impl='xla', its masks built by the family);
cached decoding against the uncached forward; and XLA's compiled memory analysis for
the memory claims. Inputs and weights are unit scale so that attention is far from
uniform and a wrong mask, bias or tile would show.
"""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import attention, layers
from models import decoder_only as do
from models import encoder_decoder as ed
from models import encoder_only as eo


def _close(got, want, what=""):
    """float32 agreement: 1e-5 relative, and 1e-5 of the array's largest entry absolute
    (entries are sums of terms that size, e.g. gradients reaching O(100))."""
    got, want = np.asarray(got), np.asarray(want)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=what)


def _np_mask(b, t, s, *, causal=False, q_index=None, k_index=None, q_seg=None, k_seg=None,
             q_valid=None, k_valid=None, q_prefix=None, k_prefix=None, window=None):
    """The mask rules in numpy, bool [B, 1, T, S]: what the families' dense masks mean."""
    qi = np.broadcast_to(np.arange(t) if q_index is None else q_index, (b, t))[:, :, None]
    ki = np.broadcast_to(np.arange(s) if k_index is None else k_index, (b, s))[:, None, :]
    mask = np.ones((b, t, s), bool)
    if causal:
        seen = ki <= qi
        if q_prefix is not None:
            seen = seen | (q_prefix[:, :, None] & k_prefix[:, None, :])
        mask &= seen
    if q_seg is not None:
        mask &= q_seg[:, :, None] == k_seg[:, None, :]
    if q_valid is not None:
        mask &= q_valid[:, :, None]
    if k_valid is not None:
        mask &= k_valid[:, None, :]
    if window is not None:
        mask &= np.abs(qi - ki) < window
    return mask[:, None]


# --- the kernel against the naive path -------------------------------------------------

B, N = 2, 4


def _packed(rng, b, length, n_segments):
    """Sorted segment ids in 1..n_segments and positions restarting in each segment."""
    seg = np.sort(rng.randint(1, n_segments + 1, (b, length)), axis=1)
    pos = np.zeros((b, length), np.int32)
    for r in range(b):
        for j in range(1, length):
            pos[r, j] = 0 if seg[r, j] != seg[r, j - 1] else pos[r, j - 1] + 1
    return seg, pos


def _case(name):
    """(T, S, K, spec kwargs, numpy mask kwargs, relpos (bidirectional, positions) or None,
    dense mask, dense bias, [(block_q, block_k)])."""
    rng = np.random.RandomState(7)
    if name == "no_mask":  # MHA, T != S, blocks that divide neither
        return 13, 11, 4, {}, {}, None, None, None, [(4, 3)]
    if name == "packed_padded":  # causal T5 bias, GQA, packing, key padding, positions
        # restarting per segment
        seg, pos = _packed(rng, B, 13, 3)
        valid = np.arange(13)[None] < np.array([[10], [13]])
        kw = {"q_seg": seg, "k_seg": seg, "k_valid": valid}
        spec = {"causal": True, "query_segment_ids": seg, "key_segment_ids": seg,
                "key_valid": valid}
        return 13, 13, 2, spec, {"causal": True, **kw}, (False, pos), None, None, [(5, 7)]
    if name == "prefix_window_mqa":  # prefix LM + sliding window, MQA
        prefix = np.arange(13)[None] < np.array([[5], [2]])
        spec = {"causal": True, "query_prefix": prefix, "key_prefix": prefix,
                "sliding_window": 4}
        kw = {"causal": True, "q_prefix": prefix, "k_prefix": prefix, "window": 4}
        return 13, 13, 1, spec, kw, None, None, None, [(4, 3)]
    if name == "bidirectional_padding":  # padding queries (fully masked rows), T != S
        q_valid = np.arange(13)[None] < np.array([[9], [13]])
        k_valid = np.arange(11)[None] < np.array([[11], [6]])
        seg_q = np.where(np.arange(13) < 7, 1, 2)[None].repeat(B, 0)
        seg_k = np.where(np.arange(11) < 5, 1, 2)[None].repeat(B, 0)
        spec = {"query_valid": q_valid, "key_valid": k_valid, "sliding_window": 6,
                "query_segment_ids": seg_q, "key_segment_ids": seg_k}
        kw = {"q_valid": q_valid, "k_valid": k_valid, "window": 6, "q_seg": seg_q,
              "k_seg": seg_k}
        return 13, 11, 4, spec, kw, (True, None), None, None, [(4, 3)]
    if name == "decode_offsets_dense":  # cache-style: 3 new queries at per-row slots,
        # plus a dense [B, 1, 1, S] mask and a dense [1, N, T, S] bias
        q_index = np.array([[4, 5, 6], [9, 10, 11]])
        spec = {"causal": True, "query_index": q_index, "key_index": np.arange(13)[None],
                "sliding_window": 5}
        kw = {"causal": True, "q_index": q_index, "window": 5}
        mask = np.arange(13)[None, None, None] != np.array([2, 10])[:, None, None, None]
        bias = rng.normal(size=(1, N, 3, 13)).astype(np.float32)
        return 3, 13, 2, spec, kw, None, mask, bias, [(2, 4)]
    raise ValueError(name)


KERNEL_CASES = ["no_mask", "packed_padded", "prefix_window_mqa", "bidirectional_padding",
                "decode_offsets_dense"]


def _kernel_problem(name):
    """Inputs, the naive and the blockwise loss (sum(out * cotangent), out) of a case."""
    t, s, k_heads, spec_kw, mask_kw, relpos, dense_mask, dense_bias, blocks = _case(name)
    rng = np.random.RandomState(0)
    h, scale = 8, 0.5
    args = {"q": rng.normal(size=(B, t, N, h)), "k": rng.normal(size=(B, s, k_heads, h)),
            "v": rng.normal(size=(B, s, k_heads, h))}
    mask = _np_mask(B, t, s, **mask_kw) if mask_kw else None
    if dense_mask is not None:
        mask = dense_mask if mask is None else mask & dense_mask
    if dense_bias is not None:
        args["bias"] = dense_bias
    rel = positions = None
    if relpos is not None:
        bidirectional, positions = relpos
        rel = layers.RelativePositionBiases(N, num_buckets=8, max_distance=16,
                                            bidirectional=bidirectional, rngs=nnx.Rngs(0))
        args["table"] = rng.normal(size=(N, 8))
    args = {key: jnp.asarray(x, jnp.float32) for key, x in args.items()}
    cotangent = jnp.asarray(rng.normal(size=(B, t, N, h)), jnp.float32)
    spec = attention.AttentionSpec(**spec_kw)
    if positions is not None:
        spec = spec.replace(query_positions=positions, key_positions=positions)
    q_pos = spec.query_positions if positions is not None else spec.query_index
    k_pos = spec.key_positions if positions is not None else spec.key_index
    q_pos = np.arange(t) if q_pos is None else q_pos
    k_pos = np.arange(s) if k_pos is None else k_pos

    def relative_bias(table):  # the module with `table` as its (traced) parameter
        graphdef, state = nnx.split(rel)
        return nnx.merge(graphdef, jax.tree.map(lambda _: table, state))

    def naive(a):
        bias = a.get("bias")
        if rel is not None:
            rb = relative_bias(a["table"])(jnp.asarray(q_pos), jnp.asarray(k_pos))
            bias = rb if bias is None else bias + rb
        out = layers.dot_product_attention(a["q"], a["k"], a["v"], mask=mask, bias=bias,
                                           scale=scale)
        return jnp.sum(out * cotangent), out

    def blockwise(a, block_q, block_k):
        bias_fn = None if rel is None else relative_bias(a["table"])
        out = attention.blockwise_attention(
            a["q"], a["k"], a["v"], mask=dense_mask, bias=a.get("bias"), spec=spec,
            bias_fn=bias_fn, scale=scale, block_q=block_q, block_k=block_k)
        return jnp.sum(out * cotangent), out

    return args, naive, blockwise, blocks


@pytest.fixture(scope="module")
def kernel_results():
    """{case: (args, naive (grads, out), [(blocks, blockwise (grads, out))])}, from one
    jitted program (cheaper to compile than one per case)."""
    problems = {name: _kernel_problem(name) for name in KERNEL_CASES}
    grad = jax.grad(lambda f, *x: f(*x), argnums=1, has_aux=True)

    @jax.jit
    def run(all_args):
        return {name: (grad(naive, all_args[name]),
                       [grad(blockwise, all_args[name], bq, bk) for bq, bk in blocks])
                for name, (_, naive, blockwise, blocks) in problems.items()}

    results = run({name: p[0] for name, p in problems.items()})
    return {name: (args, results[name][0], list(zip(blocks, results[name][1])))
            for name, (args, _, _, blocks) in problems.items()}


@pytest.mark.parametrize("name", KERNEL_CASES)
def test_blockwise_matches_naive_forward_and_gradients(name, kernel_results):
    args, (want_grads, want_out), got = kernel_results[name]
    for (bq, bk), (got_grads, got_out) in got:
        where = f"{name}, blocks ({bq}, {bk})"
        _close(got_out, want_out, f"output, {where}")
        for key in args:
            _close(got_grads[key], want_grads[key], f"d{key}, {where}")


def test_fully_masked_rows_average_all_values(kernel_results):
    """Padding queries see no key: like the naive path, the mean of all S values."""
    args, _, [(_, (_, out))] = kernel_results["bidirectional_padding"]
    v = np.asarray(args["v"])  # [B, S, K, H] with K = N here
    _close(np.asarray(out)[0, 9:], np.broadcast_to(v[0].mean(0), (4, N, v.shape[-1])))


def test_blockwise_rejects_bad_shapes_and_blocks():
    q, kv = jnp.zeros((1, 4, 4, 8)), jnp.zeros((1, 5, 3, 8))
    with pytest.raises(ValueError, match="num_heads 4 is not a multiple of num_kv_heads 3"):
        attention.blockwise_attention(q, kv, kv)
    kv = jnp.zeros((1, 5, 2, 8))
    with pytest.raises(ValueError, match="block_q=0 must be a positive integer"):
        attention.blockwise_attention(q, kv, kv, block_q=0)
    with pytest.raises(ValueError, match=r"mask of shape \(1, 1, 3, 5\) is not broadcastable"):
        attention.blockwise_attention(q, kv, kv, mask=jnp.ones((1, 1, 3, 5), bool))
    with pytest.raises(ValueError, match=r"query_prefix / key_prefix .* set causal=True"):
        prefix = jnp.ones((1, 4), bool)
        attention.blockwise_attention(q, kv, kv, spec=attention.AttentionSpec(
            query_prefix=prefix, key_prefix=prefix))


# --- memory ---------------------------------------------------------------------------


def _temp_bytes(length):
    """Temp bytes of XLA's compiled forward + backward of one blockwise causal
    sliding-window attention (1 sequence, 2 heads sharing 1 kv head, head dim 8), and
    the executable."""
    spec = attention.AttentionSpec(causal=True, sliding_window=128)
    q = jax.ShapeDtypeStruct((1, length, 2, 8), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, length, 1, 8), jnp.float32)

    def forward_backward(q, k, v, d_out):
        out, vjp = jax.vjp(lambda q, k, v: attention.blockwise_attention(
            q, k, v, spec=spec, block_q=128, block_k=128), q, k, v)
        return out, vjp(d_out)

    compiled = jax.jit(forward_backward).lower(q, kv, kv, q).compile()
    return compiled.memory_analysis().temp_size_in_bytes, compiled


def test_blockwise_memory_is_linear_in_length_and_runs_at_64k_tokens():
    temps = {}
    for length in (32768, 65536):
        temps[length], compiled = _temp_bytes(length)
    ratio = temps[65536] / temps[32768]  # linear: 2 (a quadratic term would give 4)
    assert 1.5 < ratio < 2.5, f"temp bytes {temps}: doubling the length x{ratio:.2f}"
    # At 64k tokens the naive logits alone would take 4 * 2 * 65536^2 bytes = 34 GB.
    assert temps[65536] < 4 * 2 * 65536**2 / 1000

    # Run it (the window keeps the work small) and check rows against a float64 softmax
    # over each query's own window.
    rng = np.random.RandomState(0)
    length = 65536
    q, k, v, d_out = (rng.normal(size=(1, length, heads, 8)).astype(np.float32)
                      for heads in (2, 1, 1, 2))
    out, grads = compiled(q, k, v, d_out)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    out = np.asarray(out)
    for row in (0, 5, 127, 40000, length - 1):
        keys = slice(max(0, row - 127), row + 1)
        logits = np.einsum("nh,sh->ns", q[0, row].astype(np.float64), k[0, keys, 0])
        w = np.exp(logits - logits.max(-1, keepdims=True))
        want = (w / w.sum(-1, keepdims=True)) @ v[0, keys, 0]
        np.testing.assert_allclose(out[0, row], want, rtol=1e-5, atol=1e-5)


# --- dispatch ---------------------------------------------------------------------------


def test_fused_kernels_on_cpu_are_clear_errors_and_auto_falls_back():
    q = jnp.asarray(np.random.RandomState(0).normal(size=(2, 5, 4, 8)), jnp.float32)
    kv = q[:, :, :2]
    for impl, platform in (("cudnn", "GPU"), ("pallas_tpu", "TPU")):
        with pytest.raises(ValueError, match=f"'{impl}' runs on {platform} only, but JAX's "
                                             "platform is 'cpu'; use 'blockwise'"):
            attention.attention(q, kv, kv, implementation=impl)
    spec = attention.AttentionSpec(causal=True)
    assert attention.resolve_implementation("auto", q, kv, spec=spec) == "xla"
    got, want = jax.jit(lambda q, kv: (
        attention.attention(q, kv, kv, spec=spec, implementation="auto"),
        layers.dot_product_attention(q, kv, kv, mask=_np_mask(2, 5, 5, causal=True))))(q, kv)
    _close(got, want)
    with pytest.raises(ValueError, match="attention_impl='flash' is not known"):
        attention.check_implementation("flash", "attention_impl")


def test_auto_and_explicit_kernels_choose_by_platform_and_inputs(caplog):
    bf16 = jnp.zeros((1, 256, 4, 64), jnp.bfloat16)
    f32 = bf16.astype(jnp.float32)
    causal = attention.AttentionSpec(causal=True)
    window = attention.AttentionSpec(causal=True, sliding_window=4)
    relpos = lambda qp, kp: jnp.zeros((1, 4, qp.shape[-1], kp.shape[-1]))

    def pick(impl, q, platform, **kw):
        return attention.resolve_implementation(impl, q, q, platform=platform, **kw)

    assert pick("auto", bf16, "gpu", spec=window) == "cudnn"
    assert pick("auto", f32, "gpu", spec=causal) == "xla"  # cuDNN takes fp16 / bf16
    assert pick("auto", bf16, "gpu", spec=causal, bias_fn=relpos) == "xla"
    assert pick("auto", f32, "tpu", spec=causal) == "pallas_tpu"
    assert pick("auto", f32, "tpu", spec=window) == "xla"  # no sliding window in Pallas
    with caplog.at_level(logging.INFO, logger="models.attention"):
        assert pick("cudnn", bf16, "gpu", spec=causal, bias_fn=relpos) == "blockwise"
        assert pick("pallas_tpu", f32, "tpu", spec=window) == "blockwise"
    assert "a bias_fn (e.g. the T5 relative bias) is computed per tile" in caplog.text
    assert "no sliding window or prefix-LM mask" in caplog.text
    with pytest.raises(ValueError, match="cannot drop attention weights"):
        pick("blockwise", f32, "cpu", dropout=True)
    assert pick("auto", bf16, "gpu", spec=causal, dropout=True) == "xla"


def test_cudnn_argument_mapping_matches_naive_through_jax_xla_path():
    """cudnn_attention's translation (is_causal, local_window_size, mask, bias) run by
    jax.nn.dot_product_attention's own 'xla' path, which takes the same arguments."""
    rng = np.random.RandomState(1)
    t = 9
    q = jnp.asarray(rng.normal(size=(B, t, N, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, t, 2, 8)), jnp.float32) for _ in range(2))
    seg = np.where(np.arange(t) < 4, 1, 2)[None].repeat(B, 0)
    bias = jnp.asarray(rng.normal(size=(1, N, t, t)), jnp.float32)
    cases = [
        (attention.AttentionSpec(causal=True, sliding_window=3), {"causal": True, "window": 3}),
        (attention.AttentionSpec(causal=True, query_segment_ids=seg, key_segment_ids=seg),
         {"causal": True, "q_seg": seg, "k_seg": seg}),
    ]

    @jax.jit
    def run(q, k, v, bias):
        return [(attention.cudnn_attention(q, k, v, bias=bias, spec=spec, scale=0.3,
                                           implementation="xla"),
                 layers.dot_product_attention(q, k, v, mask=_np_mask(B, t, t, **mask_kw),
                                              bias=bias, scale=0.3))
                for spec, mask_kw in cases]

    for (got, want), (_, mask_kw) in zip(run(q, k, v, bias), cases):
        _close(got, want, str(mask_kw))


def test_pallas_tpu_kernel_in_interpret_mode_matches_naive():
    """The Pallas TPU flash kernel, run by Pallas's TPU interpreter on CPU (forward):
    segment ids carry packing and padding, kv heads are repeated, the bias is rescaled."""
    from jax.experimental.pallas import tpu as pltpu

    rng = np.random.RandomState(2)
    t = 128
    q = jnp.asarray(rng.normal(size=(B, t, N, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, t, 2, 8)), jnp.float32) for _ in range(2))
    seg = np.sort(rng.randint(1, 4, (B, t)), axis=1)
    valid = np.arange(t)[None] < np.array([[100], [128]])
    bias = jnp.asarray(rng.normal(size=(1, N, t, t)), jnp.float32)
    spec = attention.AttentionSpec(causal=True, query_segment_ids=seg, key_segment_ids=seg,
                                   key_valid=valid)
    with pltpu.force_tpu_interpret_mode():
        got = attention.pallas_tpu_attention(q, k, v, bias=bias, spec=spec, scale=0.3,
                                             block_q=128, block_k=128)
    mask = _np_mask(B, t, t, causal=True, q_seg=seg, k_seg=seg, k_valid=valid)
    want = layers.dot_product_attention(q, k, v, mask=mask, bias=bias, scale=0.3)
    _close(got, want)


# --- the families ----------------------------------------------------------------------

V = 64
BLOCKS = {"attention_block_q": 4, "attention_block_k": 3}  # divide none of the lengths


def _unit_scale(build, seed):
    """The network `build()` with unit-scale random weights (norm scales in [0.5, 1.5],
    kernels N(0, 1/fan_in), biases N(0, 0.1^2), embedding and relative-bias tables
    N(0, 1)); built abstract, then filled (no eager initialisation)."""
    net = nnx.eval_shape(build)
    rng = np.random.RandomState(seed)
    state = nnx.state(net, nnx.Param)

    def draw(path, x):
        name = path[-1].key
        if name == "scale":
            return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
        std = {"bias": 0.1, "embedding": 1.0, "rel_embedding": 1.0}.get(name, x.shape[0]**-0.5)
        return jnp.asarray(rng.normal(0, std, x.shape), x.dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(
        draw, nnx.to_pure_dict(state)))
    nnx.update(net, state)
    return net


def _with_impl(net, impl, **blocks):
    """The same weights behind a config with attention_impl=impl."""
    cfg = dataclasses.replace(net.config, attention_impl=impl, **blocks)
    other = nnx.eval_shape(lambda: type(net)(cfg, rngs=nnx.Rngs(0)))
    nnx.update(other, nnx.state(net))
    return other


def _check_same_logits_and_grads(net, call, seed):
    """`call(network)` -> logits, under 'xla' and 'blockwise': the logits and the
    gradients of every parameter of a random linear function of them agree."""
    blockwise = _with_impl(net, "blockwise", **BLOCKS)
    graphdefs = nnx.graphdef(net), nnx.graphdef(blockwise)
    params = nnx.state(net, nnx.Param)

    def loss(params, graphdef, weights):
        logits = call(nnx.merge(graphdef, params))
        return jnp.sum(logits * weights), logits

    @jax.jit
    def run(params, weights):
        return [jax.grad(loss, has_aux=True)(params, g, weights) for g in graphdefs]

    shape = jax.eval_shape(lambda p: call(nnx.merge(graphdefs[0], p)), params).shape
    weights = jnp.asarray(np.random.RandomState(seed).normal(size=shape), jnp.float32)
    (want_grads, want), (got_grads, got) = run(params, weights)
    _close(got, want, "logits")
    scale = max(float(np.abs(w).max()) for w in jax.tree.leaves(want_grads))
    for (path, g), (_, w) in zip(jax.tree_util.tree_leaves_with_path(got_grads),
                                 jax.tree_util.tree_leaves_with_path(want_grads)):
        name = jax.tree_util.keystr(path)
        if "['key']['bias']" in name:
            # A key bias shifts a query's logits by one constant, which softmax ignores:
            # its gradient is zero, i.e. rounding noise in both paths.
            assert max(np.abs(g).max(), np.abs(w).max()) < 1e-5 * scale, name
        else:
            _close(g, w, f"d {name}")


@pytest.fixture(scope="module")
def t5():
    cfg = ed.T5Config(vocab_size=V, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=48,
                      num_encoder_layers=1, num_decoder_layers=1,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16)
    return _unit_scale(lambda: ed.EncoderDecoder(cfg, rngs=nnx.Rngs(0)), 0)


def test_t5_blockwise_equals_xla_packed_with_padding(t5):
    """Packed encoder (3 segments, padding, positions per segment: padding queries see
    nothing) and decoder; bidirectional and causal relative biases per tile."""
    enc_seg = np.array([[1] * 6 + [2] * 4 + [0] * 3, [1] * 9 + [2] * 4])
    dec_seg = np.array([[1] * 5 + [2] * 4, [1] * 6 + [2] * 3])
    rng = np.random.RandomState(3)
    enc = np.where(enc_seg > 0, rng.randint(1, V, enc_seg.shape), 0)
    dec = rng.randint(1, V, dec_seg.shape)
    enc_pos = np.array([list(range(6)) + list(range(4)) + [0] * 3,
                        list(range(9)) + list(range(4))])
    dec_pos = np.array([list(range(5)) + list(range(4)), list(range(6)) + list(range(3))])
    _check_same_logits_and_grads(t5, lambda net: net(
        enc, dec, encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg,
        encoder_positions=enc_pos, decoder_positions=dec_pos), seed=4)


def test_t5_cached_decoding_under_blockwise_equals_uncached(t5):
    """Token-by-token decoding with 'blockwise' (relative bias at the cache slots) against
    the uncached forward (by 'xla', which the test above equates with 'blockwise')."""
    net = _with_impl(t5, "blockwise", **BLOCKS)
    rng = np.random.RandomState(5)
    enc = rng.randint(1, V, (2, 13))
    enc[0, 10:] = 0  # padding
    dec = rng.randint(1, V, (2, 7))

    @nnx.jit
    def start(net, reference):
        encoded = net.encode(enc)
        return reference(enc, dec), encoded, net.init_cache(encoded, enc, dec.shape[1])

    @nnx.jit
    def step(net, encoded, token, cache):
        return net.decode(encoded, enc, token, cache=cache)

    uncached, encoded, cache = start(net, t5)
    for t in range(dec.shape[1]):
        logits, cache = step(net, encoded, dec[:, t:t + 1], cache)
        _close(logits[:, 0], uncached[:, t], f"step {t}")


@pytest.fixture(scope="module")
def llama():
    cfg = do.DecoderOnlyConfig(vocab_size=V, emb_dim=32, num_heads=4, num_kv_heads=2,
                               head_dim=8, mlp_dim=48, num_layers=1, max_length=32,
                               sliding_window=5)
    return _unit_scale(lambda: do.DecoderOnly(cfg, rngs=nnx.Rngs(0)), 1)


def test_llama_blockwise_equals_xla_packed(llama):
    """GQA, RoPE, sliding window, packed rows with positions per segment and padding."""
    seg = np.array([[1] * 5 + [2] * 6 + [0] * 2, [1] * 3 + [2] * 3 + [3] * 7])
    pos = np.array([list(range(5)) + list(range(6)) + [0] * 2,
                    list(range(3)) + list(range(3)) + list(range(7))])
    tokens = np.random.RandomState(6).randint(0, V, seg.shape)
    _check_same_logits_and_grads(
        llama, lambda net: net(tokens, positions=pos, segment_ids=seg), seed=7)


def test_llama_cached_decoding_under_blockwise_equals_uncached(llama):
    """A 6-token prefill and single steps with 'blockwise' (sliding window over the cache
    slots) against the uncached forward (by 'xla', equated with 'blockwise' above)."""
    net = _with_impl(llama, "blockwise", **BLOCKS)
    tokens = np.random.RandomState(8).randint(0, V, (2, 10))
    uncached, (logits, cache) = nnx.jit(lambda net, reference: (
        reference(tokens), net.decode(tokens[:, :6], cache=net.init_cache(2, 12))))(net, llama)
    decode = nnx.jit(lambda net, tokens, cache: net.decode(tokens, cache=cache))
    _close(logits, uncached[:, :6], "prefill")
    for t in range(6, 10):
        logits, cache = decode(net, tokens[:, t:t + 1], cache)
        _close(logits[:, 0], uncached[:, t], f"step {t}")


def test_gpt2_blockwise_equals_xla_prefix_lm():
    """MHA, learned positions, biases; prefix LM (bidirectional prefixes) with padding."""
    cfg = do.DecoderOnlyConfig(vocab_size=V, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=48,
                               num_layers=1, max_length=32, mlp_activations=("gelu",),
                               position_embedding="learned", norm="layernorm",
                               use_bias=True, tie_embeddings=True)
    net = _unit_scale(lambda: do.DecoderOnly(cfg, rngs=nnx.Rngs(0)), 2)
    prefix = np.arange(11)[None] < np.array([[4], [7]])
    seg = (np.arange(11)[None] < np.array([[9], [11]])).astype(np.int32)  # 0: padding
    tokens = np.random.RandomState(9).randint(0, V, prefix.shape)
    _check_same_logits_and_grads(
        net, lambda net: net(tokens, prefix_mask=prefix, segment_ids=seg), seed=10)


def test_bert_blockwise_equals_xla_packed_with_padding():
    cfg = eo.EncoderOnlyConfig(vocab_size=V, emb_dim=32, num_heads=4, head_dim=8,
                               mlp_dim=48, num_layers=1, max_length=32, mlm_head=False)
    net = _unit_scale(lambda: eo.EncoderOnly(cfg, rngs=nnx.Rngs(0)), 3)
    seg = np.array([[1] * 6 + [2] * 4 + [0] * 2, [1] * 12])
    pos = np.array([list(range(6)) + list(range(4)) + [0] * 2, list(range(12))])
    tokens = np.where(seg > 0, np.random.RandomState(11).randint(1, V, seg.shape), 0)
    _check_same_logits_and_grads(  # the encoder's output stands in for logits
        net, lambda net: net.encode(tokens, segment_ids=seg, positions=pos), seed=12)


def test_attention_dropout_is_an_error_with_blockwise():
    attn = layers.MultiHeadAttention(16, 2, 8, dropout_rate=0.1, implementation="blockwise",
                                     rngs=nnx.Rngs(0))
    x = jnp.zeros((1, 5, 16))
    jax.eval_shape(lambda x: attn(x, deterministic=True), x)  # inference: fine
    with pytest.raises(ValueError, match="'blockwise' cannot drop attention weights; run "
                                         "with deterministic=True or dropout_rate=0"):
        jax.eval_shape(lambda x: attn(x, deterministic=False, rngs=nnx.Rngs(dropout=0)), x)


def test_config_validates_attention_fields():
    with pytest.raises(ValueError, match=r"attention_impl='flash' is not known; use one of "
                                         r"\('xla', 'blockwise'"):
        ed.t5_1_1("tiny", attention_impl="flash")
    with pytest.raises(ValueError, match="attention_block_k=0 must be a positive integer"):
        do.preset("llama_tiny", attention_block_k=0)
    cfg = eo.preset("bert_tiny", attention_impl="blockwise", attention_block_q=64)
    attn = nnx.eval_shape(lambda: eo.EncoderOnly(cfg, rngs=nnx.Rngs(0))).layers[0].attention
    assert (attn.implementation, attn.block_q, attn.block_k) == ("blockwise", 64, 256)
    assert ed.T5Config(32, 16).vocab_size == 32  # the new fields never shift positions

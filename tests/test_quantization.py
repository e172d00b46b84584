"""Weight quantization: int8 / int4 kernels against numpy references, quantized layers
against float layers run with the dequantized weights, whole networks of every family
(logits, cached greedy decoding, bytes), and sharded serving through a Runtime."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from models import decoder_only, encoder_decoder, encoder_only, layers
from partitioning import mesh as mesh_lib
from t5x_like import infer, model_api
from t5x_like import quantization as quant
from t5x_like.data import vocabularies
from t5x_like.runtime import Runtime

VOCAB = vocabularies.get_vocabulary("byte")
SMALL = dict(vocab_size=384, emb_dim=64, num_heads=4, head_dim=16, mlp_dim=128)
GROUP = 32  # int4 group size of the network tests: divides every contracting size (64, 128)
MODES = ("int8", "int4")
LIMIT = {"int8": 127, "int4": 7}
# float32 rounding of w / scale and q * scale: a few ulps of |w| <= LIMIT * scale.
ROUNDING = 1e-5
# XLA may divide by 7 or 127 as a multiply by the reciprocal: 1 ulp off numpy's division.
SCALE_RTOL = 2**-22


def _kernel(shape, seed=0):
    w = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    w[..., 0] = 0.0  # an all-zero output channel: scale 0, dequantized exactly to 0
    return w


def _filled(make, seed=0):
    """The module `make()` builds, with N(0, 1) parameters drawn in numpy: built abstract
    (no RNG code to compile)."""
    module = nnx.eval_shape(make)
    rng = np.random.default_rng(seed)
    for _, variable in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        value = variable.get_value()
        variable.set_value(jnp.asarray(rng.normal(size=value.shape), value.dtype))
    return module


def _np_dequant(q, scale, n_in, mode):
    """Independent dequantization in numpy: [*in, *out] float32."""
    q = np.asarray(q).astype(np.float32)
    scale = np.asarray(scale)
    if mode == "int8":
        return q * scale
    k = math.prod(q.shape[:n_in])
    g = scale.shape[0]
    return (q.reshape(g, k // g, -1) * scale.reshape(g, 1, -1)).reshape(q.shape)


def _np_scale_per_weight(w, n_in, mode, group_size):
    """numpy reference scales, and each one broadcast to the weight it scales."""
    if mode == "int8":
        scale = np.max(np.abs(w), axis=tuple(range(n_in))) / np.float32(127)
        return scale, np.broadcast_to(scale, w.shape)
    k = math.prod(w.shape[:n_in])
    groups = np.abs(w).reshape(k // group_size, group_size, -1)
    scale = np.max(groups, axis=1) / np.float32(7)  # [G, prod(out)]
    full = np.broadcast_to(scale[:, None], groups.shape).reshape(w.shape)
    return scale.reshape(-1, *w.shape[n_in:]), full


# Small jitted steps: one compile each instead of dozens of eager op compiles.


@functools.partial(jax.jit, static_argnames=("n_in", "mode"))
def _quantize_kernel(w, n_in, mode):
    """(q, scale, dequantize(q, scale)); int4 in groups of 8."""
    if mode == "int8":
        q, scale = quant.quantize_int8(w, n_in)
    else:
        q, scale = quant.quantize_int4(w, n_in, group_size=8)
    return q, scale, quant.dequantize(q, scale, n_in)


@functools.partial(nnx.jit, static_argnames=("mode",))
def _quantized_dense(dense, x, mode):
    """(the QuantizedDenseGeneral of `dense` (int4: groups of 8), its output, dense's)."""
    qdense = quant.QuantizedDenseGeneral(dense, mode=mode, group_size=8)
    return qdense, qdense(x), dense(x)


@nnx.jit
def _apply(module, x):
    return module(x)


@functools.partial(nnx.jit, static_argnames=("mode",))
def _quantized_embed(embed, ids, query, mode):
    """(the QuantizedEmbed of `embed` (int4: groups of 8), its rows of ids, attend(query))."""
    qembed = quant.QuantizedEmbed(embed, mode=mode, group_size=8)
    return qembed, qembed(ids), qembed.attend(query)


# --- kernels -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,n_in", [((32, 4, 8), 1), ((4, 8, 32), 2), ((64, 24), 1)])
def test_round_trip_within_half_a_step(mode, shape, n_in):
    w = _kernel(shape, seed=len(shape) + n_in)
    q, scale, module_deq = _quantize_kernel(w, n_in, mode)
    want_scale, full_scale = _np_scale_per_weight(w, n_in, mode, 8)
    assert q.shape == w.shape and q.dtype == {"int8": jnp.int8, "int4": jnp.int4}[mode]
    np.testing.assert_allclose(scale, want_scale, rtol=SCALE_RTOL, atol=0)
    q_np = np.asarray(q).astype(np.int32)
    assert np.abs(q_np).max() == LIMIT[mode]  # each channel's absmax lands on +-LIMIT
    deq = _np_dequant(q, scale, n_in, mode)
    err = np.abs(w - deq)
    assert np.all(err <= full_scale * (0.5 + ROUNDING))
    assert np.all(deq[..., 0] == 0) and np.all(q_np[..., 0] == 0)
    # The module's own dequantize agrees with the numpy one.
    np.testing.assert_allclose(module_deq, deq, rtol=1e-7, atol=0)


# --- one layer -----------------------------------------------------------------------

# (in_features, out_features, axis, kernel_axes, use_bias, input shape)
DENSE_CASES = {
    "query": (32, (4, 8), -1, ("embed", "heads", "kv"), True, (2, 5, 32)),
    "attention_out": ((4, 8), 32, (-2, -1), ("heads", "kv", "embed"), False, (2, 5, 4, 8)),
    "not_trailing": (32, 24, 1, ("embed", "mlp"), False, (2, 32, 5)),
    "reordered_axes": ((8, 4), (2, 6), (3, 2), ("kv", "heads", None, "mlp"), True,
                       (2, 5, 4, 8)),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(DENSE_CASES))
def test_quantized_dense_equals_dense_with_dequantized_kernel(case, mode):
    in_f, out_f, axis, axes, use_bias, x_shape = DENSE_CASES[case]
    dense = _filled(lambda: layers.DenseGeneral(in_f, out_f, axis=axis, kernel_axes=axes,
                                                use_bias=use_bias, rngs=nnx.Rngs(0)))
    x = jnp.asarray(np.random.default_rng(1).normal(size=x_shape), jnp.float32)
    # float_out: the full-precision layer (before its kernel is swapped below).
    qdense, got, float_out = _quantized_dense(dense, x, mode)

    n_in = len(dense.in_features)
    w = np.asarray(dense.kernel[...])
    deq = _np_dequant(qdense.kernel[...], qdense.scale[...], n_in, mode)
    dense.kernel[...] = jnp.asarray(deq)
    want = _apply(dense, x)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    # Close to the float layer: |x (W - deq)| <= |x| (scale / 2) elementwise (Hoelder).
    _, full_scale = _np_scale_per_weight(w, n_in, mode, 8)
    x_moved = np.moveaxis(np.asarray(x), [a % x.ndim for a in dense.axis],
                          range(x.ndim - n_in, x.ndim))
    k = math.prod(dense.in_features)
    bound = np.abs(x_moved).reshape(-1, k) @ (full_scale.reshape(k, -1) / 2)  # [M, N]
    err = np.abs(np.asarray(got - float_out)).reshape(bound.shape)
    assert np.all(err <= bound * (1 + ROUNDING) + 1e-5)

    # Logical axes survive: the kernel keeps its names, scales take the output ones.
    specs = nnx.get_partition_spec(nnx.state(qdense, nnx.Param))
    assert tuple(specs["kernel"].get_value()) == axes
    want_scale_axes = axes[n_in:] if mode == "int8" else (axes[0], *axes[n_in:])
    assert tuple(specs["scale"].get_value()) == want_scale_axes


def test_activation_dtype_and_input_check():
    dense = _filled(lambda: layers.DenseGeneral(16, 8, kernel_axes=("embed", "mlp"),
                                                dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    for mode in MODES:
        qdense, out, _ = _quantized_dense(dense, jnp.ones((3, 16)), mode)
        assert out.dtype == jnp.bfloat16
        with pytest.raises(ValueError, match=r"input dims \(12,\) at axes \(1,\) of \(3, 12\) "
                                             r"do not match in_features \(16,\)"):
            qdense(jnp.ones((3, 12)))


@pytest.mark.parametrize("mode", MODES)
def test_quantized_embed_lookup_and_attend(mode):
    embed = _filled(lambda: layers.Embed(24, 16, rngs=nnx.Rngs(0)))
    ids = jnp.asarray([[0, 5, 23], [7, 7, 1], [24, 0, 0]])  # 24: out of range
    query = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 16)), jnp.float32)
    qembed, rows, logits = _quantized_embed(embed, ids, query, mode)
    table = np.asarray(embed.embedding[...])  # [V, D]
    q, scale = np.asarray(qembed.embedding[...]), np.asarray(qembed.scale[...])
    # Rows are channels: the [D, V] view is quantized like a kernel.
    scale_dv = scale if mode == "int8" else scale.T
    deq = _np_dequant(q.T, scale_dv, 1, mode).T
    _, full_scale = _np_scale_per_weight(table.T, 1, mode, 8)
    assert np.all(np.abs(table - deq) <= full_scale.T * (0.5 + ROUNDING))
    np.testing.assert_allclose(rows[:2], deq[np.asarray(ids[:2])], rtol=1e-6, atol=1e-7)
    assert np.all(np.isnan(rows[2, 0])) and not np.any(np.isnan(rows[2, 1:]))  # as Embed
    np.testing.assert_allclose(logits, np.asarray(query) @ deq.T, rtol=1e-5, atol=1e-5)


# --- whole networks --------------------------------------------------------------------

FAMILIES = {
    "t5": (model_api.EncoderDecoderModel,
           encoder_decoder.t5_1_1("tiny", num_encoder_layers=1, num_decoder_layers=1, **SMALL)),
    # Llama-style with GQA, RoPE and dropless MoE feed-forward layers (expert stacks).
    "mixtral": (model_api.DecoderOnlyModel,
                decoder_only.preset("mixtral_tiny", num_layers=1, max_length=64, **SMALL)),
    # GPT-2: biases, LayerNorm, learned positions, tied logits (embeddings quantized too).
    "gpt2": (model_api.DecoderOnlyModel,
             decoder_only.preset("gpt2_tiny", num_layers=1, max_length=64, **SMALL)),
    "bert": (model_api.EncoderOnlyModel,
             encoder_only.preset("bert_tiny", num_layers=1, max_length=64, dropout_rate=0.0,
                                 **SMALL)),
}
OPTIONS = {"gpt2": {"include_embeddings": True}}

_rng = np.random.default_rng(0)
ENC = jnp.asarray(_rng.integers(3, 350, (4, 16)), jnp.int32)
TOKENS = jnp.asarray(_rng.integers(3, 350, (4, 12)), jnp.int32)


@nnx.jit(static_argnames="family")
def _forward(nets, tokens, family):
    """Full (uncached) forward logits [B, L, V] of each network of a tuple."""
    return tuple(net(ENC, tokens) if family == "t5" else net(tokens) for net in nets)


def _logits(name, tokens, float_net=None):
    """{'float', 'int8', 'int4': logits} of family `name`, in one compiled program.

    `float_net`: a network with the float one's structure in its place (e.g. its
    weights dequantized), which reuses that program."""
    _, _, net, quantized = _family(name)
    nets = (net if float_net is None else float_net, *(quantized[m] for m in MODES))
    return dict(zip(("float", *MODES), map(np.asarray, _forward(nets, tokens, name))))


def _module_at(net, path):
    for key in path:
        net = net[key] if isinstance(key, int) else getattr(net, key)
    return net


def _quantized_modules(qnet):
    return [(p, m) for p, m in nnx.iter_modules(qnet) if isinstance(m, quant.QUANTIZED_MODULES)]


def _float_weight(module):
    return module.embedding if isinstance(module, layers.Embed) else module.kernel


def _np_dequant_module(m):
    """numpy dequantization of any quantized module, in its float module's layout."""
    q, scale = np.asarray(m.kernel[...] if hasattr(m, "kernel") else m.embedding[...]), m.scale
    scale = np.asarray(scale[...])
    if isinstance(m, quant.QuantizedEmbed):
        return _np_dequant(q.T, scale if m.mode == "int8" else scale.T, 1, m.mode).T
    if isinstance(m, quant.QuantizedStackedKernel):
        return np.stack([_np_dequant(qe, se, 1, m.mode) for qe, se in zip(q, scale)])
    return _np_dequant(q, scale, len(m.in_features), m.mode)


@functools.cache
def _family(name):
    """(name, model, float network, {mode: quantized network}), built once per module.

    The families' own initialisers: variance-preserving (unit gain per layer), the
    premise of the error estimate in `test_network_logits`. (An 'rbg' key: its RNG
    compiles faster than threefry's.) Both modes quantized in one jit."""
    model_cls, cfg = FAMILIES[name]
    model = model_cls(cfg, VOCAB)
    net = model.make_network(nnx.Rngs(jax.random.key(0, impl="rbg")))
    options = dict(group_size=GROUP, **OPTIONS.get(name, {}))
    quantized = nnx.jit(lambda n: {mode: quant.quantize(n, mode, **options)
                                   for mode in MODES})(net)
    return name, model, net, quantized


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return _family(request.param)


def test_original_network_is_untouched(family):
    _, _, net, quantized = family
    for path, _m in _quantized_modules(quantized["int8"]):
        original = _module_at(net, path)
        assert not isinstance(original, quant.QUANTIZED_MODULES)
        assert _float_weight(original)[...].dtype == jnp.float32


@pytest.mark.parametrize("mode", MODES)
def test_network_logits(family, mode):
    """Equal to the float network run with the dequantized weights, and within the
    error the weight rounding predicts of the full-precision logits."""
    name, _, net, quantized = family
    qnet = quantized[mode]
    logits = _logits(name, TOKENS)
    got, full = logits[mode], logits["float"]

    reference = nnx.clone(net)
    rel_weight_errors = []
    for path, m in _quantized_modules(qnet):
        weight = _float_weight(_module_at(reference, path))
        deq = _np_dequant_module(m)
        w = np.asarray(weight[...])
        rel_weight_errors.append(np.linalg.norm(w - deq) / np.linalg.norm(w))
        weight[...] = jnp.asarray(deq)
    want = _logits(name, TOKENS, float_net=reference)["float"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    # To first order, independent rounding errors of relative size eps_i in each
    # quantized weight, each passed on to the logits with unit gain (what the families'
    # variance-preserving initialisers give), add up in quadrature:
    # |logits - full| / |full| ~ sqrt(sum eps_i^2); residual stacks pass on less.
    # Not a bound where noise flips a router's top-k (a jump, not a first-order term):
    # with larger random weights this int8 MoE network measured 2-12x the estimate.
    rel = np.linalg.norm(got - full) / np.linalg.norm(full)
    predicted = np.sqrt(np.sum(np.square(rel_weight_errors)))
    print(f"{name} {mode}: {len(rel_weight_errors)} quantized weights, mean relative "
          f"weight error {np.mean(rel_weight_errors):.4f}; logits relative error "
          f"{rel:.4f} (predicted <= {predicted:.4f}), max abs {np.abs(got - full).max():.4f}"
          f" of max |logit| {np.abs(full).max():.3f}")
    assert rel <= predicted


@pytest.mark.parametrize("mode", MODES)
def test_weight_bytes(family, mode):
    name, _, net, quantized = family
    qnet = quantized[mode]
    counted = quant.weight_bytes(qnet)
    float_total = quant.weight_bytes(net)
    assert float_total["quantized"] == 0 and float_total["by_dtype"].keys() == {"float32"}
    kernel_bytes = scale_bytes = 0
    for path, m in _quantized_modules(qnet):
        w = _float_weight(_module_at(net, path))[...]
        kernel_bytes += w.size * 4
        if isinstance(m, quant.QuantizedEmbed):
            channels, k = w.shape[0], w.shape[1]  # rows are channels, D is contracted
        elif isinstance(m, quant.QuantizedStackedKernel):
            channels, k = w.shape[0] * w.shape[2], w.shape[1]
        else:
            n_in = len(m.in_features)
            channels, k = math.prod(w.shape[n_in:]), math.prod(w.shape[:n_in])
        scale_bytes += 4 * channels * (1 if mode == "int8" else k // GROUP)
    assert counted["quantized"] == kernel_bytes // {"int8": 4, "int4": 8}[mode]
    assert counted["scales"] == scale_bytes
    assert counted["float"] == float_total["total"] - kernel_bytes
    assert counted["total"] == counted["quantized"] + counted["scales"] + counted["float"]
    assert counted["by_dtype"][mode] == counted["quantized"]
    # Abstract networks (nnx.eval_shape, nothing allocated) count the same.
    abstract = nnx.eval_shape(lambda: quant.quantize(
        net, mode, group_size=GROUP, **OPTIONS.get(name, {})))
    assert quant.weight_bytes(abstract) == counted


def _greedy_by_full_forward(name, mode, seq, prompt_len, steps):
    """Reference: re-run the whole `mode` network on the growing sequence [B, L] (its
    first `prompt_len` tokens given, zeros after: unseen under the causal mask), take
    the argmax at the last filled position."""
    seq = np.array(seq)
    out = np.zeros((seq.shape[0], steps), np.int32)
    for i in range(steps):
        pos = prompt_len - 1 + i
        logits = _logits(name, jnp.asarray(seq))[mode]
        out[:, i] = np.argmax(np.asarray(logits[:, pos]), axis=-1)
        if pos + 1 < seq.shape[1]:
            seq[:, pos + 1] = out[:, i]
    return out


# One mode per decoding family (the cache path is the same for both): a jitted
# predict_batch compiles a whole decoding loop.
DECODE_MODE = {"t5": "int4", "mixtral": "int8"}


@functools.cache
def _decoded(name):
    """(batch, predict_batch kwargs, tokens of the cached jitted predict_batch, greedy
    tokens by full forward passes) of the DECODE_MODE-quantized network `name`."""
    _, model, _, quantized = _family(name)
    qnet = quantized[DECODE_MODE[name]]
    b, length = TOKENS.shape
    if name == "t5":
        # The decoder starts from pad (0) and writes `length` tokens.
        batch, kwargs, prompt_len = {"encoder_input_tokens": ENC}, {}, 1
        start = np.zeros((b, length), np.int32)
    else:
        # decoder_input_tokens = [BOS (0), targets...]; the prompt is BOS + 3 targets.
        dec_inputs = np.concatenate([np.zeros((b, 1), np.int32), TOKENS[:, 1:]], axis=1)
        batch, kwargs, prompt_len = {"decoder_input_tokens": dec_inputs}, {"prompt_length": 3}, 4
        start = np.where(np.arange(length) < prompt_len, dec_inputs, 0)
    kwargs["max_decode_length"] = length - prompt_len + 1

    graphdef, params = nnx.split(qnet, nnx.Param)
    tokens = jax.jit(lambda p, batch: model.predict_batch(
        nnx.merge(graphdef, p), batch, **kwargs))(params, batch)
    ref = _greedy_by_full_forward(name, DECODE_MODE[name], start, prompt_len,
                                  kwargs["max_decode_length"])
    return batch, kwargs, np.asarray(tokens), ref


def _assert_same_greedy(tokens, ref):
    for row, ref_row in zip(tokens, ref):
        eos = np.flatnonzero(ref_row == VOCAB.eos_id)
        n = eos[0] + 1 if eos.size else len(ref_row)
        np.testing.assert_array_equal(row[:n], ref_row[:n])
        assert np.all(row[n:] == 0)  # padding after EOS


@pytest.mark.parametrize("name", sorted(DECODE_MODE))
def test_cached_greedy_decoding_equals_uncached(name):
    """`predict_batch` (KV cache) under jax.jit over nnx.split params, against greedy
    decoding by full forward passes of the same quantized network."""
    _, _, tokens, ref = _decoded(name)
    _assert_same_greedy(tokens, ref)


def test_sharded_serving_through_a_runtime():
    """quantize_runtime on a data x fsdp x model mesh: the quantized kernels shard as
    the float ones, and infer.predict decodes what the unsharded network decodes."""
    name = "t5"
    mode = DECODE_MODE[name]
    _, model, net, quantized = _family(name)
    runtime = Runtime.build(model, mesh_config=mesh_lib.MeshConfig(data=2, fsdp=2, model=2),
                            rules="fsdp_tp")
    params = jax.device_put(nnx.to_pure_dict(nnx.state(net, nnx.Param)),
                            runtime.param_shardings)
    qruntime, qparams = quant.quantize_runtime(runtime, params, mode, group_size=GROUP)

    want = nnx.to_pure_dict(nnx.state(quantized[mode], nnx.Param))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 qparams, want)
    flat_float = dict(jax.tree_util.tree_flatten_with_path(runtime.param_shardings)[0])
    flat_quant = dict(jax.tree_util.tree_flatten_with_path(qruntime.param_shardings)[0])
    kernels = [k for k in flat_quant if k[-1].key == "kernel"]
    assert kernels and all(flat_quant[k] == flat_float[k] for k in kernels)
    for path, value in jax.tree_util.tree_flatten_with_path(qparams)[0]:
        assert value.sharding == flat_quant[path]
    # An int4 query scale [G, N, H] = [2, 4, 16] takes ('embed', 'heads', 'kv'): groups
    # over fsdp with their rows, heads over model.
    query_scale = qparams["decoder"]["layers"][0]["self_attention"]["query"]["scale"]
    assert query_scale.shape == (2, 4, 16)
    assert query_scale.sharding.spec == P("fsdp", "model", None)

    batch, kwargs, _, ref = _decoded(name)
    cfg = infer.DecodeConfig(max_decode_length=kwargs["max_decode_length"])
    batch = jax.device_put(batch, runtime.partitioner.batch_sharding(2))
    tokens = infer.predict(qruntime, qparams, batch, cfg)
    _assert_same_greedy(tokens, ref)


# --- what gets quantized, and errors -------------------------------------------------


def _abstract(name):
    model_cls, cfg = FAMILIES[name]
    return nnx.eval_shape(lambda: model_cls(cfg, VOCAB).make_network(nnx.Rngs(0)))


def _quantize_abstract(net, *args, **kwargs):
    """quantize() traced on an abstract network (nothing allocated or computed)."""
    return nnx.eval_shape(lambda n: quant.quantize(n, *args, **kwargs), net)


def _kinds(net):
    return {quant._path_name(p): type(m).__name__ for p, m in nnx.iter_modules(net)
            if isinstance(m, (layers.DenseGeneral, layers.Embed, *quant.QUANTIZED_MODULES))
            or type(m).__name__ == "StackedKernel"}


def test_what_is_quantized_and_exclude():
    net = _abstract("mixtral")
    kinds = _kinds(_quantize_abstract(net, "int8"))
    assert kinds["layers/0/self_attention/out"] == "QuantizedDenseGeneral"
    assert kinds["layers/0/mlp/experts/wo"] == "QuantizedStackedKernel"
    assert kinds["logits_dense"] == "QuantizedDenseGeneral"
    assert kinds["layers/0/mlp/router"] == "DenseGeneral"  # DEFAULT_EXCLUDE
    assert kinds["token_embedder"] == "Embed"
    kinds = _kinds(_quantize_abstract(net, "int4", group_size=GROUP, exclude=("logits", "key"),
                                      include_embeddings=True))
    assert kinds["layers/0/mlp/router"] == "QuantizedDenseGeneral"
    assert kinds["layers/0/self_attention/key"] == "DenseGeneral"
    assert kinds["logits_dense"] == "DenseGeneral"
    assert kinds["layers/0/self_attention/value"] == "QuantizedDenseGeneral"
    assert kinds["token_embedder"] == "QuantizedEmbed"
    # A lone layer is quantized too.
    dense = nnx.eval_shape(lambda: layers.DenseGeneral(64, 8, kernel_axes=("embed", "mlp"),
                                                       rngs=nnx.Rngs(0)))
    assert isinstance(_quantize_abstract(dense), quant.QuantizedDenseGeneral)


def test_errors():
    net = _abstract("mixtral")
    with pytest.raises(ValueError, match=r"quantization mode 'fp8' is not known; use one of "
                                         r"\('int8', 'int4'\)"):
        quant.quantize(net, "fp8")
    with pytest.raises(ValueError, match=r"int4 group_size=0 must be a positive integer"):
        quant.quantize(net, "int4", group_size=0)
    # The first layer met is an expert stack [E, 64, 128] (contracting 64).
    with pytest.raises(ValueError, match=(
            r"int4 group_size=48 does not divide the contracting size 64 of "
            r"layers/0/mlp/experts/wi_0 \(kernel \(64, 128\)\); use a group_size that "
            r"divides 64, e.g. 32, or leave the layer float with "
            r"exclude=\('layers/0/mlp/experts/wi_0',\)")):
        _quantize_abstract(net, "int4", group_size=48)
    with pytest.raises(ValueError, match=r"quantize found no layer to quantize in DecoderOnly "
                                         r"with exclude=\('layers', 'logits'\)"):
        quant.quantize(net, "int8", exclude=("layers", "logits"))

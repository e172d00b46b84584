"""BERT encoder-only network: published sizes, gin presets, packing, padding, heads,
dropout, dtypes, sharding under the rules presets, config validation.

Numerical parity with Hugging Face BERT is in test_encoder_only_hf_parity.py. Networks
run under `nnx.jit`; variants share the test network's weights instead of re-initialising.
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

from models import encoder_only as eo
from partitioning import MeshConfig, Partitioner, make_mesh
from partitioning import rules as rules_lib

REPO = pathlib.Path(__file__).resolve().parent.parent

# Tiny fp32 BERT with both heads. 8 heads and mlp / vocab multiples of 8 so that 'tp' on
# model=8 really splits heads, mlp and vocab.
SMALL_TEST = eo.EncoderOnlyConfig(vocab_size=64, emb_dim=32, num_heads=8, head_dim=4,
                                  mlp_dim=64, num_layers=2, max_length=16, num_classes=3,
                                  dropout_rate=0.0)


def _close(got, want, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=rtol, atol=atol)


def _variables(module):
    return jax.tree.leaves(nnx.state(module), is_leaf=lambda v: isinstance(v, nnx.Variable))


def _count(tree) -> int:
    return sum(math.prod(v.shape) for v in _variables(tree))


def _abstract(cfg: eo.EncoderOnlyConfig) -> eo.EncoderOnly:
    return nnx.eval_shape(lambda: eo.EncoderOnly(cfg, rngs=nnx.Rngs(0)))


@functools.partial(nnx.jit, static_argnames=("deterministic",))
def _run(net, tokens, token_types=None, segments=None, positions=None, deterministic=True,
         rngs=None):
    """(hidden [B, T, D], MLM logits [B, T, V], class logits [B, C])."""
    hidden = net.encode(tokens, token_type_ids=token_types, segment_ids=segments,
                        positions=positions, deterministic=deterministic, rngs=rngs)
    return (hidden, net.mlm_logits(hidden),
            net.classification_logits(hidden, deterministic=deterministic, rngs=rngs))


def _variant(model, **overrides):
    """The test network with other config values and the same weights (no new init)."""
    net = nnx.eval_shape(
        lambda: eo.EncoderOnly(dataclasses.replace(model.config, **overrides),
                               rngs=nnx.Rngs(0)))
    state = nnx.state(net)

    def pick(want, have):  # the model's values for the parameters the variant has
        return {k: pick(v, have[k]) if isinstance(v, dict) else have[k] for k, v in want.items()}

    nnx.replace_by_pure_dict(state, pick(nnx.to_pure_dict(state),
                                         nnx.to_pure_dict(nnx.state(model))))
    nnx.update(net, state)
    return net


@pytest.fixture(scope="module")
def model():
    return eo.EncoderOnly(SMALL_TEST, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def batch():
    """tokens [2, 9] (the second row padded from 6), token types A/B."""
    rng = np.random.RandomState(0)
    tokens = rng.randint(1, 64, (2, 9))
    tokens[1, 6:] = 0
    types = np.zeros((2, 9), np.int32)
    types[0, 5:], types[1, 3:6] = 1, 1
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(types)


@pytest.fixture(scope="module")
def outputs(model, batch):
    return tuple(np.asarray(x) for x in _run(model, *batch))


# --- published sizes --------------------------------------------------------------------

# Hugging Face parameter counts (transformers 5.24, BertConfig at these sizes, counted on
# torch's 'meta' device): BertForMaskedLM (no pooler; decoder tied to the embedding plus
# a vocab bias) and BertModel with its pooler. With V = 30522, P = 512 positions, 2 token
# types, D, F, L layers (N * H = D):
#   embeddings V*D + P*D + 2*D + 2*D (LayerNorm)
#   + L * (4 * (D*D + D) attention + 2*D*F + F + D MLP + 4*D two LayerNorms)
#   + MLM head D*D + D + 2*D + V, or pooler D*D + D.
HF_COUNTS = {  # name: (D, F, L, BertForMaskedLM, BertModel with pooler)
    "bert_base": (768, 3072, 12, 109_514_298, 109_482_240),
    "bert_large": (1024, 4096, 24, 335_174_458, 335_141_888),
    # Google's BERT-Tiny shape (L=2 H=128 A=2) at the full vocabulary.
    "bert_tiny": (128, 512, 2, 4_416_698, 4_385_920),
}


def _bert_count(d, f, num_layers, v=30522, positions=512, types=2):
    body = (v + positions + types) * d + 2 * d
    body += num_layers * (4 * (d * d + d) + 2 * d * f + f + d + 4 * d)
    return body + (d * d + 3 * d + v), body + (d * d + d)


@pytest.mark.parametrize("name", list(HF_COUNTS))
def test_presets_have_hugging_face_parameter_counts(name):
    d, f, num_layers, mlm, with_pooler = HF_COUNTS[name]
    assert _bert_count(d, f, num_layers) == (mlm, with_pooler)
    cfg = eo.preset(name, vocab_size=30522)
    assert (cfg.emb_dim, cfg.mlp_dim, cfg.num_layers, cfg.attention_dim) == (d, f, num_layers, d)
    # One abstract network with both heads (nothing allocated); each HF model is a part.
    both = _abstract(dataclasses.replace(cfg, num_classes=2))
    total, mlm_head = _count(both), _count(both.mlm)
    classifier = _count(both.classifier_head.classifier)
    assert classifier == d * 2 + 2
    assert total - _count(both.classifier_head) == mlm  # the preset's default heads
    assert total - mlm_head - classifier == with_pooler


def test_tiny_preset_count_at_the_shipped_vocabulary():
    assert eo.PRESETS["bert_tiny"].vocab_size == 8192
    assert _count(_abstract(eo.PRESETS["bert_tiny"])) == 129 * 8192 + 479_360 == 1_536_128


def test_preset_overrides_and_unknown_name():
    cfg = eo.preset("bert_base", vocab_size=100, num_classes=2)
    assert (cfg.emb_dim, cfg.vocab_size, cfg.num_classes) == (768, 100, 2)
    with pytest.raises(ValueError, match=r"unknown BERT preset 'bert_huge'; use one of"):
        eo.preset("bert_huge")


@pytest.mark.parametrize("name", list(eo.PRESETS))
def test_gin_presets_equal_python_presets(name, clean_gin):
    gin = pytest.importorskip("gin")
    path = str(REPO / "gin" / "models" / f"{name}.gin")
    gin.parse_config_files_and_bindings([path], None, finalize_config=False)
    assert gin.query_parameter("%NETWORK_CONFIG").scoped_configurable_fn() == eo.PRESETS[name]
    gin.clear_config()
    gin.parse_config_files_and_bindings(
        [path], ["NUM_EMBEDDINGS = 100", "NUM_CLASSES = 2", "MLM_HEAD = False"],
        finalize_config=False)
    cfg = gin.query_parameter("%NETWORK_CONFIG").scoped_configurable_fn()
    assert cfg == eo.preset(name, vocab_size=100, num_classes=2, mlm_head=False)


# --- state, heads, shapes ---------------------------------------------------------------


def test_state_is_only_params_with_logical_axes(model):
    variables = _variables(model)
    assert variables and all(type(v) is nnx.Param for v in variables)
    for v in variables:
        names = v.get_metadata()["out_sharding"]
        assert len(names) == v[...].ndim, names
        assert set(names) <= set(rules_lib.LOGICAL_AXES) | {None}, names
        named = [n for n in names if n is not None]
        assert len(named) == len(set(named)), f"a logical name repeats in {names}"


def test_outputs_shapes_and_dtypes(outputs):
    hidden, mlm, classes = outputs
    assert hidden.shape == (2, 9, 32) and hidden.dtype == np.float32
    assert mlm.shape == (2, 9, 64) and mlm.dtype == np.float32
    assert classes.shape == (2, 3) and classes.dtype == np.float32


def test_call_gives_mlm_logits(model, batch, outputs):
    tokens, types = batch
    _close(nnx.jit(lambda n, t, y: n(t, token_type_ids=y))(model, tokens, types), outputs[1])


def test_missing_heads_raise(model, batch):
    tokens, _ = batch
    encoder = _variant(model, mlm_head=False, num_classes=0)
    assert encoder.mlm is None and encoder.classifier_head is None
    hidden = jnp.zeros((2, 9, 32))
    with pytest.raises(ValueError, match=r"no MLM head \(mlm_head=False\); build it with"):
        encoder(tokens)
    with pytest.raises(ValueError, match=r"no MLM head"):
        encoder.mlm_logits(hidden)
    with pytest.raises(ValueError, match=r"no classifier \(num_classes=0\); build it with"):
        encoder.classification_logits(hidden)


def test_token_types_and_input_errors(model, batch):
    tokens, types = batch
    no_types = _variant(model, type_vocab_size=0)
    assert no_types.embeddings.token_type_embedder is None
    with pytest.raises(ValueError, match=r"token_type_ids given but type_vocab_size=0"):
        no_types.encode(tokens, token_type_ids=types)
    with pytest.raises(ValueError, match=r"sequence length 17 exceeds max_length=16"):
        model.encode(jnp.ones((1, 17), jnp.int32))
    with pytest.raises(ValueError, match=r"tokens must be \[batch, length\]"):
        model.encode(jnp.ones((17,), jnp.int32))


def test_default_token_types_are_type_zero(model, batch, outputs):
    tokens, _ = batch
    default = _run(model, tokens)
    explicit = _run(model, tokens, jnp.zeros_like(tokens))
    for a, b in zip(default, explicit):
        _close(a, b)
    assert not np.allclose(np.asarray(default[0]), outputs[0])  # types matter


# --- padding and packing ----------------------------------------------------------------


def test_extra_padding_does_not_change_real_positions(model, batch, outputs):
    tokens, types = batch
    padded = jnp.pad(tokens, ((0, 0), (0, 5)))  # [2, 14]: 5 more padding keys per row
    hidden, mlm, classes = _run(model, padded, jnp.pad(types, ((0, 0), (0, 5))))
    _close(np.asarray(hidden)[0, :9], outputs[0][0])
    _close(np.asarray(hidden)[1, :6], outputs[0][1, :6])  # row 1's real tokens
    _close(np.asarray(mlm)[1, :6], outputs[1][1, :6])
    _close(classes, outputs[2])
    # Row 1 truncated to its real tokens, alone.
    alone = _run(model, tokens[1:, :6], types[1:, :6])
    _close(np.asarray(alone[0])[0], outputs[0][1, :6])


def test_packed_row_equals_each_example_alone(model):
    rng = np.random.RandomState(1)
    a, b = rng.randint(1, 64, 5), rng.randint(1, 64, 4)
    types_a, types_b = np.r_[0, 0, 1, 1, 1], np.r_[0, 1, 1, 1]
    length = 12
    tokens = np.zeros((1, length), np.int32)
    types, segments, positions = (np.zeros((1, length), np.int32) for _ in range(3))
    tokens[0, :9] = np.r_[a, b]
    types[0, :9] = np.r_[types_a, types_b]
    segments[0, :5], segments[0, 5:9] = 1, 2
    positions[0, :5], positions[0, 5:9] = np.arange(5), np.arange(4)
    packed, packed_mlm, _ = _run(model, *(jnp.asarray(x) for x in
                                          (tokens, types, segments, positions)))
    # Each example alone in one unpacked batch (trailing padding only).
    alone = np.zeros((2, length), np.int32)
    alone_types = np.zeros((2, length), np.int32)
    alone[0, :5], alone[1, :4] = a, b
    alone_types[0, :5], alone_types[1, :4] = types_a, types_b
    hidden, mlm, _ = _run(model, jnp.asarray(alone), jnp.asarray(alone_types))
    _close(np.asarray(packed)[0, :5], np.asarray(hidden)[0, :5])
    _close(np.asarray(packed)[0, 5:9], np.asarray(hidden)[1, :4])
    _close(np.asarray(packed_mlm)[0, 5:9], np.asarray(mlm)[1, :4])


# --- dropout, dtypes --------------------------------------------------------------------


def test_dropout_only_when_not_deterministic_and_reproducible(model, batch, outputs):
    net = _variant(model, dropout_rate=0.3)
    for got, want in zip(_run(net, *batch), outputs):
        _close(got, want, rtol=1e-6, atol=1e-6)

    def train(seed):
        return [np.asarray(x) for x in
                _run(net, *batch, deterministic=False, rngs=nnx.Rngs(dropout=seed))]

    a, b, c = train(1), train(1), train(2)
    for x, y, z, ref in zip(a, b, c, outputs):
        np.testing.assert_array_equal(x, y)
        assert not np.allclose(x, z) and not np.allclose(x, ref)
    with pytest.raises(ValueError, match=r"deterministic=False with dropout_rate=0.3 needs rngs"):
        net.encode(batch[0], deterministic=False)


def test_bfloat16_activations_with_float32_params(model, batch):
    net = _variant(model, dtype="bfloat16")
    hidden, mlm, classes = _run(net, *batch)
    assert hidden.dtype == jnp.bfloat16
    assert mlm.dtype == classes.dtype == jnp.float32
    assert all(v[...].dtype == jnp.float32 for v in _variables(net))
    assert bool(jnp.all(jnp.isfinite(mlm))) and bool(jnp.all(jnp.isfinite(classes)))


# --- sharding ---------------------------------------------------------------------------


@pytest.mark.parametrize("rules, mesh", [("fsdp_tp", {"data": 1, "fsdp": 4, "model": 2}),
                                         ("tp", {"data": 1, "model": 8})])
def test_sharded_forward_matches_single_device(model, batch, outputs, rules, mesh):
    partitioner = Partitioner(make_mesh(MeshConfig(**mesh)), rules)
    with partitioner.activate():
        abstract = nnx.eval_shape(lambda: eo.EncoderOnly(SMALL_TEST, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract, nnx.Param)
    shardings = partitioner.param_shardings(abstract_state)
    params = jax.device_put(nnx.to_pure_dict(nnx.state(model, nnx.Param)), shardings)
    # Every weight is split where its dims allow (8 heads, mlp 64, vocab 64 on model).
    kernel = params["layers"][0]["attention"]["query"]["kernel"]
    assert kernel.sharding.spec[1] == "model"
    assert params["classifier_head"]["pooler"]["kernel"].sharding.spec[1] == "model"
    if rules == "fsdp_tp":
        assert tuple(params["mlm"]["dense"]["kernel"].sharding.spec) == ("fsdp", "model")
    tokens, types = (jnp.tile(x, (2, 1)) for x in batch)  # batch 4 over fsdp
    batch_sharding = partitioner.batch_sharding(2)
    tokens, types = (jax.device_put(x, batch_sharding) for x in (tokens, types))

    @jax.jit
    def forward(params, tokens, types):
        state = jax.tree.map(lambda x: x, abstract_state)
        nnx.replace_by_pure_dict(state, params)
        net = nnx.merge(graphdef, state)
        hidden = net.encode(tokens, token_type_ids=types)
        return hidden, net.mlm_logits(hidden), net.classification_logits(hidden)

    with partitioner.activate():
        sharded = forward(params, tokens, types)
    for got, want in zip(sharded, outputs):
        _close(got, np.concatenate([want, want]))


# --- config validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"emb_dim": 0}, r"emb_dim=0 must be a positive integer"),
        ({"max_length": -1}, r"max_length=-1 must be a positive integer"),
        ({"num_layers": 2.0}, r"num_layers=2.0 must be a positive integer"),
        ({"type_vocab_size": -1}, r"type_vocab_size=-1 must be an integer >= 0 \(0 disables"),
        ({"num_classes": -2}, r"num_classes=-2 must be an integer >= 0"),
        ({"mlm_head": "yes"}, r"mlm_head='yes' must be True or False"),
        ({"dropout_rate": 1.0}, r"dropout_rate=1.0 must be in \[0, 1\)"),
        ({"mlp_activations": ("gelu_exact", "swishy")},
         r"has unknown \['swishy'\]; use names from"),
        ({"mlp_activations": ()}, r"mlp_activations is empty; use e.g. \('gelu_exact',\)"),
        ({"layer_norm_epsilon": 0.0}, r"layer_norm_epsilon=0.0 must be > 0"),
        ({"dtype": "int32"}, r"dtype='int32' must be a float dtype"),
        ({"param_dtype": "bf17"}, r"param_dtype='bf17' is not a dtype"),
    ],
)
def test_config_rejects_impossible_settings(overrides, message):
    with pytest.raises(ValueError, match=message):
        eo.EncoderOnlyConfig(**overrides)


def test_config_normalises_gin_values_and_derives_sizes():
    cfg = eo.EncoderOnlyConfig(mlp_activations=["gelu_exact"], dtype=jnp.bfloat16)
    assert cfg.mlp_activations == ("gelu_exact",) and cfg.dtype == "bfloat16"
    assert cfg.activation_dtype == jnp.bfloat16 and cfg.parameter_dtype == jnp.float32
    assert cfg.attention_dim == 12 * 64
    hash(cfg)  # usable as static jit argument / graphdef metadata

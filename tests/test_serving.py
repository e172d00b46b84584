"""Serving engine: continuous batching and prefix caching against independent references.

The reference for a request is that request alone, decoded by repeated full uncached
forward passes `network(tokens)` over the growing sequence (padded on the right to a
fixed length, which causal attention never sees): greedy takes the argmax; sampling takes
`decoding.process_logits` (static top-k) and `jax.random.categorical` with the key the
engine documents, fold_in(key(seed), position). Weights are unit scale (as in
test_decoder_only) so logits are well separated and float rounding cannot flip a token.

Engines share compiled functions (they are keyed by the network structure, slot count
and bucket), so the tests reuse a few shapes: 3 and 2 slots, buckets 16 and 32.
"""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import decoder_only as do
from models import encoder_decoder as ed
from models import moe
from t5x_like import decoding, serving
from t5x_like.serving import Engine, PrefixCache, Request

V = 64
MAX_LENGTH = 48
BUCKETS = (16, 32)
EOS = 1
LLAMA = do.DecoderOnlyConfig(vocab_size=V, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=48,
                             num_layers=2, num_kv_heads=2, max_length=MAX_LENGTH)
GPT2 = dataclasses.replace(LLAMA, num_kv_heads=None, mlp_activations=("gelu",),
                           position_embedding="learned", norm="layernorm",
                           layer_norm_epsilon=1e-5, use_bias=True, tie_embeddings=True)
BLOCK = 8
# One prefix-cache block: layers x (k, v) x BLOCK tokens x kv heads x head dim x fp32.
BLOCK_BYTES = LLAMA.num_layers * 2 * BLOCK * LLAMA.kv_heads * LLAMA.head_dim * 4


T5 = ed.T5Config(vocab_size=V, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=48,
                 num_encoder_layers=2, num_decoder_layers=2, relative_attention_num_buckets=8,
                 relative_attention_max_distance=16)
SWITCH = dataclasses.replace(T5, moe=moe.MoeConfig(
    num_experts=4, num_experts_per_token=1, renormalize=False, dispatch="dropless",
    layer_interval=2))
MAX_INPUT = 24


def _random_net(cfg, seed):
    """Unit-scale random weights: norm scales in [0.5, 1.5], kernels N(0, 1/fan_in),
    biases N(0, 0.1^2), embeddings N(0, 1)."""
    cls = ed.EncoderDecoder if isinstance(cfg, ed.T5Config) else do.DecoderOnly
    net = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.RandomState(seed)
    state = nnx.state(net, nnx.Param)

    def draw(path, x):
        name = path[-1].key
        if name == "scale":
            return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
        std = {"bias": 0.1, "embedding": 1.0}.get(name, x.shape[0] ** -0.5)
        return jnp.asarray(rng.normal(0, std, x.shape), x.dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(
        draw, nnx.to_pure_dict(state)))
    nnx.update(net, state)
    return net


@pytest.fixture(scope="module")
def nets():
    return {"llama": _random_net(LLAMA, seed=1), "gpt2": _random_net(GPT2, seed=2)}


# --- the reference ----------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


@functools.partial(jax.jit, static_argnames="top_k")
def _reference_draw(logits, seed, position, temperature, top_p, top_k):
    """The draw the engine documents: process_logits, key fold_in(key(seed), position)."""
    processed = decoding.process_logits(logits[None], temperature=temperature, top_k=top_k,
                                        top_p=top_p)
    key = jax.random.fold_in(jax.random.key(seed), position)
    return jax.random.categorical(key, processed[0])


def _reference(net, request, eos_id=EOS):
    """(tokens, log-probs, logits [G, V]) of `request` decoded alone without a cache."""
    graphdef, state = nnx.split(net)
    return _reference_loop(lambda padded: _forward(graphdef, state, padded), request,
                           list(request.prompt), eos_id)


def _reference_loop(forward, request, seq, eos_id):
    """Greedy / seeded draws continuing `seq` by full forward passes over it, padded on
    the right to MAX_LENGTH: `forward(padded [1, MAX_LENGTH])` -> logits [1, L, V]."""
    tokens, logprobs, all_logits = [], [], []
    stop = {*request.stop_tokens, eos_id}
    for _ in range(request.max_new_tokens):
        padded = np.zeros((1, MAX_LENGTH), np.int32)
        padded[0, :len(seq)] = seq
        logits = forward(padded)[0, len(seq) - 1]
        if request.temperature == 0:
            token = int(jnp.argmax(logits))
        else:
            token = int(_reference_draw(logits, request.seed, len(seq), request.temperature,
                                        request.top_p, top_k=request.top_k))
        tokens.append(token)
        logprobs.append(float(jax.nn.log_softmax(logits)[token]))
        all_logits.append(np.asarray(logits))
        if token in stop:
            break
        seq.append(token)
    return tokens, logprobs, np.stack(all_logits)


def _engine(net, num_slots, prefix_cache=None):
    return Engine(net, num_slots=num_slots, max_length=MAX_LENGTH, eos_id=EOS,
                  prefill_buckets=BUCKETS, prefix_cache=prefix_cache)


def _prompt(rng, n):
    return [int(t) for t in rng.randint(2, V, n)]  # no EOS inside prompts


# --- greedy and sampling: each request as if alone --------------------------------------


def _greedy_requests(net):
    """Seven requests of prompt lengths 1..16 (one bucket) and 1..12 new tokens;
    request 0 stops on a token its own reference emits at step 2."""
    rng = np.random.RandomState(3)
    lengths, new = [5, 16, 1, 9, 12, 3, 8], [7, 12, 4, 1, 9, 6, 10]
    requests = [Request(prompt=_prompt(rng, n), max_new_tokens=m)
                for n, m in zip(lengths, new)]
    stop = _reference(net, requests[0])[0][2]
    requests[0] = dataclasses.replace(requests[0], stop_tokens=(stop,))
    return requests


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_greedy_equals_uncached_reference_with_slot_reuse(nets, name):
    net = nets[name]
    requests = _greedy_requests(net)
    engine = _engine(net, num_slots=3)
    ids = [engine.submit(r) for r in requests]
    results, history = {}, []
    while engine.num_waiting or engine.num_active:
        results.update((r.id, r) for r in engine.step())
        history.append((engine.num_waiting, engine.num_active))
    assert history[0][0] == 4 and max(a for _, a in history) == 3  # 3 admitted at once
    # A freed slot was refilled while other requests were mid-decode.
    assert any(w1 < w0 and a0 > 0 for (w0, a0), (w1, _) in itertools.pairwise(history))
    for i, request in zip(ids, requests):
        want_tokens, want_logprobs, _ = _reference(net, request)
        got = results[i]
        assert got.tokens == want_tokens, (i, got.tokens, want_tokens)
        np.testing.assert_allclose(got.logprobs, want_logprobs, rtol=1e-5, atol=1e-5)
        reason = "stop" if want_tokens[-1] in {*request.stop_tokens, EOS} else "length"
        assert got.finish_reason == reason and got.prompt_length == len(request.prompt)
        assert 0 <= got.queue_time_s <= got.time_to_first_token_s <= got.total_time_s
    assert results[ids[0]].finish_reason == "stop" and len(results[ids[0]].tokens) <= 3
    if name == "llama":  # Another order and slot count: the same outputs.
        again = _engine(net, num_slots=2).generate(requests[::-1])[::-1]
        for got, want in zip(again, (results[i] for i in ids)):
            assert got.tokens == want.tokens
            np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-5)


def test_sampling_depends_only_on_the_request(nets):
    """Seeded samples equal the reference draw, whatever the batch, slot and order."""
    net = nets["llama"]
    rng = np.random.RandomState(4)
    settings = [(1.0, 0, 1.0, 11), (0.7, 5, 1.0, 12), (1.5, 0, 0.8, 13), (1.2, 5, 0.9, 14),
                (1.5, 0, 1.0, 15)]
    sampled = [Request(prompt=_prompt(rng, 6 + 2 * i), max_new_tokens=8, temperature=t,
                       top_k=k, top_p=p, seed=s) for i, (t, k, p, s) in enumerate(settings)]
    other_seed = dataclasses.replace(sampled[4], seed=16)
    fillers = [Request(prompt=_prompt(rng, n), max_new_tokens=m) for n, m in [(3, 2), (10, 5)]]
    first = _engine(net, num_slots=3).generate([*sampled, other_seed])
    second = _engine(net, num_slots=2).generate(
        [fillers[0], *sampled[::-1], fillers[1], other_seed])[1:6][::-1]
    for request, a, b in zip(sampled, first, second):
        want_tokens, want_logprobs, _ = _reference(net, request)
        assert a.tokens == want_tokens == b.tokens, (request, a.tokens, b.tokens, want_tokens)
        np.testing.assert_allclose(a.logprobs, want_logprobs, rtol=1e-5, atol=1e-5)
    assert first[-1].tokens == _reference(net, other_seed)[0]
    assert first[-1].tokens != first[4].tokens  # the seed matters


# --- encoder-decoder --------------------------------------------------------------------


@pytest.fixture(scope="module")
def seq2seq_nets():
    return {"t5": _random_net(T5, seed=6), "switch": _random_net(SWITCH, seed=7)}


@functools.partial(jax.jit, static_argnums=0)
def _forward_seq2seq(graphdef, state, inputs, targets):
    return nnx.merge(graphdef, state)(inputs, targets)


def _reference_seq2seq(net, request, eos_id=EOS):
    """(tokens, log-probs, logits) of `request` decoded alone by full uncached forward
    passes: encoder input padded to MAX_INPUT (masked), decoder tokens 0 (start) and
    the tokens generated so far."""
    graphdef, state = nnx.split(net)
    inputs = np.zeros((1, MAX_INPUT), np.int32)
    inputs[0, :len(request.prompt)] = request.prompt
    return _reference_loop(lambda padded: _forward_seq2seq(graphdef, state, inputs, padded),
                           request, [0], eos_id)


def _seq2seq_engine(net, num_slots):
    return Engine(net, num_slots=num_slots, max_length=MAX_LENGTH, eos_id=EOS,
                  prefill_buckets=(8, 16), max_input_length=MAX_INPUT)


@pytest.mark.parametrize("name", ["t5", "switch"])
def test_encoder_decoder_requests_equal_uncached_reference(seq2seq_nets, name):
    """Encoder inputs of three buckets (8, 16, 24) and greedy / sampled requests through
    2 slots: each equals its reference alone; another slot count and order agree."""
    net = seq2seq_nets[name]
    rng = np.random.RandomState(8)
    shapes = [(5, 7, 0.0), (16, 12, 0.0), (1, 4, 1.0), (24, 9, 0.8), (11, 1, 0.0),
              (20, 10, 1.2)]
    requests = [Request(prompt=_prompt(rng, n), max_new_tokens=m, temperature=t, top_k=5 * (i % 2),
                        seed=20 + i) for i, (n, m, t) in enumerate(shapes)]
    stop = _reference_seq2seq(net, requests[1])[0][3]
    requests[1] = dataclasses.replace(requests[1], stop_tokens=(stop,))
    engine = _seq2seq_engine(net, num_slots=2)
    results = engine.generate(requests)
    assert engine.num_active == engine.num_waiting == 0
    for request, got in zip(requests, results):
        want_tokens, want_logprobs, _ = _reference_seq2seq(net, request)
        assert got.tokens == want_tokens, (request, got.tokens, want_tokens)
        np.testing.assert_allclose(got.logprobs, want_logprobs, rtol=1e-5, atol=1e-5)
        assert got.prompt_length == len(request.prompt)
    assert results[1].finish_reason == "stop" and len(results[1].tokens) <= 4
    again = _seq2seq_engine(net, num_slots=3).generate(requests[::-1])[::-1]
    assert [r.tokens for r in again] == [r.tokens for r in results]


def test_inactive_rows_take_no_expert_capacity_from_active_ones():
    """The engine's decode step under capacity routing: 4 rows in one capacity group and
    one slot per expert and group. Inactive rows 0-1 come first in token priority; masked,
    they route nowhere, so the active rows 2-3 are the same whatever the inactive rows
    hold. Unmasked, copies of the active rows would take their experts' slots first."""
    cfg = dataclasses.replace(T5, moe=moe.MoeConfig(
        num_experts=4, num_experts_per_token=1, renormalize=False, dispatch="capacity",
        eval_capacity_factor=1.0, min_capacity=1, group_size=4))
    net = _random_net(cfg, seed=9)
    graphdef, state = nnx.split(net)
    rng = np.random.RandomState(3)
    real = rng.randint(2, V, (2, 12))
    active = jnp.array([False, False, True, True])
    feeds = [np.zeros(4, np.int32), rng.randint(2, V, 4), rng.randint(2, V, 4)]

    def run(inactive_inputs, inactive_tokens, mask):
        enc = jnp.asarray(np.concatenate([inactive_inputs, real]))
        cache = net.init_cache(net.encode(enc), enc, MAX_LENGTH)
        out = []
        for feed in feeds:
            tokens = jnp.asarray(np.concatenate([inactive_tokens(feed), feed[2:]]))
            if mask:  # the engine's own step
                cache, logits = serving._decode(graphdef, state, cache, tokens, active)
            else:
                logits, cache = net.decode(None, None, tokens[:, None], cache=cache)
                logits = logits[:, 0]
            out.append(np.asarray(logits[2:]))
        return np.stack(out)

    copies = run(real, lambda feed: feed[2:], mask=True)
    others = run(rng.randint(2, V, (2, 12)), lambda feed: rng.randint(2, V, 2), mask=True)
    np.testing.assert_array_equal(copies, others)
    # The check can fail: unmasked copies take the active rows' expert slots.
    assert not np.allclose(run(real, lambda feed: feed[2:], mask=False), copies, atol=1e-3)


def test_encoder_decoder_engine_clear_errors(seq2seq_nets):
    net = seq2seq_nets["t5"]
    with pytest.raises(ValueError, match="needs the longest encoder input"):
        Engine(net, num_slots=1, max_length=MAX_LENGTH, eos_id=EOS)
    with pytest.raises(ValueError, match="prefix_cache applies to decoder-only prompts"):
        Engine(net, num_slots=1, max_length=MAX_LENGTH, eos_id=EOS, max_input_length=8,
               prefix_cache=PrefixCache(block_size=BLOCK))
    with pytest.raises(ValueError, match=r"prefill_buckets \[16\] .* max_input_length=8"):
        Engine(net, num_slots=1, max_length=MAX_LENGTH, eos_id=EOS, max_input_length=8,
               prefill_buckets=(4, 16))
    engine = _seq2seq_engine(net, num_slots=1)
    with pytest.raises(ValueError, match="encoder input of 30 tokens exceeds the engine's "
                                         "max_input_length=24"):
        engine.submit(Request(prompt=[2] * 30, max_new_tokens=1))
    with pytest.raises(ValueError, match=r"max_new_tokens=48 \+ the decoder start token "
                                         r"exceeds the engine's max_length=48"):
        engine.submit(Request(prompt=[2], max_new_tokens=48))
    with pytest.raises(ValueError, match="token id 0, which the encoder masks as padding"):
        engine.submit(Request(prompt=[2, 0, 3], max_new_tokens=1))
    with pytest.raises(ValueError, match="max_input_length=8 is for encoder-decoder"):
        Engine(_random_net(LLAMA, 1), num_slots=1, max_length=MAX_LENGTH, eos_id=EOS,
               max_input_length=8)


# --- prefix caching ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_prefix():
    """A 24-token (3-block) system prompt and requests that start with it."""
    rng = np.random.RandomState(5)
    system = _prompt(rng, 24)
    prompts = [system + _prompt(rng, 1), system + _prompt(rng, 5), system + _prompt(rng, 8),
               system, _prompt(rng, 10)]
    requests = [Request(prompt=p, max_new_tokens=6, return_logits=True) for p in prompts]
    return system, requests


def test_prefix_cache_cold_warm_and_disabled_agree(nets, shared_prefix):
    net = nets["llama"]
    system, requests = shared_prefix
    disabled = _engine(net, num_slots=2).generate(requests)
    cache = PrefixCache(block_size=BLOCK, max_bytes=1 << 20)
    engine = _engine(net, num_slots=2, prefix_cache=cache)
    cold = engine.generate(requests)
    # The system prompt is computed once: the first request inserts its blocks before
    # the second is admitted. A prompt that is all cached recomputes its last block.
    assert [r.cached_tokens for r in cold] == [0, 24, 24, 16, 0]
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.hit_tokens) == (3, 2, 64)
    # Blocks: 3 of the system prompt, the 4th of the 32-token prompt, 1 of the other.
    assert stats.inserted_blocks == stats.num_blocks == 5 and stats.evictions == 0
    assert stats.bytes == 5 * BLOCK_BYTES
    warm = engine.generate(requests)
    assert [r.cached_tokens for r in warm] == [24, 24, 24, 16, 8]
    assert cache.stats.hit_tokens == 64 + 96 and cache.stats.inserted_blocks == 5
    for request, off, c, w in zip(requests, disabled, cold, warm):
        assert off.tokens == c.tokens == w.tokens == _reference(net, request)[0]
        for got in (c, w):
            np.testing.assert_allclose(got.logits, off.logits, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got.logprobs, off.logprobs, rtol=1e-5, atol=1e-5)
    # 24 cached + 20 new tokens would need a 32-token prefill at index 24, past the
    # cache's 48 slots: the engine reuses 16 tokens and prefills 28 instead.
    long = Request(prompt=system + _prompt(np.random.RandomState(6), 20), max_new_tokens=3)
    (result,) = engine.generate([long])
    assert result.cached_tokens == 16 and result.tokens == _reference(net, long)[0]


def test_prefix_cache_lru_eviction_never_breaks_outputs(nets):
    """A budget of 3 blocks and prompts of 2 blocks each: least recently used blocks go
    first, and a chain loses its deepest blocks first (what stays is always a prefix)."""
    net = nets["llama"]
    rng = np.random.RandomState(7)
    a, b, c = (Request(prompt=_prompt(rng, 17), max_new_tokens=4) for _ in range(3))
    want = {r.prompt: res.tokens
            for r, res in zip((a, b, c), _engine(net, num_slots=2).generate([a, b, c]))}
    cache = PrefixCache(block_size=BLOCK, max_bytes=3 * BLOCK_BYTES)
    engine = _engine(net, num_slots=2, prefix_cache=cache)

    def run(request):
        (result,) = engine.generate([request])
        assert result.tokens == want[request.prompt]
        return result.cached_tokens, cache.stats.evictions

    assert run(a) == (0, 0)
    assert run(b) == (0, 1)  # a's second block goes, its first block stays
    assert run(a) == (8, 2)  # reuses a's first block; b's second block goes
    assert run(a) == (16, 2)
    assert run(c) == (0, 4)  # b's first block (least recent), then a's second
    assert run(b) == (0, 6)
    stats = cache.stats
    assert stats.num_blocks == 3 and stats.bytes == 3 * BLOCK_BYTES
    assert (stats.hits, stats.misses, stats.hit_tokens) == (2, 4, 24)


# --- errors -----------------------------------------------------------------------------


def test_clear_errors(nets):
    net = nets["llama"]
    with pytest.raises(ValueError, match="num_slots=0 must be an int >= 1"):
        Engine(net, num_slots=0, max_length=MAX_LENGTH, eos_id=EOS)
    with pytest.raises(ValueError, match=r"max_length=64 must be an int in \[2, 48\]"):
        Engine(net, num_slots=1, max_length=64, eos_id=EOS)
    with pytest.raises(ValueError, match=r"prefill_buckets \[40\] .* max_length=32"):
        Engine(net, num_slots=1, max_length=32, eos_id=EOS, prefill_buckets=(8, 40))
    with pytest.raises(ValueError, match="cannot hold one block of 8 tokens"):
        _engine(net, 1, PrefixCache(block_size=BLOCK, max_bytes=BLOCK_BYTES - 1))
    with pytest.raises(TypeError, match=r"decoder-only .* and encoder-decoder"):
        Engine(object(), num_slots=1, max_length=MAX_LENGTH, eos_id=EOS)
    with pytest.raises(ValueError, match="prompt is empty"):
        Request(prompt=[], max_new_tokens=1)
    with pytest.raises(ValueError, match=r"temperature=-1.0 must be >= 0"):
        Request(prompt=[2], max_new_tokens=1, temperature=-1.0)
    with pytest.raises(ValueError, match=r"top_p=1.5 must be in \[0, 1\]"):
        Request(prompt=[2], max_new_tokens=1, top_p=1.5)
    engine = _engine(net, num_slots=1)
    with pytest.raises(ValueError, match=(
            r"prompt of 40 tokens \+ max_new_tokens=10 = 50 exceeds the engine's "
            r"max_length=48; shorten the prompt, lower max_new_tokens or build the Engine "
            r"with max_length >= 50")):
        engine.submit(Request(prompt=[2] * 40, max_new_tokens=10))
    with pytest.raises(ValueError, match=r"ids \[64\] are outside the vocabulary \[0, 64\)"):
        engine.submit(Request(prompt=[2, 64], max_new_tokens=1))
    assert engine.num_waiting == 0

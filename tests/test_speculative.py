"""Speculative decoding against independent references.

- Greedy: the output equals `decoding.greedy` on the target alone (synthetic second-order
  Markov chains whose drafter often disagrees; tiny real DecoderOnly and EncoderDecoder
  networks with a smaller drafter), and the statistics equal a numpy simulation.
- Sampling: the accept / resample rule gives exactly the target's distribution (exact
  enumeration of the drafts, uniforms integrated on a grid), and with context-free models
  the measured α and tokens per target call match Σ min(p, q) and
  (1 - α^(G+1)) / (1 - α) within their standard errors.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, struct

from models import decoder_only as do
from models import encoder_decoder as ed
from t5x_like import decoding, speculative

V = 12
EOS = 1
GAMMA = 3


# --- a synthetic cache and step functions ------------------------------------------------


@struct.dataclass
class BufferCache:
    """The tokens fed so far [B, L], the per-row `index` [B], and whether any call wrote
    past the end (so tests can check the room rule is enough)."""

    buffer: jax.Array
    index: jax.Array
    overflow: jax.Array

    @property
    def max_length(self) -> int:
        return self.buffer.shape[1]

    def rewind(self, index):
        return self.replace(index=jnp.broadcast_to(jnp.asarray(index, jnp.int32),
                                                   self.index.shape))


def buffer_cache(history: np.ndarray, index: np.ndarray, max_length: int) -> BufferCache:
    buffer = np.zeros((len(index), max_length), np.int32)
    buffer[:, :history.shape[1]] = history
    return BufferCache(jnp.asarray(buffer), jnp.asarray(index, jnp.int32), jnp.asarray(False))


def markov_fn(table: np.ndarray, prev_table: np.ndarray):
    """Second-order chain: the logits after token x preceded by w are table[x] +
    prev_table[w] (w = 0 before the first slot). The previous token of the first one fed
    is read back from the buffer, so a wrong rewind changes the logits."""
    table, prev_table = jnp.asarray(table), jnp.asarray(prev_table)

    def step_fn(tokens, cache):
        b, t = tokens.shape
        rows = jnp.arange(b)[:, None]
        before = cache.buffer[jnp.arange(b), jnp.maximum(cache.index - 1, 0)]
        before = jnp.where(cache.index > 0, before, 0)
        prev = jnp.concatenate([before[:, None], tokens[:, :-1]], axis=1)  # [B, T]
        logits = table[tokens] + prev_table[prev]  # [B, T, V]
        slots = cache.index[:, None] + jnp.arange(t)
        return logits, BufferCache(
            buffer=cache.buffer.at[rows, slots].set(tokens, mode="drop"),
            index=cache.index + t,
            overflow=cache.overflow | jnp.any(slots >= cache.max_length))

    return step_fn


def single_step(multi_fn):
    """A `decoding.sample` step function from a multi-token one."""
    return lambda tokens, cache: (lambda out: (out[0][:, -1], out[1]))(multi_fn(tokens, cache))


def _tables():
    rng = np.random.default_rng(17)
    target = rng.normal(size=(V, V)) * 2.0
    target_prev = rng.normal(size=(V, V))
    target[:, EOS] = -10.0
    target[9, EOS] = 10.0  # chains through token 9 end; the others run to max_decode_steps
    # The drafter is the target plus noise: it agrees often, but far from always.
    draft = target + rng.normal(size=(V, V))
    draft_prev = target_prev + rng.normal(size=(V, V))
    return [np.float32(x) for x in (target, target_prev, draft, draft_prev)]


T_TABLE, T_PREV, D_TABLE, D_PREV = _tables()
TARGET_FN = markov_fn(T_TABLE, T_PREV)
DRAFT_FN = markov_fn(D_TABLE, D_PREV)


def np_speculative_greedy(first, before, steps, gamma):
    """Per-row numpy simulation of greedy speculative decoding: (tokens, rounds, accepted,
    rejected, paths) where paths names what happened: "full" (a round accepted all gamma
    drafts), "eos_cut" / "steps_cut" (an accepted draft was EOS / the last step, so the
    round's later tokens were dropped)."""

    def argmax(table, prev_table, x, w):
        return int(np.argmax(table[x] + prev_table[w]))

    out, rounds, accepted, rejected, paths = [], 0, 0, 0, set()
    seq = [before, first]
    while True:
        drafts, w, x = [], seq[-2], seq[-1]
        for _ in range(gamma):
            d = argmax(D_TABLE, D_PREV, x, w)
            drafts.append(d)
            w, x = x, d
        fed = [seq[-1], *drafts]
        prevs = [seq[-2], *fed[:-1]]
        choice = [argmax(T_TABLE, T_PREV, fed[i], prevs[i]) for i in range(gamma + 1)]
        n = 0
        while n < gamma and drafts[n] == choice[n]:
            n += 1
        rounds, accepted, rejected = rounds + 1, accepted + n, rejected + (n < gamma)
        if n == gamma:
            paths.add("full")
        emitted = [*drafts[:n], choice[n]]
        for i, tok in enumerate(emitted):
            out.append(tok)
            if tok == EOS or len(out) == steps:
                if i < n:
                    paths.add("eos_cut" if tok == EOS else "steps_cut")
                return out, rounds, accepted, rejected, paths
        seq += emitted


# Rows hold different numbers of prompt tokens (index 0: nothing before the first token).
FIRST = np.array([3, 0, 5, 7, 2, 9], np.int32)
HISTORY = np.random.default_rng(1).integers(0, V, size=(6, 4)).astype(np.int32)
START = np.array([0, 1, 4, 2, 3, 4], np.int32)
STEPS = 14


@functools.partial(jax.jit, static_argnames=("greedy",))
def _run_synthetic(target_cache, draft_cache, first, temperature, greedy):
    return speculative.speculative_decode(
        TARGET_FN, target_cache, DRAFT_FN, draft_cache, first, gamma=GAMMA,
        max_decode_steps=STEPS, rng=jax.random.key(0),
        temperature=0.0 if greedy else temperature)


@functools.cache
def _markov_reference(length: int) -> decoding.DecodeOutput:
    return decoding.greedy(single_step(TARGET_FN), jnp.asarray(FIRST),
                           buffer_cache(HISTORY, START, length), max_decode_steps=STEPS,
                           eos_id=EOS)


@pytest.mark.parametrize("greedy", [True, False], ids=["static_zero", "per_row_zero"])
def test_greedy_markov_equals_target_greedy(greedy):
    # The tightest allowed cache: the row holding the most tokens has exactly
    # max_decode_steps + gamma + 1 free slots (any write past the end is flagged).
    length = int(START.max()) + STEPS + GAMMA + 1
    cache = buffer_cache(HISTORY, START, length)
    first = jnp.asarray(FIRST)
    want = _markov_reference(length)
    # A traced temperature of 0 per row goes through the sampling rule with point masses.
    got = _run_synthetic(cache, cache, first, jnp.zeros((6,)), greedy=greedy)

    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    before = np.where(START > 0, HISTORY[np.arange(6), np.maximum(START - 1, 0)], 0)
    sims = [np_speculative_greedy(int(f), int(w), STEPS, GAMMA) for f, w in zip(FIRST, before)]
    for b, (tokens, rounds, accepted, rejected, _) in enumerate(sims):
        np.testing.assert_array_equal(got.tokens[b, :len(tokens)], tokens)
        assert (int(got.row_calls[b]), int(got.accepted[b]), int(got.rejected[b])) == (
            rounds, accepted, rejected), b
    # The chains cover every path: EOS and max_decode_steps endings, rejections and
    # rounds that accepted every draft (the drafter then re-reads its last draft).
    assert STEPS in got.lengths.tolist() and (got.lengths < STEPS).sum() >= 2, got.lengths
    assert set().union(*(s[4] for s in sims)) == {"full", "eos_cut", "steps_cut"}
    assert sum(s[3] for s in sims) >= 6
    assert int(got.target_calls) == max(s[1] for s in sims)
    assert int(got.draft_calls) == GAMMA * int(got.target_calls)
    np.testing.assert_array_equal(got.proposed, GAMMA * got.row_calls)

    # The target cache holds the first token and every emitted token but the last.
    final = got.target_cache
    np.testing.assert_array_equal(final.index, START + got.lengths)
    for b in range(6):
        held = [int(FIRST[b]), *np.asarray(got.tokens[b, :int(got.lengths[b]) - 1])]
        np.testing.assert_array_equal(final.buffer[b, START[b]:final.index[b]], held)
    # The drafter's cache is one token shorter and holds the same tokens.
    drafted = got.draft_cache
    np.testing.assert_array_equal(drafted.index, final.index - 1)
    for b in range(6):
        np.testing.assert_array_equal(drafted.buffer[b, :drafted.index[b]],
                                      final.buffer[b, :drafted.index[b]])
    assert not final.overflow and not got.draft_cache.overflow


# --- the accept / resample rule, by exact enumeration ------------------------------------


def _grid(n: int) -> np.ndarray:
    return (np.arange(n) + 0.5) / n  # midpoints of n equal cells of [0, 1)


verify = jax.jit(speculative.verify_drafts)


def test_first_token_distribution_is_the_target_exactly():
    """P(first token = x) = Σ_d q(d) ∫ [accept(d, u) 1{x = d} + (1 - accept) r_d(x)] du,
    d enumerated exactly, u on a midpoint grid of G cells."""
    rng = np.random.default_rng(2)
    vocab, cells = 6, 2000
    p = rng.dirichlet(np.ones(vocab))
    q = rng.dirichlet(np.ones(vocab))
    p[4], q[2] = 0.0, 0.0  # p misses a draft token; q misses a target token
    p, q = p / p.sum(), q / q.sum()
    drafts = np.repeat(np.arange(vocab), cells)[:, None]  # [V * G, 1]
    uniforms = np.tile(_grid(cells), vocab)[:, None]
    batch = drafts.shape[0]
    bonus = rng.dirichlet(np.ones(vocab))
    n, next_probs = verify(
        jnp.asarray(np.broadcast_to(np.stack([p, bonus]), (batch, 2, vocab)), jnp.float32),
        jnp.asarray(np.broadcast_to(q, (batch, 1, vocab)), jnp.float32),
        jnp.asarray(drafts, jnp.int32), jnp.asarray(uniforms, jnp.float32))
    n, next_probs = np.asarray(n), np.asarray(next_probs, np.float64)

    weight = q[drafts[:, 0]] / cells  # [V * G]
    accepted = n == 1
    first = np.zeros(vocab)
    np.add.at(first, drafts[accepted, 0], weight[accepted])
    first += (weight[~accepted, None] * next_probs[~accepted]).sum(0)
    # Each draft's acceptance fraction is off by at most half a cell (0.5 / G), which
    # moves at most q(d) * 0.5 / G of mass onto x = d and as much onto the residual.
    np.testing.assert_allclose(first, p, rtol=0, atol=1.0 / cells)
    np.testing.assert_allclose(next_probs[accepted], np.broadcast_to(bonus, (accepted.sum(),
                                                                            vocab)), atol=1e-6)


def test_two_drafts_joint_distribution_is_the_target_exactly():
    """With gamma 2 and context-free p0, p1 the first two tokens are distributed
    p0(x) p1(y). Every ratio min(1, p/q) is a multiple of 1/8, so the 8-cell midpoint grid
    integrates the acceptances exactly. After a rejection at d1 the second token comes
    from the next round, i.e. from p1."""
    q0 = np.array([0.25, 0.25, 0.25, 0.25])
    p0 = np.array([0.5, 0.25, 0.125, 0.125])
    q1 = np.array([0.5, 0.125, 0.125, 0.25])
    p1 = np.array([0.125, 0.5, 0.375, 0.0])
    vocab, cells = 4, 8
    d1, d2, u1, u2 = (g.reshape(-1) for g in np.meshgrid(
        np.arange(vocab), np.arange(vocab), _grid(cells), _grid(cells), indexing="ij"))
    batch = d1.size
    bonus = np.full(vocab, 1.0 / vocab)
    n, next_probs = verify(
        jnp.asarray(np.broadcast_to(np.stack([p0, p1, bonus]), (batch, 3, vocab)), jnp.float32),
        jnp.asarray(np.broadcast_to(np.stack([q0, q1]), (batch, 2, vocab)), jnp.float32),
        jnp.asarray(np.stack([d1, d2], 1), jnp.int32),
        jnp.asarray(np.stack([u1, u2], 1), jnp.float32))
    n, nxt = np.asarray(n), np.asarray(next_probs, np.float64)

    weight = q0[d1] * q1[d2] / cells**2
    joint = np.zeros((vocab, vocab))
    for i in range(batch):
        if n[i] == 2:
            joint[d1[i], d2[i]] += weight[i]
        elif n[i] == 1:
            joint[d1[i]] += weight[i] * nxt[i]
        else:
            joint += weight[i] * np.outer(nxt[i], p1)
    np.testing.assert_allclose(joint, np.outer(p0, p1), rtol=0, atol=1e-6)


# --- acceptance statistics with context-free models --------------------------------------

CF_TARGET = np.array([2.0, 1.0, 0.5, -0.5, 1.5, -3.0], np.float32)
CF_DRAFT = np.array([0.5, 1.5, 1.0, -0.2, 0.0, -2.0], np.float32)
CF_TEMPERATURE, CF_TOP_K, CF_EOS = 0.8, 4, 5  # token 5 is outside the top 4 of both


def np_processed(logits: np.ndarray) -> np.ndarray:
    """Temperature then top-k, in numpy."""
    x = logits.astype(np.float64) / CF_TEMPERATURE
    x = np.where(x >= np.sort(x)[-CF_TOP_K], x, -np.inf)
    e = np.exp(x - x.max())
    return e / e.sum()


def test_context_free_acceptance_matches_theory():
    batch, steps, gamma = 16, 300, 3

    def constant_fn(logits):
        step = markov_fn(np.zeros((len(logits), len(logits)), np.float32),
                         np.broadcast_to(logits, (len(logits),) * 2).astype(np.float32))
        return lambda tokens, cache: (
            jnp.broadcast_to(jnp.asarray(logits), (*tokens.shape, len(logits))),
            step(tokens, cache)[1])

    cache = buffer_cache(np.zeros((batch, 1), np.int32), np.zeros(batch, np.int32),
                         steps + gamma + 1)
    out = jax.jit(lambda c, key: speculative.speculative_decode(
        constant_fn(CF_TARGET), c, constant_fn(CF_DRAFT), c, jnp.zeros((batch,), jnp.int32),
        gamma=gamma, max_decode_steps=steps, rng=key, temperature=CF_TEMPERATURE,
        top_k=CF_TOP_K, eos_id=CF_EOS))(cache, jax.random.key(3))

    p, q = np_processed(CF_TARGET), np_processed(CF_DRAFT)
    alpha = np.minimum(p, q).sum()
    decisions = int(out.accepted.sum() + out.rejected.sum())
    se_alpha = np.sqrt(alpha * (1 - alpha) / decisions)
    measured_alpha = float(out.acceptance_rate)
    assert abs(measured_alpha - alpha) < 4 * se_alpha, (measured_alpha, alpha, se_alpha)

    # n + 1 per call: P(n = k) = α^k (1 - α) for k < gamma, α^gamma for k = gamma.
    def expected_tokens(a):
        return (1 - a ** (gamma + 1)) / (1 - a)

    probs = np.array([alpha**k * (1 - alpha) for k in range(gamma)] + [alpha**gamma])
    counts = np.arange(gamma + 1) + 1
    sd = np.sqrt(probs @ counts**2 - (probs @ counts) ** 2)
    calls = int(out.row_calls.sum())
    slope = (expected_tokens(alpha + 1e-4) - expected_tokens(alpha - 1e-4)) / 2e-4
    tolerance = 4 * (sd / np.sqrt(calls) + abs(slope) * se_alpha)
    measured = float(out.tokens_per_target_call)
    assert abs(measured - expected_tokens(measured_alpha)) < tolerance, (measured, tolerance)
    assert int(out.target_calls) < steps  # several tokens per call

    # Every emitted token is an independent draw from p: a chi-square test on the counts.
    assert (np.asarray(out.lengths) == steps).all()
    hist = np.bincount(np.asarray(out.tokens).reshape(-1), minlength=len(p))
    support = p > 0
    assert hist[~support].sum() == 0
    expected = p[support] * hist.sum()
    chi2 = float(((hist[support] - expected) ** 2 / expected).sum())
    assert chi2 < 16.266, (hist, expected)  # 99.9% quantile, 3 degrees of freedom


# --- real networks -----------------------------------------------------------------------


def _random_network(make, seed: int):
    """The network `make()` builds, with weights drawn in numpy: kernels, embeddings and
    biases N(0, 0.2), norm scales 1. (Eager NNX init compiles one RNG program per
    parameter shape, which would dominate this file's runtime.)"""
    net = nnx.eval_shape(make)
    rng = np.random.default_rng(seed)

    def draw(path, x):
        if any(getattr(key, "key", None) == "scale" for key in path):
            return jnp.ones(x.shape, x.dtype)
        return jnp.asarray(rng.normal(0.0, 0.2, x.shape), x.dtype)

    nnx.update(net, jax.tree_util.tree_map_with_path(draw, nnx.state(net)))
    return net


def _damp_residual(layer, factor: float) -> None:
    """Scales a layer's residual outputs (attention `out`, MLP `wo`) by `factor`, so the
    target's extra layer only corrects what its first layers (the drafter) predict."""

    def scale(path, x):
        keys = {getattr(key, "key", None) for key in path}
        return x * factor if keys & {"out", "wo"} else x

    nnx.update(layer, jax.tree_util.tree_map_with_path(scale, nnx.state(layer, nnx.Param)))


def _drafter(target, make, shared):
    """A smaller network `make()` whose every weight is the target's: the modules named
    in `shared` (paths of attribute names) and so its first layers. It guesses the
    target's tokens well, not perfectly."""
    drafter = nnx.eval_shape(make)
    for path in shared:
        src, dst = target, drafter
        for name in path:
            src, dst = (src[name], dst[name]) if isinstance(name, int) else (
                getattr(src, name), getattr(dst, name))
        nnx.update(dst, nnx.state(src))
    return drafter


@pytest.fixture(scope="module")
def decoder_only_pair():
    """A 2-layer target and a 1-layer drafter made of its embedding, first layer, final
    norm and output layer."""
    cfg = do.DecoderOnlyConfig(vocab_size=64, emb_dim=32, num_heads=4, head_dim=8,
                               mlp_dim=48, num_layers=2, num_kv_heads=2, max_length=48)
    target = _random_network(lambda: do.DecoderOnly(cfg, rngs=nnx.Rngs(0)), seed=6)
    _damp_residual(target.layers[1], 0.2)
    drafter = _drafter(
        target, lambda: do.DecoderOnly(dataclasses.replace(cfg, num_layers=1),
                                       rngs=nnx.Rngs(0)),
        [("token_embedder",), ("decoder_norm",), ("logits_dense",), ("layers", 0)])
    return target, drafter


def _eos_cut(chain: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """An EOS id for greedy chains [B, S] decoded without one, and the greedy output
    (tokens, lengths) with it, as `decoding.greedy` defines: cut after the first EOS, 0
    after. Random networks rarely emit a fixed EOS, so the EOS is the emitted token that
    ends the rows at the most different steps, one row running to S."""
    steps = chain.shape[1]

    def cut(eos):
        hits = [np.flatnonzero(row == eos) for row in chain]
        lengths = np.array([h[0] + 1 if h.size else steps for h in hits])
        return np.where(np.arange(steps) < lengths[:, None], chain, 0), lengths

    eos = max(np.unique(chain).tolist(), key=lambda tok: (steps in cut(tok)[1],
                                                          len(set(cut(tok)[1]))))
    want, lengths = cut(eos)
    assert steps in lengths and (lengths < steps).any(), lengths
    return eos, want, lengths


def test_decoder_only_greedy_equals_target_greedy(decoder_only_pair):
    target, drafter = decoder_only_pair
    prompt = jnp.asarray(np.random.default_rng(4).integers(2, 64, size=(4, 6)), jnp.int32)
    lengths = jnp.asarray([6, 3, 1, 4], jnp.int32)
    prompt = jnp.where(jnp.arange(6)[None] < lengths[:, None], prompt, 0)
    steps = 12

    @nnx.jit
    def reference(net, prompt, lengths):
        # Independent of the helper: the whole prompt in one pass, then one token a step.
        cache = net.init_cache(prompt.shape[0], prompt.shape[1] + steps)
        logits, cache = net.decode(prompt, cache=cache)
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
        step = lambda t, c: (lambda o: (o[0][:, -1], o[1]))(net.decode(t, cache=c))
        return decoding.greedy(step, lengths, cache.rewind(lengths), max_decode_steps=steps,
                               eos_id=-1, initial_logits=last).tokens

    eos, want, want_lengths = _eos_cut(np.asarray(reference(target, prompt, lengths)))
    run = nnx.jit(functools.partial(speculative.speculative_decoder_only,
                                    max_decode_steps=steps, gamma=GAMMA, eos_id=eos))
    got = run(target, drafter, prompt, lengths)
    np.testing.assert_array_equal(got.tokens, want)
    np.testing.assert_array_equal(got.lengths, want_lengths)
    assert int(got.accepted.sum()) > 0 and int(got.rejected.sum()) > 0, (
        got.accepted, got.rejected)


def test_encoder_decoder_greedy_equals_target_greedy():
    cfg = ed.T5Config(vocab_size=64, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=48,
                      num_encoder_layers=1, num_decoder_layers=2)
    target = _random_network(lambda: ed.EncoderDecoder(cfg, rngs=nnx.Rngs(0)), seed=7)
    _damp_residual(target.decoder.layers[1], 0.2)
    small = dataclasses.replace(cfg, num_decoder_layers=1)  # the same encoder
    drafter = _drafter(
        target, lambda: ed.EncoderDecoder(small, rngs=nnx.Rngs(0)),
        [("token_embedder",), ("logits_dense",)] + [
            (stack, name) for stack in ("encoder", "decoder")
            for name in ("relpos_bias", f"{stack}_norm")] + [
            (stack, "layers", 0) for stack in ("encoder", "decoder")])
    inputs = jnp.asarray(np.random.default_rng(5).integers(2, 64, size=(3, 7)), jnp.int32)
    inputs = jnp.where(jnp.arange(7)[None] < jnp.asarray([7, 4, 2])[:, None], inputs, 0)
    steps = 10

    @nnx.jit
    def reference(net, inputs):
        encoded = net.encode(inputs)
        step = lambda t, c: (lambda o: (o[0][:, -1], o[1]))(
            net.decode(encoded, inputs, t, cache=c))
        return decoding.greedy(step, jnp.zeros((3,), jnp.int32),
                               net.init_cache(encoded, inputs, steps),
                               max_decode_steps=steps, eos_id=-1).tokens

    eos, want, want_lengths = _eos_cut(np.asarray(reference(target, inputs)))
    run = nnx.jit(functools.partial(speculative.speculative_encoder_decoder,
                                    max_decode_steps=steps, gamma=2, eos_id=eos))
    got = run(target, drafter, inputs)
    np.testing.assert_array_equal(got.tokens, want)
    np.testing.assert_array_equal(got.lengths, want_lengths)
    assert int(got.accepted.sum()) > 0 and int(got.rejected.sum()) > 0


# --- argument checks ---------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    ({"gamma": 0}, r"gamma=0 must be a Python int >= 1"),
    ({"max_length": int(START.max()) + STEPS + GAMMA},
     r"max_length=21 slots but holds up to 4 tokens.*max_decode_steps \+ gamma \+ 1 = 18"
     r".*max_length >= 22"),
    ({"temperature": 0.7}, r"temperature=0.7 samples: pass rng="),
    ({"draft_fn": markov_fn(np.zeros((V + 1, V + 1), np.float32),
                            np.zeros((V + 1, V + 1), np.float32))},
     r"target's vocabulary has 12 entries but the drafter's 13"),
])
def test_bad_arguments(kw, match):
    cache = buffer_cache(HISTORY, START, kw.pop("max_length", 40))
    args = {"gamma": GAMMA, "max_decode_steps": STEPS, "rng": None, "draft_fn": DRAFT_FN} | kw
    with pytest.raises(ValueError, match=match):
        speculative.speculative_decode(TARGET_FN, cache, args.pop("draft_fn"), cache,
                                       jnp.asarray(FIRST), **args)


def test_prompt_lengths_must_hold_a_token(decoder_only_pair):
    target, drafter = decoder_only_pair
    with pytest.raises(ValueError, match=r"prompt_lengths \[3, 0\] must be in \[1, P=4\]"):
        speculative.speculative_decoder_only(
            target, drafter, jnp.ones((2, 4), jnp.int32), jnp.asarray([3, 0]),
            max_decode_steps=4, gamma=2)

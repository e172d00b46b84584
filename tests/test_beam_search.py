"""Beam search and best-of-N against independent references: brute-force enumeration of
every sequence, numpy log-probs, greedy decoding, and hand-computed early stopping.

The step functions are Markov chains (no model). The brute-force test uses a
second-order chain whose logits depend on the token *in the cache* as well as the one
fed, so a cache that does not follow its beam gives wrong sequences.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like import decoding

EOS = 1


def log_softmax_np(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def brevity_penalty_np(alpha: float, length: int) -> float:
    return ((5.0 + length) / 6.0) ** alpha


def markov_step_fn(trans: np.ndarray):
    """First order: logits = trans[token]. Cache: calls () and pos [B]."""
    table = jnp.asarray(trans)

    def step_fn(tokens, cache):
        return table[tokens[:, 0]], {"calls": cache["calls"] + 1, "pos": cache["pos"] + 1}

    return step_fn


def init_cache(batch: int):
    return {"calls": jnp.zeros((), jnp.int32), "pos": jnp.zeros((batch,), jnp.int32)}


# --- beam width 1 and greedy ------------------------------------------------------------

V = 12
STEPS = 8


def _greedy_friendly_transitions() -> np.ndarray:
    """Random logits where EOS is either a row's argmax or far below its second best, so
    that beam width 1 with alpha = 0 must equal greedy (EOS never enters the top 2 of a
    beam as a runner-up, which would let beam search finish a sequence greedy does not)."""
    trans = np.random.default_rng(0).normal(size=(V, V)).astype(np.float32) * 2.0
    trans[:, EOS] = -20.0
    trans[[3, 7], EOS] = 10.0  # chains through 3 or 7 end
    return trans


GREEDY_TRANS = _greedy_friendly_transitions()
FIRST = np.arange(V, dtype=np.int32)


@functools.partial(jax.jit, static_argnames=("beam_size",))
def _beam_markov(first, alpha, beam_size):
    return decoding.beam_search(
        markov_step_fn(GREEDY_TRANS), first, init_cache(first.shape[0]), beam_size=beam_size,
        max_decode_steps=STEPS, alpha=alpha)


def test_beam_width_one_with_alpha_zero_is_greedy():
    greedy = jax.jit(lambda first: decoding.greedy(
        markov_step_fn(GREEDY_TRANS), first, init_cache(V), max_decode_steps=STEPS))(
        jnp.asarray(FIRST))
    lengths = np.asarray(greedy.lengths)
    assert (lengths < STEPS).any() and (lengths == STEPS).any()  # both endings occur
    beam = _beam_markov(jnp.asarray(FIRST), 0.0, beam_size=1)
    np.testing.assert_array_equal(beam.tokens[:, 0], greedy.tokens)
    np.testing.assert_array_equal(beam.lengths[:, 0], greedy.lengths)
    np.testing.assert_allclose(beam.log_probs[:, 0], greedy.log_probs, atol=1e-5)
    np.testing.assert_allclose(beam.scores[:, 0], greedy.log_probs, atol=1e-5)  # penalty 1


def test_scores_are_numpy_log_probs_over_the_brevity_penalty():
    alpha, k = 0.6, 4
    out = _beam_markov(jnp.asarray(FIRST), alpha, beam_size=k)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    scores = np.asarray(out.scores)
    assert tokens.shape == (V, k, STEPS) and scores.shape == (V, k)
    assert (np.diff(scores, axis=1) <= 0).all()  # best first
    assert len({lengths[b, j] for b in range(V) for j in range(k)}) > 2
    for b in range(V):
        assert len({tuple(t) for t in tokens[b]}) == k  # k different sequences
        for j in range(k):
            seq = tokens[b, j, : lengths[b, j]]
            assert (tokens[b, j, lengths[b, j]:] == 0).all()
            ended = np.flatnonzero(seq == EOS)  # EOS only as the last token, or not at all
            assert (ended.size == 0 and lengths[b, j] == STEPS) or list(ended) == [len(seq) - 1]
            prev = np.r_[FIRST[b], seq[:-1]]
            lp = sum(log_softmax_np(GREEDY_TRANS[p])[t] for p, t in zip(prev, seq))
            np.testing.assert_allclose(out.log_probs[b, j], lp, atol=1e-4)
            np.testing.assert_allclose(
                scores[b, j], lp / brevity_penalty_np(alpha, lengths[b, j]), atol=1e-4)


# --- brute force on a tiny vocabulary ---------------------------------------------------

TINY_V = 4
TINY_STEPS = 3
# Exact for the whole top-K when K >= the number of EOS-free prefixes one token short of
# the end ((V - 1) ** (S - 1) = 9): every such prefix then stays alive (see the proof
# sketch in the test).
TINY_K = 9
TINY_T3 = np.random.default_rng(3).normal(size=(TINY_V, TINY_V, TINY_V)).astype(np.float32)
TINY_T3[..., EOS] += 0.5  # some sequences end early, others run to S


def second_order_step_fn(table3: np.ndarray):
    """logits = table3[prev, token]; the cache holds `prev` [B] (the token fed before)."""
    table = jnp.asarray(table3)

    def step_fn(tokens, cache):
        logits = table[cache["prev"], tokens[:, 0]]
        return logits, {"prev": tokens[:, 0], "calls": cache["calls"] + 1}

    return step_fn


def brute_force(table3, prev0, first, steps, alpha, enders=(EOS,)):
    """Every sequence the search can return: ender-free then an ender (EOS or a stop
    token; length <= S, the ender counted), or S ender-free tokens; scored log-prob /
    brevity penalty. Sorted best first."""
    results = []
    non_eos = [t for t in range(table3.shape[0]) if t not in enders]
    for length in range(1, steps + 1):
        endings = [tuple(sorted(set(enders)))] + ([tuple(non_eos)] if length == steps else [])
        for body in itertools.product(non_eos, repeat=length - 1):
            for last in itertools.chain(*endings):
                seq = (*body, last)
                prev, cur, lp = prev0, first, 0.0
                for tok in seq:
                    lp += log_softmax_np(table3[prev, cur])[tok]
                    prev, cur = cur, tok
                results.append((lp / brevity_penalty_np(alpha, length), seq, lp))
    return sorted(results, key=lambda r: -r[0])


@functools.partial(jax.jit, static_argnames=("use_initial_logits",))
def _beam_tiny(prev0, first, alpha, use_initial_logits, stop_tokens=()):
    step_fn = second_order_step_fn(TINY_T3)
    cache = {"prev": prev0, "calls": jnp.zeros((), jnp.int32)}
    initial_logits = None
    if use_initial_logits:  # a "prefill" consumed `first` already
        initial_logits = jnp.asarray(TINY_T3)[prev0, first]
        cache = {"prev": first, "calls": jnp.zeros((), jnp.int32)}
    return decoding.beam_search(
        step_fn, first, cache, beam_size=TINY_K, max_decode_steps=TINY_STEPS, alpha=alpha,
        initial_logits=initial_logits, stop_tokens=stop_tokens)


PREV0 = np.asarray([0, 2, 3, 1], np.int32)
TINY_FIRST = np.asarray([2, 0, 3, 3], np.int32)


def _assert_beams_are(out, b, ranked):
    """Row b's beams are the (score, sequence, log-prob) of `ranked`, in order."""
    for j, (score, seq, lp) in enumerate(ranked):
        np.testing.assert_array_equal(out.tokens[b, j, : len(seq)], seq)
        np.testing.assert_array_equal(out.tokens[b, j, len(seq):], 0)
        assert int(out.lengths[b, j]) == len(seq)
        np.testing.assert_allclose(out.scores[b, j], score, atol=1e-5)
        np.testing.assert_allclose(out.log_probs[b, j], lp, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_wide_beam_equals_brute_force_enumeration(alpha):
    """With K >= the EOS-free prefixes of length S - 1, every prefix stays alive until the
    last step, and an extension dropped there is beaten by >= K others of the same length
    (same brevity penalty); finished sequences are kept K-best. So the K beams are
    exactly the K best sequences of the enumeration."""
    out = _beam_tiny(jnp.asarray(PREV0), jnp.asarray(TINY_FIRST), alpha,
                     use_initial_logits=False)
    for b in range(len(PREV0)):
        ranked = brute_force(TINY_T3, PREV0[b], TINY_FIRST[b], TINY_STEPS, alpha)[:TINY_K]
        assert {len(r[1]) for r in ranked} != {TINY_STEPS}  # early and cut sequences both
        _assert_beams_are(out, b, ranked)


# Stop tokens, [n] for every row and [B, n] per row (a row's list padded with EOS). The
# enumeration stays exact: fewer tokens continue a beam, so fewer prefixes need keeping.
@pytest.mark.parametrize("stop", [[2], [[2, EOS], [3, EOS], [2, 3], [EOS, EOS]]])
@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_stop_tokens_end_beams_like_eos_against_brute_force(stop, alpha):
    out = _beam_tiny(jnp.asarray(PREV0), jnp.asarray(TINY_FIRST), alpha,
                     use_initial_logits=False, stop_tokens=jnp.asarray(stop, jnp.int32))
    per_row = np.broadcast_to(np.atleast_2d(stop), (len(PREV0), np.shape(stop)[-1]))
    for b in range(len(PREV0)):
        enders = (EOS, *per_row[b])
        ranked = brute_force(TINY_T3, PREV0[b], TINY_FIRST[b], TINY_STEPS, alpha,
                             enders)[:TINY_K]
        _assert_beams_are(out, b, ranked)
        if set(enders) != {EOS}:  # a stop token really ended some of the returned beams
            assert any(seq[-1] in set(enders) - {EOS} for _, seq, _ in ranked)
    with pytest.raises(ValueError, match="stop_tokens has 3 rows but the batch has B=4"):
        _beam_tiny(jnp.asarray(PREV0), jnp.asarray(TINY_FIRST), alpha,
                   use_initial_logits=False, stop_tokens=jnp.zeros((3, 1), jnp.int32))


def test_initial_logits_from_a_prefill_give_the_same_beams():
    alpha = 0.6
    fed = _beam_tiny(jnp.asarray(PREV0), jnp.asarray(TINY_FIRST), alpha,
                     use_initial_logits=False)
    prefilled = _beam_tiny(jnp.asarray(PREV0), jnp.asarray(TINY_FIRST), alpha,
                           use_initial_logits=True)
    np.testing.assert_array_equal(prefilled.tokens, fed.tokens)
    np.testing.assert_array_equal(prefilled.lengths, fed.lengths)
    np.testing.assert_allclose(prefilled.scores, fed.scores, atol=1e-6)
    assert int(prefilled.steps) == int(fed.steps)


# --- EOS and early stopping -------------------------------------------------------------


def _coin_chain() -> np.ndarray:
    """From the start token 0 and from 2: EOS or 2, probability 1/2 each; nothing else.
    Sequences: (2,)*m + (EOS,) with log-prob -(m + 1) log 2, or S twos."""
    trans = np.full((V, V), -np.inf, np.float32)
    trans[[0, 2], EOS] = trans[[0, 2], 2] = 0.0
    trans[[r for r in range(V) if r not in (0, 2)], 5] = 0.0  # rows never visited: finite
    return trans


def _expected_coin_search(alpha, beam, steps):
    """T5X's stopping rule in closed form: after t steps the one live beam is t twos
    with log-prob -t log 2, the finished ones are m - 1 twos + EOS (length m <= t, log-prob
    -m log 2). Returns the number of steps the search runs."""
    ln2 = np.log(2.0)
    for t in range(1, steps + 1):
        finished = sorted((-(m * ln2) / brevity_penalty_np(alpha, m) for m in range(1, t + 1)),
                          reverse=True)[:beam]
        bound = -t * ln2 / max(brevity_penalty_np(alpha, t + 1),
                               brevity_penalty_np(alpha, steps))
        if len(finished) == beam and finished[-1] > bound:
            return t
    return steps


@functools.partial(jax.jit, static_argnames=("steps",))
def _beam_coin(alpha, steps):
    return decoding.beam_search(markov_step_fn(_coin_chain()), jnp.zeros((1,), jnp.int32),
                                init_cache(1), beam_size=2, max_decode_steps=steps,
                                alpha=alpha)


@pytest.mark.parametrize("alpha,expected_steps", [(0.0, 3), (0.6, 4), (2.0, 10)])
def test_eos_ends_beams_and_search_stops_when_nothing_alive_can_win(alpha, expected_steps):
    steps = 10
    assert _expected_coin_search(alpha, 2, steps) == expected_steps  # hand-checked numbers
    out = _beam_coin(alpha, steps)
    assert int(out.steps) == expected_steps
    # The two best: "EOS" and "2 EOS" for every alpha here (with alpha = 2 the live
    # "2" * 10, complete at S, competes and loses: -10 log 2 / 6.25 < -2 log 2 / 1.36).
    np.testing.assert_array_equal(out.tokens[0, 0], [EOS] + [0] * (steps - 1))
    np.testing.assert_array_equal(out.tokens[0, 1], [2, EOS] + [0] * (steps - 2))
    np.testing.assert_array_equal(out.lengths[0], [1, 2])
    ln2 = np.log(2.0)
    np.testing.assert_allclose(out.log_probs[0], [-ln2, -2 * ln2], rtol=1e-6)
    np.testing.assert_allclose(
        out.scores[0],
        [-ln2 / brevity_penalty_np(alpha, 1), -2 * ln2 / brevity_penalty_np(alpha, 2)],
        rtol=1e-6)


# --- best-of-N --------------------------------------------------------------------------

N = 6
BON_TRANS = np.random.default_rng(0).normal(size=(V, V)).astype(np.float32) * 2.0
BON_TRANS[:, EOS] += 1.5  # candidates of many lengths


def longest_then_first_token(tokens, lengths):
    """A custom score (tokens [B, N, S], lengths [B, N]) -> [B, N], no ties."""
    return lengths + 0.01 * tokens[..., 0] + 1e-4 * jnp.arange(tokens.shape[1])


@jax.jit
def _best_of_n(first, rng):
    """The three scorings on the same candidates (same rng): one compile."""
    kw = {"n": N, "rng": rng, "max_decode_steps": STEPS, "temperature": 1.3, "top_k": 8}
    step_fn, cache = markov_step_fn(BON_TRANS), init_cache(first.shape[0])
    return (decoding.best_of_n(step_fn, first, cache, **kw),
            decoding.best_of_n(step_fn, first, cache, length_normalize=True, **kw),
            decoding.best_of_n(step_fn, first, cache, score_fn=longest_then_first_token, **kw))


def test_best_of_n_returns_the_argmax_of_its_scores():
    plain, normalized, custom = _best_of_n(jnp.asarray(FIRST), jax.random.key(5))
    cands, lengths = np.asarray(plain.candidates), np.asarray(plain.candidate_lengths)
    assert cands.shape == (V, N, STEPS) and lengths.shape == (V, N)
    for out in (normalized, custom):  # the same candidates for every scoring
        np.testing.assert_array_equal(out.candidates, cands)
    # Raw model log-prob of every candidate, from the transition table.
    log_probs = np.zeros((V, N))
    for b, j in itertools.product(range(V), range(N)):
        seq = cands[b, j, : lengths[b, j]]
        assert (cands[b, j, lengths[b, j]:] == 0).all()
        prev = np.r_[FIRST[b], seq[:-1]]
        log_probs[b, j] = sum(log_softmax_np(BON_TRANS[p])[t] for p, t in zip(prev, seq))
    assert len(np.unique(lengths)) > 3
    np.testing.assert_allclose(plain.candidate_log_probs, log_probs, atol=1e-4)
    expected_scores = {
        "plain": log_probs,
        "normalized": log_probs / lengths,
        "custom": lengths + 0.01 * cands[..., 0] + 1e-4 * np.arange(N),
    }
    picks = {}
    for name, out in zip(expected_scores, (plain, normalized, custom)):
        np.testing.assert_allclose(out.scores, expected_scores[name], atol=1e-4)
        best = np.argmax(expected_scores[name], axis=1)
        np.testing.assert_array_equal(out.best_index, best, err_msg=name)
        np.testing.assert_array_equal(out.tokens, cands[np.arange(V), best], err_msg=name)
        np.testing.assert_array_equal(out.lengths, lengths[np.arange(V), best], err_msg=name)
        np.testing.assert_allclose(out.log_probs, log_probs[np.arange(V), best], atol=1e-4)
        picks[name] = best
    # Length normalisation prefers longer candidates where the total log-prob does not.
    changed = picks["plain"] != picks["normalized"]
    assert changed.any()
    rows = np.flatnonzero(changed)
    assert (lengths[rows, picks["normalized"][rows]] > lengths[rows, picks["plain"][rows]]).all()
    assert (picks["custom"] != picks["plain"]).any()  # score_fn overrides
    with pytest.raises(ValueError, match="best_of_n sets num_samples itself"):
        decoding.best_of_n(markov_step_fn(BON_TRANS), jnp.asarray(FIRST), init_cache(V), n=2,
                           rng=jax.random.key(0), max_decode_steps=2, num_samples=3)

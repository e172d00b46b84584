"""Sampling and greedy decoding against numpy references, with a Markov-chain step
function (no model).

The step function's next-token logits depend only on the last token, through a fixed
random matrix; its cache counts the step_fn calls (to check early termination) and a
per-example position (to check the cache is threaded through and repeated per sample).

Compiles dominate the runtime, so most tests go through `run`: one jitted `sample` with
per-row keys whose float knobs are all traced [B] arrays, compiled once per (batch,
top_k, num_samples). Static (Python-number) settings go through a few `static_decoder`s;
the one-key path through `static_decoder`, `choose_tokens` and best-of-N
(tests/test_beam_search.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like import decoding

V = 12
EOS = 1
STEPS = 8
PROMPT_WIDTH = 10  # prompts are zero-padded to this width (one compile for all)
CONTEXT_WIDTH = 4
STOP_WIDTH = 3  # per-row stop ids, -1 padded
# 99.9% quantiles of the chi-square distribution, by degrees of freedom (scipy-free).
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}


def _transitions(seed: int = 0) -> np.ndarray:
    trans = np.random.default_rng(seed).normal(size=(V, V)).astype(np.float32) * 2.0
    trans[3, EOS] = 10.0  # greedy chains through token 3 end; others may not
    return trans


TRANS = _transitions()


def markov_step_fn(trans: np.ndarray):
    table = jnp.asarray(trans)

    def step_fn(tokens, cache):
        assert tokens.shape[1:] == (1,)
        logits = table[tokens[:, 0]]  # [B, V]
        return logits, {"calls": cache["calls"] + 1, "pos": cache["pos"] + 1}

    return step_fn


STEP_FN = markov_step_fn(TRANS)


def init_cache(batch: int):
    return {"calls": jnp.zeros((), jnp.int32), "pos": jnp.zeros((batch,), jnp.int32)}


def log_softmax_np(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _row(x, b):
    """Row b's value of a scalar or per-row setting."""
    x = np.asarray(x, np.float64)
    return float(x if x.ndim == 0 else x[b])


def np_greedy(trans, first, steps, prompt=None, context=None, stop=None,
              repetition=1.0, presence=0.0, frequency=0.0):
    """Reference greedy decode, one example at a time: a forced prefix, EOS and per-row
    stop ids, and the penalties written out from their definitions (HF / OpenAI)."""
    batch = len(first)
    tokens = np.zeros((batch, steps), np.int32)
    lps = np.zeros((batch, steps))
    lengths = np.zeros(batch, np.int32)
    for b in range(batch):
        rep, pres, freq = _row(repetition, b), _row(presence, b), _row(frequency, b)
        plen = 0 if prompt is None else int((prompt[b] != 0).sum())
        in_context = set() if context is None else {int(t) for t in context[b] if t != 0}
        in_context |= set() if prompt is None else {int(t) for t in prompt[b] if t != 0}
        ends = {EOS} | (set() if stop is None else {int(t) for t in stop[b] if t >= 0})
        counts = np.zeros(V)
        cur = first[b]
        for i in range(steps):
            forced = i < plen
            if forced:
                tok = int(prompt[b, i])
            else:
                logits = trans[cur].astype(np.float64)
                for v in range(V):
                    if counts[v] > 0 or v in in_context:
                        logits[v] = logits[v] / rep if logits[v] > 0 else logits[v] * rep
                    logits[v] -= freq * counts[v] + pres * (counts[v] > 0)
                tok = int(np.argmax(logits))
                counts[tok] += 1
            tokens[b, i] = tok
            lps[b, i] = log_softmax_np(trans[cur])[tok]
            lengths[b] = i + 1
            cur = tok
            if not forced and tok in ends:
                break
    return tokens, lps, lengths


def _pad(rows, width, fill):
    out = np.full((len(rows), width), fill, np.int32)
    for b, row in enumerate(rows):
        out[b, : len(row)] = row
    return out


@functools.partial(jax.jit, static_argnames=("top_k", "num_samples"))
def _decode_traced(first, rng, knobs, prompt, context, stop, top_k, num_samples):
    return decoding.sample(
        STEP_FN, first, init_cache(first.shape[0]), max_decode_steps=STEPS, rng=rng,
        top_k=top_k, num_samples=num_samples, prompt_tokens=prompt, context_tokens=context,
        stop_tokens=stop, **knobs,
    )


def row_keys(seed: int, batch: int = V) -> jax.Array:
    return jax.random.split(jax.random.key(seed), batch)


def run(first, *, seed=0, rng=None, top_k=0, num_samples=1, prompt=None, context=None,
        stop=None, **knobs):
    """`sample` on the Markov chain with every float knob traced as one value per row and
    per-row keys (`rng`, or split from `seed`)."""
    first = jnp.asarray(first, jnp.int32)
    batch = first.shape[0]
    rng = row_keys(seed, batch) if rng is None else rng
    settings = {"temperature": 1.0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
                "presence_penalty": 0.0, "frequency_penalty": 0.0}
    settings.update(knobs)
    traced = {k: jnp.broadcast_to(jnp.asarray(v, jnp.float32), (batch,))
              for k, v in settings.items()}
    prompt = _pad(np.zeros((batch, 0)) if prompt is None else prompt, PROMPT_WIDTH, 0)
    context = _pad(np.zeros((batch, 0)) if context is None else context, CONTEXT_WIDTH, 0)
    stop = _pad(np.zeros((batch, 0)) if stop is None else stop, STOP_WIDTH, -1)
    return _decode_traced(first, rng, traced,
                          jnp.asarray(prompt), jnp.asarray(context), jnp.asarray(stop),
                          top_k, num_samples)


@functools.cache
def static_decoder(**settings):
    """A jitted `sample` on the Markov chain with static (Python-number) settings."""
    return jax.jit(lambda first, rng: decoding.sample(
        STEP_FN, first, init_cache(first.shape[0]), max_decode_steps=STEPS, rng=rng,
        **settings))


FIRST = np.arange(V, dtype=np.int32)  # one chain from every token


def greedy_reference():
    return static_decoder(temperature=0.0)(jnp.asarray(FIRST), jax.random.key(0))


def np_processed_log_prob(trans, first, tokens, lengths, temperature, top_p, min_p):
    """Reference `sample_log_probs` (no penalties): per row, the sum over its tokens of
    log q(token), q = softmax(logits / T) cut to the nucleus and by min-p, in numpy."""
    total = np.zeros(len(first))
    for b in range(len(first)):
        cur = first[b]
        for i in range(lengths[b]):
            q = expected_first_token_probs(trans[cur], _row(temperature, b), 0,
                                           _row(top_p, b), _row(min_p, b))
            total[b] += np.log(q[tokens[b, i]])
            cur = tokens[b, i]
    return total


# --- greedy and its equivalents ---------------------------------------------------------


def test_temperature_zero_is_numpy_argmax_chain():
    ref_tokens, ref_lps, ref_lengths = np_greedy(TRANS, FIRST, STEPS)
    assert (ref_lengths < STEPS).any() and (ref_lengths == STEPS).any()  # both cases occur

    for out in (greedy_reference(), run(FIRST, temperature=0.0)):  # static, traced
        np.testing.assert_array_equal(out.tokens, ref_tokens)
        np.testing.assert_array_equal(out.lengths, ref_lengths)
        np.testing.assert_allclose(out.token_log_probs, ref_lps, atol=1e-5)
        np.testing.assert_allclose(out.log_probs, ref_lps.sum(-1), atol=1e-4)
        np.testing.assert_array_equal(out.sample_log_probs, 0.0)
        np.testing.assert_array_equal(
            out.sampled_mask, np.arange(STEPS)[None, :] < ref_lengths[:, None]
        )
        np.testing.assert_array_equal(out.cache["pos"], out.cache["calls"])


def test_vanishing_temperature_top_k_one_tiny_top_p_and_min_p_one_are_greedy():
    greedy = greedy_reference()
    hot = np.asarray([0.3, 1.0, 5.0] * 4, np.float32)  # per row
    cases = {
        "temperature 1e-6": run(FIRST, temperature=1e-6, seed=1),
        "top_k 1": run(FIRST, temperature=hot, top_k=1, seed=7),
        "top_p 0": run(FIRST, temperature=2.0, top_p=0.0, seed=3),
        "top_p 1e-6": run(FIRST, temperature=2.0, top_p=1e-6, seed=3),
        "min_p 1": run(FIRST, temperature=2.0, min_p=1.0, seed=4),
    }
    for name, out in cases.items():
        np.testing.assert_array_equal(out.tokens, greedy.tokens, err_msg=name)
        np.testing.assert_array_equal(out.lengths, greedy.lengths, err_msg=name)
        np.testing.assert_allclose(out.log_probs, greedy.log_probs, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(cases["top_k 1"].sample_log_probs, 0.0)  # a point mass
    # ... and the same temperatures without the limit do sample something else.
    assert (np.asarray(run(FIRST, temperature=2.0).tokens) != greedy.tokens).any()


def test_top_p_one_and_neutral_knobs_change_nothing():
    """Traced top_p = 1, min_p = 0 and neutral penalties == static code without them."""
    keys = row_keys(11)
    base = static_decoder(temperature=1.3)(jnp.asarray(FIRST), keys)
    out = run(FIRST, temperature=1.3, top_p=1.0, rng=keys)
    np.testing.assert_array_equal(out.tokens, base.tokens)
    # Same distribution; only XLA's fusion of the log-softmax differs between programs.
    np.testing.assert_allclose(out.sample_log_probs, base.sample_log_probs, rtol=1e-6)
    logits = jnp.asarray([[0.5, -jnp.inf, 3.0, 3.0, -20.0]])
    np.testing.assert_array_equal(decoding.top_p_mask(logits, jnp.float32(1.0)), logits)
    assert decoding.top_p_mask(logits, 1.0) is logits
    assert decoding.min_p_mask(logits, 0.0) is logits


# --- the masks on hand-made logits ------------------------------------------------------


def test_top_k_mask_keeps_exactly_k_largest():
    logits = jnp.asarray([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, -1.0, 4.0, 4.0, 4.0]])
    kept = np.isfinite(decoding.top_k_mask(logits, 2))
    np.testing.assert_array_equal(kept, [[0, 1, 0, 1, 0], [0, 0, 1, 1, 0]])  # ties: low id
    np.testing.assert_array_equal(decoding.top_k_mask(logits, 2)[0, 1], 5.0)  # values kept
    assert decoding.top_k_mask(logits, 0) is logits
    assert decoding.top_k_mask(logits, 5) is logits
    batched = jnp.stack([logits, logits])  # [2, 2, V]: any leading dims
    np.testing.assert_array_equal(np.isfinite(decoding.top_k_mask(batched, 3)).sum(-1), 3)
    with pytest.raises(ValueError, match="top_k=-1 must be >= 0"):
        decoding.top_k_mask(logits, -1)


_top_p = jax.jit(decoding.top_p_mask)
_top_p_sorted = jax.jit(decoding._top_p_mask_sorted)


def _kept(probs, p):
    """Which of the 4 tokens of `probs` top-p keeps; the bisection and the sort-based
    reference must agree (run as a [2, 4] batch: one compile for every call)."""
    logits = jnp.log(jnp.asarray(np.broadcast_to(probs, (2, 4)), jnp.float32))
    p = jnp.full((2,), p, jnp.float32)
    kept = np.isfinite(np.asarray(_top_p(logits, p)))
    np.testing.assert_array_equal(kept, np.isfinite(np.asarray(_top_p_sorted(logits, p))))
    return kept[0]


def test_top_p_mask_smallest_set_reaching_p():
    probs = [0.05, 0.5, 0.15, 0.3]  # sorted: 0.5 (id 1), 0.3 (id 3), 0.15 (id 2), 0.05
    np.testing.assert_array_equal(_kept(probs, 0.0), [0, 1, 0, 0])  # top always kept
    np.testing.assert_array_equal(_kept(probs, 0.3), [0, 1, 0, 0])
    np.testing.assert_array_equal(_kept(probs, 0.75), [0, 1, 0, 1])
    np.testing.assert_array_equal(_kept(probs, 0.81), [0, 1, 1, 1])
    np.testing.assert_array_equal(_kept(probs, 0.96), [1, 1, 1, 1])
    # Per-row p.
    logits = jnp.log(jnp.asarray([probs, probs]))
    kept = np.isfinite(_top_p(logits, jnp.asarray([0.3, 0.81])))
    np.testing.assert_array_equal(kept, [[0, 1, 0, 0], [0, 1, 1, 1]])


def test_top_p_mask_ties_at_the_boundary_are_all_kept():
    probs = [0.2, 0.4, 0.2, 0.2]
    # Minimal set for p=0.5 is {1, one of the 0.2s}; the cut is by value, so all tied
    # tokens are kept rather than an arbitrary one of them.
    np.testing.assert_array_equal(_kept(probs, 0.5), [1, 1, 1, 1])
    np.testing.assert_array_equal(_kept(probs, 0.35), [0, 1, 0, 0])
    with pytest.raises(ValueError, match=r"top_p=1.5 must be in \[0, 1\]"):
        decoding.top_p_mask(jnp.zeros((1, 3)), 1.5)


def _hard_logits(rows: int, vocab: int, seed: int) -> np.ndarray:
    """Random logits with the cases a cut must get right: coarse values (many ties,
    ties at the cut), a wide dynamic range (underflowing probabilities), -inf entries,
    constant rows and signed zeros."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, vocab)).astype(np.float32) * 2.0
    x[0::4] = np.round(x[0::4] * 2) / 2  # ties
    x[1::4] *= 20.0  # wide range
    x[2::4] = np.where(rng.random((len(x[2::4]), vocab)) < 0.3, -np.inf, x[2::4])
    x[3] = 0.7  # one constant row
    x[7, :4] = [0.0, -0.0, 0.0, -0.0]
    x[7, 4:] = -3.0
    return x


P_VALUES = np.asarray([0.0, 1e-3, 0.5, 0.9, 1.0], np.float32)


def test_top_p_bisection_equals_sort_based_reference():
    logits = jnp.asarray(_hard_logits(400, 64, seed=1))
    p = jnp.asarray(np.resize(P_VALUES, 400))  # every p on every kind of row
    fast, ref = np.asarray(_top_p(logits, p)), np.asarray(_top_p_sorted(logits, p))
    np.testing.assert_array_equal(fast, ref)
    kept = np.isfinite(fast).sum(-1)
    assert (kept[np.asarray(p) == 0] >= 1).all()
    assert len(np.unique(kept)) > 20  # the cuts fall in many places
    # p = 1 returns the logits exactly; p = 0 keeps exactly the top value (ties included).
    np.testing.assert_array_equal(fast[np.asarray(p) == 1], np.asarray(logits)[np.asarray(p) == 1])
    top = np.asarray(logits).max(-1, keepdims=True)
    zero = np.asarray(p) == 0
    np.testing.assert_array_equal(np.isfinite(fast[zero]), np.asarray(logits)[zero] == top[zero])


@functools.partial(jax.jit, static_argnames="k")
def _top_k_top_p(logits, temperature, p, k):
    fast = decoding.process_logits(logits, temperature=temperature, top_k=k, top_p=p)
    scaled = decoding.apply_temperature(logits, temperature)
    return fast, decoding._top_p_mask_sorted(decoding.top_k_mask(scaled, k), p)


def test_top_k_then_top_p_orders_only_the_survivors():
    """process_logits' top-k + top-p path (lax.top_k, no sort) == the two masks in turn,
    on [2, 200, V] logits with per-row temperature and p (leading dims as speculative
    decoding uses them)."""
    logits = jnp.asarray(_hard_logits(400, 64, seed=2).reshape(2, 200, 64))
    p = jnp.asarray(np.resize(P_VALUES, 400).reshape(2, 200))
    temperature = jnp.full((2, 200), 0.7)
    fast, ref = _top_k_top_p(logits, temperature, p, 9)
    np.testing.assert_array_equal(fast, ref)
    kept = np.isfinite(np.asarray(fast)).sum(-1)
    assert kept.max() == 9 and kept.min() == 1 and len(np.unique(kept)) == 9


def test_min_p_mask_matches_numpy():
    logits = np.asarray([[2.0, 1.0, 0.0, -1.0, -2.5, 0.5],
                         [2.0, 1.0, 0.0, -1.0, -2.5, 0.5],
                         [0.3, 0.3, -4.0, 1.1, -np.inf, 0.9],
                         [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]], np.float32)
    min_p = np.asarray([0.1, 0.3, 0.5, 0.99], np.float32)
    temperature = np.asarray([1.0, 2.0, 0.5, 1.0], np.float32)
    out = decoding.process_logits(jnp.asarray(logits), temperature=jnp.asarray(temperature),
                                  min_p=jnp.asarray(min_p))
    z = logits.astype(np.float64) / temperature[:, None]
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected_keep = probs >= min_p[:, None] * probs.max(-1, keepdims=True)
    np.testing.assert_array_equal(np.isfinite(out), expected_keep)
    np.testing.assert_allclose(np.where(expected_keep, out, 0), np.where(expected_keep, z, 0),
                               rtol=1e-6)
    assert expected_keep[:3].sum(-1).min() > 1 and expected_keep[:3].sum(-1).max() < 6
    np.testing.assert_array_equal(expected_keep[3], True)  # a flat row keeps everything
    with pytest.raises(ValueError, match=r"min_p=1.5 must be in \[0, 1\]"):
        decoding.min_p_mask(jnp.asarray(logits), 1.5)


def test_penalties_match_numpy():
    logits = np.asarray([[2.0, -1.0, 0.0, 3.0, -np.inf, 0.5],
                         [2.0, -1.0, 0.0, 3.0, 1.5, -0.6]], np.float32)
    counts = np.asarray([[0, 2, 1, 0, 1, 0], [3, 0, 0, 1, 0, 1]], np.int32)
    context = np.asarray([[0, 0, 0, 1, 0, 1], [0, 1, 0, 0, 0, 0]], bool)
    rep, pres, freq = (np.asarray(x, np.float32) for x in ([1.5, 0.8], [0.25, -0.5],
                                                             [0.5, 0.1]))
    out = decoding.apply_penalties(
        jnp.asarray(logits), jnp.asarray(counts), context_mask=jnp.asarray(context),
        repetition_penalty=jnp.asarray(rep), presence_penalty=jnp.asarray(pres),
        frequency_penalty=jnp.asarray(freq))
    expected = logits.astype(np.float64).copy()
    for b in range(2):
        for v in range(6):
            if counts[b, v] > 0 or context[b, v]:  # repetition: divide positives
                x = expected[b, v]
                expected[b, v] = x / rep[b] if x > 0 else x * rep[b]
            expected[b, v] -= freq[b] * counts[b, v] + pres[b] * (counts[b, v] > 0)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    # Static neutral values leave the logits untouched; a static penalty <= 0 is refused.
    same = decoding.apply_penalties(jnp.asarray(logits), jnp.asarray(counts),
                                    context_mask=jnp.asarray(context))
    np.testing.assert_array_equal(same, logits)
    with pytest.raises(ValueError, match=r"repetition_penalty=0.0 must be > 0"):
        decoding.apply_penalties(jnp.asarray(logits), jnp.asarray(counts),
                                 repetition_penalty=0.0)


def test_penalised_greedy_decoding_matches_numpy():
    """The loop keeps the counts right: sampled tokens only (not forced prompt tokens),
    prompt and context tokens seen by the repetition penalty, per-row strengths."""
    prompt = np.zeros((V, 2), np.int32)
    prompt[::3] = [[6, 7]]  # every third row starts with a forced "6 7"
    context = np.tile(np.asarray([[5, 2, 0, 0]], np.int32), (V, 1))
    context[1::2] = 0
    settings = {
        "repetition_penalty": np.resize(np.asarray([1.0, 1.5, 3.0], np.float32), V),
        "presence_penalty": np.resize(np.asarray([0.0, 0.5, 0.0, 2.0], np.float32), V),
        "frequency_penalty": np.resize(np.asarray([0.7, 0.0, 0.3, 0.0, 0.0], np.float32), V),
    }
    ref_tokens, ref_lps, ref_lengths = np_greedy(
        TRANS, FIRST, STEPS, prompt=prompt, context=context, repetition=settings[
            "repetition_penalty"], presence=settings["presence_penalty"],
        frequency=settings["frequency_penalty"])
    out = run(FIRST, temperature=0.0, prompt=prompt, context=context, **settings)
    np.testing.assert_array_equal(out.tokens, ref_tokens)
    np.testing.assert_array_equal(out.lengths, ref_lengths)
    np.testing.assert_allclose(out.token_log_probs, ref_lps, atol=1e-5)  # raw model's
    plain, _, _ = np_greedy(TRANS, FIRST, STEPS, prompt=prompt)
    assert (ref_tokens != plain).any(axis=1).sum() >= V // 2  # the penalties bite


def test_stop_tokens_end_sequences_like_eos():
    greedy = np.asarray(greedy_reference().tokens)
    # Per row: stop at the token the plain chain emits at step 3 (or at nothing).
    stop = [[int(greedy[b, 3]), 11] if b % 3 else [] for b in range(V)]
    stop = [[t for t in row if t != EOS] for row in stop]
    ref_tokens, _, ref_lengths = np_greedy(TRANS, FIRST, STEPS, stop=_pad(stop, 3, -1))
    assert (ref_lengths <= 4).sum() > V // 2
    out = run(FIRST, temperature=0.0, stop=stop)
    np.testing.assert_array_equal(out.tokens, ref_tokens)
    np.testing.assert_array_equal(out.lengths, ref_lengths)
    # Sampled sequences end at the first stop token, which counts in the length.
    sampled = run(np.zeros(V), temperature=2.0, stop=[[6, 9]] * V, seed=2)
    for row, length in zip(np.asarray(sampled.tokens), np.asarray(sampled.lengths)):
        ends = np.flatnonzero(np.isin(row, [EOS, 6, 9]))
        assert length == (ends[0] + 1 if len(ends) else STEPS)
        assert (row[length:] == 0).all()


# --- per-row keys and several samples per row -------------------------------------------


SAMPLING = {"temperature": 1.2, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.3}


def test_per_row_keys_make_rows_independent_of_their_batch():
    keys = row_keys(3)
    out = run(FIRST, rng=keys, **SAMPLING)
    perm = np.random.default_rng(0).permutation(V)
    shuffled = run(FIRST[perm], rng=keys[perm], **SAMPLING)
    np.testing.assert_array_equal(np.asarray(shuffled.tokens), np.asarray(out.tokens)[perm])
    np.testing.assert_allclose(shuffled.log_probs, np.asarray(out.log_probs)[perm], atol=1e-5)
    # Rows 0 and 5 among entirely different neighbours (starts, keys and settings).
    first = np.full(V, 4)
    first[[0, 5]] = FIRST[[0, 5]]
    mixed_keys = row_keys(99)
    mixed_keys = mixed_keys.at[0].set(keys[0]).at[5].set(keys[5])
    settings = {name: np.full(V, value * 0.8, np.float32) for name, value in SAMPLING.items()}
    for name, value in SAMPLING.items():
        settings[name][[0, 5]] = value
    mixed = run(first, rng=mixed_keys, **settings)
    np.testing.assert_array_equal(np.asarray(mixed.tokens)[[0, 5]], np.asarray(out.tokens)[[0, 5]])
    assert (np.asarray(mixed.tokens)[1:5] != np.asarray(out.tokens)[1:5]).any()
    # Different keys give different rows: the same start, twelve keys.
    same_start = run(np.full(V, 4), rng=keys, **SAMPLING)
    assert len({tuple(r) for r in np.asarray(same_start.tokens)}) > V // 2


def test_sample_log_probs_are_those_of_the_processed_distribution():
    settings = {"temperature": np.resize(np.asarray([0.7, 1.0, 1.6], np.float32), V),
                "top_p": np.resize(np.asarray([1.0, 0.9, 0.6, 0.95], np.float32), V),
                "min_p": np.resize(np.asarray([0.0, 0.05], np.float32), V)}
    out = run(FIRST, seed=12, **settings)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    expected = np_processed_log_prob(TRANS, FIRST, tokens, lengths, **settings)
    np.testing.assert_allclose(out.sample_log_probs, expected, atol=1e-4)
    raw = [sum(log_softmax_np(TRANS[c])[t] for c, t in zip(np.r_[FIRST[b], tokens[b]],
                                                            tokens[b, :lengths[b]]))
           for b in range(V)]
    np.testing.assert_allclose(out.log_probs, raw, atol=1e-4)


def test_num_samples_layout_and_streams():
    n = 4
    keys = row_keys(9)
    temperature = np.where(FIRST % 2 == 0, 0.0, 1.5).astype(np.float32)  # even rows greedy
    greedy = np.asarray(greedy_reference().tokens)
    out = run(FIRST, temperature=temperature, num_samples=n, rng=keys)
    tokens = np.asarray(out.tokens).reshape(V, n, STEPS)  # row b's samples at b*n .. b*n+n-1
    np.testing.assert_array_equal(tokens[::2], np.repeat(greedy[::2, None], n, axis=1))
    # Row 3 emits EOS first with probability ~1 (TRANS[3, EOS] = 10): leave it out.
    distinct = [len({tuple(s) for s in tokens[b]}) for b in (1, 5, 7, 9, 11)]
    assert min(distinct) >= 2 and np.mean(distinct) > 3  # distinct streams per row
    assert out.cache["pos"].shape == (V * n,) and out.cache["calls"].shape == ()
    np.testing.assert_array_equal(out.cache["pos"], out.cache["calls"])

    # Sample j of row b is row b decoded with the key fold_in(key_b, j).
    for j in range(n):
        alone = run(FIRST, temperature=temperature,
                    rng=jax.vmap(jax.random.fold_in, (0, None))(keys, j))
        np.testing.assert_array_equal(tokens[:, j], alone.tokens)


def test_sampled_eos_invariants():
    out = run(np.zeros(V), temperature=2.0, num_samples=4, seed=5)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for row, length, lps in zip(tokens, lengths, np.asarray(out.token_log_probs)):
        eos_at = np.flatnonzero(row == EOS)
        expected_len = eos_at[0] + 1 if len(eos_at) else STEPS
        assert length == expected_len
        assert (row[length:] == 0).all() and (lps[length:] == 0).all()
        assert (lps[:length] < 0).all()
    assert (lengths < STEPS).any() and (lengths == STEPS).any()


# --- the sampled distribution -----------------------------------------------------------


HAND_LOGITS = np.asarray([2.0, 1.4, 1.0, 0.3, 0.0, -0.6, -1.1, -2.0], np.float32)


def expected_first_token_probs(logits, temperature, top_k, top_p, min_p):
    """softmax(logits / T) restricted to the top-k, the nucleus, then min-p, in numpy."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(len(z), bool)
    keep[order[: top_k or len(z)]] = True
    probs = np.where(keep, np.exp(z - z.max()), 0.0)
    probs /= probs.sum()
    if top_p < 1.0:
        sorted_p = probs[order]
        before = np.cumsum(sorted_p) - sorted_p
        nucleus = order[(before < top_p) | (np.arange(len(z)) == 0)]
        keep = np.zeros(len(z), bool)
        keep[nucleus] = True
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum()
    probs = np.where(probs >= min_p * probs.max(), probs, 0.0)
    return probs / probs.sum()


_choose = jax.jit(decoding.choose_tokens, static_argnames="top_k")


@pytest.mark.parametrize("top_k,cases", [
    (0, [(1.0, 1.0, 0.0), (0.7, 1.0, 0.0), (0.8, 0.7, 0.0), (1.0, 1.0, 0.2),
         (1.3, 0.8, 0.3)]),
    (5, [(1.5, 1.0, 0.0), (1.2, 0.85, 0.0), (2.0, 0.95, 0.4)]),
])
def test_sampled_distribution(top_k, cases):
    """All (temperature, top_p, min_p) cases in one batch drawn with one key, n draws
    each; chi-square against numpy, and the returned log-probs."""
    n = 4000
    settings = np.repeat(np.asarray(cases, np.float32), n, axis=0)  # [cases * n, 3]
    logits = jnp.broadcast_to(jnp.asarray(HAND_LOGITS), (len(settings), len(HAND_LOGITS)))
    tokens, log_probs = _choose(
        logits, jax.random.key(42), top_k=top_k,
        **{k: jnp.asarray(settings[:, i]) for i, k in enumerate(("temperature", "top_p",
                                                                 "min_p"))})
    drawn = np.asarray(tokens).reshape(len(cases), n)
    for c, (temperature, top_p, min_p) in enumerate(cases):
        counts = np.bincount(drawn[c], minlength=len(HAND_LOGITS))
        probs = expected_first_token_probs(HAND_LOGITS, temperature, top_k, top_p, min_p)
        assert counts[probs == 0].sum() == 0, cases[c]  # masked tokens never drawn
        support = probs > 0
        assert support.sum() >= 2, cases[c]
        expected = n * probs[support]
        chi2 = ((counts[support] - expected) ** 2 / expected).sum()
        assert chi2 < CHI2_999[int(support.sum()) - 1], (cases[c], counts, expected)
        np.testing.assert_allclose(log_probs[c * n:(c + 1) * n], np.log(probs[drawn[c]]),
                                   atol=1e-5)


def test_choose_tokens_per_row_keys_and_greedy_rows():
    logits = jnp.asarray(np.random.default_rng(4).normal(size=(6, V)).astype(np.float32))
    keys = row_keys(0, 6)
    temperature = jnp.asarray([0.9, 0.0, 0.9, 1.4, 0.0, 0.9])
    tokens, lps = _choose(logits, keys, temperature=temperature, top_k=4, top_p=0.8)
    greedy_rows = np.asarray(temperature) == 0
    np.testing.assert_array_equal(np.asarray(tokens)[greedy_rows],
                                  np.argmax(logits, -1)[greedy_rows])
    np.testing.assert_array_equal(np.asarray(lps)[greedy_rows], 0.0)
    perm = np.asarray([5, 3, 0, 1, 4, 2])
    again, _ = _choose(logits[perm], keys[perm], temperature=temperature[perm], top_k=4,
                       top_p=0.8)
    np.testing.assert_array_equal(again, np.asarray(tokens)[perm])
    tokens, lps = decoding.choose_tokens(logits, keys, temperature=0.0)  # static: no draw
    np.testing.assert_array_equal(tokens, np.argmax(logits, -1))
    np.testing.assert_array_equal(lps, 0.0)
    with pytest.raises(ValueError, match=r"keys must be one key or \[B=6\] keys"):
        decoding.choose_tokens(logits, keys[:4])


# --- EOS, forced prompts ----------------------------------------------------------------


def _eos_chain() -> np.ndarray:
    trans = np.zeros((V, V), np.float32)
    trans[:, 4] = 5.0  # default: go to 4
    trans[2, 3] = trans[3, EOS] = trans[5, 5] = trans[0, 2] = 10.0  # 2->3->EOS, 5->5
    return trans


@functools.cache
def eos_chain_greedy():
    """Greedy on the EOS chain with 4 as an extra (static) stop token."""
    step_fn = markov_step_fn(_eos_chain())
    return jax.jit(lambda first: decoding.greedy(
        step_fn, first, init_cache(first.shape[0]), max_decode_steps=6, stop_tokens=(4,)))


def test_eos_and_stop_tokens_pad_and_count():
    out = eos_chain_greedy()(jnp.asarray([2, 3, 5, 7]))
    np.testing.assert_array_equal(
        out.tokens,
        [[3, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [5, 5, 5, 5, 5, 5], [4, 0, 0, 0, 0, 0]],
    )
    np.testing.assert_array_equal(out.lengths, [2, 1, 6, 1])
    np.testing.assert_array_equal(out.token_log_probs[0, 2:], 0.0)
    assert int(out.cache["calls"]) == 6


def test_early_termination_when_all_finished():
    out = eos_chain_greedy()(jnp.asarray([2, 3, 7, 2]))
    assert int(out.cache["calls"]) == 2  # stopped once all had emitted EOS / a stop id
    np.testing.assert_array_equal(out.tokens[:, :3], [[3, 1, 0], [1, 0, 0], [4, 0, 0],
                                                      [3, 1, 0]])
    np.testing.assert_array_equal(out.tokens[:, 3:], 0)
    np.testing.assert_array_equal(out.lengths, [2, 1, 1, 2])


def test_forced_prompt_tokens():
    first = np.zeros(V, np.int32)
    first[3] = 7
    prompt = np.zeros((V, 3), np.int32)
    prompt[:4] = [[4, 5, 0], [6, 0, 0], [0, 0, 0], [EOS, 2, 0]]
    ref_tokens, ref_lps, ref_lengths = np_greedy(TRANS, first, STEPS, prompt=prompt)
    out = run(first, temperature=0.0, prompt=prompt)
    np.testing.assert_array_equal(out.tokens, ref_tokens)
    np.testing.assert_array_equal(out.tokens[:4, :2], [[4, 5], [6, ref_tokens[1, 1]],
                                                       ref_tokens[2, :2], [EOS, 2]])
    np.testing.assert_array_equal(out.lengths, ref_lengths)
    plen = (prompt != 0).sum(-1)
    pos = np.arange(STEPS)[None, :]
    mask = (pos >= plen[:, None]) & (pos < ref_lengths[:, None])
    np.testing.assert_array_equal(out.sampled_mask, mask)
    np.testing.assert_allclose(out.token_log_probs, ref_lps, atol=1e-5)
    np.testing.assert_allclose(out.log_probs, np.where(mask, ref_lps, 0).sum(-1), atol=1e-4)

    # Sampling respects the prefix as well; prompts longer than the output are cut.
    long_prompt = np.tile(np.arange(2, 2 + PROMPT_WIDTH), (V, 1))
    sampled = run(first, temperature=1.0, prompt=long_prompt)
    np.testing.assert_array_equal(sampled.tokens, long_prompt[:, :STEPS])
    np.testing.assert_array_equal(sampled.sample_log_probs, 0.0)


# --- per-example settings, processors, errors -------------------------------------------


def test_per_example_temperature():
    temps = np.where(FIRST % 2 == 0, 0.0, 1.5)
    out = run(FIRST, temperature=temps, seed=9)
    greedy = greedy_reference()
    np.testing.assert_array_equal(out.tokens[::2], greedy.tokens[::2])
    np.testing.assert_array_equal(out.sample_log_probs[::2], 0.0)
    assert (np.asarray(out.tokens[1::2]) != np.asarray(greedy.tokens[1::2])).any()


def test_logits_processor_runs_before_sampling():
    def ban_eos(logits, state):
        return logits.at[:, EOS].set(-jnp.inf)

    out = static_decoder(temperature=0.0, logits_processor=ban_eos)(
        jnp.asarray(FIRST), jax.random.key(0))
    assert not (np.asarray(out.tokens) == EOS).any()
    np.testing.assert_array_equal(out.lengths, STEPS)


def _sample_eagerly(steps=4, **kw):
    first = jnp.asarray(FIRST)
    return decoding.sample(STEP_FN, first, init_cache(V), max_decode_steps=steps,
                           rng=kw.pop("rng", jax.random.key(0)), **kw)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"temperature": -1.0}, "temperature=-1.0 must be >= 0"),
        ({"top_k": -2}, "top_k=-2 must be a Python int >= 0"),
        ({"top_p": 1.2}, r"top_p=1.2 must be in \[0, 1\]"),
        ({"min_p": -0.1}, r"min_p=-0.1 must be in \[0, 1\]"),
        ({"repetition_penalty": -1.0}, "repetition_penalty=-1.0 must be > 0"),
        ({"max_decode_steps": 0}, "max_decode_steps=0 must be a Python int >= 1"),
        ({"num_samples": 0}, "num_samples=0 must be a Python int >= 1"),
        ({"prompt_tokens": jnp.zeros((3, 2), jnp.int32)}, r"prompt_tokens must be \[B=12, P\]"),
        ({"context_tokens": jnp.zeros((12,), jnp.int32)}, r"context_tokens must be \[B=12, P\]"),
        ({"rng": jax.random.split(jax.random.key(0), 5)}, "rng has 5 keys but the batch has"),
        ({"rng": jax.random.split(jax.random.key(0), (2, 3))}, r"one PRNG key or \[B\] keys"),
        ({"stop_tokens": jnp.zeros((1, 2, 3), jnp.int32)}, r"stop_tokens must be \[n\]"),
    ],
)
def test_bad_arguments(kw, match):
    steps = kw.pop("max_decode_steps", 4)
    with pytest.raises(ValueError, match=match):
        _sample_eagerly(steps, **kw)

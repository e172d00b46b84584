"""Decoding against numpy references, with a Markov-chain step function (no model).

The step function's next-token logits depend only on the last token, through a fixed
random matrix; its cache counts the step_fn calls (to check early termination) and a
per-example position (to check the cache is threaded through).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like import decoding

V = 12
EOS = 1
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


def init_cache(batch: int):
    return {"calls": jnp.zeros((), jnp.int32), "pos": jnp.zeros((batch,), jnp.int32)}


def log_softmax_np(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_greedy(trans, first, steps, prompt=None):
    """Reference greedy decode with EOS and a forced prefix, one example at a time."""
    batch = len(first)
    tokens = np.zeros((batch, steps), np.int32)
    lps = np.zeros((batch, steps))
    lengths = np.zeros(batch, np.int32)
    for b in range(batch):
        cur = first[b]
        plen = 0 if prompt is None else int((prompt[b] != 0).sum())
        for i in range(steps):
            forced = i < plen
            tok = prompt[b, i] if forced else int(np.argmax(trans[cur]))
            tokens[b, i] = tok
            lps[b, i] = log_softmax_np(trans[cur])[tok]
            lengths[b] = i + 1
            cur = tok
            if not forced and tok == EOS:
                break
    return tokens, lps, lengths


def run(first, steps, **kw):
    first = jnp.asarray(first, jnp.int32)
    return decoding.sample(
        markov_step_fn(TRANS), first, init_cache(first.shape[0]), max_decode_steps=steps,
        rng=kw.pop("rng", jax.random.key(0)), **kw,
    )


FIRST = np.arange(V, dtype=np.int32)  # one chain from every token


# --- greedy and its equivalents ---------------------------------------------------------


def test_temperature_zero_is_numpy_argmax_chain():
    steps = 7
    ref_tokens, ref_lps, ref_lengths = np_greedy(TRANS, FIRST, steps)
    assert (ref_lengths < steps).any() and (ref_lengths == steps).any()  # both cases occur

    out = run(FIRST, steps, temperature=0.0)
    np.testing.assert_array_equal(out.tokens, ref_tokens)
    np.testing.assert_array_equal(out.lengths, ref_lengths)
    np.testing.assert_allclose(out.token_log_probs, ref_lps, atol=1e-5)
    np.testing.assert_allclose(out.log_probs, ref_lps.sum(-1), atol=1e-4)
    np.testing.assert_array_equal(out.sample_log_probs, 0.0)
    np.testing.assert_array_equal(
        out.sampled_mask, np.arange(steps)[None, :] < ref_lengths[:, None]
    )
    np.testing.assert_array_equal(out.cache["pos"], out.cache["calls"])

    g = decoding.greedy(markov_step_fn(TRANS), jnp.asarray(FIRST), init_cache(V),
                        max_decode_steps=steps)
    np.testing.assert_array_equal(g.tokens, ref_tokens)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_top_k_one_is_greedy(temperature):
    greedy = run(FIRST, 6, temperature=0.0)
    out = run(FIRST, 6, temperature=temperature, top_k=1, rng=jax.random.key(7))
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
    np.testing.assert_array_equal(out.lengths, greedy.lengths)
    np.testing.assert_allclose(out.log_probs, greedy.log_probs, atol=1e-6)
    np.testing.assert_array_equal(out.sample_log_probs, 0.0)  # a point mass


@pytest.mark.parametrize("top_p", [0.0, 1e-6])
def test_tiny_top_p_is_greedy(top_p):
    greedy = run(FIRST, 6, temperature=0.0)
    out = run(FIRST, 6, temperature=2.0, top_p=top_p, rng=jax.random.key(3))
    np.testing.assert_array_equal(out.tokens, greedy.tokens)


def test_top_p_one_changes_nothing():
    kw = {"temperature": 1.3, "rng": jax.random.key(11)}
    base = run(FIRST, 8, **kw)
    for p in (1.0, jnp.asarray(1.0), jnp.ones((V,))):
        out = run(FIRST, 8, top_p=p, **kw)
        np.testing.assert_array_equal(out.tokens, base.tokens)
        # Same distribution; only XLA's fusion of the log-softmax differs between programs.
        np.testing.assert_allclose(out.sample_log_probs, base.sample_log_probs, rtol=1e-6)
    logits = jnp.asarray([[0.5, -jnp.inf, 3.0, 3.0, -20.0]])
    np.testing.assert_array_equal(decoding.top_p_mask(logits, jnp.float32(1.0)), logits)
    assert decoding.top_p_mask(logits, 1.0) is logits


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


def _kept(probs, p):
    return np.isfinite(np.asarray(decoding.top_p_mask(jnp.log(jnp.asarray(probs)), p)))


def test_top_p_mask_smallest_set_reaching_p():
    probs = [0.05, 0.5, 0.15, 0.3]  # sorted: 0.5 (id 1), 0.3 (id 3), 0.15 (id 2), 0.05
    np.testing.assert_array_equal(_kept(probs, 0.0), [0, 1, 0, 0])  # top always kept
    np.testing.assert_array_equal(_kept(probs, 0.3), [0, 1, 0, 0])
    np.testing.assert_array_equal(_kept(probs, 0.75), [0, 1, 0, 1])
    np.testing.assert_array_equal(_kept(probs, 0.81), [0, 1, 1, 1])
    np.testing.assert_array_equal(_kept(probs, 0.96), [1, 1, 1, 1])
    # Per-row p.
    rows = jnp.log(jnp.asarray([probs, probs]))
    kept = np.isfinite(decoding.top_p_mask(rows, jnp.asarray([0.3, 0.81])))
    np.testing.assert_array_equal(kept, [[0, 1, 0, 0], [0, 1, 1, 1]])


def test_top_p_mask_ties_at_the_boundary_are_all_kept():
    probs = [0.2, 0.4, 0.2, 0.2]
    # Minimal set for p=0.5 is {1, one of the 0.2s}; the cut is by value, so all tied
    # tokens are kept rather than an arbitrary one of them.
    np.testing.assert_array_equal(_kept(probs, 0.5), [1, 1, 1, 1])
    np.testing.assert_array_equal(_kept(probs, 0.35), [0, 1, 0, 0])
    with pytest.raises(ValueError, match=r"top_p=1.5 must be in \[0, 1\]"):
        decoding.top_p_mask(jnp.zeros((1, 3)), 1.5)


# --- the sampled distribution -----------------------------------------------------------


HAND_LOGITS = np.asarray([2.0, 1.4, 1.0, 0.3, 0.0, -0.6, -1.1, -2.0], np.float32)


def expected_first_token_probs(logits, temperature, top_k, top_p):
    """softmax(logits / T) restricted to the top-k, then to the nucleus, in numpy."""
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
    return probs


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.5, 4, 1.0), (0.8, 0, 0.7), (1.2, 5, 0.85)],
)
def test_first_token_distribution(temperature, top_k, top_p):
    n = 4000
    logits = jnp.asarray(HAND_LOGITS)

    def step_fn(tokens, cache):
        return jnp.broadcast_to(logits, (tokens.shape[0], logits.shape[0])), cache

    out = decoding.sample(
        step_fn, jnp.zeros((n,), jnp.int32), (), max_decode_steps=1, rng=jax.random.key(42),
        temperature=temperature, top_k=top_k, top_p=top_p,
    )
    counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=len(HAND_LOGITS))
    probs = expected_first_token_probs(HAND_LOGITS, temperature, top_k, top_p)
    assert counts[probs == 0].sum() == 0  # masked tokens never drawn
    support = probs > 0
    expected = n * probs[support]
    chi2 = ((counts[support] - expected) ** 2 / expected).sum()
    assert chi2 < CHI2_999[int(support.sum()) - 1], (counts, expected)
    # sample_log_probs is the log-prob under the distribution that was sampled from.
    np.testing.assert_allclose(
        out.sample_log_probs, np.log(probs[np.asarray(out.tokens[:, 0])]), atol=1e-5
    )
    np.testing.assert_allclose(
        out.log_probs, log_softmax_np(HAND_LOGITS)[np.asarray(out.tokens[:, 0])], atol=1e-5
    )


# --- EOS, forced prompts ----------------------------------------------------------------


def _eos_chain() -> np.ndarray:
    trans = np.zeros((V, V), np.float32)
    trans[:, 4] = 5.0  # default: go to 4
    trans[2, 3] = trans[3, EOS] = trans[5, 5] = trans[0, 2] = 10.0  # 2->3->EOS, 5->5
    return trans


def test_eos_pads_and_counts():
    step_fn = markov_step_fn(_eos_chain())
    out = decoding.greedy(step_fn, jnp.asarray([2, 3, 5]), init_cache(3), max_decode_steps=6)
    np.testing.assert_array_equal(
        out.tokens, [[3, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [5, 5, 5, 5, 5, 5]]
    )
    np.testing.assert_array_equal(out.lengths, [2, 1, 6])
    np.testing.assert_array_equal(out.token_log_probs[0, 2:], 0.0)
    assert int(out.cache["calls"]) == 6


def test_early_termination_when_all_finished():
    step_fn = markov_step_fn(_eos_chain())
    out = decoding.greedy(step_fn, jnp.asarray([2, 3]), init_cache(2), max_decode_steps=50)
    assert int(out.cache["calls"]) == 2  # stopped once both had emitted EOS
    assert out.tokens.shape == (2, 50)
    np.testing.assert_array_equal(out.tokens[:, :3], [[3, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(out.tokens[:, 3:], 0)
    np.testing.assert_array_equal(out.lengths, [2, 1])


def test_sampled_eos_invariants():
    out = run(np.zeros(256, np.int32), 12, temperature=2.0, rng=jax.random.key(5))
    tokens = np.asarray(out.tokens)
    for row, length, lps in zip(tokens, np.asarray(out.lengths), np.asarray(out.token_log_probs)):
        eos_at = np.flatnonzero(row == EOS)
        expected_len = eos_at[0] + 1 if len(eos_at) else 12
        assert length == expected_len
        assert (row[length:] == 0).all() and (lps[length:] == 0).all()
        assert (lps[:length] < 0).all()
    assert (np.asarray(out.lengths) < 12).any() and (np.asarray(out.lengths) == 12).any()


def test_forced_prompt_tokens():
    first = np.asarray([0, 0, 0, 7], np.int32)
    prompt = np.asarray([[4, 5, 0], [6, 0, 0], [0, 0, 0], [EOS, 2, 0]], np.int32)
    ref_tokens, ref_lps, ref_lengths = np_greedy(TRANS, first, 6, prompt=prompt)
    out = run(first, 6, temperature=0.0, prompt_tokens=jnp.asarray(prompt))
    np.testing.assert_array_equal(out.tokens, ref_tokens)
    np.testing.assert_array_equal(out.tokens[:, :2], [[4, 5], [6, ref_tokens[1, 1]],
                                                      ref_tokens[2, :2], [EOS, 2]])
    np.testing.assert_array_equal(out.lengths, ref_lengths)
    plen = (prompt != 0).sum(-1)
    pos = np.arange(6)[None, :]
    mask = (pos >= plen[:, None]) & (pos < ref_lengths[:, None])
    np.testing.assert_array_equal(out.sampled_mask, mask)
    np.testing.assert_allclose(out.token_log_probs, ref_lps, atol=1e-5)
    np.testing.assert_allclose(out.log_probs, np.where(mask, ref_lps, 0).sum(-1), atol=1e-4)

    # Sampling respects the prefix as well; prompts longer than the output are cut.
    long_prompt = jnp.asarray(np.tile([[4, 5, 6, 7, 8, 9, 10, 11]], (4, 1)))
    sampled = run(first, 5, temperature=1.0, prompt_tokens=long_prompt)
    np.testing.assert_array_equal(sampled.tokens, np.tile([[4, 5, 6, 7, 8]], (4, 1)))
    np.testing.assert_array_equal(sampled.sample_log_probs, 0.0)


# --- jit, per-example settings, errors --------------------------------------------------


def test_under_jit_matches_eager():
    step_fn = markov_step_fn(TRANS)

    @functools.partial(jax.jit, static_argnames=("top_k",))
    def decode(first, rng, temperature, top_p, top_k):
        return decoding.sample(step_fn, first, init_cache(first.shape[0]), max_decode_steps=8,
                               rng=rng, temperature=temperature, top_k=top_k, top_p=top_p)

    first = jnp.asarray(FIRST)
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.8, 5, 0.9), (0.0, 0, 1.0)]:
        jitted = decode(first, jax.random.key(1), temperature, top_p, top_k)
        eager = run(FIRST, 8, temperature=temperature, top_k=top_k, top_p=top_p,
                    rng=jax.random.key(1))
        np.testing.assert_array_equal(jitted.tokens, eager.tokens)
        np.testing.assert_allclose(jitted.log_probs, eager.log_probs, atol=1e-5)
    # A traced temperature of 0 is still exact greedy.
    np.testing.assert_array_equal(jitted.tokens, run(FIRST, 8, temperature=0.0).tokens)


def test_per_example_temperature():
    temps = jnp.where(jnp.arange(V) % 2 == 0, 0.0, 1.5)
    out = run(FIRST, 7, temperature=temps, rng=jax.random.key(9))
    greedy = run(FIRST, 7, temperature=0.0)
    np.testing.assert_array_equal(out.tokens[::2], greedy.tokens[::2])
    np.testing.assert_array_equal(out.sample_log_probs[::2], 0.0)
    assert (np.asarray(out.tokens[1::2]) != np.asarray(greedy.tokens[1::2])).any()


def test_logits_processor_runs_before_sampling():
    def ban_eos(logits, state):
        return logits.at[:, EOS].set(-jnp.inf)

    out = run(FIRST, 6, temperature=0.0, logits_processor=ban_eos)
    assert not (np.asarray(out.tokens) == EOS).any()
    np.testing.assert_array_equal(out.lengths, 6)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"temperature": -1.0}, "temperature=-1.0 must be >= 0"),
        ({"top_k": -2}, "top_k=-2 must be a Python int >= 0"),
        ({"top_p": 1.2}, r"top_p=1.2 must be in \[0, 1\]"),
        ({"max_decode_steps": 0}, "max_decode_steps=0 must be a Python int >= 1"),
        ({"prompt_tokens": jnp.zeros((3, 2), jnp.int32)}, r"prompt_tokens must be \[B=12, P\]"),
    ],
)
def test_bad_arguments(kw, match):
    steps = kw.pop("max_decode_steps", 4)
    with pytest.raises(ValueError, match=match):
        run(FIRST, steps, **kw)

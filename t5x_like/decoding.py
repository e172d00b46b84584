"""Model-agnostic autoregressive decoding: sampling, greedy, beam search and best-of-N.

Every decoder drives the network through one *step function*:

    step_fn(tokens: [B, 1] int32, cache: PyTree) -> (logits: [B, V] float32, new_cache)

`tokens` is the token at the current position, `logits` the next-token logits, and the
cache an explicit pytree the model takes and returns (KV cache, positions, ...). Because
the cache is a plain pytree, decoders can reorder it (`beam_search`), copy it
(`num_samples`, `best_of_n`, prefix caching) or roll it back (speculative decoding).

Output convention (T5-style): `tokens[:, i]` is the token chosen at step i, i.e. the
input fed at step 0 (`first_tokens`, e.g. T5's pad/BOS 0) is *not* part of the output.
After a sequence emits `eos_id` (or one of `stop_tokens`) it emits only padding (0); the
loop stops as soon as every sequence has finished, leaving the remaining positions 0.

Logit processing is split into small public functions. `sample` applies them in this
order (steps 2-6 in Hugging Face's order; a custom processor runs first, as in vLLM):

  1. `logits_processor(logits, state)`, optional: anything that needs the loop state;
  2. `apply_penalties`: the repetition penalty (HF / vLLM, over the prompt and the
     generated tokens), then the frequency and presence penalties (OpenAI / vLLM, over
     the generated tokens);
  3. `apply_temperature`;
  4. `top_k_mask`;
  5. `top_p_mask`: the nucleus of the temperature-scaled, top-k-filtered distribution;
  6. `min_p_mask`: keeps p_i >= min_p * p_max, i.e. logit_i >= max logit + log(min_p).

Min-p is a threshold relative to the top token, so it keeps the same set before or
after top-k, and the top token survives every step. Relative to top-p its place
matters: here (as in HF) the nucleus is taken before min-p; vLLM applies min-p before
top-k / top-p, which can give a different nucleus when both are set. Greedy rows
(temperature 0) take the argmax right after step 2. `process_logits` is steps 3-6;
`choose_tokens` is steps 3-6 plus the draw, shared with other decoders (a serving
engine, speculative decoding).

Decoders: `sample` (temperature / top-k / top-p / min-p sampling with penalties, stop
tokens and `num_samples` draws per row), `greedy` (temperature 0), `beam_search` (T5X's:
brevity penalty ((5 + length) / 6) ** alpha, early stop once no alive beam can win) and
`best_of_n` (N samples per row, the best by model log-prob or a `score_fn`).

Randomness: `rng` is one key, split once per step for the whole batch, or [B] keys, one
per row. With per-row keys, row b's draw at step i uses `fold_in(rng[b], i)` and nothing
else, so a row decodes identically whatever batch it sits in and wherever (continuous
batching relies on this).

Caches: decoders that copy or reorder rows (`num_samples`, `beam_search`) treat every
cache leaf whose leading dimension is the batch size B as batch-major and leave the
other leaves (scalars, shared tables) as they are. With B = 1 a non-batch leaf of
leading size 1 would be copied too; the model caches here have batch-major leaves only.

Shapes: B batch, V vocab, S max_decode_steps, P prompt length, N samples per row,
K beam size.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
StepFn = Callable[[jax.Array, PyTree], tuple[jax.Array, PyTree]]
# (logits [B, V], state) -> logits [B, V]; runs before the penalties and temperature.
LogitsProcessor = Callable[[jax.Array, "SamplingState"], jax.Array]
# (tokens [B, N, S], lengths [B, N]) -> scores [B, N]; higher is better.
ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]

PAD_ID = 0


def _is_static(x: Any) -> bool:
    """A Python / numpy scalar, known at trace time (as opposed to a jax array)."""
    return not isinstance(x, jax.Array) and jnp.ndim(x) == 0


def _is_static_value(x: Any, value: float) -> bool:
    return _is_static(x) and float(x) == value


def _is_static_zero(x: float | jax.Array) -> bool:
    return _is_static_value(x, 0.0)


def _per_row(x: float | jax.Array) -> jax.Array:
    """A scalar or one value per row [...] -> f32 that broadcasts against [..., V]."""
    x = jnp.asarray(x, jnp.float32)
    return x[..., None] if x.ndim else x


# --- logit processing --------------------------------------------------------------------


def apply_temperature(logits: jax.Array, temperature: float | jax.Array) -> jax.Array:
    """Divides `logits` [..., V] by `temperature` (a scalar or one value per row [...]).

    Rows whose temperature is 0 are returned unscaled: temperature 0 means greedy, which
    the caller resolves with an argmax (dividing by 0 would give inf / nan).
    """
    t = _per_row(temperature)
    safe_t = jnp.where(t > 0, t, 1.0)
    return logits / safe_t


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """Keeps exactly the `k` largest logits of each row [..., V]; the rest become -inf.

    Uses `jax.lax.top_k` (no full sort). Ties are broken towards the lower token id (the
    order `lax.top_k` returns), so exactly `k` entries survive even when values tie.
    `k == 0` or `k >= V` returns `logits` unchanged. `k` must be a static Python int.
    """
    if k < 0:
        raise ValueError(f"top_k={k} must be >= 0 (0 disables top-k)")
    vocab = logits.shape[-1]
    if k == 0 or k >= vocab:
        return logits
    flat = logits.reshape(-1, vocab)  # [..., V] -> [N, V]
    _, idx = jax.lax.top_k(flat, k)  # [N, k]
    rows = jnp.arange(flat.shape[0])[:, None]  # [N, 1]
    keep = jnp.zeros(flat.shape, jnp.bool_).at[rows, idx].set(True)
    return jnp.where(keep, flat, -jnp.inf).reshape(logits.shape)


def _top_p_disabled(p: float | jax.Array) -> bool:
    """Checks a static `p` and says whether it statically disables top-p (p >= 1)."""
    if not _is_static(p):
        return False
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"top_p={p} must be in [0, 1] (1 disables top-p)")
    return float(p) >= 1.0


def _ordered_bits(x: jax.Array) -> jax.Array:
    """float32 [...] -> uint32 [...] in the same order: x < y iff bits(x) < bits(y).

    The IEEE sign-magnitude layout made monotone: negative floats have all bits flipped,
    non-negative ones their sign bit set. -0.0 is first mapped to +0.0 so that the two
    zeros, which compare equal as floats, tie here as well.
    """
    x = x.astype(jnp.float32)
    x = jnp.where(x == 0, jnp.float32(0), x)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def top_p_mask(logits: jax.Array, p: float | jax.Array) -> jax.Array:
    """Nucleus filtering: keeps the smallest set of most likely tokens whose total
    probability (under softmax(logits)) is >= `p`; the rest become -inf.

    - The most likely token is always kept (so `p == 0` keeps only the top token).
    - Ties: the cut is made by value, so every token whose logit equals the smallest kept
      logit is kept too; with ties at the boundary the kept set can be larger than the
      minimal one (it never depends on the order of tied tokens).
    - `p >= 1` keeps everything and returns `logits` exactly (for a static Python float
      without any computation; for a traced `p` through an exact `where`).

    `p` is a scalar or one value per row (shape `logits.shape[:-1]`).

    No sort: the kept set is {logit >= c}, where c is the smallest logit value whose
    strictly-larger tokens hold less than p of the mass. With M(t) = mass of the tokens
    whose order-preserving uint32 key (`_ordered_bits`) is > t, which falls as t grows,
    32 passes of O(V) compare-and-sum build bit by bit the largest t with M(t) >= p; the
    tokens kept are those with key > t. Same set as `_top_p_mask_sorted` (the sort-based
    reference), up to float rounding of the mass sums at a cut that is within rounding
    of p.
    """
    if _top_p_disabled(p):
        return logits
    p = _per_row(p)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    keys = _ordered_bits(logits)

    def try_bit(i: jax.Array, below: jax.Array) -> jax.Array:
        # Invariant: M(below) >= p (M(0) is the whole mass: every non-NaN key is > 0).
        trial = below | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))  # bits high to low
        mass_above = jnp.sum(jnp.where(keys > trial, probs, 0.0), axis=-1, keepdims=True)
        return jnp.where(mass_above >= p, trial, below)

    # 8 trips of 4 unrolled passes: a full unroll compiles several times slower.
    below = jax.lax.fori_loop(
        0, 32, try_bit, jnp.zeros((*logits.shape[:-1], 1), jnp.uint32), unroll=4)
    # p == 0: nothing holds less than 0, `below` ends at 2**32 - 1 and only the top
    # token(s) are kept by the second term.
    top = jnp.max(logits, axis=-1, keepdims=True)
    keep = (keys > below) | (logits >= top) | (p >= 1.0)
    return jnp.where(keep, logits, -jnp.inf)


def _top_p_mask_sorted(logits: jax.Array, p: float | jax.Array) -> jax.Array:
    """The sort-based `top_p_mask`: the reference the bisection is tested against."""
    if _top_p_disabled(p):
        return logits
    p = _per_row(p)
    sorted_logits = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)  # descending [..., V]
    sorted_probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
    # Probability mass strictly before each sorted position; position j is needed iff
    # the tokens before it have not reached p yet. This is a prefix of the sorted order.
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep = (mass_before < p) | (p >= 1.0)
    keep = keep.at[..., 0].set(True)
    num_kept = jnp.sum(keep, axis=-1, keepdims=True)  # [..., 1]
    cutoff = jnp.take_along_axis(sorted_logits, num_kept - 1, axis=-1)  # [..., 1]
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def _top_k_top_p_mask(logits: jax.Array, k: int, p: float | jax.Array) -> jax.Array:
    """`top_p_mask(top_k_mask(logits, k), p)` ordering only the k survivors.

    `lax.top_k` already returns the k largest in descending order, so the nucleus is a
    cumulative sum over k entries instead of a sort of V. Requires 0 < k < V.
    """
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)  # [..., V] -> [N, V]
    p = jnp.broadcast_to(jnp.asarray(p, jnp.float32), logits.shape[:-1]).reshape(-1, 1)
    values, idx = jax.lax.top_k(flat, k)  # [N, k] descending
    probs = jax.nn.softmax(values.astype(jnp.float32), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < p) | (p >= 1.0)
    keep = keep.at[:, 0].set(True)
    num_kept = jnp.sum(keep, axis=-1, keepdims=True)  # [N, 1]
    cutoff = jnp.take_along_axis(values, num_kept - 1, axis=-1)  # [N, 1]
    rows = jnp.arange(flat.shape[0])[:, None]  # [N, 1]
    in_top_k = jnp.zeros(flat.shape, jnp.bool_).at[rows, idx].set(True)
    return jnp.where(in_top_k & (flat >= cutoff), flat, -jnp.inf).reshape(logits.shape)


def min_p_mask(logits: jax.Array, min_p: float | jax.Array) -> jax.Array:
    """Min-p filtering (HF `MinPLogitsWarper`, vLLM `min_p`): keeps the tokens whose
    probability under softmax(logits) is >= `min_p` times the top token's; the rest
    become -inf.

    `min_p` is in [0, 1], a scalar or one value per row (`logits.shape[:-1]`). The top
    token is always kept; a static 0 returns `logits` unchanged, a traced 0 keeps every
    entry exactly.
    """
    if _is_static(min_p):
        if not 0.0 <= float(min_p) <= 1.0:
            raise ValueError(f"min_p={min_p} must be in [0, 1] (0 disables min-p)")
        if float(min_p) == 0.0:
            return logits
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top = jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs >= _per_row(min_p) * top, logits, -jnp.inf)


def process_logits(
    logits: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    top_k: int = 0,
    top_p: float | jax.Array = 1.0,
    min_p: float | jax.Array = 0.0,
) -> jax.Array:
    """The distribution a sampler draws from: temperature, top-k, top-p, then min-p.

    Top-p sees the temperature-scaled, top-k-filtered distribution (as in T5X and HF);
    with both top-k and top-p only the k survivors are ordered. Masked entries are
    -inf. Rows with temperature 0 are left unscaled (see `apply_temperature`); greedy
    decoding takes their argmax instead of sampling. `logits` is [..., V]; temperature,
    top_p and min_p are scalars or one value per row (`logits.shape[:-1]`).
    """
    logits = apply_temperature(logits.astype(jnp.float32), temperature)
    if 0 < top_k < logits.shape[-1] and not _top_p_disabled(top_p):
        logits = _top_k_top_p_mask(logits, top_k, top_p)
    else:
        logits = top_p_mask(top_k_mask(logits, top_k), top_p)
    return min_p_mask(logits, min_p)


def apply_penalties(
    logits: jax.Array,
    token_counts: jax.Array,
    *,
    context_mask: jax.Array | None = None,
    repetition_penalty: float | jax.Array = 1.0,
    presence_penalty: float | jax.Array = 0.0,
    frequency_penalty: float | jax.Array = 0.0,
) -> jax.Array:
    """Repetition, then frequency and presence penalties on `logits` [B, V] (vLLM's order).

    - repetition (HF / vLLM, > 0, 1 disables): for every token in `context_mask` or
      generated so far, a logit > 0 is divided by the penalty, any other multiplied by
      it, so a penalty > 1 always makes the token less likely.
    - frequency / presence (OpenAI / vLLM, 0 disables; negative values encourage):
      logit -= frequency * count + presence * (count > 0), over generated tokens only.

    Args:
      logits: [B, V].
      token_counts: [B, V] int32, how many times each token was generated so far.
      context_mask: optional [B, V] bool, the prompt's tokens (repetition penalty only).
      repetition_penalty, presence_penalty, frequency_penalty: scalars or [B]. A static
        neutral value skips its term.
    """
    logits = logits.astype(jnp.float32)
    _check_repetition_penalty(repetition_penalty)
    if not _is_static_value(repetition_penalty, 1.0):
        seen = token_counts > 0
        if context_mask is not None:
            seen = seen | context_mask
        r = _per_row(repetition_penalty)
        logits = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
    if not _is_static_zero(frequency_penalty):
        logits = logits - _per_row(frequency_penalty) * token_counts
    if not _is_static_zero(presence_penalty):
        logits = logits - _per_row(presence_penalty) * (token_counts > 0)
    return logits


def _check_repetition_penalty(penalty: float | jax.Array) -> None:
    if _is_static(penalty) and float(penalty) <= 0:
        raise ValueError(
            f"repetition_penalty={penalty} must be > 0 (1 disables it; > 1 discourages "
            "repeats)"
        )


def _token_mask(tokens: jax.Array, vocab: int) -> jax.Array:
    """[B, P] int32 token ids (0 = padding) -> [B, V] bool: which ids occur in the row."""
    rows = jnp.arange(tokens.shape[0])[:, None]  # [B, 1]
    mask = jnp.zeros((tokens.shape[0], vocab), jnp.bool_).at[rows, tokens].set(True)
    return mask.at[:, PAD_ID].set(False)


# --- one draw ----------------------------------------------------------------------------


def _as_keys(rng: jax.Array) -> jax.Array:
    """A key or [B] keys, typed or raw uint32 -> a typed key array of shape () or [B]."""
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)
    if rng.ndim > 1:
        raise ValueError(
            f"rng must be one PRNG key or [B] keys (one per row), got key shape {rng.shape}"
        )
    return rng


def choose_tokens(
    logits: jax.Array,
    keys: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    top_k: int = 0,
    top_p: float | jax.Array = 1.0,
    min_p: float | jax.Array = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """One decoding step for every row: `process_logits`, then a draw (or an argmax).

    Args:
      logits: [B, V], after any penalties (`apply_penalties`).
      keys: one PRNG key, which draws the whole batch at once (`jax.random.categorical`
        on [B, V]), or [B] keys, row b drawn with `keys[b]` alone, so that its token
        depends on its key and logits only. Typed or raw.
      temperature: >= 0, scalar or [B]; rows at 0 take the exact argmax of `logits`. A
        static 0 draws nothing.
      top_k, top_p, min_p: as `process_logits` (top_k a static int; the others scalars
        or [B]).

    Returns:
      (tokens [B] int32, log_probs [B] f32): the chosen tokens and their log-probs under
      the processed distribution they were drawn from (0 for argmax rows, a point mass).
    """
    logits = logits.astype(jnp.float32)
    batch = logits.shape[0]
    greedy_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if _is_static_zero(temperature):
        return greedy_tokens, jnp.zeros((batch,), jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)
    if temperature.ndim not in (0, 1):
        raise ValueError(f"temperature must be a scalar or [B], got {temperature.shape}")
    processed = process_logits(
        logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p
    )
    keys = _as_keys(keys)
    if keys.ndim == 0:
        sampled = jax.random.categorical(keys, processed, axis=-1)
    elif keys.shape == (batch,):
        sampled = jax.vmap(jax.random.categorical)(keys, processed)
    else:
        raise ValueError(f"keys must be one key or [B={batch}] keys, got shape {keys.shape}")
    is_greedy = jnp.broadcast_to(temperature == 0, (batch,))
    chosen = jnp.where(is_greedy, greedy_tokens, sampled.astype(jnp.int32))
    log_probs = jnp.take_along_axis(
        jax.nn.log_softmax(processed, axis=-1), chosen[:, None], axis=-1
    )[:, 0]
    return chosen, jnp.where(is_greedy, 0.0, log_probs)


# --- batch-major cache leaves ------------------------------------------------------------


def _batch_major_flags(tree: PyTree, batch: int) -> list[bool]:
    """Per leaf of `tree`: is its leading dimension the batch (size `batch`)?"""
    return [jnp.ndim(x) >= 1 and jnp.shape(x)[0] == batch for x in jax.tree.leaves(tree)]


def _map_batch_major(fn: Callable[[jax.Array], jax.Array], tree: PyTree,
                     flags: list[bool]) -> PyTree:
    leaves, treedef = jax.tree.flatten(tree)
    if len(leaves) != len(flags):
        raise ValueError(
            f"the cache changed structure: {len(flags)} leaves before a step_fn call, "
            f"{len(leaves)} after; step_fn must return a cache of the same structure"
        )
    return jax.tree.unflatten(
        treedef, [fn(x) if f else x for x, f in zip(leaves, flags)]
    )


def _repeat_rows(x: Any, n: int) -> Any:
    """[B, ...] -> [B * n, ...], row b at b*n .. b*n+n-1; scalars and None unchanged."""
    if x is None or n == 1 or jnp.ndim(x) == 0:
        return x
    return jnp.repeat(x, n, axis=0)


# --- the sampling loop -------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingState:
    """The while-loop carry. Decoders that need more (beams, draft tokens) add fields.

    `step` is both the loop iteration and the output position written in it. `rng` is
    one key (split every step) or [B] keys (constant; step i draws with
    `fold_in(rng[b], i)`). `token_counts` is [B, V] int32, the generated tokens counted
    per id, and only present (not None) when a penalty is enabled.
    """

    step: jax.Array  # () int32
    cur_tokens: jax.Array  # [B] int32: what the next step_fn call consumes
    cache: PyTree
    rng: jax.Array
    tokens: jax.Array  # [B, S] int32 chosen tokens, 0 after EOS / not yet written
    token_log_probs: jax.Array  # [B, S] f32 raw model log-prob of each chosen token
    sample_log_probs: jax.Array  # [B] f32 sum over sampled tokens, processed distribution
    finished: jax.Array  # [B] bool: EOS or a stop token sampled
    lengths: jax.Array  # [B] int32 tokens emitted so far (forced prefix and EOS included)
    token_counts: jax.Array | None = None  # [B, V] int32, with penalties only


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeOutput:
    """What `sample` / `greedy` return. Shapes: B batch (B * N with `num_samples=N`),
    S max_decode_steps.

    tokens: [B, S] int32. Position i holds the token chosen at step i (forced prompt
      tokens included); 0 after EOS / a stop token and after the loop stopped early.
    lengths: [B] int32. Number of emitted tokens, counting the forced prefix and the EOS
      (or stop token) itself; S when none was sampled.
    log_probs: [B] f32. Sum of the *raw model* log-probs (log_softmax of the step_fn
      logits, before any processing) of the sampled tokens, i.e. what scoring the
      generated tokens with the model gives. Forced prompt tokens and padding excluded.
    sample_log_probs: [B] f32. Sum of the log-probs of the sampled tokens under the
      *processed* distribution they were drawn from (logits_processor, penalties,
      temperature, top-k, top-p, min-p; T5X's `rescale_log_probs=True`). Greedy steps
      contribute 0 (a point mass), so it is 0 for greedy decoding and for top_k=1.
    token_log_probs: [B, S] f32. Raw model log-prob of every emitted token, forced
      prompt tokens included; 0 at padding.
    sampled_mask: [B, S] bool. True where the token was chosen by the decoder (neither
      forced by the prompt nor padding). `log_probs == sum(token_log_probs, where=mask)`.
    cache: the cache returned by the last step_fn call (e.g. to continue decoding).
    """

    tokens: jax.Array
    lengths: jax.Array
    log_probs: jax.Array
    sample_log_probs: jax.Array
    token_log_probs: jax.Array
    sampled_mask: jax.Array
    cache: PyTree


def _as_f32(out: tuple[jax.Array, PyTree]) -> tuple[jax.Array, PyTree]:
    return out[0].astype(jnp.float32), out[1]


def _stop_ids(stop_tokens: Sequence[int] | jax.Array) -> jax.Array | None:
    """`stop_tokens` as int32 [n] (every row) or [B, n] (per row); None when empty."""
    stop = jnp.asarray(stop_tokens, jnp.int32)
    if stop.size and stop.ndim not in (1, 2):
        raise ValueError(f"stop_tokens must be [n] or [B, n] ids, got shape {stop.shape}")
    return stop if stop.size else None


def _ends_sequence(tokens: jax.Array, *, eos_id: int, stop: jax.Array | None) -> jax.Array:
    """tokens [B, ...] -> bool [B, ...]: EOS or one of the row's stop tokens."""
    ends = tokens == eos_id
    if stop is not None:
        stop = jnp.atleast_2d(stop)  # [1 or B, n]
        stop = stop.reshape(stop.shape[0], *([1] * (tokens.ndim - 1)), stop.shape[-1])
        ends = ends | jnp.any(tokens[..., None] == stop, axis=-1)
    return ends


def _check_steps(first_tokens: jax.Array, max_decode_steps: int) -> None:
    if first_tokens.ndim != 1:
        raise ValueError(
            f"first_tokens must be [B] int32, got shape {first_tokens.shape}; "
            "pass the last token of each sequence (e.g. zeros for T5's start token)"
        )
    if not isinstance(max_decode_steps, numbers.Integral) or max_decode_steps < 1:
        raise ValueError(f"max_decode_steps={max_decode_steps!r} must be a Python int >= 1")


def _check_initial_logits(first_tokens: jax.Array, initial_logits: jax.Array | None) -> None:
    if initial_logits is not None and (
        initial_logits.ndim != 2 or initial_logits.shape[0] != first_tokens.shape[0]
    ):
        raise ValueError(
            f"initial_logits must be [B={first_tokens.shape[0]}, V], got {initial_logits.shape}"
        )


def _check_args(
    first_tokens: jax.Array,
    max_decode_steps: int,
    temperature: float | jax.Array,
    top_k: int,
    top_p: float | jax.Array,
    min_p: float | jax.Array,
    repetition_penalty: float | jax.Array,
    prompt_tokens: jax.Array | None,
    context_tokens: jax.Array | None,
    num_samples: int,
) -> None:
    _check_steps(first_tokens, max_decode_steps)
    if not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} must be a Python int >= 0 (0 disables top-k)")
    if _is_static(temperature) and float(temperature) < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
    _top_p_disabled(top_p)  # range check of a static value
    if _is_static(min_p) and not 0.0 <= float(min_p) <= 1.0:
        raise ValueError(f"min_p={min_p} must be in [0, 1] (0 disables min-p)")
    _check_repetition_penalty(repetition_penalty)
    for name, tokens in (("prompt_tokens", prompt_tokens), ("context_tokens", context_tokens)):
        if tokens is not None and (tokens.ndim != 2 or tokens.shape[0] != first_tokens.shape[0]):
            raise ValueError(
                f"{name} must be [B={first_tokens.shape[0]}, P], got {tokens.shape}"
            )
    if not isinstance(num_samples, numbers.Integral) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} must be a Python int >= 1")


def _vocab_size(step_fn: StepFn, first_tokens: jax.Array, cache: PyTree,
                initial_logits: jax.Array | None) -> int:
    if initial_logits is not None:
        return initial_logits.shape[-1]
    logits, _ = jax.eval_shape(step_fn, first_tokens[:, None].astype(jnp.int32), cache)
    return logits.shape[-1]


def sample(
    step_fn: StepFn,
    first_tokens: jax.Array,
    cache: PyTree,
    *,
    max_decode_steps: int,
    rng: jax.Array,
    temperature: float | jax.Array = 1.0,
    top_k: int = 0,
    top_p: float | jax.Array = 1.0,
    min_p: float | jax.Array = 0.0,
    repetition_penalty: float | jax.Array = 1.0,
    presence_penalty: float | jax.Array = 0.0,
    frequency_penalty: float | jax.Array = 0.0,
    eos_id: int = 1,
    stop_tokens: Sequence[int] | jax.Array = (),
    prompt_tokens: jax.Array | None = None,
    context_tokens: jax.Array | None = None,
    logits_processor: LogitsProcessor | None = None,
    initial_logits: jax.Array | None = None,
    num_samples: int = 1,
) -> DecodeOutput:
    """Decodes up to `max_decode_steps` tokens per sequence with temperature sampling.

    Logits go through `logits_processor`, `apply_penalties`, then `choose_tokens`
    (temperature, top-k, top-p, min-p, draw); see the module docstring for the order.

    Args:
      step_fn: `(tokens [B, 1] int32, cache) -> (logits [B, V], cache)`.
      first_tokens: [B] int32, the input of the first step (T5: 0; a decoder-only model
        with a prefilled cache: the last prompt token).
      cache: the initial cache pytree, threaded through step_fn unchanged in structure.
      max_decode_steps: static number of output positions S.
      rng: one PRNG key (typed or raw), split once per step for the whole batch; or [B]
        keys, one per row: row b's draw at step i then depends only on
        `fold_in(rng[b], i)`, so its output does not depend on the other rows.
      temperature: >= 0; a Python float or an array of shape () or [B]. 0 is greedy
        (exact argmax of the penalised logits; top-k / top-p / min-p are then
        irrelevant). A static 0 skips the random draw altogether.
      top_k: static int; > 0 samples among the k largest logits only.
      top_p: nucleus threshold in [0, 1], scalar or [B]; 1 disables it exactly.
      min_p: in [0, 1], scalar or [B]; keeps tokens whose probability under the
        temperature-scaled distribution is >= min_p * the top token's. 0 disables it.
      repetition_penalty: > 0, scalar or [B] (HF / vLLM); 1 disables it. Applies to
        every token of `prompt_tokens`, `context_tokens` and the sampled tokens.
      presence_penalty, frequency_penalty: scalars or [B] (OpenAI / vLLM), over the
        sampled tokens only; 0 disables them. The [B, V] token counts they need are
        only allocated when some penalty is not a static neutral value.
      eos_id: a sampled `eos_id` ends its sequence; afterwards it emits 0.
      stop_tokens: more ids that end a sequence exactly like `eos_id` (emitted, counted
        in `lengths`): a sequence of ints or an int array [n], or [B, n] per row with
        negative entries as padding.
      prompt_tokens: optional [B, P] int32 forced decoder prefix, padded with 0 (T5X's
        decoder prompt). At step i < (number of non-zero prompt tokens of the row) the
        prompt token is emitted instead of a sampled one. Forced tokens never end a
        sequence (even if equal to eos_id), count in `lengths` but not in the summed
        log-probs, and are not "generated" for the frequency / presence penalties.
      context_tokens: optional [B, P'] int32, 0 = padding: more prompt tokens for the
        repetition penalty only, e.g. a decoder-only prompt already in the cache.
      logits_processor: optional `(logits [B, V], SamplingState) -> logits [B, V]`
        applied to the raw logits before the penalties and temperature (constraints).
      initial_logits: optional [B, V] logits for step 0, e.g. those of the last prompt
        position from a prefill pass (a prefix LM's prompt is attended bidirectionally,
        so it cannot be fed token by token). Step 0 then makes no step_fn call and
        `first_tokens` is unused; the cache must already hold the whole prompt.
      num_samples: static N >= 1: every row is decoded N times with distinct random
        streams. All outputs then have B * N rows, row b's samples at b*N .. b*N+N-1;
        the cache's batch-major leaves and every per-row argument are repeated likewise.
        With [B] keys, sample j of row b uses the key `fold_in(rng[b], j)`.

    Returns:
      A `DecodeOutput`. The function is jit-able with `max_decode_steps`, `top_k`,
      `eos_id`, `num_samples`, `step_fn` and `logits_processor` static (closed over);
      a penalty is static-disabled only when passed as a Python number.
    """
    _check_args(first_tokens, max_decode_steps, temperature, top_k, top_p, min_p,
                repetition_penalty, prompt_tokens, context_tokens, num_samples)
    _check_initial_logits(first_tokens, initial_logits)
    keys = _as_keys(rng)
    per_row_keys = keys.ndim == 1
    if per_row_keys and keys.shape[0] != first_tokens.shape[0]:
        raise ValueError(
            f"rng has {keys.shape[0]} keys but the batch has B={first_tokens.shape[0]} "
            "rows; pass one key, or one key per row"
        )
    stop = _stop_ids(stop_tokens)

    n = int(num_samples)
    if n > 1:
        flags = _batch_major_flags(cache, first_tokens.shape[0])
        cache = _map_batch_major(lambda x: jnp.repeat(x, n, axis=0), cache, flags)
        first_tokens, prompt_tokens, context_tokens, initial_logits = (
            _repeat_rows(x, n) for x in (first_tokens, prompt_tokens, context_tokens,
                                         initial_logits))
        temperature, top_p, min_p = (_repeat_rows(x, n) for x in (temperature, top_p, min_p))
        repetition_penalty, presence_penalty, frequency_penalty = (
            _repeat_rows(x, n)
            for x in (repetition_penalty, presence_penalty, frequency_penalty))
        if stop is not None and stop.ndim == 2:
            stop = _repeat_rows(stop, n)
        if per_row_keys:  # [B] -> [B * N]: sample j of row b gets fold_in(key_b, j).
            fold = jax.vmap(jax.random.fold_in, in_axes=(None, 0))
            keys = jax.vmap(lambda k: fold(k, jnp.arange(n)))(keys).reshape(-1)

    batch = first_tokens.shape[0]
    num_steps, top_k = int(max_decode_steps), int(top_k)
    if not _is_static(temperature):
        temperature = jnp.asarray(temperature, jnp.float32)
        if temperature.ndim not in (0, 1):
            raise ValueError(f"temperature must be a scalar or [B], got {temperature.shape}")

    use_repetition = not _is_static_value(repetition_penalty, 1.0)
    use_counts = (use_repetition or not _is_static_zero(presence_penalty)
                  or not _is_static_zero(frequency_penalty))
    token_counts = context_mask = None
    if use_counts:
        vocab = _vocab_size(step_fn, first_tokens, cache, initial_logits)
        token_counts = jnp.zeros((batch, vocab), jnp.int32)
        context = [t for t in (prompt_tokens, context_tokens) if t is not None]
        if use_repetition and context:
            context_mask = _token_mask(jnp.concatenate(context, axis=1).astype(jnp.int32),
                                       vocab)

    if prompt_tokens is None:
        prompt = jnp.zeros((batch, 1), jnp.int32)
        prompt_len = jnp.zeros((batch,), jnp.int32)
    else:
        prompt = prompt_tokens.astype(jnp.int32)
        prompt_len = jnp.sum(prompt != PAD_ID, axis=-1).astype(jnp.int32)  # [B]

    ends_sequence = functools.partial(_ends_sequence, eos_id=eos_id, stop=stop)

    def cond_fn(state: SamplingState) -> jax.Array:
        return (state.step < num_steps) & ~jnp.all(state.finished)

    def body_fn(state: SamplingState) -> SamplingState:
        if per_row_keys:
            rng = state.rng
            step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(rng, state.step)
        else:
            rng, step_keys = jax.random.split(state.rng)
        if initial_logits is None:
            raw_logits, new_cache = step_fn(state.cur_tokens[:, None], state.cache)
        else:
            raw_logits, new_cache = jax.lax.cond(
                state.step == 0,
                lambda: (initial_logits.astype(jnp.float32), state.cache),
                lambda: _as_f32(step_fn(state.cur_tokens[:, None], state.cache)),
            )
        raw_logits = raw_logits.astype(jnp.float32)  # [B, V]
        logits = raw_logits
        if logits_processor is not None:
            logits = logits_processor(logits, state)
        if use_counts:
            logits = apply_penalties(
                logits, state.token_counts, context_mask=context_mask,
                repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                frequency_penalty=frequency_penalty,
            )
        chosen, chosen_sample_lp = choose_tokens(
            logits, step_keys, temperature=temperature, top_k=top_k, top_p=top_p,
            min_p=min_p,
        )

        # Forced prefix: clamp the column so steps beyond P still index in bounds.
        forced = state.step < prompt_len  # [B]
        col = jnp.minimum(state.step, prompt.shape[1] - 1)
        prompt_col = jax.lax.dynamic_index_in_dim(prompt, col, axis=1, keepdims=False)
        next_tokens = jnp.where(forced, prompt_col, chosen)
        done = state.finished
        next_tokens = jnp.where(done, PAD_ID, next_tokens)

        raw_lp = jnp.take_along_axis(
            jax.nn.log_softmax(raw_logits, axis=-1), next_tokens[:, None], axis=-1
        )[:, 0]
        raw_lp = jnp.where(done, 0.0, raw_lp)
        sampled = ~(done | forced)
        counted_sample_lp = jnp.where(sampled, chosen_sample_lp, 0.0)
        token_counts = state.token_counts
        if use_counts:
            token_counts = token_counts.at[jnp.arange(batch), next_tokens].add(
                sampled.astype(jnp.int32))

        return dataclasses.replace(
            state,
            step=state.step + 1,
            cur_tokens=next_tokens,
            cache=new_cache,
            rng=rng,
            tokens=jax.lax.dynamic_update_index_in_dim(state.tokens, next_tokens, state.step, 1),
            token_log_probs=jax.lax.dynamic_update_index_in_dim(
                state.token_log_probs, raw_lp, state.step, 1
            ),
            sample_log_probs=state.sample_log_probs + counted_sample_lp,
            finished=done | (~forced & ends_sequence(next_tokens)),
            lengths=state.lengths + (~done).astype(jnp.int32),
            token_counts=token_counts,
        )

    init = SamplingState(
        step=jnp.zeros((), jnp.int32),
        cur_tokens=first_tokens.astype(jnp.int32),
        cache=cache,
        rng=keys,
        tokens=jnp.zeros((batch, num_steps), jnp.int32),
        token_log_probs=jnp.zeros((batch, num_steps), jnp.float32),
        sample_log_probs=jnp.zeros((batch,), jnp.float32),
        finished=jnp.zeros((batch,), jnp.bool_),
        lengths=jnp.zeros((batch,), jnp.int32),
        token_counts=token_counts,
    )
    final = jax.lax.while_loop(cond_fn, body_fn, init)

    positions = jnp.arange(num_steps)[None, :]  # [1, S]
    sampled_mask = (positions >= prompt_len[:, None]) & (positions < final.lengths[:, None])
    return DecodeOutput(
        tokens=final.tokens,
        lengths=final.lengths,
        # `where` rather than a product: a forced token may have raw log-prob -inf.
        log_probs=jnp.sum(jnp.where(sampled_mask, final.token_log_probs, 0.0), axis=-1),
        sample_log_probs=final.sample_log_probs,
        token_log_probs=final.token_log_probs,
        sampled_mask=sampled_mask,
        cache=final.cache,
    )


def greedy(
    step_fn: StepFn,
    first_tokens: jax.Array,
    cache: PyTree,
    *,
    max_decode_steps: int,
    eos_id: int = 1,
    stop_tokens: Sequence[int] | jax.Array = (),
    prompt_tokens: jax.Array | None = None,
    context_tokens: jax.Array | None = None,
    repetition_penalty: float | jax.Array = 1.0,
    presence_penalty: float | jax.Array = 0.0,
    frequency_penalty: float | jax.Array = 0.0,
    logits_processor: LogitsProcessor | None = None,
    initial_logits: jax.Array | None = None,
) -> DecodeOutput:
    """Greedy (argmax) decoding: `sample` with temperature 0. See `sample`."""
    return sample(
        step_fn,
        first_tokens,
        cache,
        max_decode_steps=max_decode_steps,
        rng=jax.random.key(0),  # unused: a static temperature 0 draws nothing
        temperature=0.0,
        eos_id=eos_id,
        stop_tokens=stop_tokens,
        prompt_tokens=prompt_tokens,
        context_tokens=context_tokens,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        logits_processor=logits_processor,
        initial_logits=initial_logits,
    )


# --- beam search -------------------------------------------------------------------------


def brevity_penalty(alpha: float | jax.Array, length: int | jax.Array) -> jax.Array:
    """T5X's (GNMT's) length normalisation ((5 + length) / 6) ** alpha; beam scores are
    log-prob / brevity_penalty. `length` counts the EOS token."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BeamSearchOutput:
    """What `beam_search` returns. Shapes: B batch, K beam_size, S max_decode_steps.

    tokens: [B, K, S] int32, best first; position i holds the i-th generated token, 0
      after EOS.
    scores: [B, K] f32, log_probs / brevity_penalty(alpha, lengths), descending. -inf
      marks an empty slot (fewer than K complete sequences exist, e.g. a tiny vocab).
    log_probs: [B, K] f32, the raw model log-prob of each sequence (sum over its tokens,
      EOS included); -inf in empty slots.
    lengths: [B, K] int32, tokens counting the EOS; S for a sequence cut at
      max_decode_steps without EOS; 0 in empty slots.
    steps: () int32, decoding steps run (step_fn calls, one fewer with initial_logits);
      below S when the search stopped early.
    """

    tokens: jax.Array
    scores: jax.Array
    log_probs: jax.Array
    lengths: jax.Array
    steps: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _BeamState:
    """Beam-search carry. Alive beams are sorted best first (as `lax.top_k` returns)."""

    step: jax.Array  # () int32: tokens generated so far by every alive beam
    cur_tokens: jax.Array  # [B * K] int32, the last token of each alive beam
    cache: PyTree  # batch-major leaves [B * K, ...], row b * K + k = beam k of row b
    live_tokens: jax.Array  # [B, K, S] int32
    live_log_probs: jax.Array  # [B, K] f32, -inf for beams that do not exist (yet)
    finished_tokens: jax.Array  # [B, K, S] int32
    finished_scores: jax.Array  # [B, K] f32, descending, -inf = empty slot
    finished_log_probs: jax.Array  # [B, K] f32
    finished_lengths: jax.Array  # [B, K] int32


def _take_beams(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, M, ...] gathered along axis 1 by idx [B, K] -> [B, K, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def beam_search(
    step_fn: StepFn,
    first_tokens: jax.Array,
    cache: PyTree,
    *,
    beam_size: int,
    max_decode_steps: int,
    alpha: float | jax.Array = 0.6,
    eos_id: int = 1,
    initial_logits: jax.Array | None = None,
    stop_tokens: Sequence[int] | jax.Array = (),
) -> BeamSearchOutput:
    """Beam search with T5X's brevity penalty and early stopping.

    Every step extends each of the K alive beams by every token, keeps the 2K best
    extensions by log-prob (so that K survive even if K of them end), sends those ending
    in EOS to the finished set (score = log-prob / `brevity_penalty(alpha, length)`,
    the K best kept) and the K best others on as the alive beams; the cache rows follow
    their beams (`x[idx]` on its batch-major leaves). Log-probs are the raw model's
    (log_softmax of the step_fn logits).

    A row is done when no alive beam can still beat its worst finished one: an alive
    log-prob L <= 0 can at best end as L / max(brevity_penalty(length)) over the lengths
    still reachable (T5X's test, valid for any sign of alpha); the loop stops when every
    row is done or after S steps. Beams still alive after S steps are complete
    sequences cut at S and compete with the finished ones (T5X returns them only when
    nothing finished; Hugging Face, like this, always does).

    Args:
      step_fn: `(tokens [B * K, 1] int32, cache) -> (logits [B * K, V], cache)`.
      first_tokens: [B] int32, the input of the first step (as `sample`).
      cache: the cache for B rows; its batch-major leaves are repeated to B * K rows,
        row b's beams at b*K .. b*K+K-1.
      beam_size: static K >= 1.
      max_decode_steps: static S >= 1.
      alpha: brevity-penalty exponent (0: plain log-prob); may be traced.
      eos_id: ends a beam; afterwards it holds 0.
      initial_logits: optional [B, V] logits of step 0 from a prefill (as `sample`):
        step 0 then makes no step_fn call.
      stop_tokens: more ids that end a beam exactly like `eos_id` (kept in the sequence,
        counted in its length): [n] for every row or [B, n] per row (pad a row's list
        with `eos_id`), as in `sample`.

    Returns:
      A `BeamSearchOutput`. Jit-able with `beam_size`, `max_decode_steps`, `eos_id` and
      `step_fn` static.
    """
    _check_steps(first_tokens, max_decode_steps)
    _check_initial_logits(first_tokens, initial_logits)
    if not isinstance(beam_size, numbers.Integral) or beam_size < 1:
        raise ValueError(f"beam_size={beam_size!r} must be a Python int >= 1")
    batch, k, num_steps = first_tokens.shape[0], int(beam_size), int(max_decode_steps)
    alpha = jnp.asarray(alpha, jnp.float32)
    stop = _stop_ids(stop_tokens)
    if stop is not None and stop.ndim == 2 and stop.shape[0] != batch:
        raise ValueError(f"stop_tokens has {stop.shape[0]} rows but the batch has "
                         f"B={batch}; pass [n] ids for every row or [B, n]")
    flags = _batch_major_flags(cache, batch)
    cache = _map_batch_major(lambda x: jnp.repeat(x, k, axis=0), cache, flags)
    if initial_logits is not None:
        initial_logits = jnp.repeat(initial_logits.astype(jnp.float32), k, axis=0)

    def best_possible_penalty(step: jax.Array) -> jax.Array:
        # Lengths step+1 .. S are reachable; the penalty is monotone in the length.
        return jnp.maximum(brevity_penalty(alpha, step + 1), brevity_penalty(alpha, num_steps))

    def cond_fn(state: _BeamState) -> jax.Array:
        best_alive = state.live_log_probs[:, 0]  # [B]
        bound = best_alive / best_possible_penalty(state.step)
        worst_finished = state.finished_scores[:, -1]  # -inf while a slot is empty
        row_done = (best_alive == -jnp.inf) | (worst_finished > bound)
        return (state.step < num_steps) & ~jnp.all(row_done)

    def body_fn(state: _BeamState) -> _BeamState:
        if initial_logits is None:
            logits, new_cache = step_fn(state.cur_tokens[:, None], state.cache)
        else:
            logits, new_cache = jax.lax.cond(
                state.step == 0,
                lambda: (initial_logits, state.cache),
                lambda: _as_f32(step_fn(state.cur_tokens[:, None], state.cache)),
            )
        vocab = logits.shape[-1]
        if vocab < 2:
            raise ValueError(f"beam search needs a vocabulary of at least 2 ids, got V={vocab}")
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        log_probs = log_probs.reshape(batch, k, vocab)  # [B * K, V] -> [B, K, V]
        candidates = state.live_log_probs[:, :, None] + log_probs  # [B, K, V]
        top_lp, top_idx = jax.lax.top_k(candidates.reshape(batch, k * vocab), 2 * k)
        parent, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)  # [B, 2K]
        seqs = _take_beams(state.live_tokens, parent)  # [B, 2K, S]
        seqs = jax.lax.dynamic_update_slice_in_dim(seqs, token[:, :, None], state.step, axis=2)
        ends = _ends_sequence(token, eos_id=eos_id, stop=stop)  # [B, 2K]

        # Alive: the K best extensions that did not end.
        live_lp, pick = jax.lax.top_k(jnp.where(ends, -jnp.inf, top_lp), k)  # [B, K]
        rows = (jnp.arange(batch)[:, None] * k + _take_beams(parent, pick)).reshape(-1)
        new_cache = _map_batch_major(lambda x: x[rows], new_cache, flags)

        # Finished: the K best of the old finished set and the extensions that ended.
        length = state.step + 1
        new_scores = jnp.where(ends & (top_lp > -jnp.inf),
                               top_lp / brevity_penalty(alpha, length), -jnp.inf)
        scores = jnp.concatenate([state.finished_scores, new_scores], axis=1)  # [B, 3K]
        finished_scores, keep = jax.lax.top_k(scores, k)

        def keep_best(old: jax.Array, new: jax.Array) -> jax.Array:
            return _take_beams(jnp.concatenate([old, new], axis=1), keep)

        return _BeamState(
            step=length,
            cur_tokens=_take_beams(token, pick).reshape(-1),
            cache=new_cache,
            live_tokens=_take_beams(seqs, pick),
            live_log_probs=live_lp,
            finished_tokens=keep_best(state.finished_tokens, seqs),
            finished_scores=finished_scores,
            finished_log_probs=keep_best(state.finished_log_probs, top_lp),
            finished_lengths=keep_best(state.finished_lengths,
                                   jnp.full((batch, 2 * k), length, jnp.int32)),
        )

    init = _BeamState(
        step=jnp.zeros((), jnp.int32),
        cur_tokens=jnp.repeat(first_tokens.astype(jnp.int32), k),
        cache=cache,
        live_tokens=jnp.zeros((batch, k, num_steps), jnp.int32),
        # One real beam to start with, so that the K beams are not K copies of it.
        live_log_probs=jnp.full((batch, k), -jnp.inf).at[:, 0].set(0.0),
        finished_tokens=jnp.zeros((batch, k, num_steps), jnp.int32),
        finished_scores=jnp.full((batch, k), -jnp.inf),
        finished_log_probs=jnp.full((batch, k), -jnp.inf),
        finished_lengths=jnp.zeros((batch, k), jnp.int32),
    )
    final = jax.lax.while_loop(cond_fn, body_fn, init)

    # Alive beams are complete only when cut at S (after an early stop they are not
    # sequences the search returns, and rank below every finished one anyway).
    live_valid = (final.live_log_probs > -jnp.inf) & (final.step == num_steps)
    live_scores = jnp.where(
        live_valid, final.live_log_probs / brevity_penalty(alpha, num_steps), -jnp.inf)
    scores, pick = jax.lax.top_k(
        jnp.concatenate([final.finished_scores, live_scores], axis=1), k)  # [B, K]
    valid = scores > -jnp.inf

    def merge(finished: jax.Array, live: jax.Array, empty: Any) -> jax.Array:
        x = _take_beams(jnp.concatenate([finished, live], axis=1), pick)
        return jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 2)), x, empty)

    return BeamSearchOutput(
        tokens=merge(final.finished_tokens, final.live_tokens, 0),
        scores=scores,
        log_probs=merge(final.finished_log_probs, final.live_log_probs, -jnp.inf),
        lengths=merge(final.finished_lengths,
                      jnp.full((batch, k), num_steps, jnp.int32), 0),
        steps=final.step,
    )


# --- best-of-N ---------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BestOfNOutput:
    """What `best_of_n` returns. Shapes: B batch, N candidates per row, S max_decode_steps.

    tokens: [B, S] int32, the best candidate of each row (`DecodeOutput.tokens` layout).
    lengths: [B] int32, its length (forced prefix and EOS included).
    log_probs: [B] f32, its raw model log-prob (sum over the sampled tokens).
    scores: [B, N] f32, every candidate's score; the best is its row's argmax.
    best_index: [B] int32, which candidate was chosen.
    candidates: [B, N, S] int32, all candidates.
    candidate_lengths: [B, N] int32.
    candidate_log_probs: [B, N] f32, raw model log-probs of the sampled tokens.
    """

    tokens: jax.Array
    lengths: jax.Array
    log_probs: jax.Array
    scores: jax.Array
    best_index: jax.Array
    candidates: jax.Array
    candidate_lengths: jax.Array
    candidate_log_probs: jax.Array


def best_of_n(
    step_fn: StepFn,
    first_tokens: jax.Array,
    cache: PyTree,
    *,
    n: int,
    rng: jax.Array,
    max_decode_steps: int,
    score_fn: ScoreFn | None = None,
    length_normalize: bool = False,
    **sampling_kwargs: Any,
) -> BestOfNOutput:
    """Samples `n` candidates per row (`sample(..., num_samples=n)`) and keeps the best.

    Args:
      step_fn, first_tokens, cache, rng, max_decode_steps: as `sample`.
      n: static number of candidates per row.
      score_fn: optional `(tokens [B, n, S], lengths [B, n]) -> scores [B, n]`, higher
        is better (e.g. a reward model). Overrides the default score.
      length_normalize: the default score is the raw model log-prob of the sampled
        tokens (`DecodeOutput.log_probs`); True divides it by the number of sampled
        tokens (EOS included, forced prompt tokens excluded).
      **sampling_kwargs: any other `sample` argument (temperature, top_k, top_p, min_p,
        penalties, eos_id, stop_tokens, prompt_tokens, ...), except num_samples.

    Returns:
      A `BestOfNOutput`; ties go to the lower candidate index.
    """
    if "num_samples" in sampling_kwargs:
        raise ValueError("best_of_n sets num_samples itself; pass the candidate count as n")
    out = sample(step_fn, first_tokens, cache, max_decode_steps=max_decode_steps, rng=rng,
                 num_samples=n, **sampling_kwargs)
    batch, num_steps = first_tokens.shape[0], int(max_decode_steps)
    candidates = out.tokens.reshape(batch, n, num_steps)  # [B * n, S] -> [B, n, S]
    lengths = out.lengths.reshape(batch, n)
    log_probs = out.log_probs.reshape(batch, n)
    if score_fn is not None:
        scores = jnp.asarray(score_fn(candidates, lengths), jnp.float32)
        if scores.shape != (batch, n):
            raise ValueError(f"score_fn must return [B={batch}, n={n}], got {scores.shape}")
    elif length_normalize:
        num_sampled = jnp.sum(out.sampled_mask, axis=-1).reshape(batch, n)
        scores = log_probs / jnp.maximum(num_sampled, 1)
    else:
        scores = log_probs
    best = jnp.argmax(scores, axis=1).astype(jnp.int32)  # [B]
    return BestOfNOutput(
        tokens=_take_beams(candidates, best[:, None])[:, 0],
        lengths=jnp.take_along_axis(lengths, best[:, None], axis=1)[:, 0],
        log_probs=jnp.take_along_axis(log_probs, best[:, None], axis=1)[:, 0],
        scores=scores,
        best_index=best,
        candidates=candidates,
        candidate_lengths=lengths,
        candidate_log_probs=log_probs,
    )

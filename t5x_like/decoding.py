"""Model-agnostic autoregressive decoding: greedy and temperature / top-k / top-p sampling.

Every decoder drives the network through one *step function*:

    step_fn(tokens: [B, 1] int32, cache: PyTree) -> (logits: [B, V] float32, new_cache)

`tokens` is the token at the current position, `logits` the next-token logits, and the
cache an explicit pytree the model takes and returns (KV cache, positions, ...). Because
the cache is a plain pytree, later decoders can reorder it (beam search), copy it
(best-of-N, prefix caching) or roll it back (speculative decoding).

Output convention (T5-style): `tokens[:, i]` is the token chosen at step i, i.e. the
input fed at step 0 (`first_tokens`, e.g. T5's pad/BOS 0) is *not* part of the output.
After a sequence emits `eos_id` it emits only padding (0); the loop stops as soon as
every sequence has finished, leaving the remaining positions 0.

Logit processing is split into small public functions (`apply_temperature`,
`top_k_mask`, `top_p_mask`, composed by `process_logits`) so that penalties, min-p and
other processors plug in alongside them; `sample(..., logits_processor=...)` takes a
callable for anything that needs the decoding state (e.g. repetition penalties).

Shapes: B batch, V vocab, S max_decode_steps, P prompt length.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
StepFn = Callable[[jax.Array, PyTree], tuple[jax.Array, PyTree]]
# (raw logits [B, V], state) -> logits [B, V]; runs before temperature / top-k / top-p.
LogitsProcessor = Callable[[jax.Array, "SamplingState"], jax.Array]

PAD_ID = 0


# --- logit processing --------------------------------------------------------------------


def apply_temperature(logits: jax.Array, temperature: float | jax.Array) -> jax.Array:
    """Divides `logits` [..., V] by `temperature` (a scalar or one value per row [...]).

    Rows whose temperature is 0 are returned unscaled: temperature 0 means greedy, which
    the caller resolves with an argmax (dividing by 0 would give inf / nan).
    """
    t = jnp.asarray(temperature, jnp.float32)
    if t.ndim:  # per-row temperatures [...] -> [..., 1] to broadcast over the vocab.
        t = t[..., None]
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
    """
    if not isinstance(p, jax.Array) and jnp.ndim(p) == 0:  # a static Python number
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"top_p={p} must be in [0, 1] (1 disables top-p)")
        if float(p) >= 1.0:
            return logits
    p = jnp.asarray(p, jnp.float32)
    if p.ndim:
        p = p[..., None]  # [...] -> [..., 1]
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


def process_logits(
    logits: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    top_k: int = 0,
    top_p: float | jax.Array = 1.0,
) -> jax.Array:
    """The distribution a sampler draws from: temperature, then top-k, then top-p.

    Top-p sees the temperature-scaled, top-k-filtered distribution (as in T5X and HF).
    Masked entries are -inf. Rows with temperature 0 are left unscaled (see
    `apply_temperature`); greedy decoding takes their argmax instead of sampling.
    """
    logits = apply_temperature(logits.astype(jnp.float32), temperature)
    logits = top_k_mask(logits, top_k)
    return top_p_mask(logits, top_p)


# --- the sampling loop -------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingState:
    """The while-loop carry. Decoders that need more (beams, draft tokens) add fields.

    `step` is both the loop iteration and the output position written in it.
    """

    step: jax.Array  # () int32
    cur_tokens: jax.Array  # [B] int32: what the next step_fn call consumes
    cache: PyTree
    rng: jax.Array
    tokens: jax.Array  # [B, S] int32 chosen tokens, 0 after EOS / not yet written
    token_log_probs: jax.Array  # [B, S] f32 raw model log-prob of each chosen token
    sample_log_probs: jax.Array  # [B] f32 sum over sampled tokens, processed distribution
    finished: jax.Array  # [B] bool: EOS sampled
    lengths: jax.Array  # [B] int32 tokens emitted so far (forced prefix and EOS included)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeOutput:
    """What `sample` / `greedy` return. Shapes: B batch, S max_decode_steps.

    tokens: [B, S] int32. Position i holds the token chosen at step i (forced prompt
      tokens included); 0 after EOS and after the loop stopped early.
    lengths: [B] int32. Number of emitted tokens, counting the forced prefix and the EOS
      itself; S when no EOS was sampled.
    log_probs: [B] f32. Sum of the *raw model* log-probs (log_softmax of the step_fn
      logits, before any processing) of the sampled tokens, i.e. what scoring the
      generated tokens with the model gives. Forced prompt tokens and padding excluded.
    sample_log_probs: [B] f32. Sum of the log-probs of the sampled tokens under the
      *processed* distribution they were drawn from (logits_processor, temperature,
      top-k, top-p; T5X's `rescale_log_probs=True`). Greedy steps contribute 0 (a point
      mass), so it is 0 for greedy decoding and for top_k=1.
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


def _is_static_zero(x: float | jax.Array) -> bool:
    return not isinstance(x, jax.Array) and jnp.ndim(x) == 0 and float(x) == 0.0


def _check_args(
    first_tokens: jax.Array,
    max_decode_steps: int,
    temperature: float | jax.Array,
    top_k: int,
    top_p: float | jax.Array,
    prompt_tokens: jax.Array | None,
) -> None:
    if first_tokens.ndim != 1:
        raise ValueError(
            f"first_tokens must be [B] int32, got shape {first_tokens.shape}; "
            "pass the last token of each sequence (e.g. zeros for T5's start token)"
        )
    if not isinstance(max_decode_steps, numbers.Integral) or max_decode_steps < 1:
        raise ValueError(f"max_decode_steps={max_decode_steps!r} must be a Python int >= 1")
    if not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} must be a Python int >= 0 (0 disables top-k)")
    static_temperature = not isinstance(temperature, jax.Array) and jnp.ndim(temperature) == 0
    if static_temperature and float(temperature) < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
    static_top_p = not isinstance(top_p, jax.Array) and jnp.ndim(top_p) == 0
    if static_top_p and not 0.0 <= float(top_p) <= 1.0:
        raise ValueError(f"top_p={top_p} must be in [0, 1] (1 disables top-p)")
    if prompt_tokens is not None and (
        prompt_tokens.ndim != 2 or prompt_tokens.shape[0] != first_tokens.shape[0]
    ):
        raise ValueError(
            f"prompt_tokens must be [B={first_tokens.shape[0]}, P], got {prompt_tokens.shape}"
        )


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
    eos_id: int = 1,
    prompt_tokens: jax.Array | None = None,
    logits_processor: LogitsProcessor | None = None,
    initial_logits: jax.Array | None = None,
) -> DecodeOutput:
    """Decodes up to `max_decode_steps` tokens per sequence with temperature sampling.

    Args:
      step_fn: `(tokens [B, 1] int32, cache) -> (logits [B, V], cache)`.
      first_tokens: [B] int32, the input of the first step (T5: 0; a decoder-only model
        with a prefilled cache: the last prompt token).
      cache: the initial cache pytree, threaded through step_fn unchanged in structure.
      max_decode_steps: static number of output positions S.
      rng: a PRNG key (typed or raw).
      temperature: >= 0; a Python float or an array of shape () or [B]. 0 is greedy
        (exact argmax of the logits, top-k / top-p are then irrelevant). A static 0
        skips the random draw altogether.
      top_k: static int; > 0 samples among the k largest logits only.
      top_p: nucleus threshold in [0, 1], scalar or [B]; 1 disables it exactly.
      eos_id: a sampled `eos_id` ends its sequence; afterwards it emits 0.
      prompt_tokens: optional [B, P] int32 forced decoder prefix, padded with 0 (T5X's
        decoder prompt). At step i < (number of non-zero prompt tokens of the row) the
        prompt token is emitted instead of a sampled one. Forced tokens never end a
        sequence (even if equal to eos_id) and count in `lengths` but not in the
        summed log-probs.
      logits_processor: optional `(logits [B, V], SamplingState) -> logits [B, V]`
        applied to the raw logits before temperature (penalties, constraints).
      initial_logits: optional [B, V] logits for step 0, e.g. those of the last prompt
        position from a prefill pass (a prefix LM's prompt is attended bidirectionally,
        so it cannot be fed token by token). Step 0 then makes no step_fn call and
        `first_tokens` is unused; the cache must already hold the whole prompt.

    Returns:
      A `DecodeOutput`. The function is jit-able with `max_decode_steps`, `top_k`,
      `eos_id`, `step_fn` and `logits_processor` static (closed over).
    """
    _check_args(first_tokens, max_decode_steps, temperature, top_k, top_p, prompt_tokens)
    if initial_logits is not None and (
        initial_logits.ndim != 2 or initial_logits.shape[0] != first_tokens.shape[0]
    ):
        raise ValueError(
            f"initial_logits must be [B={first_tokens.shape[0]}, V], got {initial_logits.shape}"
        )
    batch = first_tokens.shape[0]
    num_steps, top_k = int(max_decode_steps), int(top_k)
    static_greedy = _is_static_zero(temperature)
    if not static_greedy:
        temperature = jnp.asarray(temperature, jnp.float32)
        if temperature.ndim not in (0, 1):
            raise ValueError(f"temperature must be a scalar or [B], got {temperature.shape}")

    if prompt_tokens is None:
        prompt = jnp.zeros((batch, 1), jnp.int32)
        prompt_len = jnp.zeros((batch,), jnp.int32)
    else:
        prompt = prompt_tokens.astype(jnp.int32)
        prompt_len = jnp.sum(prompt != PAD_ID, axis=-1).astype(jnp.int32)  # [B]

    def cond_fn(state: SamplingState) -> jax.Array:
        return (state.step < num_steps) & ~jnp.all(state.finished)

    def body_fn(state: SamplingState) -> SamplingState:
        rng, step_rng = jax.random.split(state.rng)
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

        greedy_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if static_greedy:
            chosen = greedy_tokens
            chosen_sample_lp = jnp.zeros((batch,), jnp.float32)
        else:
            processed = process_logits(
                logits, temperature=temperature, top_k=top_k, top_p=top_p
            )
            sampled = jax.random.categorical(step_rng, processed, axis=-1).astype(jnp.int32)
            is_greedy = jnp.broadcast_to(temperature == 0, (batch,))
            chosen = jnp.where(is_greedy, greedy_tokens, sampled)
            sample_lp = jnp.take_along_axis(
                jax.nn.log_softmax(processed, axis=-1), chosen[:, None], axis=-1
            )[:, 0]
            chosen_sample_lp = jnp.where(is_greedy, 0.0, sample_lp)

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
        counted_sample_lp = jnp.where(done | forced, 0.0, chosen_sample_lp)

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
            finished=done | (~forced & (next_tokens == eos_id)),
            lengths=state.lengths + (~done).astype(jnp.int32),
        )

    init = SamplingState(
        step=jnp.zeros((), jnp.int32),
        cur_tokens=first_tokens.astype(jnp.int32),
        cache=cache,
        rng=rng,
        tokens=jnp.zeros((batch, num_steps), jnp.int32),
        token_log_probs=jnp.zeros((batch, num_steps), jnp.float32),
        sample_log_probs=jnp.zeros((batch,), jnp.float32),
        finished=jnp.zeros((batch,), jnp.bool_),
        lengths=jnp.zeros((batch,), jnp.int32),
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
    prompt_tokens: jax.Array | None = None,
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
        prompt_tokens=prompt_tokens,
        logits_processor=logits_processor,
        initial_logits=initial_logits,
    )

"""Speculative decoding: a small drafter proposes, the target verifies several tokens per call.

Each round (one target call, Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding"; Chen et al. 2023):

  1. the drafter proposes `gamma` tokens d1..dγ one at a time, each drawn from its
     processed distribution q_i (temperature / top-k / top-p, as `decoding.sample`);
  2. the target scores [cur, d1..dγ] in one call: γ + 1 processed distributions p_0..p_γ;
  3. d_i is accepted with probability min(1, p(d_i) / q(d_i)), left to right; at the first
     rejection the next token is drawn from norm(max(0, p - q)); when all γ are accepted a
     bonus token is drawn from p_γ. A round thus emits n + 1 tokens (n accepted drafts).

The emitted tokens are distributed exactly as sampling from the target alone, whatever
the drafter. With temperature 0 both distributions are point masses at the argmax, so a
draft is kept iff it equals the target's argmax and the output equals `decoding.greedy`
on the target.

Both models run through a *multi-token step function*:

    step_fn(tokens: [B, T] int32, cache) -> (logits: [B, T, V] float32, new_cache)

Token t of row b goes to position cache.index[b] + t. The cache is a pytree with
`index` [B] int32 (tokens held per row), `max_length` (slots) and `rewind(index [B])`,
as `DecoderOnlyCache` and `DecoderCache` have. Rows accept different numbers of drafts,
so each row keeps its own output position and both caches are rewound per row.

Convention (as `decoding.sample`): both caches hold the prompt except its last token,
and `first_tokens` [B] is that last token (T5: an empty cache and first token 0). The
output follows `decoding.DecodeOutput`: `tokens[:, i]` is the i-th generated token, 0
after EOS, and `lengths` counts the EOS.

Entry points: `speculative_decoder_only` / `speculative_encoder_decoder` (networks in,
caches prefilled), `speculative_decode` (any pair of step functions and caches, e.g. from
`decoder_only_step_fn` / `encoder_decoder_step_fn`), `verify_drafts` (the rule alone).
A prefix LM (a bidirectionally attended prompt) is out of scope: its prompt cannot be
fed token by token, and these helpers prefill causally.

Shapes: B batch, V vocab, S max_decode_steps, P prompt length, G = gamma.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t5x_like import decoding

PyTree = Any
# (tokens [B, T] int32, cache) -> (logits [B, T, V] float32, cache with index + T)
MultiStepFn = Callable[[jax.Array, PyTree], tuple[jax.Array, PyTree]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpeculativeOutput:
    """What `speculative_decode` returns. Shapes: B batch, S max_decode_steps.

    tokens: [B, S] int32, as `decoding.DecodeOutput.tokens`: position i holds the i-th
      generated token; 0 after EOS and after the row stopped.
    lengths: [B] int32, emitted tokens counting the EOS; S when no EOS was emitted.
    target_calls: () int32, verification calls (one per round, for the whole batch).
    draft_calls: () int32, drafter calls (gamma per round).
    row_calls: [B] int32, the rounds in which row b was still decoding.
    proposed: [B] int32, draft tokens proposed to row b (gamma per round it took part in).
    accepted: [B] int32, drafts the target accepted (before any cut at EOS or S).
    rejected: [B] int32, drafts the target rejected: at most one per round, since the
      drafts after a rejection are discarded unjudged.
    target_cache: the target's cache holding `first_tokens` and every emitted token but
      the last (index = start index + lengths): feed `tokens[b, lengths[b] - 1]` to go on.
    draft_cache: the drafter's cache, rewound to one token less than the target's.
    """

    tokens: jax.Array
    lengths: jax.Array
    target_calls: jax.Array
    draft_calls: jax.Array
    row_calls: jax.Array
    proposed: jax.Array
    accepted: jax.Array
    rejected: jax.Array
    target_cache: PyTree
    draft_cache: PyTree

    @property
    def acceptance_rate(self) -> jax.Array:
        """α: the fraction of judged drafts that were accepted, accepted / (accepted +
        rejected). Drafts discarded after a rejection are not judged, so this estimates
        the per-token acceptance probability (E[α] = Σ_x min(p(x), q(x)) per position);
        `accepted / proposed` is the smaller fraction of drafts that were kept."""
        accepted = jnp.sum(self.accepted)
        return accepted / jnp.maximum(accepted + jnp.sum(self.rejected), 1)

    @property
    def tokens_per_target_call(self) -> jax.Array:
        """Tokens a row gains per target call, n + 1 averaged over rows and rounds (before
        any cut at EOS or S); (1 - α^(G+1)) / (1 - α) when acceptances are i.i.d."""
        calls = jnp.sum(self.row_calls)
        return (jnp.sum(self.accepted) + calls) / jnp.maximum(calls, 1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _State:
    """The while-loop carry (one iteration = one round = one target call)."""

    cur: jax.Array  # [B] last emitted token, not yet fed to the target
    prev: jax.Array  # [B] the token before it
    pending: jax.Array  # [B] bool: the drafter has not seen `prev`
    position: jax.Array  # [B] next output column
    finished: jax.Array  # [B] bool
    tokens: jax.Array  # [B, S]
    target_cache: PyTree
    draft_cache: PyTree
    rng: jax.Array | None  # None when greedy
    target_calls: jax.Array  # ()
    row_calls: jax.Array  # [B]
    accepted: jax.Array  # [B]
    rejected: jax.Array  # [B]


# --- the accept / resample rule ----------------------------------------------------------


def verify_drafts(
    p: jax.Array, q: jax.Array, drafts: jax.Array, uniforms: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The acceptance rule of speculative sampling, as a pure function of its uniforms.

    Args:
      p: [B, G + 1, V] target probabilities after [cur, d1..dG]: p[:, i] is the target's
        distribution for the token at draft position i + 1 (p[:, G] for the bonus token).
      q: [B, G, V] drafter probabilities d1..dG were drawn from.
      drafts: [B, G] int32, the proposed tokens d1..dG.
      uniforms: [B, G] in [0, 1); d_i is accepted iff uniforms[:, i] * q(d_i) < p(d_i),
        i.e. with probability min(1, p(d_i) / q(d_i)).

    Returns:
      (num_accepted [B] int32: the length n of the accepted prefix, next_probs [B, V]: the
      distribution of the token that follows it: norm(max(0, p_n - q_n)) after a
      rejection at position n, p_G when all G were accepted).
    """
    gamma = drafts.shape[1]
    p_draft = jnp.take_along_axis(p[:, :gamma], drafts[..., None], axis=-1)[..., 0]  # [B, G]
    q_draft = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]  # [B, G]
    accept = uniforms * q_draft < p_draft
    num_accepted = jnp.sum(jnp.cumprod(accept, axis=-1), axis=-1).astype(jnp.int32)  # [B]

    at = jnp.minimum(num_accepted, gamma - 1)[:, None, None]  # rejection position [B, 1, 1]
    p_at = jnp.take_along_axis(p, at, axis=1)[:, 0]  # [B, V]
    residual = jnp.maximum(p_at - jnp.take_along_axis(q, at, axis=1)[:, 0], 0.0)
    total = jnp.sum(residual, axis=-1, keepdims=True)
    # A zero residual means p == q, where a rejection has probability 0: fall back to p.
    residual = jnp.where(total > 0, residual / jnp.where(total > 0, total, 1.0), p_at)
    next_probs = jnp.where((num_accepted < gamma)[:, None], residual, p[:, gamma])
    return num_accepted, next_probs


# --- the decoding loop -------------------------------------------------------------------


def _concrete(x: jax.Array) -> np.ndarray | None:
    """x's value, or None under tracing (jit) where it is not known yet."""
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def _check_room(name: str, cache: PyTree, batch: int, needed: int) -> None:
    """Every row of `cache` must have `needed` free slots (a rewind never frees more)."""
    index = getattr(cache, "index", None)
    if index is None or not hasattr(cache, "rewind") or not hasattr(cache, "max_length"):
        raise ValueError(
            f"the {name} cache must have `index` [B], `max_length` and `rewind(index)` "
            f"(as DecoderOnlyCache / DecoderCache), got {type(cache).__name__}"
        )
    if index.shape != (batch,):
        raise ValueError(f"the {name} cache's index has shape {index.shape}; need [B={batch}]")
    held = _concrete(index)
    if held is None:  # under jit only the size is known
        if needed > cache.max_length:
            raise ValueError(
                f"the {name} cache has max_length={cache.max_length} slots; speculative "
                f"decoding needs max_decode_steps + gamma + 1 = {needed} more than the "
                f"tokens it holds; build it with max_length >= tokens held + {needed}"
            )
        return
    longest = int(held.max())
    if longest + needed > cache.max_length:
        raise ValueError(
            f"the {name} cache has max_length={cache.max_length} slots but holds up to "
            f"{longest} tokens per row; speculative decoding needs max_decode_steps + gamma "
            f"+ 1 = {needed} more; build the cache with max_length >= {longest + needed} "
            "(or lower max_decode_steps / gamma)"
        )


def _check_args(first_tokens, gamma, max_decode_steps, temperature, top_k, top_p) -> None:
    if first_tokens.ndim != 1:
        raise ValueError(
            f"first_tokens must be [B] int32, got shape {first_tokens.shape}; pass the last "
            "prompt token of each row (zeros for T5's start token)"
        )
    if not isinstance(gamma, numbers.Integral) or gamma < 1:
        raise ValueError(f"gamma={gamma!r} must be a Python int >= 1 (drafts per round)")
    if not isinstance(max_decode_steps, numbers.Integral) or max_decode_steps < 1:
        raise ValueError(f"max_decode_steps={max_decode_steps!r} must be a Python int >= 1")
    if not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} must be a Python int >= 0 (0 disables top-k)")
    if not isinstance(temperature, jax.Array) and jnp.ndim(temperature) == 0:
        if float(temperature) < 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
    elif jnp.ndim(temperature) not in (0, 1):
        raise ValueError(f"temperature must be a scalar or [B], got {jnp.shape(temperature)}")
    static_top_p = not isinstance(top_p, jax.Array) and jnp.ndim(top_p) == 0
    if static_top_p and not 0.0 <= float(top_p) <= 1.0:
        raise ValueError(f"top_p={top_p} must be in [0, 1] (1 disables top-p)")


def _per_row(x: float | jax.Array, shape: tuple[int, ...]) -> float | jax.Array:
    """A scalar, or one value per row [B] broadcast to `shape` = (B, ...)."""
    if jnp.ndim(x) == 1:
        x = jnp.asarray(x).reshape((-1,) + (1,) * (len(shape) - 1))
        return jnp.broadcast_to(x, shape)
    return x


def speculative_decode(
    target_fn: MultiStepFn,
    target_cache: PyTree,
    draft_fn: MultiStepFn,
    draft_cache: PyTree,
    first_tokens: jax.Array,
    *,
    gamma: int,
    max_decode_steps: int,
    rng: jax.Array | None = None,
    temperature: float | jax.Array = 0.0,
    top_k: int = 0,
    top_p: float | jax.Array = 1.0,
    eos_id: int = 1,
) -> SpeculativeOutput:
    """Decodes up to `max_decode_steps` tokens per row, `gamma` drafts per target call.

    Args:
      target_fn, draft_fn: multi-token step functions (see the module docstring), e.g.
        `decoder_only_step_fn(network)`.
      target_cache, draft_cache: caches holding the same tokens (the prompt but its last
        token), each with room for max_decode_steps + gamma + 1 more slots per row.
      first_tokens: [B] int32, the last prompt token (T5: 0).
      gamma: static number of drafts per round (>= 1).
      max_decode_steps: static number of output positions S.
      rng: a PRNG key; needed unless temperature is a static 0.
      temperature: >= 0, a Python float or an array of shape () or [B]; 0 is greedy.
      top_k: static int; > 0 keeps the k largest logits (both models).
      top_p: nucleus threshold in [0, 1], scalar or [B]; 1 disables it.
      eos_id: an emitted `eos_id` ends its row; afterwards the row emits 0.

    Returns:
      A `SpeculativeOutput`. Jit-able with the step functions, `gamma`,
      `max_decode_steps`, `top_k` and `eos_id` static. Under jit only the caches' sizes
      can be checked, not how full they already are.
    """
    _check_args(first_tokens, gamma, max_decode_steps, temperature, top_k, top_p)
    batch, num_steps = first_tokens.shape[0], int(max_decode_steps)
    gamma, top_k = int(gamma), int(top_k)
    for name, cache in (("target", target_cache), ("draft", draft_cache)):
        _check_room(name, cache, batch, num_steps + gamma + 1)
    greedy = not isinstance(temperature, jax.Array) and float(temperature) == 0.0
    if not greedy and rng is None:
        raise ValueError(f"temperature={temperature} samples: pass rng=jax.random.key(seed)")
    if greedy:
        rng = None  # never drawn from (no PRNG ops get traced)

    def probs(logits: jax.Array) -> jax.Array:
        """Raw logits [B, ..., V] -> the processed distribution sampled from."""
        shape = logits.shape[:-1]
        temp = _per_row(temperature, shape)
        processed = decoding.process_logits(
            logits, temperature=temp, top_k=top_k, top_p=_per_row(top_p, shape))
        dist = jax.nn.softmax(processed, axis=-1)
        # Temperature-0 rows: a point mass on the argmax, so the rule below is greedy.
        point = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1])
        return jnp.where((jnp.asarray(temp) == 0)[..., None], point, dist)

    def draft(logits: jax.Array, key: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
        """Drafter logits [B, V] -> (draft token [B], its distribution q [B, V] or None)."""
        if greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
        q = probs(logits)
        return jax.random.categorical(key, jnp.log(q), axis=-1).astype(jnp.int32), q

    def propose(state: _State, keys: jax.Array | None):
        """G drafter calls -> (drafts [B, G], q [B, G, V] or None, drafter cache, V)."""

        # Row b's drafter holds what precedes `cur`, except the last draft of a round
        # that accepted all G (`pending`, now `prev`): that row re-feeds [prev, cur] from
        # one slot back; the others feed [cur, cur], whose second token is a placeholder
        # that d1 overwrites. One two-token call serves both kinds of rows.
        pending = state.pending
        index = state.target_cache.index
        fed = jnp.where(pending[:, None], jnp.stack([state.prev, state.cur], axis=1),
                        state.cur[:, None])  # [B, 2]
        logits, cache = draft_fn(fed, state.draft_cache.rewind(index - pending))
        logits = jnp.where(pending[:, None], logits[:, 1], logits[:, 0]).astype(jnp.float32)
        cache = cache.rewind(index + 1)
        vocab = logits.shape[-1]
        token, q = draft(logits, None if keys is None else keys[0])

        def step(carry, key):
            token, cache = carry
            logits, cache = draft_fn(token[:, None], cache)
            token, q = draft(logits[:, -1].astype(jnp.float32), key)
            return (token, cache), (token, q)

        (_, cache), (tokens, qs) = jax.lax.scan(
            step, (token, cache), None if keys is None else keys[1:], length=gamma - 1)
        drafts = jnp.concatenate([token[:, None], tokens.T], axis=1)  # [B, G]
        if greedy:
            return drafts, None, cache, vocab
        qs = jnp.concatenate([q[:, None], jnp.moveaxis(qs, 0, 1)], axis=1)  # [B, G, V]
        return drafts, qs, cache, vocab

    def cond_fn(state: _State) -> jax.Array:
        return ~jnp.all(state.finished)

    def body_fn(state: _State) -> _State:
        if greedy:
            rng = draft_keys = None
        else:
            rng, draft_rng, accept_rng, next_rng = jax.random.split(state.rng, 4)
            draft_keys = jax.random.split(draft_rng, gamma)
        drafts, q, draft_cache, draft_vocab = propose(state, draft_keys)

        fed = jnp.concatenate([state.cur[:, None], drafts], axis=1)  # [B, G + 1]
        logits, target_cache = target_fn(fed, state.target_cache)
        logits = logits.astype(jnp.float32)  # [B, G + 1, V]
        if logits.shape[-1] != draft_vocab:
            raise ValueError(f"the target's vocabulary has {logits.shape[-1]} entries but the "
                             f"drafter's {draft_vocab}; the drafter must share the target's "
                             "vocabulary (the same tokenizer)")
        if greedy:
            choice = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, G + 1]
            agree = drafts == choice[:, :gamma]
            n = jnp.sum(jnp.cumprod(agree, axis=-1), axis=-1).astype(jnp.int32)
            next_token = jnp.take_along_axis(choice, n[:, None], axis=1)[:, 0]
        else:
            uniforms = jax.random.uniform(accept_rng, (batch, gamma))
            n, next_probs = verify_drafts(probs(logits), q, drafts, uniforms)
            next_token = jax.random.categorical(
                next_rng, jnp.log(next_probs), axis=-1).astype(jnp.int32)

        # This round's tokens: the n accepted drafts, then the resampled / bonus token.
        cols = jnp.arange(gamma + 1)[None, :]  # [1, G + 1]
        out = jnp.where(cols == n[:, None], next_token[:, None],
                        jnp.pad(drafts, ((0, 0), (0, 1))))  # valid for cols <= n
        active = ~state.finished
        first_eos = jnp.argmax((out == eos_id) & (cols <= n[:, None]), axis=1)  # 0 if none
        hit_eos = out[jnp.arange(batch), first_eos] == eos_id
        count = jnp.where(hit_eos, jnp.minimum(n, first_eos), n) + 1
        count = jnp.where(active, jnp.minimum(count, num_steps - state.position), 0)
        emitted = jnp.where(cols < count[:, None], out, decoding.PAD_ID)
        rows = jnp.arange(batch)[:, None]
        tokens = state.tokens.at[rows, state.position[:, None] + cols].set(emitted, mode="drop")
        position = state.position + count

        # Keep what the target saw before the next `cur`; a finished row stays frozen.
        target_cache = target_cache.rewind(state.target_cache.index + count)
        last = jnp.maximum(count - 1, 0)[:, None]
        cur = jnp.take_along_axis(out, last, axis=1)[:, 0]
        prev = jnp.take_along_axis(fed, last, axis=1)[:, 0]
        judged = active.astype(jnp.int32)
        return _State(
            cur=jnp.where(active, cur, state.cur),
            prev=jnp.where(active, prev, state.prev),
            pending=jnp.where(active, n == gamma, state.pending),
            position=position,
            finished=state.finished | (active & hit_eos & (first_eos < count))
            | (position >= num_steps),
            tokens=tokens,
            target_cache=target_cache,
            draft_cache=draft_cache,
            rng=rng,
            target_calls=state.target_calls + 1,
            row_calls=state.row_calls + judged,
            accepted=state.accepted + judged * n,
            rejected=state.rejected + judged * (n < gamma),
        )

    zeros = jnp.zeros((batch,), jnp.int32)
    first_tokens = first_tokens.astype(jnp.int32)
    init = _State(
        cur=first_tokens, prev=first_tokens, pending=jnp.zeros((batch,), jnp.bool_),
        position=zeros,
        finished=jnp.zeros((batch,), jnp.bool_), tokens=jnp.zeros((batch, num_steps), jnp.int32),
        target_cache=target_cache, draft_cache=draft_cache, rng=rng,
        target_calls=jnp.zeros((), jnp.int32), row_calls=zeros, accepted=zeros, rejected=zeros,
    )
    final = jax.lax.while_loop(cond_fn, body_fn, init)
    return SpeculativeOutput(
        tokens=final.tokens,
        lengths=final.position,
        target_calls=final.target_calls,
        draft_calls=final.target_calls * gamma,
        row_calls=final.row_calls,
        proposed=final.row_calls * gamma,
        accepted=final.accepted,
        rejected=final.rejected,
        target_cache=final.target_cache,
        draft_cache=final.draft_cache.rewind(final.target_cache.index - 1),
    )


# --- model adapters ----------------------------------------------------------------------


def decoder_only_step_fn(network) -> MultiStepFn:
    """The multi-token step function of a `models.DecoderOnly` (cached, deterministic)."""

    def step_fn(tokens, cache):
        logits, cache = network.decode(tokens, cache=cache, deterministic=True)
        return logits.astype(jnp.float32), cache

    return step_fn


def encoder_decoder_step_fn(
    network, encoded: jax.Array, encoder_input_tokens: jax.Array
) -> MultiStepFn:
    """The multi-token step function of a `models.EncoderDecoder`'s cached decoder.

    `encoded` [B, S, D] and `encoder_input_tokens` [B, S] are this network's own encoding
    (a drafter encodes the inputs itself).
    """

    def step_fn(tokens, cache):
        logits, cache = network.decode(encoded, encoder_input_tokens, tokens, cache=cache,
                                       deterministic=True)
        return logits.astype(jnp.float32), cache

    return step_fn


def _prefill_all_but_last(network, prompt: jax.Array, prompt_lengths: jax.Array,
                          max_length: int):
    """A cache of `max_length` slots holding each row's prompt but its last token."""
    cache = network.init_cache(prompt.shape[0], max_length)
    held = prompt_lengths - 1  # [B]
    real = jnp.arange(prompt.shape[1])[None] < held[:, None]  # [B, P]
    _, cache = network.decode(prompt, cache=cache, token_mask=real, deterministic=True)
    return cache.rewind(held)


def speculative_decoder_only(
    target, drafter, prompt: jax.Array, prompt_lengths: jax.Array, *,
    max_decode_steps: int, gamma: int, rng: jax.Array | None = None,
    temperature: float | jax.Array = 0.0, top_k: int = 0, top_p: float | jax.Array = 1.0,
    eos_id: int = 1,
) -> SpeculativeOutput:
    """Continues causal prompts with a `models.DecoderOnly` target and a smaller drafter.

    prompt: [B, P] int32, padded on the right (BOS first, as `DecoderOnlyModel`);
    prompt_lengths: [B] int32 >= 1, each row's real length. Both models prefill the
    prompt but its last token in one pass; the caches get P + max_decode_steps + gamma
    slots, so both configs' max_length must allow that. The two models must share the
    vocabulary. A prefix LM's bidirectional prompt is not supported (the prefill is
    causal). Other arguments: `speculative_decode`.
    """
    if prompt.ndim != 2 or prompt_lengths.shape != prompt.shape[:1]:
        raise ValueError(f"prompt must be [B, P] and prompt_lengths [B], got {prompt.shape} "
                         f"and {prompt_lengths.shape}")
    lengths = _concrete(prompt_lengths)
    if lengths is not None and not ((lengths >= 1) & (lengths <= prompt.shape[1])).all():
        raise ValueError(f"prompt_lengths {lengths.tolist()} must be in [1, P={prompt.shape[1]}]"
                         " (every prompt holds at least its BOS)")
    prompt_lengths = prompt_lengths.astype(jnp.int32)
    max_length = prompt.shape[1] + max_decode_steps + gamma
    first = jnp.take_along_axis(prompt, (prompt_lengths - 1)[:, None], axis=1)[:, 0]
    return speculative_decode(
        decoder_only_step_fn(target),
        _prefill_all_but_last(target, prompt, prompt_lengths, max_length),
        decoder_only_step_fn(drafter),
        _prefill_all_but_last(drafter, prompt, prompt_lengths, max_length),
        first, gamma=gamma, max_decode_steps=max_decode_steps, rng=rng,
        temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
    )


def speculative_encoder_decoder(
    target, drafter, encoder_input_tokens: jax.Array, *, max_decode_steps: int, gamma: int,
    rng: jax.Array | None = None, temperature: float | jax.Array = 0.0, top_k: int = 0,
    top_p: float | jax.Array = 1.0, eos_id: int = 1,
) -> SpeculativeOutput:
    """Decodes targets for `encoder_input_tokens` [B, S_in] (0-padded) with a
    `models.EncoderDecoder` target and a smaller EncoderDecoder drafter.

    Each model encodes the inputs itself; decoding starts from T5's token 0 with empty
    caches of max_decode_steps + gamma + 1 slots. Other arguments: `speculative_decode`.
    """
    fns, caches = [], []
    for network in (target, drafter):
        encoded = network.encode(encoder_input_tokens, deterministic=True)
        fns.append(encoder_decoder_step_fn(network, encoded, encoder_input_tokens))
        caches.append(network.init_cache(encoded, encoder_input_tokens,
                                         max_decode_steps + gamma + 1))
    first = jnp.zeros((encoder_input_tokens.shape[0],), jnp.int32)  # T5 starts from 0
    return speculative_decode(
        fns[0], caches[0], fns[1], caches[1], first, gamma=gamma,
        max_decode_steps=max_decode_steps, rng=rng, temperature=temperature, top_k=top_k,
        top_p=top_p, eos_id=eos_id,
    )

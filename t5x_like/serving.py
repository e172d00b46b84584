"""A generation engine: continuous batching over a fixed set of slots, with prefix caching.

    engine = Engine(network, num_slots=8, max_length=512, eos_id=1,
                    prefix_cache=PrefixCache(block_size=16, max_bytes=1 << 30))
    results = engine.generate([Request(prompt=ids, max_new_tokens=64, temperature=0.7)])

**Slots.** The engine owns one `DecoderOnlyCache` of `num_slots` rows and a buffer of each
row's next-token logits [S, V]; each active request holds one row. `step()`:

    1. admit: each free row takes a waiting request and prefills it (below);
    2. draw: one jitted call draws the next token of every row (per-row parameters);
    3. finish: rows that drew a stop token or reached max_new_tokens are freed;
    4. decode: one jitted call feeds every remaining row its token (one position each).

A freed row is refilled at the next step while the others keep decoding, so short and
long requests never wait for each other (continuous batching, as in Orca / vLLM). Free
rows ride along in the batch, masked: their index stays put and MoE routes them nowhere.

**Admission (prefill).** A request is prefilled alone: its prompt, padded on the right to
the smallest `prefill_buckets` length that holds it, goes through `network.decode` on its
row from cache index `start` (0, or the length of a cached prefix) with `token_mask`
marking the real tokens; the row is then rewound to the prompt length, so the padding's
K/V are never attended (the next tokens overwrite them). One compiled prefill per bucket;
the cache is donated to every call and updated in place.

**Independence.** A request's output depends only on the request: the network treats rows
independently, and the token at sequence position p of a request with seed s is drawn with
the key `fold_in(key(s), p)`, per row, never with a batch-wide key. So a request gives the
same tokens whatever it is batched with, its slot, its arrival order or the prefix cache
state (up to float rounding in the logits, ~1e-6). This holds for dense and dropless-MoE
networks; capacity-limited MoE routing makes tokens of a batch compete by design.

**Prefix cache.** `PrefixCache` keeps the K/V of whole `block_size`-token blocks of past
prompts on device, keyed by a hash chain hash(parent hash, block tokens) as vLLM's block
hashing: a block's key names the entire prefix up to its end, and a block's K/V depend only
on that prefix (causal attention). A new request copies the K/V of its longest cached
prefix of blocks into its row and prefills only the rest, from cache index P. At least the
last prompt token is always recomputed (its logits give the first new token). After each
prefill the prompt's full blocks are inserted. Eviction is least-recently-used under
`max_bytes`; a chain is touched leaf first, so a block is always more recent than its
descendants and eviction removes the deepest blocks of the oldest chains first (what is
cached is always a prefix, never a chain with a hole).

**Encoder-decoder networks** (T5, Switch) are served the same way. A request's `prompt`
is then the encoder input: admission encodes it alone (padded on the right to a
`prefill_buckets` length; padding is masked out of the encoder and of cross-attention),
puts the cross-attention K/V of every decoder layer into the row (padded to the
engine's `max_input_length`) and feeds the decoder start token 0, whose logits give the
first new token. Decode steps are then those of a decoder-only network, one position per
row; the sampling position is the number of decoder tokens fed (1 for the first new
token). Prefix caching does not apply (an encoder input is attended bidirectionally).

The engine runs on one device (where the network's arrays are). Log-probs are those of
the raw model distribution (log_softmax of the logits, before temperature / top-k /
top-p), as `decoding.DecodeOutput.token_log_probs`.

Shapes: S slots, L max_length, T prefill bucket, V vocab, K kv heads, H head dim,
N layers, C block_size.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import numbers
import time
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import decoder_only, encoder_decoder, layers
from t5x_like import decoding

Array = jax.Array

FINISH_STOP = "stop"  # a stop token (eos_id or one of Request.stop_tokens) was generated
FINISH_LENGTH = "length"  # max_new_tokens were generated


# --- requests and results ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request.

    prompt: token ids (at least one). Generation continues the prompt (decoder-only) or
      answers it (encoder-decoder: the encoder input; decoding starts from token 0).
    max_new_tokens: the most tokens to generate (>= 1).
    temperature: 0 is greedy (argmax); > 0 samples from softmax(logits / temperature)
      after top-k (0: off) and top-p (1: off) filtering, as `decoding.process_logits`.
    seed: the request's random stream (see the module docstring); same request and seed,
      same tokens.
    stop_tokens: ids that end the request (in addition to the engine's eos_id); the stop
      token is the last generated token.
    return_logits: keep the raw logits [V] of every generated position in the Result.
    """

    prompt: Sequence[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_tokens: Sequence[int] = ()
    return_logits: bool = False

    def __post_init__(self):
        object.__setattr__(self, "prompt", tuple(int(t) for t in self.prompt))
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))
        if not self.prompt:
            raise ValueError("Request.prompt is empty; pass at least one token id (e.g. BOS)")
        if not isinstance(self.max_new_tokens, numbers.Integral) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an int >= 1")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
        if not isinstance(self.top_k, numbers.Integral) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an int >= 0 (0 disables top-k)")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in [0, 1] (1 disables top-p)")
        if not isinstance(self.seed, numbers.Integral) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed={self.seed!r} must be an int in [0, 2**32)")


@dataclasses.dataclass
class Result:
    """What the engine produced for one request. Times are seconds from `submit`."""

    id: int
    tokens: list[int]  # generated ids, the stop token included
    logprobs: list[float]  # raw model log-prob of each generated token
    finish_reason: str  # FINISH_STOP or FINISH_LENGTH
    prompt_length: int
    cached_tokens: int  # prompt tokens whose K/V came from the prefix cache
    queue_time_s: float  # waiting for a free slot
    time_to_first_token_s: float
    total_time_s: float
    logits: np.ndarray | None = None  # [len(tokens), V] float32 if Request.return_logits


@dataclasses.dataclass
class _Active:
    """Host-side state of the request in one slot."""

    id: int
    request: Request
    stop: frozenset[int]
    submitted: float
    admitted: float
    first_token: float = 0.0
    cached_tokens: int = 0
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    logits: list[np.ndarray] = dataclasses.field(default_factory=list)

    def add(self, token: int, logprob: float, logits: Callable[[], np.ndarray],
            now: float) -> str | None:
        """Appends one generated token; returns the finish reason once done."""
        if not self.tokens:
            self.first_token = now
        self.tokens.append(token)
        self.logprobs.append(logprob)
        if self.request.return_logits:
            self.logits.append(logits())
        if token in self.stop:
            return FINISH_STOP
        if len(self.tokens) >= self.request.max_new_tokens:
            return FINISH_LENGTH
        return None

    def result(self, reason: str, now: float) -> Result:
        return Result(
            id=self.id, tokens=self.tokens, logprobs=self.logprobs, finish_reason=reason,
            prompt_length=len(self.request.prompt), cached_tokens=self.cached_tokens,
            queue_time_s=self.admitted - self.submitted,
            time_to_first_token_s=self.first_token - self.submitted,
            total_time_s=now - self.submitted,
            logits=np.stack(self.logits) if self.request.return_logits else None,
        )


# --- prefix cache ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PrefixCacheStats:
    """Counters since the cache was made. A lookup is a hit when it reused >= 1 block."""

    hits: int = 0
    misses: int = 0
    hit_tokens: int = 0  # prompt tokens whose K/V were reused
    inserted_blocks: int = 0
    evictions: int = 0  # blocks evicted
    num_blocks: int = 0  # blocks held now
    bytes: int = 0  # device bytes held now


def _block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a block: a digest of its parent's key and its own token ids."""
    data = np.asarray(tokens, np.int64).tobytes()
    return hashlib.blake2b(parent + data, digest_size=16).digest()


class PrefixCache:
    """K/V of whole prompt blocks on device, LRU-evicted under a byte budget.

    Each block is one array [N, 2, C, K, H] (keys and values of every layer for C tokens),
    keyed by the hash chain of the prompt up to its end. It holds the K/V of one network:
    give each network (weights) its own PrefixCache.
    """

    def __init__(self, block_size: int = 16, max_bytes: int = 1 << 30):
        if not isinstance(block_size, numbers.Integral) or block_size < 1:
            raise ValueError(f"block_size={block_size!r} must be an int >= 1, e.g. 16")
        if not isinstance(max_bytes, numbers.Integral) or max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes!r} must be an int >= 0")
        self.block_size = int(block_size)
        self.max_bytes = int(max_bytes)
        # key -> block K/V, least recently used first.
        self._blocks: collections.OrderedDict[bytes, Array] = collections.OrderedDict()
        self._bytes = 0
        self._counts = collections.Counter()

    @property
    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(**self._counts, num_blocks=len(self._blocks),
                                bytes=self._bytes)

    def _keys(self, tokens: Sequence[int]) -> list[bytes]:
        """Hash-chain keys of the whole blocks of `tokens`, root first."""
        keys, parent = [], b""
        for start in range(0, len(tokens) - self.block_size + 1, self.block_size):
            parent = _block_hash(parent, tokens[start:start + self.block_size])
            keys.append(parent)
        return keys

    def _touch(self, keys: Sequence[bytes]) -> None:
        # Leaf first, root last: a parent is always more recent than its children.
        for key in reversed(keys):
            self._blocks.move_to_end(key)

    def match(self, tokens: Sequence[int],
              usable: Callable[[int], bool] = lambda num_tokens: True) -> list[Array]:
        """K/V blocks of the longest cached whole-block prefix of `tokens` whose length
        (in tokens) satisfies `usable`; counts the lookup in `stats` and marks the blocks
        used."""
        keys = []
        for key in self._keys(tokens):
            if key not in self._blocks:
                break
            keys.append(key)
        while keys and not usable(len(keys) * self.block_size):
            keys.pop()
        self._counts["hits" if keys else "misses"] += 1
        self._counts["hit_tokens"] += len(keys) * self.block_size
        self._touch(keys)
        return [self._blocks[key] for key in keys]

    def insert(self, tokens: Sequence[int], read_block: Callable[[int], Array]) -> None:
        """Caches every whole block of `tokens`; `read_block(i)` gives the K/V of block i
        (tokens i*C .. (i+1)*C-1) and is called only for blocks not cached yet. Then
        evicts least recently used blocks until the budget holds."""
        keys = self._keys(tokens)
        for i, key in enumerate(keys):
            if key not in self._blocks:
                block = read_block(i)
                self._blocks[key] = block
                self._bytes += block.nbytes
                self._counts["inserted_blocks"] += 1
        self._touch(keys)
        while self._bytes > self.max_bytes:
            _, block = self._blocks.popitem(last=False)
            self._bytes -= block.nbytes
            self._counts["evictions"] += 1

    def clear(self) -> None:
        """Drops every block (the counters stay)."""
        self._blocks.clear()
        self._bytes = 0


# --- jitted device functions -------------------------------------------------------------


def _sample_row(logits: Array, temperature: Array, top_k: Array, top_p: Array,
                seed: Array, position: Array) -> tuple[Array, Array]:
    """One row: logits [V] -> (token, its raw log-prob). Greedy where temperature == 0.

    top_k is traced (one value per row), so the filter ranks tokens with a stable sort:
    exactly top_k survive, ties broken towards the lower id as `decoding.top_k_mask`.
    """
    key = jax.random.fold_in(jax.random.key(seed), position)
    scaled = decoding.apply_temperature(logits, temperature)
    order = jnp.argsort(-scaled, stable=True)  # [V], most likely first
    rank_ok = jnp.arange(logits.shape[-1]) < top_k
    keep = jnp.zeros(logits.shape, jnp.bool_).at[order].set(rank_ok) | (top_k <= 0)
    filtered = jnp.where(keep, scaled, -jnp.inf)
    processed = decoding.process_logits(filtered, temperature=1.0, top_p=top_p)
    sampled = jax.random.categorical(key, processed)
    token = jnp.where(temperature > 0, sampled, jnp.argmax(logits)).astype(jnp.int32)
    return token, jax.nn.log_softmax(logits)[token]


@jax.jit
def _sample(logits: Array, sampling: dict[str, Array], position: Array) -> tuple[Array, Array]:
    """Rows [S, V] with per-row sampling parameters [S] and positions [S] of the tokens
    to draw -> (tokens [S], raw log-probs [S])."""
    return jax.vmap(_sample_row)(logits, sampling["temperature"], sampling["top_k"],
                                 sampling["top_p"], sampling["seed"], position)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache", "logits"))
def _prefill(graphdef, state, cache: decoder_only.DecoderOnlyCache, logits: Array,
             slot: Array, tokens: Array, start: Array, length: Array):
    """Feeds prompt[start:length] (tokens [T], padded) into row `slot` from cache index
    `start` (the row's slots before `start` already hold the prompt's K/V) and puts the
    last prompt token's logits in row `slot` of `logits` [S, V]. Returns (cache, logits)."""
    network = nnx.merge(graphdef, state)
    row = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, slot, 0), cache)  # [1, ...]
    real = jnp.arange(tokens.shape[0]) < length - start  # [T]
    out, row = network.decode(tokens[None], cache=row.rewind(start), token_mask=real[None])
    last = jax.lax.dynamic_index_in_dim(out[0], length - start - 1, 0)  # [1, V]
    row = row.rewind(length)  # the padding's K/V are never attended
    cache = jax.tree.map(lambda c, r: jax.lax.dynamic_update_index_in_dim(c, r, slot, 0),
                         cache, row)
    return cache, jax.lax.dynamic_update_index_in_dim(logits, last, slot, 0)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache", "logits"))
def _prefill_encoder(graphdef, state, cache: encoder_decoder.DecoderCache, logits: Array,
                     slot: Array, inputs: Array):
    """Encodes one request's encoder input (inputs [T], 0-padded), puts its cross-attention
    K/V (padded to the cache's encoder length) in row `slot`, feeds the decoder start token
    0 and puts its logits in row `slot` of `logits` [S, V]. Returns (cache, logits)."""
    network = nnx.merge(graphdef, state)
    encoded = network.encode(inputs[None])  # [1, T, D]
    row = network.init_cache(encoded, inputs[None], cache.max_length)
    pad = cache.encoder_mask.shape[1] - inputs.shape[0]
    row = row.replace(
        cross_attention=tuple(
            layers.KVCache(k=jnp.pad(kv.k, ((0, 0), (0, pad), (0, 0), (0, 0))),
                           v=jnp.pad(kv.v, ((0, 0), (0, pad), (0, 0), (0, 0))))
            for kv in row.cross_attention),
        encoder_mask=jnp.pad(row.encoder_mask, ((0, 0), (0, pad))))
    out, row = network.decode(None, None, jnp.zeros((1, 1), jnp.int32), cache=row)
    cache = jax.tree.map(lambda c, r: jax.lax.dynamic_update_index_in_dim(c, r, slot, 0),
                         cache, row)
    return cache, jax.lax.dynamic_update_index_in_dim(logits, out[:, 0], slot, 0)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _decode(graphdef, state, cache, tokens: Array, active: Array):
    """Feeds every row's last token (tokens [S]) -> (cache, next-token logits [S, V]).
    Inactive rows keep their index and route nowhere in MoE layers (so, under capacity
    routing, they take no expert slot from an active row)."""
    network = nnx.merge(graphdef, state)
    if isinstance(network, encoder_decoder.EncoderDecoder):
        # Cached decoding reads the encoder from the cache (cross K/V and mask).
        logits, new = network.decode(None, None, tokens[:, None], cache=cache,
                                     decoder_token_mask=active[:, None])
    else:
        logits, new = network.decode(tokens[:, None], cache=cache, token_mask=active[:, None])
    return new.rewind(jnp.where(active, new.index, cache.index)), logits[:, 0]


@functools.partial(jax.jit, donate_argnames=("cache",))
def _write_block(cache: decoder_only.DecoderOnlyCache, slot: Array, start: Array,
                 block: Array) -> decoder_only.DecoderOnlyCache:
    """Copies a prefix-cache block [N, 2, C, K, H] into row `slot` at slots start..+C-1."""
    def put(x, kv):  # x [S, L, K, H], kv [C, K, H]
        return jax.lax.dynamic_update_slice(x, kv[None].astype(x.dtype), (slot, start, 0, 0))

    return cache.replace(layers=tuple(
        layers.KVCache(k=put(c.k, block[i, 0]), v=put(c.v, block[i, 1]))
        for i, c in enumerate(cache.layers)))


@functools.partial(jax.jit, static_argnames=("size",))
def _read_block(cache: decoder_only.DecoderOnlyCache, slot: Array, start: Array,
                size: int) -> Array:
    """Row `slot`'s K/V at slots start..start+size-1 -> [N, 2, C, K, H]."""
    def get(x):  # [S, L, K, H] -> [C, K, H]
        return jax.lax.dynamic_slice(x, (slot, start, 0, 0), (1, size, *x.shape[2:]))[0]

    return jnp.stack([jnp.stack([get(c.k), get(c.v)]) for c in cache.layers])


# --- the engine --------------------------------------------------------------------------


def _default_buckets(max_length: int) -> tuple[int, ...]:
    buckets, b = [], 16
    while b < max_length:
        buckets.append(b)
        b *= 2
    return (*buckets, max_length)


class Engine:
    """Continuous-batching generation for a decoder-only or encoder-decoder network (see
    the module docstring).

    Args:
      network: a `models.DecoderOnly` (any variant: RoPE or learned positions, GQA,
        sliding window, MoE) or a `models.EncoderDecoder` (T5, Switch).
      num_slots: requests decoded together (rows of the KV cache).
      max_length: decoder cache slots per row. Decoder-only: every request needs
        len(prompt) + max_new_tokens <= max_length (at most the network's
        config.max_length). Encoder-decoder: 1 + max_new_tokens <= max_length (the
        decoder start token and the new tokens).
      eos_id: a generated eos_id ends a request (None: only Request.stop_tokens do).
      prefill_buckets: prompt (remainder) lengths a prefill is padded to; one compiled
        prefill per bucket used. The longest prompt (max_length, or max_input_length for
        an encoder-decoder) is added as the last bucket. Default: 16, 32, 64, ... below it.
      prefix_cache: a `PrefixCache` to reuse prompt-prefix K/V across requests, or None
        (decoder-only networks only).
      max_input_length: encoder-decoder networks only (required there): the longest
        encoder input (Request.prompt) in tokens; cross-attention K/V are kept at this
        length per row.
    """

    def __init__(
        self,
        network: decoder_only.DecoderOnly,
        *,
        num_slots: int,
        max_length: int,
        eos_id: int | None,
        prefill_buckets: Sequence[int] | None = None,
        prefix_cache: PrefixCache | None = None,
        max_input_length: int | None = None,
    ):
        if not isinstance(network, (decoder_only.DecoderOnly, encoder_decoder.EncoderDecoder)):
            raise TypeError(
                f"Engine serves decoder-only (models.DecoderOnly) and encoder-decoder "
                f"(models.EncoderDecoder) networks; got {type(network).__name__}. Encoder-only "
                "models predict in one forward pass (model.predict_batch)")
        self.encoder_decoder = isinstance(network, encoder_decoder.EncoderDecoder)
        if not isinstance(num_slots, numbers.Integral) or num_slots < 1:
            raise ValueError(f"num_slots={num_slots!r} must be an int >= 1 (the number of "
                             "requests decoded together)")
        config = network.config
        if self.encoder_decoder:
            if not isinstance(max_length, numbers.Integral) or max_length < 2:
                raise ValueError(f"max_length={max_length!r} must be an int >= 2 (decoder "
                                 "slots: the start token and the new tokens)")
            if not isinstance(max_input_length, numbers.Integral) or max_input_length < 1:
                raise ValueError(
                    f"max_input_length={max_input_length!r}: an encoder-decoder Engine needs "
                    "the longest encoder input (Request.prompt) in tokens, an int >= 1")
            if prefix_cache is not None:
                raise ValueError("prefix_cache applies to decoder-only prompts; an "
                                 "encoder-decoder Engine takes prefix_cache=None")
            longest, what = int(max_input_length), "max_input_length"
        else:
            if max_input_length is not None:
                raise ValueError(f"max_input_length={max_input_length} is for encoder-decoder "
                                 "networks; a decoder-only prompt counts against max_length")
            if not isinstance(max_length, numbers.Integral) or not 2 <= max_length <= (
                    config.max_length):
                raise ValueError(
                    f"max_length={max_length!r} must be an int in [2, {config.max_length}] "
                    f"(the network's config.max_length={config.max_length}); lower it or "
                    "build the network with a larger max_length")
            longest, what = int(max_length), "max_length"
        buckets = _default_buckets(longest) if prefill_buckets is None else prefill_buckets
        bad = [b for b in buckets if not isinstance(b, numbers.Integral) or
               not 1 <= b <= longest]
        if bad:
            raise ValueError(f"prefill_buckets {bad} must be ints in [1, {what}="
                             f"{longest}]; drop them or raise {what}")
        self.buckets = tuple(sorted({int(b) for b in buckets} | {longest}))
        self.num_slots, self.max_length, self.eos_id = int(num_slots), int(max_length), eos_id
        self.max_input_length = longest if self.encoder_decoder else None
        self.vocab_size = config.vocab_size
        self.prefix_cache = prefix_cache
        if prefix_cache is not None:
            itemsize = jnp.dtype(config.activation_dtype).itemsize
            block_bytes = (config.num_layers * 2 * prefix_cache.block_size * config.kv_heads
                           * config.head_dim * itemsize)
            if block_bytes > prefix_cache.max_bytes:
                raise ValueError(
                    f"PrefixCache(max_bytes={prefix_cache.max_bytes}) cannot hold one block "
                    f"of {prefix_cache.block_size} tokens ({block_bytes} bytes for this "
                    f"network); raise max_bytes to >= {block_bytes} or lower block_size")

        self._graphdef, self._state = nnx.split(network)
        if self.encoder_decoder:  # empty rows: zero cross K/V, no visible encoder position
            inputs = jnp.zeros((self.num_slots, longest), jnp.int32)
            encoded = jnp.zeros((self.num_slots, longest, config.emb_dim),
                                config.activation_dtype)
            self._cache = network.init_cache(encoded, inputs, self.max_length)
        else:
            self._cache = network.init_cache(self.num_slots, self.max_length)
        self._logits = jnp.zeros((self.num_slots, config.vocab_size), jnp.float32)  # next
        self._slots: list[_Active | None] = [None] * self.num_slots
        self._sampling = {
            "temperature": np.zeros(self.num_slots, np.float32),
            "top_k": np.zeros(self.num_slots, np.int32),
            "top_p": np.ones(self.num_slots, np.float32),
            "seed": np.zeros(self.num_slots, np.uint32),
        }
        self._waiting: collections.deque[tuple[int, Request, float]] = collections.deque()
        self._next_id = 0

    # --- public API --------------------------------------------------------------------

    @property
    def num_active(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def submit(self, request: Request) -> int:
        """Queues `request`; returns its id (Result.id)."""
        n = len(request.prompt)
        if self.encoder_decoder:
            if n > self.max_input_length:
                raise ValueError(
                    f"encoder input of {n} tokens exceeds the engine's max_input_length="
                    f"{self.max_input_length}; shorten it or build the Engine with "
                    f"max_input_length >= {n}")
            if 1 + request.max_new_tokens > self.max_length:
                raise ValueError(
                    f"max_new_tokens={request.max_new_tokens} + the decoder start token "
                    f"exceeds the engine's max_length={self.max_length}; lower "
                    f"max_new_tokens or build the Engine with max_length >= "
                    f"{1 + request.max_new_tokens}")
        elif n + request.max_new_tokens > self.max_length:
            raise ValueError(
                f"prompt of {n} tokens + max_new_tokens={request.max_new_tokens} = "
                f"{n + request.max_new_tokens} exceeds the engine's max_length="
                f"{self.max_length}; shorten the prompt, lower max_new_tokens or build the "
                f"Engine with max_length >= {n + request.max_new_tokens}")
        bad = [t for t in request.prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary "
                             f"[0, {self.vocab_size})")
        if self.encoder_decoder and 0 in request.prompt:
            raise ValueError("encoder input holds token id 0, which the encoder masks as "
                             "padding; drop it (T5 inputs never contain 0)")
        request_id, self._next_id = self._next_id, self._next_id + 1
        self._waiting.append((request_id, request, time.perf_counter()))
        return request_id

    def step(self) -> list[Result]:
        """Admits waiting requests into free slots (prefill), draws one token for every
        active slot, frees the finished ones and feeds the rest one decode step. Returns
        the requests that finished in this step."""
        for slot in range(self.num_slots):
            if self._slots[slot] is None and self._waiting:
                self._admit(slot, *self._waiting.popleft())
        active = np.array([s is not None for s in self._slots])
        if not active.any():
            return []
        # The token drawn for a row sits at its cache index (= tokens fed so far).
        tokens, logprobs = _sample(self._logits, self._sampling, self._cache.index)
        tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
        buffer = self._logits
        logits = functools.cache(lambda: np.asarray(buffer))  # fetched only if asked for
        finished, now = [], time.perf_counter()
        for slot, state in enumerate(self._slots):
            if state is None:
                continue
            reason = state.add(int(tokens[slot]), float(logprobs[slot]),
                               lambda slot=slot: logits()[slot], now)
            if reason is not None:
                finished.append(state.result(reason, now))
                self._slots[slot] = None
                active[slot] = False
        if active.any():
            self._cache, self._logits = _decode(self._graphdef, self._state, self._cache,
                                                tokens, active)
        return finished

    def run(self) -> list[Result]:
        """Steps until no request is waiting or active; returns their results by id."""
        results = []
        while self._waiting or self.num_active:
            results.extend(self.step())
        return sorted(results, key=lambda r: r.id)

    def generate(self, requests: Iterable[Request]) -> list[Result]:
        """Submits `requests`, runs to completion, returns their results in order."""
        ids = [self.submit(r) for r in requests]
        by_id = {r.id: r for r in self.run()}
        return [by_id[i] for i in ids]

    # --- internals ---------------------------------------------------------------------

    def _bucket(self, length: int) -> int:
        return next(b for b in self.buckets if b >= length)

    def _fits(self, prompt_length: int, start: int) -> bool:
        """Can a prefill reuse `start` cached tokens? The last prompt token is always
        fed, and the padded prefill must stay within the cache: its padding positions
        must exist (learned position tables give NaN past their end)."""
        return (start < prompt_length
                and start + self._bucket(prompt_length - start) <= self.max_length)

    def _admit(self, slot: int, request_id: int, request: Request, submitted: float) -> None:
        """Prefills `request` into `slot`, reusing cached prefix blocks."""
        prompt, n = request.prompt, len(request.prompt)
        stop = set(request.stop_tokens) | ({self.eos_id} if self.eos_id is not None else set())
        active = _Active(id=request_id, request=request, stop=frozenset(stop),
                         submitted=submitted, admitted=time.perf_counter())
        pc = self.prefix_cache
        if pc is not None:
            blocks = pc.match(prompt, lambda p: self._fits(n, p))
            for i, block in enumerate(blocks):
                self._cache = _write_block(self._cache, np.int32(slot),
                                           np.int32(i * pc.block_size), block)
            active.cached_tokens = len(blocks) * pc.block_size
        start = active.cached_tokens
        tokens = np.zeros(self._bucket(n - start), np.int32)
        tokens[:n - start] = prompt[start:]
        if self.encoder_decoder:
            self._cache, self._logits = _prefill_encoder(
                self._graphdef, self._state, self._cache, self._logits, np.int32(slot),
                tokens)
        else:
            self._cache, self._logits = _prefill(
                self._graphdef, self._state, self._cache, self._logits, np.int32(slot),
                tokens, np.int32(start), np.int32(n))
        if pc is not None:
            pc.insert(prompt, lambda i: _read_block(
                self._cache, np.int32(slot), np.int32(i * pc.block_size), pc.block_size))
        self._slots[slot] = active
        for name, value in (("temperature", request.temperature), ("top_k", request.top_k),
                            ("top_p", request.top_p), ("seed", request.seed)):
            self._sampling[name][slot] = value


__all__ = [
    "FINISH_LENGTH",
    "FINISH_STOP",
    "Engine",
    "PrefixCache",
    "PrefixCacheStats",
    "Request",
    "Result",
]

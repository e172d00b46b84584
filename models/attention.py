"""softmax(q.k + bias) . v in several implementations, one dispatcher (`attention`).

    xla          `dot_product_attention`: the naive einsum; logits [B, N, T, S] in memory.
    blockwise    `blockwise_attention`: exact FlashAttention-2 in plain JAX (any platform);
                 memory linear in T and S in the forward and the backward pass.
    cudnn        `jax.nn.dot_product_attention(implementation='cudnn')` (GPU).
    pallas_tpu   the Pallas TPU flash kernel (`jax.experimental.pallas.ops.tpu`).
    auto         a fused kernel (cudnn on GPU, pallas_tpu on TPU) where it supports the
                 mask and bias, else xla.

Masks come dense (bool, broadcastable to [B, N, T, S], as the naive path takes them) or
structural: an `AttentionSpec` describes them per token (indices for causal and sliding
window, segment ids, validity, prefix-LM flags), so `blockwise_attention` builds each
[tq, tk] tile of the mask on the fly and never a [T, S] one. Likewise a `bias_fn`
(e.g. the T5 relative bias, `layers.RelativePositionBiases`) is evaluated per tile at
the tile's query and key positions.

Fully masked query rows (e.g. padding queries of the T5 encoder) give what the naive
path gives with its finite NEG_INF: the uniform average of all S values (gradient: each
value gets 1/S of the row's output gradient; none reaches q, k or the bias). The fused
kernels keep such rows finite too, but with values of their own; no loss reads them.

A fused kernel asked for on another platform is an error naming the platform; inputs a
kernel cannot take (a bias_fn, a mask it has no form for, a dtype or head dim it
refuses) run 'blockwise' instead when the kernel was asked for, 'xla' under 'auto', and
the reason is logged (logger `models.attention`, level INFO).

Shape letters are those of `models/layers.py`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from flax import struct

from partitioning import rules as _rules

Array = jax.Array
BiasFn = Callable[[Array, Array], Array]

_log = logging.getLogger(__name__)

# Large negative logit for masked keys in the naive path. A finite value keeps fully
# masked rows (padding queries) finite: they become a uniform average instead of NaN.
NEG_INF = -1e10

IMPLEMENTATIONS = ("xla", "blockwise", "cudnn", "pallas_tpu", "auto")
# Tile sizes of `blockwise_attention` (and the Pallas kernel); clipped to T and S.
DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 256
_PLATFORM_OF = {"cudnn": "gpu", "pallas_tpu": "tpu"}


# --- the naive path ---------------------------------------------------------------------


def _split_heads(x: Array, num_kv_heads: int) -> Array:
    """Mask or bias [B, N or 1, T, S] -> [B, K or 1, G or 1, T, S]."""
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape(x.shape[0], num_kv_heads, x.shape[1] // num_kv_heads, *x.shape[2:])


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    scale: float = 1.0,
    dropout: Callable[[Array], Array] | None = None,
) -> Array:
    """softmax(scale * q.k + bias, masked) . v with grouped kv heads.

    query [B, T, N, H], key/value [B, S, K, H] with N a multiple of K (K == N: MHA,
    K == 1: MQA); mask (bool) and bias broadcastable to [B, N, T, S] with a head dim of
    N or 1. Logits and softmax are float32; returns [B, T, N, H] in value's dtype.
    """
    b, t, n, h = query.shape
    k_heads = key.shape[2]
    if n % k_heads:
        raise ValueError(f"num_heads {n} is not a multiple of num_kv_heads {k_heads}")
    q = query.reshape(b, t, k_heads, n // k_heads, h)  # [B, T, N, H] -> [B, T, K, G, H]
    logits = jnp.einsum("btkgh,bskh->bkgts", q, key, preferred_element_type=jnp.float32)
    if scale != 1.0:
        logits = logits * scale
    if bias is not None:
        logits = logits + _split_heads(bias, k_heads).astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(_split_heads(mask, k_heads), logits, NEG_INF)
    weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)  # [B, K, G, T, S]
    if dropout is not None:
        weights = dropout(weights)
    out = jnp.einsum("bkgts,bskh->btkgh", weights, value)
    return out.reshape(b, t, n, h)  # [B, T, K, G, H] -> [B, T, N, H]


# --- structural masks -------------------------------------------------------------------

_TOKEN_FIELDS = ("index", "segment_ids", "valid", "prefix")


@struct.dataclass
class AttentionSpec:
    """Which keys each query sees, described per token, plus the positions of a bias_fn.

    Query t may attend key s when all of these hold (unset fields impose nothing):

        causal          key_index[s] <= query_index[t]
                        or (query_prefix[t] and key_prefix[s])     (prefix LM)
        segments        query_segment_ids[t] == key_segment_ids[s] (packing)
        validity        query_valid[t] and key_valid[s]            (padding)
        sliding_window  |query_index[t] - key_index[s]| < sliding_window

    Shapes: query_* [B|1, T], key_* [B|1, S] (a rank-1 index [T] is allowed). The indices
    default to 0..T-1 and 0..S-1 (top-left aligned when T != S); pass them for decoding
    offsets. query_positions / key_positions ([T] or [B, T], [S] or [B, S]) are what a
    `bias_fn` receives (default: the indices); T5 resets them per packed segment.
    """

    causal: bool = struct.field(pytree_node=False, default=False)
    sliding_window: int | None = struct.field(pytree_node=False, default=None)
    query_index: Array | None = None
    key_index: Array | None = None
    query_segment_ids: Array | None = None
    key_segment_ids: Array | None = None
    query_valid: Array | None = None
    key_valid: Array | None = None
    query_prefix: Array | None = None
    key_prefix: Array | None = None
    query_positions: Array | None = None
    key_positions: Array | None = None

    def _check(self) -> None:
        for name in ("segment_ids", "prefix"):
            if (getattr(self, f"query_{name}") is None) != (getattr(self, f"key_{name}") is None):
                raise ValueError(f"AttentionSpec: give both query_{name} and key_{name} "
                                 "or neither")
        if self.query_prefix is not None and not self.causal:
            raise ValueError("AttentionSpec: query_prefix / key_prefix (prefix LM) widen a "
                             "causal mask; set causal=True")
        w = self.sliding_window
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 1):
            raise ValueError(f"AttentionSpec: sliding_window={w!r} must be a positive int "
                             "or None")

    @property
    def restricts(self) -> bool:
        """Whether any query is kept from any key (else the spec only carries positions)."""
        return (self.causal or self.sliding_window is not None
                or any(getattr(self, f"{side}_{name}") is not None
                       for side in ("query", "key") for name in ("segment_ids", "valid")))

    def _tokens(self, side: str, length: int) -> dict[str, Array]:
        """The per-token arrays of one side ('query' or 'key'), each [B|1, length]."""
        out = {}
        for name in _TOKEN_FIELDS:
            x = getattr(self, f"{side}_{name}")
            if x is None and name == "index" and (self.causal or self.sliding_window):
                x = jnp.arange(length, dtype=jnp.int32)
            if x is not None:
                x = jnp.asarray(x)
                x = x.astype(jnp.int32 if name in ("index", "segment_ids") else jnp.bool_)
                out[name] = x.reshape(-1, length)  # [T] -> [1, T]
        return out

    def positions(self, side: str, length: int) -> Array:
        """What `bias_fn` receives for one side: [length] or [B|1, length] int32."""
        x = getattr(self, f"{side}_positions")
        if x is None:
            x = getattr(self, f"{side}_index")
        if x is None:
            x = jnp.arange(length, dtype=jnp.int32)
        return jnp.asarray(x).astype(jnp.int32)

    def dense_mask(self, query_length: int, key_length: int) -> Array | None:
        """The mask as bool [B|1, 1, T, S] (None if it restricts nothing): what the naive
        and cuDNN paths take. `blockwise_attention` never builds it."""
        self._check()
        if not self.restricts:
            return None
        allowed = _spec_allowed(self, self._tokens("query", query_length),
                                self._tokens("key", key_length))
        return allowed[:, None]  # [B|1, T, S] -> [B|1, 1, T, S]


def _spec_allowed(spec: AttentionSpec, q: dict[str, Array], k: dict[str, Array]) -> Array | None:
    """The spec's mask for per-token arrays q [B|1, tq] and k [B|1, tk]: [B|1, tq, tk]."""
    def pair(name, fn):
        return fn(q[name][:, :, None], k[name][:, None, :])

    allowed = None
    def both(x):
        nonlocal allowed
        allowed = x if allowed is None else allowed & x

    if spec.causal:
        both(pair("index", jnp.greater_equal))
        if "prefix" in q:
            allowed = allowed | pair("prefix", jnp.logical_and)
    if "segment_ids" in q:
        both(pair("segment_ids", jnp.equal))
    if "valid" in q:
        both(q["valid"][:, :, None])
    if "valid" in k:
        both(k["valid"][:, None, :])
    if spec.sliding_window is not None:
        both(jnp.abs(q["index"][:, :, None] - k["index"][:, None, :]) < spec.sliding_window)
    return allowed


# --- blockwise (FlashAttention-2) -------------------------------------------------------


def _spec_tile_may_attend(spec: AttentionSpec, q: dict[str, Array],
                          k: dict[str, Array]) -> Array | None:
    """Whether a tile may hold an allowed pair, from per-block summaries (bool [B|1]).

    q and k hold each field's min / max (index, segment ids) or any (valid, prefix) over
    the block's tokens. Conservative: false only when no pair can be allowed, e.g. a key
    block wholly after a query block under a causal mask. None: nothing is masked.
    """
    may = None
    def both(x):
        nonlocal may
        may = x if may is None else may & x

    if spec.causal:
        causal = k["index_min"] <= q["index_max"]
        if "prefix_any" in q:
            causal = causal | (q["prefix_any"] & k["prefix_any"])
        both(causal)
    if "segment_ids_min" in q:  # the id ranges overlap
        both((q["segment_ids_min"] <= k["segment_ids_max"])
             & (k["segment_ids_min"] <= q["segment_ids_max"]))
    if "valid_any" in q:
        both(q["valid_any"])
    if "valid_any" in k:
        both(k["valid_any"])
    if spec.sliding_window is not None:
        w = spec.sliding_window
        both((k["index_min"] - q["index_max"] < w) & (q["index_min"] - k["index_max"] < w))
    return may


def _summaries(tokens: dict[str, Array]) -> dict[str, Array]:
    """Per-block summaries of blocked token arrays [nb, B|1, block] -> [nb, B|1]."""
    out = {}
    for name, x in tokens.items():
        if name in ("index", "segment_ids"):
            out[f"{name}_min"], out[f"{name}_max"] = x.min(-1), x.max(-1)
        else:
            out[f"{name}_any"] = x.any(-1)
    return out


def _span(may: Array) -> tuple[Array, Array]:
    """First and one-past-last true entry of bool [C] (0, 0 if none)."""
    cols = jnp.arange(may.shape[0])
    first = jnp.min(jnp.where(may, cols, may.shape[0]))
    stop = jnp.max(jnp.where(may, cols + 1, 0))
    return jnp.minimum(first, stop), stop


def _add_tile(full: Array, tile: Array, i: Array, j: Array, bq: int, bk: int) -> Array:
    """Adds tile (i, j) [B|1, N|1, bq|1, bk|1] into `full` [B|1, N|1, T'|1, S'|1]."""
    start = (0, 0, i * bq if full.shape[2] != 1 else 0, j * bk if full.shape[3] != 1 else 0)
    current = jax.lax.dynamic_slice(full, start, tile.shape)
    return jax.lax.dynamic_update_slice(full, current + tile, start)


def _check_dense(x: Array | None, name: str, shape: tuple[int, int, int, int]) -> Array | None:
    """A dense mask / bias as 4-D [B|1, N|1, T|1, S|1] (its own dims kept, not broadcast)."""
    if x is None:
        return None
    x = jnp.asarray(x)
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    if x.ndim != 4 or any(d not in (1, full) for d, full in zip(x.shape, shape)):
        raise ValueError(f"{name} of shape {x.shape} is not broadcastable to [B, N, T, S] = "
                         f"{shape} with each dim either full or 1")
    return x


def _blocks(x: Array, axis: int, block: int, padded: int, mode: str = "constant") -> Array:
    """Pads `axis` to `padded` (zeros, or the last entry for mode='edge') and splits it
    into blocks, block index first: [..., L, ...] -> [L' / block, ..., block, ...]."""
    axis %= x.ndim
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, padded - x.shape[axis])
    x = jnp.pad(x, pad, mode=mode)
    x = x.reshape(*x.shape[:axis], padded // block, block, *x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _tile(x: Array | None, i: Array, j: Array, bq: int, bk: int) -> Array | None:
    """Tile (i, j) of a dense [B|1, N|1, T'|1, S'|1] mask or bias (size-1 dims kept)."""
    if x is None:
        return None
    if x.shape[2] != 1:
        x = jax.lax.dynamic_slice_in_dim(x, i * bq, bq, axis=2)
    if x.shape[3] != 1:
        x = jax.lax.dynamic_slice_in_dim(x, j * bk, bk, axis=3)
    return x


def _reduce_to(x: Array, shape: tuple[int, ...]) -> Array:
    """Sums x over the dims where `shape` is 1 (the gradient of a broadcast)."""
    axes = tuple(a for a, (d, e) in enumerate(zip(shape, x.shape)) if d == 1 and e != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def blockwise_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    spec: AttentionSpec | None = None,
    bias_fn: BiasFn | None = None,
    scale: float = 1.0,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
) -> Array:
    """Exact attention in [block_q, block_k] tiles with an online softmax (FlashAttention-2).

    query [B, T, N, H], key/value [B, S, K, H] (N a multiple of K: MHA / GQA / MQA).
    mask: bool, and bias: float, broadcastable to [B, N, T, S] (each dim full or 1;
    sliced per tile). spec: the structural mask (and the positions given to bias_fn).
    bias_fn(query_positions_tile, key_positions_tile) -> [B|1, N|1, tq, tk] float bias,
    called per tile; it may close over parameters (gradients reach them). Returns
    [B, T, N, H] in value's dtype, equal to `dot_product_attention` up to float rounding.

    T and S need not be multiples of the blocks (padded, and padded keys masked). The
    softmax statistics are float32. Memory is O((T + S) * N * H + block_q * block_k * B * N):
    a `jax.custom_vjp` saves only the output and the row logsumexp, and the backward pass
    recomputes each tile's probabilities. Each query block visits only the key blocks
    from the first to the last it may attend (judged from per-block index / segment /
    validity ranges and any dense mask; the others are masked anyway), so a causal pass
    does about half the work of a full one and a sliding window O(T * window).
    """
    b, t, n, h = query.shape
    s, k_heads = key.shape[1], key.shape[2]
    if key.shape != (b, s, k_heads, h) or value.shape != key.shape:
        raise ValueError(f"key {key.shape} and value {value.shape} must both be "
                         f"[B, S, K, H] with B={b}, H={h} of query {query.shape}")
    if n % k_heads:
        raise ValueError(f"num_heads {n} is not a multiple of num_kv_heads {k_heads}")
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"{name}={size!r} must be a positive integer, e.g. 256")
    g = n // k_heads
    bq, bk = min(block_q, t), min(block_k, s)
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk  # padded lengths
    nq, nk = tp // bq, sp // bk
    spec = spec if spec is not None else AttentionSpec()
    spec._check()

    def pad_dense(x, name):
        x = _check_dense(x, name, (b, n, t, s))
        if x is None:
            return None
        pad_t, pad_s = (tp - t) * (x.shape[2] != 1), (sp - s) * (x.shape[3] != 1)
        return jnp.pad(x, [(0, 0), (0, 0), (0, pad_t), (0, pad_s)])

    mask, bias = pad_dense(mask, "mask"), pad_dense(bias, "bias")
    # Token arrays [nb, B|1, block], padded with their last entry so that the block
    # summaries stay tight; padded keys are masked by k_in_range, padded queries dropped.
    q_tok = {k_: _blocks(x, -1, bq, tp, "edge") for k_, x in spec._tokens("query", t).items()}
    k_tok = {k_: _blocks(x, -1, bk, sp, "edge") for k_, x in spec._tokens("key", s).items()}
    q_pos = k_pos = fn = fn_out = None
    consts = []
    if bias_fn is not None:
        q_pos = _blocks(spec.positions("query", t), -1, bq, tp, "edge")  # [nq, (B,) bq]
        k_pos = _blocks(spec.positions("key", s), -1, bk, sp, "edge")
        # A fresh lambda: closure_convert caches on the function, and a cache hit would
        # hand back the parameters of an earlier call.
        fn, consts = jax.closure_convert(lambda qp, kp: bias_fn(qp, kp), q_pos[0], k_pos[0])
        fn_out = jax.eval_shape(fn, q_pos[0], k_pos[0], *consts)
        shape = fn_out.shape
        if len(shape) != 4 or shape[0] not in (1, b) or shape[1] not in (1, n) \
                or shape[2:] != (bq, bk):
            raise ValueError(f"bias_fn gave a tile of shape {shape}; expected [B|1, N|1, "
                             f"tq, tk] = [{b}|1, {n}|1, {bq}, {bk}]")
    # [B, T, N, H] -> [B, T, K, G, H] -> [nq, B, K, G, bq, H]; keys [nk, B, K, bk, H].
    qb = _blocks(query.reshape(b, t, k_heads, g, h), 1, bq, tp).transpose(0, 1, 3, 4, 2, 5)
    kb = _blocks(key, 1, bk, sp).transpose(0, 1, 3, 2, 4)
    vb = _blocks(value, 1, bk, sp).transpose(0, 1, 3, 2, 4)
    k_in_range = (jnp.arange(sp) < s).reshape(nk, bk)  # real (unpadded) keys
    may_skip = mask is not None or spec.restricts
    # The static part of the spec, for the closures below (its arrays are arguments).
    static_spec = AttentionSpec(causal=spec.causal, sliding_window=spec.sliding_window)

    def may_attend(q_sum, k_sum, mask, i=None, j=None):
        """Which tiles of query block i (bool [nk]) or key block j ([nq]) may hold an
        allowed pair, from the block summaries and any dense mask: O(T + S) memory."""
        qs = jax.tree.map(lambda x: x[i][None] if i is not None else x, q_sum)
        ks = jax.tree.map(lambda x: x[j][None] if j is not None else x, k_sum)
        may = _spec_tile_may_attend(static_spec, jax.tree.map(lambda x: x[:, None], qs),
                                    jax.tree.map(lambda x: x[None], ks))
        may = jnp.ones((1, 1), bool) if may is None else may.any(-1)  # [nq|1, nk|1]
        may = may[0] if i is not None else may[:, 0]
        if mask is not None:  # any allowed pair in the dense mask's tiles
            if i is not None:
                rows = mask if mask.shape[2] == 1 else jax.lax.dynamic_slice_in_dim(
                    mask, i * bq, bq, axis=2)
                m = rows.any(axis=(0, 1, 2))  # [S'|1]
                m = m.reshape(nk, bk).any(-1) if m.shape[0] != 1 else m
            else:
                cols = mask if mask.shape[3] == 1 else jax.lax.dynamic_slice_in_dim(
                    mask, j * bk, bk, axis=3)
                m = cols.any(axis=(0, 1, 3))  # [T'|1]
                m = m.reshape(nq, bq).any(-1) if m.shape[0] != 1 else m
            may = may & m
        return jnp.broadcast_to(may, (nk,) if i is not None else (nq,))

    def tile_allowed(qt, kt, in_range, m_tile):
        """bool [B|1, K|1, G|1, bq, bk] (None when nothing is masked)."""
        if not may_skip and sp == s:
            return None
        allowed = in_range[None, None, :]  # [1, 1, bk]
        spec_allowed = _spec_allowed(static_spec, qt, kt)
        if spec_allowed is not None:
            allowed = allowed & spec_allowed  # [B|1, bq, bk]
        allowed = allowed[:, None, None]
        if m_tile is not None:
            allowed = allowed & _split_heads(m_tile, k_heads)
        return allowed

    def tile_logits(q_i, k_j, bias_tile, allowed):
        """Masked float32 logits [B, K, G, bq, bk] (masked: -inf)."""
        logits = jnp.einsum("bkgqh,bksh->bkgqs", q_i, k_j, preferred_element_type=jnp.float32)
        if scale != 1.0:
            logits = logits * scale
        if bias_tile is not None:
            logits = logits + _split_heads(bias_tile, k_heads).astype(jnp.float32)
        if allowed is not None:
            logits = jnp.where(allowed, logits, -jnp.inf)
        return logits

    def tile_bias(bias, consts, qp, kp, i, j, with_vjp=False):
        tb, fn_vjp = _tile(bias, i, j, bq, bk), None
        if fn is not None:
            if with_vjp:
                extra, fn_vjp = jax.vjp(lambda *c: fn(qp, kp, *c), *consts)
            else:
                extra = fn(qp, kp, *consts)
            tb = extra if tb is None else tb + extra
        return tb, fn_vjp

    def take(tree, index):
        return jax.tree.map(lambda x: x[index], tree)

    def forward(qb, kb, vb, mask, bias, consts, q_tok, k_tok, q_pos, k_pos):
        # Fully masked rows get the naive path's uniform average over the S real values.
        v_real = jnp.where(k_in_range[:, None, None, :, None], vb.astype(jnp.float32), 0)
        v_mean = jnp.sum(v_real, axis=(0, 3)) / s  # [B, K, H]
        q_sum, k_sum = _summaries(q_tok), _summaries(k_tok)

        def q_step(_, xs):
            q_i, qt, qp, i = xs

            def k_step(j, carry):
                m, row_sum, acc = carry
                k_j, v_j = kb[j], vb[j]
                tb, _ = tile_bias(bias, consts, qp, take(k_pos, j), i, j)
                allowed = tile_allowed(qt, take(k_tok, j), k_in_range[j],
                                       _tile(mask, i, j, bq, bk))
                logits = tile_logits(q_i, k_j, tb, allowed)
                m_new = jnp.maximum(m, logits.max(-1))
                m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no valid key yet
                p = jnp.exp(logits - m_safe[..., None])
                alpha = jnp.exp(m - m_safe)
                row_sum = alpha * row_sum + p.sum(-1)
                pv = jnp.einsum("bkgqs,bksh->bkgqh", p.astype(v_j.dtype), v_j,
                                preferred_element_type=jnp.float32)
                return m_new, row_sum, alpha[..., None] * acc + pv

            stats = q_i.shape[:-1]  # [B, K, G, bq]
            init = (jnp.full(stats, -jnp.inf, jnp.float32), jnp.zeros(stats, jnp.float32),
                    jnp.zeros(q_i.shape, jnp.float32))
            # Visit only the key blocks from the first to the last that may be attended.
            lo, hi = _span(may_attend(q_sum, k_sum, mask, i=i)) if may_skip else (0, nk)
            m, row_sum, acc = jax.lax.fori_loop(lo, hi, k_step, init)
            empty = row_sum == 0  # no allowed key
            row_sum = jnp.where(empty, 1.0, row_sum)
            out = jnp.where(empty[..., None], v_mean[:, :, None, None, :],
                            acc / row_sum[..., None])
            lse = jnp.where(empty, jnp.inf, m + jnp.log(row_sum))
            return None, (out.astype(value.dtype), lse)

        _, (out, lse) = jax.lax.scan(q_step, None, (qb, q_tok, q_pos, jnp.arange(nq)))
        return out, lse  # [nq, B, K, G, bq, H], [nq, B, K, G, bq]

    @jax.custom_vjp
    def flash(qb, kb, vb, mask, bias, consts, q_tok, k_tok, q_pos, k_pos):
        return forward(qb, kb, vb, mask, bias, consts, q_tok, k_tok, q_pos, k_pos)[0]

    def flash_fwd(*args):
        out, lse = forward(*args)
        return out, (args, out, lse)

    def flash_bwd(res, d_out):
        (qb, kb, vb, mask, bias, consts, q_tok, k_tok, q_pos, k_pos), out, lse = res
        q_sum, k_sum = _summaries(q_tok), _summaries(k_tok)
        # D_i = rowsum(dO * O), FlashAttention-2's correction term of the softmax gradient.
        delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
        bias_tile_shape = None
        if bias is not None:
            bias_tile_shape = (*bias.shape[:2], bq if bias.shape[2] != 1 else 1,
                               bk if bias.shape[3] != 1 else 1)

        def k_step(carry, xs):
            k_j, v_j, kt, kp, in_range, j = xs

            def q_step(i, inner):
                """Adds the gradients of tile (i, j)."""
                def tile_grads():
                    q_i, do_i, lse_i, delta_i = qb[i], d_out[i], lse[i], delta[i]
                    tb, fn_vjp = tile_bias(bias, consts, take(q_pos, i), kp, i, j, True)
                    allowed = tile_allowed(take(q_tok, i), kt, in_range,
                                           _tile(mask, i, j, bq, bk))
                    logits = tile_logits(q_i, k_j, tb, allowed)
                    p = jnp.exp(logits - lse_i[..., None])  # [B, K, G, bq, bk]
                    dv = jnp.einsum("bkgqs,bkgqh->bksh", p.astype(do_i.dtype), do_i,
                                    preferred_element_type=jnp.float32)
                    dp = jnp.einsum("bkgqh,bksh->bkgqs", do_i, v_j,
                                    preferred_element_type=jnp.float32)
                    ds = p * (dp - delta_i[..., None])  # d logits (after scale and bias)
                    dq = jnp.einsum("bkgqs,bksh->bkgqh", ds.astype(q_i.dtype), k_j,
                                    preferred_element_type=jnp.float32) * scale
                    dk = jnp.einsum("bkgqs,bkgqh->bksh", ds.astype(q_i.dtype), q_i,
                                    preferred_element_type=jnp.float32) * scale
                    ds_heads = ds.reshape(b, n, bq, bk)
                    d_bias = d_consts = None
                    if bias_tile_shape is not None:
                        d_bias = _reduce_to(ds_heads, bias_tile_shape)
                    if fn_vjp is not None:
                        d_extra = _reduce_to(ds_heads, fn_out.shape).astype(fn_out.dtype)
                        d_consts = list(fn_vjp(d_extra))
                    return dq, dk, dv, d_bias, d_consts

                dk, dv, dq, d_bias, d_consts = inner
                dq_i, dk_ij, dv_ij, d_bias_ij, d_consts_ij = tile_grads()
                dq = dq.at[i].add(dq_i)
                if d_bias is not None:
                    d_bias = _add_tile(d_bias, d_bias_ij, i, j, bq, bk)
                if d_consts_ij is not None:
                    d_consts = jax.tree.map(jnp.add, d_consts, d_consts_ij)
                return dk + dk_ij, dv + dv_ij, dq, d_bias, d_consts

            dq, d_bias, d_consts = carry
            init = (jnp.zeros(k_j.shape, jnp.float32), jnp.zeros(v_j.shape, jnp.float32),
                    dq, d_bias, d_consts)
            lo, hi = _span(may_attend(q_sum, k_sum, mask, j=j)) if may_skip else (0, nq)
            dk, dv, dq, d_bias, d_consts = jax.lax.fori_loop(lo, hi, q_step, init)
            return (dq, d_bias, d_consts), (dk, dv)

        init = (jnp.zeros(qb.shape, jnp.float32),
                None if bias is None else jnp.zeros(bias.shape, jnp.float32),
                [jnp.zeros_like(c) for c in consts])
        (dq, d_bias, d_consts), (dk, dv) = jax.lax.scan(
            k_step, init, (kb, vb, k_tok, k_pos, k_in_range, jnp.arange(nk)))
        # Each fully masked row averaged the S real values: each gets 1/S of its gradient.
        empty = (lse == jnp.inf)[..., None]
        d_mean = jnp.sum(jnp.where(empty, d_out.astype(jnp.float32), 0), axis=(0, 3, 4))
        dv = dv + jnp.where(k_in_range[:, None, None, :, None], d_mean[None, :, :, None] / s, 0)
        if d_bias is not None:
            d_bias = d_bias.astype(bias.dtype)
        return (dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype), None, d_bias,
                [d.astype(c.dtype) for d, c in zip(d_consts, consts)], None, None, None, None)

    flash.defvjp(flash_fwd, flash_bwd)
    out = flash(qb, kb, vb, mask, bias, consts, q_tok, k_tok, q_pos, k_pos)
    # [nq, B, K, G, bq, H] -> [B, nq, bq, K, G, H] -> [B, T, N, H]
    out = jnp.moveaxis(out.transpose(0, 1, 4, 2, 3, 5), 0, 1).reshape(b, tp, n, h)
    return out[:, :t]


# --- fused kernels ----------------------------------------------------------------------


def _default_index(spec: AttentionSpec) -> bool:
    return spec.query_index is None and spec.key_index is None


def _cudnn_unsupported(query: Array, key: Array, spec: AttentionSpec | None,
                       bias_fn: BiasFn | None) -> str | None:
    """Why cuDNN's flash attention cannot run these inputs (None: it can)."""
    if query.dtype not in (jnp.float16, jnp.bfloat16) or key.dtype != query.dtype:
        return (f"cuDNN flash attention takes float16 / bfloat16 inputs, got query "
                f"{query.dtype} and key {key.dtype}")
    h = query.shape[-1]
    if h % 8 or h > 256:
        return f"cuDNN flash attention needs a head dim <= 256 and a multiple of 8, got {h}"
    if bias_fn is not None:
        return ("cuDNN takes only a dense [B, N, T, S] bias; a bias_fn (e.g. the T5 "
                "relative bias) is computed per tile by 'blockwise' instead")
    if spec is not None and spec.causal and not (
            _default_index(spec) and query.shape[1] == key.shape[1]):
        return ("cuDNN's causal mask needs default token indices and T == S, got "
                f"T={query.shape[1]}, S={key.shape[1]}, explicit indices: "
                f"{not _default_index(spec)}")
    return None


def cudnn_attention(
    query: Array, key: Array, value: Array, *, mask: Array | None = None,
    bias: Array | None = None, spec: AttentionSpec | None = None, scale: float = 1.0,
    implementation: str = "cudnn",
) -> Array:
    """`jax.nn.dot_product_attention(implementation='cudnn')` on our arguments.

    Causal and causal + sliding window masks are native (`is_causal`,
    `local_window_size=(window - 1, 0)`); the rest of a spec (padding, segments, prefix
    LM, a window without causality) and a dense mask become a bool [B|1, 1|N, T, S]
    mask (one byte per pair; cuDNN turns it into an additive bias). `implementation`
    exists so that tests can check this argument mapping with jax's 'xla' path on CPU.
    """
    t, s = query.shape[1], key.shape[1]
    spec = spec if spec is not None else AttentionSpec()
    spec._check()
    # Native: a plain causal mask (a prefix would widen it), with its window if any.
    is_causal = (spec.causal and spec.query_prefix is None and _default_index(spec)
                 and t == s)
    window, rest = None, spec
    if is_causal:
        if spec.sliding_window is not None:
            window = (spec.sliding_window - 1, 0)  # the window includes the query itself
        rest = spec.replace(causal=False, sliding_window=None)
    dense = _combine(rest.dense_mask(t, s), mask)
    if dense is not None:  # cuDNN needs full T and S dims on the mask-as-bias
        dense = jnp.broadcast_to(dense, (dense.shape[0], dense.shape[1], t, s))
    if bias is not None:
        bias = jnp.asarray(bias)
        bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
        bias = jnp.broadcast_to(bias, (*bias.shape[:2], t, s)).astype(query.dtype)
    return jax.nn.dot_product_attention(
        query, key, value, bias=bias, mask=dense, scale=scale, is_causal=is_causal,
        local_window_size=window, implementation=implementation)


def _combine(a: Array | None, b: Array | None) -> Array | None:
    if a is None or b is None:
        return a if b is None else jnp.asarray(b, jnp.bool_)
    return jnp.logical_and(a, b)


def _pallas_unsupported(query: Array, key: Array, mask: Array | None,
                        spec: AttentionSpec | None, bias_fn: BiasFn | None,
                        block_q: int, block_k: int) -> str | None:
    """Why the Pallas TPU flash kernel cannot run these inputs (None: it can)."""
    t, s = query.shape[1], key.shape[1]
    if bias_fn is not None:
        return ("the Pallas TPU kernel takes only a dense [B, N, T, S] bias; a bias_fn "
                "(e.g. the T5 relative bias) is computed per tile by 'blockwise' instead")
    if mask is not None:
        return ("the Pallas TPU kernel takes no dense mask (only causal and segment ids); "
                "pass the mask as an AttentionSpec")
    if spec is not None:
        if spec.sliding_window is not None or spec.query_prefix is not None:
            return "the Pallas TPU kernel has no sliding window or prefix-LM mask"
        if spec.causal and not (_default_index(spec) and t == s):
            return ("the Pallas TPU kernel's causal mask needs default token indices and "
                    f"T == S, got T={t}, S={s}")
    bq, bk = min(block_q, t), min(block_k, s)
    if t % bq or s % bk or bk % 128:
        return (f"the Pallas TPU kernel needs T={t} and S={s} divisible by the blocks "
                f"{bq} and {bk}, and a key block that is a multiple of 128")
    return None


def pallas_tpu_attention(
    query: Array, key: Array, value: Array, *, bias: Array | None = None,
    spec: AttentionSpec | None = None, scale: float = 1.0,
    block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K,
) -> Array:
    """The Pallas TPU flash kernel on our arguments ([B, T, N, H] in and out).

    Padding and packing become its segment ids (an invalid query gets id -1 and an
    invalid key -2, so they match nothing), GQA / MQA repeat the kv heads, and a dense
    bias is broadcast to the [B, N, T, S] it requires.
    """
    from jax.experimental.pallas.ops.tpu import flash_attention as pallas_fa

    b, t, n, _ = query.shape
    s, k_heads = key.shape[1], key.shape[2]
    spec = spec if spec is not None else AttentionSpec()
    segment_ids = None
    if spec.query_segment_ids is not None or spec.query_valid is not None \
            or spec.key_valid is not None:
        q_seg, k_seg = spec._tokens("query", t), spec._tokens("key", s)
        q_ids = jnp.broadcast_to(q_seg.get("segment_ids", jnp.zeros((1, t), jnp.int32)), (b, t))
        k_ids = jnp.broadcast_to(k_seg.get("segment_ids", jnp.zeros((1, s), jnp.int32)), (b, s))
        if "valid" in q_seg:
            q_ids = jnp.where(q_seg["valid"], q_ids, -1)
        if "valid" in k_seg:
            k_ids = jnp.where(k_seg["valid"], k_ids, -2)
        segment_ids = (q_ids, k_ids)
    if bias is not None:  # the kernel scales (q.k + ab), we add the bias after scaling
        bias = jnp.asarray(bias, jnp.float32) / scale
        bias = jnp.broadcast_to(bias.reshape((1,) * (4 - bias.ndim) + bias.shape), (b, n, t, s))
    bq, bk = min(block_q, t), min(block_k, s)
    blocks = pallas_fa.BlockSizes(
        block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
        block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq,
        block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)
    # [B, T, N, H] -> [B, N, T, H]; kv heads repeated to N.
    key = jnp.repeat(key, n // k_heads, axis=2)
    value = jnp.repeat(value, n // k_heads, axis=2)

    def kernel(q, k, v, ab, q_ids, kv_ids):
        seg = None if q_ids is None else pallas_fa.SegmentIds(q=q_ids, kv=kv_ids)
        return pallas_fa.flash_attention(
            q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
            ab=ab, segment_ids=seg, causal=spec.causal, sm_scale=scale,
            block_sizes=blocks).transpose(0, 2, 1, 3)

    q_ids, kv_ids = (None, None) if segment_ids is None else segment_ids
    out = per_device(kernel, (query, BTNH), (key, BTNH), (value, BTNH), (bias, BNTS),
                     (q_ids, BT), (kv_ids, BT), out_axes=BTNH)
    return out.astype(value.dtype)


# Logical axes of the kernel's operands (the names `models.layers` constrains them to).
BTNH = ("batch", "length", "heads", "kv")
BNTS = ("batch", "heads", "length", None)
BT = ("batch", "length")


def per_device(fn: Callable[..., Array], *args: tuple[Array | None, tuple],
               out_axes: tuple) -> Array:
    """fn(*arrays) run on each device's block of them when a mesh is active.

    A custom kernel (Mosaic / Pallas) cannot be partitioned by the compiler, so under the
    partitioner's mesh it runs inside a `shard_map`: batch and heads split as the logical
    rules put them (`args` pair each array, or None, with its logical axes), the
    sequence dims whole on every device. Attention is independent per (batch, head), so
    the blocks' results are exactly the whole one's. Without an active mesh, plain fn.
    """
    arrays = [a for a, _ in args]
    placed = [None if a is None else _rules.active_mesh_spec(
        [n if n in ("batch", "heads") else None for n in axes], a.shape)
        for a, axes in args]
    if all(p is None for p in placed) or placed[0][0].size == 1:
        return fn(*arrays)
    mesh = placed[0][0]
    # One split per logical name for all operands: the one that fits all of them.
    split = {}
    for p, (_, axes) in zip(placed, args, strict=True):
        if p is not None:
            for name, entry in zip(axes, p[1], strict=True):
                if name in ("batch", "heads"):
                    split.setdefault(name, []).append(entry)
    chosen = {name: min(entries, key=lambda e: len(_rules.as_axes(e)))
              for name, entries in split.items()}

    def spec_of(axes):
        return jax.sharding.PartitionSpec(*[chosen.get(n) for n in axes])

    present = [i for i, a in enumerate(arrays) if a is not None]

    def local(*xs):
        full = [None] * len(arrays)
        for i, x in zip(present, xs, strict=True):
            full[i] = x
        return fn(*full)

    return jax.shard_map(
        local, mesh=mesh, in_specs=tuple(spec_of(args[i][1]) for i in present),
        out_specs=spec_of(out_axes), check_vma=False,
    )(*[arrays[i] for i in present])


# --- dispatch ---------------------------------------------------------------------------


def check_implementation(implementation: str, field: str = "implementation") -> None:
    """A clear error for an unknown implementation name."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{field}={implementation!r} is not known; use one of "
                         f"{IMPLEMENTATIONS}")


# Set by `compile_target` (ahead-of-time compilation for another platform).
_TARGET: contextvars.ContextVar[tuple[str, bool] | None] = contextvars.ContextVar(
    "attention_compile_target", default=None)


@contextlib.contextmanager
def compile_target(platform: str, *, fused_as_blockwise: bool = False) -> Iterator[None]:
    """Inside: 'auto' and the platform checks resolve for `platform` ('tpu', 'gpu',
    'cpu'), not JAX's default backend: for compiling ahead of time for another platform
    (`t5x_like.precompile`).

    `fused_as_blockwise=True`: wherever the target would run a fused kernel, trace
    'blockwise' (the same memory-linear algorithm) instead, because the compiler at hand
    cannot compile that kernel (a GPU target simulated with CPU devices).
    """
    token = _TARGET.set((platform, fused_as_blockwise))
    try:
        yield
    finally:
        _TARGET.reset(token)


def resolve_implementation(
    implementation: str, query: Array, key: Array, *, mask: Array | None = None,
    spec: AttentionSpec | None = None, bias_fn: BiasFn | None = None,
    dropout: bool = False, block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K,
    platform: str | None = None,
) -> str:
    """The implementation `attention` runs for these arguments: 'xla', 'blockwise',
    'cudnn' or 'pallas_tpu' (see the module docstring). Errors: a fused kernel asked for
    on the wrong platform; attention dropout with anything but 'xla' / 'auto'."""
    check_implementation(implementation)
    target, fused_as_blockwise = _TARGET.get() or (None, False)
    platform = platform or target or jax.default_backend()
    if implementation in _PLATFORM_OF and platform != _PLATFORM_OF[implementation]:
        raise ValueError(
            f"attention implementation {implementation!r} runs on "
            f"{_PLATFORM_OF[implementation].upper()} only, but JAX's platform is "
            f"{platform!r}; use 'blockwise' (memory-linear, any platform), 'auto' (a fused "
            "kernel where one applies, else 'xla') or 'xla'")
    if dropout:
        if implementation in ("xla", "auto"):
            return "xla"
        raise ValueError(
            f"attention implementation {implementation!r} cannot drop attention weights; "
            "run with deterministic=True or dropout_rate=0, or use 'xla'")
    if implementation in ("xla", "blockwise"):
        return implementation
    kernel = implementation
    if implementation == "auto":
        kernel = {"gpu": "cudnn", "tpu": "pallas_tpu"}.get(platform)
        if kernel is None:
            return "xla"
    if kernel == "cudnn":
        reason = _cudnn_unsupported(query, key, spec, bias_fn)
    else:
        reason = _pallas_unsupported(query, key, mask, spec, bias_fn, block_q, block_k)
    if reason is None:
        return "blockwise" if fused_as_blockwise else kernel
    return _fallback(implementation, kernel, reason)


def _fallback(implementation: str, kernel: str, reason: str) -> str:
    """What runs when `kernel` cannot: 'xla' for 'auto', else 'blockwise'; logged."""
    fallback = "xla" if implementation == "auto" else "blockwise"
    _log.info("attention: %s instead of %s: %s", fallback, kernel, reason)
    return fallback


def attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    spec: AttentionSpec | None = None,
    bias_fn: BiasFn | None = None,
    scale: float = 1.0,
    dropout: Callable[[Array], Array] | None = None,
    implementation: str = "xla",
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
) -> Array:
    """softmax(scale * q.k + bias, masked) . v by `implementation` (one of IMPLEMENTATIONS).

    Arguments as `blockwise_attention`; `dropout` (attention-weight dropout, or None when
    off) runs only on 'xla' ('auto' then picks 'xla'). Every implementation gives the
    same result up to float rounding (the fused kernels also to their input precision),
    except for fully masked query rows, which the fused kernels give finite values of
    their own.
    """
    impl = resolve_implementation(implementation, query, key, mask=mask, spec=spec,
                                  bias_fn=bias_fn, dropout=dropout is not None,
                                  block_q=block_q, block_k=block_k)
    t, s = query.shape[1], key.shape[1]
    if impl == "cudnn":
        try:
            return cudnn_attention(query, key, value, mask=mask, bias=bias, spec=spec,
                                   scale=scale)
        except NotImplementedError as err:  # shapes this GPU's cuDNN refuses (JAX's check)
            impl = _fallback(implementation, "cudnn", str(err))
    if impl == "pallas_tpu":
        return pallas_tpu_attention(query, key, value, bias=bias, spec=spec, scale=scale,
                                    block_q=block_q, block_k=block_k)
    if impl == "blockwise":
        return blockwise_attention(query, key, value, mask=mask, bias=bias, spec=spec,
                                   bias_fn=bias_fn, scale=scale, block_q=block_q,
                                   block_k=block_k)
    if spec is not None:
        mask = _combine(spec.dense_mask(t, s), mask)
    if bias_fn is not None:
        spec = spec if spec is not None else AttentionSpec()
        extra = bias_fn(spec.positions("query", t), spec.positions("key", s))
        bias = extra if bias is None else bias + extra
    return dot_product_attention(query, key, value, mask=mask, bias=bias, scale=scale,
                                 dropout=dropout)

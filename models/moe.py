"""Sparse Mixture-of-Experts feed-forward layers, shared by every family.

A `MoeBlock` replaces a family's `MlpBlock` in the layers its `MoeConfig` makes sparse
(every `layer_interval`-th: Switch / GLaM; every layer: Mixtral). Each token is sent to
a few experts (gated MLPs with the family's activations); their outputs are summed with
the router's weights and the residual connection around the block carries the rest.

Routing (router logits and probabilities always in float32):

  token_choice   each token picks its top-k experts (k=1 Switch, k=2 GShard / Mixtral),
                 weights renormalised over the k (`renormalize`, Mixtral) or the raw
                 probabilities (Switch, GShard).
  expert_choice  each expert picks its top-C tokens of the group (Zhou et al. 2022):
                 balanced by construction, but a token's routing depends on the other
                 tokens of its group, later ones included, so it is for encoders only.

Dispatch:

  capacity  GShard / Switch: tokens are split in groups (each sequence, or `group_size`
            tokens); an expert takes at most C = max(min_capacity, ceil(k * G * factor /
            E)) tokens of a group (factor: `capacity_factor` in training,
            `eval_capacity_factor` otherwise). In encoders top-1 choices have priority
            over top-2, then earlier tokens (GShard); in causal stacks slots go token by
            token, so no output depends on a later token. A token whose choices overflow
            gets 0 from this block, so the residual passes it through unchanged. (Cached
            decoding equals a full forward pass only when nothing is dropped: a one-token
            step always has room.) The expert buffers
            [E, groups, C, D] carry the `expert` logical axis: under a mesh with an expert
            axis, GSPMD moves tokens to their experts' devices with an all-to-all.
  dropless  MegaBlocks-style: the (token, choice) pairs are sorted by expert and two
            grouped matmuls (`jax.lax.ragged_dot` on GPU / TPU, a block-padded
            equivalent on CPU: `grouped_matmul`) run every expert on exactly its
            tokens; nothing is dropped. Under a mesh the block runs in `shard_map`:
            each expert shard computes its own experts for the tokens of its expert
            row, and the partial outputs are summed over the expert axis (so the sort
            stays local to a device's batch shard).

Auxiliary losses (weights from the config, added to the training loss by the model API)
and per-layer metrics are not returned by the block: inside `collect()` every block
records them in the active `MoeStats` collector (a Python side channel that lives in one
trace, like `partitioning.rules.activate`), so the families' signatures do not change.

  load_balance_loss  Switch: E * sum_e f_e * P_e, f_e the fraction of (token, choice)
                     assignments routed to expert e (before capacity), P_e the mean
                     router probability of e; 1.0 under uniform routing.
  router_z_loss      ST-MoE: mean over tokens of logsumexp(router logits)^2.

Metrics per layer: expert load fractions (token choice: f_e, before capacity; expert
choice: the slots each expert filled), dropped fraction (token choice: (token, choice)
assignments past capacity; expert choice: tokens no expert picked), mean router entropy.
Expert choice gives a token capacity_factor experts on average, so a different
`eval_capacity_factor` changes the compute per token between training and evaluation.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from models import layers
from partitioning import rules

Array = jax.Array

ROUTINGS = ("token_choice", "expert_choice")
DISPATCHES = ("capacity", "dropless")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """Where the sparse layers are and how they route. A family config's `moe` field."""

    num_experts: int = 8
    num_experts_per_token: int = 2  # k of token choice (1: Switch, 2: GShard / Mixtral)
    routing: str = "token_choice"  # | "expert_choice" (encoders only)
    renormalize: bool = True  # token choice: weights of the k experts sum to 1 (Mixtral)
    dispatch: str = "capacity"  # | "dropless" (token choice only)
    capacity_factor: float = 1.25  # training
    eval_capacity_factor: float = 2.0  # evaluation and decoding
    min_capacity: int = 4  # per expert and group
    group_size: int | None = None  # tokens per capacity group; None: one sequence
    expert_mlp_dim: int | None = None  # hidden size of one expert; None: the family's
    num_shared_experts: int = 0  # always-on experts (one dense MLP of n * expert_mlp_dim)
    layer_interval: int = 1  # layer i is sparse iff i % interval == interval - 1
    jitter_noise: float = 0.0  # Switch: router input * U(1 - eps, 1 + eps) in training
    # The routed experts' weighted sum is multiplied by this (DeepSeek-V2/V3's
    # `routed_scaling_factor`); shared experts are not scaled.
    routed_scaling_factor: float = 1.0
    load_balance_loss_weight: float = 1e-2
    router_z_loss_weight: float = 1e-3

    def __post_init__(self):
        for field in ("num_experts", "num_experts_per_token", "layer_interval", "min_capacity"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MoeConfig.{field}={value!r} must be a positive integer")
        if self.routing not in ROUTINGS:
            raise ValueError(f"MoeConfig.routing={self.routing!r} is not known; use one of "
                             f"{ROUTINGS}")
        if self.dispatch not in DISPATCHES:
            raise ValueError(f"MoeConfig.dispatch={self.dispatch!r} is not known; use one of "
                             f"{DISPATCHES}")
        if self.routing == "expert_choice" and self.dispatch == "dropless":
            raise ValueError("MoeConfig: expert_choice routing has a fixed capacity per "
                             "expert; use dispatch='capacity' (or routing='token_choice')")
        if self.routing == "token_choice" and self.num_experts_per_token == 1 and \
                self.renormalize:
            raise ValueError(
                "MoeConfig: renormalize=True with num_experts_per_token=1 gives every token "
                "weight 1, so the loss would not train the router; set renormalize=False "
                "(Switch: the output is scaled by the router probability)")
        if self.num_experts_per_token > self.num_experts:
            raise ValueError(
                f"MoeConfig.num_experts_per_token={self.num_experts_per_token} exceeds "
                f"num_experts={self.num_experts}"
            )
        for field in ("capacity_factor", "eval_capacity_factor"):
            if getattr(self, field) <= 0:
                raise ValueError(f"MoeConfig.{field}={getattr(self, field)} must be > 0")
        for field in ("group_size", "expert_mlp_dim"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"MoeConfig.{field}={value!r} must be a positive integer "
                                 "or None")
        if self.num_shared_experts < 0:
            raise ValueError(f"MoeConfig.num_shared_experts={self.num_shared_experts} must "
                             "be >= 0")
        if not self.routed_scaling_factor > 0:
            raise ValueError(f"MoeConfig.routed_scaling_factor={self.routed_scaling_factor} "
                             "must be > 0 (1.0: the router weights unchanged)")
        if not 0.0 <= self.jitter_noise < 1.0:
            raise ValueError(f"MoeConfig.jitter_noise={self.jitter_noise} must be in [0, 1)")
        for field in ("load_balance_loss_weight", "router_z_loss_weight"):
            if getattr(self, field) < 0:
                raise ValueError(f"MoeConfig.{field}={getattr(self, field)} must be >= 0")

    def is_sparse(self, layer: int) -> bool:
        """Whether layer `layer` (0-based) of a stack is an MoE layer."""
        return layer % self.layer_interval == self.layer_interval - 1

    def check_causal(self, where: str) -> None:
        """Error for expert choice in a causal stack (routing would see later tokens)."""
        if self.routing == "expert_choice":
            raise ValueError(
                f"MoeConfig.routing='expert_choice' in {where}: an expert's choice depends on "
                "later tokens of the sequence, which a causal decoder must not see; use "
                "routing='token_choice' there (expert choice is for encoders)"
            )

    def capacity(self, group_size: int, *, train: bool) -> int:
        """Slots per expert and group."""
        factor = self.capacity_factor if train else self.eval_capacity_factor
        k = self.num_experts_per_token if self.routing == "token_choice" else 1
        return max(self.min_capacity, math.ceil(k * group_size * factor / self.num_experts))


# --- statistics side channel ----------------------------------------------------------


class MoeStats:
    """What each MoE block of one forward pass recorded, by block name (in call order)."""

    def __init__(self):
        self.layers: dict[str, dict[str, Array]] = {}

    def record(self, name: str, stats: dict[str, Array]) -> None:
        if name in self.layers:  # a block called twice in one pass (e.g. shared weights)
            name = f"{name}_{len(self.layers)}"
        self.layers[name] = stats


_COLLECTOR: contextvars.ContextVar[MoeStats | None] = contextvars.ContextVar(
    "t5x_like_moe_stats", default=None
)


@contextlib.contextmanager
def collect() -> Iterator[MoeStats]:
    """Collects the statistics of every MoE block called inside (none outside it)."""
    stats = MoeStats()
    token = _COLLECTOR.set(stats)
    try:
        yield stats
    finally:
        _COLLECTOR.reset(token)


# --- routing ---------------------------------------------------------------------------


def router_z_loss(logits: Array, mask: Array) -> Array:
    """ST-MoE z-loss: mean over masked tokens of logsumexp(logits)^2. logits [..., E]."""
    z = jax.nn.logsumexp(logits, axis=-1)
    return jnp.sum(z**2 * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def load_balance_loss(probs: Array, assignments: Array, mask: Array) -> Array:
    """Switch load-balancing loss E * sum_e f_e * P_e.

    probs [..., E] router probabilities; assignments [..., E] how many of a token's
    choices went to each expert (0/1 each, before capacity); mask [...] real tokens.
    f_e is normalised over all assignments, so the loss is 1.0 under uniform routing.
    """
    num_experts = probs.shape[-1]
    m = mask[..., None]
    f = jnp.sum(assignments * m, axis=tuple(range(probs.ndim - 1)))
    f = f / jnp.maximum(jnp.sum(f), 1.0)
    p = jnp.sum(probs * m, axis=tuple(range(probs.ndim - 1)))
    p = p / jnp.maximum(jnp.sum(mask), 1.0)
    return num_experts * jnp.sum(f * p)


def _entropy(probs: Array, mask: Array) -> Array:
    ent = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
    return jnp.sum(ent * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def top_k_routing(probs: Array, k: int, renormalize: bool) -> tuple[Array, Array]:
    """Top-k experts per token: (weights [..., k] float32, expert ids [..., k] int32)."""
    weights, ids = jax.lax.top_k(probs, k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, ids


def capacity_dispatch(
    ids: Array, weights: Array, mask: Array, num_experts: int, capacity: int,
    priority: str = "choice",
) -> tuple[Array, Array, Array]:
    """Token-choice dispatch and combine tensors of capacity routing.

    ids, weights [G, S, k] (group, token, choice); mask [G, S]. Returns dispatch [G, S, E,
    C] (0/1), combine [G, S, E, C] (router weights) and kept [G, S, k] (choice got a
    slot). Choices past `capacity` are dropped. `priority` orders the slots:
    'choice' (GShard, encoders): every top-1 choice of the group before any top-2, then
    token order; 'token' (causal stacks): token by token, so a token's slots never
    depend on later tokens.
    """
    g, s, k = ids.shape
    onehot = jax.nn.one_hot(ids, num_experts, dtype=jnp.int32) * (
        mask[..., None, None] > 0).astype(jnp.int32)
    if priority == "token":  # [G, S * k, E]: token-major order
        position = jnp.cumsum(onehot.reshape(g, s * k, num_experts), axis=1) - 1
        position = position.reshape(g, s, k, num_experts)
    elif priority == "choice":  # [G, k * S, E]: choice-major order
        order = jnp.swapaxes(onehot, 1, 2).reshape(g, k * s, num_experts)
        position = jnp.cumsum(order, axis=1) - 1
        position = jnp.swapaxes(position.reshape(g, k, s, num_experts), 1, 2)
    else:
        raise ValueError(f"priority={priority!r} is not known; use 'choice' or 'token'")
    position = jnp.sum(position * onehot, axis=-1)  # [G, S, k]: slot in the chosen expert
    kept = (jnp.sum(onehot, axis=-1) > 0) & (position < capacity)
    slot = jax.nn.one_hot(jnp.where(kept, position, capacity), capacity, dtype=jnp.float32)
    expert = jax.nn.one_hot(ids, num_experts, dtype=jnp.float32)
    # [G, S, k, E, 1] * [G, S, k, 1, C] summed over k: a token's k slots.
    dispatch = jnp.einsum("gske,gskc->gsec", expert * kept[..., None], slot)
    combine = jnp.einsum("gske,gskc->gsec", expert * (weights * kept)[..., None], slot)
    return dispatch, combine, kept


# --- the block -------------------------------------------------------------------------


class StackedKernel(nnx.Module):
    """One projection of E experts: kernel [E, in, out] (+ bias [E, out])."""

    def __init__(self, shape: tuple[int, int, int], names: tuple[str, str, str], *,
                 init, use_bias: bool, param_dtype, rngs: nnx.Rngs):
        def init_stacked(key, shape_, dtype_):
            # Each expert initialised as its dense kernel (fan-in of [in, out]).
            keys = jax.random.split(key, shape_[0])
            return jax.vmap(lambda k: init(k, shape_[1:], dtype_))(keys)

        self.kernel = nnx.Param(layers.partitioned(init_stacked, names)(
            rngs.params(), shape, param_dtype))
        self.bias = nnx.data(None)
        if use_bias:
            self.bias = nnx.Param(layers.partitioned(
                nnx.initializers.zeros, (names[0], names[2]))(
                    rngs.params(), (shape[0], shape[2]), param_dtype))

    def params(self) -> dict[str, Array]:
        out = {"kernel": self.kernel[...]}
        if self.bias is not None:
            out["bias"] = self.bias[...]
        return out


class Experts(nnx.Module):
    """E gated MLPs as stacked kernels: wi (or wi_0, wi_1, ...) [E, D, F], wo [E, F, D].

    Each kernel is the dense `MlpBlock` kernel of the same name with a leading `expert`
    axis (so a dense checkpoint upcycles by copying it E times).
    """

    def __init__(self, num_experts: int, in_features: int, hidden_features: int, *,
                 activations: Sequence[str], use_bias: bool, kernel_init, out_kernel_init,
                 dtype, param_dtype, rngs: nnx.Rngs):
        self.activations = tuple(activations)
        self.dtype = dtype
        self.input_names = ("wi",) if len(self.activations) == 1 else tuple(
            f"wi_{i}" for i in range(len(self.activations)))
        for name in self.input_names:
            setattr(self, name, StackedKernel(
                (num_experts, in_features, hidden_features), ("expert", "embed", "expert_mlp"),
                init=kernel_init, use_bias=use_bias, param_dtype=param_dtype, rngs=rngs))
        self.wo = StackedKernel(
            (num_experts, hidden_features, in_features), ("expert", "expert_mlp", "embed"),
            init=out_kernel_init or kernel_init, use_bias=use_bias, param_dtype=param_dtype,
            rngs=rngs)

    def _getter(self, params: dict[str, Array] | None):
        """name, key -> the parameter in the activation dtype (from `params` if given:
        a shard of `param_dict()` inside `shard_map`), None for an absent bias."""
        params = self.param_dict() if params is None else params

        def get(name, key):
            v = params.get(f"{name}/{key}")
            return None if v is None else v.astype(self.dtype)
        return get

    def buffers(self, x: Array, params: dict[str, Array] | None = None) -> Array:
        """Expert buffers x [E, G, C, D] -> [E, G, C, D] (each expert its own MLP)."""
        get = self._getter(params)
        h = None
        for name, act in zip(self.input_names, self.activations):
            y = jnp.einsum("egcd,edf->egcf", x, get(name, "kernel"))
            b = get(name, "bias")
            if b is not None:
                y = y + b[:, None, None, :]
            y = layers.get_activation(act)(y)
            h = y if h is None else h * y
        if params is None:  # outside shard_map
            h = rules.with_logical_constraint(h, ("expert", "batch", None, "expert_mlp"))
        y = jnp.einsum("egcf,efd->egcd", h, get("wo", "kernel"))
        b = get("wo", "bias")
        return y if b is None else y + b[:, None, None, :]

    def ragged(self, x: Array, group_sizes: Array, expert_of_row: Array,
               params: dict[str, Array] | None = None) -> Array:
        """Rows x [M, D] sorted by expert (group_sizes [E]) -> [M, D] (dropless).

        Rows past sum(group_sizes) come out 0; `expert_of_row` [M] indexes the biases.
        """
        get = self._getter(params)
        h = None
        for name, act in zip(self.input_names, self.activations):
            y = grouped_matmul(x, get(name, "kernel"), group_sizes)
            b = get(name, "bias")
            if b is not None:
                y = y + b[expert_of_row]
            y = layers.get_activation(act)(y)
            h = y if h is None else h * y
        y = grouped_matmul(h, get("wo", "kernel"), group_sizes)
        b = get("wo", "bias")
        return y if b is None else y + b[expert_of_row]

    def param_dict(self) -> dict[str, Array]:
        """The expert parameters as a flat dict 'wi_0/kernel' -> [E, ...] (raw dtype)."""
        return {f"{name}/{key}": v for name in (*self.input_names, "wo")
                for key, v in getattr(self, name).params().items()}


class MoeBlock(nnx.Module):
    """Router + experts (+ optional shared experts): [B, T, D] -> [B, T, D].

    Params: router/kernel [D, E] (float32 math), wi_0 / wi_1 / wo stacked expert kernels
    (see `Experts`), shared (an `MlpBlock`) when `num_shared_experts > 0`. `name` labels
    the block's statistics (e.g. 'decoder/layers_1').
    """

    def __init__(self, config: MoeConfig, in_features: int, mlp_dim: int, *, name: str,
                 causal: bool = False,
                 activations: Sequence[str] = ("relu",), dropout_rate: float = 0.0,
                 use_bias: bool = False, kernel_init=layers.default_kernel_init,
                 out_kernel_init=None, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if causal:
            config.check_causal(f"MoE block {name}")
        self.config = config
        self.name = name
        self.causal = causal
        self.dtype = dtype
        hidden = config.expert_mlp_dim or mlp_dim
        self.router = layers.DenseGeneral(
            in_features, config.num_experts, kernel_axes=("embed", None),
            kernel_init=kernel_init, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
        self.experts = Experts(
            config.num_experts, in_features, hidden, activations=activations,
            use_bias=use_bias, kernel_init=kernel_init, out_kernel_init=out_kernel_init,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.shared = nnx.data(None)
        if config.num_shared_experts:
            self.shared = layers.MlpBlock(
                in_features, hidden * config.num_shared_experts, activations=activations,
                dropout_rate=dropout_rate, use_bias=use_bias, kernel_init=kernel_init,
                out_kernel_init=out_kernel_init, dtype=dtype, param_dtype=param_dtype,
                rngs=rngs)
        self.dropout = nnx.Dropout(dropout_rate, broadcast_dims=(-2,))

    def __call__(self, x: Array, *, token_mask: Array | None = None,
                 deterministic: bool = True, rngs: nnx.Rngs | None = None) -> Array:
        """x [B, T, D]; token_mask [B, T] (1 = real token; padding is routed nowhere)."""
        cfg = self.config
        b, t = x.shape[:2]
        mask = (jnp.ones((b, t), jnp.float32) if token_mask is None
                else token_mask.astype(jnp.float32))
        train = not deterministic
        router_in = x.astype(jnp.float32)
        if train and cfg.jitter_noise > 0:
            if rngs is None:
                raise ValueError("MoeConfig.jitter_noise > 0 needs rngs (a dropout stream) "
                                 "in training")
            router_in = router_in * jax.random.uniform(
                rngs.dropout(), router_in.shape, jnp.float32,
                1.0 - cfg.jitter_noise, 1.0 + cfg.jitter_noise)
        logits = self.router(router_in)  # [B, T, E] float32
        probs = jax.nn.softmax(logits, axis=-1)

        if cfg.routing == "expert_choice":
            y, assignments, dropped = self._expert_choice(x, probs, mask, train)
        elif cfg.dispatch == "dropless":
            weights, ids = top_k_routing(probs, cfg.num_experts_per_token, cfg.renormalize)
            y = self._dropless(x, ids, weights * mask[..., None])
            assignments = jnp.sum(jax.nn.one_hot(ids, cfg.num_experts), axis=-2)
            dropped = jnp.zeros((), jnp.float32)
        else:
            weights, ids = top_k_routing(probs, cfg.num_experts_per_token, cfg.renormalize)
            y, kept = self._capacity(x, ids, weights, mask, train)
            assignments = jnp.sum(jax.nn.one_hot(ids, cfg.num_experts), axis=-2)
            kept_frac = jnp.sum(kept * mask[..., None]) / jnp.maximum(
                jnp.sum(mask) * cfg.num_experts_per_token, 1.0)
            dropped = 1.0 - kept_frac

        if cfg.routed_scaling_factor != 1.0:
            y = y * cfg.routed_scaling_factor
        if self.shared is not None:
            y = y + self.shared(x, deterministic=deterministic, rngs=rngs)
        self._record(logits, probs, assignments, dropped, mask)
        return y.astype(x.dtype)

    # --- paths -------------------------------------------------------------------------

    def _groups(self, x: Array, mask: Array) -> tuple[Array, Array]:
        """[B, T, ...] -> [B * T / G, G, ...] capacity groups: G = group_size where it
        divides the B * T tokens (training batches), else one group per sequence
        (cached decoding steps, short prompts)."""
        b, t = mask.shape
        g = self.config.group_size or t
        if (b * t) % g:
            g = t
        return x.reshape(b * t // g, g, *x.shape[2:]), mask.reshape(b * t // g, g)

    def _run_buffers(self, x: Array, dispatch: Array, combine: Array) -> Array:
        """Tokens x [G, S, D] through dispatch / combine [G, S, E, C] -> [G, S, D].

        Under an expert mesh axis this is GShard's layout in `shard_map`: each device
        fills the buffers of its own groups, an all-to-all over 'expert' sends every
        expert its slots from the groups of its expert row, the local experts run, and a
        second all-to-all brings the outputs home.
        """
        ep = _shard_map_plan(self.config.num_experts, x.shape[0], dropless=False)
        if ep is None:
            buffers = jnp.einsum("gsd,gsec->egcd", x, dispatch.astype(x.dtype))
            out = self.experts.buffers(buffers)
            return jnp.einsum("egcd,gsec->gsd", out, combine.astype(out.dtype))
        mesh, batch_spec, param_specs = ep
        experts = self.experts

        def local(x, dispatch, combine, params):
            buffers = jnp.einsum("gsd,gsec->egcd", x, dispatch.astype(x.dtype))
            # [E, g, C, D] -> [E / ep, g * ep, C, D]: this device's experts, its row's groups.
            buffers = jax.lax.all_to_all(buffers, "expert", 0, 1, tiled=True)
            out = experts.buffers(buffers, params)
            out = jax.lax.all_to_all(out, "expert", 1, 0, tiled=True)
            return jnp.einsum("egcd,gsec->gsd", out, combine.astype(out.dtype))

        tokens = P(batch_spec, None, None)
        slots = P(batch_spec, None, None, None)
        return jax.shard_map(local, mesh=mesh, in_specs=(tokens, slots, slots, param_specs),
                             out_specs=tokens, check_vma=False)(
            x, dispatch, combine, self.experts.param_dict())

    def _capacity(self, x, ids, weights, mask, train):
        b, t, d = x.shape
        k = self.config.num_experts_per_token
        xg, mg = self._groups(x, mask)
        idsg = ids.reshape(*mg.shape, k)
        wg = weights.reshape(*mg.shape, k)
        capacity = self.config.capacity(mg.shape[1], train=train)
        dispatch, combine, kept = capacity_dispatch(
            idsg, wg, mg, self.config.num_experts, capacity,
            priority="token" if self.causal else "choice")
        y = self._run_buffers(xg.astype(self.dtype), dispatch, combine)
        return y.reshape(b, t, d), kept.reshape(b, t, k)

    def _expert_choice(self, x, probs, mask, train):
        b, t, d = x.shape
        e = self.config.num_experts
        xg, mg = self._groups(x, mask)
        pg = probs.reshape(*mg.shape, e)
        capacity = min(self.config.capacity(mg.shape[1], train=train), mg.shape[1])
        # Padding can only be picked after every real token (and then weighs 0).
        scores = jnp.swapaxes(jnp.where(mg[..., None] > 0, pg, -1.0), 1, 2)  # [G, E, S]
        vals, idx = jax.lax.top_k(scores, capacity)  # [G, E, C]
        picked = jax.nn.one_hot(idx, mg.shape[1], dtype=jnp.float32)  # [G, E, C, S]
        real = jnp.take_along_axis(jnp.broadcast_to(mg[:, None, :], scores.shape), idx, axis=-1)
        picked = picked * real[..., None]
        dispatch = jnp.einsum("gecs->gsec", picked)
        combine = dispatch * jnp.maximum(vals, 0.0)[:, None]  # [G, S, E, C]
        y = self._run_buffers(xg.astype(self.dtype), dispatch, combine)
        assignments = jnp.sum(dispatch, axis=-1).reshape(b, t, e)
        served = (jnp.sum(assignments, axis=-1) > 0).astype(jnp.float32)
        dropped = 1.0 - jnp.sum(served * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        return y.reshape(b, t, d), assignments, dropped

    def _dropless(self, x: Array, ids: Array, weights: Array) -> Array:
        """Every (token, choice) through its expert with grouped matmuls. [B, T, D].

        Under an expert mesh axis, in `shard_map`: each device gathers the tokens of its
        expert row (all-gather over 'expert'), runs its own experts on the choices that
        name them, and the partial outputs are summed and scattered back (psum_scatter).
        """
        e = self.config.num_experts
        x = x.astype(self.dtype)
        ep = _shard_map_plan(e, x.shape[0], dropless=True)
        if ep is None:
            return _dropless_local(self.experts, None, x, ids, weights, 0, e)
        mesh, batch_spec, param_specs = ep
        local_e = e // dict(mesh.shape)["expert"]
        experts = self.experts

        def local(x, ids, weights, params):
            first = jax.lax.axis_index("expert") * local_e
            gather = functools.partial(jax.lax.all_gather, axis_name="expert", axis=0,
                                       tiled=True)
            y = _dropless_local(experts, params, gather(x), gather(ids), gather(weights),
                                first, local_e)
            return jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)

        tokens = P(batch_spec, None, None)
        return jax.shard_map(local, mesh=mesh, in_specs=(tokens, tokens, tokens, param_specs),
                             out_specs=tokens, check_vma=False)(
            x, ids, weights, self.experts.param_dict())

    # --- statistics --------------------------------------------------------------------

    def _record(self, logits, probs, assignments, dropped, mask) -> None:
        collector = _COLLECTOR.get()
        if collector is None:
            return
        m = mask
        lb = load_balance_loss(probs, assignments, m)
        zl = router_z_loss(logits, m)
        load = jnp.sum(assignments * m[..., None], axis=(0, 1))
        load = load / jnp.maximum(jnp.sum(load), 1.0)
        cfg = self.config
        collector.record(self.name, {
            "aux_loss": cfg.load_balance_loss_weight * lb + cfg.router_z_loss_weight * zl,
            "load_balance_loss": lb,
            "router_z_loss": zl,
            "dropped_fraction": dropped,
            "router_entropy": _entropy(probs, m),
            "expert_load": load,
            "tokens": jnp.sum(m),
        })


def _blocked_matmul(x: Array, w: Array, group_sizes: Array, block: int = 128) -> Array:
    """`ragged_dot` as a block-padded grouped matmul (the CPU path of `grouped_matmul`).

    x [M, D] rows sorted by group, w [E, D, F] -> [M, F]: each group's rows are padded to
    whole blocks of `block` rows and every block is multiplied by its group's kernel, so
    at most 2 (M + E block) D F FLOPs (XLA's CPU `ragged_dot` multiplies every row by
    every group's kernel: E times the work). Rows past sum(group_sizes) come out 0.
    """
    m, d = x.shape
    e, _, f = w.shape
    num_blocks = -(-m // block) + e  # sum_e ceil(g_e / block) <= ceil(M / block) + E
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    padded = (sizes + block - 1) // block * block
    padded_ends = jnp.cumsum(padded)
    padded_starts = padded_ends - padded
    slot = jnp.arange(num_blocks * block, dtype=jnp.int32)
    slot_group = jnp.minimum(jnp.searchsorted(padded_ends, slot, side="right"), e - 1)
    offset = slot - padded_starts[slot_group]
    valid = offset < sizes[slot_group]
    source = jnp.where(valid, starts[slot_group] + offset, 0)
    xp = jnp.where(valid[:, None], x[source], 0).reshape(num_blocks, block, d)
    yp = jnp.einsum("nbd,ndf->nbf", xp, w[slot_group[::block]]).reshape(-1, f)
    row = jnp.arange(m, dtype=jnp.int32)
    row_group = jnp.searchsorted(ends, row, side="right")
    in_range = row_group < e
    row_group = jnp.minimum(row_group, e - 1)
    dest = jnp.where(in_range, padded_starts[row_group] + row - starts[row_group], 0)
    return jnp.where(in_range[:, None], yp[dest], 0).astype(x.dtype)


def grouped_matmul(x: Array, w: Array, group_sizes: Array) -> Array:
    """x [M, D] (rows sorted by group) times w[g] [D, F] per group -> [M, F].

    `jax.lax.ragged_dot` on GPU / TPU (a native grouped matmul); `_blocked_matmul` on CPU,
    where jax lowers `ragged_dot` as a masked dense dot over all groups (E times the
    FLOPs; benchmarks/moe.py measures both).
    """
    return jax.lax.platform_dependent(x, w, group_sizes, cpu=_blocked_matmul,
                                      default=jax.lax.ragged_dot)


def feed_forward(moe_config: MoeConfig | None, layer: int, name: str, in_features: int,
                 mlp_dim: int, *, causal: bool = False, **kwargs) -> layers.MlpBlock | MoeBlock:
    """Layer `layer`'s feed-forward block: a `MoeBlock` if `moe_config` makes it sparse
    (`causal`: in a causal stack, see `capacity_dispatch`), else the dense
    `layers.MlpBlock` (same keyword arguments: activations, dropout_rate, use_bias,
    kernel_init, out_kernel_init, dtype, param_dtype, rngs)."""
    if moe_config is not None and moe_config.is_sparse(layer):
        return MoeBlock(moe_config, in_features, mlp_dim, name=name, causal=causal, **kwargs)
    return layers.MlpBlock(in_features, mlp_dim, **kwargs)


def _shard_map_plan(num_experts: int, leading_dim: int, *, dropless: bool):
    """(mesh, batch mesh axes, expert param specs) for running a block in `shard_map`
    under the active mesh (`partitioning.rules.activate`), or None for plain GSPMD.

    Capacity dispatch needs `shard_map` only for an expert axis > 1 (its all-to-all);
    dropless needs it whenever the batch is split (else its global sort would gather
    every token onto every device). None also when the leading dim (batch or groups)
    does not divide over the batch axes: GSPMD then pads, as for the dense layers.
    """
    current = rules.active()
    if current is None:
        return None
    mesh, table = current
    shape = dict(mesh.shape)
    shards = shape.get("expert", 1)
    if num_experts % shards:
        raise ValueError(f"num_experts={num_experts} is not divisible by the mesh's expert "
                         f"axis ({shards}); use an expert axis that divides the expert count")
    batch_spec = rules.logical_to_mesh_spec(("batch",), table)[0]
    batch_axes = () if batch_spec is None else (
        (batch_spec,) if isinstance(batch_spec, str) else tuple(batch_spec))
    batch_shards = math.prod(shape[a] for a in batch_axes)
    if shards == 1 and (not dropless or batch_shards == 1):
        return None
    if leading_dim % batch_shards:
        return None
    # Expert weights enter sharded over 'expert' only (other weight axes are gathered).
    return mesh, batch_spec, P("expert")


def _dropless_local(experts: Experts, params: dict[str, Array] | None, x: Array, ids: Array,
                    weights: Array, first_expert, num_local: int) -> Array:
    """x [B, T, D] through experts [first_expert, first_expert + num_local) -> [B, T, D].

    Choices of other experts are sorted past the local groups (ragged_dot leaves rows
    beyond sum(group_sizes) zero) and weigh nothing.
    """
    b, t, d = x.shape
    k = ids.shape[-1]
    flat_ids = ids.reshape(-1) - first_expert  # [N * k]
    local = (flat_ids >= 0) & (flat_ids < num_local)
    sort_key = jnp.where(local, flat_ids, num_local)
    order = jnp.argsort(sort_key, stable=True)
    rows = x.reshape(-1, d)[order // k]  # [N * k, D]
    group_sizes = jnp.bincount(sort_key, length=num_local + 1)[:num_local].astype(jnp.int32)
    expert_of_row = jnp.minimum(sort_key[order], num_local - 1)
    out = experts.ragged(rows, group_sizes, expert_of_row, params)
    out = out * (local[order] * weights.reshape(-1)[order])[:, None].astype(out.dtype)
    y = jnp.zeros_like(out).at[order].set(out)
    return jnp.sum(y.reshape(b * t, k, d), axis=1).reshape(b, t, d)


# --- summaries and upcycling ------------------------------------------------------------


def stats_sums(stats: MoeStats) -> dict[str, Array]:
    """Per-layer statistics as token-weighted sums (they add up over microbatches):
    'moe/<layer>/<stat>_sum' and 'moe/<layer>/tokens'."""
    out: dict[str, Array] = {}
    for name, s in stats.layers.items():
        n = s["tokens"]
        for key, v in s.items():
            if key != "tokens":
                out[f"moe/{name}/{key}_sum"] = v * n
        out[f"moe/{name}/tokens"] = n
    return out


def metrics_from_stats_sums(sums: dict[str, Array]) -> dict[str, Array]:
    """Scalar metrics from `stats_sums` (summed over microbatches): per layer its losses,
    dropped fraction, router entropy and each expert's load fraction."""
    out: dict[str, Array] = {}
    for key, v in sums.items():
        if not (key.startswith("moe/") and key.endswith("_sum")):
            continue
        prefix, stat = key[: -len("_sum")].rsplit("/", 1)
        value = v / jnp.maximum(sums[f"{prefix}/tokens"], 1.0)
        if stat == "expert_load":
            for i in range(value.shape[0]):
                out[f"{prefix}/expert_load/{i}"] = value[i]
            out[f"{prefix}/expert_load_max"] = jnp.max(value)
        else:
            out[f"{prefix}/{stat}"] = value
    return out


def dense_counterpart(abstract_params: dict) -> dict:
    """The dense network's parameter tree that `upcycle` reads, from an MoE network's
    (ShapeDtypeStructs, with shardings if they have one): `.../mlp/experts/wi_0/kernel`
    [E, ...] becomes `.../mlp/wi_0/kernel` [...]; routers and shared experts drop out."""
    def strip(leaf):
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            sharding = NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)

    def walk(tree):
        if not isinstance(tree, dict):
            return tree
        if "experts" in tree and "router" in tree:  # an MoE block
            return {name: jax.tree.map(strip, sub) for name, sub in tree["experts"].items()}
        return {k: walk(v) for k, v in tree.items()}

    return walk(abstract_params)


def upcycle(dense_params: dict, moe_params: dict) -> dict:
    """Sparse upcycling (Komatsuzaki et al. 2022): MoE parameters from a dense model's.

    Both are nested dicts of arrays. Every MoE parameter whose path exists in the dense
    tree with the same shape is copied; an expert kernel [E, ...] takes the dense MLP's
    kernel of the same name ([...]) E times, path `.../mlp/experts/wi_0/kernel` from
    `.../mlp/wi_0/kernel`; the rest (routers) keep `moe_params`' fresh values.
    """
    def lookup(tree, path):
        for key in path:
            if not isinstance(tree, dict) or key not in tree:
                return None
            tree = tree[key]
        return tree

    def fill(tree, path):
        if isinstance(tree, dict):
            return {k: fill(v, (*path, k)) for k, v in tree.items()}
        same = lookup(dense_params, path)
        if same is not None and tuple(same.shape) == tuple(tree.shape):
            return jnp.asarray(same, tree.dtype)
        if "experts" in path:
            i = path.index("experts")
            dense = lookup(dense_params, path[:i] + path[i + 1:])
            if dense is None:
                return tree
            if tuple(tree.shape[1:]) != tuple(dense.shape):
                raise ValueError(
                    f"cannot upcycle {'/'.join(path)} {tuple(tree.shape)} from the dense "
                    f"{'/'.join(path[:i] + path[i + 1:])} {tuple(dense.shape)}: each expert "
                    "must have the dense MLP's shape (set expert_mlp_dim / mlp_dim to the "
                    "dense model's mlp_dim)")
            return jnp.broadcast_to(jnp.asarray(dense, tree.dtype), tree.shape)
        return tree

    return fill(moe_params, ())


def active_parameter_count(network: nnx.Module) -> int:
    """Parameters one token uses (works on `nnx.eval_shape` networks): every parameter,
    minus in each MoE block the experts a token does not visit (E - k of E under token
    choice; under expert choice a token visits capacity_factor experts on average)."""
    total = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(network, nnx.Param)))
    for _, block in nnx.iter_graph(network):
        if isinstance(block, MoeBlock):
            cfg = block.config
            used = (cfg.num_experts_per_token if cfg.routing == "token_choice"
                    else cfg.capacity_factor)
            experts = sum(math.prod(v.shape) for v in
                          jax.tree.leaves(nnx.state(block.experts, nnx.Param)))
            total -= round(experts * (cfg.num_experts - used) / cfg.num_experts)
    return int(total)

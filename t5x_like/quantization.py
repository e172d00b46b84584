"""Weight-only quantization for serving: int8 per-channel and int4 grouped kernels.

`quantize(network, mode)` returns a copy of any network (EncoderDecoder, DecoderOnly,
EncoderOnly, with or without MoE) in which every `layers.DenseGeneral` is a
`QuantizedDenseGeneral` and every MoE expert stack a `QuantizedStackedKernel`; the
original is untouched. Activations stay in the layer's dtype; only the weights shrink.
The copy runs every existing call path unchanged: `__call__`, `decode` with the KV cache,
the Model API's `predict_batch`, jit over `nnx.split` / `nnx.merge`, `serving.Engine`;
`quantize_runtime` gives `infer` / `evaluate` a Runtime whose parameters are quantized.

  int8  per output channel, symmetric: scale = absmax / 127 over the contracting
        (input) dims, q = round(w / scale) in [-127, 127], stored as int8 (1/4 of fp32).
        y = dot(x, q) * scale: the int8 -> float convert is the dot's operand and the
        per-channel scale comes after the dot. (XLA:CPU runs the convert as its own
        loop before its library matmul; fusing it into the dot is up to the backend.)
  int4  groups of `group_size` consecutive entries of the flattened contracting dims,
        per output channel: scale = absmax / 7 per (group, channel), q in [-7, 7],
        stored as `jnp.int4`, which XLA packs two per byte (`s4[...]{...:E(4)}`, CPU
        included): 1/8 of fp32 plus one float32 scale per group and channel.
        y = sum_g dot(x_g, q_g) * scale_g: one dot per group, then scale and sum.
        group_size must divide the contracting size (the error names the layer).

Both grids are symmetric with zero at zero, so no zero point is needed. int4 leaves -8
unused: reaching it needs absmax / 8 on one side and / 7 on the other (or asymmetric
rounding) for 1/15 more levels.

Every quantized array keeps its kernel's shape and logical axes, so the partitioner
shards it as the float kernel. Scales are float32 with the output axes (int4: the group
dim takes the first contracting axis's name, so groups shard with their rows).

Kept float by default: embeddings (tied logits included; `include_embeddings=True`
quantizes them per row, which serves both the lookup and `attend`), norms, relative
position biases and MoE routers (`exclude=("router",)`: a [D, E] kernel is tiny and its
top-k choices are the most sensitive to noise). MoE expert stacks store int8 / int4 and
dequantize the stack at each call (`QuantizedStackedKernel.params`): the saving is at
rest; the expert matmuls run in the activation dtype. Rounding noise upstream of a
router can still flip a token's top-k experts, a discontinuous change in its output.

`weight_bytes` counts 4 bits per int4 value.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models import layers, moe
from t5x_like.runtime import Runtime
from t5x_like.trainer import NetworkDef

Array = jax.Array
PyTree = Any

MODES = ("int8", "int4")
INT8_MAX = 127
INT4_MAX = 7
DEFAULT_GROUP_SIZE = 128
DEFAULT_EXCLUDE = ("router",)


def check_mode(mode: str, group_size: int = DEFAULT_GROUP_SIZE) -> None:
    """Raises for an unknown `mode` or (int4) a `group_size` that is not a positive int."""
    if mode not in MODES:
        raise ValueError(f"quantization mode {mode!r} is not known; use one of {MODES}")
    if mode == "int4" and (isinstance(group_size, bool) or not isinstance(group_size, int)
                           or group_size < 1):
        raise ValueError(f"int4 group_size={group_size!r} must be a positive integer, "
                         f"e.g. {DEFAULT_GROUP_SIZE}")


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def _scaled_round(w: Array, scale: Array, limit: int) -> Array:
    """round(w / scale) clipped to [-limit, limit]; 0 where scale is 0 (an all-zero channel)."""
    safe = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(w / safe), -limit, limit)


def quantize_int8(kernel: Array, num_in_dims: int = 1) -> tuple[Array, Array]:
    """kernel [*in, *out] -> (q int8 [*in, *out], scale float32 [*out]).

    The first `num_in_dims` dims are contracted; scale = absmax over them / 127.
    """
    w = jnp.asarray(kernel, jnp.float32)
    in_dims = tuple(range(num_in_dims))
    scale = jnp.max(jnp.abs(w), axis=in_dims) / INT8_MAX  # [*out]
    return _scaled_round(w, scale, INT8_MAX).astype(jnp.int8), scale


def quantize_int4(kernel: Array, num_in_dims: int = 1, group_size: int = DEFAULT_GROUP_SIZE,
                  *, name: str = "kernel") -> tuple[Array, Array]:
    """kernel [*in, *out] -> (q int4 [*in, *out], scale float32 [G, *out]).

    The flattened input dims (K = prod(in)) split into G = K / group_size groups of
    consecutive entries; scale = absmax of each (group, output channel) / 7. `name`
    labels the layer in the error raised when group_size does not divide K.
    """
    check_mode("int4", group_size)
    w = jnp.asarray(kernel, jnp.float32)
    in_shape, out_shape = w.shape[:num_in_dims], w.shape[num_in_dims:]
    k = math.prod(in_shape)
    if k % group_size:
        raise ValueError(
            f"int4 group_size={group_size} does not divide the contracting size {k} of "
            f"{name} (kernel {tuple(w.shape)}); use a group_size that divides {k}, e.g. "
            f"{_largest_divisor(k, group_size)}, or leave the layer float with "
            f"exclude=({name!r},)"
        )
    groups = w.reshape(k // group_size, group_size, -1)  # [G, group_size, prod(out)]
    scale = jnp.max(jnp.abs(groups), axis=1) / INT4_MAX  # [G, prod(out)]
    q = _scaled_round(groups, scale[:, None], INT4_MAX).reshape(w.shape)
    return q.astype(jnp.int4), scale.reshape(-1, *out_shape)


def dequantize(q: Array, scale: Array, num_in_dims: int = 1) -> Array:
    """The float32 kernel [*in, *out] that (q, scale) stand for (int8 or int4 by q.dtype)."""
    w = q.astype(jnp.float32)
    if q.dtype == jnp.int8:
        return w * scale  # scale [*out] broadcasts over the input dims
    k = math.prod(q.shape[:num_in_dims])
    g = scale.shape[0]
    w = w.reshape(g, k // g, -1) * scale.reshape(g, 1, -1)  # [G, group, prod(out)]
    return w.reshape(q.shape)


def _quantize(kernel: Array, num_in_dims: int, mode: str, group_size: int,
              name: str) -> tuple[Array, Array]:
    if mode == "int8":
        return quantize_int8(kernel, num_in_dims)
    return quantize_int4(kernel, num_in_dims, group_size, name=name)


def _axes(variable: nnx.Variable) -> tuple | None:
    return variable.get_metadata().get("out_sharding")


def _scale_param(scale: Array, like: nnx.Variable, axes: tuple | None) -> nnx.Param:
    """A float32 scale Param with the metadata of `like`, logical axes `axes`."""
    meta = dict(like.get_metadata())
    if axes is not None:
        meta["out_sharding"] = tuple(axes)
    return nnx.Param(scale, **meta)


# --- modules -------------------------------------------------------------------------


class QuantizedDenseGeneral(nnx.Module):
    """`layers.DenseGeneral` with an int8 or int4 kernel: same shapes, axis, bias, dtype.

    Params: kernel (int8 / int4, the float kernel's shape and logical axes), scale
    (float32: int8 [*out], int4 [G, *out]), bias (as the float layer's).
    """

    def __init__(self, dense: layers.DenseGeneral, *, mode: str = "int8",
                 group_size: int = DEFAULT_GROUP_SIZE, name: str = "DenseGeneral"):
        check_mode(mode, group_size)
        self.in_features = dense.in_features
        self.out_features = dense.out_features
        self.axis = dense.axis
        self.dtype = dense.dtype
        self.precision = dense.precision
        self.mode = mode
        n_in = len(self.in_features)
        q, scale = _quantize(dense.kernel[...], n_in, mode, group_size, name)
        self.kernel = dense.kernel.replace(q)
        axes = _axes(dense.kernel)
        if axes is not None:
            axes = axes[n_in:] if mode == "int8" else (axes[0], *axes[n_in:])
        self.scale = _scale_param(scale, dense.kernel, axes)
        self.bias = nnx.data(None) if dense.bias is None else dense.bias.copy()

    def __call__(self, inputs: Array) -> Array:
        """[..., *in_features (at `axis`)...] -> [..., *out_features]."""
        axis = tuple(a % inputs.ndim for a in self.axis)
        got = tuple(inputs.shape[a] for a in axis)
        if got != self.in_features:
            raise ValueError(
                f"input dims {got} at axes {axis} of {inputs.shape} do not match "
                f"in_features {self.in_features}"
            )
        inputs = inputs.astype(self.dtype)
        n_in = len(axis)
        trailing = tuple(range(inputs.ndim - n_in, inputs.ndim))
        if axis != trailing:
            # Contracted dims last, in `axis` order: the output layout of DenseGeneral's
            # dot_general (remaining input dims in order, then the output features).
            inputs = jnp.moveaxis(inputs, axis, trailing)
        batch_shape = inputs.shape[:-n_in]
        k, n = math.prod(self.in_features), math.prod(self.out_features)
        x = inputs.reshape(-1, k)  # [M, K]
        q = self.kernel[...].astype(self.dtype).reshape(k, n)  # [K, N]
        scale = self.scale[...].astype(self.dtype)
        if self.mode == "int8":
            out = jnp.dot(x, q, precision=self.precision) * scale.reshape(n)  # [M, N]
        else:
            g = scale.shape[0]
            partial = jnp.einsum(
                "mgk,gkn->mgn",
                x.reshape(-1, g, k // g),  # [M, G, K/G]
                q.reshape(g, k // g, n),  # [G, K/G, N]
                precision=self.precision,
            )
            out = jnp.sum(partial * scale.reshape(g, n), axis=1)  # [M, N]
        out = out.reshape(*batch_shape, *self.out_features)
        if self.bias is not None:
            out = out + self.bias[...].astype(self.dtype)
        return out

    def dequantized_kernel(self) -> Array:
        """The float32 kernel [*in, *out] this layer multiplies by."""
        return dequantize(self.kernel[...], self.scale[...], len(self.in_features))


class QuantizedEmbed(nnx.Module):
    """`layers.Embed` with an int8 / int4 table [V, D], quantized per row.

    A row is an output channel of `attend` (contracting D), so one scale per row (int8:
    scale [V]; int4: [V, D / group_size], groups along D) serves the lookup and `attend`.
    """

    def __init__(self, embed: layers.Embed, *, mode: str = "int8",
                 group_size: int = DEFAULT_GROUP_SIZE, name: str = "Embed"):
        check_mode(mode, group_size)
        self.num_embeddings = embed.num_embeddings
        self.features = embed.features
        self.dtype = embed.dtype
        self.attend_dtype = embed.attend_dtype
        self.mode = mode
        # Quantize the [D, V] view: D is contracted, each row v a channel.
        q, scale = _quantize(embed.embedding[...].T, 1, mode, group_size, name)
        self.embedding = embed.embedding.replace(q.T)  # [V, D]
        axes = _axes(embed.embedding)  # (rows, 'embed')
        if mode == "int8":
            self.scale = _scale_param(scale, embed.embedding, None if axes is None else axes[:1])
        else:
            self.scale = _scale_param(scale.T, embed.embedding, axes)  # [V, G]

    def _rows(self, q: Array, scale: Array, dtype) -> Array:
        """Dequantized rows q [..., D] with their scales [...] (int8) or [..., G] (int4)."""
        if self.mode == "int8":
            return q.astype(dtype) * scale[..., None].astype(dtype)
        g = scale.shape[-1]
        w = q.astype(dtype).reshape(*q.shape[:-1], g, -1) * scale[..., None].astype(dtype)
        return w.reshape(q.shape)

    def __call__(self, ids: Array) -> Array:
        """ids [...] integer -> [..., D]. Ids outside [0, V) give NaN rows (as Embed)."""
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"token ids must be integers, got {ids.dtype}")
        q = jnp.take(self.embedding[...], ids, axis=0, mode="fill", fill_value=0)
        # A NaN scale makes an out-of-range id's row NaN.
        scale = jnp.take(self.scale[...], ids, axis=0, mode="fill", fill_value=jnp.nan)
        return self._rows(q, scale, self.dtype)

    def attend(self, query: Array) -> Array:
        """query [..., D] -> logits [..., V] against every (quantized) embedding row."""
        dt = self.attend_dtype
        query = query.astype(dt)
        q = self.embedding[...].astype(dt)  # [V, D]
        scale = self.scale[...].astype(dt)
        if self.mode == "int8":
            return jnp.einsum("...d,vd->...v", query, q) * scale
        g = scale.shape[-1]
        partial = jnp.einsum(
            "...gk,vgk->...gv",
            query.reshape(*query.shape[:-1], g, -1),  # [..., G, D/G]
            q.reshape(q.shape[0], g, -1),  # [V, G, D/G]
        )
        return jnp.sum(partial * scale.T, axis=-2)  # [..., V]


class QuantizedStackedKernel(nnx.Module):
    """`moe.StackedKernel` (kernel [E, in, out]) stored int8 / int4 per expert.

    scale: int8 [E, out], int4 [E, G, out]. `params()` returns the dequantized float32
    kernel, so `moe.Experts` (its grouped matmuls, its shard_map) runs unchanged.
    """

    def __init__(self, stacked: moe.StackedKernel, *, mode: str = "int8",
                 group_size: int = DEFAULT_GROUP_SIZE, name: str = "StackedKernel"):
        check_mode(mode, group_size)
        self.mode = mode
        q, scale = jax.vmap(lambda w: _quantize(w, 1, mode, group_size, name))(
            stacked.kernel[...])
        self.kernel = stacked.kernel.replace(q)
        axes = _axes(stacked.kernel)  # (expert, in, out)
        if axes is not None and mode == "int8":
            axes = (axes[0], axes[2])
        self.scale = _scale_param(scale, stacked.kernel, axes)
        self.bias = nnx.data(None) if stacked.bias is None else stacked.bias.copy()

    def params(self) -> dict[str, Array]:
        """{'kernel': float32 [E, in, out], 'bias': [E, out] if any}, as StackedKernel."""
        out = {"kernel": jax.vmap(dequantize)(self.kernel[...], self.scale[...])}
        if self.bias is not None:
            out["bias"] = self.bias[...]
        return out


QUANTIZED_MODULES = (QuantizedDenseGeneral, QuantizedEmbed, QuantizedStackedKernel)


# --- whole networks ------------------------------------------------------------------


def _path_name(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _child(node: Any, key: Any) -> Any:
    return node[key] if isinstance(key, int) else getattr(node, key)


def _set_child(node: Any, key: Any, value: Any) -> None:
    if isinstance(key, int):
        node[key] = value  # nnx.List
    else:
        setattr(node, key, value)


def quantize(
    network: nnx.Module,
    mode: str = "int8",
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    exclude: str | Sequence[str] = DEFAULT_EXCLUDE,
    include_embeddings: bool = False,
) -> nnx.Module:
    """A copy of `network` whose linear layers hold int8 / int4 weights (see module doc).

    Every `DenseGeneral` (attention query / key / value / out, MLP wi / wo, untied
    logits, heads) becomes a `QuantizedDenseGeneral` and every MoE expert stack a
    `QuantizedStackedKernel`, unless its path (e.g. 'decoder/layers/0/mlp/wo') contains
    one of the `exclude` substrings. `include_embeddings`: `Embed` tables too
    (`QuantizedEmbed`). `network` itself is not changed. Works on abstract networks
    (inside `nnx.eval_shape`) and on tracers (inside `jax.jit`).
    """
    check_mode(mode, group_size)
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    kinds: list[tuple[type, type]] = [(layers.DenseGeneral, QuantizedDenseGeneral),
                                      (moe.StackedKernel, QuantizedStackedKernel)]
    if include_embeddings:
        kinds.append((layers.Embed, QuantizedEmbed))
    copy = nnx.clone(network)
    targets = []
    for path, module in nnx.iter_modules(copy):
        name = _path_name(path)
        if any(s in name for s in exclude):
            continue
        for float_cls, quantized_cls in kinds:
            if isinstance(module, float_cls):
                targets.append((path, module, quantized_cls))
                break
    if not targets:
        raise ValueError(
            f"quantize found no layer to quantize in {type(network).__name__} with "
            f"exclude={exclude}; it quantizes DenseGeneral, MoE expert stacks and (with "
            "include_embeddings=True) Embed"
        )
    for path, module, quantized_cls in targets:
        new = quantized_cls(module, mode=mode, group_size=group_size,
                            name=_path_name(path) or type(module).__name__)
        if not path:  # the network is itself one layer
            return new
        parent = copy
        for key in path[:-1]:
            parent = _child(parent, key)
        _set_child(parent, path[-1], new)
    return copy


def _nbytes(shape: Sequence[int], dtype) -> int:
    return math.ceil(math.prod(shape) * jax.dtypes.itemsize_bits(dtype) / 8)


def weight_bytes(network: nnx.Module) -> dict[str, Any]:
    """Bytes of a network's parameters (int4 counted at 4 bits; works on abstract networks).

    Returns {'total', 'quantized' (int8 / int4 weights), 'scales' (their float32
    scales), 'float' (every other parameter: embeddings, norms, biases, excluded
    layers), 'by_dtype': {dtype name: bytes}}.
    """
    quantized_owners = {path for path, m in nnx.iter_modules(network)
                        if isinstance(m, QUANTIZED_MODULES)}
    out: dict[str, Any] = {"total": 0, "quantized": 0, "scales": 0, "float": 0, "by_dtype": {}}
    for path, variable in nnx.to_flat_state(nnx.state(network, nnx.Param)):
        value = variable.get_value()
        n = _nbytes(value.shape, value.dtype)
        if jnp.issubdtype(value.dtype, jnp.integer):
            kind = "quantized"
        elif path[-1] == "scale" and tuple(path[:-1]) in quantized_owners:
            kind = "scales"
        else:
            kind = "float"
        out[kind] += n
        out["total"] += n
        dtype = jnp.dtype(value.dtype).name
        out["by_dtype"][dtype] = out["by_dtype"].get(dtype, 0) + n
    return out


# --- serving with a Runtime ------------------------------------------------------------


def quantize_runtime(runtime: Runtime, params: PyTree, mode: str = "int8", *,
                     group_size: int = DEFAULT_GROUP_SIZE,
                     exclude: str | Sequence[str] = DEFAULT_EXCLUDE,
                     include_embeddings: bool = False) -> tuple[Runtime, PyTree]:
    """(A Runtime whose network is quantized, its parameters) from float `params`.

    The new runtime shares the model and partitioner; its parameters (a pure dict,
    like `runtime.restore_params`) are quantized in one jit straight into the
    partitioner's shardings of the quantized kernels, so `infer.predict` and
    `evaluate` use them unchanged: e.g. after `params = runtime.restore_params(ckpt)`.
    """
    options = dict(group_size=group_size, exclude=exclude, include_embeddings=include_embeddings)
    check_mode(mode, group_size)
    abstract = nnx.eval_shape(
        lambda: quantize(runtime.model.make_network(nnx.Rngs(0)), mode, **options))
    graphdef, abstract_state = nnx.split(abstract, nnx.Param)
    quantized = dataclasses.replace(runtime, net=NetworkDef(graphdef, abstract_state))

    def convert(float_params):
        network = quantize(runtime.net.merge(float_params), mode, **options)
        return nnx.to_pure_dict(nnx.state(network, nnx.Param))

    with runtime.partitioner.activate():
        qparams = jax.jit(convert, out_shardings=quantized.param_shardings)(params)
    return quantized, qparams

"""Shardings for parameters, optimizer state and batches, from logical axis names.

`Partitioner(mesh, rules)` is the one object train, eval and infer ask where things go:

    partitioner = Partitioner(make_mesh(MeshConfig(fsdp=-1, data=1)), "fsdp")
    graphdef, params, param_shardings = partitioner.sharded_init(lambda: Net(cfg, rngs=...))
    with partitioner.activate():          # mesh + logical rules for jitted code
        state = jax.jit(step, in_shardings=..., out_shardings=...)(...)

Parameters are nested dicts (the `nnx.to_pure_dict(state)` layout: module attribute
names, int keys for nnx.List items) and every sharding tree has that same structure.

Dimensions that do not divide by their mesh axes (4 heads on model=8) are not an error:
like T5X, the partitioner drops mesh axes from that dimension, from the last one, until
it divides (at worst it is replicated), and logs one warning per kind of misfit with an
example parameter. Tiny test models then run on any mesh, and a real model's log shows
what it costs.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from partitioning import rules as rules_lib

PyTree = Any
_log = logging.getLogger(__name__)


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def _path_str(path: Sequence[Any]) -> str:
    """'encoder/layers/0/mlp/wi/kernel' from a jax key path."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _pure(tree: PyTree) -> PyTree:
    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def _spec_axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


class Partitioner:
    """Maps logical axis names onto `mesh` with a rules table (or a preset name)."""

    def __init__(self, mesh: Mesh, rules: rules_lib.LogicalRules | str):
        if isinstance(rules, str):
            rules = rules_lib.get_rules(rules)
        self.mesh = mesh
        self.rules = rules_lib.fit_rules(rules, mesh)
        self._axis_sizes = dict(mesh.shape)
        self._replicated = NamedSharding(mesh, PartitionSpec())

    def __repr__(self) -> str:
        return f"Partitioner(mesh={dict(self.mesh.shape)}, rules={self.rules})"

    # --- context ------------------------------------------------------------------------

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        """The mesh (`jax.set_mesh`) and logical rules, for building and running jitted code.

        Call it outside `jax.jit` (jax.set_mesh refuses to run under a trace). Inside,
        variables are created without eager sharding: where parameters live is decided
        by `shardings` / `sharded_init` (jit out_shardings), not by flax at creation.
        Flax's own logical rules are set to this table too, because `nnx.eval_shape`
        under a mesh attaches a sharding to every abstract variable by mapping its names;
        those are the plain mapping, not fitted to the shapes (see `param_shardings`).
        """
        # jax.set_mesh and use_eager_sharding take effect when constructed, so they are
        # built inside the with statement.
        with (
            jax.set_mesh(self.mesh),
            nnx.use_eager_sharding(False),
            nnx.logical_axis_rules(self.flax_rules),
            rules_lib.activate(self.mesh, self.rules),
        ):
            yield

    @property
    def flax_rules(self) -> tuple[tuple[str, Any], ...]:
        """This table in flax's form (one target per name: its first rule)."""
        first: dict[str, Any] = {}
        for name, target in self.rules:
            first.setdefault(name, target)
        return tuple(first.items())

    # --- specs and shardings ------------------------------------------------------------

    def logical_specs(self, abstract_state: nnx.State | nnx.Module | PyTree) -> PyTree:
        """Pure-dict tree of PartitionSpecs of logical names, from `with_partitioning` metadata.

        Leaves without metadata (norm scales, scalars) get `PartitionSpec()` (replicated).
        """
        if isinstance(abstract_state, nnx.Module):
            abstract_state = nnx.state(abstract_state, nnx.Param)
        # Read the names as written: flax's own global logical rules must not rename them.
        with nnx.logical_axis_rules(()):
            specs = nnx.get_partition_spec(abstract_state)
        return _pure(specs)

    def mesh_spec(
        self,
        logical_axes: Sequence[str | tuple[str, ...] | None],
        shape: Sequence[int] | None = None,
        *,
        name: str = "",
    ) -> PartitionSpec:
        """The mesh PartitionSpec of one array; with `shape`, fitted to divide it."""
        spec = rules_lib.logical_to_mesh_spec(logical_axes, self.rules)
        if shape is None:
            return spec
        spec, drops = self._fit_checked(logical_axes, spec, shape, name)
        for drop in drops:
            _log.warning("partitioning: %s %s", name or "array", self._drop_text(*drop))
        return spec

    def _fit_checked(self, logical_axes, spec, shape, name):
        if len(logical_axes) not in (0, len(shape)):
            raise ValueError(
                f"{name or 'array'}: logical axes {tuple(logical_axes)} do not match its "
                f"shape {tuple(shape)}"
            )
        spec, drops = self._fit(spec, shape)
        # (logical name, size, mesh axes, kept axes) of every dim that had to give way.
        return spec, [(logical_axes[dim], size, axes, kept) for dim, size, axes, kept in drops]

    def _drop_text(self, logical: Any, size: int, axes: tuple[str, ...],
                   kept: tuple[str, ...]) -> str:
        sizes = " × ".join(f"{a}={self._axis_sizes[a]}" for a in axes)
        what = f"sharded over {' × '.join(kept)} only" if kept else "replicated"
        return f"dim {logical!r} of size {size} does not divide by {sizes}: {what}"

    def _fit(self, spec: PartitionSpec, shape: Sequence[int]):
        """Drops mesh axes (last first) from each dim until its size divides by them.

        Returns the fitted spec and (dim, size, axes, kept axes) for each changed dim.
        """
        entries, drops = [], []
        for dim, (entry, size) in enumerate(zip(tuple(spec), shape)):
            axes = _spec_axes(entry)
            kept = axes
            while kept and size % math.prod(self._axis_sizes[a] for a in kept):
                kept = kept[:-1]
            if kept != axes:
                drops.append((dim, size, axes, kept))
            entries.append(rules_lib.spec_entry(kept))
        return PartitionSpec(*entries), drops

    def shardings(self, logical_spec_tree: PyTree, abstract_params: PyTree | None = None) -> PyTree:
        """NamedShardings for a tree of logical PartitionSpecs.

        With `abstract_params` (same structure; anything with `.shape`, or the nnx.State),
        every dimension is checked to divide by its mesh axes and fitted if not (see the
        module docstring), with one warning per kind of misfit. Without it, specs are
        used as mapped (and jit raises on a dimension that does not divide).
        """
        if abstract_params is None:
            return jax.tree.map(
                lambda s: NamedSharding(self.mesh, self.mesh_spec(tuple(s))),
                logical_spec_tree, is_leaf=_is_spec,
            )
        misfits: dict[tuple, list[str]] = collections.defaultdict(list)

        def one(path, logical, leaf):
            name = _path_str(path)
            mapped = rules_lib.logical_to_mesh_spec(tuple(logical), self.rules)
            spec, drops = self._fit_checked(tuple(logical), mapped, leaf.shape, name)
            for drop in drops:
                misfits[drop].append(name)
            return NamedSharding(self.mesh, spec)

        out = jax.tree_util.tree_map_with_path(
            one, logical_spec_tree, _pure(abstract_params), is_leaf=_is_spec
        )
        for drop, names in misfits.items():
            _log.warning("partitioning: %s, in %d parameter(s), e.g. %s",
                         self._drop_text(*drop), len(names), names[0])
        return out

    def param_shardings(self, abstract_state: nnx.State) -> PyTree:
        """Shardings of an abstract parameter State, divisibility-checked (pure-dict tree)."""
        return self.shardings(self.logical_specs(abstract_state), abstract_state)

    def opt_state_shardings(
        self,
        abstract_opt_state: optax.OptState,
        param_shardings: PyTree,
        *,
        optimizer: optax.GradientTransformation | Callable[[PyTree], Any] | None = None,
        abstract_params: PyTree | None = None,
    ) -> PyTree:
        """Shardings of an optimizer state, derived from the parameter shardings.

        Every copy of the parameter tree inside the state (Adam's mu / nu, Adafactor's
        v_row / v_col / v) follows its parameter: same shape -> same spec; a factored
        statistic (one dim reduced away) -> the spec without that dim; anything else
        (step counts, (1,)-shaped placeholders) -> replicated. Each result is fitted to
        divide its own shape, so any optimizer gets valid shardings.

        With `optimizer` (a GradientTransformation or init fn) the parameter copies are
        found by `optax.tree_map_params`; without it, by matching the parameter tree's
        structure. `abstract_params` (shapes) makes factored stats exact.
        """
        rest = [param_shardings]
        if abstract_params is not None:
            rest.append(_pure(abstract_params))

        def derive(stat, sharding, param=None):
            if not hasattr(stat, "shape"):
                return self._replicated
            spec = self._derive_spec(
                tuple(stat.shape), sharding.spec, None if param is None else tuple(param.shape)
            )
            return NamedSharding(self.mesh, spec)

        def replicated(_):
            return self._replicated

        if optimizer is not None:
            return optax.tree_map_params(
                optimizer, derive, abstract_opt_state, *rest, transform_non_params=replicated
            )

        param_def = jax.tree.structure(param_shardings)

        def is_param_tree(x):
            return jax.tree.structure(x) == param_def

        def per_node(node):
            if is_param_tree(node):
                return jax.tree.map(derive, node, *rest)
            return self._replicated

        return jax.tree.map(per_node, abstract_opt_state, is_leaf=is_param_tree)

    def _derive_spec(self, stat_shape: tuple[int, ...], param_spec: PartitionSpec,
                     param_shape: tuple[int, ...] | None) -> PartitionSpec:
        if not stat_shape:
            return PartitionSpec()
        ndim = len(param_shape) if param_shape is not None else len(param_spec)
        entries = tuple(param_spec) + (None,) * (ndim - len(param_spec))
        if param_shape is not None:
            if stat_shape == param_shape:
                return self._fit(PartitionSpec(*entries), stat_shape)[0]
            for i in range(ndim):
                if param_shape[:i] + param_shape[i + 1:] == stat_shape:
                    return self._fit(PartitionSpec(*entries[:i], *entries[i + 1:]), stat_shape)[0]
            return PartitionSpec()
        if len(stat_shape) == ndim:
            return self._fit(PartitionSpec(*entries), stat_shape)[0]
        if len(stat_shape) == ndim - 1:
            # Which dim was reduced is unknown: keep the candidate that stays most sharded.
            candidates = [
                self._fit(PartitionSpec(*entries[:i], *entries[i + 1:]), stat_shape)[0]
                for i in range(ndim)
            ]
            return max(candidates, key=lambda s: sum(e is not None for e in s))
        return PartitionSpec()

    # --- batches ------------------------------------------------------------------------

    @property
    def batch_axes(self) -> tuple[str, ...]:
        """Mesh axes the batch dimension is split over (from the 'batch' rule)."""
        return rules_lib.mesh_axes_for("batch", self.rules, set())

    @property
    def batch_divisor(self) -> int:
        """The data-parallel mesh size: every global batch size must be a multiple of it."""
        return math.prod(self._axis_sizes[a] for a in self.batch_axes)

    def batch_sharding(self, ndim: int = 2) -> NamedSharding:
        """Sharding of a [B, ...] batch array of rank `ndim`: B over the batch axes."""
        if ndim < 1:
            raise ValueError(f"a batch array needs a batch dimension; got ndim={ndim}")
        entry = rules_lib.spec_entry(self.batch_axes)
        return NamedSharding(self.mesh, PartitionSpec(entry, *([None] * (ndim - 1))))

    def check_batch_size(self, global_batch_size: int) -> None:
        """Raises if `global_batch_size` cannot be split evenly over the batch axes."""
        d = self.batch_divisor
        if global_batch_size < 1 or global_batch_size % d:
            sizes = [a for a in self.batch_axes if self._axis_sizes[a] > 1] or self.batch_axes
            breakdown = " × ".join(f"{a}={self._axis_sizes[a]}" for a in sizes)
            suggestion = max(d, -(-global_batch_size // d) * d)
            raise ValueError(
                f"batch size {global_batch_size} is not divisible by the data-parallel mesh "
                f"size {d} ({breakdown}); use a multiple of {d}, e.g. "
                f"--gin.BATCH_SIZE={suggestion}"
            )

    @functools.cached_property
    def _data_shards(self) -> tuple[int, int]:
        d = self.batch_divisor
        rows: dict[int, set[int]] = collections.defaultdict(set)
        for device, index in self.batch_sharding(1).devices_indices_map((d,)).items():
            rows[device.process_index].add(index[0].start or 0)
        return shard_of_process(rows, jax.process_index())

    def data_shard_info(self) -> tuple[int, int]:
        """(shard_id, num_shards) of this process's input data, for seqio.ShardInfo.

        Usually (process_index, process_count). Processes whose devices hold the same
        batch rows (a model axis spanning hosts) share one shard, as
        `make_array_from_process_local_data` expects them to feed identical data.
        """
        return self._data_shards

    def host_batch_size(self, global_batch_size: int) -> int:
        """Rows of the global batch this process reads (global / number of data shards)."""
        self.check_batch_size(global_batch_size)
        _, num_shards = self.data_shard_info()
        return global_batch_size // num_shards

    def make_global_batch(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Global jax.Arrays, batch-sharded, from this process's rows of every feature."""
        _, num_shards = self.data_shard_info()
        out = {}
        for key, value in host_batch.items():
            local = np.asarray(value)
            if local.ndim < 1:
                raise ValueError(f"feature {key!r} has no batch dimension (shape {local.shape})")
            self.check_batch_size(local.shape[0] * num_shards)
            out[key] = jax.make_array_from_process_local_data(
                self.batch_sharding(local.ndim), local
            )
        return out

    # --- parameters ---------------------------------------------------------------------

    def sharded_init(
        self, create_fn: Callable[[], nnx.Module], param_shardings: PyTree | None = None
    ) -> tuple[nnx.GraphDef | None, PyTree, PyTree]:
        """Creates a network's parameters directly in their shardings.

        `create_fn` builds the network (with its own `nnx.Rngs`). It is traced once
        abstractly (`nnx.eval_shape`, nothing allocated) for the logical specs, then run
        under one `jax.jit` whose out_shardings place every parameter: no device ever
        holds a whole unsharded model. Returns (graphdef, params pure dict, shardings);
        `nnx.merge(graphdef, state)` after `nnx.replace_by_pure_dict` rebuilds the module.
        Callers that already hold the shardings pass them and skip the abstract trace
        (graphdef is then None).
        """
        graphdef = None
        with self.activate():
            if param_shardings is None:
                abstract = nnx.eval_shape(create_fn)
                graphdef, abstract_state = nnx.split(abstract, nnx.Param)
                param_shardings = self.param_shardings(abstract_state)

            def init():
                return nnx.to_pure_dict(nnx.state(create_fn(), nnx.Param))

            params = jax.jit(init, out_shardings=param_shardings)()
        return graphdef, params, param_shardings

    def describe(self, params_abstract: nnx.State | PyTree, shardings: PyTree) -> str:
        """A table for model-info.txt: each parameter's shape, dtype, logical axes, mesh
        spec and bytes per device, then totals.

        `params_abstract` is the abstract nnx.State (logical axes shown) or a pure dict of
        anything with shape and dtype (logical axes shown as '-').
        """
        pure = _pure(params_abstract)
        has_names = isinstance(params_abstract, nnx.State)
        logical = self.logical_specs(params_abstract) if has_names else None
        rows = []
        totals = {"count": 0, "bytes": 0, "device_bytes": 0}

        def row(path, leaf, sharding, names=None):
            shape = tuple(leaf.shape)
            dtype = np.dtype(leaf.dtype)
            count = math.prod(shape)
            device_bytes = bytes_per_device(shape, dtype, sharding)
            totals["count"] += count
            totals["bytes"] += count * dtype.itemsize
            totals["device_bytes"] += device_bytes
            axes = "-" if not names else "(" + ", ".join(str(n) for n in names) + ")"
            rows.append((_path_str(path), str(shape), dtype.name, axes, str(sharding.spec),
                         f"{device_bytes:,}"))

        if logical is None:
            jax.tree_util.tree_map_with_path(row, pure, shardings)
        else:
            jax.tree_util.tree_map_with_path(
                lambda p, x, s, n: row(p, x, s, tuple(n)), pure, shardings, logical
            )
        header = ("parameter", "shape", "dtype", "logical axes", "mesh spec", "bytes/device")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def fmt(r):
            cells = [c.ljust(w) for c, w in zip(r[:-1], widths[:-1])] + [r[-1].rjust(widths[-1])]
            return "  ".join(cells).rstrip()

        lines = [fmt(header), *map(fmt, rows)]
        lines.append(
            f"total: {totals['count']:,} parameters, {totals['bytes']:,} bytes "
            f"({human_bytes(totals['bytes'])}); per device: {totals['device_bytes']:,} bytes "
            f"({human_bytes(totals['device_bytes'])}) on each of {self.mesh.size} devices"
        )
        return "\n".join(lines)


def human_bytes(n: float | None, digits: int = 1) -> str:
    """1536 -> '1.5 KiB' (binary units up to TiB; None -> '?')."""
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def bytes_per_device(shape: Sequence[int], dtype, sharding) -> int:
    """Bytes of the largest shard one device holds of an array (all of it if unsharded)."""
    shard = sharding.shard_shape(tuple(shape)) if sharding is not None else tuple(shape)
    return math.prod(shard) * np.dtype(dtype).itemsize


def shard_of_process(rows_of_process: Mapping[int, set[int]], process: int) -> tuple[int, int]:
    """(shard_id, num_shards) from the batch rows each process's devices hold.

    Processes holding the same rows form one shard; shards are numbered by first row.
    """
    groups = sorted({frozenset(r) for r in rows_of_process.values()}, key=min)
    mine = frozenset(rows_of_process[process])
    if any(g != mine and g & mine for g in groups):
        raise ValueError(
            "the batch rows of this process partly overlap another's; the mesh splits the "
            "batch across hosts unevenly (put the batch axes data / fsdp outermost)"
        )
    return groups.index(mine), len(groups)

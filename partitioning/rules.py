"""Logical axis names -> mesh axes, and logical sharding constraints on activations.

Every parameter and block-boundary activation in `models/` is named with logical
axes (batch, length, embed, mlp, heads, kv_heads, kv, vocab, expert, expert_mlp, layers,
relpos_buckets; kv_heads are the key/value heads of grouped-query attention). A rules
table maps those names onto the mesh axes data / fsdp / expert / model; one table per
strategy, so switching strategy is one gin line (`RULES = 'fsdp'`, see gin/partitioning/).

A table is a sequence of `(logical name, mesh target)` pairs where the target is a mesh
axis, a tuple of mesh axes (the dimension is split over their product) or None
(replicated). A name may appear more than once: the first entry whose mesh axes are all
still free in the PartitionSpec wins, which lets a table give fallbacks (T5X style).
Names that no rule mentions are replicated here; every preset lists all of
`LOGICAL_AXES`, and a new name belongs in them (flax's `nnx.eval_shape` under
`Partitioner.activate()` rejects a name that maps to no mesh axis).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

from partitioning.mesh import MESH_AXES

MeshTarget = str | tuple[str, ...] | None
LogicalRules = Sequence[tuple[str, MeshTarget]]

LOGICAL_AXES = (
    "batch",
    "length",
    "embed",
    "mlp",
    "heads",
    "kv_heads",
    "kv",
    "vocab",
    "expert",
    "expert_mlp",
    "layers",
    "relpos_buckets",
)

# The batch is split over every mesh axis that does not split weights along the batch:
# data and fsdp are data-parallel by definition, and the expert axis is data-parallel for
# all non-expert layers (tokens reach their experts through an all-to-all), as in MaxText.
BATCH_AXES = ("data", "fsdp", "expert")

# Names every preset maps the same way.
_SHARED: tuple[tuple[str, MeshTarget], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("kv", None),
    ("layers", None),
    ("relpos_buckets", None),
    ("expert", "expert"),  # expert parallelism is switched on by the mesh (expert > 1)
)


def _preset(*, embed: MeshTarget, tensor: MeshTarget) -> tuple[tuple[str, MeshTarget], ...]:
    """A full table: `embed` shards weights' model dim, `tensor` the Megatron dims."""
    return (
        *_SHARED,
        ("embed", embed),
        ("mlp", tensor),
        ("heads", tensor),
        ("kv_heads", tensor),  # fewer than heads: replicated where they do not divide
        ("vocab", tensor),
        ("expert_mlp", tensor),
    )


# dp and tp differ from dp_tp only in the mesh their gin file sets: the tables are the
# same because batch always spans data × fsdp × expert, whatever sizes those have.
PRESETS: dict[str, tuple[tuple[str, MeshTarget], ...]] = {
    # Data parallel: weights replicated, batch split.
    "dp": _preset(embed=None, tensor=None),
    # Fully sharded data parallel (ZeRO-3): every weight's embed dim over fsdp.
    "fsdp": _preset(embed="fsdp", tensor=None),
    # Megatron tensor parallel: heads, mlp, vocab (and expert_mlp) over model.
    "tp": _preset(embed=None, tensor="model"),
    "dp_tp": _preset(embed=None, tensor="model"),
    # FSDP over fsdp plus Megatron TP over model (2-D weight sharding).
    "fsdp_tp": _preset(embed="fsdp", tensor="model"),
}


def get_rules(name: str) -> tuple[tuple[str, MeshTarget], ...]:
    """The rules table of preset `name` (one of `PRESETS`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown partitioning rules preset {name!r}; known presets: "
            f"{', '.join(sorted(PRESETS))} (e.g. --gin.RULES=fsdp)"
        ) from None


def as_axes(target: MeshTarget) -> tuple[str, ...]:
    """A rule target as a tuple of mesh axes (None -> ())."""
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def mesh_axes_for(name: str | None, rules: LogicalRules, used: set[str]) -> tuple[str, ...]:
    """Mesh axes of logical `name`, skipping axes in `used` (a mesh axis shards one dim)."""
    if name is None:
        return ()
    candidates = [as_axes(target) for rule_name, target in rules if rule_name == name]
    for axes in candidates:
        if not any(a in used for a in axes):
            return axes
    # No entry is wholly free: keep the free part of the first, e.g. ('expert', 'batch')
    # gives batch (data, fsdp) once expert has taken the expert axis.
    return tuple(a for a in candidates[0] if a not in used) if candidates else ()


def spec_entry(axes: tuple[str, ...]) -> str | tuple[str, ...] | None:
    """One PartitionSpec entry for mesh `axes`: None, an axis, or a tuple of axes."""
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def logical_to_mesh_spec(
    logical_axes: Sequence[str | tuple[str, ...] | None], rules: LogicalRules
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once.

    Dimensions claim mesh axes left to right, so in ('batch', 'length', 'embed') under
    'fsdp' the batch takes fsdp and embed stays replicated. An entry may itself be a
    tuple of logical names (a merged dimension); its mesh axes are concatenated.
    """
    used: set[str] = set()
    spec = []
    for entry in logical_axes:
        names = entry if isinstance(entry, tuple) else (entry,)
        axes: tuple[str, ...] = ()
        for name in names:
            new = mesh_axes_for(name, rules, used)
            used.update(new)
            axes += new
        spec.append(spec_entry(axes))
    return PartitionSpec(*spec)


def fit_rules(rules: LogicalRules, mesh: jax.sharding.Mesh) -> tuple[tuple[str, MeshTarget], ...]:
    """`rules` for `mesh`: standard axes the mesh lacks (data, fsdp, expert, model) count
    as size 1 and are dropped; any other unknown axis, or one used twice, is an error."""
    fitted = []
    for name, target in rules:
        axes = as_axes(target)
        if len(set(axes)) != len(axes):
            raise ValueError(f"rule {name!r} -> {target!r} uses a mesh axis twice")
        unknown = [a for a in axes if a not in mesh.axis_names and a not in MESH_AXES]
        if unknown:
            raise ValueError(
                f"rule {name!r} -> {target!r} names mesh axis {unknown[0]!r}, which the mesh "
                f"(axes {mesh.axis_names}) does not have"
            )
        fitted.append((name, spec_entry(tuple(a for a in axes if a in mesh.axis_names))))
    return tuple(fitted)


# The (mesh, rules) pair that activation constraints use; None means "no constraint"
# (single device, eager exploration in Colab, unit tests of a layer).
_ACTIVE: contextvars.ContextVar[tuple[jax.sharding.Mesh, LogicalRules] | None] = (
    contextvars.ContextVar("t5x_like_logical_rules", default=None)
)


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh, rules: LogicalRules) -> Iterator[None]:
    """Makes `with_logical_constraint` map names with `rules` (see `fit_rules`) onto `mesh`.

    This sets only the rules; `Partitioner.activate()` also sets the mesh with
    `jax.set_mesh`, which jitted code under constraints normally wants too.
    """
    token = _ACTIVE.set((mesh, fit_rules(rules, mesh)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> tuple[jax.sharding.Mesh, LogicalRules] | None:
    """The (mesh, rules) pair set by `activate`, or None outside it."""
    return _ACTIVE.get()


def active_mesh_spec(
    logical_axes: Sequence[str | tuple[str, ...] | None], shape: Sequence[int]
) -> tuple[jax.sharding.Mesh, PartitionSpec] | None:
    """(mesh, spec) for an array of `shape` under the active rules, or None if inactive.

    Mesh axes whose size does not divide their dimension are dropped from it (that
    dimension is then replicated over them): for a `shard_map`, which needs exact blocks.
    """
    current = _ACTIVE.get()
    if current is None:
        return None
    mesh, rules = current
    spec = []
    for dim, entry in zip(shape, logical_to_mesh_spec(logical_axes, rules), strict=True):
        axes = tuple(a for a in as_axes(entry) if mesh.shape[a] > 1)
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return mesh, PartitionSpec(*spec)


def with_logical_constraint(
    x: jax.Array, logical_axes: Sequence[str | tuple[str, ...] | None]
) -> jax.Array:
    """Constrains activation `x` to the sharding its logical axes map to (no-op if inactive).

    Inside jit this is `jax.lax.with_sharding_constraint`; dimensions that do not divide
    by their mesh axes are padded by the compiler (GSPMD), so no fallback is needed here.
    """
    if len(logical_axes) != x.ndim:
        raise ValueError(
            f"logical axes {tuple(logical_axes)} do not match rank {x.ndim} of shape {x.shape}"
        )
    current = _ACTIVE.get()
    if current is None:
        return x
    mesh, rules = current
    spec = logical_to_mesh_spec(logical_axes, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

"""Logical axis names -> mesh axes, and logical sharding constraints on activations.

Every parameter and block-boundary activation in `models/` is named with logical
axes (batch, length, embed, mlp, heads, kv, vocab, expert, expert_mlp, layers, ...).
A rules table maps those names onto the mesh axes data / fsdp / model / expert.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# The (mesh, rules) pair that activation constraints use; None means "no constraint"
# (single device, eager exploration in Colab, unit tests of a layer).
_ACTIVE: contextvars.ContextVar[tuple[jax.sharding.Mesh, LogicalRules] | None] = (
    contextvars.ContextVar("t5x_like_logical_rules", default=None)
)


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh, rules: LogicalRules) -> Iterator[None]:
    """Makes `with_logical_constraint` map names with `rules` onto `mesh`."""
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def logical_to_mesh_spec(logical_axes: Sequence[str | None], rules: LogicalRules) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        target = table.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        if any(t in used for t in targets):
            targets = ()
        used.update(targets)
        spec.append(None if not targets else (targets[0] if len(targets) == 1 else targets))
    return PartitionSpec(*spec)


def with_logical_constraint(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Constrains activation `x` to the sharding its logical axes map to (no-op if inactive)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    if len(logical_axes) != x.ndim:
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match rank {x.ndim} of {x.shape}")
    spec = logical_to_mesh_spec(logical_axes, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

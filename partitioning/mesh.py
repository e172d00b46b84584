"""The device mesh: data × fsdp × expert × model, over one slice or many (multi-slice).

Every mesh has all four axes (size 1 when unused), so one rules table works on any mesh
and switching strategy changes sizes, never names. Axes are ordered from the least to
the most communication-hungry (data: one gradient all-reduce per step; fsdp: weight
all-gathers per layer; expert: all-to-alls per MoE layer; model: all-reduces inside
every layer), the order `mesh_utils.create_device_mesh` wants so that the innermost axes
land on the fastest links.

Every axis is `AxisType.Auto` (GSPMD propagation): `jax.make_mesh` defaults to Explicit
axes, under which the logical `with_sharding_constraint`s of the models fail.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "expert", "model")

# Axes that may cross slices (DCN): data parallelism (one all-reduce per step) and fsdp.
# Model and expert parallelism need the fast in-slice links, so they never cross.
DCN_AXES = ("data", "fsdp")

_log = logging.getLogger(__name__)


def _product(sizes: Mapping[str, int], names: Sequence[str] = MESH_AXES) -> str:
    return " × ".join(f"{n}={sizes[n]}" for n in names)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of data / fsdp / expert / model may be -1 ("all the rest").

    Sizes are per slice (ICI). `dcn_data` / `dcn_fsdp` multiply the data / fsdp axes across
    slices (multi-slice TPU, or multi-node GPU where each process is a "slice"); their
    product is the number of slices. The default is pure data parallelism.
    """

    data: int = -1
    fsdp: int = 1
    model: int = 1
    expert: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1

    def __post_init__(self):
        for name in MESH_AXES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
                raise ValueError(
                    f"mesh axis {name}={value!r} must be a positive int, or -1 for "
                    "all remaining devices"
                )
        for name in ("dcn_data", "dcn_fsdp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int (number of slices)")
        wild = [n for n in MESH_AXES if getattr(self, n) == -1]
        if len(wild) > 1:
            raise ValueError(
                f"mesh axes {' and '.join(f'{n}=-1' for n in wild)}: at most one axis may be "
                "-1 (all remaining devices); give the others explicit sizes"
            )

    @property
    def num_slices(self) -> int:
        """How many slices (DCN granules) the mesh spans."""
        return self.dcn_data * self.dcn_fsdp

    def dcn_shape(self) -> dict[str, int]:
        """Per-axis number of slices (1 for axes that stay inside a slice)."""
        return {n: getattr(self, f"dcn_{n}", 1) if n in DCN_AXES else 1 for n in MESH_AXES}

    def ici_shape(self, devices_per_slice: int) -> dict[str, int]:
        """Per-slice axis sizes with -1 resolved for `devices_per_slice` devices."""
        sizes = {n: getattr(self, n) for n in MESH_AXES}
        fixed = math.prod(v for v in sizes.values() if v != -1)
        where = "" if self.num_slices == 1 else " per slice"
        wild = [n for n, v in sizes.items() if v == -1]
        if wild:
            if devices_per_slice % fixed:
                others = _product(sizes, [n for n in MESH_AXES if n != wild[0]])
                raise ValueError(
                    f"mesh {wild[0]}=-1 cannot fill the {devices_per_slice} available "
                    f"devices{where}: {others} = {fixed} does not divide "
                    f"{devices_per_slice}; choose sizes whose product divides "
                    f"{devices_per_slice}"
                )
            sizes[wild[0]] = devices_per_slice // fixed
        elif fixed != devices_per_slice:
            raise ValueError(
                f"mesh {_product(sizes)} = {fixed} devices does not fit the "
                f"{devices_per_slice} available devices{where}; make the product "
                f"{devices_per_slice} or set one axis to -1"
            )
        return sizes

    def resolve(self, num_devices: int) -> dict[str, int]:
        """Total axis sizes (ICI × DCN) of the mesh over `num_devices` devices."""
        if num_devices % self.num_slices:
            raise ValueError(
                f"{num_devices} devices cannot be split into dcn_data={self.dcn_data} × "
                f"dcn_fsdp={self.dcn_fsdp} = {self.num_slices} equal slices"
            )
        ici = self.ici_shape(num_devices // self.num_slices)
        dcn = self.dcn_shape()
        return {n: ici[n] * dcn[n] for n in MESH_AXES}


def _granules(devices: Sequence[Any], num_slices: int) -> tuple[str, list[list[Any]]]:
    """Groups devices into slices: by slice_index (TPU), process (GPU), or in order."""
    for attr in ("slice_index", "process_index"):
        if all(hasattr(d, attr) for d in devices):
            keys = sorted({getattr(d, attr) for d in devices})
            if len(keys) == num_slices:
                return attr, [[d for d in devices if getattr(d, attr) == k] for k in keys]
            if attr == "slice_index" and len(keys) > 1:
                raise ValueError(
                    f"the devices span {len(keys)} slices but the mesh asks for "
                    f"dcn_data × dcn_fsdp = {num_slices}; set dcn_data={len(keys)} "
                    "(or dcn_data × dcn_fsdp to that number)"
                )
    # One host simulating several slices (CPU tests, a single GPU node): consecutive
    # devices form a slice, exactly as separate slices would be laid out.
    per = len(devices) // num_slices
    ordered = sorted(devices, key=lambda d: d.id)
    return "order", [ordered[i * per:(i + 1) * per] for i in range(num_slices)]


def _ici_mesh(shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
    try:
        return mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError) as err:
        # Some TPU topologies only fit a shape by splitting a physical axis; that works,
        # with less favourable links, so say so and carry on.
        _log.warning("mesh shape %s does not map onto the physical topology (%s); "
                     "splitting physical axes", tuple(shape), err)
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)


def make_mesh(config: MeshConfig | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """The `Mesh` of `config` over `devices` (default: all devices), every axis Auto."""
    config = config or MeshConfig()
    devices = list(jax.devices() if devices is None else devices)
    sizes = config.resolve(len(devices))  # validates before any device work
    ici = config.ici_shape(len(devices) // config.num_slices)
    ici_shape = [ici[n] for n in MESH_AXES]
    if config.num_slices == 1:
        device_array = _ici_mesh(ici_shape, devices)
    else:
        dcn = config.dcn_shape()
        dcn_shape = [dcn[n] for n in MESH_AXES]
        kind, granules = _granules(devices, config.num_slices)
        if kind == "order":
            # Same block layout as create_hybrid_device_mesh: slice i is block i of the
            # dcn grid, so the slow links are crossed only by the dcn axes.
            per_slice = [_ici_mesh(ici_shape, g) for g in granules]
            grid = np.arange(config.num_slices).reshape(dcn_shape)
            blocks = np.vectorize(lambda i: per_slice[i], otypes=[object])(grid)
            device_array = np.block(blocks.tolist())
        else:
            device_array = mesh_utils.create_hybrid_device_mesh(
                ici_shape, dcn_shape, devices, process_is_granule=kind == "process_index"
            )
    assert device_array.shape == tuple(sizes[n] for n in MESH_AXES), device_array.shape
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))

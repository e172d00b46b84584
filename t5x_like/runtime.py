"""The one way train, eval and infer build a model, a mesh, a partitioner and state.

`Runtime` is small on purpose: it holds the Model API, the partitioner and the
network's abstract definition, and knows how to get parameters (fresh, sharded, or
restored from a checkpoint onto the current mesh). The run modes call it; none of them
repeats this setup.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from models import moe
from partitioning import mesh as mesh_lib
from partitioning import rules as rules_lib
from partitioning.partitioner import Partitioner
from t5x_like import checkpoints
from t5x_like.trainer import NetworkDef, network_def, with_shardings

PyTree = Any


@dataclasses.dataclass(eq=False)  # hashed by identity: jitted functions are cached per runtime
class Runtime:
    model: Any  # a Model API, e.g. model_api.EncoderDecoderModel
    partitioner: Partitioner
    net: NetworkDef

    @classmethod
    def build(
        cls,
        model,
        *,
        mesh_config: mesh_lib.MeshConfig | None = None,
        rules: str | rules_lib.LogicalRules = "dp",
        devices: Sequence[jax.Device] | None = None,
    ) -> Runtime:
        """`devices` defaults to all devices (tests pass one device for a reference run)."""
        mesh = mesh_lib.make_mesh(mesh_config or mesh_lib.MeshConfig(), devices)
        partitioner = Partitioner(mesh, rules)
        with partitioner.activate():
            net = network_def(lambda: model.make_network(nnx.Rngs(0)))
        return cls(model=model, partitioner=partitioner, net=net)

    @functools.cached_property
    def param_shardings(self) -> PyTree:
        return self.partitioner.param_shardings(self.net.abstract_state)

    def abstract_params(self) -> PyTree:
        """Parameter ShapeDtypeStructs with their target shardings."""
        return with_shardings(self.net.abstract_params(), self.param_shardings)

    def restore_params(self, checkpoint_path: str | os.PathLike[str]) -> PyTree:
        """Parameters of a checkpoint, read straight into this mesh's shardings."""
        return checkpoints.restore_params(checkpoint_path, self.abstract_params())

    def init_params_from(self, checkpoint_path: str | os.PathLike[str], seed: int = 0, *,
                         upcycle: bool = False) -> PyTree:
        """Fine-tuning start: every parameter the checkpoint holds (same name and shape),
        fresh initialisation (from `seed`) for the rest, e.g. a new classifier head.

        `upcycle=True` (sparse upcycling): the checkpoint is the dense version of this MoE
        network; each expert starts as a copy of its layer's dense MLP, routers fresh.
        """
        if upcycle:
            dense = checkpoints.restore_params(
                checkpoint_path, moe.dense_counterpart(self.abstract_params()),
                allow_missing=True)
            return jax.device_put(moe.upcycle(dense, self.init_params(seed)),
                                  self.param_shardings)
        restored = checkpoints.restore_params(checkpoint_path, self.abstract_params(),
                                              allow_missing=True)
        def overlay(fresh, loaded):
            if not isinstance(fresh, dict):
                return fresh if loaded is None else loaded
            loaded = loaded or {}
            return {k: overlay(v, loaded.get(k)) for k, v in fresh.items()}

        return overlay(self.init_params(seed), restored)

    def init_params(self, seed: int = 0) -> PyTree:
        """Fresh parameters, initialised directly into their shardings (one jit)."""
        _, params, _ = self.partitioner.sharded_init(
            lambda: self.model.make_network(nnx.Rngs(params=seed, default=seed)),
            self.param_shardings,
        )
        return params

    def write_model_info(self, model_dir: str | os.PathLike[str]) -> pathlib.Path:
        """MODEL_DIR/model-info.txt: every parameter's shape, axes, mesh spec, bytes/device."""
        path = pathlib.Path(model_dir) / "model-info.txt"
        if jax.process_index() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            text = self.partitioner.describe(self.net.abstract_state, self.param_shardings)
            header = f"mesh: {dict(self.partitioner.mesh.shape)}\n"
            path.write_text(header + text + "\n")
        return path

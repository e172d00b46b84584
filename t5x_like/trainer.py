"""TrainState and the pure, jitted train / eval steps (gradient accumulation included).

The network is split once (`nnx.split`) into a graph definition and a parameter
pytree; the steps are plain `jax.jit` functions over pytrees with explicit
`in_shardings` / `out_shardings` and donation of the old state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from t5x_like.optimizers import OptimizerDef

if TYPE_CHECKING:
    from t5x_like.runtime import Runtime

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: the step counter, parameters, optimizer state."""

    step: jax.Array
    params: PyTree  # nested dict of arrays (`nnx.State.to_pure_dict()` layout)
    opt_state: optax.OptState


@dataclasses.dataclass
class NetworkDef:
    """A network's structure without its values: what `merge` needs inside a jit."""

    graphdef: Any
    abstract_state: nnx.State  # parameter shapes / dtypes / logical-axis metadata

    def merge(self, params: PyTree) -> nnx.Module:
        """A module carrying `params` (works on tracers inside jit)."""
        state = jax.tree.map(lambda x: x, self.abstract_state)  # a fresh container
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)

    def abstract_params(self) -> PyTree:
        return nnx.to_pure_dict(self.abstract_state)


def with_shardings(shapes: PyTree, shardings: PyTree) -> PyTree:
    """ShapeDtypeStructs of `shapes` carrying `shardings`: a restore target on any mesh."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )


def network_def(create_fn: Callable[[], nnx.Module]) -> NetworkDef:
    """Traces `create_fn` abstractly (no weights allocated) into a NetworkDef."""
    abstract = nnx.eval_shape(create_fn)
    graphdef, state = nnx.split(abstract, nnx.Param)
    return NetworkDef(graphdef, state)


def _split_microbatches(batch: Mapping[str, jax.Array], num: int) -> dict[str, jax.Array]:
    def split(x):
        if x.shape[0] % num:
            raise ValueError(
                f"batch size {x.shape[0]} is not divisible by num_microbatches={num}"
            )
        # [B, ...] -> [M, B/M, ...]; microbatch m takes rows m, M+m, 2M+m, ... so that each
        # microbatch stays spread over the data-parallel devices.
        return jnp.swapaxes(x.reshape((x.shape[0] // num, num, *x.shape[1:])), 0, 1)

    return {k: split(v) for k, v in batch.items()}


class Trainer:
    """Builds and runs the jitted steps for one model, optimizer and partitioner.

    The runtime's Model API (e.g. `EncoderDecoderModel`) supplies `loss_sums` and
    `metrics_from_sums`. The steps stay pure: a frozen second network (reference,
    teacher, drafter) can later ride along as another jit argument.
    """

    def __init__(
        self,
        runtime: Runtime,
        optimizer: OptimizerDef,
        *,
        num_microbatches: int = 1,
        seed: int = 0,
    ):
        if num_microbatches < 1:
            raise ValueError(f"num_microbatches={num_microbatches} must be >= 1")
        self.model = runtime.model
        self.net = net = runtime.net
        self.optimizer = optimizer
        self.partitioner = partitioner = runtime.partitioner
        self.num_microbatches = num_microbatches
        self.seed = seed

        self.param_shardings = runtime.param_shardings
        abstract_params = net.abstract_params()
        abstract_opt = jax.eval_shape(optimizer.tx.init, abstract_params)
        self.replicated = NamedSharding(partitioner.mesh, PartitionSpec())
        self.state_shardings = TrainState(
            step=self.replicated,
            params=self.param_shardings,
            opt_state=partitioner.opt_state_shardings(
                abstract_opt, self.param_shardings, optimizer=optimizer.tx,
                abstract_params=abstract_params,
            ),
        )
        # Rank 1: the batch dim over the batch axes, every other dim replicated, so one
        # sharding fits [B, L] tokens and [B] labels alike.
        self.batch_sharding = partitioner.batch_sharding(1)

        self.train_step = jax.jit(
            self._train_step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=(0,),
        )
        self.eval_step = jax.jit(
            self._eval_sums,
            in_shardings=(self.param_shardings, self.batch_sharding),
            out_shardings=self.replicated,
        )

    # --- state --------------------------------------------------------------------------

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs carrying the target shardings (what restore fills)."""
        shapes = jax.eval_shape(self._init_from_params, self.net.abstract_params())
        return with_shardings(shapes, self.state_shardings)

    def _init_from_params(self, params: PyTree) -> TrainState:
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.tx.init(params)
        )

    def init_state(self, params: PyTree) -> TrainState:
        """A step-0 TrainState around sharded `params` (see `Runtime.init_params`).

        The optimizer state is created by one jit whose `out_shardings` lay it out next to
        its parameters; nothing is first materialised on one device.
        """
        with self.partitioner.activate():
            return jax.jit(
                self._init_from_params,
                in_shardings=(self.param_shardings,),
                out_shardings=self.state_shardings,
            )(params)

    # --- steps --------------------------------------------------------------------------

    def _sums_and_grads(self, params, batch, rng):
        def loss_of(p):
            network = self.net.merge(p)
            sums = self.model.loss_sums(
                network, batch, rngs=nnx.Rngs(dropout=rng), deterministic=False
            )
            return sums["loss_sum"], sums

        grads, sums = jax.grad(loss_of, has_aux=True)(params)
        return sums, grads

    def _train_step(self, state: TrainState, batch: Mapping[str, jax.Array]):
        rng = jax.random.fold_in(jax.random.key(self.seed), state.step)
        if self.num_microbatches == 1:
            sums, grads = self._sums_and_grads(state.params, batch, rng)
        else:
            micro = _split_microbatches(batch, self.num_microbatches)

            def body(carry, xs):
                index, mb = xs
                sums, grads = self._sums_and_grads(
                    state.params, mb, jax.random.fold_in(rng, index)
                )
                return jax.tree.map(jnp.add, carry, (sums, grads)), None

            zero_sums = jax.tree.map(
                jnp.zeros_like,
                jax.eval_shape(
                    lambda: self._sums_and_grads(
                        state.params, jax.tree.map(lambda x: x[0], micro), rng
                    )
                ),
            )
            (sums, grads), _ = jax.lax.scan(
                body, zero_sums, (jnp.arange(self.num_microbatches), micro)
            )
        denom = self.model.loss.denominator(sums["num_tokens"])
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = self.optimizer.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = self.model.metrics_from_sums(sums)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["learning_rate"] = jnp.asarray(self.optimizer.schedule(state.step), jnp.float32)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    def _eval_sums(self, params, batch):
        network = self.net.merge(params)
        return self.model.loss_sums(network, batch, deterministic=True)

    def run_train_step(self, state: TrainState, batch: Mapping[str, jax.Array]):
        """One optimizer step with the mesh and logical rules active."""
        with self.partitioner.activate():
            return self.train_step(state, batch)

    def run_eval_step(self, params, batch):
        with self.partitioner.activate():
            return self.eval_step(params, batch)

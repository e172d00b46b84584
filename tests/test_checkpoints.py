"""Orbax checkpointing: keep-last-K, resharding restore, corrupt checkpoints, partial restore."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from t5x_like import checkpoints


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def _state(mesh):
    w = jnp.arange(32.0).reshape(8, 4)
    return {
        "step": jnp.asarray(7, jnp.int32),
        "params": {"layers": {0: {"w": jax.device_put(w, NamedSharding(mesh, P("data")))},
                              1: {"w": jax.device_put(-w, NamedSharding(mesh, P("data")))}}},
    }


def _abstract(state, sharding_fn):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding_fn(a)),
                        state)


def test_keeps_last_k_and_restores_onto_another_mesh(tmp_path):
    mesh8 = _mesh((8,), ("data",))
    state = _state(mesh8)
    ckpt = checkpoints.Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, state, {"position": step})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]
    mesh2x4 = _mesh((2, 4), ("a", "b"))
    target = _abstract(
        state, lambda a: NamedSharding(mesh2x4, P(None, "b") if a.ndim == 2 else P()))
    restored, data = ckpt.restore(None, target)
    ckpt.close()
    assert data == {"position": 3}
    w = restored["params"]["layers"][1]["w"]
    assert w.sharding.spec == P(None, "b")
    np.testing.assert_array_equal(np.asarray(w), -np.arange(32.0).reshape(8, 4))
    # Each device holds exactly its quarter of the columns.
    assert {s.data.shape for s in w.addressable_shards} == {(8, 1)}


def test_corrupt_checkpoint_gives_clear_error_and_deletes_nothing(tmp_path,
                                                                 settle_stray_callbacks):
    mesh = _mesh((8,), ("data",))
    state = _state(mesh)
    ckpt = checkpoints.Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=3)
    ckpt.save(1, state, {"position": 1})
    ckpt.save(2, state, {"position": 2})
    ckpt.close()
    # Damage step 2: wipe every array file of its state.
    damaged = 0
    for f in (tmp_path / "2" / "state").rglob("*"):
        if f.is_file() and "metadata" not in f.name.lower():
            f.write_bytes(b"garbage")
            damaged += 1
    assert damaged
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    ckpt = checkpoints.Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=3)
    target = _abstract(state, lambda a: NamedSharding(mesh, P()))
    with pytest.raises(checkpoints.CheckpointError,
                       match=r"checkpoint step 2 .* cannot be restored .*Nothing was deleted"
                             r".*\[1\]"):
        ckpt.restore(2, target)
    _, data = ckpt.restore(1, target)  # the earlier step is intact
    assert data == {"position": 1}
    ckpt.close()
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_restore_params_reads_only_params(tmp_path):
    mesh = _mesh((8,), ("data",))
    state = _state(mesh)
    ckpt = checkpoints.Checkpointer(tmp_path, save_interval_steps=1)
    ckpt.save(5, state, {"position": 5})
    ckpt.close()
    mesh2x4 = _mesh((2, 4), ("a", "b"))
    abstract = _abstract(state["params"], lambda a: NamedSharding(mesh2x4, P("b", "a")))
    params = checkpoints.restore_params(tmp_path, abstract)  # the checkpoints dir: latest step
    np.testing.assert_array_equal(np.asarray(params["layers"][0]["w"]),
                                  np.arange(32.0).reshape(8, 4))
    assert params["layers"][0]["w"].sharding.spec == P("b", "a")
    with pytest.raises(checkpoints.CheckpointError, match="no checkpoint under"):
        checkpoints.restore_params(pathlib.Path(tmp_path) / "missing", abstract)

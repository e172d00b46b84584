"""Mesh shapes, rules presets, shardings of params / optimizer state / batches, on 8 CPUs."""

import itertools
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from partitioning import MeshConfig, Partitioner, get_rules, make_mesh
from partitioning import rules as rules_lib
from partitioning.partitioner import shard_of_process

VOCAB, EMBED, MLP, HEADS, KV, EXPERTS, BUCKETS = 64, 16, 32, 8, 4, 8, 32


def _param(rngs, shape, names=None):
    init = nnx.initializers.uniform(0.02)
    if names is None:
        return nnx.Param(init(rngs.params(), shape))
    return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape))


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.kernel = _param(rngs, (EMBED, MLP), ("embed", "mlp"))


class Tiny(nnx.Module):
    """One of each kind of parameter the models name, nothing else."""

    def __init__(self, *, heads: int = HEADS, rngs: nnx.Rngs):
        self.embedding = _param(rngs, (VOCAB, EMBED), ("vocab", "embed"))
        self.query = _param(rngs, (EMBED, heads, KV), ("embed", "heads", "kv"))
        self.out = _param(rngs, (heads, KV, EMBED), ("heads", "kv", "embed"))
        self.wi = _param(rngs, (EMBED, MLP), ("embed", "mlp"))
        self.wo = _param(rngs, (MLP, EMBED), ("mlp", "embed"))
        self.relpos = _param(rngs, (BUCKETS, heads), ("relpos_buckets", "heads"))
        self.experts = _param(rngs, (EXPERTS, EMBED, MLP), ("expert", "embed", "expert_mlp"))
        self.norm = nnx.Param(jnp.ones((EMBED,)))  # no metadata: replicated
        self.scale = nnx.Param(jnp.ones(()))
        self.blocks = nnx.List([Block(rngs) for _ in range(2)])  # pure dict keys 0, 1


def _create(heads=HEADS):
    return lambda: Tiny(heads=heads, rngs=nnx.Rngs(0))


def _partitioner(rules="fsdp", **mesh):
    return Partitioner(make_mesh(MeshConfig(**mesh)), rules)


# --- mesh ---------------------------------------------------------------------------------


def test_default_mesh_is_data_parallel_with_auto_axes():
    mesh = make_mesh()
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "expert": 1, "model": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 4


@pytest.mark.parametrize(
    "config, shape",
    [
        (MeshConfig(data=2, fsdp=-1), (2, 4, 1, 1)),
        (MeshConfig(data=-1, model=2), (4, 1, 1, 2)),
        (MeshConfig(data=1, fsdp=2, model=-1), (1, 2, 1, 4)),
        (MeshConfig(data=-1, expert=4), (2, 1, 4, 1)),
        (MeshConfig(data=2, fsdp=2, model=2), (2, 2, 1, 2)),
    ],
)
def test_minus_one_takes_the_remaining_devices(config, shape):
    assert make_mesh(config).devices.shape == shape


def test_mesh_that_does_not_fit_names_values_and_fix():
    with pytest.raises(
        ValueError,
        match=r"mesh data=3 × fsdp=1 × expert=1 × model=2 = 6 devices does not fit the 8 "
        r"available devices; make the product 8 or set one axis to -1",
    ):
        make_mesh(MeshConfig(data=3, fsdp=1, model=2))


def test_minus_one_must_divide():
    with pytest.raises(ValueError, match=r"data=-1 cannot fill the 8 available devices: "
                                         r"fsdp=1 × expert=1 × model=3 = 3 does not divide 8"):
        make_mesh(MeshConfig(model=3))


def test_two_minus_ones_is_an_error():
    with pytest.raises(ValueError, match=r"data=-1 and fsdp=-1: at most one axis may be -1"):
        MeshConfig(data=-1, fsdp=-1)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_axis_size_is_an_error(bad):
    with pytest.raises(ValueError, match=r"mesh axis model=.* must be a positive int, or -1"):
        MeshConfig(model=bad)


def test_multi_slice_mesh_on_cpu_places_slices_in_blocks():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, dcn_data=2))  # 2 slices of 4 devices
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "expert": 1, "model": 1}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)[:, :, 0, 0]
    # Slice 0 (devices 0-3) is the first half of the data axis: only data crosses slices.
    np.testing.assert_array_equal(ids, [[0, 1], [2, 3], [4, 5], [6, 7]])


def test_slices_must_split_the_devices():
    with pytest.raises(ValueError, match=r"8 devices cannot be split into dcn_data=3 × "
                                         r"dcn_fsdp=1 = 3 equal slices"):
        make_mesh(MeshConfig(dcn_data=3))


# --- rules --------------------------------------------------------------------------------

_KERNELS = {
    "embedding": ("vocab", "embed"),
    "query": ("embed", "heads", "kv"),
    "wi": ("embed", "mlp"),
    "wo": ("mlp", "embed"),
    "experts": ("expert", "embed", "expert_mlp"),
}

_EXPECTED = {
    "dp": {"embedding": P(None, None), "query": P(None, None, None), "wi": P(None, None),
           "wo": P(None, None), "experts": P("expert", None, None)},
    "fsdp": {"embedding": P(None, "fsdp"), "query": P("fsdp", None, None),
             "wi": P("fsdp", None), "wo": P(None, "fsdp"),
             "experts": P("expert", "fsdp", None)},
    "tp": {"embedding": P("model", None), "query": P(None, "model", None),
           "wi": P(None, "model"), "wo": P("model", None),
           "experts": P("expert", None, "model")},
    "fsdp_tp": {"embedding": P("model", "fsdp"), "query": P("fsdp", "model", None),
                "wi": P("fsdp", "model"), "wo": P("model", "fsdp"),
                "experts": P("expert", "fsdp", "model")},
}
_EXPECTED["dp_tp"] = _EXPECTED["tp"]


@pytest.mark.parametrize("preset", sorted(rules_lib.PRESETS))
def test_presets_give_the_expected_kernel_specs(preset):
    rules = get_rules(preset)
    for name, axes in _KERNELS.items():
        assert rules_lib.logical_to_mesh_spec(axes, rules) == _EXPECTED[preset][name], name
    batch = rules_lib.logical_to_mesh_spec(("batch", "length", "embed"), rules)
    assert batch == P(("data", "fsdp", "expert"), None, None)


@pytest.mark.parametrize("preset", sorted(rules_lib.PRESETS))
def test_no_mesh_axis_is_used_twice(preset):
    rules = get_rules(preset)
    for n in (2, 3):
        for names in itertools.permutations(rules_lib.LOGICAL_AXES, n):
            spec = rules_lib.logical_to_mesh_spec(names, rules)
            axes = [a for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e)]
            assert len(axes) == len(set(axes)), (names, spec)


def test_taken_axes_are_dropped_from_a_later_dim():
    rules = get_rules("fsdp")
    # MoE dispatch [E, B, D]: the experts take 'expert'; the batch keeps data and fsdp.
    assert rules_lib.logical_to_mesh_spec(("expert", "batch", "embed"), rules) == P(
        "expert", ("data", "fsdp"), None)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown partitioning rules preset 'zero3'; known "
                                         r"presets: dp, dp_tp, fsdp, fsdp_tp, tp"):
        get_rules("zero3")


def test_a_mesh_without_some_standard_axes_treats_them_as_size_1():
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    partitioner = Partitioner(mesh, "fsdp_tp")
    assert partitioner.batch_axes == ("data",) and partitioner.batch_divisor == 4
    assert partitioner.mesh_spec(("embed", "heads", "kv")) == P(None, "model", None)


def test_rules_naming_a_mesh_axis_the_mesh_lacks_are_rejected():
    with pytest.raises(ValueError, match=r"names mesh axis 'modle'"):
        Partitioner(make_mesh(), [("heads", "modle")])


# --- parameters ---------------------------------------------------------------------------


def test_logical_specs_follow_the_pure_dict_structure():
    partitioner = _partitioner("fsdp", data=1, fsdp=-1)
    with partitioner.activate():
        abstract = nnx.eval_shape(_create())
    state = nnx.state(abstract, nnx.Param)
    specs = partitioner.logical_specs(state)
    assert jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(
        nnx.to_pure_dict(state))
    assert specs["query"] == P("embed", "heads", "kv")
    assert specs["norm"] == P() and specs["scale"] == P()
    assert specs["blocks"][1]["kernel"] == P("embed", "mlp")


@pytest.fixture(scope="module")
def fsdp_init():
    partitioner = _partitioner("fsdp", data=1, fsdp=-1)
    graphdef, params, shardings = partitioner.sharded_init(_create())
    return partitioner, graphdef, params, shardings


def test_sharded_init_places_each_param_in_its_sharding(fsdp_init):
    partitioner, graphdef, params, shardings = fsdp_init
    for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
        assert x.sharding.is_equivalent_to(s, x.ndim)
    assert params["wi"].sharding.spec == P("fsdp", None)
    # Each of the 8 devices holds 1/8 of the embed dimension.
    assert {s.data.shape for s in params["wi"].addressable_shards} == {(EMBED // 8, MLP)}
    assert {s.data.shape for s in params["embedding"].addressable_shards} == {
        (VOCAB, EMBED // 8)}
    assert {s.data.shape for s in params["norm"].addressable_shards} == {(EMBED,)}
    # The same values as an unsharded (one-device) compiled init.
    with nnx.use_eager_sharding(False):  # flax 0.12 otherwise wants a mesh for metadata
        reference = jax.jit(lambda: nnx.to_pure_dict(nnx.state(_create()(), nnx.Param)))()
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # graphdef + params rebuild the module.
    with partitioner.activate():
        state = nnx.state(nnx.eval_shape(_create()), nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    assert nnx.merge(graphdef, state).wi[...] is params["wi"]


def test_indivisible_dims_fall_back_with_a_warning(caplog):
    partitioner = _partitioner("tp", data=1, model=-1)  # model=8
    with partitioner.activate():
        state = nnx.state(nnx.eval_shape(_create(heads=4)), nnx.Param)
    with caplog.at_level(logging.WARNING):
        shardings = partitioner.param_shardings(state)
    assert shardings["query"].spec == P(None, None, None)  # 4 heads on model=8
    assert shardings["wi"].spec == P(None, "model")  # mlp=32 divides
    # One warning per kind of misfit: query, out and relpos all have 4 heads.
    assert caplog.text.count("does not divide") == 1
    assert ("dim 'heads' of size 4 does not divide by model=8: replicated, in 3 parameter(s), "
            "e.g. out") in caplog.text
    # Without shapes the specs are the plain mapping.
    plain = partitioner.shardings(partitioner.logical_specs(state))
    assert plain["query"].spec == P(None, "model", None)


def test_batch_axes_keep_the_axes_that_divide(caplog):
    partitioner = _partitioner("dp", data=2, fsdp=4)
    with caplog.at_level(logging.WARNING):
        assert partitioner.mesh_spec(("batch", "length"), (6, 3), name="x") == P("data", None)
    assert ("x dim 'batch' of size 6 does not divide by data=2 × fsdp=4 × expert=1: sharded "
            "over data only") in caplog.text


def test_describe_reports_bytes_per_device(fsdp_init):
    partitioner, _, params, shardings = fsdp_init
    with partitioner.activate():
        state = nnx.state(nnx.eval_shape(_create()), nnx.Param)
    text = partitioner.describe(state, shardings)
    lines = {line.split()[0]: line for line in text.splitlines()}
    wi = lines["wi"]
    assert "(16, 32)" in wi and "float32" in wi and "(embed, mlp)" in wi
    assert "P('fsdp', None)" in wi and wi.endswith(f"{EMBED * MLP * 4 // 8:,}")
    assert lines["norm"].endswith(f"{EMBED * 4:,}") and " - " in lines["norm"]
    assert lines["blocks/1/kernel"].endswith(f"{EMBED * MLP * 4 // 8:,}")
    count = sum(x.size for x in jax.tree.leaves(params))
    device_bytes = sum(s.data.nbytes for x in jax.tree.leaves(params)
                       for s in x.addressable_shards[:1])
    assert f"total: {count:,} parameters, {count * 4:,} bytes" in text
    assert f"per device: {device_bytes:,} bytes" in text


# --- optimizer state ----------------------------------------------------------------------


def test_adamw_state_mirrors_the_params(fsdp_init):
    partitioner, _, params, shardings = fsdp_init
    opt = optax.adamw(1e-3)
    abstract = jax.eval_shape(opt.init, params)
    for kwargs in ({"optimizer": opt}, {}):
        opt_shardings = partitioner.opt_state_shardings(abstract, shardings, **kwargs)
        adam = opt_shardings[0]
        assert adam.mu == shardings and adam.nu == shardings
        assert adam.count.spec == P()
    state = jax.jit(opt.init, out_shardings=opt_shardings)(params)
    assert state[0].mu["wi"].sharding.spec == P("fsdp", None)


def test_adafactor_state_shardings_are_valid_out_shardings(fsdp_init):
    partitioner, _, params, shardings = fsdp_init
    opt = optax.adafactor(1e-3, min_dim_size_to_factor=8)
    abstract = jax.eval_shape(opt.init, params)
    exact = partitioner.opt_state_shardings(abstract, shardings, optimizer=opt,
                                            abstract_params=params)
    # wi [embed=16, mlp=32] factors into v_row [16] (mlp reduced) and v_col [32].
    factored = exact[0]
    assert factored.v_row["wi"].spec == P("fsdp")
    assert factored.v_col["wi"].spec == P(None)
    assert factored.v["wi"].spec == P()  # a (1,) placeholder
    assert factored.v["norm"].spec == P(None)
    for opt_shardings in (exact, partitioner.opt_state_shardings(abstract, shardings)):
        state = jax.jit(opt.init, out_shardings=opt_shardings)(params)
        assert jax.tree.structure(state) == jax.tree.structure(abstract)


# --- batches ------------------------------------------------------------------------------


def test_batch_size_error_names_mesh_and_fix():
    partitioner = _partitioner("fsdp", data=4, fsdp=2)
    assert partitioner.batch_divisor == 8
    partitioner.check_batch_size(16)
    with pytest.raises(ValueError, match=r"batch size 12 is not divisible by the data-parallel "
                                         r"mesh size 8 \(data=4 × fsdp=2\); use a multiple "
                                         r"of 8, e.g. --gin.BATCH_SIZE=16"):
        partitioner.check_batch_size(12)


def test_tp_batch_divisor_excludes_the_model_axis():
    partitioner = _partitioner("dp_tp", data=4, model=2)
    assert partitioner.batch_divisor == 4
    assert partitioner.batch_sharding(3).spec == P(("data", "fsdp", "expert"), None, None)


def test_make_global_batch_round_trips():
    partitioner = _partitioner("dp_tp", data=4, model=2)
    host = {"inputs": np.arange(8 * 5, dtype=np.int32).reshape(8, 5),
            "weights": np.linspace(0, 1, 8, dtype=np.float32)}
    batch = partitioner.make_global_batch(host)
    for key, value in host.items():
        np.testing.assert_array_equal(np.asarray(batch[key]), value)
        assert batch[key].sharding.is_equivalent_to(partitioner.batch_sharding(value.ndim),
                                                    value.ndim)
    assert {s.data.shape for s in batch["inputs"].addressable_shards} == {(2, 5)}
    with pytest.raises(ValueError, match=r"batch size 6 is not divisible"):
        partitioner.make_global_batch({"inputs": np.zeros((6, 5), np.int32)})


def test_data_shard_info():
    assert _partitioner("dp").data_shard_info() == (0, 1)
    assert _partitioner("dp").host_batch_size(16) == 16
    # 4 hosts; hosts 0/1 and 2/3 hold the same rows (a model axis across host pairs).
    rows = {0: {0, 1}, 1: {0, 1}, 2: {2, 3}, 3: {2, 3}}
    assert [shard_of_process(rows, p) for p in range(4)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert shard_of_process({0: {0}, 1: {1}, 2: {2}}, 2) == (2, 3)


# --- activation constraints ---------------------------------------------------------------


def test_with_logical_constraint_under_activate():
    partitioner = _partitioner("fsdp_tp", data=2, fsdp=2, model=2)

    @jax.jit
    def f(x):
        return rules_lib.with_logical_constraint(x * 2, ("batch", "length", "mlp"))

    x = jnp.ones((4, 3, 8))
    assert f(x).sharding.is_fully_replicated  # traced without rules: no constraint
    with partitioner.activate():  # the set mesh is part of jit's cache key: traced anew
        y = f(x)
    assert y.sharding.is_equivalent_to(
        NamedSharding(partitioner.mesh, P(("data", "fsdp"), None, "model")), 3)
    assert rules_lib.with_logical_constraint(x, ("batch", "length", "mlp")) is x
    assert rules_lib.active() is None
    with pytest.raises(ValueError, match=r"do not match rank 3"):
        rules_lib.with_logical_constraint(x, ("batch", "length"))


# --- gin ----------------------------------------------------------------------------------

_GIN_DIR = pathlib.Path(__file__).resolve().parent.parent / "gin" / "partitioning"


@pytest.mark.parametrize("preset", sorted(rules_lib.PRESETS))
def test_gin_presets_build_a_partitioner(preset):
    gin = pytest.importorskip("gin")
    gin.clear_config(clear_constants=True)
    try:
        gin.parse_config_file(str(_GIN_DIR / f"{preset}.gin"))
        assert gin.query_parameter("%RULES") == preset
        config = gin.query_parameter("%MESH_CONFIG").scoped_configurable_fn()
        assert isinstance(config, MeshConfig)
        partitioner = Partitioner(make_mesh(config), gin.query_parameter("%RULES"))
        assert partitioner.mesh.size == 8
    finally:
        gin.clear_config(clear_constants=True)

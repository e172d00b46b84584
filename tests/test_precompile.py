"""Ahead-of-time compilation for a target (t5x_like/precompile.py, --run_mode=precompile).

The per-device byte counts are checked against what the compiled executable itself takes
as arguments (XLA's memory analysis), the fit verdict against a memory limit, and the
TPU path (libtpu's compiler, no TPU) against a sharded step that runs the Pallas flash
kernel, which the compiler cannot partition by itself.
"""

import math

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention
from partitioning import MeshConfig, Partitioner, make_mesh
from t5x_like import gin_utils, main, precompile, train


@pytest.mark.parametrize("name, platform, devices, slices, topology, memory_gib", [
    ("v4-32", "tpu", 16, 1, "v4:2x2x4", 32),
    ("v5p-128", "tpu", 64, 1, "v5p:4x4x4", 95),
    ("v5e-256", "tpu", 256, 1, "v5e:16x16", 16),
    ("v5litepod-16", "tpu", 16, 1, "v5e:4x4", 16),
    ("v6e-8", "tpu", 8, 1, "v6e:2x4", 32),
    ("2xv5e-64", "tpu", 128, 2, "v5e:8x8", 16),
    ("8xH100", "gpu", 8, 1, None, 80),
    ("2x8xH100", "gpu", 16, 2, None, 80),
    ("4xA100-40", "gpu", 4, 1, None, 40),
])
def test_parse_target(name, platform, devices, slices, topology, memory_gib):
    t = precompile.parse_target(name)
    assert (t.platform, t.num_devices, t.num_slices, t.topology) == (
        platform, devices, slices, topology)
    assert t.memory_bytes == memory_gib * precompile.GiB


def test_parse_target_cpu_and_memory_override():
    t = precompile.parse_target("cpu:4", device_memory_gib=2)
    assert (t.platform, t.num_devices, t.memory_bytes) == ("cpu", 4, 2 * precompile.GiB)
    assert precompile.parse_target("cpu-8").memory_bytes is None


@pytest.mark.parametrize("bad, match", [
    ("v5e-48", "not a power of two"),
    ("v4-33", "two per chip"),
    ("v4-4", "smallest"),
    ("8xK80", "unknown precompile target '8xK80'"),
    ("tpu", "unknown precompile target"),
])
def test_bad_targets_name_the_value_and_the_forms(bad, match):
    with pytest.raises(ValueError, match=match):
        precompile.parse_target(bad)


def _quickstart_train_args(clean_gin, *bindings):
    gin_utils.parse_gin(["experiments/quickstart.gin"], ["MODEL_DIR='/tmp/unused'", *bindings],
                        gin_utils.default_search_paths(), finalize=True)
    return gin.get_bindings(train.train)


def _leaf_bytes(tree):
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("rules, mesh", [("dp", {}), ("fsdp", {"data": 1, "fsdp": -1})])
def test_report_matches_the_compiled_step(clean_gin, tmp_path, rules, mesh):
    args = _quickstart_train_args(clean_gin)
    args.update(partitioning_rules=rules, mesh_config=MeshConfig(**mesh), model_dir=tmp_path)
    report = precompile.precompile("cpu:8", **args)
    # The executable's arguments are exactly the state and batch shards of one device.
    assert report.argument_bytes == (report.params_bytes + report.opt_state_bytes
                                     + report.batch_bytes + 4)  # + the int32 step
    assert report.alias_bytes == report.params_bytes + report.opt_state_bytes + 4  # donated
    full = report.parameters * 4  # float32
    if rules == "dp":
        assert report.params_bytes == full
    else:  # every large parameter split 8 ways; small ones (norm scales) may stay whole
        assert full / 8 <= report.params_bytes < full / 4
    assert report.fits is None  # cpu:N has no memory unless given
    assert (tmp_path / "precompile.json").exists() and (tmp_path / "model-info.txt").exists()


def test_a_step_that_does_not_fit_raises_with_numbers_and_advice(clean_gin, tmp_path):
    args = _quickstart_train_args(clean_gin)
    args["model_dir"] = tmp_path
    target = precompile.parse_target("cpu:8", device_memory_gib=0.01)  # 10 MiB
    with pytest.raises(precompile.DoesNotFitError,
                       match=r"does not fit cpu:8: it needs .* MiB per device .*microbatches"):
        precompile.precompile(target, **args)
    assert '"fits": false' in (tmp_path / "precompile.json").read_text()  # report still kept


def test_run_mode_precompile_reports_and_fails_when_too_big(clean_gin, tmp_path, capsys):
    argv = ["--run_mode=precompile", "--gin_file=experiments/quickstart.gin",
            f"--gin.MODEL_DIR={tmp_path}", "--precompile_target=cpu:8"]
    assert main.main([*argv, "--device_memory_gib=4"]) == 0
    out = capsys.readouterr().out
    assert "target: cpu:8 (8 devices)" in out and "-> fits" in out
    gin.clear_config(clear_constants=True)
    assert main.main([*argv, "--device_memory_gib=0.01"]) == 1


def test_run_mode_precompile_needs_a_target(clean_gin, tmp_path):
    with pytest.raises(SystemExit, match="needs --precompile_target"):
        main.main(["--run_mode=precompile", "--gin_file=experiments/quickstart.gin",
                   f"--gin.MODEL_DIR={tmp_path}"])


def test_simulated_target_needs_enough_devices(clean_gin):
    args = _quickstart_train_args(clean_gin)
    with pytest.raises(RuntimeError, match="needs 16 simulated CPU devices, this process has 8"):
        precompile.precompile("cpu:16", **args)


def test_per_device_kernel_equals_the_whole_under_a_mesh():
    """`attention.per_device` (the shard_map a custom kernel runs in) on 8 devices."""
    rng = np.random.default_rng(0)
    b, t, n, h = 8, 16, 4, 8
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32) for _ in range(3))
    ids = jnp.asarray(np.repeat([[0] * 10 + [1] * 6], b, axis=0), jnp.int32)

    def kernel(q, k, v, ab, q_ids, kv_ids):
        assert ab is None
        mask = (q_ids[:, None, :, None] == kv_ids[:, None, None, :])
        return attention.dot_product_attention(q, k, v, mask=mask, scale=0.3)

    whole = kernel(q, k, v, None, ids, ids)
    partitioner = Partitioner(make_mesh(MeshConfig(data=4, model=2)), "dp_tp")
    with partitioner.activate():
        blocks = jax.jit(lambda *a: attention.per_device(
            kernel, (a[0], attention.BTNH), (a[1], attention.BTNH), (a[2], attention.BTNH),
            (None, attention.BNTS), (a[3], attention.BT), (a[3], attention.BT),
            out_axes=attention.BTNH))(q, k, v, ids)
    np.testing.assert_allclose(blocks, whole, rtol=1e-6, atol=1e-6)
    assert blocks.sharding.spec[0] == "data" and blocks.sharding.spec[2] == "model"


needs_libtpu = pytest.mark.skipif(not precompile.have_tpu_compiler(),
                                  reason="libtpu (the TPU compiler) is not installed")


@needs_libtpu
def test_tpu_compile_of_a_sharded_step_with_the_pallas_kernel(clean_gin, tmp_path):
    gin_utils.parse_gin(
        ["experiments/quickstart_llama.gin", "gin/partitioning/dp_tp.gin"],
        [f"MODEL_DIR='{tmp_path}'", "TASK_FEATURE_LENGTHS={'targets': 256}",
         "decoder_only.DecoderOnlyConfig.attention_impl='auto'",
         "decoder_only.DecoderOnlyConfig.dtype='bfloat16'"],
        gin_utils.default_search_paths(), finalize=True)
    args = gin.get_bindings(train.train)
    # conftest asks for float32 matmuls everywhere; Mosaic refuses that for bf16 operands.
    with jax.default_matmul_precision("default"):
        report = precompile.precompile("v5e-8", dump_hlo=True, **args)
    assert report.compiler == "tpu" and report.mesh["model"] == 2 and report.fits
    # TPU buffers are padded to its tiles: the arguments are the shards plus a little.
    shards = report.params_bytes + report.opt_state_bytes + report.batch_bytes + 4
    assert shards <= report.argument_bytes <= 1.001 * shards
    hlo = (tmp_path / "precompile.hlo.txt").read_text()
    assert "tpu_custom_call" in hlo  # the Mosaic flash kernel, inside a shard_map


def test_sharding_plan_prints_every_parameter_for_the_target_mesh(clean_gin, capsys):
    from t5x_like import sharding_plan

    assert sharding_plan.main(["--gin_file=experiments/quickstart.gin",
                               "--gin.MODEL_DIR=/tmp/unused", "--target=cpu:8",
                               "--gin.RULES=fsdp", "--gin.MESH_CONFIG=@mesh.MeshConfig()",
                               "--gin.mesh.MeshConfig.data=1",
                               "--gin.mesh.MeshConfig.fsdp=-1"]) == 0
    out = capsys.readouterr().out
    assert "mesh: {'data': 1, 'fsdp': 8, 'expert': 1, 'model': 1} on cpu:8; rules: fsdp" in out
    assert "'fsdp'" in out and "3,081,984 parameters" in out and "optimizer state" in out


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, "Cloud TPU"),
    ({"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2"}, "SLURM"),
    ({"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1"}, None),
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}, None),  # sbatch script, not inside srun
    ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "8"}, "Open MPI"),
    ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "1"}, None),
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "3"}, "Kubernetes"),
])
def test_cluster_environment_recognises_multi_process_launches(env, expected):
    assert main.cluster_environment(env) == expected

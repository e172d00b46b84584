"""Multi-host for real: two processes x 4 CPU devices joined by `jax.distributed` (a
loopback coordinator, gloo collectives) against one process with 8 devices.

The two-process run reads its data as two host shards; the one-process reference reads
the same two shards side by side (`DatasetConfig.num_data_shards=2`), so both see the
same global batches and must reach the same losses and parameters. Their checkpoint,
written by both processes together, is restored here onto other meshes exactly.
"""

import os
import socket
import subprocess
import sys
from collections import Counter

import gin
import jax
import numpy as np
import pytest
import seqio

from partitioning import MeshConfig
from t5x_like import checkpoints, gin_utils, main, train
from t5x_like import data as data_lib
from t5x_like.metrics_writer import read_metrics
from t5x_like.runtime import Runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
GIN_ARGS = [
    "--gin_file=gin/models/t5_1_1_tiny.gin", "--gin_file=gin/runs/pretrain.gin",
    "--gin.MIXTURE_OR_TASK_NAME=shakespeare_span_corruption_byte",
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 14}",
    f"--gin.TRAIN_STEPS={STEPS}", "--gin.BATCH_SIZE=16", "--gin.NUM_EMBEDDINGS=384",
    "--gin.VOCABULARY_NAME=byte", "--gin.USE_PACKING=False",
    f"--gin.train.train.checkpoint_every={STEPS}", "--gin.train.train.log_every=1",
    "--gin.train.train.eval_every=0", "--gin.train.train.async_checkpointing=False",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


def _train_two_processes(model_dir) -> None:
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "t5x_like.main", *GIN_ARGS, f"--gin.MODEL_DIR={model_dir}",
             f"--coordinator_address=localhost:{port}", "--num_processes=2",
             f"--process_id={i}"],
            cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
    assert "process 1 of 2; 4 local / 8 global devices" in outs[1]


def _model(model_dir):
    gin.clear_config(clear_constants=True)
    _, bindings = main._parse_flags([*GIN_ARGS, f"--gin.MODEL_DIR={model_dir}"])
    gin_utils.parse_gin([a.split("=", 1)[1] for a in GIN_ARGS if a.startswith("--gin_file")],
                        bindings, gin_utils.default_search_paths(), finalize=True)
    model = gin.get_bindings(train.train)["model"]
    gin.clear_config(clear_constants=True)
    return model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    two = tmp_path_factory.mktemp("two_processes")
    one = tmp_path_factory.mktemp("one_process")
    _train_two_processes(two)
    gin.clear_config(clear_constants=True)
    main.main([*GIN_ARGS, f"--gin.MODEL_DIR={one}",
               "--gin_bindings=train/input_pipeline.DatasetConfig.num_data_shards = 2"])
    gin.clear_config(clear_constants=True)
    return two, one


def _losses(model_dir):
    rows = [r for r in read_metrics(model_dir) if r["split"] == "train"]
    return [r["step"] for r in rows], np.array([r["loss"] for r in rows])


def test_two_processes_reach_the_losses_of_one(runs):
    two, one = runs
    steps_two, loss_two = _losses(two)
    steps_one, loss_one = _losses(one)
    assert steps_two == steps_one == list(range(1, STEPS + 1))  # process 0 alone logs
    np.testing.assert_allclose(loss_two, loss_one, rtol=2e-6)
    assert loss_two[-1] < loss_two[0]


def test_two_processes_reach_the_parameters_of_one_and_restore_onto_any_mesh(runs):
    two, one = runs
    model = _model(two)
    saved = checkpoints.Checkpointer(two / "checkpoints").all_steps()
    assert saved == [STEPS]
    restored = {}
    for name, mesh, rules in [("dp", MeshConfig(), "dp"),
                              ("fsdp_tp", MeshConfig(data=1, fsdp=4, model=2), "fsdp_tp"),
                              ("one device", MeshConfig(), "dp")]:
        devices = jax.devices()[:1] if name == "one device" else None
        runtime = Runtime.build(model, mesh_config=mesh, rules=rules, devices=devices)
        restored[name] = jax.device_get(runtime.restore_params(two / "checkpoints"))
    reference = jax.device_get(Runtime.build(model).restore_params(one / "checkpoints"))
    for params in restored.values():
        jax.tree.map(np.testing.assert_array_equal, params, restored["dp"])  # exact
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     params, reference)


def test_host_shards_are_disjoint_and_cover_what_one_host_reads():
    def rows(shard_id, num_shards):
        ds = data_lib.get_dataset(
            "shakespeare_lm_byte", {"targets": 64}, split="validation", batch_size=1,
            shuffle=False, seed=0, feature_converter=seqio.DecoderFeatureConverter(pack=False),
            shard_id=shard_id, num_shards=num_shards, num_epochs=1, drop_remainder=False)
        return Counter(tuple(ex["decoder_target_tokens"].ravel())
                       for ex in ds.as_numpy_iterator())

    whole = rows(0, 1)
    halves = [rows(0, 2), rows(1, 2)]
    n = sum(whole.values())
    assert n > 10 and all(0.4 * n <= sum(h.values()) <= 0.6 * n for h in halves)
    # As multisets (the text repeats some lines): an example read by both hosts would
    # count twice, one read by neither would be missing.
    assert halves[0] + halves[1] == whole

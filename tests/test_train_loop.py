"""The loop end to end on the shipped corpus: resume equals uninterrupted, restore onto
another mesh, metrics / model-info / config files, and the CLI's errors."""

import functools
import json

import gin
import jax
import numpy as np
import pytest

from models import encoder_decoder
from partitioning import mesh as mesh_lib
from t5x_like import checkpoints, input_pipeline, main, model_api, optimizers, plot, train
from t5x_like.data import vocabularies
from t5x_like.metrics_writer import read_metrics
from t5x_like.runtime import Runtime
from t5x_like.trainer import Trainer

TASK = "shakespeare_span_corruption_byte"
LENGTHS = {"inputs": 64, "targets": 14}  # random_spans_helper(64) gives targets 14


def _model():
    config = encoder_decoder.t5_1_1("tiny", vocab_size=384)
    return model_api.EncoderDecoderModel(config, vocabularies.get_vocabulary("byte"))


def _train(model_dir, total_steps, **kw):
    kw.setdefault("mesh_config", mesh_lib.MeshConfig(data=8))
    return train.train(
        model=_model(),
        train_dataset_cfg=input_pipeline.DatasetConfig(TASK, LENGTHS, batch_size=8, seed=3,
                                                       use_packing=False),
        optimizer=optimizers.build_optimizer(optimizers.adafactor(), grad_clip_norm=1.0),
        model_dir=str(model_dir),
        total_steps=total_steps,
        log_every=1,
        checkpoint_every=3,
        **kw,
    )


@functools.cache
def _uninterrupted(tmp_root):
    model_dir = tmp_root / "uninterrupted"
    state = _train(model_dir, 6)
    return model_dir, jax.device_get(state.params)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return _uninterrupted(tmp_path_factory.mktemp("loop"))


def test_resumed_run_equals_uninterrupted_run(uninterrupted, tmp_path):
    ref_dir, ref_params = uninterrupted
    _train(tmp_path, 6, stop_after_steps=3)  # "killed" after the step-3 checkpoint
    assert checkpoints.Checkpointer(tmp_path / "checkpoints").all_steps() == [3]
    state = _train(tmp_path, 6)  # same command again: resumes at step 3
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), ref_params)
    ref = {r["step"]: r["loss"] for r in read_metrics(ref_dir) if r["split"] == "train"}
    got = {r["step"]: r["loss"] for r in read_metrics(tmp_path) if r["split"] == "train"}
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):  # the same batches, in the same order, after the resume
        assert got[step] == ref[step]


def test_run_leaves_config_model_info_and_metrics(uninterrupted):
    model_dir, _ = uninterrupted
    info = (model_dir / "model-info.txt").read_text()
    assert "encoder" in info and "bytes" in info.lower()
    records = read_metrics(model_dir)
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "accuracy", "z_loss", "grad_norm", "learning_rate"):
        assert all(np.isfinite(r[key]) for r in records if r["split"] == "train")
    assert any("tokens_per_sec" in r for r in records)
    assert list((model_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert checkpoints.Checkpointer(model_dir / "checkpoints").all_steps() == [3, 6]
    png = plot.plot(str(model_dir), str(model_dir / "curves.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    both = plot.plot([model_dir, model_dir], str(model_dir / "both.png"), labels=["a", "b"])
    assert both.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="needs --out"):
        plot.plot([model_dir, model_dir])
    late = plot.plot(str(model_dir), str(model_dir / "late.png"), from_step=4)
    assert late.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no records at or after step 7; lower --from_step"):
        plot.plot(str(model_dir), str(model_dir / "none.png"), from_step=7)


def test_checkpoint_restores_onto_a_different_mesh_exactly(uninterrupted):
    model_dir, ref_params = uninterrupted
    runtime = Runtime.build(_model(), mesh_config=mesh_lib.MeshConfig(fsdp=4, model=2),
                            rules="fsdp_tp")
    trainer = Trainer(runtime, optimizers.build_optimizer(optimizers.adafactor()))
    ckpt = checkpoints.Checkpointer(model_dir / "checkpoints")
    state, data_state = ckpt.restore(None, trainer.abstract_state())
    ckpt.close()
    assert int(state.step) == 6 and data_state["position"] == 6
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), ref_params)
    shardings = jax.tree.leaves(trainer.state_shardings.params)
    assert all(a.sharding == s for a, s in zip(jax.tree.leaves(state.params), shardings))
    assert any("model" in str(s.spec) for s in shardings)


def test_corrupt_latest_checkpoint_stops_resume_with_clear_error(uninterrupted, tmp_path,
                                                               settle_stray_callbacks):
    import shutil

    model_dir, _ = uninterrupted
    shutil.copytree(model_dir / "checkpoints", tmp_path / "checkpoints")
    for f in (tmp_path / "checkpoints" / "6" / "state").rglob("*"):
        if f.is_file() and "metadata" not in f.name.lower():
            f.write_bytes(b"\0garbage")
    with pytest.raises(checkpoints.CheckpointError, match=r"step 6 .*Nothing was deleted.*\[3\]"):
        _train(tmp_path, 9)
    assert (tmp_path / "checkpoints" / "6").is_dir() and (tmp_path / "checkpoints" / "3").is_dir()


def test_cli_names_a_missing_required_macro(clean_gin):
    with pytest.raises(ValueError, match=r"required gin macro\(s\) not set: MODEL_DIR"):
        main.main(["--gin_file=experiments/quickstart.gin"])


def test_cli_rejects_a_mesh_that_does_not_fit(clean_gin, tmp_path):
    with pytest.raises(ValueError, match=r"does not fit the 8 available devices"):
        main.main(["--gin_file=experiments/quickstart.gin", f"--gin.MODEL_DIR={tmp_path}",
                   "--gin_file=gin/partitioning/dp_tp.gin", "--gin.MESH_DATA=3",
                   "--gin.MESH_MODEL=2"])


def test_cli_rejects_an_indivisible_batch(clean_gin, tmp_path):
    with pytest.raises(ValueError, match=r"batch size 12 is not divisible by .*8"):
        main.main(["--gin_file=experiments/quickstart.gin", f"--gin.MODEL_DIR={tmp_path}",
                   "--gin.BATCH_SIZE=12"])


def test_cli_rejects_an_unknown_binding(clean_gin, tmp_path):
    with pytest.raises(ValueError, match=r"unknown gin binding 'train\.trian'"):
        main.main(["--gin_file=experiments/quickstart.gin", f"--gin.MODEL_DIR={tmp_path}",
                   "--gin.train.trian.seed=3"])


def test_cli_rejects_an_unknown_task(clean_gin, tmp_path):
    with pytest.raises(ValueError,
                       match=r"shakespeare_span_corruptoin.*shakespeare_span_corruption"):
        main.main(["--gin_file=experiments/quickstart.gin", f"--gin.MODEL_DIR={tmp_path}",
                   "--gin.MIXTURE_OR_TASK_NAME=shakespeare_span_corruptoin"])


def test_quickstart_loss_falls_then_eval_and_infer(clean_gin, tmp_path):
    """A shortened quickstart through the CLI (the full one is in the README)."""
    model_dir = tmp_path / "qs"
    main.main(["--gin_file=experiments/quickstart.gin", f"--gin.MODEL_DIR={model_dir}",
               "--gin.TRAIN_STEPS=80", "--gin.BATCH_SIZE=16", "--gin.train.train.log_every=10",
               "--gin.train.train.checkpoint_every=40", "--gin.train.train.eval_every=80",
               "--gin.train.train.sample_every=80"])
    train_losses = [r["loss"] for r in read_metrics(model_dir) if r["split"] == "train"]
    assert train_losses[0] > 8.0  # about ln(8192) = 9.0 at the start
    assert train_losses[-1] < 0.7 * train_losses[0], train_losses
    assert (model_dir / "config.gin").read_text().count("train.train") > 0
    gin.clear_config(clear_constants=True)
    main.main(["--run_mode=infer", "--gin_file=experiments/quickstart_infer.gin",
               f"--gin.CHECKPOINT_PATH={model_dir}/checkpoints",
               f"--gin.INFER_OUTPUT_DIR={tmp_path}/infer", "--gin.MAX_BATCHES=1"])
    lines = (tmp_path / "infer" / "shakespeare_span_corruption-validation.jsonl").read_text()
    records = [json.loads(x) for x in lines.splitlines()]
    assert len(records) == 16 and all({"input", "prediction", "target"} <= set(r) for r in records)
    assert all(r["target"].startswith("<extra_id_0>") for r in records)
    gin.clear_config(clear_constants=True)
    main.main(["--run_mode=eval", "--gin_file=experiments/quickstart_eval.gin",
               f"--gin.CHECKPOINT_PATH={model_dir}/checkpoints", f"--gin.MODEL_DIR={model_dir}",
               "--gin.NUM_EXAMPLES=16"])
    metrics = json.loads((model_dir / "eval_metrics.json").read_text())
    task = metrics["shakespeare_span_corruption"]
    assert {"sequence_accuracy", "token_accuracy"} <= set(task)
    assert 0.0 <= task["token_accuracy"] <= 100.0

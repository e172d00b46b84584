"""The decoder-only and encoder-only quickstarts through the CLI, shortened.

The full runs and their figures are in the README; here each trains a few dozen steps
with its real gin file and data, and the loss must fall. Then: decoder-only infer
(continuations of held-out text), BERT masked LM -> fine-tuned play classifier ->
`--run_mode=eval` accuracy.
"""

import json

import gin
import pytest

from t5x_like import main
from t5x_like.metrics_writer import read_metrics

pytestmark = pytest.mark.usefixtures("clean_gin")  # see conftest.py

SHORT = ["--gin.BATCH_SIZE=16", "--gin.train.train.log_every=10",
         "--gin.optimizers.warmup_cosine.warmup_steps=10",
         "--gin.train.train.eval_every=0", "--gin.train.train.sample_every=0"]


def _train_losses(model_dir):
    return [r["loss"] for r in read_metrics(model_dir) if r["split"] == "train"]


def test_llama_quickstart_learns_then_continues_held_out_text(tmp_path):
    model_dir = tmp_path / "llama"
    main.main(["--gin_file=experiments/quickstart_llama.gin", f"--gin.MODEL_DIR={model_dir}",
               "--gin.TRAIN_STEPS=40", "--gin.train.train.checkpoint_every=40",
               "--gin.TASK_FEATURE_LENGTHS={'targets': 64}", *SHORT])
    losses = _train_losses(model_dir)
    assert losses[0] > 8.0 and losses[-1] < 0.8 * losses[0], losses
    gin.clear_config(clear_constants=True)
    main.main(["--run_mode=infer", "--gin_file=gin/models/llama_tiny.gin",
               "--gin_file=gin/runs/infer.gin", "--gin.NUM_EMBEDDINGS=8192",
               "--gin.MIXTURE_OR_TASK_NAME=shakespeare_lm",
               "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.PROMPT_LENGTH=8",
               f"--gin.CHECKPOINT_PATH={model_dir}/checkpoints",
               f"--gin.INFER_OUTPUT_DIR={tmp_path}/infer", "--gin.MAX_BATCHES=1",
               "--gin.BATCH_SIZE=8"])
    lines = (tmp_path / "infer" / "shakespeare_lm-validation.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert len(records) == 8 and all(r["prediction"] for r in records)


def test_bert_mlm_then_play_classifier_fine_tuning_and_eval(tmp_path):
    mlm_dir, cls_dir = tmp_path / "bert", tmp_path / "cls"
    main.main(["--gin_file=experiments/quickstart_bert.gin", f"--gin.MODEL_DIR={mlm_dir}",
               "--gin.TRAIN_STEPS=30", "--gin.train.train.checkpoint_every=30",
               "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 64}", *SHORT])
    losses = _train_losses(mlm_dir)
    assert losses[0] > 8.0 and losses[-1] < 0.9 * losses[0], losses
    gin.clear_config(clear_constants=True)
    main.main(["--gin_file=experiments/quickstart_bert_classifier.gin",
               f"--gin.MODEL_DIR={cls_dir}", f"--gin.INIT_CHECKPOINT={mlm_dir}/checkpoints",
               "--gin.TRAIN_STEPS=20", "--gin.train.train.checkpoint_every=20",
               "--gin.TASK_FEATURE_LENGTHS={'inputs': 32}", *SHORT])
    losses = _train_losses(cls_dir)
    assert 1.0 < losses[0] < 3.0  # about ln(6) = 1.8 for a fresh head
    gin.clear_config(clear_constants=True)
    main.main(["--run_mode=eval", "--gin_file=gin/models/bert_tiny.gin",
               "--gin_file=gin/runs/eval.gin", "--gin.NUM_EMBEDDINGS=8192",
               "--gin.MODEL=@model_api.SequenceClassificationModel()", "--gin.NUM_CLASSES=6",
               "--gin.MLM_HEAD=False",
               "--gin.MIXTURE_OR_TASK_NAME=shakespeare_play_classification",
               "--gin.TASK_FEATURE_LENGTHS={'inputs': 32}", "--gin.NUM_EXAMPLES=40",
               f"--gin.CHECKPOINT_PATH={cls_dir}/checkpoints", f"--gin.MODEL_DIR={cls_dir}"])
    metrics = json.loads((cls_dir / "eval_metrics.json").read_text())
    task = metrics["shakespeare_play_classification"]
    assert task["num_examples"] == 40 and 0.0 <= task["accuracy"] <= 100.0


def test_dense_llama_upcycled_into_the_mixtral_quickstart_on_an_expert_mesh(tmp_path):
    dense_dir, moe_dir = tmp_path / "llama", tmp_path / "mixtral"
    main.main(["--gin_file=experiments/quickstart_llama.gin", f"--gin.MODEL_DIR={dense_dir}",
               "--gin.TRAIN_STEPS=30", "--gin.train.train.checkpoint_every=30",
               "--gin.TASK_FEATURE_LENGTHS={'targets': 64}", *SHORT])
    dense_losses = _train_losses(dense_dir)
    gin.clear_config(clear_constants=True)
    # Sparse upcycling: every expert starts as its layer's dense MLP (so experts as wide
    # as llama_tiny's MLP, not mixtral_tiny's half width), on 2 expert shards.
    main.main(["--gin_file=experiments/quickstart_mixtral.gin",
               "--gin_file=gin/partitioning/ep.gin", f"--gin.MODEL_DIR={moe_dir}",
               "--gin.decoder_only.DecoderOnlyConfig.mlp_dim=768",
               f"--gin.train.train.init_checkpoint='{dense_dir}/checkpoints'",
               "--gin.train.train.upcycle=True", "--gin.TRAIN_STEPS=10",
               "--gin.train.train.checkpoint_every=10",
               "--gin.TASK_FEATURE_LENGTHS={'targets': 64}", *SHORT,
               "--gin.optimizers.warmup_cosine.warmup_steps=2"])
    records = [r for r in read_metrics(moe_dir) if r["split"] == "train"]
    # It starts where the dense model ended, not from a fresh 9.0.
    assert records[0]["cross_entropy"] < dense_losses[0] * 0.8, (records[0], dense_losses)
    for layer in range(4):
        loads = [records[-1][f"moe/layers_{layer}/expert_load/{e}"] for e in range(8)]
        assert abs(sum(loads) - 1.0) < 1e-4
        assert records[-1][f"moe/layers_{layer}/dropped_fraction"] == 0.0  # dropless
    assert records[-1]["moe_aux_loss"] > 0
    info = (moe_dir / "model-info.txt").read_text()
    assert "'expert': 2" in info

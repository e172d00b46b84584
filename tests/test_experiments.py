"""The real-scale experiments (experiments/*.gin with a PRECOMPILE_TARGET), the C4
vocabulary they read, and the launch scripts.

Each experiment is parsed as `python -m t5x_like.main --gin_file=experiments/X.gin
--gin.MODEL_DIR=...` parses it; then `train.train`'s arguments must all resolve (no
REQUIRED left), the network must have the published parameter count of its model at the
experiment's vocabulary rows (counted under `nnx.eval_shape`, nothing allocated) and the
mesh must use exactly the devices of the target it names. Nothing is compiled and nothing
reads GCS: conftest.py points the C4 vocabulary at the shipped SentencePiece model.
"""

import inspect
import os
import pathlib
import re
import subprocess

import gin
import jax
import pytest
import seqio
import tensorflow as tf
from flax import nnx
from sentencepiece import sentencepiece_model_pb2
from test_decoder_only import PUBLISHED as DECODER_ONLY_PUBLISHED
from test_encoder_decoder import PUBLISHED as T5_PUBLISHED
from test_encoder_only import HF_COUNTS as BERT_HF_COUNTS

from partitioning import mesh as mesh_lib
from t5x_like import gin_utils, train
from t5x_like.data import tasks, vocabularies

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "scripts" / "launch"
ALL_EXPERIMENTS = sorted(p.name for p in (ROOT / "experiments").glob("*.gin"))
# Experiments sized for this repository's CPU machines; every other one names its target.
CPU_SIZED = ("quickstart", "speculative_")
REAL = sorted(n for n in ALL_EXPERIMENTS
              if "PRECOMPILE_TARGET" in (ROOT / "experiments" / n).read_text())

# experiment: (published parameters, at this many vocabulary rows, parameters per row).
# Published counts are the ones the family tests assert; a row adds the embedding width
# (tied output) or, for BERT, the width plus the MLM output bias.
PUBLISHED = {
    "t5_1_1_base_c4.gin": (T5_PUBLISHED["base"][-1], 32128, 2 * 768),
    "t5_1_1_xl_c4.gin": (T5_PUBLISHED["xl"][-1], 32128, 2 * 2048),
    "gpt2_medium_c4.gin": (DECODER_ONLY_PUBLISHED["gpt2_medium"], 50257, 1024),
    "llama_1b_c4.gin": (DECODER_ONLY_PUBLISHED["llama_1b"], 128256, 2048),
    "bert_base_c4_mlm.gin": (BERT_HF_COUNTS["bert_base"][3], 30522, 768 + 1),
    # HF SwitchTransformersForConditionalGeneration at google/switch-base-8's shape
    # (tests/test_moe.py); tied logits, so one table.
    "switch_base_8_c4.gin": (619_339_008, 32128, 768),
}

pytestmark = pytest.mark.usefixtures("clean_gin")  # see conftest.py


def target_devices(target: str) -> tuple[int, int]:
    """(accelerators JAX sees, slices / nodes) of a precompile target name.

    TPU names count TensorCores: a v4 or v5p chip has two (one JAX device, megacore), a
    v5e / v6e chip one. GPU names are [NODESx]GPUSxMODEL.
    """
    tpu = re.fullmatch(r"v(4|5p|5e|6e)-(\d+)", target)
    if tpu:
        cores = int(tpu[2])
        return (cores // 2 if tpu[1] in ("4", "5p") else cores), 1
    gpu = re.fullmatch(r"(?:(\d+)x)?(\d+)x([AHB]\d+)", target)
    if gpu:
        nodes = int(gpu[1] or 1)
        return nodes * int(gpu[2]), nodes
    raise ValueError(f"unknown precompile target {target!r}")


def test_target_names():
    assert target_devices("v4-32") == (16, 1)
    assert target_devices("v5p-128") == (64, 1)
    assert target_devices("v5e-64") == (64, 1)
    assert target_devices("8xH100") == (8, 1)
    assert target_devices("2x8xH100") == (16, 2)


def test_every_large_experiment_names_its_target():
    assert set(PUBLISHED) <= set(REAL), "the six scale-out experiments exist"
    untargeted = [n for n in ALL_EXPERIMENTS if not n.startswith(CPU_SIZED) and n not in REAL]
    assert not untargeted, f"declare PRECOMPILE_TARGET = '<target>' in {untargeted}"


def _parse_like_main(experiment: str) -> None:
    """What main.py does with `--gin_file=experiments/X --gin.MODEL_DIR=/tmp/x`."""
    _, bindings = gin_utils.rewrite_argv(["--gin.MODEL_DIR=/tmp/t5x_like_unused"])
    gin_utils.parse_gin([f"experiments/{experiment}"], bindings, finalize=False)
    gin.get_configurable(train.train)
    gin.finalize()


def _macro(name: str):
    return gin.query_parameter(f"%{name}")


def _count_params(model) -> int:
    abstract = nnx.eval_shape(lambda: model.make_network(nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


@pytest.mark.parametrize("experiment", REAL)
def test_experiment_is_complete_and_fits_its_target(experiment):
    _parse_like_main(experiment)
    target = _macro("PRECOMPILE_TARGET")
    header = (ROOT / "experiments" / experiment).read_text().split("\ninclude ")[0]
    assert f"--gin_file=experiments/{experiment}" in header
    assert "--run_mode=precompile" in header and f"--precompile_target={target}" in header

    # Every train.train argument resolves; those without a default are all bound.
    args = gin.get_bindings(train.train)
    needed = [name for name, p in inspect.signature(train.train).parameters.items()
              if p.default is inspect.Parameter.empty]
    assert set(needed) <= set(args), set(needed) - set(args)
    assert args["model_dir"] == "/tmp/t5x_like_unused"
    assert float(args["optimizer"].schedule(args["total_steps"] // 2)) > 0

    # The model: bf16 activations, vocabulary rows for T5's C4 vocabulary (a multiple of
    # 128), the task's own vocabulary, and the published size at those rows.
    model = args["model"]
    config = model.config
    assert config.dtype == "bfloat16" and config.param_dtype == "float32"
    assert config.vocab_size % 128 == 0
    assert config.vocab_size >= vocabularies.C4_T5_VOCAB_SIZE
    for cfg in (args["train_dataset_cfg"], args["eval_dataset_cfg"]):
        task = seqio.get_mixture_or_task(cfg.mixture_or_task_name)
        assert cfg.mixture_or_task_name.startswith("c4_")
        for feature in task.output_features.values():
            assert feature.vocabulary is model.output_vocabulary
    published, rows, per_row = PUBLISHED[experiment]
    assert _count_params(model) == published + (config.vocab_size - rows) * per_row

    # The mesh: explicit sizes whose product is the target's device count, one granule
    # per slice / node, and a batch that splits evenly over the batch axes.
    devices, slices = target_devices(target)
    mesh_config = args["mesh_config"]
    assert -1 not in [getattr(mesh_config, a) for a in mesh_lib.MESH_AXES]
    sizes = mesh_config.resolve(devices)
    assert sizes["data"] * sizes["fsdp"] * sizes["expert"] * sizes["model"] == devices
    assert mesh_config.num_slices == slices
    batch_shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    micro = args.get("num_microbatches", 1)
    batch = args["train_dataset_cfg"].batch_size
    assert batch % (micro * batch_shards) == 0, (batch, micro, batch_shards)
    assert args["eval_dataset_cfg"].batch_size % batch_shards == 0
    if config.moe is not None:
        assert config.moe.num_experts % sizes["expert"] == 0 and sizes["expert"] > 1


# ------------------------------------------------------------------ the C4 vocabulary

C4_TASKS = ("c4_span_corruption", "c4_v220_span_corruption", "c4_lm", "c4_prefix_lm",
            "c4_mlm")


def _c4_vocabularies() -> list[seqio.Vocabulary]:
    return [f.vocabulary for name in C4_TASKS
            for f in seqio.get_mixture_or_task(name).output_features.values()]


def test_c4_tasks_carry_t5s_c4_vocabulary_without_reading_it(monkeypatch):
    # In tests the C4 vocabulary is the shipped model (conftest.py) ...
    assert vocabularies.c4_t5_spm_path() == os.environ[vocabularies.C4_T5_SPM_PATH_ENV]
    assert all(v is vocabularies.get_vocabulary("t5_c4_spm") for v in _c4_vocabularies())
    # ... and without the override it is T5's file on GCS, whose size is known unread.
    monkeypatch.delenv(vocabularies.C4_T5_SPM_PATH_ENV)
    try:
        tasks.register_tasks()
        for v in _c4_vocabularies():
            assert isinstance(v, vocabularies.T5SentencePieceVocabulary)
            assert v.sentencepiece_model_file == vocabularies.C4_T5_SPM_PATH == (
                "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model")
            assert (v.vocab_size, v.extra_ids) == (32100, 100)
            assert str(v).startswith("T5SentencePieceVocabulary(file=gs://")
            assert v._model is None  # seqio's lazily loaded model: never read
        shakespeare = seqio.get_mixture_or_task("shakespeare_span_corruption")
        assert shakespeare.output_features["targets"].vocabulary.vocab_size == 8100
    finally:
        monkeypatch.undo()
        tasks.register_tasks()
    assert _c4_vocabularies()[0].sentencepiece_model_file == vocabularies.c4_t5_spm_path()


def _with_built_in_sentinels(path: pathlib.Path, n: int = 100) -> str:
    """The shipped model with `n` sentinels as its last pieces, as T5's .100extra file."""
    model = sentencepiece_model_pb2.ModelProto.FromString(
        pathlib.Path(vocabularies.SHAKESPEARE_SPM_PATH).read_bytes())
    for i in reversed(range(n)):
        model.pieces.add(piece=f"\u2581<extra_id_{i}>", score=0.0,
                         type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED)
    path.write_bytes(model.SerializeToString())
    return str(path)


def test_t5_vocabulary_takes_either_file_form(tmp_path):
    reference = seqio.SentencePieceVocabulary(vocabularies.SHAKESPEARE_SPM_PATH, extra_ids=100)
    text = "Thou art more lovely and more temperate"
    built_in = _with_built_in_sentinels(tmp_path / "100extra.model")
    for path in (vocabularies.SHAKESPEARE_SPM_PATH, built_in):
        vocab = vocabularies.T5SentencePieceVocabulary(path)
        assert vocab._model is None
        assert vocab.encode(text) == reference.encode(text)
        assert (vocab.vocab_size, vocab.extra_ids) == (8100, 100)
        assert vocab.tokenizer.id_to_piece(8099).endswith("<extra_id_0>")
        assert vocab.tokenizer.id_to_piece(8000).endswith("<extra_id_99>")
    with pytest.raises(ValueError, match=r"gives 8100 ids with its 100 sentinels, not the "
                                         r"32100 expected; point \$T5X_LIKE_C4_SPM_PATH"):
        vocabularies.T5SentencePieceVocabulary(built_in, vocab_size=32100).encode(text)


def test_t5_vocabulary_file_is_not_read_when_built(monkeypatch):
    def no_reads(*args, **kwargs):
        raise AssertionError(f"read {args}")

    monkeypatch.setattr(tf.io.gfile, "GFile", no_reads)
    vocab = vocabularies.T5SentencePieceVocabulary(
        vocabularies.C4_T5_SPM_PATH, vocab_size=vocabularies.C4_T5_VOCAB_SIZE)
    assert (vocab.vocab_size, vocab.extra_ids) == (32100, 100)
    assert "cc_all.32000.100extra" in str(vocab)
    assert vocab._model is None


# ------------------------------------------------------------------ launch scripts

SCRIPTS = ("tpu_vm.sh", "slurm.sbatch")


@pytest.mark.parametrize("script", SCRIPTS)
def test_launch_script_is_valid_bash_with_usage(script):
    path = LAUNCH / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert os.access(path, os.X_OK)
    assert "Usage:" in path.read_text().split("\nset -")[0]


def test_tpu_vm_script_dry_run():
    def run(*args):
        out = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), *args], check=True,
                             capture_output=True, text=True, env={**os.environ, "DRY_RUN": "1"})
        return out.stdout

    assert "Usage:" in run("--help")
    create = run("create", "my-tpu", "us-central2-b", "v4-32", "tpu-ubuntu2204-base")
    assert "gcloud compute tpus tpu-vm create my-tpu" in create
    assert "--accelerator-type=v4-32" in create and "--version=tpu-ubuntu2204-base" in create
    train_cmd = run("run", "my-tpu", "us-central2-b", "experiments/t5_1_1_base_c4.gin",
                    "gs://b/run", "--gin.TRAIN_STEPS=10")
    assert "--worker=all" in train_cmd
    assert "-m t5x_like.main --gin_file=experiments/t5_1_1_base_c4.gin" in train_cmd
    assert "--gin.MODEL_DIR=gs://b/run" in train_cmd and "--gin.TRAIN_STEPS=10" in train_cmd
    assert "gcloud compute tpus tpu-vm delete my-tpu" in run("delete", "my-tpu", "us-central2-b")


def test_slurm_script_dry_run():
    env = {**os.environ, "DRY_RUN": "1", "SLURM_NNODES": "2", "SLURM_JOB_ID": "7",
           "HEAD_NODE": "gpu-node-01", "SLURM_SUBMIT_DIR": str(ROOT)}
    out = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "experiments/llama_1b_c4.gin",
                          "/shared/llama", "--gin.TRAIN_STEPS=10"], check=True,
                         capture_output=True, text=True, env=env).stdout
    assert "srun" in out and "--ntasks-per-node=1" in out
    assert "--coordinator_address=gpu-node-01:" in out and "--num_processes=2" in out
    assert "--gin_file=experiments/llama_1b_c4.gin" in out
    assert "--gin.MODEL_DIR=/shared/llama" in out and "--gin.TRAIN_STEPS=10" in out

"""Every shipped gin file parses and builds what it configures (no weights allocated)."""

import pathlib

import gin
import jax
import pytest
import seqio
from flax import nnx

from models import decoder_only, encoder_decoder, encoder_only
from partitioning import mesh as mesh_lib
from t5x_like import evaluate, gin_utils, infer, train

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL_GINS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "gin/models").glob("*.gin"))
PARTITIONING_GINS = sorted(
    p.relative_to(ROOT).as_posix() for p in (ROOT / "gin/partitioning").glob("*.gin"))
EXPERIMENTS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "experiments").glob("*.gin"))
# Model gin name prefix -> the network config class it must build.
FAMILY = {"t5_1_1": encoder_decoder.T5Config, "switch": encoder_decoder.T5Config,
          "gpt2": decoder_only.DecoderOnlyConfig, "llama": decoder_only.DecoderOnlyConfig,
          "mixtral": decoder_only.DecoderOnlyConfig, "bert": encoder_only.EncoderOnlyConfig}


def _family(model_gin: str) -> type:
    stem = pathlib.Path(model_gin).stem
    matches = [cls for prefix, cls in FAMILY.items() if stem.startswith(prefix + "_")]
    assert len(matches) == 1, f"{model_gin}: name it <family>_<size>.gin, family in {FAMILY}"
    return matches[0]
RUN_FN = {"pretrain": train.train, "finetune": train.train, "eval": evaluate.evaluate,
          "infer": infer.infer}
REQUIRED = [
    "MODEL_DIR='/tmp/unused'", "MIXTURE_OR_TASK_NAME='shakespeare_span_corruption'",
    "TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 14}", "TRAIN_STEPS=10", "BATCH_SIZE=8",
    "CHECKPOINT_PATH='/tmp/unused'", "INFER_OUTPUT_DIR='/tmp/unused'",
    "INIT_CHECKPOINT='/tmp/unused'",
]


pytestmark = pytest.mark.usefixtures("clean_gin")  # see conftest.py


def _build(macro):
    return gin.query_parameter(f"%{macro}").scoped_configurable_fn()


def _parse(files, extra=()):
    gin_utils.parse_gin(files, [b for b in REQUIRED] + list(extra), finalize=False)


def test_every_gin_directory_is_covered():
    assert len(MODEL_GINS) >= 6 and len(PARTITIONING_GINS) >= 5
    for model_gin in MODEL_GINS:
        _family(model_gin)
    assert "experiments/quickstart.gin" in EXPERIMENTS


@pytest.mark.parametrize("run", sorted(RUN_FN))
@pytest.mark.parametrize("model_gin", MODEL_GINS)
def test_model_and_run_gins_build(model_gin, run):
    _parse([model_gin, f"gin/runs/{run}.gin"], ["NUM_EMBEDDINGS=8192"])
    model = _build("MODEL")
    assert isinstance(model.config, _family(model_gin))
    assert model.config.vocab_size == 8192
    gin.get_configurable(RUN_FN[run])  # the run function is configured
    if run in ("pretrain", "finetune"):
        opt = _build("OPTIMIZER")
        assert float(opt.schedule(100)) > 0
    # The network builds abstractly, without allocating weights (the published counts of
    # every size are checked in each family's tests; here the small ones suffice).
    if "tiny" in model_gin or "small" in model_gin:
        abstract = nnx.eval_shape(lambda: model.make_network(nnx.Rngs(0)))
        n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
        assert n > 8192 * model.config.emb_dim  # the embedding table plus the layers


@pytest.mark.parametrize("part_gin", PARTITIONING_GINS)
def test_partitioning_gins_build_a_mesh(part_gin):
    _parse(["gin/models/t5_1_1_tiny.gin", "gin/runs/pretrain.gin", part_gin])
    cfg = _build("MESH_CONFIG")
    mesh = mesh_lib.make_mesh(cfg)
    assert mesh.size == len(jax.devices()) == 8
    rules = gin.query_parameter("%RULES")
    if part_gin.endswith("/ep.gin"):  # expert parallelism: dp rules on an expert mesh
        assert rules == "dp" and dict(mesh.shape)["expert"] == 2
    else:
        assert part_gin.endswith(f"/{rules}.gin")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_parse_and_build(experiment):
    required = [b for b in REQUIRED if not b.startswith(("MIXTURE", "TASK_FEATURE", "TRAIN_STEPS",
                                                          "BATCH_SIZE"))]
    gin_utils.parse_gin([experiment], required, finalize=False)
    model = _build("MODEL")
    assert model.output_vocabulary.vocab_size <= model.config.vocab_size
    header = (ROOT / experiment).read_text().splitlines()[0:12]
    assert any("python -m t5x_like.main" in line for line in header), "header holds the command"


def test_prefix_lm_objective_makes_the_inputs_bidirectional():
    _parse(["gin/models/llama_tiny.gin", "gin/runs/pretrain.gin",
            "gin/objectives/prefix_lm.gin"])
    model = _build("MODEL")
    assert model.inputs_bidirectional_attention
    assert issubclass(model.FEATURE_CONVERTER_CLS, seqio.PrefixLMFeatureConverter)


def test_finetune_starts_from_the_init_checkpoint():
    _parse(["gin/models/bert_tiny.gin", "gin/runs/finetune.gin"],
           ["MODEL=@model_api.SequenceClassificationModel()", "NUM_CLASSES=4"])
    assert gin.query_parameter("train.train.init_checkpoint") is not None
    model = _build("MODEL")
    assert type(model).__name__ == "SequenceClassificationModel"
    assert model.config.num_classes == 4


def test_speculative_infer_gin_holds_the_benchmark_target_and_drafter():
    """experiments/speculative_infer.gin decodes with exactly the networks that
    speculative_target.gin and speculative_drafter.gin train."""
    def network_config(files, extra=()):
        gin.clear_config(clear_constants=True)
        _parse(files, extra)
        return _build("MODEL").config

    target = network_config(["experiments/speculative_target.gin"])
    drafter = network_config(["experiments/speculative_drafter.gin"])
    gin.clear_config(clear_constants=True)
    _parse(["experiments/speculative_infer.gin"], ["DRAFTER_CHECKPOINT='/tmp/unused'"])
    decode = gin.query_parameter("infer.infer.decode").scoped_configurable_fn()
    assert decode.method == "speculative" and decode.gamma == 4
    assert _build("MODEL").config == target
    assert decode.drafter.model.config == drafter
    assert drafter.vocab_size == target.vocab_size

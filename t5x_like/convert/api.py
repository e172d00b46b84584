"""Import a Hugging Face model directory into our networks and export it back.

    hf = read_hf_config(hf_dir)                    # architecture + our config, no weights
    hf, params = load_hf(hf_dir, partitioner=p)    # streamed into p's parameter shardings
    net = network(hf.config, params)               # an nnx module, e.g. for tests
    save_hf(hf.config, params, out_dir)            # config.json + model.safetensors

`convert_hf_to_model_dir` is the CLI's `--from_hf DIR --to MODEL_DIR`: an Orbax params
checkpoint (MODEL_DIR/checkpoints/0), the HF config and tokenizer files (MODEL_DIR/hf/)
and MODEL_DIR/model.gin, which defines NETWORK_CONFIG and MODEL like gin/models/*.gin.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from models import decoder_only, encoder_decoder, encoder_only
from partitioning import mesh as mesh_lib
from partitioning.partitioner import Partitioner
from t5x_like import checkpoints
from t5x_like.convert import architectures as _architectures  # noqa: F401  (registers)
from t5x_like.convert import hf_io, registry
from t5x_like.convert.registry import Architecture, ConversionError
from t5x_like.data import vocabularies
from t5x_like.trainer import NetworkDef, network_def, with_shardings

PyTree = Any

HF_SUBDIR = "hf"  # MODEL_DIR/hf: the HF config.json and tokenizer files
MODEL_GIN = "model.gin"
# Copied to MODEL_DIR/hf on import and to OUT_DIR on export when present.
TOKENIZER_FILES = ("spiece.model", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json",
                   "merges.txt", "generation_config.json")


@dataclasses.dataclass(frozen=True)
class Family:
    """How one of our families is built and named in gin."""

    network_cls: type[nnx.Module]
    config_cls: type
    gin_module: str  # the models/ module gin imports


FAMILIES = {
    "encoder_decoder": Family(encoder_decoder.EncoderDecoder, encoder_decoder.T5Config,
                              "encoder_decoder"),
    "decoder_only": Family(decoder_only.DecoderOnly, decoder_only.DecoderOnlyConfig,
                           "decoder_only"),
    "encoder_only": Family(encoder_only.EncoderOnly, encoder_only.EncoderOnlyConfig,
                           "encoder_only"),
}


def family_of(config: Any) -> Family:
    for family in FAMILIES.values():
        if isinstance(config, family.config_cls):
            return family
    raise ConversionError(f"{type(config).__name__} is not a config of this framework's "
                          f"families ({[f.config_cls.__name__ for f in FAMILIES.values()]})")


@dataclasses.dataclass(frozen=True)
class HFModel:
    """What an HF model directory holds, read from its config.json (no weights)."""

    directory: pathlib.Path
    architecture: Architecture
    hf_class: str  # e.g. 'LlamaForCausalLM'
    hf_config: Mapping[str, Any]
    config: Any  # our config dataclass


def read_hf_config(hf_dir: str | pathlib.Path) -> HFModel:
    """The registered architecture and our config for an HF directory's config.json.

    Raises ConversionError naming any value we cannot represent.
    """
    hf_dir = pathlib.Path(hf_dir)
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir} has no config.json; point --from_hf at a Hugging "
                              "Face model directory (save_pretrained output)")
    hf_config = json.loads(path.read_text())
    arch, hf_class = registry.for_hf_config(hf_config)
    try:
        config = arch.config_from_hf(hf_config, hf_class)
    except KeyError as err:
        raise ConversionError(f"{path} lacks {err.args[0]!r}, needed for {hf_class}") from None
    except ValueError as err:
        if isinstance(err, ConversionError):
            raise
        raise ConversionError(f"{path}: {err}") from err
    return HFModel(hf_dir, arch, hf_class, hf_config, config)


def default_partitioner() -> Partitioner:
    """One device, replicated: for tests and small models."""
    return Partitioner(mesh_lib.make_mesh(mesh_lib.MeshConfig(), jax.devices()[:1]), "dp")


def network_definition(config: Any, partitioner: Partitioner | None = None) -> NetworkDef:
    """The abstract network of `config` (no weights), traced as `Runtime.build` does."""
    partitioner = partitioner or default_partitioner()
    cls = family_of(config).network_cls
    with partitioner.activate():
        return network_def(lambda: cls(config, rngs=nnx.Rngs(0)))


def abstract_params(config: Any, partitioner: Partitioner | None = None) -> PyTree:
    """Parameter ShapeDtypeStructs carrying `partitioner`'s target shardings."""
    partitioner = partitioner or default_partitioner()
    net = network_definition(config, partitioner)
    shardings = partitioner.param_shardings(net.abstract_state)
    return with_shardings(net.abstract_params(), shardings)


def network(config: Any, params: PyTree) -> nnx.Module:
    """An nnx module of `config` holding `params` (nested dicts of arrays)."""
    return network_definition(config).merge(params)


def load_hf(hf_dir: str | pathlib.Path | HFModel, *, partitioner: Partitioner | None = None,
            target: PyTree | None = None) -> tuple[HFModel, PyTree]:
    """Reads an HF model's safetensors into our parameters, placed as `partitioner` says
    (default: one device), or as the ShapeDtypeStructs of `target` (e.g.
    `Runtime.abstract_params()`). Only safetensors are read; each device reads its slice.
    """
    hf = hf_dir if isinstance(hf_dir, HFModel) else read_hf_config(hf_dir)
    if target is None:
        target = abstract_params(hf.config, partitioner)
    layout = hf.architecture.layout(hf.config)
    with hf_io.HFCheckpoint(hf.directory) as ckpt:
        params = hf_io.load_params(ckpt, layout, target, hf.architecture.base_prefix)
    return hf, params


def save_hf(config: Any, params: PyTree, out_dir: str | pathlib.Path, *,
            architecture: str | None = None, base_hf_config: Mapping[str, Any] | None = None,
            max_shard_size: int | str = "5GB", dtype: str = "float32") -> list[str]:
    """Writes config.json and model.safetensors (or shards + index) that
    `transformers.AutoModel*.from_pretrained(out_dir)` loads.

    `base_hf_config` (the imported model's config.json) keeps fields we do not model
    (token ids, label names); the architecture's own fields overwrite it.
    Returns the safetensors file names written.
    """
    arch = registry.get(architecture) if architecture else registry.for_config(config)
    if not arch.accepts(config):
        raise ConversionError(f"architecture {arch.name!r} cannot represent {config}")
    preferred = (list((base_hf_config or {}).get("architectures") or []) or [None])[0]
    hf_class = arch.export_class(config, preferred)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_config = {k: v for k, v in (base_hf_config or {}).items()
                 if k not in ("architectures", "model_type", "transformers_version")}
    hf_config.update(arch.config_to_hf(config, hf_class))
    hf_config["dtype"] = dtype
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    layout = arch.layout(config)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    return hf_io.write_params(layout, params, shapes, out_dir, max_shard_size=max_shard_size,
                              dtype=dtype)


# --- MODEL_DIR ----------------------------------------------------------------------------


def _gin_value(value: Any) -> str:
    return repr(tuple(value)) if isinstance(value, (list, tuple)) else repr(value)


def _vocabulary_gin(hf: HFModel, hf_copy: pathlib.Path) -> tuple[str, str]:
    """(the MODEL's vocabulary reference, gin lines defining it)."""
    if vocabularies.hf_tokenizer_file(hf_copy) is None:
        return "%VOCABULARY", ("# No tokenizer in the HF directory: the run gin's VOCABULARY "
                               "(VOCABULARY_NAME) is used.\n")
    extra_ids = 0
    if hf.architecture.family == "encoder_decoder":
        extra_ids = 100  # T5's sentinels, as transformers' T5Tokenizer adds them
        tok_config = hf_copy / "tokenizer_config.json"
        if tok_config.is_file():
            extra_ids = json.loads(tok_config.read_text()).get("extra_ids", extra_ids)
    eos = hf.hf_config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    return "%HF_VOCABULARY", (
        "HF_VOCABULARY = @vocabularies.hf_vocabulary()\n"
        "vocabularies.hf_vocabulary:\n"
        f"  directory = {str(hf_copy.absolute())!r}\n"
        f"  extra_ids = {extra_ids}\n"
        f"  eos_id = {eos!r}\n")


def _nested_gin(value: Any) -> tuple[str, str, str]:
    """A config dataclass inside the network config (e.g. `moe`): (its gin reference,
    the import line, the binding block), as gin/models/mixtral_tiny.gin writes them."""
    module, cls = type(value).__module__, type(value).__name__
    package, _, name = module.rpartition(".")
    lines = [f"  {f.name} = {_gin_value(getattr(value, f.name))}"
             for f in dataclasses.fields(value)]
    return (f"@{name}.{cls}()", f"from {package} import {name}",
            f"{name}.{cls}:\n" + "\n".join(lines) + "\n")


def model_gin_text(hf: HFModel, model_dir: pathlib.Path) -> str:
    """MODEL_DIR/model.gin: NETWORK_CONFIG and MODEL, as gin/models/*.gin define them."""
    cfg, family = hf.config, family_of(hf.config)
    vocab_ref, vocab_lines = _vocabulary_gin(hf, model_dir / HF_SUBDIR)
    fields, imports, blocks = [], [], []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            text, import_line, block = _nested_gin(value)
            imports.append(import_line + "\n")
            blocks.append("\n" + block)
        else:
            text = {"dropout_rate": "%DROPOUT_RATE", "dtype": "%ACTIVATION_DTYPE"}.get(
                f.name, _gin_value(value))
        fields.append(f"  {f.name} = {text}")
    if family.gin_module == "encoder_only":
        model_cls = ("SequenceClassificationModel" if cfg.num_classes and not cfg.mlm_head
                     else "EncoderOnlyModel")
    else:
        model_cls = {"encoder_decoder": "EncoderDecoderModel",
                     "decoder_only": "DecoderOnlyModel"}[family.gin_module]
    ckpt = (model_dir / "checkpoints").absolute()
    run = "infer" if family.gin_module != "encoder_only" else "eval"
    config_cls = type(cfg).__name__
    return f"""\
# {hf.hf_class} converted from {hf.directory.absolute()}
# by `python -m t5x_like.convert --from_hf ... --to {model_dir.absolute()}`.
# Parameters: {ckpt}/0 (an Orbax params checkpoint).
#
# Use it as a model gin, before a run gin, e.g.
#   python -m t5x_like.main --run_mode={run} --gin_file={model_dir.absolute() / MODEL_GIN} \\
#     --gin_file=gin/runs/{run}.gin --gin.CHECKPOINT_PATH={ckpt} ...
# Fine-tune into a new MODEL_DIR with gin/runs/finetune.gin and --gin.INIT_CHECKPOINT={ckpt}.
# Export back: python -m t5x_like.convert --model_dir={model_dir.absolute()} --to_hf=OUT_DIR
from __gin__ import dynamic_registration

from models import {family.gin_module}
{"".join(imports)}from t5x_like import model_api
from t5x_like.data import vocabularies

DROPOUT_RATE = {cfg.dropout_rate!r}
ACTIVATION_DTYPE = {cfg.dtype!r}

NETWORK_CONFIG = @{family.gin_module}.{config_cls}()
{family.gin_module}.{config_cls}:
{chr(10).join(fields)}
{"".join(blocks)}
{vocab_lines}
# LOSS_CONFIG comes from the run gin (gin/runs/*.gin).
MODEL = @model_api.{model_cls}()
model_api.{model_cls}:
  config = %NETWORK_CONFIG
  vocabulary = {vocab_ref}
  loss = %LOSS_CONFIG
"""


def convert_hf_to_model_dir(hf_dir: str | pathlib.Path, model_dir: str | pathlib.Path, *,
                            partitioner: Partitioner | None = None) -> pathlib.Path:
    """`--from_hf DIR --to MODEL_DIR`: params checkpoint, HF files, model.gin.

    Returns the path of model.gin.
    """
    model_dir = pathlib.Path(model_dir)
    hf = read_hf_config(hf_dir)
    _, params = load_hf(hf, partitioner=partitioner)
    checkpoints.save_params(model_dir / "checkpoints", params, step=0)
    del params
    hf_copy = model_dir / HF_SUBDIR
    hf_copy.mkdir(parents=True, exist_ok=True)
    info = dict(hf.hf_config, t5x_like_architecture=hf.architecture.name)
    (hf_copy / "config.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    _copy_tokenizer_files(hf.directory, hf_copy)
    gin_path = model_dir / MODEL_GIN
    gin_path.write_text(model_gin_text(hf, model_dir))
    return gin_path


def _copy_tokenizer_files(src: pathlib.Path, dst: pathlib.Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def export_model_dir(config: Any, checkpoint_path: str | pathlib.Path,
                     out_dir: str | pathlib.Path, *, model_dir: str | pathlib.Path | None = None,
                     partitioner: Partitioner | None = None, architecture: str | None = None,
                     max_shard_size: int | str = "5GB", dtype: str = "float32") -> list[str]:
    """`--to_hf OUT_DIR`: a checkpoint's parameters of `config` as an HF directory.

    With `model_dir` from `--from_hf`, its HF config (token ids, labels) and tokenizer
    files are carried over, and its architecture is kept.
    """
    base, hf_copy = None, None
    if model_dir is not None and (pathlib.Path(model_dir) / HF_SUBDIR / "config.json").is_file():
        hf_copy = pathlib.Path(model_dir) / HF_SUBDIR
        base = json.loads((hf_copy / "config.json").read_text())
        architecture = architecture or base.pop("t5x_like_architecture", None)
        base.pop("t5x_like_architecture", None)
    target = abstract_params(config, partitioner)
    params = checkpoints.restore_params(checkpoint_path, target)
    files = save_hf(config, params, out_dir, architecture=architecture, base_hf_config=base,
                    max_shard_size=max_shard_size, dtype=dtype)
    if hf_copy is not None:
        _copy_tokenizer_files(hf_copy, pathlib.Path(out_dir))
    return files

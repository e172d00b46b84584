"""The convert CLI: Hugging Face model directories <-> MODEL_DIRs of this framework.

Import (Orbax params checkpoint + MODEL_DIR/model.gin + MODEL_DIR/hf/ config and tokenizer):
  python -m t5x_like.convert --from_hf /path/to/hf_model --to /tmp/converted
Then, e.g.
  python -m t5x_like.main --run_mode=infer --gin_file=/tmp/converted/model.gin \\
    --gin_file=gin/runs/infer.gin --gin.CHECKPOINT_PATH=/tmp/converted/checkpoints ...

Export (config.json + model.safetensors, sharded with an index above --max_shard_size):
  python -m t5x_like.convert --model_dir=/tmp/converted --to_hf=/tmp/hf_out
  python -m t5x_like.convert --model_dir=/tmp/t5x_like_llama \\
    --gin_file=gin/models/llama_tiny.gin --to_hf=/tmp/hf_llama      (a model trained here)
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
from collections.abc import Sequence

# --partitioning presets: (rules, mesh axis sizes), as gin/partitioning/*.gin set them.
_PARTITIONING = {"dp": ("dp", {"data": -1}), "fsdp": ("fsdp", {"data": 1, "fsdp": -1}),
                 "tp": ("tp", {"data": 1, "model": -1})}


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    from t5x_like import gin_utils

    rest, bindings = gin_utils.rewrite_argv(argv)
    parser = argparse.ArgumentParser(prog="python -m t5x_like.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from_hf", help="Hugging Face model directory to import")
    parser.add_argument("--to", help="MODEL_DIR to write the imported model to")
    parser.add_argument("--to_hf", help="directory to export a Hugging Face model to")
    parser.add_argument("--model_dir", help="MODEL_DIR to export (its model.gin by default)")
    parser.add_argument("--gin_file", action="append", default=[],
                        help="model gin defining NETWORK_CONFIG (default MODEL_DIR/model.gin)")
    parser.add_argument("--checkpoint", help="checkpoint step or checkpoints directory "
                        "(default MODEL_DIR/checkpoints, latest step)")
    parser.add_argument("--architecture", help="export as this registered architecture "
                        "(default: the imported one, or the first that fits the config)")
    parser.add_argument("--max_shard_size", default="5GB",
                        help="largest safetensors file on export, e.g. 5GB, 200MB")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="dtype of the exported tensors")
    parser.add_argument("--partitioning", default="fsdp", choices=sorted(_PARTITIONING),
                        help="how parameters are spread over the devices while converting")
    parser.add_argument("--log_level", default="INFO")
    args = parser.parse_args(rest)
    if bool(args.from_hf) == bool(args.to_hf):
        parser.error("give either --from_hf DIR --to MODEL_DIR or --model_dir DIR --to_hf OUT")
    if args.from_hf and not args.to:
        parser.error("--from_hf needs --to MODEL_DIR")
    if args.to_hf and not (args.model_dir or args.gin_file):
        parser.error("--to_hf needs --model_dir (and/or --gin_file defining NETWORK_CONFIG)")
    return args, bindings


def _partitioner(name: str):
    from partitioning import MeshConfig, Partitioner, make_mesh

    rules, axes = _PARTITIONING[name]
    return Partitioner(make_mesh(MeshConfig(**axes)), rules)


def _network_config(gin_files: Sequence[str], bindings: Sequence[str]):
    import gin

    from t5x_like import gin_utils

    gin.clear_config(clear_constants=True)
    gin_utils.parse_gin(gin_files, bindings, finalize=False)
    return gin.query_parameter("%NETWORK_CONFIG").scoped_configurable_fn()


def main(argv: Sequence[str] | None = None) -> int:
    args, bindings = _parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from t5x_like.convert import api

    partitioner = _partitioner(args.partitioning)
    if args.from_hf:
        gin_path = api.convert_hf_to_model_dir(args.from_hf, args.to, partitioner=partitioner)
        print(f"wrote {gin_path} and {pathlib.Path(args.to) / 'checkpoints'}")
        return 0
    model_dir = pathlib.Path(args.model_dir) if args.model_dir else None
    gin_files = args.gin_file or [str(model_dir / api.MODEL_GIN)]
    config = _network_config(gin_files, bindings)
    checkpoint = args.checkpoint or str(model_dir / "checkpoints")
    files = api.export_model_dir(
        config, checkpoint, args.to_hf, model_dir=model_dir, partitioner=partitioner,
        architecture=args.architecture, max_shard_size=args.max_shard_size, dtype=args.dtype)
    print(f"wrote {args.to_hf}/config.json and {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The command line: `python -m t5x_like.main --gin_file=... --gin.NAME=VALUE --run_mode=...`.

  python -m t5x_like.main --gin_file=experiments/quickstart.gin \\
      --gin.MODEL_DIR=/tmp/t5x_like_quickstart

`--gin_file` is repeatable and searched in the working directory, the repository root
and `gin/`. `--gin.NAME=VALUE` binds anything gin can bind; plain strings need no quotes.
`--run_mode` picks the function the gin files configure: train (`train.train`),
eval (`evaluate.evaluate`) or infer (`infer.infer`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

RUN_MODES = ("train", "eval", "infer")


def _parse_flags(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    from t5x_like import gin_utils

    rest, gin_bindings = gin_utils.rewrite_argv(argv)
    parser = argparse.ArgumentParser(
        prog="python -m t5x_like.main", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    parser.add_argument("--gin_bindings", action="append", default=[],
                        help="raw gin binding, e.g. 'train.train.seed = 3' (repeatable)")
    parser.add_argument("--gin_search_paths", action="append", default=None,
                        help="extra directories to search for gin files")
    parser.add_argument("--run_mode", choices=RUN_MODES, default="train")
    parser.add_argument("--coordinator_address", default=None,
                        help="multi-host: host:port of process 0 (GPU clusters / CPU tests)")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    parser.add_argument("--log_level", default="INFO")
    args = parser.parse_args(rest)
    if not args.gin_file:
        parser.error(
            "at least one --gin_file is required, e.g. --gin_file=experiments/quickstart.gin"
        )
    return args, args.gin_bindings + gin_bindings


def _maybe_init_distributed(args: argparse.Namespace) -> None:
    """Joins the multi-controller runtime when asked (flags) or on a TPU pod slice."""
    import jax

    if args.coordinator_address or args.num_processes:
        jax.distributed.initialize(
            coordinator_address=args.coordinator_address,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()  # TPU pods discover the coordinator themselves.


def main(argv: Sequence[str] | None = None) -> int:
    args, bindings = _parse_flags(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s"
    )
    for noisy in ("absl", "tensorflow", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    import gin
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # tf.data only; accelerators belong to JAX.
    _maybe_init_distributed(args)

    from t5x_like import (
        data,  # noqa: F401  (registers the seqio tasks)
        evaluate,
        gin_utils,
        infer,
        train,
    )

    search = gin_utils.default_search_paths() + list(args.gin_search_paths or [])
    gin_utils.parse_gin(args.gin_file, bindings, search, finalize=False)
    fn = {"train": train.train, "eval": evaluate.evaluate, "infer": infer.infer}[args.run_mode]
    try:
        configured = gin.get_configurable(fn)
    except ValueError as err:
        raise SystemExit(
            f"--run_mode={args.run_mode} needs a gin file that configures "
            f"{fn.__module__}.{fn.__name__} (e.g. gin/runs/{args.run_mode}.gin): {err}"
        ) from err
    gin.finalize()
    import jax

    model_dir = _macro_or_none("MODEL_DIR")
    write_config = bool(model_dir) and args.run_mode == "train" and jax.process_index() == 0
    if write_config:
        gin_utils.write_config(model_dir)  # the full config, in case the run dies
    configured()
    if write_config:
        gin_utils.write_config(model_dir, operative=True)  # what the run actually used
    return 0


def _macro_or_none(name: str):
    import gin

    try:
        return gin.query_parameter(f"%{name}")
    except ValueError:
        return None


if __name__ == "__main__":
    sys.exit(main())

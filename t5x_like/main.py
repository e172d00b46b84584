"""The command line: `python -m t5x_like.main --gin_file=... --gin.NAME=VALUE --run_mode=...`.

  python -m t5x_like.main --gin_file=experiments/quickstart.gin \\
      --gin.MODEL_DIR=/tmp/t5x_like_quickstart

`--gin_file` is repeatable and searched in the working directory, the repository root
and `gin/`. `--gin.NAME=VALUE` binds anything gin can bind; plain strings need no quotes.
`--run_mode` picks the function the gin files configure: train (`train.train`),
eval (`evaluate.evaluate`) or infer (`infer.infer`); precompile compiles `train.train`'s
step ahead of time for `--precompile_target` (or the gin macro PRECOMPILE_TARGET), e.g.
v5e-256 or 8xH100, and reports per-device memory (see t5x_like/precompile.py).

Multi-host: every process runs the same command. `jax.distributed` is initialised from
`--coordinator_address` / `--num_processes` / `--process_id` when given, else
automatically on a Cloud TPU pod, under SLURM (`srun`), Open MPI (`mpirun`) or a
Kubernetes indexed Job, where JAX reads the coordinator and ranks from the environment.
`--distributed=off` runs single-process anyway; `on` initialises even when no cluster
is recognised.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence

RUN_MODES = ("train", "eval", "infer", "precompile")


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
    parser.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                        help="initialise jax.distributed: auto = when flags or a cluster "
                        "environment (TPU pod, SLURM, Open MPI, Kubernetes) ask for it")
    parser.add_argument("--precompile_target", default=None,
                        help="--run_mode=precompile: v4-32, v5p-128, v5e-256, 2xv5e-256, "
                        "8xH100, 2x8xH100, cpu:N (default: the gin macro PRECOMPILE_TARGET)")
    parser.add_argument("--device_memory_gib", type=float, default=None,
                        help="--run_mode=precompile: per-device memory, overriding the "
                        "target's (needed to judge a cpu:N target)")
    parser.add_argument("--log_level", default="INFO")
    args = parser.parse_args(rest)
    if not args.gin_file:
        parser.error(
            "at least one --gin_file is required, e.g. --gin_file=experiments/quickstart.gin"
        )
    return args, args.gin_bindings + gin_bindings


def cluster_environment(env: Mapping[str, str] | None = None) -> str | None:
    """The multi-process launcher whose environment JAX can read, or None.

    Only launches of more than one process count: a single `srun` task or `mpirun -n 1`
    stays single-process.
    """
    env = os.environ if env is None else env

    def more_than_one(name: str) -> bool:
        try:
            return int(env.get(name, "1")) > 1
        except ValueError:
            return False

    if env.get("TPU_WORKER_HOSTNAMES") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "Cloud TPU"
    if "SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env and more_than_one("SLURM_NTASKS"):
        return "SLURM"
    if "OMPI_MCA_orte_hnp_uri" in env and more_than_one("OMPI_COMM_WORLD_SIZE"):
        return "Open MPI"
    if "KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env:
        return "Kubernetes"
    return None


def _maybe_init_distributed(args: argparse.Namespace) -> None:
    """Joins the multi-controller runtime when flags or the cluster environment ask to."""
    import jax

    if args.distributed == "off":
        return
    explicit = (args.coordinator_address, args.num_processes, args.process_id)
    if any(v is not None for v in explicit):
        # Anything not given is read by JAX from the cluster environment.
        jax.distributed.initialize(
            coordinator_address=args.coordinator_address,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    elif args.distributed == "on" or (cluster := cluster_environment()):
        if args.distributed == "auto":
            logging.info("multi-process launch detected (%s): jax.distributed.initialize()",
                         cluster)
        jax.distributed.initialize()
    else:
        return
    logging.info("process %d of %d; %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


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
    if args.run_mode == "precompile":
        return _precompile(args, bindings)
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


def _precompile(args: argparse.Namespace, bindings: list[str]) -> int:
    """--run_mode=precompile: compile train.train's step for the target; 1 if it won't fit."""
    from t5x_like import precompile

    target_name = args.precompile_target
    if target_name:  # known before JAX starts: set up the simulated devices first
        precompile.prepare_process(precompile.parse_target(target_name))
    import gin

    from t5x_like import (
        data,  # noqa: F401  (registers the seqio tasks)
        gin_utils,
        train,
    )

    search = gin_utils.default_search_paths() + list(args.gin_search_paths or [])
    gin_utils.parse_gin(args.gin_file, bindings, search, finalize=True)
    target_name = target_name or _macro_or_none("PRECOMPILE_TARGET")
    if not target_name:
        raise SystemExit("--run_mode=precompile needs --precompile_target=... (e.g. v5e-256, "
                         "8xH100, cpu:8) or a PRECOMPILE_TARGET macro in the gin files")
    target = precompile.parse_target(target_name, args.device_memory_gib)
    precompile.prepare_process(target)
    try:
        train_args = gin.get_bindings(train.train)
    except ValueError as err:
        raise SystemExit(f"--run_mode=precompile compiles train.train's step: the gin files "
                         f"must configure train.train (e.g. gin/runs/pretrain.gin): {err}") from err
    try:
        report = precompile.precompile(target, **train_args)
    except precompile.DoesNotFitError as err:
        logging.error("%s", err)
        return 1
    print(report.table())
    return 0


def _macro_or_none(name: str):
    import gin

    try:
        return gin.query_parameter(f"%{name}")
    except ValueError:
        return None


if __name__ == "__main__":
    sys.exit(main())

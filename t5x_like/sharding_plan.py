"""Where every parameter goes, for a gin config on a mesh, without compiling anything.

    python -m t5x_like.sharding_plan --gin_file=experiments/t5_1_1_xl_c4.gin \\
        --gin.MODEL_DIR=/tmp/x [--target=v5p-128] [--gin.RULES=fsdp_tp --gin.MESH_MODEL=4]

prints the table of model-info.txt (each parameter's shape, dtype, logical axes, mesh
spec and bytes per device, then totals) and the optimizer state per device, for the
mesh `train.train` would build on the target's devices (default: the gin macro
PRECOMPILE_TARGET, else this machine's devices). Seconds, even for large models: the
network is traced abstractly. `--run_mode=precompile` adds the compiled step's memory.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def plan(target, *, model, optimizer, mesh_config=None, partitioning_rules="dp",
         **_unused_train_args) -> str:
    """The sharding table for `train.train`'s arguments on `target`'s devices (or None:
    this process's devices)."""
    from t5x_like import precompile
    from t5x_like.runtime import Runtime
    from t5x_like.trainer import Trainer

    devices = None if target is None else precompile.target_devices(target)[0]
    runtime = Runtime.build(model, mesh_config=mesh_config, rules=partitioning_rules,
                            devices=devices)
    partitioner = runtime.partitioner
    # The optimizer state laid out exactly as training lays it out (nothing compiled).
    opt_bytes = precompile.device_bytes(Trainer(runtime, optimizer).abstract_state().opt_state)
    abstract_params = runtime.abstract_params()
    header = (f"mesh: {dict(partitioner.mesh.shape)} on "
              f"{target.name if target else 'this host'}; rules: {partitioning_rules}")
    table = partitioner.describe(runtime.net.abstract_state, runtime.param_shardings)
    return "\n".join([
        header, table,
        f"optimizer state per device: {opt_bytes:,} bytes ({precompile._fmt(opt_bytes)}); "
        f"parameters per device: {precompile.device_bytes(abstract_params):,} bytes",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    from t5x_like import gin_utils, precompile

    rest, bindings = gin_utils.rewrite_argv(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m t5x_like.sharding_plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_file", action="append", default=[], required=True)
    parser.add_argument("--gin_bindings", action="append", default=[])
    parser.add_argument("--target", default=None,
                        help="v5e-256, v5p-128, 8xH100, cpu:N ... (default: PRECOMPILE_TARGET)")
    args = parser.parse_args(rest)
    if args.target:
        precompile.prepare_process(precompile.parse_target(args.target))
    import gin

    from t5x_like import (
        data,  # noqa: F401  (registers the seqio tasks)
        train,
    )

    gin_utils.parse_gin(args.gin_file, args.gin_bindings + bindings,
                        gin_utils.default_search_paths(), finalize=True)
    from t5x_like.main import _macro_or_none

    name = args.target or _macro_or_none("PRECOMPILE_TARGET")
    target = precompile.parse_target(name) if name else None
    if target is not None:
        precompile.prepare_process(target)
    print(plan(target, **gin.get_bindings(train.train)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

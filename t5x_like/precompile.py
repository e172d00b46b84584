"""Ahead-of-time compilation of the real train step for a named target: will it fit?

    python -m t5x_like.main --run_mode=precompile --gin_file=experiments/t5_1_1_xl_c4.gin \\
        --gin.MODEL_DIR=/tmp/xl --precompile_target=v5p-128

compiles the exact step `train.train` would run (same model, optimizer, mesh, rules,
batch, microbatches) without a single accelerator, and reports per device the bytes of
the parameters, the optimizer state, the batch and the step's temporaries (activations,
gradients, collectives' buffers), against the device's memory. A step that will not fit
fails here, in minutes, with the numbers and what to change, instead of hours into a
queue on a pod.

Targets (`parse_target`):

  v4-32, v5p-128      TPU v4 / v5p: the number counts TensorCores, two per chip (megacore),
                      so v4-32 is 16 chips = 16 JAX devices; 32 / 95 GiB HBM per chip
  v5e-256, v6e-64     TPU v5e (v5litepod-256 also accepted) / v6e (Trillium): the number
                      counts chips; 16 / 32 GiB HBM per chip
  2xv5e-256           two slices of v5e-256 (multi-slice; the mesh's dcn_* axes span them)
  8xH100, 2x8xH100    GPUs per node, or nodes x GPUs per node; H100 80 GiB, H200 141 GB,
                      A100 (A100-40 / A100-80), B200 180 GB, L4 24 GB
  cpu:8               N CPU devices (memory unknown unless `device_memory_gib` is given)

TPU targets use the TPU compiler shipped in the `libtpu` package (`pip install
.[tpu]`; no TPU needed): the memory figures are then the TPU compiler's own. Without
libtpu, and for GPU targets, the step is compiled for as many simulated CPU devices as
the target has, with the target's mesh: the sharding, the per-device parameter and
optimizer bytes are exact; temporaries are the CPU compiler's estimate (it fuses and
schedules differently from the TPU / GPU compilers), and the report says so.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

GiB = 1024**3
GB = 1000**3

# Per-chip HBM of the TPU generations (bytes) and how their names count devices.
_TPU = {
    # name: (topology prefix, dimensions, chips per name unit, HBM bytes, chip config)
    "v4": ("v4", 3, 0.5, 32 * GiB, "megacore"),
    "v5p": ("v5p", 3, 0.5, 95 * GiB, "megacore"),
    "v5e": ("v5e", 2, 1, 16 * GiB, None),
    "v5litepod": ("v5e", 2, 1, 16 * GiB, None),
    "v6e": ("v6e", 2, 1, 32 * GiB, None),
}
_GPU_MEMORY = {
    "H100": 80 * GiB,
    "H200": 141 * GB,
    "A100": 80 * GiB,
    "A100-80": 80 * GiB,
    "A100-40": 40 * GiB,
    "B200": 180 * GB,
    "L4": 24 * GB,
}
# Above this share of device memory a step "fits" only on paper: XLA's allocator
# fragments, and the runtime keeps some memory for itself.
HEADROOM = 0.9


@dataclasses.dataclass(frozen=True)
class Target:
    """A compilation target: its devices, their memory and how to get them."""

    name: str
    platform: str  # 'tpu' | 'gpu' | 'cpu'
    num_devices: int  # JAX devices over all slices / nodes
    memory_bytes: int | None  # per device; None = unknown
    num_slices: int = 1  # TPU slices or GPU nodes (the mesh's dcn_* product)
    topology: str | None = None  # TPU topology for get_topology_desc, e.g. 'v5e:16x16'
    chip_config: str | None = None

    @property
    def device_label(self) -> str:
        mem = f", {_fmt(self.memory_bytes)} each" if self.memory_bytes else ""
        return f"{self.num_devices} {self.platform.upper()} devices{mem}"


def _topology_dims(chips: int, ndim: int, name: str) -> str:
    """The usual slice shape of `chips` chips: v5e-16 -> '4x4', v4-32 -> '2x2x4'."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"target {name!r}: {chips} chips is not a power of two; TPU slices "
                         "come in powers of two (e.g. v5e-64, v4-32, v5p-128)")
    if ndim == 2:
        dims, order = [1, 1], (1, 0)
    else:
        if chips < 4:
            raise ValueError(f"target {name!r}: the smallest {name.split('-')[0]} slice is "
                             "4 chips (v4-8 / v5p-8)")
        # 4 chips: 2x2x1; from 8 (2x2x2) on, double z, y, x in turn: 2x2x4, 2x4x4, 4x4x4
        dims, order = ([2, 2, 1] if chips == 4 else [2, 2, 2]), (2, 1, 0)
    i = 0
    while math.prod(dims) < chips:
        dims[order[i % len(order)]] *= 2
        i += 1
    return "x".join(map(str, dims))


def parse_target(name: str, device_memory_gib: float | None = None) -> Target:
    """A `Target` from a name such as 'v5e-256', '2xv5p-128', '8xH100', 'cpu:8'.

    `device_memory_gib` overrides (or, for CPU targets, supplies) the per-device memory.
    """
    raw = name
    name = name.strip()
    override = None if device_memory_gib is None else int(device_memory_gib * GiB)
    m = re.fullmatch(r"cpu[:\-](\d+)", name, re.IGNORECASE)
    if m:
        return Target(raw, "cpu", int(m.group(1)), override)
    m = re.fullmatch(r"(?:(\d+)x)?(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name, re.IGNORECASE)
    if m:
        slices = int(m.group(1) or 1)
        gen = m.group(2).lower()
        prefix, ndim, per_unit, memory, chip_config = _TPU[gen]
        units = int(m.group(3))
        chips = int(units * per_unit)
        if chips != units * per_unit or chips < 1:
            raise ValueError(f"target {raw!r}: {gen}-N counts TensorCores (two per chip), "
                             "so N must be even, e.g. v4-32")
        topology = f"{prefix}:{_topology_dims(chips, ndim, raw)}"
        return Target(raw, "tpu", chips * slices, override or memory, slices, topology,
                      chip_config)
    m = re.fullmatch(r"(?:(\d+)x)?(\d+)x([A-Za-z]\w*(?:-\d+)?)", name)
    if m and m.group(3).upper() in _GPU_MEMORY:
        nodes, per_node = int(m.group(1) or 1), int(m.group(2))
        return Target(raw, "gpu", nodes * per_node, override or _GPU_MEMORY[m.group(3).upper()],
                      nodes)
    raise ValueError(
        f"unknown precompile target {raw!r}; use a TPU slice (v4-32, v5p-128, v5e-256, "
        f"v6e-64, 2xv5e-256 for two slices), GPUs ([NODESx]GPUSx{{{', '.join(_GPU_MEMORY)}}}, "
        "e.g. 8xH100 or 2x8xH100) or cpu:N"
    )


def have_tpu_compiler() -> bool:
    """Whether the `libtpu` package (the TPU compiler) is importable."""
    return importlib.util.find_spec("libtpu") is not None


def simulated_devices_needed(target: Target) -> int:
    """How many CPU devices the process needs for `target` (0: it uses libtpu's)."""
    if target.platform == "tpu" and have_tpu_compiler():
        return 0
    return target.num_devices


def prepare_process(target: Target) -> None:
    """Before JAX's backends start: CPU only, with enough simulated devices.

    Idempotent; raises if the backends already started with too few devices.
    """
    import jax

    need = simulated_devices_needed(target)
    try:
        jax.config.update("jax_platforms", "cpu")
        if need:
            jax.config.update("jax_num_cpu_devices", need)
    except RuntimeError:  # backends already initialised: fine if they suffice
        have = len(jax.devices("cpu"))
        if need > have:
            raise RuntimeError(
                f"precompile for {target.name} needs {need} CPU devices but JAX already "
                f"started with {have}; pass --precompile_target on the command line, or "
                f"set XLA_FLAGS=--xla_force_host_platform_device_count={need}"
            ) from None


def target_devices(target: Target) -> tuple[list[Any], str]:
    """The devices to compile for and which compiler compiles ('tpu' or 'cpu')."""
    import jax

    if target.platform == "tpu" and have_tpu_compiler():
        from jax.experimental import topologies

        kwargs = {"num_slices": target.num_slices} if target.num_slices > 1 else {}
        if target.chip_config:
            kwargs["chip_config_name"] = target.chip_config
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "none")  # no TPU host to probe
        # Compiling only: do not take libtpu's one-process-per-host lock (another compile,
        # or a test, may hold it).
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        topo = topologies.get_topology_desc(topology_name=target.topology, platform="tpu",
                                            **kwargs)
        devices = list(topo.devices)
        if len(devices) != target.num_devices:
            raise RuntimeError(f"libtpu gave {len(devices)} devices for {target.topology}, "
                               f"expected {target.num_devices}")
        return devices, "tpu"
    cpus = jax.devices("cpu")
    if len(cpus) < target.num_devices:
        raise RuntimeError(
            f"precompile for {target.name} needs {target.num_devices} simulated CPU devices, "
            f"this process has {len(cpus)}; run it through `python -m t5x_like.main "
            f"--run_mode=precompile` (which sets them up) or set XLA_FLAGS="
            f"--xla_force_host_platform_device_count={target.num_devices} before JAX starts"
        )
    return list(cpus[: target.num_devices]), "cpu"


# --- the report ----------------------------------------------------------------------------


def _fmt(n: float | None) -> str:
    from partitioning import partitioner

    return partitioner.human_bytes(n, digits=2)


def device_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (the largest shard)."""
    import jax

    from partitioning import partitioner

    return sum(partitioner.bytes_per_device(leaf.shape, leaf.dtype, leaf.sharding)
               for leaf in jax.tree.leaves(tree))


@dataclasses.dataclass
class Report:
    """What `precompile` found; `fits` is None when the device memory is unknown."""

    target: str
    compiler: str  # 'tpu' (libtpu) or 'cpu' (simulated devices)
    num_devices: int
    mesh: dict[str, int]
    rules: str
    batch_size: int
    num_microbatches: int
    parameters: int  # total count
    params_bytes: int  # per device, from the shardings
    opt_state_bytes: int
    batch_bytes: int
    temp_bytes: int  # the compiled step's temporaries (activations, gradients, ...)
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    code_bytes: int
    peak_bytes: int
    memory_bytes: int | None
    flops_per_device: float | None
    compile_seconds: float
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        if self.memory_bytes is None:
            return None
        return self.peak_bytes <= HEADROOM * self.memory_bytes

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["fits"] = self.fits
        return out

    def table(self) -> str:
        mem = self.memory_bytes
        share = (lambda b: f"{100 * b / mem:5.1f} %") if mem else (lambda b: "")
        compiler = ("TPU compiler (libtpu), exact" if self.compiler == "tpu" else
                    f"CPU compiler on {self.num_devices} simulated devices: temporaries "
                    "estimated")
        mesh = " × ".join(f"{k}={v}" for k, v in self.mesh.items())
        rows = [
            ("parameters", self.params_bytes),
            ("optimizer state", self.opt_state_bytes),
            ("batch", self.batch_bytes),
            ("temporaries (activations, grads)", self.temp_bytes),
            ("generated code", self.code_bytes),
        ]
        lines = [
            f"target: {self.target} ({self.num_devices} devices); {compiler}",
            f"mesh: {mesh}; rules: {self.rules}; global batch {self.batch_size}"
            + (f" in {self.num_microbatches} microbatches" if self.num_microbatches > 1 else ""),
            f"parameters: {self.parameters:,}",
            "per device:",
        ]
        lines += [f"  {name:<40}{_fmt(b):>12}  {share(b)}" for name, b in rows]
        lines.append(f"  {'peak (args + outputs - donated + temps)':<40}"
                     f"{_fmt(self.peak_bytes):>12}  {share(self.peak_bytes)}")
        if mem:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            lines.append(f"  {'device memory':<40}{_fmt(mem):>12}  -> {verdict} "
                         f"(limit {HEADROOM:.0%} of it)")
        if self.flops_per_device:
            lines.append(f"compiled step: {self.flops_per_device:.3e} FLOPs per device")
        lines.append(f"compile time: {self.compile_seconds:.1f} s")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


class DoesNotFitError(RuntimeError):
    """The compiled step needs more memory than the target's devices have."""


def _advice(report: Report) -> str:
    tips = []
    if report.mesh.get("fsdp", 1) * report.mesh.get("model", 1) < report.num_devices and (
            report.params_bytes + report.opt_state_bytes > report.temp_bytes):
        tips.append("shard parameters and optimizer state further (RULES='fsdp' or "
                    "'fsdp_tp' with a larger MESH_FSDP)")
    tips.append("split the batch into microbatches (--gin.NUM_MICROBATCHES=4) or lower "
                "BATCH_SIZE")
    tips.append("use a factored optimizer (Adafactor) or bfloat16 optimizer state")
    return "; ".join(tips)


def _abstract_batch(model, dataset_cfg, partitioner) -> dict[str, Any]:
    """ShapeDtypeStructs of one global batch, as the input pipeline would deliver it."""
    import jax
    import numpy as np

    converter = model.feature_converter(dataset_cfg.use_packing)
    lengths = dict(converter.get_model_feature_lengths(dataset_cfg.task_feature_lengths))
    specs = getattr(converter, "MODEL_FEATURES", {})
    b = dataset_cfg.batch_size
    out = {}
    for key, length in lengths.items():
        out[key] = jax.ShapeDtypeStruct((b, length), np.int32,
                                        sharding=partitioner.batch_sharding(2))
    for key, spec in specs.items():  # scalar per-example features (classification labels)
        if key not in out and getattr(spec, "rank", 1) == 0:
            out[key] = jax.ShapeDtypeStruct((b,), np.int32, sharding=partitioner.batch_sharding(1))
    return out


def precompile(
    target: Target | str,
    *,
    model,
    train_dataset_cfg,
    optimizer,
    mesh_config=None,
    partitioning_rules: str = "dp",
    num_microbatches: int = 1,
    seed: int = 0,
    model_dir: str | os.PathLike[str] | None = None,
    raise_if_too_big: bool = True,
    dump_hlo: bool = False,
    **_unused_train_args: Any,
) -> Report:
    """Compiles `train.train`'s step for `target` and reports per-device memory.

    Takes `train.train`'s own keyword arguments (the run mode passes its gin bindings),
    ignoring those that only matter when training. Writes precompile.json and
    model-info.txt to `model_dir` when given. Raises `DoesNotFitError` (after writing
    them) when the step needs more than `HEADROOM` of the device memory. `dump_hlo`: also
    write the compiled program's text (precompile.hlo.txt; large for large models).
    """
    import jax

    from models import attention
    from partitioning import mesh as mesh_lib
    from t5x_like.runtime import Runtime
    from t5x_like.trainer import Trainer

    target = parse_target(target) if isinstance(target, str) else target
    devices, compiler = target_devices(target)
    notes = []
    if target.platform == "tpu" and compiler == "cpu":
        notes.append("libtpu is not installed (pip install '.[tpu]'), so this compiled for "
                     "simulated CPU devices; temporaries are the CPU compiler's estimate")
    if target.platform == "gpu":
        notes.append("GPU targets compile for simulated CPU devices with the GPU mesh; "
                     "temporaries are the CPU compiler's estimate. JAX preallocates 75 % of "
                     "GPU memory by default (XLA_PYTHON_CLIENT_MEM_FRACTION)")
    mesh_config = mesh_config or mesh_lib.MeshConfig()
    if mesh_config.num_slices != target.num_slices:
        notes.append(f"the mesh spans {mesh_config.num_slices} slice(s) (dcn_data × dcn_fsdp) "
                     f"but {target.name} has {target.num_slices}")
    runtime = Runtime.build(model, mesh_config=mesh_config, rules=partitioning_rules,
                            devices=devices)
    partitioner = runtime.partitioner
    partitioner.check_batch_size(train_dataset_cfg.batch_size)
    trainer = Trainer(runtime, optimizer, num_microbatches=num_microbatches, seed=seed)
    state = trainer.abstract_state()
    batch = _abstract_batch(model, train_dataset_cfg, partitioner)

    # Attention 'auto' picks the target's fused kernel (Pallas on TPU); where this compiler
    # cannot build that kernel (a simulated GPU), the same memory-linear 'blockwise' one.
    simulated = compiler == "cpu" and target.platform != "cpu"
    if simulated:
        notes.append("fused attention kernels (cuDNN / Pallas) are traced as 'blockwise', "
                     "their memory-linear equivalent")
    start = time.perf_counter()
    with partitioner.activate(), attention.compile_target(
            target.platform, fused_as_blockwise=simulated):
        try:
            compiled = trainer.train_step.lower(state, batch).compile()
        except Exception as err:  # the TPU compiler refuses programs that overflow HBM
            if "RESOURCE_EXHAUSTED" in str(err) or "Ran out of memory" in str(err):
                raise DoesNotFitError(
                    f"the train step does not fit {target.name}: the compiler reports "
                    f"{str(err).splitlines()[0][:600]}"
                ) from err
            raise
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, Sequence) and not isinstance(cost, Mapping) else cost
        flops = float(cost.get("flops", 0.0)) or None
    except Exception:  # cost analysis is optional on some backends
        flops = None
    args, outs = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    report = Report(
        target=target.name, compiler=compiler, num_devices=target.num_devices,
        mesh={k: int(v) for k, v in partitioner.mesh.shape.items()},
        rules=partitioning_rules if isinstance(partitioning_rules, str) else "custom",
        batch_size=train_dataset_cfg.batch_size, num_microbatches=num_microbatches,
        parameters=sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
        params_bytes=device_bytes(state.params), opt_state_bytes=device_bytes(state.opt_state),
        batch_bytes=device_bytes(batch), temp_bytes=temp, argument_bytes=args,
        output_bytes=outs, alias_bytes=alias, code_bytes=mem.generated_code_size_in_bytes,
        peak_bytes=args + outs - alias + temp, memory_bytes=target.memory_bytes,
        flops_per_device=flops, compile_seconds=seconds, notes=notes,
    )
    if model_dir is not None and jax.process_index() == 0:
        path = pathlib.Path(model_dir)
        path.mkdir(parents=True, exist_ok=True)
        (path / "precompile.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
        (path / "precompile.txt").write_text(report.table() + "\n")
        runtime.write_model_info(path)
        if dump_hlo:
            (path / "precompile.hlo.txt").write_text(compiled.as_text())
    if raise_if_too_big and report.fits is False:
        raise DoesNotFitError(
            f"the train step does not fit {target.name}: it needs {_fmt(report.peak_bytes)} "
            f"per device (parameters {_fmt(report.params_bytes)}, optimizer state "
            f"{_fmt(report.opt_state_bytes)}, temporaries {_fmt(report.temp_bytes)}) of "
            f"{_fmt(report.memory_bytes)} (usable {HEADROOM:.0%}); {_advice(report)}"
        )
    return report

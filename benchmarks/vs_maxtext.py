"""Side-by-side CPU training speed: t5x_like against MaxText on the same Llama-style decoder.

    python benchmarks/vs_maxtext.py                       # builds the two venvs if missing
    python benchmarks/vs_maxtext.py --skip_build --rounds 3 --steps 10
    python benchmarks/vs_maxtext.py --skip_build --t5x_jax this   # t5x_like on this jax
    python benchmarks/vs_maxtext.py --skip_build --configs llama512_f32 --json_out /tmp/vs.json

MaxText (`maxtext[tpu]==0.2.5` from the package registry; the TPU extra only brings its
dependencies) lives in its own Python 3.12 virtualenv, by default
~/.cache/t5x_like/maxtext-venv, built from pyenv's 3.12 on the first run. It trains on
the CPU with `hardware=cpu skip_jax_distributed_system=true dataset_type=synthetic`
(module `maxtext.trainers.pre_train.train`, config `configs/base.yml` of the installed
package) plus the overrides of `maxtext_args`, which set the same network as the
t5x_like side: `models.decoder_only.DecoderOnly` driven by `model_api.DecoderOnlyModel`,
`Runtime.build`, `trainer.Trainer` with AdamW, exactly as benchmarks/train_throughput.py
drives the encoder-decoder.

Both sides: the same dims, layers, heads, vocabulary, sequence length, batch and
activation dtype; float32 parameters; RoPE, RMSNorm, SwiGLU, untied logits; plain
dot-product attention with a causal mask; AdamW with global-norm clipping at 1.0; no
z-loss (MaxText's default; `--z_loss` sets both); no dropout; random synthetic tokens.
MaxText keeps its defaults otherwise (scanned layers, its logits and loss code) except
its remat policy: `--maxtext_remat` (default `minimal`; `full`, its default, recomputes
the forward pass). `--maxtext_overrides` adds any other `key=value`.

Same XLA on both sides (`--t5x_jax maxtext`, the default): the t5x_like worker runs in
a second venv, ~/.cache/t5x_like/t5x-jax<version>-venv, with the MaxText venv's jax,
jaxlib, flax and optax and the rest of setup.py's requirements, importing this
checkout. jax 0.12 (MaxText 0.2.5's) runs bfloat16 matmuls about twice as fast on CPU
as jax 0.10, so comparing across versions mostly measures XLA. `--t5x_jax this` runs
the worker with this interpreter instead.

Every measurement is a fresh subprocess (compile included, then `--steps` steps), with
the same environment (JAX_PLATFORMS=cpu, this process's XLA_FLAGS, no thread pinning).
Each round runs MaxText then t5x_like for every config, so a noisy neighbour on the
machine hits both alike; medians over the rounds' steady steps are reported:

* MaxText: the per-step seconds of its log ("completed step: N, seconds: S, ..."), the
  wall time between loop iterations, after the first `--maxtext_warmup` steps (its
  dispatch is asynchronous, so the first iterations show dispatch, not compute).
* t5x_like: each `trainer.run_train_step` up to `block_until_ready`, after `--warmup`.

Also per step: the CPU seconds the process used (all threads; /proc for MaxText,
`time.process_time` for t5x_like), which other work on the machine inflates less than
wall time. MFU = analytic model FLOP/s (`model_flops`, one formula for both) / the
n x n matmul peak measured (`train_throughput.measure_matmul_peak`) by the same jax as
the framework: the MaxText venv and this interpreter may carry different jax/XLA
versions, whose CPU matmul speeds differ (the JSON and the table show both peaks).

Prints one JSON document, then a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import harness  # benchmarks/harness.py and report.py: this script's directory is on sys.path
import report

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MAXTEXT_REQUIREMENT = "maxtext[tpu]==0.2.5"
DEFAULT_VENV = os.path.join(os.path.expanduser("~"), ".cache", "t5x_like", "maxtext-venv")
RESULT_TAG = "VS_MAXTEXT_RESULT "

# --- configs -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RaceConfig:
    """One network and batch, trained by both frameworks."""

    name: str
    dtype: str = "float32"  # activations; parameters are float32 on both sides
    emb_dim: int = 512
    num_layers: int = 4
    num_heads: int = 8
    head_dim: int = 64
    mlp_dim: int = 1536
    vocab_size: int = 8192
    seq_len: int = 512
    batch_size: int = 8

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


CONFIGS: dict[str, RaceConfig] = {
    c.name: c for c in [RaceConfig("llama512_f32"), RaceConfig("llama512_bf16", "bfloat16")]
}


def model_flops(rc: RaceConfig) -> dict[str, float]:
    """Model FLOPs of one training step (forward + backward): the same count for both sides.

    A multiply-add is 2 FLOPs and a matmul's backward costs twice its forward, so a
    weight seen by a token costs 6 FLOPs per step. With B batch, L sequence, D model dim,
    N heads of H dims (K = N kv heads), F mlp dim (SwiGLU: 3 kernels), V vocab and
    n layers:

        layers    = 6·B·L·n·(2·D·N·H + 2·D·K·H + 3·D·F)     q, o, k, v and the MLP
        attention = 12·B·L²·n·N·H     q·kᵀ and weights·v, 2·N·H FLOPs per query-key pair
                                      each, the causal square counted in full (it is
                                      computed in full by both sides)
        logits    = 6·B·L·D·V

    Not counted: the embedding gather, norms, RoPE, softmax, the loss, the optimizer and
    rematerialisation. MaxText's own count (its log's "Total TFLOPs") halves the
    attention term for causality: `maxtext_flops` gives it for comparison.
    """
    b, length, d = rc.batch_size, rc.seq_len, rc.emb_dim
    nh = rc.num_heads * rc.head_dim
    per_layer = 2 * d * nh + 2 * d * nh + 3 * d * rc.mlp_dim
    parts = {
        "layer_matmuls": 6.0 * b * length * rc.num_layers * per_layer,
        "attention": 12.0 * b * length * length * rc.num_layers * nh,
        "logits": 6.0 * b * length * d * rc.vocab_size,
    }
    parts["total"] = sum(parts.values())
    return parts


def maxtext_flops(rc: RaceConfig) -> float:
    """MaxText's count (utils/maxtext_utils.calculate_tflops_training_per_device):
    the same, with half the attention term (the causal half)."""
    parts = model_flops(rc)
    return parts["total"] - parts["attention"] / 2


# --- the MaxText venv ----------------------------------------------------------------------


def find_python312(explicit: str | None) -> str:
    """A Python 3.12 interpreter: --python312, else pyenv's newest 3.12, else python3.12."""
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise SystemExit(f"--python312={explicit} is not an executable")
        return explicit
    roots = []
    if shutil.which("pyenv"):
        out = subprocess.run(["pyenv", "root"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            roots.append(out.stdout.strip())
    roots += [os.environ.get("PYENV_ROOT", ""), os.path.expanduser("~/.pyenv")]
    for root in filter(None, roots):
        found = sorted(glob.glob(os.path.join(root, "versions", "3.12*", "bin", "python3.12")),
                       key=lambda p: [int(x) for x in re.findall(r"\d+", p.split("versions")[-1])])
        if found:
            return found[-1]
    if shutil.which("python3.12"):
        return shutil.which("python3.12")
    raise SystemExit(
        "MaxText needs Python 3.12, and none was found: not under $(pyenv root)/versions/3.12*, "
        "~/.pyenv/versions/3.12*, nor python3.12 on PATH. Install one (`pyenv install 3.12`) "
        "or pass --python312=/path/to/python3.12."
    )


def venv_python(venv: str) -> str:
    return os.path.join(venv, "bin", "python")


def _maxtext_dir(venv: str) -> str | None:
    """The installed maxtext package directory in `venv`, or None."""
    if not os.access(venv_python(venv), os.X_OK):
        return None
    out = subprocess.run(
        [venv_python(venv), "-c", "import os, maxtext; print(os.path.dirname(maxtext.__file__))"],
        capture_output=True, text=True, env=_child_env(),
    )
    return out.stdout.strip() if out.returncode == 0 else None


def build_venv(venv: str, python312: str | None, skip_build: bool) -> str:
    """Creates `venv` with MAXTEXT_REQUIREMENT unless it has it; returns maxtext's dir."""
    found = _maxtext_dir(venv)
    if found:
        return found
    if skip_build:
        raise SystemExit(f"--skip_build, but {venv} has no importable maxtext; run once "
                         "without --skip_build to build it (about 2-5 minutes)")
    python = find_python312(python312)
    print(f"[vs_maxtext] building {venv} with {python} and {MAXTEXT_REQUIREMENT} ...",
          file=sys.stderr)
    subprocess.run([python, "-m", "venv", venv], check=True)
    pip = [venv_python(venv), "-m", "pip", "install", "--disable-pip-version-check"]
    subprocess.run([*pip, "-q", "-U", "pip"], check=True)
    subprocess.run([*pip, MAXTEXT_REQUIREMENT], check=True)
    found = _maxtext_dir(venv)
    if not found:
        raise SystemExit(f"installed {MAXTEXT_REQUIREMENT} into {venv}, but `import maxtext` "
                         "fails there; see pip's output above")
    return found


_PINNED = ("jax", "jaxlib", "flax", "optax")


def _versions(python: str, packages: tuple[str, ...]) -> dict[str, str] | None:
    """Installed versions of `packages` under `python` (None if it cannot tell)."""
    code = ("import importlib.metadata as m, json; "
            f"print(json.dumps({{p: m.version(p) for p in {list(packages)!r}}}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, env=_child_env())
    return json.loads(out.stdout) if out.returncode == 0 else None


def _repo_requirements() -> list[str]:
    """setup.py's core requirements (its `_CORE` list), read without running setup.py."""
    import ast

    with open(os.path.join(REPO, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "_CORE" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise SystemExit("setup.py has no _CORE list of requirements")


def build_same_jax_venv(maxtext_venv: str, python312: str | None, skip_build: bool) -> str:
    """A Python 3.12 venv for the t5x_like worker with MaxText's jax, jaxlib, flax and
    optax versions (so both sides compile with the same XLA) plus this repo's other
    requirements; the repo itself is imported from its checkout. Returns its python."""
    pins = _versions(venv_python(maxtext_venv), _PINNED)
    if not pins:
        raise SystemExit(f"cannot read jax / flax / optax versions of {maxtext_venv}")
    venv = os.path.join(os.path.dirname(DEFAULT_VENV), f"t5x-jax{pins['jax']}-venv")
    python = venv_python(venv)
    have = _versions(python, (*_PINNED, "seqio")) if os.access(python, os.X_OK) else None
    if have and all(have[k] == v for k, v in pins.items()):
        return python
    if skip_build:
        raise SystemExit(f"--skip_build, but {venv} lacks jax {pins['jax']} or seqio; run once "
                         "without --skip_build to build it (about 3 minutes)")
    base = find_python312(python312)
    print(f"[vs_maxtext] building {venv} (t5x_like's requirements, {pins}) ...",
          file=sys.stderr)
    subprocess.run([base, "-m", "venv", venv], check=True)
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check"]
    subprocess.run([*pip, "-q", "-U", "pip"], check=True)
    others = [r for r in _repo_requirements()
              if re.split(r"[<>=!\[ ;]", r, maxsplit=1)[0] not in pins]
    subprocess.run([*pip, *(f"{k}=={v}" for k, v in pins.items()), *others], check=True)
    return python


def _child_env() -> dict[str, str]:
    """The environment of every measured subprocess: CPU only, quiet, same XLA flags."""
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.pop("PYTHONPATH", None)
    return env


# --- MaxText -------------------------------------------------------------------------------


def maxtext_args(rc: RaceConfig, *, steps: int, run_name: str, output_dir: str,
                 remat: str, z_loss: float, extra: list[str]) -> list[str]:
    """`key=value` overrides of configs/base.yml for `rc` on the CPU."""
    args = {
        "run_name": run_name,
        "base_output_directory": output_dir,
        "hardware": "cpu",
        "skip_jax_distributed_system": "true",
        "dataset_type": "synthetic",
        "steps": str(steps),
        "enable_checkpointing": "false",
        "enable_goodput_recording": "false",
        "monitor_goodput": "false",
        "enable_tensorboard": "false",
        "log_period": str(10 * steps),
        # The network: base.yml's decoder_block is llama2 (RMSNorm, RoPE, SwiGLU, untied).
        "decoder_block": "llama2",
        "base_emb_dim": str(rc.emb_dim),
        "base_num_decoder_layers": str(rc.num_layers),
        "base_num_query_heads": str(rc.num_heads),
        "base_num_kv_heads": str(rc.num_heads),
        "head_dim": str(rc.head_dim),
        "base_mlp_dim": str(rc.mlp_dim),
        "vocab_size": str(rc.vocab_size),
        "max_target_length": str(rc.seq_len),
        "per_device_batch_size": str(rc.batch_size),  # one CPU device
        "dtype": rc.dtype,
        "weight_dtype": "float32",
        "matmul_precision": "default",
        "attention": "dot_product",
        "remat_policy": remat,
        "z_loss_multiplier": repr(float(z_loss)),
        "dropout_rate": "0.0",
        "opt_type": "adamw",
        "gradient_clipping_threshold": "1.0",
        "gradient_accumulation_steps": "1",
    }
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--maxtext_overrides item {item!r} is not key=value")
        args[key] = value
    return [f"{k}={v}" for k, v in args.items()]


_STEP_RE = re.compile(
    r"completed step: (\d+), seconds: ([0-9.]+), TFLOP/s/device: ([0-9.]+), "
    r"Tokens/s/device: ([0-9.]+).*?\bloss: ([0-9.naif]+)")
_TFLOPS_RE = re.compile(r"Total TFLOPs: ([0-9.]+)")


def _proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads), from /proc; None where unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def run_maxtext(venv: str, base_yml: str, rc: RaceConfig, *, steps: int, warmup: int,
                remat: str, z_loss: float, extra: list[str], log_dir: str,
                tag: str) -> dict[str, Any]:
    """One MaxText training subprocess; its steady per-step times and losses."""
    run_name = f"vs_{rc.name}_{tag}"
    cmd = [venv_python(venv), "-m", "maxtext.trainers.pre_train.train", base_yml,
           *maxtext_args(rc, steps=steps, run_name=run_name, output_dir=log_dir, remat=remat,
                         z_loss=z_loss, extra=extra)]
    log_path = os.path.join(log_dir, f"{run_name}.log")
    steps_seen: list[dict[str, float]] = []
    tflops_logged = None
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=_child_env(), cwd=log_dir)
        for line in proc.stdout:
            log.write(line)
            m = _STEP_RE.search(line)
            if m:
                steps_seen.append({
                    "step": int(m.group(1)), "seconds": float(m.group(2)),
                    "tflop_s": float(m.group(3)), "loss": float(m.group(5)),
                    "cpu_s": _proc_cpu_seconds(proc.pid), "wall": time.perf_counter(),
                })
                continue
            m = _TFLOPS_RE.search(line)
            if m:
                tflops_logged = float(m.group(1))
        rc_code = proc.wait()
    total_s = time.perf_counter() - start
    if rc_code != 0 or len(steps_seen) < steps:
        raise RuntimeError(f"MaxText exited with {rc_code} after {len(steps_seen)}/{steps} "
                           f"steps; log {log_path}:\n{harness.log_tail(log_path)}")
    # A step's logged seconds is the wall time between loop iterations; its CPU seconds
    # are the process's CPU time between consecutive step lines (printed one step late,
    # the same lag for every step).
    cpu = [None] + [
        (b["cpu_s"] - a["cpu_s"]) if a["cpu_s"] is not None and b["cpu_s"] is not None else None
        for a, b in itertools.pairwise(steps_seen)]
    timed = steps_seen[warmup:]
    return {
        "framework": "maxtext",
        "command": cmd,
        "log": log_path,
        "process_s": round(total_s, 2),
        "first_steps_s": [s["seconds"] for s in steps_seen[:warmup]],
        "step_times_s": [s["seconds"] for s in timed],
        "step_cpu_s": [c for c in cpu[warmup:] if c is not None],
        "losses": [s["loss"] for s in steps_seen],
        "maxtext_logged_tflops_per_step": tflops_logged,
        "maxtext_logged_tflop_s": [s["tflop_s"] for s in timed],
    }


# --- t5x_like (a worker subprocess) ---------------------------------------------------------


def _t5x_optimizer():
    from t5x_like import optimizers

    base = optimizers.adamw(
        learning_rate=optimizers.warmup_cosine(3e-4, 10, 1000, end_value=3e-5),
        b1=0.9, b2=0.95, weight_decay=0.1,
    )
    return optimizers.build_optimizer(base, grad_clip_norm=1.0)


def _t5x_batch(rc: RaceConfig, seed: int) -> dict[str, Any]:
    """Random tokens in [1, V) shifted by one, as MaxText's synthetic batches; all weighted."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, rc.vocab_size, (rc.batch_size, rc.seq_len + 1), dtype=np.int32)
    return {
        "decoder_input_tokens": tokens[:, :-1],
        "decoder_target_tokens": tokens[:, 1:],
        "decoder_loss_weights": np.ones((rc.batch_size, rc.seq_len), np.int32),
    }


def t5x_worker(rc: RaceConfig, steps: int, warmup: int, z_loss: float, peak_size: int,
               dump_to: str | None) -> dict[str, Any]:
    """Builds and trains the t5x_like decoder in this process; returns its timings."""
    import jax
    import seqio

    from models import decoder_only
    from t5x_like import model_api
    from t5x_like.runtime import Runtime
    from t5x_like.trainer import Trainer

    cfg = decoder_only.DecoderOnlyConfig(
        vocab_size=rc.vocab_size, emb_dim=rc.emb_dim, num_heads=rc.num_heads,
        head_dim=rc.head_dim, mlp_dim=rc.mlp_dim, num_layers=rc.num_layers,
        mlp_activations=("silu", "linear"), position_embedding="rope",
        max_length=rc.seq_len, rope_theta=10000.0, norm="rmsnorm", layer_norm_epsilon=1e-5,
        use_bias=False, tie_embeddings=False, dropout_rate=0.0, dtype=rc.dtype,
        param_dtype="float32",
    )
    model = model_api.DecoderOnlyModel(
        cfg, seqio.PassThroughVocabulary(rc.vocab_size),
        loss=model_api.LossConfig(z_loss=z_loss))
    start = time.perf_counter()
    runtime = Runtime.build(model)
    trainer = Trainer(runtime, _t5x_optimizer())
    state = trainer.init_state(runtime.init_params())
    jax.block_until_ready(state)
    setup_s = time.perf_counter() - start
    partitioner = runtime.partitioner
    batches = [partitioner.make_global_batch(_t5x_batch(rc, seed)) for seed in range(2)]
    with partitioner.activate():
        start = time.perf_counter()
        compiled = trainer.train_step.lower(state, batches[0]).compile()
        compile_s = time.perf_counter() - start
    if dump_to:
        with open(dump_to, "w") as f:
            f.write(compiled.as_text())
    times, cpu, losses = [], [], []
    for i in range(warmup + steps):
        with harness.Timer() as t:
            state, metrics = trainer.run_train_step(state, batches[i % 2])
            jax.block_until_ready((state, metrics))
        times.append(t.wall)
        cpu.append(t.cpu)
        losses.append(float(metrics["loss"]))
    return {
        "framework": "t5x_like",
        "jax": jax.__version__,
        "setup_s": round(setup_s, 3),
        "compile_s": round(compile_s, 3),
        "first_steps_s": times[:warmup],
        "step_times_s": times[warmup:],
        "step_cpu_s": cpu[warmup:],
        "losses": losses,
        "num_params": sum(x.size for x in jax.tree.leaves(state.params)),
        "peaks": measure_peaks(peak_size),
    }


def measure_peaks(peak_size: int) -> dict[str, Any]:
    """Best n×n matmul FLOP/s per dtype with this interpreter's jax."""
    import jax

    sys.path.insert(0, HERE)
    from train_throughput import measure_matmul_peak

    return {"jax": jax.__version__,
            **{d: max(measure_matmul_peak(d, peak_size)) for d in ("float32", "bfloat16")}}


def _run_worker(python: str, worker_args: list[str], log_path: str, cwd: str,
                pythonpath: str | None) -> dict[str, Any]:
    env = _child_env()
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [python, os.path.abspath(__file__), *worker_args]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                             cwd=cwd)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"worker {' '.join(worker_args)} exited with {out.returncode}; "
                           f"log {log_path}:\n{harness.log_tail(log_path)}")
    result = json.loads(lines[-1][len(RESULT_TAG):])
    result["process_s"] = round(time.perf_counter() - start, 2)
    result["command"] = cmd
    return result


# --- report --------------------------------------------------------------------------------


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(rc: RaceConfig, runs: dict[str, list[dict]], peaks: dict[str, dict]
              ) -> dict[str, Any]:
    """Per framework: median step time over every round's steady steps, tokens/s, MFU."""
    flops = model_flops(rc)
    out: dict[str, Any] = {"config": dataclasses.asdict(rc), "model_flops_per_step": flops,
                           "maxtext_flops_per_step": maxtext_flops(rc)}
    for fw, results in runs.items():
        times = [t for r in results for t in r["step_times_s"]]
        cpu = [c for r in results for c in r["step_cpu_s"]]
        per_round = [statistics.median(r["step_times_s"]) for r in results]
        median, iqr = harness.median_iqr(times)
        peak = peaks[fw][rc.dtype]
        out[fw] = {
            "rounds": len(results),
            "steps_timed": len(times),
            "step_time_median_s": median,
            "step_time_iqr_s": iqr,
            "step_time_round_medians_s": per_round,
            "step_cpu_median_s": _median(cpu),
            "tokens_per_s": rc.tokens_per_step / median,
            "tokens_per_cpu_s": rc.tokens_per_step / _median(cpu) if cpu else None,
            "model_flop_per_s": flops["total"] / median,
            "peak_flop_per_s": peak,
            "peak_jax": peaks[fw]["jax"],
            "mfu": flops["total"] / median / peak,
            "final_loss": results[-1]["losses"][-1],
            "runs": results,
        }
    if "t5x_like" in out and "maxtext" in out:
        a, b = out["t5x_like"], out["maxtext"]
        out["ratio_t5x_over_maxtext"] = {
            "tokens_per_s": a["tokens_per_s"] / b["tokens_per_s"],
            "tokens_per_cpu_s": (a["tokens_per_cpu_s"] / b["tokens_per_cpu_s"]
                                 if a["tokens_per_cpu_s"] and b["tokens_per_cpu_s"] else None),
        }
    return out


def _table(doc: dict[str, Any]) -> str:
    peaks = doc["matmul_peaks"]
    lines = [
        f"cpus: {doc['machine']['cpu_count']}  load average before/after: "
        f"{doc['machine']['load_average_before']} / {doc['machine']['load_average_after']}",
        f"rounds: {doc['rounds']}, each a fresh process per framework and config; "
        f"t5x_like {doc['steps']} steps timed after {doc['warmup']}, MaxText "
        f"{doc['steps']} after {doc['maxtext_warmup']}",
    ]
    for fw, p in peaks.items():
        lines.append(f"matmul peak {fw} (jax {p['jax']}): float32 {p['float32'] / 1e9:.1f} "
                     f"GFLOP/s, bfloat16 {p['bfloat16'] / 1e9:.1f} GFLOP/s")
    lines.append("")
    header = ("config", "framework", "step ms", "IQR ms", "tokens/s", "cpu-s/step",
              "GFLOP/s", "MFU", "t5x/MaxText tok/s", "(per cpu-s)")
    rows = [header]
    for r in doc["results"]:
        ratio = r.get("ratio_t5x_over_maxtext", {})
        for fw in ("maxtext", "t5x_like"):
            if fw not in r:
                continue
            x = r[fw]
            lo, hi = x["step_time_iqr_s"]
            last = fw == "t5x_like" and ratio
            rows.append((
                r["config"]["name"], fw,
                f"{x['step_time_median_s'] * 1e3:.0f}",
                f"{lo * 1e3:.0f}-{hi * 1e3:.0f}",
                f"{x['tokens_per_s']:,.0f}",
                "n/a" if x["step_cpu_median_s"] is None else f"{x['step_cpu_median_s']:.2f}",
                f"{x['model_flop_per_s'] / 1e9:.1f}",
                f"{100 * x['mfu']:.1f}%",
                f"{ratio['tokens_per_s']:.2f}" if last else "",
                f"{ratio['tokens_per_cpu_s']:.2f}" if last and ratio["tokens_per_cpu_s"] else "",
            ))
    flops = doc["results"][0]["model_flops_per_step"]["total"] if doc["results"] else 0
    lines += [
        *report.table(rows, left=2),
        "",
        "step ms = median over all rounds' steady steps (IQR: 25th-75th percentiles);",
        "tokens/s = B*L / step; cpu-s/step = the process's CPU seconds per step (all threads);",
        f"GFLOP/s = model FLOPs per step ({flops / 1e9:.1f} G, model_flops) / step;",
        "MFU = that / the matmul peak of the activation dtype measured with the framework's jax.",
    ]
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = harness.argument_parser(__doc__)
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated names; known: {', '.join(CONFIGS)}")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds; each runs MaxText then t5x_like once per config")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed t5x_like steps per process (after compiling)")
    parser.add_argument("--maxtext_warmup", type=int, default=3,
                        help="untimed MaxText steps per process (its dispatch runs ahead)")
    parser.add_argument("--frameworks", default="maxtext,t5x_like")
    parser.add_argument("--venv", default=DEFAULT_VENV, help="the MaxText virtualenv")
    parser.add_argument("--python312", default=None, help="Python 3.12 to build the venv")
    parser.add_argument("--skip_build", action="store_true",
                        help="use --venv as it is (fail if it lacks maxtext)")
    parser.add_argument("--maxtext_remat", default="minimal",
                        help="MaxText remat_policy (its default is 'full')")
    parser.add_argument("--maxtext_overrides", default="",
                        help="extra space-separated key=value MaxText overrides")
    parser.add_argument("--z_loss", type=float, default=0.0,
                        help="z-loss coefficient of both sides (MaxText z_loss_multiplier)")
    parser.add_argument("--t5x_jax", choices=("maxtext", "this"), default="maxtext",
                        help="'maxtext': run the t5x_like worker in a venv with MaxText's "
                        "jax/jaxlib/flax/optax (built on first use; the same XLA on both "
                        "sides); 'this': with this interpreter's jax")
    parser.add_argument("--t5x_python", default=None,
                        help="interpreter of the t5x_like worker (overrides --t5x_jax)")
    parser.add_argument("--peak_size", type=int, default=2048)
    parser.add_argument("--log_dir", default=None,
                        help="logs of every subprocess (default: a new temp dir)")
    parser.add_argument("--json_out", default=None)
    parser.add_argument("--dump_hlo", action="store_true",
                        help="write each t5x_like optimized HLO next to its log")
    # Internal: run one measurement in this process and print its JSON.
    parser.add_argument("--worker", choices=("t5x_like", "peak"), default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--dump_to", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.config_names = harness.names(parser, args.configs, CONFIGS, "configs")
    args.framework_names = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    bad = set(args.framework_names) - {"maxtext", "t5x_like"}
    if bad or not args.framework_names:
        parser.error(f"--frameworks {args.frameworks!r}: use maxtext and/or t5x_like")
    if args.steps < 1 or args.warmup < 1 or args.maxtext_warmup < 1 or args.rounds < 1:
        parser.error("--steps, --warmup, --maxtext_warmup and --rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    if args.worker:
        if args.worker == "peak":
            result = measure_peaks(args.peak_size)
        else:
            sys.path.insert(0, REPO)
            result = t5x_worker(CONFIGS[args.config_names[0]], args.steps, args.warmup,
                                args.z_loss, args.peak_size, args.dump_to)
        print(RESULT_TAG + json.dumps(result))
        return result

    log_dir = args.log_dir or tempfile.mkdtemp(prefix="vs_maxtext_")
    os.makedirs(log_dir, exist_ok=True)
    base_yml = None
    if "maxtext" in args.framework_names:
        base_yml = os.path.join(build_venv(args.venv, args.python312, args.skip_build),
                                "configs", "base.yml")
    t5x_python = args.t5x_python or sys.executable
    if "t5x_like" in args.framework_names and not args.t5x_python and args.t5x_jax == "maxtext":
        if base_yml is None:
            build_venv(args.venv, args.python312, args.skip_build)
        t5x_python = build_same_jax_venv(args.venv, args.python312, args.skip_build)
    extra = args.maxtext_overrides.split()
    load_before = list(os.getloadavg())
    runs: dict[str, dict[str, list[dict]]] = {n: {f: [] for f in args.framework_names}
                                              for n in args.config_names}
    peaks: dict[str, list[dict]] = {f: [] for f in args.framework_names}
    for round_index in range(args.rounds):
        for name in args.config_names:
            rc = CONFIGS[name]
            tag = f"r{round_index}"
            for fw in args.framework_names:
                print(f"[vs_maxtext] round {round_index + 1}/{args.rounds}: {name} {fw} ...",
                      file=sys.stderr)
                if fw == "maxtext":
                    result = run_maxtext(
                        args.venv, base_yml, rc, steps=args.maxtext_warmup + args.steps,
                        warmup=args.maxtext_warmup, remat=args.maxtext_remat,
                        z_loss=args.z_loss, extra=extra, log_dir=log_dir, tag=tag)
                else:
                    worker = ["--worker", "t5x_like", "--configs", name,
                              "--steps", str(args.steps), "--warmup", str(args.warmup),
                              "--z_loss", repr(args.z_loss), "--peak_size", str(args.peak_size)]
                    if args.dump_hlo:
                        worker += ["--dump_to", os.path.join(log_dir, f"t5x_{name}.hlo.txt")]
                    result = _run_worker(t5x_python, worker,
                                         os.path.join(log_dir, f"t5x_{name}_{tag}.log"),
                                         REPO, REPO)
                    peaks["t5x_like"].append(result.pop("peaks"))
                runs[name][fw].append(result)
                steady = statistics.median(result["step_times_s"])
                print(f"[vs_maxtext]   median step {steady * 1e3:.0f} ms = "
                      f"{rc.tokens_per_step / steady:,.0f} tokens/s", file=sys.stderr)
        if "maxtext" in args.framework_names:
            peaks["maxtext"].append(_run_worker(
                venv_python(args.venv), ["--worker", "peak", "--peak_size", str(args.peak_size)],
                os.path.join(log_dir, f"peak_maxtext_r{round_index}.log"), log_dir, None))
    best_peaks = {fw: {"jax": ps[0]["jax"],
                       **{d: max(p[d] for p in ps) for d in ("float32", "bfloat16")}}
                  for fw, ps in peaks.items()}
    doc = report.document(
        "vs_maxtext",
        machine={
            **report.host(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        t5x_like_python=t5x_python,
        maxtext={"requirement": MAXTEXT_REQUIREMENT, "venv": args.venv,
                 "remat_policy": args.maxtext_remat, "overrides": extra},
        z_loss=args.z_loss,
        rounds=args.rounds,
        steps=args.steps,
        warmup=args.warmup,
        maxtext_warmup=args.maxtext_warmup,
        log_dir=log_dir,
        matmul_peaks=best_peaks,
        results=[summarize(CONFIGS[n], runs[n], best_peaks) for n in args.config_names],
    )
    return report.emit(doc, _table(doc), args.json_out)


if __name__ == "__main__":
    main()

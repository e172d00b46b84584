"""Training throughput of the real jitted train step: compile time, step time, tokens/s, MFU.

    python benchmarks/train_throughput.py                      # default configs, 1 device
    python benchmarks/train_throughput.py --steps 20 --configs tiny_b32_adamw,small_b8_adafactor
    python benchmarks/train_throughput.py --devices 8          # simulated 8-device data mesh
    python benchmarks/train_throughput.py --json_out /tmp/train_throughput.json

It builds exactly what a run builds (`Runtime.build(model)`, `Trainer(runtime, optimizer)`,
`trainer.init_state(runtime.init_params())`) and times `trainer.run_train_step(state, batch)`
on synthetic token batches made by `partitioner.make_global_batch` (no data pipeline, so
the step alone is measured). Every step is timed on its own up to `block_until_ready` of
the new state and metrics; configs are interleaved (A B C A B C ...) so that a noisy
neighbour on the machine hits all of them alike, and medians are reported.

For each config it reports: compile time (trace + lower, then XLA compile), the median
step time over `--steps` timed steps after `--warmup` steps, tokens/s (encoder + decoder
positions per second), the analytic model FLOPs per step (see `model_flops`) next to
XLA's own count (`compiled.cost_analysis()['flops']`), the achieved model FLOP/s and MFU
against a matmul peak measured on this machine in this run (`measure_matmul_peak`: best
of several large jitted matmuls, re-measured between rounds).

Prints one JSON document, then a table. The default run takes about 1.5 minutes on an
idle 2-core CPU machine (about 3 when other work shares the cores). Speed is measured here,
never asserted in tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import statistics
import sys
import time
from typing import Any

import harness  # benchmarks/harness.py and report.py: this script's directory is on sys.path
import report

# --- configs -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One benchmarked training set-up."""

    name: str
    size: str  # a `models.encoder_decoder.PRESETS` key
    vocab_size: int
    batch_size: int
    inputs_length: int  # encoder positions S
    targets_length: int  # decoder positions T
    optimizer: str  # 'adafactor' | 'adamw'
    dtype: str = "float32"  # activation dtype

    @property
    def tokens_per_step(self) -> int:
        """Encoder + decoder positions of one global batch."""
        return self.batch_size * (self.inputs_length + self.targets_length)


def _quickstart(batch: int, optimizer: str, dtype: str = "float32") -> BenchConfig:
    suffix = "" if dtype == "float32" else f"_{dtype}"
    return BenchConfig(f"tiny_b{batch}_{optimizer}{suffix}", "tiny", 8192, batch, 128, 29,
                       optimizer, dtype)


CONFIGS: dict[str, BenchConfig] = {
    c.name: c
    for c in [
        # (a) the quickstart model (experiments/quickstart.gin: inputs 128, targets 29).
        _quickstart(16, "adafactor"),
        _quickstart(16, "adamw"),
        _quickstart(32, "adafactor"),
        _quickstart(32, "adamw"),
        # (b) T5 v1.1 small (float32 activations on CPU) at short lengths.
        BenchConfig("small_b8_adafactor", "small", 32128, 8, 64, 16, "adafactor"),
        # Not run by default (pass --configs): bfloat16 activations, small with AdamW.
        _quickstart(32, "adamw", "bfloat16"),
        BenchConfig("small_b8_adamw", "small", 32128, 8, 64, 16, "adamw"),
    ]
}
DEFAULT_CONFIGS = ("tiny_b16_adafactor", "tiny_b16_adamw", "tiny_b32_adafactor",
                   "tiny_b32_adamw", "small_b8_adafactor")


# --- analytic FLOPs ------------------------------------------------------------------------


def matmul_params(cfg) -> dict[str, int]:
    """Non-embedding matmul parameters of a `T5Config`, grouped by the tokens they see.

    enc_layers: every encoder layer's q, k, v, o and MLP kernels (applied to S positions);
    dec_layers: every decoder layer's self-attention q, k, v, o, cross-attention q, o and
    MLP kernels (applied to T positions); cross_kv: every decoder layer's cross-attention
    k, v kernels (applied to the S encoder outputs); logits: the output projection D x V
    (applied to T positions; the tied embedding's `attend` costs the same).
    """
    d, n, k, h, f = cfg.emb_dim, cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.mlp_dim
    attn = d * n * h + 2 * d * k * h + n * h * d  # q, k, v, o
    mlp = (len(cfg.mlp_activations) + 1) * d * f  # wi_0..wi_{a-1}, wo
    return {
        "enc_layers": cfg.num_encoder_layers * (attn + mlp),
        "dec_layers": cfg.num_decoder_layers * (attn + 2 * d * n * h + mlp),
        "cross_kv": cfg.num_decoder_layers * 2 * d * k * h,
        "logits": d * cfg.vocab_size,
    }


def model_flops(cfg, batch: int, inputs_length: int, targets_length: int) -> dict[str, float]:
    """Model FLOPs of one training step (forward + backward), by part, and their total.

    A multiply-add is 2 FLOPs; the backward pass of a matmul costs twice its forward
    (gradient w.r.t. the input and w.r.t. the weight), so training = 3 × forward = 6 ×
    params × tokens. With B batch, S = inputs_length, T = targets_length, N heads, K kv
    heads, H head dim, D model dim, F mlp dim, a gated activations, V vocab, L_e / L_d
    encoder / decoder layers and P the `matmul_params` groups:

        matmuls   = 6·B·( S·P_enc_layers + T·P_dec_layers + S·P_cross_kv )
                    P_enc_layers = L_e·(2·D·N·H + 2·D·K·H + (a+1)·D·F)
                    P_dec_layers = L_d·(4·D·N·H + 2·D·K·H + (a+1)·D·F)
                    P_cross_kv   = L_d·2·D·K·H    (cross-attention K/V of the S encoder outputs)
        attention = 3·4·B·N·H·( L_e·S·S + L_d·T·T + L_d·T·S )
                    (q·kᵀ scores and weights·v, 2·N·H FLOPs per query-key pair each; the
                    causal decoder self-attention is counted in full, as it is computed)
        logits    = 6·B·T·D·V

    Not counted (the usual MFU convention; XLA's own count includes them): embedding
    gathers and their scatter-add gradients, norms, softmax, activations, masks, the
    relative position bias, the loss and the optimizer update.
    """
    p = matmul_params(cfg)
    b, s, t = batch, inputs_length, targets_length
    heads_dim = cfg.num_heads * cfg.head_dim
    parts = {
        "encoder_matmuls": 6.0 * b * s * p["enc_layers"],
        "decoder_matmuls": 6.0 * b * t * p["dec_layers"],
        "cross_kv_matmuls": 6.0 * b * s * p["cross_kv"],
        "attention": 12.0 * b * heads_dim * (cfg.num_encoder_layers * s * s
                                              + cfg.num_decoder_layers * (t * t + t * s)),
        "logits": 6.0 * b * t * p["logits"],
    }
    parts["total"] = sum(parts.values())
    return parts


def count_params(abstract_params) -> tuple[int, int]:
    """(all parameters, non-embedding matmul parameters) of a parameter pytree.

    Non-embedding matmul parameters: every kernel of >= 2 dims except the token
    embedding, the output logits and the relative position bias table.
    """
    import jax

    total = nonembed = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
        size = math.prod(leaf.shape)
        total += size
        name = jax.tree_util.keystr(path)
        skip = any(s in name for s in ("token_embedder", "logits_dense", "relpos"))
        if len(leaf.shape) >= 2 and not skip:
            nonembed += size
    return total, nonembed


# --- measurement ---------------------------------------------------------------------------


def measure_matmul_peak(dtype_name: str, n: int = 2048, repeats: int = 5) -> list[float]:
    """FLOP/s of `repeats` timed n×n @ n×n jitted matmuls (after one warm-up call)."""
    import jax
    import jax.numpy as jnp

    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype_name)
    b = jax.random.normal(key_b, (n, n), jnp.float32).astype(dtype_name)
    matmul = _matmul_fn()
    matmul(a, b).block_until_ready()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        rates.append(2.0 * n**3 / (time.perf_counter() - start))
    return rates


@functools.cache
def _matmul_fn():
    import jax

    return jax.jit(lambda a, b: a @ b)


def _xla_cost(compiled) -> dict[str, float | None]:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return {"flops": None, "bytes_accessed": None}
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    cost = cost or {}
    return {"flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed")}


def _synthetic_batch(bc: BenchConfig, seed: int):
    """EncDec features of one global batch: random ids in [2, V), no padding, EOS last."""
    import numpy as np

    rng = np.random.default_rng(seed)
    b, s, t = bc.batch_size, bc.inputs_length, bc.targets_length
    inputs = rng.integers(2, bc.vocab_size, (b, s), dtype=np.int32)
    targets = rng.integers(2, bc.vocab_size, (b, t), dtype=np.int32)
    inputs[:, -1] = targets[:, -1] = 1  # EOS
    decoder_inputs = np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]], axis=1)
    return {
        "encoder_input_tokens": inputs,
        "decoder_input_tokens": decoder_inputs,
        "decoder_target_tokens": targets,
        "decoder_loss_weights": np.ones((b, t), np.float32),
    }


def _optimizer(name: str):
    """The optimizers runs use: AdamW as experiments/quickstart.gin, Adafactor as
    gin/runs/pretrain.gin (both behind global-norm clipping at 1.0)."""
    from t5x_like import optimizers

    if name == "adamw":
        base = optimizers.adamw(
            learning_rate=optimizers.warmup_cosine(3e-3, 50, 600, end_value=3e-4),
            weight_decay=0.01,
        )
    elif name == "adafactor":
        base = optimizers.adafactor(learning_rate=optimizers.warmup_rsqrt())
    else:
        raise ValueError(f"unknown optimizer {name!r}; use 'adafactor' or 'adamw'")
    return optimizers.build_optimizer(base, grad_clip_norm=1.0)


class _Bench:
    """One config: built, compiled, with its live train state and its timings."""

    def __init__(self, bc: BenchConfig):
        import jax
        import seqio

        from models import encoder_decoder
        from t5x_like import model_api
        from t5x_like.runtime import Runtime
        from t5x_like.trainer import Trainer

        self.bc = bc
        self.cfg = encoder_decoder.t5_1_1(bc.size, vocab_size=bc.vocab_size, dtype=bc.dtype)
        model = model_api.EncoderDecoderModel(self.cfg, seqio.PassThroughVocabulary(bc.vocab_size))
        start = time.perf_counter()
        self.runtime = Runtime.build(model)
        self.trainer = Trainer(self.runtime, _optimizer(bc.optimizer))
        self.state = self.trainer.init_state(self.runtime.init_params())
        jax.block_until_ready(self.state)
        self.setup_s = time.perf_counter() - start
        partitioner = self.runtime.partitioner
        self.batches = [partitioner.make_global_batch(_synthetic_batch(bc, seed))
                        for seed in range(2)]

        with partitioner.activate():
            start = time.perf_counter()
            lowered = self.trainer.train_step.lower(self.state, self.batches[0])
            self.lower_s = time.perf_counter() - start
            start = time.perf_counter()
            compiled = lowered.compile()
            self.compile_s = time.perf_counter() - start
        # XLA counts one device's SPMD program; every device of the mesh runs one.
        self.num_devices = partitioner.mesh.size
        self.xla = _xla_cost(compiled)
        self.num_params, self.nonembed_params = count_params(self.runtime.net.abstract_params())
        self.flops = model_flops(self.cfg, bc.batch_size, bc.inputs_length, bc.targets_length)
        self.step_times: list[float] = []
        self.warmup_times: list[float] = []
        self.loss: float | None = None

    def step(self, index: int, timed: bool) -> None:
        import jax

        batch = self.batches[index % len(self.batches)]
        start = time.perf_counter()
        self.state, metrics = self.trainer.run_train_step(self.state, batch)
        jax.block_until_ready((self.state, metrics))
        elapsed = time.perf_counter() - start
        (self.step_times if timed else self.warmup_times).append(elapsed)
        if timed:
            self.loss = float(metrics["loss"])

    def result(self, peak_flops: dict[str, float]) -> dict[str, Any]:
        bc, times = self.bc, self.step_times
        median, iqr = harness.median_iqr(times)
        model_flop_s = self.flops["total"] / median
        peak = peak_flops[bc.dtype if bc.dtype in peak_flops else "float32"]
        matmul = matmul_params(self.cfg)
        analytic_nonembed = matmul["enc_layers"] + matmul["dec_layers"] + matmul["cross_kv"]
        xla_flops = self.xla["flops"] * self.num_devices if self.xla["flops"] else None
        return {
            "config": dataclasses.asdict(bc),
            "mesh": dict(self.runtime.partitioner.mesh.shape),
            "num_params": self.num_params,
            "nonembed_matmul_params": self.nonembed_params,
            "nonembed_matmul_params_analytic": analytic_nonembed,
            "tokens_per_step": bc.tokens_per_step,
            "setup_s": round(self.setup_s, 3),
            "trace_lower_s": round(self.lower_s, 3),
            "compile_s": round(self.compile_s, 3),
            "first_steps_s": [round(t, 4) for t in self.warmup_times],
            "step_times_s": [round(t, 4) for t in times],
            "step_time_median_s": median,
            "step_time_iqr_s": iqr,
            "step_time_min_s": min(times),
            "tokens_per_s": bc.tokens_per_step / median,
            "model_flops_per_step": self.flops,
            "xla_flops_per_device": self.xla["flops"],
            "xla_flops_per_step": xla_flops,
            "xla_bytes_accessed_per_device": self.xla["bytes_accessed"],
            "xla_over_model_flops": xla_flops / self.flops["total"] if xla_flops else None,
            "model_flop_per_s": model_flop_s,
            "mfu_peak_dtype": bc.dtype if bc.dtype in peak_flops else "float32",
            "mfu": model_flop_s / peak,
            "final_loss": self.loss,
        }


# --- report --------------------------------------------------------------------------------


def _table(doc: dict[str, Any]) -> str:
    peak = doc["matmul_peak"]
    lines = [
        f"devices: {doc['machine']['num_devices']} x {doc['machine']['backend']}  "
        f"cpus: {doc['machine']['cpu_count']}  jax {doc['machine']['jax']}  "
        f"steps: {doc['steps']} timed after {doc['warmup']} warm-up, interleaved",
        "matmul peak ({size}x{size} @ {size}x{size}, best of {n32} / {n16} runs): "
        "float32 {f32:.1f} GFLOP/s, bfloat16 {bf16:.1f} GFLOP/s".format(
            size=peak["size"], n32=peak["runs"]["float32"], n16=peak["runs"]["bfloat16"],
            f32=peak["best_flop_per_s"]["float32"] / 1e9,
            bf16=peak["best_flop_per_s"]["bfloat16"] / 1e9),
        "",
    ]
    header = ("config", "params", "B", "S/T", "compile s", "step ms", "IQR ms", "tokens/s",
              "model GF", "XLA GF", "GFLOP/s", "MFU")
    rows = [header]
    for r in doc["results"]:
        c = r["config"]
        lo, hi = r["step_time_iqr_s"]
        xla = r["xla_flops_per_step"]
        rows.append((
            c["name"],
            f"{r['num_params'] / 1e6:.1f}M",
            str(c["batch_size"]),
            f"{c['inputs_length']}/{c['targets_length']}",
            f"{r['trace_lower_s'] + r['compile_s']:.1f}",
            f"{r['step_time_median_s'] * 1e3:.0f}",
            f"{lo * 1e3:.0f}-{hi * 1e3:.0f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['model_flops_per_step']['total'] / 1e9:.2f}",
            "n/a" if xla is None else f"{xla / 1e9:.2f}",
            f"{r['model_flop_per_s'] / 1e9:.1f}",
            f"{100 * r['mfu']:.1f}%",
        ))
    lines += [
        *report.table(rows),
        "",
        "compile s = trace + lower + XLA compile; step ms = median wall time of one",
        "run_train_step up to block_until_ready; IQR = its 25th-75th percentiles;",
        "tokens/s = B*(S+T)/step; model GF = analytic training FLOPs per step (model_flops);",
        "XLA GF = compiled.cost_analysis()['flops'] of one device's program x devices (it also",
        "counts elementwise ops and the optimizer); MFU = model FLOP/s / the measured matmul",
        "peak of the activation dtype.",
    ]
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = harness.argument_parser(__doc__)
    parser.add_argument("--steps", type=int, default=10,
                        help="timed steps per config (after --warmup steps)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per config")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help=f"comma-separated names, or 'all'; known: {', '.join(CONFIGS)}")
    harness.add_devices_flag(parser)
    parser.add_argument("--json_out", default=None, help="also write the JSON document here")
    parser.add_argument("--peak_size", type=int, default=2048, help="n of the n×n peak matmul")
    args = parser.parse_args(argv)
    args.config_names = harness.names(parser, args.configs, CONFIGS, "configs", allow_all=True)
    harness.check_steps(parser, args.steps, args.warmup)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    jax = harness.import_jax(args.devices)

    peaks: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for dtype in peaks:
        peaks[dtype] += measure_matmul_peak(dtype, args.peak_size)

    benches = []
    for name in args.config_names:
        print(f"[train_throughput] building and compiling {name} ...", file=sys.stderr)
        benches.append(_Bench(CONFIGS[name]))

    # Interleaved rounds: every config takes one step per round (A B C A B C ...), and the
    # float32 matmul peak is re-measured once per round, so noise hits everything alike.
    for round_index, timed in harness.rounds(args.warmup, args.steps, "train_throughput"):
        for bench in benches:
            bench.step(round_index, timed)
        peaks["float32"] += measure_matmul_peak("float32", args.peak_size, repeats=1)
    peaks["bfloat16"] += measure_matmul_peak("bfloat16", args.peak_size)

    best = {dtype: max(rates) for dtype, rates in peaks.items()}
    doc = report.document(
        "train_throughput",
        machine={**report.jax_machine(jax), "load_average":
                 list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        steps=args.steps,
        warmup=args.warmup,
        matmul_peak={
            "size": args.peak_size,
            "runs": {d: len(r) for d, r in peaks.items()},
            "best_flop_per_s": best,
            "median_flop_per_s": {d: statistics.median(r) for d, r in peaks.items()},
        },
        results=[bench.result(best) for bench in benches],
    )
    return report.emit(doc, _table(doc), args.json_out)


if __name__ == "__main__":
    main()

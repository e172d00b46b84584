"""Sparse MoE against the dense model of the same active size: tokens/s and FLOPs per token.

    python benchmarks/moe.py                        # B=8, L=256, 10 timed rounds (~3-4 min)
    python benchmarks/moe.py --quick                # B=4, L=128, 3 rounds (< 2 min)
    python benchmarks/moe.py --devices 8 --expert 4 # simulated mesh: expert 4 x data 2
    python benchmarks/moe.py --capacity_factor 2.0 --json_out /tmp/moe.json

Side by side, in one process, on one mesh:

  dense     `decoder_only.PRESETS['llama_tiny']` (SwiGLU MLP of F=768)
  dropless  `PRESETS['mixtral_tiny']`: 8 experts of F=384, top-2 (the same active
            parameters per token, plus the routers), sorted tokens through
            `jax.lax.ragged_dot`; nothing dropped
  capacity  the same network with dispatch='capacity' (GShard / Switch buffers,
            `--capacity_factor`, default 1.25, in training; the preset's
            `eval_capacity_factor` in the forward-only pass)

Training: the real step users run (`Runtime.build(model)`, `Trainer(runtime, AdamW)`,
`trainer.run_train_step` on synthetic next-token batches from
`partitioner.make_global_batch`), each step timed up to `block_until_ready`, wall and
process CPU seconds. Forward-only: `trainer.run_eval_step` (the deterministic loss
forward pass of eval). Rounds alternate the order of the configs (A B C, C B A, ...) so
that other work on the machine hits them alike; medians over the timed rounds are
reported, the warm-up steps (the first re-traces) and compile times separately.

FLOPs per token, three counts (see `flops_per_token`):

  analytic  the model's: 6 x active matmul parameters per token (forward + backward;
            2 x in the forward-only pass) + causal attention computed in full + logits
  executed  what the code asks the backend to multiply: capacity dispatch runs every
            expert on all E*C slots of a group (C / (k*S/E) = ~capacity_factor times the
            active expert FLOPs) plus its dispatch and combine einsums (4*E*C*D per
            token and layer, forward); dropless on CPU runs every expert on every row
            (jax lowers ragged_dot for CPU as a masked dense dot over all E groups:
            `ragged_dot_expansion`, measured below), on GPU / TPU only its own rows
  XLA       `compiled.cost_analysis()['flops']` of the step x devices / tokens (also
            counts elementwise ops, the loss and the optimizer)

`ragged_dot_expansion`: XLA's FLOPs of one `jax.lax.ragged_dot` of the dropless layer's
shape over the ideal 2*M*D*F, compiled (not run) on this backend.

Prints one JSON document, then tables. Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from typing import Any

import harness  # benchmarks/harness.py and report.py: this script's directory is on sys.path
import report
import train_throughput  # the optimizer set-up and XLA cost reader of the dense benchmark

CASES = ("dense", "dropless", "capacity")


@dataclasses.dataclass(frozen=True)
class BenchCase:
    """One benchmarked network: a decoder-only preset, MoE dispatch overridden."""

    name: str
    preset: str
    dispatch: str | None = None  # None: the dense preset
    capacity_factor: float = 1.25


def network_config(case: BenchCase):
    """The `DecoderOnlyConfig` of a case."""
    from models import decoder_only

    cfg = decoder_only.PRESETS[case.preset]
    if case.dispatch is None:
        return cfg
    moe = dataclasses.replace(cfg.moe, dispatch=case.dispatch,
                              capacity_factor=case.capacity_factor)
    return dataclasses.replace(cfg, moe=moe)


# --- FLOPs ---------------------------------------------------------------------------------


def flops_per_token(cfg, seq_len: int, *, train: bool, ragged_expansion: float = 1.0
                    ) -> dict[str, dict[str, float]]:
    """Analytic and executed FLOPs per token of a `DecoderOnlyConfig`, by part.

    A multiply-add is 2 FLOPs; a matmul's backward costs twice its forward, so training
    costs m = 6 FLOPs per weight a token sees (forward only: m = 2). With D model dim, N
    heads (K kv heads) of H dims, n layers, L sequence, V vocab, SwiGLU (3 kernels):

        attention_proj = m * n * (2*D*N*H + 2*D*K*H)          q, o, k, v
        mlp (dense)    = m * 3*D*F                            per dense layer
        mlp (MoE)      = m * (k*3*D*F_e + D*E)                per sparse layer: the k
                                                               experts a token visits
                                                               and the router
        attention      = (m / 6) * 12 * L * n * N * H         q.k and weights.v over the
                                                               full L x L square (computed
                                                               in full; half is masked)
        logits         = m * D * V

    `executed` replaces the sparse layers' expert term by what the dispatch computes:
    capacity: E*C slots per group of S tokens (C = `MoeConfig.capacity`) + the dispatch
    and combine einsums (2*E*C*D per token each: 2 + 3 of them in training, dispatch's
    0/1 tensor has no gradient; 2 forward only); dropless: k*3*D*F_e times
    `ragged_expansion` (E on CPU, whose ragged_dot lowering is a masked dense dot over
    all groups; 1 where ragged_dot is native). Not counted: norms, RoPE, softmax,
    routing's top-k / sort / one-hot, the loss and the optimizer.
    """
    m = 6.0 if train else 2.0
    d, n_layers = cfg.emb_dim, cfg.num_layers
    nh = cfg.num_heads * cfg.head_dim
    kh = (cfg.num_kv_heads or cfg.num_heads) * cfg.head_dim
    gates = len(cfg.mlp_activations) + 1  # wi_0.., wo
    moe = cfg.moe
    analytic = {
        "attention_proj": m * n_layers * (2 * d * nh + 2 * d * kh),
        "attention": (m / 6.0) * 12.0 * seq_len * n_layers * nh,
        "logits": m * d * cfg.vocab_size,
        "mlp": 0.0,
        "router": 0.0,
    }
    executed_mlp = 0.0
    dispatch = 0.0
    for layer in range(n_layers):
        if moe is None or not moe.is_sparse(layer):
            analytic["mlp"] += m * gates * d * cfg.mlp_dim
            executed_mlp += m * gates * d * cfg.mlp_dim
            continue
        f_e = moe.expert_mlp_dim or cfg.mlp_dim
        expert = gates * d * f_e
        k = moe.num_experts_per_token
        shared = moe.num_shared_experts * expert
        analytic["mlp"] += m * (k * expert + shared)
        analytic["router"] += m * d * moe.num_experts
        if moe.dispatch == "capacity":
            group = moe.group_size or seq_len
            slots = moe.num_experts * moe.capacity(group, train=train)
            executed_mlp += m * (slots / group * expert + shared)
            # Dispatch and combine einsums, 2*E*C*D per token each in the forward pass; the
            # backward differentiates dispatch w.r.t. x only (its 0/1 tensor has no
            # gradient) and combine w.r.t. both the expert outputs and the router weights.
            dispatch += (5.0 if train else 2.0) * 2 * slots * d
        else:
            executed_mlp += m * (k * expert * ragged_expansion + shared)
    analytic["total"] = sum(analytic.values())
    executed = dict(analytic, mlp=executed_mlp, dispatch=dispatch)
    executed["total"] = sum(v for key, v in executed.items() if key != "total")
    return {"analytic": analytic, "executed": executed}


def active_params(model) -> dict[str, int]:
    """Total and active-per-token parameters of a Model API's network, built under
    `nnx.eval_shape` (no weights allocated; `moe.active_parameter_count`), and how many of
    them the embedding and logits tables hold."""
    import jax
    from flax import nnx

    from models import moe

    network = nnx.eval_shape(lambda: model.make_network(nnx.Rngs(0)))
    state = nnx.to_pure_dict(nnx.state(network, nnx.Param))
    total = tables = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        total += math.prod(leaf.shape)
        name = jax.tree_util.keystr(path)
        if "token_embedder" in name or "logits_dense" in name:
            tables += math.prod(leaf.shape)
    active = moe.active_parameter_count(network)
    return {"total": total, "active": active, "embedding_and_logits": tables,
            "active_nonembed": active - tables}


def ragged_dot_expansion(cfg, tokens: int) -> dict[str, float | None]:
    """XLA's FLOPs of one dropless wi_0 `ragged_dot` ([k*tokens, D] rows x [E, D, F_e],
    equal groups) over the ideal 2*M*D*F_e, compiled (not run) on this backend."""
    import jax
    import jax.numpy as jnp

    moe = cfg.moe
    rows = moe.num_experts_per_token * tokens
    f_e = moe.expert_mlp_dim or cfg.mlp_dim
    x = jax.ShapeDtypeStruct((rows, cfg.emb_dim), jnp.float32)
    w = jax.ShapeDtypeStruct((moe.num_experts, cfg.emb_dim, f_e), jnp.float32)
    sizes = jax.ShapeDtypeStruct((moe.num_experts,), jnp.int32)
    compiled = jax.jit(jax.lax.ragged_dot).lower(x, w, sizes).compile()
    xla = train_throughput._xla_cost(compiled)["flops"]
    ideal = 2.0 * rows * cfg.emb_dim * f_e
    return {"rows": rows, "ideal_flops": ideal, "xla_flops": xla,
            "expansion": None if xla is None else xla / ideal}


# --- measurement ---------------------------------------------------------------------------


def synthetic_batch(vocab_size: int, batch: int, length: int, seed: int) -> dict[str, Any]:
    """Random next-token batch: ids in [1, V), targets shifted by one, all weighted."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab_size, (batch, length + 1), dtype=np.int32)
    return {
        "decoder_input_tokens": tokens[:, :-1],
        "decoder_target_tokens": tokens[:, 1:],
        "decoder_loss_weights": np.ones((batch, length), np.float32),
    }


def _timed(fn):
    """(result, wall seconds, process CPU seconds) of fn() up to block_until_ready."""
    import jax

    with harness.Timer() as t:
        out = fn()
        jax.block_until_ready(out)
    return out, t.wall, t.cpu


def _dropped(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k.endswith("/dropped_fraction")}


class _Bench:
    """One case: built, compiled (train and forward), with its live state and timings."""

    def __init__(self, case: BenchCase, args: argparse.Namespace):
        import seqio

        from partitioning import mesh as mesh_lib
        from t5x_like import model_api
        from t5x_like.runtime import Runtime
        from t5x_like.trainer import Trainer

        self.case, self.args = case, args
        self.cfg = network_config(case)
        self.model = model_api.DecoderOnlyModel(
            self.cfg, seqio.PassThroughVocabulary(self.cfg.vocab_size))
        start = time.perf_counter()
        self.runtime = Runtime.build(
            self.model, mesh_config=mesh_lib.MeshConfig(data=-1, expert=args.expert))
        self.trainer = Trainer(self.runtime, train_throughput._optimizer("adamw"))
        self.state = self.trainer.init_state(self.runtime.init_params())
        self.setup_s = time.perf_counter() - start
        partitioner = self.runtime.partitioner
        self.batches = [partitioner.make_global_batch(synthetic_batch(
            self.cfg.vocab_size, args.batch_size, args.seq_len, seed)) for seed in range(2)]
        self.num_devices = partitioner.mesh.size
        with partitioner.activate():
            self.train = self._compile(self.trainer.train_step, self.state, self.batches[0])
            self.forward = (self._compile(self.trainer.eval_step, self.state.params,
                                          self.batches[0]) if args.forward else None)
        self.params = active_params(self.model)
        self.times = {"train": [], "train_cpu": [], "train_warmup": [],
                      "forward": [], "forward_cpu": [], "forward_warmup": []}
        self.train_metrics: dict[str, float] = {}
        self.forward_dropped: dict[str, float] = {}

    def _compile(self, jitted, *args) -> dict[str, Any]:
        start = time.perf_counter()
        lowered = jitted.lower(*args)
        lower_s = time.perf_counter() - start
        start = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start
        flops = train_throughput._xla_cost(compiled)["flops"]
        return {"trace_lower_s": lower_s, "compile_s": compile_s,
                "xla_flops_per_step": None if flops is None else flops * self.num_devices}

    def step(self, index: int, timed: bool) -> None:
        batch = self.batches[index % 2]
        (self.state, metrics), wall, cpu = _timed(
            lambda: self.trainer.run_train_step(self.state, batch))
        if timed:
            self.times["train"].append(wall)
            self.times["train_cpu"].append(cpu)
            self.train_metrics = {k: float(v) for k, v in metrics.items() if v.ndim == 0}
        else:
            self.times["train_warmup"].append(wall)
        if self.forward is None:
            return
        sums, wall, cpu = _timed(lambda: self.trainer.run_eval_step(self.state.params, batch))
        if timed:
            self.times["forward"].append(wall)
            self.times["forward_cpu"].append(cpu)
            self.forward_dropped = _dropped(self.model.metrics_from_sums(sums))
        else:
            self.times["forward_warmup"].append(wall)

    def result(self, expansion: float) -> dict[str, Any]:
        args, tokens = self.args, self.args.batch_size * self.args.seq_len
        out: dict[str, Any] = {
            "case": dataclasses.asdict(self.case),
            "mesh": dict(self.runtime.partitioner.mesh.shape),
            "params": self.params,
            "setup_s": round(self.setup_s, 3),
            "tokens_per_step": tokens,
        }
        moe = self.cfg.moe
        if moe is not None:
            out["capacity_per_expert_and_group"] = {
                "train": moe.capacity(moe.group_size or args.seq_len, train=True),
                "forward": moe.capacity(moe.group_size or args.seq_len, train=False),
            } if moe.dispatch == "capacity" else None
        for mode, compiled in (("train", self.train), ("forward", self.forward)):
            if compiled is None:
                continue
            times = self.times[mode]
            median, iqr = harness.median_iqr(times)
            xla = compiled["xla_flops_per_step"]
            dropless = moe is not None and moe.dispatch == "dropless"
            flops = flops_per_token(self.cfg, args.seq_len, train=mode == "train",
                                    ragged_expansion=expansion if dropless else 1.0)
            out[mode] = {
                "trace_lower_s": round(compiled["trace_lower_s"], 3),
                "compile_s": round(compiled["compile_s"], 3),
                "warmup_step_s": [round(t, 4) for t in self.times[f"{mode}_warmup"]],
                "step_times_s": [round(t, 4) for t in times],
                "step_cpu_s": [round(t, 4) for t in self.times[f"{mode}_cpu"]],
                "step_time_median_s": median,
                "step_time_iqr_s": iqr,
                "step_cpu_median_s": statistics.median(self.times[f"{mode}_cpu"]),
                "tokens_per_s": tokens / median,
                "flops_per_token": {
                    "analytic": flops["analytic"],
                    "executed": flops["executed"],
                    "xla": None if xla is None else xla / tokens,
                },
            }
        if "train" in out:
            out["train"]["dropped_fraction"] = _dropped(self.train_metrics)
            out["train"]["final_metrics"] = {k: v for k, v in self.train_metrics.items()
                                             if not k.startswith("moe/")}
        if "forward" in out:
            out["forward"]["dropped_fraction"] = self.forward_dropped
        return out


# --- report --------------------------------------------------------------------------------


def _mean(values: dict[str, float]) -> float | None:
    return sum(values.values()) / len(values) if values else None


def _table(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    results = doc["results"]
    dense = next((r for r in results if r["case"]["dispatch"] is None), None)
    lines = [
        f"devices: {m['num_devices']} x {m['backend']}  mesh: {results[0]['mesh']}  cpus: "
        f"{m['cpu_count']}  load avg (1 min) before / after: {m['load_average_before'][0]:.1f}"
        f" / {m['load_average_after'][0]:.1f}  jax {m['jax']}",
        f"B={doc['batch_size']} L={doc['seq_len']} ({doc['batch_size'] * doc['seq_len']} "
        f"tokens/step); {doc['steps']} timed rounds after {doc['warmup']} warm-up, order "
        "alternating; medians",
        "",
    ]
    for mode in ("train", "forward"):
        if mode not in results[0]:
            continue
        title = ("training step (forward + backward + AdamW)" if mode == "train" else
                 "forward only (eval loss; capacity at eval_capacity_factor)")
        lines.append(title)
        rows = [("config", "params", "active", "compile s", "warm-up s", "step ms", "IQR ms",
                 "CPU s", "tokens/s", "x dense", "analytic MF/tok", "executed MF/tok",
                 "XLA MF/tok", "dropped")]
        for r in results:
            x = r[mode]
            lo, hi = x["step_time_iqr_s"]
            f = x["flops_per_token"]
            ratio = (x["tokens_per_s"] / dense[mode]["tokens_per_s"]) if dense else None
            dropped = _mean(x["dropped_fraction"])
            rows.append((
                r["case"]["name"],
                f"{r['params']['total'] / 1e6:.2f}M",
                f"{r['params']['active'] / 1e6:.2f}M",
                f"{x['trace_lower_s'] + x['compile_s']:.1f}",
                "/".join(f"{t:.2f}" for t in x["warmup_step_s"]),
                f"{x['step_time_median_s'] * 1e3:.0f}",
                f"{lo * 1e3:.0f}-{hi * 1e3:.0f}",
                f"{x['step_cpu_median_s']:.2f}",
                f"{x['tokens_per_s']:,.0f}",
                "-" if ratio is None else f"{ratio:.2f}",
                f"{f['analytic']['total'] / 1e6:.1f}",
                f"{f['executed']['total'] / 1e6:.1f}",
                "n/a" if f["xla"] is None else f"{f['xla'] / 1e6:.1f}",
                "-" if dropped is None else f"{100 * dropped:.1f}%",
            ))
        lines += [*report.table(rows), ""]
    train_dropped = [(r["case"]["name"], r["train"]["dropped_fraction"]) for r in results
                     if "train" in r and r["train"]["dropped_fraction"]]
    for name, per_layer in train_dropped:
        if any(per_layer.values()):
            lines.append(f"{name} dropped per layer (last training step): " + ", ".join(
                f"{k.split('/')[1]} {100 * v:.1f}%" for k, v in per_layer.items()))
    probe = doc.get("ragged_dot_expansion")
    if probe and probe["expansion"] is not None:
        lines.append(
            f"ragged_dot on {m['backend']}: XLA counts {probe['expansion']:.2f}x the ideal "
            f"2*M*D*F FLOPs for M={probe['rows']} rows over "
            f"{doc['num_experts']} experts (1.00 = native grouped matmul)")
    lines += [
        "",
        "params / active = all parameters / those one token uses (embedding and logits",
        "included); warm-up s = the untimed first steps (the first re-traces); step ms =",
        "median wall time up to block_until_ready (IQR: 25th-75th pct); CPU s = process CPU",
        "seconds per step (all threads); x dense = tokens/s over the dense model's;",
        "MF/tok = MFLOPs per token: analytic = 6 x active matmul params + attention + logits",
        "(2 x forward only); executed = what the dispatch computes (capacity: all E*C slots +",
        "dispatch/combine einsums; dropless: x ragged_dot expansion); XLA = cost_analysis",
        "flops x devices / tokens (+ elementwise, loss, optimizer); dropped = mean over MoE",
        "layers of the fraction of (token, choice) assignments over capacity.",
    ]
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = harness.argument_parser(__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="B=4, L=128, 3 timed rounds after 1 warm-up (< 2 minutes)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="default 8 (quick: 4), or its lcm with --devices")
    parser.add_argument("--seq_len", type=int, default=None, help="default 256 (quick: 128)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed rounds (default 10, quick: 3)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed rounds (default 2, quick: 1)")
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--capacity_factor", type=float, default=1.25,
                        help="training capacity factor of the 'capacity' case")
    parser.add_argument("--no_forward", dest="forward", action="store_false",
                        help="skip the forward-only (eval step) comparison")
    harness.add_devices_flag(parser)
    parser.add_argument("--expert", type=int, default=None,
                        help="size of the mesh's expert axis (the rest is data); default: "
                        "the largest divisor of 8 experts that divides --devices")
    parser.add_argument("--json_out", default=None, help="also write the JSON document here")
    args = parser.parse_args(argv)
    quick = {"batch_size": 4, "seq_len": 128, "steps": 3, "warmup": 1}
    full = {"batch_size": 8, "seq_len": 256, "steps": 10, "warmup": 2}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:  # the default batch spans every device
            setattr(args, key, math.lcm(value, args.devices) if key == "batch_size" else value)
    args.case_names = harness.names(parser, args.cases, CASES, "cases")
    harness.check_steps(parser, args.steps, args.warmup)
    if args.devices < 1:
        parser.error(f"--devices={args.devices} must be >= 1")
    if args.expert is None:
        args.expert = math.gcd(args.devices, 8)
    if args.devices % args.expert or 8 % args.expert:
        parser.error(f"--expert={args.expert} must divide --devices={args.devices} and the "
                     "8 experts of mixtral_tiny; e.g. --expert 4 with --devices 8")
    if args.batch_size % args.devices:
        parser.error(f"--batch_size={args.batch_size} is not divisible by --devices="
                     f"{args.devices} (the batch spans every device); use a multiple")
    if args.capacity_factor <= 0:
        parser.error(f"--capacity_factor={args.capacity_factor} must be > 0, e.g. 1.25")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    load_before = list(os.getloadavg())
    jax = harness.import_jax(args.devices)

    cases = {
        "dense": BenchCase("dense llama_tiny", "llama_tiny"),
        "dropless": BenchCase("mixtral_tiny dropless", "mixtral_tiny", "dropless",
                              args.capacity_factor),
        "capacity": BenchCase(f"mixtral_tiny capacity {args.capacity_factor:g}",
                              "mixtral_tiny", "capacity", args.capacity_factor),
    }
    benches = []
    for name in args.case_names:
        print(f"[moe] building and compiling {cases[name].name} ...", file=sys.stderr)
        benches.append(_Bench(cases[name], args))

    moe_cfg = network_config(cases["dropless"])
    tokens = args.batch_size * args.seq_len
    probe = ragged_dot_expansion(moe_cfg, tokens // args.devices)
    expansion = probe["expansion"] or 1.0

    for round_index, timed in harness.rounds(args.warmup, args.steps, "moe"):
        order = benches if round_index % 2 == 0 else benches[::-1]
        for bench in order:
            bench.step(round_index, timed)

    doc = report.document(
        "moe",
        machine={**report.jax_machine(jax), "load_average_before": load_before,
                 "load_average_after": list(os.getloadavg())},
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        steps=args.steps,
        warmup=args.warmup,
        num_experts=moe_cfg.moe.num_experts,
        ragged_dot_expansion=probe,
        results=[bench.result(expansion) for bench in benches],
    )
    return report.emit(doc, _table(doc), args.json_out)


if __name__ == "__main__":
    main()

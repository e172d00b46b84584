"""Fast inference side by side: cached / speculative / prefix-cached / quantized / batched decoding.

    # the models (once, ~25 min on 2 CPU cores): experiments/speculative_{target,drafter}.gin
    python -m t5x_like.main --gin_file=experiments/speculative_target.gin \\
        --gin.MODEL_DIR=/tmp/t5x_like_spec_target
    python -m t5x_like.main --gin_file=experiments/speculative_drafter.gin \\
        --gin.MODEL_DIR=/tmp/t5x_like_spec_drafter
    python benchmarks/decode.py --target_dir /tmp/t5x_like_spec_target \\
        --drafter_dir /tmp/t5x_like_spec_drafter [--quick] [--json_out FILE]
    python benchmarks/decode.py --random_init   # no checkpoints: speeds only, no acceptance

One process, one device, fp32, prompts cut from the shipped held-out text (Macbeth, Julius
Caesar), greedy unless stated. Each comparison runs both sides on the same prompts, checks
the outputs (equal where the method preserves them) and reports wall-clock medians over
`--rounds` timed rounds after an untimed compile + warm-up round:

  cached vs uncached   prefill + KV-cached greedy (`decoding.greedy`) against re-running
                       the full forward pass over the whole sequence for every new token;
                       batch 1 and 8
  speculative          `speculative.speculative_decoder_only` (the drafter proposes gamma
                       tokens, the target verifies them in one call) against the target's
                       own cached greedy, batch 1; tokens must be identical; acceptance rate
                       alpha, tokens per target call and the i.i.d. prediction
                       (1 - alpha^(gamma+1)) / (1 - alpha)
  prefix cache         `serving.Engine` time to first token for requests that share a long
                       document prefix, with the `PrefixCache` warm against no cache
  int8 / int4          `quantization.quantize` weights: greedy tokens/s at batch 1, weight
                       bytes, held-out cross entropy (teacher forced), the largest logit
                       difference and the share of held-out positions whose top-1 token
                       agrees with the full-precision model, and where greedy diverges
  continuous batching  `serving.Engine` with 8 slots against 1 slot (one request at a time)
                       on requests of mixed lengths: generated tokens per second; outputs
                       must be identical
  seq2seq batching     the same for the quickstart T5 (experiments/quickstart.gin; its
                       checkpoint with --t5_dir, else its initialisation): encoder inputs
                       of 8-96 tokens, 8-32 new tokens

Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pathlib
import statistics
import sys
import time

import harness  # benchmarks/harness.py and report.py: this script's directory is on sys.path
import report

REPO = pathlib.Path(__file__).resolve().parents[1]
TARGET_GIN = "experiments/speculative_target.gin"
DRAFTER_GIN = "experiments/speculative_drafter.gin"


def _parse():
    parser = harness.argument_parser(__doc__)
    parser.add_argument("--target_dir", help="MODEL_DIR of experiments/speculative_target.gin")
    parser.add_argument("--drafter_dir", help="MODEL_DIR of experiments/speculative_drafter.gin")
    parser.add_argument("--t5_dir", help="MODEL_DIR of experiments/quickstart.gin (the "
                        "seq2seq section; default: its initialisation)")
    parser.add_argument("--random_init", action="store_true",
                        help="no checkpoints: randomly initialised models (speeds only)")
    parser.add_argument("--quick", action="store_true", help="fewer tokens and rounds")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per measurement")
    parser.add_argument("--gamma", type=int, default=4, help="drafted tokens per target call")
    parser.add_argument("--distill_steps", type=int, default=0,
                        help="before the speculative section, distil the drafter for the "
                        "target this many AdamW steps on the target's own greedy continuations "
                        "of training text (sequence-level knowledge distillation); 0 = off")
    parser.add_argument("--sections", default="all",
                        help="comma-separated: cache,speculative,prefix,quant,batching,"
                        "seq2seq or all")
    parser.add_argument("--json_out", default=None)
    args = parser.parse_args()
    if not args.random_init and not (args.target_dir and args.drafter_dir):
        parser.error("pass --target_dir and --drafter_dir (trained with the experiments "
                     "named in the docstring) or --random_init")
    if args.rounds < 1 or args.gamma < 1:
        parser.error(f"--rounds={args.rounds} and --gamma={args.gamma} must be >= 1")
    args.sections = harness.names(parser, args.sections,
                                  ("cache", "speculative", "prefix", "quant", "batching",
                                   "seq2seq"),
                                  "section", allow_all=True)
    return args


# --- models and data ----------------------------------------------------------------------


@dataclasses.dataclass
class Loaded:
    name: str
    network: object  # a models network (DecoderOnly, EncoderDecoder) with its parameters
    runtime: object
    params: object
    parameters: int


def _load(gin_file: str, model_dir: str | None, name: str) -> Loaded:
    """The network of `gin_file` with the latest checkpoint of `model_dir` (or its init)."""
    import gin
    import jax

    from t5x_like import gin_utils
    from t5x_like.runtime import Runtime

    gin.clear_config(clear_constants=True)
    gin_utils.parse_gin([gin_file], ["MODEL_DIR = 'unused'"], gin_utils.default_search_paths(),
                        finalize=False)
    model = gin.query_parameter("%MODEL").scoped_configurable_fn()
    gin.clear_config(clear_constants=True)
    runtime = Runtime.build(model, devices=jax.devices()[:1])
    if model_dir:
        params = runtime.restore_params(os.path.join(model_dir, "checkpoints"))
    else:
        params = runtime.init_params(0)
    network = runtime.net.merge(params)
    count = sum(x.size for x in jax.tree.leaves(params))
    return Loaded(name, network, runtime, params, count)


def _heldout_ids(vocab, split: str = "validation") -> list[int]:
    name = "validation.txt.gz" if split == "validation" else "train-00000-of-00008.txt.gz"
    with gzip.open(REPO / "t5x_like" / "data" / "corpus" / name, "rt", encoding="utf-8") as f:
        text = f.read()
    return list(vocab.encode(text))


def distill(target: Loaded, drafter: Loaded, train_ids: list[int], steps: int,
            batch: int = 16, prompt: int = 32, new: int = 96, sequences: int = 256) -> dict:
    """Sequence-level knowledge distillation (Kim & Rush, 2016) of the drafter for the
    target: the target greedily continues `sequences` prompts of training text, and the
    drafter is trained (AdamW, cross entropy) to predict those continuations. Replaces
    `drafter.network`'s parameters; returns what was done."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    greedy, _ = _greedy_fns(target.network, new)
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(train_ids) - prompt, sequences)
    prompts = np.asarray([[0, *train_ids[s:s + prompt - 1]] for s in starts], np.int32)
    start = time.perf_counter()
    seqs = []
    for i in range(0, sequences, batch):
        p = prompts[i:i + batch]
        seqs.append(np.concatenate([p, np.asarray(greedy(p))], axis=1))
    data = jnp.asarray(np.concatenate(seqs))  # [N, prompt + new]
    generate_s = time.perf_counter() - start
    graphdef, params, rest = nnx.split(drafter.network, nnx.Param, ...)
    opt = optax.adamw(optax.cosine_decay_schedule(1e-3, steps, 0.1), weight_decay=0.01)
    weights = (jnp.arange(data.shape[1] - 1) >= prompt - 1).astype(jnp.float32)  # continuations

    @jax.jit
    def step(params, opt_state, tokens):
        def loss_fn(params):
            logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
            return jnp.sum(ce * weights) / (jnp.sum(weights) * tokens.shape[0])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = opt.init(params)
    start, losses = time.perf_counter(), []
    for _ in range(steps):
        rows = rng.choice(data.shape[0], batch, replace=False)
        params, opt_state, loss = step(params, opt_state, data[rows])
        losses.append(float(loss))
    drafter.network = nnx.merge(graphdef, params, rest)
    return {"sequences": int(data.shape[0]), "steps": steps, "generate_s": generate_s,
            "train_s": time.perf_counter() - start, "first_loss": losses[0],
            "last_loss": float(np.mean(losses[-20:]))}


def _time(fn, rounds: int) -> tuple[float, object]:
    """(median wall seconds over `rounds` calls after one untimed call, the last output)."""
    medians, outputs = _time_many({"fn": fn}, rounds)
    return medians["fn"], outputs["fn"]


def _time_many(fns: dict, rounds: int) -> tuple[dict, dict]:
    """Median wall seconds of each of `fns` over `rounds` interleaved rounds (the order
    reversed every other round, so load on the machine hits them alike), after one untimed
    call each; and each one's last output."""
    import jax

    outputs = {name: jax.block_until_ready(fn()) for name, fn in fns.items()}
    times: dict = {name: [] for name in fns}
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            start = time.perf_counter()
            outputs[name] = jax.block_until_ready(fns[name]())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, outputs


# --- sections -----------------------------------------------------------------------------


def _prompts(ids: list[int], batch: int, length: int, offset: int = 0):
    """[batch, length] int32: BOS (0, as seqio's LM converter feeds) + held-out ids."""
    import numpy as np

    rows = [[0, *ids[offset + i * 997:offset + i * 997 + length - 1]] for i in range(batch)]
    return np.asarray(rows, np.int32)


def _greedy_fns(network, max_decode_steps: int):
    """jitted (prompt [B,P]) -> tokens [B,S]: cached (prefill + decoding.greedy) and
    uncached (the full forward pass over the whole sequence for every token)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from t5x_like import decoding

    graphdef, state = nnx.split(network)

    @jax.jit
    def cached(state, prompt):
        net = nnx.merge(graphdef, state)
        b, p = prompt.shape
        cache = net.init_cache(b, p + max_decode_steps)
        logits, cache = net.decode(prompt, cache=cache)

        def step_fn(tokens, cache):
            out, cache = net.decode(tokens, cache=cache)
            return out[:, -1], cache

        return decoding.greedy(step_fn, prompt[:, -1], cache, max_decode_steps=max_decode_steps,
                               eos_id=-1, initial_logits=logits[:, -1]).tokens

    @jax.jit
    def uncached(state, prompt):
        net = nnx.merge(graphdef, state)
        b, p = prompt.shape
        seq = jnp.concatenate([prompt, jnp.zeros((b, max_decode_steps), jnp.int32)], axis=1)

        def body(i, seq):
            logits = net(seq)  # causal: the zeros after position p + i are never seen
            nxt = jnp.argmax(logits[:, p - 1 + i], axis=-1).astype(jnp.int32)
            return seq.at[:, p + i].set(nxt)

        return jax.lax.fori_loop(0, max_decode_steps, body, seq)[:, p:]

    return (lambda prompt: cached(state, prompt)), (lambda prompt: uncached(state, prompt))


def section_cache(target: Loaded, ids, args) -> list[dict]:
    import numpy as np

    new = 32 if args.quick else 64
    rows = []
    for batch in (1, 8):
        prompt = _prompts(ids, batch, 64)
        cached, uncached = _greedy_fns(target.network, new)
        t, out = _time_many({"cached": lambda f=cached, x=prompt: f(x),
                             "uncached": lambda f=uncached, x=prompt: f(x)}, args.rounds)
        (t_c, out_c), (t_u, out_u) = (t["cached"], out["cached"]), (t["uncached"],
                                                                     out["uncached"])
        rows.append({"section": "cache", "batch": batch, "prompt": 64, "new_tokens": new,
                     "cached_s": t_c, "uncached_s": t_u,
                     "cached_tokens_per_s": batch * new / t_c,
                     "uncached_tokens_per_s": batch * new / t_u,
                     "speedup": t_u / t_c,
                     "identical": bool(np.array_equal(np.asarray(out_c), np.asarray(out_u)))})
    return rows


def _call_seconds(network, tokens_per_call: int, rounds: int, reps: int = 32) -> float:
    """Seconds of one cached `network.decode` call feeding `tokens_per_call` tokens at
    batch 1 after 64 cached tokens (a jitted loop of `reps` calls, divided by reps)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(network)

    @jax.jit
    def loop(state):
        net = nnx.merge(graphdef, state)
        cache = net.init_cache(1, 64 + tokens_per_call)
        _, cache = net.decode(jnp.ones((1, 64), jnp.int32), cache=cache)
        tokens = jnp.ones((1, tokens_per_call), jnp.int32)

        def body(i, carry):
            total, cache = carry
            logits, new = net.decode(tokens + i, cache=cache)
            return total + logits[0, -1, 0], new.rewind(cache.index)

        return jax.lax.fori_loop(0, reps, body, (jnp.zeros(()), cache))[0]

    return _time(lambda: loop(state), rounds)[0] / reps


def section_speculative(target: Loaded, drafter: Loaded, ids, args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from t5x_like import speculative

    new = 32 if args.quick else 64
    prompt = _prompts(ids, 1, 64, offset=50_000)
    lengths = np.full((1,), prompt.shape[1], np.int32)
    cached, _ = _greedy_fns(target.network, new)
    tg, ts = nnx.split(target.network)
    dg, ds = nnx.split(drafter.network)
    rows = []
    step_s = _call_seconds(target.network, 1, args.rounds)
    draft_s = _call_seconds(drafter.network, 1, args.rounds)
    for gamma in sorted({2, args.gamma, 6}):
        verify_s = _call_seconds(target.network, gamma + 1, args.rounds)
        @jax.jit
        def spec(ts, ds, prompt, lengths, gamma=gamma):
            return speculative.speculative_decoder_only(
                nnx.merge(tg, ts), nnx.merge(dg, ds), prompt, lengths,
                max_decode_steps=new, gamma=gamma, eos_id=-1)

        t, outs = _time_many({
            "greedy": lambda: cached(prompt),
            "speculative": lambda spec=spec: spec(ts, ds, jnp.asarray(prompt),
                                                  jnp.asarray(lengths))}, args.rounds)
        (t_plain, plain), (t_spec, out) = ((t["greedy"], outs["greedy"]),
                                           (t["speculative"], outs["speculative"]))
        alpha = float(out.acceptance_rate)
        predicted = (1 - alpha ** (gamma + 1)) / (1 - alpha) if alpha < 1 else gamma + 1.0
        tokens_per_call = float(out.tokens_per_target_call)
        rows.append({"section": "speculative", "batch": 1, "gamma": gamma, "new_tokens": new,
                     "greedy_s": t_plain, "speculative_s": t_spec, "speedup": t_plain / t_spec,
                     "target_step_ms": step_s * 1e3, "target_verify_ms": verify_s * 1e3,
                     "drafter_step_ms": draft_s * 1e3,
                     # The cost model: a round = one verify call + gamma drafter calls.
                     "modelled_speedup": tokens_per_call * step_s / (verify_s + gamma * draft_s),
                     # ... and where verifying gamma + 1 tokens costs one step (bandwidth-bound
                     # decoding, as on GPU / TPU at batch 1).
                     "speedup_if_verify_costs_one_step":
                         tokens_per_call * step_s / (step_s + gamma * draft_s),
                     "acceptance_rate": alpha,
                     "tokens_per_target_call": tokens_per_call,
                     "predicted_tokens_per_call": predicted,
                     "identical": bool(np.array_equal(np.asarray(out.tokens),
                                                      np.asarray(plain)))})
    return rows


def _engine_run(network, requests, *, num_slots: int, max_length: int, prefix_cache=None,
                max_input_length=None):
    from t5x_like import serving

    engine = serving.Engine(network, num_slots=num_slots, max_length=max_length, eos_id=None,
                            prefix_cache=prefix_cache, max_input_length=max_input_length)
    start = time.perf_counter()
    results = engine.generate(requests)
    return time.perf_counter() - start, results


def section_prefix(target: Loaded, ids, args) -> list[dict]:
    from t5x_like import serving

    doc = 384 if args.quick else 448
    document = list(_prompts(ids, 1, doc, offset=20_000)[0])
    questions = [list(q) for q in _prompts(ids, 8, 16, offset=90_000)]
    requests = [serving.Request(prompt=document + q, max_new_tokens=1) for q in questions]
    max_length = doc + 16 + 1
    # Warm-up (compiles every prefill bucket both runs use), then timed runs.
    _engine_run(target.network, requests[:2], num_slots=1, max_length=max_length,
                prefix_cache=serving.PrefixCache(block_size=16))
    _engine_run(target.network, requests[:1], num_slots=1, max_length=max_length)
    cold_ttft, warm_ttft, identical = [], [], True
    for _ in range(args.rounds):
        _, cold = _engine_run(target.network, requests, num_slots=1, max_length=max_length)
        cache = serving.PrefixCache(block_size=16)
        _, warm = _engine_run(target.network, requests, num_slots=1, max_length=max_length,
                              prefix_cache=cache)
        cold_ttft += [r.time_to_first_token_s - r.queue_time_s for r in cold]
        # The first request fills the cache; the rest reuse the document.
        warm_ttft += [r.time_to_first_token_s - r.queue_time_s for r in warm[1:]]
        identical &= [r.tokens for r in cold] == [r.tokens for r in warm]
    cold_s, warm_s = statistics.median(cold_ttft), statistics.median(warm_ttft)
    return [{"section": "prefix", "shared_prefix_tokens": doc, "suffix_tokens": 16,
             "cold_ttft_s": cold_s, "cached_ttft_s": warm_s, "speedup": cold_s / warm_s,
             "cached_tokens": warm[-1].cached_tokens, "identical": bool(identical)}]


def section_quant(target: Loaded, ids, args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from t5x_like import quantization

    new = 32 if args.quick else 64
    prompt = _prompts(ids, 1, 64, offset=30_000)
    heldout = jnp.asarray(_prompts(ids, 16 if args.quick else 32, 128, offset=5_000))
    full_fn, _ = _greedy_fns(target.network, new)

    def cross_entropy(network):
        graphdef, state = nnx.split(network)

        @jax.jit
        def ce(state, tokens):
            logits = nnx.merge(graphdef, state)(tokens[:, :-1])
            lp = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], -1)), logits

        return ce(state, heldout)

    full_ce, full_logits = cross_entropy(target.network)
    t_full, full_out = _time(lambda: full_fn(prompt), args.rounds)
    full_bytes = quantization.weight_bytes(target.network)["total"]
    rows = [{"section": "quant", "weights": "float32", "tokens_per_s": new / t_full,
             "weight_mb": full_bytes / 2**20, "heldout_ce": float(full_ce),
             "max_logit_diff": 0.0, "top1_agreement": 1.0}]
    for mode in ("int8", "int4"):
        qnet = quantization.quantize(target.network, mode)
        q_fn, _ = _greedy_fns(qnet, new)
        t_q, q_out = _time(lambda f=q_fn: f(prompt), args.rounds)
        ce, logits = cross_entropy(qnet)
        rows.append({"section": "quant", "weights": mode, "tokens_per_s": new / t_q,
                     "weight_mb": quantization.weight_bytes(qnet)["total"] / 2**20,
                     "heldout_ce": float(ce),
                     "max_logit_diff": float(jnp.max(jnp.abs(logits - full_logits))),
                     # Teacher-forced: the same next-token argmax at every held-out position.
                     "top1_agreement": float(jnp.mean(jnp.argmax(logits, -1) ==
                                                      jnp.argmax(full_logits, -1))),
                     "first_greedy_divergence": _first_divergence(q_out, full_out)})
    return rows


def _first_divergence(a, b) -> int:
    """The first position where greedy outputs a and b [1, S] differ (S if never)."""
    import numpy as np

    diff = np.nonzero(np.asarray(a)[0] != np.asarray(b)[0])[0]
    return int(diff[0]) if diff.size else int(np.asarray(a).shape[1])


def _slots_8_vs_1(network, requests, rounds: int, section: str, **engine_kw) -> dict:
    """Generated tokens/s of an 8-slot engine against one request at a time."""
    generated = sum(r.max_new_tokens for r in requests)
    # Warm-up: compiles every prefill bucket and the decode step of both engines.
    _engine_run(network, requests, num_slots=8, **engine_kw)
    _engine_run(network, requests[:4], num_slots=1, **engine_kw)
    batched, single, identical = [], [], True
    for _ in range(rounds):
        t8, out8 = _engine_run(network, requests, num_slots=8, **engine_kw)
        t1, out1 = _engine_run(network, requests, num_slots=1, **engine_kw)
        batched.append(t8)
        single.append(t1)
        identical &= [r.tokens for r in out8] == [r.tokens for r in out1]
    t8, t1 = statistics.median(batched), statistics.median(single)
    return {"section": section, "requests": len(requests), "generated_tokens": generated,
            "slots_8_tokens_per_s": generated / t8, "one_at_a_time_tokens_per_s": generated / t1,
            "speedup": t1 / t8, "identical": bool(identical)}


def section_batching(target: Loaded, ids, args) -> list[dict]:
    import numpy as np

    from t5x_like import serving

    count = 16 if args.quick else 32
    rng = np.random.default_rng(0)
    prompts = [list(p[: rng.integers(8, 64)]) for p in _prompts(ids, count, 64, offset=60_000)]
    requests = [serving.Request(prompt=p, max_new_tokens=int(rng.integers(8, 64)))
                for p in prompts]
    return [_slots_8_vs_1(target.network, requests, args.rounds, "batching", max_length=128)]


def section_seq2seq(t5: Loaded, ids, args) -> list[dict]:
    import numpy as np

    from t5x_like import serving

    count = 16 if args.quick else 32
    rng = np.random.default_rng(1)
    inputs = [[t for t in p[: rng.integers(8, 96)] if t] or [2]
              for p in _prompts(ids, count, 96, offset=70_000)]
    requests = [serving.Request(prompt=p, max_new_tokens=int(rng.integers(8, 32)))
                for p in inputs]
    return [_slots_8_vs_1(t5.network, requests, args.rounds, "seq2seq", max_length=32,
                          max_input_length=96)]


# --- report -------------------------------------------------------------------------------


def _text(rows: list[dict], models: dict) -> str:
    lines = [f"models: {models}", ""]
    by = {s: [r for r in rows if r["section"] == s] for s in
          ("cache", "speculative", "prefix", "quant", "batching", "seq2seq")}
    if by["cache"]:
        lines += [*report.table([("cached vs uncached", "batch", "cached tok/s", "uncached tok/s",
                                "speedup", "same tokens"), *[
            ("greedy, 64-token prompt", str(r["batch"]), f"{r['cached_tokens_per_s']:.1f}",
             f"{r['uncached_tokens_per_s']:.1f}", f"{r['speedup']:.2f}x", str(r["identical"]))
            for r in by["cache"]]]), ""]
    if by["speculative"]:
        lines += [*report.table([("speculative vs greedy", "gamma", "greedy s", "speculative s",
                                "speedup", "alpha", "tok/call", "predicted", "same tokens"), *[
            ("batch 1", str(r["gamma"]), f"{r['greedy_s']:.3f}", f"{r['speculative_s']:.3f}",
             f"{r['speedup']:.2f}x", f"{r['acceptance_rate']:.3f}",
             f"{r['tokens_per_target_call']:.2f}", f"{r['predicted_tokens_per_call']:.2f}",
             str(r["identical"])) for r in by["speculative"]]]), ""]
        lines += [*report.table([("cost per call", "gamma", "target 1 tok ms",
                                "target verify ms", "drafter ms", "modelled speedup",
                                "if verify = 1 step"), *[
            ("batch 1", str(r["gamma"]), f"{r['target_step_ms']:.2f}",
             f"{r['target_verify_ms']:.2f}", f"{r['drafter_step_ms']:.2f}",
             f"{r['modelled_speedup']:.2f}x", f"{r['speedup_if_verify_costs_one_step']:.2f}x")
            for r in by["speculative"]]]), ""]
    if by["prefix"]:
        lines += [*report.table([("prefix cache", "shared tokens", "cold TTFT ms",
                                "cached TTFT ms", "speedup", "same tokens"), *[
            ("document + 16-token question", str(r["shared_prefix_tokens"]),
             f"{r['cold_ttft_s'] * 1e3:.1f}", f"{r['cached_ttft_s'] * 1e3:.1f}",
             f"{r['speedup']:.2f}x", str(r["identical"])) for r in by["prefix"]]]), ""]
    if by["quant"]:
        lines += [*report.table([("weights", "tok/s (B=1)", "weight MB", "held-out CE",
                                "max |dlogit|", "top-1 agreement", "greedy same until"), *[
            (r["weights"], f"{r['tokens_per_s']:.1f}", f"{r['weight_mb']:.1f}",
             f"{r['heldout_ce']:.4f}", f"{r['max_logit_diff']:.4f}",
             f"{r['top1_agreement']:.4f}", str(r.get("first_greedy_divergence", "-")))
            for r in by["quant"]]]), ""]
    batching = [("decoder-only: mixed lengths, greedy", r) for r in by["batching"]] + [
        ("T5: mixed input lengths, greedy", r) for r in by["seq2seq"]]
    if batching:
        lines += [*report.table([("continuous batching", "requests", "8 slots tok/s",
                                "1 at a time tok/s", "speedup", "same tokens"), *[
            (label, str(r["requests"]), f"{r['slots_8_tokens_per_s']:.1f}",
             f"{r['one_at_a_time_tokens_per_s']:.1f}", f"{r['speedup']:.2f}x",
             str(r["identical"])) for label, r in batching]])]
    return "\n".join(lines)


def main() -> None:
    args = _parse()
    jax = harness.import_jax(1)
    jax.config.update("jax_default_matmul_precision", "highest")
    from t5x_like.data import vocabularies

    target = _load(TARGET_GIN, None if args.random_init else args.target_dir, "target")
    drafter = _load(DRAFTER_GIN, None if args.random_init else args.drafter_dir, "drafter")
    vocab = vocabularies.get_vocabulary("shakespeare_spm")
    ids = _heldout_ids(vocab)
    distilled = None
    if args.distill_steps and "speculative" in args.sections:
        print(f"[decode] distilling the drafter ({args.distill_steps} steps)", file=sys.stderr)
        distilled = distill(target, drafter, _heldout_ids(vocab, "train"), args.distill_steps)
    rows = []
    for section in args.sections:
        print(f"[decode] {section}", file=sys.stderr)
        if section == "cache":
            rows += section_cache(target, ids, args)
        elif section == "speculative":
            rows += section_speculative(target, drafter, ids, args)
        elif section == "prefix":
            rows += section_prefix(target, ids, args)
        elif section == "quant":
            rows += section_quant(target, ids, args)
        elif section == "batching":
            rows += section_batching(target, ids, args)
        elif section == "seq2seq":
            t5 = _load("experiments/quickstart.gin", args.t5_dir, "t5")
            rows += section_seq2seq(t5, ids, args)
    models = {m.name: {"parameters": m.parameters,
                       "checkpoint": None if args.random_init else d}
              for m, d in ((target, args.target_dir), (drafter, args.drafter_dir))}
    if "seq2seq" in args.sections:
        models["t5"] = {"parameters": t5.parameters, "checkpoint": args.t5_dir}
    doc = report.document("decode", report.jax_machine(jax), models=models,
                          distilled_drafter=distilled, quick=args.quick, rounds=args.rounds,
                          results=rows)
    text = _text(rows, {k: v["parameters"] for k, v in models.items()})
    if distilled:
        text = f"drafter distilled for the target: {distilled}\n" + text
    report.emit(doc, text, args.json_out)


if __name__ == "__main__":
    main()

"""Side-by-side CPU speed: t5x_like against Hugging Face transformers on GPT-2 and T5.

    python benchmarks/vs_hf.py                                   # both configs, ~5 min on 2 cores
    python benchmarks/vs_hf.py --quick                           # small shapes, < 2 min
    python benchmarks/vs_hf.py --configs gpt2_small --rounds 5 --json_out /tmp/vs_hf.json
    python benchmarks/vs_hf.py --configs t5_small_v1_0           # HF's t5-small (T5 1.0) shape

The same network is trained and decoded by both frameworks on this machine in one run:

* t5x_like: `models.decoder_only.DecoderOnly` (preset `gpt2_small`) or
  `models.encoder_decoder.EncoderDecoder` (preset `t5_1_1('small')`), built by
  `Runtime.build` and trained by `trainer.Trainer` exactly as a run does; decoding is
  `infer.predict`, the jitted `Model.predict_batch` path of `--run_mode=infer` (prefill or
  encoder once, then the KV-cached `decoding.greedy` while-loop).
* Hugging Face: `GPT2LMHeadModel` / `T5ForConditionalGeneration` (PyTorch, CPU) built from
  a config with the same shapes, trained with its own loss (`labels=`), `torch.optim.AdamW`
  and `clip_grad_norm_`; decoding is `model.generate(do_sample=False, use_cache=True)`.

Both sides: float32 weights and activations, random weights (speed does not depend on
the values; the parameter counts are printed to show the shapes match), random tokens, no
dropout, no z-loss, AdamW (b1 0.9, b2 0.999, eps 1e-8, weight decay 0.01, constant
learning rate 1e-4) behind global-norm clipping at 1.0, greedy decoding of exactly
`new_tokens` tokens per row (EOS is disabled on both sides, so no row stops early).
Attention is HF's default implementation (`sdpa` for both models in transformers 5;
`--hf_attn eager` for the other one). The HF worker flushes denormals to zero
(`torch.set_flush_denormal`), as XLA's CPU runtime does, and runs with
OMP_WAIT_POLICY=passive (`--omp_wait_policy`): on a shared machine, spinning OpenMP
threads otherwise make torch many times slower (see benchmarks/README.md).

Threads: torch gets `torch.set_num_threads(N)` with N the cores this process may run on
(`os.sched_getaffinity`), which is the size of XLA's CPU thread pool. `--threads N` pins
both workers to the first N of those cores (and gives torch N threads).

Each framework runs in its own worker process (JAX's thread pool and torch's OpenMP
threads slow each other down badly when they share one process). The workers build,
compile and warm up once per config (reported separately: the first call of each jitted
function is trace + compile + run), then the parent alternates them, round by round:
t5x_like trains `--steps` steps, HF trains `--steps` steps, t5x_like decodes, HF decodes,
... so that other work on the machine hits both alike. The table gives medians over every
round; `cpu-s` is the CPU time of the worker process (all threads) per step or call,
which other work on the machine inflates less than wall time.

Prints one JSON document, then a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from typing import Any

import harness  # benchmarks/harness.py and report.py: this script's directory is on sys.path
import report

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULT_TAG = "VS_HF_RESULT "
FRAMEWORKS = ("t5x_like", "hf")

# --- configs -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RaceConfig:
    """One network and its training / decoding workloads, run by both frameworks."""

    name: str
    family: str  # 'gpt2' | 't5'
    t5_version: str = "1.1"  # 't5' only: '1.1' (gated GELU, untied) or '1.0' (ReLU, tied)
    train_batch: int = 4
    train_length: int = 128  # GPT-2 sequence, T5 encoder inputs
    train_targets: int = 32  # T5 decoder targets
    decode_batches: tuple[int, ...] = (1, 4)
    prompt_length: int = 32  # GPT-2 prompt, T5 encoder inputs
    new_tokens: int = 64

    @property
    def train_tokens_per_step(self) -> int:
        """Positions the network processes per step (T5: encoder + decoder)."""
        extra = self.train_targets if self.family == "t5" else 0
        return self.train_batch * (self.train_length + extra)


CONFIGS: dict[str, RaceConfig] = {c.name: c for c in [
    RaceConfig("gpt2_small", "gpt2"),
    RaceConfig("t5_1_1_small", "t5"),
    RaceConfig("t5_small_v1_0", "t5", t5_version="1.0"),
]}
DEFAULT_CONFIGS = ("gpt2_small", "t5_1_1_small")
QUICK = {"train_batch": 2, "train_length": 64, "train_targets": 16, "decode_batches": (2,),
         "prompt_length": 16, "new_tokens": 16}


def t5x_network_config(rc: RaceConfig):
    """The t5x_like config: the project's preset in float32, no dropout."""
    if rc.family == "gpt2":
        from models import decoder_only

        return decoder_only.preset("gpt2_small", dtype="float32", dropout_rate=0.0)
    from models import encoder_decoder

    if rc.t5_version == "1.1":
        return encoder_decoder.t5_1_1("small", dtype="float32", dropout_rate=0.0)
    # google-t5/t5-small: 6 + 6 layers, 8 heads, ReLU MLP 2048, tied (scaled) logits.
    return encoder_decoder.T5Config(
        emb_dim=512, num_heads=8, head_dim=64, mlp_dim=2048, num_encoder_layers=6,
        num_decoder_layers=6, mlp_activations=("relu",), logits_via_embedding=True,
        dtype="float32", dropout_rate=0.0)


def hf_config(rc: RaceConfig, attn: str | None):
    """The transformers config with the same shapes as `t5x_network_config(rc)`."""
    import transformers

    cfg = t5x_network_config(rc)
    common = {"vocab_size": cfg.vocab_size, "pad_token_id": 0, "eos_token_id": None}
    if attn:
        common["attn_implementation"] = attn
    if rc.family == "gpt2":
        return transformers.GPT2Config(
            n_embd=cfg.emb_dim, n_layer=cfg.num_layers, n_head=cfg.num_heads,
            n_inner=cfg.mlp_dim, n_positions=cfg.max_length, activation_function="gelu_new",
            layer_norm_epsilon=cfg.layer_norm_epsilon, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=None, **common)
    return transformers.T5Config(
        d_model=cfg.emb_dim, d_kv=cfg.head_dim, d_ff=cfg.mlp_dim,
        num_layers=cfg.num_encoder_layers, num_decoder_layers=cfg.num_decoder_layers,
        num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance, dropout_rate=0.0,
        layer_norm_epsilon=cfg.layer_norm_epsilon,
        feed_forward_proj="gated-gelu" if rc.t5_version == "1.1" else "relu",
        tie_word_embeddings=rc.t5_version == "1.0", is_encoder_decoder=True,
        decoder_start_token_id=0, **common)


# --- synthetic data (the same numbers on both sides) ---------------------------------------


def train_tokens(rc: RaceConfig, vocab: int, seed: int) -> dict[str, Any]:
    """Random ids in [2, V): GPT-2 `tokens` [B, L + 1]; T5 `inputs` [B, S], `targets` [B, T]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    b = rc.train_batch
    if rc.family == "gpt2":
        return {"tokens": rng.integers(2, vocab, (b, rc.train_length + 1), dtype=np.int32)}
    return {"inputs": rng.integers(2, vocab, (b, rc.train_length), dtype=np.int32),
            "targets": rng.integers(2, vocab, (b, rc.train_targets), dtype=np.int32)}


def prompt_tokens(rc: RaceConfig, vocab: int, batch: int, seed: int):
    """Random prompts [B, prompt_length], ids in [2, V), no padding."""
    import numpy as np

    return np.random.default_rng(seed).integers(2, vocab, (batch, rc.prompt_length),
                                                dtype=np.int32)


# --- workers (each in its own process) -----------------------------------------------------


class T5xWorker:
    """t5x_like: Runtime + Trainer as train.py builds them; decoding through infer.predict."""

    def __init__(self, rc: RaceConfig):
        import jax
        import seqio

        from t5x_like import model_api, optimizers
        from t5x_like.runtime import Runtime
        from t5x_like.trainer import Trainer

        self.rc = rc
        cfg = t5x_network_config(rc)
        self.vocab = cfg.vocab_size
        # An EOS id the network cannot emit (its logits have `vocab` entries): every row
        # decodes exactly `new_tokens` tokens, as HF with eos_token_id=None.
        vocabulary = seqio.PassThroughVocabulary(cfg.vocab_size, eos_id=cfg.vocab_size)
        loss = model_api.LossConfig(z_loss=0.0)
        if rc.family == "gpt2":
            model = model_api.DecoderOnlyModel(cfg, vocabulary, loss=loss)
        else:
            model = model_api.EncoderDecoderModel(cfg, vocabulary, loss=loss)
        with harness.Timer() as t:
            self.runtime = Runtime.build(model)
            base = optimizers.adamw(learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8,
                                    weight_decay=0.01)
            self.trainer = Trainer(self.runtime, optimizers.build_optimizer(
                base, grad_clip_norm=1.0))
            self.state = self.trainer.init_state(self.runtime.init_params())
            jax.block_until_ready(self.state)
        self.setup_s = t.wall
        partitioner = self.runtime.partitioner
        self.batches = [partitioner.make_global_batch(self._features(seed)) for seed in (0, 1)]
        self.prompts = {b: partitioner.make_global_batch(self._prompt_features(b))
                        for b in rc.decode_batches}

    def _features(self, seed: int) -> dict[str, Any]:
        import numpy as np

        data = train_tokens(self.rc, self.vocab, seed)
        if self.rc.family == "gpt2":
            tokens = data["tokens"]
            return {"decoder_input_tokens": tokens[:, :-1],
                    "decoder_target_tokens": tokens[:, 1:],
                    "decoder_loss_weights": np.ones(tokens[:, 1:].shape, np.float32)}
        targets = data["targets"]
        decoder_inputs = np.concatenate(  # T5: shift right, start from 0
            [np.zeros((targets.shape[0], 1), np.int32), targets[:, :-1]], axis=1)
        return {"encoder_input_tokens": data["inputs"], "decoder_input_tokens": decoder_inputs,
                "decoder_target_tokens": targets,
                "decoder_loss_weights": np.ones(targets.shape, np.float32)}

    def _prompt_features(self, batch: int) -> dict[str, Any]:
        import numpy as np

        prompt = prompt_tokens(self.rc, self.vocab, batch, seed=10 + batch)
        if self.rc.family == "gpt2":
            # predict_batch's prompt: the first 1 + prompt_length decoder inputs (the whole
            # row here: DecodeConfig.prompt_length = P - 1, every token non-zero).
            return {"decoder_input_tokens": prompt}
        return {"encoder_input_tokens": prompt,
                "decoder_input_tokens": np.zeros((batch, self.rc.new_tokens), np.int32)}

    def _decode_config(self):
        from t5x_like import infer

        extra = {"prompt_length": self.rc.prompt_length - 1} if self.rc.family == "gpt2" else {}
        return infer.DecodeConfig(max_decode_length=self.rc.new_tokens, **extra)

    def num_params(self) -> int:
        import math

        import jax

        return sum(math.prod(x.shape) for x in jax.tree.leaves(self.runtime.net.abstract_params()))

    def train(self, steps: int) -> dict[str, Any]:
        import jax

        out: dict[str, list] = {"wall_s": [], "cpu_s": [], "loss": []}
        for i in range(steps):
            with harness.Timer() as t:
                self.state, metrics = self.trainer.run_train_step(self.state, self.batches[i % 2])
                jax.block_until_ready((self.state, metrics))
            out["wall_s"].append(t.wall)
            out["cpu_s"].append(t.cpu)
            out["loss"].append(float(metrics["loss"]))
        return out

    def decode(self, batch: int, calls: int) -> dict[str, Any]:
        from t5x_like import infer

        out: dict[str, list] = {"wall_s": [], "cpu_s": [], "new_tokens": []}
        for _ in range(calls):
            with harness.Timer() as t:
                tokens = infer.predict(self.runtime, self.state.params, self.prompts[batch],
                                       self._decode_config())  # host numpy: synchronous
            out["wall_s"].append(t.wall)
            out["cpu_s"].append(t.cpu)
            out["new_tokens"].append(int(tokens.shape[0] * tokens.shape[1]))
        return out

    def info(self) -> dict[str, Any]:
        import jax

        return {"framework": "t5x_like", "jax": jax.__version__, "flax": _version("flax"),
                "num_params": self.num_params(), "setup_s": self.setup_s,
                "xla_flags": os.environ.get("XLA_FLAGS", ""),
                "devices": [str(d) for d in jax.devices()]}


class HFWorker:
    """Hugging Face: the PyTorch model, its own loss, torch AdamW, `generate`."""

    def __init__(self, rc: RaceConfig, threads: int, attn: str | None):
        import torch
        import transformers

        torch.set_num_threads(threads)
        # XLA's CPU runtime flushes denormals to zero; without the same mode torch runs
        # random-weight T5 / GPT-2 decoding up to 25x slower (denormal arithmetic).
        torch.set_flush_denormal(True)
        torch.manual_seed(0)
        self.rc = rc
        with harness.Timer() as t:
            config = hf_config(rc, attn)
            cls = (transformers.GPT2LMHeadModel if rc.family == "gpt2"
                   else transformers.T5ForConditionalGeneration)
            self.model = cls(config).float()
            if rc.family == "t5" and rc.t5_version == "1.1":
                # transformers >= 5 always ties T5's lm_head to the embedding (it keeps
                # tie_word_embeddings=False only as "do not scale"); v1.1 checkpoints
                # have their own lm_head, as t5x_like's untied logits: untie it.
                self.model.lm_head = torch.nn.Linear(config.d_model, config.vocab_size,
                                                     bias=False)
                self.model.config.tie_word_embeddings = False
            gen = self.model.generation_config
            gen.eos_token_id, gen.pad_token_id = None, 0
            if rc.family == "gpt2":
                gen.bos_token_id = None
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                                         weight_decay=0.01)
        self.setup_s = t.wall
        self.vocab = config.vocab_size
        self.batches = [self._features(seed) for seed in (0, 1)]
        self.prompts = {b: torch.from_numpy(prompt_tokens(rc, self.vocab, b, seed=10 + b)).long()
                        for b in rc.decode_batches}

    def _features(self, seed: int) -> dict[str, Any]:
        import torch

        data = {k: torch.from_numpy(v).long()
                for k, v in train_tokens(self.rc, self.vocab, seed).items()}
        if self.rc.family == "gpt2":
            # HF shifts labels inside the model: L positions in, L - 1 predicted.
            tokens = data["tokens"][:, :-1]
            return {"input_ids": tokens, "labels": tokens}
        return {"input_ids": data["inputs"], "attention_mask": torch.ones_like(data["inputs"]),
                "labels": data["targets"]}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())  # tied weights counted once

    def train(self, steps: int) -> dict[str, Any]:
        import torch

        self.model.train()
        out: dict[str, list] = {"wall_s": [], "cpu_s": [], "loss": []}
        for i in range(steps):
            with harness.Timer() as t:
                self.opt.zero_grad(set_to_none=True)
                loss = self.model(**self.batches[i % 2]).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                self.opt.step()
                loss_value = float(loss.detach())
            out["wall_s"].append(t.wall)
            out["cpu_s"].append(t.cpu)
            out["loss"].append(loss_value)
        return out

    def decode(self, batch: int, calls: int) -> dict[str, Any]:
        import torch

        self.model.eval()
        prompt = self.prompts[batch]
        out: dict[str, list] = {"wall_s": [], "cpu_s": [], "new_tokens": []}
        for _ in range(calls):
            with harness.Timer() as t, torch.inference_mode():
                tokens = self.model.generate(
                    input_ids=prompt, attention_mask=torch.ones_like(prompt),
                    max_new_tokens=self.rc.new_tokens, do_sample=False, use_cache=True)
            out["wall_s"].append(t.wall)
            out["cpu_s"].append(t.cpu)
            # decoder-only: prompt + new; encoder-decoder: the start token + new.
            skip = prompt.shape[1] if self.rc.family == "gpt2" else 1
            out["new_tokens"].append(int(tokens.shape[0] * (tokens.shape[1] - skip)))
        return out

    def info(self) -> dict[str, Any]:
        import torch

        return {"framework": "hf", "torch": torch.__version__,
                "transformers": _version("transformers"), "num_params": self.num_params(),
                "setup_s": self.setup_s, "torch_threads": torch.get_num_threads(),
                "attn_implementation": self.model.config._attn_implementation}


def _version(package: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(package)


def warm_up(worker, rc: RaceConfig, steps: int) -> dict[str, Any]:
    """Untimed first calls: for t5x_like the first of each jitted function is trace +
    compile + run; reported, never part of the medians."""
    train = worker.train(steps)
    decode = {str(b): worker.decode(b, 1)["wall_s"] for b in rc.decode_batches}
    return {"train_first_steps_s": train["wall_s"], "decode_first_call_s": decode,
            "first_loss": train["loss"][0]}


def serve(framework: str, rc: RaceConfig, threads: int, attn: str | None) -> None:
    """Worker main loop: one JSON command per stdin line, one tagged JSON reply each."""
    worker = T5xWorker(rc) if framework == "t5x_like" else HFWorker(rc, threads, attn)
    for line in sys.stdin:
        msg = json.loads(line)
        cmd, args = msg["cmd"], msg.get("args", {})
        if cmd == "quit":
            break
        if cmd == "info":
            result = worker.info()
        elif cmd == "warm_up":
            result = warm_up(worker, rc, **args)
        else:
            result = getattr(worker, cmd)(**args)
        print(RESULT_TAG + json.dumps(result), flush=True)


class WorkerProcess:
    """The parent's handle on one worker subprocess."""

    def __init__(self, framework: str, rc_args: list[str], threads: int, cores: list[int] | None,
                 attn: str | None, omp_wait_policy: str, log_path: str):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework,
               "--threads", str(threads), *rc_args]
        if attn:
            cmd += ["--hf_attn", attn]
        env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
        if framework == "hf" and omp_wait_policy != "default":
            env["OMP_WAIT_POLICY"] = omp_wait_policy
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
        self.framework, self.log_path = framework, log_path
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in close())
        preexec = (lambda: os.sched_setaffinity(0, cores)) if cores else None
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env, cwd=REPO,
                                     preexec_fn=preexec)

    def call(self, cmd: str, **args) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"cmd": cmd, "args": args}) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(RESULT_TAG):
                return json.loads(line[len(RESULT_TAG):])
            self.log.write(line)
        self.log.flush()
        raise RuntimeError(f"{self.framework} worker exited with {self.proc.wait()} during "
                           f"{cmd!r}; log {self.log_path}:\n{harness.log_tail(self.log_path)}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        self.log.close()


# --- the race ------------------------------------------------------------------------------


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def race(rc: RaceConfig, rc_args: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Builds both workers, warms them up, then alternates them for `args.rounds` rounds."""
    workers = {}
    try:
        for fw in FRAMEWORKS:  # one at a time: building and compiling compete for the cores
            print(f"[vs_hf] {rc.name}: building and warming up {fw} ...", file=sys.stderr)
            log = os.path.join(args.log_dir, f"{rc.name}_{fw}.log")
            w = WorkerProcess(fw, rc_args, args.threads, args.cores, args.hf_attn,
                              args.omp_wait_policy, log)
            workers[fw] = w
            info = w.call("info")
            info.update(w.call("warm_up", steps=args.warmup))
            w.info = info
        runs: dict[str, dict[str, list[dict]]] = {fw: {} for fw in FRAMEWORKS}
        loads = []
        for r in range(args.rounds):
            print(f"[vs_hf] {rc.name}: round {r + 1}/{args.rounds}", file=sys.stderr)
            loads.append(os.getloadavg()[0])
            tasks = [("train", {"steps": args.steps})] + [
                (f"decode_b{b}", {"batch": b, "calls": args.calls}) for b in rc.decode_batches]
            for task, targs in tasks:
                for fw in FRAMEWORKS:
                    cmd = "train" if task == "train" else "decode"
                    runs[fw].setdefault(task, []).append(workers[fw].call(cmd, **targs))
    finally:
        for w in workers.values():
            w.close()
    return summarize(rc, {fw: workers[fw].info for fw in FRAMEWORKS}, runs, loads)


def summarize(rc: RaceConfig, infos: dict[str, dict], runs: dict[str, dict[str, list[dict]]],
              loads: list[float]) -> dict[str, Any]:
    """Medians per framework and task, and the t5x_like / HF ratios."""
    out: dict[str, Any] = {"config": dataclasses.asdict(rc), "load_average_1m_per_round": loads,
                           "frameworks": infos, "tasks": {}}
    for task in runs["t5x_like"]:
        row: dict[str, Any] = {}
        for fw in FRAMEWORKS:
            rounds = runs[fw][task]
            wall = [t for r in rounds for t in r["wall_s"]]
            cpu = [t for r in rounds for t in r["cpu_s"]]
            if task == "train":
                tokens = rc.train_tokens_per_step
            else:
                tokens = rounds[0]["new_tokens"][0]
                if any(n != tokens for r in rounds for n in r["new_tokens"]):
                    raise RuntimeError(f"{fw} {task}: varying numbers of new tokens")
            row[fw] = {
                "tokens_per_call": tokens,
                "wall_s": wall,
                "cpu_s": cpu,
                "round_medians_s": [_median(r["wall_s"]) for r in rounds],
                "median_s": _median(wall),
                "median_cpu_s": _median(cpu),
                "tokens_per_s": tokens / _median(wall),
                "tokens_per_cpu_s": tokens / _median(cpu),
            }
            if task == "train":
                row[fw]["last_loss"] = rounds[-1]["loss"][-1]
        if row["t5x_like"]["tokens_per_call"] != row["hf"]["tokens_per_call"]:
            raise RuntimeError(f"{task}: t5x_like makes {row['t5x_like']['tokens_per_call']} "
                               f"tokens per call, HF {row['hf']['tokens_per_call']}")
        row["ratio_t5x_over_hf"] = {
            k: row["t5x_like"][k] / row["hf"][k] for k in ("tokens_per_s", "tokens_per_cpu_s")}
        out["tasks"][task] = row
    return out


# --- report --------------------------------------------------------------------------------


def _task_label(rc: dict, task: str) -> str:
    if task == "train":
        shape = (f"{rc['train_batch']}x{rc['train_length']}" if rc["family"] == "gpt2" else
                 f"{rc['train_batch']}x{rc['train_length']}+{rc['train_targets']}")
        return f"train B×L {shape}"
    return (f"decode B={task.removeprefix('decode_b')}, {rc['prompt_length']}"
            f"+{rc['new_tokens']}")


def _table(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        f"cpus: {m['cpu_count']} (affinity {m['cores_used']}); threads: XLA pool and "
        f"torch.set_num_threads = {doc['threads']}; float32 on both sides",
        f"jax {m['jax']} / flax {m['flax']}  vs  torch {m['torch']} / transformers "
        f"{m['transformers']} (attention: {m['hf_attn']}, OMP_WAIT_POLICY: "
        f"{m['hf_omp_wait_policy']}; denormals flushed to zero on both sides)",
        f"load average (1 min) before/after: {m['load_average_before'][0]:.1f} / "
        f"{m['load_average_after'][0]:.1f}; {doc['rounds']} alternating rounds × "
        f"({doc['steps']} train steps, {doc['calls']} decode calls) per framework",
        "",
    ]
    header = ("config", "params t5x / HF", "task", "t5x_like tok/s", "HF tok/s", "ratio",
              "t5x ms", "HF ms", "ratio per cpu-s", "warm-up s t5x / HF")
    rows = [header]
    for r in doc["results"]:
        rc, fws = r["config"], r["frameworks"]
        params = "{:.2f}M / {:.2f}M".format(*(fws[fw]["num_params"] / 1e6 for fw in FRAMEWORKS))
        for i, (task, x) in enumerate(r["tasks"].items()):
            a, b = x["t5x_like"], x["hf"]
            if task == "train":
                warm = [sum(fws[fw]["train_first_steps_s"][:1]) for fw in FRAMEWORKS]
            else:
                key = task.removeprefix("decode_b")
                warm = [fws[fw]["decode_first_call_s"][key][0] for fw in FRAMEWORKS]
            rows.append((
                rc["name"] if i == 0 else "", params if i == 0 else "", _task_label(rc, task),
                f"{a['tokens_per_s']:,.0f}" if a["tokens_per_s"] >= 100 else
                f"{a['tokens_per_s']:.1f}",
                f"{b['tokens_per_s']:,.0f}" if b["tokens_per_s"] >= 100 else
                f"{b['tokens_per_s']:.1f}",
                f"{x['ratio_t5x_over_hf']['tokens_per_s']:.2f}",
                f"{a['median_s'] * 1e3:.0f}", f"{b['median_s'] * 1e3:.0f}",
                f"{x['ratio_t5x_over_hf']['tokens_per_cpu_s']:.2f}",
                f"{warm[0]:.1f} / {warm[1]:.1f}",
            ))
    lines += [
        *report.table(rows, left=3),
        "",
        "tok/s: train = positions per step (T5: encoder + decoder) / median step time; decode",
        "= generated tokens (B × new) / median time of one whole generate call (prefill or",
        "encoder included). ms = those medians. ratio = t5x_like / HF (> 1: t5x_like faster);",
        "per cpu-s = the same ratio in tokens per CPU-second of the worker process.",
        "warm-up s: the first train step / decode call, untimed (t5x_like: trace + compile + run).",
    ]
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = harness.argument_parser(__doc__)
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help=f"comma-separated names, or 'all'; known: {', '.join(CONFIGS)}")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run in < 2 min: batch 2, train length 64 (T5 64+16), "
                        "decode batch 2 with 16+16 tokens, 1 round of 1 step and 1 call")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--steps", type=int, default=2, help="train steps per round and side")
    parser.add_argument("--calls", type=int, default=1,
                        help="generate calls per decode batch, round and side")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed train steps per side before the rounds (one untimed "
                        "decode call per batch size too)")
    parser.add_argument("--train_batch", type=int, default=None)
    parser.add_argument("--train_length", type=int, default=None,
                        help="GPT-2 sequence / T5 encoder length")
    parser.add_argument("--train_targets", type=int, default=None, help="T5 decoder length")
    parser.add_argument("--decode_batches", default=None, help="comma-separated, e.g. 1,4")
    parser.add_argument("--prompt_length", type=int, default=None)
    parser.add_argument("--new_tokens", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="cores for each side (default: all this process may use); fewer "
                        "pins both workers to the first N of them")
    parser.add_argument("--hf_attn", default=None, choices=("sdpa", "eager"),
                        help="HF attention implementation (default: transformers' default)")
    parser.add_argument("--omp_wait_policy", default="passive",
                        choices=("passive", "active", "default"),
                        help="OMP_WAIT_POLICY of the HF worker. 'passive' (default) makes "
                        "torch's idle OpenMP threads sleep instead of spin: when other work "
                        "shares the cores, spinning made HF decoding up to 37x slower here; "
                        "'default' leaves the variable unset")
    parser.add_argument("--log_dir", default=None, help="worker logs (default: a temp dir)")
    parser.add_argument("--json_out", default=None, help="also write the JSON document here")
    parser.add_argument("--worker", choices=FRAMEWORKS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = harness.names(parser, args.configs, CONFIGS, "configs", allow_all=True)
    if args.quick and not args.worker:
        args.rounds, args.steps, args.calls, args.warmup = 1, 1, 1, 1
    if min(args.rounds, args.steps, args.calls, args.warmup) < 1:
        parser.error("--rounds, --steps, --calls and --warmup must be >= 1")
    overrides = dict(QUICK) if args.quick else {}
    for key in ("train_batch", "train_length", "train_targets", "prompt_length", "new_tokens"):
        if getattr(args, key) is not None:
            if getattr(args, key) < 1:
                parser.error(f"--{key}={getattr(args, key)} must be >= 1")
            overrides[key] = getattr(args, key)
    if args.decode_batches:
        overrides["decode_batches"] = tuple(int(b) for b in args.decode_batches.split(","))
    args.race_configs = [dataclasses.replace(CONFIGS[n], **overrides) for n in names]
    # What a worker needs to rebuild the same RaceConfig.
    args.rc_args = {rc.name: ["--configs", rc.name, *_override_args(rc)] for rc in
                    args.race_configs}
    available = sorted(os.sched_getaffinity(0))
    if args.threads is None:
        args.threads, args.cores = len(available), None
    elif not 1 <= args.threads <= len(available):
        parser.error(f"--threads={args.threads}: this process may use {len(available)} cores")
    else:
        args.cores = available[:args.threads]
    return args


def _override_args(rc: RaceConfig) -> list[str]:
    base = CONFIGS[rc.name]
    out = []
    for f in ("train_batch", "train_length", "train_targets", "prompt_length", "new_tokens"):
        if getattr(rc, f) != getattr(base, f):
            out += [f"--{f}", str(getattr(rc, f))]
    if rc.decode_batches != base.decode_batches:
        out += ["--decode_batches", ",".join(map(str, rc.decode_batches))]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = _parse(argv)
    if args.worker:
        sys.path.insert(0, REPO)
        serve(args.worker, args.race_configs[0], args.threads, args.hf_attn)
        return None
    args.log_dir = args.log_dir or tempfile.mkdtemp(prefix="vs_hf_")
    os.makedirs(args.log_dir, exist_ok=True)
    load_before = list(os.getloadavg())
    results = [race(rc, args.rc_args[rc.name], args) for rc in args.race_configs]
    first = results[0]["frameworks"]
    doc = report.document(
        "vs_hf",
        machine={
            "cpu_count": os.cpu_count(),
            "cores_used": args.cores or sorted(os.sched_getaffinity(0)),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "jax": first["t5x_like"]["jax"], "flax": first["t5x_like"]["flax"],
            "torch": first["hf"]["torch"], "transformers": first["hf"]["transformers"],
            "hf_attn": first["hf"]["attn_implementation"],
            "hf_omp_wait_policy": args.omp_wait_policy,
            "load_average_before": load_before,
            "load_average_after": list(os.getloadavg()),
        },
        dtype="float32",
        threads=args.threads,
        rounds=args.rounds, steps=args.steps, calls=args.calls, warmup=args.warmup,
        log_dir=args.log_dir,
        results=results,
    )
    return report.emit(doc, _table(doc), args.json_out)


if __name__ == "__main__":
    main()

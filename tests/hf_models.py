"""What the Hugging Face tests share (test_convert.py and the three *_hf_parity.py files):
torch and transformers, the fixed tolerance, loading an HF model into our network through
the converter, and our cached greedy decoding to set against HF's `generate`.

Importing this module skips the importing test module where torch or transformers is
not installed (the `test` extra installs them). Test modules import it as `hf_models`:
tests/ is on sys.path under pytest.
"""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5x_like import convert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Once JAX has run, its CPU thread pool and torch's OpenMP threads contend for the
# cores: a multi-threaded torch then runs these tiny models ~50x slower. One is plenty.
torch.set_num_threads(1)

TOL = 1e-4  # float32; never loosen
PAD = 0  # the padding id of every test model (HF T5: also the decoder start)


def token_ids(x: np.ndarray) -> "torch.Tensor":
    """Token ids as the int64 tensor HF models take."""
    return torch.from_numpy(np.array(x, np.int64))


def from_hf(hf, cfg, directory):
    """Our network holding an HF model's weights, read by the converter
    (`save_pretrained` safetensors -> `t5x_like.convert.load_hf`), whose config must be
    `cfg`: every tensor is checked for shape, and one left out on either side fails."""
    hf.save_pretrained(directory)
    model, params = convert.load_hf(directory)
    assert model.config == cfg, (model.config, cfg)
    return convert.network(cfg, params)


@functools.partial(nnx.jit, static_argnames=("max_length",))
def _prefill(net, prompts, lengths, max_length):
    """Right-padded prompts [B, P] -> (each row's last-prompt-token logits [B, V], cache
    rewound to the prompt lengths: the padded slots are masked, then overwritten)."""
    cache = net.init_cache(prompts.shape[0], max_length)
    logits, cache = net.decode(prompts, cache=cache)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return last, cache.rewind(lengths)


@nnx.jit
def _step(net, tokens, cache):
    logits, cache = net.decode(tokens, cache=cache)
    return logits[:, -1], cache


def cached_greedy(net, prompts: np.ndarray, lengths: np.ndarray, new_tokens: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A decoder-only network's KV-cached greedy decoding of right-padded `prompts`
    [B, P] of `lengths` [B]: one padded prefill rewound to each prompt's length, then
    one token per step -> (generated tokens [B, new], logits [B, new, V])."""
    logits, cache = _prefill(net, jnp.asarray(prompts), jnp.asarray(lengths, jnp.int32),
                             max_length=prompts.shape[1] + new_tokens)
    tokens, step_logits = [], []
    for _ in range(new_tokens):
        step_logits.append(np.asarray(logits))
        tokens.append(step_logits[-1].argmax(-1).astype(np.int32))
        logits, cache = _step(net, jnp.asarray(tokens[-1][:, None]), cache)
    return np.stack(tokens, axis=1), np.stack(step_logits, axis=1)

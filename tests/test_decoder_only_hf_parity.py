"""Numerical parity with Hugging Face transformers' GPT-2, Llama and Mistral (PyTorch).

Small random `GPT2LMHeadModel` (tied, learned positions, biases, GELU tanh),
`LlamaForCausalLM` (GQA 4/2 heads, untied, RoPE theta 500) and `MistralForCausalLM`
(Llama + sliding window 4) are built from configs (no hub, no download), saved as
safetensors and imported into our `DecoderOnly` by `t5x_like.convert`. Teacher-forced
logits must agree to 1e-4 in float32 with right padding; our KV-cached greedy decoding
(one padded prefill, `rewind` to each prompt's length, then one token per step) must emit
the tokens of HF's `generate` on the same prompts left-padded, with the same logits at
every step.

HF initialises weights with stddev 0.02 and norms to 1, which gives nearly uniform
attention and flat logits; the models here are redrawn at unit scale (`_hf_model`) so
that positions, masks and norms all move the logits.
Skipped where torch / transformers are not installed (the `test` extra installs them).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import PAD, TOL, cached_greedy, from_hf, token_ids, torch, transformers

from models import decoder_only as do

GPT2 = do.DecoderOnlyConfig(
    vocab_size=96, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64, num_layers=2,
    mlp_activations=("gelu",), position_embedding="learned", max_length=32, norm="layernorm",
    layer_norm_epsilon=1e-5, use_bias=True, tie_embeddings=True)
LLAMA = do.DecoderOnlyConfig(
    vocab_size=96, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=48, num_layers=2,
    num_kv_heads=2, max_length=32, rope_theta=500.0, layer_norm_epsilon=1e-5)
MISTRAL = dataclasses.replace(LLAMA, sliding_window=4)
VARIANTS = {"gpt2": GPT2, "llama": LLAMA, "mistral": MISTRAL}


def _hf_config(name: str, cfg: do.DecoderOnlyConfig):
    common = {"vocab_size": cfg.vocab_size, "bos_token_id": None, "eos_token_id": None,
              "pad_token_id": PAD, "attn_implementation": "eager"}
    if name == "gpt2":
        return transformers.GPT2Config(
            n_embd=cfg.emb_dim, n_layer=cfg.num_layers, n_head=cfg.num_heads,
            n_inner=cfg.mlp_dim, n_positions=cfg.max_length, activation_function="gelu_new",
            layer_norm_epsilon=cfg.layer_norm_epsilon, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, tie_word_embeddings=True, **common)
    kw = {"hidden_size": cfg.emb_dim, "intermediate_size": cfg.mlp_dim,
          "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
          "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
          "max_position_embeddings": cfg.max_length, "rms_norm_eps": cfg.layer_norm_epsilon,
          "rope_theta": cfg.rope_theta, "tie_word_embeddings": False, **common}
    if name == "mistral":
        return transformers.MistralConfig(sliding_window=cfg.sliding_window, **kw)
    return transformers.LlamaConfig(attention_bias=False, mlp_bias=False, **kw)


def _hf_model(name: str, cfg: do.DecoderOnlyConfig, seed: int):
    """A random HF causal LM for `cfg`, float32, eval mode, weights at unit scale."""
    torch.manual_seed(seed)
    cls = {"gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM,
           "mistral": transformers.MistralForCausalLM}[name]
    hf = cls(_hf_config(name, cfg)).eval()
    assert hf.config._attn_implementation == "eager"
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if p.ndim == 1 and ("ln_" in pname or "norm" in pname) and pname.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif p.ndim == 1:  # biases
                p.normal_(0.0, 0.1)
            elif "wte" in pname or "wpe" in pname or "embed_tokens" in pname:
                p.normal_(0.0, 1.0)
            else:  # GPT-2's Conv1D is [in, out], torch Linear [out, in]
                fan_in = p.shape[0] if name == "gpt2" else p.shape[1]
                p.normal_(0.0, fan_in**-0.5)
    return hf


@pytest.fixture(scope="module", params=list(VARIANTS))
def models(request, tmp_path_factory):
    """(name, our network, HF model) with identical random weights."""
    name = request.param
    cfg = VARIANTS[name]
    hf = _hf_model(name, cfg, seed=3)
    return name, from_hf(hf, cfg, tmp_path_factory.mktemp(name)), hf


@nnx.jit
def _forward(net, tokens, segment_ids):
    return net(tokens, segment_ids=segment_ids)


def test_logits_match_hugging_face_with_right_padding(models):
    _, net, hf = models
    rng = np.random.RandomState(0)
    lengths = np.array([20, 13, 6])
    tokens = rng.randint(1, net.config.vocab_size, (3, 20))
    valid = np.arange(20)[None] < lengths[:, None]
    tokens = np.where(valid, tokens, PAD).astype(np.int32)
    with torch.no_grad():
        want = hf(input_ids=token_ids(tokens), attention_mask=token_ids(valid)).logits.numpy()
    got = np.asarray(_forward(net, jnp.asarray(tokens), jnp.asarray(valid, jnp.int32)))
    assert got.shape == (3, 20, net.config.vocab_size) and got.dtype == np.float32
    # Padding positions are never read (HF's and our padded queries see different keys).
    np.testing.assert_allclose(got[valid], want[valid], rtol=TOL, atol=TOL)


def test_cached_greedy_decoding_matches_hugging_face_generate(models):
    _, net, hf = models
    rng = np.random.RandomState(1)
    lengths = np.array([7, 3, 5])
    new_tokens = 10  # past the sliding window (4) and the longest prompt
    prompts = rng.randint(1, net.config.vocab_size, (3, 7)).astype(np.int32)
    right = np.where(np.arange(7)[None] < lengths[:, None], prompts, PAD)  # ours
    left = np.full_like(prompts, PAD)  # HF: left padding
    for r, n in enumerate(lengths):
        left[r, 7 - n:] = prompts[r, :n]
    with torch.no_grad():
        out = hf.generate(
            input_ids=token_ids(left), attention_mask=token_ids(left != PAD), do_sample=False,
            num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            pad_token_id=PAD, eos_token_id=None, output_logits=True,
            return_dict_in_generate=True)
    want = out.sequences.numpy()[:, 7:]
    want_logits = np.stack([x.numpy() for x in out.logits], axis=1)  # [B, steps, V]
    tokens, logits = cached_greedy(net, right, lengths, new_tokens)
    np.testing.assert_array_equal(tokens, want)
    np.testing.assert_allclose(logits, want_logits, rtol=TOL, atol=TOL)
    # Not degenerate: the rows differ and several tokens occur. (A random tied GPT-2 soon
    # repeats one token per row, its embedding dominating the logits; the logits of every
    # step are compared all the same.)
    assert len({tuple(row) for row in tokens}) == 3 and len(np.unique(tokens)) > 3, tokens

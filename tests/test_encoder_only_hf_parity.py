"""Numerical parity with Hugging Face transformers' BERT (PyTorch), built from configs.

Small random `BertForMaskedLM` and `BertForSequenceClassification` models (no hub, no
download) are saved as safetensors and imported into our `EncoderOnly` by
`t5x_like.convert`. Hidden states, MLM logits and class logits must agree to 1e-4 in
float32, with padding (HF's attention mask = our token id 0) and two token types. Every
position is compared, padding included: both mask padding as a key only.

HF initialises biases to 0 and LayerNorm scales to 1, which would hide a mix-up of biases
or norms, so those are randomised; weights use a larger initializer_range than BERT's
0.02 so that attention is far from uniform.

Skipped where torch / transformers are not installed (the `test` extra installs them).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import PAD, TOL, from_hf, token_ids, torch, transformers

from models import encoder_only as eo

BASE = eo.EncoderOnlyConfig(vocab_size=99, emb_dim=64, num_heads=4, head_dim=16, mlp_dim=96,
                            num_layers=2, max_length=40, type_vocab_size=2, dropout_rate=0.0)
MLM = BASE  # MLM head, no classifier: BertForMaskedLM
CLASSIFIER = dataclasses.replace(BASE, mlm_head=False, num_classes=3)  # SequenceClassification


def _hf_config(cfg: eo.EncoderOnlyConfig):
    assert cfg.mlp_activations == ("gelu_exact",), cfg.mlp_activations
    assert cfg.attention_dim == cfg.emb_dim  # HF's heads split the hidden size
    return transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.emb_dim, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim,
        hidden_act="gelu",  # HF's "gelu" is the exact erf GELU
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=cfg.max_length, type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_epsilon, initializer_range=0.1, pad_token_id=PAD,
        num_labels=max(cfg.num_classes, 2), attn_implementation="eager",
    )


def _hf_model(cfg: eo.EncoderOnlyConfig, seed: int):
    """A random HF BertForMaskedLM (mlm_head) or BertForSequenceClassification, eval mode."""
    torch.manual_seed(seed)
    hf_class = (transformers.BertForMaskedLM if cfg.mlm_head
                else transformers.BertForSequenceClassification)
    hf = hf_class(_hf_config(cfg)).eval()
    assert hf.config._attn_implementation == "eager"
    with torch.no_grad():
        for name, p in hf.named_parameters():  # tied parameters are listed once
            if name.endswith("LayerNorm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return hf


@pytest.fixture(scope="module")
def batch():
    """tokens [3, 24] with 0, 7 and 15 trailing pads; token types A then B."""
    rng = np.random.RandomState(0)
    tokens = rng.randint(1, BASE.vocab_size, (3, 24))
    tokens[1, 17:] = PAD
    tokens[2, 9:] = PAD
    types = np.zeros_like(tokens)
    types[0, 10:], types[1, 6:17], types[2, 4:9] = 1, 1, 1
    return tokens.astype(np.int32), types.astype(np.int32)


@nnx.jit
def _mlm(net, tokens, types):
    hidden = net.encode(tokens, token_type_ids=types)
    return hidden, net.mlm_logits(hidden)


@nnx.jit
def _classify(net, tokens, types):
    hidden = net.encode(tokens, token_type_ids=types)
    return hidden, net.classification_logits(hidden)


def _hf_forward(hf, tokens, types):
    with torch.no_grad():
        out = hf(input_ids=token_ids(tokens), attention_mask=token_ids(tokens != PAD),
                 token_type_ids=token_ids(types), output_hidden_states=True)
    return out.hidden_states[-1].numpy(), out.logits.numpy()


def test_mlm_logits_and_hidden_states_match_hugging_face(batch, tmp_path):
    hf = _hf_model(MLM, seed=3)
    net = from_hf(hf, MLM, tmp_path)
    want_hidden, want_logits = _hf_forward(hf, *batch)
    hidden, logits = _mlm(net, *(jnp.asarray(x) for x in batch))
    assert logits.shape == (3, 24, MLM.vocab_size) and logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(hidden), want_hidden, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=TOL, atol=TOL)
    # Without token types both default to type 0.
    tokens = batch[0]
    with torch.no_grad():
        want = hf(input_ids=token_ids(tokens), attention_mask=token_ids(tokens != PAD)).logits
    got = nnx.jit(lambda n, t: n(t))(net, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=TOL, atol=TOL)


def test_classification_logits_match_hugging_face(batch, tmp_path):
    hf = _hf_model(CLASSIFIER, seed=4)
    net = from_hf(hf, CLASSIFIER, tmp_path)
    want_hidden, want_logits = _hf_forward(hf, *batch)
    hidden, logits = _classify(net, *(jnp.asarray(x) for x in batch))
    assert logits.shape == (3, 3) and logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(hidden), want_hidden, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=TOL, atol=TOL)

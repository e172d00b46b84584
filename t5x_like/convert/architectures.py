"""The registered Hugging Face architectures: T5 (v1.0, v1.1, Flan-T5, mT5, UL2-shaped),
GPT-2, Llama-style (Llama 2/3, Mistral, Qwen2), Mixtral (sparse MoE) and BERT (MLM,
sequence classification).

Each entry: HF config.json -> our config (every value we cannot represent is an error
naming it), our config -> config.json, and the tensor table (see `registry`). Importing
this module registers them; a new architecture is one more `registry.register` call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from models import decoder_only, encoder_decoder, encoder_only, moe
from t5x_like.convert import registry
from t5x_like.convert.registry import (
    Architecture,
    ConversionError,
    Layout,
    Part,
    linear,
    param_path,
    tensor,
    vector,
)

# HF activation names (transformers.activations.ACT2FN) -> ours (models.layers.ACTIVATIONS).
_ACTIVATIONS = {"relu": "relu", "gelu": "gelu_exact", "gelu_new": "gelu",
                "gelu_pytorch_tanh": "gelu", "silu": "silu", "swish": "silu"}
_HF_ACTIVATIONS = {"relu": "relu", "gelu_exact": "gelu", "gelu": "gelu_new", "silu": "silu"}


def _activation(value: str, field: str) -> str:
    if value not in _ACTIVATIONS:
        raise ConversionError(
            f"{field}={value!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[value]


def _hf_activation(ours: str) -> str:
    if ours not in _HF_ACTIVATIONS:
        raise ConversionError(f"activation {ours!r} has no Hugging Face name; use one of "
                              f"{sorted(_HF_ACTIVATIONS)}")
    return _HF_ACTIVATIONS[ours]


def _require(hf: Mapping[str, Any], field: str, allowed, why: str) -> None:
    value = hf.get(field)
    if value not in allowed:
        raise ConversionError(f"{field}={value!r} is not supported ({why}); only "
                              f"{list(allowed)} can be converted")


def _norm(prefix: str, ours: str, bias: bool = True) -> list[registry.Tensor]:
    out = [vector(f"{prefix}.weight", f"{ours}/scale")]
    if bias:
        out.append(vector(f"{prefix}.bias", f"{ours}/bias"))
    return out


# --- T5 -----------------------------------------------------------------------------------


def _t5_mlp_activations(proj: str) -> tuple[str, ...]:
    gated, _, act = proj.partition("-") if proj.startswith("gated-") else ("", "", proj)
    if proj == "gated-gelu":  # transformers' T5 forces the tanh GELU here
        act = "gelu_new"
    ours = _activation(act, "feed_forward_proj")
    return (ours, "linear") if gated else (ours,)


def _t5_from_hf(hf: Mapping[str, Any], hf_class: str) -> encoder_decoder.T5Config:
    # transformers >= 5 always sets tie_word_embeddings=True and keeps the checkpoint's own
    # value as scale_decoder_outputs (tied T5 1.0 scales logits by d_model^-0.5).
    # mT5 never scales (nor, in released checkpoints, ties) its output layer.
    scale = hf.get("scale_decoder_outputs")
    tied = hf.get("tie_word_embeddings", True) if scale is None else scale
    if hf.get("model_type") == "mt5":
        tied = False
    return encoder_decoder.T5Config(
        vocab_size=hf["vocab_size"], emb_dim=hf["d_model"], num_heads=hf["num_heads"],
        head_dim=hf["d_kv"], mlp_dim=hf["d_ff"], num_encoder_layers=hf["num_layers"],
        num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        dropout_rate=float(hf.get("dropout_rate", 0.0)),
        mlp_activations=_t5_mlp_activations(hf.get("feed_forward_proj", "relu")),
        logits_via_embedding=bool(tied),
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
    )


def _t5_feed_forward_proj(acts: tuple[str, ...]) -> str:
    if len(acts) == 2 and acts[1] == "linear":
        if acts[0] == "gelu":
            return "gated-gelu"
        if acts[0] == "gelu_exact":
            raise ConversionError("mlp_activations ('gelu_exact', 'linear') has no HF T5 "
                                  "name (its gated-gelu is the tanh GELU); use ('gelu', "
                                  "'linear')")
        return f"gated-{_hf_activation(acts[0])}"
    if len(acts) == 1:
        return _hf_activation(acts[0])
    raise ConversionError(f"mlp_activations {acts} cannot be expressed as an HF T5 "
                          "feed_forward_proj; use one activation or (act, 'linear')")


def _t5_to_hf(cfg: encoder_decoder.T5Config, hf_class: str) -> dict[str, Any]:
    if hf_class.startswith("MT5") and cfg.logits_via_embedding:
        raise ConversionError("logits_via_embedding=True (scaled tied logits) cannot be an "
                              "MT5ForConditionalGeneration; export it as T5")
    return {
        "architectures": [hf_class], "model_type": "mt5" if hf_class.startswith("MT5") else "t5",
        "vocab_size": cfg.vocab_size, "d_model": cfg.emb_dim, "d_kv": cfg.head_dim,
        "d_ff": cfg.mlp_dim, "num_layers": cfg.num_encoder_layers,
        "num_decoder_layers": cfg.num_decoder_layers, "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "dropout_rate": cfg.dropout_rate, "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "feed_forward_proj": _t5_feed_forward_proj(cfg.mlp_activations),
        # transformers < 5 reads tie_word_embeddings; >= 5 reads it (or, from its own
        # config.json, scale_decoder_outputs) as "scale the tied logits".
        "tie_word_embeddings": cfg.logits_via_embedding,
        "scale_decoder_outputs": cfg.logits_via_embedding, "is_encoder_decoder": True,
        "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
    }


def _t5_attention(hf: str, ours: str) -> list[registry.Tensor]:
    return [*(linear(f"{hf}.{x}.weight", f"{ours}/{y}/kernel")
              for x, y in (("q", "query"), ("k", "key"), ("v", "value"))),
            linear(f"{hf}.o.weight", f"{ours}/out/kernel", split=2)]


def _t5_mlp(hf: str, ours: str, cfg: encoder_decoder.T5Config) -> list[registry.Tensor]:
    names = ("wi",) if len(cfg.mlp_activations) == 1 else tuple(
        f"wi_{i}" for i in range(len(cfg.mlp_activations)))
    return [linear(f"{hf}.{n}.weight", f"{ours}/{n}/kernel") for n in (*names, "wo")]


def _t5_layout(cfg: encoder_decoder.T5Config) -> Layout:
    t = [tensor("shared.weight", "token_embedder/embedding")]
    t += [linear(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                 f"{stack}/relpos_bias/rel_embedding") for stack in ("encoder", "decoder")]
    for i in range(cfg.num_encoder_layers):
        hf, ours = f"encoder.block.{i}.layer", f"encoder/layers/{i}"
        t += _norm(f"{hf}.0.layer_norm", f"{ours}/pre_attention_layer_norm", bias=False)
        t += _t5_attention(f"{hf}.0.SelfAttention", f"{ours}/attention")
        t += _norm(f"{hf}.1.layer_norm", f"{ours}/pre_mlp_layer_norm", bias=False)
        t += _t5_mlp(f"{hf}.1.DenseReluDense", f"{ours}/mlp", cfg)
    t += _norm("encoder.final_layer_norm", "encoder/encoder_norm", bias=False)
    for i in range(cfg.num_decoder_layers):
        hf, ours = f"decoder.block.{i}.layer", f"decoder/layers/{i}"
        t += _norm(f"{hf}.0.layer_norm", f"{ours}/pre_self_attention_layer_norm", bias=False)
        t += _t5_attention(f"{hf}.0.SelfAttention", f"{ours}/self_attention")
        t += _norm(f"{hf}.1.layer_norm", f"{ours}/pre_cross_attention_layer_norm", bias=False)
        t += _t5_attention(f"{hf}.1.EncDecAttention", f"{ours}/encoder_decoder_attention")
        t += _norm(f"{hf}.2.layer_norm", f"{ours}/pre_mlp_layer_norm", bias=False)
        t += _t5_mlp(f"{hf}.2.DenseReluDense", f"{ours}/mlp", cfg)
    t += _norm("decoder.final_layer_norm", "decoder/decoder_norm", bias=False)
    tied = {"encoder.embed_tokens.weight": "shared.weight",
            "decoder.embed_tokens.weight": "shared.weight"}
    fallbacks = {}
    if cfg.logits_via_embedding:
        tied["lm_head.weight"] = "shared.weight"
    else:
        t.append(linear("lm_head.weight", "logits_dense/kernel"))
        # A transformers-5 model built with tie_word_embeddings=False still ties lm_head
        # (unscaled) and saves no lm_head.weight: the output layer is then the embedding.
        fallbacks["lm_head.weight"] = "shared.weight"
    return Layout(tuple(t), tied=tied, fallbacks=fallbacks, ignored=(
        r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",))


def _t5_export_class(cfg: encoder_decoder.T5Config, preferred: str | None) -> str:
    if preferred == "MT5ForConditionalGeneration" and not cfg.logits_via_embedding:
        return preferred  # an imported mT5 stays one
    return "T5ForConditionalGeneration"


def _t5_accepts(cfg: Any) -> bool:
    return isinstance(cfg, encoder_decoder.T5Config) and cfg.kv_heads == cfg.num_heads


T5 = registry.register(Architecture(
    name="t5", family="encoder_decoder", model_types=("t5", "mt5"),
    hf_classes=("T5ForConditionalGeneration", "MT5ForConditionalGeneration"),
    config_from_hf=_t5_from_hf, config_to_hf=_t5_to_hf, layout=_t5_layout,
    accepts=_t5_accepts, export_class=_t5_export_class,
))


# --- GPT-2 --------------------------------------------------------------------------------


def _gpt2_from_hf(hf: Mapping[str, Any], hf_class: str) -> decoder_only.DecoderOnlyConfig:
    _require(hf, "scale_attn_weights", (True, None), "logits are always scaled by 1/sqrt(H)")
    _require(hf, "scale_attn_by_inverse_layer_idx", (False, None), "not implemented")
    _require(hf, "add_cross_attention", (False, None), "no cross-attention in a decoder-only")
    d, n = hf["n_embd"], hf["n_head"]
    return decoder_only.DecoderOnlyConfig(
        vocab_size=hf["vocab_size"], emb_dim=d, num_heads=n, head_dim=d // n,
        mlp_dim=hf.get("n_inner") or 4 * d, num_layers=hf["n_layer"],
        mlp_activations=(_activation(hf.get("activation_function", "gelu_new"),
                                     "activation_function"),),
        position_embedding="learned", max_length=hf["n_positions"], norm="layernorm",
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), use_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        dropout_rate=float(hf.get("resid_pdrop", 0.0)),
    )


def _gpt2_to_hf(cfg: decoder_only.DecoderOnlyConfig, hf_class: str) -> dict[str, Any]:
    return {
        "architectures": [hf_class], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_embd": cfg.emb_dim, "n_head": cfg.num_heads, "n_layer": cfg.num_layers,
        "n_inner": cfg.mlp_dim, "n_positions": cfg.max_length,
        "activation_function": _hf_activation(cfg.mlp_activations[0]),
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "tie_word_embeddings": cfg.tie_embeddings, "resid_pdrop": cfg.dropout_rate,
        "embd_pdrop": cfg.dropout_rate, "attn_pdrop": cfg.dropout_rate,
    }


def _causal_lm_layout(cfg: decoder_only.DecoderOnlyConfig, tensors: list[registry.Tensor],
                      embedding: str, ignored: str) -> Layout:
    """A decoder-only layout: `tensors` up to the final norm, then the output layer,
    `lm_head` [V, D] or, when tied, the HF `embedding` table; `ignored` matches the
    buffers HF checkpoints may carry that we have no parameter for."""
    tied = {}
    if cfg.tie_embeddings:
        tied["lm_head.weight"] = embedding
    else:
        tensors = [*tensors, linear("lm_head.weight", "logits_dense/kernel")]
    return Layout(tuple(tensors), tied=tied, ignored=(ignored,))


def _gpt2_layout(cfg: decoder_only.DecoderOnlyConfig) -> Layout:
    t = [tensor("transformer.wte.weight", "token_embedder/embedding"),
         tensor("transformer.wpe.weight", "position_embedder/embedding")]
    for i in range(cfg.num_layers):
        hf, ours = f"transformer.h.{i}", f"layers/{i}"
        attn = f"{ours}/self_attention"
        t += _norm(f"{hf}.ln_1", f"{ours}/pre_self_attention_layer_norm")
        # Conv1D weights are [in, out]; c_attn holds [q | k | v] side by side.
        t.append(tensor(f"{hf}.attn.c_attn.weight", *(f"{attn}/{x}/kernel"
                                                      for x in ("query", "key", "value"))))
        t.append(vector(f"{hf}.attn.c_attn.bias", *(f"{attn}/{x}/bias"
                                                    for x in ("query", "key", "value"))))
        t.append(tensor(f"{hf}.attn.c_proj.weight", f"{attn}/out/kernel", split=2))
        t.append(vector(f"{hf}.attn.c_proj.bias", f"{attn}/out/bias"))
        t += _norm(f"{hf}.ln_2", f"{ours}/pre_mlp_layer_norm")
        for theirs, mine in (("c_fc", "wi"), ("c_proj", "wo")):
            t.append(tensor(f"{hf}.mlp.{theirs}.weight", f"{ours}/mlp/{mine}/kernel"))
            t.append(vector(f"{hf}.mlp.{theirs}.bias", f"{ours}/mlp/{mine}/bias"))
    t += _norm("transformer.ln_f", "decoder_norm")
    # Older checkpoints carry the causal-mask buffers.
    return _causal_lm_layout(cfg, t, "transformer.wte.weight",
                             r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias")


def _gpt2_accepts(cfg: Any) -> bool:
    return (isinstance(cfg, decoder_only.DecoderOnlyConfig)
            and cfg.position_embedding == "learned" and cfg.norm == "layernorm"
            and cfg.use_bias and cfg.qkv_bias in (None, True) and cfg.kv_heads == cfg.num_heads
            and cfg.attention_dim == cfg.emb_dim and cfg.sliding_window is None
            and len(cfg.mlp_activations) == 1)


GPT2 = registry.register(Architecture(
    name="gpt2", family="decoder_only", model_types=("gpt2",),
    hf_classes=("GPT2LMHeadModel",), config_from_hf=_gpt2_from_hf,
    config_to_hf=_gpt2_to_hf, layout=_gpt2_layout, accepts=_gpt2_accepts,
    export_class=lambda cfg, preferred: "GPT2LMHeadModel", base_prefix="transformer.",
))


# --- Llama-style: Llama 2/3, Mistral, Qwen2 --------------------------------------------------


def _rope_theta(hf: Mapping[str, Any]) -> float:
    """RoPE base from transformers >= 5 `rope_parameters` or the older top-level fields."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise ConversionError(
            f"rope_scaling type {rope_type!r} is not implemented (only plain RoPE, "
            "'default'); e.g. Llama 3.1+ 'llama3' frequency scaling cannot be converted")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _llama_from_hf(hf: Mapping[str, Any], hf_class: str,
                   moe_config: moe.MoeConfig | None = None) -> decoder_only.DecoderOnlyConfig:
    model_type = hf["model_type"]
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ConversionError(f"hidden_act={hf['hidden_act']!r} is not supported; only a "
                              "SwiGLU MLP (hidden_act='silu') can be converted")
    _require(hf, "mlp_bias", (False, None), "Llama MLP biases are not implemented")
    qkv_bias = model_type == "qwen2"
    if model_type == "llama":
        _require(hf, "attention_bias", (False, None),
                 "an o_proj bias is not implemented; q/k/v biases are (Qwen2)")
    sliding_window = None
    if model_type in ("mistral", "mixtral"):
        sliding_window = hf.get("sliding_window")
    if model_type == "qwen2":
        _require(hf, "use_sliding_window", (False, None),
                 "Qwen2's per-layer sliding windows are not implemented")
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    return decoder_only.DecoderOnlyConfig(
        vocab_size=hf["vocab_size"], emb_dim=d, num_heads=n,
        head_dim=hf.get("head_dim") or d // n, mlp_dim=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_kv_heads=hf.get("num_key_value_heads") or n, mlp_activations=("silu", "linear"),
        position_embedding="rope", max_length=hf.get("max_position_embeddings", 2048),
        rope_theta=_rope_theta(hf), norm="rmsnorm",
        layer_norm_epsilon=hf.get("rms_norm_eps", 1e-6), use_bias=False,
        qkv_bias=True if qkv_bias else None,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=sliding_window, dropout_rate=float(hf.get("attention_dropout", 0.0)),
        moe=moe_config,
    )


_LLAMA_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                "Qwen2ForCausalLM": "qwen2"}


def _llama_export_class(cfg: decoder_only.DecoderOnlyConfig, preferred: str | None) -> str:
    if cfg.qkv_bias and cfg.sliding_window is not None:
        raise ConversionError("qkv_bias=True with a sliding_window has no Hugging Face "
                              "class (Qwen2 windows only some layers); drop one of them")
    if cfg.qkv_bias:
        return "Qwen2ForCausalLM"
    return "MistralForCausalLM" if cfg.sliding_window is not None else "LlamaForCausalLM"


def _llama_to_hf(cfg: decoder_only.DecoderOnlyConfig, hf_class: str) -> dict[str, Any]:
    out = {
        "architectures": [hf_class], "model_type": {**_LLAMA_TYPES, **_MIXTRAL_TYPES}[hf_class],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.emb_dim,
        "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_length, "rms_norm_eps": cfg.layer_norm_epsilon,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": cfg.dropout_rate,
    }
    if hf_class == "LlamaForCausalLM":
        out.update(attention_bias=False, mlp_bias=False)
    elif hf_class == "MistralForCausalLM":
        out["sliding_window"] = cfg.sliding_window
    elif hf_class == "Qwen2ForCausalLM":
        out.update(use_sliding_window=False, sliding_window=None)
    return out


MlpTensors = Callable[[str, str], list[registry.Tensor]]


def _llama_mlp(hf: str, ours: str) -> list[registry.Tensor]:
    return [linear(f"{hf}.mlp.{theirs}.weight", f"{ours}/mlp/{mine}/kernel")
            for theirs, mine in (("gate_proj", "wi_0"), ("up_proj", "wi_1"),
                                 ("down_proj", "wo"))]


def _llama_layout(cfg: decoder_only.DecoderOnlyConfig, mlp: MlpTensors = _llama_mlp) -> Layout:
    """Llama's tensor table; `mlp(hf layer prefix, our layer prefix)` gives the MLP's."""
    t = [tensor("model.embed_tokens.weight", "token_embedder/embedding")]
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}", f"layers/{i}"
        attn = f"{ours}/self_attention"
        t += _norm(f"{hf}.input_layernorm", f"{ours}/pre_self_attention_layer_norm", bias=False)
        for x, y in (("q", "query"), ("k", "key"), ("v", "value")):
            t.append(linear(f"{hf}.self_attn.{x}_proj.weight", f"{attn}/{y}/kernel"))
            if cfg.qkv_bias:
                t.append(vector(f"{hf}.self_attn.{x}_proj.bias", f"{attn}/{y}/bias"))
        t.append(linear(f"{hf}.self_attn.o_proj.weight", f"{attn}/out/kernel", split=2))
        t += _norm(f"{hf}.post_attention_layernorm", f"{ours}/pre_mlp_layer_norm", bias=False)
        t += mlp(hf, ours)
    t += _norm("model.norm", "decoder_norm", bias=False)
    return _causal_lm_layout(cfg, t, "model.embed_tokens.weight",
                             r"(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _llama_accepts(cfg: Any) -> bool:
    return (isinstance(cfg, decoder_only.DecoderOnlyConfig) and cfg.position_embedding == "rope"
            and cfg.norm == "rmsnorm" and not cfg.use_bias
            and cfg.mlp_activations == ("silu", "linear") and cfg.moe is None)


LLAMA = registry.register(Architecture(
    name="llama", family="decoder_only", model_types=("llama", "mistral", "qwen2"),
    hf_classes=tuple(_LLAMA_TYPES), config_from_hf=_llama_from_hf,
    config_to_hf=_llama_to_hf, layout=_llama_layout, accepts=_llama_accepts,
    export_class=_llama_export_class, base_prefix="model.",
))


# --- Mixtral: Llama with a sparse MoE feed-forward in every layer ----------------------------

_MIXTRAL_TYPES = {"MixtralForCausalLM": "mixtral"}


def _mixtral_from_hf(hf: Mapping[str, Any], hf_class: str) -> decoder_only.DecoderOnlyConfig:
    # HF: softmax over all experts in float32, top-k, the k weights renormalised to sum 1,
    # every token through its k experts (nothing dropped).
    k = hf.get("num_experts_per_tok", 2)
    if k == 1:
        raise ConversionError(
            "num_experts_per_tok=1 is not supported: HF Mixtral then gives every token "
            "weight 1 (renormalised top-1), which MoeConfig refuses because the loss would "
            "not train the router; use a checkpoint with num_experts_per_tok >= 2")
    jitter = hf.get("router_jitter_noise") or 0.0
    if jitter:
        raise ConversionError(
            f"router_jitter_noise={jitter!r} is not supported: HF scales the experts' inputs "
            "too, MoeConfig.jitter_noise only the router's (Switch); it acts in training "
            "only, so set it to 0.0 in config.json to import")
    moe_config = moe.MoeConfig(
        num_experts=hf.get("num_local_experts", 8), num_experts_per_token=k,
        routing="token_choice", renormalize=True, dispatch="dropless",
        load_balance_loss_weight=_load_balance_weight(
            float(hf.get("router_aux_loss_coef", 0.001)), k, hf["num_hidden_layers"]),
        router_z_loss_weight=0.0)
    return _llama_from_hf(hf, hf_class, moe_config)


def _load_balance_weight(router_aux_loss_coef: float, k: int, num_layers: int) -> float:
    """Our per-layer weight for HF's coefficient. HF adds coef * one Switch loss over the
    assignments of all layers pooled, whose fractions sum to k (k at uniform routing);
    we add weight * each layer's loss (fractions sum to 1; 1.0 at uniform), summed over
    layers. weight = coef * k / layers makes the two equal at uniform routing."""
    return router_aux_loss_coef * k / num_layers


def _mixtral_export_class(cfg: decoder_only.DecoderOnlyConfig, preferred: str | None) -> str:
    m = cfg.moe
    wrong = {
        "routing": (m.routing, "token_choice"), "renormalize": (m.renormalize, True),
        "dispatch": (m.dispatch, "dropless"), "layer_interval": (m.layer_interval, 1),
        "num_shared_experts": (m.num_shared_experts, 0), "jitter_noise": (m.jitter_noise, 0.0),
        "routed_scaling_factor": (m.routed_scaling_factor, 1.0),
    }
    for field, (value, want) in wrong.items():
        if value != want:
            raise ConversionError(
                f"MoeConfig.{field}={value!r} has no Hugging Face Mixtral equivalent (softmax "
                "top-k, renormalised, dropless, every layer sparse, no shared experts, no "
                f"jitter, no routed scaling); set {field}={want!r} to export as MixtralForCausalLM")
    if cfg.qkv_bias:
        raise ConversionError("qkv_bias=True has no Hugging Face Mixtral equivalent; export "
                              "a config without q/k/v biases")
    return "MixtralForCausalLM"


def _mixtral_to_hf(cfg: decoder_only.DecoderOnlyConfig, hf_class: str) -> dict[str, Any]:
    # HF Mixtral has no router z-loss: `router_z_loss_weight` is not carried over.
    out = _llama_to_hf(cfg, hf_class)
    out.update(
        intermediate_size=cfg.moe.expert_mlp_dim or cfg.mlp_dim,
        num_local_experts=cfg.moe.num_experts, num_experts_per_tok=cfg.moe.num_experts_per_token,
        router_aux_loss_coef=cfg.moe.load_balance_loss_weight * cfg.num_layers
        / cfg.moe.num_experts_per_token, router_jitter_noise=0.0,
        output_router_logits=False, sliding_window=cfg.sliding_window)
    return out


def _mixtral_experts(num_experts: int) -> MlpTensors:
    """The hub's (and `save_pretrained`'s) layout: a router `gate` [E, D] and per expert
    w1 (gate, silu), w3 (up), w2 (down), each a torch Linear."""
    def mlp(hf: str, ours: str) -> list[registry.Tensor]:
        out = [linear(f"{hf}.block_sparse_moe.gate.weight", f"{ours}/mlp/router/kernel")]
        for e in range(num_experts):
            for theirs, mine in (("w1", "wi_0"), ("w2", "wo"), ("w3", "wi_1")):
                part = Part(param_path(f"{ours}/mlp/experts/{mine}/kernel"), (e,))
                out.append(linear(f"{hf}.block_sparse_moe.experts.{e}.{theirs}.weight", part))
        return out
    return mlp


def _mixtral_fused_experts(hf: str, ours: str) -> list[registry.Tensor]:
    """transformers >= 5's in-memory layout: gate_up_proj [E, 2F, D] (gate rows first),
    down_proj [E, D, F]."""
    experts = f"{ours}/mlp/experts"
    return [linear(f"{hf}.mlp.gate.weight", f"{ours}/mlp/router/kernel"),
            linear(f"{hf}.mlp.experts.gate_up_proj", f"{experts}/wi_0/kernel",
                   f"{experts}/wi_1/kernel", batch=1),
            linear(f"{hf}.mlp.experts.down_proj", f"{experts}/wo/kernel", batch=1)]


def _mixtral_layout(cfg: decoder_only.DecoderOnlyConfig) -> Layout:
    hub = _llama_layout(cfg, _mixtral_experts(cfg.moe.num_experts))
    fused = _llama_layout(cfg, _mixtral_fused_experts)
    return Layout(hub.tensors, tied=hub.tied, ignored=hub.ignored, alternatives=(fused,))


def _mixtral_accepts(cfg: Any) -> bool:
    return (isinstance(cfg, decoder_only.DecoderOnlyConfig) and cfg.position_embedding == "rope"
            and cfg.norm == "rmsnorm" and not cfg.use_bias
            and cfg.mlp_activations == ("silu", "linear") and cfg.moe is not None)


MIXTRAL = registry.register(Architecture(
    name="mixtral", family="decoder_only", model_types=("mixtral",),
    hf_classes=tuple(_MIXTRAL_TYPES), config_from_hf=_mixtral_from_hf,
    config_to_hf=_mixtral_to_hf, layout=_mixtral_layout, accepts=_mixtral_accepts,
    export_class=_mixtral_export_class, base_prefix="model.",
))


# --- BERT ---------------------------------------------------------------------------------

_BERT_MLM = ("BertForMaskedLM", "BertForPreTraining")
_BERT_CLASSIFIER = "BertForSequenceClassification"


def _bert_from_hf(hf: Mapping[str, Any], hf_class: str) -> encoder_only.EncoderOnlyConfig:
    _require(hf, "position_embedding_type", ("absolute", None),
             "only learned absolute positions are implemented")
    _require(hf, "is_decoder", (False, None), "BERT as a causal decoder is not implemented")
    classifier = hf_class == _BERT_CLASSIFIER
    num_classes = 0
    if classifier:
        num_classes = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    return encoder_only.EncoderOnlyConfig(
        vocab_size=hf["vocab_size"], emb_dim=d, num_heads=n, head_dim=d // n,
        mlp_dim=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        max_length=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2),
        mlp_activations=(_activation(hf.get("hidden_act", "gelu"), "hidden_act"),),
        layer_norm_epsilon=hf.get("layer_norm_eps", 1e-12),
        dropout_rate=float(hf.get("hidden_dropout_prob", 0.1)),
        num_classes=num_classes, mlm_head=not classifier,
    )


def _bert_export_class(cfg: encoder_only.EncoderOnlyConfig, preferred: str | None) -> str:
    if cfg.mlm_head == bool(cfg.num_classes):
        raise ConversionError(
            f"mlm_head={cfg.mlm_head} with num_classes={cfg.num_classes} has no single "
            "Hugging Face class; export an MLM network (mlm_head=True, num_classes=0) as "
            "BertForMaskedLM or a classifier (mlm_head=False) as BertForSequenceClassification")
    return _BERT_CLASSIFIER if cfg.num_classes else "BertForMaskedLM"


def _bert_to_hf(cfg: encoder_only.EncoderOnlyConfig, hf_class: str) -> dict[str, Any]:
    out = {
        "architectures": [hf_class], "model_type": "bert", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.emb_dim, "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
        "max_position_embeddings": cfg.max_length, "type_vocab_size": cfg.type_vocab_size,
        "hidden_act": _hf_activation(cfg.mlp_activations[0]),
        "layer_norm_eps": cfg.layer_norm_epsilon, "hidden_dropout_prob": cfg.dropout_rate,
        "attention_probs_dropout_prob": cfg.dropout_rate, "pad_token_id": 0,
        "position_embedding_type": "absolute",
    }
    if cfg.num_classes:
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_classes)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_classes)}
    return out


def _dense(hf: str, ours: str, split: int = 1) -> list[registry.Tensor]:
    return [linear(f"{hf}.weight", f"{ours}/kernel", split=split),
            vector(f"{hf}.bias", f"{ours}/bias")]


def _bert_layout(cfg: encoder_only.EncoderOnlyConfig) -> Layout:
    e = "bert.embeddings"
    t = [tensor(f"{e}.word_embeddings.weight", "embeddings/token_embedder/embedding"),
         tensor(f"{e}.position_embeddings.weight", "embeddings/position_embedder/embedding")]
    if cfg.type_vocab_size:
        t.append(tensor(f"{e}.token_type_embeddings.weight",
                        "embeddings/token_type_embedder/embedding"))
    t += _norm(f"{e}.LayerNorm", "embeddings/layer_norm")
    for i in range(cfg.num_layers):
        hf, ours = f"bert.encoder.layer.{i}", f"layers/{i}"
        for x in ("query", "key", "value"):
            t += _dense(f"{hf}.attention.self.{x}", f"{ours}/attention/{x}")
        t += _dense(f"{hf}.attention.output.dense", f"{ours}/attention/out", split=2)
        t += _norm(f"{hf}.attention.output.LayerNorm", f"{ours}/post_attention_layer_norm")
        t += _dense(f"{hf}.intermediate.dense", f"{ours}/mlp/wi")
        t += _dense(f"{hf}.output.dense", f"{ours}/mlp/wo")
        t += _norm(f"{hf}.output.LayerNorm", f"{ours}/post_mlp_layer_norm")
    tied, ignored = {}, [r"(bert\.)?embeddings\.position_ids"]
    if cfg.mlm_head:
        t += _dense("cls.predictions.transform.dense", "mlm/dense")
        t += _norm("cls.predictions.transform.LayerNorm", "mlm/layer_norm")
        t.append(vector("cls.predictions.bias", "mlm/bias"))
        tied["cls.predictions.decoder.weight"] = f"{e}.word_embeddings.weight"
        tied["cls.predictions.decoder.bias"] = "cls.predictions.bias"
        # A BertForPreTraining checkpoint's pooler and next-sentence head.
        ignored += [r"(bert\.)?pooler\.dense\.(weight|bias)", r"cls\.seq_relationship\.\w+"]
    if cfg.num_classes:
        t += _dense("bert.pooler.dense", "classifier_head/pooler")
        t += _dense("classifier", "classifier_head/classifier")
    return Layout(tuple(t), tied=tied, ignored=tuple(ignored))


def _bert_accepts(cfg: Any) -> bool:
    return (isinstance(cfg, encoder_only.EncoderOnlyConfig)
            and cfg.attention_dim == cfg.emb_dim and len(cfg.mlp_activations) == 1)


BERT = registry.register(Architecture(
    name="bert", family="encoder_only", model_types=("bert",),
    hf_classes=(*_BERT_MLM, _BERT_CLASSIFIER), config_from_hf=_bert_from_hf,
    config_to_hf=_bert_to_hf, layout=_bert_layout, accepts=_bert_accepts,
    export_class=_bert_export_class, base_prefix="bert.",
))

"""Hugging Face import / export: `python -m t5x_like.convert --from_hf DIR --to MODEL_DIR`.

Public API:
  read_hf_config(hf_dir) -> HFModel        architecture, HF class and our config (no weights)
  load_hf(hf_dir, partitioner=, target=)   (HFModel, params) streamed into their shardings
  save_hf(config, params, out_dir, ...)    config.json + model.safetensors (sharded + index)
  network(config, params)                  an nnx module holding params
  abstract_params(config, partitioner)     ShapeDtypeStructs with the target shardings
  convert_hf_to_model_dir / export_model_dir   what the CLI's --from_hf / --to_hf do
  registry                                 Architecture, Layout, Tensor, register(): the table
  ConversionError                          every refusal, naming the tensor or value

Supported: T5 / T5 v1.1 / Flan-T5 / mT5 / UL2-shaped, GPT-2, Llama 2/3 (plain RoPE),
Mistral (sliding window), Qwen2 (q/k/v biases), Mixtral (sparse MoE: hub per-expert
w1/w2/w3 or transformers >= 5 fused experts; exported as the hub layout), BERT MLM and
sequence classification.
Only safetensors are read; pickle checkpoints are refused.
"""

from t5x_like.convert import architectures, registry
from t5x_like.convert.api import (
    HFModel,
    abstract_params,
    convert_hf_to_model_dir,
    export_model_dir,
    load_hf,
    network,
    read_hf_config,
    save_hf,
)
from t5x_like.convert.registry import Architecture, ConversionError, Layout, Tensor

__all__ = [
    "Architecture",
    "ConversionError",
    "HFModel",
    "Layout",
    "Tensor",
    "abstract_params",
    "architectures",
    "convert_hf_to_model_dir",
    "export_model_dir",
    "load_hf",
    "network",
    "read_hf_config",
    "registry",
    "save_hf",
]

"""Networks only: tokens -> logits (Flax NNX). Losses, scoring and decoding live in t5x_like.

Public API:
  layers            the shared layer library every family composes (see its docstring
                    for the einsum letters and logical axis names)
  encoder_decoder   T5Config, EncoderDecoder, DecoderCache, PRESETS, t5_1_1   (T5)
  decoder_only      DecoderOnlyConfig, DecoderOnly, DecoderOnlyCache, PRESETS, preset
                    (GPT-2, Llama-style, Mistral-style sliding window, prefix LM)
  encoder_only      EncoderOnlyConfig, EncoderOnly, PRESETS, preset   (BERT)
"""

from models import decoder_only, encoder_decoder, encoder_only, layers
from models.decoder_only import DecoderOnly, DecoderOnlyCache, DecoderOnlyConfig
from models.encoder_decoder import (
    PRESETS,
    DecoderCache,
    EncoderDecoder,
    T5Config,
    t5_1_1,
)
from models.encoder_only import EncoderOnly, EncoderOnlyConfig
from models.layers import KVCache

__all__ = [
    "PRESETS",
    "DecoderCache",
    "DecoderOnly",
    "DecoderOnlyCache",
    "DecoderOnlyConfig",
    "EncoderDecoder",
    "EncoderOnly",
    "EncoderOnlyConfig",
    "KVCache",
    "T5Config",
    "decoder_only",
    "encoder_decoder",
    "encoder_only",
    "layers",
    "t5_1_1",
]

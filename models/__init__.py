"""Networks only: tokens -> logits (Flax NNX). Losses, scoring and decoding live in t5x_like.

Public API:
  layers            the shared layer library every family composes (see its docstring
                    for the einsum letters and logical axis names)
  encoder_decoder   T5Config, EncoderDecoder, DecoderCache, PRESETS, t5_1_1
"""

from models import encoder_decoder, layers
from models.encoder_decoder import (
    PRESETS,
    DecoderCache,
    EncoderDecoder,
    T5Config,
    t5_1_1,
)
from models.layers import KVCache

__all__ = [
    "PRESETS",
    "DecoderCache",
    "EncoderDecoder",
    "KVCache",
    "T5Config",
    "encoder_decoder",
    "layers",
    "t5_1_1",
]

"""Token-level losses shared by every model family (T5X semantics)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_with_z_loss(
    logits: jax.Array,
    targets: jax.Array,
    *,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Per-token cross entropy with optional label smoothing and z-loss.

    Args:
      logits: [B, T, V] logits (computed in float32 here whatever their dtype).
      targets: [B, T] integer target ids.
      z_loss: coefficient of log(Z)^2, which keeps the softmax normaliser near 1
        (PaLM / T5X); it is part of the returned loss and also returned alone.
      label_smoothing: mass spread uniformly over the other V-1 tokens. The constant
        entropy of the smoothed target is subtracted, so a perfect model has loss 0.

    Returns:
      (loss [B, T], z_loss part [B, T]), both float32 and unweighted.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    # Entropy of the smoothed target distribution, so the minimum loss is 0.
    normalizer = -(
        confidence * jnp.log(confidence)
        + (vocab - 1) * low * jnp.log(low + 1e-20)
    ) if label_smoothing > 0 else 0.0
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    if label_smoothing > 0:
        mean_logit = jnp.mean(logits, axis=-1)
        # sum_v q_v * logit_v with q = low everywhere and `confidence` at the target.
        soft_logit = low * (vocab * mean_logit - target_logit) + confidence * target_logit
        loss = log_z - soft_logit - normalizer
    else:
        loss = log_z - target_logit
    z_part = z_loss * jnp.square(log_z)
    return loss + z_part, z_part

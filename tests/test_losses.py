"""Losses against independent formulas (optax / numpy)."""

import numpy as np
import optax
import pytest

from t5x_like import losses


@pytest.fixture(scope="module")
def logits_targets():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, size=(2, 5))
    return logits, targets


def test_plain_cross_entropy_matches_optax(logits_targets):
    logits, targets = logits_targets
    loss, z = losses.cross_entropy_with_z_loss(logits, targets)
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    np.testing.assert_allclose(loss, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(z, 0.0)


def test_z_loss_is_coefficient_times_log_z_squared(logits_targets):
    logits, targets = logits_targets
    loss, z = losses.cross_entropy_with_z_loss(logits, targets, z_loss=1e-3)
    log_z = np.log(np.sum(np.exp(logits.astype(np.float64)), axis=-1))
    np.testing.assert_allclose(z, 1e-3 * log_z**2, rtol=1e-5)
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    np.testing.assert_allclose(loss, ref + z, rtol=1e-5, atol=1e-6)


def test_label_smoothing_matches_soft_targets_minus_entropy(logits_targets):
    logits, targets = logits_targets
    ls, vocab = 0.1, logits.shape[-1]
    loss, _ = losses.cross_entropy_with_z_loss(logits, targets, label_smoothing=ls)
    soft = np.full(logits.shape, ls / (vocab - 1), np.float64)
    np.put_along_axis(soft, targets[..., None], 1 - ls, axis=-1)
    ce = optax.softmax_cross_entropy(logits.astype(np.float64), soft)
    entropy = -np.sum(soft * np.log(soft), axis=-1)
    np.testing.assert_allclose(loss, ce - entropy, rtol=1e-5, atol=1e-5)
    # A model that predicts exactly the smoothed distribution has loss 0.
    perfect_logits = np.log(soft).astype(np.float32)
    loss0, _ = losses.cross_entropy_with_z_loss(perfect_logits, targets, label_smoothing=ls)
    np.testing.assert_allclose(loss0, 0.0, atol=1e-5)

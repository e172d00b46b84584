"""Schedules against their formulas; optimizers against hand-computed numpy updates."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5x_like import optimizers

STEPS = [0, 1, 5, 99, 100, 101, 250, 999, 1000, 1500]


def _params():
    rng = np.random.default_rng(0)
    return {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                  "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)},
        "norm": {"scale": jnp.asarray(1.0 + 0.1 * rng.normal(size=(4,)), jnp.float32)},
    }


def _grads():
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), _params())


# --- schedules ---------------------------------------------------------------------------


@pytest.mark.parametrize("step", STEPS)
def test_warmup_rsqrt(step):
    t5x = optimizers.warmup_rsqrt()  # T5X default: 1 / sqrt(max(step, 10000))
    np.testing.assert_allclose(t5x(step), 1.0 / math.sqrt(max(step, 10_000)), rtol=1e-6)
    np.testing.assert_allclose(t5x(40_000), 0.005, rtol=1e-6)
    sched = optimizers.warmup_rsqrt(base_learning_rate=2.0, warmup_steps=100)
    np.testing.assert_allclose(sched(step), 2.0 / math.sqrt(max(step, 100)), rtol=1e-6)
    ramp = optimizers.warmup_rsqrt(2.0, 100, linear_warmup=True)
    np.testing.assert_allclose(
        ramp(step), 2.0 / math.sqrt(max(step, 100)) * min(1.0, step / 100), rtol=1e-6
    )


@pytest.mark.parametrize("step", STEPS)
def test_warmup_cosine(step):
    peak, w, total, end, init = 3e-3, 100, 1000, 1e-4, 1e-5
    sched = optimizers.warmup_cosine(peak, w, total, end_value=end, init_value=init)
    if step < w:
        want = init + (peak - init) * step / w
    elif step < total:
        want = end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (step - w) / (total - w)))
    else:
        want = end
    np.testing.assert_allclose(sched(step), want, rtol=1e-5)


@pytest.mark.parametrize("step", STEPS)
def test_warmup_linear(step):
    peak, w, total, end = 3e-3, 100, 1000, 1e-4
    sched = optimizers.warmup_linear(peak, w, total, end_value=end)
    if step < w:
        want = peak * step / w
    elif step < total:
        want = peak + (end - peak) * (step - w) / (total - w)
    else:
        want = end
    np.testing.assert_allclose(sched(step), want, rtol=1e-5)


def test_constant_and_make_schedule():
    np.testing.assert_allclose(optimizers.constant(0.25)(123), 0.25)
    np.testing.assert_allclose(
        optimizers.make_schedule("rsqrt", warmup_steps=4)(16), 0.25, rtol=1e-6
    )
    np.testing.assert_allclose(
        optimizers.make_schedule("cosine", peak_value=1.0, warmup_steps=0, total_steps=10)(5),
        0.5, rtol=1e-6,
    )
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'cosin'; known: "):
        optimizers.make_schedule("cosin")
    with pytest.raises(ValueError, match="warmup_steps=0 must be >= 1"):
        optimizers.warmup_rsqrt(warmup_steps=0)
    with pytest.raises(ValueError, match="warmup_steps=10, total_steps=10"):
        optimizers.warmup_linear(warmup_steps=10, total_steps=10)


def test_schedules_jit():
    sched = optimizers.warmup_cosine(1.0, 10, 100)
    np.testing.assert_allclose(jax.jit(sched)(jnp.int32(50)), sched(50), rtol=1e-6)


# --- optimizers --------------------------------------------------------------------------


def test_adamw_one_step_matches_numpy():
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.95, 1e-8, 0.1
    opt = optimizers.adamw(learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=wd)
    params, grads = _params(), _grads()
    state = opt.tx.init(params)
    updates, state = opt.tx.update(grads, state, params)

    def want(p, g):  # the first AdamW step in float64 numpy
        p, g = np.asarray(p, np.float64), np.asarray(g, np.float64)
        m_hat = (1 - b1) * g / (1 - b1)
        v_hat = (1 - b2) * g**2 / (1 - b2)
        decay = wd * p if p.ndim >= 2 else 0.0  # 1-D params are not decayed
        return -lr * (m_hat / (np.sqrt(v_hat) + eps) + decay)

    jax.tree.map(
        lambda u, p, g: np.testing.assert_allclose(u, want(p, g), rtol=1e-5, atol=1e-7),
        updates, params, grads,
    )
    np.testing.assert_allclose(opt.schedule(0), lr)


def test_weight_decay_mask_excludes_1d_params():
    params = _params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    mask = optimizers.decay_mask_ndim_at_least_2(params)
    assert mask == {"dense": {"kernel": True, "bias": False}, "norm": {"scale": False}}
    # With zero gradients only weight decay moves parameters.
    for opt in (
        optimizers.adamw(learning_rate=0.5, weight_decay=0.1),
        optimizers.adafactor(learning_rate=0.5, weight_decay_rate=0.1),
    ):
        updates, _ = opt.tx.update(zeros, opt.tx.init(params), params)
        assert float(jnp.abs(updates["dense"]["kernel"]).max()) > 0
        np.testing.assert_array_equal(updates["dense"]["bias"], 0.0)
        np.testing.assert_array_equal(updates["norm"]["scale"], 0.0)
    # No mask: everything decays.
    opt = optimizers.adamw(learning_rate=0.5, weight_decay=0.1, weight_decay_mask=None)
    updates, _ = opt.tx.update(zeros, opt.tx.init(params), params)
    np.testing.assert_allclose(updates["norm"]["scale"], -0.5 * 0.1 * params["norm"]["scale"])


def test_clipping_bounds_global_norm():
    params = _params()
    big = jax.tree.map(lambda g: 100.0 * g, _grads())
    assert float(optax.tree.norm(big)) > 10
    opt = optimizers.build_optimizer(optimizers.sgd(learning_rate=1.0), grad_clip_norm=0.5)
    updates, _ = opt.tx.update(big, opt.tx.init(params), params)
    np.testing.assert_allclose(optax.tree.norm(updates), 0.5, rtol=1e-5)
    # Same direction as the raw gradient: clipping only rescales.
    ratios = np.concatenate([np.ravel(u / -g) for u, g in
                             zip(jax.tree.leaves(updates), jax.tree.leaves(big))])
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-5)
    # Small gradients pass unchanged; None disables clipping.
    small = jax.tree.map(lambda g: 1e-3 * g, _grads())
    updates, _ = opt.tx.update(small, opt.tx.init(params), params)
    jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -g, rtol=1e-6), updates, small)
    unclipped = optimizers.build_optimizer(optimizers.sgd(learning_rate=1.0), grad_clip_norm=None)
    updates, _ = unclipped.tx.update(big, unclipped.tx.init(params), params)
    np.testing.assert_allclose(optax.tree.norm(updates), optax.tree.norm(big), rtol=1e-6)


def test_build_optimizer_schedule_and_errors():
    sched = optimizers.warmup_linear(1.0, 10, 100)
    opt = optimizers.build_optimizer(optimizers.adamw(learning_rate=sched))
    assert opt.schedule is sched
    bare = optimizers.build_optimizer(optax.sgd(0.1), schedule=optimizers.constant(0.1))
    np.testing.assert_allclose(bare.schedule(7), 0.1)
    with pytest.raises(ValueError, match="a bare optax transformation needs `schedule=`"):
        optimizers.build_optimizer(optax.sgd(0.1))
    with pytest.raises(ValueError, match="already carries its schedule"):
        optimizers.build_optimizer(optimizers.sgd(), schedule=sched)
    with pytest.raises(ValueError, match=r"grad_clip_norm=0\.0 must be a positive number"):
        optimizers.build_optimizer(optimizers.sgd(), grad_clip_norm=0.0)


def test_adafactor_trains_small_tree():
    rng = np.random.default_rng(2)
    params = {
        "w_big": jnp.asarray(rng.normal(size=(256, 130)) * 0.1, jnp.float32),  # factored
        "w_small": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),  # below min dim
        "bias": jnp.asarray(rng.normal(size=(130,)), jnp.float32),
    }
    x = jnp.asarray(rng.normal(size=(16, 256)), jnp.float32)

    def loss_fn(p):
        h = x @ p["w_big"] + p["bias"]
        return jnp.mean(h**2) + jnp.mean((p["w_small"] - 1.0) ** 2)

    opt = optimizers.build_optimizer(optimizers.adafactor(learning_rate=1e-2))
    np.testing.assert_allclose(optimizers.adafactor().schedule(0), 0.01, rtol=1e-6)  # T5X

    state = opt.tx.init(params)
    factored = [s for s in jax.tree.leaves(state) if s.shape in ((256,), (130,))]
    assert factored, "the 256x130 matrix should keep row/column statistics"

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = opt.tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    first = None
    for _ in range(20):
        params, state, loss = step(params, state)
        first = loss if first is None else first
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(params))
    assert float(loss) < 0.7 * float(first)

"""Test set-up: 8 simulated CPU devices, created before jax is first imported."""

import gc
import os
import sys
import time

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# CPU only, even with libtpu installed (the test extra brings it for ahead-of-time TPU
# compiles): JAX would otherwise probe for a TPU first.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The C4 tasks tokenize with T5's SentencePiece model, which lives on GCS; tests read the
# shipped Shakespeare model in its place (8000 pieces + 100 appended sentinels), so that
# TFDS mock C4 data tokenizes offline. Set before t5x_like.data registers the tasks.
os.environ["T5X_LIKE_C4_SPM_PATH"] = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "t5x_like", "data", "corpus", "spm_shakespeare.model")

import jax

jax.config.update("jax_default_matmul_precision", "highest")

try:  # seqio/tf.data must never grab an accelerator or many threads in tests.
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
except Exception:  # pragma: no cover - tensorflow is a hard dependency, but be gentle.
    pass


import gin  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def clean_gin():
    """An empty gin config before and after the test (gin's registry is process-global)."""
    gin.clear_config(clear_constants=True)
    yield
    gin.clear_config(clear_constants=True)


@pytest.fixture
def settle_stray_callbacks(monkeypatch):
    """For tests that make an Orbax restore fail part way (a corrupt checkpoint).

    Orbax reads every array concurrently; when the first read fails, the restore's event
    loop closes while TensorStore still finishes the others, and each of their callbacks
    then raises "Event loop is closed" from a TensorStore thread. pytest's unraisable
    hook formats those tracebacks (with `ast.parse`) in those threads, and CPython 3.11's
    AST constructor keeps one recursion counter per interpreter: a `gin` parse
    (`ast.literal_eval`) running at the same time in the next test can fail with
    "SystemError: AST constructor recursion depth mismatch" (seen once in CI). This
    fixture counts those callbacks without formatting them, and at teardown waits until
    none has arrived for a second, so none outlives the test.
    """
    arrivals: list[float] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda _: arrivals.append(time.monotonic()))
    yield arrivals
    start = time.monotonic()
    while time.monotonic() - start < 60:
        time.sleep(0.25)
        if time.monotonic() - max(arrivals, default=start) > 1.0:
            break
    gc.collect()  # the failed reads' asyncio tasks: logged here, on this thread

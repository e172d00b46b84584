"""Where training metrics go: console (progress + ETA), TensorBoard, metrics.jsonl.

Only process 0 writes, so a multi-host run logs once.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from collections.abc import Mapping

import jax
import numpy as np


def _scalar(v) -> float:
    return float(np.asarray(v))


class MetricsWriter:
    """Writes one record per logged step to every sink."""

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        total_steps: int | None = None,
        tensorboard: bool = True,
        stream=sys.stdout,
    ):
        self.enabled = jax.process_index() == 0
        self.total_steps = total_steps
        self.stream = stream
        self._t0 = time.time()
        self._first_step: int | None = None
        self._tb = None
        self._jsonl = None
        model_dir = pathlib.Path(model_dir)
        self.jsonl_path = model_dir / "metrics.jsonl"
        if not self.enabled:
            return
        model_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: slow import

            self._tb = SummaryWriter(str(model_dir / "tensorboard"))
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115 (close())

    def write(self, step: int, metrics: Mapping[str, object], prefix: str = "train") -> None:
        if not self.enabled:
            return
        values = {k: _scalar(v) for k, v in metrics.items()}
        record = {"step": int(step), "split": prefix, **values, "time": time.time()}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{prefix}/{k}", v, int(step))
            self._tb.flush()
        self._console(step, values, prefix)

    def _console(self, step: int, values: Mapping[str, float], prefix: str) -> None:
        if self._first_step is None:
            self._first_step, self._t0 = step, time.time()
        parts = [f"[{prefix}] step {step}"]
        if self.total_steps:
            parts[0] += f"/{self.total_steps} ({100.0 * step / self.total_steps:5.1f}%)"
            done = step - self._first_step
            if done > 0 and prefix == "train":
                eta = (time.time() - self._t0) / done * (self.total_steps - step)
                parts.append(f"eta {eta:6.0f}s")
        for k, v in values.items():
            if "/" not in k:  # per-layer details ('moe/decoder/layers_1/...') go to TB only
                parts.append(f"{k} {v:.4g}")
        print(" | ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(model_dir: str | os.PathLike[str]) -> list[dict]:
    """All records of MODEL_DIR/metrics.jsonl, in order (for plots and tests)."""
    path = pathlib.Path(model_dir) / "metrics.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]

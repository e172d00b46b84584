"""`python -m t5x_like.plot MODEL_DIR [--out PNG] [--metrics loss,accuracy]`: draw the curves.

Reads MODEL_DIR/metrics.jsonl (train and eval records) and writes one panel per metric,
train and eval on the same axes, to MODEL_DIR/curves.png by default.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

from t5x_like.metrics_writer import read_metrics


def plot(
    model_dir: str,
    out: str | None = None,
    metrics: Sequence[str] = ("loss", "accuracy", "learning_rate", "grad_norm"),
) -> pathlib.Path:
    """Writes the PNG and returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    records = read_metrics(model_dir)
    if not records:
        raise ValueError(f"{model_dir}/metrics.jsonl holds no records; train first")
    present = [m for m in metrics if any(m in r for r in records)]
    fig, axes = plt.subplots(1, len(present), figsize=(4.5 * len(present), 3.6), squeeze=False)
    for ax, name in zip(axes[0], present):
        for split, style in (("train", "-"), ("eval", "o--")):
            pts = [(r["step"], r[name]) for r in records if r.get("split") == split and name in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, label=split, markersize=4)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(str(model_dir))
    fig.tight_layout()
    path = pathlib.Path(out) if out else pathlib.Path(model_dir) / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m t5x_like.plot", description=__doc__)
    parser.add_argument("model_dir")
    parser.add_argument("--out", default=None)
    parser.add_argument("--metrics", default="loss,accuracy,learning_rate,grad_norm")
    args = parser.parse_args(argv)
    path = plot(args.model_dir, args.out, [m for m in args.metrics.split(",") if m])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

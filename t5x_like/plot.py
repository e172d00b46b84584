"""`python -m t5x_like.plot MODEL_DIR [MODEL_DIR ...] [--out PNG] [--metrics loss,accuracy]
[--from_step N]`.

Reads each MODEL_DIR/metrics.jsonl (train and eval records) and writes one panel per
metric, train and eval on the same axes, to MODEL_DIR/curves.png by default. Several
MODEL_DIRs (e.g. a dense and an MoE run) share the panels, one colour per run, labelled
with `--labels` (default: the directory names); `--out` is then required. `--from_step`
drops the records before that step, so that the differences late in training are not
squashed by the first steps' large losses.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

from t5x_like.metrics_writer import read_metrics


def plot(
    model_dir: str | Sequence[str],
    out: str | None = None,
    metrics: Sequence[str] = ("loss", "accuracy", "learning_rate", "grad_norm"),
    labels: Sequence[str] | None = None,
    from_step: int = 0,
) -> pathlib.Path:
    """Writes the PNG and returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    dirs = [model_dir] if isinstance(model_dir, (str, pathlib.Path)) else list(model_dir)
    if len(dirs) > 1 and out is None:
        raise ValueError("plotting several MODEL_DIRs needs --out (where to write the PNG)")
    labels = list(labels) if labels else [pathlib.Path(d).name for d in dirs]
    if len(labels) != len(dirs):
        raise ValueError(f"{len(labels)} labels for {len(dirs)} MODEL_DIRs; give one each")
    runs = []
    for d in dirs:
        records = read_metrics(d)
        if not records:
            raise ValueError(f"{d}/metrics.jsonl holds no records; train first")
        records = [r for r in records if r.get("step", 0) >= from_step]
        if not records:
            raise ValueError(f"{d}/metrics.jsonl holds no records at or after step "
                             f"{from_step}; lower --from_step")
        runs.append(records)
    present = [m for m in metrics if any(m in r for records in runs for r in records)]
    fig, axes = plt.subplots(1, len(present), figsize=(4.5 * len(present), 3.6), squeeze=False)
    for ax, name in zip(axes[0], present):
        for i, (records, label) in enumerate(zip(runs, labels)):
            for split, style in (("train", "-"), ("eval", "o--")):
                pts = [(r["step"], r[name]) for r in records
                       if r.get("split") == split and name in r]
                if pts:
                    xs, ys = zip(*pts)
                    tag = split if len(runs) == 1 else f"{label} {split}"
                    ax.plot(xs, ys, style, label=tag, markersize=4, color=f"C{i}")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    title = str(dirs[0]) if len(dirs) == 1 else " vs ".join(labels)
    fig.suptitle(title if len(title) <= 80 else f"{len(dirs)} runs", fontsize="medium")
    fig.tight_layout()
    path = pathlib.Path(out) if out else pathlib.Path(dirs[0]) / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m t5x_like.plot", description=__doc__)
    parser.add_argument("model_dir", nargs="+")
    parser.add_argument("--out", default=None)
    parser.add_argument("--labels", default=None, help="comma-separated, one per MODEL_DIR")
    parser.add_argument("--metrics", default="loss,accuracy,learning_rate,grad_norm")
    parser.add_argument("--from_step", type=int, default=0,
                        help="plot only records at or after this step")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    path = plot(args.model_dir, args.out, [m for m in args.metrics.split(",") if m], labels,
                from_step=args.from_step)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

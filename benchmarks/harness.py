"""What every benchmark script shares besides its report: the common flags and their
checks, jax on the requested (simulated) devices, interleaved rounds, timers and step
statistics. Imports nothing heavy: worker subprocesses in other venvs import it too."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Collection, Iterator
from types import ModuleType


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A script's parser, described by the first line of its docstring `doc`."""
    return argparse.ArgumentParser(description=doc.split("\n")[0])


def add_devices_flag(parser: argparse.ArgumentParser) -> None:
    """--devices N: simulated CPU devices, for `import_jax`."""
    parser.add_argument("--devices", type=int, default=1,
                        help="simulated CPU devices (--xla_force_host_platform_device_count); "
                        "1 = the real devices, no forcing")


def names(parser: argparse.ArgumentParser, value: str, known: Collection[str], what: str,
          *, allow_all: bool = False) -> list[str]:
    """The comma-separated names of `value` (or every known one for 'all' if `allow_all`);
    exits through `parser.error` on an unknown name or none."""
    chosen = list(known) if allow_all and value == "all" else [
        n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in known]
    if unknown or not chosen:
        parser.error(f"unknown {what} {unknown}; known: {', '.join(known)}")
    return chosen


def check_steps(parser: argparse.ArgumentParser, steps: int, warmup: int) -> None:
    """Exits through `parser.error` unless both --steps and --warmup are >= 1."""
    if steps < 1 or warmup < 1:
        parser.error(f"--steps={steps} and --warmup={warmup} must be >= 1 (the first "
                     "step after compiling re-traces and is never timed)")


def import_jax(devices: int) -> ModuleType:
    """jax, imported here for the first time, with `devices` simulated CPU devices when
    `devices` > 1 (XLA_FLAGS must be set before jax is imported); 1: the real devices."""
    if devices > 1:
        if "jax" in sys.modules:
            raise RuntimeError("--devices needs to set XLA_FLAGS before jax is imported")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={devices}"
                                   ).strip()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import jax

    if devices > 1 and jax.device_count() != devices:
        raise RuntimeError(f"asked for {devices} devices, jax sees {jax.device_count()} "
                           f"({jax.default_backend()}); --devices only simulates CPU devices")
    return jax


def rounds(warmup: int, steps: int, tag: str) -> Iterator[tuple[int, bool]]:
    """(round index, timed) for `warmup` untimed then `steps` timed rounds; after each
    timed round's work, its progress goes to stderr as "[tag] round i/steps"."""
    for index in range(warmup + steps):
        timed = index >= warmup
        yield index, timed
        if timed:
            print(f"[{tag}] round {index - warmup + 1}/{steps}", file=sys.stderr)


class Timer:
    """Wall and process-CPU seconds (all threads) of a `with` block: `.wall`, `.cpu`."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def median_iqr(times: list[float]) -> tuple[float, list[float]]:
    """The median of `times` and its [25th, 75th] percentiles (both the median for one)."""
    median = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [median] * 3
    return median, [q[0], q[2]]


def log_tail(path: str, lines: int = 25) -> str:
    """The last `lines` lines of a worker's log, for the error that names it."""
    with open(path) as f:
        return "".join(f.readlines()[-lines:])

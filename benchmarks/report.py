"""How every benchmark reports: the JSON document (which benchmark, when, on what machine,
then its own fields), then a human-readable table."""

from __future__ import annotations

import json
import os
import platform
import time
from types import ModuleType
from typing import Any


def host() -> dict[str, Any]:
    """The machine as every benchmark describes it: CPUs, processor, Python."""
    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }


def jax_machine(jax: ModuleType) -> dict[str, Any]:
    """`host()` with the devices this process's `jax` runs on, its version and XLA_FLAGS."""
    return {
        "backend": jax.default_backend(),
        "num_devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        **host(),
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def document(benchmark: str, machine: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A benchmark's JSON document: its name, the local time now, `machine`, then `fields`."""
    return {"benchmark": benchmark, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine, **fields}


def table(rows: list[tuple[str, ...]], left: int = 1) -> list[str]:
    """`rows` (the header first) as aligned text lines, the first `left` columns
    left-justified and the others right-justified, a rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        cells = [v.ljust(w) for v, w in zip(row[:left], widths[:left])]
        cells += [v.rjust(w) for v, w in zip(row[left:], widths[left:])]
        lines.append(" | ".join(cells))
        if i == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return lines


def emit(doc: dict, text: str, json_out: str | None) -> dict:
    """Prints a benchmark's JSON and its table `text`; writes the JSON to `json_out` if
    given."""
    if json_out:
        os.makedirs(os.path.dirname(os.path.abspath(json_out)), exist_ok=True)
        with open(json_out, "w") as f:
            json.dump(doc, f, indent=2)
    print(json.dumps(doc, indent=2))
    print()
    print(text)
    return doc

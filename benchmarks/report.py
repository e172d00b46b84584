"""How every benchmark reports: the JSON document, then a human-readable table."""

import json
import os


def emit(doc: dict, table: str, json_out: str | None) -> dict:
    """Prints a benchmark's JSON and its table; writes the JSON to `json_out` if given."""
    if json_out:
        os.makedirs(os.path.dirname(os.path.abspath(json_out)), exist_ok=True)
        with open(json_out, "w") as f:
            json.dump(doc, f, indent=2)
    print(json.dumps(doc, indent=2))
    print()
    print(table)
    return doc

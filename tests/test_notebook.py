"""colab/quickstart.ipynb is valid nbformat 4 and runs top to bottom on the simulated CPU
devices: it trains (the loss falls), shards a parameter over fsdp × model and decodes."""

import json
import math
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "colab" / "quickstart.ipynb"


def _load() -> dict:
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def _source(cell: dict) -> str:
    src = cell["source"]
    return "".join(src) if isinstance(src, list) else src


def notebook_code(nb: dict) -> str:
    """The code cells joined into one script; shell (`!`) and magic (`%`) lines dropped."""
    lines = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        lines += [ln for ln in _source(cell).splitlines() if not ln.lstrip().startswith(("!", "%"))]
        lines.append("")
    return "\n".join(lines)


def test_notebook_is_nbformat_4_without_outputs():
    nb = _load()
    assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 5
    assert nb["metadata"]["kernelspec"]["language"] == "python"
    ids = [cell["id"] for cell in nb["cells"]]
    assert len(set(ids)) == len(ids)
    kinds = {cell["cell_type"] for cell in nb["cells"]}
    assert kinds == {"code", "markdown"}
    for cell in nb["cells"]:
        assert isinstance(cell["source"], list) and isinstance(cell["metadata"], dict)
        if cell["cell_type"] == "code":  # shipped clean: no stale outputs
            assert cell["outputs"] == [] and cell["execution_count"] is None
    compile(notebook_code(nb), str(NOTEBOOK), "exec")


def test_notebook_runs_trains_shards_and_decodes(clean_gin):
    namespace = {"__name__": "__main__"}
    exec(compile(notebook_code(_load()), str(NOTEBOOK), "exec"), namespace)

    losses = namespace["losses"]
    assert len(losses) == namespace["NUM_STEPS"]
    assert all(math.isfinite(x) for x in losses)
    assert losses[0] > 8.0  # about ln(8192) = 9.0 before training
    assert losses[-1] < losses[0] - 1.0, losses
    assert int(namespace["state"].step) == namespace["NUM_STEPS"]

    # 8 simulated devices: fsdp=4 × model=2, the MLP kernel split in both dimensions.
    assert dict(namespace["runtime"].partitioner.mesh.shape) == {
        "data": 1,
        "fsdp": 4,
        "expert": 1,
        "model": 2,
    }
    kernel = namespace["kernel"]
    assert tuple(kernel.sharding.spec) == ("fsdp", "model")
    assert namespace["mu"].sharding.spec == kernel.sharding.spec

    tokens = namespace["tokens"]
    assert tokens.shape == (namespace["BATCH_SIZE"], namespace["LENGTHS"]["targets"])
    assert namespace["cache"].self_attention[0].k.shape == (8, 29, 4, 32)

"""Orbax checkpoints: async save every N steps, keep the last K, resume, reshard.

A checkpoint holds the TrainState (`state/`) and the data position (`data/`, JSON), so
a resumed run continues on the same batches. Orbax writes each step to a temporary
directory and renames it only when complete, so a run killed at any moment (SIGKILL
included) leaves its earlier checkpoints intact and the half-written one invisible.
"""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be read."""


class Checkpointer:
    """Saves and restores `(TrainState, data position)` under `directory`."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        save_interval_steps: int = 1000,
        max_to_keep: int | None = 3,
        async_save: bool = True,
    ):
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps={save_interval_steps} must be >= 1")
        self.directory = pathlib.Path(directory).absolute()
        self._started: set[int] = set()  # steps this process has started saving
        self.save_interval_steps = save_interval_steps
        # The cadence is decided here (`should_save`): orbax's own would also save the first
        # step of a run that has no checkpoint yet.
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=async_save,
                create=True,
            ),
        )

    def all_steps(self) -> list[int]:
        self._manager.reload()
        return list(self._manager.all_steps())

    def latest_step(self) -> int | None:
        self._manager.reload()  # another process (a killed run) may have written steps
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        return step % self.save_interval_steps == 0

    def save(self, step: int, state: PyTree, data_state: Mapping[str, Any]) -> bool:
        """Starts an (async) save of step `step` (once per step); returns whether it did."""
        if step in self._started:
            return False
        started = self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_state))
            ),
            force=True,
        )
        if started:
            self._started.add(step)
        return started

    def has_step(self, step: int) -> bool:
        """Whether `step` is saved or being saved (pending async saves included)."""
        return step in self._started or step in self.all_steps()

    def restore(self, step: int | None, abstract_state: PyTree) -> tuple[PyTree, dict[str, Any]]:
        """Restores `step` (default: latest) onto the shardings in `abstract_state`.

        `abstract_state` holds `jax.ShapeDtypeStruct`s with `sharding=`: the checkpoint is
        read straight into that layout, whatever mesh it was saved from.
        """
        if step is None:
            step = self.latest_step()
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
                ),
            )
        except Exception as err:  # orbax raises many types for unreadable files.
            others = [s for s in self.all_steps() if s != step]
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory / str(step)} cannot be restored "
                f"({type(err).__name__}: {str(err)[:300]}). Nothing was deleted. Move that "
                f"step directory aside to resume from an earlier one (available: {others}), "
                "or start a fresh run in another MODEL_DIR."
            ) from err
        return restored["state"], dict(restored["data"] or {})

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending async saves, then releases the manager."""
        self._manager.close()


def save_params(directory: str | os.PathLike[str], params: PyTree, *, step: int = 0
                ) -> pathlib.Path:
    """Writes parameters alone as step `step` of a checkpoints directory (synchronously).

    `restore_params` (eval, infer) and `train(init_checkpoint=...)` (fine-tuning) read it
    like a training checkpoint; it has no optimizer state, so training resumes from it
    only as an init checkpoint (into another MODEL_DIR).
    """
    path = pathlib.Path(directory).absolute() / str(step)
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / "state", {"params": params})
    return path


def _step_dir(path: str | os.PathLike[str]) -> pathlib.Path:
    """A step directory from a step directory or a checkpoints directory (latest step)."""
    path = pathlib.Path(path).absolute()
    if not (path / "state").is_dir():
        # Only finished steps: orbax's in-progress `N.orbax-checkpoint-tmp-*` folders are skipped.
        steps = sorted(
            int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / "state").is_dir()
        ) if path.is_dir() else []
        if not steps:
            raise CheckpointError(
                f"no checkpoint under {path}: expected a step directory holding 'state/' "
                "or a checkpoints directory with numbered steps; set --gin.CHECKPOINT_PATH"
            )
        path = path / str(steps[-1])
    return path


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def restore_params(
    path: str | os.PathLike[str], abstract_params: PyTree, *, allow_missing: bool = False
) -> PyTree:
    """Reads only the parameters of a checkpoint step directory (for eval / infer).

    `path` is a step directory (`MODEL_DIR/checkpoints/1000`) or a checkpoints directory
    (its latest step is used). With `allow_missing` (fine-tuning from a pretrained
    checkpoint), parameters of `abstract_params` (nested dicts) that the checkpoint lacks
    (a new classifier head) are left out of the result, and checkpoint parameters the
    target lacks (a pretraining head) are not read; a parameter present in both with
    another shape is an error naming it.
    """
    path = _step_dir(path)
    logging.info("restoring parameters from %s", path)
    abstract = {"params": abstract_params}
    missing: list[str] = []
    if allow_missing:
        abstract, missing = _intersect_with_checkpoint(path, abstract)
    restore_args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype),
        abstract,
    )
    try:
        # partial_restore: only `params` is read; step and optimizer state are skipped.
        with ocp.PyTreeCheckpointer() as ckptr:
            restored = ckptr.restore(
                path / "state",
                args=ocp.args.PyTreeRestore(
                    item=abstract, restore_args=restore_args, partial_restore=True
                ),
            )
    except Exception as err:  # orbax raises many types for unreadable files.
        raise CheckpointError(
            f"checkpoint {path} cannot be restored ({type(err).__name__}: {str(err)[:300]}); "
            "point --gin.CHECKPOINT_PATH at another step directory"
        ) from err
    if missing:
        logging.info("not in the checkpoint (left to fresh initialisation): %s", missing)
    return restored["params"]


def _intersect_with_checkpoint(path: pathlib.Path, abstract: PyTree) -> tuple[PyTree, list[str]]:
    """`abstract` (nested dicts) without the leaves the checkpoint lacks, and their paths."""
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            meta = ckptr.metadata(path / "state")
        meta = getattr(meta, "item_metadata", meta)
        meta = getattr(meta, "tree", meta)
        saved = {_path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(
            dict(meta), is_leaf=lambda x: hasattr(x, "shape"))[0]}
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {path} has no readable metadata ({type(err).__name__}: "
            f"{str(err)[:300]}); point the checkpoint path at another step directory"
        ) from err
    missing: list[str] = []

    def prune(tree, prefix):
        if not isinstance(tree, Mapping):
            name = "/".join(prefix)
            if name not in saved:
                missing.append(name)
                return None
            shape = tuple(getattr(saved[name], "shape", tree.shape))
            if shape != tuple(tree.shape):
                raise CheckpointError(
                    f"parameter {name} has shape {shape} in {path} but the network expects "
                    f"{tuple(tree.shape)}; the model config must match the pretrained one"
                )
            return tree
        kept = {k: prune(v, (*prefix, str(k))) for k, v in tree.items()}
        return {k: v for k, v in kept.items() if v is not None}

    return prune(abstract, ()), missing

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


def restore_params(path: str | os.PathLike[str], abstract_params: PyTree) -> PyTree:
    """Reads only the parameters of a checkpoint step directory (for eval / infer).

    `path` is a step directory (`MODEL_DIR/checkpoints/1000`) or a checkpoints directory
    (its latest step is used).
    """
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
    logging.info("restoring parameters from %s", path)
    abstract = {"params": abstract_params}
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
    return restored["params"]

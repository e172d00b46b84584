"""From a seqio task to global, sharded batches, with a resumable position.

Each host reads only its shard of the data (seqio ShardInfo from the process index)
and supplies its slice of every global batch; `Partitioner.make_global_batch` turns
the host-local numpy arrays into global `jax.Array`s.

Resuming: the pipeline is deterministic for a given seed, so the position is just the
number of batches already consumed; a resumed run rebuilds the dataset and skips
them, and sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import jax
import numpy as np
import seqio
import tensorflow as tf

from partitioning.partitioner import Partitioner
from t5x_like import data as data_lib


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """Which examples a run reads and how they are batched."""

    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int]
    split: str = "train"
    batch_size: int = 32  # global, over all hosts
    shuffle: bool = True
    seed: int | None = 0
    use_packing: bool = True
    # How many shards the data is read as. None: one per host feeding distinct rows
    # (`Partitioner.data_shard_info`). A multiple N of that makes each host read N/hosts
    # shards and put their rows side by side, so one host with N shards sees exactly
    # the global batches that N hosts see: a pod run's data order, reproduced on one
    # machine (and how tests check multi-host training against one process).
    num_data_shards: int | None = None

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.num_data_shards is not None and (
                self.num_data_shards < 1 or self.batch_size % self.num_data_shards):
            raise ValueError(
                f"num_data_shards={self.num_data_shards} must be >= 1 and divide "
                f"batch_size={self.batch_size}")


def check_vocabularies(model, mixture_or_task_name: str) -> None:
    """Fails fast when the task tokenises with other vocabularies than `model`."""
    data_lib.check_vocabularies(mixture_or_task_name, model.input_vocabulary,
                                model.output_vocabulary)


def build_dataset(
    cfg: DatasetConfig,
    feature_converter: seqio.FeatureConverter,
    partitioner: Partitioner,
    *,
    repeat: bool,
    drop_remainder: bool = True,
) -> tf.data.Dataset:
    """This host's batched tf.data pipeline for `cfg` (model features)."""
    shard_id, num_shards = partitioner.data_shard_info()
    host_batch = partitioner.host_batch_size(cfg.batch_size)
    total = cfg.num_data_shards or num_shards
    if total % num_shards:
        raise ValueError(
            f"num_data_shards={total} must be a multiple of the {num_shards} data shards "
            "of this mesh's hosts (or None)")
    per_host = total // num_shards

    def shard(i: int, batch_size: int) -> tf.data.Dataset:
        return data_lib.get_dataset(
            cfg.mixture_or_task_name,
            cfg.task_feature_lengths,
            split=cfg.split,
            batch_size=batch_size,
            shuffle=cfg.shuffle,
            seed=cfg.seed,
            feature_converter=feature_converter,
            shard_id=i,
            num_shards=total,
            num_epochs=None if repeat else 1,
            drop_remainder=drop_remainder,
        )

    if per_host == 1:
        return shard(shard_id, host_batch)
    # Rows of shards shard_id * per_host ... side by side, as that many hosts would give.
    parts = [shard(shard_id * per_host + j, host_batch // per_host) for j in range(per_host)]
    return tf.data.Dataset.zip(tuple(parts)).map(
        lambda *batches: {k: tf.concat([b[k] for b in batches], 0) for k in batches[0]})


class TrainIterator:
    """Global training batches; `position` is how many were consumed (checkpointed)."""

    def __init__(
        self,
        cfg: DatasetConfig,
        feature_converter: seqio.FeatureConverter,
        partitioner: Partitioner,
        *,
        start_position: int = 0,
    ):
        self.cfg = cfg
        self.partitioner = partitioner
        ds = build_dataset(cfg, feature_converter, partitioner, repeat=True)
        if start_position:
            ds = ds.skip(start_position)
        self._it = ds.prefetch(2).as_numpy_iterator()
        self.position = start_position

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        host_batch = next(self._it)
        self.position += 1
        return self.partitioner.make_global_batch(
            {k: np.asarray(v, np.int32) for k, v in host_batch.items()}
        )

    def state(self) -> dict[str, int]:
        return {"position": self.position, "batch_size": self.cfg.batch_size}


def pad_rows(batch: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Zero rows appended up to `rows` (zero tokens carry zero loss weight)."""
    return {
        k: np.concatenate([v, np.zeros((rows - len(v), *v.shape[1:]), v.dtype)]) if len(v) < rows
        else v
        for k, v in batch.items()
    }


def iter_eval_batches(
    cfg: DatasetConfig,
    feature_converter: seqio.FeatureConverter,
    partitioner: Partitioner,
    *,
    num_batches: int | None,
) -> Iterator[tuple[dict[str, jax.Array], int]]:
    """Up to `num_batches` global batches of one pass over an eval split, one at a time.

    Every example is kept: the last, partial batch is padded with zero rows. Yields
    (batch, number of real rows on this host) pairs; only one batch is on the devices at
    a time, so a whole split can be decoded.
    """
    ds = build_dataset(cfg, feature_converter, partitioner, repeat=False, drop_remainder=False)
    if num_batches is not None:
        ds = ds.take(num_batches)
    rows = partitioner.host_batch_size(cfg.batch_size)
    produced = False
    for b in ds.as_numpy_iterator():
        produced = True
        host = pad_rows({k: np.asarray(v, np.int32) for k, v in b.items()}, rows)
        yield partitioner.make_global_batch(host), len(next(iter(b.values())))
    if not produced:
        raise ValueError(
            f"evaluation on {cfg.mixture_or_task_name!r} split {cfg.split!r} produced no "
            "batch; check the split has examples"
        )


def eval_batches(
    cfg: DatasetConfig,
    feature_converter: seqio.FeatureConverter,
    partitioner: Partitioner,
    *,
    num_batches: int | None,
) -> list[tuple[dict[str, jax.Array], int]]:
    """`iter_eval_batches` as a list: a fixed set reused at every evaluation."""
    return list(iter_eval_batches(cfg, feature_converter, partitioner, num_batches=num_batches))

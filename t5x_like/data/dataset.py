"""From a registered task or mixture name to batched model features."""

from __future__ import annotations

import difflib
from collections.abc import Mapping

import seqio
import tensorflow as tf


def registered_names() -> list[str]:
    """Every registered seqio task and mixture name, sorted."""
    return sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))


def check_registered(name: str) -> None:
    """Raises a ValueError naming close matches if `name` is no task or mixture."""
    names = registered_names()
    if name in names:
        return
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    shown = ", ".join(names[:30]) + (f", ... ({len(names)} in all)" if len(names) > 30
                                     else "")
    raise ValueError(
        f"no seqio task or mixture is registered as {name!r}; {hint}"
        f"registered: {shown or '(none)'}. Tasks register when their module is "
        "imported (t5x_like.data registers the shakespeare_* and c4_* tasks).")


def _same_vocabulary(a: seqio.Vocabulary, b: seqio.Vocabulary) -> bool | None:
    """True / False where it can tell; None for a vocabulary class without an `__eq__`
    or a model file that cannot be read here.

    SentencePiece: the same pieces, i.e. the same model file, or files with the same
    bytes (a converted checkpoint's copy). Extra ids (sentinels) are not compared: an LM
    task never produces them, and a model with fewer is still given every piece id.
    Other classes: seqio's own `__eq__` (Byte: its extra ids).
    """
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, seqio.SentencePieceVocabulary):
        if a.sentencepiece_model_file == b.sentencepiece_model_file:
            return True
        try:
            return _file_bytes(a.sentencepiece_model_file) == _file_bytes(
                b.sentencepiece_model_file)
        except (OSError, tf.errors.OpError):  # e.g. a remote path not reachable here
            return None
    if "__eq__" not in {k for cls in type(a).__mro__[:-1] for k in vars(cls)}:
        return None
    return a == b


def _file_bytes(path: str) -> bytes:
    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()


def _describe(vocab: seqio.Vocabulary) -> str:
    path = getattr(vocab, "sentencepiece_model_file", None)
    return (f"{type(vocab).__name__}({path!r}, {vocab.vocab_size} ids)" if path
            else f"{type(vocab).__name__}({vocab.vocab_size} ids)")


def check_vocabularies(name: str, input_vocabulary: seqio.Vocabulary,
                       output_vocabulary: seqio.Vocabulary) -> None:
    """Raises a ValueError when the task's "inputs" / "targets" are tokenised with a
    vocabulary other than the model's (training would run, on ids that mean other
    pieces, and decoding would print nonsense)."""
    check_registered(name)
    provider = seqio.get_mixture_or_task(name)
    model_vocabularies = {"inputs": input_vocabulary, "targets": output_vocabulary}
    for feature, spec in provider.output_features.items():
        ours = model_vocabularies.get(feature)
        if ours is None or _same_vocabulary(spec.vocabulary, ours) is not False:
            continue
        raise ValueError(
            f"{name!r} tokenises {feature!r} with {_describe(spec.vocabulary)} but the "
            f"model uses {_describe(ours)}; give the model the task's vocabulary "
            "(the VOCABULARY_NAME macro, e.g. --gin.VOCABULARY_NAME=\"'byte'\" for a "
            "*_byte task) or pick a task tokenised with the model's")


def _how_to_fix(task: seqio.Task) -> str:
    source = task.source
    if isinstance(source, seqio.TfdsDataSource):
        loader = source.tfds_dataset
        where = loader.data_dir or "$TFDS_DATA_DIR or ~/tensorflow_datasets"
        return (f"check that the TFDS dataset {loader.name!r} is prepared under {where} "
                "(tfds build, or copy it there), or pick a task with shipped data such "
                "as 'shakespeare_span_corruption'")
    if isinstance(source, seqio.FileDataSource):
        return f"check the files of the source {source}"
    return f"check the data source {source}"


def _check_nonempty(provider: seqio.DatasetProvider, name: str,
                    task_feature_lengths: Mapping[str, int], split: str,
                    shard_info: seqio.ShardInfo | None) -> None:
    """Reads one example of each task (unshuffled, so cheap) or raises ValueError."""
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    shard = (f"shard {shard_info.index} of {shard_info.num_shards}" if shard_info
             else "unsharded")
    for task in tasks:
        where = f"task {task.name!r}" + (f" (in mixture {name!r})" if task.name != name
                                         else "")
        if split not in task.splits:
            raise ValueError(f"{where} has no split {split!r}; its splits: "
                             f"{', '.join(task.splits)}")
        try:
            # No in-memory cache: a partly read cache only logs a warning.
            ds = task.get_dataset(task_feature_lengths, split=split, shuffle=False,
                                  num_epochs=1, shard_info=shard_info, use_cached=False,
                                  seed=0, try_in_mem_cache=False)
            empty = next(iter(ds.take(1)), None) is None
        except (tf.errors.OpError, OSError, ValueError, KeyError, AssertionError) as e:
            # TFDS reports data that is not prepared as a KeyError (no splits), an
            # AssertionError or a DatasetNotFoundError (a ValueError); a missing file
            # is an OSError or a tf.errors.NotFoundError.
            raise ValueError(
                f"{where} could not read split {split!r} ({shard}): "
                f"{type(e).__name__}: {str(e).rstrip('. ')}; "
                f"{_how_to_fix(task)}") from e
        if empty:
            raise ValueError(
                f"{where} yields no examples for split {split!r} ({shard}); "
                f"{_how_to_fix(task)}")


def get_dataset(
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    split: str = "train",
    batch_size: int = 8,
    shuffle: bool = True,
    seed: int | None = 0,
    use_packing: bool = True,
    shard_id: int = 0,
    num_shards: int = 1,
    feature_converter_cls: type[seqio.FeatureConverter] = seqio.EncDecFeatureConverter,
    *,
    feature_converter: seqio.FeatureConverter | None = None,
    num_epochs: int | None = 1,
    drop_remainder: bool = True,
    check_nonempty: bool = True,
) -> tf.data.Dataset:
    """Batched model features of one shard of a seqio task or mixture.

    Args:
      mixture_or_task_name: a registered task or mixture.
      task_feature_lengths: e.g. {"inputs": 512, "targets": 114}.
      split: "train", "validation", ...
      batch_size: examples per batch on this shard (host).
      shuffle: shuffle files and examples (seeded by `seed`).
      seed: seeds shuffling and the random preprocessing (span corruption); None
        gives a different pipeline on every call.
      use_packing: pack several examples per row (adds *_segment_ids and
        *_positions features); ignored when `feature_converter` is given.
      shard_id, num_shards: which part of the data this host reads.
      feature_converter_cls: built as `feature_converter_cls(pack=use_packing)`.
      feature_converter: a ready feature converter; overrides the two above.
      num_epochs: passes over the data; None repeats forever. The repeat happens
        before span corruption, so every epoch gets new noise.
      drop_remainder: drop a last, smaller batch (static batch shapes for jit).
      check_nonempty: first read one example of every task, so that missing data
        is reported here with the task, split and fix rather than as an endless
        wait or an obscure TF error inside the training loop.

    Returns:
      A tf.data.Dataset of dicts of [batch_size, length] arrays; with
      `EncDecFeatureConverter`: encoder_input_tokens, decoder_input_tokens,
      decoder_target_tokens, decoder_loss_weights, and when packed also
      encoder_segment_ids, encoder_positions, decoder_segment_ids, decoder_positions.

    Raises:
      ValueError: unknown name (with close matches), a split the task lacks, or a
        task that yields no examples for this split and shard.
    """
    check_registered(mixture_or_task_name)
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id={shard_id} must be in [0, num_shards={num_shards})")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    # One shard is no sharding; passing ShardInfo(0, 1) anyway would make seqio list
    # the source's files, which TFDS mocks (tfds.testing.mock_data) cannot do.
    shard_info = (seqio.ShardInfo(index=shard_id, num_shards=num_shards)
                  if num_shards > 1 else None)
    if check_nonempty:
        _check_nonempty(seqio.get_mixture_or_task(mixture_or_task_name),
                        mixture_or_task_name, task_feature_lengths, split, shard_info)
    if feature_converter is None:
        feature_converter = feature_converter_cls(pack=use_packing)
    ds = seqio.get_dataset(
        mixture_or_task_name,
        task_feature_lengths=task_feature_lengths,
        feature_converter=feature_converter,
        dataset_split=split,
        use_cached=False,
        shuffle=shuffle,
        num_epochs=num_epochs,
        shard_info=shard_info,
        seed=seed,
        verbose=False,
    )
    return ds.batch(batch_size, drop_remainder=drop_remainder)

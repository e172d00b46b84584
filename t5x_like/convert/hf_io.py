"""Reading and writing Hugging Face safetensors, parameter by parameter.

`HFCheckpoint` opens a model directory's safetensors (one file, or shards listed in
`model.safetensors.index.json`) and never anything else: pickle files (`*.bin`, `*.pt`)
are refused, never loaded. `load_params` builds every parameter with
`jax.make_array_from_callback`, and each device's callback reads only the slice of the
HF tensor that maps to that device's shard (`get_slice`), so the host never holds the
whole model. `write_params` writes HF tensors one shard file at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pathlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from safetensors import safe_open

from t5x_like.convert.registry import ConversionError, Layout, Part, Tensor, path_text

PyTree = Any
_log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# safetensors' numpy backend has no bfloat16 / float8: those are read through its flax
# backend (ml_dtypes arrays).
_NUMPY_DTYPES = {"F64", "F32", "F16", "I64", "I32", "I16", "I8", "U8", "BOOL"}


class HFCheckpoint:
    """The config.json and safetensors of one HF model directory (files opened lazily)."""

    def __init__(self, directory: str | pathlib.Path):
        self.directory = pathlib.Path(directory)
        config_path = self.directory / "config.json"
        if not config_path.is_file():
            raise ConversionError(f"{self.directory} has no config.json; point --from_hf at a "
                                  "Hugging Face model directory (save_pretrained output)")
        self.config: dict[str, Any] = json.loads(config_path.read_text())
        self._files = self._weight_map()
        self._stack = contextlib.ExitStack()
        self._handles: dict[tuple[str, str], Any] = {}

    def _weight_map(self) -> dict[str, str]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
            missing = sorted({f for f in weight_map.values()
                              if not (self.directory / f).is_file()})
            if missing:
                raise ConversionError(f"{index} names shard files that do not exist: {missing}")
            return dict(weight_map)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for pat in _PICKLE_PATTERNS
                             for p in self.directory.glob(pat))
            found = f" (found {pickles})" if pickles else ""
            raise ConversionError(
                f"no *.safetensors in {self.directory}{found}: only safetensors are read, "
                "pickle checkpoints are never loaded; re-save the model with "
                "save_pretrained(dir, safe_serialization=True)")
        weight_map: dict[str, str] = {}
        for path in files:
            with safe_open(str(path), framework="numpy") as f:
                for name in f.keys():  # noqa: SIM118  (a safe_open handle)
                    weight_map[name] = path.name
        return weight_map

    def names(self) -> set[str]:
        return set(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def _slice(self, name: str):
        file = self._files[name]
        handle = self._handle(file, "numpy")
        sl = handle.get_slice(name)
        if sl.get_dtype() not in _NUMPY_DTYPES:
            sl = self._handle(file, "flax").get_slice(name)
        return sl

    def _handle(self, file: str, framework: str):
        key = (file, framework)
        if key not in self._handles:
            self._handles[key] = self._stack.enter_context(
                safe_open(str(self.directory / file), framework=framework))
        return self._handles[key]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """The tensor `name`, or only `index` of it (read from disk, nothing more)."""
        sl = self._slice(name)
        if index is None:
            index = tuple(slice(None) for _ in sl.get_shape())
        return np.asarray(sl[index])

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> HFCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- our tree <-> paths -----------------------------------------------------------------


def _get(tree: PyTree, path: Sequence[str | int]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _leaves(tree: PyTree, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _leaves(v, (*prefix, k))
    else:
        yield prefix, tree


def _set(tree: dict, path: Sequence[str | int], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# --- the layout against a checkpoint ----------------------------------------------------


class _Piece:
    """Part `part_index` of HF tensor `tensor`, i.e. `param[part.index]`, at `col_offset`."""

    def __init__(self, tensor: Tensor, part: Part, dims: tuple[int, ...], col_offset: int,
                 source: str):
        self.tensor, self.part, self.dims = tensor, part, dims
        self.col_offset, self.source = col_offset, source


def _part_dims(tensor: Tensor, part: Part, abstract: PyTree) -> tuple[int, ...]:
    try:
        leaf = _get(abstract, part.param)
    except (KeyError, IndexError, TypeError):
        raise ConversionError(
            f"{tensor.name}: our network has no parameter {path_text(part.param)}") from None
    shape = tuple(leaf.shape)
    if len(part.index) > len(shape) or any(
            not 0 <= i < n for i, n in zip(part.index, shape)):
        raise ConversionError(f"{tensor.name}: index {part.index} out of range for "
                              f"{path_text(part.param)} of shape {shape}")
    return shape[len(part.index):]


def _cols(tensor: Tensor, dims: tuple[int, ...]) -> int:
    dims = dims[tensor.batch:]
    return math.prod(dims) if tensor.split == 0 else math.prod(dims[tensor.split:])


def select_layout(layout: Layout, available: set[str], base_prefix: str = "") -> Layout:
    """The table among `layout` and its `alternatives` that a checkpoint holding
    `available` matches best: fewest missing tensors (`layout` itself on a tie)."""
    if not layout.alternatives:
        return layout

    def missing(candidate: Layout) -> int:
        count = 0
        for t in candidate.tensors:
            names = _stored_names(t.name, base_prefix)
            if t.name in candidate.fallbacks:
                names.append(candidate.fallbacks[t.name])
            count += not any(n in available for n in names)
        return count

    return min((layout, *layout.alternatives), key=missing)  # min keeps the first on ties


def plan(layout: Layout, abstract: PyTree, available: set[str] | None = None,
         base_prefix: str = "", where: str = "") -> dict[tuple, list[_Piece]]:
    """Every parameter -> the pieces of HF tensors that fill it (all checks done here).

    With `available` (a checkpoint's names) each tensor is resolved to its stored name
    (with or without `base_prefix`, or its fallback), and missing tensors, shape
    mismatches and unexpected tensors are errors naming the tensor.
    """
    pieces: dict[tuple, list[_Piece]] = {}
    for t in layout.tensors:
        dims = [_part_dims(t, p, abstract) for p in t.parts]
        source = t.name
        if available is not None:
            source = _resolve(t.name, layout, available, base_prefix, where, t)
        offset = 0
        for part, d in zip(t.parts, dims):
            pieces.setdefault(part.param, []).append(_Piece(t, part, d, offset, source))
            offset += _cols(t, d)
    leaves = dict(_leaves(abstract))
    unset = [path_text(p) for p in leaves if p not in pieces]
    if unset:
        raise ConversionError(f"the layout fills no HF tensor into parameters {unset}")
    for path, ps in pieces.items():
        covered = sum(math.prod(p.dims) for p in ps)
        indices = [p.part.index for p in ps]
        if covered != math.prod(leaves[path].shape) or len(set(indices)) != len(indices):
            raise ConversionError(f"parameter {path_text(path)} is not covered exactly once "
                                  f"by the layout (indices {indices})")
    return pieces


def _resolve(name: str, layout: Layout, available: set[str], base_prefix: str, where: str,
             t: Tensor) -> str:
    candidates = [name]
    if base_prefix and name.startswith(base_prefix):
        candidates.append(name[len(base_prefix):])
    if name in layout.fallbacks:
        candidates.append(layout.fallbacks[name])
    for c in candidates:
        if c in available:
            return c
    params = ", ".join(path_text(p.param) for p in t.parts)
    raise ConversionError(f"tensor {name!r} is missing from {where} (it holds our {params}); "
                          "the checkpoint is incomplete or config.json does not match it")


def check_checkpoint(ckpt: HFCheckpoint, layout: Layout, abstract: PyTree,
                     pieces: Mapping[tuple, list[_Piece]], base_prefix: str) -> None:
    """Shapes of every HF tensor vs config, tied copies equal, nothing unexpected."""
    expected: dict[str, tuple[Tensor, str]] = {}
    for ps in pieces.values():
        for p in ps:
            expected[p.tensor.name] = (p.tensor, p.source)
    for t, source in expected.values():
        want = t.hf_shape([_part_dims(t, p, abstract) for p in t.parts])
        got = ckpt.shape(source)
        if got != want:
            params = ", ".join(path_text(p.param) for p in t.parts)
            raise ConversionError(
                f"tensor {source!r} has shape {got} in {ckpt.directory} but config.json "
                f"implies {want} (our {params}); the config and the weights disagree")
    known = {n for n in expected} | {s for _, s in expected.values()}
    for alias, target in layout.tied.items():
        for stored in _stored_names(alias, base_prefix):
            if stored not in ckpt:
                continue
            target_source = next((s for n, (_, s) in expected.items() if n == target), target)
            a, b = ckpt.read(stored), ckpt.read(target_source)
            if a.shape != b.shape or not np.array_equal(a, b):
                raise ConversionError(
                    f"tensor {stored!r} must equal {target_source!r} (this config ties them) "
                    f"but differs in {ckpt.directory}; the config's tie_word_embeddings / "
                    "scale_decoder_outputs does not match the weights")
            known.add(stored)
    unexpected = sorted(n for n in ckpt.names() - known if not _ignored(layout, n, base_prefix))
    if unexpected:
        raise ConversionError(
            f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} in "
            f"{ckpt.directory}: no parameter of this config holds them (does config.json "
            "give the right number of layers / heads?)")


def _stored_names(name: str, base_prefix: str) -> list[str]:
    names = [name]
    if base_prefix and name.startswith(base_prefix):
        names.append(name[len(base_prefix):])
    return names


def _ignored(layout: Layout, name: str, base_prefix: str) -> bool:
    if layout.is_ignored(name):
        return True
    return bool(base_prefix) and layout.is_ignored(base_prefix + name)


# --- streaming reads --------------------------------------------------------------------


def _bounds(index: tuple[slice, ...], shape: Sequence[int]) -> list[tuple[int, int]]:
    out = []
    for sl, n in zip(index, shape):
        start, stop, step = sl.indices(n)
        if step != 1:
            raise ValueError(f"strided shard index {index}")
        out.append((start, stop))
    return out


def _flat_range(bounds: Sequence[tuple[int, int]], dims: Sequence[int]):
    """(start, stop) of a block in the row-major flattening of `dims`, or None if the
    block is not one contiguous range (then the whole group is read and sliced)."""
    partial = [i for i, ((a, b), n) in enumerate(zip(bounds, dims)) if (a, b) != (0, n)]
    if not partial:
        return 0, math.prod(dims)
    j = partial[0]
    if len(partial) > 1 or math.prod(dims[:j]) != 1:
        return None
    inner = math.prod(dims[j + 1:])
    return bounds[j][0] * inner, bounds[j][1] * inner


def _read_piece(ckpt: HFCheckpoint, piece: _Piece, bounds: list[tuple[int, int]]) -> np.ndarray:
    """`param[part.index][bounds]` read from the piece's HF tensor (only that slice)."""
    t = piece.tensor
    # The `batch` leading dims index the HF tensor's leading axes directly.
    lead = tuple(slice(a, b) for a, b in bounds[:t.batch])
    lead_shape = [b - a for a, b in bounds[:t.batch]]
    dims, bounds = piece.dims[t.batch:], bounds[t.batch:]
    split = t.split if t.split else 0
    groups = ((), tuple(range(len(dims)))) if split == 0 else (
        tuple(range(split)), tuple(range(split, len(dims))))
    ranges, read_shape, post = [], [], []
    for group in groups:
        gb = [bounds[i] for i in group]
        gd = [dims[i] for i in group]
        flat = _flat_range(gb, gd) if group else (0, 1)
        if flat is None:  # not contiguous: read the whole group, slice afterwards
            ranges.append((0, math.prod(gd)))
            read_shape += gd
            post += [slice(a, b) for a, b in gb]
        else:
            ranges.append(flat)
            read_shape += [b - a for a, b in gb]
            post += [slice(None)] * len(gb)
    (r0, r1), (c0, c1) = ranges
    c0, c1 = c0 + piece.col_offset, c1 + piece.col_offset
    if split == 0:
        block = ckpt.read(piece.source, (*lead, slice(c0, c1)))
    elif t.transpose:
        block = np.swapaxes(ckpt.read(piece.source, (*lead, slice(c0, c1), slice(r0, r1))),
                            -1, -2)
    else:
        block = ckpt.read(piece.source, (*lead, slice(r0, r1), slice(c0, c1)))
    return block.reshape(lead_shape + read_shape)[(slice(None),) * len(lead) + tuple(post)]


def _param_from_pieces(ckpt: HFCheckpoint, pieces: list[_Piece], shape: tuple[int, ...],
                       dtype, index: tuple[slice, ...]) -> np.ndarray:
    bounds = _bounds(index, shape)
    out = np.empty([b - a for a, b in bounds], dtype)
    for piece in pieces:
        lead = piece.part.index
        if any(not a <= i < b for i, (a, b) in zip(lead, bounds)):
            continue
        block = _read_piece(ckpt, piece, bounds[len(lead):])
        where = tuple(i - a for i, (a, _) in zip(lead, bounds))
        out[where] = block.astype(dtype)
    return out


def load_params(ckpt: HFCheckpoint, layout: Layout, abstract_params: PyTree,
                base_prefix: str = "") -> PyTree:
    """Our parameters (nested dicts) read from `ckpt` into the shardings of
    `abstract_params` (ShapeDtypeStructs with `.sharding`; without one: device 0).

    Each device reads only its own slice of each HF tensor; a replicated parameter is
    read once and shared by the devices that hold the same block.
    """
    layout = select_layout(layout, ckpt.names(), base_prefix)
    pieces = plan(layout, abstract_params, ckpt.names(), base_prefix, str(ckpt.directory))
    check_checkpoint(ckpt, layout, abstract_params, pieces, base_prefix)
    out: dict = {}
    for path, leaf in _leaves(abstract_params):
        sharding = getattr(leaf, "sharding", None) or jax.sharding.SingleDeviceSharding(
            jax.devices()[0])
        shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
        cache: dict[tuple, np.ndarray] = {}

        def callback(index, shape=shape, dtype=dtype, ps=pieces[path], cache=cache):
            key = tuple((s.start, s.stop) for s in index)
            if key not in cache:
                cache[key] = _param_from_pieces(ckpt, ps, shape, dtype, index)
            return cache[key]

        _set(out, path, jax.make_array_from_callback(shape, sharding, callback))
        cache.clear()
    return out


# --- writing ----------------------------------------------------------------------------


def hf_tensor(t: Tensor, params: PyTree) -> np.ndarray:
    """One HF tensor assembled from our parameters (gathered to the host)."""
    views = []
    for part in t.parts:
        value = np.asarray(jax.device_get(_get(params, part.param)))[part.index]
        lead, rest = value.shape[:t.batch], value.shape[t.batch:]
        if t.split == 0:
            views.append(value.reshape(*lead, -1))
        else:
            views.append(value.reshape(*lead, math.prod(rest[:t.split]), -1))
    value = np.concatenate(views, axis=-1) if len(views) > 1 else views[0]
    return np.ascontiguousarray(np.swapaxes(value, -1, -2) if t.transpose else value)


def parse_size(size: int | str) -> int:
    """Bytes from 5000000, '5GB', '200MB', '10KiB' (HF's max_shard_size spelling)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size={size!r} is not a size; use e.g. '5GB' or '200MB'")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * base**power)


def write_params(layout: Layout, params: PyTree, abstract: PyTree, out_dir: pathlib.Path, *,
                 max_shard_size: int | str = "5GB", dtype: str = "float32") -> list[str]:
    """Writes `model.safetensors`, or shards + `model.safetensors.index.json` when the
    total exceeds `max_shard_size`. One shard's tensors are on the host at a time."""
    plan(layout, abstract)  # every parameter written exactly once
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    itemsize = np.dtype(jax.numpy.dtype(dtype)).itemsize
    shards: list[list[Tensor]] = [[]]
    used = 0
    for t in layout.tensors:
        size = math.prod(t.hf_shape([_part_dims(t, p, abstract) for p in t.parts])) * itemsize
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(t)
        used += size
    n = len(shards)
    names = ([SINGLE_FILE] if n == 1 else
             [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    weight_map, total = {}, 0
    for file, tensors in zip(names, shards):
        arrays = {t.name: hf_tensor(t, params).astype(jax.numpy.dtype(dtype)) for t in tensors}
        total += sum(a.nbytes for a in arrays.values())
        _save(arrays, out_dir / file)
        weight_map.update({name: file for name in arrays})
        del arrays
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def _save(arrays: dict[str, np.ndarray], path: pathlib.Path) -> None:
    # transformers refuses safetensors files without format metadata.
    metadata = {"format": "pt"}
    if all(a.dtype.name in {"float32", "float16", "float64", "int32", "int64"}
           for a in arrays.values()):
        from safetensors.numpy import save_file
        save_file(arrays, str(path), metadata=metadata)
    else:  # bfloat16: numpy's backend cannot write it, flax's can
        from safetensors.flax import save_file
        save_file({k: jax.numpy.asarray(v) for k, v in arrays.items()}, str(path),
                  metadata=metadata)

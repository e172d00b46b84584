"""The architecture table: one `Architecture` entry per Hugging Face model line.

An entry says which HF configs it accepts (`model_type` and `architectures` values),
how an HF config.json becomes this framework's config dataclass and back, and which HF
tensor holds which of our parameters (`Layout`). Adding an architecture is one more
`register(Architecture(...))` call; nothing else in the converter knows any name.

The name table is data, not code: a `Tensor` lists our parameter(s) that form one HF
tensor and a layout rule that covers every transform the supported models need.

    view(p)  = p[index].reshape(prod(dims[:split]), prod(dims[split:]))   (2-D HF tensors)
               p[index].reshape(-1)                                        (1-D HF tensors)
    hf       = concat([view(p) for p in parts], axis=-1), then .T if `transpose`

So a torch Linear weight [out, in] of a query kernel [D, N, H] is `split=1,
transpose=True`; the attention output [N, H, D] is `split=2, transpose=True`; GPT-2's
fused Conv1D `c_attn` [D, 3D] is the three kernels q, k, v with `split=1` concatenated;
a stacked expert kernel [E, D, F] is E `Tensor`s, each with `index=(e,)`.

`batch=n` keeps a part's first n dims (after `index`) as the HF tensor's leading dims
and applies the rule above to the rest, per leading index: transformers >= 5 holds
Mixtral's experts fused, `gate_up_proj` [E, 2F, D] = wi_0 and wi_1 [E, D, F] with
`batch=1, split=1, transpose=True` (the last two axes swap).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

ParamPath = tuple[str | int, ...]


class ConversionError(ValueError):
    """An HF checkpoint or config this converter cannot represent or read."""


def param_path(text: str) -> ParamPath:
    """'layers/0/mlp/wo/kernel' -> ('layers', 0, 'mlp', 'wo', 'kernel')."""
    return tuple(int(p) if p.isdigit() else p for p in text.split("/"))


def path_text(path: ParamPath) -> str:
    return "/".join(str(p) for p in path)


@dataclasses.dataclass(frozen=True)
class Part:
    """One of our parameters (or the sub-array `param[index]`) inside an HF tensor."""

    param: ParamPath
    index: tuple[int, ...] = ()  # leading indices into the parameter (stacked experts)


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One HF tensor: our parts concatenated along its last (pre-transpose) axis.

    split: how many of a part's dims (after `index` and the `batch` dims) form the rows
      of the 2-D view; the rest form the columns. 0: one flat axis (1-D HF tensors).
    transpose: HF stores the 2-D view transposed (torch Linear: [out, in]).
    batch: how many leading dims (after `index`) every part shares with the HF tensor,
      which holds one such view per leading index (stacked experts).
    """

    name: str
    parts: tuple[Part, ...]
    split: int = 1
    transpose: bool = False
    batch: int = 0

    def hf_shape(self, part_shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        """The HF tensor's shape from the shapes of `parts` (after their index)."""
        lead = {tuple(s[:self.batch]) for s in part_shapes}
        if len(lead) != 1:
            raise ConversionError(f"{self.name}: parts disagree on leading dims "
                                  f"{sorted(lead)}")
        lead_shape = lead.pop()
        shapes = [s[self.batch:] for s in part_shapes]
        if self.split == 0:
            return (*lead_shape, sum(math.prod(s) for s in shapes))
        rows = {math.prod(s[:self.split]) for s in shapes}
        if len(rows) != 1:
            raise ConversionError(f"{self.name}: parts disagree on rows {sorted(rows)}")
        cols = sum(math.prod(s[self.split:]) for s in shapes)
        shape = (rows.pop(), cols)
        return (*lead_shape, *(shape[::-1] if self.transpose else shape))


def tensor(name: str, *params: str | Part, split: int = 1, transpose: bool = False,
           batch: int = 0) -> Tensor:
    """Shorthand: `tensor('lm_head.weight', 'logits_dense/kernel', transpose=True)`."""
    parts = tuple(p if isinstance(p, Part) else Part(param_path(p)) for p in params)
    return Tensor(name, parts, split=split, transpose=transpose, batch=batch)


def linear(name: str, *params: str | Part, split: int = 1, batch: int = 0) -> Tensor:
    """A torch nn.Linear weight [out, in] of our kernel [in..., out...] (several
    params: their outputs concatenated, e.g. a fused gate / up projection)."""
    return tensor(name, *params, split=split, transpose=True, batch=batch)


def vector(name: str, *params: str | Part) -> Tensor:
    """A 1-D HF tensor (norm scale, bias) from our parameter(s) flattened."""
    return tensor(name, *params, split=0)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Every HF tensor of one model and how our parameters fill it.

    tensors: the HF tensors that hold our parameters (each parameter exactly once).
    tied: HF name -> the HF name it shares storage with (`lm_head.weight` ->
      the embedding). Omitted on export as `save_pretrained` does; checked equal to
      its source on import when a checkpoint has it.
    fallbacks: HF name -> the HF name read in its place when a checkpoint lacks it.
    ignored: regexes of HF tensors that exist in some checkpoints but are not used
      (e.g. BERT's next-sentence head in an MLM import, old GPT-2 mask buffers).
    alternatives: other tables of the same parameters that checkpoints may hold instead
      (Mixtral's per-expert `w1/w2/w3` on the hub vs transformers >= 5's fused experts).
      Import reads the table a checkpoint matches best (fewest missing tensors, this
      one on a tie); export always writes this one.
    """

    tensors: tuple[Tensor, ...]
    tied: Mapping[str, str] = dataclasses.field(default_factory=dict)
    fallbacks: Mapping[str, str] = dataclasses.field(default_factory=dict)
    ignored: tuple[str, ...] = ()
    alternatives: tuple[Layout, ...] = ()

    def by_name(self) -> dict[str, Tensor]:
        return {t.name: t for t in self.tensors}

    def is_ignored(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.ignored)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One HF model line and its mapping onto one of our families.

    family: 'encoder_decoder' | 'decoder_only' | 'encoder_only' (our networks / Model APIs).
    model_types / hf_classes: the config.json `model_type` / `architectures` values accepted.
    config_from_hf(hf_config dict) -> our config (raises ConversionError naming any value
      we cannot represent); config_to_hf(config, hf_class) -> config.json fields.
    layout(config) -> the tensor table; accepts(config) -> whether export may pick it;
      export_class(config, preferred) -> the HF class to write (`preferred`: the
      imported model's class, kept where the config allows it).
    base_prefix: the HF base-model prefix ('model.', 'transformer.', 'bert.'); checkpoints
      of the bare base model store names without it, and are read either way.
    """

    name: str
    family: str
    model_types: tuple[str, ...]
    hf_classes: tuple[str, ...]
    config_from_hf: Callable[[Mapping[str, Any], str], Any]
    config_to_hf: Callable[[Any, str], dict[str, Any]]
    layout: Callable[[Any], Layout]
    accepts: Callable[[Any], bool]
    export_class: Callable[[Any, str | None], str]
    base_prefix: str = ""


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Adds (or replaces) an architecture; later entries win on shared model_types."""
    _REGISTRY[arch.name] = arch
    return arch


def architectures() -> dict[str, Architecture]:
    return dict(_REGISTRY)


def get(name: str) -> Architecture:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConversionError(
            f"unknown architecture {name!r}; known: {sorted(_REGISTRY)}") from None


def for_hf_config(hf_config: Mapping[str, Any]) -> tuple[Architecture, str]:
    """The entry for an HF config.json and the HF class it names.

    Raises ConversionError naming the `model_type` / `architectures` value otherwise.
    """
    model_type = hf_config.get("model_type")
    matches = [a for a in _REGISTRY.values() if model_type in a.model_types]
    if not matches:
        known = sorted({t for a in _REGISTRY.values() for t in a.model_types})
        raise ConversionError(
            f"unsupported Hugging Face model_type {model_type!r}; this converter handles "
            f"{known}")
    arch = matches[-1]
    classes = list(hf_config.get("architectures") or [])
    if not classes:
        return arch, arch.hf_classes[0]
    unknown = [c for c in classes if c not in arch.hf_classes]
    if unknown:
        raise ConversionError(
            f"unsupported Hugging Face architectures {unknown} for model_type "
            f"{model_type!r}; use a checkpoint of {list(arch.hf_classes)}")
    return arch, classes[0]


def for_config(config: Any) -> Architecture:
    """The first registered entry that can export `config` (the latest registered wins)."""
    for arch in reversed(list(_REGISTRY.values())):
        if arch.accepts(config):
            return arch
    raise ConversionError(
        f"no Hugging Face architecture can represent {type(config).__name__} {config}")

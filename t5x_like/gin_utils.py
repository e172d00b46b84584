"""Gin at the edges: flag rewriting, search paths, REQUIRED macros, config dumps.

Only the CLI layer (`main.py` and this module) imports gin; library code takes plain
arguments and gin binds them from the outside with `dynamic_registration`.
"""

from __future__ import annotations

import ast
import difflib
import os
import pathlib
import re
from collections.abc import Iterable, Sequence

import gin

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

# Macros every run gin declares first (T5X names). A run gin lists the ones it needs as
# `NAME = %gin.REQUIRED`; `check_required_macros` names any the user left unset.
RUN_MACROS = (
    "MODEL_DIR",
    "MIXTURE_OR_TASK_NAME",
    "TASK_FEATURE_LENGTHS",
    "TRAIN_STEPS",
    "BATCH_SIZE",
    "CHECKPOINT_PATH",
    "INFER_OUTPUT_DIR",
)

_GIN_FLAG = re.compile(r"^--gin\.([A-Za-z_][\w./]*)=(.*)$", re.DOTALL)


def default_search_paths() -> list[str]:
    """Where `--gin_file` and gin `include` statements are looked up, in order."""
    # The repository root first: `include 'gin/models/...'` resolves there on the first try
    # (gin logs an ERROR line for every search path that misses).
    paths = [str(REPO_ROOT), str(REPO_ROOT / "gin"), os.getcwd()]
    return [p for p in dict.fromkeys(paths) if os.path.isdir(p)]


def _is_gin_literal(value: str) -> bool:
    """True if `value` is already a gin value (number, string, tuple, @ref, %macro ...)."""
    v = value.strip()
    if not v:
        return False
    if v[0] in "@%" or v in ("True", "False", "None"):
        return True
    try:
        ast.literal_eval(v)
        return True
    except (ValueError, SyntaxError):
        return False


def format_binding(name: str, value: str) -> str:
    """`--gin.NAME=VALUE` -> a gin binding; bare strings are quoted for the user.

    T5X needs `--gin.MODEL_DIR=\\"/tmp/x\\"`; here `--gin.MODEL_DIR=/tmp/x` works because a
    value that is not a gin literal is taken as a plain string.
    """
    if not _is_gin_literal(value):
        value = repr(value)
    return f"{name} = {value}"


def rewrite_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Splits `--gin.NAME=VALUE` flags out of argv.

    Returns (remaining argv, gin binding strings).
    """
    rest, bindings = [], []
    for arg in argv:
        m = _GIN_FLAG.match(arg)
        if m:
            bindings.append(format_binding(m.group(1), m.group(2)))
        elif arg.startswith("--gin.") and "=" not in arg:
            raise ValueError(f"gin flag {arg!r} has no value; write it as {arg}=VALUE")
        else:
            rest.append(arg)
    return rest, bindings


def _known_names(like: str) -> list[str]:
    """Registered configurable names, cut to as many dotted parts as `like` has."""
    parts = like.count(".") + 1
    names = set()
    for selector, _ in gin.config._REGISTRY.items():  # noqa: PERF102 (a SelectorMap)
        names.add(".".join(selector.split(".")[-parts:]))
    return sorted(names)


def _explain_parse_error(err: Exception, bindings: Sequence[str]) -> Exception:
    text = str(err)
    m = re.search(r"No configurable matching '([^']+)'", text)
    if not m:
        return err
    unknown = m.group(1)
    known = _known_names(unknown)
    close = difflib.get_close_matches(unknown, known, n=3, cutoff=0.5)
    offending = [b for b in bindings if b.split("=")[0].strip().startswith(unknown)]
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    where = f" (from binding {offending[0]!r})" if offending else ""
    return ValueError(
        f"unknown gin binding {unknown!r}{where}: no configurable of that name is registered."
        f"{hint} "
        "Check the spelling, or import its module in the gin file "
        "(`from __gin__ import dynamic_registration` then `from MODULE import NAME`).\n"
        f"gin said: {text}"
    )


def parse_gin(
    gin_files: Iterable[str],
    bindings: Iterable[str] = (),
    search_paths: Iterable[str] | None = None,
    *,
    finalize: bool = True,
) -> None:
    """Parses gin files and bindings with this project's search paths and clear errors."""
    gin_files, bindings = list(gin_files), list(bindings)
    if search_paths is None:
        search_paths = default_search_paths()
    for path in search_paths:
        gin.add_config_file_search_path(path)
    resolved = []
    for f in gin_files:
        if os.path.isabs(f) or os.path.exists(f):
            resolved.append(f)
            continue
        found = [os.path.join(p, f) for p in search_paths if os.path.exists(os.path.join(p, f))]
        if not found:
            raise FileNotFoundError(
                f"gin file {f!r} not found in the search paths {list(search_paths)}; "
                "pass a path relative to the repository root or gin/"
            )
        resolved.append(found[0])
    try:
        gin.parse_config_files_and_bindings(resolved, bindings, finalize_config=False)
    except ValueError as err:
        raise _explain_parse_error(err, bindings) from err
    check_required_macros()
    if finalize:
        gin.finalize()


def _is_required(value: object) -> bool:
    return isinstance(value, gin.config.ConfigurableReference) and repr(value) == "%gin.REQUIRED"


def check_required_macros(names: Iterable[str] = RUN_MACROS) -> None:
    """Raises naming every macro a run gin declared `%gin.REQUIRED` but nobody set."""
    missing = []
    for name in names:
        try:
            value = gin.query_parameter(f"%{name}")
        except ValueError:  # never declared by this run: not needed.
            continue
        if _is_required(value):
            missing.append(name)
    if missing:
        flags = " ".join(f"--gin.{n}=..." for n in missing)
        raise ValueError(
            f"required gin macro(s) not set: {', '.join(missing)}. "
            f"Set them on the command line ({flags}) or in a gin file."
        )


def write_config(model_dir: str | os.PathLike[str], operative: bool = False) -> pathlib.Path:
    """Writes the (operative) gin config to MODEL_DIR/config.gin."""
    path = pathlib.Path(model_dir) / "config.gin"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = gin.operative_config_str() if operative else gin.config_str()
    path.write_text(text)
    return path

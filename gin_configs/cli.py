"""T5X-style gin command line: `--gin_file=...` (repeatable) and `--gin.KEY=VALUE` bindings.

Gin files resolve relative to the cwd or to the installed `zhchat/gin_configs` folder (both
`models/x.gin` and `gin_configs/models/x.gin` work). Configurables must be registered before parsing
for gin to reject typos, so `import_configurables` imports every module that defines them.
A bad file or binding becomes a `GinConfigError` carrying one concise message.

This is the neutral wiring module every floor may use (tasks, trainer, rl and scripts CLIs): it
imports no zhchat code. The configurable modules it names are imported only by `parse_gin`, which
the trainer-and-above CLIs call; data and model modules use only the argument and macro helpers
(tests/architecture/test_import_flow.py holds both rules).
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import re
from typing import Any, Sequence

import gin

# Modules that register gin configurables; the trainer imports them all before parsing.
CONFIGURABLE_MODULES = (
    "zhchat.trainer.partitioning", "zhchat.trainer.optimizers", "zhchat.trainer.checkpoints",
    "zhchat.trainer.synthetic_data", "zhchat.trainer.train",
    "zhchat.models.decoder_model", "zhchat.models.encdec_model", "zhchat.tasks.cache_reader",
)
# Modules whose third-party dependencies a machine may lack (the GPU image has no grain), with the
# configurables they register: bindings of those are skipped there, so e.g. pretrain.gin still
# parses and synthetic_data.gin can replace the data source.
OPTIONAL_MODULES = {"zhchat.tasks.cache_reader": ("make_cache_iterator",)}

_ADDED_SEARCH_PATHS: set[str] = set()


class _IncludeProbeFilter(logging.Filter):
    """gin logs an ERROR for each search-path candidate it probes for an `include` before the one
    that exists; those are not errors (a file that is truly missing still raises)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Path not found:")


logging.getLogger().addFilter(_IncludeProbeFilter())


def _safe_package_file_exists(path: str) -> bool:
    """gin's package-resource reader takes `runs/pretrain.gin` as package `runs` + file; a folder
    `runs/` in the cwd (e.g. the demo's output) is importable as a namespace package whose spec
    has no origin, and gin's own check then raises TypeError instead of answering "no". An include
    must never depend on what the working directory holds: such packages count as absent."""
    import importlib.util

    head = os.path.dirname(path).replace("/", ".")
    try:
        spec = importlib.util.find_spec(head) if head else None
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.origin:
        return False
    return gin.resource_reader.system_path_file_exists(path)


def _install_safe_resource_reader() -> None:
    import gin.resource_reader  # noqa: F401  (registers the reader this replaces)

    readers = gin.config._FILE_READERS  # no public API replaces a registered reader
    for i, (reader, exists) in enumerate(readers):
        if exists is gin.resource_reader.system_path_file_exists:
            readers[i] = (reader, _safe_package_file_exists)


_install_safe_resource_reader()
_UNAVAILABLE: dict[str, str] = {}  # optional module -> the dependency it could not import


class GinConfigError(ValueError):
    """A gin file or binding is wrong (unknown configurable/parameter, syntax, missing file)."""


def import_configurables(modules: Sequence[str] = CONFIGURABLE_MODULES) -> list[str]:
    """Imports the modules that exist; returns the names of those not present in this checkout.

    An optional module whose dependency is missing is recorded (see `unavailable`), not fatal.
    """
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and name.startswith(e.name):
                missing.append(name)  # not in this checkout (yet)
            elif name in OPTIONAL_MODULES and e.name:
                _UNAVAILABLE[name] = e.name
            else:
                raise
    return missing


def unavailable() -> dict[str, str]:
    """Optional configurable modules that could not be imported here, with the missing package."""
    return dict(_UNAVAILABLE)


def gin_search_paths() -> list[str]:
    import zhchat.gin_configs
    configs = os.path.dirname(os.path.abspath(zhchat.gin_configs.__file__))
    return [os.getcwd(), configs, os.path.dirname(configs)]


def split_gin_args(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """Separates `--gin_file=F`/`--gin_file F` and `--gin.K=V` from the other arguments."""
    files, bindings, rest = [], [], []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--gin_file="):
            files.append(arg.split("=", 1)[1])
        elif arg == "--gin_file" and i + 1 < len(args):
            files.append(args[i + 1])
            i += 1
        elif arg.startswith("--gin."):
            key_value = arg[len("--gin."):]
            if "=" not in key_value:
                raise GinConfigError(f"gin config error: binding {arg!r}: expected --gin.KEY=VALUE")
            bindings.append(key_value)
        elif arg.startswith("--gin_bindings="):
            bindings.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    return files, bindings, rest


def resolve_gin_file(name: str) -> str:
    """The first existing `name` under the search paths (absolute names are taken as they are)."""
    for folder in [""] + gin_search_paths():
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    raise GinConfigError(f"gin config error: gin file {name!r} not found (looked in the cwd and "
                         "the installed zhchat/gin_configs folder and its parent)")


def parse_gin(files: Sequence[str], bindings: Sequence[str]) -> None:
    """Parses gin files then bindings (later wins), raising `GinConfigError` with a short message."""
    import_configurables()
    for path in dict.fromkeys(gin_search_paths()):
        if path not in _ADDED_SEARCH_PATHS:
            gin.add_config_file_search_path(path)
            _ADDED_SEARCH_PATHS.add(path)
    resolved = [resolve_gin_file(f) for f in files]
    try:
        skip = [c for m in _UNAVAILABLE for c in OPTIONAL_MODULES[m]]
        gin.parse_config_files_and_bindings(resolved, [], finalize_config=False,
                                            skip_unknown=skip or False)
        check_macros(bindings)
        gin.parse_config_files_and_bindings([], list(bindings), finalize_config=False,
                                            skip_unknown=skip or False)
    except GinConfigError:
        raise
    except (ValueError, OSError, SyntaxError, TypeError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        where = next((ln for ln in lines[1:] if ln.startswith("In ")), "")
        binding = lines[-1] if len(lines) > 2 else ""
        msg = lines[0] if lines else type(e).__name__
        detail = " ".join(x for x in (where, f"`{binding}`" if binding else "") if x)
        absent = "; ".join(f"{m} needs {d}, not installed" for m, d in _UNAVAILABLE.items())
        raise GinConfigError(f"gin config error: {msg}" + (f" ({detail})" if detail else "")
                             + (f" [not importable here: {absent}]" if absent else "")) from e


def parse_checked(files: Sequence[str], bindings: Sequence[str]) -> None:
    """The data floor's parse (it imports no configurables): gin files, looked up in the cwd then
    gin_configs/, then bindings, with misspelt macros rejected in between (`check_macros`). Gin's
    own errors pass through (OSError for a missing file, ValueError for a bad binding)."""
    for path in dict.fromkeys(gin_search_paths()):
        if path not in _ADDED_SEARCH_PATHS:
            gin.add_config_file_search_path(path)
            _ADDED_SEARCH_PATHS.add(path)
    gin.parse_config_files_and_bindings(list(files), [], finalize_config=False)
    check_macros(bindings)
    gin.parse_config_files_and_bindings([], list(bindings), finalize_config=False)


_MACRO_BINDING = re.compile(r"^\s*([A-Za-z_]\w*)\s*=")


def _known_macros() -> set[str]:
    """Macros the parsed files define or use (`%NAME`)."""
    known = {scope for scope, selector in gin.config._CONFIG if selector == "gin.macro"}

    def walk(value: Any) -> None:
        if isinstance(value, gin.config.ConfigurableReference):
            text = repr(value)
            if text.startswith("%"):
                known.add(text[1:])
        elif isinstance(value, (list, tuple, set)):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)

    for params in gin.config._CONFIG.values():
        walk(list(params.values()))
    return known


def check_macros(bindings: Sequence[str]) -> None:
    """A binding of a macro that no parsed file (or other binding) defines or uses is a typo
    (`--gin.VOCAB_SIZ=...` would otherwise be accepted and do nothing)."""
    known = _known_macros() | {n for b in bindings for n in re.findall(r"%([A-Za-z_]\w*)", b)}
    unknown = []
    for binding in bindings:
        m = _MACRO_BINDING.match(binding)
        if m and m.group(1) not in known:
            close = difflib.get_close_matches(m.group(1), sorted(known), n=2)
            unknown.append(m.group(1) + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    if unknown:
        raise GinConfigError(f"gin config error: unknown macro {', '.join(unknown)}: no gin file "
                             "given defines or uses it")


MACRO_HINTS = {"MODEL": "a model preset defines it, e.g. --gin_file=models/decoder_tiny.gin"}


def check_unbound_macros() -> None:
    """A macro the parsed config uses (`%NAME`) but nothing defines fails when gin evaluates it,
    as `TypeError: macro() missing ... 'value'` deep in a traceback; this says which, up front."""
    defined = {scope for scope, selector in gin.config._CONFIG if selector == "gin.macro"}
    unbound = sorted(_known_macros() - defined)
    if unbound:
        hints = "; ".join(f"{m}: {MACRO_HINTS[m]}" for m in unbound if m in MACRO_HINTS)
        raise GinConfigError(f"gin config error: macro {', '.join(unbound)} is used but never "
                             "defined (bind it with --gin.NAME=VALUE or add the gin file that "
                             "defines it)" + (f"; {hints}" if hints else ""))


def evaluate_macro(name: str) -> Any:
    """The value of gin macro `name` after parsing, calling it if it is a `@configurable()`
    (e.g. `evaluate_macro("MODEL")` builds the model a preset describes)."""
    try:
        value = gin.query_parameter(f"%{name}")
    except ValueError as e:
        raise GinConfigError(f"gin config error: macro {name} is not defined") from e
    if isinstance(value, gin.config.ConfigurableReference):
        return value.scoped_configurable_fn() if value.evaluate else value.scoped_configurable_fn
    return value

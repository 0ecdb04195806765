"""The import graph follows the data flow raw -> clean -> vocab -> tasks -> cache -> models ->
trainer -> rl -> scripts: every `zhchat` import (module level or inside a function), every
`import zhchat...` line of a gin file, and the modules the gin command line imports by name point
down or sideways, never up."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Floors, lowest first. A module may import its own floor and those below it. Inside tasks/, the
# raw corpus readers sit below cleaning, and the TF-free data layer (tokenizer training and
# wrapper, chat template, SFT and preference readers, cache reader) below the seqio registration,
# cache export and evaluation tasks.
FLOORS = [
    ("wiring", ["gin_configs"]),
    ("raw", ["tasks.sources"]),  # corpus file readers with counted skips
    ("clean", ["tasks.clean"]),
    ("data", ["tasks.chat_template", "tasks.vocabulary", "tasks.splits",
              "tasks.tokenizer", "tasks.sft_reader", "tasks.sft_sources", "tasks.preference_reader",
              "tasks.cache_reader", "tasks.multitask_prompts"]),
    ("tasks", ["tasks"]),
    ("models", ["models"]),
    ("trainer", ["trainer"]),
    ("rl", ["rl"]),
    ("scripts", ["scripts"]),
    ("benchmarks", ["benchmarks"]),
]
# gin files configure one floor each (by their folder under gin_configs/)
GIN_FLOORS = {"clean": "clean", "tasks": "tasks", "models": "models", "runs": "rl",
              "evals": "scripts", "pipelines": "scripts"}


def floor_of(module: str) -> int:
    """The floor of `zhchat.<module>` (the most specific prefix in FLOORS wins)."""
    best, best_len = None, -1
    for rank, (_, prefixes) in enumerate(FLOORS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = rank, len(p)
    if best is None:
        raise KeyError(f"zhchat.{module} is on no floor: add it to FLOORS")
    return best


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] in ("__init__", "__main__"):
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> list[pathlib.Path]:
    folders = {p for _, prefixes in FLOORS for p in (x.split(".")[0] for x in prefixes)}
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module under zhchat.) of every import of a zhchat module, at any depth."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name[7:]) for a in node.names if a.name.startswith("zhchat.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "zhchat":
                found += [(node.lineno, a.name) for a in node.names]
            elif node.module.startswith("zhchat."):
                base = node.module[7:]
                for a in node.names:  # `from zhchat.tasks import tokenizer` imports zhchat.tasks.tokenizer
                    sub = f"{base}.{a.name}"
                    found.append((node.lineno, sub if (ROOT / sub.replace(".", "/")).with_suffix(
                        ".py").exists() or (ROOT / sub.replace(".", "/")).is_dir() else base))
    return found


def _violations() -> list[str]:
    bad = []
    for path in _sources():
        me = _module_name(path)
        mine = floor_of(me)
        for line, target in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if floor_of(target) > mine:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({FLOORS[mine][0]}) imports "
                           f"zhchat.{target} ({FLOORS[floor_of(target)][0]})")
    return bad


def test_python_imports_follow_the_flow():
    assert _violations() == []


def test_gin_files_import_only_their_floor_and_below():
    bad = []
    for path in sorted((ROOT / "gin_configs").rglob("*.gin")):
        area = path.relative_to(ROOT / "gin_configs").parts[0]
        mine = floor_of(GIN_FLOORS[area].replace("clean", "tasks.clean"))
        for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            m = re.match(r"\s*import\s+zhchat\.([\w.]+)", text)
            if m and floor_of(m.group(1)) > mine:
                bad.append(f"{path.relative_to(ROOT)}:{n} imports zhchat.{m.group(1)}")
    assert bad == []


def test_the_gin_command_line_is_neutral():
    """gin_configs/cli.py imports no zhchat code; the modules it imports by name (for the trainer
    CLI's configurables) are imported only when `parse_gin` runs, which no data or model module
    calls."""
    from zhchat.gin_configs import cli

    tree = ast.parse((ROOT / "gin_configs" / "cli.py").read_text(encoding="utf-8"))
    assert {t for _, t in _imports(tree)} <= {"gin_configs"}
    for name in cli.CONFIGURABLE_MODULES:
        floor_of(name[7:])  # each named module is on a floor
    callers = []
    for path in _sources():
        if floor_of(_module_name(path)) > floor_of("models"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in ("parse_gin", "import_configurables") \
                    and isinstance(node.value, ast.Name) and node.value.id == "gin_cli":
                callers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert callers == []


@pytest.mark.parametrize("module,floor", [("tasks.vocabulary", "data"), ("tasks.cache", "tasks"),
                                          ("tasks.clean.pipeline", "clean"), ("rl.ppo", "rl")])
def test_floor_of(module, floor):
    assert FLOORS[floor_of(module)][0] == floor

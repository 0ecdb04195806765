"""Every gin file parses whatever folders the working directory holds: `runs/`, `tasks/` and
`models/` beside the user's cwd (the demo writes `runs/`) must not shadow the project's includes."""

import pathlib

import gin
import pytest

from zhchat.gin_configs import cli as gin_cli

GIN_DIR = pathlib.Path(__file__).resolve().parents[2] / "gin_configs"
FILES = sorted(str(p.relative_to(GIN_DIR)) for p in GIN_DIR.rglob("*.gin"))


@pytest.fixture
def crowded_cwd(tmp_path, monkeypatch):
    for name in ("runs", "tasks", "models", "gin_configs"):
        (tmp_path / name / "demo").mkdir(parents=True)  # importable as namespace packages
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    gin.clear_config()


@pytest.mark.parametrize("name", FILES)
def test_gin_file_parses_with_shadowing_folders_in_cwd(crowded_cwd, name):
    gin.clear_config()
    # task files register seqio tasks over a tokenizer; a path is enough to parse them
    gin_cli.parse_gin([name], ["VOCAB_PATH = 'spm.model'"] if name.startswith("tasks/") else [])
    assert gin.config_str() is not None

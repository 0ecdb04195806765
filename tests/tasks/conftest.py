"""Session fixtures for the data-spine tests: the demo task registered with the test tokenizer
(`spm_models`, trained once per session in tests/conftest.py)."""

import pathlib

import pytest


@pytest.fixture(scope="session")
def demo_task(spm_models) -> str:
    """Registers `zh_demo_lm` from gin_configs/tasks/demo_lm.gin with the BPE test tokenizer."""
    import gin

    from zhchat.tasks import lm

    names = lm.parse_gin(["tasks/demo_lm.gin"], [f"VOCAB_PATH = '{spm_models['bpe']}'"])
    gin.clear_config()  # the task is registered; leave no bindings behind for other tests
    assert names == ["zh_demo_lm"]
    return "zh_demo_lm"


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parents[2]

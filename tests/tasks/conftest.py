"""Session fixtures for the data-spine tests (the demo task `demo_task` lives in tests/conftest.py)."""

import pathlib

import pytest


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parents[2]

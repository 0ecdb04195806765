"""RL test session: helpers importable as `rl_helpers`, a persistent compilation cache."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    import jax
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache_rl")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    jax.config.update("jax_compilation_cache_dir", None)


@pytest.fixture(autouse=True)
def no_gin_leftovers():
    """Gin bindings parsed by a test (the CLI test) must not configure the next test's objects."""
    import gin
    gin.clear_config()
    yield
    gin.clear_config()

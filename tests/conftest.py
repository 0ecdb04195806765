"""Test-session setup: 8 forced CPU devices (for mesh tests) and shared paths.

XLA reads the device count once, at backend start, so it is set here before anything imports jax.
Computations that name no sharding still run on device 0, so unsharded tests are unaffected.
"""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEMO_DATA = REPO / "data" / "demo"


def pytest_configure(config):
    # the GPU-only tests (they also skip without one); CPU is pinned above unless JAX_PLATFORMS is
    # set, so on the GPU machine: JAX_PLATFORMS=cuda python -m pytest -m gpu tests
    config.addinivalue_line("markers", "gpu: needs a GPU; run with JAX_PLATFORMS=cuda "
                                       "python -m pytest -m gpu tests")


def model_from_preset(name: str):
    """The model wrapper (`%MODEL`) of gin_configs/models/<name>.gin, leaving no gin state."""
    import gin

    gin.clear_config()
    try:
        gin.parse_config_file(str(REPO / "gin_configs" / "models" / f"{name}.gin"))
        return gin.query_parameter("%MODEL").scoped_configurable_fn()
    finally:
        gin.clear_config()


@pytest.fixture(scope="session")
def demo_data_dir() -> pathlib.Path:
    return DEMO_DATA


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("the shared data folder beside the checkout is absent")
    return SHARED_DATA


# Tiny tokenizers trained once per session on the embedded demo corpus: a small vocabulary (3000
# pieces; the demo text has more distinct characters than that, so character coverage is lowered to
# 0.98 and byte fallback covers the rest) and a 6000-sentence sample, about a second each.
VOCAB_SIZE = 3000


@pytest.fixture(scope="session")
def spm_models(tmp_path_factory, demo_data_dir) -> dict:
    """{'unigram': path, 'bpe': path} of SentencePiece models trained on the demo corpus."""
    import gin

    with gin.unlock_config():  # an earlier test may have finalized (locked) its gin config
        from zhchat.tasks import tokenizer

    out = tmp_path_factory.mktemp("spm")
    models = {}
    for model_type in ("unigram", "bpe"):
        prefix = str(out / model_type)
        tokenizer.train_tokenizer(
            files=[str(demo_data_dir / "*.jsonl.gz")], format="jsonl", model_prefix=prefix,
            vocab_size=VOCAB_SIZE, model_type=model_type, character_coverage=0.98,
            input_sentence_size=6000, seed=0, progress=False,
            heldout_files=[str(demo_data_dir / "peoples_daily_199801_tagged_sample.txt.gz")],
            heldout_format="pku_tagged", heldout_max_chars=100_000)
        models[model_type] = prefix + ".model"
    return models


@pytest.fixture(scope="session")
def demo_task(spm_models) -> str:
    """Registers `zh_demo_lm` from gin_configs/tasks/demo_lm.gin with the BPE test tokenizer."""
    import gin

    gin.clear_config()  # also unlocks a config an earlier test finalized
    with gin.unlock_config():
        from zhchat.tasks import lm

    names = lm.parse_gin(["tasks/demo_lm.gin"], [f"VOCAB_PATH = '{spm_models['bpe']}'"])
    gin.clear_config()  # the task is registered; leave no bindings behind for other tests
    assert names == ["zh_demo_lm"]
    return "zh_demo_lm"

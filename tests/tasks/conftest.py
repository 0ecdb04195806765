"""Session fixtures for the data-spine tests: tiny tokenizers trained once, the demo task registered.

The tokenizers are trained on the embedded demo corpus with a small vocabulary (3000 pieces; the demo
text has more distinct characters than that, so character coverage is lowered to 0.98, byte fallback
covers the rest) and a 6000-sentence sample, which takes about a second each.
"""

import pathlib

import pytest

VOCAB_SIZE = 3000


@pytest.fixture(scope="session")
def spm_models(tmp_path_factory, demo_data_dir) -> dict:
    """{'unigram': path, 'bpe': path} of SentencePiece models trained on the demo corpus."""
    from zhchat.tasks import vocab

    out = tmp_path_factory.mktemp("spm")
    models = {}
    for model_type in ("unigram", "bpe"):
        prefix = str(out / model_type)
        vocab.train_tokenizer(
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

    from zhchat.tasks import lm

    names = lm.parse_gin(["tasks/demo_lm.gin"], [f"VOCAB_PATH = '{spm_models['bpe']}'"])
    gin.clear_config()  # the task is registered; leave no bindings behind for other tests
    assert names == ["zh_demo_lm"]
    return "zh_demo_lm"


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parents[2]

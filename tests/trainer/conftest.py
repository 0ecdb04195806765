"""Shared helpers for trainer tests: the model under test and tiny batch sources."""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
CACHE_LEN = 64


def tiny_decoder(vocab_size: int = 256):
    """The real DecoderOnlyModel with the tiny preset (fp32), its vocabulary cut to `vocab_size`
    to keep CPU tests fast."""
    import gin
    from zhchat.gin_configs import cli as gin_cli
    gin.clear_config()
    gin_cli.parse_gin(["models/decoder_tiny.gin"], [f"VOCAB_SIZE = {vocab_size}"])
    model = gin_cli.evaluate_macro("MODEL")
    gin.clear_config()
    return model


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """A per-session persistent compilation cache: train() calls in different tests build new
    function objects for identical programs; this lets them share compiled executables."""
    import jax
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    jax.config.update("jax_compilation_cache_dir", None)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory, demo_data_dir) -> tuple[str, int]:
    """(cache dir, vocab size): data/demo -> SentencePiece BPE (3000 pieces) -> seqio task
    `zh_demo_lm` -> 512 packed examples of length CACHE_LEN in 2 ArrayRecord shards."""
    import gin
    from zhchat.tasks import cache, lm, tokenizer

    out = tmp_path_factory.mktemp("demo_lm")
    tokenizer.train_tokenizer(files=[str(demo_data_dir / "*.jsonl.gz")], format="jsonl",
                          model_prefix=str(out / "bpe"), vocab_size=3000, model_type="bpe",
                          character_coverage=0.98, input_sentence_size=6000, seed=0,
                          progress=False)
    names = lm.parse_gin(["tasks/demo_lm.gin"], [f"VOCAB_PATH = '{out / 'bpe.model'}'"])
    gin.clear_config()
    meta = cache.export_cache(task=names[0], split="train", output_dir=str(out / "cache"),
                              feature_lengths={"targets": CACHE_LEN}, converter="decoder",
                              num_shards=2, max_examples=512, progress=False)
    return str(out / "cache"), meta["vocabulary"]["targets"]["vocab_size"]


@pytest.fixture(scope="session")
def model():
    return tiny_decoder()


def random_batch(batch: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A causal-LM batch with two packed segments per row and some padding at the end."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, size=(batch, length + 1), dtype=np.int32)
    seg = np.ones((batch, length), np.int32)
    seg[:, length // 2:] = 2
    seg[:, length - 3:] = 0
    pos = np.concatenate([np.arange(length // 2), np.arange(length - length // 2)])
    pos = np.broadcast_to(pos, (batch, length)).astype(np.int32) * (seg > 0)
    return {"decoder_input_tokens": tokens[:, :-1] * (seg > 0),
            "decoder_target_tokens": tokens[:, 1:] * (seg > 0),
            "decoder_segment_ids": seg, "decoder_positions": pos,
            "decoder_loss_weights": (seg > 0).astype(np.float32)}

"""The tiny decoder learns real Chinese text read through the real cache path (gin-configured run).

data/demo -> SentencePiece (BPE, 3000 pieces) -> seqio task `zh_demo_lm` -> packed ArrayRecord cache
-> `train/make_cache_iterator` (pretrain.gin) -> train(); the loss must fall by at least 30%.
"""

import json

import gin
import pytest

from conftest import REPO_ROOT
from zhchat.trainer import gin_cli, train

SEQ_LEN = 64
NUM_STEPS = 200


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory, demo_data_dir):
    from zhchat.tasks import cache, lm, vocab

    out = tmp_path_factory.mktemp("demo_lm")
    vocab.train_tokenizer(files=[str(demo_data_dir / "*.jsonl.gz")], format="jsonl",
                          model_prefix=str(out / "bpe"), vocab_size=3000, model_type="bpe",
                          character_coverage=0.98, input_sentence_size=6000, seed=0,
                          progress=False)
    names = lm.parse_gin(["tasks/demo_lm.gin"], [f"VOCAB_PATH = '{out / 'bpe.model'}'"])
    gin.clear_config()
    meta = cache.export_cache(task=names[0], split="train", output_dir=str(out / "cache"),
                              feature_lengths={"targets": SEQ_LEN}, converter="decoder",
                              num_shards=2, max_examples=512, progress=False)
    return str(out / "cache"), meta["vocabulary"]["targets"]["vocab_size"]


def test_tiny_decoder_loss_falls_on_demo_text(demo_cache, tmp_path, monkeypatch):
    cache_dir, vocab_size = demo_cache
    monkeypatch.chdir(REPO_ROOT)
    gin.clear_config()
    gin_cli.parse_gin(["models/decoder_tiny.gin", "runs/pretrain.gin"], [
        f"VOCAB_SIZE = {-(-vocab_size // 128) * 128}", f"TRAIN_CACHE_DIR = '{cache_dir}'",
        f"RUN_DIR = '{tmp_path}'", f"NUM_STEPS = {NUM_STEPS}", "BATCH_SIZE = 8",
        "train.log_every = 20", "train.checkpoint_every = 0", "train.progress_bar = False",
        "make_schedule.peak_value = 1e-2", "make_schedule.warmup_steps = 20",
        "Partitioner.num_devices = 1", "Partitioner.mesh_shape = (1, 1, 1)",
        "train/make_cache_iterator.num_threads = 1",
        "train/make_cache_iterator.prefetch_buffer_size = 8"])
    try:
        summary = train.train()
    finally:
        gin.clear_config()
    losses = [h["loss"] for h in summary["history"]]
    assert summary["step"] == NUM_STEPS and len(losses) == NUM_STEPS // 20
    print("losses every 20 steps:", [round(x, 3) for x in losses])
    assert losses[-1] < 0.7 * losses[0], losses
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == NUM_STEPS and records[-1]["train/tokens_per_sec"] > 0
    assert 0 < records[-1]["train/learning_rate"] < 1e-2
    assert (tmp_path / "checkpoints" / str(NUM_STEPS)).is_dir()  # the final save

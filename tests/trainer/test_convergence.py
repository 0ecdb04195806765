"""The tiny decoder learns real Chinese text read through the real cache path (gin-configured run).

data/demo -> SentencePiece (BPE, 3000 pieces) -> seqio task `zh_demo_lm` -> packed ArrayRecord cache
-> `train/make_cache_iterator` (pretrain.gin) -> train(); the untrained model scores ln(vocab), and
the trained one must beat a unigram model counted on the same rows (it learned context, not only
token frequencies).
"""

import json

import gin

import math

from conftest import REPO_ROOT
from zhchat.gin_configs import cli as gin_cli
from zhchat.tasks.baselines import unigram_baseline
from zhchat.trainer import train

NUM_STEPS = 200

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
        "train/make_cache_iterator.prefetch_buffer_size = 8",
        "train.eval_data = @eval/make_cache_iterator", f"EVAL_CACHE_DIR = '{cache_dir}'",
        "train.eval_every = 100", "train.eval_steps = 2",
        "eval/make_cache_iterator.num_threads = 1"])
    try:
        summary = train.train()
    finally:
        gin.clear_config()
    losses = [h["loss"] for h in summary["history"]]
    assert summary["step"] == NUM_STEPS and len(losses) == NUM_STEPS // 20
    print("losses every 20 steps:", [round(x, 3) for x in losses])
    unigram, _ = unigram_baseline(cache_dir, cache_dir, vocab_size)  # in-sample: optimistic
    evals = summary["eval_history"]
    print(f"unigram {unigram:.3f}, eval cross-entropy {evals[-1]['cross_entropy']:.3f}")
    assert losses[0] < math.log(vocab_size) + 0.3  # first window: from ln(vocab) down
    assert evals[-1]["cross_entropy"] < unigram - 0.3, (evals, unigram)
    assert [e["step"] for e in evals] == [100, 200] and evals[1]["loss"] < evals[0]["loss"]
    assert evals[0]["num_tokens"] > 0 and 0 < evals[1]["accuracy"] < 1
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last_train = [r for r in records if "train/loss" in r][-1]
    assert last_train["step"] == NUM_STEPS and last_train["train/tokens_per_sec"] > 0
    assert 0 < last_train["train/learning_rate"] < 1e-2 and last_train["train/mfu"] > 0
    assert [r["step"] for r in records if "eval/loss" in r] == [100, 200]
    assert (tmp_path / "checkpoints" / str(NUM_STEPS)).is_dir()  # the final save

"""SFT through the real path: ../shared/data/sft Alpaca-zh -> chat template -> seqio task
(tasks/sft.gin) -> prefix_lm cache -> causal reader (runs/sft.gin) -> train(); on reply tokens of
those few hundred examples the loss must fall from ln(vocab) at init to below a unigram model of
the replies counted on the same rows."""

import gin
import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, tiny_decoder
from zhchat.gin_configs import cli as gin_cli
from zhchat.trainer import train

NUM_STEPS = 90
INPUTS, TARGETS = 64, 64


@pytest.fixture(scope="module")
def alpaca_cache(tmp_path_factory, demo_data_dir, shared_data_dir):
    """(cache dir, vocab size): the validation split of zh_sft_alpaca (~350 examples) packed."""
    from zhchat.tasks import cache, lm, tokenizer
    out = tmp_path_factory.mktemp("sft_alpaca")
    tokenizer.train_tokenizer(files=[str(demo_data_dir / "*.jsonl.gz")], format="jsonl",
                          model_prefix=str(out / "bpe"), vocab_size=3000, model_type="bpe",
                          character_coverage=0.98, input_sentence_size=6000, seed=0,
                          progress=False)
    lm.parse_gin(["tasks/sft.gin"], [f"VOCAB_PATH = '{out / 'bpe.model'}'",
                                     f"SFT_INPUTS_LENGTH = {INPUTS}",
                                     f"SFT_TARGETS_LENGTH = {TARGETS}"])
    gin.clear_config()
    meta = cache.export_cache(task="zh_sft_alpaca", split="validation",
                              output_dir=str(out / "cache"),
                              feature_lengths={"inputs": INPUTS, "targets": TARGETS},
                              converter="prefix_lm", progress=False)
    return str(out / "cache"), meta["vocabulary"]["targets"]["vocab_size"], meta["num_examples"]


def mean_loss(model, params, cache_dir: str) -> float:
    """Token-weighted loss over one pass of the whole cache (reply tokens only)."""
    from zhchat.tasks import sft_reader
    it = sft_reader.make_causal_cache_iterator(cache_dir=cache_dir, batch_size=8, shuffle=False,
                                               num_epochs=1, drop_remainder=False,
                                               shard_index=0, shard_count=1)
    loss_fn = jax.jit(lambda p, b: model.loss_fn(p, b, None)[1])
    total = tokens = 0.0
    for batch in it:
        m = loss_fn(params, batch)
        total += float(m["cross_entropy"]) * float(m["num_tokens"])
        tokens += float(m["num_tokens"])
    return total / tokens


def test_sft_lowers_alpaca_reply_loss_below_unigram(alpaca_cache, tmp_path, monkeypatch):
    cache_dir, vocab_size, num_rows = alpaca_cache
    padded = -(-vocab_size // 128) * 128
    monkeypatch.chdir(REPO_ROOT)
    gin.clear_config()
    gin_cli.parse_gin(["models/decoder_tiny.gin", "runs/sft.gin"], [
        f"VOCAB_SIZE = {padded}", f"TRAIN_CACHE_DIR = '{cache_dir}'", f"RUN_DIR = '{tmp_path}'",
        f"NUM_STEPS = {NUM_STEPS}", "BATCH_SIZE = 8", "train.log_every = 15",
        "train.checkpoint_every = 0", "train.eval_every = 0", "train.progress_bar = False",
        "make_schedule.peak_value = 1e-2", "make_schedule.warmup_steps = 20",
        "Partitioner.num_devices = 1", "Partitioner.mesh_shape = (1, 1, 1)",
        "train/make_causal_cache_iterator.num_threads = 1",
        "train/make_causal_cache_iterator.prefetch_buffer_size = 8"])
    try:
        model = gin_cli.evaluate_macro("MODEL")
        summary = train.train(model=model)
    finally:
        gin.clear_config()
    print("train losses:", [round(h["loss"], 3) for h in summary["history"]])
    assert summary["step"] == NUM_STEPS
    init = model.init_params(jax.random.key(0), {"decoder_input_tokens": (1, INPUTS + TARGETS)})
    from flax import linen as nn
    before = mean_loss(model, nn.unbox(init), cache_dir)
    after = mean_loss(model, summary["state"].params, cache_dir)
    print(f"{num_rows} packed rows; reply-token loss {before:.3f} -> {after:.3f}")
    from zhchat.tasks.baselines import unigram_baseline
    unigram, _ = unigram_baseline(cache_dir, cache_dir, padded)  # reply tokens (loss weights)
    print(f"unigram model of the replies: {unigram:.3f}")
    assert abs(before - np.log(padded)) < 0.3
    assert np.isfinite(after) and after < unigram - 0.2 and after < before - 1.5


def test_real_prefix_lm_rows_take_the_split_attention(alpaca_cache):
    """seqio's PrefixLM rows from the real cache put each example's inputs first, so the decoder's
    prefix-LM attention splits into two flash calls (models/prefix_attention.py), and the split
    equals the dense prefix-LM mask on them (XLA branches); the throughput benchmark reads the same
    rows with their prefix and says so."""
    from zhchat.benchmarks import train_throughput, workloads
    from zhchat.models import layers, prefix_attention
    from zhchat.tasks import cache_reader

    cache_dir, vocab_size, _ = alpaca_cache
    it = cache_reader.make_cache_iterator(cache_dir=cache_dir, batch_size=8, shuffle=False,
                                          num_epochs=1, shard_index=0, shard_count=1,
                                          num_threads=1, prefetch_buffer_size=2)
    batch = {k: jax.numpy.asarray(v) for k, v in next(it).items()}
    seg, prefix = batch["decoder_segment_ids"], batch["decoder_causal_attention"]
    assert int(prefix.sum()) > 0 and int(jax.numpy.max(seg)) >= 2  # packed, with inputs
    info = prefix_attention.prefix_info(seg, prefix, 16)
    assert bool(info.leading)
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (8, INPUTS + TARGETS, 2, 16)) for kk in keys)
    mask = layers.make_attention_mask(seg, seg, causal=True, query_prefix=prefix, kv_prefix=prefix)
    ref = layers.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    out = prefix_attention._split(q, k, v, seg, info, "xla")
    valid = np.asarray(seg != 0)[:, :, None, None]
    np.testing.assert_allclose(np.where(valid, out, 0), np.where(valid, ref, 0), atol=2e-5)

    w = workloads.get_workload("decoder_tiny", batch_size=8)
    result = train_throughput.run(w, steps=1, warmup=1, mesh_shape=(-1, 1, 1),
                                  bindings=(f"VOCAB_SIZE = {-(-vocab_size // 128) * 128}",),
                                  data=cache_dir, data_batches=2)
    stats = result["data_stats"]
    assert result["seq_len"] == INPUTS + TARGETS and 0 < stats["prefix_fraction"] < 1
    assert stats["prefix_split_batches"] == 1.0 and np.isfinite(result["loss_last"])

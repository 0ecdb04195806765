"""The tiny T5 trained by the shared trainer on span corruption of the embedded corpus, read through
the ArrayRecord/Grain cache: the loss falls by at least 30% within 200 steps.

data/demo -> SentencePiece (BPE, 3000 pieces + 100 sentinels) -> `zh_demo_span_corruption`
(tasks/demo_span_corruption.gin) -> packed `encdec` cache (inputs 64, targets 14) ->
runs/t5_span_corruption_tiny.gin -> train() -> fill_spans.
"""

import pathlib

import gin
import jax
import pytest

from zhchat.gin_configs import cli as gin_cli
from zhchat.models.encdec_model import EncoderDecoderModel, fill_spans
from zhchat.trainer import partitioning, train

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
NUM_STEPS = 200
LENGTHS = {"inputs": 64, "targets": 14}  # random_spans_helper(inputs_length=64) -> (70, 14)


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory, demo_data_dir):
    from zhchat.tasks import cache, lm, tokenizer

    out = tmp_path_factory.mktemp("t5_demo")
    tokenizer.train_tokenizer(files=[str(demo_data_dir / "*.jsonl.gz")], format="jsonl",
                          model_prefix=str(out / "bpe"), vocab_size=3000, model_type="bpe",
                          character_coverage=0.98, input_sentence_size=6000, seed=0, progress=False)
    names = lm.parse_gin(["tasks/demo_span_corruption.gin"], [f"VOCAB_PATH = '{out / 'bpe.model'}'"])
    gin.clear_config()
    assert "zh_demo_span_corruption" in names
    meta = cache.export_cache(task="zh_demo_span_corruption", split="train",
                              output_dir=str(out / "cache"), feature_lengths=LENGTHS,
                              converter="encdec", num_shards=2, max_examples=512, progress=False)
    return str(out / "cache"), str(out / "bpe.model"), meta


def test_tiny_t5_span_corruption_loss_falls(demo_cache, tmp_path, monkeypatch):
    cache_dir, spm_path, meta = demo_cache
    vocab_size = meta["vocabulary"]["inputs"]["vocab_size"]
    monkeypatch.chdir(REPO_ROOT)
    gin.clear_config()
    gin_cli.parse_gin(["runs/t5_span_corruption_tiny.gin"], [
        f"VOCAB_SIZE = {-(-vocab_size // 128) * 128}", f"TRAIN_CACHE_DIR = '{cache_dir}'",
        f"RUN_DIR = '{tmp_path}'", f"NUM_STEPS = {NUM_STEPS}", "BATCH_SIZE = 16",
        "INPUTS_LENGTH = 64", "train.log_every = 20", "train.checkpoint_every = 0", "train.progress_bar = False",
        "make_schedule.warmup_steps = 20", "train.partitioner = None",  # one device, passed below
        "train/make_cache_iterator.num_threads = 1",
        "train/make_cache_iterator.prefetch_buffer_size = 8"])
    try:
        model = gin_cli.evaluate_macro("MODEL")
        partitioner = partitioning.Partitioner(mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
        summary = train.train(model=model, partitioner=partitioner)
    finally:
        gin.clear_config()
    losses = [h["loss"] for h in summary["history"]]
    print("losses every 20 steps:", [round(x, 3) for x in losses])
    assert isinstance(model, EncoderDecoderModel) and summary["step"] == NUM_STEPS
    assert losses[-1] < 0.7 * losses[0], losses
    # the trained model runs through the demo helper: a filled span comes back as text
    from zhchat.tasks.vocabulary import Vocabulary

    params = summary["state"].params
    text, spans = fill_spans(model, params, Vocabulary(spm_path), "子曰：学而时习之，<extra_id_0>乎？",
                             max_decode_length=16)
    print("fill_spans:", text, spans)
    assert 0 in spans and "<extra_id_0>" not in text, (text, spans)

"""gin_configs/tasks/cleaned_{lm,span_corruption}.gin over shards in the cleaner's output format."""

import gzip
import json

import gin
import numpy as np
import pytest
import seqio

from zhchat.tasks import lm

N_DOCS = 400
SENTENCES = ("天下大势，分久必合，合久必分。", "学而时习之，不亦说乎？", "今天的天气很好，我们去公园散步。")


@pytest.fixture(scope="module")
def cleaned_dir(tmp_path_factory):
    """Two shards like those `python -m zhchat.tasks.clean` writes: {"id", "source", "text"} lines."""
    out = tmp_path_factory.mktemp("cleaned")
    for shard in range(2):
        with gzip.open(out / f"cleaned-{shard:05d}-of-00002.jsonl.gz", "wt", encoding="utf-8") as f:
            for i in range(shard, N_DOCS, 2):
                text = "\n".join(SENTENCES[(i + j) % 3] + str(i) for j in range(1 + i % 5))
                f.write(json.dumps({"id": f"doc/{i}", "source": "test", "text": text},
                                   ensure_ascii=False) + "\n")
    (out / "report.json").write_text("{}")  # not a shard: the default glob must not match it
    return out


def _register(gin_file, cleaned_dir, spm_models):
    try:
        return lm.parse_gin([gin_file], [f"VOCAB_PATH = '{spm_models['bpe']}'",
                                         f"CLEANED_DATA_DIR = '{cleaned_dir}'"])
    finally:
        gin.clear_config()  # the task stays registered; leave no bindings behind


def _ids(task, split):
    ds = seqio.get_mixture_or_task(task).source.get_dataset(split=split, shuffle=False)
    return {ex["id"].decode() for ex in ds.as_numpy_iterator()}


def test_both_tasks_hold_out_the_same_documents(cleaned_dir, spm_models):
    assert _register("tasks/cleaned_lm.gin", cleaned_dir, spm_models) == ["zh_cleaned_lm"]
    assert _register("tasks/cleaned_span_corruption.gin", cleaned_dir, spm_models) == [
        "zh_cleaned_span_corruption"]
    expected = {f"doc/{i}" for i in range(N_DOCS) if lm.split_of(f"doc/{i}", 0.02) == "validation"}
    assert expected  # 2% of 400 ids
    for task in ("zh_cleaned_lm", "zh_cleaned_span_corruption"):
        val, train = _ids(task, "validation"), _ids(task, "train")
        assert val == expected and not val & train and len(val | train) == N_DOCS


def test_examples_have_the_cached_shapes(cleaned_dir, spm_models):
    _register("tasks/cleaned_lm.gin", cleaned_dir, spm_models)
    _register("tasks/cleaned_span_corruption.gin", cleaned_dir, spm_models)
    lm_task = seqio.get_mixture_or_task("zh_cleaned_lm")
    ex = next(lm_task.get_dataset({"targets": 64}, split="train", shuffle=False).as_numpy_iterator())
    assert 0 < ex["targets"].size <= 64 and ex["targets"][-1] == 1  # EOS
    sc_task = seqio.get_mixture_or_task("zh_cleaned_span_corruption")
    ex = next(sc_task.get_dataset({"inputs": 64, "targets": 14}, split="train",
                                  shuffle=False).as_numpy_iterator())
    vocab_size = sc_task.output_features["inputs"].vocabulary.vocab_size
    assert ex["inputs"].size == 64 and ex["targets"].size == 14
    assert ex["targets"][0] == vocab_size - 1  # <extra_id_0> opens the targets
    assert np.any(ex["inputs"] == vocab_size - 1)

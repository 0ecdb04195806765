"""Causal-LM seqio task: tokenized targets ending in EOS, long documents split without loss."""

import numpy as np
import pytest
import seqio

from zhchat.tasks import lm, tokenizer


def test_demo_task_from_gin(demo_task, spm_models):
    task = seqio.get_mixture_or_task(demo_task)
    assert set(task.splits) == {"train", "validation"}
    v = task.output_features["targets"].vocabulary
    assert v.vocab_size == 3100 and v.sentencepiece_model_file == spm_models["bpe"]
    ds = task.get_dataset({"targets": 64}, split="validation", shuffle=False)
    examples = list(ds.take(50).as_numpy_iterator())
    assert len(examples) == 50
    for ex in examples:
        t = ex["targets"]
        assert t.dtype == np.int32 and 2 <= len(t) <= 64 and t[-1] == 1
        assert (t[:-1] != 1).all() and (t > 2).sum() >= 1 and t.max() < 3000
    full = [ex for ex in examples if len(ex["targets"]) == 64]
    assert full, "the demo has documents longer than 63 tokens: some chunks must be full"


def test_long_documents_are_split_not_truncated(tmp_path, spm_models):
    text = "".join(f"第{i}句：天下大势，分久必合，合久必分。\n" for i in range(60)) + "完。"
    (tmp_path / "long.txt").write_text(text, encoding="utf-8")
    (tmp_path / "short.txt").write_text("短文。", encoding="utf-8")
    v = tokenizer.get_seqio_vocabulary(spm_models["unigram"])
    name = lm.register_lm_task(name="test_split_lm", files=[str(tmp_path / "*.txt")],
                               format="txt_file", vocabulary=v, validation_fraction=0.0)
    expected = {doc: list(v.encode(t)) for doc, t in (("long", text), ("short", "短文。"))}
    assert len(expected["long"]) > 200
    task = seqio.get_mixture_or_task(name)
    for length in (32, 100):
        chunks = [ex["targets"] for ex in
                  task.get_dataset({"targets": length}, split="train", shuffle=False)
                  .as_numpy_iterator()]
        assert all(len(c) <= length and c[-1] == 1 for c in chunks)
        n_long = -(-len(expected["long"]) // (length - 1))
        assert len(chunks) == n_long + 1  # files are read in sorted order: long.txt, short.txt
        joined = [int(t) for c in chunks[:n_long] for t in c[:-1]]
        assert joined == expected["long"]
        assert [int(t) for t in chunks[-1][:-1]] == expected["short"]


def test_split_by_hash_is_deterministic_and_sized():
    ids = [f"doc{i}" for i in range(20000)]
    splits = [lm.split_of(i, 0.05) for i in ids]
    assert splits == [lm.split_of(i, 0.05) for i in ids]
    assert 0.04 < splits.count("validation") / len(ids) < 0.06
    assert splits != [lm.split_of(i, 0.05, salt="other") for i in ids]


def test_registration_errors(tmp_path, spm_models):
    v = tokenizer.get_seqio_vocabulary(spm_models["unigram"])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        lm.register_lm_task(name="bad_lm", files=[str(tmp_path / "missing.jsonl")], vocabulary=v)
    with pytest.raises(ValueError, match="2 files but 1 formats"):
        lm.register_lm_task(name="bad_lm", files=["a", "b"], format=["jsonl"], vocabulary=v)
    assert lm.feature_lengths_arg("targets=512, inputs=128") == {"targets": 512, "inputs": 128}
    with pytest.raises(ValueError, match="bad feature length"):
        lm.feature_lengths_arg("targets:512")

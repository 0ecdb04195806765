"""Params-only restore: fine-tuning from another run (`train.init_checkpoint_dir`) and the infer CLI
(saved config.gin → model, checkpoint → params, prompts from stdin → completions)."""

from __future__ import annotations

import io
import json
import sys

import gin
import jax
import numpy as np
import pytest

from zhchat.gin_configs import cli as gin_cli
from zhchat.scripts import infer
from zhchat.trainer import train

VOCAB = 3200  # the 3000-piece test tokenizer + 100 sentinels, padded


def _train(run_dir, steps, **extra):
    gin.clear_config()
    gin_cli.parse_gin(["models/decoder_tiny.gin", "runs/pretrain.gin", "runs/synthetic_data.gin"],
                      [f"VOCAB_SIZE = {VOCAB}", f"RUN_DIR = '{run_dir}'", "BATCH_SIZE = 8",
                       "make_synthetic_iterator.seq_len = 16",
                       f"make_synthetic_iterator.vocab_size = {VOCAB}",
                       "train.log_every = 1", "train.progress_bar = False",
                       "train.async_checkpointing = False"]
                      + [f"train.{k} = {v!r}" for k, v in extra.items()])
    summary = train.train(num_steps=steps)
    gin.clear_config()
    return summary


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("pretrain") / "run")
    return run_dir, _train(run_dir, 3)


def test_init_from_checkpoint_restores_params_with_fresh_optimizer(pretrained, tmp_path):
    run_dir, summary = pretrained
    sft = _train(str(tmp_path / "sft"), 1, init_checkpoint_dir=f"{run_dir}/checkpoints",
                 checkpoint_every=0, keep_checkpoints=None)
    assert sft["step"] == 1  # step counter restarts: only the parameters came along
    # the fine-tune's first logged loss is the pretrained model's loss on that batch, not a fresh
    # init's (~ln V): the pretrained run had already moved below it
    fresh = _train(str(tmp_path / "fresh"), 1, checkpoint_every=0, keep_checkpoints=None)
    assert sft["history"][0]["loss"] != pytest.approx(fresh["history"][0]["loss"], abs=1e-6)
    before = jax.tree.leaves(summary["state"].params)
    # restoring the pretrained checkpoint's params gives exactly the pretrained final params
    from zhchat.trainer import checkpoints, partitioning
    model = _model()
    params, step = checkpoints.restore_params(f"{run_dir}/checkpoints", model,
                                              partitioning.Partitioner(), jax.random.key(0))
    assert step == 3
    for a, b in zip(before, jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _model():
    gin.clear_config()
    gin_cli.parse_gin(["models/decoder_tiny.gin"], [f"VOCAB_SIZE = {VOCAB}"])
    model = gin_cli.evaluate_macro("MODEL")
    gin.clear_config()
    return model


def test_infer_completes_prompts_from_stdin(pretrained, spm_models, monkeypatch, capsys, tmp_path):
    run_dir, _ = pretrained
    monkeypatch.setattr(sys, "stdin", io.StringIO("子曰：\n\n中国人民\n"))
    out = tmp_path / "out.jsonl"
    rc = infer.main([f"--run_dir={run_dir}", f"--vocab={spm_models['bpe']}", "--input=-",
                     f"--output={out}", "--max_decode_length=6", "--temperature=0.7",
                     "--top_k=5"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == ["子曰：", "中国人民"]
    assert all(isinstance(r["completion"], str) for r in rows)
    assert "skipped 1 blank line" in capsys.readouterr().err


def test_infer_rejects_a_bigger_vocabulary_and_a_missing_checkpoint(pretrained, spm_models,
                                                                    demo_data_dir, tmp_path, capsys):
    run_dir, _ = pretrained
    big = tmp_path / "big"
    from zhchat.tasks import tokenizer
    tokenizer.train_tokenizer(files=[str(demo_data_dir / "*.jsonl.gz")], format="jsonl",
                          model_prefix=str(big), vocab_size=3500, character_coverage=0.98,
                          input_sentence_size=6000, progress=False)
    rc = infer.main([f"--run_dir={run_dir}", f"--vocab={big}.model", "--input=-"])
    assert rc == 2 and "wrong vocabulary for this checkpoint" in capsys.readouterr().err
    rc = infer.main([f"--checkpoint_dir={tmp_path / 'none'}", "--gin_file=models/decoder_tiny.gin",
                     f"--vocab={spm_models['bpe']}", "--input=-"])
    assert rc == 2 and "no checkpoint" in capsys.readouterr().err


def test_restoring_into_another_architecture_fails_clearly(pretrained):
    from zhchat.trainer import checkpoints, partitioning
    run_dir, _ = pretrained
    gin.clear_config()
    gin_cli.parse_gin(["models/t5_tiny.gin"], [f"VOCAB_SIZE = {VOCAB}"])
    t5 = gin_cli.evaluate_macro("MODEL")
    gin.clear_config()
    with pytest.raises(ValueError, match="another architecture"):
        checkpoints.restore_params(f"{run_dir}/checkpoints", t5, partitioning.Partitioner(),
                                   jax.random.key(0))

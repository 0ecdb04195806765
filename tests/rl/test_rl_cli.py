"""The RL stages from their gin files on the shared preference pairs (research-only licence):
an SFT-stand-in checkpoint -> reward model (warm-started from it) -> PPO -> DPO, a few steps each."""

from __future__ import annotations

import json

import numpy as np

from zhchat.rl import cli
from zhchat.trainer import partitioning
from zhchat.trainer.train import train

from rl_helpers import tiny_decoder


def test_reward_ppo_dpo_from_gin(tmp_path, shared_data_dir, demo_data_dir):
    from zhchat.tasks import tokenizer as vocab_lib
    prefix = str(tmp_path / "bpe")
    vocab_lib.train_tokenizer(files=[str(demo_data_dir / "*.jsonl.gz")], format="jsonl",
                              model_prefix=prefix, vocab_size=3000, model_type="bpe",
                              character_coverage=0.98, input_sentence_size=6000, seed=0,
                              progress=False)
    vocab_size = 3200  # 3000 pieces + 100 sentinels, padded

    def batches(batch_size, seed, shard_index, shard_count):
        rng = np.random.default_rng(seed)
        while True:
            t = rng.integers(2, vocab_size, size=(batch_size, 16)).astype(np.int32)
            yield {"decoder_input_tokens": t, "decoder_target_tokens": t,
                   "decoder_loss_weights": np.ones_like(t, np.float32)}
    sft = str(tmp_path / "sft")
    train(model=tiny_decoder(vocab=vocab_size, layers=2), train_data=batches, num_steps=1,
          batch_size=8, run_dir=sft, partitioner=partitioning.Partitioner(), progress_bar=False)

    common = ["--gin_file=models/decoder_tiny.gin", f"--gin.VOCAB_SIZE={vocab_size}",
              f"--gin.VOCAB_PATH='{prefix}.model'", "--gin.DecoderConfig.emb_dim=32",
              "--gin.DecoderConfig.mlp_dim=64", "--gin.DecoderConfig.num_heads=2",
              "--gin.DecoderConfig.num_kv_heads=1", "--gin.DecoderConfig.head_dim=16",
              f"--gin.PREFERENCE_FILES=['{shared_data_dir / 'preference' / 'dpo_zh_500.jsonl'}']",
              "--gin.PreferenceExamples.max_prompt_len=128",
              "--gin.PreferenceExamples.max_response_len=32",
              f"--gin.SFT_CHECKPOINT='{sft}/checkpoints'", "--gin.BATCH_SIZE=16"]
    rm_dir = str(tmp_path / "rm")
    assert cli.main(["reward", "--gin_file=runs/reward.gin", *common, f"--gin.RUN_DIR='{rm_dir}'",
                     "--gin.NUM_STEPS=3", "--gin.train.eval_every=3"]) == 0
    rm_metrics = [json.loads(x) for x in open(f"{rm_dir}/metrics.jsonl")]
    assert any("eval/accuracy" in m and "eval/margin" in m for m in rm_metrics)

    assert cli.main(["ppo", "--gin_file=runs/ppo.gin", *common, f"--gin.RUN_DIR='{tmp_path / 'ppo'}'",
                     f"--gin.RM_CHECKPOINT='{rm_dir}/checkpoints'", "--gin.NUM_ITERATIONS=1",
                     "--gin.PPOConfig.max_decode_length=8", "--gin.PPOConfig.num_minibatches=2",
                     "--gin.PPOConfig.ppo_epochs=1"]) == 0
    ppo_metrics = [json.loads(x) for x in open(tmp_path / "ppo" / "metrics.jsonl")]
    assert len(ppo_metrics) == 1 and np.isfinite(ppo_metrics[0]["ppo/reward_mean"])

    assert cli.main(["dpo", "--gin_file=runs/dpo.gin", *common, f"--gin.RUN_DIR='{tmp_path / 'dpo'}'",
                     "--gin.NUM_STEPS=2", "--gin.train.eval_every=0"]) == 0
    dpo_metrics = [json.loads(x) for x in open(tmp_path / "dpo" / "metrics.jsonl")]
    # DPO starts at the SFT weights, which are also the reference: the loss starts at log 2
    assert abs(dpo_metrics[0]["train/loss"] - np.log(2)) < 0.05 and "train/margin" in dpo_metrics[0]


def test_a_missing_sft_checkpoint_is_one_line_and_exit_2(tmp_path, spm_models, capsys):
    """The reward stage names the missing SFT checkpoint in one line (no traceback) and exits 2
    before any model is built."""
    rc = cli.main(["reward", "--gin_file=runs/reward.gin", "--gin_file=models/decoder_tiny.gin",
                   "--gin.VOCAB_SIZE=3200", f"--gin.VOCAB_PATH='{spm_models['bpe']}'",
                   f"--gin.PREFERENCE_FILES=['{tmp_path / 'pairs.jsonl'}']",
                   f"--gin.SFT_CHECKPOINT='{tmp_path / 'sft' / 'checkpoints'}'",
                   f"--gin.RUN_DIR='{tmp_path / 'rm'}'"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1] == f"rl: error: no checkpoint in {tmp_path / 'sft' / 'checkpoints'}"
    assert not any("Traceback" in line for line in err) and not (tmp_path / "rm").exists()

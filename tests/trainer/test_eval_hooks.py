"""`train.eval_hooks`: called every `eval_every` steps with the current params; results are logged."""

import gin
import jax
import numpy as np

from zhchat.gin_configs import cli as gin_cli
from zhchat.trainer import train


def test_eval_hooks_run_every_eval_every_steps_with_current_params(tmp_path):
    seen = []

    def hook(step, params):
        norm = float(sum(np.square(np.asarray(x)).sum() for x in jax.tree.leaves(params)))
        seen.append((step, norm))
        return {"hook/param_sq_norm": norm}

    gin.clear_config()
    gin_cli.parse_gin(["models/decoder_tiny.gin", "runs/pretrain.gin", "runs/synthetic_data.gin"],
                      ["VOCAB_SIZE = 256", f"RUN_DIR = '{tmp_path}'", "BATCH_SIZE = 8",
                       "make_synthetic_iterator.seq_len = 16",
                       "make_synthetic_iterator.vocab_size = 256", "train.log_every = 1",
                       "train.progress_bar = False", "train.checkpoint_every = 0",
                       "train.keep_checkpoints = None", "train.eval_every = 2"])
    summary = train.train(num_steps=4, eval_hooks=[hook])
    gin.clear_config()
    assert [s for s, _ in seen] == [2, 4]
    assert seen[0][1] != seen[1][1]  # params moved between the two calls
    assert [e["step"] for e in summary["eval_history"]] == [2, 4]
    assert summary["eval_history"][1]["hook/param_sq_norm"] == seen[1][1]
    logged = (tmp_path / "metrics.jsonl").read_text()
    assert "hook/param_sq_norm" in logged

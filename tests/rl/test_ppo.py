"""PPO on a toy reward (count of a target token): the decoder policy's reward rises while the KL to
the reference stays bounded; metrics reach metrics.jsonl; a run resumes from its checkpoint,
and SIGTERM ends it with a final checkpoint."""

from __future__ import annotations

import json

import numpy as np

from ppo_helpers import prompts, run

METRICS = ("reward_mean", "kl", "entropy", "clip_fraction", "value_loss", "response_length",
           "approx_kl", "explained_variance", "rollout_tokens_per_sec", "train_tokens_per_sec")


def check_reward_rises(arch: str, tmp_path, iterations: int = 24) -> None:
    out = run(arch, iterations=iterations, run_dir=str(tmp_path), kl_coef=0.15, lr=2e-3)
    hist = out["history"]
    first = np.mean([h["reward_mean"] for h in hist[:4]])
    last = np.mean([h["reward_mean"] for h in hist[-4:]])
    assert last > first + 1.5, [round(h["reward_mean"], 2) for h in hist]   # of at most 8
    # the KL penalty keeps the policy well short of a collapsed one (about 8 · log 64 = 33 nats)
    assert max(h["kl"] for h in hist) < 25.0, [round(h["kl"], 2) for h in hist]
    assert hist[-1]["entropy"] < hist[0]["entropy"]
    for key in METRICS:
        assert np.isfinite(hist[-1][key]), key
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert len(lines) == iterations and all(f"ppo/{k}" in lines[-1] for k in METRICS)


def test_decoder_ppo_raises_toy_reward(tmp_path):
    # 32 iterations: from this init the reward climbs from ~0.1 to ~1.5 by iteration 24 and to
    # ~4 by 32 (of at most 8), with the KL still under 17 nats
    check_reward_rises("decoder", tmp_path, iterations=32)


def test_ppo_resumes_from_checkpoint(tmp_path):
    full = run("decoder", iterations=4, run_dir=str(tmp_path / "a"))
    run("decoder", iterations=2, run_dir=str(tmp_path / "b"))
    resumed = run("decoder", iterations=4, run_dir=str(tmp_path / "b"))
    # the frozen reference is rebuilt from the policy's starting parameters, not saved each step
    meta = (tmp_path / "b" / "checkpoints" / "4" / "state" / "_METADATA").read_text()
    assert '"policy"' in meta and '"critic"' in meta and '"reference"' not in meta
    assert [h["iteration"] for h in resumed["history"]] == [3, 4]
    for a, b in zip(full["history"][2:], resumed["history"]):
        np.testing.assert_allclose(a["reward_mean"], b["reward_mean"], rtol=1e-5)
        np.testing.assert_allclose(a["value_loss"], b["value_loss"], rtol=1e-4, atol=1e-6)


def test_sigterm_stops_ppo_with_a_final_checkpoint_and_the_restart_continues(tmp_path, capfd):
    """The scheduler's SIGTERM while iteration 3's prompts are read: the iteration under way
    finishes, a checkpoint of it is written (checkpoint_every=2 would not have), the handler is
    put back, and a restart continues with the next iteration."""
    import os
    import signal

    def preempting(batch_size, seed, shard_index, shard_count):
        for i, batch in enumerate(prompts(batch_size, seed, shard_index, shard_count)):
            if i == 2:  # the batch of iteration 3 (the first is read ahead)
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    out = run("decoder", iterations=8, run_dir=str(tmp_path), prompt_source=preempting)
    assert "SIGTERM: stopping at PPO iteration" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    stopped = out["iteration"]
    assert 3 <= stopped < 8 and stopped % 2 == 1  # odd: only the final checkpoint holds it
    kept = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert kept[-1] == stopped
    resumed = run("decoder", iterations=stopped + 1, run_dir=str(tmp_path))
    assert "restored PPO iteration" in capfd.readouterr().err
    assert [h["iteration"] for h in resumed["history"]] == [stopped + 1]

"""Reward model: learns a planted preference through trainer.train (decoder and T5), K-wise and
direct-score losses, warm start from backbone parameters, vocabulary mismatch error."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rl_helpers import PLANTED, synthetic_pairs, tiny_decoder, tiny_t5
from zhchat.tasks import preference_reader
from zhchat.rl import reward_model, warm_start
from zhchat.trainer import partitioning
from zhchat.trainer.train import train


def _batches(examples, batch_size, encdec, seed=0):
    rng = np.random.default_rng(seed)
    while True:
        idx = rng.choice(len(examples), batch_size, replace=False)
        yield preference_reader.collate([examples[i] for i in idx], encoder_decoder=encdec,
                                      prompt_len=6, response_len=8, num_responses=2)


def check_learns_planted_feature(arch, tmp_path):
    """RM training through trainer.train reaches >= 95% pairwise eval accuracy."""
    encdec = arch == "t5"
    rm = reward_model.RewardModel(backbone=tiny_t5() if encdec else tiny_decoder())
    out = train(model=rm, train_data=_batches(synthetic_pairs(512, 0), 32, encdec),
                eval_data=_batches(synthetic_pairs(256, 1), 32, encdec, seed=1),
                partitioner=partitioning.Partitioner(num_devices=1),
                optimizer=optax.adam(3e-3), num_steps=60, batch_size=32, eval_every=60,
                eval_steps=4, log_every=20, run_dir=str(tmp_path), progress_bar=False)
    ev = out["eval_history"][-1]
    assert ev["accuracy"] >= 0.95, out["eval_history"]
    assert ev["margin"] > 1.0
    assert out["history"][-1]["loss"] < 0.5 * out["history"][0]["loss"]
    # the trained model scores a chosen response above its rejected one, row by row
    batch = preference_reader.collate(synthetic_pairs(16, 2), encoder_decoder=encdec, prompt_len=6,
                                    response_len=8, num_responses=2)
    r = np.asarray(rm.score_batch(out["state"].params, batch))
    assert r.shape == (16, 2) and (r[:, 0] > r[:, 1]).mean() >= 0.9


def test_decoder_reward_model_learns_planted_feature(tmp_path):
    check_learns_planted_feature("decoder", tmp_path)


def test_ranking_and_direct_losses_use_all_pairs():
    rm = reward_model.RewardModel(backbone=tiny_decoder(layers=1), loss="ranking")
    ex = [{"prompt": [9, 10], "responses": [[11, 1], [12, 1], [13, 1]], "scores": [3.0, 2.0, 1.0]},
          {"prompt": [9], "responses": [[14, 1], [15, 1]], "scores": [1.0, 0.0]}]
    batch = preference_reader.collate(ex, encoder_decoder=False, prompt_len=4, response_len=4,
                                    num_responses=3)
    params = nn.unbox(rm.init_params(jax.random.key(0), {"decoder_input_tokens": batch["decoder_input_tokens"].shape}))
    r = np.asarray(jax.jit(rm.rewards)(params, batch))
    loss, m = jax.jit(rm.loss_fn)(params, batch, None)
    pairs = [(r[0, 0], r[0, 1]), (r[0, 0], r[0, 2]), (r[0, 1], r[0, 2]), (r[1, 0], r[1, 1])]
    np.testing.assert_allclose(float(loss), np.mean([np.logaddexp(0, b - a) for a, b in pairs]), rtol=1e-5)
    assert float(m["num_pairs"]) == 4
    direct = reward_model.RewardModel(backbone=rm.backbone, loss="direct")
    loss, _ = jax.jit(direct.loss_fn)(params, batch, None)
    err = [(r[0, 0] - 3) ** 2, (r[0, 1] - 2) ** 2, (r[0, 2] - 1) ** 2, (r[1, 0] - 1) ** 2, r[1, 1] ** 2]
    np.testing.assert_allclose(float(loss), np.mean(err), rtol=1e-5)
    pairwise = reward_model.RewardModel(backbone=rm.backbone)
    with pytest.raises(ValueError, match="K = 2"):
        pairwise.loss_fn(params, batch, None)


def test_reward_reads_last_real_token_under_left_padding():
    rm = reward_model.RewardModel(backbone=tiny_decoder(layers=1))
    params = nn.unbox(rm.init_params(jax.random.key(1), {"decoder_input_tokens": (1, 8)}))
    right = jnp.array([[9, 10, 11, 1, 0, 0, 0]])
    left = jnp.array([[0, 0, 0, 9, 10, 11, 1]])
    a = rm.rewards_masked(params, right, right != 0)
    b = rm.rewards_masked(params, left, left != 0)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_vocabulary_mismatch_is_a_clear_error():
    rm = reward_model.RewardModel(backbone=tiny_decoder(vocab=128))
    with pytest.raises(ValueError, match="vocabulary .* differs from the policy"):
        reward_model.check_same_vocabulary(tiny_decoder(vocab=64), rm)


def test_warm_start_puts_backbone_params_into_the_run(tmp_path):
    sft = tiny_decoder(layers=1)
    sft_params = nn.unbox(sft.init_params(jax.random.key(7), {"decoder_input_tokens": (1, 8)}))
    rm = reward_model.RewardModel(backbone=sft)
    part = partitioning.Partitioner(num_devices=1)
    tx = optax.adam(1e-3)
    warm_start.warm_start(str(tmp_path), rm, sft_params, optimizer=tx, partitioner=part,
                          batch_shapes={"decoder_input_tokens": (8, 2, 20)}, subtree="backbone")
    out = train(model=rm, train_data=_batches(synthetic_pairs(64, 0), 8, False), partitioner=part,
                optimizer=tx, num_steps=1, batch_size=8, run_dir=str(tmp_path), progress_bar=False)
    emb = out["state"].params["backbone"]["token_embedder"]["embedding"]
    ref = sft_params["token_embedder"]["embedding"]
    assert float(jnp.max(jnp.abs(emb - ref))) < 5e-3  # one Adam step of 1e-3 away from the SFT weights
    with pytest.raises(ValueError, match="do not match"):
        warm_start.warm_start(str(tmp_path / "b"), rm, {"x": jnp.zeros(3)}, optimizer=tx,
                              partitioner=part, batch_shapes={"decoder_input_tokens": (8, 2, 20)},
                              subtree="backbone")

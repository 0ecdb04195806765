"""PPO raises the toy reward for the T5 policy too."""

from test_ppo import check_reward_rises


def test_t5_ppo_raises_toy_reward(tmp_path):
    check_reward_rises("t5", tmp_path)

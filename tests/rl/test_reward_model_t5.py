"""The T5 reward model (decoder final position) learns the planted preference too."""

from test_reward_model import check_learns_planted_feature


def test_t5_reward_model_learns_planted_feature(tmp_path):
    check_learns_planted_feature("t5", tmp_path)

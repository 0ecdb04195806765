"""DPO on the T5 policy."""

from test_dpo import check_dpo


def test_t5_dpo_raises_margin():
    check_dpo("t5")

"""The trainer's throughput metrics use the one FLOP/MFU definition in models/flops.py."""

import pytest

from zhchat.models import flops
from zhchat.trainer import metrics


def test_throughput_numbers():
    got = metrics.throughput(tokens=4096, seconds=0.5, flops_per_token=1e9, num_devices=2,
                             peak_flops_per_device=1e13)
    assert got["tokens_per_sec"] == pytest.approx(8192)
    assert got["tokens_per_sec_per_device"] == pytest.approx(4096)
    assert got["tflops_per_device"] == pytest.approx(4096 * 1e9 / 0.5 / 2 / 1e12)
    assert got["mfu"] == pytest.approx(flops.mfu(4096 * 1e9, 0.5, num_devices=2,
                                                 peak_flops_per_device=1e13))
    assert got["mfu"] == pytest.approx(0.4096)
    assert metrics.throughput(tokens=1, seconds=1, flops_per_token=989e12,
                              num_devices=1)["mfu"] == pytest.approx(1.0)  # H100/H200 bf16 peak

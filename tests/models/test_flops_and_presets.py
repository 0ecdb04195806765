"""Parameter counts of the gin presets (LLaMA paper sizes) and the PaLM FLOP counter."""

import dataclasses

import pytest

from tests.conftest import model_from_preset
from zhchat.models import flops
from zhchat.models.decoder import DecoderConfig
from zhchat.models.decoder_model import DecoderOnlyModel


def _model_from_preset(name: str) -> DecoderOnlyModel:
    return model_from_preset(f"decoder_{name}")


@pytest.mark.parametrize("name,expected", [("7b", 6.7e9), ("13b", 13.0e9), ("65b", 65.2e9)])
def test_llama_preset_parameter_counts(name, expected):
    model = _model_from_preset(name)
    assert model.config.scan_layers and model.config.dtype == "bfloat16"
    counted = model.num_params()
    assert abs(counted - expected) / expected < 0.02, (name, counted)
    assert model.num_params_from_shapes() == counted  # eval_shape of the real module, no allocation


@pytest.mark.parametrize("name,low,high", [("tiny", 1e6, 5e6), ("100m", 0.09e9, 0.14e9),
                                           ("1b", 0.95e9, 1.2e9)])
def test_small_presets_parse_and_count(name, low, high):
    model = _model_from_preset(name)
    assert low < model.num_params() < high
    assert model.num_params_from_shapes() == model.num_params()


def test_flop_counter_equals_hand_count():
    cfg = DecoderConfig(vocab_size=100, emb_dim=16, num_layers=3, num_heads=4, num_kv_heads=2,
                        head_dim=4, mlp_dim=32, dtype="float32")
    # Per layer: q 16*16, k 16*8, v 16*8, out 16*16, mlp 3*16*32  -> 256+128+128+256+1536 = 2304.
    per_layer = 2304
    n = 3 * per_layer + 100 * 16  # + LM head
    assert flops.matmul_params(cfg) == n
    assert flops.count_params(cfg) == 3 * (per_layer + 32) + 2 * 100 * 16 + 16
    assert flops.count_params(dataclasses.replace(cfg, tie_embeddings=True)) == \
        3 * (per_layer + 32) + 100 * 16 + 16
    seq = 64
    full_attn = 12 * 3 * 4 * 4 * seq
    assert flops.attention_flops(cfg, seq, causal=False) == full_attn
    assert flops.attention_flops(cfg, seq) == full_attn / 2
    assert flops.training_flops_per_token(cfg, seq) == 6 * n + full_attn / 2
    model = DecoderOnlyModel(config=cfg)
    assert model.flops_per_token(seq) == 6 * n + full_attn / 2
    assert model.num_params() == model.num_params_from_shapes()
    # 1e15 FLOPs in 2 s on 2 devices of peak 1e15 -> 25 %.
    assert flops.mfu(1e15, 2.0, num_devices=2, peak_flops_per_device=1e15) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        flops.mfu(1.0, 0.0)


def test_model_modules_import_no_tensorflow_or_seqio():
    import os
    import subprocess
    import sys

    code = ("import sys, zhchat.models.decoder_model, zhchat.models.decoding, zhchat.models.flops; "
            "bad = [m for m in ('tensorflow', 'seqio', 'tensorflow_datasets') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-2000:]

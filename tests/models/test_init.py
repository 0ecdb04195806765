"""Initialisation: an untrained model's loss on random tokens is ln(vocab) (within 0.3 nats), and the
parameters follow the documented scheme (HF Llama's std 0.02; T5X/HF T5's fan-in kernels; readouts
at 0.5 / sqrt(width)). The HF-parity run in BENCHMARKS.md ("Initialisation") is why."""

import dataclasses
import math
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import model_from_preset
from zhchat.models.decoder import DecoderConfig
from zhchat.models.decoder_model import DecoderOnlyModel
from zhchat.models.encdec_model import EncoderDecoderModel
from zhchat.models.t5 import T5Config

VOCAB = 32128
TINY_DECODER = dict(vocab_size=VOCAB, emb_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16, mlp_dim=256, dtype="float32", max_len=128)
TINY_T5 = dict(vocab_size=VOCAB, d_model=64, num_heads=4, head_dim=16, d_ff=128,
               num_encoder_layers=2, num_decoder_layers=2, dtype="float32")


def _random_tokens(key, shape):
    return jax.random.randint(jax.random.PRNGKey(key), shape, 3, VOCAB)


def _decoder_ce(model: DecoderOnlyModel, length: int = 64) -> float:
    params = nn.unbox(model.init_params(jax.random.PRNGKey(0), {"decoder_input_tokens": (4, length)}))
    tokens = _random_tokens(1, (4, length + 1))
    batch = {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
             "decoder_loss_weights": jnp.ones((4, length))}
    return float(model.loss_fn(params, batch, None)[1]["cross_entropy"])


def _t5_ce(model: EncoderDecoderModel) -> float:
    shapes = {"encoder_input_tokens": (4, 48), "decoder_input_tokens": (4, 16)}
    params = nn.unbox(model.init_params(jax.random.PRNGKey(0), shapes))
    targets = _random_tokens(2, (4, 17))
    batch = {"encoder_input_tokens": _random_tokens(1, (4, 48)),
             "decoder_input_tokens": targets[:, :-1], "decoder_target_tokens": targets[:, 1:],
             "decoder_loss_weights": jnp.ones((4, 16))}
    return float(model.loss_fn(params, batch, None)[1]["cross_entropy"])


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("residual_init", ["none", "depth"])
def test_tiny_decoder_initial_loss_is_ln_vocab(tie, residual_init):
    cfg = DecoderConfig(tie_embeddings=tie, residual_init=residual_init, **TINY_DECODER)
    assert _decoder_ce(DecoderOnlyModel(config=cfg)) == pytest.approx(math.log(VOCAB), abs=0.3)


def test_decoder_100m_preset_initial_loss_is_ln_vocab():
    model = model_from_preset("decoder_100m")
    model = DecoderOnlyModel(config=dataclasses.replace(model.config, dtype="float32"))
    assert _decoder_ce(model, length=32) == pytest.approx(math.log(VOCAB), abs=0.3)


@pytest.mark.parametrize("embedding_std", [1.0, 0.02])
def test_tiny_t5_initial_loss_is_ln_vocab(embedding_std):
    cfg = T5Config(embedding_init_std=embedding_std, **TINY_T5)
    assert _t5_ce(EncoderDecoderModel(config=cfg)) == pytest.approx(math.log(VOCAB), abs=0.3)


def test_t5_small_preset_initial_loss_is_ln_vocab():
    model = model_from_preset("t5_small")
    cfg = dataclasses.replace(model.config, dtype="float32", scan_layers=False,
                              remat_policy="none")
    assert _t5_ce(EncoderDecoderModel(config=cfg)) == pytest.approx(math.log(VOCAB), abs=0.3)


def _std(x) -> float:
    return float(np.std(np.asarray(x)))


def test_decoder_parameters_follow_the_documented_scheme():
    cfg = DecoderConfig(tie_embeddings=False, residual_init="depth", **TINY_DECODER)
    params = nn.unbox(DecoderOnlyModel(config=cfg).init_params(
        jax.random.PRNGKey(0), {"decoder_input_tokens": (1, 8)}))
    assert _std(params["token_embedder"]["embedding"]) == pytest.approx(0.02, rel=0.02)
    layer = params["layers_0"]
    for name in ("query", "key", "value"):
        assert _std(layer["attention"][name]["kernel"]) == pytest.approx(0.02, rel=0.05)
    for name in ("wi_0", "wi_1"):
        assert _std(layer["mlp"][name]["kernel"]) == pytest.approx(0.02, rel=0.05)
    depth = 0.02 / math.sqrt(2 * cfg.num_layers)
    assert _std(layer["attention"]["out"]["kernel"]) == pytest.approx(depth, rel=0.05)
    assert _std(layer["mlp"]["wo"]["kernel"]) == pytest.approx(depth, rel=0.05)
    assert _std(params["logits_dense"]["kernel"]) == pytest.approx(0.5 / math.sqrt(64), rel=0.02)
    assert float(np.asarray(layer["pre_attention_norm"]["scale"]).min()) == 1.0


def test_t5_parameters_follow_the_documented_scheme():
    params = nn.unbox(EncoderDecoderModel(config=T5Config(embedding_init_std=0.02, **TINY_T5))
                      .init_params(jax.random.PRNGKey(0), {"encoder_input_tokens": (1, 8),
                                                           "decoder_input_tokens": (1, 8)}))
    assert _std(params["token_embedder"]["embedding"]) == pytest.approx(0.02, rel=0.02)
    assert _std(params["logits_dense"]["kernel"]) == pytest.approx(0.5 / math.sqrt(64), rel=0.02)
    wo = [v for k, v in params.items() if k.startswith("encoder")][0]["mlp"]["wo"]["kernel"]
    assert _std(wo) == pytest.approx(1 / math.sqrt(128), rel=0.1)  # fan-in, as T5X / HF T5


def test_bad_init_settings_are_rejected():
    with pytest.raises(ValueError, match="residual_init"):
        DecoderConfig(residual_init="gpt2", **TINY_DECODER)
    with pytest.raises(ValueError, match="init_std"):
        DecoderConfig(init_std=0.0, **TINY_DECODER)
    with pytest.raises(ValueError, match="embedding_init_std"):
        T5Config(embedding_init_std=-1.0, **TINY_T5)

"""Tiny models and synthetic data for the RL tests (a vocabulary of 64 synthetic ids, fp32)."""

from __future__ import annotations

import numpy as np

VOCAB = 64
PLANTED = 5      # the token a "chosen" response carries in the reward-model test
TARGET = 7       # the token the toy PPO reward counts


def tiny_decoder(vocab: int = VOCAB, layers: int = 2):
    from zhchat.models.decoder import DecoderConfig
    from zhchat.models.decoder_model import DecoderOnlyModel
    return DecoderOnlyModel(config=DecoderConfig(
        vocab_size=vocab, emb_dim=32, num_layers=layers, num_heads=2, num_kv_heads=1, head_dim=16,
        mlp_dim=64, dtype="float32", max_len=64))


def tiny_t5(vocab: int = VOCAB):
    from zhchat.models.encdec_model import EncoderDecoderModel
    from zhchat.models.t5 import T5Config
    return EncoderDecoderModel(config=T5Config(
        vocab_size=vocab, d_model=32, num_heads=2, head_dim=16, d_ff=64, num_encoder_layers=1,
        num_decoder_layers=1, dtype="float32"))


def synthetic_pairs(n: int, seed: int, *, prompt_len: int = 6, response_len: int = 8) -> list[dict]:
    """Preference examples (tasks/preference_reader.py's form) whose chosen response carries PLANTED
    once and whose rejected one never does; both end with EOS = 1."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = rng.integers(8, VOCAB, size=rng.integers(2, prompt_len + 1)).tolist()
        length = int(rng.integers(3, response_len))
        chosen = rng.integers(8, VOCAB, size=length).tolist()
        chosen[int(rng.integers(0, length))] = PLANTED
        rejected = rng.integers(8, VOCAB, size=length).tolist()
        out.append({"prompt": prompt, "responses": [chosen + [1], rejected + [1]], "scores": None})
    return out

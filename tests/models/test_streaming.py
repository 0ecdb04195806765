"""models/streaming.py: a greedy stream equals the model's own batched greedy decoding token for
token (decoder and T5, prompts of several lengths, one compile per bucket), sampling is seeded,
stop ids end the stream before they are yielded, and bad arguments are refused."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zhchat.models import streaming, t5
from zhchat.models.decoder import DecoderConfig
from zhchat.models.decoder_model import DecoderOnlyModel
from zhchat.models.encdec_model import EncoderDecoderModel

DEC = DecoderConfig(vocab_size=61, emb_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=64, dtype="float32", max_len=128)
T5 = t5.T5Config(vocab_size=64, d_model=32, num_heads=4, head_dim=8, d_ff=64,
                 num_encoder_layers=2, num_decoder_layers=2, dtype="float32")
PROMPTS = [[5, 9, 14], [7, 3, 22, 40, 11, 2, 8, 30, 17], list(range(2, 40))]


@pytest.fixture(scope="module")
def decoder():
    model = DecoderOnlyModel(config=DEC, eos_id=1)
    return model, nn.unbox(model.init_params(jax.random.PRNGKey(0), {"decoder_input_tokens": (1, 8)}))


@pytest.fixture(scope="module")
def encdec():
    model = EncoderDecoderModel(config=T5, z_loss=0.0)
    shapes = {"encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 8)}
    return model, nn.unbox(model.init_params(jax.random.PRNGKey(1), shapes))


def _batched_greedy(model, params, prompt, n):
    key = "encoder_input_tokens" if hasattr(model, "encode") else "decoder_input_tokens"
    out = model.predict_batch(params, {key: jnp.asarray([prompt], jnp.int32)}, jax.random.key(0),
                              max_decode_length=n)
    return np.asarray(out)[0].tolist()


@pytest.mark.parametrize("family", ["decoder", "encdec"])
def test_greedy_stream_equals_batched_greedy(family, request):
    model, params = request.getfixturevalue(family)
    streamer = streaming.TokenStreamer(model, temperature=0.0)
    for prompt in PROMPTS:
        got = list(streamer.stream(params, prompt, jax.random.key(3), max_new_tokens=10,
                                   stop_ids=[model.eos_id]))
        want = _batched_greedy(model, params, prompt, 10)
        eos = [i for i, t in enumerate(want) if t == model.eos_id]
        want = want[:eos[0]] if eos else want
        assert got == want[:len(got)] and len(got) == len(want)
    assert len(streamer._fns) == 2  # prompts of 3 and 9 share the 32-wide bucket, 38 -> 64


def test_stop_ids_end_the_stream_before_they_are_yielded(decoder):
    model, params = decoder
    streamer = streaming.TokenStreamer(model, temperature=0.0)
    full = list(streamer.stream(params, PROMPTS[1], jax.random.key(0), max_new_tokens=12))
    assert len(full) >= 3
    cut = list(streamer.stream(params, PROMPTS[1], jax.random.key(0), max_new_tokens=12,
                               stop_ids=[full[2]]))
    assert cut == full[:full.index(full[2])]


def test_sampling_is_seeded_and_top_k_1_is_greedy(decoder):
    model, params = decoder
    hot = streaming.TokenStreamer(model, temperature=1.0)
    a = list(hot.stream(params, PROMPTS[0], jax.random.key(5), max_new_tokens=16))
    b = list(hot.stream(params, PROMPTS[0], jax.random.key(5), max_new_tokens=16))
    c = list(hot.stream(params, PROMPTS[0], jax.random.key(6), max_new_tokens=16))
    assert a == b and a != c
    top1 = streaming.TokenStreamer(model, temperature=1.0, top_k=1)
    greedy = streaming.TokenStreamer(model, temperature=0.0)
    assert list(top1.stream(params, PROMPTS[0], jax.random.key(7), max_new_tokens=8)) == \
        list(greedy.stream(params, PROMPTS[0], jax.random.key(0), max_new_tokens=8))


def test_bad_arguments(decoder):
    model, params = decoder
    streamer = streaming.TokenStreamer(model)
    with pytest.raises(ValueError, match="empty prompt"):
        next(streamer.stream(params, [], jax.random.key(0), max_new_tokens=4))
    with pytest.raises(ValueError, match="max_len"):
        next(streamer.stream(params, PROMPTS[0], jax.random.key(0), max_new_tokens=126))
    with pytest.raises(ValueError, match="top_p"):
        streaming.TokenStreamer(model, top_p=0.0)

"""Encoder-decoder decoding: cached steps == full recompute, beam 1 == greedy, sampling filters, beams."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zhchat.models import encdec_decoding, t5
from zhchat.models.encdec_model import EncoderDecoderModel

VOCAB = 64
LENGTH = 8


@pytest.fixture(scope="module")
def setup():
    cfg = t5.T5Config(vocab_size=VOCAB, d_model=32, num_heads=4, head_dim=8, d_ff=64,
                      num_encoder_layers=2, num_decoder_layers=2, dtype="float32")
    model = EncoderDecoderModel(config=cfg, eos_id=1)
    shapes = {"encoder_input_tokens": (3, 10), "decoder_input_tokens": (3, LENGTH)}
    params = nn.unbox(jax.jit(lambda r: model.init_params(r, shapes))(jax.random.PRNGKey(3)))
    # sharpen the output layer so that greedy paths are decisive
    params["logits_dense"]["kernel"] = params["logits_dense"]["kernel"] * 4.0
    rng = np.random.default_rng(0)
    enc = rng.integers(2, VOCAB, size=(3, 10)).astype(np.int32)
    enc[1, 6:] = 0  # a padded row
    enc[2, 3:] = 0
    # EOS: the token these random weights emit most often among those some greedy rows never
    # emit, so rows stop at different steps (chosen from the weights, not hard-coded)
    greedy, _ = _full_greedy(model, params, enc)
    in_rows = np.array([[(row == tok).any() for row in greedy] for tok in range(VOCAB)])
    counts = np.where(in_rows.any(1) & ~in_rows.all(1), np.bincount(greedy.ravel(), minlength=VOCAB), -1)
    assert counts.max() > 0
    return EncoderDecoderModel(config=cfg, eos_id=int(np.argmax(counts))), params, enc


def _full_greedy(model, params, enc):
    """Reference: recompute the whole decoder for every new token (no cache)."""
    apply = jax.jit(model.module.apply)
    out = np.zeros((enc.shape[0], LENGTH), np.int32)
    step_logits = []
    dec_in = np.zeros((enc.shape[0], LENGTH), np.int32)
    for t in range(LENGTH):
        logits = np.asarray(apply({"params": params}, enc, dec_in, (enc > 0).astype(np.int32)))
        out[:, t] = logits[:, t].argmax(-1)
        step_logits.append(logits[:, t])
        if t + 1 < LENGTH:
            dec_in[:, t + 1] = out[:, t]
    return out, np.stack(step_logits, 1)


def test_cached_decoding_equals_full_recompute(setup):
    model, params, enc = setup
    ref_tokens, ref_logits = _full_greedy(model, params, enc)

    @jax.jit
    def cached_logits(params, enc, tokens):
        segments = (enc > 0).astype(jnp.int32)
        cache = model.init_cache(params, model.encode(params, enc), segments, LENGTH)
        step = model.step_fn(params, segments, LENGTH)
        feed = jnp.concatenate([jnp.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)

        def body(cache, tok):
            logits, cache = step(cache, tok[:, None])
            return cache, logits
        _, logits = jax.lax.scan(body, cache, feed.T)
        return jnp.swapaxes(logits, 0, 1)

    np.testing.assert_allclose(cached_logits(params, enc, ref_tokens), ref_logits, atol=1e-4, rtol=1e-4)
    greedy = np.asarray(model.predict_batch(params, {"encoder_input_tokens": enc}, None,
                                            max_decode_length=LENGTH))
    EOS = model.eos_id
    for row, ref in zip(greedy, ref_tokens):  # identical up to (and including) the first EOS
        stop = int(np.argmax(ref == EOS)) + 1 if (ref == EOS).any() else LENGTH
        np.testing.assert_array_equal(row[:stop], ref[:stop])
        assert (row[stop:] == 0).all()
    assert 0 < (greedy == EOS).any(1).sum() < len(greedy)  # some rows stopped early, some did not


def test_batched_rows_equal_single_rows(setup):
    model, params, enc = setup
    batched = np.asarray(model.predict_batch(params, {"encoder_input_tokens": enc}, None,
                                             max_decode_length=LENGTH))
    for i in range(enc.shape[0]):  # padding and the other rows do not change a row's output
        single = model.predict_batch(params, {"encoder_input_tokens": enc[i:i + 1]}, None,
                                     max_decode_length=LENGTH)
        np.testing.assert_array_equal(batched[i], np.asarray(single)[0])


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_one_equals_greedy(setup, alpha):
    model, params, enc = setup
    greedy = np.asarray(model.predict_batch(params, {"encoder_input_tokens": enc}, None,
                                            max_decode_length=LENGTH))
    beam = np.asarray(model.predict_batch(params, {"encoder_input_tokens": enc}, None,
                                          max_decode_length=LENGTH, beam_size=1, alpha=alpha))
    if alpha > 0:  # with a length penalty a longer hypothesis may win; compare only EOS-free rows
        keep = ~(greedy == model.eos_id).any(1)
        greedy, beam = greedy[keep], beam[keep]
    np.testing.assert_array_equal(beam, greedy)


def test_beam_search_scores_are_sorted_and_exact(setup):
    model, params, enc = setup
    seqs, scores = model.predict_batch(params, {"encoder_input_tokens": enc}, None,
                                       max_decode_length=LENGTH, beam_size=4, alpha=0.6,
                                       return_all_beams=True)
    seqs, scores, EOS = np.asarray(seqs), np.asarray(scores), model.eos_id
    assert seqs.shape == (3, 4, LENGTH) and scores.shape == (3, 4)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    # each score is the teacher-forced log-probability of its sequence over the length penalty
    flat = seqs.reshape(12, LENGTH)
    lengths = np.array([int(np.argmax(s == EOS)) + 1 if (s == EOS).any() else LENGTH for s in flat])
    assert (lengths < LENGTH).any()  # finished hypotheses are among the beams
    weights = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.float32)
    batch = {"encoder_input_tokens": np.repeat(enc, 4, axis=0),
             "decoder_input_tokens": np.concatenate([np.zeros((12, 1), np.int32), flat[:, :-1]], 1),
             "decoder_target_tokens": flat, "decoder_loss_weights": weights}
    logp = np.asarray(jax.jit(model.score_batch)(params, batch))
    penalty = ((5.0 + lengths) / 6.0) ** 0.6
    np.testing.assert_allclose((logp / penalty).reshape(3, 4), scores, rtol=1e-4, atol=1e-4)
    # the best beam is at least as likely as the greedy sequence (scored the same way)
    one_seqs, one_scores = model.predict_batch(params, {"encoder_input_tokens": enc}, None,
                                               max_decode_length=LENGTH, beam_size=1, alpha=0.6,
                                               return_all_beams=True)
    assert np.asarray(one_seqs).shape == (3, 1, LENGTH)
    assert (scores[:, 0] >= np.asarray(one_scores)[:, 0] - 1e-5).all()


def test_sampling_filters_and_reproducibility(setup):
    model, params, enc = setup
    batch = {"encoder_input_tokens": enc}
    greedy = np.asarray(model.predict_batch(params, batch, None, max_decode_length=LENGTH))
    top1 = np.asarray(model.predict_batch(params, batch, jax.random.PRNGKey(5), max_decode_length=LENGTH,
                                          temperature=1.0, top_k=1))
    np.testing.assert_array_equal(top1, greedy)  # top-k 1 is greedy
    tiny_p = np.asarray(model.predict_batch(params, batch, jax.random.PRNGKey(5),
                                            max_decode_length=LENGTH, temperature=1.0, top_p=1e-6))
    np.testing.assert_array_equal(tiny_p, greedy)  # a tiny nucleus keeps only the top token
    a = model.predict_batch(params, batch, jax.random.PRNGKey(7), max_decode_length=LENGTH,
                            temperature=2.0)
    b = model.predict_batch(params, batch, jax.random.PRNGKey(7), max_decode_length=LENGTH,
                            temperature=2.0)
    c = model.predict_batch(params, batch, jax.random.PRNGKey(8), max_decode_length=LENGTH,
                            temperature=2.0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    tokens, log_probs = model.predict_batch(params, batch, jax.random.PRNGKey(7),
                                            max_decode_length=LENGTH, temperature=2.0,
                                            return_log_probs=True)
    np.testing.assert_array_equal(tokens, a)
    assert (np.asarray(log_probs)[np.asarray(tokens) != 0] < 0).all()


def test_length_penalty_and_bad_options():
    np.testing.assert_allclose(encdec_decoding.length_penalty(7, 0.6), (12 / 6) ** 0.6)
    assert float(encdec_decoding.length_penalty(30, 0.0)) == 1.0
    model = EncoderDecoderModel(config=t5.T5Config(vocab_size=VOCAB, d_model=8, num_heads=1, head_dim=8,
                                                   d_ff=8, num_encoder_layers=1,
                                                   num_decoder_layers=1))
    with pytest.raises(TypeError, match="num_beams"):
        model.predict_batch({}, {"encoder_input_tokens": np.ones((1, 2), np.int32)}, None, num_beams=2)
    with pytest.raises(ValueError, match="beam_size"):
        model.predict_batch({}, {"encoder_input_tokens": np.ones((1, 2), np.int32)}, None, beam_size=0)

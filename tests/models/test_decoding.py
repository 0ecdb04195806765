"""KV-cache sampling: parity with full recomputation, sampling filters, EOS handling, log-probs."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zhchat.models import decoding
from zhchat.models.decoder import DecoderConfig
from zhchat.models.decoder_model import DecoderOnlyModel

CFG = DecoderConfig(vocab_size=61, emb_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=64, dtype="float32")
# Row 0 right-padded (3 tokens), row 1 full (5), row 2 left-padded (2), row 3 padding in the middle.
PROMPTS = jnp.array([[5, 9, 14, 0, 0], [7, 3, 22, 40, 11], [0, 0, 0, 31, 8], [12, 0, 0, 6, 0]])


def _model_and_params(cfg=CFG, seed=0):
    model = DecoderOnlyModel(config=cfg, eos_id=1)
    return model, nn.unbox(model.init_params(jax.random.PRNGKey(seed), {"decoder_input_tokens": (1, 8)}))


def _greedy_by_recompute(model, params, prompts, steps, prefix_lm=False):
    """Greedy decoding that re-runs the whole (prompt + generated) sequence at every step.

    Rows are kept at one length (trailing slots are padding, segment 0) so one compile serves all steps.
    """
    batch, plen = prompts.shape
    seqs = np.zeros((batch, plen + steps), np.int32)
    seqs[:, :plen] = np.asarray(prompts)
    valid = seqs != 0
    prefix = jnp.asarray(valid.astype(np.int32)) if prefix_lm else None  # the prompt is the prefix
    forward = jax.jit(lambda t, s, p: model.module.apply({"params": params}, t, segment_ids=s,
                                                         positions=p, prefix=prefix))
    for t in range(steps):
        pos = np.maximum(np.cumsum(valid, 1) - 1, 0)
        logits = forward(jnp.asarray(seqs), jnp.asarray(valid.astype(np.int32)), jnp.asarray(pos))
        last = np.max(np.where(valid, np.arange(seqs.shape[1]), 0), axis=1)  # last real token
        seqs[:, plen + t] = np.asarray(jnp.argmax(logits[np.arange(batch), last], -1))
        valid[:, plen + t] = True
    return seqs[:, plen:]


def test_kv_cache_greedy_equals_full_recompute_with_mixed_padding():
    model, params = _model_and_params()
    model.eos_id = None  # run every step so all tokens are compared
    got = model.predict_batch(params, {"decoder_input_tokens": PROMPTS}, jax.random.PRNGKey(0),
                              max_decode_length=6)
    want = _greedy_by_recompute(model, params, PROMPTS, 6)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert len(set(want.ravel().tolist())) > 3  # a random model, not a constant output
    # The same from scanned (stacked) parameters.
    scanned = DecoderOnlyModel(config=dataclasses.replace(CFG, scan_layers=True), eos_id=None)
    stacked = dict(params)
    stacked["layers"] = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]),
                                               stacked.pop("layers_0"), stacked.pop("layers_1"))
    got_scan = scanned.predict_batch(stacked, {"decoder_input_tokens": PROMPTS},
                                     jax.random.PRNGKey(0), max_decode_length=6)
    np.testing.assert_array_equal(np.asarray(got_scan), want)
    # decoding runs the layers unrolled: one cache entry per layer, nothing stacked to copy
    cache = scanned.init_cache(2, 8)
    assert sorted(cache) == sorted(f"layers_{i}" for i in range(CFG.num_layers))


def test_prefix_lm_prompt_decoding_equals_full_recompute():
    model, params = _model_and_params(seed=3)
    model.eos_id = None
    batch = {"decoder_input_tokens": PROMPTS, "decoder_causal_attention": PROMPTS != 0}
    got = model.predict_batch(params, batch, jax.random.PRNGKey(0), max_decode_length=4)
    np.testing.assert_array_equal(got, _greedy_by_recompute(model, params, PROMPTS, 4, prefix_lm=True))
    causal = model.predict_batch(params, {"decoder_input_tokens": PROMPTS}, jax.random.PRNGKey(0),
                                 max_decode_length=4)
    assert not np.array_equal(got, causal)  # the bidirectional prompt changes the continuation


def test_top_k_one_is_greedy_and_sampling_is_reproducible():
    model, params = _model_and_params(seed=1)
    batch = {"decoder_input_tokens": PROMPTS}
    greedy = model.predict_batch(params, batch, jax.random.PRNGKey(0), max_decode_length=5)
    top1 = model.predict_batch(params, batch, jax.random.PRNGKey(7), max_decode_length=5,
                               temperature=1.0, top_k=1)
    np.testing.assert_array_equal(top1, greedy)
    kw = dict(max_decode_length=5, temperature=1.3, top_p=0.9)
    a = model.predict_batch(params, batch, jax.random.PRNGKey(3), **kw)
    b = model.predict_batch(params, batch, jax.random.PRNGKey(3), **kw)
    c = model.predict_batch(params, batch, jax.random.PRNGKey(4), **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_top_k_and_top_p_never_sample_outside_the_kept_set():
    rng = np.random.RandomState(0)
    logits = jnp.asarray(np.tile(rng.randn(1, 50) * 3, (4000, 1)), jnp.float32)
    top5 = set(np.argsort(-np.asarray(logits[0]))[:5].tolist())
    draws = decoding.sample_logits(logits, jax.random.PRNGKey(0), temperature=2.0, top_k=5)
    assert set(np.asarray(draws).tolist()) == top5  # all 5 seen, nothing else
    probs = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    draws = np.asarray(decoding.sample_logits(probs, jax.random.PRNGKey(1), temperature=1.0,
                                              top_p=0.7))
    assert set(draws.tolist()) == {0, 1}  # mass before token 2 is 0.8 >= 0.7
    frac0 = np.mean(draws == 0)
    assert abs(frac0 - 0.5 / 0.8) < 0.03  # renormalised over the nucleus
    filtered = decoding.filter_logits(probs[:1], top_k=3, top_p=0.99)
    assert np.isfinite(np.asarray(filtered)).all() and float(filtered[0, 3]) < -1e30


def test_eos_stops_each_row_and_pads_after_it():
    vocab, eos = 8, 1

    def step_fn(cache, tokens, positions, kv_mask, prefix):  # next token = last + 1, 7 -> EOS
        nxt = jnp.where(tokens >= 7, eos, tokens + 1)
        return 10.0 * jax.nn.one_hot(nxt, vocab), cache

    prompts = jnp.array([[3, 5, 0], [0, 2, 2]])
    tokens, log_probs = decoding.decode(step_fn, {}, prompts, jax.random.PRNGKey(0),
                                        max_decode_length=6, eos_id=eos, return_log_probs=True)
    np.testing.assert_array_equal(tokens, [[6, 7, 1, 0, 0, 0], [3, 4, 5, 6, 7, 1]])
    lp = np.asarray(log_probs)
    assert (lp[0, 3:] == 0).all() and (lp[:, :3] < 0).all()
    np.testing.assert_allclose(lp[1], jax.nn.log_softmax(10.0 * jnp.eye(vocab)[0])[0], atol=1e-6)


def test_sampled_log_probs_match_score_batch():
    model, params = _model_and_params(seed=2)
    model.eos_id = None
    tokens, log_probs = model.predict_batch(
        params, {"decoder_input_tokens": PROMPTS}, jax.random.PRNGKey(5), max_decode_length=4,
        temperature=1.0, return_log_probs=True)
    full = jnp.concatenate([PROMPTS, tokens], 1)
    valid = jnp.concatenate([PROMPTS != 0, jnp.ones(tokens.shape, bool)], 1)
    batch = {"decoder_input_tokens": full[:, :-1], "decoder_target_tokens": full[:, 1:],
             "decoder_segment_ids": valid[:, :-1].astype(jnp.int32),
             "decoder_positions": jnp.maximum(jnp.cumsum(valid, 1) - 1, 0)[:, :-1],
             "decoder_loss_weights": jnp.zeros(full[:, 1:].shape).at[:, -4:].set(1.0)}
    # The first generated token is predicted from the last real prompt token, which for
    # right-padded rows is not at index prompt_len - 1: score only the last 3 generated tokens
    # plus the first one where the prompt ends at the right edge.
    scores = model.score_batch(params, batch)
    np.testing.assert_allclose(scores[1:3], jnp.sum(log_probs[1:3], 1), rtol=1e-4)
    batch["decoder_loss_weights"] = jnp.zeros(full[:, 1:].shape).at[:, -3:].set(1.0)
    np.testing.assert_allclose(model.score_batch(params, batch), jnp.sum(log_probs[:, 1:], 1),
                               rtol=1e-4)


def test_first_token_mask_limits_only_the_first_sampled_token():
    """Token healing: the first token comes from the allowed ids, the rest are sampled as before."""
    model, params = _model_and_params(seed=2)
    batch = {"decoder_input_tokens": PROMPTS}
    allowed = np.zeros((4, CFG.vocab_size), bool)
    allowed[:, [17, 23]] = True
    kw = dict(max_decode_length=4, temperature=1.0, top_k=0)
    out = np.asarray(model.predict_batch(params, batch, jax.random.PRNGKey(5),
                                         first_token_mask=allowed, **kw))
    assert set(out[:, 0].tolist()) <= {17, 23}
    free = np.asarray(model.predict_batch(params, batch, jax.random.PRNGKey(5),
                                          first_token_mask=np.ones_like(allowed), **kw))
    np.testing.assert_array_equal(free, model.predict_batch(params, batch, jax.random.PRNGKey(5), **kw))
    with pytest.raises(ValueError, match="first_token_mask shape"):
        model.predict_batch(params, batch, jax.random.PRNGKey(5), first_token_mask=allowed[:, :5], **kw)

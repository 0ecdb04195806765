"""DPO: the loss equals the formula on the wrapper's own log-probabilities, and training through
trainer.train raises the chosen-vs-rejected margin (decoder and T5)."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import optax

from rl_helpers import synthetic_pairs, tiny_decoder, tiny_t5
from zhchat.tasks import preference_reader
from zhchat.rl import dpo
from zhchat.trainer import partitioning
from zhchat.trainer.train import train


def _data(encdec):
    def factory(batch_size, seed, shard_index, shard_count):
        rng = np.random.default_rng(seed)
        examples = synthetic_pairs(256, 0)
        while True:
            idx = rng.choice(len(examples), batch_size, replace=False)
            yield preference_reader.collate([examples[i] for i in idx], encoder_decoder=encdec,
                                          prompt_len=6, response_len=8, num_responses=2)
    return factory


def check_dpo(arch):
    encdec = arch == "t5"
    policy = tiny_t5() if encdec else tiny_decoder(layers=1)
    model = dpo.DPOModel(policy=policy, beta=0.1)
    first = next(_data(encdec)(4, 0, 0, 1))
    ref = nn.unbox(model.init_params(jax.random.split(jax.random.key(0))[0],
                                     {k: v.shape for k, v in first.items()}))
    data = dpo.with_reference_log_probs(data=_data(encdec), policy=policy, reference_params=ref,
                                        batch_size=16)
    batch = next(data)
    # at the reference itself the margin is 0 and the loss log 2
    loss, m = jax.jit(model.loss_fn)(ref, batch, None)
    np.testing.assert_allclose(float(loss), np.log(2.0), rtol=1e-5)
    np.testing.assert_allclose(float(m["margin"]), 0.0, atol=1e-5)
    # the loss is the formula on the wrapper's response log-probabilities
    shifted = jax.tree.map(lambda x: x * 1.01, ref)
    logp = np.asarray(jax.jit(lambda p: dpo.response_log_probs(policy, p, batch))(shifted))
    r = batch["reference_log_probs"]
    delta = 0.1 * ((logp[:, 0] - r[:, 0]) - (logp[:, 1] - r[:, 1]))
    loss, m = jax.jit(model.loss_fn)(shifted, batch, None)
    np.testing.assert_allclose(float(loss), np.mean(np.logaddexp(0.0, -delta)), rtol=1e-4)
    np.testing.assert_allclose(float(m["margin"]), delta.mean(), rtol=1e-4, atol=1e-6)

    out = train(model=model, train_data=data, partitioner=partitioning.Partitioner(num_devices=1),
                optimizer=optax.adam(3e-3), num_steps=30, batch_size=16, log_every=10,
                seed=0, progress_bar=False)
    hist = out["history"]
    assert hist[-1]["margin"] > hist[0]["margin"] + 0.3 and hist[-1]["accuracy"] > 0.9, hist
    assert hist[-1]["loss"] < np.log(2.0) - 0.15


def test_decoder_dpo_raises_margin():
    check_dpo("decoder")

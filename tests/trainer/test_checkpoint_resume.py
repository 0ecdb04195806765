"""Save -> restore -> continue is bit-identical (step, data position, RNG) with the real cache
reader; restore onto other meshes."""

import functools
import os

import jax
import numpy as np
import pytest

from conftest import CACHE_LEN, tiny_decoder
from zhchat.tasks import cache_reader
from zhchat.trainer import checkpoints, optimizers, partitioning, state_init, train

TX = optimizers.make_optimizer(learning_rate=1e-2)  # one object: runs share compiled steps


@pytest.fixture(scope="module")
def cache_model_and_data(demo_cache):
    """The tiny decoder sized for the demo cache's vocabulary, and a factory of real cache readers."""
    cache_dir, vocab_size = demo_cache
    data = functools.partial(cache_reader.make_cache_iterator, cache_dir=cache_dir,
                             num_threads=1, prefetch_buffer_size=4)
    return tiny_decoder(-(-vocab_size // 128) * 128), data


def _run(model_and_data, run_dir, num_steps, mesh_shape, **kw):
    model, data = model_and_data
    return train.train(
        model=model, train_data=data, partitioner=partitioning.Partitioner(mesh_shape=mesh_shape),
        optimizer=TX, num_steps=num_steps,
        batch_size=8, log_every=1, checkpoint_every=3, keep_checkpoints=2, run_dir=run_dir,
        progress_bar=False, seed=7, **kw)


def test_resume_is_bit_identical(cache_model_and_data, tmp_path):
    straight = _run(cache_model_and_data, str(tmp_path / "a"), 6, (2, 2, 2))
    first = _run(cache_model_and_data, str(tmp_path / "b"), 4, (2, 2, 2))  # saves at 3 and (final) 4
    assert first["step"] == 4
    ckpt_dir = tmp_path / "b" / "checkpoints"
    assert sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit()) == [3, 4]
    resumed = _run(cache_model_and_data, str(tmp_path / "b"), 6, (2, 2, 2))
    assert [h["step"] for h in resumed["history"]] == [5, 6]
    want = {h["step"]: h["loss"] for h in straight["history"]}
    assert [h["loss"] for h in resumed["history"]] == [want[5], want[6]]  # bit-identical
    for a, b in zip(jax.tree.leaves(straight["state"]), jax.tree.leaves(resumed["state"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # keep=2: step 3 was garbage-collected after 6 was written
    steps = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
    assert steps == [4, 6]
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6 and '"train/mfu"' in lines[-1]


def test_restore_onto_a_different_mesh(cache_model_and_data, tmp_path):
    model = cache_model_and_data[0]
    saved = _run(cache_model_and_data, str(tmp_path), 3, (8, 1, 1))
    ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"))
    tx = TX
    shapes = {k: (8, CACHE_LEN) for k in ("decoder_input_tokens", "decoder_target_tokens",
                                   "decoder_segment_ids", "decoder_positions",
                                   "decoder_loss_weights")}
    for part in (partitioning.Partitioner(mesh_shape=(2, 2, 2)),
                 partitioning.Partitioner(mesh_shape=(1, 1, 1), devices=jax.devices()[:1])):
        init = state_init.StateInitializer(model, tx, part, shapes, jax.random.key(0))
        state_sh = init.shardings
        state, data_state, step = init.restore(ckpt)
        assert step == 3 and int(state.step) == 3
        assert data_state["settings"]["batch_size"] == 8 and "grain" in data_state
        for got, sh, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(state_sh.params),
                                 jax.tree.leaves(saved["state"].params)):
            assert got.sharding == sh
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    ckpt.close()

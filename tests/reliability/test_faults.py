"""Faults a cluster causes, on the tiny decoder with synthetic data: a damaged newest checkpoint
(truncated array file, missing metadata, truncated data position, empty step folder) falls back to
the previous one; SIGTERM ends the run with a final checkpoint; a restart says what it restored and
does not duplicate metrics; divergence never writes a non-finite checkpoint; a misspelt gin macro
is an error."""

from __future__ import annotations

import functools
import glob
import json
import os
import signal

import gin
import numpy as np
import pytest

from zhchat.gin_configs import cli as gin_cli
from zhchat.trainer import optimizers, partitioning, synthetic_data, train

VOCAB = 256


@functools.cache
def _model():
    gin.clear_config()
    gin_cli.parse_gin(["models/decoder_tiny.gin"], [f"VOCAB_SIZE = {VOCAB}"])
    model = gin_cli.evaluate_macro("MODEL")
    gin.clear_config()
    return model


TX = optimizers.make_optimizer(learning_rate=1e-3)


def _run(run_dir, num_steps, data=None, tx=TX, **kw):
    data = data or functools.partial(synthetic_data.make_synthetic_iterator, seq_len=16,
                                     vocab_size=VOCAB)
    return train.train(model=_model(), train_data=data, optimizer=tx, num_steps=num_steps,
                       batch_size=8, log_every=1, checkpoint_every=2, keep_checkpoints=3,
                       async_checkpointing=False, run_dir=str(run_dir), progress_bar=False,
                       partitioner=partitioning.Partitioner(), seed=3, **kw)


def _steps(run_dir):
    return sorted(int(os.path.basename(p)) for p in glob.glob(f"{run_dir}/checkpoints/*")
                  if os.path.basename(p).isdigit())


def _truncate_array_file(step_dir):
    files = [f for f in glob.glob(f"{step_dir}/state/**/*", recursive=True)
             if os.path.isfile(f) and "d/" in f.replace(os.sep, "/")]
    assert files, os.listdir(f"{step_dir}/state")
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(max(os.path.getsize(f) // 3, 1))


def _delete_metadata(step_dir):
    os.remove(f"{step_dir}/state/_METADATA")


def _truncate_data_position(step_dir):
    path = next(p for p in glob.glob(f"{step_dir}/data/*") if os.path.isfile(p))
    with open(path, "r+b") as fh:
        fh.truncate(5)


def _empty_step(step_dir):
    import shutil
    for entry in os.listdir(step_dir):
        target = os.path.join(step_dir, entry)
        shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)


@pytest.mark.parametrize("damage", [_truncate_array_file, _delete_metadata,
                                    _truncate_data_position, _empty_step])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, capfd, damage):
    _run(tmp_path, 6)
    assert _steps(tmp_path) == [2, 4, 6]
    damage(tmp_path / "checkpoints" / "6")
    resumed = _run(tmp_path, 8)
    err = capfd.readouterr().err
    assert "checkpoint" in err and "is damaged" in err and "6.corrupt" in err
    assert f"restored step 4 from {tmp_path}/checkpoints/4" in err
    assert [h["step"] for h in resumed["history"]] == [5, 6, 7, 8]
    assert os.path.isdir(tmp_path / "checkpoints" / "6.corrupt")
    # the replayed steps 5-6 are not in metrics.jsonl twice
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == sorted(set(steps)) == list(range(1, 9))


def test_no_usable_checkpoint_is_one_clear_error(tmp_path):
    _run(tmp_path, 4)
    for step in _steps(tmp_path):
        _delete_metadata(tmp_path / "checkpoints" / str(step))
    with pytest.raises(FileNotFoundError, match="no usable checkpoint in .*checkpoints"):
        _run(tmp_path, 6)


def test_sigterm_stops_with_a_final_checkpoint_and_the_restart_continues(tmp_path, capfd):
    base = functools.partial(synthetic_data.make_synthetic_iterator, seq_len=16, vocab_size=VOCAB)

    def preempting(**kw):  # the scheduler's SIGTERM arrives while batch 3 is read
        it = base(**kw)
        original = it.__next__

        def nxt():
            if it.index == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return original()
        it.__next__ = nxt
        return _Wrapped(it, nxt)

    out = _run(tmp_path, 10, data=preempting)
    stopped = out["step"]  # the step under way when the signal came (the reader prefetches)
    assert 3 <= stopped <= 5 and _steps(tmp_path)[-1] == stopped  # a final checkpoint there
    assert "SIGTERM: stopping" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    resumed = _run(tmp_path, 8)
    assert [h["step"] for h in resumed["history"]] == list(range(stopped + 1, 9))


class _Wrapped:
    """An iterator whose __next__ is replaceable (instances cannot override dunder lookups)."""

    def __init__(self, it, nxt):
        self.it, self.nxt = it, nxt

    def __iter__(self):
        return self

    def __next__(self):
        return self.nxt()

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


def test_a_nan_batch_is_skipped_and_training_goes_on(tmp_path, capfd):
    base = functools.partial(synthetic_data.make_synthetic_iterator, seq_len=16, vocab_size=VOCAB)

    def with_nan(**kw):  # batch 3 carries NaN loss weights: its loss and gradients are NaN
        it = base(**kw)

        def nxt():
            batch = next(it)
            if it.index == 3:
                batch = dict(batch, decoder_loss_weights=np.full_like(
                    batch["decoder_loss_weights"], np.nan, dtype=np.float32))
            return batch
        return _Wrapped(it, nxt)

    out = _run(tmp_path, 6, data=with_nan)
    skipped = {h["step"]: h["skipped"] for h in out["history"]}
    assert skipped == {1: 0.0, 2: 0.0, 3: 1.0, 4: 0.0, 5: 0.0, 6: 0.0}
    assert out["skipped_steps"] == 1 and np.isfinite(out["loss"])
    from zhchat.trainer import checkpoints
    assert checkpoints.params_finite(out["state"].params)
    assert "1 step(s) up to step 3 had a non-finite loss" in capfd.readouterr().err


def test_divergence_stops_the_run_and_never_writes_a_non_finite_checkpoint(tmp_path):
    wild = optimizers.make_optimizer(learning_rate=1e6, clip_norm=None)
    with pytest.raises(FloatingPointError, match="training diverged"):
        _run(tmp_path, 40, tx=wild, max_skipped_steps=5)
    from zhchat.trainer import checkpoints
    for step in _steps(tmp_path):
        params, _ = checkpoints.restore_params(str(tmp_path / "checkpoints"), _model(),
                                               partitioning.Partitioner(),
                                               __import__("jax").random.key(0), step=step)
        assert checkpoints.params_finite(params), step


def test_misspelt_gin_macro_is_an_error():
    with pytest.raises(gin_cli.GinConfigError, match="unknown macro VOCAB_SIZ .*VOCAB_SIZE"):
        gin_cli.parse_gin(["models/decoder_tiny.gin", "runs/pretrain.gin"], ["VOCAB_SIZ = 3"])
    gin.clear_config()
    gin_cli.parse_gin(["models/decoder_tiny.gin"], ["A = 3", "DecoderConfig.num_layers = %A"])
    assert gin.query_parameter("DecoderConfig.num_layers") is not None
    gin.clear_config()


def test_a_failed_checkpoint_write_stops_the_run(tmp_path, monkeypatch):
    """A full disk at the second save (patched to raise ENOSPC) ends training at that step."""
    import errno

    from zhchat.trainer import checkpoints

    real = checkpoints.ocp.CheckpointManager.save
    calls = []

    def failing(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **kw)

    monkeypatch.setattr(checkpoints.ocp.CheckpointManager, "save", failing)
    with pytest.raises(checkpoints.CheckpointWriteError, match="step 4 .*No space left"):
        _run(tmp_path, 10)
    assert _steps(tmp_path) == [2]


def test_a_failed_metrics_write_stops_the_run(tmp_path, monkeypatch):
    import errno

    from zhchat.trainer import metrics

    real = metrics.MetricsWriter.write

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    def write(self, step, scalars, prefix="train"):
        if step == 3:
            self._jsonl.close()
            self._jsonl = FullDisk()
        return real(self, step, scalars, prefix)

    monkeypatch.setattr(metrics.MetricsWriter, "write", write)
    with pytest.raises(metrics.MetricsWriteError, match="metrics.jsonl at step 3"):
        _run(tmp_path, 10)


def test_tensorboard_events_are_written_in_the_loop_and_a_full_disk_raises(tmp_path):
    """The events are written synchronously (no writer thread that could die and block the
    queue); /dev/full gives a real ENOSPC."""
    from zhchat.trainer import metrics, tensorboard

    writer = metrics.MetricsWriter(str(tmp_path), total_steps=3, progress_bar=False)
    writer.write(1, {"loss": 2.5, "mfu": 0.25})
    writer.write(2, {"loss": 1.5}, prefix="eval")
    path = writer._tb.path
    assert tensorboard.read_scalars(path) == [(1, "train/loss", 2.5), (1, "train/mfu", 0.25),
                                              (2, "eval/loss", 1.5)]
    writer._tb._file.close()
    writer._tb._file = open("/dev/full", "wb")
    with pytest.raises(metrics.MetricsWriteError, match="TensorBoard events .* step 3"):
        writer.write(3, {"loss": 1.0})


class _Spiky:
    """The tiny decoder whose loss is multiplied by the batch's `spike` feature (1 = normal)."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def loss_fn(self, params, batch, rng):
        scale = batch["spike"][0]
        loss, metrics = self.model.loss_fn(params, {k: v for k, v in batch.items()
                                                    if k != "spike"}, rng)
        return loss * scale, dict(metrics, loss=metrics["loss"] * scale)


def _spiking_data(at_index):
    base = functools.partial(synthetic_data.make_synthetic_iterator, seq_len=16, vocab_size=VOCAB)

    def make(**kw):
        it = base(**kw)

        def nxt():
            batch = next(it)
            scale = 100.0 if it.index == at_index else 1.0
            return dict(batch, spike=np.full((batch["decoder_input_tokens"].shape[0],), scale,
                                             np.float32))
        return _Wrapped(it, nxt)
    return make


def test_a_loss_spike_rolls_back_to_the_last_checkpoint_and_skips_its_batches(tmp_path, capfd):
    out = train.train(model=_Spiky(_model()), train_data=_spiking_data(15), optimizer=TX,
                      num_steps=18, batch_size=8, log_every=1, checkpoint_every=2,
                      keep_checkpoints=3, async_checkpointing=False, run_dir=str(tmp_path),
                      progress_bar=False, partitioner=partitioning.Partitioner(), seed=3,
                      spike_factor=3.0)
    err = capfd.readouterr().err
    assert "loss spike at step 15" in err and "rolled back to the params of step 14" in err
    assert out["step"] == 18 and np.isfinite(out["loss"]) and out["loss"] < 10
    with pytest.raises(FloatingPointError, match="loss spike at step 15 .* after 0 rollbacks"):
        train.train(model=_Spiky(_model()), train_data=_spiking_data(15), optimizer=TX,
                    num_steps=18, batch_size=8, log_every=1, checkpoint_every=2,
                    async_checkpointing=False, run_dir=str(tmp_path / "b"), progress_bar=False,
                    partitioner=partitioning.Partitioner(), seed=3, spike_factor=3.0,
                    max_rollbacks=0)

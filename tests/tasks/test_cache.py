"""Packed-example cache: export with seqio, read back TF-free with Grain (order, shards, resume)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from zhchat.tasks import cache, cache_reader

LENGTHS = {"targets": 64}
N = 40  # packed examples exported (even, so 2 shards split it exactly)


@pytest.fixture(scope="module")
def cache_dir(demo_task, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    meta = cache.export_cache(task=demo_task, split="validation", output_dir=str(out),
                              feature_lengths=LENGTHS, converter="decoder", num_shards=3,
                              max_examples=N, progress=False)
    assert meta["num_examples"] == N
    return str(out)


def _rows(batches):
    """Each example of a stream of batches as one hashable bytes row (features in sorted order)."""
    rows = []
    for b in batches:
        keys = sorted(b)
        for i in range(len(b[keys[0]])):
            rows.append(b"".join(np.asarray(b[k][i], np.int32).tobytes() for k in keys))
    return rows


def _read(cache_dir, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("num_epochs", 1)
    kw.setdefault("shard_index", 0)
    kw.setdefault("shard_count", 1)
    return _rows(cache_reader.make_cache_iterator(cache_dir=cache_dir, **kw))


def test_metadata(cache_dir, spm_models):
    meta = cache_reader.cache_metadata(cache_dir)
    assert meta["task"] == "zh_demo_lm" and meta["split"] == "validation"
    assert meta["converter"] == "decoder" and meta["task_feature_lengths"] == LENGTHS
    assert [s["num_examples"] for s in meta["shards"]] == [14, 13, 13]
    assert meta["vocabulary"]["targets"] == {"vocab_path": spm_models["bpe"], "vocab_size": 3100,
                                             "extra_ids": 100}
    assert set(meta["features"]) == {"decoder_target_tokens", "decoder_input_tokens",
                                     "decoder_loss_weights", "decoder_segment_ids",
                                     "decoder_positions"}
    assert all(f["length"] == 64 for f in meta["features"].values())


def test_read_back_equals_feature_converter_output(cache_dir, demo_task):
    ds = cache.packed_dataset(task=demo_task, split="validation", feature_lengths=LENGTHS,
                              converter="decoder").take(N)
    expected = _rows({k: v[None] for k, v in ex.items()} for ex in ds.as_numpy_iterator())
    got = _read(cache_dir, seed=3)
    assert len(got) == N and sorted(got) == sorted(expected)
    batch = next(cache_reader.make_cache_iterator(cache_dir=cache_dir, batch_size=8, seed=0,
                                                  shard_index=0, shard_count=1))
    assert all(v.shape == (8, 64) and v.dtype == np.int32 for v in batch.values())
    seg = batch["decoder_segment_ids"]
    assert ((batch["decoder_loss_weights"] > 0) == (seg > 0)).all()
    assert (batch["decoder_input_tokens"][:, 1:][seg[:, 1:] == seg[:, :-1]]
            == batch["decoder_target_tokens"][:, :-1][seg[:, 1:] == seg[:, :-1]]).all()


def test_order_is_seeded(cache_dir):
    a, b, c = _read(cache_dir, seed=1), _read(cache_dir, seed=1), _read(cache_dir, seed=2)
    assert a == b and a != c and sorted(a) == sorted(c)
    unshuffled = _read(cache_dir, shuffle=False)
    assert unshuffled != a and sorted(unshuffled) == sorted(a)


def test_shards_are_disjoint_and_complete(cache_dir):
    everything = _read(cache_dir, seed=5)
    s0 = _read(cache_dir, seed=5, shard_index=0, shard_count=2)
    s1 = _read(cache_dir, seed=5, shard_index=1, shard_count=2)
    assert len(s0) == len(s1) == N // 2
    assert not set(s0) & set(s1) and sorted(s0 + s1) == sorted(everything)
    # 3 hosts: the tail is trimmed so every host gets the same number of examples
    s = [_read(cache_dir, seed=5, batch_size=1, shard_index=i, shard_count=3) for i in range(3)]
    assert [len(x) for x in s] == [13, 13, 13] and len(set(s[0] + s[1] + s[2])) == 39


def test_state_resumes_at_the_exact_batch(cache_dir):
    it = cache_reader.make_cache_iterator(cache_dir=cache_dir, batch_size=4, seed=7,
                                          shard_index=0, shard_count=1)  # infinite epochs
    for _ in range(13):  # past the first epoch (10 batches)
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]
    fresh = cache_reader.make_cache_iterator(cache_dir=cache_dir, batch_size=4, seed=7,
                                             shard_index=0, shard_count=1)
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        assert all((got[k] == want[k]).all() for k in want)
    other = cache_reader.make_cache_iterator(cache_dir=cache_dir, batch_size=2, seed=7,
                                             shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="batch_size"):
        other.set_state(state)


def test_max_examples_caches_a_prefix_from_the_cli(demo_task, spm_models, tmp_path, capsys):
    import gin

    try:
        rc = cache.main(["--gin_file=tasks/demo_lm.gin", f"--gin.VOCAB_PATH='{spm_models['bpe']}'",
                         "--task", demo_task, "--split=validation", f"--output_dir={tmp_path}",
                         "--feature_lengths", "targets=64", "--converter=decoder",
                         "--max_examples=7"])
    finally:
        gin.clear_config()  # the task stays registered; leave no bindings behind for other tests
    assert rc == 0 and "wrote 7 packed examples" in capsys.readouterr().out
    meta = cache_reader.cache_metadata(str(tmp_path))
    assert meta["num_examples"] == 7 and meta["max_examples"] == 7
    ds = cache.packed_dataset(task=demo_task, split="validation", feature_lengths=LENGTHS,
                              converter="decoder")
    first = _rows({k: v[None] for k, v in ex.items()} for ex in ds.take(7).as_numpy_iterator())
    assert _read(str(tmp_path), shuffle=False, batch_size=7) == first  # the first 7, in order


def test_errors(tmp_path, cache_dir):
    with pytest.raises(FileNotFoundError, match="not a finished cache"):
        cache_reader.cache_metadata(str(tmp_path))
    with pytest.raises(ValueError, match="fewer than one batch"):
        cache_reader.make_cache_iterator(cache_dir=cache_dir, batch_size=64, num_epochs=1,
                                         shard_index=0, shard_count=1)
    for bad in (0, -1):  # tf.data's take(-1) would silently cache the whole split
        with pytest.raises(ValueError, match="max_examples must be >= 1"):
            cache.export_cache(task="zh_demo_lm", split="validation",
                               output_dir=str(tmp_path / "x"), feature_lengths=LENGTHS,
                               max_examples=bad, progress=False)
    with pytest.raises(ValueError, match="unknown converter"):
        cache.packed_dataset(task="zh_demo_lm", split="train", feature_lengths=LENGTHS,
                             converter="bert")


def test_reader_imports_without_tensorflow():
    code = ("import sys, zhchat.tasks.cache_reader as r; "
            "bad = [m for m in ('tensorflow', 'seqio', 'tensorflow_datasets') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cli_checks_the_task_and_gin_before_exporting(tmp_path, capsys):
    rc = cache.main(["--task=zh_no_such_task", f"--output_dir={tmp_path / 'c'}",
                     "--feature_lengths=targets=64"])
    assert rc == 2 and "zh_no_such_task" in capsys.readouterr().err
    rc = cache.main(["--gin_file=tasks/demo_lm.gin", "--gin.VOCAB_PATHH='x'", "--task=zh_demo_lm",
                     f"--output_dir={tmp_path / 'c'}", "--feature_lengths=targets=64"])
    assert rc == 2 and "unknown macro VOCAB_PATHH" in capsys.readouterr().err

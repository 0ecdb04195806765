"""Span corruption: T5's statistics, exact reconstruction, lengths that pack without truncation."""

import numpy as np
import pytest
import seqio
import tensorflow as tf

from zhchat.tasks import span_corruption as sc

VOCAB_SIZE = 1100  # ids 2..999 are text, the top 100 are sentinels
EOS = 1


def _features():
    vocab = seqio.PassThroughVocabulary(VOCAB_SIZE, eos_id=EOS)
    return {k: seqio.Feature(vocab, add_eos=True) for k in ("inputs", "targets")}


def _random_docs(n, seed, low=20, high=2000):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, 1000, size=rng.integers(low, high)).astype(np.int32) for _ in range(n)]


def _run(docs, lengths, seed=7, **kwargs):
    """The task's objective + EOS step (the same functions register_span_corruption_task chains)."""
    ds = tf.data.Dataset.from_generator(lambda: ({"targets": d} for d in docs),
                                        output_signature={"targets": tf.TensorSpec([None], tf.int32)})
    with seqio.map_seed_manager(seed):
        ds = sc.span_corruption(ds, lengths, _features(), **kwargs)
    ds = seqio.preprocessors.append_eos_after_trim(ds, output_features=_features(), sequence_length=lengths)
    return list(ds.as_numpy_iterator())


def reconstruct(inputs, targets):
    """Original tokens from inputs/targets with sentinels (EOS stripped)."""
    assert inputs[-1] == EOS and targets[-1] == EOS
    spans, current = {}, None
    for tok in targets[:-1]:
        if tok >= VOCAB_SIZE - 100:
            current = int(tok)
            spans[current] = []
        else:
            spans[current].append(int(tok))
    out = []
    for tok in inputs[:-1]:
        out.extend(spans.pop(int(tok)) if tok >= VOCAB_SIZE - 100 else [int(tok)])
    assert not spans, "targets hold a span whose sentinel is missing from the inputs"
    return out


def test_random_spans_helper_gives_t5_lengths():
    assert sc.random_spans_helper(inputs_length=512) == (568, 114)
    assert sc.random_spans_helper(inputs_length=128) == (141, 29)
    with pytest.raises(ValueError, match="noise_density"):
        sc.random_spans_helper(noise_density=0.0)


def test_statistics_and_exact_reconstruction():
    docs = _random_docs(300, seed=0)
    examples = _run(docs, {"inputs": 512, "targets": 114})
    noise = spans = total = 0
    rebuilt = []
    for ex in examples:
        inputs, targets = ex["inputs"], ex["targets"]
        assert len(inputs) <= 512 and len(targets) <= 114
        sentinels = targets[:-1] >= VOCAB_SIZE - 100
        # sentinels are used in order, <extra_id_0> = vocab_size - 1 first
        np.testing.assert_array_equal(targets[:-1][sentinels], VOCAB_SIZE - 1 - np.arange(sentinels.sum()))
        noise += int((~sentinels).sum())
        spans += int(sentinels.sum())
        chunk = reconstruct(inputs, targets)
        total += len(chunk)
        rebuilt.extend(chunk)
    # inputs + targets give back every document token, in order, nothing lost
    np.testing.assert_array_equal(np.asarray(rebuilt), np.concatenate(docs))
    assert abs(noise / total - 0.15) <= 0.01, noise / total
    assert abs(noise / spans - 3.0) <= 0.3, noise / spans
    full = [ex for ex in examples if len(ex["inputs"]) == 512]
    assert len(full) >= 0.9 * len(examples)  # full chunks fill the inputs exactly ...
    assert all(len(ex["targets"]) == 114 for ex in full)  # ... and the targets exactly


def test_noise_mask_statistics_on_many_documents_and_other_settings():
    """The mask on unmerged documents of varied lengths, for another density / span length."""
    docs = _random_docs(400, seed=1, low=200, high=600)
    examples = _run(docs, {"inputs": 512, "targets": 512}, merge_examples=False, noise_density=0.3,
                    mean_noise_span_length=5.0)
    noise = spans = total = 0
    span_lengths = []
    for ex, doc in zip(examples, docs):
        chunk = reconstruct(ex["inputs"], ex["targets"])
        np.testing.assert_array_equal(chunk, doc)
        sentinel = ex["targets"][:-1] >= VOCAB_SIZE - 100
        bounds = np.flatnonzero(np.append(sentinel, True))
        span_lengths += list(np.diff(bounds) - 1)
        noise += int((~sentinel).sum())
        spans += int(sentinel.sum())
        total += len(doc)
    assert len(examples) == len(docs)
    assert abs(noise / total - 0.3) <= 0.01
    assert abs(noise / spans - 5.0) <= 0.3
    assert min(span_lengths) >= 1 and max(span_lengths) > 10  # random span lengths, not fixed


def test_every_chunk_length_fits_without_truncation():
    tokens_length, targets_length = sc.random_spans_helper(inputs_length=64)
    docs = [np.arange(2, 2 + n, dtype=np.int32) for n in range(1, tokens_length + 1)]
    examples = _run(docs, {"inputs": 64, "targets": targets_length}, merge_examples=False)
    assert len(examples) == len(docs)
    for ex, doc in zip(examples, docs):
        assert len(ex["inputs"]) <= 64 and len(ex["targets"]) <= targets_length
        np.testing.assert_array_equal(reconstruct(ex["inputs"], ex["targets"]), doc)


def test_seeded_runs_repeat_and_differ_across_seeds():
    docs = _random_docs(20, seed=2)
    a = _run(docs, {"inputs": 128, "targets": 29}, seed=3)
    b = _run(docs, {"inputs": 128, "targets": 29}, seed=3)
    c = _run(docs, {"inputs": 128, "targets": 29}, seed=4)
    assert all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


def test_too_short_targets_length_is_an_error():
    with pytest.raises(ValueError, match="random_spans_helper"):
        _run(_random_docs(2, seed=0), {"inputs": 512, "targets": 100})


def test_task_on_demo_corpus_packs_full_rows(spm_models, demo_data_dir):
    """The registered task (real tokenizer, demo corpus) through EncDecFeatureConverter(pack=True)."""
    vocab = seqio.SentencePieceVocabulary(spm_models["bpe"], extra_ids=100)
    name = sc.register_span_corruption_task(
        name="test_span_corruption_demo", vocabulary=vocab, data_dir=str(demo_data_dir),
        files=["shu_books_sample.jsonl.gz"], validation_fraction=0.0)
    lengths = {"inputs": 512, "targets": 114}
    with seqio.map_seed_manager(0):
        ds = seqio.get_dataset(name, task_feature_lengths=lengths, dataset_split="train", shuffle=False,
                               num_epochs=1, seed=0,
                               feature_converter=seqio.EncDecFeatureConverter(pack=True))
        rows = list(ds.take(16).as_numpy_iterator())
    sentinel_min = vocab.vocab_size - 100
    for row in rows:
        enc, dec = row["encoder_input_tokens"], row["decoder_target_tokens"]
        assert (enc > 0).mean() > 0.97  # the rows are (nearly) full: nothing is cut off
        for seg in np.unique(row["encoder_segment_ids"][row["encoder_segment_ids"] > 0]):
            inputs = enc[row["encoder_segment_ids"] == seg]
            targets = dec[row["decoder_segment_ids"] == seg]
            assert inputs[-1] == EOS and targets[-1] == EOS  # both sides end with their own EOS
            n_sentinels = (inputs >= sentinel_min).sum()
            assert n_sentinels == (targets >= sentinel_min).sum() > 0
            noise = len(targets) - 1 - n_sentinels
            assert abs(noise / (len(inputs) - 1 - n_sentinels + noise) - 0.15) < 0.02

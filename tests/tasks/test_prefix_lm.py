"""Prefix LM: random split points, lossless, and both feature converters (enc-dec and decoder)."""

import numpy as np
import seqio
import tensorflow as tf

from zhchat.tasks import prefix_lm

EOS = 1


def _features():
    vocab = seqio.PassThroughVocabulary(1000, eos_id=EOS)
    return {k: seqio.Feature(vocab, add_eos=True) for k in ("inputs", "targets")}


def _run(docs, lengths, seed=5, **kwargs):
    ds = tf.data.Dataset.from_generator(lambda: ({"targets": d} for d in docs),
                                        output_signature={"targets": tf.TensorSpec([None], tf.int32)})
    with seqio.map_seed_manager(seed):
        ds = prefix_lm.prefix_lm(ds, lengths, _features(), **kwargs)
    return seqio.preprocessors.append_eos_after_trim(ds, output_features=_features(),
                                                     sequence_length=lengths)


def test_split_is_lossless_random_and_fits():
    rng = np.random.default_rng(0)
    docs = [rng.integers(2, 1000, size=rng.integers(1, 300)).astype(np.int32) for _ in range(200)]
    lengths = {"inputs": 64, "targets": 32}
    examples = list(_run(docs, lengths).as_numpy_iterator())
    rebuilt, prefix_share = [], []
    for ex in examples:
        inputs, targets = ex["inputs"], ex["targets"]
        assert inputs[-1] == EOS and targets[-1] == EOS
        assert len(inputs) <= 64 and len(targets) <= 32 and len(targets) >= 2
        rebuilt += list(inputs[:-1]) + list(targets[:-1])
        prefix_share.append((len(inputs) - 1) / (len(inputs) + len(targets) - 2))
    np.testing.assert_array_equal(rebuilt, np.concatenate(docs))
    assert np.std(prefix_share) > 0.2  # split points spread over the whole chunk
    # the longest chunks use both lengths fully, with a fixed split
    examples = list(_run(docs, lengths, chunk_length=94).as_numpy_iterator())
    assert max(len(ex["inputs"]) for ex in examples) == 64
    assert max(len(ex["targets"]) for ex in examples) == 32
    np.testing.assert_array_equal(
        np.concatenate([np.concatenate([ex["inputs"][:-1], ex["targets"][:-1]]) for ex in examples]),
        np.concatenate(docs))


def test_unmerged_documents_keep_their_boundaries():
    docs = [np.arange(2, 2 + n, dtype=np.int32) for n in (1, 2, 5, 16)]
    examples = list(_run(docs, {"inputs": 32, "targets": 16}, merge_examples=False).as_numpy_iterator())
    for ex, doc in zip(examples, docs):
        np.testing.assert_array_equal(np.concatenate([ex["inputs"][:-1], ex["targets"][:-1]]), doc)
        assert len(ex["targets"]) >= 2  # every example has something to predict
    assert len(examples) == 4


def test_feature_converters_for_both_architectures():
    docs = [np.arange(2, 30, dtype=np.int32), np.arange(100, 140, dtype=np.int32)]
    lengths = {"inputs": 24, "targets": 24}
    encdec = seqio.EncDecFeatureConverter(pack=True)(_run(docs, lengths), lengths)
    row = next(encdec.as_numpy_iterator())
    assert row["encoder_input_tokens"].shape == (24,) and row["decoder_target_tokens"].shape == (24,)
    assert set(np.unique(row["encoder_segment_ids"])) <= {0, 1, 2, 3}

    decoder = seqio.PrefixLMFeatureConverter(pack=True)(_run(docs, lengths), lengths)
    rows = list(decoder.as_numpy_iterator())
    for r in rows:
        assert r["decoder_target_tokens"].shape == (48,)
        causal, weights = r["decoder_causal_attention"], r["decoder_loss_weights"]
        for seg in np.unique(r["decoder_segment_ids"][r["decoder_segment_ids"] > 0]):
            in_seg = r["decoder_segment_ids"] == seg
            n_prefix = causal[in_seg].sum()
            # the prefix (plus the position that reads its EOS) is bidirectional, loss on the rest
            assert n_prefix >= 2 and weights[in_seg][:n_prefix - 1].sum() == 0
            assert weights[in_seg][n_prefix - 1:].all()


def test_task_registration_on_demo_corpus(spm_models, demo_data_dir):
    vocab = seqio.SentencePieceVocabulary(spm_models["bpe"], extra_ids=100)
    name = prefix_lm.register_prefix_lm_task(
        name="test_prefix_lm_demo", vocabulary=vocab, data_dir=str(demo_data_dir),
        files=["shu_books_sample.jsonl.gz"], validation_fraction=0.0)
    task = seqio.get_mixture_or_task(name)
    with seqio.map_seed_manager(0):
        ds = task.get_dataset({"inputs": 128, "targets": 128}, split="train", shuffle=False)
        examples = list(ds.take(8).as_numpy_iterator())
    assert len(examples) == 8
    for ex in examples:
        assert 2 <= len(ex["inputs"]) <= 128 and 2 <= len(ex["targets"]) <= 128
        assert ex["inputs"][-1] == EOS and ex["targets"][-1] == EOS
        text = vocab.decode(np.concatenate([ex["inputs"][:-1], ex["targets"][:-1]]).tolist())
        assert len(text) > 50

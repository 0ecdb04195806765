"""The seqio preference task yields the same tokens as the TF-free reader (shared pairs)."""

import numpy as np

from test_preference_data import vocab  # noqa: F401  (module fixture)


def test_seqio_preference_task_matches_reader(vocab, shared_data_dir):  # noqa: F811
    import seqio

    from zhchat.tasks import preference_reader
    from zhchat.tasks import preference

    files = [str(shared_data_dir / "preference" / "dpo_zh_500.jsonl")]
    name = preference.register_preference_task(
        name="zh_preference_test", files=files,
        vocabulary=seqio.SentencePieceVocabulary(vocab.path), max_prompt_len=128,
        max_response_len=64)
    ds = seqio.get_mixture_or_task(name).get_dataset(None, split="validation", shuffle=False)
    got = list(ds.as_numpy_iterator())
    ref = preference_reader.PreferenceExamples(files=files, vocab=vocab, max_prompt_len=128,
                                             max_response_len=64, split="validation")
    assert len(got) == len(ref) > 5
    for g, r in zip(got, ref.examples):
        np.testing.assert_array_equal(g["inputs"], r["prompt"])
        np.testing.assert_array_equal(g["chosen"], r["responses"][0])
        np.testing.assert_array_equal(g["rejected"], r["responses"][1])

"""The serving engine without HTTP, on tiny random-init checkpoints: greedy rows decoded together
equal the one-request streamer and `predict_batch` (decoder and T5), continuous batching with
joins mid-batch and cache compaction keeps them equal, per-row sampling parameters inside one
batch, bounded compiled shapes, the queue bound and cancellation, and incremental text."""

from __future__ import annotations

import asyncio

import pytest

import serve_helpers as sh
from zhchat.scripts.serve import engine as engine_lib
from zhchat.scripts.serve import rows as rows_lib
from zhchat.scripts.serve.text import TextStream
from zhchat.tasks import chat_template as ct
from zhchat.tasks.vocabulary import Vocabulary


@pytest.fixture(scope="module")
def vocab(spm_models):
    return Vocabulary(spm_models["bpe"])


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    return sh.loaded("decoder", tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return sh.loaded("t5", tmp_path_factory.getbasetemp())


def prompts(vocab, *, eos=False) -> list[list[int]]:
    """Chat prompts of 21 to 55 tokens (widths 32 and 64)."""
    out = [ct.encode_prompt(vocab, [{"role": "user", "content": t}]) for t in sh.TEXTS]
    return [p + [vocab.eos_id] for p in out] if eos else out


def stops(vocab, t5=False) -> list[int]:
    return [vocab.eos_id, vocab.im_end_id] + ([vocab.pad_id] if t5 else [])


def references(model, params, vocab, ps, t5=False) -> dict[tuple, list[int]]:
    refs = sh.predict_references(model, params, ps, stops(vocab, t5))
    return {tuple(p): r for p, r in zip(ps, refs)}


def check_shapes(backend) -> None:
    """Every compiled shape uses the documented buckets."""
    for name, *dims in backend.shapes:
        batch, rest = (dims, []) if name == "insert" else (dims[:1], dims[1:])
        assert all(d in backend.batch_sizes for d in batch), (name, dims)
        assert all(d in backend.widths for d in rest), (name, dims)


def test_decoder_rows_of_one_batch_equal_the_streamer_and_predict_batch(decoder, vocab):
    _, model, params = decoder
    engine = engine_lib.make_engine(model, params, vocab, max_batch=8, margin=8)
    ps = prompts(vocab)
    assert len({len(p) for p in ps}) == len(ps) and max(map(len, ps)) > 32  # two widths
    got = sh.run_engine(engine, [{"prompt": p, "max_tokens": 12} for p in ps])
    refs = references(model, params, vocab, ps)
    for p, out in zip(ps, got):
        assert out == sh.expected(refs[tuple(p)], 12)
    assert got[2][0] == sh.streamer_reference(model, params, ps[2], 12, stops(vocab))
    assert ("prefill", 8, 64) in engine.backend.shapes  # all five joined in one prefill
    check_shapes(engine.backend)


def test_continuous_batching_joins_mid_batch_and_compacts(decoder, vocab):
    _, model, params = decoder
    engine = engine_lib.make_engine(model, params, vocab, max_batch=2, margin=8)
    backend, joined_busy = engine.backend, []
    admit = backend.admit
    backend.admit = lambda rows: (joined_busy.append(backend.active()), admit(rows))[1]
    ps = prompts(vocab) + prompts(vocab)[::-1]
    limits = [40, 9, 30, 50, 17, 45, 12, 33, 21, 8]
    got = sh.run_engine(engine, [{"prompt": p, "max_tokens": m} for p, m in zip(ps, limits)])
    refs = references(model, params, vocab, prompts(vocab))
    for p, m, out in zip(ps, limits, got):
        assert out == sh.expected(refs[tuple(p)], m)
    assert any(n > 0 for n in joined_busy)  # a request took a freed slot while another decoded
    assert ("shift", 2) in backend.shapes  # the cache was compacted (and/or shifted right)
    check_shapes(backend)


def test_per_row_sampling_parameters_in_one_batch(decoder, vocab):
    _, model, params = decoder
    p1, p2 = prompts(vocab)[1], prompts(vocab)[3]
    requests = [dict(prompt=p1, max_tokens=12),
                dict(prompt=p1, max_tokens=12, temperature=1.0, top_k=1),
                dict(prompt=p1, max_tokens=12, temperature=0.9, top_p=1e-6),
                dict(prompt=p2, max_tokens=12, temperature=1.0, seed=5),
                dict(prompt=p2, max_tokens=12, temperature=1.0, seed=6)]
    got = sh.run_engine(engine_lib.make_engine(model, params, vocab, max_batch=8, margin=8),
                        requests)
    greedy = sh.expected(references(model, params, vocab, prompts(vocab))[tuple(p1)], 12)
    assert got[0] == greedy and got[1] == greedy and got[2] == greedy  # top-1 filters = argmax
    assert got[3][0] != got[4][0]  # another seed, another sample
    alone = sh.run_engine(engine_lib.make_engine(model, params, vocab, max_batch=8, margin=8),
                          [requests[3]])
    assert alone[0] == got[3]  # a seeded row samples the same tokens whatever shares its batch


def test_t5_static_batch_equals_the_streamer_and_predict_batch(t5, vocab):
    _, model, params = t5
    engine = engine_lib.make_engine(model, params, vocab, max_batch=8, context=sh.CONTEXT)
    assert engine.encoder_decoder
    ps = prompts(vocab, eos=True)
    got = sh.run_engine(engine, [{"prompt": p, "max_tokens": 12} for p in ps])
    refs = references(model, params, vocab, ps, t5=True)
    for p, out in zip(ps, got):
        assert out == sh.expected(refs[tuple(p)], 12)
    assert got[1][0] == sh.streamer_reference(model, params, ps[1], 12, stops(vocab, True))
    assert engine.backend.shapes == {("start", 8, 64, 32), ("step", 8, 64, 32)}


def test_queue_bound_and_cancellation(decoder, vocab):
    _, model, params = decoder
    engine = engine_lib.make_engine(model, params, vocab, max_batch=2, max_queue=2, margin=8)
    p = prompts(vocab)[0]

    async def main():
        a = engine.submit(p, max_tokens=4)
        engine.submit(p, max_tokens=4)
        with pytest.raises(engine_lib.QueueFull, match="max_queue=2"):
            engine.submit(p, max_tokens=4)
        a.cancel()  # a cancelled waiting request leaves the queue
        engine.submit(p, max_tokens=4)
        with pytest.raises(ValueError, match="> 128"):
            engine.submit(p, max_tokens=200)
        assert engine.stats() == {"running": 0, "waiting": 2}

    asyncio.run(main())
    engine.stop()
    with pytest.raises(engine_lib.EngineStopped):
        asyncio.run(_submit(engine, p))


async def _submit(engine, prompt):
    return engine.submit(prompt, max_tokens=2)


def test_buckets():
    assert rows_lib.batch_buckets(8) == (1, 2, 4, 8)
    assert rows_lib.batch_buckets(6) == (1, 2, 4, 6)
    assert rows_lib.length_buckets(2048) == (32, 64, 128, 256, 512, 1024, 2048)
    assert rows_lib.length_buckets(100) == (32, 64, 128)
    assert rows_lib.fit(33, (32, 64)) == 64


def test_text_stream_never_splits_a_character_and_holds_back_stop_prefixes(vocab):
    rare = "龘"  # outside the test tokenizer's pieces: byte fallback, three ids for one character
    ids = vocab.encode("好" + rare + "啊")
    assert len(ids) >= 4
    ts = TextStream(vocab)
    pieces = [ts.push(i) for i in ids]
    assert "\ufffd" not in "".join(pieces) and "".join(pieces) + ts.flush() == " 好" + rare + "啊"
    assert rare in pieces  # released whole, when its last byte arrived (" " is the dummy prefix)

    text = "今天天气很好。明天下雨。"
    ts = TextStream(vocab, stop=["明天", "xyz"])
    out = "".join(ts.push(i) for i in vocab.encode(text) if not ts.stopped)
    assert ts.stopped and out + ts.flush() == " 今天天气很好。"
    ts = TextStream(vocab, stop=["。明天晴"])  # a stop prefix that never completes is released
    out = "".join(ts.push(i) for i in vocab.encode(text))
    assert not ts.stopped and out + ts.flush() == " " + text

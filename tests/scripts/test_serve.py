"""The OpenAI-compatible server over HTTP (real uvicorn on a free localhost port, the official
`openai` client) on tiny random-init decoder and T5 checkpoints: greedy replies of concurrent
requests equal `predict_batch`, streaming, completions, models/health, error responses (limits,
bad JSON, unknown fields, n=2, full queue, timeouts) and 200 concurrent requests."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import logging
import time

import openai
import pytest

import serve_helpers as sh
from zhchat.scripts.serve import cli
from zhchat.scripts.serve.app import make_app
from zhchat.scripts.serve.engine import make_engine
from zhchat.tasks import chat_template as ct
from zhchat.tasks.vocabulary import Vocabulary

CAP = 48  # the servers' max_new_tokens


@pytest.fixture(scope="module")
def vocab(spm_models):
    return Vocabulary(spm_models["bpe"])


def _server(kind, tmp_path_factory, vocab, **app_kw):
    run_dir, model, params = sh.loaded(kind, tmp_path_factory.getbasetemp())
    engine = make_engine(model, params, vocab, max_batch=8, max_queue=256, margin=8,
                         context=sh.CONTEXT)
    app = make_app(engine, vocab, model_name="tiny", max_new_tokens=CAP, **app_kw)
    engine.start()
    return engine, app, model, params


@pytest.fixture(scope="module")
def decoder(tmp_path_factory, vocab):
    engine, app, model, params = _server("decoder", tmp_path_factory, vocab, timeout_s=60)
    with sh.running_server(app) as port:
        yield port, engine, model, params
    engine.stop()


@pytest.fixture(scope="module")
def t5(tmp_path_factory, vocab):
    engine, app, model, params = _server("t5", tmp_path_factory, vocab, timeout_s=60)
    with sh.running_server(app) as port:
        yield port, engine, model, params
    engine.stop()


def client(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)


def post(port: int, path: str, body, method: str = "POST") -> tuple[int, dict, str]:
    """(status, headers, body text) of one raw request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    return resp.status, dict(resp.getheaders()), text


def chat_prompts(vocab, t5=False):
    msgs = [[{"role": "user", "content": t}] for t in sh.TEXTS]
    eos = [vocab.eos_id] if t5 else []
    return msgs, [ct.encode_prompt(vocab, m) + eos for m in msgs]


def stops(vocab, t5=False):
    return [vocab.eos_id, vocab.im_end_id] + ([vocab.pad_id] if t5 else [])


def in_threads(fn, items):
    with concurrent.futures.ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))


@pytest.mark.parametrize("kind", ["decoder", "t5"])
def test_concurrent_greedy_chat_replies_equal_predict_batch(kind, request, vocab):
    port, _, model, params = request.getfixturevalue(kind)
    messages, prompts = chat_prompts(vocab, t5=kind == "t5")
    refs = sh.predict_references(model, params, prompts, stops(vocab, kind == "t5"))
    c = client(port)

    def ask(m):
        return c.chat.completions.create(model="tiny", messages=m, temperature=0, max_tokens=12)

    for m, prompt, ref, r in zip(messages, prompts, refs, in_threads(ask, messages)):
        ids, finish = sh.expected(ref, 12)
        assert r.choices[0].message.content == sh.reply_text(vocab, ids)
        assert r.choices[0].finish_reason == finish and r.object == "chat.completion"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(ids))
        assert r.usage.total_tokens == len(prompt) + len(ids)

    def ask_stream(m):
        chunks = list(c.chat.completions.create(model="tiny", messages=m, temperature=0,
                                                max_tokens=12, stream=True,
                                                stream_options={"include_usage": True}))
        return chunks

    for ref, chunks in zip(refs, in_threads(ask_stream, messages[:3])):
        ids, finish = sh.expected(ref, 12)
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == sh.reply_text(vocab, ids)
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == finish
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids)


def test_completions_streamed_and_whole(decoder, vocab):
    port, _, model, params = decoder
    _, prompts = chat_prompts(vocab)
    refs = sh.predict_references(model, params, prompts, stops(vocab))
    c = client(port)
    r = c.completions.create(model="tiny", prompt=prompts[3], temperature=0, max_tokens=10)
    ids, finish = sh.expected(refs[3], 10)
    assert r.choices[0].text == sh.reply_text(vocab, ids) and r.choices[0].finish_reason == finish
    assert r.object == "text_completion" and r.usage.prompt_tokens == len(prompts[3])
    whole = c.completions.create(model="tiny", prompt="北京是中国的", temperature=0, max_tokens=8)
    chunks = list(c.completions.create(model="tiny", prompt="北京是中国的", temperature=0,
                                       max_tokens=8, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    sampled = c.completions.create(prompt="北京", temperature=1.0, top_p=0.9, max_tokens=5,
                                   seed=3, model="tiny", extra_body={"top_k": 20})
    again = c.completions.create(prompt="北京", temperature=1.0, top_p=0.9, max_tokens=5,
                                 seed=3, model="tiny", extra_body={"top_k": 20})
    assert sampled.choices[0].text == again.choices[0].text  # a seed reproduces a sample


def test_stop_strings_end_the_reply(decoder, vocab):
    port, *_ = decoder
    c = client(port)
    full = c.completions.create(model="tiny", prompt="今天", temperature=0, max_tokens=30,
                                extra_body={"ignore_eos": True}).choices[0].text
    assert len(full.strip()) >= 6, full
    stop = full.strip()[3:5]
    cut = c.completions.create(model="tiny", prompt="今天", temperature=0, max_tokens=30,
                               stop=[stop, "never"]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[:full.index(stop)]


def test_models_health_and_request_log(decoder, caplog):
    port, *_ = decoder
    assert [m.id for m in client(port).models.list().data] == ["tiny"]
    status, _, body = post(port, "/health", None, method="GET")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok" and health["context"] == sh.CONTEXT
    with caplog.at_level(logging.INFO, logger="zhchat.serve"):
        post(port, "/v1/completions", {"prompt": "你好", "max_tokens": 3, "temperature": 0})
        time.sleep(0.2)
    lines = [r.getMessage() for r in caplog.records if "/v1/completions" in r.getMessage()]
    assert lines and lines[-1].startswith("POST /v1/completions 200 prompt_tokens=")
    assert "completion_tokens=" in lines[-1] and lines[-1].endswith("ms")


def test_error_responses(decoder, vocab):
    port, *_ = decoder
    long = [{"role": "user", "content": "很长的问题。" * 200}]
    cases = [  # (body, status, words the message must hold)
        ({"messages": long}, 400, ["128"]),
        ({"prompt": [5] * 100, "max_tokens": 40}, 400, ["128", "140"]),
        ({"prompt": "你好", "max_tokens": CAP + 1}, 400, [str(CAP), "max_new_tokens"]),
        (b'{"messages": [', 400, ["JSON"]),
        ({"messages": [{"role": "user", "content": "你好"}], "foo": 1}, 422, ["unknown field",
                                                                             "foo"]),
        ({"messages": [{"role": "user", "content": "你好"}], "temperature": "hot"}, 422,
         ["temperature"]),
        ({"messages": [{"role": "robot", "content": "x"}]}, 422, ["role"]),
        ({"messages": [{"role": "user", "content": "你好"}], "n": 2}, 400, ["n=2"]),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
         400, ["assistant"]),
        ({"messages": [{"role": "user", "content": "你好"}], "model": "gpt-4"}, 404, ["tiny"]),
    ]
    for body, status, words in cases:
        path = "/v1/completions" if isinstance(body, dict) and "prompt" in body \
            else "/v1/chat/completions"
        got, _, text = post(port, path, body)
        assert got == status, (body, text)
        error = json.loads(text)["error"]
        assert all(w in error["message"] for w in words), (body, error)
        assert "Traceback" not in text and error["type"]
    assert post(port, "/v1/nothing", {})[0] == 404
    with pytest.raises(openai.BadRequestError, match="n=2"):
        client(port).chat.completions.create(model="tiny", n=2,
                                             messages=[{"role": "user", "content": "你好"}])


def test_full_queue_is_503_and_timeouts_504(decoder, vocab):
    _, running, model, params = decoder
    engine = make_engine(model, params, vocab, max_batch=8, max_queue=2, margin=8)  # not started
    app = make_app(engine, vocab, model_name="tiny", max_new_tokens=CAP, timeout_s=1.5)
    body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 4}
    with sh.running_server(app) as port:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(post, port, "/v1/chat/completions", body) for _ in range(2)]
            deadline = time.monotonic() + 1.0
            while engine.stats()["waiting"] < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            status, headers, text = post(port, "/v1/chat/completions", body)
            assert status == 503 and headers.get("retry-after") == "1", text
            assert "max_queue=2" in json.loads(text)["error"]["message"]
            for f in waiting:
                status, _, text = f.result()
                assert status == 504 and json.loads(text)["error"]["type"] == "timeout_error"
        assert engine.stats()["waiting"] == 0  # timed-out requests left the queue
        status, _, text = post(port, "/v1/chat/completions", {**body, "stream": True})
        assert status == 504 and "timeout" in json.loads(text)["error"]["message"]
        assert post(port, "/health", None, method="GET")[0] == 503  # the engine is not running


def test_stream_past_its_timeout_ends_with_an_error_event_and_leavers_free_slots(decoder, vocab):
    _, _, model, params = decoder
    engine = make_engine(model, params, vocab, max_batch=8, margin=8)
    sh.run_engine(engine, [{"prompt": [5, 6, 7], "max_tokens": 3}])  # compile first
    engine = make_engine(model, params, vocab, max_batch=8, margin=8)
    step = engine.backend.step
    engine.backend.step = lambda: (time.sleep(0.25), step())[1]  # a slow device
    app = make_app(engine, vocab, model_name="tiny", max_new_tokens=CAP, timeout_s=1.5)
    engine.start()
    body = {"prompt": [5, 6, 7], "max_tokens": 40, "ignore_eos": True}
    try:
        with sh.running_server(app) as port:
            status, _, text = post(port, "/v1/completions", {**body, "stream": True})
        patient = make_app(engine, vocab, model_name="tiny", max_new_tokens=CAP, timeout_s=60)
        with sh.running_server(patient) as port:
            for stream in (True, False):  # a client that leaves frees its slot
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("POST", "/v1/completions", json.dumps({**body, "stream": stream}),
                             {"Content-Type": "application/json"})
                if stream:
                    conn.getresponse().readline()
                else:
                    time.sleep(0.6)
                    assert engine.stats()["running"] == 1
                conn.close()
                deadline = time.monotonic() + 1.2
                while engine.stats()["running"] and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert engine.stats()["running"] == 0, stream
    finally:
        engine.stop()
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]"
    error = [json.loads(e) for e in events[:-1] if "error" in json.loads(e)]
    assert error and error[0]["error"]["type"] == "timeout_error"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"


def test_two_hundred_concurrent_requests(decoder):
    port, *_ = decoder

    async def main():
        c = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                               max_retries=0, timeout=60)

        async def one(i):
            if i % 2:
                r = await c.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": f"第{i}个问题"}],
                    max_tokens=4, temperature=0.7, seed=i)
                return r.choices[0].finish_reason, r.usage.completion_tokens
            chunks = [ch async for ch in await c.completions.create(
                model="tiny", prompt=f"第{i}个", max_tokens=4, stream=True)]
            return chunks[-1].choices[0].finish_reason, chunks[-1].usage.completion_tokens

        try:
            return await asyncio.gather(*(one(i) for i in range(200)))
        finally:
            await c.close()

    start = time.monotonic()
    results = asyncio.run(main())
    assert time.monotonic() - start < 60
    assert len(results) == 200
    assert all(f in ("stop", "length") and 0 <= n <= 4 and (f == "stop" or n == 4)
               for f, n in results)


def test_cli_builds_an_engine_from_a_run_dir(decoder, tmp_path_factory, spm_models, capsys):
    run_dir = sh.loaded("decoder", tmp_path_factory.getbasetemp())[0]
    args, files, bindings = cli.parse_args([f"--run_dir={run_dir}", f"--vocab={spm_models['bpe']}",
                                            "--max_batch=4", "--max_context=64",
                                            "--max_new_tokens=32"])
    assert args.host == "127.0.0.1" and args.port == 8000
    engine, _, name = cli.build(args, files, bindings)
    assert name == "decoder_run" and engine.context == 64 and engine.backend.max_batch == 4
    assert not engine.alive
    assert cli.main([f"--run_dir={run_dir}/missing", f"--vocab={spm_models['bpe']}"]) == 2
    assert "config.gin not found" in capsys.readouterr().err


def test_throughput_benchmark_client(decoder):
    from zhchat.benchmarks import serve_throughput

    port, *_ = decoder
    row = asyncio.run(serve_throughput.drive(port, concurrency=4, requests=8, max_tokens=3))
    assert row["errors"] == 0 and row["requests"] == 8 and row["output_tokens_per_s"] > 0
    assert 0 < row["ttft_p50_s"] <= row["latency_p90_s"]

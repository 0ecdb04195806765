"""An OpenAI-compatible HTTP chat server with batched decoding (`python -m zhchat.scripts.serve`).

Modules by concern: `protocol` (request/response bodies, OpenAI field names), `text`
(incremental detokenization, stop strings), `rows` (shape buckets, per-row sampler),
`decoder_batch` (continuous batching for the decoder), `encdec_batch` (static batches for the
T5), `engine` (request queue + decode thread), `app` (FastAPI app factory `make_app`), `cli`
(arguments, loading a run, uvicorn). docs/serving.md has the endpoints, limits and design.
"""

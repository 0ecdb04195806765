"""Benchmark workloads shared by our benchmarks and the HF baselines, so both run the same shapes.

A workload names a gin model preset and the batch/sequence shapes; `load_model` parses the preset
(plus extra bindings such as a tiny vocab for CPU smoke runs) and returns the model wrapper and its
config, which the HF baseline translates into the equivalent transformers config.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import gin

import zhchat.gin_configs

GIN_DIR = os.path.dirname(zhchat.gin_configs.__file__)


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model preset and the shapes of one training / decoding benchmark."""

    name: str
    preset: str            # gin file under gin_configs/models/
    kind: str              # "decoder" or "encdec"
    batch_size: int
    seq_len: int           # decoder length, or the targets length of an encoder-decoder
    inputs_len: int = 0    # encoder length (encdec only)


WORKLOADS = {
    "decoder_1b": Workload("decoder_1b", "decoder_1b.gin", "decoder", batch_size=8, seq_len=2048),
    "t5_large": Workload("t5_large", "t5_large.gin", "encdec", batch_size=64, seq_len=114,
                         inputs_len=512),
    "decoder_100m": Workload("decoder_100m", "decoder_100m.gin", "decoder", batch_size=32,
                             seq_len=2048),
    "decoder_tiny": Workload("decoder_tiny", "decoder_tiny.gin", "decoder", batch_size=2,
                             seq_len=32),
    "t5_tiny": Workload("t5_tiny", "t5_tiny.gin", "encdec", batch_size=2, seq_len=16,
                        inputs_len=32),
}


def get_workload(name: str, *, batch_size: int | None = None, seq_len: int | None = None,
                 inputs_len: int | None = None) -> Workload:
    """The named workload with optional shape overrides."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {sorted(WORKLOADS)}")
    w = WORKLOADS[name]
    return dataclasses.replace(w, batch_size=batch_size or w.batch_size, seq_len=seq_len or w.seq_len,
                               inputs_len=inputs_len or w.inputs_len)


def load_model(workload: Workload, bindings: list[str] | tuple[str, ...] = ()) -> Any:
    """Parses the workload's gin preset (clearing earlier gin state) and returns `%MODEL`."""
    gin.clear_config()
    gin.parse_config_files_and_bindings([os.path.join(GIN_DIR, "models", workload.preset)],
                                        list(bindings))
    return gin.query_parameter("%MODEL").scoped_configurable_fn()


def synthetic_batch(workload: Workload, vocab_size: int, seed: int = 0, *, packed: bool = True
                    ) -> dict[str, Any]:
    """One batch of uniformly random tokens (numpy, seqio model-feature names), no padding. Decoder
    rows carry segment ids and positions (packing-ready) unless `packed=False`; encoder-decoder rows
    never do (unpacked, as seqio's EncDecFeatureConverter(pack=False))."""
    import numpy as np

    rng = np.random.default_rng(seed)
    b, t = workload.batch_size, workload.seq_len
    toks = rng.integers(2, vocab_size, size=(b, t + 1), dtype=np.int32)
    batch = {"decoder_input_tokens": toks[:, :-1], "decoder_target_tokens": toks[:, 1:],
             "decoder_segment_ids": np.ones((b, t), np.int32),
             "decoder_positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
             "decoder_loss_weights": np.ones((b, t), np.float32)}
    if workload.kind == "encdec" or not packed:
        for k in ("decoder_segment_ids", "decoder_positions"):
            del batch[k]
    if workload.kind == "encdec":
        batch["encoder_input_tokens"] = rng.integers(2, vocab_size, size=(b, workload.inputs_len),
                                                     dtype=np.int32)
    return batch


def cache_batches(cache_dir: str, workload: Workload, num_batches: int
                  ) -> tuple[Workload, list[dict[str, Any]], dict[str, float]]:
    """The first `num_batches` batches of a packed cache, in the trainer's reader order without
    shuffling: (the workload at the cache's lengths, host batches, packing statistics). Real rows
    (several documents each, padding at the end) instead of the synthetic one-document rows."""
    import numpy as np

    with gin.unlock_config():  # the reader registers a configurable; the model's gin is parsed
        from zhchat.tasks import cache_reader

    meta = cache_reader.cache_metadata(cache_dir)
    lengths = meta["task_feature_lengths"]
    kinds = {"decoder": ("decoder", "prefix_lm"), "encdec": ("encdec",)}[workload.kind]
    if meta.get("converter") not in kinds:
        raise ValueError(f"{cache_dir} holds {meta.get('converter')!r} rows; workload "
                         f"{workload.name} needs {' or '.join(map(repr, kinds))} rows")
    need = num_batches * workload.batch_size
    if meta["num_examples"] < need:
        raise ValueError(f"{cache_dir} holds {meta['num_examples']} rows, fewer than "
                         f"{num_batches} batches of {workload.batch_size}")
    if workload.kind == "decoder":  # prefix-LM rows hold inputs + targets
        workload = dataclasses.replace(
            workload, seq_len=meta["features"]["decoder_target_tokens"]["length"])
    else:
        workload = dataclasses.replace(workload, seq_len=lengths["targets"],
                                       inputs_len=lengths["inputs"])
    it = cache_reader.make_cache_iterator(cache_dir=cache_dir, batch_size=workload.batch_size,
                                          shuffle=False, shard_index=0, shard_count=1,
                                          num_threads=4, prefetch_buffer_size=4)
    batches = [{k: np.asarray(v) for k, v in next(it).items()} for _ in range(num_batches)]
    seg_key = "decoder_segment_ids"
    segs = np.concatenate([b[seg_key] for b in batches])
    starts = (segs != 0) & (segs != np.pad(segs[:, :-1], ((0, 0), (1, 0))))
    docs = starts.sum(axis=1)
    stats = {"rows": int(segs.shape[0]), "documents_per_row": float(docs.mean()),
             "max_documents_per_row": int(docs.max()),
             "non_padding_fraction": float((segs != 0).mean())}
    if "decoder_causal_attention" in batches[0]:  # prefix-LM rows: the bidirectional share
        prefix = np.concatenate([b["decoder_causal_attention"] for b in batches])
        stats["prefix_fraction"] = float((prefix != 0).mean())
    return workload, batches, stats


def flops_per_example(model: Any, workload: Workload) -> float:
    """Training FLOPs of one example (PaLM appendix B via the model's own counter)."""
    if workload.kind == "encdec":
        per_token = model.flops_per_token(workload.seq_len, inputs_length=workload.inputs_len)
    else:
        per_token = model.flops_per_token(workload.seq_len)
    return per_token * workload.seq_len


def tokens_per_example(workload: Workload) -> int:
    """Tokens one example carries through the model (encoder inputs + decoder targets)."""
    return workload.seq_len + workload.inputs_len


def emit(result: dict[str, Any], out: str | None) -> None:
    """Prints a result as one json line and appends it to `out` when given (named by the
    ZHCHAT_BENCH_RUN environment variable, which the runner sets to the benchmark's name)."""
    if os.environ.get("ZHCHAT_BENCH_RUN"):
        result = {"run": os.environ["ZHCHAT_BENCH_RUN"], **result}
    line = json.dumps(result)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")

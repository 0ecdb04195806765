"""train_throughput's per-batch attention-path statistics name the path the model takes: prefix-LM
rows split only when their inputs lead and both tables fit (and the split is on), and T5's packed
cross-attention only when it is switched on and the segments pair."""

import numpy as np

from zhchat.benchmarks import train_throughput
from zhchat.models import decoder, t5


def _decoder_batch(prefix_rows):
    seg = np.array([[1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]], np.int32)
    return {"decoder_segment_ids": seg, "decoder_causal_attention": np.array(prefix_rows, np.int32)}


def test_prefix_rows_split_only_when_inputs_lead():
    leading = _decoder_batch([[1, 0, 0, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]])
    # an input after a target in row 0's first segment: the dense prefix-LM mask
    late = _decoder_batch([[0, 1, 0, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]])
    cfg = decoder.DecoderConfig(max_segments_per_row=2)
    stats = train_throughput._attention_paths(cfg, [leading, late], groups=1)
    assert stats["prefix_split_batches"] == 0.5
    assert stats["packed_batches"] == 0.5 and stats["masked_batches"] == 0.5
    off = decoder.DecoderConfig(max_segments_per_row=2, split_prefix_attention=False)
    assert train_throughput._attention_paths(off, [leading], groups=1)["masked_batches"] == 1.0
    causal = {"decoder_segment_ids": leading["decoder_segment_ids"]}
    assert "prefix_split_batches" not in train_throughput._attention_paths(cfg, [causal], 1)


def test_cross_path_counts_only_when_switched_on():
    batch = {"decoder_segment_ids": np.array([[1, 1, 2, 0]], np.int32),
             "encoder_segment_ids": np.array([[1, 1, 1, 2, 2, 0]], np.int32)}
    unpaired = dict(batch, decoder_segment_ids=np.array([[1, 1, 1, 0]], np.int32))
    on = t5.T5Config(vocab_size=32, d_model=8, num_heads=2, head_dim=4, d_ff=8,
                     packed_cross_attention=True, max_segments_per_row=2)
    assert train_throughput._cross_paths(on, [batch, unpaired], 1)["cross_packed_batches"] == 0.5
    off = t5.T5Config(vocab_size=32, d_model=8, num_heads=2, head_dim=4, d_ff=8)
    assert train_throughput._cross_paths(off, [batch], 1)["cross_packed_batches"] == 0.0

"""Prefix-LM self-attention (bidirectional inputs, causal targets) through flash kernels.

A prefix-LM row (seqio's PrefixLMFeatureConverter: `decoder_causal_attention` is 1 on each
example's inputs) lets the inputs of a segment see each other both ways and every later token see
them causally. No flash kernel takes that mask, but when the prefix tokens come first in each
segment (as seqio writes them) it splits into two masks they do take:

- a prefix token sees exactly the prefix of its own segment: bidirectional attention over the
  "input ids" (the segment id on prefix tokens, 0 elsewhere);
- any other token sees what plain causal attention within its segment gives (the whole prefix lies
  before it).

So the output is the bidirectional call's on prefix tokens and the causal call's elsewhere, each
run by models/attention.py's `packed_attention` (cuDNN's packed layout on Hopper, splash on TPU).
On cuDNN a segment of length L with p inputs costs L^2 / 2 + p^2 against the causal call's L^2 / 2
(1.7x at the 58% inputs of the SFT rows measured); splash's bidirectional call has no tables and
sees the whole row (~3x). Both against a dense [batch, 1, len, len] mask. Rows whose
prefix tokens do not lead their segment, batches whose documents overflow either segment table, and
XLA (CPU; GPUs without cuDNN's packed layout) use the dense mask, one fallback for both calls; the choice is a
`lax.cond` on the batch, so one compiled step serves every batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from zhchat.models import attention, layers, splash

Array = jax.Array


class PrefixInfo(NamedTuple):
    """Facts about a batch's prefix-LM rows, shared by every layer of one forward."""

    segments: attention.SegmentInfo   # of the rows' segment ids (the causal call)
    inputs: attention.SegmentInfo     # of `input_ids` (the bidirectional call)
    input_ids: Array                  # [batch, len] segment id on prefix tokens, 0 elsewhere
    leading: Array                    # scalar bool: in every segment the prefix tokens come first


def input_segment_ids(segment_ids: Array, prefix: Array) -> Array:
    """[batch, len] the segment id on prefix (input) tokens, 0 on targets and padding."""
    seg = segment_ids.astype(jnp.int32)
    return jnp.where(prefix.astype(bool) & (seg != 0), seg, 0)


def prefix_leads(segment_ids: Array, prefix: Array) -> Array:
    """True (scalar) when no prefix token follows a non-prefix token of its own segment."""
    seg, inp = segment_ids.astype(jnp.int32), prefix.astype(bool) & (segment_ids != 0)
    late = inp[:, 1:] & ~inp[:, :-1] & (seg[:, 1:] == seg[:, :-1])
    return ~jnp.any(late)


def prefix_info(segment_ids: Array, prefix: Array, max_segments: int, *,
                groups: int = 1) -> PrefixInfo:
    """The segment tables of both calls (see models/attention.py's `segment_info`)."""
    ids = input_segment_ids(segment_ids, prefix)
    return PrefixInfo(segments=attention.segment_info(segment_ids, max_segments, groups=groups),
                      inputs=attention.segment_info(ids, max_segments, groups=groups),
                      input_ids=ids, leading=prefix_leads(segment_ids, prefix))


def _split(q: Array, k: Array, v: Array, segment_ids: Array, info: PrefixInfo,
           implementation: str) -> Array:
    causal = attention.packed_attention(q, k, v, segment_ids=segment_ids, info=info.segments,
                                        causal=True, implementation=implementation,
                                        fallback=False)
    inputs = attention.packed_attention(q, k, v, segment_ids=info.input_ids, info=info.inputs,
                                        causal=False, implementation=implementation,
                                        fallback=False)
    return jnp.where((info.input_ids != 0)[:, :, None, None], inputs, causal)


def prefix_lm_attention(q: Array, k: Array, v: Array, *, segment_ids: Array, prefix: Array,
                        info: PrefixInfo | None = None, implementation: str = "auto",
                        max_segments: int = 16) -> Array:
    """Prefix-LM attention of q [b, t, n, h] over k/v [b, t, kv, h] within each row's segments:
    what `layers.make_attention_mask(seg, seg, causal=True, query_prefix=prefix,
    kv_prefix=prefix)` gives. Outputs on padding positions are unspecified."""
    def masked(q, k, v, segment_ids, prefix):
        mask = layers.make_attention_mask(segment_ids, segment_ids, causal=True,
                                          query_prefix=prefix, kv_prefix=prefix)
        return layers.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    impl = layers.resolve_attention_impl(implementation, q.dtype, q.shape[-1])
    on_splash = impl == "splash" and splash.supported(q.shape[1], q.shape[-1])
    if not on_splash and not attention.uses_packed_kernel(implementation, q.dtype, q.shape[-1]):
        return masked(q, k, v, segment_ids, prefix)  # two XLA calls would cost twice this one
    if info is None:
        info = prefix_info(segment_ids, prefix, max_segments,
                           groups=attention.batch_groups(q.shape[0]))
    ok = info.leading
    if not on_splash:  # one dense fallback for the whole split, not one per call
        ok = ok & attention.table_fits(info.segments) & attention.table_fits(info.inputs)
    split = lambda: _split(q, k, v, segment_ids, info, implementation)
    # the rare fallback is rematerialised: a cond's backward keeps every branch's residuals
    dense = lambda: jax.checkpoint(masked)(q, k, v, segment_ids, prefix)
    return jax.lax.cond(ok, split, dense)

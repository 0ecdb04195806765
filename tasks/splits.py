"""Train/validation split of documents by a hash of their id, with no TensorFlow import.

The seqio tasks (tasks/lm.py, tasks/sft.py), the tokenizer trainer and the pipeline all split with
this one function, so a document held out of the tokenizer is also held out of every cache.
"""

from __future__ import annotations

import hashlib


def split_of(doc_id: str, validation_fraction: float, salt: str = "") -> str:
    """'validation' for a deterministic `validation_fraction` of ids (md5 of salt+id), else 'train'."""
    digest = hashlib.md5((salt + doc_id).encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "validation" if u < validation_fraction else "train"

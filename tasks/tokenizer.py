"""SentencePiece tokenizer training for Chinese corpora, and the seqio vocabulary over the result.

The model uses T5's ids (pad=0, eos=1, unk=2, no bos), byte fallback (so any text round-trips),
split digits, chat tokens as user-defined pieces, identity normalization and kept whitespace (text
normalization is the cleaning pipeline's job, the tokenizer must not silently change text).
Line breaks, tabs and runs of spaces are pieces too (`WHITESPACE_PIECES`): SentencePiece trains on
single lines, so without them every "\n" of chat turns, lists or code costs a byte token. (The
human-readable `.vocab` listing then shows those pieces as raw line breaks; `.model` is what loads.)
The report gives the byte-fallback rate with and without whitespace bytes. Every input path is
checked before the corpus is read.
Memory stays bounded on big corpora: documents are streamed, split into sentences, and at most
`input_sentence_size` sentences are reservoir-sampled (seeded) into a temporary file that
SentencePiece trains from. 100 T5 sentinels are not part of the model: like seqio, they are appended
as extra ids at load time (`get_seqio_vocabulary`, `zhchat.tasks.vocabulary.Vocabulary`).

CLI: python -m zhchat.tasks.tokenizer --input 'corpus/*.jsonl.gz' --format jsonl --model_prefix out/spm \
        --vocab_size 32000 --heldout heldout.txt
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
from typing import Iterable, Iterator, Sequence

import gin
import sentencepiece as spm
import tqdm

from zhchat.tasks import sources
from zhchat.tasks.splits import split_of

CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
# user-defined, so matched longest-first in any text; "▁" is SentencePiece's space
WHITESPACE_PIECES = ("\n", "\n\n", "\t", "▁▁", "▁▁▁▁", "▁▁▁▁▁▁▁▁")
_WHITESPACE_BYTES = ("<0x09>", "<0x0A>", "<0x0D>", "<0x20>")
_SENTENCE_END = re.compile(r"(?<=[。！？；!?;])")


class VocabSizeError(ValueError):
    """The requested vocabulary does not fit the corpus."""


def split_sentences(text: str, max_chars: int = 1000) -> Iterator[str]:
    """Lines of `text`; a line longer than `max_chars` is cut after sentence punctuation, then hard."""
    for line in text.splitlines():
        if not line.strip():
            continue
        if len(line) <= max_chars:
            yield line
            continue
        piece = ""
        for sentence in _SENTENCE_END.split(line):
            if piece and len(piece) + len(sentence) > max_chars:
                yield piece
                piece = ""
            piece += sentence
            while len(piece) > max_chars:
                yield piece[:max_chars]
                piece = piece[max_chars:]
        if piece.strip():
            yield piece


def reservoir_sample(sentences: Iterable[str], k: int, seed: int) -> tuple[list[str], int]:
    """Uniform sample of at most k items from a stream (Algorithm R); returns (sample, items seen)."""
    rng = random.Random(seed)
    sample: list[str] = []
    n = 0
    for n, s in enumerate(sentences, start=1):
        if len(sample) < k:
            sample.append(s)
        else:
            j = rng.randrange(n)
            if j < k:
                sample[j] = s
    return sample, n


def tokenizer_stats(model_file: str, texts: Iterable[str]) -> dict:
    """chars/token, byte-fallback rate (share of `<0x..>` byte pieces; also without the whitespace
    bytes tab/LF/CR/space, which a tokenizer without whitespace pieces spends on layout), unk rate,
    and whether every text decodes back to itself."""
    sp = spm.SentencePieceProcessor(model_file=model_file)
    space_ids = {sp.piece_to_id(p) for p in _WHITESPACE_BYTES}
    chars = tokens = byte_tokens = space_bytes = unk_tokens = mismatches = 0
    for text in texts:
        ids = sp.encode(text)
        chars += len(text)
        tokens += len(ids)
        byte_tokens += sum(1 for i in ids if sp.is_byte(i))
        space_bytes += sum(1 for i in ids if i in space_ids)
        unk_tokens += sum(1 for i in ids if i == sp.unk_id())
        mismatches += sp.decode(ids) != text
    if tokens == 0:
        raise ValueError("held-out text is empty: cannot compute tokenizer statistics")
    return {"heldout_chars": chars, "heldout_tokens": tokens,
            "chars_per_token": chars / tokens, "byte_fallback_rate": byte_tokens / tokens,
            "byte_fallback_rate_non_whitespace": (byte_tokens - space_bytes) / tokens,
            "whitespace_byte_rate": space_bytes / tokens,
            "unk_rate": unk_tokens / tokens, "round_trip_mismatches": mismatches}


def check_paths(*, files: str | Sequence[str], heldout_files: str | Sequence[str] | None,
                model_prefix: str) -> None:
    """Fails now, not after the training: inputs that match nothing, an unwritable output folder."""
    sources.expand_files(files)
    if heldout_files:
        sources.expand_files(heldout_files)
    out_dir = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise PermissionError(f"model_prefix {model_prefix!r}: folder {out_dir} is not writable")


@gin.configurable
def train_tokenizer(*, files: str | Sequence[str], format: str, model_prefix: str,
                    vocab_size: int = 32000, model_type: str = "unigram", text_field: str = "text",
                    character_coverage: float = 0.9995,
                    user_defined_symbols: Sequence[str] = CHAT_TOKENS,
                    whitespace_pieces: Sequence[str] = WHITESPACE_PIECES,
                    input_sentence_size: int = 2_000_000, max_sentence_chars: int = 1000,
                    seed: int = 0, add_dummy_prefix: bool = True,
                    heldout_files: str | Sequence[str] | None = None,
                    heldout_format: str | None = None, heldout_max_chars: int = 2_000_000,
                    validation_fraction: float = 0.0, split_salt: str = "",
                    num_threads: int | None = None, verbose: bool = False,
                    progress: bool = True) -> dict:
    """Trains `<model_prefix>.model/.vocab` and writes `<model_prefix>.stats.json`; returns the stats.

    `validation_fraction` > 0 (without `heldout_files`): trains on the documents of `files` that
    tasks/splits.split_of puts in 'train' and reports on the 'validation' ones, the same documents
    the seqio tasks hold out with that fraction and salt."""
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    if not 0.98 <= character_coverage <= 1.0:  # SentencePiece's own bounds
        raise ValueError(f"character_coverage must be in [0.98, 1], got {character_coverage}")
    check_paths(files=files, heldout_files=heldout_files, model_prefix=model_prefix)
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    if validation_fraction and heldout_files:
        raise ValueError("give heldout_files or validation_fraction, not both")
    counter = sources.SkipCounter()

    def split_docs(split: str) -> Iterator[dict]:
        for doc in sources.iter_documents(files=files, format=format, text_field=text_field,
                                          counter=counter):
            if not validation_fraction or split_of(str(doc["id"]), validation_fraction,
                                                   split_salt) == split:
                yield doc

    docs = split_docs("train")
    docs = tqdm.tqdm(docs, desc="reading corpus", unit=" docs", disable=not progress)
    n_docs = 0

    def sentences() -> Iterator[str]:
        nonlocal n_docs
        for doc in docs:
            n_docs += 1
            yield from split_sentences(doc["text"], max_sentence_chars)

    sample, n_sentences = reservoir_sample(sentences(), input_sentence_size, seed)
    if counter.total:
        print(f"skipped while reading {files}:\n{counter.report()}", file=sys.stderr)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as f:
        f.writelines(s + "\n" for s in sample)
        sample_file = f.name
    if progress:
        print(f"training {model_type} SentencePiece (vocab {vocab_size}) on {len(sample)} of "
              f"{n_sentences} sentences from {n_docs} documents", file=sys.stderr)
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            input=sample_file, model_prefix=model_prefix, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage, byte_fallback=True,
            split_digits=True,
            user_defined_symbols=list(dict.fromkeys([*user_defined_symbols, *whitespace_pieces])),
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
            pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=add_dummy_prefix, allow_whitespace_only_pieces=True,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            max_sentence_length=4 * max_sentence_chars + 16,  # bytes: a CJK char is 3
            num_threads=num_threads or os.cpu_count() or 1, minloglevel=0 if verbose else 1)
    except RuntimeError as e:
        msg = str(e)
        if "Vocabulary size too high" in msg or "Vocabulary size is smaller than" in msg:
            limit = re.search(r"Vocabulary size.*", msg)
            raise VocabSizeError(
                f"vocab_size={vocab_size} does not fit the corpus {files} ({n_sentences} sentences, "
                f"{len(sample)} sampled): {limit.group(0) if limit else msg}") from None
        raise
    finally:
        os.unlink(sample_file)
    stats = {"model_file": model_prefix + ".model", "vocab_size": vocab_size,
             "model_type": model_type, "documents_read": n_docs, "sentences_seen": n_sentences,
             "sentences_sampled": len(sample), "skipped": counter.as_dict()}
    heldout_texts: list[str]
    if heldout_files or validation_fraction:
        heldout_docs = (split_docs("validation") if validation_fraction else
                        sources.iter_documents(files=heldout_files, format=heldout_format or format,
                                               text_field=text_field, counter=counter))
        heldout_texts, budget = [], heldout_max_chars
        for doc in heldout_docs:
            heldout_texts.append(doc["text"][:budget])
            budget -= len(heldout_texts[-1])
            if budget <= 0:
                break
        stats["heldout"] = (str(heldout_files) if heldout_files else
                            f"validation split ({validation_fraction:g}) of {files}")
    else:  # no held-out corpus: report on (the end of) the training sample, and say so
        heldout_texts = sample[-10_000:]
        stats["heldout"] = "training sample (no held-out text given)"
    stats.update(tokenizer_stats(model_prefix + ".model", heldout_texts))
    with open(model_prefix + ".stats.json", "w", encoding="utf-8") as f:
        json.dump(stats, f, ensure_ascii=False, indent=2)
    return stats


@gin.configurable
def get_seqio_vocabulary(path: str = gin.REQUIRED, extra_ids: int = 100):
    """seqio.SentencePieceVocabulary with T5's sentinels as extra ids (`<extra_id_0>` = highest id)."""
    import seqio  # lazily: training a tokenizer must not start TensorFlow

    return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", action="append", required=True, help="file or glob; repeatable")
    p.add_argument("--format", default="jsonl", choices=sources.FORMATS)
    p.add_argument("--text_field", default="text")
    p.add_argument("--model_prefix", required=True)
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--model_type", default="unigram", choices=("bpe", "unigram"))
    p.add_argument("--character_coverage", type=float, default=0.9995)
    p.add_argument("--chat_tokens", default=",".join(CHAT_TOKENS),
                   help="comma-separated user-defined pieces")
    p.add_argument("--input_sentence_size", type=int, default=2_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout", action="append", help="held-out file or glob for the statistics")
    p.add_argument("--heldout_format", default="txt_file", choices=sources.FORMATS)
    p.add_argument("--validation_fraction", type=float, default=0.0,
                   help="hold out this fraction of --input documents by id (as the seqio tasks do: "
                        "train on the rest, report on them); instead of --heldout")
    p.add_argument("--split_salt", default="")
    p.add_argument("--verbose", action="store_true", help="show SentencePiece's own log")
    args = p.parse_args(argv)
    try:
        stats = train_tokenizer(
            files=args.input, format=args.format, text_field=args.text_field,
            model_prefix=args.model_prefix, vocab_size=args.vocab_size, model_type=args.model_type,
            character_coverage=args.character_coverage,
            user_defined_symbols=[t for t in args.chat_tokens.split(",") if t],
            input_sentence_size=args.input_sentence_size, seed=args.seed,
            heldout_files=args.heldout, heldout_format=args.heldout_format,
            validation_fraction=args.validation_fraction, split_salt=args.split_salt,
            verbose=args.verbose)
    except (VocabSizeError, FileNotFoundError, PermissionError, ValueError) as e:
        print(f"error: {str(e).split(chr(10) + '  In call to configurable')[0]}", file=sys.stderr)
        return 2
    print(f"wrote {stats['model_file']} ({args.model_type}, vocab {args.vocab_size}); on "
          f"{stats['heldout']}: {stats['chars_per_token']:.3f} chars/token, byte-fallback rate "
          f"{stats['byte_fallback_rate']:.5f} ({stats['byte_fallback_rate_non_whitespace']:.5f} "
          f"without whitespace bytes), unk rate {stats['unk_rate']:.5f}, "
          f"{stats['round_trip_mismatches']} round-trip mismatches")
    print(f"stats: {args.model_prefix}.stats.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

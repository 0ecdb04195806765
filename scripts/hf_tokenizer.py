"""A HF fast tokenizer (`tokenizers` library) with zhchat.tasks.vocabulary.Vocabulary's ids.

Everything comes from the SentencePiece model proto, nothing from how zhchat happens to train it:
the pieces and their types, the model type (Unigram or BPE), the normalizer spec (precompiled
charsmap, extra-whitespace removal, dummy prefix, whitespace escaping) and the user-defined
symbols (chat tokens, newline or space-run pieces); seqio's sentinels `▁<extra_id_N>` follow the
pieces, `<extra_id_0>` the highest id. SentencePiece does not split text into words, so neither
does this tokenizer: the normalizer rebuilds SentencePiece's normalized text and the model runs
over all of it, so whitespace-only pieces (`▁▁▁`), newlines and byte fallback match.
User-defined symbols are matched as SentencePiece matches them: in the Unigram lattice with its
bonus score, and for BPE as pre-tokens that are never merged (SentencePiece freezes them).
No BOS/EOS is added on encode (as `Vocabulary.encode`); control ids decode to "" with
`skip_special_tokens=True`, and `split_special_tokens` keeps text from producing them.

Where ids can still differ (tests/scripts/test_hf_interop.py measures them):
- Unigram ties: two orders of the same pieces score the same (a run of six spaces: `▁▁▁▁▁` `▁`
  or `▁` `▁▁▁▁▁`); SentencePiece picks by the float32 rounding of its running path score, HF
  (float64) keeps the earlier piece. Same pieces, same text; on very long inputs (thousands of
  tokens) float32 rounding can also flip near-ties.
- A literal reserved string (`</s>`, `<pad>`, `<0x41>`) in the text: SentencePiece never matches
  reserved pieces. Here Unigram gives them a score far below all others and BPE has no merge
  producing them, so such text still splits into characters, unless (Unigram) one of its
  characters is outside the vocabulary or (BPE) it is a whole pre-token.
"""

from __future__ import annotations

import json
import os
from typing import Any

_RESERVED_SCORE = -1e6  # Unigram score of pieces SentencePiece never matches in text
_FLT_MIN = 1.1754943508222875e-38
_PRIVATE_USE = 0xF0000  # placeholders for user-defined pieces while the charsmap runs


def load_model_proto(spm_model_path: str) -> Any:
    """The parsed SentencePiece ModelProto of `spm_model_path`."""
    from sentencepiece import sentencepiece_model_pb2

    if not os.path.isfile(spm_model_path):
        raise FileNotFoundError(f"SentencePiece model {spm_model_path} not found")
    proto = sentencepiece_model_pb2.ModelProto()
    with open(spm_model_path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def vocab_size(spm_model_path: str, *, extra_ids: int = 100) -> int:
    """Ids of the exported tokenizer: SentencePiece pieces + sentinels (`Vocabulary.vocab_size`)."""
    return len(load_model_proto(spm_model_path).pieces) + extra_ids


def _normalizer(spec: Any, user_defined: list[str]) -> Any:
    """SentencePiece's normalizer: the precompiled charsmap (which SentencePiece does not apply
    inside user-defined pieces, so those it would change are swapped for private-use characters
    around it), extra-whitespace removal, the dummy prefix and `▁` for spaces."""
    from tokenizers import Regex, normalizers

    steps, restore = [], []
    if spec.precompiled_charsmap:
        charsmap = normalizers.Precompiled(spec.precompiled_charsmap)
        changed = [p for p in user_defined if charsmap.normalize_str(p) != p]
        for i, piece in enumerate(sorted(changed, key=len, reverse=True)):
            placeholder = chr(_PRIVATE_USE + i)
            steps.append(normalizers.Replace(piece, placeholder))
            restore.append(normalizers.Replace(placeholder, piece))
        steps.append(charsmap)
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex("^ | $"), "")]
    steps += restore
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    return normalizers.Sequence(steps)


def _bpe_merges(pieces: list[str], mergeable: set[str]) -> list[tuple[str, str]]:
    """Every split (a, b) of a mergeable piece into two known pieces, in the piece order (higher
    SentencePiece score first), which is the order SentencePiece's BPE applies merges in."""
    merges = []
    for piece in pieces:
        if piece in mergeable:
            merges += [(piece[:i], piece[i:]) for i in range(1, len(piece))
                       if piece[:i] in mergeable and piece[i:] in mergeable]
    return merges


def _user_defined_score(normal_scores: list[float], piece: str) -> float:
    """SentencePiece's Unigram score of a user-defined piece (unigram_model.cc): its UTF-8 length
    times the best NORMAL score floored at FLT_MIN, minus 0.1 (about -0.1: above any real path)."""
    return len(piece.encode()) * max([_FLT_MIN] + normal_scores) - 0.1


def build_tokenizer(spm_model_path: str, *, extra_ids: int = 100) -> Any:
    """A `tokenizers.Tokenizer` giving the ids of `Vocabulary(spm_model_path, extra_ids)`."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    proto = load_model_proto(spm_model_path)
    spec, trainer = proto.normalizer_spec, proto.trainer_spec
    if trainer.treat_whitespace_as_suffix:
        raise ValueError(f"{spm_model_path}: treat_whitespace_as_suffix is not supported")
    kind = pb.ModelProto.SentencePiece
    pieces = [(p.piece, p.type, p.score) for p in proto.pieces]
    pieces += [(f"▁<extra_id_{i}>", kind.USER_DEFINED, 0.0) for i in reversed(range(extra_ids))]
    names = [p for p, _, _ in pieces]
    user_defined = [p for p, t, _ in pieces if t == kind.USER_DEFINED]
    unk_id = next(i for i, (_, t, _) in enumerate(pieces) if t == kind.UNKNOWN)
    pre_tokenizer = None
    if trainer.model_type == pb.TrainerSpec.UNIGRAM:
        # one lattice over the whole text, as SentencePiece: user-defined pieces get its bonus,
        # reserved pieces a score no path takes
        normal = [score for _, t, score in pieces if t == kind.NORMAL]
        scores = [score if t == kind.NORMAL else _user_defined_score(normal, p)
                  if t == kind.USER_DEFINED else _RESERVED_SCORE for p, t, score in pieces]
        model = models.Unigram(list(zip(names, scores)), unk_id=unk_id,
                               byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == pb.TrainerSpec.BPE:
        # SentencePiece's BPE never merges across a user-defined piece (it is one frozen symbol):
        # isolate them before the model, which emits a pre-tokenized word found in the vocabulary
        # as it is (`ignore_merges`) and merges the rest in SentencePiece's score order
        normal = {p for p, t, _ in pieces if t == kind.NORMAL}
        model = models.BPE({p: i for i, p in enumerate(names)}, _bpe_merges(names, normal),
                           unk_token=names[unk_id], byte_fallback=trainer.byte_fallback,
                           ignore_merges=bool(user_defined))
        if user_defined:
            alternatives = "|".join(_regex_escape(p) for p in sorted(user_defined, key=len,
                                                                      reverse=True))
            pre_tokenizer = pre_tokenizers.Split(Regex(alternatives), "isolated")
    else:
        raise ValueError(f"{spm_model_path}: SentencePiece model type "
                         f"{pb.TrainerSpec.ModelType.Name(trainer.model_type)} is not supported "
                         "(unigram and bpe are)")
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = _normalizer(spec, user_defined)
    if pre_tokenizer is not None:
        tokenizer.pre_tokenizer = pre_tokenizer
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix or spec.remove_extra_whitespaces:
        steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(steps)
    # control pieces are special (skipped on decode); `split_special_tokens` keeps text from
    # producing them (tokenizer_config.json)
    tokenizer.add_special_tokens([AddedToken(p, normalized=False, special=True)
                                  for p, t, _ in pieces if t in (kind.CONTROL, kind.UNKNOWN)])
    return tokenizer


def _regex_escape(text: str) -> str:
    return "".join("\\" + c if c in r".^$*+?{}[]\|()" else c for c in text)


def export_tokenizer(spm_model_path: str, out_dir: str, *, extra_ids: int = 100,
                     model_max_length: int | None = None) -> list[str]:
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json to `out_dir`
    (loadable with transformers.AutoTokenizer); returns the paths written."""
    tokenizer = build_tokenizer(spm_model_path, extra_ids=extra_ids)
    proto = load_model_proto(spm_model_path)
    specials = {}
    for name in ("pad", "eos", "unk", "bos"):
        i = getattr(proto.trainer_spec, f"{name}_id")
        if i >= 0:
            specials[f"{name}_token"] = proto.pieces[i].piece
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, n) for n in
             ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")]
    tokenizer.save(paths[0])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "split_special_tokens": True, **specials}
    if model_max_length:
        config["model_max_length"] = model_max_length
    for path, obj in zip(paths[1:], (config, specials)):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=2)
    return paths

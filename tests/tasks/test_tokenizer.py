"""Tokenizer training (both model types), its statistics and errors, and TF-free == seqio ids."""

import json

import numpy as np
import pytest

from tests.conftest import VOCAB_SIZE
from zhchat.tasks import tokenizer
from zhchat.tasks.vocabulary import Vocabulary

TEXTS = [
    "子曰：“学而时习之，不亦说乎？”",
    "  Hello,  World!  tabs\tand\nnew lines\n\n",
    "表情😀🎉👍🏽 与 ASCII mixed: x=42, y=３.１４ 「引号」",
    "生僻字：𠀀𪚥龘 罕见 ＃＠",
    "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n",
    "",
    " ",
]


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_round_trip_chat_tokens_and_sentinels(spm_models, model_type):
    v = Vocabulary(spm_models[model_type])
    assert v.base_vocab_size == VOCAB_SIZE and v.vocab_size == VOCAB_SIZE + 100
    for text in TEXTS:
        ids = v.encode(text)
        assert max(ids, default=0) < v.base_vocab_size
        assert v.decode(ids) == text
    assert (v.pad_id, v.eos_id, v.unk_id, v.bos_id) == (0, 1, 2, -1)
    for token, tid in (("<|im_start|>", v.im_start_id), ("<|im_end|>", v.im_end_id)):
        assert v.id_to_piece(tid) == token
        ids = v.encode(f"前{token}后")
        assert tid in ids and v.id_to_piece(ids[ids.index(tid)]) == token
    sentinels = [v.sentinel_id(i) for i in range(100)]
    assert sentinels == list(range(v.vocab_size - 1, v.vocab_size - 101, -1))
    assert v.id_to_piece(v.sentinel_id(0)) == "▁<extra_id_0>"
    assert v.id_to_piece(v.sentinel_id(99)) == "▁<extra_id_99>"
    pieces = [v.id_to_piece(i) for i in v.encode("😀")]
    assert pieces == ["▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]  # dummy prefix + UTF-8 bytes


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_stats_json(spm_models, model_type):
    with open(spm_models[model_type].replace(".model", ".stats.json"), encoding="utf-8") as f:
        stats = json.load(f)
    assert stats["model_type"] == model_type and stats["vocab_size"] == VOCAB_SIZE
    assert stats["sentences_sampled"] == 6000 < stats["sentences_seen"]
    assert "peoples_daily" in stats["heldout"] and stats["heldout_chars"] > 50_000
    assert 0.8 < stats["chars_per_token"] < 3.0
    assert 0.0 < stats["byte_fallback_rate"] < 0.3  # rare characters fall back to bytes
    assert stats["unk_rate"] == 0.0


def test_seqio_parity(spm_models):
    sv = tokenizer.get_seqio_vocabulary(spm_models["unigram"], extra_ids=100)
    v = Vocabulary(spm_models["unigram"])
    assert (v.vocab_size, v.eos_id, v.unk_id, v.pad_id, v.bos_id) == (
        sv.vocab_size, sv.eos_id, sv.unk_id, sv.pad_id, sv.bos_id)
    for text in TEXTS + ["前缀 <extra_id_0> 中间 <extra_id_57> 后缀", "<extra_id_99>"]:
        assert v.encode(text) == list(sv.encode(text)), text
    id_lists = [
        list(range(v.vocab_size - 103, v.vocab_size)),           # top pieces and all sentinels
        [5, 17, v.vocab_size + 4, 9, 1, 33, 44],                 # out of range -> unk; stop at EOS
        v.encode(TEXTS[2]) + [v.sentinel_id(3)] + v.encode("尾"),
    ]
    for ids in id_lists:
        assert v.decode(ids) == sv.decode(ids)
    assert v.decode([5, 1, 6], stop_at_eos=False) != v.decode([5, 1, 6])
    assert v.sentinel_id(0) == sv.tokenizer.piece_to_id("▁<extra_id_0>")


def test_impossible_vocab_size_is_one_clear_error(demo_data_dir, tmp_path, capsys):
    corpus = str(demo_data_dir / "shu_books_sample.jsonl.gz")
    rc = tokenizer.main(["--input", corpus, "--format", "jsonl", "--model_prefix",
                     str(tmp_path / "big"), "--vocab_size", "900000"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "vocab_size=900000" in err and "shu_books_sample.jsonl.gz" in err
    assert "Traceback" not in err and "In call to configurable" not in err
    with pytest.raises(tokenizer.VocabSizeError, match="vocab_size=900000"):
        tokenizer.train_tokenizer(files=corpus, format="jsonl", model_prefix=str(tmp_path / "big"),
                              vocab_size=900000, progress=False)


def test_cli_trains_and_reports(demo_data_dir, tmp_path, capsys):
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("子曰：学而时习之。有朋自远方来，不亦乐乎？😀\n", encoding="utf-8")
    rc = tokenizer.main(["--input", str(demo_data_dir / "shu_*.jsonl.gz"), "--format", "jsonl",
                     "--model_prefix", str(tmp_path / "cli"), "--vocab_size", "3000",
                     "--model_type", "bpe", "--character_coverage", "0.98",
                     "--heldout", str(heldout)])
    out = capsys.readouterr().out
    assert rc == 0 and "chars/token" in out and "byte-fallback rate" in out
    stats = json.loads((tmp_path / "cli.stats.json").read_text(encoding="utf-8"))
    assert stats["heldout_chars"] == len(heldout.read_text(encoding="utf-8").rstrip("\n"))
    assert stats["byte_fallback_rate"] > 0  # the emoji is byte pieces


def test_split_sentences_and_reservoir():
    long_line = "甲乙丙。" * 400
    parts = list(tokenizer.split_sentences("短句\n\n" + long_line, max_chars=100))
    assert parts[0] == "短句" and all(len(p) <= 100 for p in parts)
    assert "".join(parts[1:]) == long_line and all(p.endswith("。") for p in parts[1:])
    sample, n = tokenizer.reservoir_sample((str(i) for i in range(1000)), 10, seed=1)
    assert n == 1000 and len(set(sample)) == 10
    assert sample == tokenizer.reservoir_sample((str(i) for i in range(1000)), 10, seed=1)[0]
    assert sample != tokenizer.reservoir_sample((str(i) for i in range(1000)), 10, seed=2)[0]


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_line_breaks_tabs_and_space_runs_are_pieces(spm_models, model_type):
    v = Vocabulary(spm_models[model_type])
    sp = v.tokenizer
    text = "中国\n人民\n\n\t大会    人民  中国"
    pieces = [sp.id_to_piece(i) for i in v.encode(text)]
    assert not [p for p in pieces if p.startswith("<0x")], pieces  # no byte for layout
    assert {"\n", "\n\n", "\t", "▁▁▁▁", "▁▁"} <= set(pieces)
    assert v.decode(v.encode(text)) == text
    assert sp.piece_to_id("<|im_start|>") == 3 and sp.piece_to_id("<|im_end|>") == 4


def test_stats_separate_whitespace_bytes_and_check_round_trip(spm_models):
    stats = tokenizer.tokenizer_stats(spm_models["unigram"], ["行一\n行二\r\n😀", "x"])
    assert stats["round_trip_mismatches"] == 0
    # "\r" has no piece: one whitespace byte; the emoji's 4 bytes are the rest
    n = stats["heldout_tokens"]
    assert stats["whitespace_byte_rate"] == pytest.approx(1 / n)
    assert stats["byte_fallback_rate_non_whitespace"] == pytest.approx(
        stats["byte_fallback_rate"] - 1 / n)


@pytest.mark.parametrize("bad", ["heldout", "input", "output"])
def test_bad_paths_fail_before_training(demo_data_dir, tmp_path, capsys, monkeypatch, bad):
    trained = []
    monkeypatch.setattr(tokenizer.spm.SentencePieceTrainer, "train",
                        lambda **kw: trained.append(kw))  # must never be reached
    args = {"input": str(demo_data_dir / "shu_*.jsonl.gz"), "heldout": None,
            "model_prefix": str(tmp_path / "m")}
    if bad == "heldout":
        args["heldout"] = str(tmp_path / "missing.txt")
    elif bad == "input":
        args["input"] = str(tmp_path / "nothing_*.jsonl")
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
        args["model_prefix"] = str(tmp_path / "ro" / "m")
        if tokenizer.os.access(str(tmp_path / "ro"), tokenizer.os.W_OK):  # root ignores permissions
            args["model_prefix"] = "/proc/zhchat_cannot_write_here/m"
    argv = ["--input", args["input"], "--format", "jsonl", "--model_prefix",
            args["model_prefix"], "--vocab_size", "3000"]
    if args["heldout"]:
        argv += ["--heldout", args["heldout"]]
    assert tokenizer.main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert trained == []


def test_token_healing_backs_off_the_last_piece(spm_models):
    """heal: the prompt less its last piece, and a mask of the pieces that extend that piece's
    text (so `子曰：` may continue as `：“`); a lone token or a sentinel is left alone."""
    v = Vocabulary(spm_models["unigram"])
    ids = v.encode("子曰：")
    healed, mask = v.heal(ids, v.vocab_size + 28)
    assert healed == ids[:-1] and mask.shape == (v.vocab_size + 28,) and not mask[v.vocab_size:].any()
    last = v.id_to_piece(ids[-1])
    allowed = [v.id_to_piece(i) for i in np.flatnonzero(mask)]
    assert last in allowed and all(p.startswith(last) for p in allowed)
    assert v.heal(ids[:1]) == (ids[:1], None)
    assert v.heal(ids + [v.sentinel_id(0)])[1] is None

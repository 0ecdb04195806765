"""Each normalizer step and each filter on crafted examples; the perplexity hook with a real LM."""

import collections
import math

import pytest

from zhchat.tasks.clean import filters as F
from zhchat.tasks.clean.normalize import Normalizer

OFF = dict(nfkc=False, traditional_to_simplified=False, strip_control=False, join_cjk_spaces=False)


def test_safe_nfkc_keeps_chinese_punctuation():
    n = Normalizer(**{**OFF, "nfkc": True})
    assert n("ＡＢＣ１２３＋ｘ①ﬁ") == "ABC123+x1fi"
    assert n("你好，世界！（注）：是；否？《书》“引”…") == "你好，世界！（注）：是；否？《书》“引”…"
    assert n("\uf900") == "豈"  # CJK compatibility ideograph -> unified


def test_traditional_to_simplified():
    assert Normalizer(**{**OFF, "traditional_to_simplified": True})("漢字與簡體") == "汉字与简体"
    assert Normalizer(**OFF)("漢字") == "漢字"


def test_control_and_ansi_removed():
    n = Normalizer(**{**OFF, "strip_control": True})
    assert n("\ufeff红\x1b[31m色\x1b[0m\x07字\u200b\r\n下行\r末") == "红色字\n下行\n末"


def test_cjk_inner_whitespace_removed_latin_kept():
    n = Normalizer(**{**OFF, "join_cjk_spaces": True})
    assert n("梦，后来大半忘却 了") == "梦，后来大半忘却了"
    assert n("中 文　字，  好") == "中文字，好"
    assert n("hello world 中文 text") == "hello world 中文 text"
    assert n("行一  \n\n\n\n  行二") == "行一\n\n行二"


def test_regex_fixes_and_bad_pattern():
    n = Normalizer(**OFF, regex_fixes=[("[\ue000-\uf8ff\ufffd]", ""), (r"(\d+)年", r"\1 年")])
    assert n("私\ue123用\ufffd字1998年") == "私用字1998 年"
    with pytest.raises(ValueError, match="regex_fixes"):
        Normalizer(regex_fixes=[("[unclosed", "")])


def test_length_and_cjk_ratio():
    f = F.LengthFilter(min_chars=5, max_chars=8)
    assert f("一二三四") is None and f("一二三四五") == "一二三四五" and f("一" * 9) is None
    c = F.CjkRatioFilter(min_ratio=0.5)
    assert c("中文中文ab") == "中文中文ab" and c("中abcdef") is None


def test_sentence_end_trim_and_drop():
    trim = F.SentenceEndFilter(trim=True)
    assert trim("第一句。第二句！") == "第一句。第二句！"
    assert trim("第一句。第二句没说完") == "第一句。"
    assert trim("他说：“好。”然后") == "他说：“好。”"
    assert trim("没有标点的一句") is None
    assert F.SentenceEndFilter(trim=False)("第一句。第二句没说完") is None
    assert trim.apply("没有标点", "reviews") is None
    assert F.SentenceEndFilter(exempt_sources=["reviews"]).apply("没有标点", "reviews") == "没有标点"


def test_repetition():
    r = F.RepetitionFilter(max_dup_line_frac=0.3, max_dup_ngram_char_frac=0.5)
    assert r("\n".join(["重复的一行字。"] * 5 + ["不同的内容。"])) is None
    text = "这是一段正常的文字，没有什么重复的地方。后面接着另外一些完全不同的句子。"
    assert r(text) == text
    assert F.dup_ngram_char_frac("甲乙丙丁戊己庚辛壬癸" * 6, 10) == 1.0
    assert F.dup_ngram_char_frac(text, 10) == 0.0
    assert r("买买买便宜买买买便宜买买买便宜买买买便宜买买买便宜买买买便宜。") is None


def test_blocklist(tmp_path):
    path = tmp_path / "block.txt"
    path.write_text("# comment\n六合彩\n代开发票\n", encoding="utf-8")
    b = F.BlocklistFilter(path=str(path), max_hits=1)
    assert b("今天天气好。") == "今天天气好。" and b("六合彩开奖。") == "六合彩开奖。"
    assert b("六合彩！代开发票！") is None
    with pytest.raises(FileNotFoundError, match="BlocklistFilter.path"):
        F.BlocklistFilter(path=str(tmp_path / "none.txt"))


def test_blocklist_shipped_path_from_another_working_directory(tmp_path, monkeypatch):
    """The presets name the shipped list relative to the repository: it loads from any cwd."""
    monkeypatch.chdir(tmp_path)
    b = F.BlocklistFilter(path="tasks/clean/blocklist_zh.txt")
    assert len(b.words) >= 5 and b("今天天气好。") == "今天天气好。"


def _unigram_score_fn(corpus: str):
    """A character unigram LM with add-one smoothing: summed log-prob of each text."""
    counts = collections.Counter(corpus)
    total, vocab = sum(counts.values()), len(counts) + 1
    return lambda texts: [sum(math.log((counts[c] + 1) / (total + vocab)) for c in t)
                          for t in texts]


def test_perplexity_hook_with_fitted_unigram_lm():
    corpus = "我们今天在学校学习中文，老师说中文很有意思。" * 50
    score_fn = _unigram_score_fn(corpus)
    probe = F.PerplexityFilter(score_fn=score_fn, max_perplexity=1e9)
    fluent, noise = "老师说我们学习中文很有意思。", "鑫龘齉靐麤爨驫鱻"
    assert probe.perplexity(fluent) < 30 < probe.perplexity(noise)
    f = F.PerplexityFilter(score_fn_factory=lambda: score_fn, max_perplexity=30.0)
    f.setup()
    assert f(fluent) == fluent and f(noise) is None
    with pytest.raises(ValueError, match="exactly one"):
        F.PerplexityFilter(max_perplexity=3.0)


def test_checkpoint_score_fn_windows_and_shifts():
    """The score_batch adapter: windows of seq_len, inputs = BOS + targets shifted, weights on tokens."""
    seen = []

    class FakeModel:  # the models/base_model.BaseModel.score_batch contract: [batch] summed log-prob
        def score_batch(self, params, batch):
            seen.append({k: v.copy() for k, v in batch.items()})
            return -batch["decoder_loss_weights"].sum(axis=1) * math.log(params["vocab"])

    score = F.checkpoint_score_fn(model=FakeModel(), params={"vocab": 50},
                                  encode=lambda t: list(range(3, 3 + len(t))), seq_len=4)
    text = "一丁七万丈三上下不与"  # 10 characters -> ids 3..12, windows of 4, 4, 2
    (total,) = score([text])
    assert total == pytest.approx(-10 * math.log(50))
    assert [int(b["decoder_loss_weights"].sum()) for b in seen] == [4, 4, 2]
    assert seen[0]["decoder_target_tokens"].tolist() == [[3, 4, 5, 6]]
    assert seen[0]["decoder_input_tokens"].tolist() == [[0, 3, 4, 5]]  # as the training rows
    assert seen[2]["decoder_input_tokens"].tolist() == [[0, 11, 0, 0]]
    f = F.PerplexityFilter(score_fn=score, max_perplexity=60)
    assert f.perplexity(text) == pytest.approx(50) and f(text) == text

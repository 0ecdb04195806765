"""The Beam pipeline end to end on a small slice of the shared data plus crafted bad inputs:
People's Daily in two formats, NiuTrans lines repeated across files, a planted near duplicate, every
bad-input reason counted; a second run (the other DirectRunner mode) writes byte-identical shards."""

import gzip
import itertools
import json

import pytest

from zhchat.tasks.clean import filters as F
from zhchat.tasks.clean import pipeline
from zhchat.tasks.clean.normalize import Normalizer
from zhchat.tasks.clean.readers import Source

TWINS = ("双语数据/智囊(选录)/察智部/范槚/target.txt", "双语数据/智囊(选录)/胆智部/耿纯/target.txt")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_data_dir):
    d = tmp_path_factory.mktemp("raw")
    raw = shared_data_dir / "raw"
    with gzip.open(raw / "niutrans_modern.jsonl.gz", "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    nt = records[:30] + [r for r in records if r["id"] in TWINS]
    assert {r["id"] for r in nt} >= set(TWINS)
    with open(d / "nt.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in nt)
    shared_line = records[0]["text"].split("\n")[0]
    longest = max(records[1:30], key=lambda r: len(r["text"]))
    near = longest["text"].replace("。", "！", 1)  # a near duplicate (Jaccard ~0.99)
    pairs = [(records[2]["id"], "zz-copy"), (longest["id"], "near")]
    extra = [{"id": "copy-line", "text": "这一段是新的内容，和别处都不一样。\n" + shared_line + "\n"},
             {"id": "near", "text": near}, {"id": "zz-copy", "text": records[2]["text"]}]
    with open(d / "extra.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in extra)
        f.write('{"id": "broken", "text": "断\n')
    for name in ("tagged", "seg"):
        with gzip.open(raw / f"peoples_daily_199801_{name}.txt.gz", "rt", encoding="utf-8") as f:
            lines = list(itertools.islice(f, 150))
        with gzip.open(d / f"pd_{name}.txt.gz", "wt", encoding="utf-8") as f:
            f.writelines(lines)
    with open(raw / "reviews_pos.txt", encoding="utf-8") as f:
        (d / "reviews.txt").write_text("".join(itertools.islice(f, 200)), encoding="utf-8")
    (d / "bad_utf8.txt").write_bytes("好的评论。\n".encode() + b"\xc3\x28 bad\n")
    blob = gzip.compress("".join(json.dumps({"text": "句子。" * 40}) + "\n"
                                 for _ in range(2000)).encode())
    (d / "trunc.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    (d / "empty.jsonl").write_bytes(b"")
    (d / "broken.json").write_text('[{"text": "一"},]', encoding="utf-8")
    with open(d / "huge.txt", "wb") as f:
        f.write(b"x" * (50 << 20) + b"\n")
    return d, shared_line, pairs


def _run(root, out, mode):
    sources = [
        Source(name="niutrans", files=["nt.jsonl", "extra.jsonl", "trunc.jsonl.gz", "empty.jsonl"],
               format="jsonl"),
        Source(name="pd", files=["pd_tagged.txt.gz"], format="pku_tagged"),
        Source(name="pd_seg", files=["pd_seg.txt.gz"], format="pku_seg"),
        Source(name="reviews", files=["reviews.txt", "bad_utf8.txt", "huge.txt"],
               format="txt_lines"),
        Source(name="alpaca", files=["broken.json"], format="json"),
    ]
    return pipeline.clean_corpus(
        sources=sources, output_dir=str(out), root=str(root), num_shards=3,
        normalizer=Normalizer(),
        filters=[F.LengthFilter(min_chars=5), F.CjkRatioFilter(),
                 F.SentenceEndFilter(exempt_sources=["reviews", "pd", "pd_seg"])],
        beam_args=["--runner=DirectRunner", "--direct_num_workers=2",
                   f"--direct_running_mode={mode}"])


def _docs(out):
    docs = []
    for shard in sorted(out.glob("cleaned-*.jsonl.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            docs += [json.loads(line) for line in f]
    return docs


def test_end_to_end_and_deterministic(corpus, tmp_path):
    root, shared_line, pairs = corpus
    rep = _run(root, tmp_path / "a", "multi_processing")
    docs = _docs(tmp_path / "a")
    assert len(list((tmp_path / "a").glob("cleaned-*-of-00003.jsonl.gz"))) == 3
    assert all(set(d) == {"id", "source", "text"} for d in docs)
    by_source = {s: [d for d in docs if d["source"] == s] for s in ("niutrans", "pd", "pd_seg")}
    # People's Daily in two formats: every seg line duplicates a tagged line, tagged copies win
    assert by_source["pd_seg"] == [] and len(by_source["pd"]) > 100
    assert rep["dedup"]["cross_source_clusters"]["pd+pd_seg"] >= 100
    # keeper: same length and source, so the smaller id ("near" < "双语数据/...")
    # a file repeated under another id (like the two identical NiuTrans chapters): one kept
    ids = {d["id"] for d in by_source["niutrans"]}
    assert len(ids & set(pairs[0])) == 1 and rep["dedup"]["docs_removed"]["exact"] >= 100
    assert not ids & set(TWINS)  # their text is the 2-character heading 原文: below min length
    # a NiuTrans line repeated in another file survives exactly once
    assert sum(d["text"].split("\n").count(shared_line) for d in docs) == 1
    copy = next(d for d in docs if d["id"] == "copy-line")
    assert copy["text"].startswith("这一段是新的内容")  # only the repeated line may go
    assert len(ids & set(pairs[1])) == 1 and rep["dedup"]["docs_removed"]["near"] >= 1
    # every bad input counted by reason; the pipeline finished
    skips = {r for per in rep["skips"].values() for r in per}
    assert {"invalid_utf8", "truncated_gzip", "broken_json", "empty_file", "broken_json_file",
            "too_long"} <= skips
    assert rep["stage_totals"]["output"]["docs_out"] == len(docs)
    assert rep["stage_totals"]["dedup:lines"]["chars_out"] < rep["stage_totals"][
        "dedup:lines"]["chars_in"]
    assert "peoples_daily" not in (tmp_path / "a" / "report.md").read_text()  # names from config
    assert "| filter:sentence_end | niutrans |" in (tmp_path / "a" / "report.md").read_text()
    # determinism: a second run in the other runner mode writes byte-identical shards
    _run(root, tmp_path / "b", "in_memory")
    for shard in sorted((tmp_path / "a").glob("cleaned-*.jsonl.gz")):
        assert shard.read_bytes() == (tmp_path / "b" / shard.name).read_bytes()


def test_an_unwritable_output_folder_fails_before_the_pipeline(tmp_path, monkeypatch):
    """A read-only output (simulated: root passes permission checks on a read-only mount) is
    reported before Beam starts, naming the folder; no pipeline is built."""
    from apache_beam.io.filesystems import FileSystems

    (tmp_path / "a.jsonl").write_text('{"text": "你好，世界。这是一个测试。"}\n', encoding="utf-8")

    def read_only(path, *a, **k):
        raise OSError(30, "Read-only file system", path)

    monkeypatch.setattr(FileSystems, "create", staticmethod(read_only))
    monkeypatch.setattr(pipeline.beam, "Pipeline",
                        lambda *a, **k: pytest.fail("the pipeline started"))
    with pytest.raises(PermissionError, match="not writable.*Read-only"):
        pipeline.clean_corpus(sources=[Source(name="a", files=["a.jsonl"], format="jsonl")],
                              output_dir=str(tmp_path / "out"), root=str(tmp_path))


@pytest.mark.parametrize("case", ["macro", "missing_corpus"])
def test_the_cli_rejects_a_misspelt_macro_and_a_missing_corpus_before_work(tmp_path, monkeypatch,
                                                                          capsys, case):
    """`python -m zhchat.tasks.clean`: an unknown `--gin.MACRO=` and a missing corpus file each end
    with exit 2 and one line naming them; no pipeline is built."""
    import gin

    from zhchat.tasks.clean.__main__ import main

    (tmp_path / "a.jsonl").write_text('{"text": "你好，世界。这是一个测试。"}\n', encoding="utf-8")
    conf = tmp_path / "c.gin"
    conf.write_text("import zhchat.tasks.clean.pipeline\n"
                    f"clean_corpus.root = '{tmp_path}'\n"
                    f"clean_corpus.output_dir = '{tmp_path / 'out'}'\n"
                    "SHARDS = 2\nclean_corpus.num_shards = %SHARDS\n"
                    "clean_corpus.sources = [@Source()]\nSource.name = 'a'\n"
                    "Source.format = 'jsonl'\n"
                    f"Source.files = ['{'a.jsonl' if case == 'macro' else 'missing.jsonl'}']\n",
                    encoding="utf-8")
    monkeypatch.setattr(pipeline.beam, "Pipeline",
                        lambda *a, **k: pytest.fail("the pipeline started"))
    argv = [f"--gin_file={conf}"] + (["--gin.SHARD=3"] if case == "macro" else [])
    gin.clear_config()
    with pytest.raises(SystemExit) as e:
        main(argv)
    gin.clear_config()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    if case == "macro":
        assert "unknown macro SHARD (did you mean SHARDS?)" in err
    else:
        assert err.startswith("clean: error:") and "missing.jsonl" in err and "does not exist" in err

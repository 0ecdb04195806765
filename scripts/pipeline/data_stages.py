"""The data stages: clean, vocab, cache (TensorFlow/seqio/Beam, imported inside each stage)."""

from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Any

import gin

from zhchat.gin_configs import cli as gin_cli
from zhchat.scripts.pipeline.config import REPO, Context, gin_file, repo_path


def stage_clean(ctx: Context) -> dict:
    import logging

    from zhchat.tasks.clean import pipeline as clean_pipeline

    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    gin.clear_config()
    parse_clean_gin(ctx)
    rep = clean_pipeline.clean_corpus(output_dir=ctx.dir("clean"), root=REPO)
    out = rep["stage_totals"].get("output", {})
    return {"documents_out": out.get("docs_out"), "chars_out": out.get("chars_out"),
            "records_skipped": rep["skips_total"], "report": ctx.dir("clean", "report.md")}


def parse_clean_gin(ctx: Context) -> None:
    import zhchat.tasks.clean.filters  # noqa: F401  (registers the filters)
    import zhchat.tasks.clean.pipeline  # noqa: F401

    gin_cli.parse_checked([gin_file(ctx.cfg.clean_gin)], ctx.cfg.clean_bindings)


def _cleaned_files(ctx: Context) -> list[str]:
    return sorted(glob.glob(ctx.dir("clean", "cleaned-*-of-*.jsonl.gz")))


def stage_vocab(ctx: Context) -> dict:
    from zhchat.tasks import tokenizer

    cfg = ctx.cfg
    stats = tokenizer.train_tokenizer(
        files=_cleaned_files(ctx), format="jsonl", model_prefix=ctx.dir("vocab", "spm"),
        vocab_size=cfg.vocab_size, input_sentence_size=cfg.vocab_sentences, seed=cfg.seed,
        add_dummy_prefix=cfg.vocab_add_dummy_prefix,
        validation_fraction=cfg.validation_fraction, progress=False)
    keep = ("vocab_size", "documents_read", "chars_per_token", "byte_fallback_rate",
            "byte_fallback_rate_non_whitespace", "round_trip_mismatches", "heldout")
    out = {k: stats[k] for k in keep if k in stats}
    out["heldout"] = f"the {cfg.validation_fraction:g} validation split of clean/cleaned-*.jsonl.gz"
    return out


def stage_cache(ctx: Context) -> dict:
    from zhchat.tasks import cache, lm

    cfg = ctx.cfg
    common = [f"VOCAB_PATH = '{ctx.vocab_path}'"]
    gin.clear_config()
    lm.parse_gin([gin_file("tasks/cleaned_lm.gin")], common + [
        f"CLEANED_DATA_DIR = '{ctx.dir('clean')}'",
        f"VALIDATION_FRACTION = {cfg.validation_fraction}"])
    lm.register_tasks()
    out: dict[str, Any] = {}
    for split, rows in (("train", cfg.lm_train_rows), ("validation", cfg.lm_validation_rows)):
        meta = export_cache_once(cache, task="zh_cleaned_lm", split=split, out=ctx.cache(f"lm_{split}"),
                       lengths={"targets": cfg.lm_length}, converter="decoder", rows=rows,
                       shards=cfg.cache_shards if split == "train" else 1)
        out[f"lm_{split}_rows"] = meta["num_examples"]
    if cfg.sft_data_dir is None:
        return out
    gin.clear_config()
    lm.parse_gin([gin_file(cfg.sft_gin)], common + [
        f"SFT_DATA_DIR = '{repo_path(cfg.sft_data_dir)}'",
        f"SFT_INPUTS_LENGTH = {cfg.sft_inputs_length}",
        f"SFT_TARGETS_LENGTH = {cfg.sft_targets_length}",
        f"register_sft_task.validation_fraction = {cfg.validation_fraction}"])
    lm.register_tasks()
    for split, rows in (("train", cfg.sft_train_rows), ("validation", cfg.sft_validation_rows)):
        meta = export_cache_once(cache, task=cfg.sft_task, split=split, out=ctx.cache(f"sft_{split}"),
                       lengths={"inputs": cfg.sft_inputs_length,
                                "targets": cfg.sft_targets_length},
                       converter="prefix_lm", rows=rows,
                       shards=cfg.cache_shards if split == "train" else 1)
        out[f"sft_{split}_rows"] = meta["num_examples"]
    out["pair_dialogues"] = _write_pair_dialogues(ctx)
    out["preference_files"] = _copy_preference_files(ctx)
    return out


def export_cache_once(cache: Any, *, task: str, split: str, out: str, lengths: dict, converter: str,
            rows: int | None, shards: int) -> dict:
    """One cache, rebuilt from scratch when an earlier run was cut off before its metadata."""
    from zhchat.tasks import cache_reader

    if os.path.exists(os.path.join(out, "metadata.json")):
        return cache_reader.cache_metadata(out)
    shutil.rmtree(out, ignore_errors=True)
    meta = cache.export_cache(task=task, split=split, output_dir=out, feature_lengths=lengths,
                              converter=converter, num_shards=shards, max_examples=rows)
    print(f"  cached {meta['num_examples']} rows of {task}/{split} -> {out}", flush=True)
    return meta


def _write_pair_dialogues(ctx: Context) -> int:
    """The held-back SFT dialogues (the SFT tasks' validation split of `sft_pair_files`) as jsonl
    {"id", "messages"}: prompts for the pair builder that SFT never trained on."""
    from zhchat.tasks import sft_sources, sources
    from zhchat.tasks.splits import split_of

    cfg = ctx.cfg
    counter = sources.SkipCounter()
    files = sources.expand_files(os.path.join(repo_path(cfg.sft_data_dir), cfg.sft_pair_files))
    path, n = ctx.cache("pair_dialogues.jsonl"), 0
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for doc_id, messages in sft_sources.iter_alpaca(files, counter):
            if split_of(doc_id, cfg.validation_fraction) == "validation":
                f.write(json.dumps({"id": doc_id, "messages": messages}, ensure_ascii=False) + "\n")
                n += 1
    os.replace(path + ".tmp", path)
    if counter.total:
        print(f"  pair dialogues: skipped {counter.total} records\n{counter.report()}", flush=True)
    return n


def _copy_preference_files(ctx: Context) -> list[str]:
    copies = []
    for i, src in enumerate(ctx.cfg.preference_files):
        dst = ctx.cache(f"preference_{i}_{os.path.basename(src)}")
        shutil.copyfile(repo_path(src), dst)
        copies.append(dst)
    return copies

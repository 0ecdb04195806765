"""Zero-Chatgpt's whole chain as one command, each stage skipped when done and resumed when cut off.

    python -m zhchat.scripts.pipeline --gin_file=gin_configs/pipelines/zero_chatgpt_100m.gin
    python -m zhchat.scripts.pipeline --gin_file=pipelines/zero_chatgpt_tiny.gin --out_dir=runs/zc
    python -m zhchat.scripts.pipeline --gin_file=... --stages=clean,vocab,cache       # data host
    python -m zhchat.scripts.pipeline --gin_file=... --stages=pretrain,sft,pairs,rm,ppo,eval

Stages (STAGES), each writing under `<out_dir>/<stage>/` and finishing with `stage.json` (its
seconds and numbers; a stage with one is skipped, `--force=STAGE` reruns it):
  clean    raw corpora -> normalised, filtered, exact/near-deduplicated shards (Beam; tasks/clean)
  vocab    SentencePiece on the cleaned train documents, statistics on the held-out ones
  cache    seqio tasks over the cleaned shards and the SFT data -> packed ArrayRecord caches (LM
           train/validation, SFT train/validation), plus what the accelerator side needs without
           the raw data: the held-back SFT dialogues (pair prompts), a copy of the preference files
  pretrain the model preset on the LM cache (held-out CE beside a unigram baseline)
  sft      instruction SFT from the pretrained parameters (loss on replies; held-out reply loss)
  pairs    preference pairs as Zero-Chatgpt built them: gold reply vs the SFT model's own reply
           on the held-back SFT dialogues (rl/pair_builder.py)
  rm       reward model from the SFT checkpoint on those pairs + the shared pairs; pairwise
           accuracy on the held-back tenth
  ppo      PPO from the SFT policy against that reward model (critic from the RM, KL to the SFT)
  eval     SFT and PPO policies on held-out preference prompts: reward-model score, win rate,
           sample chats; one report (report.md) of every stage's numbers
Training stages resume from their run's latest checkpoint (the trainer's own resume). The data
stages need TensorFlow/seqio/Beam; the training stages import none of them, so they run on an
accelerator host that was given `<out_dir>/{vocab,cache}`. Inputs of the chosen stages (raw files,
SFT data, preference files, earlier stages' outputs, the gin files) are checked before any stage
starts. Relative data paths are taken from the repository root; `--out_dir` from the working
directory. LICENCES: the SFT data (Alpaca-zh CC BY-NC 4.0, ShareGPT-zh research-only) and the
shared preference pairs are for non-commercial research: so are the models this trains.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import gzip
import json
import os
import shutil
import sys
import time
from typing import Any, Callable, Sequence

import gin
import numpy as np

if __name__ == "__main__":  # run the importable module, so gin registers PipelineConfig once
    from zhchat.scripts.pipeline import main as _main
    sys.exit(_main())

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("clean", "vocab", "cache", "pretrain", "sft", "pairs", "rm", "ppo", "eval")
DATA_STAGES = ("clean", "vocab", "cache")
EXTRA_IDS = 100


@gin.configurable
@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """Every knob of the chain; the presets in gin_configs/pipelines/ bind them."""
    out_dir: str = "runs/zero_chatgpt"
    seed: int = 0
    validation_fraction: float = 0.02   # documents / dialogues held out by id (tasks/splits.py)
    # clean: a gin file of tasks/clean (its sources and filters); the output folder is ours
    clean_gin: str = "clean/all_raw.gin"
    clean_bindings: Sequence[str] = ()
    # vocab
    vocab_size: int = 32000
    vocab_sentences: int = 2_000_000
    # model preset (decoder) and the LM cache
    model_gin: str = "models/decoder_100m.gin"
    lm_length: int = 2048
    lm_train_rows: int | None = None        # None: the whole train split
    lm_validation_rows: int = 320
    cache_shards: int = 8
    # pretrain
    pretrain_steps: int = 1200
    pretrain_batch_size: int = 32
    pretrain_peak_lr: float = 3e-4
    pretrain_warmup_steps: int = 100
    pretrain_eval_every: int = 200
    pretrain_bindings: Sequence[str] = ()
    # sft
    sft_data_dir: str | None = "../shared/data/sft"  # None: LM stages only (no SFT/RLHF data)
    sft_gin: str = "tasks/sft.gin"
    sft_task: str = "zh_sft"
    sft_pair_files: str = "alpaca_zh/*.json"  # dialogues of these files' held-back split -> pairs
    sft_inputs_length: int = 256
    sft_targets_length: int = 256
    sft_train_rows: int | None = None
    sft_validation_rows: int = 256
    sft_steps: int = 600
    sft_batch_size: int = 32
    sft_peak_lr: float = 1e-4
    sft_warmup_steps: int = 30
    sft_bindings: Sequence[str] = ()
    # pairs
    max_pairs: int = 512
    pair_batch_size: int = 64
    pair_max_prompt_len: int = 128
    pair_max_decode_length: int = 128
    # rm
    preference_files: Sequence[str] = ("../shared/data/preference/dpo_zh_500.jsonl",)
    rm_max_prompt_len: int = 128
    rm_max_response_len: int = 128
    rm_steps: int = 300
    rm_batch_size: int = 32
    rm_peak_lr: float = 2e-5
    rm_bindings: Sequence[str] = ()
    # ppo
    ppo_iterations: int = 30
    ppo_batch_size: int = 32
    ppo_max_decode_length: int = 64
    ppo_policy_lr: float = 1e-6
    ppo_critic_lr: float = 5e-6
    ppo_kl_coef: float = 0.05
    ppo_bindings: Sequence[str] = ()
    # eval
    eval_prompts: int = 64
    eval_samples_shown: int = 4
    eval_max_decode_length: int = 96


class StageInputError(ValueError):
    """An input of a chosen stage is missing: raised before any stage runs."""


class StageError(RuntimeError):
    """A stage stopped on bad settings or data (its output stays incomplete; rerun resumes)."""


def _repo_path(path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(REPO, path)


class Context:
    """Paths of one pipeline run (`out_dir` absolute) and each stage's recorded results."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.out = os.path.abspath(cfg.out_dir)

    def dir(self, stage: str, *parts: str) -> str:
        return os.path.join(self.out, stage, *parts)

    def done(self, stage: str) -> bool:
        return os.path.exists(self.dir(stage, "stage.json"))

    def result(self, stage: str) -> dict[str, Any]:
        with open(self.dir(stage, "stage.json"), encoding="utf-8") as f:
            return json.load(f)["result"]

    def record(self, stage: str, result: dict[str, Any], seconds: float) -> None:
        os.makedirs(self.dir(stage), exist_ok=True)
        tmp = self.dir(stage, "stage.json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"stage": stage, "seconds": round(seconds, 1), "result": result}, f,
                      ensure_ascii=False, indent=1, default=float)
        os.replace(tmp, self.dir(stage, "stage.json"))

    # outputs shared between stages
    @property
    def vocab_path(self) -> str:
        return self.dir("vocab", "spm.model")

    def cache(self, name: str) -> str:
        return self.dir("cache", name)

    def checkpoints(self, stage: str) -> str:
        return self.dir(stage, "run", "checkpoints")

    def model_vocab_size(self) -> int:
        from zhchat.tasks.vocabulary import Vocabulary
        n = Vocabulary(self.vocab_path, extra_ids=EXTRA_IDS).vocab_size
        return -(-n // 128) * 128


# ----------------------------------------------------------------------------- data stages

def stage_clean(ctx: Context) -> dict:
    import logging

    from zhchat.tasks.clean import pipeline as clean_pipeline

    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    gin.clear_config()
    _parse_clean_gin(ctx)
    rep = clean_pipeline.clean_corpus(output_dir=ctx.dir("clean"), root=REPO)
    out = rep["stage_totals"].get("output", {})
    return {"documents_out": out.get("docs_out"), "chars_out": out.get("chars_out"),
            "records_skipped": rep["skips_total"], "report": ctx.dir("clean", "report.md")}


def _parse_clean_gin(ctx: Context) -> None:
    import zhchat.gin_configs
    import zhchat.tasks.clean.filters  # noqa: F401  (registers the filters)
    import zhchat.tasks.clean.pipeline  # noqa: F401

    gin.add_config_file_search_path(os.path.dirname(zhchat.gin_configs.__file__))
    gin.parse_config_files_and_bindings([_gin_file(ctx.cfg.clean_gin)],
                                        list(ctx.cfg.clean_bindings), finalize_config=False)


def _cleaned_files(ctx: Context) -> list[str]:
    return sorted(glob.glob(ctx.dir("clean", "cleaned-*-of-*.jsonl.gz")))


def stage_vocab(ctx: Context) -> dict:
    from zhchat.tasks import vocab

    cfg = ctx.cfg
    stats = vocab.train_tokenizer(
        files=_cleaned_files(ctx), format="jsonl", model_prefix=ctx.dir("vocab", "spm"),
        vocab_size=cfg.vocab_size, input_sentence_size=cfg.vocab_sentences, seed=cfg.seed,
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
    lm.parse_gin([_gin_file("tasks/cleaned_lm.gin")], common + [
        f"CLEANED_DATA_DIR = '{ctx.dir('clean')}'",
        f"VALIDATION_FRACTION = {cfg.validation_fraction}"])
    lm.register_tasks()
    out: dict[str, Any] = {}
    for split, rows in (("train", cfg.lm_train_rows), ("validation", cfg.lm_validation_rows)):
        meta = _export(cache, task="zh_cleaned_lm", split=split, out=ctx.cache(f"lm_{split}"),
                       lengths={"targets": cfg.lm_length}, converter="decoder", rows=rows,
                       shards=cfg.cache_shards if split == "train" else 1)
        out[f"lm_{split}_rows"] = meta["num_examples"]
    if cfg.sft_data_dir is None:
        return out
    gin.clear_config()
    lm.parse_gin([_gin_file(cfg.sft_gin)], common + [
        f"SFT_DATA_DIR = '{_repo_path(cfg.sft_data_dir)}'",
        f"SFT_INPUTS_LENGTH = {cfg.sft_inputs_length}",
        f"SFT_TARGETS_LENGTH = {cfg.sft_targets_length}",
        f"register_sft_task.validation_fraction = {cfg.validation_fraction}"])
    lm.register_tasks()
    for split, rows in (("train", cfg.sft_train_rows), ("validation", cfg.sft_validation_rows)):
        meta = _export(cache, task=cfg.sft_task, split=split, out=ctx.cache(f"sft_{split}"),
                       lengths={"inputs": cfg.sft_inputs_length,
                                "targets": cfg.sft_targets_length},
                       converter="prefix_lm", rows=rows,
                       shards=cfg.cache_shards if split == "train" else 1)
        out[f"sft_{split}_rows"] = meta["num_examples"]
    out["pair_dialogues"] = _write_pair_dialogues(ctx)
    out["preference_files"] = _copy_preference_files(ctx)
    return out


def _export(cache: Any, *, task: str, split: str, out: str, lengths: dict, converter: str,
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
    files = sources.expand_files(os.path.join(_repo_path(cfg.sft_data_dir), cfg.sft_pair_files))
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
        shutil.copyfile(_repo_path(src), dst)
        copies.append(dst)
    return copies


# ------------------------------------------------------------------------- training stages

def _train(gin_files: list[str], bindings: list[str]) -> dict:
    from zhchat.trainer import gin_cli, train

    gin.clear_config()
    gin_cli.parse_gin(gin_files, bindings)
    return train.train()


def _lengths_of(ctx: Context) -> list[str]:
    return [f"VOCAB_SIZE = {ctx.model_vocab_size()}"]


def _eval_steps(cache_dir: str, batch_size: int) -> int:
    from zhchat.tasks import cache_reader
    return max(1, cache_reader.cache_metadata(cache_dir)["num_examples"] // batch_size)


def stage_pretrain(ctx: Context) -> dict:
    from zhchat.tasks.baselines import unigram_baseline

    cfg = ctx.cfg
    val = ctx.cache("lm_validation")
    summary = _train([cfg.model_gin, "runs/pretrain.gin"], _lengths_of(ctx) + [
        f"TRAIN_CACHE_DIR = '{ctx.cache('lm_train')}'", f"RUN_DIR = '{ctx.dir('pretrain', 'run')}'",
        f"NUM_STEPS = {cfg.pretrain_steps}", f"BATCH_SIZE = {cfg.pretrain_batch_size}",
        f"train.seed = {cfg.seed}", "train.progress_bar = False",
        f"make_schedule.peak_value = {cfg.pretrain_peak_lr}",
        f"make_schedule.warmup_steps = {cfg.pretrain_warmup_steps}",
        f"EVAL_CACHE_DIR = '{val}'", "train.eval_data = @eval/make_cache_iterator",
        f"train.eval_every = {cfg.pretrain_eval_every}",
        f"train.eval_steps = {_eval_steps(val, cfg.pretrain_batch_size)}",
        *cfg.pretrain_bindings])
    baseline, tokens = unigram_baseline(ctx.cache("lm_train"), val, ctx.model_vocab_size())
    return {"step": summary["step"], "train_loss": summary["loss"],
            "first_logged_step": _first_step(summary),
            "heldout_cross_entropy": _last_eval(summary, "cross_entropy"),
            "heldout_tokens": tokens, "unigram_heldout_cross_entropy": baseline,
            "eval_history": summary["eval_history"], **_speed(summary)}


def _first_step(summary: dict) -> int | None:
    """The first logged step of this call: past the resumed checkpoint when a run was cut off."""
    return summary["history"][0]["step"] if summary["history"] else None


def _last_eval(summary: dict, key: str) -> float | None:
    return summary["eval_history"][-1][key] if summary["eval_history"] else None


def _speed(summary: dict) -> dict:
    """Median throughput over the run's log windows (the trainer times from the compiled step)."""
    out = {}
    for key in ("tokens_per_sec", "mfu"):
        values = [r[key] for r in summary["history"] if key in r]
        if values:
            out[key] = float(np.median(values))
    return out


def stage_sft(ctx: Context) -> dict:
    cfg = ctx.cfg
    val = ctx.cache("sft_validation")
    summary = _train([cfg.model_gin, "runs/sft.gin"], _lengths_of(ctx) + [
        f"TRAIN_CACHE_DIR = '{ctx.cache('sft_train')}'", f"RUN_DIR = '{ctx.dir('sft', 'run')}'",
        f"PRETRAINED_DIR = '{ctx.checkpoints('pretrain')}'",
        f"NUM_STEPS = {cfg.sft_steps}", f"BATCH_SIZE = {cfg.sft_batch_size}",
        f"train.seed = {cfg.seed}", "train.progress_bar = False",
        f"make_schedule.peak_value = {cfg.sft_peak_lr}",
        f"make_schedule.warmup_steps = {cfg.sft_warmup_steps}",
        f"EVAL_CACHE_DIR = '{val}'", "train.eval_data = @eval/make_causal_cache_iterator",
        f"train.eval_every = {max(cfg.sft_steps // 4, 1)}",
        f"train.eval_steps = {_eval_steps(val, cfg.sft_batch_size)}",
        f"train.checkpoint_every = {max(cfg.sft_steps // 2, 1)}", *cfg.sft_bindings])
    return {"step": summary["step"], "train_reply_loss": summary["loss"],
            "first_logged_step": _first_step(summary),
            "heldout_reply_cross_entropy": _last_eval(summary, "cross_entropy"),
            "eval_history": summary["eval_history"], **_speed(summary)}


def _model_and_params(ctx: Context, checkpoints: str, *, under: tuple[str, ...] = ()
                      ) -> tuple[Any, Any]:
    from zhchat.rl.cli import load_params
    from zhchat.trainer import gin_cli

    gin.clear_config()
    gin_cli.parse_gin([ctx.cfg.model_gin], _lengths_of(ctx))
    model = gin_cli.evaluate_macro("MODEL")
    return model, load_params(directory=checkpoints, model=model, under=under)


def _vocab(ctx: Context) -> Any:
    from zhchat.tasks.vocabulary import Vocabulary
    return Vocabulary(ctx.vocab_path, extra_ids=EXTRA_IDS)


def stage_pairs(ctx: Context) -> dict:
    from zhchat.rl import pair_builder

    cfg = ctx.cfg
    model, params = _model_and_params(ctx, ctx.checkpoints("sft"))

    def dialogues():
        with open(ctx.cache("pair_dialogues.jsonl"), encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                yield record["id"], record["messages"]

    os.makedirs(ctx.dir("pairs"), exist_ok=True)
    out = pair_builder.build_pairs(
        model=model, params=params, vocab=_vocab(ctx), dialogues=dialogues(),
        output_path=ctx.dir("pairs", "pairs.jsonl"), batch_size=cfg.pair_batch_size,
        max_prompt_len=cfg.pair_max_prompt_len, max_decode_length=cfg.pair_max_decode_length,
        max_pairs=cfg.max_pairs, seed=cfg.seed)
    if not out["pairs"]:
        raise RuntimeError(f"the pair builder wrote no pair (skipped: {out['skipped']})")
    return {"pairs": out["pairs"], "skipped": out["skipped"],
            "file": ctx.dir("pairs", "pairs.jsonl")}


def _preference_files(ctx: Context) -> list[str]:
    return [ctx.dir("pairs", "pairs.jsonl")] + ctx.result("cache")["preference_files"]


def _rl_bindings(ctx: Context) -> list[str]:
    files = ", ".join(f"'{f}'" for f in _preference_files(ctx))
    return _lengths_of(ctx) + [f"VOCAB_PATH = '{ctx.vocab_path}'",
                               f"PREFERENCE_FILES = [{files}]",
                               f"SFT_CHECKPOINT = '{ctx.checkpoints('sft')}'"]


def stage_rm(ctx: Context) -> dict:
    from zhchat.rl import cli as rl_cli
    from zhchat.trainer import gin_cli, train

    cfg = ctx.cfg
    n_val = sum(_count_lines(f) // 10 for f in _preference_files(ctx))  # every 10th record
    gin.clear_config()
    gin_cli.parse_gin([cfg.model_gin, "runs/reward.gin"], _rl_bindings(ctx) + [
        f"RUN_DIR = '{ctx.dir('rm', 'run')}'", f"NUM_STEPS = {cfg.rm_steps}",
        f"BATCH_SIZE = {cfg.rm_batch_size}", f"train.seed = {cfg.seed}",
        "train.progress_bar = False",
        f"PreferenceExamples.max_prompt_len = {cfg.rm_max_prompt_len}",
        f"PreferenceExamples.max_response_len = {cfg.rm_max_response_len}",
        f"make_schedule.peak_value = {cfg.rm_peak_lr}",
        f"make_schedule.warmup_steps = {max(cfg.rm_steps // 10, 1)}",
        f"train.eval_every = {max(cfg.rm_steps // 3, 1)}",
        f"train.eval_steps = {max(1, n_val // cfg.rm_batch_size)}",
        f"train.checkpoint_every = {cfg.rm_steps}", *cfg.rm_bindings])
    rl_cli.rl_stage()
    summary = train.train()
    last = summary["eval_history"][-1] if summary["eval_history"] else {}
    return {"step": summary["step"], "train_loss": summary["loss"],
            "heldout_pairwise_accuracy": last.get("accuracy"),
            "heldout_margin": last.get("margin"), "heldout_pairs": n_val,
            "eval_history": summary["eval_history"]}


def _count_lines(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def stage_ppo(ctx: Context) -> dict:
    from zhchat.rl import ppo
    from zhchat.trainer import gin_cli

    cfg = ctx.cfg
    gin.clear_config()
    gin_cli.parse_gin([cfg.model_gin, "runs/ppo.gin"], _rl_bindings(ctx) + [
        f"RM_CHECKPOINT = '{ctx.checkpoints('rm')}'", f"RUN_DIR = '{ctx.dir('ppo', 'run')}'",
        f"BATCH_SIZE = {cfg.ppo_batch_size}", f"NUM_ITERATIONS = {cfg.ppo_iterations}",
        f"KL_COEF = {cfg.ppo_kl_coef}", f"train_ppo.seed = {cfg.seed}",
        "train_ppo.progress_bar = False",
        f"PreferenceExamples.max_prompt_len = {cfg.rm_max_prompt_len}",
        f"PPOConfig.max_decode_length = {cfg.ppo_max_decode_length}",
        f"policy/make_optimizer.learning_rate = {cfg.ppo_policy_lr}",
        f"critic/make_optimizer.learning_rate = {cfg.ppo_critic_lr}",
        f"train_ppo.checkpoint_every = {max(cfg.ppo_iterations // 2, 1)}", *cfg.ppo_bindings])
    out = ppo.train_ppo()
    hist = out["history"]
    return {"iterations": out["iteration"],
            "reward_mean": [round(h["reward_mean"], 4) for h in hist],
            "kl": [round(h["kl"], 4) for h in hist]}


def stage_eval(ctx: Context) -> dict:
    """SFT vs PPO policy on held-out preference prompts, scored by the reward model."""
    import jax

    from zhchat.rl import ppo_step, rollout
    from zhchat.rl.reward_model import RewardModel
    from zhchat.rl.cli import load_params
    from zhchat.rl.preference_data import PreferenceExamples, _pad

    cfg = ctx.cfg
    vocab = _vocab(ctx)
    model, sft_params = _model_and_params(ctx, ctx.checkpoints("sft"))
    ppo_params = load_params(directory=ctx.checkpoints("ppo"), model=model, under=("policy",))
    rm = RewardModel(backbone=model)
    rm_params = load_params(directory=ctx.checkpoints("rm"), model=rm)
    held = PreferenceExamples(files=ctx.result("cache")["preference_files"], vocab=vocab,
                              max_prompt_len=cfg.rm_max_prompt_len, split="validation")
    examples = held.examples[:cfg.eval_prompts]
    prompts = np.asarray(rollout.left_pad(_pad([e["prompt"] for e in examples],
                                               cfg.rm_max_prompt_len), model.pad_id))
    scored = {}
    for name, params in (("sft", sft_params), ("ppo", ppo_params)):
        responses = rollout.generate(model, params, prompts, jax.random.key(cfg.seed),
                                     max_decode_length=cfg.eval_max_decode_length,
                                     temperature=0.7, top_p=0.9)
        score = ppo_step.scores(rm_params, prompts, responses, eos_id=vocab.eos_id,
                                reward_model=rm, reward_fn=None)
        scored[name] = (np.asarray(responses), np.asarray(score, np.float64))
    samples = []
    for i in range(min(cfg.eval_samples_shown, len(examples))):
        samples.append({"prompt": _user_text(_decode(vocab, examples[i]["prompt"])),
                        **{f"{n}_reply": _decode(vocab, scored[n][0][i]) for n in scored},
                        **{f"{n}_score": float(scored[n][1][i]) for n in scored}})
    result = {"prompts": len(examples),
              "rm_score_sft": float(scored["sft"][1].mean()),
              "rm_score_ppo": float(scored["ppo"][1].mean()),
              "ppo_win_rate": float((scored["ppo"][1] > scored["sft"][1]).mean()),
              "samples": samples}
    _write_report(ctx, result)
    return result


def _decode(vocab: Any, ids: Sequence[int]) -> str:
    ids = [int(t) for t in ids]
    stops = {vocab.eos_id, vocab.im_end_id}
    cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return vocab.decode([t for t in ids[:cut] if t > 0])


def _user_text(prompt: str) -> str:
    """A chat prompt's turns without the template's markers (for the report)."""
    text = prompt.replace("<|im_end|>", "")
    turns = [t.strip() for t in text.split("<|im_start|>") if t.strip()]
    return " / ".join(t.split("\n", 1)[-1] if "\n" in t else t for t in turns
                      if not t.startswith("assistant"))


def _write_report(ctx: Context, ev: dict) -> None:
    """report.md: every completed stage's seconds and headline numbers, then the sample chats."""
    lines = ["| stage | seconds | result |", "|---|---:|---|"]
    for stage in STAGES[:-1]:
        if not ctx.done(stage):
            continue
        with open(ctx.dir(stage, "stage.json"), encoding="utf-8") as f:
            rec = json.load(f)
        headline = {k: v for k, v in rec["result"].items()
                    if not isinstance(v, (list, dict)) or k in ("reward_mean", "kl")}
        lines.append(f"| {stage} | {rec['seconds']} | {json.dumps(headline, ensure_ascii=False)} |")
    lines += ["", f"Held-out prompts: {ev['prompts']}; mean reward-model score SFT "
              f"{ev['rm_score_sft']:.3f}, PPO {ev['rm_score_ppo']:.3f}; PPO wins "
              f"{ev['ppo_win_rate']:.1%}.", ""]
    for s in ev["samples"]:
        lines += [f"- **prompt** {s['prompt']!r}",
                  f"  - SFT ({s['sft_score']:.2f}): {s['sft_reply']!r}",
                  f"  - PPO ({s['ppo_score']:.2f}): {s['ppo_reply']!r}"]
    os.makedirs(ctx.dir("eval"), exist_ok=True)
    with open(ctx.dir("eval", "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


STAGE_FNS: dict[str, Callable[[Context], dict]] = {
    "clean": stage_clean, "vocab": stage_vocab, "cache": stage_cache, "pretrain": stage_pretrain,
    "sft": stage_sft, "pairs": stage_pairs, "rm": stage_rm, "ppo": stage_ppo, "eval": stage_eval}


# --------------------------------------------------------------------------- input checks

def _gin_file(name: str) -> str:
    """A gin file as given, else under the repository's gin_configs/ (as the CLIs look them up)."""
    for path in (name, os.path.join(REPO, "gin_configs", name)):
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise StageInputError(f"gin file {name!r} not found (as given or under gin_configs/)")


def _needs(ctx: Context, stage: str, chosen: Sequence[str]) -> list[str]:
    """Problems with `stage`'s inputs that no earlier chosen stage will produce."""
    cfg, problems = ctx.cfg, []

    def earlier(producer: str) -> bool:
        return producer in chosen or ctx.done(producer)

    def need(producer: str) -> None:
        if not earlier(producer):
            problems.append(f"{stage} needs the {producer!r} stage's output in {ctx.dir(producer)} "
                            f"(run --stages={producer} first, or copy that folder there)")

    def exists(path: str, what: str) -> None:
        if not glob.glob(path):
            problems.append(f"{stage}: {what} {path!r} does not exist")

    try:
        if stage == "clean":
            gin.clear_config()
            _parse_clean_gin(ctx)
            for src in gin.query_parameter("clean_corpus.sources"):
                src.scoped_configurable_fn().resolve(REPO)
            gin.clear_config()
        elif stage == "vocab":
            need("clean")
        elif stage == "cache":
            need("clean"), need("vocab")
            if cfg.sft_data_dir is not None:
                exists(_repo_path(cfg.sft_data_dir), "SFT data folder")
                exists(os.path.join(_repo_path(cfg.sft_data_dir), cfg.sft_pair_files),
                       "pair dialogues")
                for f in cfg.preference_files:
                    exists(_repo_path(f), "preference file")
                _gin_file(cfg.sft_gin)
        else:
            need("vocab"), need("cache")
            _gin_file(cfg.model_gin)
            if stage != "pretrain" and cfg.sft_data_dir is None:
                problems.append(f"{stage} needs SFT data (PipelineConfig.sft_data_dir is None)")
            elif (stage != "pretrain" and ctx.done("cache")
                  and "sft_train_rows" not in ctx.result("cache")):
                problems.append(f"{stage} needs the SFT caches, but the cache stage ran without SFT "
                                "data: rerun it with --force=cache")
            need({"pretrain": "cache", "sft": "pretrain", "pairs": "sft", "rm": "pairs",
                  "ppo": "rm", "eval": "ppo"}[stage])
            if stage in ("rm", "ppo"):
                need("sft")
            if stage == "eval":
                need("sft"), need("rm")
    except (FileNotFoundError, ValueError, KeyError, SyntaxError) as e:
        problems.append(f"{stage}: {e}")
    return problems


def check_inputs(ctx: Context, chosen: Sequence[str]) -> None:
    problems = [p for stage in chosen if not ctx.done(stage) for p in _needs(ctx, stage, chosen)]
    os.makedirs(ctx.out, exist_ok=True)
    if not os.access(ctx.out, os.W_OK):
        problems.append(f"out_dir {ctx.out} is not writable")
    if problems:
        raise StageInputError("the pipeline cannot start:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------------------ CLI

def run(cfg: PipelineConfig, stages: Sequence[str] = STAGES, force: Sequence[str] = ()) -> dict:
    """Runs the chosen stages in order (skipping completed ones); returns {stage: result}."""
    ctx = Context(cfg)
    for stage in force:
        if ctx.done(stage):
            os.remove(ctx.dir(stage, "stage.json"))
    check_inputs(ctx, stages)
    results = {}
    for stage in STAGES:
        if stage not in stages:
            continue
        if ctx.done(stage):
            print(f"=== {stage}: complete in {ctx.dir(stage)}, skipped", flush=True)
            results[stage] = ctx.result(stage)
            continue
        print(f"=== {stage}", flush=True)
        os.makedirs(ctx.dir(stage), exist_ok=True)
        t0 = time.time()
        try:
            result = STAGE_FNS[stage](ctx)
        except (ValueError, FileNotFoundError) as e:  # bad settings or data: say which stage
            message = str(e).split("\n  In call to configurable")[0]
            raise StageError(f"stage {stage!r} failed: {type(e).__name__}: {message}") from e
        seconds = time.time() - t0
        ctx.record(stage, result, seconds)
        results[stage] = result
        brief = {k: v for k, v in result.items() if not isinstance(v, (list, dict))}
        print(f"    {stage} done in {seconds:.0f} s: {json.dumps(brief, ensure_ascii=False)}",
              flush=True)
    gin.clear_config()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    from zhchat.trainer import gin_cli

    files, bindings, rest = gin_cli.split_gin_args(sys.argv[1:] if argv is None else list(argv))
    p = argparse.ArgumentParser(prog="python -m zhchat.scripts.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=None, help="overrides PipelineConfig.out_dir")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {STAGES}")
    p.add_argument("--force", default="", help="stages to rerun although complete")
    args = p.parse_args(rest)
    stages = [s for s in args.stages.split(",") if s]
    force = [s for s in args.force.split(",") if s]
    unknown = sorted(set(stages + force) - set(STAGES))
    if unknown or not files:
        p.error(f"need --gin_file=PRESET and stages from {STAGES} (unknown: {unknown})")
    try:
        gin.clear_config()
        gin_cli.parse_gin(files, bindings)
        cfg = PipelineConfig()
        if args.out_dir:
            cfg = dataclasses.replace(cfg, out_dir=os.path.abspath(args.out_dir))
        else:
            cfg = dataclasses.replace(cfg, out_dir=os.path.abspath(cfg.out_dir))
        gin.clear_config()
        t0 = time.time()
        run(cfg, stages, force)
    except (gin_cli.GinConfigError, StageInputError, StageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"pipeline finished in {time.time() - t0:.0f} s; outputs under {cfg.out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The training stages: pretrain, sft, pairs, rm, ppo (no TensorFlow: they read caches only)."""

from __future__ import annotations

import json
import os
from typing import Any

import gin
import numpy as np

from zhchat.scripts.pipeline.config import Context, vocabulary


def _train(gin_files: list[str], bindings: list[str]) -> dict:
    from zhchat.gin_configs import cli as gin_cli
    from zhchat.trainer import train

    gin.clear_config()
    gin_cli.parse_gin(gin_files, bindings)
    return train.train()


def _vocab_size_binding(ctx: Context) -> list[str]:
    return [f"VOCAB_SIZE = {ctx.model_vocab_size()}"]


def _eval_steps(cache_dir: str, batch_size: int) -> int:
    from zhchat.tasks import cache_reader
    return max(1, cache_reader.cache_metadata(cache_dir)["num_examples"] // batch_size)


def stage_pretrain(ctx: Context) -> dict:
    from zhchat.tasks.baselines import unigram_baseline

    cfg = ctx.cfg
    val = ctx.cache("lm_validation")
    summary = _train([cfg.model_gin, "runs/pretrain.gin"], _vocab_size_binding(ctx) + [
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
    summary = _train([cfg.model_gin, "runs/sft.gin"], _vocab_size_binding(ctx) + [
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


def model_and_params(ctx: Context, checkpoints: str, *, under: tuple[str, ...] = ()
                      ) -> tuple[Any, Any]:
    from zhchat.rl.cli import load_params
    from zhchat.gin_configs import cli as gin_cli

    gin.clear_config()
    gin_cli.parse_gin([ctx.cfg.model_gin], _vocab_size_binding(ctx))
    model = gin_cli.evaluate_macro("MODEL")
    return model, load_params(directory=checkpoints, model=model, under=under)


def stage_pairs(ctx: Context) -> dict:
    from zhchat.rl import pair_builder

    cfg = ctx.cfg
    model, params = model_and_params(ctx, ctx.checkpoints("sft"))

    def dialogues():
        with open(ctx.cache("pair_dialogues.jsonl"), encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                yield record["id"], record["messages"]

    os.makedirs(ctx.dir("pairs"), exist_ok=True)
    out = pair_builder.build_pairs(
        model=model, params=params, vocab=vocabulary(ctx), dialogues=dialogues(),
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
    return _vocab_size_binding(ctx) + [f"VOCAB_PATH = '{ctx.vocab_path}'",
                               f"PREFERENCE_FILES = [{files}]",
                               f"SFT_CHECKPOINT = '{ctx.checkpoints('sft')}'"]


def stage_rm(ctx: Context) -> dict:
    from zhchat.rl import cli as rl_cli
    from zhchat.gin_configs import cli as gin_cli
    from zhchat.trainer import train

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
    from zhchat.gin_configs import cli as gin_cli

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

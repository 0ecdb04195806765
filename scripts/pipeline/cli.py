"""The pipeline driver: input checks, stage order, skip/resume, and the command line."""

from __future__ import annotations

import argparse
import json
import dataclasses
import glob
import os
import sys
import time
from typing import Callable, Sequence

import gin

from zhchat.scripts.pipeline.config import (REPO, STAGES, Context, PipelineConfig, StageError,
                                            StageInputError, gin_file, repo_path)
from zhchat.scripts.pipeline.data_stages import (parse_clean_gin, stage_cache, stage_clean,
                                                 stage_vocab)
from zhchat.scripts.pipeline.eval_stage import stage_eval
from zhchat.scripts.pipeline.train_stages import (stage_pairs, stage_ppo, stage_pretrain,
                                                  stage_rm, stage_sft)

STAGE_FNS: dict[str, Callable[[Context], dict]] = {
    "clean": stage_clean, "vocab": stage_vocab, "cache": stage_cache, "pretrain": stage_pretrain,
    "sft": stage_sft, "pairs": stage_pairs, "rm": stage_rm, "ppo": stage_ppo, "eval": stage_eval}


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
            parse_clean_gin(ctx)
            for src in gin.query_parameter("clean_corpus.sources"):
                src.scoped_configurable_fn().resolve(REPO)
            gin.clear_config()
        elif stage == "vocab":
            need("clean")
        elif stage == "cache":
            need("clean"), need("vocab")
            if cfg.sft_data_dir is not None:
                exists(repo_path(cfg.sft_data_dir), "SFT data folder")
                exists(os.path.join(repo_path(cfg.sft_data_dir), cfg.sft_pair_files),
                       "pair dialogues")
                for f in cfg.preference_files:
                    exists(repo_path(f), "preference file")
                gin_file(cfg.sft_gin)
        else:
            need("vocab"), need("cache")
            gin_file(cfg.model_gin)
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
    from zhchat.gin_configs import cli as gin_cli
    from zhchat.trainer import faults

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
    except faults.WRITE_ERRORS:
        faults.exit_after_write_error()
    print(f"pipeline finished in {time.time() - t0:.0f} s; outputs under {cfg.out_dir}", flush=True)
    return 0

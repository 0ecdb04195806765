"""The pipeline's settings (`PipelineConfig`, bound by gin_configs/pipelines/) and its run folders."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import gin

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
    # False: no `▁` before each document, so a prompt tokenizes as the same text does mid-document
    # (Chinese has no word spaces; with the prefix, `子曰` opens a prompt as the rare piece `▁子曰`)
    vocab_add_dummy_prefix: bool = True
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


def repo_path(path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(REPO, path)


def gin_file(name: str) -> str:
    """A gin file as given, else under the repository's gin_configs/ (as the CLIs look them up)."""
    for path in (name, os.path.join(REPO, "gin_configs", name)):
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise StageInputError(f"gin file {name!r} not found (as given or under gin_configs/)")


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


def vocabulary(ctx: Context) -> Any:
    from zhchat.tasks.vocabulary import Vocabulary
    return Vocabulary(ctx.vocab_path, extra_ids=EXTRA_IDS)

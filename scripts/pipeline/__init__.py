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
shared preference pairs are for non-commercial research: so are the models this trains."""

from zhchat.scripts.pipeline.cli import STAGE_FNS, check_inputs, main, run  # noqa: F401
from zhchat.scripts.pipeline.config import (DATA_STAGES, REPO, STAGES, Context,  # noqa: F401
                                            PipelineConfig, StageError, StageInputError)
from zhchat.scripts.pipeline.train_stages import model_and_params  # noqa: F401

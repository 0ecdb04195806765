#!/usr/bin/env bash
# Builds the packed encoder-decoder rows that the T5 packed benchmarks time
# (`t5_large.packed_sft.*`): ChatYuan-style instruction + multitask-prompt examples (mixture
# zh_sft_multitask, split train, file order) packed into rows of 512 inputs / 114 targets, about
# 1.5 examples a row, half the encoder positions padding: what T5 fine-tuning reads, and the case
# where every attention of the model needs segment masks (span-corruption pretraining rows are one
# full chunk each). On a CPU machine with TensorFlow + seqio, in the project's venv, ~1 minute:
#   1. $T5_PACKED_DATA/spm.model   8,000-piece SentencePiece of data/demo (speed only: ids fit T5)
#   2. $T5_PACKED_DATA/t5_sft      1,024 rows (1.2 MiB)
#   3. $T5_PACKED_DATA/prefix_lm_sft  the same mixture for the decoder: PrefixLM rows of 2,048
#      (inputs 1,024 + targets 1,024; `decoder_causal_attention` marks each example's inputs), 320
#      rows, what `decoder_*.prefix_lm_sft.*` time (prefix-LM attention, models/prefix_attention.py)
# T5_PACKED_DATA defaults to out/t5pack (the runner's {t5pack}: --data_root/t5pack). Idempotent.
# LICENCES: non-commercial research only (Alpaca-zh CC BY-NC 4.0, ShareGPT-zh, C3; FewCLUE states
# none; see ../shared/data/README.md). The demo corpus's notes are beside it in data/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
data=${T5_PACKED_DATA:-out/t5pack}
mkdir -p "$data"
[ -f "$data/spm.model" ] || "$py" -m zhchat.tasks.tokenizer --input="data/demo/*.jsonl.gz" \
  --format=jsonl --model_prefix="$data/spm" --vocab_size=8000
[ -f "$data/t5_sft/metadata.json" ] || "$py" -m zhchat.tasks.cache \
  --gin_file=gin_configs/tasks/sft_multitask.gin --gin.VOCAB_PATH="'$data/spm.model'" \
  --task=zh_sft_multitask --split=train --output_dir="$data/t5_sft" \
  --feature_lengths inputs=512,targets=114 --converter=encdec --max_examples=1024
[ -f "$data/prefix_lm_sft/metadata.json" ] || "$py" -m zhchat.tasks.cache \
  --gin_file=gin_configs/tasks/sft_multitask.gin --gin.VOCAB_PATH="'$data/spm.model'" \
  --task=zh_sft_multitask --split=train --output_dir="$data/prefix_lm_sft" \
  --feature_lengths inputs=1024,targets=1024 --converter=prefix_lm --max_examples=320
du -b -s "$data/t5_sft" "$data/prefix_lm_sft"

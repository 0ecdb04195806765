#!/usr/bin/env bash
# Time of the offline evaluation on decoder_1b (one GPU): CMMLU (the shared data's 20 test
# subjects, 5-shot) and C3 dev. The checkpoint is decoder_1b after one step on synthetic data (the
# timing does not depend on the weights); the tokenizer is the 32k one of benchmarks/convergence_data.sh.
# Carry out/conv/spm.model, out/eval_data/{cmmlu,c3} (copies of the shared eval folders) and .whl/:
#   OUT=... bash benchmarks/evaluate_gpu.sh
set -u
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh  # zhchat importable; cd /tmp; sets $repo
out=$(realpath -m "${OUT:-$repo/out/eval_results}")
run=/tmp/eval_decoder_1b
mkdir -p "$out"
t0=$(date +%s)
python3 -m zhchat.trainer.train --gin_file=models/decoder_1b.gin --gin_file=runs/pretrain.gin \
  --gin_file=runs/synthetic_data.gin --gin.RUN_DIR="'$run'" --gin.NUM_STEPS=1 --gin.BATCH_SIZE=8 \
  --gin.train.checkpoint_every=1 --gin.train.progress_bar=False --gin.train.async_checkpointing=False \
  2>&1 | grep -v "^I0000\|^W0000" | tail -3
echo "checkpoint written in $(( $(date +%s) - t0 )) s"
t0=$(date +%s)
python3 -m zhchat.scripts.evaluate --run_dir="$run" --vocab="$repo/out/conv/spm.model" \
  --out="$out/report" --suite_gin=evals/cmmlu.gin --suite_gin=evals/c3.gin \
  --gin.Suites.cmmlu_dir="'$repo/out/eval_data/cmmlu'" --gin.Suites.cmmlu_shots=[5] \
  --gin.Suites.c3_files="['$repo/out/eval_data/c3/*-dev.json']" \
  --batch_size="${BATCH:-32}" --max_len=2048 --bucket=256 --no_progress 2>&1 \
  | grep -v "^I0000\|^W0000" | tail -40
echo "evaluation finished in $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/env.txt" 2>&1

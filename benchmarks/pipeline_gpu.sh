#!/usr/bin/env bash
# The 100m pipeline preset's training stages on one GPU, from the data stages' output built on a CPU
# machine with TensorFlow/seqio/Beam:
#   python -m zhchat.scripts.pipeline --gin_file=pipelines/zero_chatgpt_100m.gin \
#     --out_dir=out/zc100m --stages=clean,vocab,cache
# then, on the GPU host with out/zc100m/{vocab,cache} and the carried wheels (.whl/):
#   OUT=... bash benchmarks/pipeline_gpu.sh pretrain,sft        # one call
#   OUT=... bash benchmarks/pipeline_gpu.sh pairs,rm,ppo,eval   # the next (same machine, warm)
# Every stage.json, the eval report and the logs are bundled into $OUT/pipeline.tar.gz.
set -u
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh  # zhchat importable; cd /tmp; sets $repo
out=$(realpath -m "${OUT:-$repo/out/pipeline_results}")
run=$(realpath -m "${PIPELINE_DIR:-$repo/out/zc100m}")
mkdir -p "$out"
stages=${1:-pretrain,sft,pairs,rm,ppo,eval}
python3 -m zhchat.scripts.pipeline --gin_file=pipelines/zero_chatgpt_100m.gin --out_dir="$run" \
  --stages="$stages" "${@:2}" 2>&1 | grep -v "^I0000\|^W0000" | tee "$out/pipeline_${stages//,/_}.log" \
  | grep "^===\|done in\|error\|finished"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/env.txt" 2>&1
(cd "$run" && tar -czf "$out/pipeline.tar.gz" */stage.json eval/report.md \
  */run/metrics.jsonl pairs/pairs.jsonl 2>/dev/null; true)

#!/usr/bin/env bash
# The issue-4 benchmark suite on one GPU: our trainer step and decoding vs HF transformers + torch,
# for the ~1B decoder and T5 v1.1-large, in one call. Results go to $OUT (default out/bench) as
# json lines, plus a log per run. Works from a plain checkout: the zhchat namespace is assembled
# from symlinks when the package is not installed (GPU images without a build toolchain).
#   bash benchmarks/gpu_suite.sh [quick|train|decode|all]
set -u
cd "$(dirname "$0")/.."
what=${1:-all}
out=$(realpath -m "${OUT:-out/bench}")
mkdir -p "$out"
if ! (cd /tmp && python3 -c "import zhchat.models") 2>/dev/null; then
  ns=$(mktemp -d); mkdir -p "$ns/zhchat"; cp zhchat/__init__.py "$ns/zhchat/"
  for d in tasks models rl scripts trainer gin_configs benchmarks; do ln -s "$PWD/$d" "$ns/zhchat/$d"; done
  export PYTHONPATH="$ns${PYTHONPATH:+:$PYTHONPATH}"
fi
cd /tmp  # the checkout's own zhchat/ folder would shadow the assembled namespace
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
run() {  # run NAME TIMEOUT CMD...
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee -a "$out/suite.log"
  timeout "$limit" "$@" --out="$out/results.jsonl" > "$out/$name.log" 2>&1
  echo "   rc=$? $(tail -n 1 "$out/$name.log" | cut -c1-400)" | tee -a "$out/suite.log"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, jax.devices())"
} > "$out/env.txt" 2>&1; cat "$out/env.txt"
steps=${STEPS:-10}
if [ "$what" = quick ]; then steps=3; fi
if [ "$what" != decode ]; then
  run ours_decoder_1b 420 python3 -m zhchat.benchmarks.train_throughput --workload=decoder_1b --steps=$steps
  run hf_decoder_1b 300 python3 -m zhchat.benchmarks.hf_baseline --workload=decoder_1b --steps=$steps
  run ours_t5_large 420 python3 -m zhchat.benchmarks.train_throughput --workload=t5_large --steps=$steps
  run hf_t5_large 300 python3 -m zhchat.benchmarks.hf_baseline --workload=t5_large --steps=$steps
fi
if [ "$what" != train ]; then
  run decode_decoder_1b 420 python3 -m zhchat.benchmarks.decode_throughput --workload=decoder_1b --repeats=2
  run decode_t5_large 420 python3 -m zhchat.benchmarks.decode_throughput --workload=t5_large --repeats=2 --prompt_len=512
fi

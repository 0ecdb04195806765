#!/usr/bin/env bash
# The GPU side of the benchmark runner: named benchmarks or groups of benchmarks/registry.py
# (`python -m zhchat.benchmarks.run --list`), each in its own process, one stamped json line each
# appended to $OUT/results.jsonl (default out/bench); logs per benchmark, outputs and (PROFILE=1)
# train-step traces go into $OUT/bundle.tgz. Works from a plain checkout (gpu_env.sh). Options after
# the names go to the runner (--steps=N, --cache=DIR, --data_root=DIR, --dry_run, ...).
#   OUT=... bash benchmarks/gpu_suite.sh headline                    # BENCHMARKS.md's headline table
#   OUT=... bash benchmarks/gpu_suite.sh decoder_1b t5_large decode  # the issue-4 tables
#   OUT=... bash benchmarks/gpu_suite.sh decoder_1b.synthetic.train_step --steps=10
# The checkout on the GPU may have no .git: pass the commit to stamp, e.g.
#   ZHCHAT_GIT_COMMIT=$(git rev-parse HEAD) ZHCHAT_GIT_DIRTY=0 bash benchmarks/gpu_suite.sh ...
# The GPU tests are pytest's, not a part: JAX_PLATFORMS=cuda python -m pytest -m gpu tests (on an
# image without TensorFlow/seqio, name the *_gpu.py files from /tmp: docs/benchmarks.md says how)
set -u
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: bash benchmarks/gpu_suite.sh NAME_OR_GROUP... [runner options]" >&2
                  exit 2; }
source benchmarks/gpu_env.sh  # zhchat importable from the checkout; cd /tmp; sets $repo
out=$(realpath -m "${OUT:-$repo/out/bench}")
mkdir -p "$out"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/env.txt" 2>&1
profile=(); [ -n "${PROFILE:-}" ] && profile=(--profile_dir="$out/profiles")
python3 -m zhchat.benchmarks.run --out="$out/results.jsonl" --work_dir="$out/work" \
  --log_dir="$out/logs" "${profile[@]}" "$@" 2>&1 | tee -a "$out/suite.log"
rc=${PIPESTATUS[0]}
case " $* " in *pipeline*)  # the pipeline writes under its own folder: keep its records too
  (cd "$repo/out/zc100m" 2>/dev/null && tar -czf "$out/pipeline.tar.gz" */stage.json \
    eval/report.md */run/metrics.jsonl pairs/pairs.jsonl 2>/dev/null; true) ;;
esac
bundle_out "$out" logs work profiles  # results.jsonl, suite.log, env.txt stay beside it
exit "$rc"

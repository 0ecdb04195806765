# Sourced by the GPU scripts (gpu_suite.sh, convergence_gpu.sh) from the repository root: makes
# `zhchat` importable from a plain checkout (the namespace is assembled from symlinks when the
# package is not installed, as on GPU images without a build toolchain), installs carried wheels
# from .whl/ when present (gin, grain, array-record: the cache reader), then leaves the shell in
# /tmp, where the checkout's own zhchat/ folder cannot shadow that namespace. Sets $repo.
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import grain" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! (cd /tmp && python3 -c "import zhchat.models") 2>/dev/null; then
  ns=$(mktemp -d); mkdir -p "$ns/zhchat"; cp zhchat/__init__.py "$ns/zhchat/"
  for d in tasks models rl scripts trainer gin_configs benchmarks; do ln -s "$PWD/$d" "$ns/zhchat/$d"; done
  export PYTHONPATH="$ns${PYTHONPATH:+:$PYTHONPATH}"
fi
repo=$PWD
cd /tmp
export PYTHONUNBUFFERED=1

# Sourced by benchmarks/gpu_suite.sh (the GPU side of `python -m zhchat.benchmarks.run`) from the
# repository root: makes `zhchat` importable from a plain checkout (the namespace is assembled from
# symlinks when the package is not installed, as on GPU images without a build toolchain), installs
# carried wheels from .whl/ when present (gin, grain, array-record: the cache reader), then leaves
# the shell in /tmp, where the checkout's own zhchat/ folder cannot shadow that namespace. Sets
# $repo and defines bundle_out.
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
bundle_out() {  # bundle_out OUT DIR...: at most 8 files come back from a device call, so the
  # logs/outputs/perfetto traces under OUT go into one archive (15 MB parts when larger); the xplane
  # protos and checkpoint folders stay behind (large)
  local o=$1; shift
  for d in "$o"/profiles/*/; do
    [ -d "$d" ] || continue
    t=$(find "$d" -name perfetto_trace.json.gz | head -n 1)
    [ -n "$t" ] && cp "$t" "$o/profiles/$(basename "$d").perfetto_trace.json.gz"
  done
  find "$o/profiles" -mindepth 1 -type d -prune -exec rm -rf {} + 2>/dev/null
  local dirs=(); for d in "$@"; do [ -d "$o/$d" ] && dirs+=("$d"); done
  [ ${#dirs[@]} -gt 0 ] || return 0
  tar czf "$o/bundle.tgz" --exclude=checkpoints -C "$o" "${dirs[@]}" && (cd "$o" && rm -rf "${dirs[@]}")
  if [ "$(stat -c %s "$o/bundle.tgz")" -gt 15000000 ]; then
    split -b 15000000 -d "$o/bundle.tgz" "$o/bundle.tgz.part" && rm "$o/bundle.tgz"
  fi
}

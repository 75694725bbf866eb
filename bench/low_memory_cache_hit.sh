#!/bin/bash
# bench/README.md, "2026-12-04: a warm start no longer reads the model": peak RSS of a whole
# `cpuflow generate`, warm cache imported in place (new) vs OpenVINO's own lookup (old), M = an
# `cpuflow export --random-weights --arch sd15 --format openvino --quantize int8` folder.

# run inside the venv (. .venv/bin/activate)
M=${1:?usage: low_memory_cache_hit.sh MODEL_DIR [CACHE_ROOT]}
ROOT=${2:-/tmp/cpuflow-memcheck}
OLD=(python -c "import sys; from cpuflow.backends import openvino_backend as o; o.OpenVINOBackend._import_cached=lambda self,*a,**k:(None,None); from cpuflow.cli import main; sys.argv[0]='cpuflow'; main()")
NEW=(python -c "import sys; from cpuflow.cli import main; sys.argv[0]='cpuflow'; main()")
run() { # label, cache dir, cmd...
  local label=$1 cache=$2; shift 2
  CPUFLOW_CACHE_DIR=$cache /usr/bin/time -f "%M" -o /tmp/mem.$$ "$@" generate --model $M "a lighthouse" --steps 2 --seed 1 \
      --threads 2 --variant int8 --out /tmp/mem-$label.png "${EXTRA[@]}" > /tmp/mem-$label.log 2>&1
  echo "$label rc=$? peak_kb=$(cat /tmp/mem.$$) $(grep -o 'load_compile[^,]*' /tmp/mem-$label.log | head -1)"
}
for mode in low default; do
  if [ $mode = low ]; then EXTRA=(--low-memory); else EXTRA=(); fi
  C=$ROOT/cache-$mode; rm -rf $C
  run $mode-first $C "${NEW[@]}"
  run $mode-warm-new $C "${NEW[@]}"
  run $mode-warm-old $C "${OLD[@]}"
  run $mode-warm-new2 $C "${NEW[@]}"
  run $mode-warm-old2 $C "${OLD[@]}"
  EXTRA+=(--no-cache); run $mode-nocache $C "${NEW[@]}"
done

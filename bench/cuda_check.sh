#!/usr/bin/env bash
# The CUDA execution-provider check (issue #15 item 5) on a lent GPU machine that has
# python3 with torch (CUDA 13) and its nvidia-* libraries, and no internet. What it needs
# beside the checkout travels in .devcarry/ (git-ignored; bench/README.md, "CUDA execution
# provider", says how it is made):
#   ort.tar.xz.part-*   onnxruntime-gpu 1.31.1 (CUDA 13, cp312), repacked to fit the transfer
#                       (bench/ort_gpu_repack.py: the recipe)
#   whl/*.whl           diffusers, importlib_metadata, platformdirs (pure Python)
#   sd1/                the CLIP tokenizer files (scripts/fetch_clip_vocab.sh)
# The parts may come over several calls: `bash bench/cuda_check.sh stage` only keeps what
# came (in /tmp/devcarry); the call without `stage` runs the check. Results go to $OUT.
set -uo pipefail
OUTD=${OUT:-/tmp/cuda-check-out}
mkdir -p "$OUTD" /tmp/devcarry
for d in .devcarry*; do [ -d "$d" ] && cp -r "$d"/. /tmp/devcarry/; done
if [ "${1:-}" = stage ]; then ls -la /tmp/devcarry; exit 0; fi
exec > >(tee "$OUTD/log.txt") 2>&1
date -u
SITE=/tmp/site
mkdir -p $SITE
if [ -z "${CUDA_CHECK_SKIP_INSTALL:-}" ]; then
    cat /tmp/devcarry/ort.tar.xz.part-* | xz -d | tar xf - -C $SITE || { echo "onnxruntime-gpu parts incomplete"; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE /tmp/devcarry/whl/*.whl \
        || exit 3
fi
ln -sfn "$PWD/export" $SITE/cpuflow_export
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import onnxruntime as o, torch; print('onnxruntime', o.__version__, o.get_available_providers(), 'torch', torch.__version__)"
CLI=(python3 -c "import sys; from cpuflow.cli import main; sys.argv[0] = 'cpuflow'; main()")
GPU=${CUDA_CHECK_DEVICE:-cuda}   # cpu: a dry run of this script on a machine without a GPU

# 1. The shipped model (trained, 64x64): default variant and fp32, txt2img and img2img.
#    First as a user would run it (cpuflow asks ORT to preload the nvidia-* libraries);
#    if CUDA cannot start that way, again with LD_LIBRARY_PATH, and the log says so.
timeout 240 python3 bench/cuda_check.py --gpu-device "$GPU" --out /tmp/cc1 --model default --img2img --repeat 5 --cpu-repeat 3
rc1=$?
if [ $rc1 -ne 0 ] && [ $rc1 -ne 1 ]; then
    echo "== CUDA did not start with cpuflow's preload (rc $rc1): retrying with LD_LIBRARY_PATH"
    SP=$(python3 -c "import site; print(site.getsitepackages()[0])")
    export LD_LIBRARY_PATH=$(find "$SP/nvidia" -name 'lib*.so*' -printf '%h\n' | sort -u | paste -sd:):${LD_LIBRARY_PATH:-}
    timeout 240 python3 bench/cuda_check.py --gpu-device "$GPU" --out /tmp/cc1 --model default --img2img --repeat 5 --cpu-repeat 3
fi
cp /tmp/cc1/cuda_check.json "$OUTD/cuda_check_default.json"

# 2. Full-size SD 1.5, random weights (latency and parity, not beauty): export, then 512x512,
#    20 steps, guidance 7.5 on CUDA (1 warm-up + 3) and on the CPU provider (1 image), and
#    diffusers on CUDA on the same weights.
t0=$(date +%s)
timeout 300 "${CLI[@]}" export --random-weights --arch sd15 --format onnx --tokenizer /tmp/devcarry/sd1 /tmp/sd15 \
    && echo "export: $(( $(date +%s) - t0 )) s"
timeout 300 python3 bench/cuda_check.py --gpu-device "$GPU" --out /tmp/cc2 --model /tmp/sd15=sd15-random --steps 20 --guidance 7.5 \
    --repeat 3 --cpu-repeat 0 --torch-cuda --tf32-off
cp /tmp/cc2/cuda_check.json "$OUTD/cuda_check_sd15.json"
tar cf "$OUTD/images.tar" -C /tmp --exclude='*.json' cc1 cc2
date -u

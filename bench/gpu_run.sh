#!/bin/bash
# Issue 15's GPU check, in one call of the device tool (bench/RESULTS.md, "The GPU run"):
#
#   run(command="bash bench/gpu_run.sh", carry=[".whl", ".bench_examples"], timeout_s=600)
#
# after preparing .whl and .bench_examples here once (RESULTS.md). Three steps, each with
# its own time limit and its own files under $OUT, so a step that runs out of time still
# leaves the others' results (the benchmark prints and writes partial results on SIGINT):
#   1. gpu.txt, results.json, log.txt   the benchmark, modes a, b, c, eager (~2.5 min)
#   2. syncs_cuda.txt                   tests/test_syncs.py on CUDA: real waits (~1 min)
#   3. compiled.json, compiled.txt      mode b with the compiled UNet, checked against
#                                       eager (compiling every shape: minutes)
#
# A dry run on a CPU (the same steps on the tiny models, to check the script before the
# device time is spent): XMGIE_GPU_RUN_SIZE=tiny XMGIE_GPU_RUN_DEVICE=cpu bash bench/gpu_run.sh
set -u
OUT=${OUT:-/tmp/xmgie-out}
SIZE=${XMGIE_GPU_RUN_SIZE:-sd15}
DEV=${XMGIE_GPU_RUN_DEVICE:-cuda}
# the whole script ends inside the device call's 600 s: step 3 gets what is left of 570 s
BUDGET=${XMGIE_GPU_RUN_BUDGET:-570}
START=$SECONDS
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 XMGIE_NO_PROGRESS=1
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used --format=csv || echo "no nvidia-smi"; } | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

echo "== 1. benchmark (eager)"
timeout -s INT 300 python3 bench/edit_bench.py --size "$SIZE" --device "$DEV" \
    --examples .bench_examples --limit 1 --out "$OUT/results.json" 2>&1 | tee "$OUT/log.txt"

echo "== 2. host synchronisations on CUDA (tiny models on the GPU)"
# the tests import the checkout as the package "xmgie": a copy under that name
mkdir -p /tmp/pkg && rm -rf /tmp/pkg/xmgie && cp -r "$PWD" /tmp/pkg/xmgie && rm -rf /tmp/pkg/xmgie/.whl
(cd /tmp/pkg/xmgie && PYTHONPATH=/tmp/site:/tmp/pkg timeout 150 python3 -m pytest -q \
    -p no:cacheprovider tests/test_syncs.py -k "not identity") 2>&1 | tail -25 \
    | tee "$OUT/syncs_cuda.txt"

LEFT=$(( BUDGET - (SECONDS - START) ))
echo "== 3. compiled UNet (mode b), ${LEFT} s left"
[ "$LEFT" -lt 60 ] && { echo "too little time left for step 3"; exit 0; }
timeout -s INT "$LEFT" python3 bench/edit_bench.py --size "$SIZE" --device "$DEV" \
    --examples .bench_examples --limit 1 --modes b --compile default --sync-steps 0 \
    --out "$OUT/compiled.json" 2>&1 | tee "$OUT/compiled.txt"

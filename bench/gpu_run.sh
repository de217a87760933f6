#!/bin/bash
# Issue 15's GPU check, in one call of the device tool (bench/RESULTS.md, "The GPU run"):
#
#   run(command="bash bench/gpu_run.sh", carry=[".whl", ".bench_examples"], timeout_s=600)
#
# after preparing .whl and .bench_examples here once (RESULTS.md). Steps, each with
# its own time limit and its own files under $OUT, so a step that runs out of time still
# leaves the others' results (the benchmark prints and writes partial results on SIGINT):
#   1. gpu.txt, results.json, log.txt   the benchmark, modes a, b, c, eager (~2.5 min)
#   2. syncs_cuda.txt                   tests/test_syncs.py on CUDA: real waits (~1 min)
#   3. compiled.json, compiled.txt      mode b with the compiled UNet, checked against
#                                       eager (compiling every shape: minutes)
# and two more, for the next GPU session (the first run, 2026-11-30, had no time left):
#   4. fp32_a_c.json, fp32_a_c.txt      a and c in float32, no TF32, deterministic cuDNN,
#                                       10 steps: do they give the same edit on a GPU?
#   5. graphs.json, graphs.txt          mode b with --compile reduce-overhead (CUDA graphs)
# XMGIE_GPU_RUN_STEPS picks them (default "1 2 3"; e.g. "4 5"); the last step listed gets
# what is left of the budget.
#
# A dry run on a CPU (the same steps on the tiny models, to check the script before the
# device time is spent): XMGIE_GPU_RUN_SIZE=tiny XMGIE_GPU_RUN_DEVICE=cpu bash bench/gpu_run.sh
set -u
OUT=${OUT:-/tmp/xmgie-out}
SIZE=${XMGIE_GPU_RUN_SIZE:-sd15}
DEV=${XMGIE_GPU_RUN_DEVICE:-cuda}
# the whole script ends inside the device call's 600 s: the steps share 570 s, steps 1 and
# 4 capped at 300 and 150 s, steps 3 and 5 given what is left
BUDGET=${XMGIE_GPU_RUN_BUDGET:-570}
STEPS=${XMGIE_GPU_RUN_STEPS:-1 2 3}
START=$SECONDS
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 XMGIE_NO_PROGRESS=1
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used --format=csv || echo "no nvidia-smi"; } | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

left() { echo $(( BUDGET - (SECONDS - START) )); }
bench() {   # bench LIMIT_S NAME ARGS...: one benchmark run, SIGINT at its limit
    local limit=$1 name=$2; shift 2
    [ "$limit" -lt 60 ] && { echo "too little time left for $name"; return 0; }
    timeout -s INT "$limit" python3 bench/edit_bench.py --size "$SIZE" --device "$DEV" \
        --examples .bench_examples --limit 1 --out "$OUT/$name.json" "$@" 2>&1 \
        | tee "$OUT/$name.txt"
}

for step in $STEPS; do
    L=$(left)
    case $step in
    1)  echo "== 1. benchmark (eager), ${L} s left"
        bench $(( L < 300 ? L : 300 )) results
        cp "$OUT/results.txt" "$OUT/log.txt" 2>/dev/null ;;
    2)  echo "== 2. host synchronisations on CUDA (tiny models on the GPU)"
        # the tests import the checkout as the package "xmgie": a copy under that name
        mkdir -p /tmp/pkg && rm -rf /tmp/pkg/xmgie && cp -r "$PWD" /tmp/pkg/xmgie \
            && rm -rf /tmp/pkg/xmgie/.whl
        (cd /tmp/pkg/xmgie && PYTHONPATH=/tmp/site:/tmp/pkg timeout 150 python3 -m pytest -q \
            -p no:cacheprovider tests/test_syncs.py -k "not identity") 2>&1 | tail -40 \
            | tee "$OUT/syncs_cuda.txt" ;;
    3)  echo "== 3. compiled UNet (mode b), ${L} s left"
        bench "$L" compiled --modes b --compile default --sync-steps 0 ;;
    4)  echo "== 4. a and c in float32, deterministic, 10 steps, ${L} s left"
        bench $(( L < 150 ? L : 150 )) fp32_a_c --modes a,c --steps 10 --dtype fp32 \
            --deterministic --sync-steps 0 --warmup-steps 1 ;;
    5)  echo "== 5. CUDA graphs (mode b, reduce-overhead), ${L} s left"
        bench "$L" graphs --modes b --compile reduce-overhead --sync-steps 0 ;;
    *)  echo "unknown step $step" ;;
    esac
done

#!/bin/bash
# The pack's GPU measurements in one script. bench/RESULTS.md says what each step
# measures, the targets, how to read the results, and records a run on an H200.
#
#   bash bench/gpu_run.sh                           # a machine with a CUDA GPU: step 6
#   XMGIE_GPU_RUN_STEPS="1 2 3 4 5" XMGIE_GPU_RUN_BUDGET=1200 bash bench/gpu_run.sh
#   XMGIE_GPU_RUN_SIZE=tiny XMGIE_GPU_RUN_DEVICE=cpu XMGIE_GPU_RUN_ARGS="--steps 4" \
#       bash bench/gpu_run.sh                       # dry run on a CPU (a few minutes)
#   XMGIE_GPU_RUN_SIZE=tiny XMGIE_GPU_RUN_DEVICE=cpu XMGIE_GPU_RUN_STEPS=7 \
#       bash bench/gpu_run.sh                       # step 7's dry run on a CPU (seconds)
#   XMGIE_GPU_RUN_STEPS=8 bash bench/gpu_run.sh     # SDXL at 1024 px (about 6 minutes)
#   XMGIE_GPU_RUN_SIZE=tiny XMGIE_GPU_RUN_DEVICE=cpu XMGIE_GPU_RUN_STEPS=8 \
#       XMGIE_GPU_RUN_ARGS="--steps 4" bash bench/gpu_run.sh   # step 8's dry run (a minute)
#
# Run it from the repository root. It needs torch (with CUDA for a real run) and the
# pack's dependencies, e.g. `pip install -e ".[test]"`. On a machine that cannot reach a
# package index, put wheels of what is missing (diffusers, kornia, segment-anything, ...)
# in .whl/ first: the script installs them into /tmp/site, without an index or
# dependencies, and puts that first on the path. The benchmark imports this checkout as
# the package `xmgie` itself; the tests of steps 2 and 6 run from a copy named xmgie.
#
# Steps (XMGIE_GPU_RUN_STEPS, default "6": the CUDA-graph run, within 10 minutes). Each
# has its own time limit and its own files under $OUT (default /tmp/xmgie-out), so a
# step that runs out of time leaves the others' results; the benchmark prints and writes
# what it measured when it is stopped (SIGINT at the limit):
#   1  results.json, results.txt   modes a, b, c eagerly (SD 1.5-size random models,
#                                  512 px, 50 steps, fp16): times, pass counts, overhead,
#                                  peak memory, syncs (about 4 minutes on an H200)
#   2  syncs_cuda.txt              tests/test_syncs.py with the tiny models on the GPU,
#                                  where the counter sees real waits and copies (~1 min)
#   3  compiled.json, compiled.txt mode b with the compiled UNet ("default"), checked
#                                  against the same edit made eagerly (compiling every
#                                  shape takes minutes)
#   4  fp32_a_c.json, fp32_a_c.txt modes a and c in float32 with TF32 off and
#                                  deterministic cuDNN, 10 steps: same edit on a GPU?
#   5  graphs.json, graphs.txt     mode b with "reduce-overhead" (inductor's CUDA graphs)
#   6  cudagraphs_tests.txt        tests/test_graphs.py on the GPU: graphed against eager
#                                  edits and inversions within the fp16 tolerances
#      cudagraphs.json, .txt       modes b (fast) and c (seed-faithful) with whole UNet
#                                  calls captured as CUDA graphs (--compile graphs),
#                                  after 10-step equality checks against eager edits
#      eager_b_c.json, .txt        the same two modes eagerly on the same GPU (baseline)
#   7  train_gpu.json, .txt        `xmgie train`'s xMGIE config through the real engine
#                                  (SD 1.5-size random models, 512 px, bf16, per_device
#                                  4, global 32): peak allocated and reserved GiB, steps/s
#                                  and samples/s, gradient checkpointing on and off, 3
#                                  steps after 1 warm-up each (bench/train_gpu_memory.py;
#                                  not in the default run; its own options in
#                                  XMGIE_GPU_RUN_TRAIN_ARGS, e.g. "--checkpointing on")
#   8  sdxl_memory_estimate.json, .txt  SDXL's memory at 1024 px estimated without a GPU
#                                  (bench/sdxl_memory.py: the full-size models on the
#                                  meta device), beside the measurement:
#      sdxl.json, sdxl.txt         modes b and c eagerly with SDXL-size random models
#                                  (1024 px, 50 steps, fp16): times, pass counts and the
#                                  peak allocated and reserved memory of the two-branch
#                                  batch of 4 with MAG's backward and null-text (the
#                                  24 GB question); with XMGIE_GPU_RUN_SIZE=tiny, the
#                                  tiny SDXL at 128 px. Not in the default run
# plus gpu.txt (the GPU and library versions). The steps share XMGIE_GPU_RUN_BUDGET
# seconds (default 570: the default run fits in 10 minutes with the setup); each is
# also capped (below), and one with under a minute left is skipped.
# XMGIE_GPU_RUN_ARGS is appended to every benchmark call of steps 1, 3-6 and 8 (later
# options win, so "--steps 4" shortens every step for a dry run).
set -u
OUT=${OUT:-/tmp/xmgie-out}
SIZE=${XMGIE_GPU_RUN_SIZE:-sd15}
DEV=${XMGIE_GPU_RUN_DEVICE:-cuda}
BUDGET=${XMGIE_GPU_RUN_BUDGET:-570}
STEPS=${XMGIE_GPU_RUN_STEPS:-6}
EXTRA=${XMGIE_GPU_RUN_ARGS:-}
TRAIN_EXTRA=${XMGIE_GPU_RUN_TRAIN_ARGS:-}   # step 7's own options
PKG=${XMGIE_GPU_RUN_PKG:-/tmp/pkg}    # where the tests' copy named xmgie goes
START=$SECONDS
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XMGIE_NO_PROGRESS=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "installing .whl/ failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used \
    --format=csv || echo "no nvidia-smi"; } | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/gpu.txt"

left() { echo $(( BUDGET - (SECONDS - START) )); }
cap() { local l; l=$(left); echo $(( l < $1 ? l : $1 )); }   # min(time left, $1)
bench() {   # bench LIMIT_S NAME ARGS...: one benchmark run, SIGINT at its limit
    local limit=$1 name=$2; shift 2
    [ "$limit" -lt 60 ] && { echo "too little time left for $name: skipped"; return 0; }
    # shellcheck disable=SC2086  # EXTRA is a list of options
    timeout -s INT "$limit" python3 bench/edit_bench.py --size "$SIZE" --device "$DEV" \
        --limit 1 --out "$OUT/$name.json" "$@" $EXTRA 2>&1 | tee "$OUT/$name.txt"
}

tests() {   # tests LIMIT_S FILE PYTEST_ARGS...: the tests from a copy named xmgie
    # the tests import the checkout as the package "xmgie": a copy under that name
    local limit=$1 file=$2; shift 2
    [ "$limit" -lt 60 ] && { echo "too little time left for $file: skipped"; return 0; }
    mkdir -p "$PKG" && rm -rf "$PKG/xmgie" && cp -r "$PWD" "$PKG/xmgie" \
        && rm -rf "$PKG/xmgie/.whl"
    (cd "$PKG/xmgie" && PYTHONPATH=$PKG${PYTHONPATH:+:$PYTHONPATH} \
        timeout "$limit" python3 -m pytest -q -p no:cacheprovider "$@") 2>&1 | tail -40 \
        | tee "$OUT/$file"
}

for step in $STEPS; do
    case $step in
    1)  echo "== 1. benchmark, modes a b c, eager ($(left) s left)"
        bench "$(cap 330)" results ;;
    2)  echo "== 2. host synchronisations on $DEV, tiny models ($(left) s left)"
        # Not the identity test: its encoder stays on the CPU, where nothing waits.
        tests "$(cap 150)" syncs_cuda.txt tests/test_syncs.py -k "not identity" ;;
    3)  echo "== 3. compiled UNet, mode b ($(left) s left)"
        bench "$(cap 300)" compiled --modes b --compile default --sync-steps 0 ;;
    4)  echo "== 4. a and c in float32, deterministic, 10 steps ($(left) s left)"
        bench "$(cap 150)" fp32_a_c --modes a,c --steps 10 --dtype fp32 --deterministic \
            --sync-steps 0 --warmup-steps 1 ;;
    5)  echo "== 5. CUDA graphs, mode b, reduce-overhead ($(left) s left)"
        bench "$(cap 300)" graphs --modes b --compile reduce-overhead --sync-steps 0 ;;
    6)  echo "== 6. CUDA graphs: tests, modes b and c graphed, eager baseline ($(left) s left)"
        tests "$(cap 120)" cudagraphs_tests.txt tests/test_graphs.py
        # graphed first (the step's result), with 10-step checks against eager edits
        bench "$(cap 300)" cudagraphs --modes b,c --compile graphs --check-steps 10 \
            --sync-steps 0 --warmup-steps 2
        bench "$(cap 200)" eager_b_c --modes b,c --sync-steps 0 --warmup-steps 1 ;;
    7)  echo "== 7. training memory and speed, xMGIE config, checkpointing on/off ($(left) s left)"
        limit=$(cap 240)
        if [ "$limit" -lt 60 ]; then
            echo "too little time left for train_gpu: skipped"
        else
            # shellcheck disable=SC2086  # TRAIN_EXTRA is a list of options
            timeout -s INT "$limit" python3 bench/train_gpu_memory.py --size "$SIZE" \
                --device "$DEV" --out "$OUT/train_gpu.json" $TRAIN_EXTRA 2>&1 \
                | tee "$OUT/train_gpu.txt"
        fi ;;
    8)  echo "== 8. SDXL at 1024 px: memory estimate, modes b and c eagerly ($(left) s left)"
        timeout 120 python3 bench/sdxl_memory.py --out "$OUT/sdxl_memory_estimate.json" 2>&1 \
            | grep -v "should be kept in float32" | tee "$OUT/sdxl_memory_estimate.txt"
        sdxl_size=sdxl
        [ "$SIZE" = tiny ] && sdxl_size=tiny_sdxl
        # later options win: this --size over the script's
        bench "$(cap 480)" sdxl --size "$sdxl_size" --modes b,c --sync-steps 0 \
            --warmup-steps 1 ;;
    *)  echo "unknown step $step (steps are 1 to 8)" ;;
    esac
done
echo "== done in $(( SECONDS - START )) s; files in $OUT"

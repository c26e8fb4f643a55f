#!/usr/bin/env bash
# GPU validation on a machine with one NVIDIA GPU (issue 7): every step's output goes to OUT_DIR/<step>.log.
#
#   bash benchmarks/gpu_validation.sh [OUT_DIR] [STEP ...]
#
# Issue 24's measurement (compiled dtrain >= 1.3x in-memory DDP, GPU busy >= 95%, bf16, batch 256) in one call,
# about 10 minutes on one H100/H200 (env ~10 s, goal ~6-8 min, host_step ~1-2 min; estimates, not yet timed):
#
#   bash benchmarks/gpu_validation.sh docs/gpu-YYYY-MM-DD env goal host_step
#
# Steps (default: all, in this order):
#   env         driver, GPU, Python packages, `dtrain gpus` through the real NVML
#   tests       pytest tests/test_gpu.py (NVML, busy GPU, reservation, bf16/fp16 training, NCCL preemption + resume)
#   checkpoint  benchmarks/checkpoint.py --device cuda (~100M parameters)
#   compare     benchmarks/compare.py --device cuda, bf16 then fp16, 1 process (one GPU: NCCL cannot run two ranks on it)
#   loader      benchmarks/h5_loader.py (CPU only; this machine's cores are otherwise idle)
#   startup     compare.py start-up section on the GPU
#   fsdp        sharded training on the GPU, world size 1 (one GPU): two FSDP tests of tests/test_gpu.py (bf16
#               ResNet-18 SIGTERM -> bit-exact resume -> export -> eval; an async sharded save from GPU memory;
#               the `tests` step runs the strategy x precision x BatchNorm matrix on CUDA), then benchmarks/fsdp.py --device cuda
#               --quick (dtrain fsdp vs ddp in bf16 on CUDA for the 101.6M BlockStack and ResNet-18: samples/s and
#               peak memory, checkpoints on; sharded and async DCP saves from GPU memory: the time a save blocks,
#               the values of the save moment); skipped without CUDA; at most ~6 min on an H100/H200
#   suite       the default test suite (must pass with a GPU present too)
#   goal        (not in the default list) issue 24: compare.py --device cuda --precision bf16 --nprocs 1 --quick --repeats 1
#               on resnet18 (3x32x32) and the goal's workloads resnet18_mpmt (38x16x40 mPMT images), resnet18_hits
#               (a hit-list file; the peers read the same events converted to images) and tutorial_cnn, all at
#               batch 256, with the compiled contender in each mode of $GOAL_MODES (default "default"; add
#               reduce-overhead for CUDA graphs: GOAL_MODES="default reduce-overhead", about twice as long).
#               ~6-8 min per mode: 24 runs of a few seconds each, cold compiles of the three networks, writing
#               the 2 GB image files. Output: goal_<mode>.log/.json/.png with the RESULT lines
#               compare_cuda_bf16_<w>_dtrain_compiled_vs_ddp_mem_min_over_P (>= 1.3) and
#               cuda_bf16_<w>_dtrain_compiled_gpu_busy_pct_min_over_P (>= 95).
#   host_step   (not in the default list) benchmarks/host_step.py --device cuda --quick: the host side of a step,
#               A/B per change (DeviceFeed, pinned uint8, side stream, channels_last); ~1-2 min
# Needs torch with CUDA, h5py, nvidia-ml-py, accelerate, lightning, tensorboard, click, psutil, tqdm,
# matplotlib, pytest, pytest-timeout in `python3` (or $PYTHON); dtrain runs from this checkout.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-gpu-validation}
shift || true
STEPS=${*:-env tests checkpoint compare loader startup fsdp suite}
PY=${PYTHON:-python3}
COMPARE_ARGS=${COMPARE_ARGS:-}  # e.g. "--quick --repeats 1"
PRECISIONS=${PRECISIONS:-bf16 fp16}
GOAL_MODES=${GOAL_MODES:-default}  # compile modes of the goal step's dtrain-compiled contender
GOAL_WORKLOADS=${GOAL_WORKLOADS:-resnet18,resnet18_mpmt,resnet18_hits,tutorial_cnn}
GOAL_ARGS=${GOAL_ARGS:---quick --repeats 1}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

step() {  # step NAME COMMAND...: run, log, keep going on failure
    local name=$1
    shift
    echo "=== $name: $* ($(date -u +%H:%M:%S))"
    local start=$SECONDS
    "$@" >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    grep -E '^RESULT|passed|failed|error' "$OUT_DIR/$name.log" | tail -n 40
}

env_facts() {
    nvidia-smi
    $PY -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())'
    $PY -m pip list 2>/dev/null | grep -iE '^(torch|accelerate|lightning|h5py|numpy|nvidia-ml-py|tensorboard|click) '
    nproc
    free -g
    $PY -m launcher.cli gpus
    $PY -m launcher.cli gpus --json
}

for name in $STEPS; do
    case $name in
        env) step env env_facts ;;
        tests) step tests $PY -m pytest -v -p no:cacheprovider tests/test_gpu.py ${TEST_ARGS:-} ;;
        checkpoint) step checkpoint $PY benchmarks/checkpoint.py --device cuda --dir "$OUT_DIR/ckpt_tmp" ;;
        compare) for precision in $PRECISIONS; do
                step "compare_$precision" $PY benchmarks/compare.py --device cuda --precision "$precision" --nprocs 1 \
                    --sections throughput --json "$OUT_DIR/compare_$precision.json" --plot "$OUT_DIR/compare_$precision.png" $COMPARE_ARGS
            done ;;
        loader) step loader $PY benchmarks/h5_loader.py ;;
        startup) step startup $PY benchmarks/compare.py --device cuda --sections startup ${STARTUP_ARGS:-} ;;
        fsdp) if $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
                step fsdp_tests $PY -m pytest -v -p no:cacheprovider --timeout 300 tests/test_gpu.py -k "fsdp_bf16_resnet18 or async_sharded_save" ${FSDP_TEST_ARGS:-}
                step fsdp $PY benchmarks/fsdp.py --device cuda --quick --json "$OUT_DIR/fsdp.json" ${FSDP_ARGS:-}
            else
                echo "=== fsdp: skipped, torch sees no CUDA device"
            fi ;;
        goal) for mode in $GOAL_MODES; do
                step "goal_$mode" $PY benchmarks/compare.py --device cuda --precision bf16 --nprocs 1 --sections throughput \
                    --workloads "$GOAL_WORKLOADS" --compile-mode "$mode" \
                    --json "$OUT_DIR/goal_$mode.json" --plot "$OUT_DIR/goal_$mode.png" $GOAL_ARGS
            done ;;
        host_step) step host_step $PY benchmarks/host_step.py --device cuda --quick ${HOST_STEP_ARGS:-} ;;
        suite) step suite $PY -m pytest -q -p no:cacheprovider -x --timeout 300 ;;
        *) echo "unknown step $name" ;;
    esac
done
rm -rf "$OUT_DIR/ckpt_tmp"

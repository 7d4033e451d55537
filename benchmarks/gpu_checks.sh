#!/usr/bin/env bash
# The GPU figures of the README, in one script: rollout speed at the 1B and 7B shapes (eager loop vs the
# static-cache engine, same process), one full GRPO step of the 1B recipe phase by phase, and the GPU-only
# tests. Run from the repository root on a machine with one CUDA GPU:
#
#     bash benchmarks/gpu_checks.sh [OUT_DIR] [PART...]      # parts: env rollout1b step1b rollout7b tests profile kernels sweep tune1b
#
# COMPILE_1B / COMPILE_7B pick the engines of the rollout parts (1B default fused+pack+triton,fused: the 1B
# config's engine and plain fused; 7B default
# fused+pack+triton,fused+pack+triton_s128_b32_w4_p1,fused+pack+triton+triton_lin+fp8,
# fused+pack+triton+triton_lin_n64_k128_s0_w4_p3_m64+fp8,fused+pack+triton+triton_lin_n64_k128_s0_w4_p3_c+fp8,
# fused+pack+triton+triton_lin+fp8+fp8kv: the Triton attention at its default launch (one program per row and head
# at this batch) and at the launch before 2026-11-28 (15.3x then), the projections on float8 weights (engine_weights
# fp8) widened by their bits, the same in 64-row programs (wgmma on sm_90) and (_c) by Triton's conversion (the
# way that was slower than bf16 on 2026-11-28), and with the float8 cache too (engine_kv fp8, its write fixed
# since); profile with PROFILE_SHAPE=7b COMPILE_PROFILE=fused+pack+triton+triton_lin+fp8,fused+pack+triton); comma-separated,
# each MODE[+ATTENTION][+pack] as benchmarks/rollout.py --compile takes them, e.g.
# COMPILE_1B=fused,fused+pack,fused+reduce,fused+sdpa,fused+triton); COMPILE_STEP the static engine's mode in step1b
# (default fused+pack+triton, configs/janus_pro_1b_1gpu.yaml's engine on a GPU, against the eager loop). CHUNK_1B sets the 1B rollout's window granularity (default 128 on
# CUDA; smaller windows read less unfilled cache and cost more captures, but no more compiles under fused).
# PROMPTS_1B / PROMPTS_7B: prompts per rollout (default 16, the issue's batch; rows are twice that with CFG).
# `profile` lists the kernels of the step (uncaptured: the same kernels, each timed on the device) for each engine of
# COMPILE_PROFILE (default fused+pack+triton,fused) at PROFILE_SHAPE (default 1b);
# `sweep` times the triton attention's launch configurations against each other and matmul (decode_kernels.py
# --triton-sweep at SWEEP_WINDOWS, default 384,640: the image stage's mean and late windows at the 1B shape); its
# triton_best names go into COMPILE_1B as they are, e.g. COMPILE_1B=fused+pack+triton,fused+pack+triton_s64_b64_w8_p2;
# `tune1b` runs `sweep` (with the Triton projections' launch configurations, --linear-sweep), then `rollout1b` with
# COMPILE_1B=fused+pack+triton,fused+pack+<the engine's launch before 2026-11-28 (triton_s128_b32_w4_p1)>,fused+pack+<the sweep's
# best attention over its windows>,fused+pack+<that, with _l where _l won at its size>+<the best Triton projections
# where they beat cuBLAS, else triton_lin>,fused: the engine's configuration against the kernel before, the best, and the Triton projections
# (modules/decode_linear.py) in one process (the sweep's answer, timed whole), then the engines of EXTRA_1B, if any;
# `kernels` times the step's matmul and attention candidates (benchmarks/decode_kernels.py) at KERNELS_SHAPE
# (default 1b), with inductor max-autotune matmuls unless KERNELS_AUTOTUNE=0 (minutes of compiling), and the
# Triton projections (modules/decode_linear.py) at 38 launch configurations unless LINEAR_SWEEP=0.
# Each part runs under its own time limit and writes OUT_DIR/<part>.log; a part that fails or runs out of
# time does not stop the others.
set -u
out=${1:-gpu_checks}
shift || true
parts=${*:-env rollout1b step1b rollout7b tests}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
# wheels carried from benchmarks/gpu_wheels.sh (mlflow, jsonargparse, omegaconf and their needs), if any
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
        export PYTHONPATH=$PYTHONPATH:/tmp/site && echo "installed $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
fi

run() {  # name limit_s command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s) $(date +%T)"
    local start=$SECONDS
    timeout -k 10 "$limit" "$@" >"$out/$name.log" 2>&1
    echo "=== $name: exit $? after $((SECONDS - start))s"
    grep -E '^\{|passed|failed|error|Error' "$out/$name.log" | tail -n 25
}

rollout1b() {  # engines (benchmarks/rollout.py --compile)
    run rollout1b "${LIMIT_ROLLOUT1B:-230}" $py benchmarks/rollout.py --shape 1b --prompts "${PROMPTS_1B:-16}" --rounds 3 --eager-rounds 1 --compile "$1" ${CHUNK_1B:+--chunk $CHUNK_1B}
}

sweep() {
    run sweep "${LIMIT_SWEEP:-300}" $py benchmarks/decode_kernels.py --shape "${KERNELS_SHAPE:-1b}" --triton-sweep --linear-sweep --windows "${SWEEP_WINDOWS:-384,640}" --reps 20
}

for part in $parts; do
    case $part in
    env) run env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $py -c 'import torch, transformers, lightning, peft; print(torch.__version__, transformers.__version__, lightning.__version__, peft.__version__, torch.cuda.get_device_name())'" ;;
    rollout1b) rollout1b "${COMPILE_1B:-fused+pack+triton,fused}" ;;
    step1b) run step1b "${LIMIT_STEP1B:-230}" $py benchmarks/grpo_step.py --shape 1b --engines static,eager --eager-steps 1 --steps 3 --compile "${COMPILE_STEP:-fused+pack+triton}" ;;
    profile) run profile "${LIMIT_PROFILE:-150}" $py benchmarks/profile_step.py --shape "${PROFILE_SHAPE:-1b}" --compile "${COMPILE_PROFILE:-fused+pack+triton,fused}" --no-capture --image-tokens 128 ;;
    tune1b)
        KERNELS_SHAPE=1b sweep
        # ranked from the log: a sweep cut short by its limit still names the best of what it measured
        best=$($py -c 'import sys; sys.path.insert(0, "benchmarks")
from decode_kernels import best_triton, timings_from_log
print(best_triton(timings_from_log(sys.argv[1]))[0] or "")' "$out/sweep.log")
        tuned=$($py -c 'import sys; sys.path.insert(0, "benchmarks")
from decode_kernels import timings_from_log, tuned_attention
print(tuned_attention(timings_from_log(sys.argv[1])) or "")' "$out/sweep.log")
        lin=$($py -c 'import sys; sys.path.insert(0, "benchmarks")
from decode_kernels import best_linear, timings_from_log
print(best_linear(timings_from_log(sys.argv[1], "linear")) or "triton_lin")' "$out/sweep.log")
        before=$($py -c 'from modules.decode_attention import Launch; print(Launch(split=128, parts=0, stages=1).name)')
        echo "tune1b: the sweep's best attention: ${best:-none} (for the rollout: ${tuned:-none}), projections: $lin; the launch before: $before"
        rollout1b "fused+pack+triton,fused+pack+$before${best:+,fused+pack+$best},fused+pack+${tuned:-triton}+$lin,fused${EXTRA_1B:+,$EXTRA_1B}" ;;
    sweep) sweep ;;
    kernels) run kernels "${LIMIT_KERNELS:-180}" $py benchmarks/decode_kernels.py --shape "${KERNELS_SHAPE:-1b}" $([ "${KERNELS_AUTOTUNE:-1}" = 1 ] && echo --autotune) $([ "${LINEAR_SWEEP:-1}" = 1 ] && echo --linear-sweep) ;;
    rollout7b) run rollout7b "${LIMIT_ROLLOUT7B:-300}" $py benchmarks/rollout.py --shape 7b --prompts "${PROMPTS_7B:-16}" --rounds 3 --eager-rounds 1 --compile "${COMPILE_7B:-fused+pack+triton,fused+pack+triton_s128_b32_w4_p1,fused+pack+triton+triton_lin+fp8,fused+pack+triton+triton_lin_n64_k128_s0_w4_p3_m64+fp8,fused+pack+triton+triton_lin_n64_k128_s0_w4_p3_c+fp8,fused+pack+triton+triton_lin+fp8+fp8kv}" ;;
    tests)
        # the kernels first (marked triton: compiled on the GPU; about 20 s), the CLI fits last (minutes)
        files="tests/modules/test_decode_attention.py tests/modules/test_decode_linear.py tests/modules/test_engine.py"
        files="$files tests/modules/rewards/test_base.py"
        files="$files tests/bicot/test_gpu_fit.py"
        # the per-phase GPU memory test fits through the CLI: it needs mlflow, jsonargparse and omegaconf
        # (carry them as wheels where the GPU machine lacks them: benchmarks/gpu_wheels.sh)
        if $py -c "import mlflow, jsonargparse, omegaconf" 2>/dev/null; then
            files="$files tests/callbacks/test_phase_memory.py"
        else
            echo "tests: mlflow/jsonargparse/omegaconf missing, skipping tests/callbacks/test_phase_memory.py"
        fi
        # TESTS_K narrows them (pytest -k), e.g. TESTS_K="fp8 or decode_attention": the float8 cases and the attention kernels
        # spread over TESTS_WORKERS processes (pytest-xdist; default 8, 0 for one): most of their time is compiling,
        # on the CPU. With 8 on the H200 machine (16 cores) 76 of the 77 took 170 s, the 1B memory-plan test 53 s
        # (it came last there; work stealing lets an idle worker take queued tests).
        workers=${TESTS_WORKERS:-8}
        $py -c "import xdist" 2>/dev/null || workers=0
        run tests "${LIMIT_TESTS:-360}" $py -m pytest -v -p no:cacheprovider -m "gpu or triton" ${TESTS_K:+-k "$TESTS_K"} \
            $([ "$workers" -gt 0 ] && echo "-n $workers --dist worksteal") --durations=10 $files ;;
    *) echo "unknown part $part" >&2 ;;
    esac
done

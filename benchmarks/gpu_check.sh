#!/usr/bin/env bash
# The checks that need a GPU, for a machine that has one: every GPU-only test (they skip on the CPU, with
# the reason), Megatron's trainer and torchtitan's Trainer with grouter routing on GPUs. Each section is a function named
# <name>_checks; with no argument every section runs (alphabetical order), else those named:
#
#     bash benchmarks/gpu_check.sh              # all sections
#     bash benchmarks/gpu_check.sh megatron     # one (core, megatron, torchtitan)
#
# Needs `make install` done (the .venv; on a GPU machine install its CUDA torch into .venv first) and, for
# the Megatron section, Transformer Engine importable in .venv. A section fails when any of its tests fails
# or is skipped (a skip here means the machine lacks what the check needs); the 2-GPU checks are reported
# as not run on a 1-GPU machine. Budget: under 8 minutes on one H100 (each section has a time limit).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
GPUS="$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')"

# pytest with a time limit (seconds, first argument); fails on a failure or a skip.
run_tests() {
    local limit="$1" log rc
    shift
    log="$(mktemp)"
    timeout "$limit" "$PY" -m pytest -q -rs -p no:cacheprovider "$@" 2>&1 | tee "$log"
    rc="${PIPESTATUS[0]}"
    if grep -q "^SKIPPED" "$log"; then
        echo "gpu_check: the tests above were skipped: this machine lacks what they need (see the reasons)"
        rc=1
    fi
    rm -f "$log"
    return "$rc"
}

# Core: routing computed on the GPU equals the CPU's (Hugging Face router prefix); with 2+ GPUs, a
# source split over a process's GPUs (capture --device-map auto) gives the one-device scores.
core_checks() {
    local tests=(tests/test_hf_source.py::test_cuda_matches_cpu)
    if [ "$GPUS" -ge 2 ]; then
        tests+=(tests/test_hf_source.py::test_device_map_splits_a_source_over_two_gpus)
    else
        echo "gpu_check: 1 GPU: test_device_map_splits_a_source_over_two_gpus not run (needs 2)"
    fi
    run_tests 120 "${tests[@]}"
}

# Megatron: TE layer spec with the Grouter router; examples/megatron_train.py with TE layers, bf16 and
# recompute; the entry point (Megatron's pretrain()) with TE, bf16, grouped GEMM, NCCL EP = min(2, GPUs),
# checkpoint and resume; with 2+ GPUs, Megatron's alltoall dispatcher bytes under NCCL equal the
# planner's cost model.
megatron_checks() {
    local tests=(tests/test_integration_megatron.py::test_transformer_engine_layer_spec_gets_the_router
                 tests/test_integration_megatron.py::test_cuda_transformer_engine_bf16_training
                 tests/test_megatron_pretrain.py::test_entry_point_on_gpus)
    if [ "$GPUS" -ge 2 ]; then
        tests+=(tests/test_integration_megatron.py::test_nccl_alltoall_bytes_equal_the_megatron_cost_model)
    else
        echo "gpu_check: 1 GPU: test_nccl_alltoall_bytes_equal_the_megatron_cost_model not run (needs 2)"
    fi
    run_tests 360 "${tests[@]}"
}

# -- torchtitan (docs/torchtitan.md) ------------------------------------------------------------
# 1. the tests that skip without CUDA (FlexAttention's backward);
# 2. the one-GPU launch of docs/torchtitan.md, exactly as written, on demo-shaped data: torchtitan's
#    whole Trainer (CUDA device, spmd_types backend, FSDP over NCCL, full activation checkpointing),
#    whose config the CPU tests build in parts (tests/test_torchtitan_trainer.py);
# 3. the same launch with --checkpoint.enable, stopped at step 10 and resumed to 20: the losses
#    of steps 11-20 must equal the uninterrupted run's.
# torchtitan 0.3.0 needs a torch with torch.distributed.set_timeout (docs/torchtitan.md#versions).
torchtitan_checks() (
    set -e  # a subshell: the first failing step fails the section, and the next sections still run
    export PATH="$(dirname "$PY"):$PATH"
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torchtitan_checks: no CUDA device')"
    "$PY" -c "import torch.distributed as d, sys; sys.exit(0 if hasattr(d, 'set_timeout') else \
'torchtitan_checks: this torch lacks torch.distributed.set_timeout, which torchtitan 0.3.0 needs')"
    echo "== torchtitan: GPU-only tests"
    run_tests 240 tests/test_integration_torchtitan.py -k gpu

    local work
    work=$(mktemp -d)
    "$PY" -c "from grouter.testing import demo_like; demo_like('$work/demo', ranks=1)"
    ln -s "$PWD/examples" "$work/examples"
    local launch
    launch=$("$PY" -c "from grouter.testing import documented_command as c; \
print(c('docs/torchtitan.md', '--nproc_per_node 1', 'grouter_qwen3_moe_small'))")
    echo "== torchtitan: the documented launch, as written"
    echo "$launch"
    (cd "$work" && bash -c "$launch" 2>&1 | tee "$work/launch.log" | tail -5)
    grep -q "Training completed" "$work/launch.log"

    echo "== torchtitan: checkpoint and resume through the Trainer"
    # an interrupted job leaves its step-10 checkpoint: resume from a copy of it, to step 20
    local args="--training.steps 20 --checkpoint.enable --checkpoint.interval 10 --metrics.log_freq 1 \
--metrics.disable_color_printing"
    (cd "$work" && bash -c "$launch $args --dump_folder $work/whole" > "$work/whole.log" 2>&1)
    mkdir -p "$work/resumed/checkpoint"
    cp -r "$work/whole/checkpoint/step-10" "$work/resumed/checkpoint/"
    (cd "$work" && bash -c "$launch $args --dump_folder $work/resumed" > "$work/resumed.log" 2>&1)
    "$PY" - "$work/whole.log" "$work/resumed.log" <<'EOF'
import re, sys
def losses(path):
    return {int(s): l for s, l in re.findall(r"step:\s*(\d+)\s.*?loss:\s*([0-9.]+)", open(path).read())}
whole, resumed = losses(sys.argv[1]), losses(sys.argv[2])
steps = sorted(s for s in resumed if s > 10)
assert steps == list(range(11, 21)), steps
assert all(resumed[s] == whole[s] for s in steps), [(s, whole[s], resumed[s]) for s in steps]
print("resumed == uninterrupted for steps 11-20")
EOF
    rm -rf "$work"
)

main() {
    if [ "$GPUS" -lt 1 ]; then
        echo "gpu_check: no CUDA GPU visible to $PY; nothing checked" >&2
        return 2
    fi
    local sections=("$@") failed=0 name
    if [ "${#sections[@]}" -eq 0 ]; then
        mapfile -t sections < <(declare -F | awk '{print $3}' | sed -n 's/_checks$//p')
    fi
    for name in "${sections[@]}"; do
        echo "== gpu_check: $name (GPUs: $GPUS)"
        "${name}_checks" || { echo "gpu_check: $name FAILED"; failed=1; }
    done
    return "$failed"
}

main "$@"

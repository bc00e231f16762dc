#!/usr/bin/env bash
# The checks that need a GPU, for a machine that has one: every GPU-only test (they skip on the CPU, with
# the reason) and Megatron's trainer with grouter routing on GPUs. Each section is a function named
# <name>_checks; with no argument every section runs (alphabetical order), else those named:
#
#     bash benchmarks/gpu_check.sh              # all sections
#     bash benchmarks/gpu_check.sh megatron     # one
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

# Core: routing computed on the GPU equals the CPU's (Hugging Face router prefix).
core_checks() {
    run_tests 120 tests/test_hf_source.py::test_cuda_matches_cpu
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

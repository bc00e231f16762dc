#!/usr/bin/env bash
# What CI's CPU machines cannot run: the checks that need a GPU, one section per engine.
#
#   bash benchmarks/gpu_check.sh [torchtitan|all]
#
# From the repository root, on a CUDA machine, after `make install` with a CUDA torch in .venv
# (README: install it first and make keeps it). Each section prints what it ran and stops at the
# first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PATH="$(dirname "$PY"):$PATH"

# -- torchtitan (docs/torchtitan.md) ------------------------------------------------------------
# 1. the tests that skip without CUDA (FlexAttention's backward);
# 2. the one-GPU launch of docs/torchtitan.md, exactly as written, on demo-shaped data: torchtitan's
#    whole Trainer (CUDA device, spmd_types backend, FSDP over NCCL, full activation checkpointing),
#    whose config the CPU tests build in parts (tests/test_torchtitan_trainer.py);
# 3. the same launch with --checkpoint.enable, stopped at step 10 and resumed to 20: the losses
#    of steps 11-20 must equal the uninterrupted run's.
# torchtitan 0.3.0 needs a torch with torch.distributed.set_timeout (docs/torchtitan.md#versions).
torchtitan_checks() {
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torchtitan_checks: no CUDA device')"
    "$PY" -c "import torch.distributed as d, sys; sys.exit(0 if hasattr(d, 'set_timeout') else \
'torchtitan_checks: this torch lacks torch.distributed.set_timeout, which torchtitan 0.3.0 needs')"
    echo "== torchtitan: GPU-only tests"
    "$PY" -m pytest -q tests/test_integration_torchtitan.py -k gpu -rs

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
}

case "${1:-all}" in
    torchtitan) torchtitan_checks ;;
    all) torchtitan_checks ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [torchtitan|all]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Issue 6's GPU figures in one call of a lent GPU machine (its image has torch, transformers, Triton and most of
# policyc's dependencies, but no network). Two steps:
#
#   bash benchmarks/gpu_session.sh wheels          # here (with network): the wheels that image lacks, into .whl/
#   bash benchmarks/gpu_session.sh run [MINUTES]   # there, with .whl carried: install, check, time, write $OUT
#
# `run` installs the carried wheels into /tmp/site and policyc itself editable (never over the image's torch),
# checks the fused kernels against eager on the GPU and times them (benchmarks/kernel_timings.py), checks the analytic
# FLOPs against the decoder's time at each kept count (benchmarks/flops_scaling.py), then runs the speed matrix
# (benchmarks/speed.py) starting configurations for MINUTES minutes (default 6), 64 tokens of every policy first,
# benches FastV on Qwen2.5-VL-7B shapes, and leaves gpu_results.tgz (every table, JSON and the plot), kernels.md and
# RESULTS.md in $OUT (or benchmarks/ without it), refreshed after each step. Estimated (no GPU run yet): about
# MINUTES + 6 minutes at most (install, kernels and FLOPs 1-2, the last speed configuration up to 2, Qwen up to
# 2.5), so under a 10-minute command limit pass 3 or 4. Unpack the archive here: `tar xzf gpu_results.tgz -C
# benchmarks`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Python packages policyc imports that the GPU image's list (the device tool's KINDS.md) does not name.
WHEELS="lark==1.3.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
setuptools==84.2.1"

case "${1:-}" in
  wheels)
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl $WHEELS
    ls .whl
    ;;
  run)
    minutes="${2:-6}"
    out=/tmp/policyc-gpu
    dest="${OUT:-benchmarks}"
    mkdir -p "$out"
    # the device tool returns at most 8 files: everything in one archive, refreshed after each step (a command
    # stopped at its time limit still returns what it had), plus the two tables to read at once
    snapshot() {
      tar czf "$dest/gpu_results.tgz" -C "$out" .
      cp "$out/kernels.md" "$dest/" 2>/dev/null || true
      cp "$out/speed/RESULTS.md" "$dest/" 2>/dev/null || true
    }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    # editable: bench's reference row imports tests/reference from the checkout policyc runs from
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    python3 benchmarks/kernel_timings.py --device cuda --json "$out/kernels.json" | tee "$out/kernels.md"
    python3 benchmarks/kernel_timings.py --device cuda --kv-heads 4 --length 4096 --batch 2 \
      --json "$out/kernels_gqa_long.json" | tee "$out/kernels_gqa_long.md"
    python3 benchmarks/flops_scaling.py --device cuda --json "$out/flops_scaling.json" | tee "$out/flops_scaling.md"
    snapshot
    # --minutes stops starting configurations; the timeout stops the last one (its JSON is then missing)
    timeout $((minutes * 60 + 120)) python3 benchmarks/speed.py --device cuda --minutes "$minutes" --out "$out/speed" \
      || { echo "speed.py failed or timed out: $?"; python3 benchmarks/speed.py --report-only --out "$out/speed"; }
    snapshot
    # Qwen2.5-VL-7B shapes: FastV at 64 of 576 image tokens per image (its M-RoPE reference in the last row)
    timeout 150 python3 -c 'from policyc.cli import main; main()' bench --shapes qwen2.5-vl-7b fastv \
      --param ratio=11.1545% --device cuda --warmup 1 --repeats 3 --json "$out/qwen_fastv.json" \
      | tee "$out/qwen_fastv.md" || echo "qwen bench failed or timed out: $?"
    snapshot
    ;;
  *)
    echo "usage: bash benchmarks/gpu_session.sh wheels | run [MINUTES]" >&2
    exit 2
    ;;
esac
